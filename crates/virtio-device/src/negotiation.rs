//! "The driver acknowledged this feature set": the event a failover coordinator
//! waits for, and the notifier every route raises it through.
//!
//! QEMU emits `FAILOVER_NEGOTIATED` and hot-plugs the hidden primary when the
//! driver acknowledges `VIRTIO_NET_F_STANDBY`; on a migration destination it does
//! the same when it loads a device state in which STANDBY was acknowledged. The
//! acknowledgement is seen in different places depending on what runs the
//! standby:
//!
//! - a transport sees `FEATURES_OK` (this workspace's `virtio-pci` raises the
//!   event there, for any device type);
//! - an in-process device sees [`ack_features`](crate::VirtioDevice::ack_features)
//!   (`virtio-net-standby` raises it when the set holds STANDBY);
//! - a VMM whose standby runs out of process (vhost-user) has its own frontend,
//!   which sees the features it forwards: it holds an [`AckNotifier`] and calls
//!   [`AckNotifier::acked`] itself.
//!
//! All three raise the one event type, [`FeaturesAcked`], once per negotiation:
//! a second acknowledgement of the same set (a driver writing `FEATURES_OK`
//! twice) does not repeat it; [`AckNotifier::reset`] (the driver reset the
//! device) starts a new negotiation.

use std::sync::Arc;

/// The driver acknowledged a feature set on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeaturesAcked {
    /// The device's id in the VMM: for a standby, what the primary's
    /// `failover_pair_id` names.
    pub device_id: String,
    /// The virtio device type (`VIRTIO_ID_*`).
    pub device_type: u32,
    /// The full feature set the driver acknowledged.
    pub features: u64,
    /// True when the event comes from restoring a saved state (a migration
    /// destination) rather than from a live negotiation.
    pub restored: bool,
}

impl FeaturesAcked {
    /// Whether feature bit `bit` (a bit number, as `virtio-bindings` gives them)
    /// was acknowledged.
    pub fn has(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }
}

/// Told when a driver acknowledges a feature set. Implemented for closures.
///
/// Called on the thread that handles the driver's `FEATURES_OK` write (or the
/// restore), while the object that raises it is borrowed: queue work for later
/// rather than calling back into that transport or device, and do not block.
pub trait FeaturesListener: Send + Sync {
    /// The driver acknowledged `event.features` on `event.device_id`.
    fn features_acked(&self, event: &FeaturesAcked);
}

impl<F: Fn(&FeaturesAcked) + Send + Sync> FeaturesListener for F {
    fn features_acked(&self, event: &FeaturesAcked) {
        self(event)
    }
}

/// Raises [`FeaturesAcked`] to its listeners, once per negotiation.
///
/// A transport, a device, or a VMM's own frontend holds one per device:
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use virtio_device::{AckNotifier, FeaturesAcked};
/// use virtio_device::virtio_bindings::{virtio_ids::VIRTIO_ID_NET, virtio_net::VIRTIO_NET_F_STANDBY};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let mut n = AckNotifier::new("net1", VIRTIO_ID_NET);
/// let s = seen.clone();
/// n.add_listener(Arc::new(move |e: &FeaturesAcked| s.lock().unwrap().push(e.clone())));
///
/// let set = (1u64 << 32) | (1 << VIRTIO_NET_F_STANDBY);
/// assert!(n.acked(set));            // the frontend saw FEATURES_OK
/// assert!(!n.acked(set));           // written twice: still one negotiation
/// n.reset();                        // the driver reset the device
/// assert!(n.acked(set));            // a new negotiation
/// assert_eq!(seen.lock().unwrap().len(), 2);
/// assert!(seen.lock().unwrap()[0].has(VIRTIO_NET_F_STANDBY));
/// ```
#[derive(Clone)]
pub struct AckNotifier {
    device_id: String,
    device_type: u32,
    required: u64,
    listeners: Vec<Arc<dyn FeaturesListener>>,
    current: Option<FeaturesAcked>,
}

impl std::fmt::Debug for AckNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckNotifier")
            .field("device_id", &self.device_id)
            .field("device_type", &self.device_type)
            .field("required", &format_args!("{:#x}", self.required))
            .field("listeners", &self.listeners.len())
            .field("current", &self.current)
            .finish()
    }
}

