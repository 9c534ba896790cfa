//! Where the virtio structures live: BAR layout and vendor capabilities.

use vmm_pci::ConfigSpace;
use vmm_pci::config::{self, CAP_ID_VENDOR};

/// `VIRTIO_PCI_CAP_COMMON_CFG`.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `VIRTIO_PCI_CAP_ISR_CFG`.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `VIRTIO_PCI_CAP_DEVICE_CFG`.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// `VIRTIO_PCI_CAP_PCI_CFG`.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// The BAR holding the MSI-X table (offset 0) and PBA (offset 0x800): 32-bit memory.
pub const MSIX_BAR: u8 = 1;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Offset of the PBA in the MSI-X BAR.
pub const MSIX_PBA_OFFSET: u32 = 0x800;
/// The BAR holding the virtio structures: 64-bit prefetchable memory.
pub const VIRTIO_BAR: u8 = 4;
/// Size of the virtio BAR.
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Offset of the common configuration in the virtio BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure.
pub const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Length of the notification area.
pub const NOTIFY_CFG_LEN: u64 = 0x1000;
/// `notify_off_multiplier`: queue `n` is notified at `NOTIFY_CFG_OFFSET + 4 * n`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Offsets inside the PCI configuration access capability.
pub(crate) const PCI_CFG_BAR: u16 = 4;
pub(crate) const PCI_CFG_OFFSET: u16 = 8;
pub(crate) const PCI_CFG_LENGTH: u16 = 12;
pub(crate) const PCI_CFG_DATA: u16 = 16;

fn add_virtio_cap(
    cs: &mut ConfigSpace,
    cfg_type: u8,
    offset: u64,
    length: u64,
    extra: Option<u32>,
) -> config::Result<u16> {
    let len = if extra.is_some() { 20 } else { 16 };
    let cap = cs.add_capability(CAP_ID_VENDOR, len)?;
    cs.set_u8(cap + 2, len as u8);
    cs.set_u8(cap + 3, cfg_type);
    cs.set_u8(cap + 4, VIRTIO_BAR);
    cs.set_u32(cap + 8, offset as u32);
    cs.set_u32(cap + 12, length as u32);
    if let Some(v) = extra {
        cs.set_u32(cap + 16, v);
    }
    Ok(cap)
}

/// Adds the five virtio capabilities; returns the PCI access capability's offset.
pub(crate) fn add_virtio_caps(cs: &mut ConfigSpace, queues: u16) -> config::Result<u16> {
    add_virtio_cap(
        cs,
        VIRTIO_PCI_CAP_COMMON_CFG,
        COMMON_CFG_OFFSET,
        COMMON_CFG_LEN,
        None,
    )?;
    add_virtio_cap(cs, VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1, None)?;
    add_virtio_cap(
        cs,
        VIRTIO_PCI_CAP_DEVICE_CFG,
        DEVICE_CFG_OFFSET,
        DEVICE_CFG_LEN,
        None,
    )?;
    let notify_len = (queues as u64 * NOTIFY_OFF_MULTIPLIER as u64).clamp(4, NOTIFY_CFG_LEN);
    add_virtio_cap(
        cs,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        NOTIFY_CFG_OFFSET,
        notify_len,
        Some(NOTIFY_OFF_MULTIPLIER),
    )?;
    let cap = add_virtio_cap(cs, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, Some(0))?;
    // The driver chooses bar, offset and length, then accesses the data window.
    cs.set_u8(cap + PCI_CFG_BAR, 0);
    cs.set_wmask_u8(cap + PCI_CFG_BAR, 0xff);
    cs.set_wmask_u32(cap + PCI_CFG_OFFSET, 0xffff_ffff);
    cs.set_wmask_u32(cap + PCI_CFG_LENGTH, 0xffff_ffff);
    cs.set_wmask_u32(cap + PCI_CFG_DATA, 0xffff_ffff);
    Ok(cap)
}
