//! The boundary to the kernel: what a passthrough function needs from VFIO.
//!
//! Region and interrupt indices are VFIO's for a PCI device (`VFIO_PCI_*_INDEX`):
//! BARs 0 to 5, the expansion ROM, config space; INTx, MSI, MSI-X. See
//! [`region`] and [`irq`].

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// VFIO's region indices for a PCI device.
pub mod region {
    /// BAR 0; BAR n is `BAR0 + n`.
    pub const BAR0: u32 = 0;
    /// The expansion ROM.
    pub const ROM: u32 = 6;
    /// The function's configuration space.
    pub const CONFIG: u32 = 7;
}

/// VFIO's interrupt indices for a PCI device.
pub mod irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
}

/// What VFIO says about one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes; 0 when the region does not exist.
    pub size: u64,
    /// Readable through [`VfioDeviceOps::region_read`].
    pub read: bool,
    /// Writable through [`VfioDeviceOps::region_write`].
    pub write: bool,
    /// Can be mmapped (then, `mmap_areas` says which parts; empty means all).
    pub mmap: bool,
    /// The mmappable parts as (offset, size), from the sparse-mmap capability.
    pub mmap_areas: Vec<(u64, u64)>,
    /// The MSI-X table in this region may be mmapped too
    /// (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`). The primary traps it all the same.
    pub msix_mappable: bool,
    /// Offset of the region in the device fd, for mmap.
    pub fd_offset: u64,
}

/// What VFIO says about one interrupt index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// How many vectors the index has (0: none).
    pub count: u32,
    /// Whether the index can be masked and unmasked (INTx).
    pub maskable: bool,
}

/// One VFIO device, as the primary uses it. The `vfio-ioctls` implementation
/// wraps `vfio_ioctls::VfioDevice`; the recorded model (feature `test-utils`)
/// implements it without hardware.
///
/// Every call is made from the thread that owns the primary; implementations need
/// no locking of their own beyond `Send + Sync`.
pub trait VfioDeviceOps: Send + Sync {
    /// Region `index` ([`region`]), or `None` if the device has no such region.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes of region `index` at `offset`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;

    /// Writes `data` to region `index` at `offset`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Interrupt index `index` ([`irq`]), or `None` if the device has none.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;

    /// Routes vectors `0..fds.len()` of interrupt index `index` to `fds` (the
    /// VMM turns each into an irqfd). Replaces any earlier routing of that index.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;

    /// Gives INTx its resample eventfd (the VMM's irqfd resamplefd): the device
    /// unmasks the line when it is signalled.
    fn set_irq_resample(&self, index: u32, fd: &EventFd) -> io::Result<()>;

    /// Tears down the routing of interrupt index `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;

    /// Unmasks interrupt index `index` (INTx after it fired).
    fn unmask_irq(&self, index: u32) -> io::Result<()>;

    /// Resets the function (`VFIO_DEVICE_RESET`).
    fn reset(&self) -> io::Result<()>;
}

/// The IOMMU mappings of guest memory for the devices of one container.
pub trait DmaMapper: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` at I/O virtual address
    /// `iova` (the guest physical address).
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + size` must stay mapped, and be accessed by the
    /// VMM only through volatile or atomic operations on raw pointers (as
    /// `vm-memory` does) or through system calls, never through Rust references,
    /// until [`dma_unmap`](Self::dma_unmap) is called for the same range: the
    /// device reads and writes it at any time.
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;

    /// Removes the mapping of `size` bytes at `iova`.
    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}
