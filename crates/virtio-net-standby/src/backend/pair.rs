//! Two devices back to back in one process.
//!
//! [`pair`] returns two [`PairBackend`]s joined by two bounded single-producer,
//! single-consumer byte rings, one per direction. What one device transmits, the
//! other receives, header and all, with one copy into the ring and one copy out
//! of it. Nothing is dropped for lack of room: a full ring makes `send` return
//! `WouldBlock`, and the sending device leaves the frame in its guest's ring until
//! the peer has drained some (its worker polls [`NetBackend::tx_readiness`]).
//!
//! Receiving behaves like a tap configured with `TUNSETOFFLOAD`: a frame that
//! needs a checksum the receiving guest cannot complete gets it completed here,
//! and a segmented (GSO) frame the receiving guest cannot take is dropped and
//! reported as an error (the device counts it).
//!
//! Wake-ups cost one `eventfd` write per batch at most, and none while both sides
//! keep up: a side that finds its ring empty (or full) arms a flag, and the other
//! side signals only if the flag is armed, in [`NetBackend::flush`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{NetBackend, Readiness, RxBuffers, RxPeek, TxFrame};
use crate::features::{Features, GUEST_OFFLOADS, HOST_OFFLOADS};
use crate::header::{self, GSO_NONE, HDR_LEN, MAX_BUFFER_LEN, VirtioNetHdr};
use crate::iovec::copy_to_iovecs;
use virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM;

/// Record header: length in the low 32 bits, kind in the high 32.
const REC_HDR: usize = 8;
const KIND_FRAME: u64 = 0;
const KIND_PAD: u64 = 1;
/// The smallest ring that always has room for one record of the largest frame,
/// wherever the previous one ended.
const MIN_CAPACITY: usize = 2 * (REC_HDR + MAX_BUFFER_LEN + 8);

/// Settings of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairConfig {
    /// Bytes of each direction's ring, rounded up to a power of two and to at
    /// least twice the largest frame. Every frame takes its length plus 8 to 15
    /// bytes.
    pub capacity: usize,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig { capacity: 4 << 20 }
    }
}

#[repr(align(64))]
struct Padded<T>(T);

/// One direction: a byte ring with a producer and a consumer.
struct Channel {
    base: NonNull<u8>,
    cap: usize,
    /// Consumer position (bytes consumed, ever).
    head: Padded<AtomicUsize>,
    /// Producer position (bytes produced, ever).
    tail: Padded<AtomicUsize>,
    consumer_waiting: AtomicBool,
    producer_waiting: AtomicBool,
    /// Signalled to the consumer when frames arrive while it waits.
    readable: EventFd,
    /// Signalled to the producer when room appears while it waits.
    writable: EventFd,
}

// SAFETY: `base` is a heap allocation owned by the channel. The producer writes only
// the bytes between `tail` and `head + cap`, the consumer reads and rewrites only
// the bytes between `head` and `tail`; the positions are exchanged with
// release/acquire atomics, so the two never touch the same bytes at once.
unsafe impl Send for Channel {}
// SAFETY: as above; all shared state is atomic or partitioned by the positions.
unsafe impl Sync for Channel {}

impl Channel {
    fn new(cap: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(cap, 64).map_err(io::Error::other)?;
        // SAFETY: the layout has non-zero size (cap >= MIN_CAPACITY).
        let base = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Channel {
            base,
            cap,
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
            consumer_waiting: AtomicBool::new(false),
            producer_waiting: AtomicBool::new(false),
            readable: EventFd::new(EFD_NONBLOCK)?,
            writable: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Pointer to ring offset `idx` (< cap).
    #[inline]
    fn at(&self, idx: usize) -> *mut u8 {
        debug_assert!(idx < self.cap);
        // SAFETY: idx < cap, inside the allocation.
        unsafe { self.base.as_ptr().add(idx) }
    }

    #[inline]
    fn read_rec_hdr(&self, idx: usize) -> (usize, u64) {
        // SAFETY: idx is 8-aligned and at least 8 bytes before the end (records
        // start on 8-byte boundaries of a capacity that is a multiple of 8).
        let w = unsafe { ptr::read(self.at(idx) as *const u64) };
        ((w & 0xffff_ffff) as usize, w >> 32)
    }

    #[inline]
    fn write_rec_hdr(&self, idx: usize, len: usize, kind: u64) {
        // SAFETY: as in `read_rec_hdr`; the producer owns these bytes.
        unsafe { ptr::write(self.at(idx) as *mut u64, len as u64 | kind << 32) };
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            dealloc(
                self.base.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, 64),
            )
        };
    }
}

