//! The saved state of a [`RootPort`].
//!
//! What the guest sees of a port is its config space: the bridge's bus numbers
//! and windows and command register, the PCI Express capability (Slot Control
//! enables, indicators and power; Slot Status events, Presence Detect and the
//! interlock; Link Status) and the MSI capability (including a hot-plug
//! interrupt held pending under a mask). [`RootPortState`] carries it, with
//! whether the slot holds a device.
//!
//! The port's other fields follow from it: the interrupt edge tracker is the
//! interrupt condition of the restored registers (so an event already pending
//! does not interrupt again), the INTx level is the restored Interrupt Status.
//! The [`PortCounters`](super::PortCounters) are this host's statistics and
//! restart from zero.
//!
//! # The device in the slot
//!
//! The device behind the port is a separate object (a virtio-pci function, a
//! VFIO device) with a state of its own: the VMM saves and restores it through
//! its own [`Persist`], and the port's state only says whether the slot holds
//! one. On the destination, build the device and restore its state, then give
//! it to the port with [`RootPort::restore_with_device`] (or
//! [`cold_plug`](crate::HotplugSlot::cold_plug) it, which raises no event, and
//! then [`Persist::restore`]). Presence Detect, the link and slot power come from
//! the saved registers, so the guest sees no presence change and no interrupt.

use device_state::{Encode, Error, Persist, Reader, Result, Writer};
use vmm_pci::config::{STATUS, STATUS_INTERRUPT};
use vmm_pci::pcie::{
    LNKCAP, LNKSTA, LNKSTA_DLLLA, SLTCAP, SLTCTL, SLTCTL_PIC, SLTSTA, SLTSTA_ABP, SLTSTA_PDS,
};
use vmm_pci::{ConfigSpaceState, MsiState, PciHandle};

use super::{Cancel, Pending, RootPort};
use crate::slot::Operation;

/// The guest-visible state of a [`RootPort`]; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RootPortState {
    /// The port's config space.
    pub config: ConfigSpaceState,
    /// Offset of the PCI Express capability (configuration).
    pub pcie_cap: u16,
    /// Layout of the MSI capability (configuration; its registers are in
    /// `config`).
    pub msi: Option<MsiState>,
    /// Whether the slot holds a device. The device itself is saved separately.
    pub occupied: bool,
    /// The guest powered the slot off (or the device was removed by surprise)
    /// and has not turned the power indicator off yet: Linux's 1 s wait after a
    /// power off, in which it discards presence events. A plug on the
    /// destination is held until the guest turns the indicator off, as on the
    /// source (see [`RootPort`]'s replug window).
    pub guest_powering_off: bool,
}

impl Encode for RootPortState {
    const MAGIC: [u8; 8] = *b"PCIERTPT";
    // 2: `guest_powering_off`.
    const VERSION: u16 = 2;

    fn encode(&self, w: &mut Writer) {
        w.put(&self.config);
        w.u16(self.pcie_cap);
        w.opt(self.msi.as_ref(), |w, m| w.put(m));
        w.bool(self.occupied);
        w.bool(self.guest_powering_off);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(RootPortState {
            config: r.get()?,
            pcie_cap: r.u16("PCI Express capability offset")?,
            msi: r.opt("MSI capability", |r| r.get())?,
            occupied: r.bool("slot occupied")?,
            guest_powering_off: r.bool("guest powering the slot off")?,
        })
    }
}

fn presence(p: bool) -> String {
    if p { "present" } else { "absent" }.to_string()
}

