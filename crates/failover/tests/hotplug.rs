//! QEMU's `failover-virtio-net/hotplug/*` scenarios: standby and primary added
//! while the guest runs, in both orders, on the scripted guest. The standby is
//! hot-plugged into its own port (the guest's pciehp enables it and its
//! virtio_net driver probes it); the coordinator does the primary.

mod common;

use common::*;
use failover::{PrimaryState, UnpairedReason};
use pcie_hotplug::HotplugSlot;
use test_guest::{Guest, VirtualClock};
use virtio_net_standby::testing::TestMemory;

fn empty_vm() -> (Vm, TestMemory) {
    let mem = TestMemory::new(4 << 20);
    let vm = Vm::new(
        Spec {
            cold_standby: false,
            ..Spec::default()
        },
        &mem,
        &VirtualClock::new(),
    );
    (vm, mem)
}

/// The VMM hot-adds pair 0's standby: registers it, plugs it into its port,
/// and lets the guest enable and probe it.
fn hot_add_standby(vm: &Vm, g: &mut Guest) {
    let p = &vm.pairs[0];
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    p.standby_port
        .lock()
        .unwrap()
        .plug(p.standby.clone())
        .unwrap();
    vm.settle(g, SETTLE);
}

/// hotplug/1: the standby is there and negotiated when the primary is added:
/// it is plugged at once.
#[test]
fn hotplug_1() {
    let (vm, _mem) = Vm::simple();
    vm.coord
        .add_standby(vm.pairs[0].standby_config(true))
        .unwrap();
    vm.coord.machine_ready();
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), missing("standby0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, false)]);

    vm.coord.add_primary(vm.pairs[0].primary_config()).unwrap();
    assert_eq!(vm.events.take_kinds(), [paired("primary0", "standby0")]);
    assert_eq!(vm.slots(), [true]);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.take_kinds(), [plugged("primary0")]);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// hotplug/1_reverse: the primary is there at boot with no standby (an
/// ordinary device, as in QEMU); the standby added later pairs with it, the
/// guest keeps it, and it is now the failover primary a migration unplugs.
#[test]
fn hotplug_1_reverse() {
    let (vm, _mem) = empty_vm();
    vm.coord.add_primary(vm.pairs[0].primary_config()).unwrap();
    vm.coord.machine_ready();
    assert_eq!(
        vm.events.take_kinds(),
        [
            hidden("primary0", "standby0"),
            unpaired("primary0", "standby0", UnpairedReason::NoStandby)
        ]
    );
    let mut g = vm.boot(GUEST_FAILOVER);
    assert_eq!(vm.guest_view(&g), [(false, true)]);

    hot_add_standby(&vm, &mut g);
    assert_eq!(
        vm.events.take_kinds(),
        [paired("primary0", "standby0"), negotiated("standby0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::Plugged)
    );
    let m = vm.coord.prepare_outgoing().unwrap();
    assert!(vm.events.take_kinds().contains(&unplug_primary("primary0")));
    m.cancel().unwrap();
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// hotplug/2: standby added and negotiated first, then the primary.
#[test]
fn hotplug_2() {
    let (vm, _mem) = empty_vm();
    vm.coord.machine_ready();
    let mut g = vm.boot(GUEST_FAILOVER);
    assert_eq!(vm.guest_view(&g), [(false, false)]);

    hot_add_standby(&vm, &mut g);
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), missing("standby0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, false)]);

    vm.coord.add_primary(vm.pairs[0].primary_config()).unwrap();
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [paired("primary0", "standby0"), plugged("primary0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// hotplug/2_reverse: the primary added before its standby stays hidden until
/// the guest acknowledges STANDBY. QEMU plugs it at once (its test says "XXX:
/// sounds like a bug").
#[test]
fn hotplug_2_reverse_hides_the_primary() {
    let (vm, _mem) = empty_vm();
    vm.coord.machine_ready();
    let mut g = vm.boot(GUEST_FAILOVER);

    vm.coord.add_primary(vm.pairs[0].primary_config()).unwrap();
    assert_eq!(vm.events.take_kinds(), [hidden("primary0", "standby0")]);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.slots(), [false]);
    assert_eq!(vm.guest_view(&g), [(false, false)], "QEMU: (false, true)");

    // The standby arrives: paired, still hidden until its driver negotiates.
    let p = &vm.pairs[0];
    vm.coord.add_standby(p.standby_config(true)).unwrap();
    assert_eq!(vm.events.take_kinds(), [paired("primary0", "standby0")]);
    assert_eq!(vm.slots(), [false], "QEMU: plugged");
    p.standby_port
        .lock()
        .unwrap()
        .plug(p.standby.clone())
        .unwrap();
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [negotiated("standby0"), plugged("primary0")]
    );
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// Ours: a driver reload (reset and renegotiation) announces the negotiation
/// again and plugs nothing twice; a driver without STANDBY after it does not
/// hide the primary again (QEMU: reset does not re-hide).
#[test]
fn renegotiation_and_reset_are_idempotent() {
    let (vm, _mem) = Vm::simple();
    vm.register_all(true);
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    vm.events.take();
    let p = &vm.pairs[0];
    let presses = p.primary_port.lock().unwrap().counters().button_presses;

    // rmmod virtio_net; modprobe virtio_net.
    g.env.unbind(p.standby_fn);
    assert_eq!(vm.guest_view(&g), [(false, true)]);
    g.env.bind(p.standby_fn);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.take_kinds(), [negotiated("standby0")]);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(
        p.primary_port.lock().unwrap().counters().button_presses,
        presses
    );

    // An old driver that does not know STANDBY.
    g.env.unbind(p.standby_fn);
    g.env.virtio_features = GUEST_NO_STANDBY;
    g.env.bind(p.standby_fn);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.take_kinds(), []);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::Plugged)
    );
    assert_eq!(
        p.primary_port.lock().unwrap().counters().button_presses,
        presses
    );
}
