//! Walking a descriptor chain into host iovecs.
//!
//! [`walk`] follows a chain from its head through the descriptor table (and at
//! most one level of indirect table), checks every rule a hostile driver could
//! break, and appends the buffers as `iovec`s over guest memory to a
//! [`ChainBuf`]. Nothing is copied: the iovecs are what `readv`/`writev` get.
//!
//! A chain that breaks a rule yields a [`ChainError`]; the caller returns it to
//! the driver with length 0 and counts it. The walk is bounded by the queue size
//! (or the indirect table size), so a descriptor loop ends it.

use vm_memory::GuestMemoryBackend;

use crate::memory::GuestRam;
use crate::ring::{
    Descriptor, SplitRing, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// The most iovecs one frame (or one batch of merged RX buffers) may use: the
/// kernel's `IOV_MAX`, beyond which `readv`/`writev` fail.
pub const MAX_SEGMENTS: usize = 1024;

/// How a chain breaks the rules. Each variant is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available ring named a head past the descriptor table.
    #[error("head descriptor {head} is outside the {size}-entry table")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The table size.
        size: u16,
    },
    /// A `next` field pointed past the table.
    #[error("next descriptor {next} is outside the {size}-entry table")]
    NextOutOfRange {
        /// The `next` index.
        next: u16,
        /// The table size.
        size: u16,
    },
    /// More descriptors than the table holds: the chain loops.
    #[error("the chain is longer than its {0}-entry table: it loops")]
    Loop(u16),
    /// An indirect descriptor although `VIRTIO_RING_F_INDIRECT_DESC` was not negotiated.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC negotiated")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has `NEXT` set.
    #[error("indirect descriptor with the NEXT flag set")]
    IndirectWithNext,
    /// An indirect table whose length is zero, not a multiple of 16, longer than
    /// the queue, or misaligned.
    #[error("indirect table of {len} bytes at {addr:#x} is not a valid descriptor table")]
    BadIndirectTable {
        /// Table address.
        addr: u64,
        /// Table length in bytes.
        len: u32,
    },
    /// A buffer (or indirect table) outside guest memory.
    #[error("buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-writable buffer on a queue the device only reads (TX).
    #[error("device-writable descriptor on a transmit queue")]
    WritableInReadOnlyQueue,
    /// A device-readable buffer on a queue the device only writes (RX).
    #[error("device-readable descriptor on a receive queue")]
    ReadableInWriteOnlyQueue,
    /// A readable buffer after a writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// More than `MAX_SEGMENTS` (1024, the kernel's `IOV_MAX`) buffers.
    #[error("the chain has more than {MAX_SEGMENTS} buffers")]
    TooManySegments,
}

/// Which buffers a queue's chains may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Device-readable only (TX).
    ReadOnly,
    /// Device-writable only (RX).
    WriteOnly,
    /// Readable, then writable (control queue).
    ReadThenWrite,
}

/// What one walk appended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChainSummary {
    /// Number of iovecs appended.
    pub segments: usize,
    /// Number of those that are device-readable (they come first).
    pub readable_segments: usize,
    /// Bytes readable by the device.
    pub readable_len: usize,
    /// Bytes writable by the device.
    pub writable_len: usize,
}

/// A reusable array of iovecs over guest memory, with the memory region of each
/// (for dirty logging). Allocated once per queue; walks append to it.
///
/// A fixed boxed array with a separate length rather than a `Vec`: building the
/// slice right after a push would otherwise read the `Vec`'s pointer and length
/// with one wide load that cannot be forwarded from the narrower store of the
/// length just made (measured: several ns per packet).
pub(crate) struct ChainBuf {
    iov: Box<[libc::iovec]>,
    regions: Box<[u32]>,
    len: usize,
    /// Walks fail with [`ChainError::TooManySegments`] rather than grow past this
    /// many iovecs (at most the capacity).
    pub limit: usize,
}

// SAFETY: the iovecs point into guest memory kept mapped by the `GuestRam` the
// owner holds alongside; `ChainBuf` is moved together with it, never shared.
unsafe impl Send for ChainBuf {}

impl Default for ChainBuf {
    fn default() -> Self {
        Self::with_capacity(MAX_SEGMENTS)
    }
}

impl ChainBuf {
    /// Room for `cap` iovecs; the walk limit starts at [`MAX_SEGMENTS`].
    pub fn with_capacity(cap: usize) -> Self {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        ChainBuf {
            iov: vec![empty; cap].into_boxed_slice(),
            regions: vec![0; cap].into_boxed_slice(),
            len: 0,
            limit: MAX_SEGMENTS.min(cap),
        }
    }

