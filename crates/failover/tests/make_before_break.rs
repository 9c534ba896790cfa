//! Make before break on the scripted guest and its virtual clock: before the
//! coordinator asks the guest to release a primary for migration it takes the
//! primary's link down (the VMM's `PrimaryLink` hook), so the guest's
//! `net_failover` moves its transmit path to the standby; the unplug is
//! requested when the standby carries the guest's traffic
//! (`Coordinator::standby_traffic`) or when the switch wait runs out. A
//! cancel or failure brings the link back up, before any replug. Each step
//! asserts the events, the link hook's calls and the guest's view.
//!
//! The guest's traffic is modelled here as `net_failover` chooses its
//! transmit path: a frame goes out on the primary while the guest has the
//! primary bound and its link is up, else on the standby (whose transmit path
//! calls `standby_traffic`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use failover::{MigrationState as S, PrimaryState};
use test_guest::{Guest, VirtualClock};
use virtio_net_standby::testing::TestMemory;

/// A source VM per `spec` whose primaries have recording link hooks, booted
/// and settled: the guest has every primary.
fn running_with_links(spec: Spec) -> (Vm, Guest, Vec<Arc<RecordingLink>>, TestMemory) {
    let mem = TestMemory::new(4 << 20);
    let vm = Vm::new(spec, &mem, &VirtualClock::new());
    let links: Vec<_> = (0..vm.pairs.len())
        .map(|i| RecordingLink::for_pair(&vm, i))
        .collect();
    for (p, link) in vm.pairs.iter().zip(&links) {
        vm.coord.add_standby(p.standby_config(true)).unwrap();
        vm.coord
            .add_primary(p.primary_config_with_link(link))
            .unwrap();
    }
    vm.coord.machine_ready();
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.guest_view(&g), vec![(true, true); vm.pairs.len()]);
    vm.events.take();
    (vm, g, links, mem)
}

/// Where the guest's next frame of pair `i` goes, as `net_failover` chooses:
/// `true` for the primary. A frame on the standby reaches the VMM's
/// transmit path, which tells the coordinator.
fn send_frame(vm: &Vm, g: &Guest, link: &RecordingLink, i: usize) -> bool {
    let on_primary = link.is_up() && vm.guest_view(g)[i].1;
    if !on_primary {
        vm.coord.standby_traffic(&vm.pairs[i].standby_id);
    }
    on_primary
}

fn button_presses(vm: &Vm, i: usize) -> u64 {
    vm.pairs[i]
        .primary_port
        .lock()
        .unwrap()
        .counters()
        .button_presses
}

