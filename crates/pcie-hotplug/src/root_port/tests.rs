//! Register-level tests of the root port. Linux-like flows with timings are in
//! the `test-guest` crate's scenarios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_state::Persist;
use vmm_pci::PciFunction;
use vmm_pci::config::{
    BAR0, CLASS_PROG_IF, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY,
    HEADER_TYPE, INTERRUPT_PIN, PRIMARY_BUS, STATUS, STATUS_INTERRUPT,
};
use vmm_pci::pcie::*;
use vmm_pci::testing::{RecordingIntx, RecordingMsi, StubEndpoint};

use super::*;

pub(super) fn nic() -> PciHandle {
    StubEndpoint::ethernet(0x8086, 0x154c, 0x4000)
}

/// A port with recording interrupt sinks; `root_port::state`'s tests use it too.
pub(super) struct Rig {
    pub(super) port: RootPort,
    pub(super) msis: Arc<RecordingMsi>,
    pub(super) line: Arc<RecordingIntx>,
    pub(super) cap: u16,
}

impl Rig {
    pub(super) fn new(b: RootPortBuilder) -> Rig {
        let msis = Arc::new(RecordingMsi::new());
        let line = Arc::new(RecordingIntx::new());
        let port = b.intx(line.clone()).build(msis.clone());
        let cap = port.pcie_cap_offset();
        Rig {
            port,
            msis,
            line,
            cap,
        }
    }
    pub(super) fn hp() -> Rig {
        Rig::new(RootPortBuilder::new("rp0", 5))
    }
    /// A hot-plug port on a manual clock (milliseconds), set with `at`.
    pub(super) fn clocked() -> (Rig, ManualClock) {
        let clock = ManualClock::default();
        let r = Rig::new(RootPortBuilder::new("rp0", 5).clock(clock.as_clock()));
        (r, clock)
    }
    pub(super) fn r16(&mut self, off: u16) -> u16 {
        let mut b = [0; 2];
        self.port.read_config(off, &mut b);
        u16::from_le_bytes(b)
    }
    pub(super) fn r32(&mut self, off: u16) -> u32 {
        let mut b = [0; 4];
        self.port.read_config(off, &mut b);
        u32::from_le_bytes(b)
    }
    pub(super) fn w16(&mut self, off: u16, v: u16) {
        self.port.write_config(off, &v.to_le_bytes());
    }
    pub(super) fn w32(&mut self, off: u16, v: u32) {
        self.port.write_config(off, &v.to_le_bytes());
    }
    pub(super) fn ctl(&mut self) -> u16 {
        self.r16(self.cap + SLTCTL)
    }
    pub(super) fn sta(&mut self) -> u16 {
        self.r16(self.cap + SLTSTA)
    }
    /// A Linux-style masked Slot Control command.
    pub(super) fn cmd(&mut self, value: u16, mask: u16) {
        let ctl = self.ctl();
        self.w16(self.cap + SLTCTL, (ctl & !mask) | value);
    }
    pub(super) fn ack(&mut self, bits: u16) {
        self.w16(self.cap + SLTSTA, bits);
    }
    /// MSI on at 0xfee00000, bus master on, then pciehp's notification enables.
    pub(super) fn enable_msi(&mut self) {
        let msi = self.port.msi.unwrap().offset();
        self.w32(msi + 4, 0xfee0_0000);
        self.w16(msi + 0xc, 0x30);
        self.w16(msi + 2, 1);
        self.w16(COMMAND, COMMAND_BUS_MASTER | COMMAND_MEMORY);
    }
    /// The guest's interrupt handler: read Slot Status, write back what it
    /// read.
    pub(super) fn isr(&mut self) -> u16 {
        let sta = self.sta() & SLTSTA_EVENTS;
        self.ack(sta);
        sta
    }
    /// A cold-plugged device, MSI and notifications on, an unplug requested and
    /// its press taken by the guest, which opened its window (at the clock's
    /// time).
    pub(super) fn window_open() -> (Rig, ManualClock, Completion) {
        let (mut r, clock) = Rig::clocked();
        r.enable_msi();
        r.port.cold_plug(nic()).unwrap();
        r.enable_notifications();
        let c = r.port.request_unplug().unwrap();
        assert_eq!(r.isr(), SLTSTA_ABP);
        r.cmd(SLTCTL_PIC_BLINK | SLTCTL_AIC_OFF, SLTCTL_PIC | SLTCTL_AIC);
        r.isr();
        r.msis.take_delivered();
        (r, clock, c)
    }
    pub(super) fn enable_notifications(&mut self) {
        self.cmd(
            SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_HPIE | SLTCTL_CCIE,
            SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_HPIE | SLTCTL_CCIE,
        );
        let sta = self.sta();
        self.ack(sta & SLTSTA_EVENTS);
        self.msis.take_delivered();
    }
}

