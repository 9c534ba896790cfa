//! The migration pre-flight on the scripted guest: the destination says what
//! it can take (`destination_offer`), the source checks it against its pairs
//! before it unplugs anything (`preflight`, `prepare_outgoing_to`). QEMU
//! unplugs first; when the destination then rejects the standby's features,
//! it reports success while the guest is lost. Here a refusal names every
//! problem at once and leaves the guest as it was.

mod common;

use std::time::Duration;

use common::*;
use failover::{DestinationOffer, MigrationError, MigrationState as S, PrimaryState, StandbyOffer};
use test_guest::{Guest, VirtualClock};
use virtio_net_standby::testing::TestMemory;

const MAC_BIT: u64 = 1 << 5;
const STATUS_BIT: u64 = 1 << 16;

fn running(spec: Spec, mem: &TestMemory, clock: &VirtualClock, features: u64) -> (Vm, Guest) {
    let vm = Vm::new(spec, mem, clock);
    vm.register_all(true);
    let mut g = vm.boot(features);
    vm.settle(&mut g, SETTLE);
    vm.events.take();
    (vm, g)
}

fn acked(vm: &Vm, i: usize) -> u64 {
    vm.pairs[i]
        .standby
        .lock()
        .unwrap()
        .device()
        .acked_features()
        .unwrap()
        .bits()
}

fn presses(vm: &Vm) -> Vec<u64> {
    vm.pairs
        .iter()
        .map(|p| p.primary_port.lock().unwrap().counters().button_presses)
        .collect()
}

/// A destination with failover off on one standby, and on the other a device
/// that lacks two bits the guest acknowledged and no primary: every problem
/// at once, one line each, and nothing unplugged.
#[test]
fn a_destination_that_cannot_take_the_pairs_is_refused_before_any_unplug() {
    let (mem, clock) = (TestMemory::new(4 << 20), VirtualClock::new());
    let (vm, mut g) = running(
        Spec {
            pairs: 2,
            ..Spec::default()
        },
        &mem,
        &clock,
        GUEST_FAILOVER,
    );
    assert_eq!(vm.guest_view(&g), [(true, true), (true, true)]);
    let offered = vm.pairs[0].offered_features();
    assert_eq!(acked(&vm, 1) & (MAC_BIT | STATUS_BIT), MAC_BIT | STATUS_BIT);
    let offer = DestinationOffer {
        standbys: vec![
            StandbyOffer {
                id: "standby0".into(),
                failover: false,
                offered_features: Some(offered & !STANDBY_BIT),
                primary: Some("primary0".into()),
            },
            StandbyOffer {
                id: "standby1".into(),
                failover: true,
                offered_features: Some(offered & !(MAC_BIT | STATUS_BIT)),
                primary: None,
            },
        ],
    };
    let before = presses(&vm);
    let e = vm.coord.prepare_outgoing_to(&offer).unwrap_err();
    let lines = [
        "standby 'standby0': the guest negotiated STANDBY here, but the destination's standby \
         has failover off; the guest would lose its primary for good (turn failover on there)",
        "standby 'standby1': the destination's device does not offer feature bits 0x10020 \
         (bits 5, 16) that the guest acknowledged here; its driver cannot go on with them \
         missing",
        "standby 'standby1': the destination has no primary for it (here: 'primary1'); the \
         guest would run on the standby alone (register one there, or allow it with \
         preflight_allow_missing_primary(true))",
    ];
    assert_eq!(
        e,
        MigrationError::Preflight {
            problems: lines.iter().map(|l| l.to_string()).collect()
        }
    );
    assert_eq!(e.to_string(), lines.join("\n"));
    assert_eq!(vm.coord.preflight(&offer).unwrap_err(), e);
    // Nothing happened: no event, no migration, no button press.
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(presses(&vm), before);
    for p in ["primary0", "primary1"] {
        assert_eq!(vm.coord.primary_state(p), Some(PrimaryState::Plugged));
    }
    vm.settle(&mut g, SETTLE);
    assert_eq!(vm.events.kinds(), []);
    assert_eq!(vm.guest_view(&g), [(true, true), (true, true)]);
    assert_eq!(vm.slots(), [true, true]);

    // A destination that knowingly has no primary: only the other problems.
    vm.coord.preflight_allow_missing_primary(true);
    let e = vm.coord.preflight(&offer).unwrap_err();
    assert_eq!(
        e,
        MigrationError::Preflight {
            problems: lines[..2].iter().map(|l| l.to_string()).collect()
        }
    );
    // A destination without the standbys at all.
    let e = vm
        .coord
        .preflight(&DestinationOffer::default())
        .unwrap_err();
    let MigrationError::Preflight { problems } = e else {
        panic!("{e:?}");
    };
    assert_eq!(
        problems,
        ["standby0", "standby1"].map(|s| format!(
            "standby '{s}': the destination has no standby with this id; its state has \
             nowhere to go (register it there before migrating)"
        ))
    );
    // No migration was started: one may be now.
    let m = vm.coord.prepare_outgoing().unwrap();
    assert_eq!(m.state(), S::WaitUnplug);
}