/// The guest transmits every 50 ms: the link goes down, its next frame goes
/// out on the standby, and that frame (not a timer) requests the unplug.
/// No frame goes out on the primary once its unplug is requested.
#[test]
fn the_unplug_waits_for_traffic_on_the_standby() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let link = &links[0];
    assert!(
        send_frame(&vm, &g, link, 0),
        "on the primary while it is up"
    );
    let presses = button_presses(&vm, 0);
    let t0 = vm.clock.now();
    let m = vm.coord.prepare_outgoing().unwrap();
    assert_eq!(m.state(), S::WaitUnplug);
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Setup),
            link_down("primary0"),
            migration(S::WaitUnplug)
        ]
    );
    assert_eq!(
        link.calls(),
        [LinkCall {
            at: t0,
            up: false,
            in_slot: true
        }]
    );
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::LinkDown)
    );
    assert_eq!(m.waiting_for(), ["primary0"]);
    // The switch wait is on the coordinator's timer; nothing was asked of the
    // slot yet, and the guest still has the primary.
    assert_eq!(
        vm.coord.deadline(),
        Some(t0 + failover::DEFAULT_SWITCH_WAIT)
    );
    assert_eq!(button_presses(&vm, 0), presses);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    let busy = vm.coord.ready_to_save().unwrap_err();
    assert!(
        busy.to_string().contains("switching to its standby"),
        "{busy}"
    );
    // Traffic on another standby is not this one's.
    vm.coord.standby_traffic("standby7");

    // 50 ms later the guest's next frame goes out on the standby.
    vm.run_for(&mut g, Duration::from_millis(50));
    assert_eq!(vm.events.kinds(), []);
    let t1 = vm.clock.now();
    assert!(
        !send_frame(&vm, &g, link, 0),
        "on the standby once the link is down"
    );
    // Called from the transmit path (maybe inside the guest's queue notify):
    // the unplug and the events wait for the VMM's deferred work.
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::Unplugging)
    );
    vm.service(&mut g);
    assert_eq!(
        vm.events.take_kinds(),
        [
            switched("standby0", "primary0", true),
            unplug_primary("primary0")
        ]
    );
    assert_eq!(button_presses(&vm, 0), presses + 1);
    assert_eq!(m.deadline(), Some(t0 + failover::DEFAULT_UNPLUG_TIMEOUT));
    assert!(
        vm.coord.deadline().unwrap() > t0 + failover::DEFAULT_SWITCH_WAIT,
        "the switch wait is over"
    );
    // Nothing waits for traffic any more.
    assert!(!send_frame(&vm, &g, link, 0));
    vm.service(&mut g);
    assert_eq!(vm.events.kinds(), []);

    // The guest releases the primary (Linux's 5 s button delay) while every
    // frame goes out on the standby.
    let mut on_primary = 0;
    while m.state() == S::WaitUnplug {
        vm.run_for(&mut g, Duration::from_millis(50));
        on_primary += send_frame(&vm, &g, link, 0) as usize;
        assert!(vm.clock.now() - t0 < SETTLE, "{:#?}", vm.events.kinds());
    }
    assert_eq!(on_primary, 0);
    assert_eq!(
        vm.events.take_kinds(),
        [unplugged("primary0"), migration(S::Active)]
    );
    let out = vm.clock.now() - t1;
    assert!(out >= Duration::from_secs(5), "{out:?}");
    assert_eq!(vm.guest_view(&g), [(true, false)]);
    assert_eq!(vm.slots(), [false]);
    vm.coord.ready_to_save().unwrap();
    m.complete().unwrap();
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), [migration(S::Completed)]);
    // The link stays down with the primary gone: one call in all.
    assert_eq!(link.ups(), [(false, true)]);
}

/// An idle guest sends nothing: the unplug is requested when the switch wait
/// (200 ms by default) runs out, on the coordinator's timer.
#[test]
fn the_switch_wait_runs_out_for_an_idle_guest() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let t0 = vm.clock.now();
    let m = vm.coord.prepare_outgoing().unwrap();
    vm.events.take();
    vm.run_for(&mut g, Duration::from_millis(199));
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::LinkDown)
    );
    vm.run_for(&mut g, Duration::from_millis(1));
    assert_eq!(
        vm.events.kinds(),
        [
            switched("standby0", "primary0", false),
            unplug_primary("primary0")
        ]
    );
    assert_eq!(
        at(&vm.events, &switched("standby0", "primary0", false)) - t0,
        failover::DEFAULT_SWITCH_WAIT
    );
    vm.events.take();
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.take_kinds(),
        [unplugged("primary0"), migration(S::Active)]
    );
    assert_eq!(m.state(), S::Active);
    assert_eq!(vm.guest_view(&g), [(true, false)]);
    assert_eq!(links[0].ups(), [(false, true)]);
}

/// `switch_wait(Duration::ZERO)`: the unplug is requested right after the
/// link is down, inside `prepare_outgoing`.
#[test]
fn a_zero_switch_wait_unplugs_right_after_the_link_is_down() {
    let (vm, mut g, links, _mem) = running_with_links(Spec {
        switch_wait: Duration::ZERO,
        ..Spec::default()
    });
    let m = vm.coord.prepare_outgoing().unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Setup),
            link_down("primary0"),
            switched("standby0", "primary0", false),
            unplug_primary("primary0"),
            migration(S::WaitUnplug)
        ]
    );
    vm.settle(&mut g, SETTLE);
    assert_eq!(m.state(), S::Active);
    assert_eq!(links[0].ups(), [(false, true)]);
}

