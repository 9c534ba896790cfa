//! The default implementation of the crate's kernel boundary, over
//! `vfio-ioctls` and the kernel's vfio-pci driver (legacy container/group
//! interface):
//!
//! - [`KernelContainer`] is a VFIO container (`/dev/vfio/vfio`, type1v2 IOMMU)
//!   and implements [`DmaMapper`];
//! - [`KernelVfioDevice`] is one function opened through its group
//!   (`/dev/vfio/<group>`) and implements [`VfioDeviceOps`];
//! - [`open`] builds both from a function's sysfs path.
//!
//! Before anything under `/dev/vfio` is opened, the function's sysfs directory is
//! checked ([`crate::sysfs`]): the IOMMU group must be viable and the function
//! bound to vfio-pci, and the errors name the devices to rebind. Then
//! `/dev/vfio/vfio` and `/dev/vfio/<group>` must exist ([`Error::VfioUnavailable`],
//! [`Error::GroupUnavailable`]).
//!
//! What is read from where, once open: region and interrupt information come
//! from `VFIO_DEVICE_GET_REGION_INFO`/`GET_IRQ_INFO` (read once by
//! `vfio_ioctls::VfioDevice::new`); region contents are read and written with
//! `pread`/`pwrite` on the device fd at the region's offset; interrupts go
//! through `VFIO_DEVICE_SET_IRQS`; reset is `VFIO_DEVICE_RESET`; DMA mappings are
//! `VFIO_IOMMU_MAP_DMA`/`UNMAP_DMA` on the container.
//!
//! Three calls bypass `vfio-ioctls` because it drops their errors (its
//! `region_read`, `region_write` and `reset` return nothing); [`VfioDeviceOps`]
//! reports them: region accesses use a duplicate of the device fd, and reset
//! issues the ioctl itself.
//!
//! # iommufd (not implemented here)
//!
//! This module uses only the legacy container/group interface. `vfio-ioctls`
//! 0.10 also supports iommufd with VFIO device cdevs, behind its optional
//! `vfio_cdev` feature (off in this workspace; it pulls in `iommufd-bindings`
//! 0.2 and `iommufd-ioctls` 0.4, and the `kvm` feature):
//!
//! - `vfio_ioctls::VfioIommufd::new(iommufd, ioas, device_fd)` takes an open
//!   `/dev/iommu` (`iommufd_ioctls::IommuFd`), an optional IOAS (one is
//!   allocated otherwise) and the optional hypervisor VFIO device; it
//!   implements `VfioOps`, and its `vfio_dma_map`/`vfio_dma_unmap` are
//!   `IOMMU_IOAS_MAP` (readable, writeable, fixed IOVA) and `IOMMU_IOAS_UNMAP`
//!   on that IOAS;
//! - `VfioDevice::new(sysfs_path, ops, attach_ioas)` with a `VfioIommufd` as
//!   `ops` opens the device cdev named under `<sysfs_path>/vfio-dev/`
//!   (`/dev/vfio/devices/vfioN`), adds it to the hypervisor VFIO device, binds
//!   it to the iommufd (`VFIO_DEVICE_BIND_IOMMUFD`) and, with `attach_ioas`,
//!   attaches it to the IOAS (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`). No group file
//!   and no `/dev/vfio/vfio` are opened.
//!
//! What a VMM needs for it: a kernel with `CONFIG_IOMMUFD` and
//! `CONFIG_VFIO_DEVICE_CDEV` (device cdevs appeared in Linux 6.6), access to
//! `/dev/iommu` and `/dev/vfio/devices/vfioN`, the function bound to vfio-pci
//! (the kernel still claims DMA ownership of the whole IOMMU group, so the
//! group must be viable as [`crate::sysfs`] checks), and the `vfio_cdev`
//! feature enabled in the workspace's `vfio-ioctls` dependency.
//!
//! Whether this module could use it: yes, without changing the traits above
//! it. [`KernelVfioDevice`] wraps a `vfio_ioctls::VfioDevice` whatever its
//! `VfioOps`, and reads regions, routes interrupts and resets through the
//! device fd alone, which a cdev is too. What it would take is a second
//! [`DmaMapper`] over `VfioIommufd` (next to [`KernelContainer`]) and an
//! opening path that finds the cdev instead of `/dev/vfio/<group>`. Neither is
//! written: nothing here can be tested without iommufd hardware.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::sysfs::{self, IommuGroup, PciIds, PciSysfsDevice};
use crate::{DmaMapper, IrqInfo, RegionInfo, VfioDeviceOps, region};

