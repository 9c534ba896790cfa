//! Guest memory in the IOMMU: [`DmaMappings`] maps every region of a `vm-memory`
//! memory map through a [`DmaMapper`] when a primary is attached, follows the
//! VMM's memory map as it changes (hot-plugged or removed regions), and unmaps
//! everything on detach.
//!
//! Each region is mapped whole, at I/O virtual address = guest physical address
//! (`region.start_addr()`), from its host address
//! (`region.get_host_address(0)`), read-write. What is mapped is tracked here, so
//! an [`update`](DmaMappings::update) touches only the regions that changed and
//! [`mapped`](DmaMappings::mapped) always says what the IOMMU holds, errors
//! included.

use std::io;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::DmaMapper;

/// One mapping: I/O virtual address, size, host address.
type Mapping = (u64, u64, u64);

/// The guest memory regions currently DMA-mapped through one [`DmaMapper`].
///
/// Use one per container (per [`DmaMapper`]), always with that mapper:
///
/// - attach: [`map_all`](Self::map_all) with the VMM's memory map;
/// - memory map changed: [`update`](Self::update) with the new one; regions
///   that left are unmapped, new ones mapped, unchanged ones left alone;
/// - detach: [`unmap_all`](Self::unmap_all).
///
/// When a call fails part-way, [`mapped`](Self::mapped) still lists exactly what
/// is mapped (what succeeded before the failure); retry or
/// [`unmap_all`](Self::unmap_all).
///
/// Dropping it unmaps nothing (it holds no mapper): the mappings live on until
/// unmapped or until the container is closed, and a warning is logged.
#[derive(Debug, Default)]
pub struct DmaMappings {
    /// (iova, size), sorted by iova; what [`mapped`](Self::mapped) returns.
    ranges: Vec<(u64, u64)>,
    /// The host address of each entry of `ranges`.
    hosts: Vec<u64>,
}

impl DmaMappings {
    /// Nothing mapped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// What is mapped, as (I/O virtual address, size), in address order.
    pub fn mapped(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Maps every region of `mem` (on attach). Fails with
    /// [`io::ErrorKind::AlreadyExists`], mapping nothing, if something is mapped
    /// already: use [`update`](Self::update) for a new memory map.
    ///
    /// # Safety
    ///
    /// Every region of `mem` must meet [`DmaMapper::dma_map`]'s contract from now
    /// until it is unmapped through this `DmaMappings` (by an `update` whose
    /// memory map lacks it, or by `unmap_all`): its host mapping stays in place
    /// (keep the memory map, or its regions, alive), and the VMM reads and
    /// writes it only with volatile or atomic accesses (`vm-memory`'s `Bytes` and
    /// `VolatileSlice` accessors do) or through system calls, never through Rust
    /// references: the device reads and writes it at any time.
    pub unsafe fn map_all<D, M>(&mut self, mapper: &D, mem: &M) -> io::Result<()>
    where
        D: DmaMapper + ?Sized,
        M: GuestMemoryBackend,
    {
        if !self.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "guest memory is already DMA-mapped ({} regions); use update() for a new memory map",
                    self.ranges.len()
                ),
            ));
        }
        // SAFETY: the caller upholds `update`'s contract, which is ours.
        unsafe { self.update(mapper, mem) }
    }

    /// Makes the mappings those of `new_mem`: first unmaps every mapped region
    /// that `new_mem` lacks (or has at another size or host address), then maps
    /// every region of `new_mem` not yet mapped. Regions present in both are not
    /// touched, so DMA to them continues undisturbed.
    ///
    /// # Safety
    ///
    /// As for [`map_all`](Self::map_all), for every region of `new_mem`.
    pub unsafe fn update<D, M>(&mut self, mapper: &D, new_mem: &M) -> io::Result<()>
    where
        D: DmaMapper + ?Sized,
        M: GuestMemoryBackend,
    {
        let wanted = regions_of(new_mem)?;
        // Unmap first: a region resized in place would overlap its old mapping.
        let mut i = 0;
        while i < self.ranges.len() {
            let current = (self.ranges[i].0, self.ranges[i].1, self.hosts[i]);
            if wanted.contains(&current) {
                i += 1;
                continue;
            }
            mapper.dma_unmap(current.0, current.1)?;
            self.ranges.remove(i);
            self.hosts.remove(i);
        }
        for &(iova, size, host) in &wanted {
            if self.position(iova, size, host).is_some() {
                continue;
            }
            // SAFETY: the caller guarantees `dma_map`'s contract for every region
            // of `new_mem`, and (iova, size, host) is one of them.
            unsafe { mapper.dma_map(iova, size, host) }?;
            let at = self.ranges.partition_point(|&(a, _)| a < iova);
            self.ranges.insert(at, (iova, size));
            self.hosts.insert(at, host);
        }
        Ok(())
    }

    /// Unmaps everything (on detach). Tries every mapping even when one fails;
    /// those that failed stay in [`mapped`](Self::mapped) and the first error is
    /// returned.
    pub fn unmap_all<D>(&mut self, mapper: &D) -> io::Result<()>
    where
        D: DmaMapper + ?Sized,
    {
        let mut first_error = None;
        let mut kept_ranges = Vec::new();
        let mut kept_hosts = Vec::new();
        for (&(iova, size), &host) in self.ranges.iter().zip(&self.hosts) {
            if let Err(e) = mapper.dma_unmap(iova, size) {
                kept_ranges.push((iova, size));
                kept_hosts.push(host);
                first_error.get_or_insert(e);
            }
        }
        self.ranges = kept_ranges;
        self.hosts = kept_hosts;
        first_error.map_or(Ok(()), Err)
    }

    fn position(&self, iova: u64, size: u64, host: u64) -> Option<usize> {
        self.ranges
            .iter()
            .zip(&self.hosts)
            .position(|(&r, &h)| r == (iova, size) && h == host)
    }
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        if !self.ranges.is_empty() {
            log::warn!(
                "DmaMappings dropped with {} regions still DMA-mapped; they stay mapped until \
                 the VFIO container is closed",
                self.ranges.len()
            );
        }
    }
}

