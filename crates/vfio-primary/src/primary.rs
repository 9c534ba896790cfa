//! [`VfioPrimary`]: a VFIO device as a [`PciFunction`].
//!
//! The guest sees the device's own config space except what the VMM must own
//! (see the `config` module's table); BARs are emulated registers over the
//! device's regions, split around the MSI-X table and PBA ([`MmapRange`]s for
//! the VMM to map, the rest trapped and forwarded); MSI and MSI-X are emulated
//! and routed to eventfds (see the `interrupts` module).
//!
//! Life cycle, as the failover coordinator drives it:
//!
//! 1. [`VfioPrimaryBuilder::build`] reads the device's config space once and
//!    lays out the virtualization. Nothing is mapped or routed yet.
//! 2. [`VfioPrimary::attach`] when the device is plugged: resets the device,
//!    DMA-maps every region of guest memory, and routes interrupts as the guest
//!    programs them.
//! 3. [`VfioPrimary::detach`] when the guest released it (unplugged): tears the
//!    routes down, resets the device (which stops its DMA), unmaps guest memory,
//!    and returns the guest-visible state to power-on, ready for the next plug.
//!
//! Attach and detach may alternate any number of times; mappings, eventfds
//! routed to the device, and file descriptors do not accumulate
//! ([`PrimaryCounters`] counts them).
//!
//! Migration: a primary with a `failover_pair_id` is unplugged before
//! migration and has no state to move; without one it blocks migration
//! ([`VfioPrimary::migration_blocker`]), as QEMU's vfio-pci does.

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestMemoryBackend;
use vmm_pci::config::{CAP_ID_MSI, CAP_ID_MSIX, COMMAND, PCIE_CONFIG_SIZE, access_ok};
use vmm_pci::{
    BarKind, BarMove, BarRegion, BarRegions, ConfigSpace, IntxSink, MsiSink, PciFunction,
};
use vmm_sys_util::eventfd::EventFd;

use crate::bars::{self, BarLayout, MmapRange, Target};
use crate::config::{self, HiddenCapability, HostCaps, Layout, Owner, pieces};
use crate::dma::DmaMappings;
use crate::interrupts::{self, Interrupts, IrqCounters, msi_vectors, msix_placement};
use crate::ops::{DmaMapper, VfioDeviceOps, region};
use crate::rom::{self, ROM_BAR, RomBar, RomPolicy, RomWindow};

/// Errors building, attaching and detaching a primary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device's config space could not be read or laid out.
    #[error("vfio-primary '{id}': config space")]
    Config {
        /// The primary's id.
        id: String,
        /// What went wrong.
        #[source]
        source: config::Error,
    },
    /// The device's BARs could not be described.
    #[error("vfio-primary '{id}': BARs")]
    Bars {
        /// The primary's id.
        id: String,
        /// What went wrong.
        #[source]
        source: bars::Error,
    },
    /// The expansion ROM chosen with [`VfioPrimaryBuilder::rom`] could not be
    /// prepared.
    #[error("vfio-primary '{id}': expansion ROM")]
    Rom {
        /// The primary's id.
        id: String,
        /// What went wrong.
        #[source]
        source: rom::Error,
    },
    /// The interrupt emulation could not be set up.
    #[error("vfio-primary '{id}': interrupts")]
    Interrupts {
        /// The primary's id.
        id: String,
        /// What went wrong.
        #[source]
        source: interrupts::Error,
    },
    /// `attach` on a primary that is attached, or whose last detach left
    /// mappings behind.
    #[error(
        "vfio-primary '{id}' is already attached ({mappings} DMA mappings live): detach it first, and retry a detach that failed"
    )]
    AlreadyAttached {
        /// The primary's id.
        id: String,
        /// Mappings still live.
        mappings: usize,
    },
    /// `VFIO_DEVICE_RESET` failed.
    #[error(
        "vfio-primary '{id}': resetting the device failed; it may be wedged: unbind and rebind vfio-pci, or reset its slot"
    )]
    Reset {
        /// The primary's id.
        id: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Mapping guest memory for DMA failed; what was mapped before is unmapped.
    #[error(
        "vfio-primary '{id}': DMA-mapping guest memory failed after {mapped} of {regions} regions (those were unmapped again); \
         check that guest memory is mmapped (GuestMemoryMmap), that no other device of the container mapped it already, \
         and vfio_iommu_type1's dma_entry_limit"
    )]
    DmaMap {
        /// The primary's id.
        id: String,
        /// Regions of guest memory.
        regions: usize,
        /// Regions mapped before the failure.
        mapped: usize,
        /// What the mapper said.
        #[source]
        source: io::Error,
    },
    /// Unmapping failed; the failed ranges stay recorded (and their memory
    /// mapped) so another `detach` can retry them.
    #[error(
        "vfio-primary '{id}': {remaining} DMA mappings could not be unmapped; their guest memory stays mapped: retry detach"
    )]
    DmaUnmap {
        /// The primary's id.
        id: String,
        /// Mappings left.
        remaining: usize,
        /// The first failure.
        #[source]
        source: io::Error,
    },
}

