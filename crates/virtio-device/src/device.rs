//! The device side of the boundary.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::VirtioInterrupt;

/// A queue handed to the device on activation.
#[derive(Debug)]
pub struct ActivateQueue {
    /// Queue index as the driver numbers it.
    pub index: u16,
    /// The queue as the driver configured it (size, ring addresses, ready,
    /// EVENT_IDX).
    pub queue: Queue,
    /// The eventfd the transport signals when the driver kicks this queue (an
    /// ioeventfd in a KVM VMM), if it has one. A device's ready-made worker
    /// waits on it; a VMM with its own event loop may pass `None` and call the
    /// device's processing methods itself.
    pub kick: Option<EventFd>,
}

/// A virtio device as a transport sees it. `M` is the guest memory type.
///
/// The transport calls it as the driver drives the status register:
///
/// 1. it shows the driver [`features`](VirtioDevice::features);
/// 2. when the driver sets `FEATURES_OK` it calls
///    [`ack_features`](VirtioDevice::ack_features) with the 64-bit set the driver
///    wrote, and clears `FEATURES_OK` again if that fails (the driver re-reads the
///    status and gives up);
/// 3. when the driver sets `DRIVER_OK` it calls
///    [`activate`](VirtioDevice::activate) with the guest memory, an interrupt
///    object and the queues the driver made ready, and shows `NEEDS_RESET` if
///    that fails;
/// 4. when the driver writes 0 to the status it calls
///    [`reset`](VirtioDevice::reset).
pub trait VirtioDevice<M: GuestMemoryBackend>: Send {
    /// Why the device refused a feature set or an activation. The transport
    /// logs it and shows the driver the specified outcome; it never inspects it.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The virtio device type (`VIRTIO_ID_*`, see
    /// [`virtio_bindings::virtio_ids`](crate::virtio_bindings::virtio_ids)).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue, in queue-index order. Its length is the
    /// number of queues the device has.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// Accepts or refuses the set the driver acknowledged. Called when the driver
    /// sets `FEATURES_OK`; on error the transport clears `FEATURES_OK`.
    fn ack_features(&mut self, features: u64) -> Result<(), Self::Error>;

    /// Reads the device configuration space at `offset` into `data`. Never panics:
    /// bytes outside the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space. Never panics; what is written
    /// outside the writable fields is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivateQueue>,
    ) -> Result<(), Self::Error>;

    /// Returns the device to its initial state (the driver wrote 0 to the
    /// status).
    fn reset(&mut self);

    /// Whether the device hit an error it cannot recover from and wants the
    /// transport to set `DEVICE_NEEDS_RESET` in the status it shows the driver.
    fn needs_reset(&self) -> bool;
}