/// A cancel (and a failure) while the link is down: the link comes back up,
/// nothing was asked of the slot, and the primary never leaves the guest.
#[test]
fn a_cancel_while_the_link_is_down_restores_it_and_the_primary_never_leaves() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let link = &links[0];
    let presses = button_presses(&vm, 0);
    let m = vm.coord.prepare_outgoing().unwrap();
    vm.run_for(&mut g, Duration::from_millis(100));
    vm.events.take();
    m.cancel().unwrap();
    assert_eq!(m.state(), S::Cancelled);
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Cancelling),
            migration(S::Cancelled),
            link_up("primary0")
        ]
    );
    assert_eq!(link.ups(), [(false, true), (true, true)]);
    assert!(link.is_up());
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::Plugged)
    );
    assert_eq!(vm.coord.deadline(), None, "no switch wait left");
    // Traffic goes back to the primary; the standby's is nobody's signal.
    assert!(send_frame(&vm, &g, link, 0));
    vm.coord.standby_traffic("standby0");
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(button_presses(&vm, 0), presses, "the slot was never asked");

    // The same for a failure (the VMM's, or the wait's deadline).
    let m = vm.coord.prepare_outgoing().unwrap();
    vm.events.take();
    m.fail("the destination went away").unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            failover::Event::Migration {
                status: S::Failed,
                reason: Some("the destination went away".into())
            },
            link_up("primary0")
        ]
    );
    assert_eq!(
        link.ups(),
        [(false, true), (true, true), (false, true), (true, true)]
    );
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert_eq!(button_presses(&vm, 0), presses);
}

/// A cancel after the guest released the primary: the link is brought back
/// up before the primary is plugged back (the hook sees an empty slot), and
/// the guest gets its primary back.
#[test]
fn a_cancel_after_the_unplug_brings_the_link_up_before_the_replug() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let link = &links[0];
    let m = vm.coord.prepare_outgoing().unwrap();
    vm.run_for(&mut g, Duration::from_millis(50));
    assert!(!send_frame(&vm, &g, link, 0));
    vm.settle(&mut g, SETTLE);
    assert_eq!(m.state(), S::Active);
    assert_eq!(vm.guest_view(&g), [(true, false)]);
    vm.events.take();

    m.cancel().unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Cancelling),
            migration(S::Cancelled),
            link_up("primary0")
        ]
    );
    // Up while the slot was still empty: before the replug.
    assert_eq!(link.ups(), [(false, true), (true, false)]);
    assert_eq!(vm.slots(), [true], "the replug was requested after it");
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), [plugged("primary0")]);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert!(send_frame(&vm, &g, link, 0), "back on the primary");
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::Plugged)
    );
}

/// A cancel while the unplug is in flight inside the guest's 5 s window: the
/// link comes up, the withdrawal is answered, the primary never leaves.
#[test]
fn a_cancel_inside_the_window_restores_the_link_and_withdraws_the_unplug() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let link = &links[0];
    let m = vm.coord.prepare_outgoing().unwrap();
    vm.run_for(&mut g, Duration::from_millis(50));
    assert!(!send_frame(&vm, &g, link, 0));
    vm.run_for(&mut g, Duration::from_secs(2));
    assert_eq!(m.state(), S::WaitUnplug);
    vm.events.take();
    m.cancel().unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [migration(S::Cancelling), link_up("primary0")]
    );
    vm.settle(&mut g, SETTLE);
    assert_eq!(
        vm.events.kinds(),
        [unplug_cancelled("primary0"), migration(S::Cancelled)]
    );
    assert_eq!(link.ups(), [(false, true), (true, true)]);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
    assert!(send_frame(&vm, &g, link, 0));
}

/// A link hook that fails: logged, no PRIMARY_LINK_DOWN or switch is
/// claimed, and the primary is unplugged at once (the unplug is what the
/// migration needs). A later cancel still tries to bring the link up, and
/// claims nothing either.
#[test]
fn a_failing_link_hook_unplugs_at_once_and_claims_nothing() {
    let (vm, mut g, links, _mem) = running_with_links(Spec::default());
    let link = &links[0];
    link.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = vm.coord.prepare_outgoing().unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Setup),
            unplug_primary("primary0"),
            migration(S::WaitUnplug)
        ]
    );
    assert_eq!(link.ups(), [(false, true)]);
    vm.run_for(&mut g, Duration::from_secs(1));
    m.cancel().unwrap();
    vm.settle(&mut g, SETTLE);
    let kinds = vm.events.take_kinds();
    assert!(
        !kinds.iter().any(|e| matches!(
            e,
            failover::Event::PrimaryLinkUp { .. } | failover::Event::SwitchedToStandby { .. }
        )),
        "{kinds:#?}"
    );
    assert_eq!(link.ups(), [(false, true), (true, true)]);
    assert_eq!(vm.guest_view(&g), [(true, true)]);
}

