//! The boundary between a virtio device and its transport.
//!
//! A transport (virtio-pci, virtio-mmio, vhost-user) owns the status register, the
//! feature-select registers and the queue registers. It talks to the device through
//! [`VirtioDevice`]:
//!
//! 1. it shows the driver [`VirtioDevice::features`];
//! 2. when the driver sets `FEATURES_OK` it calls [`VirtioDevice::ack_features`]
//!    with the 64-bit set the driver wrote, and clears `FEATURES_OK` again if that
//!    fails (the driver re-reads the status and gives up);
//! 3. when the driver sets `DRIVER_OK` it calls [`VirtioDevice::activate`] with the
//!    guest memory, an interrupt object and the queues the driver made ready;
//! 4. when the driver writes 0 to the status it calls [`VirtioDevice::reset`].
//!
//! The device raises interrupts through [`VirtioInterrupt`], which the transport
//! implements (an irqfd per MSI-X vector in a KVM VMM). A transport's
//! `trigger(VirtioInterruptType::Config)` is also where it bumps
//! `config_generation`.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{features, memory, ring};

/// `VIRTIO_ID_NET`.
pub const VIRTIO_ID_NET: u32 = 1;

/// Device status bit: the device hit an error and needs a reset
/// (`DEVICE_NEEDS_RESET`, 64).
pub const DEVICE_NEEDS_RESET: u8 = 64;

/// Errors a device reports to its transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver's feature set was refused; the transport must clear `FEATURES_OK`.
    #[error("the driver's feature set was refused")]
    Features(#[from] features::Error),
    /// `activate` before a successful `ack_features`.
    #[error("activate was called before the driver's features were accepted")]
    NotNegotiated,
    /// `activate` on an active device.
    #[error("the device is already active; reset it first")]
    AlreadyActive,
    /// A queue the device needs was not handed over, or not set ready.
    #[error("queue {0} is needed but the driver did not set it up")]
    MissingQueue(u16),
    /// A queue index the device does not have.
    #[error("queue {0} does not exist on this device")]
    UnknownQueue(u16),
    /// A queue's rings cannot be used.
    #[error("queue {index} cannot be used")]
    Queue {
        /// The queue index.
        index: u16,
        /// Why.
        #[source]
        source: ring::Error,
    },
    /// Guest memory cannot be used by the packet path.
    #[error("guest memory cannot be used")]
    Memory(#[from] memory::Error),
    /// The backend refused a setting the driver negotiated.
    #[error("the backend refused the negotiated settings")]
    Backend(#[source] io::Error),
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What an interrupt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration space changed (link, announce, needs-reset).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device raises interrupts. The transport implements it.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt. The device calls it at most once per processed batch
    /// and only when the driver has not suppressed it.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;
}

/// A queue handed to the device on activation.
#[derive(Debug)]
pub struct ActivateQueue {
    /// Queue index as the driver numbers it.
    pub index: u16,
    /// The queue as the driver configured it (size, ring addresses, ready,
    /// EVENT_IDX).
    pub queue: Queue,
    /// The eventfd the transport signals when the driver kicks this queue (an
    /// ioeventfd in a KVM VMM), if it has one. The device's ready-made worker
    /// waits on it; a VMM with its own event loop may pass `None` and call the
    /// processing methods itself.
    pub kick: Option<EventFd>,
}

/// A virtio device as a transport sees it. `M` is the guest memory type.
pub trait VirtioDevice<M: GuestMemoryBackend>: Send {
    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue, in queue-index order. Its length is the
    /// number of queues the device has.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// Accepts or refuses the set the driver acknowledged. Called when the driver
    /// sets `FEATURES_OK`; on error the transport clears `FEATURES_OK`.
    fn ack_features(&mut self, features: u64) -> Result<()>;

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
    ) -> Result<()>;

    /// Returns the device to its initial state (driver wrote 0 to the status).
    fn reset(&mut self);

    /// Whether the device hit an error it cannot recover from and wants the
    /// transport to set `DEVICE_NEEDS_RESET` in the status it shows the driver.
    fn needs_reset(&self) -> bool;
}
