//! [`RecordedVf`]: a [`ModelSpec`] behind [`VfioDeviceOps`] and [`DmaMapper`],
//! recording everything.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::spec::ModelSpec;
use crate::ops::{DmaMapper, IrqInfo, RegionInfo, VfioDeviceOps, irq, region};

/// One call the model received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// [`VfioDeviceOps::region_read`].
    RegionRead {
        /// Region index.
        index: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes read.
        len: usize,
    },
    /// [`VfioDeviceOps::region_write`].
    RegionWrite {
        /// Region index.
        index: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// [`VfioDeviceOps::enable_irq`].
    EnableIrq {
        /// Interrupt index.
        index: u32,
        /// Vectors routed.
        vectors: usize,
    },
    /// [`VfioDeviceOps::set_irq_resample`].
    SetResample {
        /// Interrupt index.
        index: u32,
    },
    /// [`VfioDeviceOps::disable_irq`].
    DisableIrq {
        /// Interrupt index.
        index: u32,
    },
    /// [`VfioDeviceOps::unmask_irq`].
    UnmaskIrq {
        /// Interrupt index.
        index: u32,
    },
    /// [`VfioDeviceOps::reset`].
    Reset,
    /// [`DmaMapper::dma_map`].
    DmaMap {
        /// I/O virtual address.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Host virtual address.
        host_addr: u64,
    },
    /// [`DmaMapper::dma_unmap`].
    DmaUnmap {
        /// I/O virtual address.
        iova: u64,
        /// Bytes.
        size: u64,
    },
}

/// A call [`RecordedVf::fail_next`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`VfioDeviceOps::region_read`].
    RegionRead,
    /// [`VfioDeviceOps::region_write`].
    RegionWrite,
    /// [`VfioDeviceOps::enable_irq`].
    EnableIrq,
    /// [`VfioDeviceOps::disable_irq`].
    DisableIrq,
    /// [`VfioDeviceOps::reset`].
    Reset,
    /// [`DmaMapper::dma_map`].
    DmaMap,
    /// [`DmaMapper::dma_unmap`].
    DmaUnmap,
}

#[derive(Debug, Default)]
struct State {
    config: Vec<u8>,
    /// Regions BAR0..=BAR5 and ROM by index.
    regions: Vec<Vec<u8>>,
    /// Dups of the eventfds each interrupt index was given.
    irqs: HashMap<u32, Vec<EventFd>>,
    resample: Option<EventFd>,
    intx_masked: bool,
    dma: BTreeMap<u64, (u64, u64)>,
    events: Vec<Event>,
    recording: bool,
    /// Per call: (calls to let through first, calls to fail then).
    failures: HashMap<Op, (u32, u32)>,
    resets: u64,
    maps: u64,
    unmaps: u64,
    fds_opened: u64,
    fds_closed: u64,
    region_reads: u64,
    region_writes: u64,
}

impl State {
    fn record(&mut self, e: Event) {
        if self.recording {
            self.events.push(e);
        }
    }

    fn fail(&mut self, op: Op) -> io::Result<()> {
        match self.failures.get_mut(&op) {
            Some((skip, _)) if *skip > 0 => {
                *skip -= 1;
                Ok(())
            }
            Some((_, n)) if *n > 0 => {
                *n -= 1;
                Err(io::Error::other(format!("injected failure of {op:?}")))
            }
            _ => Ok(()),
        }
    }

    fn open_fds(&self) -> u64 {
        self.fds_opened - self.fds_closed
    }

    fn drop_irq(&mut self, index: u32) {
        if let Some(fds) = self.irqs.remove(&index) {
            self.fds_closed += fds.len() as u64;
        }
        if index == irq::INTX && self.resample.take().is_some() {
            self.fds_closed += 1;
        }
    }
}

/// A device model behind [`VfioDeviceOps`] and [`DmaMapper`]: see the module
/// documentation. Share it as `Arc<RecordedVf>` with the primary (as both its
/// device and its mapper) and keep a clone to inspect.
#[derive(Debug)]
pub struct RecordedVf {
    spec: ModelSpec,
    state: Mutex<State>,
}

