//! Split-ring flags (virtio 1.2, 2.7), as the 16-bit ring fields hold them.

use virtio_bindings::virtio_ring as r;

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = r::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = r::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = r::VRING_DESC_F_INDIRECT as u16;
/// Used-ring flag: the device does not want kicks.
pub const VRING_USED_F_NO_NOTIFY: u16 = r::VRING_USED_F_NO_NOTIFY as u16;
/// Avail-ring flag: the driver does not want interrupts.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = r::VRING_AVAIL_F_NO_INTERRUPT as u16;
