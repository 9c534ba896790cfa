//! Device status bits (virtio 1.2, 2.1), as the one-byte status register holds
//! them.

use virtio_bindings::virtio_config as c;

/// The guest noticed the device.
pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
/// The guest has a driver for it.
pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
/// The driver is set up and ready to drive the device.
pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
/// The driver accepted the features; the device clears it again to refuse them.
pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
/// The device hit an error and needs a reset.
pub const NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// The driver gave up on the device.
pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