/// What a primary counted since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrimaryCounters {
    /// Malformed config accesses (not 1, 2 or 4 bytes within a dword, or past
    /// 4096): read as all ones, writes dropped.
    pub ignored_config: u64,
    /// Malformed BAR accesses (no such BAR, a size other than 1, 2, 4 or 8,
    /// past the end, straddling the MSI-X table or PBA, or malformed table and
    /// PBA accesses), and ROM window reads while it does not decode: read as
    /// all ones, writes dropped.
    pub ignored_bar: u64,
    /// Reads of the ROM window served from the ROM image.
    pub rom_reads: u64,
    /// Writes to the ROM window (dropped: a ROM is read-only).
    pub rom_writes: u64,
    /// Config or BAR accesses the device refused (VFIO returned an error):
    /// reads return all ones.
    pub device_errors: u64,
    /// BAR accesses forwarded to the device's regions (not mmapped).
    pub trapped: u64,
    /// Successful attaches.
    pub attaches: u64,
    /// Successful detaches.
    pub detaches: u64,
    /// Device resets requested (attach and detach each reset).
    pub resets: u64,
    /// DMA maps made.
    pub dma_maps: u64,
    /// DMA unmaps made.
    pub dma_unmaps: u64,
    /// DMA mappings live now.
    pub live_mappings: u64,
    /// Eventfds this primary holds now (one per MSI-X and MSI vector, two for
    /// INTx; constant for its life).
    pub live_eventfds: u64,
    /// Interrupts.
    pub irq: IrqCounters,
}

struct Attachment {
    mappings: DmaMappings,
    /// The guest memory the mappings point into: vm-memory regions stay mapped
    /// while a clone of the collection lives.
    memory: Box<dyn Any + Send + Sync>,
    /// Earlier memory maps still backing some mapping after a failed
    /// [`VfioPrimary::update_memory`].
    retired: Vec<Box<dyn Any + Send + Sync>>,
}

/// Builds a [`VfioPrimary`].
pub struct VfioPrimaryBuilder {
    id: String,
    device: Arc<dyn VfioDeviceOps>,
    mapper: Arc<dyn DmaMapper>,
    msi: Arc<dyn MsiSink>,
    intx: Option<Arc<dyn IntxSink>>,
    failover_pair_id: Option<String>,
    page_size: Option<u64>,
    rom: RomPolicy,
}

impl std::fmt::Debug for VfioPrimaryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPrimaryBuilder")
            .field("id", &self.id)
            .field("failover_pair_id", &self.failover_pair_id)
            .finish_non_exhaustive()
    }
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; it touches no
    // memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