/// (iova, size, host address) of every region, or an error naming the first
/// region without a host address (before anything is touched).
fn regions_of<M: GuestMemoryBackend>(mem: &M) -> io::Result<Vec<Mapping>> {
    mem.iter()
        .map(|region| {
            let iova = region.start_addr().raw_value();
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "guest memory region at {iova:#x} has no host address to DMA-map: {e}"
                        ),
                    )
                })?;
            Ok((iova, region.len(), host as usize as u64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

    use super::*;

    /// A `DmaMapper` that keeps the live mappings, counts calls, refuses what
    /// VFIO's type1 IOMMU refuses (overlapping maps, unmaps of something not
    /// mapped as such) and fails on request.
    #[derive(Default)]
    struct CountingMapper {
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        live: BTreeMap<u64, (u64, u64)>,
        maps: usize,
        unmaps: usize,
        fail_map_at: Option<u64>,
        fail_unmap_at: Option<u64>,
    }

    impl CountingMapper {
        fn live(&self) -> Vec<(u64, u64)> {
            let s = self.state.lock().unwrap();
            s.live
                .iter()
                .map(|(&iova, &(size, _))| (iova, size))
                .collect()
        }

        fn counts(&self) -> (usize, usize) {
            let s = self.state.lock().unwrap();
            (s.maps, s.unmaps)
        }

        fn host(&self, iova: u64) -> Option<u64> {
            self.state.lock().unwrap().live.get(&iova).map(|m| m.1)
        }
    }

    impl DmaMapper for CountingMapper {
        unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.fail_map_at == Some(iova) {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            let end = iova + size;
            if s.live.iter().any(|(&a, &(sz, _))| a < end && iova < a + sz) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            s.live.insert(iova, (size, host_addr));
            s.maps += 1;
            Ok(())
        }

        fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.fail_unmap_at == Some(iova) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            match s.live.get(&iova) {
                Some(&(sz, _)) if sz == size => {
                    s.live.remove(&iova);
                    s.unmaps += 1;
                    Ok(())
                }
                _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        }
    }

    const MB: usize = 1 << 20;

    fn region(base: u64, size: usize) -> Arc<GuestRegionMmap> {
        Arc::new(GuestRegionMmap::from_range(GuestAddress(base), size, None).unwrap())
    }

    /// Low memory, memory above the PCI hole, and a hot-plugged DIMM.
    fn three_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_arc_regions(vec![
            region(0, 2 * MB),
            region(0x1_0000_0000, MB),
            region(0x2_0000_0000, 4 * MB),
        ])
        .unwrap()
    }

    fn host_of(mem: &GuestMemoryMmap, base: u64) -> u64 {
        mem.find_region(GuestAddress(base))
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap() as usize as u64
    }

    #[test]
    fn map_all_maps_every_region_at_its_guest_address() {
        let mapper = CountingMapper::default();
        let mem = three_regions();
        let mut dma = DmaMappings::new();
        assert!(dma.is_empty());
        // SAFETY: `mem` outlives the mappings (unmapped below) and is only used
        // through vm-memory's accessors.
        unsafe { dma.map_all(&mapper, &mem) }.unwrap();
        let expected = [
            (0, 2 * MB as u64),
            (0x1_0000_0000, MB as u64),
            (0x2_0000_0000, 4 * MB as u64),
        ];
        assert_eq!(dma.mapped(), expected);
        assert_eq!(mapper.live(), expected);
        for (iova, _) in expected {
            assert_eq!(mapper.host(iova), Some(host_of(&mem, iova)));
        }
        assert_eq!(mapper.counts(), (3, 0));

        // A second attach is refused and maps nothing.
        // SAFETY: as above.
        let err = unsafe { dma.map_all(&mapper, &mem) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(mapper.counts(), (3, 0));

        // The same memory map again changes nothing.
        // SAFETY: as above.
        unsafe { dma.update(&mapper, &mem) }.unwrap();
        assert_eq!(mapper.counts(), (3, 0));

        dma.unmap_all(&mapper).unwrap();
        assert!(dma.is_empty());
        assert!(mapper.live().is_empty());
        assert_eq!(mapper.counts(), (3, 3));
    }

    #[test]
    fn update_maps_added_and_unmaps_removed_regions_only() {
        let mapper = CountingMapper::default();
        let mem = three_regions();
        let mut dma = DmaMappings::new();
        // SAFETY: every memory map used here outlives its mappings (all are
        // unmapped before the end) and is only used through vm-memory.
        unsafe { dma.map_all(&mapper, &mem) }.unwrap();

        // Unplug the DIMM at 0x1_0000_0000, plug two others.
        let (mem2, _removed) = mem
            .remove_region(GuestAddress(0x1_0000_0000), MB as u64)
            .unwrap();
        let mem2 = mem2
            .insert_region(region(0x3_0000_0000, MB))
            .unwrap()
            .insert_region(region(0x1_8000_0000, 2 * MB))
            .unwrap();
        // SAFETY: as above.
        unsafe { dma.update(&mapper, &mem2) }.unwrap();
        let expected = [
            (0, 2 * MB as u64),
            (0x1_8000_0000, 2 * MB as u64),
            (0x2_0000_0000, 4 * MB as u64),
            (0x3_0000_0000, MB as u64),
        ];
        assert_eq!(dma.mapped(), expected);
        assert_eq!(mapper.live(), expected);
        // One unmap, two maps; the unchanged regions were left alone.
        assert_eq!(mapper.counts(), (5, 1));

        // A region resized in place (same base, bigger) is unmapped before the
        // new one is mapped: type1 would refuse the overlap otherwise.
        let (mem3, _) = mem2
            .remove_region(GuestAddress(0x3_0000_0000), MB as u64)
            .unwrap();
        let mem3 = mem3.insert_region(region(0x3_0000_0000, 2 * MB)).unwrap();
        // SAFETY: as above.
        unsafe { dma.update(&mapper, &mem3) }.unwrap();
        assert_eq!(dma.mapped()[3], (0x3_0000_0000, 2 * MB as u64));
        assert_eq!(mapper.counts(), (6, 2));

        // Same range, new backing (a new host address): remapped.
        let (mem4, _) = mem3.remove_region(GuestAddress(0), 2 * MB as u64).unwrap();
        let mem4 = mem4.insert_region(region(0, 2 * MB)).unwrap();
        assert_ne!(host_of(&mem3, 0), host_of(&mem4, 0));
        // SAFETY: as above.
        unsafe { dma.update(&mapper, &mem4) }.unwrap();
        assert_eq!(mapper.host(0), Some(host_of(&mem4, 0)));
        assert_eq!(mapper.counts(), (7, 3));
        assert_eq!(dma.mapped(), mapper.live());

        // An empty memory map unmaps everything.
        // SAFETY: as above (nothing is mapped).
        unsafe { dma.update(&mapper, &GuestMemoryMmap::<()>::new()) }.unwrap();
        assert!(dma.is_empty());
        assert!(mapper.live().is_empty());
        assert_eq!(mapper.counts(), (7, 7));
    }

    #[test]
    fn a_thousand_attach_detach_cycles_leave_nothing_mapped() {
        let mapper = CountingMapper::default();
        let mem = three_regions();
        let (smaller, _) = mem
            .remove_region(GuestAddress(0x1_0000_0000), MB as u64)
            .unwrap();
        let mut dma = DmaMappings::new();
        for i in 0..1_000 {
            // SAFETY: `mem` and `smaller` outlive the mappings, unmapped each
            // cycle, and are only used through vm-memory.
            unsafe { dma.map_all(&mapper, &mem) }.unwrap();
            assert_eq!(dma.mapped().len(), 3);
            if i % 2 == 1 {
                // SAFETY: as above.
                unsafe { dma.update(&mapper, &smaller) }.unwrap();
                assert_eq!(dma.mapped().len(), 2);
            }
            dma.unmap_all(&mapper).unwrap();
            assert!(dma.is_empty());
        }
        assert!(mapper.live().is_empty());
        let (maps, unmaps) = mapper.counts();
        assert_eq!(maps, 3_000);
        assert_eq!(maps, unmaps);
    }

    #[test]
    fn failures_leave_mapped_equal_to_what_is_mapped() {
        let mapper = CountingMapper::default();
        let mem = three_regions();
        let mut dma = DmaMappings::new();
        mapper.state.lock().unwrap().fail_map_at = Some(0x1_0000_0000);
        // SAFETY: `mem` outlives the mappings, all unmapped below, and is only
        // used through vm-memory.
        let err = unsafe { dma.map_all(&mapper, &mem) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(dma.mapped(), [(0, 2 * MB as u64)]);
        assert_eq!(dma.mapped(), mapper.live());

        // Retrying with update() maps the rest.
        mapper.state.lock().unwrap().fail_map_at = None;
        // SAFETY: as above.
        unsafe { dma.update(&mapper, &mem) }.unwrap();
        assert_eq!(dma.mapped().len(), 3);

        // A failed unmap keeps that mapping listed; the others go.
        mapper.state.lock().unwrap().fail_unmap_at = Some(0x2_0000_0000);
        let err = dma.unmap_all(&mapper).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
        assert_eq!(dma.mapped(), [(0x2_0000_0000, 4 * MB as u64)]);
        assert_eq!(dma.mapped(), mapper.live());
        mapper.state.lock().unwrap().fail_unmap_at = None;
        dma.unmap_all(&mapper).unwrap();
        assert!(mapper.live().is_empty());
    }

    #[test]
    fn works_through_a_trait_object() {
        let mapper = CountingMapper::default();
        let dyn_mapper: &dyn DmaMapper = &mapper;
        let mem = three_regions();
        let mut dma = DmaMappings::new();
        // SAFETY: `mem` outlives the mappings, unmapped below, and is only used
        // through vm-memory.
        unsafe { dma.map_all(dyn_mapper, &mem) }.unwrap();
        dma.unmap_all(dyn_mapper).unwrap();
        assert_eq!(mapper.counts(), (3, 3));
    }
}