fn region_vec(spec: &ModelSpec) -> Vec<Vec<u8>> {
    let mut regions: Vec<Vec<u8>> = spec
        .bars
        .iter()
        .map(|b| {
            b.as_ref()
                .map_or_else(Vec::new, |b| vec![0; b.size as usize])
        })
        .collect();
    regions.push(spec.rom.clone());
    for &(bar, off, v) in &spec.bar_defaults {
        if let Some(r) = regions.get_mut(bar as usize) {
            let o = off as usize;
            if o + 4 <= r.len() {
                r[o..o + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    regions
}

impl RecordedVf {
    /// The Intel 82599 VF ([`ModelSpec::intel_82599_vf`]).
    pub fn intel_82599_vf() -> Self {
        Self::new(ModelSpec::intel_82599_vf())
    }

    /// A model of `spec`, recording from the start.
    pub fn new(spec: ModelSpec) -> Self {
        let state = State {
            config: spec.config.clone(),
            regions: region_vec(&spec),
            recording: true,
            ..State::default()
        };
        RecordedVf {
            spec,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Turns the event log on or off (benchmarks turn it off; counters keep
    /// counting).
    pub fn set_recording(&self, on: bool) {
        self.lock().recording = on;
    }

    /// Every call recorded so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Every call recorded so far; forgets them.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
    }

    /// Makes the next `times` calls of `op` fail.
    pub fn fail_next(&self, op: Op, times: u32) {
        self.fail_after(op, 0, times);
    }

    /// Lets `skip` calls of `op` through, then makes `times` fail.
    pub fn fail_after(&self, op: Op, skip: u32, times: u32) {
        self.lock().failures.insert(op, (skip, times));
    }

    /// Device resets so far.
    pub fn resets(&self) -> u64 {
        self.lock().resets
    }

    /// DMA maps and unmaps that succeeded so far.
    pub fn dma_counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.maps, s.unmaps)
    }

    /// The live DMA mappings as (iova, size, host address), by iova.
    pub fn mappings(&self) -> Vec<(u64, u64, u64)> {
        self.lock()
            .dma
            .iter()
            .map(|(&iova, &(size, host))| (iova, size, host))
            .collect()
    }

    /// Region reads and writes so far.
    pub fn region_accesses(&self) -> (u64, u64) {
        let s = self.lock();
        (s.region_reads, s.region_writes)
    }

    /// File descriptors the model holds now: the duplicates of every eventfd it
    /// was given (what the kernel holds for an enabled interrupt index).
    pub fn open_fds(&self) -> u64 {
        self.lock().open_fds()
    }

    /// File descriptors the model has duplicated and closed so far.
    pub fn fd_totals(&self) -> (u64, u64) {
        let s = self.lock();
        (s.fds_opened, s.fds_closed)
    }

    /// Vectors routed on interrupt index `index` now.
    pub fn routed(&self, index: u32) -> usize {
        self.lock().irqs.get(&index).map_or(0, Vec::len)
    }

    /// "The device" raises `vector` of interrupt index `index`: writes 1 to the
    /// eventfd routed there. Returns `false` when nothing is routed (or INTx is
    /// masked after firing and not yet unmasked or resampled).
    pub fn signal_irq(&self, index: u32, vector: usize) -> bool {
        let mut s = self.lock();
        if index == irq::INTX {
            // The kernel masks INTx when it fires; the resample eventfd or an
            // unmask reopens it.
            if s.resample.as_ref().is_some_and(|r| r.read().is_ok()) {
                s.intx_masked = false;
            }
            if s.intx_masked {
                return false;
            }
        }
        let sent = s
            .irqs
            .get(&index)
            .and_then(|fds| fds.get(vector))
            .is_some_and(|fd| fd.write(1).is_ok());
        if sent && index == irq::INTX {
            s.intx_masked = true;
        }
        sent
    }

    /// The config region's bytes as the host shows them now.
    pub fn config(&self) -> Vec<u8> {
        self.lock().config.clone()
    }

    /// A dword of region `index` (a BAR register of the device).
    pub fn region_u32(&self, index: u32, offset: u64) -> Option<u32> {
        let s = self.lock();
        let r = s.regions.get(index as usize)?;
        let o = usize::try_from(offset).ok()?;
        let b = r.get(o..o.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn region_len(&self, index: u32) -> Option<u64> {
        match index {
            region::CONFIG => Some(self.spec.config.len() as u64),
            i if i <= region::ROM => {
                let s = self.lock();
                let len = s.regions.get(i as usize).map_or(0, Vec::len) as u64;
                (len > 0).then_some(len)
            }
            _ => None,
        }
    }
}

/// The BAR the MSI-X table is in, from the capability list of `config`.
fn msix_bir(config: &[u8]) -> Option<u32> {
    let get = |o: usize| config.get(o).copied().unwrap_or(0);
    let mut ptr = (get(0x34) & 0xfc) as usize;
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        if get(ptr) == 0x11 {
            return Some((get(ptr + 4) & 7) as u32);
        }
        ptr = (get(ptr + 1) & 0xfc) as usize;
    }
    None
}

fn range(offset: u64, len: usize, size: u64) -> io::Result<std::ops::Range<usize>> {
    let end = offset
        .checked_add(len as u64)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset:#x} past the region's {size:#x}"),
            )
        })?;
    Ok(offset as usize..end as usize)
}

impl VfioDeviceOps for RecordedVf {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = self.region_len(index)?;
        let fd_offset = (index as u64) << 40; // VFIO_PCI_INDEX_TO_OFFSET
        Some(match index {
            region::CONFIG => RegionInfo {
                size,
                read: true,
                write: true,
                fd_offset,
                ..RegionInfo::default()
            },
            region::ROM => RegionInfo {
                size,
                read: true,
                fd_offset,
                ..RegionInfo::default()
            },
            i => {
                let bar = self.spec.bars.get(i as usize)?.as_ref()?;
                let holds_msix = msix_bir(&self.spec.config) == Some(i);
                RegionInfo {
                    size,
                    read: true,
                    write: true,
                    mmap: bar.mmap,
                    mmap_areas: bar.mmap_areas.clone(),
                    msix_mappable: holds_msix && self.spec.msix_mappable,
                    fd_offset,
                }
            }
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let size = self
            .region_len(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no region {index}")))?;
        let r = range(offset, data.len(), size)?;
        let mut s = self.lock();
        s.fail(Op::RegionRead)?;
        s.region_reads += 1;
        s.record(Event::RegionRead {
            index,
            offset,
            len: data.len(),
        });
        if index == region::CONFIG {
            data.copy_from_slice(&s.config[r]);
        } else {
            data.copy_from_slice(&s.regions[index as usize][r]);
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let size = self
            .region_len(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no region {index}")))?;
        let r = range(offset, data.len(), size)?;
        if index == region::ROM {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the ROM region is read-only",
            ));
        }
        let mut s = self.lock();
        s.fail(Op::RegionWrite)?;
        s.region_writes += 1;
        s.record(Event::RegionWrite {
            index,
            offset,
            data: data.to_vec(),
        });
        if index == region::CONFIG {
            for (i, &b) in r.zip(data) {
                let m = self.spec.config_wmask[i];
                s.config[i] = (s.config[i] & !m) | (b & m);
            }
            return Ok(());
        }
        for (i, &b) in r.zip(data) {
            let dword = (i as u64) & !3;
            let ro = self
                .spec
                .bar_read_only
                .iter()
                .any(|&(bar, off)| bar as u32 == index && off == dword);
            if !ro {
                s.regions[index as usize][i] = b;
            }
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = match index {
            irq::INTX => self.spec.intx as u32,
            irq::MSI => self.spec.msi_vectors,
            irq::MSIX => self.spec.msix_vectors,
            _ => 0,
        };
        (count > 0).then_some(IrqInfo {
            count,
            maskable: index == irq::INTX,
        })
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let count = self.irq_info(index).map_or(0, |i| i.count) as usize;
        if fds.is_empty() || fds.len() > count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "interrupt index {index} has {count} vectors, {} given",
                    fds.len()
                ),
            ));
        }
        let mut s = self.lock();
        s.fail(Op::EnableIrq)?;
        let dups = fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        s.drop_irq(index);
        s.fds_opened += dups.len() as u64;
        s.irqs.insert(index, dups);
        s.record(Event::EnableIrq {
            index,
            vectors: fds.len(),
        });
        if index == irq::INTX {
            s.intx_masked = false;
        }
        Ok(())
    }

    fn set_irq_resample(&self, index: u32, fd: &EventFd) -> io::Result<()> {
        if index != irq::INTX || !self.spec.intx {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only INTx has a resample eventfd",
            ));
        }
        let dup = fd.try_clone()?;
        let mut s = self.lock();
        if s.resample.replace(dup).is_some() {
            s.fds_closed += 1;
        }
        s.fds_opened += 1;
        s.record(Event::SetResample { index });
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        let mut s = self.lock();
        s.fail(Op::DisableIrq)?;
        s.drop_irq(index);
        s.record(Event::DisableIrq { index });
        Ok(())
    }

    fn unmask_irq(&self, index: u32) -> io::Result<()> {
        let mut s = self.lock();
        if index == irq::INTX {
            s.intx_masked = false;
        }
        s.record(Event::UnmaskIrq { index });
        Ok(())
    }

    fn reset(&self) -> io::Result<()> {
        let mut s = self.lock();
        s.fail(Op::Reset)?;
        s.resets += 1;
        s.record(Event::Reset);
        // A function-level reset: registers to their defaults, the command
        // register and the writable config bits cleared.
        s.regions = region_vec(&self.spec);
        for (i, &m) in self.spec.config_wmask.iter().enumerate() {
            s.config[i] = (s.config[i] & !m) | (self.spec.config[i] & m);
        }
        s.intx_masked = false;
        Ok(())
    }
}