/// A clock tests move by hand.
#[derive(Clone, Default)]
pub(super) struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub(super) fn as_clock(&self) -> Clock {
        let t = self.0.clone();
        Arc::new(move || Duration::from_millis(t.load(Ordering::SeqCst)))
    }
    /// Sets the time to `ms` milliseconds.
    pub(super) fn at(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

#[test]
fn identity_and_capabilities() {
    let mut r = Rig::hp();
    assert_eq!(r.r32(0), 0x000c_1b36);
    assert_eq!(r.r32(CLASS_PROG_IF - 1) >> 8, 0x06_04_00);
    assert_eq!(r.port.config().get_u8(HEADER_TYPE), 1);
    assert_eq!(r.port.config().get_u8(INTERRUPT_PIN), 1);
    assert_eq!(
        r.r16(r.cap + FLAGS),
        0x0142,
        "v2, root port, slot implemented"
    );
    let sltcap = r.r32(r.cap + SLTCAP);
    assert_eq!(
        sltcap,
        SLTCAP_ABP
            | SLTCAP_PCP
            | SLTCAP_AIP
            | SLTCAP_PIP
            | SLTCAP_EIP
            | SLTCAP_HPC
            | 5 << SLTCAP_PSN_SHIFT
    );
    assert_eq!(sltcap & (SLTCAP_NCCS | SLTCAP_HPS | SLTCAP_MRLSP), 0);
    assert_ne!(r.r32(r.cap + LNKCAP) & LNKCAP_DLLLARC, 0);
    assert!(
        r.port
            .config()
            .find_capability(vmm_pci::config::CAP_ID_MSI)
            .is_some()
    );

    let mut s = Rig::new(RootPortBuilder::new("rp1", 9).surprise(true));
    assert_ne!(s.r32(s.cap + SLTCAP) & SLTCAP_HPS, 0);
    let mut n = Rig::new(RootPortBuilder::new("rp2", 1).hotplug(false).surprise(true));
    assert_eq!(n.r32(n.cap + SLTCAP) & (SLTCAP_HPC | SLTCAP_HPS), 0);
}

#[test]
fn empty_slot_resets_powered_off() {
    let mut r = Rig::hp();
    assert_eq!(r.ctl(), SLTCTL_AIC_OFF | SLTCTL_PIC_OFF | SLTCTL_PCC);
    assert_eq!(r.sta(), 0);
    assert_eq!(r.r16(r.cap + LNKSTA) & LNKSTA_DLLLA, 0);
    assert!(r.port.children().is_empty());
    let st = r.port.slot_state();
    assert!(!st.present && !st.powered && !st.link_active && st.pending.is_none());
}

#[test]
fn cold_plug_is_present_powered_and_silent() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.enable_notifications();
    r.port.cold_plug(nic()).unwrap();
    assert_eq!(r.sta(), SLTSTA_PDS);
    assert_ne!(r.r16(r.cap + LNKSTA) & LNKSTA_DLLLA, 0);
    assert_eq!(r.ctl() & (SLTCTL_PCC | SLTCTL_PIC), SLTCTL_PIC_ON);
    assert_eq!(r.port.children().len(), 1);
    assert_eq!(r.msis.take_delivered().len(), 0);
    assert_eq!(r.port.cold_plug(nic()), Err(Error::Occupied("rp0".into())));
    // A port reset keeps a populated slot powered.
    r.port.reset();
    assert_eq!(r.sta(), SLTSTA_PDS);
    assert_eq!(r.ctl() & (SLTCTL_PCC | SLTCTL_PIC), SLTCTL_PIC_ON);
}

#[test]
fn command_completed_on_every_slot_control_write() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.cmd(SLTCTL_AIC_OFF, SLTCTL_AIC);
    assert_eq!(
        r.sta() & SLTSTA_CC,
        SLTSTA_CC,
        "even a write that changes nothing"
    );
    assert_eq!(
        r.msis.take_delivered().len(),
        0,
        "no CCIE/HPIE: no interrupt"
    );
    r.ack(SLTSTA_CC);
    assert_eq!(r.sta() & SLTSTA_CC, 0);
    // A dword write covering control and status is one command, and its status
    // half clears what it writes 1 to first.
    let ctl = r.ctl() | SLTCTL_CCIE | SLTCTL_HPIE;
    r.w32(r.cap + SLTCTL, (SLTSTA_CC as u32) << 16 | ctl as u32);
    assert_eq!(r.sta() & SLTSTA_CC, SLTSTA_CC);
    assert_eq!(r.msis.take_delivered().len(), 1);
    // Status-only writes are not commands.
    r.ack(SLTSTA_CC);
    r.ack(0);
    assert_eq!(r.sta() & SLTSTA_CC, 0);
    assert_eq!(r.port.counters().slot_control_writes, 2);
}

