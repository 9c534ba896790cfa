//! The transmit path: guest TX chains to the backend, without copying.
//!
//! For each available chain: walk it into iovecs over guest memory, check the
//! 12-byte header against the negotiated offloads, hand the iovecs to the backend,
//! and return the chain. Used elements are published once per batch, and the
//! interrupt (if the guest wants one) is raised once per batch.
//!
//! Outcomes per chain, each counted:
//! - malformed (see [`ChainError`](crate::ChainError)), shorter than the header,
//!   or longer than [`MAX_BUFFER_LEN`]: returned with length 0;
//! - an offload the driver did not negotiate, or link down: dropped, returned;
//! - backend error: dropped, returned;
//! - backend full (`WouldBlock`): left in the ring; TX resumes when the backend's
//!   [`tx_readiness`](crate::NetBackend::tx_readiness) fires.
//!
//! The header is checked where it lies in guest memory and not copied: a guest
//! that rewrites it between the check and the send only obtains offloads it could
//! have negotiated, and whoever receives the frame validates it on its own (the
//! kernel behind a tap parses every header; the pair's receiving end checks it
//! against its own guest's offloads). Copying it would cost the common single-
//! descriptor frame a second iovec.

use std::io;
use std::ptr;

use vm_memory::GuestMemoryBackend;

use crate::backend::{NetBackend, TxFrame};
use crate::chain::{Access, ChainBuf, ChainError, MAX_SEGMENTS, walk};
use crate::counters::NetCounters;
use crate::features::Features;
use crate::header::{HDR_LEN, MAX_BUFFER_LEN, VirtioNetHdr};
use crate::iovec::copy_from_iovecs;
use crate::memory::GuestRam;
use crate::processed::Processed;
use crate::ring::{self, SplitRing};

/// Chains taken from the ring in one burst before the first of them is sent:
/// the ring is then read and written in short sequential bursts rather than
/// between two system calls that evict it from the cache (measured on a tap:
/// ~20 ns per frame less).
const BURST: usize = 32;

/// What became of one chain of a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Valid: send iovecs `first..first + count`, `len` bytes.
    Send {
        first: usize,
        count: usize,
        len: usize,
    },
    /// Broke a ring rule.
    Malformed(ChainError),
    /// Shorter than the virtio-net header.
    HeaderShort,
    /// Longer than the largest frame.
    TooLong,
    /// Asks for an offload the driver did not negotiate.
    Offload,
    /// The link is down.
    LinkDown,
}

/// A transmit queue.
pub(crate) struct TxQueue {
    pub ring: SplitRing,
    buf: ChainBuf,
    burst: Vec<(u16, Outcome)>,
}

impl TxQueue {
    pub fn new(ring: SplitRing) -> Self {
        TxQueue {
            ring,
            // A burst gathers up to MAX_SEGMENTS iovecs, and the last walk may add
            // up to MAX_SEGMENTS more.
            buf: ChainBuf::with_capacity(2 * MAX_SEGMENTS),
            burst: Vec::with_capacity(BURST),
        }
    }

