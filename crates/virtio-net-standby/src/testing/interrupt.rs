//! [`RecordingInterrupt`]: an interrupt sink that counts what the device raises.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_device::{VirtioInterrupt, VirtioInterruptType};

/// Counts interrupts per kind. Implements [`VirtioInterrupt`].
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    config: AtomicU64,
    queues: Mutex<Vec<u64>>,
}

impl RecordingInterrupt {
    /// Configuration-change interrupts raised.
    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::SeqCst)
    }

    /// Interrupts raised for queue `q`.
    pub fn queue_count(&self, q: u16) -> u64 {
        self.queues
            .lock()
            .expect("lock")
            .get(usize::from(q))
            .copied()
            .unwrap_or(0)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        match t {
            VirtioInterruptType::Config => {
                self.config.fetch_add(1, Ordering::SeqCst);
            }
            VirtioInterruptType::Queue(q) => {
                let mut v = self.queues.lock().expect("lock");
                if v.len() <= usize::from(q) {
                    v.resize(usize::from(q) + 1, 0);
                }
                v[usize::from(q)] += 1;
            }
        }
        Ok(())
    }
}
