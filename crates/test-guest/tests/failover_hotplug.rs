//! The failover hot-plug path end to end: a scripted Linux-like guest enumerates
//! root ports with a virtio-net standby behind one, negotiates STANDBY, and the
//! VMM plugs, unplugs, cancels and replugs the primary through a pciehp slot,
//! all on a virtual clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_state::{Persist, from_bytes, to_bytes};
use pcie_hotplug::{Error, HotplugOutcome, HotplugSlot, RootPort, RootPortBuilder};
use test_guest::{Guest, IrqQueue, PciehpHook, PciehpState, StubEndpoint, Timings, VirtualClock};
use virtio_net_standby::testing::{GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{FeaturesAcked, StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};
use vmm_pci::config::{CAP_ID_MSI, COMMAND};
use vmm_pci::pcie::{SLTCTL, SLTCTL_PIC, SLTCTL_PIC_OFF, SLTCTL_PIC_ON, SLTSTA_ABP};
use vmm_pci::{Bdf, MsiSink, PciRoot};

type Net = StandbyNet<GuestMem, RecordingBackend>;
type Standby = VirtioPciDevice<GuestMem, Net>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const STANDBY_BIT: u64 = 1 << 62;
/// What the guest's virtio_net supports: everything the device offers.
const GUEST_FEATURES: u64 = u64::MAX;

struct Vmm {
    /// Guest time, which the ports read too.
    clock: VirtualClock,
    root: Arc<PciRoot>,
    irqs: Arc<IrqQueue>,
    standby: Arc<Mutex<Standby>>,
    primary_port: Arc<Mutex<RootPort>>,
    fixed_port: Arc<Mutex<RootPort>>,
    surprise_port: Arc<Mutex<RootPort>>,
    negotiated: Arc<AtomicBool>,
    _mem: TestMemory,
}

const STANDBY_PORT: Bdf = Bdf::new(0, 1, 0);
const PRIMARY_PORT: Bdf = Bdf::new(0, 2, 0);
const FIXED_PORT: Bdf = Bdf::new(0, 3, 0);
const SURPRISE_PORT: Bdf = Bdf::new(0, 4, 0);
const STANDBY_FN: Bdf = Bdf::new(1, 0, 0);
const PRIMARY_FN: Bdf = Bdf::new(2, 0, 0);

fn vmm() -> Vmm {
    vmm_on(VirtualClock::new())
}

/// The VMM, its ports reading `clock` (the guest's).
fn vmm_on(clock: VirtualClock) -> Vmm {
    let mem = TestMemory::new(4 << 20);
    let irqs = IrqQueue::new();
    let mut net: Net = StandbyNetBuilder::new()
        .id("net0")
        .mac(MAC)
        .build(vec![RecordingBackend::default()])
        .unwrap();
    let negotiated = Arc::new(AtomicBool::new(false));
    let n2 = negotiated.clone();
    net.add_standby_listener(Arc::new(move |e: &FeaturesAcked| {
        assert_eq!(e.device_id, "net0");
        n2.store(true, Ordering::SeqCst);
    }));
    let standby = Arc::new(Mutex::new(
        VirtioPciBuilder::new()
            .build(net, mem.atomic(), irqs.clone())
            .unwrap(),
    ));
    let port = |name: &str, slot: u16| {
        RootPortBuilder::new(name, slot)
            .port_number(slot as u8)
            .clock(clock.now_fn())
    };
    let standby_port = Arc::new(Mutex::new(port("rp-standby", 1).build(irqs.clone())));
    let primary_port = Arc::new(Mutex::new(port("rp-primary", 2).build(irqs.clone())));
    let fixed_port = Arc::new(Mutex::new(
        port("rp-fixed", 3).hotplug(false).build(irqs.clone()),
    ));
    let surprise_port = Arc::new(Mutex::new(
        port("rp-surprise", 4).surprise(true).build(irqs.clone()),
    ));
    standby_port
        .lock()
        .unwrap()
        .cold_plug(standby.clone())
        .unwrap();
    surprise_port
        .lock()
        .unwrap()
        .cold_plug(StubEndpoint::vf())
        .unwrap();
    let mut root = PciRoot::new();
    root.add(1, 0, standby_port).unwrap();
    root.add(2, 0, primary_port.clone()).unwrap();
    root.add(3, 0, fixed_port.clone()).unwrap();
    root.add(4, 0, surprise_port.clone()).unwrap();
    Vmm {
        clock,
        root: Arc::new(root),
        irqs,
        standby,
        primary_port,
        fixed_port,
        surprise_port,
        negotiated,
        _mem: mem,
    }
}

fn boot(v: &Vmm) -> Guest {
    Guest::boot_with_clock(
        v.clock.clone(),
        v.root.clone(),
        v.irqs.clone(),
        Timings::default(),
        GUEST_FEATURES,
        (0x10_0000, 0x20_0000),
    )
}

/// Records the virtual time a completion fired at.
fn stamp(c: &pcie_hotplug::Completion, clock: &VirtualClock) -> Arc<Mutex<Option<Duration>>> {
    let at = Arc::new(Mutex::new(None));
    let (a2, clock) = (at.clone(), clock.clone());
    c.on_complete(move |_| *a2.lock().unwrap() = Some(clock.now()));
    at
}

fn pic(port: &Arc<Mutex<RootPort>>) -> u16 {
    let p = port.lock().unwrap();
    p.config().get_u16(p.pcie_cap_offset() + SLTCTL) & SLTCTL_PIC
}

/// Boots, then plugs the primary the way the failover handshake does once
/// STANDBY is negotiated, and lets the guest enable it.
fn booted_with_primary() -> (Vmm, Guest) {
    let v = vmm();
    let mut g = boot(&v);
    assert!(v.negotiated.load(Ordering::SeqCst));
    let c = v
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    (v, g)
}

#[test]
fn boot_enumerates_ports_and_probes_the_standby() {
    let v = vmm();
    let g = boot(&v);
    let e = &g.env.enumerator;
    let bdfs: Vec<Bdf> = e.found.iter().map(|f| f.bdf).collect();
    assert_eq!(
        bdfs,
        [
            STANDBY_PORT,
            STANDBY_FN,
            PRIMARY_PORT,
            FIXED_PORT,
            SURPRISE_PORT,
            Bdf::new(4, 0, 0)
        ]
    );
    let ports: Vec<Option<u8>> = e
        .found
        .iter()
        .filter(|f| f.header_type == 1)
        .map(|f| f.secondary)
        .collect();
    assert_eq!(ports, [Some(1), Some(2), Some(3), Some(4)]);
    let sb = e.get(STANDBY_FN).unwrap();
    assert_eq!((sb.vendor, sb.device, sb.class), (0x1af4, 0x1041, 0x020000));
    // The standby's BARs sit inside its port's windows.
    let bar4 = sb.bar(4).unwrap();
    assert!(bar4.is64 && bar4.prefetchable && bar4.size == 0x4000);
    assert!(bar4.address >= 0x80_0000_0000);
    let bar1 = sb.bar(1).unwrap();
    assert!((0xc000_0000..0xfec0_0000).contains(&bar1.address));
    // The guest's virtio driver negotiated STANDBY and read our MAC.
    assert_eq!(g.env.virtio.len(), 1);
    let probe = &g.env.virtio[0];
    assert_ne!(probe.features & STANDBY_BIT, 0);
    assert_eq!(probe.mac, MAC);
    assert!(v.standby.lock().unwrap().device().standby_negotiated());
    assert!(v.standby.lock().unwrap().device().is_active());
    // A queue notification written where the driver computed it reaches the
    // queue's eventfd.
    let root = v.root.clone();
    root.mmio_write(probe.notify[1], &1u16.to_le_bytes());
    assert_eq!(
        v.standby
            .lock()
            .unwrap()
            .queue_eventfd(1)
            .unwrap()
            .read()
            .unwrap(),
        1
    );
    // pciehp runs on the three hot-plug ports, not the fixed one.
    let hp: Vec<Bdf> = g.hotplug.iter().map(|p| p.port).collect();
    assert_eq!(hp, [STANDBY_PORT, PRIMARY_PORT, SURPRISE_PORT]);
    assert_eq!(g.pciehp(STANDBY_PORT).unwrap().state(), PciehpState::On);
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
    assert!(g.hotplug.iter().all(|p| p.cmd_timeouts == 0));
}

#[test]
fn guest_without_standby_is_never_offered_the_primary() {
    let v = vmm();
    let g = Guest::boot(
        v.root.clone(),
        v.irqs.clone(),
        Timings::default(),
        !STANDBY_BIT,
        (0x10_0000, 0x20_0000),
    );
    assert_eq!(g.env.virtio[0].features & STANDBY_BIT, 0);
    assert!(!v.negotiated.load(Ordering::SeqCst));
}

#[test]
fn hot_plug_completes_when_the_guest_turns_the_indicator_on() {
    let v = vmm();
    let mut g = boot(&v);
    let t0 = g.env.clock.now();
    let c = v
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    let at = stamp(&c, &g.env.clock);
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    // Linux 6.1: power on, blink, 20 ms before the first Link Active poll (link
    // already up), 100 ms settle, vendor ID found, enumerate, light.
    assert_eq!(at.lock().unwrap().unwrap() - t0, Duration::from_millis(120));
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&PRIMARY_FN));
    let f = g.env.enumerator.get(PRIMARY_FN).unwrap();
    assert_eq!((f.vendor, f.device), (0x8086, 0x10ed));
    // Its BAR landed in the port's 2 MiB hot-plug reserve.
    let bar = f.bar(0).unwrap();
    assert_eq!(bar.size, 0x4000);
    let base = g
        .env
        .cfg_read(PRIMARY_PORT, vmm_pci::config::PREF_MEMORY_BASE, 4);
    let upper = g
        .env
        .cfg_read(PRIMARY_PORT, vmm_pci::config::PREF_BASE_UPPER32, 4) as u64;
    let lower = upper << 32 | ((base & 0xfff0) as u64) << 16;
    let limit = upper << 32 | ((base >> 16 & 0xfff0) as u64) << 16 | 0xf_ffff;
    assert_eq!(limit + 1 - lower, 2 << 20, "Linux's 2 MiB reserve");
    assert!(lower <= bar.address && bar.address + bar.size - 1 <= limit);
    assert_eq!(g.config_read32(PRIMARY_FN, 0), 0x10ed_8086);
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_ON);
    assert!(
        g.hotplug.iter().all(|p| p.cmd_timeouts == 0),
        "every command completed"
    );
}