/// Two pairs: each waits for traffic on its own standby; a primary without a
/// hook is unplugged at once, as before.
#[test]
fn each_pair_switches_on_its_own_standbys_traffic() {
    let mem = TestMemory::new(4 << 20);
    let vm = Vm::new(
        Spec {
            pairs: 2,
            ..Spec::default()
        },
        &mem,
        &VirtualClock::new(),
    );
    let link = RecordingLink::for_pair(&vm, 0);
    vm.coord
        .add_standby(vm.pairs[0].standby_config(true))
        .unwrap();
    vm.coord
        .add_primary(vm.pairs[0].primary_config_with_link(&link))
        .unwrap();
    vm.coord
        .add_standby(vm.pairs[1].standby_config(true))
        .unwrap();
    vm.coord.add_primary(vm.pairs[1].primary_config()).unwrap();
    vm.coord.machine_ready();
    let mut g = vm.boot(GUEST_FAILOVER);
    vm.settle(&mut g, SETTLE);
    vm.events.take();

    let m = vm.coord.prepare_outgoing().unwrap();
    assert_eq!(
        vm.events.take_kinds(),
        [
            migration(S::Setup),
            link_down("primary0"),
            unplug_primary("primary1"),
            migration(S::WaitUnplug)
        ]
    );
    // primary1's standby carrying traffic is not primary0's switch.
    vm.coord.standby_traffic("standby1");
    vm.service(&mut g);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(
        vm.coord.primary_state("primary0"),
        Some(PrimaryState::LinkDown)
    );
    vm.coord.standby_traffic("standby0");
    vm.service(&mut g);
    assert_eq!(
        vm.events.take_kinds(),
        [
            switched("standby0", "primary0", true),
            unplug_primary("primary0")
        ]
    );
    vm.settle(&mut g, SETTLE);
    assert_eq!(m.state(), S::Active);
    assert_eq!(vm.guest_view(&g), [(true, false), (true, false)]);
    assert_eq!(link.ups(), [(false, true)]);
}

/// Beside it, the break before make QEMU does (no hook): after
/// UNPLUG_PRIMARY the guest keeps transmitting on the primary for the whole
/// of Linux's 5 s button delay, until the very moment it removes the device,
/// so whatever is in flight then is lost. With the hook not one frame goes
/// out on the primary after the unplug is requested.
#[test]
fn without_a_hook_the_guest_transmits_on_the_primary_until_it_leaves() {
    let count = |hooked: bool| {
        let (vm, mut g, links, _mem) = if hooked {
            running_with_links(Spec::default())
        } else {
            let mem = TestMemory::new(4 << 20);
            let vm = Vm::new(Spec::default(), &mem, &VirtualClock::new());
            vm.register_all(true);
            let mut g = vm.boot(GUEST_FAILOVER);
            vm.settle(&mut g, SETTLE);
            // Never registered: always up, as a primary without a hook.
            let link = RecordingLink::for_pair(&vm, 0);
            (vm, g, vec![link], mem)
        };
        vm.events.take();
        let m = vm.coord.prepare_outgoing().unwrap();
        let mut on_primary_after_request = 0;
        while m.state() == S::WaitUnplug {
            vm.run_for(&mut g, Duration::from_millis(50));
            let requested = vm.events.kinds().contains(&unplug_primary("primary0"));
            let on_primary = send_frame(&vm, &g, &links[0], 0);
            if requested && on_primary {
                on_primary_after_request += 1;
            }
            vm.service(&mut g);
            assert!(vm.clock.now() < SETTLE * 2, "{:#?}", vm.events.kinds());
        }
        assert_eq!(m.state(), S::Active);
        on_primary_after_request
    };
    assert_eq!(count(true), 0);
    // 5 s of button delay at 50 ms cadence, give or take the unbind.
    let without = count(false);
    assert!((95..=105).contains(&without), "{without}");
}