impl VfioPrimaryBuilder {
    /// A primary over the host function at `sysfs_path`
    /// (`/sys/bus/pci/devices/0000:3b:02.1`): checks that its IOMMU group is
    /// viable and that it is bound to vfio-pci (naming every device in the way),
    /// opens it in a new VFIO container through `vfio-ioctls`, and uses that
    /// container for DMA. For several functions in one container, open them
    /// with [`KernelContainer::open_device`](crate::KernelContainer::open_device)
    /// and use [`new`](Self::new).
    pub fn from_sysfs(
        id: impl Into<String>,
        sysfs_path: impl AsRef<std::path::Path>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, crate::kernel::Error> {
        let (container, device) = crate::kernel::open(sysfs_path)?;
        Ok(Self::new(id, Arc::new(device), Arc::new(container), msi))
    }

    /// A primary named `id` (QEMU's `-device vfio-pci,id=...`) over `device`,
    /// mapping guest memory through `mapper` (the device's container) and
    /// delivering MSI and MSI-X through `msi` (the VMM's interrupt routing: an
    /// irqfd per vector, see [`VfioPrimary::msix_eventfd`]).
    pub fn new(
        id: impl Into<String>,
        device: Arc<dyn VfioDeviceOps>,
        mapper: Arc<dyn DmaMapper>,
        msi: Arc<dyn MsiSink>,
    ) -> Self {
        VfioPrimaryBuilder {
            id: id.into(),
            device,
            mapper,
            msi,
            intx: None,
            failover_pair_id: None,
            page_size: None,
            rom: RomPolicy::Hidden,
        }
    }

    /// Pairs the primary with the virtio-net standby whose device id is
    /// `standby` (QEMU's `failover_pair_id`): it is unplugged before migration
    /// instead of blocking it. Validate the pair with
    /// [`FailoverPair::validate`](crate::FailoverPair::validate).
    pub fn failover_pair_id(mut self, standby: impl Into<String>) -> Self {
        self.failover_pair_id = Some(standby.into());
        self
    }

    /// Where INTx goes, for a device that has it (an SR-IOV VF does not).
    pub fn intx(mut self, sink: Arc<dyn IntxSink>) -> Self {
        self.intx = Some(sink);
        self
    }

    /// The host page size the BARs are split at. Default: the running
    /// system's.
    pub fn page_size(mut self, bytes: u64) -> Self {
        self.page_size = Some(bytes);
        self
    }

    /// What the guest sees of the expansion ROM (QEMU's `rombar=` and
    /// `romfile=`). Default: [`RomPolicy::Hidden`], no ROM. With
    /// [`RomPolicy::Device`] or [`RomPolicy::Image`] the ROM register is
    /// emulated and its window served from the image: route the window
    /// ([`VfioPrimary::rom_window`]) to `read_bar(ROM_BAR, ..)`. A failover
    /// primary that shows a ROM must show the same one on both sides of a
    /// migration (see the `config` module's table).
    pub fn rom(mut self, policy: RomPolicy) -> Self {
        self.rom = policy;
        self
    }

    /// Reads the device's config space and lays out the virtualization.
    pub fn build(self) -> Result<VfioPrimary, Error> {
        let id = self.id;
        let dev = self.device;
        let host = config::read_host_config(&*dev).map_err(|source| Error::Config {
            id: id.clone(),
            source,
        })?;
        let caps = HostCaps::parse(&host);
        let msix = caps.find(CAP_ID_MSIX);
        let msi = caps
            .find(CAP_ID_MSI)
            .filter(|&cap| msi_vectors(&host, cap).is_some());
        let placement = msix.map(|cap| msix_placement(&host, cap).1);
        let page = self.page_size.unwrap_or_else(host_page_size);
        let bars = BarLayout::new(&*dev, &host, placement, page).map_err(|source| Error::Bars {
            id: id.clone(),
            source,
        })?;
        let rom = rom::load(&self.rom, &*dev).map_err(|source| Error::Rom {
            id: id.clone(),
            source,
        })?;
        let layout = Layout::new(&host, &caps, msi, msix, rom.is_some());
        let shadow = config::shadow(&host, &bars).map_err(|source| Error::Config {
            id: id.clone(),
            source,
        })?;
        let live_fds = Arc::new(AtomicU64::new(0));
        let irqs = Interrupts::new(
            dev.clone(),
            self.msi,
            self.intx,
            &host,
            (msix, msi),
            &live_fds,
        )
        .map_err(|source| Error::Interrupts {
            id: id.clone(),
            source,
        })?;
        for h in layout.hidden() {
            log::info!(
                "vfio-primary '{id}': hiding {} capability {:#x} at {:#x}: {}",
                if h.extended { "extended" } else { "standard" },
                h.id,
                h.offset,
                h.reason
            );
        }
        Ok(VfioPrimary {
            id,
            failover_pair_id: self.failover_pair_id,
            dev,
            mapper: self.mapper,
            host,
            layout,
            bars,
            shadow,
            irqs,
            page,
            attachment: None,
            mmap: Vec::new(),
            mmap_generation: 0,
            rom,
            rom_window: None,
            rom_generation: 0,
            live_fds,
            counters: PrimaryCounters::default(),
            last_unmap_error: None,
        })
    }
}

/// A VFIO device (typically an SR-IOV VF) as a PCI function. See the module
/// documentation.
pub struct VfioPrimary {
    id: String,
    failover_pair_id: Option<String>,
    dev: Arc<dyn VfioDeviceOps>,
    mapper: Arc<dyn DmaMapper>,
    host: Vec<u8>,
    layout: Layout,
    bars: BarLayout,
    shadow: ConfigSpace,
    irqs: Interrupts,
    page: u64,
    attachment: Option<Attachment>,
    mmap: Vec<MmapRange>,
    mmap_generation: u64,
    rom: Option<RomBar>,
    rom_window: Option<RomWindow>,
    rom_generation: u64,
    live_fds: Arc<AtomicU64>,
    counters: PrimaryCounters,
    last_unmap_error: Option<io::Error>,
}

impl std::fmt::Debug for VfioPrimary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPrimary")
            .field("id", &self.id)
            .field("failover_pair_id", &self.failover_pair_id)
            .field("attached", &self.attachment.is_some())
            .field("layout", &self.layout)
            .field("irqs", &self.irqs)
            .finish_non_exhaustive()
    }
}