    /// Drops every iovec.
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops the iovecs from `len` on.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Number of iovecs.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The iovecs.
    #[inline]
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov[..self.len]
    }

    /// The region of each iovec.
    #[inline]
    pub fn regions(&self) -> &[u32] {
        &self.regions[..self.len]
    }

    /// Appends an iovec; false if the limit is reached.
    #[inline]
    fn push(&mut self, iov: libc::iovec, region: u32) -> bool {
        let i = self.len;
        if i >= self.limit || i >= self.iov.len() {
            return false;
        }
        self.iov[i] = iov;
        self.regions[i] = region;
        self.len = i + 1;
        true
    }

    /// Removes the first `n` iovecs, moving the rest to the front.
    pub fn drain_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.iov.copy_within(n..self.len, 0);
        self.regions.copy_within(n..self.len, 0);
        self.len -= n;
    }
}

/// Walks the chain starting at `head` and appends its buffers to `buf`. On error
/// `buf` is left as it was.
#[inline]
pub(crate) fn walk<M: GuestMemoryBackend>(
    ring: &SplitRing,
    ram: &GuestRam<M>,
    head: u16,
    access: Access,
    buf: &mut ChainBuf,
) -> Result<ChainSummary, ChainError> {
    // Fast path: what drivers send most, one direct descriptor of the right
    // direction inside one region. Anything else takes the full walk, which reads
    // the descriptor again and checks everything.
    let plain = match access {
        Access::ReadOnly => Some(0),
        Access::WriteOnly => Some(VRING_DESC_F_WRITE),
        Access::ReadThenWrite => None,
    };
    if let Some(flags) = plain {
        if head < ring.size() {
            let d = ring.descriptor(head);
            if d.flags == flags && d.len > 0 {
                if let Some(span) = ram.translate(d.addr, d.len as usize) {
                    let iov = libc::iovec {
                        iov_base: span.ptr.cast(),
                        iov_len: span.len,
                    };
                    if buf.push(iov, span.region) {
                        let len = span.len;
                        return Ok(if flags == 0 {
                            ChainSummary {
                                segments: 1,
                                readable_segments: 1,
                                readable_len: len,
                                writable_len: 0,
                            }
                        } else {
                            ChainSummary {
                                segments: 1,
                                readable_segments: 0,
                                readable_len: 0,
                                writable_len: len,
                            }
                        });
                    }
                }
            }
        }
    }
    let start = buf.len();
    let r = walk_inner(ring, ram, head, access, buf);
    if r.is_err() {
        buf.truncate(start);
    }
    r
}