#[test]
fn unplug_for_migration_completes_at_power_off_not_indicator_off() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let at = stamp(&c, &g.env.clock);
    g.run_for(Duration::from_secs(4));
    assert_eq!(c.outcome(), None, "inside the 5 s window");
    assert_eq!(
        g.pciehp(PRIMARY_PORT).unwrap().state(),
        PciehpState::BlinkingOff
    );
    // The VMM would see "guest is busy" if it asked again now.
    assert_eq!(
        v.primary_port.lock().unwrap().request_unplug().unwrap_err(),
        Error::GuestBusy
    );
    g.run_for(Duration::from_millis(1020));
    // 5 s button delay + 20 ms driver unbind, then power off: done.
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(5020)
    );
    assert_ne!(
        pic(&v.primary_port),
        SLTCTL_PIC_OFF,
        "indicator still blinking"
    );
    assert!(!g.env.bound.contains(&PRIMARY_FN));
    assert_eq!(g.config_read32(PRIMARY_FN, 0), u32::MAX);
    let spent = g.settle(Duration::from_secs(10));
    assert_eq!(
        spent,
        Duration::from_secs(1),
        "Linux turns the indicator off 1 s later"
    );
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_OFF);
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
}

#[test]
fn cancel_inside_the_window_keeps_the_primary() {
    let (v, mut g) = booted_with_primary();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.run_for(Duration::from_secs(2));
    v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&PRIMARY_FN));
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_ON);
    assert_eq!(g.config_read32(PRIMARY_FN, 0), 0x10ed_8086);
    assert!(
        g.env
            .log
            .iter()
            .any(|(_, l)| l.contains("Action canceled due to button press"))
    );
}

