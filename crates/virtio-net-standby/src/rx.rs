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
use std::ptr;

use vm_memory::GuestMemoryBackend;

use crate::backend::{NetBackend, RxBuffers, RxPeek};
use crate::chain::{Access, ChainBuf, ChainError, MAX_SEGMENTS, walk};
use crate::counters::NetCounters;
use crate::filter::FilterView;
use crate::header::{HDR_LEN, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET};
use crate::iovec::{copy_from_iovecs, copy_to_iovecs};
use crate::memory::{DirtyLog, DirtyRun, GuestRam, RegionHint};
use crate::processed::Processed;
use crate::ring::{self, SplitRing, VRING_DESC_F_WRITE};

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
    /// The backend failed; a frame may have been lost.
    Failed,
    /// A frame moved to the pending queue, to be delivered first.
    Requeued,
    /// Nothing beyond the frames a direct run counted: go round again.
    Again,
}

/// Why staging stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// There is room for the frame (without MRG: a chain is staged).
    Enough,
    /// The guest has no more buffers available right now.
    RingEmpty,
    /// The iovec window is full: the room cannot grow until frames use it.
    WindowFull,
}

/// How far ahead of the chain being filled the direct path prefetches a
/// buffer: far enough that the line arrives before the store (a transfer from
/// another core costs on the order of 100 ns, a frame here 20 to 80 ns), near
/// enough that the driver has usually posted it already.
const PREFETCH_AHEAD: u16 = 4;

/// Frames of unknown length (a tap's) that fitted in the first staged buffer, in
/// a row, after which the device stops keeping room for the largest frame
/// staged (43 buffers of 1536 bytes for 64 KiB) and reads each frame into one
/// buffer and a bounce buffer instead; a frame that spills into the bounce
/// buffer goes back to staging until this many small frames came again. The
/// switch costs one extra copy of the frame that spilled, so it pays when small
/// frames come in long runs; it is a count of what the device sees, not a
/// timing.
const DIRECT_AFTER: u32 = 64;

