//! What the VMM registers: standbys, primaries and the slots primaries go in,
//! and why a registration is refused.
//!
//! A standby is named by its id (what a primary's `failover_pair_id` names)
//! and says whether failover is on (QEMU's `failover=on`). A primary carries
//! its id, its `failover_pair_id`, the device itself (any
//! [`PciFunction`](vmm_pci::PciFunction) as a [`PciHandle`]) and the [`Slot`] it
//! is hot-plugged into. MAC addresses are optional and only used for the
//! pairing-time warning: the coordinator cannot read a device's MAC itself.
//!
//! Refusals carry QEMU's texts where QEMU has one (`Device with
//! failover_pair_id needs to have id`, `Cannot attach more than one primary
//! device to '%s': '%s' and '%s'`, `Bus '%s' does not support hotplugging`) and
//! name every device involved.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};

use pcie_hotplug::{HotplugSlot, RootPort};
use vmm_pci::config::{CAP_ID_PCIE, CAPABILITIES_POINTER, STATUS, STATUS_CAP_LIST};
use vmm_pci::pcie::{FLAGS, FLAGS_SLOT, SLTCAP, SLTCAP_HPC, SLTCAP_HPS};
use vmm_pci::{PciFunction, PciHandle};

use crate::event::MacAddress;

/// A slot as the coordinator holds it: anything that hot-plugs.
pub type SharedSlot = Arc<Mutex<dyn HotplugSlot + Send>>;

/// The VMM's switch on a primary's link, for make before break: before the
/// coordinator asks the guest to release the primary for migration it takes
/// the primary's link down, so the guest's `net_failover` moves its transmit
/// path to the standby first (it transmits on the primary only while that is
/// running with carrier) and no frame is lost when the primary leaves.
///
/// For a VFIO VF it is the host PF's `ip link set PF vf N state disable`
/// (and `auto` to bring it back); for a virtio-net stand-in without STANDBY,
/// `StandbyNet::set_link_up(false)`, which clears `VIRTIO_NET_S_LINK_UP` and
/// raises a configuration interrupt.
///
/// The coordinator calls it with none of its locks and no slot locked, never
/// inside a guest's register write (a call that a completion causes is
/// deferred to [`Coordinator::run_deferred`](crate::Coordinator::run_deferred)),
/// and never twice at once for one primary. The hook may call the
/// coordinator; the slot and link calls that causes wait for `run_deferred`.
///
/// An error is logged and the migration goes on without the switch: the
/// primary is unplugged at once, as without a hook (the switch is an
/// optimisation, the unplug is what the migration needs). Implemented for
/// closures `Fn(bool) -> std::io::Result<()>`.
pub trait PrimaryLink: Send + Sync {
    /// Takes the primary's link down (`false`) or brings it back up (`true`).
    fn set_link(&self, up: bool) -> std::io::Result<()>;
}

impl<F: Fn(bool) -> std::io::Result<()> + Send + Sync> PrimaryLink for F {
    fn set_link(&self, up: bool) -> std::io::Result<()> {
        self(up)
    }
}

