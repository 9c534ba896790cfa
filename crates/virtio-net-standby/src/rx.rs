//! The receive path: backend frames into guest buffers, without copying where
//! the backend can write guest memory itself.
//!
//! The device *stages* guest buffers: it takes chains from the available ring and
//! walks them into one flat iovec array, until the staged room covers the next
//! frame (its length when the backend can tell, the largest possible frame when it
//! cannot). The backend then writes the frame straight into that array, and the
//! device returns as many chains as the frame filled:
//!
//! - with `VIRTIO_NET_F_MRG_RXBUF` a frame spans several chains and the header's
//!   `num_buffers` says how many (Linux relies on it);
//! - without it every frame takes exactly one chain and `num_buffers` is 1.
//!
//! Staged chains the frame did not fill stay staged for the next one. Their heads
//! are part of the device state: a snapshot carries them and the restored device
//! stages them again, so no buffer is lost or returned twice.
//!
//! When the guest has posted too few buffers, frames wait where they are (in the
//! backend, or in the device's bounded pending queue) and go on the next kick; the
//! device counts each such stall.

use std::collections::VecDeque;
use std::io;

use vm_memory::GuestMemoryBackend;

use crate::backend::{NetBackend, RxBuffers, RxPeek, copy_from_iovecs, copy_to_iovecs};
use crate::chain::{Access, ChainBuf, ChainError, MAX_SEGMENTS, walk};
use crate::counters::NetCounters;
use crate::filter::FilterView;
use crate::header::{HDR_LEN, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET};
use crate::memory::{DirtyLog, GuestRam};
use crate::ring::{self, SplitRing};
use crate::tx::Processed;

/// The most iovecs a `readv` takes without the kernel allocating a copy of the
/// array (`UIO_FASTIOV`). Measured on a tap: 43 iovecs cost 70 ns more per read
/// than 8.
const FAST_IOVECS: usize = 8;