impl VfioPrimary {
    /// The primary's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The standby it is paired with, if any.
    pub fn failover_pair_id(&self) -> Option<&str> {
        self.failover_pair_id.as_deref()
    }

    /// Why the VM cannot be migrated with this device, or `None` when it can:
    /// a primary with a `failover_pair_id` is unplugged before migration.
    pub fn migration_blocker(&self) -> Option<String> {
        match self.failover_pair_id {
            Some(_) => None,
            None => Some(format!(
                "VFIO device doesn't support migration: '{}' is passed through without a failover_pair_id; \
                 pair it with its virtio-net standby (failover_pair_id) so it is unplugged before migration, or unplug it",
                self.id
            )),
        }
    }

    /// The capabilities the guest does not see, and why.
    pub fn hidden_capabilities(&self) -> &[HiddenCapability] {
        self.layout.hidden()
    }

    /// Whether guest memory is mapped for the device.
    pub fn is_attached(&self) -> bool {
        self.attachment.is_some()
    }

    /// Counters since the primary was built.
    pub fn counters(&self) -> PrimaryCounters {
        let mut c = self.counters;
        c.live_mappings = self
            .attachment
            .as_ref()
            .map_or(0, |a| a.mappings.mapped().len()) as u64;
        c.live_eventfds = self.live_fds.load(Ordering::Relaxed);
        c.irq = self.irqs.counters();
        c.ignored_bar += self.irqs.msix_ignored();
        c
    }

    fn reset_device(&mut self) -> Result<(), Error> {
        self.counters.resets += 1;
        self.dev.reset().map_err(|source| Error::Reset {
            id: self.id.clone(),
            source,
        })
    }

