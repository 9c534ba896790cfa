//! The boundary between a virtio device and its transport.
//!
//! A transport (virtio-pci, virtio-mmio, a vhost-user frontend) owns the status
//! register, the feature-select registers and the queue registers. A device
//! (net, block, ...) owns its features, its configuration space and its queues.
//! They meet here, and this crate knows no device type:
//!
//! - [`VirtioDevice`]: what a transport calls, in the order the driver drives it
//!   (features, `FEATURES_OK` -> [`VirtioDevice::ack_features`], `DRIVER_OK` ->
//!   [`VirtioDevice::activate`], status 0 -> [`VirtioDevice::reset`]). Errors are
//!   the device's own type ([`VirtioDevice::Error`]), shown to the VMM as text.
//! - [`VirtioInterrupt`]: how a device raises interrupts; the transport
//!   implements it.
//! - [`ActivateQueue`]: a queue handed over at activation, with its kick eventfd.
//! - [`FeaturesAcked`], [`FeaturesListener`] and [`AckNotifier`]: "the driver
//!   acknowledged this feature set on device `id`", the event a failover
//!   coordinator plugs the primary on when the set holds `VIRTIO_NET_F_STANDBY`.
//!   The same event type comes from a transport (which sees `FEATURES_OK`), from
//!   an in-process device, or from a VMM's own frontend for an out-of-process
//!   device (vhost-user), each raising it through an [`AckNotifier`].
//! - [`status`] and [`ring`]: the specification's constants, typed as the
//!   registers and ring fields hold them, from `virtio-bindings`.

#![deny(missing_docs)]

mod device;
mod interrupt;
mod negotiation;
pub mod ring;
pub mod status;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use device::{ActivateQueue, VirtioDevice};
pub use interrupt::{VirtioInterrupt, VirtioInterruptType};
pub use negotiation::{AckNotifier, FeaturesAcked, FeaturesListener};
/// The specification's generated constants (device ids, feature bit numbers).
pub use virtio_bindings;
