//! Interrupt delivery: the traits a VMM implements, and an eventfd implementation.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A message-signalled interrupt: the memory write a function performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Target address (on x86, 0xfee0_0000 plus the destination).
    pub address: u64,
    /// Data written (on x86, the vector and delivery mode).
    pub data: u32,
}

/// What became of an interrupt a function raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The message went to the sink.
    Sent,
    /// The vector (or the whole function) is masked; the pending bit is set and
    /// the message goes out when it is unmasked.
    Pending,
    /// MSI/MSI-X is disabled, bus mastering is off, or the vector is not allocated;
    /// nothing was sent or remembered.
    Dropped,
}

/// Where a function's message-signalled interrupts go. The VMM implements this: in
/// a KVM VMM, one irqfd per vector with a GSI route per message (see
/// [`EventFdMsi`]), or `KVM_SIGNAL_MSI`.
pub trait MsiSink: Send + Sync {
    /// Delivers `message` for `vector`. Called with the function's lock held: do
    /// not call back into the function.
    fn deliver(&self, vector: u16, message: MsiMessage);

    /// The guest changed what `vector` sends: `Some` with the new message when the
    /// vector is enabled and unmasked, `None` when it can no longer fire. A VMM
    /// with irqfd routes updates the GSI route here. Default: nothing.
    fn update_route(&self, vector: u16, message: Option<MsiMessage>) {
        let _ = (vector, message);
    }
}

/// A level-triggered INTx line. The VMM implements this (a resample irqfd in KVM).
pub trait IntxSink: Send + Sync {
    /// Asserts (`true`) or deasserts the line.
    fn set_level(&self, asserted: bool);
}

struct Vector {
    fd: EventFd,
    route: Mutex<Option<MsiMessage>>,
}

/// An [`MsiSink`] with one eventfd per vector: what a KVM VMM registers as irqfds.
/// Each delivery writes 1 to the vector's eventfd; route updates are kept for the
/// VMM to program into its GSI routing table (read them with [`EventFdMsi::route`]).
pub struct EventFdMsi {
    vectors: Vec<Vector>,
    failures: AtomicU64,
}

impl std::fmt::Debug for EventFdMsi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFdMsi")
            .field("vectors", &self.vectors.len())
            .finish()
    }
}

impl EventFdMsi {
    /// `vectors` non-blocking eventfds.
    pub fn new(vectors: u16) -> io::Result<Self> {
        let vectors = (0..vectors)
            .map(|_| {
                Ok(Vector {
                    fd: EventFd::new(EFD_NONBLOCK)?,
                    route: Mutex::new(None),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(EventFdMsi {
            vectors,
            failures: AtomicU64::new(0),
        })
    }

    /// The eventfd of `vector` (register it as an irqfd).
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(vector as usize).map(|v| &v.fd)
    }

    /// The message `vector` sends now, or `None` while it cannot fire.
    pub fn route(&self, vector: u16) -> Option<MsiMessage> {
        let v = self.vectors.get(vector as usize)?;
        *v.route.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deliveries that failed (eventfd write errors, or vectors out of range).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl MsiSink for EventFdMsi {
    fn deliver(&self, vector: u16, _message: MsiMessage) {
        let ok = self
            .vectors
            .get(vector as usize)
            .is_some_and(|v| v.fd.write(1).is_ok());
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn update_route(&self, vector: u16, message: Option<MsiMessage>) {
        if let Some(v) = self.vectors.get(vector as usize) {
            *v.route.lock().unwrap_or_else(|e| e.into_inner()) = message;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_sink_counts_and_routes() {
        let sink = EventFdMsi::new(2).unwrap();
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        sink.update_route(1, Some(m));
        sink.deliver(1, m);
        sink.deliver(1, m);
        assert_eq!(sink.eventfd(1).unwrap().read().unwrap(), 2);
        assert_eq!(sink.route(1), Some(m));
        assert_eq!(sink.route(0), None);
        sink.deliver(7, m);
        assert_eq!(sink.failures(), 1);
        assert!(sink.eventfd(0).unwrap().read().is_err());
    }
}