impl AckNotifier {
    /// A notifier for device `device_id` of virtio type `device_type`, raising
    /// the event for every acknowledged set.
    pub fn new(device_id: impl Into<String>, device_type: u32) -> Self {
        AckNotifier {
            device_id: device_id.into(),
            device_type,
            required: 0,
            listeners: Vec::new(),
            current: None,
        }
    }

    /// Raise the event only for sets that hold every bit of `mask` (for the
    /// STANDBY hook: `1 << VIRTIO_NET_F_STANDBY`).
    pub fn requiring(mut self, mask: u64) -> Self {
        self.required = mask;
        self
    }

    /// The device id the events carry.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Adds a listener. If this negotiation's event was already raised, the new
    /// listener is told at once, so a coordinator registered late misses
    /// nothing.
    pub fn add_listener(&mut self, listener: Arc<dyn FeaturesListener>) {
        if let Some(e) = &self.current {
            listener.features_acked(e);
        }
        self.listeners.push(listener);
    }

    /// The driver acknowledged `features` (a live `FEATURES_OK`). Returns whether
    /// the event was raised: not for a set already raised in this negotiation,
    /// nor for one without the required bits.
    pub fn acked(&mut self, features: u64) -> bool {
        self.raise(features, false)
    }

    /// A saved state in which the driver had acknowledged `features` was
    /// restored (a migration destination). Raised like [`acked`](Self::acked),
    /// with `restored: true`.
    pub fn restored(&mut self, features: u64) -> bool {
        self.raise(features, true)
    }

    /// The driver reset the device: the next acknowledgement is a new
    /// negotiation.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// The event raised in the current negotiation, if any.
    pub fn current(&self) -> Option<&FeaturesAcked> {
        self.current.as_ref()
    }

    fn raise(&mut self, features: u64, restored: bool) -> bool {
        if self
            .current
            .as_ref()
            .is_some_and(|e| e.features == features)
        {
            return false;
        }
        if features & self.required != self.required {
            self.current = None;
            return false;
        }
        let event = FeaturesAcked {
            device_id: self.device_id.clone(),
            device_type: self.device_type,
            features,
            restored,
        };
        log::info!(
            "{}: driver acknowledged features {features:#x}{}",
            self.device_id,
            if restored { " (restored)" } else { "" }
        );
        for l in &self.listeners {
            l.features_acked(&event);
        }
        self.current = Some(event);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn recorder(n: &mut AckNotifier) -> Arc<Mutex<Vec<FeaturesAcked>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        n.add_listener(Arc::new(move |e: &FeaturesAcked| {
            s.lock().unwrap().push(e.clone())
        }));
        seen
    }

    #[test]
    fn once_per_negotiation() {
        let mut n = AckNotifier::new("net1", 1);
        let seen = recorder(&mut n);
        assert!(n.acked(0b101));
        assert!(!n.acked(0b101));
        // A different set without a reset is a new negotiation.
        assert!(n.acked(0b111));
        n.reset();
        assert!(n.current().is_none());
        assert!(n.restored(0b111));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[2],
            FeaturesAcked {
                device_id: "net1".into(),
                device_type: 1,
                features: 0b111,
                restored: true,
            }
        );
    }

    #[test]
    fn required_bits_filter_the_event() {
        let standby = 1u64 << 62;
        let mut n = AckNotifier::new("net1", 1).requiring(standby);
        let seen = recorder(&mut n);
        assert!(!n.acked(1 << 32));
        assert!(n.acked((1 << 32) | standby));
        // Renegotiating without STANDBY ends the negotiation that had it.
        assert!(!n.acked(1 << 32));
        assert!(n.current().is_none());
        assert!(n.acked((1 << 32) | standby));
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(seen.lock().unwrap()[0].has(62));
        assert!(!seen.lock().unwrap()[0].has(64));
    }

    #[test]
    fn a_late_listener_is_told_at_once_and_only_once() {
        let mut n = AckNotifier::new("net1", 1);
        assert!(n.acked(4));
        let seen = recorder(&mut n);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(!n.acked(4));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
