//! The failover hot-plug path end to end: a scripted Linux-like guest enumerates
//! root ports with a virtio-net standby behind one, negotiates STANDBY, and the
//! VMM plugs, unplugs, cancels and replugs the primary through a pciehp slot,
//! all on a virtual clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcie_hotplug::{Error, HotplugOutcome, HotplugSlot, RootPort, RootPortBuilder};
use test_guest::{Guest, IrqQueue, PciehpState, StubEndpoint, Timings, VirtualClock};
use virtio_net_standby::testing::{GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{FeaturesAcked, StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};
use vmm_pci::config::{CAP_ID_MSI, COMMAND};
use vmm_pci::pcie::{SLTCTL, SLTCTL_PIC, SLTCTL_PIC_OFF, SLTCTL_PIC_ON};
use vmm_pci::{Bdf, PciRoot};

type Net = StandbyNet<GuestMem, RecordingBackend>;
type Standby = VirtioPciDevice<GuestMem, Net>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const STANDBY_BIT: u64 = 1 << 62;
/// What the guest's virtio_net supports: everything the device offers.
const GUEST_FEATURES: u64 = u64::MAX;

struct Vmm {
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
    let port = |name: &str, slot: u16| RootPortBuilder::new(name, slot).port_number(slot as u8);
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
    Guest::boot(
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
    // Linux: power on, blink, link already up, 100 ms settle, enumerate, light.
    assert_eq!(at.lock().unwrap().unwrap() - t0, Duration::from_millis(100));
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
fn cancel_after_the_window_is_ignored_by_the_guest() {
    let (v, mut g) = booted_with_primary();
    let c = v.primary_port.lock().unwrap().request_unplug().unwrap();
    // 5 s passed: the guest is unbinding the driver (20 ms) when the press comes.
    g.run_for(Duration::from_millis(5010));
    assert_eq!(
        g.pciehp(PRIMARY_PORT).unwrap().state(),
        PciehpState::PowerOff
    );
    v.primary_port.lock().unwrap().cancel_unplug().unwrap();
    g.settle(Duration::from_secs(20));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert!(v.primary_port.lock().unwrap().device().is_none());
    // Linux took the late press for a power-on request on an empty slot, blinked
    // for 5 s and gave up.
    assert_eq!(g.pciehp(PRIMARY_PORT).unwrap().state(), PciehpState::Off);
    assert_eq!(pic(&v.primary_port), SLTCTL_PIC_OFF);
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