impl DmaMapper for RecordedVf {
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let end = iova.checked_add(size).filter(|_| size > 0).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {size:#x} bytes at {iova:#x}"),
            )
        })?;
        let mut s = self.lock();
        s.fail(Op::DmaMap)?;
        let overlaps = s
            .dma
            .range(..end)
            .next_back()
            .is_some_and(|(&start, &(len, _))| start + len > iova);
        if overlaps {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{iova:#x}+{size:#x} overlaps a live mapping"),
            ));
        }
        s.dma.insert(iova, (size, host_addr));
        s.maps += 1;
        s.record(Event::DmaMap {
            iova,
            size,
            host_addr,
        });
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let mut s = self.lock();
        s.fail(Op::DmaUnmap)?;
        if s.dma.get(&iova).map(|m| m.0) != Some(size) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no mapping of {size:#x} bytes at {iova:#x}"),
            ));
        }
        s.dma.remove(&iova);
        s.unmaps += 1;
        s.record(Event::DmaUnmap { iova, size });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::regs;

    #[test]
    fn the_vf_as_vfio_shows_it() {
        let vf = RecordedVf::intel_82599_vf();
        let mut id = [0u8; 4];
        vf.region_read(region::CONFIG, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x10ed_8086);
        let bar0 = vf.region_info(0).unwrap();
        assert_eq!((bar0.size, bar0.mmap, bar0.fd_offset), (0x4000, true, 0));
        assert!(vf.region_info(1).is_none() && vf.region_info(2).is_none());
        assert!(vf.region_info(3).unwrap().msix_mappable);
        assert_eq!(vf.region_info(region::ROM).unwrap().size, 0x10000);
        assert_eq!(vf.irq_info(irq::MSIX).unwrap().count, 3);
        assert!(vf.irq_info(irq::INTX).is_none() && vf.irq_info(irq::MSI).is_none());
        assert_eq!(
            vf.region_u32(0, regs::VFLINKS),
            Some(regs::LINKS_UP | regs::LINKS_SPEED_10G)
        );
        // Read-only registers ignore writes; others keep them until reset.
        vf.region_write(0, regs::VFLINKS, &0u32.to_le_bytes())
            .unwrap();
        vf.region_write(0, regs::VTEIMS, &7u32.to_le_bytes())
            .unwrap();
        assert_eq!(vf.region_u32(0, regs::VTEIMS), Some(7));
        assert_ne!(vf.region_u32(0, regs::VFLINKS), Some(0));
        vf.reset().unwrap();
        assert_eq!(vf.region_u32(0, regs::VTEIMS), Some(0));
        assert!(vf.region_write(0, 0x3ffe, &[0; 4]).is_err());
        assert!(vf.region_write(region::ROM, 0, &[0]).is_err());
    }

    #[test]
    fn eventfds_are_kept_signalled_and_counted() {
        let vf = RecordedVf::intel_82599_vf();
        let fds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
            .collect();
        let refs: Vec<&EventFd> = fds.iter().collect();
        assert!(vf.enable_irq(irq::MSIX, &refs[..0]).is_err());
        vf.enable_irq(irq::MSIX, &refs).unwrap();
        assert_eq!((vf.open_fds(), vf.routed(irq::MSIX)), (3, 3));
        assert!(vf.signal_irq(irq::MSIX, 2));
        assert!(!vf.signal_irq(irq::MSIX, 3));
        assert_eq!(fds[2].read().unwrap(), 1);
        vf.enable_irq(irq::MSIX, &refs[..1]).unwrap();
        assert_eq!(vf.open_fds(), 1);
        vf.disable_irq(irq::MSIX).unwrap();
        assert_eq!((vf.open_fds(), vf.fd_totals()), (0, (4, 4)));
        assert!(!vf.signal_irq(irq::MSIX, 0));
    }

    #[test]
    fn dma_maps_refuse_overlaps_and_unknown_unmaps() {
        let vf = RecordedVf::intel_82599_vf();
        // SAFETY: the model never dereferences the host address.
        unsafe {
            vf.dma_map(0x1000, 0x1000, 0xdead_0000).unwrap();
            assert!(vf.dma_map(0x1800, 0x1000, 0).is_err());
            assert!(vf.dma_map(0, 0, 0).is_err());
            vf.dma_map(0x2000, 0x1000, 0xbeef_0000).unwrap();
        }
        assert!(vf.dma_unmap(0x1000, 0x800).is_err());
        vf.dma_unmap(0x1000, 0x1000).unwrap();
        assert_eq!(vf.mappings(), [(0x2000, 0x1000, 0xbeef_0000)]);
        assert_eq!(vf.dma_counts(), (2, 1));
        vf.fail_next(Op::DmaUnmap, 1);
        assert!(vf.dma_unmap(0x2000, 0x1000).is_err());
        vf.dma_unmap(0x2000, 0x1000).unwrap();
        assert!(vf.mappings().is_empty());
    }
}