    /// Plugged: resets the device, DMA-maps every region of `mem` at its guest
    /// physical address, and starts routing interrupts as the guest programs
    /// them. A clone of `mem` is kept until [`detach`](Self::detach), so the
    /// memory stays mapped while the device may reach it.
    ///
    /// On a failed map, what was mapped is unmapped and the error returned.
    pub fn attach<M>(&mut self, mem: &M) -> Result<(), Error>
    where
        M: GuestMemoryBackend + Clone + Send + Sync + 'static,
    {
        if let Some(a) = &self.attachment {
            return Err(Error::AlreadyAttached {
                id: self.id.clone(),
                mappings: a.mappings.mapped().len(),
            });
        }
        self.reset_device()?;
        let memory = mem.clone();
        let mut mappings = DmaMappings::new();
        // SAFETY: `memory` holds every region of the map (vm-memory regions are
        // reference-counted and unmapped when the last reference drops) and is
        // kept in the attachment until every range mapped here is unmapped:
        // `detach` and `drop` unmap before releasing it, and keep it (forever, in
        // `drop`) when an unmap fails. Guest memory is reached only through
        // vm-memory's volatile accesses and raw pointers, never references, so
        // the device writing it at any time breaks no aliasing rule; the VMM must
        // keep it that way, as `DmaMapper::dma_map` requires.
        let result = unsafe { mappings.map_all(&*self.mapper, &memory) };
        let mapped = mappings.mapped().len();
        self.counters.dma_maps += mapped as u64;
        let attachment = Attachment {
            mappings,
            memory: Box::new(memory),
            retired: Vec::new(),
        };
        if let Err(source) = result {
            if let Some(left) = self.unmap(attachment) {
                // Could not roll back: keep the memory (and the record) so a
                // detach can retry.
                self.attachment = Some(left);
            }
            return Err(Error::DmaMap {
                id: self.id.clone(),
                regions: mem.num_regions(),
                mapped,
                source,
            });
        }
        self.attachment = Some(attachment);
        self.irqs.set_active(true);
        self.counters.attaches += 1;
        Ok(())
    }

    /// The VMM's memory map changed (memory hot-plug, a region resized): makes
    /// the DMA mappings those of `mem`. Regions in both maps stay mapped and
    /// DMA to them goes on; removed ones are unmapped, new ones mapped. A clone
    /// of `mem` replaces the one kept since [`attach`](Self::attach). On a
    /// primary that is not attached this does nothing: the next `attach` maps
    /// the map it is given.
    pub fn update_memory<M>(&mut self, mem: &M) -> Result<(), Error>
    where
        M: GuestMemoryBackend + Clone + Send + Sync + 'static,
    {
        let Some(mut a) = self.attachment.take() else {
            return Ok(());
        };
        let before: Vec<(u64, u64)> = a.mappings.mapped().to_vec();
        let memory = mem.clone();
        // SAFETY: as in `attach`: `memory` keeps every region of the new map
        // alive and is stored in the attachment below, whatever the outcome,
        // so every range mapped here stays backed until it is unmapped; the old
        // map is kept alongside until then (`old` below) for the ranges that
        // stay mapped from it. Guest memory is reached only through
        // vm-memory's volatile accesses and raw pointers.
        let result = unsafe { a.mappings.update(&*self.mapper, &memory) };
        let after = a.mappings.mapped();
        self.counters.dma_maps += after.iter().filter(|m| !before.contains(m)).count() as u64;
        self.counters.dma_unmaps += before.iter().filter(|m| !after.contains(m)).count() as u64;
        let old = std::mem::replace(&mut a.memory, Box::new(memory));
        a.retired.push(old);
        if result.is_ok() {
            // Every mapping now points into the new map only.
            a.retired.clear();
        }
        self.attachment = Some(a);
        result.map_err(|source| Error::DmaMap {
            id: self.id.clone(),
            regions: mem.num_regions(),
            mapped: self
                .attachment
                .as_ref()
                .map_or(0, |a| a.mappings.mapped().len()),
            source,
        })
    }

    /// Unmaps what `a` maps; returns it with what could not be unmapped (the
    /// first error kept for the caller), or `None` when everything was.
    fn unmap(&mut self, mut a: Attachment) -> Option<Attachment> {
        let before = a.mappings.mapped().len();
        let result = a.mappings.unmap_all(&*self.mapper);
        self.counters.dma_unmaps += (before - a.mappings.mapped().len()) as u64;
        match result {
            Ok(()) => None,
            Err(e) => {
                log::warn!("vfio-primary '{}': unmapping guest memory: {e}", self.id);
                self.last_unmap_error = Some(e);
                Some(a)
            }
        }
    }