/// One end of a back-to-back pair. See the module documentation.
pub struct PairBackend {
    out: Arc<Channel>,
    inb: Arc<Channel>,
    /// `out`'s buffer and size, cached to spare the packet path a pointer chase.
    out_base: *mut u8,
    out_mask: usize,
    /// Producer state on `out`.
    tail: usize,
    cached_head: usize,
    /// Consumer state on `inb`.
    head: usize,
    cached_tail: usize,
    guest_offloads: Features,
}

impl std::fmt::Debug for PairBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairBackend")
            .field("capacity", &self.out.cap)
            .field(
                "queued_out",
                &(self.tail - self.out.head.0.load(Ordering::Relaxed)),
            )
            .field(
                "queued_in",
                &(self.inb.tail.0.load(Ordering::Relaxed) - self.head),
            )
            .finish()
    }
}

/// Creates two backends wired back to back.
pub fn pair(config: PairConfig) -> io::Result<(PairBackend, PairBackend)> {
    let cap = config.capacity.max(MIN_CAPACITY).next_power_of_two();
    let a_to_b = Arc::new(Channel::new(cap)?);
    let b_to_a = Arc::new(Channel::new(cap)?);
    let end = |out: &Arc<Channel>, inb: &Arc<Channel>| PairBackend {
        out: Arc::clone(out),
        inb: Arc::clone(inb),
        out_base: out.base.as_ptr(),
        out_mask: out.cap - 1,
        tail: 0,
        cached_head: 0,
        head: 0,
        cached_tail: 0,
        guest_offloads: Features::empty(),
    };
    Ok((end(&a_to_b, &b_to_a), end(&b_to_a, &a_to_b)))
}

// SAFETY: `out_base` points into the allocation `out` keeps alive; everything
// else is `Send`. One end is used by one thread at a time (`&mut self` methods).
unsafe impl Send for PairBackend {}

#[inline]
fn round8(n: usize) -> usize {
    (n + 7) & !7
}

impl PairBackend {
    /// Bytes of ring each direction has.
    pub fn capacity(&self) -> usize {
        self.out.cap
    }

    /// Frames' bytes waiting to be received by this end.
    pub fn queued_in(&self) -> usize {
        self.inb.tail.0.load(Ordering::Acquire) - self.head
    }

    /// Discards everything waiting to be received by this end (benchmarks use it
    /// to reset between iterations). Returns how many bytes were dropped.
    pub fn discard_incoming(&mut self) -> usize {
        let tail = self.inb.tail.0.load(Ordering::Acquire);
        let n = tail - self.head;
        self.head = tail;
        self.cached_tail = tail;
        self.inb.head.0.store(tail, Ordering::Release);
        n
    }

    #[inline]
    fn room(&mut self, need: usize) -> bool {
        let cap = self.out_mask + 1;
        if cap - (self.tail - self.cached_head) >= need {
            return true;
        }
        self.cached_head = self.out.head.0.load(Ordering::Acquire);
        cap - (self.tail - self.cached_head) >= need
    }

    /// The next frame record's offset, skipping padding, or `None` if empty.
    #[inline]
    fn next_record(&mut self) -> Option<(usize, usize)> {
        loop {
            if self.head == self.cached_tail {
                self.cached_tail = self.inb.tail.0.load(Ordering::Acquire);
                if self.head == self.cached_tail {
                    return None;
                }
            }
            let idx = self.head & (self.inb.cap - 1);
            let (len, kind) = self.inb.read_rec_hdr(idx);
            if kind == KIND_PAD {
                self.head += self.inb.cap - idx;
                continue;
            }
            return Some((idx, len));
        }
    }

