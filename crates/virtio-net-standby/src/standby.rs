//! The STANDBY hook: how the failover coordinator learns that the guest driver is
//! failover-capable and the primary may be plugged.
//!
//! QEMU emits `FAILOVER_NEGOTIATED` and hot-plugs the hidden primary when the
//! driver acknowledges `VIRTIO_NET_F_STANDBY`; on a migration destination it does
//! the same when it loads a device state in which STANDBY was acknowledged. A
//! [`StandbyListener`] registered with the device is told at both moments, once
//! per negotiation: a second acknowledgement of the same negotiation (a driver
//! writing `FEATURES_OK` twice) does not repeat the event; a reset starts a new
//! negotiation.

/// What a [`StandbyListener`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyNegotiated {
    /// The standby device's id: what the primary's `failover_pair_id` names.
    pub device_id: String,
    /// The full feature set the driver acknowledged.
    pub features: u64,
    /// True when the event comes from restoring a snapshot (migration
    /// destination) rather than from a live negotiation.
    pub restored: bool,
}

/// Told when a driver acknowledges STANDBY. Implemented for closures.
///
/// Called on the thread that runs the transport's `FEATURES_OK` handling (or the
/// restore), with no device lock held: it may call back into the device, but it
/// should not block for long.
pub trait StandbyListener: Send + Sync {
    /// The driver acknowledged `VIRTIO_NET_F_STANDBY`.
    fn standby_negotiated(&self, event: &StandbyNegotiated);
}

impl<F: Fn(&StandbyNegotiated) + Send + Sync> StandbyListener for F {
    fn standby_negotiated(&self, event: &StandbyNegotiated) {
        self(event)
    }
}