#[test]
fn interrupts_need_hpie_and_the_event_enable() {
    let mut r = Rig::hp();
    r.enable_msi();
    // Events with nothing enabled: no interrupt.
    r.port.plug(nic()).unwrap();
    assert_eq!(r.msis.take_delivered().len(), 0);
    // HPIE alone: still none (CC raised by this write, CCIE off).
    r.cmd(SLTCTL_HPIE, SLTCTL_HPIE);
    assert_eq!(r.msis.take_delivered().len(), 0);
    // ABPE with ABP already set: rising edge, one MSI.
    r.cmd(SLTCTL_ABPE, SLTCTL_ABPE);
    assert_eq!(r.msis.take_delivered().len(), 1);
    // More events while the condition holds: no new edge.
    r.cmd(SLTCTL_PDCE, SLTCTL_PDCE);
    assert_eq!(r.msis.take_delivered().len(), 0);
    // Ack everything: condition drops; the next event is a new edge.
    r.ack(SLTSTA_EVENTS);
    assert_eq!(r.msis.take_delivered().len(), 0);
    r.cmd(SLTCTL_CCIE, SLTCTL_CCIE);
    assert_eq!(r.msis.take_delivered().len(), 1);
    r.ack(SLTSTA_EVENTS);
    // A masked MSI vector holds the interrupt pending, released on unmask.
    let msi = r.port.msi.unwrap().offset();
    r.w32(msi + 0x10, 1);
    r.cmd(0, 0);
    assert_eq!(r.msis.take_delivered().len(), 0);
    assert_eq!(r.port.counters().msi_masked, 1);
    r.w32(msi + 0x10, 0);
    assert_eq!(r.msis.take_delivered().len(), 1);
}

#[test]
fn intx_fallback_follows_the_level() {
    let mut r = Rig::hp();
    r.cmd(SLTCTL_HPIE | SLTCTL_CCIE, SLTCTL_HPIE | SLTCTL_CCIE);
    assert!(r.line.level());
    assert_ne!(r.r16(STATUS) & STATUS_INTERRUPT, 0);
    r.ack(SLTSTA_CC);
    assert!(!r.line.level());
    assert_eq!(r.r16(STATUS) & STATUS_INTERRUPT, 0);
    // INTx Disable in the command register keeps the line low.
    r.w16(COMMAND, COMMAND_INTX_DISABLE);
    r.cmd(0, 0);
    assert!(!r.line.level());
    r.w16(COMMAND, 0);
    assert!(r.line.level());
    assert_eq!(r.port.counters().intx_assertions, 2);
    assert_eq!(r.msis.take_delivered().len(), 0);
}

#[test]
fn hot_plug_raises_presence_link_and_button_then_completes_on_indicator_on() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.enable_notifications();
    let done = r.port.plug(nic()).unwrap();
    assert_eq!(r.sta(), SLTSTA_PDS | SLTSTA_PDC | SLTSTA_ABP | SLTSTA_DLLSC);
    assert_ne!(r.r16(r.cap + LNKSTA) & LNKSTA_DLLLA, 0);
    assert_eq!(r.msis.take_delivered().len(), 1);
    assert!(
        r.port.children().is_empty(),
        "unpowered: no config cycles reach it"
    );
    assert_eq!(
        r.port.plug(nic()).unwrap_err(),
        Error::Occupied("rp0".into())
    );
    r.ack(SLTSTA_EVENTS);
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    r.cmd(0, SLTCTL_PCC);
    assert_eq!(r.port.children().len(), 1);
    assert_eq!(
        done.outcome(),
        None,
        "enumerating: not done until the indicator is on"
    );
    assert_eq!(r.port.request_unplug().unwrap_err(), Error::GuestBusy);
    r.cmd(SLTCTL_PIC_ON | SLTCTL_AIC_OFF, SLTCTL_PIC | SLTCTL_AIC);
    assert_eq!(done.outcome(), Some(HotplugOutcome::Plugged));
    assert_eq!(r.port.slot_state().pending, None);
}

#[test]
fn plug_refusals() {
    let mut n = Rig::new(RootPortBuilder::new("fixed", 1).hotplug(false));
    assert_eq!(
        n.port.plug(nic()).unwrap_err().to_string(),
        "Hot-plug failed: unsupported by the port device 'fixed'"
    );
    n.port.cold_plug(nic()).unwrap();
    assert_eq!(
        n.port.request_unplug().unwrap_err().to_string(),
        "Hot-unplug failed: unsupported by the port device 'fixed'"
    );
    let mut r = Rig::hp();
    r.port.set_interlock(true);
    assert_eq!(
        r.port.plug(nic()).unwrap_err().to_string(),
        "slot is electromechanically locked"
    );
    assert_eq!(r.port.cold_plug(nic()).unwrap_err(), Error::Locked);
}

