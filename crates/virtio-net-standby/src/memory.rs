//! A host-pointer view of guest memory for the packet path.
//!
//! [`GuestRam`] translates guest physical addresses to host pointers without going
//! through `vm-memory`'s generic access layer on every access: it snapshots the
//! region table once (base, length, host mapping) and remembers the last region it
//! hit, so a descriptor whose buffer lies in the same region as the previous one
//! costs one subtraction and one compare.
//!
//! It holds an `Arc` of the memory map it was built from, so every pointer it hands
//! out stays mapped for as long as the `GuestRam` lives, even if the VMM swaps the
//! map in its `GuestMemoryAtomic` meanwhile. [`MemoryWatch`] notices such a swap at
//! the next batch and rebuilds the view.
//!
//! Writes the device makes into guest memory are reported to the region's dirty
//! bitmap (`GuestRam::mark_dirty`) so that live migration copies them.

use std::cell::Cell;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Errors building a view of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The memory map has no regions.
    #[error("the guest memory map has no regions")]
    NoRegions,
    /// A region has no host mapping the device can address.
    #[error(
        "guest memory region at {start:#x} has no host mapping (the packet path needs mmap-backed memory)"
    )]
    NotMapped {
        /// Guest physical start of the region.
        start: u64,
    },
}

/// Result of memory operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A contiguous span of guest memory, translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostSpan {
    /// Host address of the first byte.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// Index of the region the span lies in.
    pub region: u32,
}

/// The region a run of [`GuestRam::translate_hinted`] calls last hit; the
/// default matches nothing. Valid only with the `GuestRam` that filled it
/// (one per run of frames, never kept across passes).
/// The lifetime ties it to the borrow of the `GuestRam` that fills it, so that a
/// hint cannot outlive that view of memory (and the mappings it keeps alive).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RegionHint<'a> {
    start: u64,
    len: u64,
    host: *mut u8,
    region: u32,
    _ram: std::marker::PhantomData<&'a ()>,
}

impl Default for RegionHint<'_> {
    fn default() -> Self {
        RegionHint {
            start: 0,
            len: 0,
            host: std::ptr::null_mut(),
            region: 0,
            _ram: std::marker::PhantomData,
        }
    }
}

struct HostRegion<R> {
    start: u64,
    len: u64,
    host: *mut u8,
    region: *const R,
}

/// Guest memory as host pointers. See the module documentation.
pub struct GuestRam<M: GuestMemoryBackend> {
    mem: Arc<M>,
    regions: Box<[HostRegion<M::R>]>,
    last: Cell<usize>,
}

// SAFETY: the raw pointers point into memory owned by `mem` (the mappings and the
// region objects), which is `Send + Sync` and lives as long as `self`. `last` is a
// plain index. Moving a `GuestRam` to another thread moves all of it; it is not
// `Sync`, so no two threads use one at once.
unsafe impl<M> Send for GuestRam<M>
where
    M: GuestMemoryBackend + Send + Sync,
    M::R: Sync,
{
}

impl<M: GuestMemoryBackend> std::fmt::Debug for GuestRam<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for r in self.regions.iter() {
            l.entry(&format_args!("{:#x}+{:#x}", r.start, r.len));
        }
        l.finish()
    }
}

