//! QEMU's `failover-virtio-net/params/*` scenarios (tests/qtest/virtio-net-failover.c)
//! on the scripted guest, plus the refusals and the MAC check QEMU does not
//! have. Each step asserts the events and what the guest enumerated and bound.

mod common;

use std::time::Duration;

use common::*;
use failover::{Primary, RegistryError, Slot, Standby, UnpairedReason};
use test_guest::{PciehpState, VirtualClock};
use virtio_net_standby::testing::TestMemory;

fn vm(spec: Spec) -> (Vm, TestMemory) {
    let mem = TestMemory::new(4 << 20);
    let vm = Vm::new(spec, &mem, &VirtualClock::new());
    (vm, mem)
}

/// params/error/id: a primary without an id is refused with QEMU's text.
#[test]
fn params_error_id() {
    let (vm, _mem) = Vm::simple();
    let p = &vm.pairs[0];
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    let e = vm
        .coord
        .add_primary(Primary::new(
            "",
            "standby0",
            p.primary.clone(),
            Slot::port("root1", &p.primary_port),
        ))
        .unwrap_err();
    assert_eq!(
        e,
        RegistryError::MissingId {
            standby: "standby0".into()
        }
    );
    assert!(
        e.to_string()
            .starts_with("Device with failover_pair_id needs to have id"),
        "{e}"
    );
    vm.coord.machine_ready();
    assert_eq!(vm.events.kinds(), []);
    // Nothing was registered: the guest runs on the standby alone.
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), missing("standby0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, false)]);
    assert_eq!(vm.slots(), [false]);
}

/// params/error/pcie: a primary on a bus that cannot hot-plug is refused with
/// QEMU's text (QEMU's test uses `pcie.0`; ours is a port without Hot-Plug
/// Capable called that).
#[test]
fn params_error_pcie() {
    let (vm, _mem) = Vm::simple();
    let p = &vm.pairs[0];
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    let e = vm
        .coord
        .add_primary(Primary::new(
            "primary0",
            "standby0",
            p.primary.clone(),
            Slot::port("pcie.0", &vm.fixed_port),
        ))
        .unwrap_err();
    assert_eq!(
        e,
        RegistryError::NoHotplug {
            primary: "primary0".into(),
            slot: "pcie.0".into()
        }
    );
    assert!(
        e.to_string()
            .contains("Bus 'pcie.0' does not support hotplugging"),
        "{e}"
    );
    assert_eq!(vm.coord.primary_state("primary0"), None);
}

/// QEMU's "Cannot attach more than one primary device": the second primary for
/// a standby is refused, naming the standby and both primaries; the first is
/// unaffected. Other refusals name the devices too.
#[test]
fn params_error_second_primary_and_other_refusals() {
    let mem = TestMemory::new(4 << 20);
    let vm = Vm::new(
        Spec {
            pairs: 2,
            ..Spec::default()
        },
        &mem,
        &VirtualClock::new(),
    );
    let (p0, p1) = (&vm.pairs[0], &vm.pairs[1]);
    vm.coord.add_standby(p0.standby_config(true)).unwrap();
    vm.coord.add_primary(p0.primary_config()).unwrap();
    let second = Primary::new(
        "primary1",
        "standby0",
        p1.primary.clone(),
        Slot::port("root3", &p1.primary_port),
    );
    let e = vm.coord.add_primary(second).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot attach more than one primary device to 'standby0': 'primary0' and 'primary1'"
    );
    // Same id twice, as a standby or as a primary.
    let e = vm.coord.add_standby(Standby::new("primary0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "'primary0' is already registered as a primary; every standby and primary needs its own id"
    );
    let e = vm.coord.add_standby(Standby::new("standby0")).unwrap_err();
    assert!(
        e.to_string().contains("already registered as a standby"),
        "{e}"
    );
    assert_eq!(
        vm.coord.add_standby(Standby::new("")).unwrap_err(),
        RegistryError::MissingStandbyId
    );
    // Another primary in primary0's slot.
    vm.coord.add_standby(p1.standby_config(true)).unwrap();
    let e = vm
        .coord
        .add_primary(Primary::new(
            "primary1",
            "standby1",
            p1.primary.clone(),
            Slot::port("root1", &p0.primary_port),
        ))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "primary 'primary1': slot 'root1' is already primary 'primary0's; give each primary its \
         own slot"
    );
    // A slot that holds some other device.
    use pcie_hotplug::HotplugSlot;
    p1.primary_port
        .lock()
        .unwrap()
        .cold_plug(test_guest::StubEndpoint::vf())
        .unwrap();
    let e = vm.coord.add_primary(p1.primary_config()).unwrap_err();
    assert!(
        e.to_string()
            .contains("slot 'root3' already holds another device"),
        "{e}"
    );
    assert_eq!(
        vm.events.take_kinds(),
        [
            paired("primary0", "standby0"),
            hidden("primary0", "standby0")
        ]
    );
}