#[test]
fn unplug_refusals_in_qemu_order() {
    let mut r = Rig::hp();
    assert_eq!(
        r.port.request_unplug().unwrap_err().to_string(),
        "Hot-unplug failed: the slot of port 'rp0' is empty"
    );
    r.port.cold_plug(nic()).unwrap();
    // The guest engages the interlock by writing EIC (which reads back 0).
    r.cmd(SLTCTL_EIC, SLTCTL_EIC);
    assert_ne!(r.sta() & SLTSTA_EIS, 0);
    assert_eq!(r.ctl() & SLTCTL_EIC, 0);
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    // Locked wins over busy, as in QEMU.
    assert_eq!(r.port.request_unplug().unwrap_err(), Error::Locked);
    r.cmd(SLTCTL_EIC, SLTCTL_EIC);
    assert_eq!(r.sta() & SLTSTA_EIS, 0);
    assert_eq!(
        r.port.request_unplug().unwrap_err().to_string(),
        "Hot-unplug failed: guest is busy (power indicator blinking)"
    );
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    let c = r.port.request_unplug().unwrap();
    assert_eq!(
        r.port.request_unplug().unwrap_err().to_string(),
        "a hot unplug is already pending on port 'rp0'; wait for its completion or cancel it"
    );
    assert_eq!(
        r.port.plug(nic()).unwrap_err(),
        Error::Occupied("rp0".into())
    );
    assert_eq!(c.outcome(), None);
}

#[test]
fn unplug_of_a_powered_off_slot_is_immediate() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.enable_notifications();
    // A plug the guest never acts on (no pciehp): the VMM takes it back.
    let plug = r.port.plug(nic()).unwrap();
    r.ack(SLTSTA_EVENTS);
    r.msis.take_delivered();
    let c = r.port.request_unplug().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(r.sta(), SLTSTA_PDC | SLTSTA_DLLSC, "no button press");
    assert_eq!(r.r16(r.cap + LNKSTA) & LNKSTA_DLLLA, 0);
    assert_eq!(r.msis.take_delivered().len(), 1, "DLLSC is enabled");
    assert!(r.port.device().is_none());
}

#[test]
fn cooperative_unplug_detaches_at_power_off() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.port.cold_plug(nic()).unwrap();
    r.enable_notifications();
    let c = r.port.request_unplug().unwrap();
    assert_eq!(r.sta(), SLTSTA_PDS | SLTSTA_ABP);
    assert_eq!(r.msis.take_delivered().len(), 1);
    r.ack(SLTSTA_ABP);
    r.cmd(SLTCTL_PIC_BLINK | SLTCTL_AIC_OFF, SLTCTL_PIC | SLTCTL_AIC);
    r.ack(SLTSTA_CC);
    assert_eq!(c.outcome(), None);
    assert_eq!(r.port.slot_state().pending, Some(Operation::Unplug));
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    // Done at power off, with the indicator still blinking.
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(r.ctl() & SLTCTL_PIC, SLTCTL_PIC_BLINK);
    assert_eq!(r.sta(), SLTSTA_PDC | SLTSTA_DLLSC | SLTSTA_CC);
    assert_eq!(r.r16(r.cap + LNKSTA) & LNKSTA_DLLLA, 0);
    assert!(r.port.children().is_empty() && r.port.device().is_none());
    r.ack(SLTSTA_EVENTS);
    r.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
    assert_eq!(r.sta(), SLTSTA_CC);
}

#[test]
fn cancel_before_the_guest_reads_the_press() {
    let mut r = Rig::hp();
    r.port.cold_plug(nic()).unwrap();
    let c = r.port.request_unplug().unwrap();
    r.port.cancel_unplug().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(r.sta() & SLTSTA_ABP, 0);
    assert!(r.port.device().is_some());
    assert_eq!(
        r.port.cancel_unplug().unwrap_err().to_string(),
        "no unplug is pending on port 'rp0'"
    );
}

#[test]
fn cancel_inside_the_window_is_a_second_press() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.port.cold_plug(nic()).unwrap();
    r.enable_notifications();
    let c = r.port.request_unplug().unwrap();
    r.ack(SLTSTA_ABP);
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    r.ack(SLTSTA_CC);
    r.msis.take_delivered();
    r.port.cancel_unplug().unwrap();
    assert_eq!(r.sta() & SLTSTA_ABP, SLTSTA_ABP);
    assert_eq!(r.msis.take_delivered().len(), 1);
    assert_eq!(c.outcome(), None, "the guest decides");
    r.ack(SLTSTA_ABP);
    r.cmd(SLTCTL_PIC_ON | SLTCTL_AIC_OFF, SLTCTL_PIC | SLTCTL_AIC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert!(r.port.device().is_some() && r.port.slot_state().powered);
    assert_eq!(r.port.counters().button_presses, 2);
}