    /// The next frame record, or `None` after arming the consumer's wake-up: if
    /// a frame arrives after this returned `None`, the producer's next `flush`
    /// signals `readable`.
    #[inline]
    fn poll_record(&mut self) -> Option<(usize, usize)> {
        if let Some(r) = self.next_record() {
            return Some(r);
        }
        // Clear old wake-ups, then arm, then look again: a producer that
        // published meanwhile either is seen here or sees the flag.
        let _ = self.inb.readable.read();
        self.inb.consumer_waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let r = self.next_record();
        if r.is_some() {
            self.inb.consumer_waiting.store(false, Ordering::Relaxed);
        }
        r
    }

    #[inline]
    fn consume(&mut self, len: usize) {
        self.head += REC_HDR + round8(len);
        self.inb.head.0.store(self.head, Ordering::Release);
    }

    /// Makes the frame at ring offset `idx` acceptable to the guest, or says it
    /// cannot be. Out of line: most frames need no fixing, and the receive path
    /// stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn fix_header(&mut self, idx: usize, len: usize) -> io::Result<()> {
        let mut raw = [0u8; HDR_LEN];
        // SAFETY: the record holds `len >= HDR_LEN` bytes after its header, all
        // owned by the consumer until `consume`.
        unsafe { ptr::copy_nonoverlapping(self.inb.at(idx + REC_HDR), raw.as_mut_ptr(), HDR_LEN) };
        let mut hdr = VirtioNetHdr::from_bytes(&raw);
        let frame_len = len - HDR_LEN;
        let guest_csum = self.guest_offloads.has(VIRTIO_NET_F_GUEST_CSUM);
        if hdr.check_rx(self.guest_offloads, frame_len).is_err() {
            if !(hdr.needs_csum() && hdr.gso_kind() == GSO_NONE && !guest_csum) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame needs an offload the receiving guest did not negotiate",
                ));
            }
            // SAFETY: the frame bytes after the header belong to the consumer until
            // `consume`; nothing else references them.
            let frame = unsafe {
                std::slice::from_raw_parts_mut(self.inb.at(idx + REC_HDR + HDR_LEN), frame_len)
            };
            if !header::complete_checksum(&mut hdr, frame) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "checksum location outside the frame",
                ));
            }
        }
        if !guest_csum {
            // Spec 5.1.6.4.1: without GUEST_CSUM the flags must be zero.
            hdr.flags = 0;
        }
        let out = hdr.to_bytes();
        if out != raw {
            // SAFETY: as above.
            unsafe { ptr::copy_nonoverlapping(out.as_ptr(), self.inb.at(idx + REC_HDR), HDR_LEN) };
        }
        Ok(())
    }
}