/// Frames the device holds for the guest: taken from the backend (at snapshot
/// time) or restored from a snapshot, delivered before anything else.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingRx {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl PendingRx {
    /// The most frames held.
    pub const MAX_FRAMES: usize = 1024;
    /// The most bytes held.
    pub const MAX_BYTES: usize = 16 << 20;

    /// Adds a frame (header included) if the bounds allow; returns whether it fit.
    pub fn push(&mut self, frame: Vec<u8>) -> bool {
        if self.frames.len() >= Self::MAX_FRAMES || self.bytes + frame.len() > Self::MAX_BYTES {
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        true
    }

    /// Number of frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.frames.iter().map(Vec::as_slice)
    }

    fn front(&self) -> Option<&[u8]> {
        self.frames.front().map(Vec::as_slice)
    }

    fn pop(&mut self) {
        if let Some(f) = self.frames.pop_front() {
            self.bytes -= f.len();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Staged {
    head: u16,
    segs: usize,
    capacity: usize,
}

enum Step {
    /// One frame handled (delivered, filtered or dropped).
    Frame,
    /// Nothing waiting.
    Empty,
    /// Frames wait but the guest posted too few buffers.
    NoBuffers,
}

/// A receive queue.
pub(crate) struct RxQueue {
    pub ring: SplitRing,
    buf: ChainBuf,
    /// First iovec of the oldest staged chain.
    start: usize,
    staged: VecDeque<Staged>,
    staged_capacity: usize,
    /// Heads to stage again before taking new ones (after a restore, or after the
    /// memory map changed).
    restage: VecDeque<u16>,
    mrg: bool,
    /// The largest frame (header included) the backend may deliver.
    max_frame: usize,
    /// A frame every guest buffer set must be able to take (MTU-sized).
    small_frame: usize,
    scratch: Vec<u8>,
    dirty: DirtyLog,
}

impl RxQueue {
    /// `staged` are heads a snapshot said were staged; they are staged again
    /// before new chains.
    pub fn new(
        ring: SplitRing,
        mrg: bool,
        max_frame: usize,
        small_frame: usize,
        staged: Vec<u16>,
    ) -> Self {
        // Room for a full window of MAX_SEGMENTS after a not-yet-compacted prefix.
        let buf = ChainBuf::with_capacity(2 * MAX_SEGMENTS);
        RxQueue {
            ring,
            buf,
            start: 0,
            staged: VecDeque::new(),
            staged_capacity: 0,
            restage: staged.into(),
            mrg,
            max_frame: max_frame.min(MAX_BUFFER_LEN),
            small_frame: small_frame.min(max_frame),
            scratch: Vec::new(),
            dirty: DirtyLog::default(),
        }
    }

    /// Heads taken from the ring and not used yet, oldest first (for snapshots).
    pub fn staged_heads(&self) -> Vec<u16> {
        self.staged
            .iter()
            .map(|s| s.head)
            .chain(self.restage.iter().copied())
            .collect()
    }

    /// Forgets the iovecs of the staged chains (their memory is going away) and
    /// remembers to walk them again.
    pub fn unstage_all(&mut self) {
        let mut heads: VecDeque<u16> = self.staged.drain(..).map(|s| s.head).collect();
        heads.extend(self.restage.drain(..));
        self.restage = heads;
        self.buf.clear();
        self.start = 0;
        self.staged_capacity = 0;
    }

    fn window(&self) -> &[libc::iovec] {
        &self.buf.iovecs()[self.start..]
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain_front(self.start);
            self.start = 0;
        }
    }

    /// Whether the staged room suffices for a frame of `need` bytes.
    fn room(&self) -> usize {
        if self.mrg {
            self.staged_capacity
        } else {
            self.staged.front().map_or(0, |s| s.capacity)
        }
    }

    /// Stages chains until there is room for `need` bytes, the ring is empty, or
    /// the iovec window is full.
    fn stage<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<M>,
        need: usize,
        c: &mut NetCounters,
    ) -> ring::Result<()> {
        loop {
            if self.mrg {
                if self.staged_capacity >= need {
                    return Ok(());
                }
            } else if !self.staged.is_empty() {
                return Ok(());
            }
            let (head, from_ring) = match self.restage.pop_front() {
                Some(h) => (h, false),
                None => {
                    if self.ring.available()? == 0 {
                        return Ok(());
                    }
                    (self.ring.pop_head(), true)
                }
            };
            if self.buf.len() >= MAX_SEGMENTS {
                self.compact();
            }
            self.buf.limit = self.start + MAX_SEGMENTS;
            match walk(&self.ring, ram, head, Access::WriteOnly, &mut self.buf) {
                Ok(s) if s.writable_len >= HDR_LEN => {
                    self.staged.push_back(Staged {
                        head,
                        segs: s.segments,
                        capacity: s.writable_len,
                    });
                    self.staged_capacity += s.writable_len;
                }
                Ok(s) => {
                    // Every receive buffer must hold at least the header (virtio
                    // spec 5.1.6.3.1).
                    self.buf.truncate(self.buf.len() - s.segments);
                    c.rx_malformed += 1;
                    c.malformed_header_short += 1;
                    self.ring.push_used(head, 0);
                }
                Err(ChainError::TooManySegments) if !self.staged.is_empty() => {
                    // The window is full, not the chain too long: take it later.
                    if from_ring {
                        self.ring.unpop(1);
                    } else {
                        self.restage.push_front(head);
                    }
                    return Ok(());
                }
                Err(e) => {
                    c.rx_malformed += 1;
                    c.count_malformed(&e);
                    self.ring.push_used(head, 0);
                }
            }
        }
    }

    /// Processes up to `budget` frames. `pending` is delivered first.
    #[allow(clippy::too_many_arguments)]
    pub fn process<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        pending: &mut PendingRx,
        link_up: bool,
        budget: usize,
        c: &mut NetCounters,
    ) -> ring::Result<(Processed, bool)> {
        let old = self.ring.next_used();
        let mut out = Processed::default();
        self.ring.disable_kicks(ram);
        let result = self.run(ram, backend, filter, pending, link_up, budget, c, &mut out);
        self.dirty.flush(ram);
        let published = self.ring.next_used() != old;
        if published {
            self.ring.publish_used(ram, old);
        }
        if let Err(e) = backend.flush() {
            log::debug!("backend flush failed: {e}");
        }
        result?;
        let notify = published && self.ring.needs_interrupt(old);
        Ok((out, notify))
    }

    #[allow(clippy::too_many_arguments)]
    fn run<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        pending: &mut PendingRx,
        link_up: bool,
        budget: usize,
        c: &mut NetCounters,
        out: &mut Processed,
    ) -> ring::Result<()> {
        let mut stalled = false;
        loop {
            if out.chains >= budget {
                out.more = true;
                return Ok(());
            }
            let step = if !link_up {
                self.drop_one(backend, c)?
            } else if let Some(frame_len) = pending.front().map(<[u8]>::len) {
                self.deliver_pending(ram, filter, pending, frame_len, c)?
            } else {
                self.receive(ram, backend, filter, c)?
            };
            match step {
                Step::Frame => out.chains += 1,
                Step::Empty => return Ok(()),
                Step::NoBuffers => {
                    if !stalled {
                        c.rx_no_buffers += 1;
                        stalled = true;
                    }
                    if self.ring.enable_kicks(ram)? {
                        continue;
                    }
                    out.blocked = true;
                    return Ok(());
                }
            }
        }
    }

    /// Reads one frame into scratch memory and forgets it. Returns whether a
    /// frame was there; a backend error counts as a frame lost.
    fn discard_one<B: NetBackend>(&mut self, backend: &mut B) -> ring::Result<bool> {
        self.scratch.resize(MAX_BUFFER_LEN, 0);
        let iov = [libc::iovec {
            iov_base: self.scratch.as_mut_ptr().cast(),
            iov_len: self.scratch.len(),
        }];
        // SAFETY: the iovec covers `scratch`, which nothing else touches meanwhile.
        let mut bufs = unsafe { RxBuffers::new(&iov, MAX_BUFFER_LEN) };
        Ok(match backend.recv(&mut bufs) {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        })
    }

    /// Link down: the frame is read and dropped.
    fn drop_one<B: NetBackend>(
        &mut self,
        backend: &mut B,
        c: &mut NetCounters,
    ) -> ring::Result<Step> {
        if backend.peek() == RxPeek::Empty || !self.discard_one(backend)? {
            return Ok(Step::Empty);
        }
        c.rx_dropped_link_down += 1;
        Ok(Step::Frame)
    }

    /// With MRG and a frame of unknown size: whether `room` (less than the largest
    /// frame) may be offered anyway. Yes when the guest has nothing more posted and
    /// the room takes an MTU-sized frame: waiting could deadlock against a guest
    /// that posts more only after it gets these back.
    fn mrg_fallback(&self, room: usize) -> ring::Result<bool> {
        Ok(room >= self.small_frame && self.ring.available()? == 0 && self.restage.is_empty())
    }

    fn receive<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        c: &mut NetCounters,
    ) -> ring::Result<Step> {
        let peek = backend.peek();
        let need = match peek {
            RxPeek::Empty => return Ok(Step::Empty),
            RxPeek::Frame(len) => len,
            RxPeek::Unknown => self.max_frame,
        };
        self.stage(ram, need, c)?;
        if self.staged.is_empty() {
            return Ok(Step::NoBuffers);
        }
        let room = self.room();
        if room < need {
            match peek {
                RxPeek::Frame(len) => {
                    // Without MRG a frame must fit the one chain it gets; with it,
                    // all the chains the ring can hold at once.
                    let ring_full = self.staged.len() == usize::from(self.ring.size());
                    if !self.mrg || ring_full {
                        c.rx_dropped_too_big += 1;
                        log::debug!("dropping a {len}-byte frame: the guest's buffers hold {room}");
                        self.discard_one(backend)?;
                        return Ok(Step::Frame);
                    }
                    return Ok(Step::NoBuffers);
                }
                // Unknown size without MRG: the chain is all the frame can ever
                // get, so go ahead (an oversized frame is lost in the backend).
                _ if !self.mrg => {}
                _ if self.mrg_fallback(room)? => {}
                _ => return Ok(Step::NoBuffers),
            }
        }
        let segs = if self.mrg {
            self.buf.len() - self.start
        } else {
            self.staged[0].segs
        };
        let result = if peek == RxPeek::Unknown && segs > FAST_IOVECS {
            self.read_with_overflow(backend, segs, room)
        } else {
            let iov = &self.window()[..segs];
            // SAFETY: the staged iovecs were produced by the walker from
            // device-writable descriptors over memory `ram` keeps mapped; the guest
            // has handed those buffers to the device and no Rust reference aliases
            // them.
            let mut bufs = unsafe { RxBuffers::new(iov, room) };
            backend.recv(&mut bufs)
        };
        match result {
            Ok(n) => Ok(self.complete(filter, n, c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Empty),
            Err(e) => {
                log::debug!("backend lost an RX frame: {e}");
                c.rx_dropped_backend += 1;
                Ok(Step::Frame)
            }
        }
    }

    /// Reads a frame of unknown size into `segs` staged iovecs of `room` bytes
    /// with at most [`FAST_IOVECS`] iovecs: the first ones straight into guest
    /// buffers, the last into the scratch buffer, whose bytes (only a frame
    /// larger than those first buffers has any) are then copied into the guest
    /// buffers that follow.
    fn read_with_overflow<B: NetBackend>(
        &mut self,
        backend: &mut B,
        segs: usize,
        room: usize,
    ) -> io::Result<usize> {
        let window = &self.buf.iovecs()[self.start..self.start + segs];
        let direct = &window[..FAST_IOVECS - 1];
        let direct_len: usize = direct.iter().map(|v| v.iov_len).sum();
        let overflow = room - direct_len;
        if self.scratch.len() < overflow {
            self.scratch.resize(overflow, 0);
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; FAST_IOVECS];
        iov[..FAST_IOVECS - 1].copy_from_slice(direct);
        iov[FAST_IOVECS - 1] = libc::iovec {
            iov_base: self.scratch.as_mut_ptr().cast(),
            iov_len: overflow,
        };
        // SAFETY: the first iovecs are staged guest buffers (see `receive`), the
        // last covers `scratch`, which nothing else touches meanwhile.
        let mut bufs = unsafe { RxBuffers::new(&iov, room) };
        let n = backend.recv(&mut bufs)?;
        if n > direct_len {
            copy_to_iovecs(
                &window[FAST_IOVECS - 1..],
                0,
                &self.scratch[..n - direct_len],
            );
        }
        Ok(n)
    }

    fn deliver_pending<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<M>,
        filter: &FilterView,
        pending: &mut PendingRx,
        len: usize,
        c: &mut NetCounters,
    ) -> ring::Result<Step> {
        self.stage(ram, len, c)?;
        let room = self.room();
        if room < len {
            let never_fits = !self.staged.is_empty()
                && (!self.mrg || self.staged.len() == usize::from(self.ring.size()));
            if never_fits {
                c.rx_dropped_too_big += 1;
                pending.pop();
                return Ok(Step::Frame);
            }
            return Ok(Step::NoBuffers);
        }
        let frame = pending.front().unwrap_or_default();
        copy_to_iovecs(self.window(), 0, frame);
        pending.pop();
        c.rx_pending_delivered += 1;
        Ok(self.complete(filter, len, c))
    }

    /// A frame of `n` bytes sits in the staged buffers: filter it, return the
    /// chains it filled, set `num_buffers`.
    #[inline]
    fn complete(&mut self, filter: &FilterView, n: usize, c: &mut NetCounters) -> Step {
        if n < HDR_LEN {
            c.rx_dropped_backend += 1;
            return Step::Frame;
        }
        let f = filter.get();
        if !f.promisc {
            let mut eth = [0u8; 16];
            let k = copy_from_iovecs(self.window(), HDR_LEN, &mut eth[..(n - HDR_LEN).min(16)]);
            if !f.accepts(&eth[..k]) {
                c.rx_dropped_filtered += 1;
                return Step::Frame;
            }
        }
        let mut remaining = n;
        let mut used = 0usize;
        let mut seg = self.start;
        for st in self.staged.iter() {
            let take = remaining.min(st.capacity);
            let mut left = take;
            for s in seg..seg + st.segs {
                if left == 0 {
                    break;
                }
                let v = &self.buf.iovecs()[s];
                let l = left.min(v.iov_len);
                self.dirty
                    .add(self.buf.regions()[s], v.iov_base as *const u8, l);
                left -= l;
            }
            self.ring.push_used(st.head, take as u32);
            seg += st.segs;
            remaining -= take;
            used += 1;
            if remaining == 0 || !self.mrg {
                break;
            }
        }
        copy_to_iovecs(
            self.window(),
            NUM_BUFFERS_OFFSET,
            &(used as u16).to_le_bytes(),
        );
        for _ in 0..used {
            if let Some(st) = self.staged.pop_front() {
                self.staged_capacity -= st.capacity;
                self.start += st.segs;
            }
        }
        if self.staged.is_empty() {
            self.buf.clear();
            self.start = 0;
        }
        c.rx_frames += 1;
        c.rx_bytes += (n - HDR_LEN) as u64;
        Step::Frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{DEFAULT_OFFER, F_RING_EVENT_IDX, Features, prune};
    use crate::testing::{GuestDriver, GuestMem, RecordingBackend, TestMemory, frame};
    use crate::{StandbyNet, StandbyNetBuilder};
    use virtio_bindings::virtio_net::*;
    use virtio_queue::QueueT;

    const OWN: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    struct Fx {
        dev: StandbyNet<GuestMem, RecordingBackend>,
        be: RecordingBackend,
        g: GuestDriver,
    }

    fn fx_with(features: Features, be: RecordingBackend) -> Fx {
        let mut dev: StandbyNet<GuestMem, _> =
            StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mem = TestMemory::new(32 << 20);
        let g = GuestDriver::bring_up(&mut dev, &mem, features, 256).unwrap();
        Fx { dev, be, g }
    }

    fn fx(features: Features) -> Fx {
        fx_with(features, RecordingBackend::default())
    }

    /// What the guest should read: the frame with `num_buffers` set.
    fn expect(mut f: Vec<u8>, num: u16) -> Vec<u8> {
        f[10..12].copy_from_slice(&num.to_le_bytes());
        f
    }

    impl Fx {
        fn inject(&self, f: &[u8]) {
            self.be.incoming.lock().unwrap().push_back(f.to_vec());
        }
        fn process(&self) -> Processed {
            self.dev.queue_pair(0).unwrap().process_rx()
        }
        fn counters(&self) -> NetCounters {
            self.dev.counters()
        }
    }

    #[test]
    fn without_mrg_each_frame_takes_one_buffer_and_num_buffers_is_1() {
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_MRG_RXBUF));
        f.g.post_rx(0, 8);
        let frames = [
            frame(OWN, &[1; 46]),
            frame(OWN, &[2; 1000]),
            frame(OWN, &[3; 1500]),
        ];
        for fr in &frames {
            f.inject(fr);
        }
        let p = f.process();
        assert_eq!((p.chains, p.notified, p.blocked), (3, true, false));
        for fr in &frames {
            assert_eq!(f.g.recv(0).unwrap(), expect(fr.clone(), 1));
        }
        assert_eq!(f.g.recv(0), None);
        assert_eq!(
            f.g.interrupt.queue_count(0),
            1,
            "one interrupt for the batch"
        );
        let c = f.counters();
        assert_eq!(c.rx_frames, 3);
        assert_eq!(
            c.rx_bytes,
            frames.iter().map(|x| x.len() as u64 - 12).sum::<u64>()
        );
    }

    #[test]
    fn mrg_frames_span_buffers_with_the_right_num_buffers() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 16);
        let big = frame(OWN, &(0..4000u32).map(|i| i as u8).collect::<Vec<_>>());
        let small = frame(OWN, &[7; 20]);
        f.inject(&big);
        f.inject(&small);
        f.process();
        // 4026 bytes in 1536-byte buffers: 1536 + 1536 + 954.
        let lens: Vec<u32> = (0..4).map(|_| f.g.rx[0].pop_used().unwrap().1).collect();
        assert_eq!(lens, vec![1536, 1536, 954, small.len() as u32]);
        // Read them again through the driver's merging reader.
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 16);
        f.inject(&big);
        f.inject(&small);
        f.process();
        assert_eq!(f.g.recv(0).unwrap(), expect(big, 3));
        assert_eq!(f.g.recv(0).unwrap(), expect(small, 1));
    }

    #[test]
    fn received_bytes_and_used_ring_are_dirty_logged() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 4);
        f.g.mem.clear_dirty();
        f.inject(&frame(OWN, &[1; 3000]));
        f.process();
        let (h1, _) = f.g.rx[0].pop_used().unwrap();
        let (h2, _) = f.g.rx[0].pop_used().unwrap();
        assert!(f.g.mem.dirty(f.g.rx_buffer(0, h1)));
        assert!(f.g.mem.dirty(f.g.rx_buffer(0, h2) + 1000));
        let used_ring = f.g.rx[0].queue().used_ring();
        assert!(f.g.mem.dirty(used_ring));
    }

    #[test]
    fn frames_wait_for_buffers_and_none_is_lost() {
        let mut f = fx(DEFAULT_OFFER);
        let frames: Vec<_> = (0..5u8).map(|i| frame(OWN, &[i; 100])).collect();
        for fr in &frames {
            f.inject(fr);
        }
        let p = f.process();
        assert!(p.blocked);
        assert_eq!(p.chains, 0);
        assert_eq!(f.counters().rx_no_buffers, 1);
        // The device asked to be kicked when buffers come.
        assert_eq!(f.g.rx[0].avail_event(), 0);
        f.g.post_rx(0, 2);
        let p = f.process();
        assert_eq!((p.chains, p.blocked), (2, true));
        f.g.post_rx(0, 10);
        let p = f.process();
        assert_eq!((p.chains, p.blocked), (3, false));
        let mut got = vec![];
        while let Some(x) = f.g.recv(0) {
            got.push(x);
        }
        let want: Vec<_> = frames.into_iter().map(|x| expect(x, 1)).collect();
        assert_eq!(got, want);
        assert_eq!(f.counters().dropped(), 0);
    }

    #[test]
    fn opaque_backend_gets_room_for_the_largest_frame_and_keeps_the_rest_staged() {
        let be = RecordingBackend {
            opaque: true,
            ..Default::default()
        };
        let mut f = fx_with(DEFAULT_OFFER, be);
        f.g.post_rx(0, 64);
        let frames: Vec<_> = (0..5u8).map(|i| frame(OWN, &[i; 60])).collect();
        for fr in &frames {
            f.inject(fr);
        }
        f.process();
        // 65562 bytes of room in 1536-byte buffers is 43 chains; after each frame
        // the device tops the room up again: 5 used, 43 still staged.
        assert_eq!(f.g.rx[0].used_idx(), 5);
        let staged = f.dev.queue_pair(0).unwrap().lock().state().rx_staged;
        assert_eq!(staged.len(), 43);
        assert_eq!(staged, (5..48).collect::<Vec<u16>>());
        let mut got = vec![];
        while let Some(x) = f.g.recv(0) {
            got.push(x);
        }
        assert_eq!(
            got,
            frames.into_iter().map(|x| expect(x, 1)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn opaque_backend_without_guest_gso_needs_only_mtu_room() {
        let be = RecordingBackend {
            opaque: true,
            ..Default::default()
        };
        let features = prune(DEFAULT_OFFER.without(VIRTIO_NET_F_GUEST_CSUM));
        let mut f = fx_with(features, be);
        f.g.post_rx(0, 1);
        f.inject(&frame(OWN, &[1; 1500]));
        f.process();
        assert_eq!(f.g.recv(0).unwrap().len(), 12 + 14 + 1500);
    }

    #[test]
    fn opaque_backend_takes_mtu_frames_when_the_guest_posted_all_it_will() {
        // GSO negotiated (room wanted: 64 KiB) but the guest only posted 4
        // buffers and waits: MTU-sized frames must still flow.
        let be = RecordingBackend {
            opaque: true,
            ..Default::default()
        };
        let mut f = fx_with(DEFAULT_OFFER, be);
        f.g.post_rx(0, 4);
        f.inject(&frame(OWN, &[1; 1500]));
        f.process();
        assert_eq!(f.g.recv(0).unwrap().len(), 12 + 14 + 1500);
    }

    #[test]
    fn receive_filter_drops_and_counts() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 8);
        assert_eq!(
            f.g.ctrl(
                &f.dev,
                VIRTIO_NET_CTRL_RX as u8,
                VIRTIO_NET_CTRL_RX_PROMISC as u8,
                &[0]
            ),
            VIRTIO_NET_OK as u8
        );
        f.inject(&frame([0x02, 9, 9, 9, 9, 9], &[1; 50]));
        f.inject(&frame(OWN, &[2; 50]));
        f.inject(&frame([0xff; 6], &[3; 50]));
        f.process();
        assert_eq!(f.g.recv(0).unwrap()[26], 2);
        assert_eq!(f.g.recv(0).unwrap()[26], 3);
        assert_eq!(f.g.recv(0), None);
        assert_eq!(f.counters().rx_dropped_filtered, 1);
        // The filtered frame's buffer was not consumed: the two used ones were
        // re-posted, so all 8 are with the device again.
        assert_eq!(f.g.rx[0].in_flight(), 8);
    }

    #[test]
    fn malformed_rx_chains_are_returned_and_the_next_buffer_is_used() {
        let mut f = fx(DEFAULT_OFFER);
        let a = f.g.mem.alloc(2000, 8);
        f.g.rx[0].add_readable(&[a], &[2000]); // readable on RX
        f.g.rx[0].add_writable(&[a], &[8]); // smaller than the header
        f.g.rx[0].publish();
        f.g.post_rx(0, 1);
        f.inject(&frame(OWN, &[5; 64]));
        f.process();
        let c = f.counters();
        assert_eq!(
            (
                c.rx_malformed,
                c.malformed_direction,
                c.malformed_header_short
            ),
            (2, 1, 1)
        );
        let lens: Vec<u32> = (0..3).map(|_| f.g.rx[0].pop_used().unwrap().1).collect();
        assert_eq!(lens, vec![0, 0, 12 + 14 + 64]);
    }

    #[test]
    fn frame_too_big_for_a_non_mrg_buffer_is_dropped_and_the_buffer_kept() {
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_MRG_RXBUF));
        f.g.post_rx(0, 1);
        f.inject(&frame(OWN, &[1; 3000]));
        f.inject(&frame(OWN, &[2; 100]));
        f.process();
        assert_eq!(f.counters().rx_dropped_too_big, 1);
        assert_eq!(f.g.recv(0).unwrap()[26], 2);
    }

    #[test]
    fn link_down_drops_received_frames() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 4);
        f.dev.set_link_up(false);
        f.inject(&frame(OWN, &[1; 10]));
        f.process();
        assert_eq!(f.g.recv(0), None);
        assert_eq!(f.counters().rx_dropped_link_down, 1);
        f.dev.set_link_up(true);
        f.inject(&frame(OWN, &[2; 10]));
        f.process();
        assert!(f.g.recv(0).is_some());
    }

    #[test]
    fn interrupts_respect_event_idx_on_rx() {
        let mut f = fx(DEFAULT_OFFER);
        assert!(f.g.features.has(F_RING_EVENT_IDX));
        f.g.post_rx(0, 8);
        f.g.rx[0].set_used_event(5);
        for i in 0..3u8 {
            f.inject(&frame(OWN, &[i; 10]));
        }
        assert!(!f.process().notified);
        for i in 0..3u8 {
            f.inject(&frame(OWN, &[i; 10]));
        }
        assert!(f.process().notified);
        assert_eq!(f.g.interrupt.queue_count(0), 1);
    }

    #[test]
    fn pending_queue_bounds() {
        let mut p = PendingRx::default();
        for _ in 0..PendingRx::MAX_FRAMES {
            assert!(p.push(vec![0; 100]));
        }
        assert!(!p.push(vec![0; 100]));
        let mut p = PendingRx::default();
        assert!(p.push(vec![0; PendingRx::MAX_BYTES]));
        assert!(!p.push(vec![0; 1]));
        assert_eq!(p.len(), 1);
        p.pop();
        assert!(p.is_empty());
    }
}