#[test]
fn cancel_between_ack_and_blink_presses_when_the_window_opens() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.port.cold_plug(nic()).unwrap();
    r.enable_notifications();
    let c = r.port.request_unplug().unwrap();
    r.ack(SLTSTA_ABP);
    r.msis.take_delivered();
    r.port.cancel_unplug().unwrap();
    assert_eq!(
        r.sta() & SLTSTA_ABP,
        0,
        "not yet: it would merge with the first"
    );
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    assert_eq!(r.sta() & SLTSTA_ABP, SLTSTA_ABP);
    assert_eq!(r.msis.take_delivered().len(), 1);
    r.ack(SLTSTA_ABP | SLTSTA_CC);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
}

#[test]
fn surprise_removal() {
    let mut r = Rig::hp();
    r.port.cold_plug(nic()).unwrap();
    assert_eq!(
        r.port.surprise_remove().err().unwrap().to_string(),
        "surprise removal needs a port built with hot-plug surprise; port 'rp0' is not"
    );
    let mut s = Rig::new(RootPortBuilder::new("rp-s", 2).surprise(true));
    s.enable_msi();
    s.port.cold_plug(nic()).unwrap();
    s.enable_notifications();
    s.cmd(SLTCTL_PDCE, SLTCTL_PDCE);
    s.ack(SLTSTA_CC);
    s.msis.take_delivered();
    let c = s.port.request_unplug().unwrap();
    s.port.surprise_remove().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(
        s.sta() & (SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC),
        SLTSTA_PDC | SLTSTA_DLLSC
    );
    assert_eq!(s.msis.take_delivered().len(), 1);
    assert_eq!(
        s.port.surprise_remove().err().unwrap(),
        Error::Empty("rp-s".into())
    );
}

#[test]
fn guest_powering_off_during_plug_aborts_it() {
    let mut r = Rig::hp();
    let c = r.port.plug(nic()).unwrap();
    r.cmd(0, SLTCTL_PCC);
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    // Link training "failed": Linux powers off and lights the attention indicator.
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Aborted));
    assert!(r.port.device().is_none());
}

#[test]
fn secondary_bus_routing_follows_power() {
    let mut root = vmm_pci::PciRoot::new();
    let msis = Arc::new(RecordingMsi::new());
    let port = Arc::new(Mutex::new(RootPortBuilder::new("rp0", 1).build(msis)));
    root.add(1, 0, port.clone()).unwrap();
    let p = vmm_pci::Bdf::new(0, 1, 0);
    root.config_write(p, PRIMARY_BUS, &0x0001_0100u32.to_le_bytes());
    let child = vmm_pci::Bdf::new(1, 0, 0);
    let read = |root: &vmm_pci::PciRoot| {
        let mut b = [0; 4];
        root.config_read(child, 0, &mut b);
        u32::from_le_bytes(b)
    };
    port.lock().unwrap().plug(nic()).unwrap();
    assert_eq!(read(&root), u32::MAX, "present but unpowered");
    let cap = port.lock().unwrap().pcie_cap_offset();
    let ctl = port.lock().unwrap().ctl();
    root.config_write(p, cap + SLTCTL, &(ctl & !SLTCTL_PCC).to_le_bytes());
    assert_eq!(read(&root), 0x154c_8086);
    // BAR assignment through the port reaches the device.
    root.config_write(child, BAR0, &0xfe00_0000u32.to_le_bytes());
    let mut b = [0; 4];
    root.config_read(child, BAR0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfe00_000c);
}

#[test]
fn hostile_config_writes_never_panic() {
    let mut r = Rig::hp();
    r.port.cold_plug(nic()).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 3][(x & 3) as usize];
        let off = ((x >> 8) % 4200) as u16;
        let data = (x >> 20).to_le_bytes();
        r.port.write_config(off, &data[..len]);
        if i % 1000 == 0 {
            let _ = r.port.request_unplug();
            let _ = r.port.cancel_unplug();
            let _ = r.port.plug(nic());
        }
        let mut b = [0u8; 4];
        r.port.read_config(off, &mut b[..len]);
    }
    assert!(r.port.config().ignored_accesses() > 0);
}

