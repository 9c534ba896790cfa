//! The failover coordinator under arbitrary interleavings of its calls
//! (outgoing migration, cancel, fail, complete with a destination restore,
//! deadline checks) and the scripted Linux guest's actions (running for any
//! virtual time, masking and unmasking a port's hot-plug interrupt, powering a
//! primary's slot off through sysfs), on the VM's virtual clock. The VM is the
//! one the failover crate's own scenarios use (`crates/failover/tests/common`).
//!
//! Checked: no panic; no event is emitted twice (a primary is not reported
//! enabled twice without leaving in between, a migration's status never
//! repeats, a finished migration is followed only by a new one's setup); a
//! primary the guest was last reported to have enabled is in its slot; at the
//! end of every migration path, once the guest is cooperative again and has
//! settled, each negotiated primary is present on exactly one side (back on
//! the source after a cancel or a failure, on the destination only after a
//! completed migration) and never on both.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../crates/failover/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use failover::{Event, MigrationState, OutgoingMigration, UnplugWait};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use test_guest::{Guest, VirtualClock};
use virtio_net_standby::testing::TestMemory;
use vmm_pci::config::{CAP_ID_MSI, CAP_ID_PCIE};

#[derive(Arbitrary, Debug)]
enum Op {
    /// The guest and the VMM run for this many milliseconds (times 8).
    Run(u16),
    /// Until nothing is scheduled.
    Settle,
    Migrate,
    Cancel,
    Fail,
    /// Save, complete, and restore on a destination (if the migration is active).
    Complete,
    CheckDeadline,
    RunDeferred,
    /// The guest masks (or unmasks) pair `pair`'s primary port interrupt.
    Mask {
        pair: u8,
        masked: bool,
    },
    /// The guest powers pair `pair`'s primary slot off (sysfs `power` 0).
    PowerOff {
        pair: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    two_pairs: bool,
    /// The guest's driver knows STANDBY.
    standby_guest: bool,
    /// The unplug wait: bounded (default), short, or unbounded.
    wait: u8,
    ops: Vec<Op>,
}

/// Event checks over a VM's whole event stream.
fn check_events(vm: &Vm, side: &str) {
    let events = vm.events.kinds();
    let mut enabled: Vec<(String, bool)> = Vec::new();
    let mut last_migration: Option<MigrationState> = None;
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::PrimaryPlugged { primary } => {
                match enabled.iter_mut().find(|(p, _)| p == primary) {
                    Some((_, on)) => {
                        assert!(
                            !*on,
                            "{side}: event {i}: '{primary}' reported enabled twice: {events:#?}"
                        );
                        *on = true;
                    }
                    None => enabled.push((primary.clone(), true)),
                }
            }
            Event::PrimaryUnplugged { primary } => {
                if let Some((_, on)) = enabled.iter_mut().find(|(p, _)| p == primary) {
                    *on = false;
                }
            }
            Event::Migration { status, .. } => {
                if let Some(prev) = last_migration {
                    assert_ne!(
                        prev, *status,
                        "{side}: event {i}: migration status {status} twice: {events:#?}"
                    );
                    if matches!(
                        prev,
                        MigrationState::Completed
                            | MigrationState::Failed
                            | MigrationState::Cancelled
                    ) {
                        assert_eq!(
                            *status,
                            MigrationState::Setup,
                            "{side}: event {i}: {status} after a finished migration: {events:#?}"
                        );
                    }
                }
                last_migration = Some(*status);
            }
            _ => {}
        }
    }
    // A primary last reported enabled is in its slot.
    for p in &vm.pairs {
        if enabled.iter().any(|(id, on)| *id == p.primary_id && *on) {
            assert!(
                p.primary_in_slot(),
                "{side}: '{}' reported enabled but not in its slot",
                p.primary_id
            );
        }
    }
}

fn cap(g: &Guest, bdf: vmm_pci::Bdf, id: u8) -> Option<u16> {
    g.env.enumerator.get(bdf).and_then(|f| f.cap(id))
}

/// The guest becomes cooperative again and settles.
fn calm(vm: &Vm, g: &mut Guest) {
    for p in &vm.pairs {
        if let Some(msi) = cap(g, p.primary_port_bdf, CAP_ID_MSI) {
            g.env.cfg_write(p.primary_port_bdf, msi + 0x10, 4, 0);
        }
    }
    vm.settle(g, SETTLE);
    vm.settle(g, SETTLE);
}

fn negotiated(vm: &Vm) -> Vec<bool> {
    vm.pairs
        .iter()
        .map(|p| vm.coord.negotiated(&p.standby_id) == Some(true))
        .collect()
}