/// Why a standby or primary was not registered. Nothing was registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A primary without an id (QEMU's text, with the standby it names).
    #[error("Device with failover_pair_id needs to have id (failover_pair_id '{standby}')")]
    MissingId {
        /// The standby it names.
        standby: String,
    },
    /// A standby without an id.
    #[error("a standby needs an id: a primary's failover_pair_id names it")]
    MissingStandbyId,
    /// A primary whose `failover_pair_id` is empty.
    #[error(
        "primary '{primary}': failover_pair_id is empty; it must name the standby virtio-net \
         device's id"
    )]
    EmptyPairId {
        /// The primary's id.
        primary: String,
    },
    /// A primary whose `failover_pair_id` names itself.
    #[error(
        "primary '{primary}': failover_pair_id names the device itself; it must name the \
         standby virtio-net device's id"
    )]
    PairedWithItself {
        /// The primary's id.
        primary: String,
    },
    /// The id is already registered (as a standby or a primary).
    #[error(
        "'{id}' is already registered as a {as_what}; every standby and primary needs its own id"
    )]
    DuplicateId {
        /// The id.
        id: String,
        /// `standby` or `primary`.
        as_what: &'static str,
    },
    /// A second primary for the same standby (QEMU's text).
    #[error("Cannot attach more than one primary device to '{standby}': '{first}' and '{second}'")]
    SecondPrimary {
        /// The standby both name.
        standby: String,
        /// The primary registered first.
        first: String,
        /// The primary refused.
        second: String,
    },
    /// The primary's slot cannot hot-plug (QEMU's text, naming the primary).
    #[error(
        "primary '{primary}': Bus '{slot}' does not support hotplugging (a failover primary is \
         hot-plugged when the guest acknowledges STANDBY; put it behind a hot-plug capable port)"
    )]
    NoHotplug {
        /// The primary's id.
        primary: String,
        /// The slot's name.
        slot: String,
    },
    /// The slot was asked to unplug by surprise but cannot.
    #[error(
        "primary '{primary}': slot '{slot}' cannot remove a device by surprise (its Slot \
         Capabilities lack Hot-Plug Surprise); build its port with surprise(true), or unplug \
         with the guest's cooperation"
    )]
    NoSurprise {
        /// The primary's id.
        primary: String,
        /// The slot's name.
        slot: String,
    },
    /// The slot is already another registered primary's.
    #[error(
        "primary '{primary}': slot '{slot}' is already primary '{other}'s; give each primary \
         its own slot"
    )]
    SlotTaken {
        /// The primary refused.
        primary: String,
        /// The slot's name.
        slot: String,
        /// The primary that has it.
        other: String,
    },
    /// The slot holds some other device.
    #[error(
        "primary '{primary}': slot '{slot}' already holds another device; a primary needs an \
         empty slot (or its own device in it)"
    )]
    SlotOccupied {
        /// The primary refused.
        primary: String,
        /// The slot's name.
        slot: String,
    },
}

/// Result of registrations.
pub type Result<T> = std::result::Result<T, Error>;

/// A standby virtio-net device as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    pub(crate) id: String,
    pub(crate) failover: bool,
    pub(crate) mac: Option<MacAddress>,
    pub(crate) offered_features: Option<u64>,
}

impl Standby {
    /// The standby `id` (what its primary's `failover_pair_id` names), with
    /// failover on: its device offers `VIRTIO_NET_F_STANDBY` and its primary is
    /// held until the guest acknowledges it.
    pub fn new(id: impl Into<String>) -> Self {
        Standby {
            id: id.into(),
            failover: true,
            mac: None,
            offered_features: None,
        }
    }

    /// Failover on or off (QEMU's `failover=on|off`; off: a primary naming it
    /// is an ordinary device). Must match whether the device offers STANDBY.
    pub fn failover(mut self, on: bool) -> Self {
        self.failover = on;
        self
    }

    /// The standby's MAC, for the pairing-time check.
    pub fn mac(mut self, mac: impl Into<MacAddress>) -> Self {
        self.mac = Some(mac.into());
        self
    }

