//! [`RecordingBackend`]: a backend that records what the device does to it
//! ([`BackendLog`]) and delivers frames a test queues.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::backend::NetBackend;
use crate::features::Features;

/// What a [`RecordingBackend`] was told.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackendLog {
    /// Frames sent, header included.
    pub sent: Vec<Vec<u8>>,
    /// Every `set_offloads` call.
    pub offloads: Vec<Features>,
    /// Every `set_enabled` call.
    pub enabled: Vec<bool>,
}

/// A backend that records what the device does to it and delivers frames
/// queued in [`RecordingBackend::incoming`].
#[derive(Debug, Default, Clone)]
pub struct RecordingBackend {
    /// Behave like a tap: never tell the length of the next frame.
    pub opaque: bool,
    /// Behave like a tap given too little room: copy what fits and report the
    /// frame's full length (instead of failing with `EFAULT`).
    pub truncating: bool,
    /// Fail every receive with `EBADFD`, as a detached tap queue does.
    pub failing: bool,
    /// What the device did.
    pub log: Arc<Mutex<BackendLog>>,
    /// Frames to deliver, header included, oldest first.
    pub incoming: Arc<Mutex<std::collections::VecDeque<Vec<u8>>>>,
    /// Make `send` return `WouldBlock`.
    pub full: Arc<std::sync::atomic::AtomicBool>,
}

impl NetBackend for RecordingBackend {
    fn send(&mut self, frame: &crate::TxFrame<'_>) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let mut v = vec![0u8; frame.len()];
        frame.copy_to(&mut v);
        self.log.lock().expect("lock").sent.push(v);
        Ok(())
    }

    fn recv(&mut self, bufs: &mut crate::RxBuffers<'_>) -> std::io::Result<usize> {
        if self.failing {
            return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
        }
        let f = self
            .incoming
            .lock()
            .expect("lock")
            .pop_front()
            .ok_or(std::io::ErrorKind::WouldBlock)?;
        if f.len() > bufs.capacity() {
            if self.truncating {
                bufs.write_at(0, &f[..bufs.capacity()]);
                return Ok(f.len());
            }
            // The frame is lost, EFAULT.
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        bufs.write_at(0, &f);
        Ok(f.len())
    }

    fn peek(&mut self) -> crate::RxPeek {
        if self.opaque {
            return crate::RxPeek::Unknown;
        }
        match self.incoming.lock().expect("lock").front() {
            Some(f) => crate::RxPeek::Frame(f.len()),
            None => crate::RxPeek::Empty,
        }
    }

    fn offloads_supported(&self) -> Features {
        crate::features::GUEST_OFFLOADS.union(crate::features::HOST_OFFLOADS)
    }

    fn set_offloads(&mut self, guest: Features) -> std::io::Result<()> {
        self.log.lock().expect("lock").offloads.push(guest);
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        self.log.lock().expect("lock").enabled.push(enabled);
        Ok(())
    }
}