impl RootPort {
    /// Why a port with `p` in flight cannot be saved, and what to wait for.
    fn busy(&self, p: &Pending) -> Error {
        let name = &self.cfg.name;
        let what = match p.op {
            Operation::Plug if p.held.is_some() => "the plug is held until the guest turns the \
                 power indicator off after powering the slot off (Linux waits 1 s); wait for the \
                 plug's Completion, or take the device back with request_unplug"
                .to_string(),
            Operation::Plug => "the guest has not yet powered the slot and turned its power \
                 indicator on; wait for the plug's Completion, or take the device back with \
                 request_unplug"
                .to_string(),
            Operation::Unplug => {
                let stage = if p.restored.is_some() {
                    "the guest turned its power indicator back on at the very end of its \
                     5-second window and may power the slot off anyway"
                } else if p.cancel == Cancel::TooLate {
                    "a cancel came too late for the guest's 5-second window; the guest will \
                     power the slot off"
                } else if p.window_opened.is_some() {
                    "the guest's 5-second window is open (power indicator blinking)"
                } else if p.cancel == Cancel::Held {
                    "a cancel is held until the guest opens its 5-second window"
                } else if self.sta() & SLTSTA_ABP != 0 {
                    "the attention button is pressed and the guest has not taken the press"
                } else {
                    "the guest took the attention button press and has not opened its \
                     5-second window yet"
                };
                format!(
                    "{stage}; wait for the unplug's Completion (the guest powers the slot off, \
                     or keeps the device on a cancel)"
                )
            }
        };
        Error::Busy(format!("a {} is in flight on port '{name}': {what}", p.op))
    }

    /// Everything [`Persist::restore`] checks, with `occupied` the slot's
    /// occupancy after the restore.
    fn check_restore(&self, state: &RootPortState, occupied: bool) -> Result<()> {
        if let Some(p) = self.pending.as_ref().filter(|_| self.expire_shared()) {
            return Err(Error::Refused(format!(
                "port '{}' has a {} in flight; restore onto a freshly built port",
                self.cfg.name, p.op
            )));
        }
        Error::check_hex("PCI Express capability offset", state.pcie_cap, self.cap)?;
        if let Some(saved) = state.config.u32_at(self.cap + SLTCAP) {
            Error::check_hex(
                "slot capabilities",
                saved,
                self.cs.get_u32(self.cap + SLTCAP),
            )?;
        }
        if let Some(saved) = state.config.u32_at(self.cap + LNKCAP) {
            Error::check_hex(
                "link capabilities",
                saved,
                self.cs.get_u32(self.cap + LNKCAP),
            )?;
        }
        match (&state.msi, self.msi) {
            (Some(saved), Some(mut msi)) => msi.restore(saved)?,
            (None, None) => {}
            (saved, msi) => {
                return Err(Error::Mismatch {
                    field: "MSI capability".into(),
                    saved: presence(saved.is_some()),
                    device: presence(msi.is_some()),
                });
            }
        }
        self.cs.check_restore(&state.config)?;
        let sta = state.config.u16_at(self.cap + SLTSTA).unwrap_or(0);
        let lnksta = state.config.u16_at(self.cap + LNKSTA).unwrap_or(0);
        for (what, bit) in [
            ("Presence Detect State", sta & SLTSTA_PDS != 0),
            ("Data Link Layer Link Active", lnksta & LNKSTA_DLLLA != 0),
        ] {
            if bit != state.occupied {
                return Err(Error::Invalid(format!(
                    "the slot is {} but {what} is {}",
                    if state.occupied { "occupied" } else { "empty" },
                    if bit { "set" } else { "clear" }
                )));
            }
        }
        if state.guest_powering_off && state.occupied {
            return Err(Error::Invalid(
                "the slot is occupied but the guest is said to be powering it off".into(),
            ));
        }
        if state.occupied != occupied {
            return Err(Error::Mismatch {
                field: format!("device in the slot of port '{}'", self.cfg.name),
                saved: presence(state.occupied),
                device: presence(occupied),
            });
        }
        Ok(())
    }