    /// Processes up to `budget` chains. Returns the outcome, whether the driver
    /// wants an interrupt, and the ring error that ended the pass, if one did.
    /// The outcome counts every chain returned before that error too: those
    /// chains were sent (or dropped), counted and published in the used ring,
    /// whatever came after them.
    pub fn process<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        features: Features,
        link_up: bool,
        budget: usize,
        c: &mut NetCounters,
    ) -> (Processed, bool, ring::Result<()>) {
        let old = self.ring.next_used();
        let mut out = Processed::default();
        self.ring.disable_kicks(ram);
        let result = self.run(ram, backend, features, link_up, budget, c, &mut out);
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
    #[inline]
    fn run<M: GuestMemoryBackend, B: NetBackend>(
        &mut self,
        ram: &GuestRam<M>,
        backend: &mut B,
        features: Features,
        link_up: bool,
        budget: usize,
        c: &mut NetCounters,
        out: &mut Processed,
    ) -> ring::Result<()> {
        loop {
            let avail = usize::from(self.ring.available()?);
            if avail == 0 {
                if self.ring.enable_kicks(ram)? {
                    continue;
                }
                return Ok(());
            }
            if out.chains >= budget {
                out.more = true;
                return Ok(());
            }
            let n = avail.min(BURST).min(budget - out.chains);
            // The chains gathered before a bad head still get their outcome.
            let gathered = self.gather(n, ram, features, link_up);
            if !self.send(backend, c, out) {
                return gathered;
            }
            gathered?;
        }
    }

    /// Takes `n` chains from the ring and judges each, without sending any. On
    /// a ring error the chains taken before it stay in the burst.
    #[inline]
    fn gather<M: GuestMemoryBackend>(
        &mut self,
        n: usize,
        ram: &GuestRam<M>,
        features: Features,
        link_up: bool,
    ) -> ring::Result<()> {
        self.buf.clear();
        self.burst.clear();
        for _ in 0..n {
            // Keep room for a whole chain of MAX_SEGMENTS after what is gathered.
            if self.buf.len() > MAX_SEGMENTS {
                break;
            }
            let head = self.ring.pop_head()?;
            let first = self.buf.len();
            self.buf.limit = first + MAX_SEGMENTS;
            let outcome = self.judge(head, first, ram, features, link_up);
            if !matches!(outcome, Outcome::Send { .. }) {
                self.buf.truncate(first);
            }
            self.burst.push((head, outcome));
        }
        Ok(())
    }

    /// Walks one chain (its iovecs go to `buf` from `first`) and judges its
    /// length, header and the link.
    #[inline]
    fn judge<M: GuestMemoryBackend>(
        &mut self,
        head: u16,
        first: usize,
        ram: &GuestRam<M>,
        features: Features,
        link_up: bool,
    ) -> Outcome {
        let s = match walk(&self.ring, ram, head, Access::ReadOnly, &mut self.buf) {
            Ok(s) => s,
            Err(e) => return Outcome::Malformed(e),
        };
        let len = s.readable_len;
        if len < HDR_LEN {
            return Outcome::HeaderShort;
        }
        if len > MAX_BUFFER_LEN {
            return Outcome::TooLong;
        }
        let iov = &self.buf.iovecs()[first..];
        // Most frames carry no offload request (`flags` and `gso_type`, the first
        // two bytes, are zero): skip the checks for them.
        let offload = if iov[0].iov_len >= 2 {
            // SAFETY: the first iovec covers at least 2 readable bytes of guest
            // memory that `ram` keeps mapped.
            let first_two = unsafe { ptr::read_unaligned(iov[0].iov_base as *const u16) };
            first_two != 0
        } else {
            true
        };
        if offload {
            let mut raw = [0u8; HDR_LEN];
            copy_from_iovecs(iov, 0, &mut raw);
            let hdr = VirtioNetHdr::from_bytes(&raw);
            if let Err(e) = hdr.check_tx(features, len - HDR_LEN) {
                log::debug!("dropping TX frame: {e}");
                return Outcome::Offload;
            }
        }
        if !link_up {
            return Outcome::LinkDown;
        }
        Outcome::Send {
            first,
            count: s.segments,
            len,
        }
    }

    /// Sends and returns the burst's chains in ring order, counting each. Returns
    /// false if the backend filled up: the chains from there on go back to the
    /// ring, untouched, for the next call.
    #[inline]
    fn send<B: NetBackend>(
        &mut self,
        backend: &mut B,
        c: &mut NetCounters,
        out: &mut Processed,
    ) -> bool {
        for i in 0..self.burst.len() {
            let (head, outcome) = self.burst[i];
            match outcome {
                Outcome::Send { first, count, len } => {
                    let iov = &self.buf.iovecs()[first..first + count];
                    // SAFETY: the iovecs were produced by the walker over memory the
                    // caller's `GuestRam` keeps mapped, and total `len` bytes.
                    let frame = unsafe { TxFrame::new(iov, len) };
                    match backend.send(&frame) {
                        Ok(()) => {
                            c.tx_frames += 1;
                            c.tx_bytes += (len - HDR_LEN) as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.ring.unpop((self.burst.len() - i) as u16);
                            c.tx_backpressure += 1;
                            out.blocked = true;
                            return false;
                        }
                        Err(e) => {
                            log::debug!("backend dropped a TX frame: {e}");
                            c.tx_dropped_backend += 1;
                        }
                    }
                }
                Outcome::Malformed(e) => {
                    c.tx_malformed += 1;
                    c.count_malformed(&e);
                }
                Outcome::HeaderShort => {
                    c.tx_malformed += 1;
                    c.malformed_header_short += 1;
                }
                Outcome::TooLong => {
                    c.tx_malformed += 1;
                    c.malformed_too_long += 1;
                }
                Outcome::Offload => c.tx_dropped_offload += 1,
                Outcome::LinkDown => c.tx_dropped_link_down += 1,
            }
            self.ring.push_used(head, 0);
            out.chains += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{DEFAULT_OFFER, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC};
    use crate::header::{FLAG_NEEDS_CSUM, GSO_TCPV4};
    use crate::testing::GuestMem as GuestMemoryMmap;
    use crate::testing::{GuestDriver, RecordingBackend, TestMemory, frame};
    use crate::{StandbyNet, StandbyNetBuilder, VirtioInterruptType};
    use std::sync::atomic::Ordering;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    use virtio_device::VirtioDevice;

    const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];

    struct Fx {
        dev: StandbyNet<GuestMemoryMmap, RecordingBackend>,
        be: RecordingBackend,
        g: GuestDriver,
    }

    fn fx(features: Features) -> Fx {
        let be = RecordingBackend::default();
        let mut dev: StandbyNet<GuestMemoryMmap, _> =
            StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mem = TestMemory::new(16 << 20);
        let g = GuestDriver::bring_up(&mut dev, &mem, features, 256).unwrap();
        Fx { dev, be, g }
    }

    impl Fx {
        fn process(&self) -> Processed {
            self.dev.queue_pair(0).unwrap().process_tx()
        }
        fn sent(&self) -> Vec<Vec<u8>> {
            self.be.log.lock().unwrap().sent.clone()
        }
        fn counters(&self) -> NetCounters {
            self.dev.counters()
        }
        /// Every published chain came back, with length 0.
        fn all_returned(&mut self, n: usize) {
            for _ in 0..n {
                let (_, len) = self.g.tx[0].pop_used().expect("chain returned");
                assert_eq!(len, 0);
            }
            assert_eq!(self.g.tx[0].pop_used(), None);
        }
    }

    #[test]
    fn frames_reach_the_backend_byte_exact_with_one_interrupt_per_batch() {
        let mut f = fx(DEFAULT_OFFER);
        let frames: Vec<_> = (0..10u8)
            .map(|i| frame(PEER, &vec![i; 50 + usize::from(i) * 100]))
            .collect();
        for fr in &frames {
            f.g.queue_tx(0, fr);
        }
        f.g.tx[0].publish();
        let p = f.process();
        assert_eq!(
            (p.chains, p.more, p.blocked, p.notified),
            (10, false, false, true)
        );
        assert_eq!(f.sent(), frames);
        f.all_returned(10);
        assert_eq!(
            f.g.interrupt.queue_count(1),
            1,
            "one interrupt for the batch"
        );
        let c = f.counters();
        assert_eq!(c.tx_frames, 10);
        assert_eq!(
            c.tx_bytes,
            frames.iter().map(|x| x.len() as u64 - 12).sum::<u64>()
        );
        assert_eq!(c.notifications_sent, 1);
        // Nothing new: nothing to do, no interrupt.
        assert_eq!(f.process().chains, 0);
        assert_eq!(f.g.interrupt.queue_count(1), 1);
    }

    #[test]
    fn header_and_data_in_separate_descriptors() {
        let mut f = fx(DEFAULT_OFFER);
        let fr = frame(PEER, &[9; 100]);
        let (h, d) = (f.g.mem.alloc(12, 8), f.g.mem.alloc(200, 8));
        f.g.mem.write(h, &fr[..12]);
        f.g.mem.write(d, &fr[12..]);
        // The data split again into 3 pieces, one of them empty.
        let rest = fr.len() as u32 - 12;
        f.g.tx[0].add_readable(&[h, d, d + 10, d + 10], &[12, 10, 0, rest - 10]);
        f.g.tx[0].publish();
        f.process();
        assert_eq!(f.sent(), vec![fr]);
    }

    #[test]
    fn indirect_chains() {
        let mut f = fx(DEFAULT_OFFER);
        let fr = frame(PEER, &[3; 64]);
        let a = f.g.mem.alloc(fr.len() as u64, 8);
        f.g.mem.write(a, &fr);
        f.g.tx[0].add_indirect(&[(a, 12, false), (a + 12, fr.len() as u32 - 12, false)]);
        f.g.tx[0].publish();
        f.process();
        assert_eq!(f.sent(), vec![fr.clone()]);
        // Not negotiated: malformed.
        let mut f = fx(DEFAULT_OFFER.without(F_RING_INDIRECT_DESC));
        let a = f.g.mem.alloc(fr.len() as u64, 8);
        f.g.mem.write(a, &fr);
        f.g.tx[0].add_indirect(&[(a, fr.len() as u32, false)]);
        f.g.tx[0].publish();
        f.process();
        assert!(f.sent().is_empty());
        assert_eq!(f.counters().malformed_indirect, 1);
        f.all_returned(1);
    }

    /// Each malformed chain is returned with length 0, counted under its rule,
    /// and the good frame queued after it still goes out.
    #[test]
    fn every_malformed_chain_is_returned_and_counted_and_never_stalls() {
        type Counter = fn(&NetCounters) -> u64;
        type Make = Box<dyn Fn(&mut GuestDriver)>;
        let good = frame(PEER, &[1; 60]);
        let cases: Vec<(&str, Make, Counter)> = vec![
            (
                "header short",
                Box::new(|g| {
                    let a = g.mem.alloc(8, 8);
                    g.tx[0].add_readable(&[a], &[8]);
                }),
                |c| c.malformed_header_short,
            ),
            (
                "write-only descriptor",
                Box::new(|g| {
                    let a = g.mem.alloc(100, 8);
                    g.tx[0].add_chain(&[(a, 12, false), (a + 12, 80, true)]);
                }),
                |c| c.malformed_direction,
            ),
            (
                "frame over 64 KiB + header",
                Box::new(|g| {
                    let a = g.mem.alloc(70_000, 8);
                    g.tx[0].add_readable(&[a, a + 40_000], &[40_000, 25_563]);
                }),
                |c| c.malformed_too_long,
            ),
            (
                "address outside guest memory",
                Box::new(|g| {
                    g.tx[0].add_readable(&[(16 << 20) - 10], &[100]);
                }),
                |c| c.malformed_outside_memory,
            ),
            (
                "descriptor loop",
                Box::new(|g| {
                    let a = g.mem.alloc(100, 8);
                    let h = g.tx[0].add_readable(&[a, a], &[50, 50]);
                    let second = g.tx[0].descriptor(h).3;
                    g.tx[0].poke_descriptor(
                        second,
                        None,
                        None,
                        Some(crate::ring::VRING_DESC_F_NEXT),
                        Some(h),
                    );
                }),
                |c| c.malformed_loop,
            ),
            (
                "next index out of range",
                Box::new(|g| {
                    let a = g.mem.alloc(100, 8);
                    let h = g.tx[0].add_readable(&[a], &[100]);
                    g.tx[0].poke_descriptor(
                        h,
                        None,
                        None,
                        Some(crate::ring::VRING_DESC_F_NEXT),
                        Some(999),
                    );
                }),
                |c| c.malformed_next_out_of_range,
            ),
        ];
        for (name, make, counter) in cases {
            let mut f = fx(DEFAULT_OFFER);
            make(&mut f.g);
            f.g.queue_tx(0, &good);
            f.g.tx[0].publish();
            let p = f.process();
            assert_eq!(p.chains, 2, "{name}");
            assert_eq!(
                f.sent(),
                vec![good.clone()],
                "{name}: the good frame still goes"
            );
            let c = f.counters();
            assert_eq!(counter(&c), 1, "{name}: {c:?}");
            assert_eq!(c.tx_malformed, 1, "{name}");
            assert_eq!(c.tx_frames, 1, "{name}");
            // Both chains are back with length 0 (the malformed one may carry an
            // out-of-range id, as the guest gave it).
            assert_eq!(f.g.tx[0].used_idx(), 2, "{name}");
            assert!(!f.dev.needs_reset(), "{name}");
        }
    }

    #[test]
    fn with_in_order_chains_are_used_in_the_order_they_were_made_available() {
        let mut f = fx(DEFAULT_OFFER);
        assert!(
            f.dev
                .acked_features()
                .unwrap()
                .has(crate::features::F_IN_ORDER)
        );
        let good = frame(PEER, &[1; 60]);
        let mut heads = Vec::new();
        for i in 0..40 {
            heads.push(if i % 7 == 3 {
                let a = f.g.mem.alloc(8, 8);
                f.g.tx[0].add_readable(&[a], &[8]) // malformed: header short
            } else {
                f.g.queue_tx(0, &good)
            });
        }
        f.g.tx[0].publish();
        assert_eq!(f.process().chains, 40);
        let used: Vec<u16> = (0..40).map(|_| f.g.tx[0].pop_used().unwrap().0).collect();
        assert_eq!(used, heads);
        assert_eq!(f.counters().tx_malformed, 6);
    }

    #[test]
    fn a_head_outside_the_table_needs_reset() {
        // No used element can return a descriptor that does not exist: like QEMU,
        // the device flags NEEDS_RESET and tells the driver.
        let mut f = fx(DEFAULT_OFFER);
        let a = f.g.mem.alloc(100, 8);
        f.g.tx[0].add_readable(&[a], &[100]);
        f.g.tx[0].set_avail_entry(0, 4000);
        f.g.tx[0].publish();
        f.process();
        assert!(f.dev.needs_reset());
        assert_eq!(f.g.interrupt.config_count(), 1);
        assert!(f.sent().is_empty());
    }

    /// The `tx_queue` fuzz finding `tx_queue-chains-without-outcome`: 40 chains
    /// (more than one burst) then a head outside the table in the same pass.
    /// The chains before the bad head were sent, counted and returned, but
    /// `process_tx` reported none of them (it dropped its count on the error).
    /// Now every chain before the bad head is sent and returned, the outcome
    /// counts them, and the device needs a reset.
    #[test]
    fn chains_before_a_bad_head_are_returned_counted_and_reported() {
        let mut f = fx(DEFAULT_OFFER);
        let frames: Vec<_> = (0..40u8).map(|i| frame(PEER, &[i; 60])).collect();
        for fr in &frames {
            f.g.queue_tx(0, fr);
        }
        f.g.tx[0].set_avail_entry(40, 4000);
        f.g.tx[0].set_avail_idx(41);
        let p = f.process();
        assert!(f.dev.needs_reset());
        assert_eq!(p.chains, 40, "every chain taken before the bad head");
        assert!(p.notified, "the used chains are signalled");
        assert_eq!(f.sent(), frames);
        f.all_returned(40);
        let c = f.counters();
        assert_eq!(c.tx_frames, 40);
        assert_eq!(f.g.interrupt.config_count(), 1);
    }

    #[test]
    fn offloads_not_negotiated_are_dropped() {
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_HOST_TSO4));
        let mut fr = frame(PEER, &[0; 3000]);
        let hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        fr[..12].copy_from_slice(&hdr.to_bytes());
        f.g.queue_tx(0, &fr);
        f.g.tx[0].publish();
        f.process();
        assert!(f.sent().is_empty());
        assert_eq!(f.counters().tx_dropped_offload, 1);
        f.all_returned(1);
        // Negotiated: goes through as is.
        let mut f = fx(DEFAULT_OFFER);
        f.g.queue_tx(0, &fr);
        f.g.tx[0].publish();
        f.process();
        assert_eq!(f.sent(), vec![fr.clone()]);
        // NEEDS_CSUM without CSUM: dropped.
        let mut f = fx(crate::features::prune(
            DEFAULT_OFFER.without(VIRTIO_NET_F_CSUM),
        ));
        fr[..12].copy_from_slice(
            &VirtioNetHdr {
                gso_type: 0,
                gso_size: 0,
                ..hdr
            }
            .to_bytes(),
        );
        f.g.queue_tx(0, &fr);
        f.g.tx[0].publish();
        f.process();
        assert_eq!(f.counters().tx_dropped_offload, 1);
    }

    #[test]
    fn link_down_drops_and_link_up_resumes() {
        let mut f = fx(DEFAULT_OFFER);
        f.dev.set_link_up(false);
        assert_eq!(f.g.interrupt.config_count(), 1);
        f.g.queue_tx(0, &frame(PEER, &[1; 10]));
        f.g.tx[0].publish();
        f.process();
        assert!(f.sent().is_empty());
        assert_eq!(f.counters().tx_dropped_link_down, 1);
        f.all_returned(1);
        f.dev.set_link_up(true);
        assert_eq!(f.g.interrupt.config_count(), 2);
        f.g.queue_tx(0, &frame(PEER, &[2; 10]));
        f.g.tx[0].publish();
        f.process();
        assert_eq!(f.sent().len(), 1);
    }

    #[test]
    fn backpressure_keeps_frames_in_the_ring_in_order() {
        let mut f = fx(DEFAULT_OFFER);
        let frames: Vec<_> = (0..5u8).map(|i| frame(PEER, &[i; 30])).collect();
        for fr in &frames {
            f.g.queue_tx(0, fr);
        }
        f.g.tx[0].publish();
        f.be.full.store(true, Ordering::SeqCst);
        let p = f.process();
        assert!(p.blocked);
        assert_eq!(p.chains, 0);
        assert_eq!(f.g.tx[0].used_idx(), 0, "nothing returned: the frames wait");
        assert_eq!(f.counters().tx_backpressure, 1);
        f.be.full.store(false, Ordering::SeqCst);
        let p = f.process();
        assert!(!p.blocked);
        assert_eq!(f.sent(), frames);
        assert_eq!(f.counters().dropped(), 0);
    }

    #[test]
    fn no_interrupt_flag_and_event_idx_suppress() {
        let mut f = fx(DEFAULT_OFFER.without(F_RING_EVENT_IDX));
        f.g.tx[0].set_no_interrupt(true);
        f.g.queue_tx(0, &frame(PEER, &[1; 10]));
        f.g.tx[0].publish();
        assert!(!f.process().notified);
        assert_eq!(f.g.interrupt.queue_count(1), 0);
        assert_eq!(f.counters().notifications_suppressed, 1);

        let mut f = fx(DEFAULT_OFFER);
        // EVENT_IDX: the driver wants an interrupt only after the 3rd used entry.
        f.g.tx[0].set_used_event(2);
        for i in 0..2u8 {
            f.g.queue_tx(0, &frame(PEER, &[i; 10]));
        }
        f.g.tx[0].publish();
        assert!(!f.process().notified);
        f.g.queue_tx(0, &frame(PEER, &[3; 10]));
        f.g.tx[0].publish();
        assert!(f.process().notified);
        assert_eq!(f.g.interrupt.queue_count(1), 1);
        // The device asked to be kicked at the next new buffer.
        assert_eq!(f.g.tx[0].avail_event(), 3);
    }

    #[test]
    fn budget_returns_more() {
        let mut f = fx(DEFAULT_OFFER);
        f.dev.queue_pair(0).unwrap().lock().set_budget(4);
        for i in 0..10u8 {
            f.g.queue_tx(0, &frame(PEER, &[i; 10]));
        }
        f.g.tx[0].publish();
        let p = f.process();
        assert_eq!((p.chains, p.more), (4, true));
        let p = f.process();
        assert_eq!((p.chains, p.more), (4, true));
        let p = f.process();
        assert_eq!((p.chains, p.more), (2, false));
        assert_eq!(f.sent().len(), 10);
    }

    #[test]
    fn runaway_avail_index_needs_reset() {
        let mut f = fx(DEFAULT_OFFER);
        f.g.queue_tx(0, &frame(PEER, &[1; 10]));
        f.g.tx[0].publish();
        f.g.tx[0].set_avail_idx(300);
        f.process();
        assert!(f.dev.needs_reset());
        assert_eq!(f.g.interrupt.config_count(), 1, "the driver is told");
        // A broken queue does nothing more, and does not panic.
        assert_eq!(f.process(), Processed::default());
        // Reset recovers.
        f.dev.reset();
        assert!(!f.dev.needs_reset());
        let _ = VirtioInterruptType::Config;
    }
}