    /// The feature bits this side's standby device offers (for a
    /// `StandbyNet`, its `offered_features()`), for the migration pre-flight:
    /// a destination reports them in its
    /// [`DestinationOffer`](crate::DestinationOffer), and the source refuses
    /// a destination that lacks a bit the guest acknowledged. Unknown when
    /// not given, and then not checked.
    pub fn offered_features(mut self, features: u64) -> Self {
        self.offered_features = Some(features);
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Where a primary is hot-plugged: a named [`HotplugSlot`].
#[derive(Clone)]
pub struct Slot {
    pub(crate) name: String,
    pub(crate) slot: SharedSlot,
    pub(crate) hotplug: bool,
    /// Its Slot Capabilities say Hot-Plug Surprise (always for [`Slot::new`]).
    pub(crate) surprise_capable: bool,
    /// Migration removes the primary by surprise ([`Slot::surprise`]).
    pub(crate) surprise: bool,
    /// The slot is a [`RootPort`]: the coordinator installs its guest-removal
    /// callback when it registers the primary.
    pub(crate) port: Option<Arc<Mutex<RootPort>>>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.name)
            .field("hotplug", &self.hotplug)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// The slot of a PCI Express port called `name` (a
    /// [`pcie_hotplug::RootPort`]). Whether it can hot-plug is read from the
    /// port's own registers, as a guest reads it: a PCI Express capability
    /// whose Capabilities register says Slot Implemented and whose Slot
    /// Capabilities has Hot-Plug Capable.
    ///
    /// When `port` is a [`RootPort`], the coordinator that registers the
    /// primary installs the port's
    /// [`on_guest_removal`](RootPort::on_guest_removal) callback (replacing
    /// any other), so a primary the guest removes by itself is reported and
    /// plugged back.
    pub fn port<P: HotplugSlot + PciFunction + 'static>(
        name: impl Into<String>,
        port: &Arc<Mutex<P>>,
    ) -> Self {
        let (hotplug, surprise_capable) = {
            let mut p = port.lock().unwrap_or_else(|e| e.into_inner());
            slot_capabilities(&mut *p)
        };
        let any: &dyn Any = port;
        let root_port = any.downcast_ref::<Arc<Mutex<RootPort>>>().cloned();
        let slot: SharedSlot = port.clone();
        Slot {
            name: name.into(),
            slot,
            hotplug,
            surprise_capable,
            surprise: false,
            port: root_port,
        }
    }

    /// Any other [`HotplugSlot`] (an ACPI hot-plug slot, say), with whether it
    /// can hot-plug as the VMM knows it.
    pub fn new(name: impl Into<String>, slot: SharedSlot, hotplug: bool) -> Self {
        Slot {
            name: name.into(),
            slot,
            hotplug,
            surprise_capable: true,
            surprise: false,
            port: None,
        }
    }

    /// Migration takes the primary out by surprise
    /// ([`HotplugSlot::surprise_remove`]) instead of asking the guest: the
    /// device leaves at once, the guest finds its slot empty (Presence Detect
    /// Changed) and wait-unplug ends there, not after Linux's 5 s
    /// attention-button delay. Frames the primary still carries are lost with
    /// it, so give the primary a [`PrimaryLink`] hook: with make before break
    /// the guest has moved to the standby first. A plug (the replug after a
    /// cancel, the destination's plug) is the usual one. The port must report
    /// Hot-Plug Surprise (`RootPortBuilder::surprise(true)`); registration
    /// refuses it otherwise.
    pub fn surprise(mut self, on: bool) -> Self {
        self.surprise = on;
        self
    }

    /// Whether migration removes the primary by surprise.
    pub fn is_surprise(&self) -> bool {
        self.surprise
    }

    /// The slot's name, as errors and events use it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a device can be hot-plugged into it.
    pub fn hotplug_capable(&self) -> bool {
        self.hotplug
    }
}

/// A primary (a passed-through VF, or any Ethernet-class stand-in) as the
/// coordinator knows it.
#[derive(Clone)]
pub struct Primary {
    pub(crate) id: String,
    pub(crate) pair_id: String,
    pub(crate) device: PciHandle,
    pub(crate) slot: Slot,
    pub(crate) mac: Option<MacAddress>,
    pub(crate) link: Option<Arc<dyn PrimaryLink>>,
}