    /// Restores `state` and puts `device` in the slot, without raising any
    /// event: the guest sees the slot, its device and its link as they were on
    /// the source. Pass the device the VMM restored from its own saved state when
    /// the state is [`occupied`](RootPortState::occupied), `None` when it is not
    /// (or when the device was already put in with
    /// [`cold_plug`](crate::HotplugSlot::cold_plug)).
    ///
    /// Refused, with nothing applied and `device` dropped, when the state does
    /// not fit ([`Error::Mismatch`] for another configuration or occupancy,
    /// [`Error::Invalid`] for an impossible state) or when the port is not
    /// freshly built ([`Error::Refused`]: an operation in flight, or a second
    /// device).
    ///
    /// The INTx line is driven to the saved level (a level, not a new event) and
    /// the MSI sink is told the saved route; no MSI is sent. A hot-plug
    /// interrupt the guest had masked stays pending in the MSI capability and is
    /// sent when the guest unmasks it.
    pub fn restore_with_device(
        &mut self,
        state: &RootPortState,
        device: Option<PciHandle>,
    ) -> Result<()> {
        self.expire();
        if device.is_some() && self.device.is_some() {
            return Err(Error::Refused(format!(
                "the slot of port '{}' already holds a device",
                self.cfg.name
            )));
        }
        self.check_restore(state, self.device.is_some() || device.is_some())?;
        self.cs.restore(&state.config)?;
        if let Some(d) = device {
            self.device = Some(d);
        }
        self.guest_powering_off = state.guest_powering_off;
        self.irq_asserted = self.interrupt_condition();
        let level = self.cs.get_u16(STATUS) & STATUS_INTERRUPT != 0;
        if level != self.intx_level {
            self.intx_level = level;
            if let Some(intx) = &self.cfg.intx {
                intx.set_level(level);
            }
        }
        if let Some(msi) = self.msi {
            msi.sync_routes(&self.cs, &*self.msi_sink);
        }
        log::debug!(
            "{}: restored (slot {}, power indicator {:#x})",
            self.cfg.name,
            if state.occupied { "occupied" } else { "empty" },
            (self.cs.get_u16(self.cap + SLTCTL) & SLTCTL_PIC) >> 8
        );
        Ok(())
    }
}

impl Persist for RootPort {
    type State = RootPortState;

    /// Refuses with [`Error::Busy`] while a plug or unplug is in flight (its
    /// [`Completion`](crate::Completion) has not resolved): the text says which
    /// stage it is in and what to wait for.
    fn save(&self) -> Result<RootPortState> {
        // A pending decision that is due resolves first (its Completion
        // fires), so a save needs no guest access to go through.
        if let Some(p) = self.pending.as_ref().filter(|_| self.expire_shared()) {
            return Err(self.busy(p));
        }
        Ok(RootPortState {
            config: self.cs.save()?,
            pcie_cap: self.cap,
            msi: self.msi.map(|m| m.save()).transpose()?,
            occupied: self.device.is_some(),
            guest_powering_off: self.guest_powering_off,
        })
    }