impl NetBackend for PairBackend {
    #[inline]
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        let len = frame.len();
        if !(HDR_LEN..=MAX_BUFFER_LEN).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame length out of range",
            ));
        }
        let rec = REC_HDR + round8(len);
        let mut idx = self.tail & self.out_mask;
        let to_end = self.out_mask + 1 - idx;
        let pad = if rec > to_end { to_end } else { 0 };
        if !self.room(pad + rec) {
            // Arm, then look again, so that a consumer draining meanwhile either
            // sees the flag or we see its progress.
            let _ = self.out.writable.read();
            self.out.producer_waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.room(pad + rec) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.out.producer_waiting.store(false, Ordering::Relaxed);
        }
        if pad > 0 {
            self.out.write_rec_hdr(idx, 0, KIND_PAD);
            self.tail += pad;
            idx = 0;
        }
        // SAFETY: `idx` is 8-aligned with a whole record (header and `len` bytes)
        // before the end of the ring (checked above), in the free part the
        // producer owns.
        let dst = unsafe {
            let rec_at = self.out_base.add(idx);
            ptr::write(rec_at as *mut u64, len as u64 | KIND_FRAME << 32);
            std::slice::from_raw_parts_mut(rec_at.add(REC_HDR), len)
        };
        frame.copy_to(dst);
        self.tail += rec;
        self.out.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }

    #[inline]
    fn peek(&mut self) -> RxPeek {
        match self.poll_record() {
            Some((_, len)) => RxPeek::Frame(len),
            None => RxPeek::Empty,
        }
    }

    #[inline]
    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        let Some((idx, len)) = self.poll_record() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if len > bufs.capacity() {
            self.consume(len);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than the receive buffers",
            ));
        }
        // A header with neither flags nor gso_type set suits every guest; only
        // others need checking against the guest's offloads.
        // SAFETY: the record holds at least HDR_LEN bytes after its header.
        let needs_fix = unsafe { ptr::read(self.inb.at(idx + REC_HDR) as *const u16) } != 0;
        if needs_fix {
            if let Err(e) = self.fix_header(idx, len) {
                self.consume(len);
                return Err(e);
            }
        }
        // SAFETY: the record's `len` bytes are owned by the consumer until `consume`.
        let src = unsafe { std::slice::from_raw_parts(self.inb.at(idx + REC_HDR), len) };
        copy_to_iovecs(bufs.iovecs(), 0, src);
        self.consume(len);
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        fence(Ordering::SeqCst);
        if self.out.consumer_waiting.load(Ordering::Relaxed)
            && self.out.consumer_waiting.swap(false, Ordering::SeqCst)
        {
            self.out.readable.write(1)?;
        }
        if self.inb.producer_waiting.load(Ordering::Relaxed)
            && self.inb.producer_waiting.swap(false, Ordering::SeqCst)
        {
            self.inb.writable.write(1)?;
        }
        Ok(())
    }

    fn offloads_supported(&self) -> Features {
        GUEST_OFFLOADS.union(HOST_OFFLOADS)
    }

    fn set_offloads(&mut self, guest_offloads: Features) -> io::Result<()> {
        self.guest_offloads = guest_offloads.intersection(GUEST_OFFLOADS);
        Ok(())
    }

    fn rx_readiness(&self) -> Option<Readiness> {
        Some(Readiness {
            fd: self.inb.readable.as_raw_fd(),
            writable: false,
        })
    }

    fn tx_readiness(&self) -> Option<Readiness> {
        Some(Readiness {
            fd: self.out.writable.as_raw_fd(),
            writable: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_TCPV4};
    use crate::iovec::iov;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4;

    fn send(p: &mut PairBackend, bytes: &mut [u8]) -> io::Result<()> {
        let v = [iov(bytes)];
        // SAFETY: `v` describes a live local buffer of its stated length.
        let f = unsafe { TxFrame::new(&v, bytes.len()) };
        p.send(&f)
    }

    fn recv(p: &mut PairBackend, cap: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; cap];
        let v = [iov(&mut out)];
        // SAFETY: `v` describes a live local buffer of its stated length.
        let mut b = unsafe { RxBuffers::new(&v, cap) };
        let n = p.recv(&mut b)?;
        out.truncate(n);
        Ok(out)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; len];
        for (i, b) in f.iter_mut().enumerate().skip(HDR_LEN) {
            *b = seed.wrapping_add(i as u8);
        }
        f
    }

    #[test]
    fn frames_cross_in_order_with_wraparound() {
        let (mut a, mut b) = pair(PairConfig { capacity: 0 }).unwrap();
        assert_eq!(a.capacity(), MIN_CAPACITY.next_power_of_two());
        let sizes = [60usize, 1514, 9000, 65562, 13, 777];
        for round in 0..40u8 {
            for (i, &s) in sizes.iter().enumerate() {
                let mut f = frame(s, round ^ i as u8);
                send(&mut a, &mut f).unwrap();
                assert_eq!(b.peek(), RxPeek::Frame(s));
                assert_eq!(recv(&mut b, 70_000).unwrap(), f);
            }
        }
        assert_eq!(b.peek(), RxPeek::Empty);
        assert!(matches!(recv(&mut b, 100), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn full_ring_backpressures_and_wakes() {
        let (mut a, mut b) = pair(PairConfig { capacity: 0 }).unwrap();
        let mut big = frame(65562, 1);
        let mut sent = 0;
        loop {
            match send(&mut a, &mut big) {
                Ok(()) => sent += 1,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert!(sent >= 1);
        // The producer armed: draining one frame and flushing wakes it.
        assert!(a.out.producer_waiting.load(Ordering::SeqCst));
        recv(&mut b, 70_000).unwrap();
        b.flush().unwrap();
        assert_eq!(a.out.writable.read().unwrap(), 1);
        send(&mut a, &mut big).unwrap();
    }

    #[test]
    fn consumer_wakeup_only_when_armed() {
        let (mut a, mut b) = pair(PairConfig::default()).unwrap();
        let mut f = frame(100, 0);
        send(&mut a, &mut f).unwrap();
        a.flush().unwrap();
        // Nobody waited: no eventfd write.
        assert!(b.inb.readable.read().is_err());
        recv(&mut b, 200).unwrap();
        assert_eq!(b.peek(), RxPeek::Empty); // arms, like a failed recv
        send(&mut a, &mut f).unwrap();
        a.flush().unwrap();
        assert_eq!(b.inb.readable.read().unwrap(), 1);
    }

    #[test]
    fn too_small_buffers_drop_the_frame() {
        let (mut a, mut b) = pair(PairConfig::default()).unwrap();
        let mut f = frame(1000, 0);
        send(&mut a, &mut f).unwrap();
        send(&mut a, &mut frame(50, 3)).unwrap();
        let e = recv(&mut b, 999).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(recv(&mut b, 999).unwrap(), frame(50, 3));
        let mut tiny = vec![0u8; 5];
        assert!(send(&mut a, &mut tiny).is_err());
    }

    #[test]
    fn receive_offloads_are_enforced() {
        let (mut a, mut b) = pair(PairConfig::default()).unwrap();
        // A UDP-ish frame with a partial checksum.
        let mut f = frame(HDR_LEN + 14 + 8 + 40, 9);
        let hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 14,
            csum_offset: 6,
            ..Default::default()
        };
        f[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
        // The checksum field holds the pseudo-header sum; zero here.
        f[HDR_LEN + 20..HDR_LEN + 22].fill(0);
        // Guest without GUEST_CSUM: the checksum is completed and flags cleared.
        send(&mut a, &mut f.clone()).unwrap();
        let got = recv(&mut b, 2000).unwrap();
        assert_eq!(got[0], 0);
        assert_eq!(header::ones_complement_sum(&got[HDR_LEN + 14..]), 0xffff);
        // Guest with GUEST_CSUM: passed through untouched.
        b.set_offloads(Features::empty().with(VIRTIO_NET_F_GUEST_CSUM))
            .unwrap();
        send(&mut a, &mut f.clone()).unwrap();
        assert_eq!(recv(&mut b, 2000).unwrap(), f);
        // GSO to a guest without GUEST_TSO4: dropped.
        let gso = VirtioNetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..hdr
        };
        f[..HDR_LEN].copy_from_slice(&gso.to_bytes());
        send(&mut a, &mut f.clone()).unwrap();
        assert_eq!(
            recv(&mut b, 2000).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        b.set_offloads(
            Features::empty()
                .with(VIRTIO_NET_F_GUEST_CSUM)
                .with(VIRTIO_NET_F_GUEST_TSO4),
        )
        .unwrap();
        send(&mut a, &mut f.clone()).unwrap();
        assert_eq!(recv(&mut b, 2000).unwrap(), f);
        // DATA_VALID to a guest without GUEST_CSUM is cleared.
        b.set_offloads(Features::empty()).unwrap();
        f[..HDR_LEN].copy_from_slice(
            &VirtioNetHdr {
                flags: FLAG_DATA_VALID,
                ..Default::default()
            }
            .to_bytes(),
        );
        send(&mut a, &mut f.clone()).unwrap();
        assert_eq!(recv(&mut b, 2000).unwrap()[0], 0);
    }

    #[test]
    fn threads_stream_a_million_bytes_in_order() {
        let (mut a, mut b) = pair(PairConfig { capacity: 0 }).unwrap();
        let n = 20_000usize;
        let producer = std::thread::spawn(move || {
            for i in 0..n {
                let mut f = frame(HDR_LEN + 1 + i % 1500, i as u8);
                loop {
                    match send(&mut a, &mut f) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            a.flush().unwrap();
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                a.flush().unwrap();
            }
        });
        for i in 0..n {
            let got = loop {
                match recv(&mut b, 2000) {
                    Ok(f) => break f,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        b.flush().unwrap();
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(got, frame(HDR_LEN + 1 + i % 1500, i as u8), "frame {i}");
            b.flush().unwrap();
        }
        producer.join().unwrap();
    }
}
