//! A PCI Express root port with one native hot-plug slot.
//!
//! [`RootPort`] is a type 1 bridge (class 0x0604) whose PCI Express capability
//! reports a Root Port with a slot: attention button, power controller, attention
//! and power indicators, electromechanical interlock, hot-plug capable, optional
//! hot-plug surprise, and Data Link Layer Link Active reporting. Its Slot Control
//! and Slot Status registers behave as the specification says and as Linux pciehp
//! expects, and its hot-plug events interrupt through MSI (INTx as fallback).
//!
//! The VMM drives the slot through [`HotplugSlot`]:
//! - [`HotplugSlot::cold_plug`] before the guest runs (no event);
//! - [`HotplugSlot::plug`] (presence, link, events; the guest powers the slot);
//! - [`HotplugSlot::request_unplug`] (guest-cooperative: the attention button;
//!   the device leaves the moment the guest turns slot power off);
//! - [`HotplugSlot::cancel_unplug`] (the press taken back if the guest has not
//!   read it, else a second press inside the guest's 5-second window; the
//!   unplug's completion says whether it took);
//! - [`HotplugSlot::surprise_remove`] (for ports built with hot-plug surprise).
//!
//! Plug and unplug return a [`Completion`] that resolves the moment the guest's
//! register write finishes the operation: wait on it, poll its eventfd, `.await`
//! it, or register a callback. There is no polling interval. Every operation
//! completes once, with what the guest did: an unplug whose cancel came too late
//! says `Unplugged`, not `Cancelled`.
//!
//! Linux 6.1 pciehp is the guest the port is built against (Debian's 6.1.192,
//! `drivers/pci/hotplug/pciehp_{ctrl,hpc}.c`): a plug right after an unplug is
//! held through the guest's 1 s wait after power off (see [`RootPort`]), and a
//! cancel is judged against its 5 s button window on the port's [`Clock`].
//!
//! Migration: [`RootPort`] implements [`device_state::Persist`] with
//! [`RootPortState`]. A port with a plug or unplug in flight refuses to be
//! saved; the device in the slot is a separate object the VMM saves itself and
//! re-attaches with [`RootPort::restore_with_device`].

#![deny(missing_docs)]

mod completion;
mod root_port;
mod slot;

pub use completion::{Completion, HotplugOutcome};
pub use root_port::{
    CANCEL_MARGIN, Clock, GuestRemovalCallback, LINUX_BUTTON_DELAY, PortCounters, RootPort,
    RootPortBuilder, RootPortState,
};
pub use slot::{Error, HotplugSlot, Operation, Result, SlotState};
