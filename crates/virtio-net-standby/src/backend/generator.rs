//! A backend with no network behind it that feeds the guest: [`Generator`] fills
//! every receive buffer the guest posts with a stream of numbered frames, and
//! drops what the guest sends.
//!
//! With it a guest's driver receives at full speed and the device's RX path is
//! measured alone (no tap, no kernel). It accepts every offload, since it never
//! looks inside a frame.

use std::io;
use std::sync::Arc;

use super::sink::{Discard, SinkStats};
use super::{NetBackend, RxBuffers, RxPeek, TxFrame};
use crate::features::{Features, GUEST_OFFLOADS, HOST_OFFLOADS};
use crate::filter::MacAddr;
use crate::header::{HDR_LEN, MAX_FRAME_LEN};

/// Errors building a [`Generator`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frame length is outside what Ethernet and the device carry.
    #[error("generated frames must be 60 to {MAX_FRAME_LEN} bytes long, not {0}")]
    FrameLength(usize),
}

/// Result of building a [`Generator`].
pub type Result<T> = std::result::Result<T, Error>;

/// EtherType of generated frames: IEEE 802 local experimental, so no stack
/// mistakes them for its own traffic.
pub const GENERATOR_ETHERTYPE: u16 = 0x88b5;

/// Delivers an endless (or counted) stream of identical-length Ethernet frames to
/// the guest, each carrying its sequence number, and drops what the guest sends.
///
/// A frame is: destination MAC (the guest's), source `02:00:00:00:00:fe`,
/// EtherType [`GENERATOR_ETHERTYPE`], a little-endian `u64` sequence number
/// starting at 0, then bytes `i as u8` for payload offset `i`.
#[derive(Debug, Clone)]
pub struct Generator {
    /// Header and frame, ready to copy; the sequence number is patched in.
    template: Vec<u8>,
    next: u64,
    limit: Option<u64>,
    stats: Arc<SinkStats>,
    tx: Discard,
}

/// Offset of the sequence number in a generated frame (after the header).
const SEQ_OFFSET: usize = HDR_LEN + 14;

impl Generator {
    /// Frames of `frame_len` bytes (Ethernet header included, no FCS: 60 for
    /// the smallest), addressed to `dst`.
    pub fn new(frame_len: usize, dst: MacAddr) -> Result<Generator> {
        if !(60..=MAX_FRAME_LEN).contains(&frame_len) {
            return Err(Error::FrameLength(frame_len));
        }
        let mut template = vec![0u8; HDR_LEN + frame_len];
        let eth = &mut template[HDR_LEN..];
        eth[..6].copy_from_slice(&dst);
        eth[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
        eth[12..14].copy_from_slice(&GENERATOR_ETHERTYPE.to_be_bytes());
        for (i, b) in eth[14..].iter_mut().enumerate() {
            *b = i as u8;
        }
        Ok(Generator {
            template,
            next: 0,
            limit: None,
            stats: Arc::default(),
            tx: Discard::new(),
        })
    }

    /// Stops after `frames` frames.
    pub fn limit(mut self, frames: u64) -> Self {
        self.limit = Some(frames);
        self
    }

    /// Frames delivered so far.
    pub fn stats(&self) -> Arc<SinkStats> {
        Arc::clone(&self.stats)
    }

    /// What the guest sent (dropped).
    pub fn tx_stats(&self) -> Arc<SinkStats> {
        self.tx.stats()
    }

    /// The sequence number a generated frame carries, if `frame` (header
    /// included) is one.
    pub fn sequence(frame: &[u8]) -> Option<u64> {
        let eth = frame.get(HDR_LEN..)?;
        if eth.get(12..14)? != GENERATOR_ETHERTYPE.to_be_bytes() {
            return None;
        }
        Some(u64::from_le_bytes(eth.get(14..22)?.try_into().ok()?))
    }

    fn exhausted(&self) -> bool {
        self.limit.is_some_and(|l| self.next >= l)
    }
}

impl NetBackend for Generator {
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        self.tx.send(frame)
    }

    #[inline]
    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        if self.exhausted() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let len = self.template.len();
        if len > bufs.capacity() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "generated frame larger than the receive buffers",
            ));
        }
        let seq = self.next.to_le_bytes();
        // Frames from 60 bytes hold the 8-byte sequence number after the
        // 14-byte Ethernet header.
        self.template[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&seq);
        bufs.write_at(0, &self.template);
        self.next += 1;
        self.stats.add(len - HDR_LEN);
        Ok(len)
    }

    fn peek(&mut self) -> RxPeek {
        if self.exhausted() {
            RxPeek::Empty
        } else {
            RxPeek::Frame(self.template.len())
        }
    }

    fn offloads_supported(&self) -> Features {
        GUEST_OFFLOADS.union(HOST_OFFLOADS)
    }

    fn set_offloads(&mut self, _guest_offloads: Features) -> io::Result<()> {
        // Generated frames carry no offload, which suits every guest.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv_one(g: &mut Generator, cap: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; cap];
        let v = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: cap,
        }];
        // SAFETY: `v` describes the live local buffer `out`.
        let mut b = unsafe { RxBuffers::new(&v, cap) };
        let n = g.recv(&mut b)?;
        out.truncate(n);
        Ok(out)
    }

    #[test]
    fn generator_numbers_frames_and_stops_at_its_limit() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut g = Generator::new(64, mac).unwrap().limit(3);
        assert_eq!(g.peek(), RxPeek::Frame(HDR_LEN + 64));
        for i in 0..3u64 {
            let f = recv_one(&mut g, 2048).unwrap();
            assert_eq!(f.len(), HDR_LEN + 64);
            assert_eq!(&f[..HDR_LEN], &[0; HDR_LEN], "no offloads in the header");
            assert_eq!(&f[HDR_LEN..HDR_LEN + 6], &mac);
            assert_eq!(Generator::sequence(&f), Some(i));
            assert_eq!(f[HDR_LEN + 22], 8, "payload byte i is i");
        }
        assert_eq!(g.peek(), RxPeek::Empty);
        assert_eq!(
            recv_one(&mut g, 2048).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(g.stats().frames(), 3);
        assert_eq!(g.stats().bytes(), 3 * 64);
        // Too small a buffer is refused, not overrun.
        let mut g = Generator::new(1514, mac).unwrap();
        assert_eq!(
            recv_one(&mut g, 100).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(g.stats().frames(), 0);
    }

    #[test]
    fn generator_refuses_impossible_lengths() {
        assert!(Generator::new(59, [2, 0, 0, 0, 0, 1]).is_err());
        assert!(Generator::new(MAX_FRAME_LEN + 1, [2, 0, 0, 0, 0, 1]).is_err());
        assert!(Generator::sequence(&[0u8; 20]).is_none());
    }
}