/// The VFIO container device, opened for every container.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// Where the kernel puts VFIO group files (`/dev/vfio/<group>`).
pub const VFIO_DEV_DIR: &str = "/dev/vfio";

// From <linux/vfio.h>: struct vfio_region_info flags, struct vfio_irq_info flags.
const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;

mod ioctls {
    // _IO(VFIO_TYPE, VFIO_BASE + 11), <linux/vfio.h>.
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, 0x3b, 100 + 11);
}

/// Errors from setting up VFIO.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The function's sysfs directory says VFIO cannot use it (IOMMU off, group
    /// not viable, function not bound to vfio-pci, ...).
    #[error(transparent)]
    Sysfs(#[from] sysfs::Error),

    /// There is no `/dev/vfio/vfio`: VFIO is not loaded on this host.
    #[error(
        "VFIO is not available: {} does not exist; load vfio-pci (`modprobe vfio-pci`) \
         on a host with the IOMMU enabled",
        .path.display()
    )]
    VfioUnavailable {
        /// The missing device node.
        path: PathBuf,
    },

    /// The function is bound to vfio-pci but its group has no device node.
    #[error(
        "{address} is bound to vfio-pci but its group file {} does not exist; check that \
         vfio-pci finished binding (dmesg) and that /dev is populated (udev)",
        .path.display()
    )]
    GroupUnavailable {
        /// The function's PCI address.
        address: String,
        /// The missing group file.
        path: PathBuf,
    },

    /// The container could not be set up.
    #[error("cannot set up the VFIO container {VFIO_CONTAINER_PATH}: {source}{}", hint(.source))]
    Container {
        /// What `vfio-ioctls` reported.
        #[source]
        source: VfioError,
    },

    /// The device could not be opened through its group.
    #[error(
        "cannot open {address} ({ids}, IOMMU group {group}) through VFIO: {source}{}",
        hint(.source)
    )]
    Device {
        /// The function's PCI address.
        address: String,
        /// Its vendor/device/class.
        ids: PciIds,
        /// Its IOMMU group.
        group: u32,
        /// What `vfio-ioctls` reported.
        #[source]
        source: VfioError,
    },

    /// The device fd could not be duplicated (for region accesses).
    #[error("cannot duplicate the VFIO device fd of {address}: {source}")]
    DeviceFd {
        /// The function's PCI address.
        address: String,
        /// The error from `dup`.
        #[source]
        source: io::Error,
    },

    /// A VFIO operation on an open device or container failed; carried inside
    /// the `io::Error`s of [`VfioDeviceOps`] and [`DmaMapper`].
    #[error("{context}: {source}")]
    Op {
        /// What was being done, on what.
        context: String,
        /// What `vfio-ioctls` reported.
        #[source]
        source: VfioError,
    },
}

/// What to do about a `vfio-ioctls` error, when that is known.
fn hint(e: &VfioError) -> String {
    let denied = |io: &io::Error| io.kind() == io::ErrorKind::PermissionDenied;
    match e {
        VfioError::OpenContainer(io) if denied(io) => format!(
            "; give the VMM's user read-write access to {VFIO_CONTAINER_PATH} or run it as root"
        ),
        VfioError::OpenGroup(io, group) if denied(io) => format!(
            "; give the VMM's user read-write access to {VFIO_DEV_DIR}/{group} and a memlock \
             limit (ulimit -l) that covers guest memory"
        ),
        VfioError::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => {
            "; the group is open already (another VMM, or another container in this one)".to_owned()
        }
        VfioError::GroupViable => {
            "; the kernel says the group is not viable: bind every device in it to vfio-pci \
             or unbind it"
                .to_owned()
        }
        VfioError::VfioType1V2 | VfioError::VfioExtension => {
            "; the kernel offers no type1v2 IOMMU backend (load vfio_iommu_type1)".to_owned()
        }
        _ => String::new(),
    }
}

