//! The virtio-net failover coordinator.
//!
//! A VM with failover has a virtio-net *standby* that offers
//! `VIRTIO_NET_F_STANDBY` and a passed-through *primary* (an SR-IOV VF) whose
//! `failover_pair_id` names the standby. The guest's `net_failover` bonds the
//! two by MAC. [`Coordinator`] is the host's half of that handshake, as QEMU
//! does it and better:
//!
//! - **Pairing** ([`Coordinator::add_standby`], [`Coordinator::add_primary`],
//!   in any order): a primary whose standby has failover on is held out of its
//!   slot, also when it is registered before its standby (QEMU plugs it, its
//!   hotplug/2_reverse bug); one whose pair id names no failover standby is an
//!   ordinary device (QEMU's params/on_mismatch). Refusals carry QEMU's texts
//!   and name the devices. A primary whose MAC differs from its standby's is
//!   reported at pairing time (QEMU and libvirt never check).
//! - **Negotiation**: the standby's transport (or device, or the VMM's own
//!   vhost-user frontend) raises [`FeaturesAcked`](virtio_device::FeaturesAcked);
//!   when STANDBY is in the set the coordinator emits `FAILOVER_NEGOTIATED`
//!   and hot-plugs the primary through its slot, and `PRIMARY_PLUGGED` follows
//!   when the guest has enabled it. A guest that never acknowledges STANDBY
//!   never sees the primary, and migration never waits for it.
//! - **Migration, source** ([`Coordinator::prepare_outgoing`]): every primary
//!   the guest has is unplugged (`UNPLUG_PRIMARY`); the returned
//!   [`OutgoingMigration`] moves from setup to wait-unplug to active the
//!   moment the guest's last eject completes, fails after a bounded wait for a
//!   guest that never ejects ([`UnplugWait`], 30 s by default), and on cancel
//!   or failure withdraws the unplugs the guest has not acted on and plugs
//!   back every primary that left.
//! - **Make before break** ([`Primary::link`], a [`PrimaryLink`] the VMM
//!   implements): QEMU unplugs the primary while it still carries the guest's
//!   traffic, and frames in flight are lost. With a link hook the coordinator
//!   takes the primary's link down first (`PRIMARY_LINK_DOWN`), so the guest's
//!   `net_failover` moves its transmit path to the standby, and requests the
//!   unplug when the standby transmits ([`Coordinator::standby_traffic`]) or
//!   after the switch wait ([`DEFAULT_SWITCH_WAIT`], 200 ms):
//!   `SWITCHED_TO_STANDBY`, then `UNPLUG_PRIMARY`. A cancel or failure brings
//!   the link back up (`PRIMARY_LINK_UP`) before any replug. A failing hook is
//!   logged and the primary unplugged at once: the switch is an optimisation,
//!   the unplug is what the migration needs.
//! - **Pre-flight** ([`Coordinator::destination_offer`] on the destination,
//!   [`Coordinator::preflight`] or [`Coordinator::prepare_outgoing_to`] on the
//!   source): before anything is unplugged, the source checks that the
//!   destination has each standby, with failover on where the guest
//!   negotiated STANDBY, offering every feature bit the guest acknowledged,
//!   and a primary for each negotiated pair (unless allowed absent). Every
//!   problem is reported at once ([`MigrationError::Preflight`]); QEMU
//!   unplugs first and can lose the guest.
//! - **Migration, destination** ([`Coordinator::prepare_incoming`],
//!   [`Coordinator::complete_incoming`]): the restored standby's
//!   acknowledgement arrives by the same route; the primary is plugged before
//!   the guest resumes, and a destination without one warns and runs on the
//!   standby.
//! - **Events**: a typed stream ([`Event`], each [`TimedEvent`] stamped on a
//!   [`Clock`]), JSON lines in the spirit of QMP events with the `serde`
//!   feature (on by default). Listeners never run inside the guest's register
//!   write: events a completion causes wait for
//!   [`Coordinator::run_deferred`] (see the threads and locks of
//!   [`Coordinator`]).
//!
//! It knows no concrete device. It works over
//! [`HotplugSlot`](pcie_hotplug::HotplugSlot) and its
//! [`Completion`](pcie_hotplug::Completion), `FeaturesAcked`,
//! [`PciHandle`](vmm_pci::PciHandle) for the primary, and the
//! [`device_state`] contract ([`Coordinator::ready_to_save`]). It never polls:
//! every state change comes from a VMM call, a `FeaturesAcked` event, or a
//! completion (which fires inside the guest's register write that finishes the
//! plug or unplug). Timeouts are the VMM's timers: [`Coordinator::deadline`]
//! says when, [`Coordinator::check_deadline`] is the timer firing.
//!
//! # Wiring it
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use failover::{Coordinator, Event, EventLog, Primary, Slot, Standby};
//! use pcie_hotplug::RootPortBuilder;
//! use virtio_device::FeaturesAcked;
//! use vmm_pci::{EventFdMsi, PciHandle};
//!
//! # let vf: PciHandle = vmm_pci::testing::StubEndpoint::vf();
//! let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
//! let irqs = Arc::new(EventFdMsi::new(1).unwrap());
//! // The empty hot-plug port the primary goes into (on your PCI bus too).
//! let rp1 = Arc::new(Mutex::new(RootPortBuilder::new("rp1", 2).build(irqs)));
//!
//! let events = EventLog::new();
//! let coordinator = Coordinator::builder().listener(Arc::new(events.clone())).build();
//! coordinator.add_standby(Standby::new("net1").mac(mac)).unwrap();
//! coordinator
//!     .add_primary(Primary::new("hostdev0", "net1", vf, Slot::port("rp1", &rp1)).mac(mac))
//!     .unwrap();
//! coordinator.machine_ready();
//! // Give the standby's transport a clone: `standby.add_features_listener(Arc::new(
//! // coordinator.clone()))`. When the driver acknowledges STANDBY:
//! coordinator.features_acked(&FeaturesAcked {
//!     device_id: "net1".into(),
//!     device_type: 1,
//!     features: 1 << 62 | 1 << 32,
//!     restored: false,
//! });
//! assert_eq!(
//!     events.kinds()[2..],
//!     [Event::FailoverNegotiated { standby: "net1".into() }]
//! );
//! // The primary is in the slot; PRIMARY_PLUGGED follows once the guest enables it.
//! assert!(rp1.lock().unwrap().slot_state().present);
//! # use pcie_hotplug::HotplugSlot;
//! ```
//!
//! The `config` module (the `config` feature, on by default) reads the pairs
//! from a declarative TOML or JSON teaming configuration in libvirt's
//! vocabulary, checks it with every error reported at once, and gives the
//! `Standby` and what each `Primary` needs.
//!
//! The workspace README's `failover` section shows a whole VMM, migration
//! hooks and the event stream included.

#![deny(missing_docs)]

mod clock;
#[cfg(feature = "config")]
pub mod config;
mod coordinator;
mod event;
pub mod migration;
mod registry;

pub use clock::{Clock, MonotonicClock};
pub use coordinator::{Coordinator, CoordinatorBuilder, PrimaryState};
#[cfg(feature = "serde")]
pub use event::JsonLines;
pub use event::{Event, EventListener, EventLog, MacAddress, TimedEvent, UnpairedReason};
pub use migration::{
    DEFAULT_SWITCH_WAIT, DEFAULT_UNPLUG_TIMEOUT, DestinationOffer, Error as MigrationError,
    MigrationState, OutgoingMigration, StandbyOffer, UnplugWait,
};
pub use registry::{Error as RegistryError, Primary, PrimaryLink, SharedSlot, Slot, Standby};