#[test]
fn a_press_the_guest_has_read_is_not_taken_back() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.port.cold_plug(nic()).unwrap();
    r.enable_notifications();
    let c = r.port.request_unplug().unwrap();
    // The guest's interrupt handler has read Slot Status, not yet written back.
    assert_eq!(r.sta() & SLTSTA_ABP, SLTSTA_ABP);
    let cancel = r.port.cancel_unplug().unwrap();
    assert_eq!(c.outcome(), None, "the guest may have the press");
    assert_eq!(r.sta() & SLTSTA_ABP, SLTSTA_ABP, "left for the guest");
    r.ack(SLTSTA_ABP);
    r.msis.take_delivered();
    // The guest opens its window: the cancel's press, once.
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    assert_eq!(r.isr(), SLTSTA_ABP | SLTSTA_CC);
    assert_eq!(r.port.counters().button_presses, 2);
    assert!(
        r.port.cancel_unplug().is_ok(),
        "asking again presses nothing"
    );
    assert_eq!(r.sta() & SLTSTA_ABP, 0);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Cancelled));
    assert!(r.port.device().is_some());
}

#[test]
fn a_cancel_inside_the_window_is_pressed_once() {
    let (mut r, clock, c) = Rig::window_open();
    clock.at(2000);
    let cancel = r.port.cancel_unplug().unwrap();
    assert_eq!(r.msis.take_delivered().len(), 1);
    let again = r.port.cancel_unplug().unwrap();
    assert_eq!(r.port.counters().button_presses, 2);
    assert_eq!(r.msis.take_delivered().len(), 0);
    r.isr();
    clock.at(2001);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    for c in [c, cancel, again] {
        assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    }
}

#[test]
fn a_cancel_in_the_last_half_second_is_not_pressed() {
    let (mut r, clock, c) = Rig::window_open();
    clock.at(4490);
    let cancel = r.port.cancel_unplug().unwrap();
    assert_eq!(r.sta() & SLTSTA_ABP, 0, "not pressed");
    assert_eq!(r.port.counters().button_presses, 1);
    let text = r.port.save().unwrap_err().to_string();
    assert!(text.contains("too late"), "{text}");
    clock.at(5020);
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Unplugged));
    // 1 ms earlier it would have been pressed.
    let (mut r, clock, _c) = Rig::window_open();
    clock.at(4489);
    r.port.cancel_unplug().unwrap();
    assert_eq!(r.sta() & SLTSTA_ABP, SLTSTA_ABP);
}

/// Linux takes the cancel's press in the same `pciehp_ist` batch as its button
/// work's DISABLE_SLOT: indicator back on, then Slot Control read, unbind,
/// power off.
#[test]
fn a_cancel_taken_with_the_button_work_completes_unplugged() {
    let (mut r, clock, c) = Rig::window_open();
    clock.at(4000);
    let cancel = r.port.cancel_unplug().unwrap();
    clock.at(5000);
    assert_eq!(r.isr(), SLTSTA_ABP);
    r.cmd(SLTCTL_PIC_ON | SLTCTL_AIC_OFF, SLTCTL_PIC | SLTCTL_AIC);
    assert_eq!(c.outcome(), None, "the power off may follow");
    assert!(r.port.save().unwrap_err().to_string().contains("very end"));
    // __pciehp_disable_slot reads the power state, then remove_board.
    r.r16(r.cap + SLTCTL);
    clock.at(5900);
    r.isr();
    assert_eq!(c.outcome(), None, "a disable is under way");
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Unplugged));
    assert!(r.port.device().is_none());
}

#[test]
fn an_indicator_restored_late_without_a_power_off_means_kept() {
    // No Slot Control read for a second: kept, at the next access.
    let (mut r, clock, c) = Rig::window_open();
    clock.at(4000);
    r.port.cancel_unplug().unwrap();
    r.isr();
    clock.at(4995);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    r.isr();
    clock.at(5994);
    r.sta();
    assert_eq!(c.outcome(), None);
    clock.at(5995);
    r.sta();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert!(r.port.device().is_some());
    // A command other than a power off proves it at once.
    let (mut r, clock, c) = Rig::window_open();
    clock.at(4000);
    r.port.cancel_unplug().unwrap();
    r.isr();
    clock.at(4995);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    r.cmd(SLTCTL_AIC_OFF, SLTCTL_AIC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
}

/// After the guest powers the slot off it waits 1 s, discards presence and
/// link events, and turns the power indicator off: a plug in that second is
/// held and delivered by that write.
#[test]
fn a_plug_inside_the_guests_second_after_power_off_is_held() {
    let mut r = Rig::hp();
    r.enable_msi();
    r.port.cold_plug(nic()).unwrap();
    r.enable_notifications();
    r.port.request_unplug().unwrap();
    r.isr();
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    r.isr();
    r.msis.take_delivered();
    let plug = r.port.plug(nic()).unwrap();
    assert!(r.port.plug_held());
    assert_eq!(r.sta(), 0, "no event");
    assert_eq!(r.msis.take_delivered().len(), 0);
    assert!(r.port.device().is_none());
    let st = r.port.slot_state();
    assert!(!st.present && st.pending == Some(Operation::Plug));
    assert_eq!(r.port.counters().plugs_held, 1);
    assert!(matches!(
        r.port.plug(nic()),
        Err(Error::Pending {
            op: Operation::Plug,
            ..
        })
    ));
    let text = r.port.save().unwrap_err().to_string();
    assert!(text.contains("held until the guest turns"), "{text}");
    // Any command but the indicator off keeps it.
    r.cmd(SLTCTL_AIC_OFF, SLTCTL_AIC);
    assert!(r.port.plug_held());
    r.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
    assert!(!r.port.plug_held());
    assert_eq!(
        r.sta(),
        SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC | SLTSTA_CC,
        "presence and link, no button"
    );
    assert_eq!(r.msis.take_delivered().len(), 1);
    assert!(r.port.children().is_empty(), "unpowered");
    r.isr();
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    r.cmd(0, SLTCTL_PCC);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Plugged));
    // Nothing in flight any more.
    r.port.save().unwrap();
}

