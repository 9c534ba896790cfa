//! The guest's interrupt controller: [`IrqQueue`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm_pci::{MsiMessage, MsiSink};

/// The guest's interrupt controller: every MSI the devices send lands here, and
/// the guest dispatches by message data. Give it to devices as their
/// [`MsiSink`].
#[derive(Debug, Default)]
pub struct IrqQueue {
    q: Mutex<VecDeque<MsiMessage>>,
}

impl IrqQueue {
    /// An empty queue.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<MsiMessage>> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the messages carrying `data`; returns how many there were.
    pub fn take_matching(&self, data: u32) -> usize {
        let mut q = self.lock();
        let before = q.len();
        q.retain(|m| m.data != data);
        before - q.len()
    }

    /// Removes and returns everything queued.
    pub fn drain(&self) -> Vec<MsiMessage> {
        self.lock().drain(..).collect()
    }
}

impl MsiSink for IrqQueue {
    fn deliver(&self, _vector: u16, message: MsiMessage) {
        self.lock().push_back(message);
    }
}