#[test]
fn cancel_before_the_guest_sees_the_press_is_withdrawn_silently() {
    let (v, mut g) = booted_with_primary();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    // The guest has not run its interrupt handler yet.
    v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    g.settle(Duration::from_secs(10));
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&PRIMARY_FN));
}

#[test]
fn cancel_after_the_window_is_too_late_and_not_pressed() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    // 5 s passed: the guest is unbinding the driver (20 ms) when the cancel comes.
    g.run_for(Duration::from_millis(5010));
    assert_eq!(
        g.pciehp(PRIMARY_PORT).unwrap().state(),
        PciehpState::PowerOff
    );
    let presses = v.primary_port.lock().unwrap().counters().button_presses;
    let cancel = v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    assert_eq!(
        v.primary_port.lock().unwrap().counters().button_presses,
        presses,
        "nothing pressed: the window is over"
    );
    g.settle(Duration::from_secs(20));
    // The cancel's result is the unplug's: too late, the device left.
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert!(v.primary_port.lock().unwrap().device().is_none());
    // A press now would have been taken, once the slot was off, for a power-on
    // request on the empty slot: 5 s of blinking. None came.
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_OFF);
    assert!(
        !g.env
            .log
            .iter()
            .any(|(t, l)| *t > t0 && l.contains("Powering on"))
    );
}