    /// [`RootPort::restore_with_device`] with no new device: the slot must
    /// already hold one (from [`cold_plug`](crate::HotplugSlot::cold_plug)) iff
    /// the state is occupied.
    fn restore(&mut self, state: &RootPortState) -> Result<()> {
        self.restore_with_device(state, None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use device_state::{from_bytes, to_bytes};
    use vmm_pci::config::{MEMORY_BASE, PRIMARY_BUS};
    use vmm_pci::pcie::*;
    use vmm_pci::{MsiMessage, PciFunction, PciIds};

    use super::*;
    use crate::completion::HotplugOutcome;
    use crate::root_port::RootPortBuilder;
    use crate::slot::HotplugSlot;

    use crate::root_port::tests::{Rig, nic};

    impl Rig {
        /// pciehp's notification enables with Presence Detect Changed too, and
        /// the events that were pending acknowledged.
        fn enable_all_notifications(&mut self) {
            self.cmd(
                SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_HPIE | SLTCTL_CCIE,
                SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_HPIE | SLTCTL_CCIE,
            );
            let sta = self.sta();
            self.ack(sta & SLTSTA_EVENTS);
            self.msis.take_delivered().len();
        }
        /// The whole config space as the guest reads it.
        fn view(&mut self) -> Vec<u32> {
            (0..4096u16)
                .step_by(4)
                .map(|o| {
                    let mut b = [0; 4];
                    self.port.read_config(o, &mut b);
                    u32::from_le_bytes(b)
                })
                .collect()
        }
        /// Save, encode, decode.
        fn migrate(&self) -> RootPortState {
            let state = self.port.save().unwrap();
            let bytes = to_bytes(&state);
            assert_eq!(&bytes[..8], b"PCIERTPT");
            let decoded = from_bytes(&bytes).unwrap();
            assert_eq!(decoded, state);
            decoded
        }
    }

    /// A guest that enumerated a cold-plugged device: bus numbers, a window,
    /// MSI, notifications, and a Command Completed it has not acknowledged yet.
    fn running_source() -> Rig {
        let mut r = Rig::hp();
        r.port.cold_plug(nic()).unwrap();
        r.w32(PRIMARY_BUS, 0x00_01_01_00);
        r.w32(MEMORY_BASE, 0xfe1f_fe00);
        r.enable_msi();
        r.enable_all_notifications();
        r.cmd(SLTCTL_AIC_OFF, SLTCTL_AIC);
        assert_eq!(r.sta(), SLTSTA_PDS | SLTSTA_CC);
        assert_eq!(r.msis.take_delivered().len(), 1);
        r
    }

    #[test]
    fn round_trip_with_the_device_reads_the_same_and_raises_nothing() {
        let mut src = running_source();
        let state = src.migrate();
        assert!(state.occupied);

        let mut dst = Rig::hp();
        dst.port.restore_with_device(&state, Some(nic())).unwrap();
        assert_eq!(dst.view(), src.view());
        assert_eq!(dst.port.save().unwrap(), state);
        assert_eq!(dst.port.slot_state(), src.port.slot_state());
        assert_eq!(
            dst.msis.take_delivered().len(),
            0,
            "no interrupt from restoring"
        );
        assert!(!dst.line.level());
        let route = dst.msis.routes().last().copied();
        assert_eq!(
            route,
            Some((
                0,
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x30
                })
            ))
        );
        // The pending Command Completed already asserted the interrupt: another
        // event is no new edge, exactly as on the source.
        dst.cmd(0, 0);
        assert_eq!(dst.msis.take_delivered().len(), 0);
        dst.ack(SLTSTA_EVENTS);

        // The restored bridge forwards config cycles to the device behind it.
        let mut root = vmm_pci::PciRoot::new();
        let port = Arc::new(Mutex::new(dst.port));
        root.add(1, 0, port.clone()).unwrap();
        let mut b = [0; 4];
        root.config_read(vmm_pci::Bdf::new(1, 0, 0), 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x154c_8086);
    }

    #[test]
    fn restored_port_unplugs_its_device_with_the_right_events() {
        let src = running_source();
        let state = src.migrate();
        let mut dst = Rig::hp();
        dst.port.restore_with_device(&state, Some(nic())).unwrap();
        dst.ack(SLTSTA_EVENTS);
        let done = dst.port.request_unplug().unwrap();
        assert_eq!(dst.sta(), SLTSTA_PDS | SLTSTA_ABP);
        assert_eq!(dst.msis.take_delivered().len(), 1);
        dst.ack(SLTSTA_ABP);
        dst.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        dst.ack(SLTSTA_CC);
        dst.cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert_eq!(done.outcome(), Some(HotplugOutcome::Unplugged));
        assert_eq!(dst.sta(), SLTSTA_PDC | SLTSTA_DLLSC | SLTSTA_CC);
        assert_eq!(dst.r16(dst.cap + LNKSTA) & LNKSTA_DLLLA, 0);
        assert!(dst.port.device().is_none());
    }