#[test]
fn a_held_plug_is_withdrawn_by_an_unplug_and_goes_in_on_reset() {
    let held = || {
        let mut r = Rig::hp();
        r.port.cold_plug(nic()).unwrap();
        r.port.request_unplug().unwrap();
        r.ack(SLTSTA_EVENTS);
        r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
        r.cmd(SLTCTL_PCC, SLTCTL_PCC);
        r.ack(SLTSTA_EVENTS);
        let plug = r.port.plug(nic()).unwrap();
        assert!(r.port.plug_held());
        (r, plug)
    };
    // Withdrawn while the guest still blinks: nothing reached the slot.
    let (mut r, plug) = held();
    let c = r.port.request_unplug().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Cancelled));
    r.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
    assert_eq!(r.sta() & (SLTSTA_PDS | SLTSTA_PDC), 0);
    assert!(r.port.device().is_none());
    // A reset puts it in, powered.
    let (mut r, plug) = held();
    r.port.reset();
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Plugged));
    assert!(r.port.device().is_some());
    assert_eq!(r.sta(), SLTSTA_PDS);
    assert_eq!(r.port.children().len(), 1);
}

#[test]
fn a_surprise_removal_of_a_powered_slot_holds_plugs_until_the_guest_is_done() {
    let mut r = Rig::new(RootPortBuilder::new("rp-s", 2).surprise(true));
    r.port.cold_plug(nic()).unwrap();
    r.port.surprise_remove().unwrap();
    let plug = r.port.plug(nic()).unwrap();
    assert!(r.port.plug_held());
    // Linux: power off, 1 s, indicator off; then its re-check finds the device.
    r.ack(SLTSTA_EVENTS);
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    r.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
    assert_eq!(r.sta() & SLTSTA_PDS, SLTSTA_PDS);
    assert_eq!(plug.outcome(), None);
    // surprise_remove of a held plug takes it back.
    let mut r = Rig::new(RootPortBuilder::new("rp-s", 2).surprise(true));
    r.port.cold_plug(nic()).unwrap();
    r.port.surprise_remove().unwrap();
    let plug = r.port.plug(nic()).unwrap();
    r.port.surprise_remove().unwrap();
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Cancelled));
    assert!(!r.port.plug_held());
}

/// Found by the `hotplug_slot` fuzz target: the guest, in its button window,
/// aborted an unplug (indicator back on, the slot still powered) right after a
/// surprise removal, before handling that removal. The held plug went in on
/// that write and completed Plugged, then Linux handled the removal and
/// powered the slot off with the new device in it.
#[test]
fn a_write_that_keeps_the_slot_powered_does_not_release_a_held_plug() {
    let mut r = Rig::new(RootPortBuilder::new("rp-s", 2).surprise(true));
    r.port.cold_plug(nic()).unwrap();
    r.port.surprise_remove().unwrap();
    let plug = r.port.plug(nic()).unwrap();
    assert!(r.port.plug_held());
    // Indicator writes with the slot powered: still held, nothing completes.
    r.cmd(SLTCTL_PIC_BLINK, SLTCTL_PIC);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    assert!(r.port.plug_held());
    assert!(r.port.device().is_none());
    assert_eq!(plug.outcome(), None);
    // Linux handles the removal: power off, 1 s, indicator off; the plug goes in.
    r.ack(SLTSTA_EVENTS);
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert!(r.port.plug_held());
    r.cmd(SLTCTL_PIC_OFF, SLTCTL_PIC);
    assert!(!r.port.plug_held());
    assert!(r.port.device().is_some());
    assert_eq!(plug.outcome(), None);
    // The guest powers it on and lights the indicator: plugged.
    r.cmd(0, SLTCTL_PCC);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    assert_eq!(plug.outcome(), Some(HotplugOutcome::Plugged));
}