#[test]
fn cancel_in_the_last_half_second_of_the_window_is_not_pressed() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let at = stamp(&c, &g.env.clock);
    g.run_for(Duration::from_millis(4600));
    let presses = v.primary_port.lock().unwrap().counters().button_presses;
    let cancel = v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    assert_eq!(
        v.primary_port.lock().unwrap().counters().button_presses,
        presses
    );
    g.settle(Duration::from_secs(20));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(5020)
    );
    assert!(!g.env.log.iter().any(|(_, l)| l.contains("Button cancel")));
}

/// The VMM takes the press back between the guest ISR's read of Slot Status
/// and its write back: the guest has the press already, so withdrawing it
/// would be a lie (it goes on to blink and, 5 s later, remove the device). The
/// port presses again inside the window instead, and reports what the guest
/// does.
#[test]
fn cancel_between_the_isr_read_and_its_write_back_is_pressed_in_the_window() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let presses = v.primary_port.lock().unwrap().counters().button_presses;
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let at = stamp(&c, &g.env.clock);
    let cancel = Arc::new(Mutex::new(None));
    let (port, cancel2) = (v.primary_port.clone(), cancel.clone());
    g.pciehp_mut(PRIMARY_PORT)
        .unwrap()
        .set_hook(move |at: PciehpHook| {
            let mut cancel = cancel2.lock().unwrap();
            if let (PciehpHook::IsrRead(sta), None) = (at, cancel.as_ref()) {
                assert_ne!(sta & SLTSTA_ABP, 0, "the ISR read the press");
                let c = port.lock().unwrap().cancel_unplug().unwrap();
                assert_eq!(c.outcome(), None, "not withdrawn: the guest read it");
                *cancel = Some(c);
            }
        });
    g.settle(Duration::from_secs(10));
    let cancel = cancel.lock().unwrap().take().unwrap();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Cancelled));
    // Decided at once: the guest aborted as soon as it opened its window.
    assert_eq!(at.lock().unwrap().unwrap(), t0);
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&PRIMARY_FN));
    assert!(v.primary_port.lock().unwrap().device().is_some());
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_ON);
    assert_eq!(
        v.primary_port.lock().unwrap().counters().button_presses - presses,
        2,
        "the unplug's press and the cancel's"
    );
    let lines: Vec<&str> = g
        .env
        .log
        .iter()
        .map(|(_, l)| l.as_str())
        .filter(|l| l.contains("PRIMARY") || l.contains("Slot(2)"))
        .collect();
    let pos = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
    assert!(pos("Powering off due to button press") < pos("Action canceled"));
    // Nothing left to happen: 10 s later the device is still there.
    g.run_for(Duration::from_secs(10));
    assert!(g.env.bound.contains(&PRIMARY_FN));
}