impl<M: GuestMemoryBackend> GuestRam<M> {
    /// Builds the view. Every region must have a host mapping.
    pub fn new(mem: Arc<M>) -> Result<Self> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host =
                r.get_host_address(MemoryRegionAddress(0))
                    .map_err(|_| Error::NotMapped {
                        start: r.start_addr().0,
                    })?;
            regions.push(HostRegion {
                start: r.start_addr().0,
                len: r.len(),
                host,
                region: r as *const M::R,
            });
        }
        if regions.is_empty() {
            return Err(Error::NoRegions);
        }
        regions.sort_by_key(|r| r.start);
        Ok(GuestRam {
            mem,
            regions: regions.into_boxed_slice(),
            last: Cell::new(0),
        })
    }

    /// The memory map this view was built from.
    pub fn memory(&self) -> &Arc<M> {
        &self.mem
    }

    /// Index of the region holding `gpa`, if any.
    #[inline]
    fn region_of(&self, gpa: u64) -> Option<usize> {
        let last = self.last.get();
        // `last` is always a valid index: it is only ever set from a search hit and
        // starts at 0 of a non-empty table.
        let r = &self.regions[last];
        if gpa.wrapping_sub(r.start) < r.len {
            return Some(last);
        }
        let i = self
            .regions
            .iter()
            .position(|r| gpa.wrapping_sub(r.start) < r.len)?;
        self.last.set(i);
        Some(i)
    }

    /// Translates `len` bytes at `gpa` that must lie inside one region.
    #[inline]
    pub(crate) fn translate(&self, gpa: u64, len: usize) -> Option<HostSpan> {
        let i = self.region_of(gpa)?;
        let r = &self.regions[i];
        let off = gpa - r.start;
        if len as u64 > r.len - off {
            return None;
        }
        Some(HostSpan {
            // SAFETY: `off < r.len`, so the result stays inside the region's mapping.
            ptr: unsafe { r.host.add(off as usize) },
            len,
            region: i as u32,
        })
    }

    /// [`translate`](Self::translate) for a run of translations: `hint` keeps the
    /// region the last one hit (in registers, for a loop), so that the next
    /// buffer in the same region costs a subtraction and two comparisons.
    #[inline(always)]
    pub(crate) fn translate_hinted<'a>(
        &'a self,
        hint: &mut RegionHint<'a>,
        gpa: u64,
        len: usize,
    ) -> Option<HostSpan> {
        let off = gpa.wrapping_sub(hint.start);
        if off < hint.len && len as u64 <= hint.len - off {
            return Some(HostSpan {
                // SAFETY: `off < hint.len`, and `hint` describes a region of this
                // `GuestRam` (or is empty, `len` 0, and never gets here).
                ptr: unsafe { hint.host.add(off as usize) },
                len,
                region: hint.region,
            });
        }
        let span = self.translate(gpa, len)?;
        let r = &self.regions[span.region as usize];
        *hint = RegionHint {
            start: r.start,
            len: r.len,
            host: r.host,
            region: span.region,
            _ram: std::marker::PhantomData,
        };
        Some(span)
    }

    /// Translates `len` bytes at `gpa`, splitting at region boundaries when the
    /// range runs from one region into the next adjacent one. Calls `f` for each
    /// span in order; returns false (after possibly calling `f` for a prefix) if
    /// some byte of the range is not guest memory or `f` returns false.
    #[inline]
    pub(crate) fn for_each_span(
        &self,
        mut gpa: u64,
        mut len: usize,
        mut f: impl FnMut(HostSpan) -> bool,
    ) -> bool {
        while len > 0 {
            let Some(i) = self.region_of(gpa) else {
                return false;
            };
            let r = &self.regions[i];
            let off = gpa - r.start;
            let n = (len as u64).min(r.len - off) as usize;
            let span = HostSpan {
                // SAFETY: `off < r.len`, so the pointer stays inside the mapping, and
                // `n <= r.len - off` bytes from it are mapped.
                ptr: unsafe { r.host.add(off as usize) },
                len: n,
                region: i as u32,
            };
            if !f(span) {
                return false;
            }
            len -= n;
            let Some(next) = gpa.checked_add(n as u64) else {
                return len == 0;
            };
            gpa = next;
        }
        true
    }

    /// Records that the device wrote `len` bytes at host address `ptr` of region
    /// `region`, for the migration dirty log. `ptr..ptr+len` must come from a span
    /// this view handed out.
    #[inline]
    pub(crate) fn mark_dirty(&self, region: u32, ptr: *const u8, len: usize) {
        let Some(r) = self.regions.get(region as usize) else {
            return;
        };
        let offset = (ptr as usize).wrapping_sub(r.host as usize);
        // SAFETY: `r.region` points to a region object owned by `self.mem`, which
        // lives as long as `self` and is never mutated (GuestMemoryBackend is an
        // immutable collection).
        let region = unsafe { &*r.region };
        region.bitmap().mark_dirty(offset, len);
    }
}

/// The device's writes of one batch, coalesced into few ranges and reported to
/// the dirty bitmap at the end of the batch.
///
/// Reporting after the writes is what live migration needs (a page is copied
/// again if its bit is set after the copy), and the device reports before it
/// returns from the batch, so a VMM that pauses the device before the final
/// dirty-log pass misses nothing. Coalescing spares one atomic read-modify-write
/// per page per frame: consecutive receive buffers usually share pages. Ranges
/// less than a page apart are merged, on either side (a driver's buffers need not
/// come in address order: DPDK's come from a pool), which can mark a page between
/// two buffers that was not written (a false positive costs a page copy, never
/// correctness).
#[derive(Debug, Default)]
pub(crate) struct DirtyLog {
    ranges: Vec<(u32, usize, usize)>,
}

impl DirtyLog {
    const MERGE_GAP: usize = 4096;