#[test]
fn a_guest_removal_nobody_asked_for_is_counted() {
    let mut r = Rig::hp();
    r.port.cold_plug(nic()).unwrap();
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert!(r.port.device().is_none());
    assert_eq!(r.port.counters().guest_removals, 1);
}

/// The guest restored its indicator at the end of its window (after a cancel)
/// and then did nothing: the port resolves on its own clock.
fn restored_late() -> (Rig, ManualClock, Completion) {
    let (mut r, clock, c) = Rig::window_open();
    clock.at(4000);
    r.port.cancel_unplug().unwrap();
    r.isr();
    clock.at(4995);
    r.cmd(SLTCTL_PIC_ON, SLTCTL_PIC);
    r.isr();
    (r, clock, c)
}

#[test]
fn a_late_restore_resolves_by_poll_without_a_guest_access() {
    let (mut r, clock, c) = restored_late();
    assert_eq!(
        r.port.next_deadline(),
        Some(Duration::from_millis(4995) + RESTORED_QUIET)
    );
    clock.at(5994);
    r.port.poll();
    assert_eq!(c.outcome(), None);
    clock.at(5995);
    r.port.poll();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(r.port.next_deadline(), None);
    assert_eq!(r.port.slot_state().pending, None);
    assert!(r.port.device().is_some());
    // Through the `dyn HotplugSlot` defaults too.
    let (mut r, clock, c) = restored_late();
    clock.at(6000);
    let slot: &mut dyn HotplugSlot = &mut r.port;
    slot.poll();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
}

#[test]
fn a_late_restore_resolves_in_save_and_slot_state() {
    let (r, clock, c) = restored_late();
    assert!(r.port.save().is_err(), "undecided");
    clock.at(5995);
    r.port.save().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    let (mut r, clock, c) = restored_late();
    assert_eq!(r.port.slot_state().pending, Some(Operation::Unplug));
    clock.at(5995);
    assert_eq!(r.port.slot_state().pending, None);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(r.port.next_deadline(), None);
    // The next `&mut` call clears it: a new unplug can start.
    r.port.request_unplug().unwrap();
}

#[test]
fn a_slow_guests_power_off_read_after_a_second_is_an_unplug() {
    let (mut r, clock, c) = restored_late();
    // Linux's disable path reads Slot Control 1.5 s after the restore.
    clock.at(6495);
    let ctl = r.ctl();
    assert_eq!(c.outcome(), None, "the read itself must not resolve it");
    clock.at(6600);
    r.w16(r.cap + SLTCTL, ctl | SLTCTL_PCC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert!(r.port.device().is_none());
}

#[test]
fn a_slot_control_read_without_a_power_off_is_bounded() {
    let (mut r, clock, c) = restored_late();
    // An lspci-like read, then no power off.
    clock.at(5200);
    r.ctl();
    assert_eq!(r.port.next_deadline(), Some(Duration::from_millis(6200)));
    clock.at(6199);
    r.port.poll();
    assert_eq!(c.outcome(), None);
    clock.at(6200);
    r.port.poll();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    // A second Slot Control read past the first one's bound does not rescue it.
    let (mut r, clock, c) = restored_late();
    clock.at(5200);
    r.ctl();
    clock.at(6300);
    r.ctl();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
}

#[test]
fn a_guest_removal_nobody_asked_for_runs_the_callback() {
    let removed = Arc::new(Mutex::new(Vec::new()));
    let seen = removed.clone();
    let mut r = Rig::hp();
    r.port
        .on_guest_removal(move |dev| seen.lock().unwrap().push(dev));
    r.port.cold_plug(nic()).unwrap();
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(removed.lock().unwrap().len(), 1);
    // After a cancel already reported Cancelled, the guest's power off too.
    let (mut r, clock, c) = restored_late();
    let seen = removed.clone();
    r.port
        .on_guest_removal(move |dev| seen.lock().unwrap().push(dev));
    clock.at(6000);
    r.port.poll();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(removed.lock().unwrap().len(), 2);
    assert_eq!(r.port.counters().guest_removals, 1);
    // A requested unplug does not run it.
    let (mut r, _clock, c) = Rig::window_open();
    let seen = removed.clone();
    r.port
        .on_guest_removal(move |dev| seen.lock().unwrap().push(dev));
    r.cmd(SLTCTL_PCC, SLTCTL_PCC);
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(removed.lock().unwrap().len(), 2);
}