/// The cancel press and the 5 s timer's DISABLE_SLOT land in the same
/// `pciehp_ist` batch (the guest's vCPU took the press only when its timer
/// fired): Linux handles the press first (power indicator back on), then the
/// disable, which powers the slot off anyway. The unplug says Unplugged, and so
/// does the cancel's result.
#[test]
fn cancel_taken_with_the_button_work_reports_the_unplug() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let at = stamp(&c, &g.env.clock);
    g.run_for(Duration::from_millis(4400));
    let presses = v.primary_port.lock().unwrap().counters().button_presses;
    let cancel = v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    assert_eq!(
        v.primary_port.lock().unwrap().counters().button_presses,
        presses + 1,
        "pressed: 0.6 s were left in the window"
    );
    // The vCPU stalls: the cancel's interrupt waits until the timer fires.
    let stalled = v.irqs.drain();
    assert_eq!(stalled.len(), 1);
    let irqs = v.irqs.clone();
    let mut stalled = Some(stalled);
    g.pciehp_mut(PRIMARY_PORT)
        .unwrap()
        .set_hook(move |at: PciehpHook| {
            if at == PciehpHook::ButtonWork {
                for m in stalled.take().into_iter().flatten() {
                    irqs.deliver(0, m);
                }
            }
        });
    g.run_for(Duration::from_millis(600));
    assert_eq!(g.env.clock.now() - t0, Duration::from_secs(5));
    // Linux restored the indicator and is already unbinding for the power off.
    assert_eq!(
        g.pciehp(PRIMARY_PORT).unwrap().state(),
        PciehpState::PowerOff
    );
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_ON);
    assert_eq!(c.outcome(), None, "not Cancelled: the power off may follow");
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(cancel.outcome(), Some(HotplugOutcome::Unplugged));
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(5020)
    );
    assert!(v.primary_port.lock().unwrap().device().is_none());
    assert!(!g.env.bound.contains(&PRIMARY_FN));
    let log: Vec<&str> = g.env.log.iter().map(|(_, l)| l.as_str()).collect();
    let pos = |s: &str| log.iter().position(|l| l.contains(s)).unwrap();
    assert!(pos("Action canceled due to button press") < pos(&format!("{PRIMARY_FN}: removed")));
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_OFF);
}