    /// Unplugged: tears interrupt routes down, resets the device (stopping its
    /// DMA), unmaps guest memory, and returns what the guest sees to power-on
    /// (BARs unassigned, decoding off, MSI and MSI-X disabled). Safe to call on
    /// a primary that is not attached (it still quiesces and resets).
    pub fn detach(&mut self) -> Result<(), Error> {
        self.irqs.reset();
        let reset = self.reset_device();
        if let Some(a) = self.attachment.take() {
            if let Some(left) = self.unmap(a) {
                let remaining = left.mappings.mapped().len();
                self.attachment = Some(left);
                let source = self
                    .last_unmap_error
                    .take()
                    .unwrap_or_else(|| io::Error::other("unmap failed"));
                return Err(Error::DmaUnmap {
                    id: self.id.clone(),
                    remaining,
                    source,
                });
            }
        }
        // Rebuilding the shadow succeeded at build; it cannot fail now.
        if let Ok(fresh) = config::shadow(&self.host, &self.bars) {
            self.shadow = fresh;
        }
        if let Some(r) = &mut self.rom {
            r.reset();
        }
        self.refresh_mmap();
        reset?;
        self.counters.detaches += 1;
        Ok(())
    }

    /// The parts of the BARs the VMM may mmap into the guest now (decoding
    /// BARs only; the MSI-X table and PBA pages are never in them). Recomputed
    /// whenever the guest moves a BAR or turns decoding on or off; compare
    /// [`mmap_generation`](Self::mmap_generation) to know when to remap.
    pub fn mmap_ranges(&self) -> &[MmapRange] {
        &self.mmap
    }

    /// Bumped every time [`mmap_ranges`](Self::mmap_ranges) changes.
    pub fn mmap_generation(&self) -> u64 {
        self.mmap_generation
    }

    fn refresh_mmap(&mut self) {
        let r = self.bars.mmap_ranges(&self.shadow.bar_regions(), self.page);
        if r != self.mmap {
            self.mmap = r;
            self.mmap_generation += 1;
        }
        let w = self
            .rom
            .as_ref()
            .and_then(|r| r.window(self.shadow.command()));
        if w != self.rom_window {
            self.rom_window = w;
            self.rom_generation += 1;
        }
    }

    /// Where the expansion ROM's window decodes now, or `None` (no ROM shown,
    /// or the guest has not enabled it with Memory Space on and an address).
    /// The VMM traps this range (it is never mmapped) and routes each access
    /// to [`PciFunction::read_bar`] / [`PciFunction::write_bar`] with BAR
    /// [`ROM_BAR`] and the offset into the window; `vmm_pci::PciRoot` does
    /// so itself ([`PciFunction::rom_region`]).
    /// Recomputed on every config write and on detach; compare
    /// [`rom_generation`](Self::rom_generation) to know when to re-route.
    pub fn rom_window(&self) -> Option<RomWindow> {
        self.rom_window
    }

    /// Bumped every time [`rom_window`](Self::rom_window) changes.
    pub fn rom_generation(&self) -> u64 {
        self.rom_generation
    }

    /// The size of the ROM the guest sees, or `None` when it is hidden.
    pub fn rom_size(&self) -> Option<u64> {
        self.rom.as_ref().map(RomBar::size)
    }

    fn read_rom(&mut self, offset: u64, data: &mut [u8]) {
        let served = match (&self.rom, self.rom_window) {
            (Some(r), Some(_)) => r.read(offset, data),
            _ => false,
        };
        if served {
            self.counters.rom_reads += 1;
        } else {
            data.fill(0xff);
            self.counters.ignored_bar += 1;
        }
    }

