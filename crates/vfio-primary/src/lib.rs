//! The failover primary: a vfio-pci passthrough NIC, typically an SR-IOV VF, as a
//! PCI function a VMM puts in a hot-plug slot.
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

pub mod dma;
pub mod kernel;
mod ops;
pub mod pairing;
pub mod sysfs;

pub use dma::DmaMappings;
pub use kernel::{KernelContainer, KernelVfioDevice};
pub use ops::{DmaMapper, IrqInfo, RegionInfo, VfioDeviceOps, irq, region};
pub use pairing::{BusKind, FailoverPair, FunctionHeader, Placement, Violation, Violations};