/// An `io::Error` carrying `source` with `context`; its kind follows the
/// errno when `vfio-ioctls` kept one.
fn op_error(context: String, source: VfioError) -> io::Error {
    let kind = match &source {
        VfioError::IommuDmaMap(e) | VfioError::IommuDmaUnmap(e) => {
            io::Error::from_raw_os_error(e.errno()).kind()
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, Error::Op { context, source })
}

/// A VFIO container: one IOMMU address space (type1v2) for the devices opened
/// in it. Cloning it shares the container.
///
/// Open one per VM and every primary in it, or one per primary; guest memory
/// is mapped once per container ([`crate::DmaMappings`]).
#[derive(Clone)]
pub struct KernelContainer {
    container: Arc<VfioContainer>,
}

impl fmt::Debug for KernelContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelContainer")
            .field("fd", &self.container.as_raw_fd())
            .finish()
    }
}

impl KernelContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version and the type1v2
    /// IOMMU. Fails with [`Error::VfioUnavailable`] when it does not exist.
    pub fn new() -> Result<Self, Error> {
        Self::create(None)
    }

    /// As [`new`](Self::new), and registers every group opened in the
    /// container with the hypervisor's VFIO device (KVM's `KVM_DEV_TYPE_VFIO`,
    /// made with `KVM_CREATE_DEVICE` and wrapped by
    /// `VfioDeviceFd::new_from_kvm`), as KVM wants for coherent DMA.
    pub fn with_hypervisor_device(device_fd: Arc<VfioDeviceFd>) -> Result<Self, Error> {
        Self::create(Some(device_fd))
    }

    fn create(device_fd: Option<Arc<VfioDeviceFd>>) -> Result<Self, Error> {
        if !Path::new(VFIO_CONTAINER_PATH).exists() {
            return Err(Error::VfioUnavailable {
                path: VFIO_CONTAINER_PATH.into(),
            });
        }
        let container =
            VfioContainer::new(device_fd).map_err(|source| Error::Container { source })?;
        Ok(Self {
            container: Arc::new(container),
        })
    }

    /// Opens the function at `sysfs_path` (e.g. `/sys/bus/pci/devices/0000:3b:02.1`)
    /// in this container, after checking its sysfs directory as [`open`] does.
    /// Its group joins the container if it is not in it yet.
    pub fn open_device(&self, sysfs_path: impl AsRef<Path>) -> Result<KernelVfioDevice, Error> {
        let (dev, group) = preflight(sysfs_path.as_ref())?;
        self.open_checked(dev, group)
    }

    fn open_checked(
        &self,
        dev: PciSysfsDevice,
        group: IommuGroup,
    ) -> Result<KernelVfioDevice, Error> {
        let group_path = Path::new(VFIO_DEV_DIR).join(group.id.to_string());
        if !group_path.exists() {
            return Err(Error::GroupUnavailable {
                address: dev.address().to_owned(),
                path: group_path,
            });
        }
        let ids = dev.ids()?;
        let ops: Arc<dyn VfioOps> = self.container.clone();
        let device = VfioDevice::new(dev.path(), ops, false).map_err(|source| Error::Device {
            address: dev.address().to_owned(),
            ids,
            group: group.id,
            source,
        })?;
        KernelVfioDevice::new(device, dev, group.id, ids)
    }

    /// The `vfio-ioctls` container, for what this crate does not wrap.
    pub fn inner(&self) -> &Arc<VfioContainer> {
        &self.container
    }
}

impl AsRawFd for KernelContainer {
    fn as_raw_fd(&self) -> RawFd {
        self.container.as_raw_fd()
    }
}

impl DmaMapper for KernelContainer {
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let context = || format!("DMA-mapping {size:#x} bytes at IOVA {iova:#x}");
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, context()))?;
        let addr = usize::try_from(host_addr)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, context()))?;
        // SAFETY: our caller upholds `DmaMapper::dma_map`'s contract for
        // `host_addr..host_addr + size`, which is `vfio_dma_map`'s: the range stays
        // mapped and is touched only by volatile/atomic accesses or system calls
        // until unmapped with the same IOVA and size.
        unsafe { self.container.vfio_dma_map(iova, len, addr as *mut u8) }
            .map_err(|e| op_error(context(), e))
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let context = || format!("DMA-unmapping {size:#x} bytes at IOVA {iova:#x}");
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, context()))?;
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| op_error(context(), e))
    }
}