/// A guest that never acknowledged STANDBY migrates to a destination with
/// failover off and no primary: nothing of failover is at stake, so the
/// pre-flight passes (the feature check still applies).
#[test]
fn a_guest_without_standby_may_go_where_failover_is_off() {
    let (mem, clock) = (TestMemory::new(4 << 20), VirtualClock::new());
    let (vm, _g) = running(Spec::default(), &mem, &clock, GUEST_NO_STANDBY);
    assert_eq!(vm.coord.negotiated("standby0"), Some(false));
    let offered = vm.pairs[0].offered_features();
    let mut offer = DestinationOffer {
        standbys: vec![StandbyOffer {
            id: "standby0".into(),
            failover: false,
            offered_features: Some(offered & !STANDBY_BIT),
            primary: None,
        }],
    };
    vm.coord.preflight(&offer).unwrap();
    offer.standbys[0].offered_features = Some(offered & !STANDBY_BIT & !MAC_BIT);
    assert_eq!(
        vm.coord.preflight(&offer).unwrap_err().to_string(),
        "standby 'standby0': the destination's device does not offer feature bits 0x20 (bit \
         5) that the guest acknowledged here; its driver cannot go on with them missing"
    );
    // Unknown offered features are not checked.
    offer.standbys[0].offered_features = None;
    vm.coord.preflight(&offer).unwrap();
}

/// The destination's offer crosses as JSON, the pre-flight passes, and the
/// migration goes ahead with make before break: the link goes down, traffic
/// moves to the standby, the primary leaves, the standby side's state
/// crosses, and the destination plugs its primary.
#[test]
fn a_destination_that_can_take_the_pair_passes_and_the_migration_proceeds() {
    let (mem, clock) = (TestMemory::new(4 << 20), VirtualClock::new());
    let src = Vm::new(Spec::default(), &mem, &clock);
    let link = RecordingLink::for_pair(&src, 0);
    let p = &src.pairs[0];
    src.coord
        .add_standby(p.standby_config_offering(true))
        .unwrap();
    src.coord
        .add_primary(p.primary_config_with_link(&link))
        .unwrap();
    src.coord.machine_ready();
    let mut g = src.boot(GUEST_FAILOVER);
    src.settle(&mut g, SETTLE);
    src.events.take();

    // The destination: the same topology, the standby not yet attached.
    let dst = Vm::new(
        Spec {
            cold_standby: false,
            ..Spec::default()
        },
        &mem,
        &clock,
    );
    let q = &dst.pairs[0];
    dst.coord
        .add_standby(q.standby_config_offering(true))
        .unwrap();
    dst.coord.add_primary(q.primary_config()).unwrap();
    let offer = dst.coord.destination_offer();
    assert_eq!(
        offer,
        DestinationOffer {
            standbys: vec![StandbyOffer {
                id: "standby0".into(),
                failover: true,
                offered_features: Some(q.offered_features()),
                primary: Some("primary0".into()),
            }]
        }
    );
    // Over the migration channel.
    #[cfg(feature = "serde")]
    let offer: DestinationOffer =
        serde_json::from_str(&serde_json::to_string(&offer).unwrap()).unwrap();
    src.coord.preflight(&offer).unwrap();
    assert_eq!(src.events.kinds(), [], "the pre-flight changes nothing");

    let m = src.coord.prepare_outgoing_to(&offer).unwrap();
    assert_eq!(
        src.events.take_kinds(),
        [
            migration(S::Setup),
            link_down("primary0"),
            migration(S::WaitUnplug)
        ]
    );
    // Another migration (pre-flight or not) is refused meanwhile.
    assert_eq!(
        src.coord.prepare_outgoing_to(&offer).unwrap_err(),
        MigrationError::OutgoingInProgress {
            state: S::WaitUnplug
        }
    );
    src.run_for(&mut g, Duration::from_millis(20));
    src.coord.standby_traffic("standby0");
    src.settle(&mut g, SETTLE);
    assert_eq!(
        src.events.take_kinds(),
        [
            switched("standby0", "primary0", true),
            unplug_primary("primary0"),
            unplugged("primary0"),
            migration(S::Active)
        ]
    );
    assert_eq!(src.guest_view(&g), [(true, false)]);
    let saved = src.save();
    m.complete().unwrap();

    dst.coord.prepare_incoming().unwrap();
    dst.restore(&saved);
    dst.coord.complete_incoming().unwrap();
    assert_eq!(
        dst.events.take_kinds(),
        [
            paired("primary0", "standby0"),
            hidden("primary0", "standby0"),
            migration(S::Setup),
            negotiated("standby0"),
            migration(S::Completed)
        ]
    );
    g.resume_on(dst.root.clone(), dst.irqs.clone());
    dst.settle(&mut g, SETTLE);
    assert_eq!(dst.events.take_kinds(), [plugged("primary0")]);
    assert_eq!(dst.guest_view(&g), [(true, true)]);
    assert_eq!((src.slots(), dst.slots()), (vec![false], vec![true]));
    assert_eq!(link.ups(), [(false, true)]);
}
