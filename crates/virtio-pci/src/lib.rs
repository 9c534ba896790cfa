//! A modern (virtio 1.x) PCI transport.
//!
//! [`VirtioPciDevice`] puts any [`virtio_device::VirtioDevice`] on a PCI bus as
//! vendor 0x1af4, device 0x1040 + type (0x1041 for net), revision 1, with:
//! - the virtio vendor capabilities: common configuration, notifications (with
//!   their offset multiplier), ISR status, device configuration, and the PCI
//!   configuration access window;
//! - MSI-X with one vector for configuration changes and one per queue, and INTx
//!   through the ISR when MSI-X is off;
//! - the status machine as the specification gives it: `FEATURES_OK` reads back
//!   clear when the device refuses the driver's features, `DRIVER_OK` activates the
//!   queues the driver enabled, writing 0 resets the device, its queues and the
//!   MSI-X vector assignments;
//! - one eventfd per queue that notifications signal; a KVM VMM registers them as
//!   ioeventfds at [`VirtioPciDevice::notify_addresses`];
//! - a PCI Express endpoint capability when placed on a PCIe port.
//!
//! `config_generation` increments on every device configuration change.
//!
//! The transport knows no device type. When the driver's `FEATURES_OK` is
//! accepted it raises [`virtio_device::FeaturesAcked`] for the device's id
//! ([`VirtioPciBuilder::id`]) to the listeners added with
//! [`VirtioPciDevice::add_features_listener`], once per negotiation: that is the
//! failover coordinator's "STANDBY acknowledged" signal, whatever device is
//! behind the transport.

#![deny(missing_docs)]

mod caps;
mod common;
mod device;
mod interrupt;
mod state;

pub use caps::{
    COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, MSIX_BAR, NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR, VIRTIO_BAR_SIZE, VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
};
pub use common::NO_VECTOR;
pub use device::{Error, Result, TransportCounters, VirtioPciBuilder, VirtioPciDevice};
pub use state::{QueueRegsState, VirtioPciState};