/// Opens the function whose sysfs directory is `sysfs_path` (e.g.
/// `/sys/bus/pci/devices/0000:3b:02.1`) in a new container of its own.
///
/// In order: the sysfs directory is read and checked (IOMMU group viable, the
/// function bound to vfio-pci: [`Error::Sysfs`] names the devices in the way),
/// then `/dev/vfio/vfio` is opened ([`Error::VfioUnavailable`] if absent), then
/// the group joins the container and the device is opened.
///
/// The container maps guest memory for the device ([`crate::DmaMappings`]);
/// keep it as long as the device. To put several functions in one container,
/// use [`KernelContainer::new`] and [`KernelContainer::open_device`].
pub fn open(sysfs_path: impl AsRef<Path>) -> Result<(KernelContainer, KernelVfioDevice), Error> {
    let (dev, group) = preflight(sysfs_path.as_ref())?;
    let container = KernelContainer::new()?;
    let device = container.open_checked(dev, group)?;
    Ok((container, device))
}

fn preflight(sysfs_path: &Path) -> Result<(PciSysfsDevice, IommuGroup), Error> {
    let dev = PciSysfsDevice::new(sysfs_path)?;
    let group = dev.check_ready_for_vfio()?;
    Ok((dev, group))
}

/// One PCI function opened through VFIO: [`VfioDeviceOps`] over
/// `vfio_ioctls::VfioDevice`.
///
/// Regions 0 to [`region::CONFIG`] are described (BARs, ROM, config space); a
/// region of size 0 (an unimplemented BAR, the upper half of a 64-bit BAR) is
/// `None`, as is an interrupt index with no vectors.
///
/// Dropping it closes the device and takes its group out of the container.
/// (`vfio-ioctls` re-reads the `iommu_group` link then, and panics if the
/// function has vanished from sysfs.)
pub struct KernelVfioDevice {
    // Declared before `device` so it is closed first: dropping `device` takes the
    // group out of its container, which the kernel refuses while any fd of the
    // device is open.
    /// A duplicate of the device fd, for region reads and writes.
    file: File,
    /// Regions 0..=CONFIG, read at open.
    regions: Vec<Option<RegionInfo>>,
    /// Vectors routed per interrupt index by `enable_irq`.
    enabled: Mutex<HashMap<u32, usize>>,
    sysfs: PciSysfsDevice,
    group: u32,
    ids: PciIds,
    device: VfioDevice,
}

impl fmt::Debug for KernelVfioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelVfioDevice")
            .field("address", &self.sysfs.address())
            .field("ids", &self.ids)
            .field("group", &self.group)
            .field("fd", &self.device.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl KernelVfioDevice {
    fn new(
        device: VfioDevice,
        sysfs: PciSysfsDevice,
        group: u32,
        ids: PciIds,
    ) -> Result<Self, Error> {
        // SAFETY: the fd belongs to `device`, which is alive and keeps it open for
        // the whole of this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = File::from(fd.try_clone_to_owned().map_err(|source| Error::DeviceFd {
            address: sysfs.address().to_owned(),
            source,
        })?);
        let regions = (0..=region::CONFIG)
            .map(|index| region_info_of(&device, index))
            .collect();
        Ok(Self {
            file,
            regions,
            enabled: Mutex::new(HashMap::new()),
            sysfs,
            group,
            ids,
            device,
        })
    }

    /// The function's PCI address (`0000:3b:02.1`).
    pub fn address(&self) -> &str {
        self.sysfs.address()
    }

    /// The function's sysfs directory.
    pub fn sysfs(&self) -> &PciSysfsDevice {
        &self.sysfs
    }

    /// Its IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// Vendor, device and class, from sysfs at open.
    pub fn ids(&self) -> PciIds {
        self.ids
    }

    fn region(&self, index: u32, offset: u64, len: usize, write: bool) -> io::Result<u64> {
        let what = if write { "write" } else { "read" };
        let info = self
            .regions
            .get(index as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no VFIO region {index} to {what}", self.address()),
                )
            })?;
        if !(if write { info.write } else { info.read }) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: VFIO region {index} is not {what}able", self.address()),
            ));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= info.size => Ok(info.fd_offset + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {what} of {len} bytes at {offset:#x} is outside VFIO region {index} \
                     ({:#x} bytes)",
                    self.address(),
                    info.size
                ),
            )),
        }
    }

    fn enabled(&self) -> MutexGuard<'_, HashMap<u32, usize>> {
        self.enabled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disable(&self, enabled: &mut HashMap<u32, usize>, index: u32) -> io::Result<()> {
        if enabled.get(&index).copied().unwrap_or(0) == 0 {
            return Ok(());
        }
        self.device.disable_irq(index).map_err(|e| {
            op_error(
                format!("{}: disabling interrupt index {index}", self.address()),
                e,
            )
        })?;
        enabled.remove(&index);
        Ok(())
    }
}

