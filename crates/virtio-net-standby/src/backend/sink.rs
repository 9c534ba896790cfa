//! A backend with no network behind it: [`Discard`] counts and drops what the
//! guest sends and never delivers anything. [`SinkStats`] reads its counts (and a
//! [`Generator`](super::Generator)'s) from any thread.
//!
//! It measures the device alone (no tap, no kernel) and exercises a guest's
//! driver's transmit path at full speed. It accepts every offload, since it never
//! looks inside a frame.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{NetBackend, RxBuffers, RxPeek, TxFrame};
use crate::features::{Features, GUEST_OFFLOADS, HOST_OFFLOADS};
use crate::header::{HDR_LEN, MAX_BUFFER_LEN};

/// Frames and bytes a sink or generator moved, readable from any thread.
#[derive(Debug, Default)]
pub struct SinkStats {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl SinkStats {
    /// Frames counted so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Bytes counted so far (Ethernet frames, without the virtio-net header).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(super) fn add(&self, frame_len: usize) {
        // Only the queue pair's thread writes; a load and a store are enough.
        let f = self.frames.load(Ordering::Relaxed);
        self.frames.store(f + 1, Ordering::Relaxed);
        let b = self.bytes.load(Ordering::Relaxed);
        self.bytes.store(b + frame_len as u64, Ordering::Relaxed);
    }
}

/// Drops every frame the guest sends, counting them. Never delivers anything.
///
/// [`Discard::new`] reads nothing of a frame but its length: it measures the
/// device alone. [`Discard::copying`] first copies every frame out of guest
/// memory, as any backend that moves frames must (a tap's `writev`, a packet
/// buffer in a userspace switch): it measures the device plus one copy.
#[derive(Debug, Default, Clone)]
pub struct Discard {
    stats: Arc<SinkStats>,
    /// Where frames are copied to; empty when they are not.
    scratch: Vec<u8>,
}

impl Discard {
    /// A new sink that does not look at the frames.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new sink that copies every frame (header included) into a private
    /// buffer before dropping it.
    pub fn copying() -> Self {
        Discard {
            stats: Arc::default(),
            scratch: vec![0; MAX_BUFFER_LEN],
        }
    }

    /// What it dropped (shared: keep a clone to watch a running device).
    pub fn stats(&self) -> Arc<SinkStats> {
        Arc::clone(&self.stats)
    }
}

impl NetBackend for Discard {
    #[inline]
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        if !self.scratch.is_empty() {
            let n = frame.copy_to(&mut self.scratch);
            std::hint::black_box(&self.scratch[..n]);
        }
        self.stats.add(frame.len().saturating_sub(HDR_LEN));
        Ok(())
    }

    fn recv(&mut self, _bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn peek(&mut self) -> RxPeek {
        RxPeek::Empty
    }

    fn offloads_supported(&self) -> Features {
        GUEST_OFFLOADS.union(HOST_OFFLOADS)
    }

    fn set_offloads(&mut self, _guest_offloads: Features) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_counts_and_never_delivers() {
        for mut d in [Discard::new(), Discard::copying()] {
            discard_counts(&mut d);
        }
        // The copying sink holds what it copied last.
        let mut d = Discard::copying();
        discard_counts(&mut d);
        assert_eq!(&d.scratch[HDR_LEN..HDR_LEN + 100], &[7u8; 100][..]);
    }

    fn discard_counts(d: &mut Discard) {
        let mut bytes = vec![7u8; HDR_LEN + 100];
        let v = [libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        }];
        // SAFETY: `v` describes the live local buffer `bytes`.
        let f = unsafe { TxFrame::new(&v, bytes.len()) };
        d.send(&f).unwrap();
        d.send(&f).unwrap();
        assert_eq!(d.stats().frames(), 2);
        assert_eq!(d.stats().bytes(), 200);
        assert_eq!(d.peek(), RxPeek::Empty);
    }
}