    /// Records `len` bytes written at `ptr` in region `region`. Inlined: it runs
    /// once per received frame, and the call cost as much as the check.
    #[inline(always)]
    pub fn add(&mut self, region: u32, ptr: *const u8, len: usize) {
        let start = ptr as usize;
        let end = start.saturating_add(len);
        if let Some(last) = self.ranges.last_mut() {
            if last.0 == region && start <= last.2.saturating_add(Self::MERGE_GAP) {
                // At or above the range's start (the common case, tested first),
                // or below it by less than the gap.
                if start >= last.1 || end.saturating_add(Self::MERGE_GAP) >= last.1 {
                    last.1 = last.1.min(start);
                    last.2 = last.2.max(end);
                    return;
                }
            }
        }
        self.ranges.push((region, start, end));
    }

    /// Reports every recorded range to `ram`'s bitmaps and forgets them.
    pub fn flush<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>) {
        for (region, start, end) in self.ranges.drain(..) {
            ram.mark_dirty(region, start as *const u8, end - start);
        }
    }
}

/// The range a run of frames wrote, merged as [`DirtyLog::add`] merges but kept
/// by the caller (in registers, for a loop) and handed to the log when a write
/// does not merge or the run ends ([`finish`](Self::finish), which the run must
/// call on every way out).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirtyRun {
    region: u32,
    start: usize,
    end: usize,
}

impl Default for DirtyRun {
    fn default() -> Self {
        DirtyRun {
            region: u32::MAX,
            start: 0,
            end: 0,
        }
    }
}

impl DirtyRun {
    /// Records `len` bytes written at `ptr` in region `region`.
    #[inline(always)]
    pub fn add(&mut self, log: &mut DirtyLog, region: u32, ptr: *const u8, len: usize) {
        let start = ptr as usize;
        let end = start.saturating_add(len);
        if self.region == region && start <= self.end.saturating_add(DirtyLog::MERGE_GAP) {
            if start >= self.start {
                // The common case: at or above the range's start.
                self.end = self.end.max(end);
                return;
            }
            if end.saturating_add(DirtyLog::MERGE_GAP) >= self.start {
                self.start = start;
                self.end = self.end.max(end);
                return;
            }
        }
        self.finish(log);
        *self = DirtyRun { region, start, end };
    }

    /// Hands the range to `log`.
    #[inline]
    pub fn finish(&mut self, log: &mut DirtyLog) {
        if self.end > self.start {
            log.add(self.region, self.start as *const u8, self.end - self.start);
        }
        *self = DirtyRun::default();
    }
}

/// Follows a VMM's `GuestMemoryAtomic` and rebuilds the [`GuestRam`] view when the
/// VMM installs a new memory map (memory hotplug, balloon, ...). Checking costs one
/// atomic load per batch.
pub struct MemoryWatch<M: GuestMemoryBackend> {
    atomic: GuestMemoryAtomic<M>,
}

impl<M: GuestMemoryBackend> Clone for MemoryWatch<M> {
    fn clone(&self) -> Self {
        MemoryWatch {
            atomic: self.atomic.clone(),
        }
    }
}

impl<M: GuestMemoryBackend> std::fmt::Debug for MemoryWatch<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryWatch")
    }
}

impl<M: GuestMemoryBackend> MemoryWatch<M> {
    /// Watches `atomic`.
    pub fn new(atomic: GuestMemoryAtomic<M>) -> Self {
        MemoryWatch { atomic }
    }

    /// The map the VMM has installed now.
    pub fn current(&self) -> Arc<M> {
        self.atomic.memory().into_inner()
    }

    /// Whether `ram` still views the installed map. No allocation, no reference
    /// count traffic beyond the `arc-swap` load.
    pub fn is_current(&self, ram: &GuestRam<M>) -> bool {
        let guard = self.atomic.memory();
        std::ptr::eq(&*guard as *const M, Arc::as_ptr(&ram.mem))
    }
}