/// As above, but the guest takes more than the port's 1 s bound to unbind the
/// driver between the Slot Control read that starts its disable and the power
/// off: the port reports the cancel as kept (`Cancelled`) at the bound, and the
/// power off that follows is a guest removal, reported through
/// `RootPort::on_guest_removal` with the device so the VMM can plug it back.
#[test]
fn a_power_off_after_the_cancel_was_reported_kept_is_a_guest_removal() {
    let (v, mut g) = booted_with_primary();
    g.env.timings.unbind = Duration::from_millis(1500);
    let removed = Arc::new(Mutex::new(Vec::new()));
    let (r2, clock) = (removed.clone(), g.env.clock.clone());
    v.primary_port
        .lock()
        .unwrap()
        .on_guest_removal(move |_dev| r2.lock().unwrap().push(clock.now()));
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.run_for(Duration::from_millis(4400));
    v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    let stalled = v.irqs.drain();
    let irqs = v.irqs.clone();
    let mut stalled = Some(stalled);
    g.pciehp_mut(PRIMARY_PORT)
        .unwrap()
        .set_hook(move |at: PciehpHook| {
            if at == PciehpHook::ButtonWork {
                for m in stalled.take().into_iter().flatten() {
                    irqs.deliver(0, m);
                }
            }
        });
    g.run_for(Duration::from_millis(600));
    assert_eq!(c.outcome(), None, "the power off may follow");
    let deadline = v.primary_port.lock().unwrap().next_deadline().unwrap();
    assert!(deadline > g.env.clock.now() - Duration::from_millis(100));
    // A VMM timer at the deadline resolves it while the guest unbinds.
    g.run_for(deadline - g.env.clock.now());
    v.primary_port.lock().unwrap().poll();
    assert_eq!(c.outcome(), Some(HotplugOutcome::Cancelled));
    assert!(removed.lock().unwrap().is_empty());
    g.settle(Duration::from_secs(10));
    let removed = removed.lock().unwrap().clone();
    assert_eq!(removed.len(), 1, "the late power off is reported");
    assert!(removed[0] - t0 >= Duration::from_millis(6400));
    let p = v.primary_port.lock().unwrap();
    assert!(p.device().is_none());
    assert_eq!(p.counters().guest_removals, 1);
}

#[test]
fn failed_migration_plugs_the_primary_back() {
    let (v, mut g) = booted_with_primary();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    let c = v
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    assert!(g.env.bound.contains(&PRIMARY_FN));
    assert_eq!(
        g.env
            .enumerator
            .found
            .iter()
            .filter(|f| f.bdf == PRIMARY_FN)
            .count(),
        1
    );
}

/// The replug window: a failed migration's replug requested the moment the
/// unplug completes (the guest's power off) lands in Linux's 1 s wait after
/// power off, whose presence and link events Linux discards; it would see only
/// the attention button, blink 5 s and power on about 5.1 s later. The port
/// holds the plug until the guest turns the power indicator off; Linux then
/// enables the slot 0.12 s later.
#[test]
fn replug_requested_at_once_is_held_through_the_guests_second() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let done = stamp(&c, &g.env.clock);
    g.run_for(Duration::from_millis(5020));
    assert_eq!(
        done.lock().unwrap().unwrap() - t0,
        Duration::from_millis(5020)
    );
    // The coordinator replugs the moment the unplug completes.
    let replug = v
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    let at = stamp(&replug, &g.env.clock);
    {
        let p = v.primary_port.lock().unwrap();
        assert!(p.plug_held());
        assert!(!p.slot_state().present, "nothing the guest could see yet");
        assert_eq!(p.counters().plugs_held, 1);
    }
    // The guest's second: the indicator goes off at t0 + 6.02 s, which
    // delivers the plug; Linux starts enabling the slot at once.
    g.run_for(Duration::from_millis(999));
    assert!(v.primary_port.lock().unwrap().plug_held());
    g.run_for(Duration::from_millis(1));
    assert!(!v.primary_port.lock().unwrap().plug_held(), "delivered");
    let off = g
        .env
        .log
        .iter()
        .filter(|(_, l)| l.contains("Card present"))
        .map(|(t, _)| *t - t0)
        .next_back();
    assert_eq!(off, Some(Duration::from_millis(6020)));
    assert_eq!(
        g.pciehp(PRIMARY_PORT).unwrap().state(),
        PciehpState::PowerOn
    );
    assert_eq!(replug.outcome(), None);
    g.settle(Duration::from_secs(10));
    assert_eq!(replug.outcome(), Some(HotplugOutcome::Plugged));
    let at = at.lock().unwrap().unwrap() - t0;
    assert_eq!(
        at,
        Duration::from_millis(6140),
        "0.12 s after the indicator"
    );
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&PRIMARY_FN));
    // Enabled on presence and link: no attention button, no 5 s blink.
    let after: Vec<&str> = g
        .env
        .log
        .iter()
        .filter(|(t, _)| *t >= t0 + Duration::from_millis(5020))
        .map(|(_, l)| l.as_str())
        .collect();
    assert!(
        !after.iter().any(|l| l.contains("Attention button")),
        "{after:?}"
    );
    assert!(
        after.iter().any(|l| l.contains("Card present")),
        "{after:?}"
    );
}