/// params/on: with failover on, the primary is held out of its slot; the
/// guest's boot-time enumeration does not find it. (QEMU's test never starts
/// the virtio driver; our guest's driver probes at boot, so the plug that
/// negotiation triggers is params/enabled.)
#[test]
fn params_on() {
    let (vm, _mem) = Vm::simple();
    vm.register_all(true);
    assert_eq!(
        vm.events.take_kinds(),
        [
            paired("primary0", "standby0"),
            hidden("primary0", "standby0")
        ]
    );
    assert_eq!(vm.slots(), [false]);
    let g = vm.boot(GUEST_FAILOVER);
    let p = &vm.pairs[0];
    // Enumeration ran before the driver negotiated: the primary was not there.
    assert!(g.env.enumerator.get(p.primary_fn).is_none());
    assert!(g.env.enumerator.get(p.standby_fn).is_some());
    assert_eq!(vm.guest_view(&g), [(true, false)]);
}

/// params/on_mismatch: a primary whose pair id names no standby is an
/// ordinary device, present at boot.
#[test]
fn params_on_mismatch() {
    let (vm, _mem) = Vm::simple();
    let p = &vm.pairs[0];
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    vm.coord
        .add_primary(Primary::new(
            "primary0",
            "standby1",
            p.primary.clone(),
            Slot::port("root1", &p.primary_port),
        ))
        .unwrap();
    // Held until the machine's configuration is complete: standby1 could still come.
    assert_eq!(vm.events.take_kinds(), [hidden("primary0", "standby1")]);
    vm.coord.machine_ready();
    assert_eq!(
        vm.events.take_kinds(),
        [unpaired("primary0", "standby1", UnpairedReason::NoStandby)]
    );
    assert_eq!(vm.slots(), [true], "cold-plugged");
    let mut g = vm.boot(GUEST_FAILOVER);
    assert_eq!(vm.guest_view(&g), [(true, true)], "both found at boot");
    vm.settle(&mut g, SETTLE);
    // The standby negotiates, but has no primary of its own.
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), missing("standby0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// params/off: with failover off the primary is an ordinary device and the
/// standby offers no STANDBY.
#[test]
fn params_off() {
    let (vm, _mem) = vm(Spec {
        failover: false,
        ..Spec::default()
    });
    vm.register_all(false);
    assert_eq!(
        vm.events.take_kinds(),
        [unpaired(
            "primary0",
            "standby0",
            UnpairedReason::FailoverOff
        )]
    );
    assert_eq!(vm.slots(), [true]);
    let mut g = vm.boot(GUEST_FAILOVER);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(g.env.virtio[0].features & STANDBY_BIT, 0);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// params/enabled: once the guest acknowledges STANDBY the primary is plugged
/// and the guest enables it (0.1 to 0.12 s of Linux's pciehp).
#[test]
fn params_enabled() {
    let (vm, _mem) = Vm::simple();
    vm.register_all(true);
    vm.events.take();
    let mut g = vm.boot(GUEST_FAILOVER);
    assert_eq!(vm.events.kinds(), [negotiated("standby0")]);
    assert_eq!(vm.slots(), [true], "plugged at FEATURES_OK");
    assert_eq!(
        vm.guest_view(&g),
        [(true, false)],
        "the guest has not enabled it yet"
    );
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.kinds(),
        [negotiated("standby0"), plugged("primary0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    let p = &vm.pairs[0];
    let f = g.env.enumerator.get(p.primary_fn).unwrap();
    assert_eq!((f.vendor, f.device, f.class), (0x8086, 0x10ed, 0x020000));
    assert_eq!(
        g.pciehp(p.primary_port_bdf).unwrap().state(),
        PciehpState::On
    );
    // Linux pciehp: power on, link up, (6.1: 20 ms before the first Link Active
    // poll,) 100 ms settle, enumerate, light the indicator.
    let took = at(&vm.events, &plugged("primary0")) - at(&vm.events, &negotiated("standby0"));
    assert!(
        (Duration::from_millis(100)..=Duration::from_millis(120)).contains(&took),
        "{took:?}"
    );
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(failover::PrimaryState::Plugged)
    );
}

/// params/guest_off: a guest that does not acknowledge STANDBY never sees the
/// primary.
#[test]
fn params_guest_off() {
    let (vm, _mem) = Vm::simple();
    vm.register_all(true);
    vm.events.take();
    let mut g = vm.boot(GUEST_NO_STANDBY);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(vm.coord.negotiated("standby0"), Some(false));
    assert_eq!(vm.guest_view(&g), [(true, false)]);
    assert_eq!(vm.slots(), [false]);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(failover::PrimaryState::Hidden)
    );
}

/// Ours: a primary whose MAC differs from its standby's is reported when they
/// pair, naming both (QEMU's own tests use different MACs without a word; the
/// guest's net_failover would not bond them).
#[test]
fn mac_mismatch_is_reported_at_pairing() {
    let (vm, _mem) = vm(Spec {
        same_mac: false,
        ..Spec::default()
    });
    // Primary first: the warning comes when its standby arrives.
    let p = &vm.pairs[0];
    vm.coord.add_primary(p.primary_config()).unwrap();
    assert_eq!(vm.events.take_kinds(), [hidden("primary0", "standby0")]);
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    let events = vm.events.take();
    let kinds: Vec<_> = events.iter().map(|e| e.event.clone()).collect();
    assert_eq!(
        kinds,
        [
            paired("primary0", "standby0"),
            mac_mismatch("primary0", MAC_PRIMARY[0], "standby0", MAC_STANDBY[0]),
        ]
    );
    let text = events[1].event.to_string();
    assert!(
        text.contains("'primary0' has MAC 52:54:00:11:11:11")
            && text.contains("'standby0' has 52:54:00:22:22:22"),
        "{text}"
    );
    // Without MACs there is nothing to compare.
    let (vm, _mem) = Vm::simple();
    let p = &vm.pairs[0];
    vm.coord.add_standby(Standby::new("standby0")).unwrap();
    vm.coord.add_primary(p.primary_config()).unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            paired("primary0", "standby0"),
            hidden("primary0", "standby0")
        ]
    );
}

/// Ours: registered in any order before the machine is ready, a primary is
/// hidden either way.
#[test]
fn registration_order_does_not_matter() {
    let (vm, _mem) = Vm::simple();
    let p = &vm.pairs[0];
    vm.coord.add_primary(p.primary_config()).unwrap();
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    vm.coord.machine_ready();
    assert_eq!(
        vm.events.take_kinds(),
        [
            hidden("primary0", "standby0"),
            paired("primary0", "standby0")
        ]
    );
    assert_eq!(vm.slots(), [false]);
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), plugged("primary0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}