    #[test]
    fn restored_empty_slot_hot_plugs() {
        let mut src = Rig::hp();
        src.enable_msi();
        src.enable_all_notifications();
        let state = src.migrate();
        assert!(!state.occupied);
        let mut dst = Rig::hp();
        dst.port.restore(&state).unwrap();
        assert_eq!(dst.view(), src.view());
        assert_eq!(dst.msis.take_delivered().len(), 0);
        let done = dst.port.plug(nic()).unwrap();
        assert_eq!(
            dst.sta(),
            SLTSTA_PDS | SLTSTA_PDC | SLTSTA_ABP | SLTSTA_DLLSC
        );
        assert_eq!(dst.msis.take_delivered().len(), 1);
        dst.ack(SLTSTA_EVENTS);
        dst.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        dst.cmd(0, SLTCTL_PCC);
        dst.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
        assert_eq!(done.outcome(), Some(HotplugOutcome::Plugged));
        assert_eq!(dst.port.children().len(), 1);
    }

    #[test]
    fn cold_plug_then_restore_equals_restore_with_device() {
        let mut src = running_source();
        let state = src.migrate();
        let mut dst = Rig::hp();
        dst.port.cold_plug(nic()).unwrap();
        dst.port.restore(&state).unwrap();
        assert_eq!(dst.view(), src.view());
        assert_eq!(dst.msis.take_delivered().len(), 0);
        // The device must be in the slot one way or the other, and only once.
        let mut empty = Rig::hp();
        let e = empty.port.restore(&state).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the saved state does not fit this device: device in the slot of port 'rp0' is present in the saved state but absent on this device"
        );
        let e = dst
            .port
            .restore_with_device(&state, Some(nic()))
            .unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e}");
    }

    #[test]
    fn save_is_busy_while_an_operation_is_in_flight() {
        let busy = |r: &Rig| match r.port.save() {
            Err(Error::Busy(text)) => text,
            other => panic!("expected Busy, got {other:?}"),
        };
        // A plug the guest has not finished.
        let mut r = Rig::hp();
        r.enable_msi();
        r.enable_all_notifications();
        let plug = r.port.plug(nic()).unwrap();
        let text = busy(&r);
        assert!(
            text.starts_with("a hot plug is in flight on port 'rp0'")
                && text.contains("wait for the plug's Completion"),
            "{text}"
        );
        r.ack(SLTSTA_EVENTS);
        r.cmd(0, SLTCTL_PCC);
        assert!(r.port.save().is_err(), "powered, indicator not on yet");
        r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
        assert_eq!(plug.outcome(), Some(HotplugOutcome::Plugged));
        r.port.save().unwrap();

        // An unplug: pressed, taken, held cancel, window open.
        let unplug = r.port.request_unplug().unwrap();
        assert!(busy(&r).contains("the attention button is pressed"));
        r.ack(SLTSTA_EVENTS);
        assert!(busy(&r).contains("has not opened its 5-second window"));
        r.port.cancel_unplug().unwrap();
        assert!(busy(&r).contains("a cancel is held"));
        r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        let text = busy(&r);
        assert!(
            text.starts_with("a hot unplug is in flight on port 'rp0'")
                && text.contains("window is open")
                && text.contains("wait for the unplug's Completion"),
            "{text}"
        );
        // The guest aborts on the second press: nothing in flight any more.
        r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
        assert_eq!(unplug.outcome(), Some(HotplugOutcome::Cancelled));
        assert!(r.port.save().unwrap().occupied);
    }

    #[test]
    fn the_replug_window_is_saved_and_holds_a_plug_on_the_destination() {
        let mut src = running_source();
        src.ack(SLTSTA_EVENTS);
        let unplug = src.port.request_unplug().unwrap();
        src.ack(SLTSTA_EVENTS);
        src.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        src.cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert_eq!(unplug.outcome(), Some(HotplugOutcome::Unplugged));
        // Migrated inside the guest's second after power off.
        let state = src.migrate();
        assert!(state.guest_powering_off && !state.occupied);
        let mut dst = Rig::hp();
        dst.port.restore(&state).unwrap();
        assert_eq!(dst.view(), src.view());
        let plug = dst.port.plug(nic()).unwrap();
        assert!(dst.port.plug_held());
        dst.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
        assert!(!dst.port.plug_held());
        assert_eq!(dst.sta() & SLTSTA_PDS, SLTSTA_PDS);
        assert_eq!(plug.outcome(), None);
        // An occupied slot cannot be in that second.
        let mut lying = running_source().migrate();
        lying.guest_powering_off = true;
        let e = Rig::hp()
            .port
            .restore_with_device(&lying, Some(nic()))
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    #[test]
    fn restore_onto_a_busy_port_is_refused() {
        let state = running_source().migrate();
        let mut r = Rig::hp();
        let _plug = r.port.plug(nic()).unwrap();
        let e = r.port.restore(&state).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the device refused the saved state: port 'rp0' has a hot plug in flight; restore onto a freshly built port"
        );
    }

    #[test]
    fn mismatches_are_named_and_apply_nothing() {
        let state = running_source().migrate();
        let ids = PciIds {
            device_id: 0x000d,
            ..crate::root_port::DEFAULT_IDS
        };
        let cases = [
            (
                RootPortBuilder::new("rp0", 6),
                "slot capabilities is 0x2a005b in the saved state but 0x32005b",
            ),
            (
                RootPortBuilder::new("rp0", 5).hotplug(false),
                "slot capabilities is 0x2a005b in the saved state but 0x2a001b",
            ),
            (
                RootPortBuilder::new("rp0", 5).surprise(true),
                "slot capabilities is 0x2a005b in the saved state but 0x2a007b",
            ),
            (
                RootPortBuilder::new("rp0", 5).port_number(2),
                "link capabilities is 0x300011 in the saved state but 0x2300011",
            ),
            (
                RootPortBuilder::new("rp0", 5).ids(ids),
                "device id is 0xc in the saved state but 0xd",
            ),
        ];
        for (b, expect) in cases {
            let mut dst = Rig::new(b);
            let before = dst.view();
            let e = dst
                .port
                .restore_with_device(&state, Some(nic()))
                .unwrap_err();
            assert!(matches!(e, Error::Mismatch { .. }), "{e}");
            assert!(e.to_string().contains(expect), "{e}\n  wants: {expect}");
            assert_eq!(dst.view(), before);
            assert!(dst.port.device().is_none(), "the device was not attached");
        }
        // Occupancy: an empty saved slot, with a device offered.
        let empty = Rig::hp().migrate();
        let e = Rig::hp()
            .port
            .restore_with_device(&empty, Some(nic()))
            .unwrap_err();
        assert!(
            e.to_string().contains(
                "device in the slot of port 'rp0' is absent in the saved state but present"
            ),
            "{e}"
        );
        // A state without the MSI capability.
        let no_msi = RootPortState {
            msi: None,
            ..state.clone()
        };
        let e = Rig::hp()
            .port
            .restore_with_device(&no_msi, Some(nic()))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("MSI capability is absent in the saved state but present"),
            "{e}"
        );
    }

    #[test]
    fn impossible_states_are_invalid() {
        let state = running_source().migrate();
        let mut lying = state.clone();
        lying.occupied = false;
        let mut dst = Rig::hp();
        let e = dst.port.restore(&lying).unwrap_err();
        assert_eq!(
            e,
            Error::Invalid("the slot is empty but Presence Detect State is set".into())
        );
        let mut no_link = state.clone();
        let lnksta = (dst.cap + LNKSTA) as usize;
        no_link.config.bytes[lnksta + 1] &= !((LNKSTA_DLLLA >> 8) as u8);
        let e = dst
            .port
            .restore_with_device(&no_link, Some(nic()))
            .unwrap_err();
        assert_eq!(
            e,
            Error::Invalid("the slot is occupied but Data Link Layer Link Active is clear".into())
        );
        assert!(dst.port.device().is_none());
    }

    #[test]
    fn corrupt_bytes_are_refused() {
        let bytes = to_bytes(&running_source().port.save().unwrap());
        for n in (0..bytes.len()).step_by(5).chain([bytes.len() - 1]) {
            assert!(from_bytes::<RootPortState>(&bytes[..n]).is_err(), "cut {n}");
        }
        for i in (0..bytes.len()).step_by(11) {
            for bit in [0, 5] {
                let mut c = bytes.clone();
                c[i] ^= 1 << bit;
                assert!(from_bytes::<RootPortState>(&c).is_err(), "flip {i}.{bit}");
            }
        }
    }

    #[test]
    fn a_masked_hotplug_interrupt_stays_pending_across_restore() {
        let mut src = Rig::hp();
        src.port.cold_plug(nic()).unwrap();
        src.enable_msi();
        src.enable_all_notifications();
        let msi = src.port.msi.map(|m| m.offset()).unwrap_or(0);
        src.w32(msi + 0x10, 1);
        src.cmd(0, 0);
        assert_eq!(src.msis.take_delivered().len(), 0);
        assert_eq!(src.port.counters().msi_masked, 1);
        let state = src.migrate();
        let mut dst = Rig::hp();
        dst.port.restore_with_device(&state, Some(nic())).unwrap();
        assert_eq!(dst.msis.take_delivered().len(), 0);
        assert_eq!(dst.view(), src.view());
        dst.w32(msi + 0x10, 0);
        assert_eq!(dst.msis.take_delivered().len(), 1, "released on unmask");
    }

    #[test]
    fn the_intx_level_is_restored() {
        let mut src = Rig::hp();
        src.cmd(SLTCTL_HPIE | SLTCTL_CCIE, SLTCTL_HPIE | SLTCTL_CCIE);
        assert!(src.line.level());
        let state = src.migrate();
        let mut dst = Rig::hp();
        dst.port.restore(&state).unwrap();
        assert!(dst.line.level(), "the line is high again");
        assert_eq!(dst.view(), src.view());
        assert_eq!(dst.port.counters().intx_assertions, 0);
        dst.ack(SLTSTA_CC);
        assert!(!dst.line.level());
        assert_eq!(dst.msis.take_delivered().len(), 0);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_with_the_device_reads_the_same_and_raises_nothing() {
        let mut src = running_source();
        let state = src.port.save().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: RootPortState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let mut dst = Rig::hp();
        dst.port.restore_with_device(&back, Some(nic())).unwrap();
        assert_eq!(dst.view(), src.view());
        assert_eq!(dst.port.save().unwrap(), state);
        assert_eq!(dst.port.slot_state(), src.port.slot_state());
        assert_eq!(
            dst.msis.take_delivered().len(),
            0,
            "no interrupt from restoring"
        );
        // The restored port goes on: acknowledging the pending Command
        // Completed and unplugging behave as on the source.
        dst.ack(SLTSTA_EVENTS);
        let done = dst.port.request_unplug().unwrap();
        assert_eq!(dst.sta(), SLTSTA_PDS | SLTSTA_ABP);
        assert_eq!(dst.msis.take_delivered().len(), 1);
        dst.ack(SLTSTA_ABP);
        dst.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        dst.ack(SLTSTA_CC);
        dst.cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert_eq!(done.outcome(), Some(HotplugOutcome::Unplugged));

        // A deserialized state is checked as a decoded one: an empty slot
        // with Presence Detect set is impossible.
        let mut empty: RootPortState = serde_json::from_str(&json).unwrap();
        empty.occupied = false;
        let e = Rig::hp().port.restore(&empty).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
}