/// The same window across a migration: the source's guest powered the slot
/// off and migrates inside its second; the destination restores the port
/// (which says so) and plugs its primary before the guest resumes.
#[test]
fn the_replug_window_crosses_a_migration() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.run_for(Duration::from_millis(5020));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    let state = v.primary_port.lock().unwrap().save().unwrap();
    assert!(state.guest_powering_off);
    let bytes = to_bytes(&state);
    let d = vmm_on(g.env.clock.clone());
    d.primary_port
        .lock()
        .unwrap()
        .restore(&from_bytes(&bytes).unwrap())
        .unwrap();
    let replug = d
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    assert!(d.primary_port.lock().unwrap().plug_held());
    let at = stamp(&replug, &g.env.clock);
    g.resume_on(d.root.clone(), d.irqs.clone());
    g.settle(Duration::from_secs(10));
    assert_eq!(replug.outcome(), Some(HotplugOutcome::Plugged));
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(6140)
    );
    assert!(g.env.bound.contains(&PRIMARY_FN));
}

#[test]
fn refusals_reach_the_vmm_with_their_texts() {
    let (v, mut g) = booted_with_primary();
    assert_eq!(
        v.fixed_port
            .lock()
            .unwrap()
            .plug(StubEndpoint::vf())
            .unwrap_err()
            .to_string(),
        "Hot-plug failed: unsupported by the port device 'rp-fixed'"
    );
    assert_eq!(
        v.primary_port
            .lock()
            .unwrap()
            .plug(StubEndpoint::vf())
            .unwrap_err()
            .to_string(),
        "Hot-plug failed: the slot of port 'rp-primary' is occupied"
    );
    v.primary_port.lock().unwrap().set_interlock(true);
    assert_eq!(
        v.primary_port
            .lock()
            .unwrap()
            .request_unplug()
            .unwrap_err()
            .to_string(),
        "slot is electromechanically locked"
    );
    v.primary_port.lock().unwrap().set_interlock(false);
    v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.run_for(Duration::from_millis(10));
    assert_eq!(
        v.primary_port
            .lock()
            .unwrap()
            .request_unplug()
            .unwrap_err()
            .to_string(),
        "Hot-unplug failed: guest is busy (power indicator blinking)"
    );
}

#[test]
fn surprise_removal_is_handled_by_the_guest() {
    let v = vmm();
    let mut g = boot(&v);
    let vf = Bdf::new(4, 0, 0);
    assert!(g.env.bound.contains(&vf));
    v.surprise_port
        .lock()
        .unwrap()
        .surprise_remove()
        .map(|_| ())
        .unwrap();
    g.settle(Duration::from_secs(10));
    assert!(!g.env.bound.contains(&vf));
    assert_eq!(g.pciehp(SURPRISE_PORT).unwrap().state(), PciehpState::Off);
    assert_eq!(g.config_read32(vf, 0), u32::MAX);
}