/// A hint to bring the cache line at `p` in, ready to be written. Never faults,
/// whatever the address.
#[inline(always)]
fn prefetch_for_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetchw` only hints the cache hierarchy; it reads and writes no
    // memory architecturally and never faults, whatever the address (CPUs
    // without it treat it as a no-op).
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` only hints the cache hierarchy and never faults.
    unsafe {
        std::arch::asm!("prfm pstl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// A backend failing this many times in a row ends the batch (a broken or
/// detached tap fails every read; retrying would only spin).
const MAX_BACKEND_ERRORS: u32 = 8;

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
    /// Frames of unknown length in a row that fitted in one buffer (see
    /// [`DIRECT_AFTER`]).
    fit_streak: u32,
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
            fit_streak: 0,
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

    /// The room staged for the next frame: every staged chain with MRG, the first
    /// one without.
    fn room(&self) -> usize {
        if self.mrg {
            self.staged_capacity
        } else {
            self.staged.front().map_or(0, |s| s.capacity)
        }
    }

    /// Stages chains until there is room for `need` bytes (without MRG: until one
    /// chain is staged), the ring is empty, or the iovec window is full.
    #[inline]
    fn stage<M: GuestMemoryBackend>(
        &mut self,
        ram: &GuestRam<M>,
        need: usize,
        c: &mut NetCounters,
    ) -> ring::Result<Stop> {
        loop {
            if self.mrg {
                if self.staged_capacity >= need {
                    return Ok(Stop::Enough);
                }
            } else if !self.staged.is_empty() {
                return Ok(Stop::Enough);
            }
            let (head, from_ring) = match self.restage.pop_front() {
                Some(h) => (h, false),
                None => {
                    if self.ring.available()? == 0 {
                        return Ok(Stop::RingEmpty);
                    }
                    (self.ring.pop_head()?, true)
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
                    self.return_malformed(head, c);
                }
                Err(ChainError::TooManySegments) if !self.staged.is_empty() => {
                    // The window is full, not the chain too long: take it later.
                    if from_ring {
                        self.ring.unpop(1);
                    } else {
                        self.restage.push_front(head);
                    }
                    return Ok(Stop::WindowFull);
                }
                Err(e) => {
                    c.rx_malformed += 1;
                    c.count_malformed(&e);
                    self.return_malformed(head, c);
                }
            }
        }
    }

    /// Returns a malformed chain with length 0. With `VIRTIO_F_IN_ORDER` the
    /// chains staged before it are used first, empty (a frame cannot skip over
    /// the malformed one to fill them).
    fn return_malformed(&mut self, head: u16, c: &mut NetCounters) {
        if self.ring.in_order() && !self.staged.is_empty() {
            for st in self.staged.drain(..) {
                self.ring.push_used(st.head, 0);
                c.rx_buffers_returned_empty += 1;
            }
            self.staged_capacity = 0;
            self.buf.clear();
            self.start = 0;
        }
        self.ring.push_used(head, 0);
    }

    /// Whether the staged room may still grow to `need`: only with MRG, and only if
    /// staging stopped because the guest has posted nothing more yet (a full
    /// window, or a ring entirely staged, never grows).
    fn can_grow(&self, stop: Stop) -> bool {
        self.mrg && stop == Stop::RingEmpty && self.staged.len() < usize::from(self.ring.size())
    }

    /// Processes up to `budget` frames. `pending` is delivered first. Returns
    /// the outcome, whether the driver wants an interrupt, and the ring error
    /// that ended the pass, if one did (the outcome still counts the chains
    /// used before it).
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
    ) -> (Processed, bool, ring::Result<()>) {
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
        let notify = published && self.ring.needs_interrupt(old);
        (out, notify, result)
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
        let mut errors = 0;
        // Every pass handles a frame or stages buffers; the bound only matters for
        // a driver that keeps moving its index without posting usable buffers.
        for _ in 0..budget.saturating_mul(4).max(64) {
            if out.chains >= budget {
                out.more = true;
                return Ok(());
            }
            let step = if !link_up {
                self.drop_one(backend, c)?
            } else if let Some(frame_len) = pending.front().map(<[u8]>::len) {
                self.deliver_pending(ram, filter, pending, frame_len, c)?
            } else {
                let mut done = 0;
                let step = self.receive(
                    ram,
                    backend,
                    filter,
                    pending,
                    budget - out.chains,
                    &mut done,
                    c,
                );
                // The frames of a direct run count even when a ring error ends it.
                out.chains += done;
                if done > 0 {
                    errors = 0;
                }
                step?
            };
            match step {
                Step::Frame => {
                    out.chains += 1;
                    errors = 0;
                }
                Step::Failed => {
                    out.chains += 1;
                    errors += 1;
                    if errors >= MAX_BACKEND_ERRORS {
                        return Ok(());
                    }
                }
                Step::Requeued => errors = 0,
                Step::Again => {}
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
        out.more = true;
        Ok(())
    }

    /// Reads one frame into scratch memory and forgets it. `Ok(false)` if there
    /// was none.
    fn discard_one<B: NetBackend>(&mut self, backend: &mut B) -> io::Result<bool> {
        self.scratch
            .resize(self.scratch.len().max(MAX_BUFFER_LEN), 0);
        let iov = [libc::iovec {
            iov_base: self.scratch.as_mut_ptr().cast(),
            iov_len: MAX_BUFFER_LEN,
        }];
        // SAFETY: the iovec covers `scratch`, which nothing else touches meanwhile.
        let mut bufs = unsafe { RxBuffers::new(&iov, MAX_BUFFER_LEN) };
        match backend.recv(&mut bufs) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drops the next frame as too big for the guest's buffers.
    fn drop_too_big<B: NetBackend>(&mut self, backend: &mut B, c: &mut NetCounters) -> Step {
        match self.discard_one(backend) {
            Ok(true) => {
                c.rx_dropped_too_big += 1;
                Step::Frame
            }
            Ok(false) => Step::Empty,
            Err(e) => self.backend_failed(e, c),
        }
    }

    fn backend_failed(&self, e: io::Error, c: &mut NetCounters) -> Step {
        log::debug!("backend lost an RX frame: {e}");
        c.rx_dropped_backend += 1;
        Step::Failed
    }

    /// Link down: the frame is read and dropped.
    fn drop_one<B: NetBackend>(
        &mut self,
        backend: &mut B,
        c: &mut NetCounters,
    ) -> ring::Result<Step> {
        if backend.peek() == RxPeek::Empty {
            return Ok(Step::Empty);
        }
        Ok(match self.discard_one(backend) {
            Ok(true) => {
                c.rx_dropped_link_down += 1;
                Step::Frame
            }
            Ok(false) => Step::Empty,
            Err(e) => self.backend_failed(e, c),
        })
    }

    /// Receives the next frame, or (on the direct path) a run of up to `max`
    /// frames, counted in `done`; the step returned comes after them.
    #[allow(clippy::too_many_arguments)]
    fn receive<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        pending: &mut PendingRx,
        max: usize,
        done: &mut usize,
        c: &mut NetCounters,
    ) -> ring::Result<Step> {
        let peek = backend.peek();
        let need = match peek {
            RxPeek::Empty => return Ok(Step::Empty),
            RxPeek::Frame(len) => len,
            RxPeek::Unknown => self.max_frame,
        };
        match peek {
            RxPeek::Frame(len) => {
                if let Some(step) =
                    self.receive_direct(ram, backend, filter, len, None, max, done, c)?
                {
                    return Ok(step);
                }
                if *done > 0 {
                    return Ok(Step::Again);
                }
            }
            RxPeek::Unknown
                if self.mrg
                    && self.fit_streak >= DIRECT_AFTER
                    && (self.staged.is_empty() || self.unstage()) =>
            {
                if let Some(step) =
                    self.receive_direct(ram, backend, filter, HDR_LEN, Some(pending), max, done, c)?
                {
                    return Ok(step);
                }
                if *done > 0 {
                    return Ok(Step::Again);
                }
            }
            _ => {}
        }
        let stop = self.stage(ram, need, c)?;
        if self.staged.is_empty() {
            return Ok(Step::NoBuffers);
        }
        // The guest's room may be far larger than any frame (descriptors can
        // overlap): offer the backend no more than the largest frame.
        let room = self.room().min(MAX_BUFFER_LEN);
        if room < need {
            // A frame of known size that does not fit, or (size unknown) room for
            // less than an MTU-sized frame with MRG: wait for buffers if more may
            // come, otherwise the frame can never be delivered. Without MRG and
            // size unknown, the chain is all the frame can ever get: go ahead (an
            // oversized frame is lost in the backend). With MRG, an MTU's worth of
            // room goes ahead too, rather than wait for buffers that the guest may
            // post only after it gets these back.
            let take = peek == RxPeek::Unknown && (!self.mrg || room >= self.small_frame);
            if !take {
                if self.can_grow(stop) {
                    return Ok(Step::NoBuffers);
                }
                return Ok(self.drop_too_big(backend, c));
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
            // A backend may report the length of a frame it truncated (a tap does):
            // what reached the guest is incomplete.
            Ok(n) if n > room => {
                c.rx_dropped_too_big += 1;
                Ok(Step::Frame)
            }
            Ok(n) => {
                if peek == RxPeek::Unknown && self.mrg {
                    let first = self.staged.front().map_or(0, |s| s.capacity);
                    self.fit_streak = if n <= first {
                        self.fit_streak.saturating_add(1)
                    } else {
                        0
                    };
                }
                Ok(self.complete(filter, n, c))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Empty),
            Err(e) => Ok(self.backend_failed(e, c)),
        }
    }

    /// Gives the staged chains back to the ring when they are exactly the last
    /// ones taken from it, in order (nothing to stage again, no chain used in
    /// between), so that the direct path can take over. Otherwise keeps them,
    /// starts counting small frames again, and returns false.
    fn unstage(&mut self) -> bool {
        let n = self.staged.len();
        let matches = self.restage.is_empty()
            && n <= usize::from(self.ring.size())
            && self.staged.iter().enumerate().all(|(k, st)| {
                let back = (n - k) as u16;
                self.ring.peek_head(0u16.wrapping_sub(back)) == st.head
            });
        if !matches {
            self.fit_streak = 0;
            return false;
        }
        self.ring.unpop(n as u16);
        self.staged.clear();
        self.buf.clear();
        self.start = 0;
        self.staged_capacity = 0;
        true
    }

    /// The common case without the staging bookkeeping, for a run of frames:
    /// nothing is staged, the next available chain is one device-writable
    /// descriptor that holds the frame (its length known from the backend), or
    /// (length unknown, `spill` given) holds an MTU-sized frame, with a bounce
    /// buffer for the rest of a larger one. Each frame goes straight into its
    /// buffer and the chain is used, `num_buffers` 1; the run goes on with the
    /// next frame, up to `max`, counting in `done` the frames it handled
    /// (delivered, filtered or too big), without going back through the general
    /// loop: the available entries are counted once and counted down, not read
    /// again per frame.
    ///
    /// Returns `None` when the direct path does not apply to the next frame (the
    /// ring as it was: the general path then takes the same chain) or `max` was
    /// reached, and otherwise the outcome that ended the run (nothing to receive,
    /// a backend error, a frame that spilled). The available index is checked
    /// for a runaway when the run starts and whenever its count runs out, not at
    /// every frame: a driver that moves it wrongly during a run is caught at the
    /// next read, and the device needs a reset as before. Whatever does not deliver a frame
    /// (a filtered frame, a backend error, nothing after all) gives its chain back
    /// to the ring untouched for the next frame, as the general path keeps it
    /// staged.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn receive_direct<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        first_need: usize,
        spill: Option<&mut PendingRx>,
        max: usize,
        done: &mut usize,
        c: &mut NetCounters,
    ) -> ring::Result<Option<Step>> {
        if !self.staged.is_empty() || !self.restage.is_empty() {
            return Ok(None);
        }
        // The run's counts live in locals (registers) and reach `done` and the
        // counters once, when it ends.
        let (mut handled, mut frames, mut bytes) = (0, 0, 0);
        let mut written = DirtyRun::default();
        let result = self.direct_run(
            ram,
            backend,
            filter,
            first_need,
            spill,
            max,
            (&mut handled, &mut frames, &mut bytes, &mut written),
            c,
        );
        written.finish(&mut self.dirty);
        *done += handled;
        c.rx_frames += frames;
        c.rx_bytes += bytes;
        result
    }

    /// The loop of [`receive_direct`](Self::receive_direct); `counts` are the
    /// frames handled, the frames delivered, their bytes and the range written.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn direct_run<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        filter: &FilterView,
        first_need: usize,
        mut spill: Option<&mut PendingRx>,
        max: usize,
        counts: (&mut usize, &mut u64, &mut u64, &mut DirtyRun),
        c: &mut NetCounters,
    ) -> ring::Result<Option<Step>> {
        let (done, frames, bytes, written) = counts;
        let opaque = spill.is_some();
        if opaque && self.scratch.len() < self.max_frame {
            // The bounce buffer: at most the largest frame, sized once.
            self.scratch.resize(self.max_frame, 0);
        }
        let mut avail = self.ring.available()?;
        let mut need = first_need;
        let mut hint = RegionHint::default();
        loop {
            if *done >= max {
                return Ok(None);
            }
            if *done > 0 {
                // The frames after the first: the same kind of frame, or the
                // general path decides.
                need = match backend.peek() {
                    RxPeek::Empty => return Ok(Some(Step::Empty)),
                    RxPeek::Frame(len) if !opaque => len,
                    RxPeek::Unknown if opaque => HDR_LEN,
                    _ => return Ok(None),
                };
            }
            if avail == 0 {
                // Counted down to nothing: the driver may have posted more.
                avail = self.ring.available()?;
                if avail == 0 {
                    return Ok(None);
                }
            }
            // Only for a backend that tells the frame's length (the pair, the
            // generator), whose receive stores the frame from this thread, where
            // the prefetch was measured to pay. For a frame of unknown length (a
            // tap) the kernel copies inside `readv`: there the look-up of the
            // buffer ahead was a quarter of the device's own samples per frame,
            // and the read was no faster for it (docs/PERFORMANCE.md, "On a tap:
            // the 1514-byte gap").
            if !opaque && avail > PREFETCH_AHEAD {
                self.prefetch_buffer(ram, &mut hint, PREFETCH_AHEAD);
            }
            let head = self.ring.pop_head()?;
            let d = self.ring.descriptor(head);
            let len = d.len as usize;
            let span = if d.flags == VRING_DESC_F_WRITE && len >= need.max(HDR_LEN) {
                ram.translate_hinted(&mut hint, d.addr, len)
            } else {
                None
            };
            let Some(span) = span else {
                self.ring.unpop(1);
                return Ok(None);
            };
            let room = span.len.min(MAX_BUFFER_LEN);
            // A frame of unknown length may be longer than the buffer: the rest
            // goes to the bounce buffer.
            let overflow = if opaque {
                self.max_frame.saturating_sub(room)
            } else {
                0
            };
            let iovs = [
                libc::iovec {
                    iov_base: span.ptr.cast(),
                    iov_len: room,
                },
                libc::iovec {
                    iov_base: self.scratch.as_mut_ptr().cast(),
                    iov_len: overflow,
                },
            ];
            let iov = &iovs[..if overflow > 0 { 2 } else { 1 }];
            // SAFETY: the first iovec covers `room` bytes of one device-writable
            // descriptor the guest made available, translated inside memory `ram`
            // keeps mapped; the second (if any) `overflow` bytes of `scratch`
            // (`overflow <= max_frame <= scratch.len()`: sized above),
            // which nothing else touches meanwhile; no Rust reference aliases
            // either.
            let mut bufs = unsafe { RxBuffers::new(iov, room + overflow) };
            let n = match backend.recv(&mut bufs) {
                Ok(n) if (HDR_LEN..=room).contains(&n) => n,
                Ok(n) if n > room && n <= room + overflow => {
                    // Spilled: the whole frame waits in the pending queue (empty:
                    // it is delivered before anything is received) and goes
                    // through the staging path; the chain goes back to the ring.
                    self.ring.unpop(1);
                    self.fit_streak = 0;
                    let mut frame = vec![0u8; n];
                    copy_from_iovecs(&iov[..1], 0, &mut frame[..room]);
                    frame[room..].copy_from_slice(&self.scratch[..n - room]);
                    if let Some(pending) = spill.as_deref_mut() {
                        if !pending.push(frame) {
                            c.rx_dropped_backend += 1;
                            return Ok(Some(Step::Frame));
                        }
                    }
                    return Ok(Some(Step::Requeued));
                }
                other => {
                    self.ring.unpop(1);
                    match other {
                        Ok(n) if n > room => {
                            c.rx_dropped_too_big += 1;
                            *done += 1;
                            continue;
                        }
                        Ok(_) => {
                            c.rx_dropped_backend += 1;
                            *done += 1;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Some(Step::Empty));
                        }
                        Err(e) => return Ok(Some(self.backend_failed(e, c))),
                    }
                }
            };
            let f = filter.get();
            if !f.promisc {
                let mut eth = [0u8; 16];
                let k = copy_from_iovecs(&iov[..1], HDR_LEN, &mut eth[..(n - HDR_LEN).min(16)]);
                if !f.accepts(&eth[..k]) {
                    self.ring.unpop(1);
                    c.rx_dropped_filtered += 1;
                    *done += 1;
                    continue;
                }
            }
            written.add(&mut self.dirty, span.region, span.ptr, n);
            self.ring.push_used(head, n as u32);
            // SAFETY: `n >= HDR_LEN` bytes of the buffer were just received, so
            // the field lies inside it.
            unsafe {
                ptr::write_unaligned(span.ptr.add(NUM_BUFFERS_OFFSET).cast::<u16>(), 1u16.to_le())
            };
            *frames += 1;
            *bytes += (n - HDR_LEN) as u64;
            avail -= 1;
            *done += 1;
        }
    }

    /// Asks the CPU to fetch, for writing, the first bytes of the buffer `ahead`
    /// places after the next available one: when the driver runs on another
    /// core, its buffers' cache lines are there, and the first store into each
    /// stalls until the line has moved (in a profile of the vhost-user daemon
    /// generating 64-byte frames, most of its time went to that store). The
    /// run's region `hint` makes the look-up of a buffer in the same region as
    /// the last a subtraction and two comparisons.
    #[inline]
    fn prefetch_buffer<'a, M: GuestMemoryBackend>(
        &self,
        ram: &'a GuestRam<M>,
        hint: &mut RegionHint<'a>,
        ahead: u16,
    ) {
        let head = self.ring.peek_head(ahead);
        if head >= self.ring.size() {
            return;
        }
        let d = self.ring.descriptor(head);
        if let Some(span) = ram.translate_hinted(hint, d.addr, 1) {
            prefetch_for_write(span.ptr);
            // The header and a small frame may cross into the next line.
            prefetch_for_write(span.ptr.wrapping_add(64));
        }
    }

    /// Reads a frame of unknown size into `segs` staged iovecs with at most
    /// [`FAST_IOVECS`] iovecs: the first ones straight into guest buffers, the last
    /// into the scratch buffer, whose bytes (only a frame larger than those first
    /// buffers has any) are then copied into the guest buffers that follow. `room`
    /// (at most [`MAX_BUFFER_LEN`]) bounds the scratch buffer.
    fn read_with_overflow<B: NetBackend>(
        &mut self,
        backend: &mut B,
        segs: usize,
        room: usize,
    ) -> io::Result<usize> {
        let window = &self.buf.iovecs()[self.start..self.start + segs];
        let direct = &window[..FAST_IOVECS - 1];
        let direct_len: usize = direct.iter().map(|v| v.iov_len).sum();
        let overflow = room.saturating_sub(direct_len);
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
        // last covers `overflow` bytes of `scratch`, which nothing else touches
        // meanwhile.
        let mut bufs = unsafe { RxBuffers::new(&iov, room) };
        let n = backend.recv(&mut bufs)?;
        let spilled = n.min(direct_len + overflow).saturating_sub(direct_len);
        if spilled > 0 {
            copy_to_iovecs(&window[FAST_IOVECS - 1..], 0, &self.scratch[..spilled]);
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
        let stop = self.stage(ram, len, c)?;
        let room = self.room();
        if room < len {
            if self.staged.is_empty() || self.can_grow(stop) {
                return Ok(Step::NoBuffers);
            }
            c.rx_dropped_too_big += 1;
            pending.pop();
            return Ok(Step::Frame);
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
        // Most frames fill part of the oldest staged chain, one descriptor long:
        // return it without the general loop.
        if let Some(&st) = self.staged.front() {
            if st.segs == 1 && n <= st.capacity {
                let v = self.buf.iovecs()[self.start];
                self.dirty
                    .add(self.buf.regions()[self.start], v.iov_base as *const u8, n);
                self.ring.push_used(st.head, n as u32);
                // SAFETY: the iovec is writable guest memory of `st.capacity >= n >=
                // HDR_LEN` bytes, so the field lies inside it.
                unsafe {
                    ptr::write_unaligned(
                        (v.iov_base as *mut u8)
                            .add(NUM_BUFFERS_OFFSET)
                            .cast::<u16>(),
                        1u16.to_le(),
                    )
                };
                self.staged.pop_front();
                self.staged_capacity -= st.capacity;
                self.start += 1;
                if self.staged.is_empty() {
                    self.buf.clear();
                    self.start = 0;
                }
                c.rx_frames += 1;
                c.rx_bytes += (n - HDR_LEN) as u64;
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
        let first = &self.buf.iovecs()[self.start];
        if first.iov_len >= HDR_LEN {
            // SAFETY: the first staged iovec is writable guest memory of at least
            // HDR_LEN bytes, so the field lies inside it.
            unsafe {
                ptr::write_unaligned(
                    (first.iov_base as *mut u8)
                        .add(NUM_BUFFERS_OFFSET)
                        .cast::<u16>(),
                    (used as u16).to_le(),
                )
            };
        } else {
            copy_to_iovecs(
                self.window(),
                NUM_BUFFERS_OFFSET,
                &(used as u16).to_le_bytes(),
            );
        }
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
    use crate::features::{DEFAULT_OFFER, F_IN_ORDER, F_RING_EVENT_IDX, Features, prune};
    use crate::testing::{GuestDriver, GuestMem, RecordingBackend, TestMemory, frame};
    use crate::{StandbyNet, StandbyNetBuilder};
    use virtio_bindings::virtio_net::*;
    use virtio_device::VirtioDevice;
    use virtio_queue::QueueT;

    const OWN: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    struct Fx {
        dev: StandbyNet<GuestMem, RecordingBackend>,
        be: RecordingBackend,
        g: GuestDriver,
    }

    fn fx_with(features: Features, be: RecordingBackend) -> Fx {
        fx_sized(features, be, 256)
    }

    fn fx_sized(features: Features, be: RecordingBackend, qsize: u16) -> Fx {
        let mut dev: StandbyNet<GuestMem, _> = StandbyNetBuilder::new()
            .queue_size(qsize)
            .build(vec![be.clone()])
            .unwrap();
        let mem = TestMemory::new(32 << 20);
        let g = GuestDriver::bring_up(&mut dev, &mem, features, qsize).unwrap();
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

    /// The `rx_queue` fuzz finding `rx_queue-in-flight`: on a queue of 1 the
    /// device holds the only chain, staged for a frame of unknown length (a
    /// tap's), and the driver makes the same head available again. The device
    /// took it a second time: two chains in flight on a queue of 1. Now that
    /// index is a runaway and the device needs a reset.
    #[test]
    fn a_head_made_available_again_while_staged_needs_reset() {
        let be = RecordingBackend {
            opaque: true,
            ..Default::default()
        };
        let mut dev: StandbyNet<GuestMem, _> =
            StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mem = TestMemory::new(1 << 20);
        let mut g = GuestDriver::bring_up(&mut dev, &mem, DEFAULT_OFFER, 1).unwrap();
        let in_flight = |dev: &StandbyNet<GuestMem, RecordingBackend>| {
            let st = dev.queue_pair(0).unwrap().lock().queue_states().unwrap().0;
            st.next_avail.wrapping_sub(st.next_used)
        };
        g.post_rx(0, 1);
        dev.queue_pair(0).unwrap().process_rx();
        assert_eq!(in_flight(&dev), 1);
        assert_eq!(dev.queue_pair(0).unwrap().lock().state().rx_staged, vec![0]);
        g.rx[0].set_avail_entry(1, 0);
        g.rx[0].set_avail_idx(2);
        dev.queue_pair(0).unwrap().process_rx();
        assert!(
            in_flight(&dev) <= 1,
            "never more chains in flight than the queue holds"
        );
        assert!(virtio_device::VirtioDevice::needs_reset(&dev));
        assert_eq!(g.interrupt.config_count(), 1);
        assert!(be.log.lock().unwrap().sent.is_empty());
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

    /// After a run of small frames of unknown length the device reads into one
    /// buffer and a bounce buffer; a large frame then spills, goes through the
    /// pending queue and staging, and the small frames after it are delivered
    /// in order: nothing lost, duplicated or reordered, `num_buffers` right.
    #[test]
    fn small_frames_of_unknown_length_go_direct_and_a_large_one_still_fits() {
        let mut f = fx_with(DEFAULT_OFFER, opaque());
        f.g.post_rx(0, 200);
        let n = DIRECT_AFTER as usize + 10;
        let mut frames: Vec<Vec<u8>> = (0..n).map(|i| frame(OWN, &[i as u8; 60])).collect();
        frames.push(frame(
            OWN,
            &(0..5000u32).map(|i| i as u8).collect::<Vec<_>>(),
        ));
        frames.extend((0..20u8).map(|i| frame(OWN, &[i; 70])));
        frames.push(frame(OWN, &[0x5a; 3000]));
        for fr in &frames {
            f.inject(fr);
        }
        f.process();
        let mut got = vec![];
        while let Some(x) = f.g.recv(0) {
            got.push(x);
        }
        let want: Vec<_> = frames
            .iter()
            .map(|x| {
                let bufs = x.len().div_ceil(1536) as u16;
                expect(x.clone(), bufs)
            })
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "frames delivered as sent");
        let c = f.counters();
        assert_eq!(c.rx_frames, frames.len() as u64);
        assert_eq!(c.dropped(), 0);
        // The 5000-byte frame came after the run of small ones, spilled and
        // went through the pending queue; the 3000-byte one came after too few
        // small frames and was staged for.
        assert_eq!(c.rx_pending_delivered, 1);
        // Every buffer came back: the direct path left none staged for ever.
        assert_eq!(f.g.rx[0].in_flight(), 200);
    }

    /// A direct run takes frames up to the pass's budget and no further; the
    /// next pass goes on where it stopped, in order, for a backend that tells
    /// the frame's length and for one that does not (after its first
    /// `DIRECT_AFTER` frames, which go through staging).
    #[test]
    fn a_direct_run_ends_at_the_budget_and_the_next_pass_goes_on() {
        for be in [RecordingBackend::default(), opaque()] {
            let mut f = fx_with(DEFAULT_OFFER, be);
            f.dev.queue_pair(0).unwrap().lock().set_budget(100);
            f.g.post_rx(0, 200);
            let frames: Vec<_> = (0..150u8).map(|i| frame(OWN, &[i; 60])).collect();
            for fr in &frames {
                f.inject(fr);
            }
            let p = f.process();
            assert_eq!((p.chains, p.more), (100, true));
            assert_eq!(f.g.rx[0].used_idx(), 100);
            assert!(
                f.dev
                    .queue_pair(0)
                    .unwrap()
                    .lock()
                    .state()
                    .rx_staged
                    .is_empty(),
                "the frames went the direct way, nothing staged"
            );
            let p = f.process();
            assert_eq!((p.chains, p.more), (50, false));
            let mut got = vec![];
            while let Some(x) = f.g.recv(0) {
                got.push(x);
            }
            let want: Vec<_> = frames.iter().map(|x| expect(x.clone(), 1)).collect();
            assert!(got == want, "frames delivered in order");
            assert_eq!(f.counters().rx_frames, 150);
            assert_eq!(f.counters().dropped(), 0);
        }
    }

    /// A bad head in the middle of a direct run: the frames delivered before it
    /// are counted, published and signalled, and the device needs a reset.
    #[test]
    fn a_direct_run_counts_the_frames_before_a_bad_head() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.post_rx(0, 10);
        f.g.rx[0].set_avail_entry(10, 4000);
        f.g.rx[0].set_avail_idx(11);
        let frames: Vec<_> = (0..12u8).map(|i| frame(OWN, &[i; 60])).collect();
        for fr in &frames {
            f.inject(fr);
        }
        let p = f.process();
        assert!(f.dev.needs_reset());
        assert_eq!(p.chains, 10, "every frame delivered before the bad head");
        assert!(p.notified, "the used buffers are signalled");
        assert_eq!(f.g.rx[0].used_idx(), 10);
        for fr in &frames[..10] {
            assert_eq!(f.g.recv(0).unwrap(), expect(fr.clone(), 1));
        }
        assert_eq!(f.counters().rx_frames, 10);
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

    /// The direct path (one buffer that holds the frame, nothing staged) keeps
    /// the buffer of a frame it did not deliver for the next frame, as the
    /// staging path does, with and without MRG.
    #[test]
    fn a_filtered_frame_leaves_its_buffer_to_the_next_frame() {
        for features in [DEFAULT_OFFER, DEFAULT_OFFER.without(VIRTIO_NET_F_MRG_RXBUF)] {
            let mut f = fx(features);
            assert_eq!(
                f.g.ctrl(
                    &f.dev,
                    VIRTIO_NET_CTRL_RX as u8,
                    VIRTIO_NET_CTRL_RX_PROMISC as u8,
                    &[0]
                ),
                VIRTIO_NET_OK as u8
            );
            f.g.post_rx(0, 1);
            f.inject(&frame([0x02, 9, 9, 9, 9, 9], &[1; 50]));
            f.inject(&frame(OWN, &[2; 50]));
            let p = f.process();
            assert_eq!(p.chains, 2);
            assert_eq!(f.counters().rx_dropped_filtered, 1);
            let (head, len) = f.g.rx[0].pop_used().unwrap();
            assert_eq!((head, len), (0, 12 + 14 + 50));
            assert_eq!(f.g.mem.read(f.g.rx_buffer(0, 0) + 26, 1), [2]);
            assert_eq!(f.g.mem.read(f.g.rx_buffer(0, 0) + 10, 2), [1, 0]);
            assert_eq!(f.g.rx[0].pop_used(), None);
        }
    }

    /// A backend failing on the direct path loses no buffer: the chain stays
    /// available, not used and not staged.
    #[test]
    fn a_failing_backend_on_the_direct_path_keeps_the_buffers() {
        let be = RecordingBackend {
            failing: true,
            ..Default::default()
        };
        let mut f = fx_with(DEFAULT_OFFER, be);
        f.g.post_rx(0, 4);
        f.inject(&frame(OWN, &[1; 50]));
        let p = f.process();
        assert_eq!(p.chains, MAX_BACKEND_ERRORS as usize);
        assert_eq!(f.g.rx[0].used_idx(), 0);
        assert_eq!(f.g.rx[0].in_flight(), 4);
        let state = f.dev.queue_pair(0).unwrap().lock().state();
        assert!(state.rx_staged.is_empty());
        assert_eq!(
            state.rx.unwrap().next_avail,
            0,
            "every chain given back to the ring"
        );
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

    /// Posts [1536-byte buffer, 8-byte buffer (too short), 1536, 1536] and
    /// delivers a 3000-byte frame: returns the used (head, len) in used order
    /// and the heads in the order they were made available.
    fn malformed_between_staged_buffers(features: Features) -> (Vec<(u16, u32)>, Vec<u16>) {
        let mut f = fx(features);
        let mut heads = Vec::new();
        for len in [1536u32, 8, 1536, 1536] {
            let a = f.g.mem.alloc(u64::from(len), 64);
            heads.push(f.g.rx[0].add_writable(&[a], &[len]));
        }
        f.g.rx[0].publish();
        let big = frame(OWN, &[9; 3000]);
        f.inject(&big);
        f.process();
        assert_eq!(f.counters().rx_frames, 1);
        let mut used = Vec::new();
        while let Some(u) = f.g.rx[0].pop_used() {
            used.push(u);
        }
        (used, heads)
    }

    #[test]
    fn without_in_order_a_malformed_rx_chain_goes_back_first_and_staged_buffers_stay() {
        let (used, h) = malformed_between_staged_buffers(DEFAULT_OFFER.without(F_IN_ORDER));
        assert_eq!(used, vec![(h[1], 0), (h[0], 1536), (h[2], 3026 - 1536)]);
    }

    #[test]
    fn with_in_order_buffers_are_used_in_ring_order_around_a_malformed_chain() {
        let mut f = fx(DEFAULT_OFFER);
        assert!(f.dev.acked_features().unwrap().has(F_IN_ORDER));
        let (used, h) = malformed_between_staged_buffers(DEFAULT_OFFER);
        // The buffer staged before the malformed one goes back empty, in order.
        assert_eq!(
            used,
            vec![(h[0], 0), (h[1], 0), (h[2], 1536), (h[3], 3026 - 1536)]
        );
        // And the counters say why.
        let a = f.g.mem.alloc(1536, 64);
        f.g.rx[0].add_writable(&[a], &[1536]);
        let b = f.g.mem.alloc(8, 64);
        f.g.rx[0].add_writable(&[b], &[8]);
        f.g.rx[0].publish();
        f.inject(&frame(OWN, &[1; 3000]));
        f.process();
        let c = f.counters();
        assert_eq!((c.rx_buffers_returned_empty, c.rx_malformed), (1, 1));
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

    fn opaque() -> RecordingBackend {
        RecordingBackend {
            opaque: true,
            ..Default::default()
        }
    }

    /// Audit finding: the room a guest posts is unbounded (descriptors may all
    /// cover the same memory); it must not size any allocation.
    #[test]
    fn huge_overlapping_buffers_do_not_size_allocations() {
        for features in [DEFAULT_OFFER, DEFAULT_OFFER.without(VIRTIO_NET_F_MRG_RXBUF)] {
            let mut f = fx_with(features, opaque());
            // One chain of 256 descriptors each covering (almost) all of guest
            // memory: 8 GiB of "room" in 32 MiB.
            let addrs = vec![0u64; 256];
            let lens = vec![(32u32 << 20) - 4096; 256];
            f.g.rx[0].add_writable(&addrs, &lens);
            f.g.rx[0].publish();
            let fr = frame(OWN, &[7; 1000]);
            f.inject(&fr);
            f.process();
            let (_, len) = f.g.rx[0].pop_used().unwrap();
            assert_eq!(len as usize, fr.len());
            assert_eq!(f.g.mem.read(12, fr.len() - 12), fr[12..]);
        }
    }

    /// Audit finding: a tap reports the full length of a frame it truncated.
    #[test]
    fn a_backend_reporting_more_than_fits_is_a_drop_not_a_panic() {
        let be = RecordingBackend {
            opaque: true,
            truncating: true,
            ..Default::default()
        };
        let mut f = fx_with(DEFAULT_OFFER.without(VIRTIO_NET_F_MRG_RXBUF), be);
        // One chain of 9 descriptors of 2 bytes: 18 bytes of room.
        let a = f.g.mem.alloc(64, 8);
        let addrs: Vec<u64> = (0..9).map(|i| a + 2 * i).collect();
        f.g.rx[0].add_writable(&addrs, &[2; 9]);
        f.g.rx[0].publish();
        f.inject(&frame(OWN, &[1; 46]));
        f.process();
        assert_eq!(f.counters().rx_dropped_too_big, 1);
        assert_eq!(f.g.rx[0].pop_used(), None, "nothing delivered");
    }

    /// Audit finding: a full iovec window with too little room must not loop.
    #[test]
    fn a_full_iovec_window_ends_the_batch() {
        let mut f = fx_sized(DEFAULT_OFFER, opaque(), 4096);
        // 200 chains of 12 one-byte descriptors: the 1024-iovec window fills with
        // 1020 bytes of room, less than an MTU frame.
        let a = f.g.mem.alloc(4096, 8);
        for _ in 0..200 {
            let addrs: Vec<u64> = (0..12).map(|i| a + i).collect();
            f.g.rx[0].add_writable(&addrs, &[1; 12]);
        }
        f.g.rx[0].publish();
        for _ in 0..3 {
            f.inject(&frame(OWN, &[1; 1400]));
        }
        let p = f.process();
        assert_eq!(p.chains, 3);
        assert_eq!(f.counters().rx_dropped_too_big, 3);
        // The backend cannot say a frame is small, and less than an MTU frame's
        // room is all this guest offers: small frames are dropped too, counted.
        f.inject(&frame(OWN, &[2; 50]));
        f.process();
        assert_eq!(f.counters().rx_dropped_too_big, 4);
        assert_eq!(f.counters().rx_frames, 0);
    }

    /// Audit finding: a backend failing every read must not spin.
    #[test]
    fn a_failing_backend_ends_the_batch() {
        let be = RecordingBackend {
            opaque: true,
            failing: true,
            ..Default::default()
        };
        let mut f = fx_with(DEFAULT_OFFER, be);
        f.g.post_rx(0, 64);
        let p = f.process();
        assert_eq!((p.chains, p.more), (MAX_BACKEND_ERRORS as usize, false));
        assert_eq!(
            f.counters().rx_dropped_backend,
            u64::from(MAX_BACKEND_ERRORS)
        );
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