#[inline]
fn walk_inner<M: GuestMemoryBackend>(
    ring: &SplitRing,
    ram: &GuestRam<M>,
    head: u16,
    access: Access,
    buf: &mut ChainBuf,
) -> Result<ChainSummary, ChainError> {
    let size = ring.size();
    if head >= size {
        return Err(ChainError::HeadOutOfRange { head, size });
    }
    let mut summary = ChainSummary::default();
    let mut seen_writable = false;
    // `None` while in the ring's own table; `Some((ptr, entries))` in an indirect one.
    let mut table: Option<(*const u8, u16)> = None;
    let mut table_len = size;
    let mut index = head;
    let mut budget = u32::from(size);
    loop {
        if budget == 0 {
            return Err(ChainError::Loop(table_len));
        }
        budget -= 1;
        let d = match table {
            None => ring.descriptor(index),
            // SAFETY: index < entries (checked when following `next`, and 0 at
            // entry), the table was translated as entries*16 bytes and is 8-aligned.
            Some((p, _)) => unsafe { Descriptor::read(p.add(16 * usize::from(index))) },
        };

        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            if table.is_some() {
                return Err(ChainError::NestedIndirect);
            }
            if !ring.indirect_enabled() {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if d.flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = d.len / 16;
            if d.len == 0 || d.len % 16 != 0 || entries > u32::from(size) || d.addr % 8 != 0 {
                return Err(ChainError::BadIndirectTable {
                    addr: d.addr,
                    len: d.len,
                });
            }
            let span = ram
                .translate(d.addr, d.len as usize)
                .ok_or(ChainError::OutsideMemory {
                    addr: d.addr,
                    len: d.len,
                })?;
            table_len = entries as u16;
            table = Some((span.ptr, table_len));
            index = 0;
            budget = entries;
            continue;
        }

        let writable = d.flags & VRING_DESC_F_WRITE != 0;
        match access {
            Access::ReadOnly if writable => return Err(ChainError::WritableInReadOnlyQueue),
            Access::WriteOnly if !writable => return Err(ChainError::ReadableInWriteOnlyQueue),
            _ => {}
        }
        if !writable && seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        if d.len > 0 {
            let before = buf.len();
            let mut too_many = false;
            let ok = ram.for_each_span(d.addr, d.len as usize, |s| {
                let pushed = buf.push(
                    libc::iovec {
                        iov_base: s.ptr.cast(),
                        iov_len: s.len,
                    },
                    s.region,
                );
                too_many |= !pushed;
                pushed
            });
            if !ok {
                return Err(if too_many {
                    ChainError::TooManySegments
                } else {
                    ChainError::OutsideMemory {
                        addr: d.addr,
                        len: d.len,
                    }
                });
            }
            let added = buf.len() - before;
            summary.segments += added;
            if writable {
                summary.writable_len += d.len as usize;
            } else {
                summary.readable_segments += added;
                summary.readable_len += d.len as usize;
            }
        }
        seen_writable |= writable;

        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Ok(summary);
        }
        if d.next >= table_len {
            return Err(ChainError::NextOutOfRange {
                next: d.next,
                size: table_len,
            });
        }
        index = d.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{RingFeatures, SplitRing};
    use crate::testing::GuestMem as GuestMemoryMmap;
    use crate::testing::{DriverQueue, TestMemory};
    use std::sync::Arc;
    use virtio_queue::QueueT;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct Fixture {
        mem: TestMemory,
        dq: DriverQueue,
        ram: GuestRam<GuestMemoryMmap>,
    }

    fn fixture(size: u16) -> Fixture {
        let mem = TestMemory::new(1 << 20);
        let dq = DriverQueue::new(&mem, size);
        let ram = GuestRam::new(Arc::clone(mem.arc())).unwrap();
        Fixture { mem, dq, ram }
    }

    impl Fixture {
        fn ring(&self, indirect: bool) -> SplitRing {
            SplitRing::new(
                &self.dq.queue(),
                &self.ram,
                RingFeatures {
                    indirect,
                    event_idx: false,
                    in_order: false,
                },
            )
            .unwrap()
        }
        fn walk(
            &self,
            head: u16,
            access: Access,
            indirect: bool,
        ) -> Result<ChainSummary, ChainError> {
            let ring = self.ring(indirect);
            let mut buf = ChainBuf::default();
            let r = walk(&ring, &self.ram, head, access, &mut buf);
            if r.is_err() {
                assert_eq!(buf.len(), 0, "a failed walk leaves the buffer as it was");
            }
            r
        }
    }

    #[test]
    fn simple_readable_chain() {
        let mut f = fixture(16);
        let head = f.dq.add_readable(&[0x4000, 0x5000], &[12, 100]);
        f.mem.write(0x4000, &[7; 12]);
        let ring = f.ring(false);
        let mut buf = ChainBuf::default();
        let s = walk(&ring, &f.ram, head, Access::ReadOnly, &mut buf).unwrap();
        assert_eq!(
            s,
            ChainSummary {
                segments: 2,
                readable_segments: 2,
                readable_len: 112,
                writable_len: 0
            }
        );
        assert_eq!(buf.iovecs()[0].iov_len, 12);
        // SAFETY: iovec from a live walk, 12 bytes.
        assert_eq!(unsafe { *(buf.iovecs()[0].iov_base as *const u8) }, 7);
    }

    #[test]
    fn direction_rules() {
        let mut f = fixture(16);
        let w = f.dq.add_writable(&[0x4000], &[100]);
        assert_eq!(
            f.walk(w, Access::ReadOnly, false),
            Err(ChainError::WritableInReadOnlyQueue)
        );
        let r = f.dq.add_readable(&[0x4000], &[100]);
        assert_eq!(
            f.walk(r, Access::WriteOnly, false),
            Err(ChainError::ReadableInWriteOnlyQueue)
        );
        let mixed = f.dq.add_chain(&[(0x4000, 10, false), (0x5000, 1, true)]);
        let s = f.walk(mixed, Access::ReadThenWrite, false).unwrap();
        assert_eq!(
            (s.readable_len, s.writable_len, s.readable_segments),
            (10, 1, 1)
        );
        let backwards = f.dq.add_chain(&[(0x5000, 1, true), (0x4000, 10, false)]);
        assert_eq!(
            f.walk(backwards, Access::ReadThenWrite, false),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn out_of_range_indices_and_memory() {
        let mut f = fixture(8);
        assert_eq!(
            f.walk(8, Access::ReadOnly, false),
            Err(ChainError::HeadOutOfRange { head: 8, size: 8 })
        );
        let h = f.dq.add_readable(&[0x4000], &[10]);
        f.dq.poke_descriptor(h, None, None, Some(VRING_DESC_F_NEXT), Some(8));
        assert_eq!(
            f.walk(h, Access::ReadOnly, false),
            Err(ChainError::NextOutOfRange { next: 8, size: 8 })
        );
        let h = f.dq.add_readable(&[(1 << 20) - 4], &[8]);
        assert!(matches!(
            f.walk(h, Access::ReadOnly, false),
            Err(ChainError::OutsideMemory { .. })
        ));
        let h = f.dq.add_readable(&[u64::MAX - 2], &[8]);
        assert!(matches!(
            f.walk(h, Access::ReadOnly, false),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn loops_end_the_walk() {
        let mut f = fixture(8);
        // A descriptor that points at itself.
        let h = f.dq.add_readable(&[0x4000], &[1]);
        f.dq.poke_descriptor(h, None, None, Some(VRING_DESC_F_NEXT), Some(h));
        assert_eq!(f.walk(h, Access::ReadOnly, false), Err(ChainError::Loop(8)));
        // A two-cycle of zero-length descriptors (no segments are produced, the
        // budget still ends it).
        let a = f.dq.add_readable(&[0x4000], &[0]);
        let b = f.dq.add_readable(&[0x4000], &[0]);
        f.dq.poke_descriptor(a, None, None, Some(VRING_DESC_F_NEXT), Some(b));
        f.dq.poke_descriptor(b, None, None, Some(VRING_DESC_F_NEXT), Some(a));
        assert_eq!(f.walk(a, Access::ReadOnly, false), Err(ChainError::Loop(8)));
    }

    #[test]
    fn indirect_tables() {
        let mut f = fixture(16);
        let h =
            f.dq.add_indirect(&[(0x6000, 12, false), (0x7000, 50, false)]);
        assert_eq!(
            f.walk(h, Access::ReadOnly, false),
            Err(ChainError::IndirectNotNegotiated)
        );
        let s = f.walk(h, Access::ReadOnly, true).unwrap();
        assert_eq!((s.segments, s.readable_len), (2, 62));

        // INDIRECT | NEXT.
        let h2 = f.dq.add_indirect(&[(0x6000, 12, false)]);
        let d = f.dq.descriptor(h2);
        f.dq.poke_descriptor(h2, None, None, Some(d.2 | VRING_DESC_F_NEXT), Some(0));
        assert_eq!(
            f.walk(h2, Access::ReadOnly, true),
            Err(ChainError::IndirectWithNext)
        );

        // Bad lengths and alignment.
        for (addr, len) in [
            (0x8000u64, 0u32),
            (0x8000, 24),
            (0x8004, 32),
            (0x8000, 16 * 17),
        ] {
            let h = f.dq.add_indirect(&[(0x6000, 12, false)]);
            f.dq.poke_descriptor(h, Some(addr), Some(len), None, None);
            assert!(
                matches!(
                    f.walk(h, Access::ReadOnly, true),
                    Err(ChainError::BadIndirectTable { .. })
                ),
                "{addr:#x}/{len}"
            );
        }
        // Table outside memory.
        let h = f.dq.add_indirect(&[(0x6000, 12, false)]);
        f.dq.poke_descriptor(h, Some((1 << 20) - 16), Some(32), None, None);
        assert!(matches!(
            f.walk(h, Access::ReadOnly, true),
            Err(ChainError::OutsideMemory { .. })
        ));

        // Nested indirect, loops and bad next inside the table.
        let h =
            f.dq.add_indirect(&[(0x6000, 12, false), (0x7000, 16, false)]);
        let table = f.dq.descriptor(h).0;
        f.mem
            .write_descriptor(table + 16, 0x9000, 16, VRING_DESC_F_INDIRECT, 0);
        f.mem
            .write_descriptor(table, 0x6000, 12, VRING_DESC_F_NEXT, 1);
        assert_eq!(
            f.walk(h, Access::ReadOnly, true),
            Err(ChainError::NestedIndirect)
        );
        f.mem
            .write_descriptor(table + 16, 0x7000, 16, VRING_DESC_F_NEXT, 0);
        assert_eq!(f.walk(h, Access::ReadOnly, true), Err(ChainError::Loop(2)));
        f.mem
            .write_descriptor(table + 16, 0x7000, 16, VRING_DESC_F_NEXT, 2);
        assert_eq!(
            f.walk(h, Access::ReadOnly, true),
            Err(ChainError::NextOutOfRange { next: 2, size: 2 })
        );
    }

    #[test]
    fn too_many_segments() {
        let mut f = fixture(4096);
        let addrs: Vec<u64> = (0..1025).map(|i| 0x10000 + i * 4).collect();
        let lens = vec![1u32; 1025];
        let h = f.dq.add_readable(&addrs, &lens);
        assert_eq!(
            f.walk(h, Access::ReadOnly, false),
            Err(ChainError::TooManySegments)
        );
        let h = f.dq.add_readable(&addrs[..1024], &lens[..1024]);
        assert_eq!(f.walk(h, Access::ReadOnly, false).unwrap().segments, 1024);
    }

    /// The first two of a queue's areas (descriptor table, available ring, used
    /// ring, each ring with its event field) that share a byte, if any.
    fn ring_overlap(q: &virtio_queue::Queue) -> Option<String> {
        let n = u64::from(q.size());
        let areas = [
            ("descriptor table", q.desc_table(), q.desc_table() + 16 * n),
            ("avail ring", q.avail_ring(), q.avail_ring() + 6 + 2 * n),
            ("used ring", q.used_ring(), q.used_ring() + 6 + 8 * n),
        ];
        for (i, &(a, a0, a1)) in areas.iter().enumerate() {
            for &(b, b0, b1) in &areas[i + 1..] {
                if a0 < b1 && b0 < a1 {
                    return Some(format!(
                        "{a} {a0:#x}..{a1:#x} overlaps {b} {b0:#x}..{b1:#x}"
                    ));
                }
            }
        }
        None
    }

    #[test]
    fn mock_used_ring_overlaps_its_avail_ring() {
        // virtio-queue 0.18's `MockSplitQueue` places the used ring at
        // `avail.end()`, which adds the entry count (16) instead of the entries'
        // bytes (32): used = avail + 4 + 16, over avail entries 8 to 15 and
        // `used_event`. This is why the test below moves it; if this fails, the
        // mock was fixed and the move can go.
        let mem = TestMemory::new(1 << 20);
        let mock = MockSplitQueue::create(&**mem.arc(), GuestAddress(0x80000), 16);
        assert_eq!(mock.used_addr(), GuestAddress(0x80100 + 4 + 16));
        let q: virtio_queue::Queue = mock.create_queue().unwrap();
        assert!(
            ring_overlap(&q)
                .unwrap()
                .contains("avail ring 0x80100..0x80126 overlaps used ring 0x80114")
        );
    }

    #[test]
    fn agrees_with_virtio_queue_mock() {
        // Chains built by virtio-queue's own mock driver walk the same way.
        let mem = TestMemory::new(1 << 20);
        let m = mem.arc();
        let mock = MockSplitQueue::create(&**m, GuestAddress(0x80000), 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x4000, 12, VRING_DESC_F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x5000, 300, VRING_DESC_F_NEXT, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x6000, 64, VRING_DESC_F_WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: virtio_queue::Queue = mock.create_queue().unwrap();
        // The mock (0.18) lays its used ring over its avail ring:
        // `SplitQueueRing::end` adds the entry count (16), not the entries' bytes
        // (32), so the used ring starts at avail + 4 + 16 = avail entry 8 and
        // covers entries 8 to 15 and `used_event`. Keep the mock's descriptor
        // table and avail ring; give the queue a used ring of its own, past
        // everything the mock wrote (its misplaced used-ring fields end at
        // avail + 0x3a).
        q.try_set_used_ring_address(GuestAddress(0x81000)).unwrap();
        assert_eq!(ring_overlap(&q), None);
        let ram = GuestRam::new(Arc::clone(m)).unwrap();
        let mut ring = SplitRing::new(&q, &ram, RingFeatures::default()).unwrap();
        assert_eq!(ring.available().unwrap(), 1);
        let head = ring.pop_head().unwrap();
        let mut buf = ChainBuf::default();
        let s = walk(&ring, &ram, head, Access::ReadThenWrite, &mut buf).unwrap();
        assert_eq!((s.readable_len, s.writable_len, s.segments), (312, 64, 3));

        // Returning the chain writes the used ring only: the driver's avail ring
        // reads as the mock left it.
        let avail = mem.read(q.avail_ring(), 6 + 2 * 16);
        ring.push_used(head, 64);
        ring.publish_used(&ram, 0);
        assert_eq!(mem.read(q.avail_ring(), 6 + 2 * 16), avail);
        let used = mem.read(q.used_ring(), 12);
        let word = |at: usize| u32::from_le_bytes(used[at..at + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([used[2], used[3]]), 1);
        assert_eq!((word(4), word(8)), (u32::from(head), 64));
    }
}