/// Convenience for tests and tools: whether `len` bytes at `gpa` are guest memory.
pub fn range_is_ram<M: GuestMemoryBackend>(mem: &M, gpa: u64, len: usize) -> bool {
    mem.check_range(GuestAddress(gpa), len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn two_adjacent() -> Arc<GuestMemoryMmap<AtomicBitmap>> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x2000), 0x2000),
                (GuestAddress(0x10000), 0x1000),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn translate_within_and_across_regions() {
        let mem = two_adjacent();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x1ffe))
            .unwrap();
        let ram = GuestRam::new(mem.clone()).unwrap();

        let s = ram.translate(0x1ffe, 2).unwrap();
        // SAFETY: the span was just translated and is 2 bytes long.
        assert_eq!(unsafe { *s.ptr.add(1) }, 2);
        // Straddles the boundary: not one region.
        assert!(ram.translate(0x1ffe, 4).is_none());
        // But splits into two spans.
        let mut spans = vec![];
        assert!(ram.for_each_span(0x1ffe, 4, |s| {
            spans.push((s.len, s.region));
            true
        }));
        assert_eq!(spans, vec![(2, 0), (2, 1)]);
        // SAFETY: spans from a live view.
        let second = ram.translate(0x2000, 2).unwrap();
        // SAFETY: as above, 2 bytes translated.
        assert_eq!(unsafe { *second.ptr }, 3);

        // Holes and the end of memory.
        assert!(ram.translate(0x4000, 1).is_none());
        assert!(ram.translate(0x0, 1).is_none());
        assert!(!ram.for_each_span(0x3ffe, 4, |_| true));
        assert!(ram.translate(0x10fff, 2).is_none());
        assert!(ram.translate(u64::MAX, 1).is_none());
        assert!(!ram.for_each_span(u64::MAX - 1, 8, |_| true));
        // The far region is found and then cached.
        assert_eq!(ram.translate(0x10000, 0x1000).unwrap().region, 2);
        assert_eq!(ram.last.get(), 2);
    }

    #[test]
    fn dirty_marking_reaches_the_bitmap() {
        let mem = Arc::new(
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let ram = GuestRam::new(mem.clone()).unwrap();
        let s = ram.translate(0x5010, 8).unwrap();
        ram.mark_dirty(s.region, s.ptr, s.len);
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x5010));
        assert!(!region.bitmap().dirty_at(0x7000));
        // Bad region index: ignored.
        ram.mark_dirty(9, s.ptr, 1);
    }

    #[test]
    fn dirty_log_coalesces_and_reports_after_the_fact() {
        let mem = Arc::new(
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let ram = GuestRam::new(mem.clone()).unwrap();
        let mut log = DirtyLog::default();
        // Buffers 1536 bytes apart: one range. A far one: a second range.
        for i in 0..8u64 {
            let s = ram.translate(0x10000 + i * 1536, 100).unwrap();
            log.add(s.region, s.ptr, s.len);
        }
        let far = ram.translate(0x80000, 10).unwrap();
        log.add(far.region, far.ptr, far.len);
        assert_eq!(log.ranges.len(), 2);
        let region = mem.iter().next().unwrap();
        assert!(
            !region.bitmap().dirty_at(0x10000),
            "nothing reported before flush"
        );
        log.flush(&ram);
        assert!(log.ranges.is_empty());
        for a in [0x10000, 0x10000 + 7 * 1536, 0x80000] {
            assert!(region.bitmap().dirty_at(a), "{a:#x}");
        }
        assert!(!region.bitmap().dirty_at(0x40000));
    }

    /// Buffers that come in descending or mixed address order (a pool's) merge
    /// as ascending ones do, in the log and in a run's range; a far one does not.
    #[test]
    fn dirty_ranges_merge_whatever_the_buffers_order() {
        let mem = Arc::new(
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let ram = GuestRam::new(mem.clone()).unwrap();
        let order = [4u64, 5, 3, 6, 2, 7, 1, 0];
        let mut log = DirtyLog::default();
        for i in order {
            let s = ram.translate(0x10000 + i * 2176, 100).unwrap();
            log.add(s.region, s.ptr, s.len);
        }
        assert_eq!(log.ranges.len(), 1, "one range for the eight buffers");
        let mut run_log = DirtyLog::default();
        let mut run = DirtyRun::default();
        for i in order {
            let s = ram.translate(0x10000 + i * 2176, 100).unwrap();
            run.add(&mut run_log, s.region, s.ptr, s.len);
        }
        let far = ram.translate(0x80000, 10).unwrap();
        run.add(&mut run_log, far.region, far.ptr, far.len);
        run.finish(&mut run_log);
        assert_eq!(
            run_log.ranges.len(),
            2,
            "the eight buffers, and the far one"
        );
        assert_eq!(run_log.ranges[0], log.ranges[0]);
        log.flush(&ram);
        run_log.flush(&ram);
        let region = mem.iter().next().unwrap();
        for i in order {
            assert!(region.bitmap().dirty_at(0x10000 + i as usize * 2176));
        }
        assert!(region.bitmap().dirty_at(0x80000));
        assert!(!region.bitmap().dirty_at(0x40000));
    }

    #[test]
    fn watch_sees_a_new_map() {
        let atomic = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        );
        let watch = MemoryWatch::new(atomic.clone());
        let ram = GuestRam::new(watch.current()).unwrap();
        assert!(watch.is_current(&ram));
        let new = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        {
            let lock = atomic.lock().unwrap();
            lock.replace(new);
        }
        assert!(!watch.is_current(&ram));
        // The old view still works: it holds the old map.
        assert!(ram.translate(0x800, 8).is_some());
        let ram2 = GuestRam::new(watch.current()).unwrap();
        assert!(ram2.translate(0x1800, 8).is_some());
        assert!(range_is_ram(&**ram2.memory(), 0x1800, 8));
    }
}