fn region_info_of(device: &VfioDevice, index: u32) -> Option<RegionInfo> {
    let size = device.get_region_size(index);
    if size == 0 {
        return None;
    }
    let flags = device.get_region_flags(index);
    let mut info = RegionInfo {
        size,
        read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
        write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        mmap_areas: Vec::new(),
        msix_mappable: false,
        fd_offset: device.get_region_offset(index),
    };
    for cap in device.get_region_caps(index) {
        match cap {
            VfioRegionInfoCap::SparseMmap(sparse) => {
                info.mmap_areas = sparse
                    .areas
                    .iter()
                    .filter(|a| a.size != 0)
                    .map(|a| (a.offset, a.size))
                    .collect();
                // A sparse capability with no areas: nothing may be mmapped
                // (`mmap_areas` empty would otherwise mean "all of it").
                if info.mmap_areas.is_empty() {
                    info.mmap = false;
                }
            }
            VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
            _ => {}
        }
    }
    Some(info)
}

impl AsRawFd for KernelVfioDevice {
    /// The device fd, e.g. to mmap a region at its [`RegionInfo::fd_offset`].
    fn as_raw_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

impl VfioDeviceOps for KernelVfioDevice {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).cloned().flatten()
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let at = self.region(index, offset, data.len(), false)?;
        self.file.read_exact_at(data, at).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: reading {} bytes of VFIO region {index} at {offset:#x}: {e}",
                    self.address(),
                    data.len()
                ),
            )
        })
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.region(index, offset, data.len(), true)?;
        self.file.write_all_at(data, at).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: writing {} bytes of VFIO region {index} at {offset:#x}: {e}",
                    self.address(),
                    data.len()
                ),
            )
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.device
            .get_irq_info(index)
            .filter(|irq| irq.count > 0)
            .map(|irq| IrqInfo {
                count: irq.count,
                maskable: irq.flags & VFIO_IRQ_INFO_MASKABLE != 0,
            })
    }

    /// Routes the vectors to `fds`. With as many vectors as the routing in
    /// place, the kernel swaps the eventfds in place; with another count, the
    /// index is disabled first (as QEMU does), since the kernel cannot resize
    /// an enabled MSI/MSI-X allocation everywhere. No `fds` disables the index.
    ///
    /// The kernel enables one index at a time: disable INTx before enabling MSI
    /// or MSI-X, and the other way round.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let mut enabled = self.enabled();
        if fds.is_empty() {
            return self.disable(&mut enabled, index);
        }
        let routed = enabled.get(&index).copied().unwrap_or(0);
        if routed != 0 && routed != fds.len() {
            self.disable(&mut enabled, index)?;
        }
        self.device.enable_irq(index, fds.to_vec()).map_err(|e| {
            op_error(
                format!(
                    "{}: routing {} vectors of interrupt index {index}",
                    self.address(),
                    fds.len()
                ),
                e,
            )
        })?;
        enabled.insert(index, fds.len());
        Ok(())
    }

    fn set_irq_resample(&self, index: u32, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(index, vec![fd])
            .map_err(|e| {
                op_error(
                    format!(
                        "{}: setting the resample eventfd of interrupt index {index}",
                        self.address()
                    ),
                    e,
                )
            })
    }

    /// Disables the index if [`enable_irq`](VfioDeviceOps::enable_irq) routed
    /// it; otherwise there is nothing to tear down and this succeeds.
    fn disable_irq(&self, index: u32) -> io::Result<()> {
        let mut enabled = self.enabled();
        self.disable(&mut enabled, index)
    }

    fn unmask_irq(&self, index: u32) -> io::Result<()> {
        self.device.unmask_irq(index).map_err(|e| {
            op_error(
                format!("{}: unmasking interrupt index {index}", self.address()),
                e,
            )
        })
    }

    /// `VFIO_DEVICE_RESET`, issued here rather than through `vfio-ioctls`
    /// (whose `reset` discards the result). `EINVAL` means the function has no
    /// reset of its own (no FLR or PM reset).
    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument and acts only on the device
        // behind `self.device`'s fd, which is open while `self` lives.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.device, ioctls::VFIO_DEVICE_RESET()) };
        if ret >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EINVAL) {
            " (the function has no reset VFIO can use: no FLR or PM reset)"
        } else {
            ""
        };
        Err(io::Error::new(
            e.kind(),
            format!("{}: VFIO_DEVICE_RESET failed: {e}{hint}", self.address()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::tests::{FakeDev, FakeSysfs};

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn kernel_types_are_send_and_sync() {
        assert_send_sync::<KernelContainer>();
        assert_send_sync::<KernelVfioDevice>();
    }

    #[test]
    fn reset_ioctl_number_is_the_kernels() {
        // _IO(';', 111), as in <linux/vfio.h> and vfio-ioctls' own table.
        assert_eq!(ioctls::VFIO_DEVICE_RESET(), 15215);
    }

    #[test]
    fn open_checks_sysfs_before_touching_dev_vfio() {
        let fake = FakeSysfs::new(&[
            FakeDev::vf("0000:3b:02.0", 42, Some("ixgbe")),
            FakeDev::vf("0000:3b:02.1", 42, Some("vfio-pci")),
            FakeDev::vf("0000:3b:02.2", 42, Some("ixgbevf")),
        ]);
        let err = open(fake.device("0000:3b:02.1").path()).unwrap_err();
        assert!(matches!(
            err,
            Error::Sysfs(sysfs::Error::NotViable { group: 42, .. })
        ));
        assert_eq!(
            err.to_string(),
            "IOMMU group 42 is not viable: 0000:3b:02.0 is bound to ixgbe, \
             0000:3b:02.2 is bound to ixgbevf; bind them to vfio-pci or unbind them"
        );

        let err = open(fake.root.join("bus/pci/devices/0000:3b:07.0")).unwrap_err();
        assert!(matches!(err, Error::Sysfs(sysfs::Error::NoDevice { .. })));
    }

    #[test]
    fn open_without_dev_vfio_says_so() {
        let fake = FakeSysfs::new(&[FakeDev::vf("0000:3b:02.1", 42, Some("vfio-pci"))]);
        if Path::new(VFIO_CONTAINER_PATH).exists() {
            println!("{VFIO_CONTAINER_PATH} exists here: not testing its absence");
            return;
        }
        let err = open(fake.device("0000:3b:02.1").path()).unwrap_err();
        assert!(matches!(err, Error::VfioUnavailable { .. }));
        assert_eq!(
            err.to_string(),
            "VFIO is not available: /dev/vfio/vfio does not exist; load vfio-pci \
             (`modprobe vfio-pci`) on a host with the IOMMU enabled"
        );
        assert!(matches!(
            KernelContainer::new(),
            Err(Error::VfioUnavailable { .. })
        ));
    }

    #[test]
    fn errors_carry_hints_and_errno_kinds() {
        let e = Error::Container {
            source: VfioError::OpenContainer(io::Error::from_raw_os_error(libc::EACCES)),
        };
        assert!(
            e.to_string().ends_with(
                "give the VMM's user read-write access to /dev/vfio/vfio or run it as root"
            ),
            "{e}"
        );
        let e = Error::Device {
            address: "0000:3b:02.1".into(),
            ids: PciIds {
                vendor: 0x8086,
                device: 0x154c,
                class: 0x020000,
            },
            group: 42,
            source: VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EBUSY), "42".into()),
        };
        assert_eq!(
            e.to_string(),
            "cannot open 0000:3b:02.1 (8086:154c, class 020000, IOMMU group 42) through VFIO: \
             failed to open /dev/vfio/42 group: Device or resource busy (os error 16); the group \
             is open already (another VMM, or another container in this one)"
        );
        let io = op_error(
            "DMA-mapping 0x1000 bytes at IOVA 0x0".into(),
            VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(libc::ENOMEM)),
        );
        assert_eq!(io.kind(), io::ErrorKind::OutOfMemory);
        assert!(
            io.to_string()
                .starts_with("DMA-mapping 0x1000 bytes at IOVA 0x0: ")
        );
        let inner = io.into_inner().unwrap();
        assert!(inner.downcast_ref::<Error>().is_some());
    }
}