    /// The eventfd MSI-X vector `vector` signals (register it as an irqfd;
    /// route it as [`MsiSink::update_route`] says). Valid for the primary's
    /// life.
    pub fn msix_eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqs.msix_eventfd(vector)
    }

    /// The eventfd MSI vector `vector` signals.
    pub fn msi_eventfd(&self, vector: u8) -> Option<&EventFd> {
        self.irqs.msi_eventfd(vector)
    }

    /// INTx's trigger and resample eventfds (KVM_IRQFD with
    /// KVM_IRQFD_FLAG_RESAMPLE), for a device with INTx.
    pub fn intx_eventfds(&self) -> Option<(&EventFd, &EventFd)> {
        self.irqs.intx_eventfds()
    }

    /// Reads the routed eventfds and delivers what fired through the sinks
    /// (held pending while masked). Call it when an eventfd the VMM does not
    /// hand to KVM is readable: masked vectors', or all of them without
    /// irqfds. Returns the signals seen.
    pub fn service_interrupts(&mut self) -> u64 {
        self.irqs.service()
    }

    /// INTx end of interrupt, for a VMM without KVM's resampler: deasserts the
    /// line and unmasks the device's.
    pub fn intx_eoi(&mut self) {
        self.irqs.intx_eoi()
    }

    fn read_device(&mut self, at: usize, out: &mut [u8]) {
        let emulated = (0..out.len()).all(|k| self.layout.overlay(at + k).0 == 0xff);
        if !emulated {
            if at + out.len() > self.host.len() {
                out.fill(0);
            } else if let Err(e) = self.dev.region_read(region::CONFIG, at as u64, out) {
                log::debug!("vfio-primary '{}': config read at {at:#x}: {e}", self.id);
                out.fill(0xff);
                self.counters.device_errors += 1;
            }
        }
        for (k, b) in out.iter_mut().enumerate() {
            let (m, v) = self.layout.overlay(at + k);
            *b = (*b & !m) | (v & m);
        }
    }

    fn write_device(&mut self, at: usize, data: &[u8]) {
        // Bytes emulated whole are dropped; the rest go to the device.
        let mut k = 0;
        while k < data.len() {
            if self.layout.overlay(at + k).0 == 0xff || at + k >= self.host.len() {
                k += 1;
                continue;
            }
            let start = k;
            while k < data.len()
                && self.layout.overlay(at + k).0 != 0xff
                && at + k < self.host.len()
            {
                k += 1;
            }
            for (p, n) in pieces(at + start, k - start) {
                let bytes = &data[p - at..p - at + n];
                if let Err(e) = self.dev.region_write(region::CONFIG, p as u64, bytes) {
                    log::debug!("vfio-primary '{}': config write at {p:#x}: {e}", self.id);
                    self.counters.device_errors += 1;
                }
            }
        }
    }
}

impl Drop for VfioPrimary {
    fn drop(&mut self) {
        self.irqs.reset();
        if let Some(a) = self.attachment.take() {
            let _ = self.dev.reset();
            if let Some(left) = self.unmap(a) {
                // The device may still reach this memory: never unmap it.
                std::mem::forget(left.memory);
            }
        }
    }
}