impl fmt::Debug for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Primary")
            .field("id", &self.id)
            .field("failover_pair_id", &self.pair_id)
            .field("slot", &self.slot)
            .field("mac", &self.mac)
            .field("link", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// The primary `id` (QEMU's `id=`; empty means none and is refused),
    /// paired with the standby `failover_pair_id`, which the coordinator
    /// plugs into `slot` when the time comes. Validate the device itself
    /// (Ethernet class, alone in its slot) with `vfio_primary::FailoverPair`
    /// before registering it.
    pub fn new(
        id: impl Into<String>,
        failover_pair_id: impl Into<String>,
        device: PciHandle,
        slot: Slot,
    ) -> Self {
        Primary {
            id: id.into(),
            pair_id: failover_pair_id.into(),
            device,
            slot,
            mac: None,
            link: None,
        }
    }

    /// The primary's MAC, for the pairing-time check.
    pub fn mac(mut self, mac: impl Into<MacAddress>) -> Self {
        self.mac = Some(mac.into());
        self
    }

    /// The switch on the primary's link, for make before break (see
    /// [`PrimaryLink`]). With it, an outgoing migration takes the link down
    /// (`PRIMARY_LINK_DOWN`) and requests the unplug only once the standby
    /// carries the guest's traffic
    /// ([`Coordinator::standby_traffic`](crate::Coordinator::standby_traffic))
    /// or the switch wait has passed; a cancel or failure brings it back up
    /// (`PRIMARY_LINK_UP`) before the primary is plugged back. Without it the
    /// primary is unplugged at once, as QEMU does.
    pub fn link(mut self, link: Arc<dyn PrimaryLink>) -> Self {
        self.link = Some(link);
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The standby it names.
    pub fn failover_pair_id(&self) -> &str {
        &self.pair_id
    }

    /// The checks that need only the primary itself: an id, a pair id naming
    /// another device, a slot that can hot-plug (in QEMU's order).
    pub(crate) fn check(&self) -> Result<()> {
        if self.id.is_empty() {
            return Err(Error::MissingId {
                standby: self.pair_id.clone(),
            });
        }
        if self.pair_id.is_empty() {
            return Err(Error::EmptyPairId {
                primary: self.id.clone(),
            });
        }
        if self.pair_id == self.id {
            return Err(Error::PairedWithItself {
                primary: self.id.clone(),
            });
        }
        if !self.slot.hotplug {
            return Err(Error::NoHotplug {
                primary: self.id.clone(),
                slot: self.slot.name.clone(),
            });
        }
        if self.slot.surprise && !self.slot.surprise_capable {
            return Err(Error::NoSurprise {
                primary: self.id.clone(),
                slot: self.slot.name.clone(),
            });
        }
        Ok(())
    }
}

fn config_u32(f: &mut dyn PciFunction, offset: u16) -> u32 {
    let mut b = [0; 4];
    f.read_config(offset & !3, &mut b);
    u32::from_le_bytes(b) >> ((offset & 3) * 8)
}

/// Whether the bridge `f`'s slot can hot-plug: its PCI Express capability
/// says Slot Implemented and Slot Capabilities has Hot-Plug Capable. The
/// capability list is walked as a guest walks it (at most 48 entries).
/// (Hot-Plug Capable, Hot-Plug Surprise) from a port's registers.
fn slot_capabilities(f: &mut dyn PciFunction) -> (bool, bool) {
    if config_u32(f, STATUS) as u16 & STATUS_CAP_LIST == 0 {
        return (false, false);
    }
    let mut ptr = config_u32(f, CAPABILITIES_POINTER) as u8 as u16 & !3;
    for _ in 0..48 {
        if ptr < 0x40 {
            return (false, false);
        }
        let head = config_u32(f, ptr) as u16;
        if head as u8 == CAP_ID_PCIE {
            let flags = config_u32(f, ptr + FLAGS) as u16;
            if flags & FLAGS_SLOT == 0 {
                return (false, false);
            }
            let cap = config_u32(f, ptr + SLTCAP);
            return (cap & SLTCAP_HPC != 0, cap & SLTCAP_HPS != 0);
        }
        ptr = (head >> 8) & !3;
    }
    (false, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcie_hotplug::RootPortBuilder;
    use vmm_pci::testing::{RecordingMsi, StubEndpoint};

    fn port(name: &str, hotplug: bool) -> Slot {
        let p = Arc::new(Mutex::new(
            RootPortBuilder::new(name, 1)
                .hotplug(hotplug)
                .build(Arc::new(RecordingMsi::default())),
        ));
        Slot::port(name, &p)
    }

    #[test]
    fn a_surprise_slot_needs_a_port_with_hot_plug_surprise() {
        let refused = Primary::new(
            "hostdev0",
            "net1",
            StubEndpoint::vf(),
            port("rp1", true).surprise(true),
        );
        assert_eq!(
            refused.check().unwrap_err().to_string(),
            "primary 'hostdev0': slot 'rp1' cannot remove a device by surprise (its Slot \
             Capabilities lack Hot-Plug Surprise); build its port with surprise(true), or unplug \
             with the guest's cooperation"
        );
        let p = Arc::new(Mutex::new(
            RootPortBuilder::new("rp2", 2)
                .surprise(true)
                .build(Arc::new(RecordingMsi::default())),
        ));
        let slot = Slot::port("rp2", &p).surprise(true);
        assert!(slot.is_surprise());
        assert!(
            Primary::new("hostdev0", "net1", StubEndpoint::vf(), slot)
                .check()
                .is_ok()
        );
    }

    #[test]
    fn a_port_says_whether_its_slot_can_hotplug() {
        assert!(port("rp1", true).hotplug_capable());
        assert!(
            !port("rp1", true).surprise_capable,
            "RootPortBuilder's default"
        );
        assert!(!port("rp2", false).hotplug_capable());
        // An endpoint has no slot at all.
        let ep = StubEndpoint::vf();
        assert_eq!(slot_capabilities(&mut *ep.lock().unwrap()), (false, false));
    }

    #[test]
    fn refusals_carry_qemus_texts_and_name_the_devices() {
        let p = |id: &str, pair: &str, slot: Slot| Primary::new(id, pair, StubEndpoint::vf(), slot);
        let e = p("", "standby0", port("root1", true)).check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "Device with failover_pair_id needs to have id (failover_pair_id 'standby0')"
        );
        let e = p("primary0", "", port("root1", true)).check().unwrap_err();
        assert_eq!(
            e,
            Error::EmptyPairId {
                primary: "primary0".into()
            }
        );
        let e = p("primary0", "primary0", port("root1", true))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("names the device itself"), "{e}");
        let e = p("primary0", "standby0", port("pcie.0", false))
            .check()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("primary 'primary0': Bus 'pcie.0' does not support hotplugging"),
            "{e}"
        );
        assert!(
            p("primary0", "standby0", port("root1", true))
                .check()
                .is_ok()
        );
        assert_eq!(
            Error::SecondPrimary {
                standby: "standby0".into(),
                first: "primary0".into(),
                second: "primary1".into()
            }
            .to_string(),
            "Cannot attach more than one primary device to 'standby0': 'primary0' and 'primary1'"
        );
    }

    #[test]
    fn builders_keep_what_they_are_given() {
        let s = Standby::new("net1").failover(false).mac([2, 0, 0, 0, 0, 1]);
        assert_eq!(
            (s.id(), s.failover, s.mac),
            ("net1", false, Some(MacAddress([2, 0, 0, 0, 0, 1])))
        );
        let p = Primary::new("hostdev0", "net1", StubEndpoint::vf(), port("rp1", true))
            .mac([2, 0, 0, 0, 0, 2]);
        assert_eq!((p.id(), p.failover_pair_id()), ("hostdev0", "net1"));
        assert!(format!("{p:?}").contains("rp1"));
        let shared: SharedSlot = p.slot.slot.clone();
        let s = Slot::new("acpi-slot-3", shared, true);
        assert_eq!((s.name(), s.hotplug_capable()), ("acpi-slot-3", true));
    }
}