/// What the hold saves: the same replug delivered inside the guest's second
/// (a destination port told nothing of the window, as a port without the hold
/// behaves). Linux discards the presence and link events, keeps the attention
/// button, blinks 5 s on it, and enables the slot 5.12 s after the indicator
/// went off instead of 0.12 s.
#[test]
fn without_the_hold_linux_sees_only_the_button() {
    let (v, mut g) = booted_with_primary();
    let t0 = g.env.clock.now();
    v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.run_for(Duration::from_millis(5020));
    let mut state = v.primary_port.lock().unwrap().save().unwrap();
    state.guest_powering_off = false;
    let d = vmm_on(g.env.clock.clone());
    d.primary_port.lock().unwrap().restore(&state).unwrap();
    let replug = d
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    assert!(!d.primary_port.lock().unwrap().plug_held());
    let at = stamp(&replug, &g.env.clock);
    g.resume_on(d.root.clone(), d.irqs.clone());
    g.settle(Duration::from_secs(20));
    assert_eq!(replug.outcome(), Some(HotplugOutcome::Plugged));
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(11_140)
    );
    assert!(
        g.env
            .log
            .iter()
            .any(|(t, l)| *t > t0 + Duration::from_secs(6)
                && l.contains("Powering on due to button press"))
    );
}

/// A plug right after a surprise removal: Linux powers the emptied slot off,
/// waits 1 s, turns the indicator off and re-checks presence in the same run
/// (`pciehp_handle_presence_or_link_change`). The held plug is delivered by
/// the indicator write, so that re-check finds the new device and enables it;
/// nothing is left over to be taken later for an unplug request.
#[test]
fn a_plug_after_a_surprise_removal_is_enabled_by_linuxs_recheck() {
    let v = vmm();
    let mut g = boot(&v);
    let vf = Bdf::new(4, 0, 0);
    let t0 = g.env.clock.now();
    v.surprise_port
        .lock()
        .unwrap()
        .surprise_remove()
        .map(|_| ())
        .unwrap();
    let c = v
        .surprise_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    assert!(v.surprise_port.lock().unwrap().plug_held());
    let at = stamp(&c, &g.env.clock);
    g.settle(Duration::from_secs(20));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    // Unbind 20 ms, power off, 1 s, indicator off, then enable: 120 ms.
    assert_eq!(
        at.lock().unwrap().unwrap() - t0,
        Duration::from_millis(1140)
    );
    assert!(g.env.bound.contains(&vf));
    assert_eq!(g.pciehp(SURPRISE_PORT).unwrap().state(), PciehpState::On);
    g.run_for(Duration::from_secs(10));
    assert_eq!(g.pciehp(SURPRISE_PORT).unwrap().state(), PciehpState::On);
    assert!(g.env.bound.contains(&vf));
}

#[test]
fn a_masked_port_interrupt_holds_the_plug_until_unmasked() {
    let v = vmm();
    let mut g = boot(&v);
    let msi = g
        .env
        .enumerator
        .get(PRIMARY_PORT)
        .unwrap()
        .cap(CAP_ID_MSI)
        .unwrap();
    g.env.cfg_write(PRIMARY_PORT, msi + 0x10, 4, 1);
    let c = v
        .primary_port
        .lock()
        .unwrap()
        .plug(StubEndpoint::vf())
        .unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), None, "no interrupt, no reaction");
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
    assert_eq!(v.primary_port.lock().unwrap().counters().msi_masked, 1);
    g.env.cfg_write(PRIMARY_PORT, msi + 0x10, 4, 0);
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    // Bus mastering off: MSI cannot be written at all.
    let cmd = g.env.cfg_read(PRIMARY_PORT, COMMAND, 2);
    g.env.cfg_write(PRIMARY_PORT, COMMAND, 2, cmd & !4);
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), None);
    assert!(v.primary_port.lock().unwrap().counters().interrupts_dropped >= 1);
}

#[test]
fn the_vmm_can_wait_on_an_eventfd_from_another_thread() {
    let (v, mut g) = booted_with_primary();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    let waiter = {
        let c = c.clone();
        std::thread::spawn(move || c.wait())
    };
    let fd = c.eventfd().unwrap().try_clone().unwrap();
    assert!(fd.read().is_err());
    g.settle(Duration::from_secs(10));
    assert_eq!(waiter.join().unwrap(), HotplugOutcome::Unplugged);
    assert_eq!(fd.read().unwrap(), 1);
}