fuzz_target!(|input: Input| {
    let spec = || Spec {
        pairs: if input.two_pairs { 2 } else { 1 },
        unplug_wait: match input.wait % 3 {
            0 => UnplugWait::default(),
            1 => UnplugWait::Bounded(Duration::from_secs(2)),
            _ => UnplugWait::Unbounded,
        },
        ..Spec::default()
    };
    let features = if input.standby_guest {
        GUEST_FAILOVER
    } else {
        GUEST_NO_STANDBY
    };
    let mem = TestMemory::new(4 << 20);
    let clock = VirtualClock::new();
    let vm = Vm::new(spec(), &mem, &clock);
    vm.register_all(true);
    let mut g = vm.boot(features);
    vm.settle(&mut g, SETTLE);
    check_events(&vm, "source");
    let mut m: Option<OutgoingMigration> = None;
    for op in input.ops.iter().take(64) {
        match op {
            Op::Run(ms) => vm.run_for(&mut g, Duration::from_millis(u64::from(*ms) * 8)),
            Op::Settle => {
                vm.settle(&mut g, SETTLE);
            }
            Op::Migrate => {
                if let Ok(mig) = vm.coord.prepare_outgoing() {
                    m = Some(mig);
                }
            }
            Op::Cancel => {
                if let Some(m) = &m {
                    let _ = m.cancel();
                }
            }
            Op::Fail => {
                if let Some(m) = &m {
                    let _ = m.fail("the fuzzer failed it");
                }
            }
            Op::CheckDeadline => vm.coord.check_deadline(),
            Op::RunDeferred => {
                vm.coord.run_deferred();
            }
            Op::Mask { pair, masked } => {
                let p = &vm.pairs[usize::from(*pair) % vm.pairs.len()];
                if let Some(msi) = cap(&g, p.primary_port_bdf, CAP_ID_MSI) {
                    g.env
                        .cfg_write(p.primary_port_bdf, msi + 0x10, 4, u32::from(*masked));
                }
            }
            Op::PowerOff { pair } => {
                let p = &vm.pairs[usize::from(*pair) % vm.pairs.len()];
                if let Some(c) = cap(&g, p.primary_port_bdf, CAP_ID_PCIE) {
                    let ctl = g.env.cfg_read(p.primary_port_bdf, c + 0x18, 2);
                    // Power Controller Control on (off), power indicator off.
                    let v = (ctl & !0x0300) | 0x0400 | 0x0300;
                    g.env.cfg_write(p.primary_port_bdf, c + 0x18, 2, v);
                }
            }
            Op::Complete => {
                let Some(mig) = &m else { continue };
                if mig.state() != MigrationState::Active || vm.coord.ready_to_save().is_err() {
                    continue;
                }
                let saved = vm.save();
                mig.complete().expect("an active migration completes");
                check_events(&vm, "source");
                // The destination: registers, restores, plugs before resuming.
                let dst = Vm::new(
                    Spec {
                        cold_standby: false,
                        ..spec()
                    },
                    &mem,
                    &clock,
                );
                for p in &dst.pairs {
                    dst.coord
                        .add_standby(p.standby_config(true))
                        .expect("standby");
                    dst.coord.add_primary(p.primary_config()).expect("primary");
                }
                dst.coord.prepare_incoming().expect("incoming");
                dst.restore(&saved);
                dst.coord.complete_incoming().expect("complete incoming");
                g.resume_on(dst.root.clone(), dst.irqs.clone());
                calm(&dst, &mut g);
                check_events(&dst, "destination");
                let (src_slots, dst_slots) = (vm.slots(), dst.slots());
                for (i, neg) in negotiated(&dst).iter().enumerate() {
                    assert!(
                        !(src_slots[i] && dst_slots[i]),
                        "pair {i}: the primary is on both sides"
                    );
                    if *neg {
                        assert!(
                            dst_slots[i] && !src_slots[i],
                            "pair {i}: after a completed migration the primary is on the source {} / destination {}",
                            src_slots[i],
                            dst_slots[i]
                        );
                    }
                }
                return;
            }
        }
        vm.service(&mut g);
        check_events(&vm, "source");
        // The end of a migration path that stays on the source.
        if let Some(mig) = &m {
            if matches!(
                mig.state(),
                MigrationState::Cancelled | MigrationState::Failed
            ) {
                calm(&vm, &mut g);
                check_events(&vm, "source");
                let slots = vm.slots();
                for (i, neg) in negotiated(&vm).iter().enumerate() {
                    if *neg {
                        assert!(
                            slots[i],
                            "pair {i}: the primary is not back after a {} migration",
                            mig.state()
                        );
                    }
                }
                m = None;
            }
        }
    }
});
