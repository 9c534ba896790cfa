//! A recorded model of a real SR-IOV VF, for tests and benchmarks without VFIO
//! hardware (feature `test-utils`).
//!
//! [`RecordedVf`] implements [`VfioDeviceOps`](crate::VfioDeviceOps) and
//! [`DmaMapper`](crate::DmaMapper) over a [`ModelSpec`]: the configuration space,
//! BARs, expansion ROM and interrupt indices a device shows through vfio-pci. It
//! records every call ([`Event`]), keeps the eventfds it was given so a test can
//! fire an interrupt "from the device" ([`RecordedVf::signal_irq`]), counts
//! resets, DMA maps and unmaps with the live set, counts the file descriptors it
//! holds ([`RecordedVf::open_fds`]), and fails chosen calls on demand
//! ([`RecordedVf::fail_next`]).
//!
//! [`ModelSpec::intel_82599_vf`] is an Intel 82599 VF (8086:10ed, class
//! 0x020000) as vfio-pci shows it. Its sources, and what could not be confirmed,
//! are listed on that function.

mod model;
mod spec;

pub use model::{Event, Op, RecordedVf};
pub use spec::{BarSpec, ModelSpec, regs};