impl PciFunction for VfioPrimary {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        if !access_ok(offset, data.len(), PCIE_CONFIG_SIZE) {
            data.fill(0xff);
            self.counters.ignored_config += 1;
            return;
        }
        let o = offset as usize;
        if o >= self.layout.size() as usize {
            data.fill(0xff);
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let owner = self.layout.owner(o + i);
            let mut j = i + 1;
            while j < data.len() && self.layout.owner(o + j) == owner {
                j += 1;
            }
            match owner {
                Owner::Device => self.read_device(o + i, &mut data[i..j]),
                Owner::Rom => {
                    let at = o + i - config::ROM_ADDRESS as usize;
                    for (k, b) in data[i..j].iter_mut().enumerate() {
                        *b = self.rom.as_ref().map_or(0, |r| r.register_byte(at + k));
                    }
                }
                Owner::Shadow => {
                    for (k, b) in data[i..j].iter_mut().enumerate() {
                        *b = self.shadow.get_u8((o + i + k) as u16);
                    }
                }
                Owner::Msi | Owner::Msix => {
                    let cap = if owner == Owner::Msi {
                        self.layout.msi()
                    } else {
                        self.layout.msix()
                    }
                    .unwrap_or(0) as usize;
                    for (k, b) in data[i..j].iter_mut().enumerate() {
                        let rel = (o + i + k).saturating_sub(cap) as u16;
                        *b = if owner == Owner::Msi {
                            self.irqs.msi_cap_byte(rel)
                        } else {
                            self.irqs.msix_cap_byte(rel)
                        };
                    }
                }
            }
            i = j;
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        if !access_ok(offset, data.len(), PCIE_CONFIG_SIZE) {
            self.counters.ignored_config += 1;
            return None;
        }
        let o = offset as usize;
        if o >= self.layout.size() as usize {
            return None;
        }
        let mut moved = None;
        let mut command = false;
        let mut i = 0;
        while i < data.len() {
            let owner = self.layout.owner(o + i);
            let mut j = i + 1;
            while j < data.len() && self.layout.owner(o + j) == owner {
                j += 1;
            }
            let run = &data[i..j];
            match owner {
                Owner::Device => {
                    self.write_device(o + i, run);
                    // The shadow mirrors the command register: it decides what
                    // decodes, and Bus Master gates MSI.
                    for (k, &b) in run.iter().enumerate() {
                        let at = (o + i + k) as u16;
                        if at == COMMAND || at == COMMAND + 1 {
                            self.shadow.write(at, &[b]);
                            command = true;
                        }
                    }
                }
                Owner::Rom => {
                    let at = o + i - config::ROM_ADDRESS as usize;
                    if let Some(r) = &mut self.rom {
                        r.write_register(at, run);
                    }
                }
                Owner::Shadow => {
                    for (p, n) in pieces(o + i, j - i) {
                        if let Some(m) = self.shadow.write(p as u16, &data[p - o..p - o + n]) {
                            moved = Some(m);
                        }
                    }
                }
                Owner::Msi | Owner::Msix => {
                    let cap = if owner == Owner::Msi {
                        self.layout.msi()
                    } else {
                        self.layout.msix()
                    }
                    .unwrap_or(0) as usize;
                    for (p, n) in pieces(o + i, j - i) {
                        let rel = p.saturating_sub(cap) as u16;
                        let bytes = &data[p - o..p - o + n];
                        if owner == Owner::Msi {
                            self.irqs.write_msi_cap(rel, bytes);
                        } else {
                            self.irqs.write_msix_cap(rel, bytes);
                        }
                    }
                }
            }
            i = j;
        }
        if command {
            self.irqs.command_written(self.shadow.command());
        }
        self.refresh_mmap();
        moved
    }

    fn bar_regions(&self) -> BarRegions {
        self.shadow.bar_regions()
    }

    fn rom_region(&self) -> Option<BarRegion> {
        self.rom_window.map(|w| BarRegion {
            index: ROM_BAR,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            address: w.guest_address,
            size: w.size,
        })
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == ROM_BAR && self.rom.is_some() {
            return self.read_rom(offset, data);
        }
        match self.bars.target(bar, offset, data.len()) {
            None => {
                data.fill(0xff);
                self.counters.ignored_bar += 1;
            }
            Some(Target::Table(rel)) => self.irqs.read_table(rel, data),
            Some(Target::Pba(rel)) => self.irqs.read_pba(rel, data),
            Some(Target::Device) => {
                self.counters.trapped += 1;
                if let Err(e) = self
                    .dev
                    .region_read(region::BAR0 + bar as u32, offset, data)
                {
                    log::debug!(
                        "vfio-primary '{}': BAR {bar} read at {offset:#x}: {e}",
                        self.id
                    );
                    data.fill(0xff);
                    self.counters.device_errors += 1;
                }
            }
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == ROM_BAR && self.rom.is_some() {
            self.counters.rom_writes += 1;
            return;
        }
        match self.bars.target(bar, offset, data.len()) {
            None => self.counters.ignored_bar += 1,
            Some(Target::Table(rel)) => self.irqs.write_table(rel, data),
            Some(Target::Pba(rel)) => self.irqs.write_pba(rel, data),
            Some(Target::Device) => {
                self.counters.trapped += 1;
                if let Err(e) = self
                    .dev
                    .region_write(region::BAR0 + bar as u32, offset, data)
                {
                    log::debug!(
                        "vfio-primary '{}': BAR {bar} write at {offset:#x}: {e}",
                        self.id
                    );
                    self.counters.device_errors += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
