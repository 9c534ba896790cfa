//! The failover primary: a vfio-pci passthrough NIC, typically an SR-IOV VF, as a
//! PCI function a VMM puts in a hot-plug slot.
//!
//! - [`VfioPrimary`] ([`VfioPrimaryBuilder`]): the function the guest sees. Its
//!   config space is the host's, virtualized where the VMM must own it
//!   ([`config`]: BARs, MSI and MSI-X, the ROM hidden unless the VMM exposes
//!   it ([`rom`]), capabilities QEMU's vfio-pci hides); its BARs are mmapped
//!   where they can be and trapped where they must be ([`bars`]: the MSI-X
//!   table and PBA always); its interrupts go to eventfds ([`interrupts`]); `attach`/`detach` map and unmap guest memory
//!   ([`dma`]) and reset the device.
//! - [`pairing`]: QEMU's checks on a primary that carries `failover_pair_id`,
//!   for any PCI function, every violation at once.
//! - [`sysfs`] and [`kernel`]: the host side, from a sysfs path to an open VFIO
//!   device with its IOMMU group checked.
//!
//! The kernel calls sit behind two traits, so everything above them is testable
//! without VFIO hardware and embeddable in any VMM:
//!
//! - [`VfioDeviceOps`]: one device's regions (BARs, config space, ROM),
//!   interrupts and reset;
//! - [`DmaMapper`]: the IOMMU mappings of guest memory (a VFIO container).
//!
//! The `vfio-ioctls` implementation is what a VMM gets by default; the
//! `test-utils` feature adds a recorded model of a real VF that implements both.

#![deny(missing_docs)]

pub mod bars;
pub mod config;
pub mod dma;
pub mod interrupts;
pub mod kernel;
mod ops;
pub mod pairing;
mod primary;
pub mod rom;
pub mod sysfs;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use bars::MmapRange;
pub use config::HiddenCapability;
pub use dma::DmaMappings;
pub use interrupts::IrqCounters;
pub use kernel::{KernelContainer, KernelVfioDevice};
pub use ops::{DmaMapper, IrqInfo, RegionInfo, VfioDeviceOps, irq, region};
pub use pairing::{BusKind, FailoverPair, FunctionHeader, Placement, Violation, Violations};
pub use primary::{Error as PrimaryError, PrimaryCounters, VfioPrimary, VfioPrimaryBuilder};
pub use rom::{ROM_BAR, RomPolicy, RomWindow};
