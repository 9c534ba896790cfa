//! The coordinator: the pairs, their primaries' presence, and the migrations,
//! as one state machine driven by VMM calls, `FeaturesAcked` events and
//! hot-plug completions.
//!
//! # Threads and locks
//!
//! Every method may be called from any thread. The coordinator keeps its state
//! under one lock and never holds it while it calls into a slot, so the lock
//! order is always *slot, then coordinator*: a completion callback (which runs
//! inside the guest's register write, with the slot locked) takes the
//! coordinator's lock, and the coordinator takes a slot's lock with its own
//! released. A slot call is made with the slot locked from the check that the
//! operation is still wanted to the record of its result, so no completion
//! lands in between.
//!
//! A completion callback therefore cannot call into a slot. When a completion
//! calls for a slot operation (a primary that left although its unplug was
//! cancelled must be plugged back), the coordinator queues it as *deferred
//! work* and wakes the VMM: by calling the waker set with
//! [`Coordinator::set_waker`] (which should make the VMM's event loop call
//! [`Coordinator::run_deferred`] once the guest's exit returns), or, with no
//! waker set, on a short-lived thread of its own that waits for the slot's lock
//! and does it.
//!
//! Events are delivered the same way: listeners never run inside the guest's
//! register write. The events a completion causes are queued and delivered by
//! [`Coordinator::run_deferred`] (or that thread, or any later coordinator
//! call, whichever comes first); the events of a VMM call are delivered on its
//! thread before it returns.
//!
//! A primary's link hook ([`PrimaryLink`], make before break) is called like a
//! slot: never with the coordinator's lock held, never inside a completion
//! (a link change a completion calls for is deferred work too), and with no
//! slot locked. Calls for one primary are serialized by a lock of their own
//! (taken before the coordinator's, never while a slot is locked), so they
//! reach the VMM in the order they were decided. The hook may call the
//! coordinator: the slot and link calls that causes are deferred (the hook's
//! lock is held and its caller waits), its events are delivered.
//! [`Coordinator::standby_traffic`] comes from the standby's transmit path,
//! maybe inside a guest's queue notify: it is treated as a completion (its
//! slot call and events wait for `run_deferred`).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use pcie_hotplug::{Completion, HotplugOutcome, RootPort};
use virtio_device::virtio_bindings::virtio_net::VIRTIO_NET_F_STANDBY;
use virtio_device::{FeaturesAcked, FeaturesListener};
use vmm_pci::PciHandle;

use crate::clock::{Clock, MonotonicClock};
use crate::event::{Event, EventListener, MacAddress, TimedEvent, UnpairedReason};
use crate::migration::{
    self, DEFAULT_SWITCH_WAIT, DestinationOffer, MigrationState, OutgoingMigration, StandbyOffer,
    UnplugWait,
};
use crate::registry::{self, Primary, PrimaryLink, SharedSlot, Slot, Standby};

/// Where a primary is, as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrimaryState {
    /// Not in its slot: waiting for STANDBY, for its standby to be registered,
    /// or after a failed plug.
    Hidden,
    /// A plug was requested; the guest has not enabled the device yet.
    Plugging,
    /// In the guest.
    Plugged,
    /// In the guest, its link taken down for migration (make before break,
    /// [`Primary::link`]): the unplug is requested once the standby carries
    /// the guest's traffic or the switch wait has passed.
    LinkDown,
    /// An unplug for migration was requested; the guest has not ejected it.
    Unplugging,
    /// Ejected for migration (on the source, for the destination to plug its
    /// own).
    Unplugged,
}

/// Which role a registered primary has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Its standby is not registered yet: held hidden.
    Pending,
    /// Paired with a standby that has failover on.
    Failover,
    /// An ordinary device (failover off, or no standby at machine-ready).
    Plain,
}

struct StandbyEntry {
    id: String,
    failover: bool,
    mac: Option<MacAddress>,
    /// What its device offers, for the pre-flight of a migration to here.
    offered_features: Option<u64>,
    /// The last feature set the guest acknowledged on it.
    acked_features: Option<u64>,
    /// STANDBY was acknowledged (stays so across resets: QEMU does not re-hide
    /// a primary when the driver resets).
    negotiated: bool,
}

struct PrimaryEntry {
    id: String,
    pair_id: String,
    device: PciHandle,
    slot: Slot,
    mac: Option<MacAddress>,
    role: Role,
    state: PrimaryState,
    /// The number of the slot operation in flight (or last made); completions
    /// of older operations are ignored.
    op: u64,
    /// A cancel of the unplug in flight was requested.
    cancel_requested: bool,
    /// The last unplug ended `Cancelled`: a guest removal now is the power
    /// off the guest's button work had queued (`UNPLUG_NOT_CANCELLED`).
    cancel_resolved: bool,
    /// A migration wants it out while its plug is still in flight (the guest
    /// refuses an unplug while it enables the slot): `Unplugging`, and the
    /// unplug is requested when the plug completes.
    unplug_when_plugged: bool,
    /// The outgoing migration that took it out (or is taking it out).
    migration: Option<u64>,
    /// State and operation before the unplug in flight, restored if the slot
    /// refuses the unplug (a plug in flight goes on).
    before_unplug: (PrimaryState, u64),
    /// Make before break: the VMM's switch on the primary's link.
    link: Option<Arc<dyn PrimaryLink>>,
    /// Held across each call of `link`, so calls for one primary never
    /// overlap and land in the order they were decided.
    link_calls: Arc<Mutex<()>>,
    /// The link should be down (decided under the coordinator's lock).
    link_want_down: bool,
    /// The last call of `link` took it down (or tried to).
    link_down: bool,
    /// `PRIMARY_LINK_DOWN` was emitted for the link being down now.
    link_reported: bool,
    /// `LinkDown`: when the wait for traffic on the standby ends.
    switch_deadline: Option<Duration>,
}

struct Outgoing {
    id: u64,
    state: MigrationState,
    deadline: Option<Duration>,
    reason: Option<String>,
}

/// A slot operation, decided under the coordinator's lock and made without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Plug {
        idx: usize,
        op: u64,
    },
    ColdPlug {
        idx: usize,
        op: u64,
    },
    Unplug {
        idx: usize,
        op: u64,
    },
    CancelUnplug {
        idx: usize,
        op: u64,
    },
    /// Bring the link of `idx` where it is wanted (a call of its
    /// [`PrimaryLink`], made with no lock of the coordinator's or a slot's).
    SyncLink {
        idx: usize,
    },
}

impl Action {
    fn target(self) -> (usize, u64) {
        match self {
            Action::Plug { idx, op }
            | Action::ColdPlug { idx, op }
            | Action::Unplug { idx, op }
            | Action::CancelUnplug { idx, op } => (idx, op),
            Action::SyncLink { idx } => (idx, 0),
        }
    }
}

/// Where a state change comes from: a VMM call may call into slots, a
/// completion callback (slot locked) may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Vmm,
    Completion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Plug,
    Unplug,
}

#[derive(Default)]
struct Inner {
    now: Duration,
    standbys: Vec<StandbyEntry>,
    primaries: Vec<PrimaryEntry>,
    machine_ready: bool,
    incoming: bool,
    outgoing: Option<Outgoing>,
    past: Vec<Outgoing>,
    next_op: u64,
    next_migration: u64,
    unplug_wait: Option<Duration>,
    switch_wait: Duration,
    allow_missing_primary: bool,
    events: VecDeque<TimedEvent>,
    actions: Vec<Action>,
    deferred: Vec<Action>,
}

type Waker = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    settled: Condvar,
    clock: Arc<dyn Clock>,
    listeners: Mutex<Vec<Arc<dyn EventListener>>>,
    delivering: Mutex<()>,
    waker: Mutex<Option<Waker>>,
    /// A primary's link is down and its unplug waits for traffic on its
    /// standby: `standby_traffic` has work to do.
    switching: AtomicBool,
}

thread_local! {
    /// How deep this thread is in completion callbacks: a slot is locked, so
    /// coordinator calls made here (by an event listener) defer their slot
    /// calls too.
    static IN_COMPLETION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// How deep this thread is in slot calls of its own (`execute`): events
    /// of a completion that fires inside such a call are delivered when the
    /// call returns, without waking the VMM.
    static IN_EXECUTE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// How deep this thread is in calls of a [`PrimaryLink`]: coordinator
    /// calls the hook makes defer their slot and link calls (the hook's
    /// per-primary lock is held, and the hook's caller waits).
    static IN_LINK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn in_link() -> bool {
    IN_LINK.with(|d| d.get() > 0)
}

fn in_execute() -> bool {
    IN_EXECUTE.with(|d| d.get() > 0)
}

fn in_completion() -> bool {
    IN_COMPLETION.with(|d| d.get() > 0)
}

/// Counts this thread into one of the depths above while it lives.
struct DepthScope(&'static std::thread::LocalKey<std::cell::Cell<u32>>);

impl DepthScope {
    /// Inside a slot call of the coordinator's own.
    fn execute() -> Self {
        Self::enter(&IN_EXECUTE)
    }

    /// Inside a completion callback.
    fn completion() -> Self {
        Self::enter(&IN_COMPLETION)
    }

    /// Inside a call of a link hook.
    fn link() -> Self {
        Self::enter(&IN_LINK)
    }

    fn enter(depth: &'static std::thread::LocalKey<std::cell::Cell<u32>>) -> Self {
        depth.with(|d| d.set(d.get() + 1));
        DepthScope(depth)
    }
}

impl Drop for DepthScope {
    fn drop(&mut self) {
        self.0.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn quoted(ids: &[String]) -> String {
    ids.iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Inner {
    fn emit(&mut self, event: Event) {
        self.events.push_back(TimedEvent {
            timestamp: self.now,
            event,
        });
    }

    fn standby(&self, id: &str) -> Option<&StandbyEntry> {
        self.standbys.iter().find(|s| s.id == id)
    }

    fn primary_for(&self, standby: &str) -> Option<usize> {
        self.primaries.iter().position(|p| p.pair_id == standby)
    }

    fn new_op(&mut self, idx: usize) -> u64 {
        self.next_op += 1;
        let op = self.next_op;
        let p = &mut self.primaries[idx];
        p.op = op;
        p.cancel_requested = false;
        p.cancel_resolved = false;
        p.unplug_when_plugged = false;
        op
    }

    /// Whether an outgoing migration that is going ahead holds the primaries
    /// out (none may be plugged on the source while it does).
    fn migration_going_ahead(&self) -> bool {
        self.outgoing
            .as_ref()
            .is_some_and(|m| m.state.going_ahead())
    }

    /// Whether `idx` was taken out by the current migration, which is going
    /// ahead.
    fn held(&self, idx: usize) -> bool {
        match (&self.outgoing, self.primaries[idx].migration) {
            (Some(m), Some(id)) => m.id == id && m.state.going_ahead(),
            _ => false,
        }
    }

    fn plug(&mut self, idx: usize) {
        self.restore_link(idx);
        let op = self.new_op(idx);
        self.primaries[idx].state = PrimaryState::Plugging;
        self.actions.push(Action::Plug { idx, op });
    }

    fn cold_plug(&mut self, idx: usize) {
        self.restore_link(idx);
        let op = self.new_op(idx);
        self.primaries[idx].state = PrimaryState::Plugging;
        self.actions.push(Action::ColdPlug { idx, op });
    }

    /// Plugs a failover primary whose time has come: hidden, its standby
    /// negotiated, no incoming migration pending, no outgoing migration going
    /// ahead.
    fn maybe_plug(&mut self, idx: usize) {
        let p = &self.primaries[idx];
        if p.role != Role::Failover
            || p.state != PrimaryState::Hidden
            || self.incoming
            || self.migration_going_ahead()
        {
            return;
        }
        if self.standby(&p.pair_id).is_some_and(|s| s.negotiated) {
            self.plug(idx);
        }
    }

    /// Settles the role of primary `idx` now that its standby may be known.
    fn decide(&mut self, idx: usize) {
        let (pair_id, role) = (
            self.primaries[idx].pair_id.clone(),
            self.primaries[idx].role,
        );
        let Some((failover, standby_mac)) = self.standby(&pair_id).map(|s| (s.failover, s.mac))
        else {
            return;
        };
        let primary = self.primaries[idx].id.clone();
        if failover {
            if role == Role::Failover {
                return;
            }
            self.primaries[idx].role = Role::Failover;
            self.emit(Event::Paired {
                primary: primary.clone(),
                standby: pair_id.clone(),
            });
            if let (Some(primary_mac), Some(standby_mac)) = (self.primaries[idx].mac, standby_mac) {
                if primary_mac != standby_mac {
                    self.emit(Event::MacMismatch {
                        primary,
                        primary_mac,
                        standby: pair_id,
                        standby_mac,
                    });
                }
            }
            self.maybe_plug(idx);
        } else {
            if role == Role::Plain {
                return;
            }
            self.primaries[idx].role = Role::Plain;
            self.emit(Event::PrimaryUnpaired {
                primary,
                standby: pair_id,
                reason: UnpairedReason::FailoverOff,
            });
            if self.primaries[idx].state == PrimaryState::Hidden {
                if self.machine_ready {
                    self.plug(idx);
                } else {
                    self.cold_plug(idx);
                }
            }
        }
    }

    fn check_new_id(&self, id: &str) -> registry::Result<()> {
        if self.standbys.iter().any(|s| s.id == id) {
            return Err(registry::Error::DuplicateId {
                id: id.to_owned(),
                as_what: "standby",
            });
        }
        if self.primaries.iter().any(|p| p.id == id) {
            return Err(registry::Error::DuplicateId {
                id: id.to_owned(),
                as_what: "primary",
            });
        }
        Ok(())
    }

    fn add_standby(&mut self, s: Standby) -> registry::Result<()> {
        if s.id.is_empty() {
            return Err(registry::Error::MissingStandbyId);
        }
        self.check_new_id(&s.id)?;
        let id = s.id.clone();
        self.standbys.push(StandbyEntry {
            id: s.id,
            failover: s.failover,
            mac: s.mac,
            offered_features: s.offered_features,
            acked_features: None,
            negotiated: false,
        });
        if let Some(idx) = self.primary_for(&id) {
            self.decide(idx);
        }
        Ok(())
    }

    fn add_primary(&mut self, p: Primary, in_slot: bool) -> registry::Result<()> {
        self.check_new_id(&p.id)?;
        if let Some(first) = self.primary_for(&p.pair_id) {
            return Err(registry::Error::SecondPrimary {
                standby: p.pair_id,
                first: self.primaries[first].id.clone(),
                second: p.id,
            });
        }
        if let Some(other) = self
            .primaries
            .iter()
            .find(|o| std::ptr::addr_eq(Arc::as_ptr(&o.slot.slot), Arc::as_ptr(&p.slot.slot)))
        {
            return Err(registry::Error::SlotTaken {
                primary: p.id,
                slot: p.slot.name,
                other: other.id.clone(),
            });
        }
        let idx = self.primaries.len();
        self.primaries.push(PrimaryEntry {
            id: p.id,
            pair_id: p.pair_id,
            device: p.device,
            slot: p.slot,
            mac: p.mac,
            role: Role::Pending,
            state: if in_slot {
                PrimaryState::Plugged
            } else {
                PrimaryState::Hidden
            },
            op: 0,
            cancel_requested: false,
            cancel_resolved: false,
            unplug_when_plugged: false,
            migration: None,
            before_unplug: (PrimaryState::Hidden, 0),
            link: p.link,
            link_calls: Arc::new(Mutex::new(())),
            link_want_down: false,
            link_down: false,
            link_reported: false,
            switch_deadline: None,
        });
        self.decide(idx);
        let p = &self.primaries[idx];
        if p.state == PrimaryState::Hidden && p.role != Role::Plain {
            let (primary, standby) = (p.id.clone(), p.pair_id.clone());
            self.emit(Event::PrimaryHidden { primary, standby });
        }
        Ok(())
    }

    fn machine_ready(&mut self) {
        if self.machine_ready {
            return;
        }
        self.machine_ready = true;
        for idx in 0..self.primaries.len() {
            let p = &self.primaries[idx];
            if p.role != Role::Pending || self.standby(&p.pair_id).is_some() {
                continue;
            }
            let (primary, standby) = (p.id.clone(), p.pair_id.clone());
            self.primaries[idx].role = Role::Plain;
            self.emit(Event::PrimaryUnpaired {
                primary,
                standby,
                reason: UnpairedReason::NoStandby,
            });
            if self.primaries[idx].state == PrimaryState::Hidden {
                self.cold_plug(idx);
            }
        }
    }

    fn features_acked(&mut self, e: &FeaturesAcked) {
        let Some(s) = self.standbys.iter_mut().find(|s| s.id == e.device_id) else {
            log::debug!(
                "failover: features acknowledged on '{}', which is no registered standby",
                e.device_id
            );
            return;
        };
        s.acked_features = Some(e.features);
        if !s.failover || !e.has(VIRTIO_NET_F_STANDBY) {
            return;
        }
        s.negotiated = true;
        let standby = s.id.clone();
        self.emit(Event::FailoverNegotiated {
            standby: standby.clone(),
        });
        match self.primary_for(&standby) {
            Some(idx) => self.maybe_plug(idx),
            // On a destination, reported once every state is restored.
            None if !self.incoming => self.emit(Event::PrimaryMissing { standby }),
            None => {}
        }
    }

    // --- slot operation results -------------------------------------------

    fn current_op(&self, idx: usize, op: u64) -> bool {
        self.primaries.get(idx).is_some_and(|p| p.op == op)
    }

    fn plug_refused(&mut self, idx: usize, op: u64, why: String) {
        if !self.current_op(idx, op) {
            return;
        }
        self.plug_failed(idx);
        let p = &self.primaries[idx];
        let (primary, slot) = (p.id.clone(), p.slot.name.clone());
        self.emit(Event::PrimaryPlugFailed {
            primary,
            reason: format!("slot '{slot}' refused it: {why}"),
        });
        self.advance();
    }

    /// The plug of `idx` failed: hidden, and an unplug waiting for the plug
    /// is moot (the device is not in the guest).
    fn plug_failed(&mut self, idx: usize) {
        let p = &mut self.primaries[idx];
        p.state = PrimaryState::Hidden;
        if std::mem::take(&mut p.unplug_when_plugged) {
            p.migration = None;
        }
    }

    /// The plug of `idx` completed: plugged, or on its way out when a
    /// migration asked for the unplug meanwhile.
    fn plug_done(&mut self, idx: usize) {
        let p = &mut self.primaries[idx];
        p.state = PrimaryState::Plugged;
        if !std::mem::take(&mut p.unplug_when_plugged) {
            return;
        }
        if self.held(idx) {
            self.start_unplug(idx);
        } else {
            self.primaries[idx].migration = None;
        }
    }

    fn cold_plugged(&mut self, idx: usize, op: u64, result: pcie_hotplug::Result<()>) {
        if !self.current_op(idx, op) {
            return;
        }
        match result {
            Ok(()) => {
                self.plug_done(idx);
                self.advance();
            }
            Err(e) => self.plug_refused(idx, op, e.to_string()),
        }
    }

    fn unplug_requested(&mut self, idx: usize, op: u64) {
        if !self.current_op(idx, op) {
            return;
        }
        let primary = self.primaries[idx].id.clone();
        self.emit(Event::UnplugPrimary { primary });
    }

    /// The slot was empty when the unplug was requested: the guest (or
    /// someone) removed the device already.
    fn already_out(&mut self, idx: usize, op: u64) {
        if !self.current_op(idx, op) {
            return;
        }
        self.primaries[idx].state = PrimaryState::Unplugged;
        let primary = self.primaries[idx].id.clone();
        self.emit(Event::PrimaryUnplugged { primary });
        self.advance();
    }

    /// Whether the unplug `op` of `idx`, decided by a migration, is still
    /// wanted: its migration is going ahead. If not, the primary is put back
    /// as it was and nothing is requested.
    fn unplug_still_wanted(&mut self, idx: usize, op: u64) -> bool {
        if !self.current_op(idx, op) {
            return false;
        }
        if self.held(idx) {
            return true;
        }
        let p = &mut self.primaries[idx];
        (p.state, p.op) = p.before_unplug;
        p.cancel_requested = false;
        p.migration = None;
        self.restore_link(idx);
        false
    }

    fn unplug_refused(&mut self, idx: usize, op: u64, why: String) {
        if !self.current_op(idx, op) {
            return;
        }
        let p = &mut self.primaries[idx];
        // Back to where it was: in the guest, or a plug still in flight.
        (p.state, p.op) = p.before_unplug;
        let migration = p.migration.take();
        let reason = format!(
            "cannot unplug primary '{}' from slot '{}': {why}",
            p.id, p.slot.name
        );
        self.restore_link(idx);
        if let Some(id) = migration {
            // Only the migration that asked fails; it may have ended already.
            let _ = self.fail(id, reason);
        }
    }

    fn completed(&mut self, idx: usize, op: u64, what: Op, outcome: HotplugOutcome) {
        if !self.current_op(idx, op) {
            return;
        }
        let primary = self.primaries[idx].id.clone();
        match (what, outcome) {
            (Op::Plug, HotplugOutcome::Plugged) => {
                self.emit(Event::PrimaryPlugged { primary });
                self.plug_done(idx);
            }
            (Op::Plug, other) => {
                self.plug_failed(idx);
                let reason = match other {
                    HotplugOutcome::Aborted => {
                        "the guest powered the slot off before enabling the device (its link \
                         did not come up or enumeration failed)"
                    }
                    _ => "the device was taken out of the slot before the guest enabled it",
                };
                self.emit(Event::PrimaryPlugFailed {
                    primary,
                    reason: reason.into(),
                });
            }
            (Op::Unplug, HotplugOutcome::Unplugged) => {
                let cancelled = std::mem::take(&mut self.primaries[idx].cancel_requested);
                self.primaries[idx].state = PrimaryState::Unplugged;
                self.emit(Event::PrimaryUnplugged {
                    primary: primary.clone(),
                });
                if cancelled {
                    self.emit(Event::UnplugNotCancelled { primary });
                }
                if !self.held(idx) {
                    self.primaries[idx].migration = None;
                    if self.migration_going_ahead() {
                        // Another migration holds the primaries out: it comes
                        // back when that one ends.
                        self.primaries[idx].state = PrimaryState::Hidden;
                    } else {
                        // Its migration is not going ahead: it comes back.
                        self.plug(idx);
                    }
                }
            }
            (Op::Unplug, HotplugOutcome::Cancelled) => {
                let ours = std::mem::take(&mut self.primaries[idx].cancel_requested);
                let held = self.held(idx);
                let p = &mut self.primaries[idx];
                p.state = PrimaryState::Plugged;
                p.cancel_resolved = true;
                let migration = p.migration.take();
                self.restore_link(idx);
                self.emit(Event::UnplugCancelled {
                    primary: primary.clone(),
                });
                if held && !ours {
                    if let Some(id) = migration {
                        let _ = self.fail(
                            id,
                            format!(
                                "the unplug of primary '{primary}' was withdrawn by someone \
                                 else (or an earlier migration's withdrawal of it took effect); \
                                 it is still in the guest"
                            ),
                        );
                    }
                }
            }
            (Op::Unplug, other) => {
                log::warn!("failover: unplug of '{primary}' completed as {other:?}; ignored");
            }
        }
        self.advance();
    }

    /// The guest powered primary `id`'s slot off with no unplug pending (its
    /// port's `on_guest_removal`): sysfs `power`, or the power off its button
    /// work had queued before a cancel resolved `Cancelled`. A primary the
    /// current migration waits for counts as ejected; any other is reported
    /// and plugged back, unless a migration going ahead holds the primaries
    /// out.
    fn guest_removed(&mut self, id: &str, device: &PciHandle) {
        let Some(idx) = self.primaries.iter().position(|p| p.id == id) else {
            return;
        };
        let p = &self.primaries[idx];
        if !std::ptr::addr_eq(Arc::as_ptr(&p.device), Arc::as_ptr(device)) {
            return;
        }
        let waited_for = (p.state == PrimaryState::Unplugging && !p.unplug_when_plugged)
            || p.state == PrimaryState::LinkDown;
        if p.state != PrimaryState::Plugged && !waited_for {
            log::debug!(
                "failover: guest removed primary '{id}' while {:?}; ignored",
                p.state
            );
            return;
        }
        let followed_cancel = p.cancel_resolved || p.cancel_requested;
        let held = waited_for && self.held(idx);
        // Whatever was decided for the slot before is void: it is empty.
        self.new_op(idx);
        self.primaries[idx].state = PrimaryState::Unplugged;
        self.primaries[idx].switch_deadline = None;
        self.emit(Event::PrimaryUnplugged {
            primary: id.to_owned(),
        });
        if followed_cancel {
            self.emit(Event::UnplugNotCancelled {
                primary: id.to_owned(),
            });
        }
        if !held {
            self.primaries[idx].migration = None;
            if self.migration_going_ahead() && self.primaries[idx].role == Role::Failover {
                self.primaries[idx].state = PrimaryState::Hidden;
            } else {
                self.plug(idx);
            }
        }
        self.advance();
    }

    // --- migrations --------------------------------------------------------

    fn outgoing_mut(&mut self, id: u64) -> migration::Result<&mut Outgoing> {
        match self.outgoing.as_mut() {
            Some(m) if m.id == id => Ok(m),
            _ => match self.past.iter().find(|m| m.id == id) {
                Some(m) => Err(migration::Error::Finished { state: m.state }),
                None => Err(migration::Error::Stale),
            },
        }
    }

    fn find_migration(&self, id: u64) -> Option<&Outgoing> {
        self.outgoing
            .iter()
            .chain(self.past.iter())
            .find(|m| m.id == id)
    }

    fn set_state(&mut self, id: u64, state: MigrationState, reason: Option<String>) {
        let bound = self.unplug_wait;
        let now = self.now;
        if let Ok(m) = self.outgoing_mut(id) {
            m.state = state;
            m.reason.clone_from(&reason);
            m.deadline = match state {
                MigrationState::WaitUnplug | MigrationState::Cancelling => bound.map(|b| now + b),
                _ => None,
            };
            self.emit(Event::Migration {
                status: state,
                reason,
            });
        }
    }

    fn in_flight(&self, id: u64) -> Vec<String> {
        self.primaries
            .iter()
            .filter(|p| {
                p.migration == Some(id)
                    && matches!(p.state, PrimaryState::Unplugging | PrimaryState::LinkDown)
            })
            .map(|p| p.id.clone())
            .collect()
    }

    /// Moves the current migration on when no unplug of it is in flight.
    fn advance(&mut self) {
        let Some((id, state)) = self.outgoing.as_ref().map(|m| (m.id, m.state)) else {
            return;
        };
        if !self.in_flight(id).is_empty() {
            return;
        }
        match state {
            MigrationState::WaitUnplug => self.set_state(id, MigrationState::Active, None),
            MigrationState::Cancelling => self.set_state(id, MigrationState::Cancelled, None),
            _ => {}
        }
    }

    /// Whether an outgoing migration may start: none in progress, no
    /// incoming one.
    fn can_prepare_outgoing(&self) -> migration::Result<()> {
        if self.incoming {
            return Err(migration::Error::IncomingInProgress);
        }
        if let Some(m) = &self.outgoing {
            if !m.state.is_terminal() {
                return Err(migration::Error::OutgoingInProgress { state: m.state });
            }
        }
        Ok(())
    }

    fn prepare_outgoing(&mut self) -> migration::Result<u64> {
        self.can_prepare_outgoing()?;
        if let Some(m) = self.outgoing.take() {
            self.past.push(m);
        }
        self.next_migration += 1;
        let id = self.next_migration;
        self.outgoing = Some(Outgoing {
            id,
            state: MigrationState::Setup,
            deadline: None,
            reason: None,
        });
        self.emit(Event::Migration {
            status: MigrationState::Setup,
            reason: None,
        });
        for idx in 0..self.primaries.len() {
            let p = &mut self.primaries[idx];
            if p.role == Role::Failover && p.state == PrimaryState::Unplugging {
                // An unplug of an earlier migration the guest has not answered
                // (a cancel or failure whose withdrawal timed out): this
                // migration adopts it and waits for it. Its withdrawal was
                // requested, so the guest may still cancel it; that fails
                // this migration, as any unplug cancelled by someone else.
                p.migration = Some(id);
                p.cancel_requested = false;
                continue;
            }
            if p.role == Role::Failover && p.state == PrimaryState::Plugging {
                // The guest refuses an unplug while it enables the slot (Linux
                // blinks the indicator for a while): the unplug is requested
                // when the plug completes, and the migration waits for it.
                p.before_unplug = (p.state, p.op);
                p.state = PrimaryState::Unplugging;
                p.migration = Some(id);
                p.unplug_when_plugged = true;
                continue;
            }
            if p.role == Role::Failover && p.state == PrimaryState::Plugged {
                p.migration = Some(id);
                self.start_unplug(idx);
            }
        }
        Ok(id)
    }

    /// Takes plugged primary `idx` out for its migration: with a link hook,
    /// its link goes down first (make before break) and the unplug waits for
    /// the switch; without one the unplug is requested now.
    fn start_unplug(&mut self, idx: usize) {
        let p = &mut self.primaries[idx];
        if p.link.is_some() {
            p.state = PrimaryState::LinkDown;
            p.link_want_down = true;
            p.switch_deadline = None;
            self.actions.push(Action::SyncLink { idx });
        } else {
            self.request_unplug(idx);
        }
    }

    /// Requests the unplug of plugged (or link-down) primary `idx`.
    fn request_unplug(&mut self, idx: usize) {
        let before = (PrimaryState::Plugged, self.primaries[idx].op);
        let op = self.new_op(idx);
        let p = &mut self.primaries[idx];
        p.before_unplug = before;
        p.state = PrimaryState::Unplugging;
        p.switch_deadline = None;
        self.actions.push(Action::Unplug { idx, op });
    }

    // --- make before break -------------------------------------------------

    /// The link of `idx` should be up (it is back in the guest, or on its
    /// way back): a call of its hook is queued if it is (or is going) down.
    /// Queued before any plug, so the link is up before the primary returns.
    fn restore_link(&mut self, idx: usize) {
        let p = &mut self.primaries[idx];
        p.switch_deadline = None;
        if p.link.is_some() && p.link_want_down {
            p.link_want_down = false;
            self.actions.push(Action::SyncLink { idx });
        }
    }

    /// Under `idx`'s link-call lock: the call of its hook to make (`up`), if
    /// the link is not where it is wanted. A link already down for a
    /// primary waiting to switch starts the switch.
    fn link_call(&mut self, idx: usize) -> Option<bool> {
        let p = self.primaries.get(idx)?;
        if p.link_want_down != p.link_down {
            return Some(!p.link_want_down);
        }
        if p.link_want_down && p.state == PrimaryState::LinkDown && p.switch_deadline.is_none() {
            self.link_is_down(idx);
        }
        None
    }

    /// The hook of `idx` was called with `up` and returned `result`.
    fn link_set(&mut self, idx: usize, up: bool, result: std::io::Result<()>) {
        let Some(p) = self.primaries.get_mut(idx) else {
            return;
        };
        let primary = p.id.clone();
        p.link_down = !up;
        match result {
            Ok(()) if !up => {
                p.link_reported = true;
                self.emit(Event::PrimaryLinkDown { primary });
            }
            Ok(()) => {
                if std::mem::take(&mut p.link_reported) {
                    self.emit(Event::PrimaryLinkUp { primary });
                }
            }
            Err(e) if !up => {
                p.link_reported = false;
                log::warn!(
                    "failover: cannot take the link of primary '{primary}' down ({e}); it is \
                     unplugged without switching to its standby first (frames in flight may be \
                     lost)"
                );
            }
            Err(e) => {
                p.link_reported = false;
                log::warn!(
                    "failover: cannot bring the link of primary '{primary}' back up ({e}); the guest \
                     keeps transmitting on its standby until the link is restored"
                );
            }
        }
        let p = &self.primaries[idx];
        if p.link_want_down != p.link_down {
            // Wanted otherwise meanwhile (a cancel while the link went down).
            self.actions.push(Action::SyncLink { idx });
        } else if !up && p.state == PrimaryState::LinkDown {
            self.link_is_down(idx);
        }
    }

    /// The link of `idx`, waiting to switch, is down (or its hook failed):
    /// wait for traffic on the standby, or unplug now.
    fn link_is_down(&mut self, idx: usize) {
        if !self.primaries[idx].link_reported {
            // The hook failed: the switch is an optimisation, the unplug is
            // what the migration needs.
            self.request_unplug(idx);
        } else if self.switch_wait.is_zero() {
            self.switch(idx, false);
        } else {
            self.primaries[idx].switch_deadline = Some(self.now + self.switch_wait);
        }
    }

    /// Primary `idx`'s guest is on its standby (or the wait is over): the
    /// unplug is requested.
    fn switch(&mut self, idx: usize, traffic_seen: bool) {
        let p = &self.primaries[idx];
        let (standby, primary) = (p.pair_id.clone(), p.id.clone());
        self.emit(Event::SwitchedToStandby {
            standby,
            primary,
            traffic_seen,
        });
        self.request_unplug(idx);
    }

    /// Whether a primary waits for traffic on its standby.
    fn waiting_for_traffic(&self) -> bool {
        self.primaries
            .iter()
            .any(|p| p.state == PrimaryState::LinkDown && p.switch_deadline.is_some())
    }

    fn standby_traffic(&mut self, standby: &str) {
        let Some(idx) = self.primary_for(standby) else {
            return;
        };
        let p = &self.primaries[idx];
        if p.state == PrimaryState::LinkDown && p.switch_deadline.is_some() {
            self.switch(idx, true);
        }
    }

    // --- pre-flight --------------------------------------------------------

    fn destination_offer(&self) -> DestinationOffer {
        DestinationOffer {
            standbys: self
                .standbys
                .iter()
                .map(|s| StandbyOffer {
                    id: s.id.clone(),
                    failover: s.failover,
                    offered_features: s.offered_features,
                    primary: self
                        .primary_for(&s.id)
                        .map(|i| self.primaries[i].id.clone()),
                })
                .collect(),
        }
    }

    fn preflight(&self, offer: &DestinationOffer) -> migration::Result<()> {
        let mut problems = Vec::new();
        for s in &self.standbys {
            let id = &s.id;
            let Some(d) = offer.standbys.iter().find(|d| d.id == s.id) else {
                problems.push(format!(
                    "standby '{id}': the destination has no standby with this id; its state \
                     has nowhere to go (register it there before migrating)"
                ));
                continue;
            };
            let negotiated = s.failover && s.negotiated;
            let failover_off = negotiated && !d.failover;
            if failover_off {
                problems.push(format!(
                    "standby '{id}': the guest negotiated STANDBY here, but the destination's \
                     standby has failover off; the guest would lose its primary for good (turn \
                     failover on there)"
                ));
            }
            if let (Some(acked), Some(offered)) = (s.acked_features, d.offered_features) {
                let mut missing = acked & !offered;
                if failover_off {
                    // Said above.
                    missing &= !(1 << VIRTIO_NET_F_STANDBY);
                }
                if missing != 0 {
                    let bits: Vec<String> = (0..64)
                        .filter(|b| missing & (1 << b) != 0)
                        .map(|b| b.to_string())
                        .collect();
                    problems.push(format!(
                        "standby '{id}': the destination's device does not offer feature bits \
                         {missing:#x} ({} {}) that the guest acknowledged here; its driver \
                         cannot go on with them missing",
                        if bits.len() == 1 { "bit" } else { "bits" },
                        bits.join(", ")
                    ));
                }
            }
            if negotiated && !failover_off && d.primary.is_none() && !self.allow_missing_primary {
                if let Some(idx) = self.primary_for(id) {
                    let p = &self.primaries[idx];
                    if p.role == Role::Failover {
                        problems.push(format!(
                            "standby '{id}': the destination has no primary for it (here: \
                             '{}'); the guest would run on the standby alone (register one \
                             there, or allow it with preflight_allow_missing_primary(true))",
                            p.id
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(migration::Error::Preflight { problems })
        }
    }

    /// After the unplug requests: wait-unplug while any is in flight, else
    /// active.
    fn requests_made(&mut self, id: u64) {
        if self
            .outgoing
            .as_ref()
            .is_some_and(|m| m.id == id && m.state == MigrationState::Setup)
        {
            let next = if self.in_flight(id).is_empty() {
                MigrationState::Active
            } else {
                MigrationState::WaitUnplug
            };
            self.set_state(id, next, None);
        }
    }

    /// Withdraws what migration `id` took out: cancels unplugs in flight and
    /// plugs back what left; then plugs any negotiated primary that was held
    /// while the migration went ahead.
    fn withdraw(&mut self, id: u64) {
        for idx in 0..self.primaries.len() {
            if self.primaries[idx].migration != Some(id) {
                continue;
            }
            // The link comes up first: before a withdrawal is answered, and
            // before a primary that left is plugged back.
            self.restore_link(idx);
            let p = &self.primaries[idx];
            match p.state {
                PrimaryState::LinkDown => {
                    // Nothing was requested of the slot: it never left.
                    let p = &mut self.primaries[idx];
                    p.state = PrimaryState::Plugged;
                    p.migration = None;
                }
                PrimaryState::Unplugging if p.unplug_when_plugged => {
                    // Nothing was requested yet: the plug just goes on.
                    let p = &mut self.primaries[idx];
                    p.unplug_when_plugged = false;
                    p.state = PrimaryState::Plugging;
                    p.migration = None;
                }
                PrimaryState::Unplugging if !p.cancel_requested => {
                    let op = p.op;
                    self.primaries[idx].cancel_requested = true;
                    self.actions.push(Action::CancelUnplug { idx, op });
                }
                PrimaryState::Unplugged => {
                    self.primaries[idx].migration = None;
                    self.plug(idx);
                }
                _ => {}
            }
        }
        for idx in 0..self.primaries.len() {
            self.maybe_plug(idx);
        }
    }

    fn cancel(&mut self, id: u64) -> migration::Result<()> {
        let state = self.outgoing_mut(id)?.state;
        match state {
            MigrationState::Setup | MigrationState::WaitUnplug => {
                self.set_state(id, MigrationState::Cancelling, None);
                self.withdraw(id);
                self.advance();
            }
            MigrationState::Active => {
                self.set_state(id, MigrationState::Cancelling, None);
                self.withdraw(id);
                self.set_state(id, MigrationState::Cancelled, None);
            }
            MigrationState::Cancelling => {}
            s => return Err(migration::Error::Finished { state: s }),
        }
        Ok(())
    }

    fn fail(&mut self, id: u64, reason: String) -> migration::Result<()> {
        let state = self.outgoing_mut(id)?.state;
        if matches!(state, MigrationState::Cancelled | MigrationState::Failed) {
            return Err(migration::Error::Finished { state });
        }
        self.set_state(id, MigrationState::Failed, Some(reason));
        self.withdraw(id);
        Ok(())
    }

    fn complete(&mut self, id: u64) -> migration::Result<()> {
        let state = self.outgoing_mut(id)?.state;
        match state {
            MigrationState::Active => {
                self.set_state(id, MigrationState::Completed, None);
                Ok(())
            }
            s if s.is_terminal() => Err(migration::Error::Finished { state: s }),
            s => Err(migration::Error::NotActive {
                state: s,
                waiting: self.in_flight(id),
            }),
        }
    }

    fn deadline(&self) -> Option<Duration> {
        let switches = self
            .primaries
            .iter()
            .filter(|p| p.state == PrimaryState::LinkDown)
            .filter_map(|p| p.switch_deadline);
        self.outgoing
            .as_ref()
            .filter(|m| !m.state.is_terminal())
            .and_then(|m| m.deadline)
            .into_iter()
            .chain(switches)
            .min()
    }

    fn check_deadline(&mut self) {
        let now = self.now;
        let due: Vec<usize> = (0..self.primaries.len())
            .filter(|&i| {
                let p = &self.primaries[i];
                p.state == PrimaryState::LinkDown && p.switch_deadline.is_some_and(|d| d <= now)
            })
            .collect();
        for idx in due {
            self.switch(idx, false);
        }
        let Some(m) = self.outgoing.as_ref() else {
            return;
        };
        let (id, state) = (m.id, m.state);
        if m.deadline.is_none_or(|d| d > self.now) {
            return;
        }
        let waited = secs(self.unplug_wait.unwrap_or_default());
        let holding = quoted(&self.in_flight(id));
        match state {
            MigrationState::WaitUnplug => {
                let _ = self.fail(
                    id,
                    format!(
                        "the guest did not eject {holding} within {waited} (the unplug wait \
                         bound); withdrawing the unplug"
                    ),
                );
            }
            MigrationState::Cancelling => self.set_state(
                id,
                MigrationState::Cancelled,
                Some(format!(
                    "the guest did not answer the withdrawal of the unplug of {holding} within \
                     {waited}; it stays in its slot, and is plugged back if the guest removes it \
                     later"
                )),
            ),
            _ => {}
        }
    }

    fn prepare_incoming(&mut self) -> migration::Result<()> {
        if self.incoming {
            return Err(migration::Error::IncomingInProgress);
        }
        if let Some(m) = &self.outgoing {
            if !m.state.is_terminal() {
                return Err(migration::Error::OutgoingInProgress { state: m.state });
            }
        }
        self.incoming = true;
        self.emit(Event::Migration {
            status: MigrationState::Setup,
            reason: None,
        });
        Ok(())
    }

    fn complete_incoming(&mut self) -> migration::Result<()> {
        if !self.incoming {
            return Err(migration::Error::NoIncoming);
        }
        self.incoming = false;
        self.machine_ready = true;
        let negotiated: Vec<String> = self
            .standbys
            .iter()
            .filter(|s| s.failover && s.negotiated)
            .map(|s| s.id.clone())
            .collect();
        for standby in negotiated {
            match self.primary_for(&standby) {
                Some(idx) => self.maybe_plug(idx),
                None => self.emit(Event::PrimaryMissing { standby }),
            }
        }
        self.emit(Event::Migration {
            status: MigrationState::Completed,
            reason: None,
        });
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Runs `f` on the state, delivers the events it emitted, and makes the
    /// slot calls it queued (from a VMM call) or defers them (from a
    /// completion, where the slot is locked).
    fn update<R>(self: &Arc<Self>, ctx: Ctx, f: impl FnOnce(&mut Inner) -> R) -> R {
        let ctx = if in_completion() || in_link() {
            Ctx::Completion
        } else {
            ctx
        };
        let (r, run, wake) = {
            let mut i = self.lock();
            // Timestamps never go backwards, whatever the clock does.
            i.now = i.now.max(self.clock.now());
            let r = f(&mut i);
            self.switching
                .store(i.waiting_for_traffic(), Ordering::Release);
            let actions = std::mem::take(&mut i.actions);
            match ctx {
                Ctx::Vmm => (r, actions, false),
                Ctx::Completion => {
                    // Events too wait for the deferred work: listeners never
                    // run inside the guest's register write. (Inside a link
                    // hook only the slot and link calls wait.)
                    let wake = !actions.is_empty()
                        || (!i.events.is_empty() && in_completion() && !in_execute());
                    i.deferred.extend(actions);
                    (r, Vec::new(), wake)
                }
            }
        };
        self.settled.notify_all();
        self.deliver();
        if wake {
            self.wake();
        }
        for a in run {
            self.execute(a);
        }
        r
    }

    /// Delivers queued events in order. A listener that causes events (by
    /// calling the coordinator) has them delivered after its own, by the
    /// outermost delivery.
    ///
    /// Inside a completion callback (the guest's register write, its port
    /// locked) nothing is delivered: the events wait for
    /// [`run_deferred`](Self::run_deferred), or any later call.
    fn deliver(&self) {
        if in_completion() {
            return;
        }
        loop {
            let guard = match self.delivering.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            loop {
                let batch: Vec<TimedEvent> = self.lock().events.drain(..).collect();
                if batch.is_empty() {
                    break;
                }
                let listeners = lock(&self.listeners).clone();
                for e in &batch {
                    match &e.event {
                        Event::MacMismatch { .. }
                        | Event::PrimaryMissing { .. }
                        | Event::PrimaryPlugFailed { .. }
                        | Event::UnplugNotCancelled { .. }
                        | Event::Migration {
                            status: MigrationState::Failed,
                            ..
                        } => log::warn!("failover: {}", e.event),
                        _ => log::info!("failover: {}", e.event),
                    }
                    for l in &listeners {
                        l.event(e);
                    }
                }
            }
            drop(guard);
            if self.lock().events.is_empty() {
                return;
            }
        }
    }

    fn wake(self: &Arc<Self>) {
        let waker = lock(&self.waker).clone();
        match waker {
            Some(w) => w(),
            None => {
                let s = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("failover-deferred".into())
                    .spawn(move || {
                        s.run_deferred();
                    });
                if let Err(e) = spawned {
                    log::warn!(
                        "failover: cannot start a thread for deferred slot work ({e}); it waits \
                         for the next run_deferred call"
                    );
                }
            }
        }
    }

    fn run_deferred(self: &Arc<Self>) -> usize {
        if in_completion() || in_link() {
            // A listener inside a completion: the slot is locked here. The
            // waker was (or will be) called; the work waits for it.
            return 0;
        }
        self.deliver();
        let actions = std::mem::take(&mut self.lock().deferred);
        let n = actions.len();
        for a in actions {
            self.execute(a);
        }
        n
    }

    /// Makes one slot call, with the coordinator's lock released.
    ///
    /// The slot's lock is taken first and held until the result is recorded
    /// (slot, then coordinator): a completion (which the guest's register
    /// write makes with the slot locked) cannot land between the decision,
    /// the call and its result, so no result is recorded against a primary
    /// the guest has moved on meanwhile.
    fn execute(self: &Arc<Self>, action: Action) {
        if let Action::SyncLink { idx } = action {
            self.sync_link(idx);
            return;
        }
        let (idx, op) = action.target();
        let target = {
            let i = self.lock();
            i.primaries
                .get(idx)
                .filter(|p| p.op == op)
                .map(|p| (p.slot.slot.clone(), p.device.clone(), p.slot.surprise))
        };
        let Some((slot, device, surprise)) = target else {
            return;
        };
        let mut then = Vec::new();
        'locked: {
            let mut s = lock(&slot);
            let _scope = DepthScope::execute();
            if !self.record(&mut then, |i| i.current_op(idx, op)) {
                return;
            }
            match action {
                Action::Plug { .. } => match s.plug(device) {
                    Ok(c) => self.watch(&mut then, &c, idx, op, Op::Plug),
                    Err(e) => self.record(&mut then, |i| i.plug_refused(idx, op, e.to_string())),
                },
                Action::ColdPlug { .. } => {
                    let result = s.cold_plug(device);
                    self.record(&mut then, |i| i.cold_plugged(idx, op, result));
                }
                Action::Unplug { .. } => {
                    // A refusal of an earlier request may have failed the
                    // migration since this one was decided.
                    if !self.record(&mut then, |i| i.unplug_still_wanted(idx, op)) {
                        break 'locked;
                    }
                    if surprise {
                        // Out at once; the guest finds the slot empty.
                        match s.surprise_remove() {
                            Ok(_) => {
                                self.record(&mut then, |i| i.unplug_requested(idx, op));
                                self.record(&mut then, |i| {
                                    i.completed(idx, op, Op::Unplug, HotplugOutcome::Unplugged)
                                });
                            }
                            Err(pcie_hotplug::Error::Empty(_)) => {
                                self.record(&mut then, |i| i.already_out(idx, op))
                            }
                            Err(e) => {
                                self.record(&mut then, |i| i.unplug_refused(idx, op, e.to_string()))
                            }
                        }
                        break 'locked;
                    }
                    match s.request_unplug() {
                        Ok(c) => {
                            self.record(&mut then, |i| i.unplug_requested(idx, op));
                            self.watch(&mut then, &c, idx, op, Op::Unplug);
                        }
                        Err(pcie_hotplug::Error::Empty(_)) => {
                            self.record(&mut then, |i| i.already_out(idx, op))
                        }
                        Err(e) => {
                            self.record(&mut then, |i| i.unplug_refused(idx, op, e.to_string()))
                        }
                    }
                }
                Action::CancelUnplug { .. } => {
                    // The unplug's completion says what happened; a refusal
                    // means it completed already.
                    if let Err(e) = s.cancel_unplug() {
                        log::debug!("failover: cancel of an unplug: {e}");
                    }
                }
                Action::SyncLink { .. } => {}
            }
        }
        self.after_record(then);
    }

    /// Brings primary `idx`'s link where it is wanted: one call of its hook,
    /// with its link-call lock held and no lock of the coordinator's or a
    /// slot's (the hook may call the coordinator; what that queues waits for
    /// `run_deferred`).
    fn sync_link(self: &Arc<Self>, idx: usize) {
        let target = {
            let i = self.lock();
            i.primaries
                .get(idx)
                .and_then(|p| p.link.clone().map(|l| (l, p.link_calls.clone())))
        };
        let Some((link, calls)) = target else {
            return;
        };
        let mut then = Vec::new();
        {
            let _calls = lock(&calls);
            if let Some(up) = self.record(&mut then, |i| i.link_call(idx)) {
                let result = {
                    let _scope = DepthScope::link();
                    link.set_link(up)
                };
                self.record(&mut then, |i| i.link_set(idx, up, result));
            }
        }
        self.after_record(then);
    }

    /// Runs `f` on the state with a slot locked by this thread: the slot
    /// calls it queues are collected in `then`, for after the slot's lock is
    /// released.
    fn record<R>(&self, then: &mut Vec<Action>, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut i = self.lock();
        i.now = i.now.max(self.clock.now());
        let r = f(&mut i);
        self.switching
            .store(i.waiting_for_traffic(), Ordering::Release);
        then.append(&mut i.actions);
        r
    }

    /// What [`update`](Self::update) does after `f`, for [`record`](Self::record).
    fn after_record(self: &Arc<Self>, then: Vec<Action>) {
        self.settled.notify_all();
        self.deliver();
        for a in then {
            self.execute(a);
        }
    }

    /// Subscribes to `c` for operation `op` of primary `idx`, with its slot
    /// locked by this thread. The callback holds the coordinator weakly (the
    /// slot keeps the completion).
    fn watch(
        self: &Arc<Self>,
        then: &mut Vec<Action>,
        c: &Completion,
        idx: usize,
        op: u64,
        what: Op,
    ) {
        if let Some(outcome) = c.outcome() {
            // Done already (inside the request).
            self.record(then, |i| i.completed(idx, op, what, outcome));
            return;
        }
        let weak = Arc::downgrade(self);
        c.on_complete(move |outcome| {
            if let Some(s) = weak.upgrade() {
                let _scope = DepthScope::completion();
                s.update(Ctx::Completion, |i| i.completed(idx, op, what, outcome));
            }
        });
    }

    /// The slots of the primaries being unplugged, for their timers.
    fn unplugging_slots(&self) -> Vec<SharedSlot> {
        self.lock()
            .primaries
            .iter()
            .filter(|p| p.state == PrimaryState::Unplugging)
            .map(|p| p.slot.slot.clone())
            .collect()
    }

    /// Installs the guest-removal callback of primary `id`'s port. The
    /// callback runs inside the guest's config write, the port locked: it
    /// only records the removal (its slot calls and events are deferred).
    fn watch_removals(self: &Arc<Self>, id: String, port: &Mutex<RootPort>) {
        let weak = Arc::downgrade(self);
        lock(port).on_guest_removal(move |device| {
            if let Some(s) = weak.upgrade() {
                let _scope = DepthScope::completion();
                s.update(Ctx::Completion, |i| i.guest_removed(&id, &device));
            }
        });
    }

    pub(crate) fn migration_state(&self, id: u64) -> MigrationState {
        // An id handed out always names a migration; Failed is never reached.
        self.lock()
            .find_migration(id)
            .map_or(MigrationState::Failed, |m| m.state)
    }

    pub(crate) fn migration_reason(&self, id: u64) -> Option<String> {
        self.lock()
            .find_migration(id)
            .and_then(|m| m.reason.clone())
    }

    pub(crate) fn migration_deadline(&self, id: u64) -> Option<Duration> {
        self.lock()
            .find_migration(id)
            .filter(|m| !m.state.is_terminal())
            .and_then(|m| m.deadline)
    }

    pub(crate) fn waiting_for(&self, id: u64) -> Vec<String> {
        self.lock().in_flight(id)
    }

    pub(crate) fn cancel_outgoing(self: &Arc<Self>, id: u64) -> migration::Result<()> {
        self.update(Ctx::Vmm, |i| i.cancel(id))
    }

    pub(crate) fn fail_outgoing(
        self: &Arc<Self>,
        id: u64,
        reason: String,
    ) -> migration::Result<()> {
        self.update(Ctx::Vmm, |i| i.fail(id, reason))
    }

    pub(crate) fn complete_outgoing(self: &Arc<Self>, id: u64) -> migration::Result<()> {
        self.update(Ctx::Vmm, |i| i.complete(id))
    }

    pub(crate) fn wait_migration(&self, id: u64, timeout: Duration) -> MigrationState {
        let end = Instant::now() + timeout;
        let mut i = self.lock();
        loop {
            let state = i
                .find_migration(id)
                .map_or(MigrationState::Failed, |m| m.state);
            let left = end.saturating_duration_since(Instant::now());
            if !state.waiting() || left.is_zero() {
                return state;
            }
            i = self
                .settled
                .wait_timeout(i, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Builds a [`Coordinator`].
pub struct CoordinatorBuilder {
    clock: Arc<dyn Clock>,
    unplug_wait: UnplugWait,
    switch_wait: Duration,
    listeners: Vec<Arc<dyn EventListener>>,
    waker: Option<Waker>,
}

impl fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("unplug_wait", &self.unplug_wait)
            .field("switch_wait", &self.switch_wait)
            .field("listeners", &self.listeners.len())
            .field("waker", &self.waker.is_some())
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// The clock events are stamped with and deadlines measured on (default:
    /// [`MonotonicClock`], real time).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How long an outgoing migration waits for the guest to eject (default:
    /// [`UnplugWait::Bounded`] with
    /// [`DEFAULT_UNPLUG_TIMEOUT`](crate::DEFAULT_UNPLUG_TIMEOUT), 30 s).
    pub fn unplug_wait(mut self, wait: UnplugWait) -> Self {
        self.unplug_wait = wait;
        self
    }

    /// Make before break: how long an outgoing migration waits, after taking
    /// a primary's link down, for traffic on its standby before it requests
    /// the unplug anyway (default
    /// [`DEFAULT_SWITCH_WAIT`](crate::DEFAULT_SWITCH_WAIT), 200 ms).
    /// `Duration::ZERO` requests the unplug right after the link is down.
    /// Only primaries with a [`Primary::link`] hook wait.
    pub fn switch_wait(mut self, wait: Duration) -> Self {
        self.switch_wait = wait;
        self
    }

    /// A listener that hears every event from the first registration on.
    pub fn listener(mut self, listener: Arc<dyn EventListener>) -> Self {
        self.listeners.push(listener);
        self
    }

    /// See [`Coordinator::set_waker`].
    pub fn waker(mut self, waker: impl Fn() + Send + Sync + 'static) -> Self {
        self.waker = Some(Arc::new(waker));
        self
    }

    /// The coordinator, with nothing registered.
    pub fn build(self) -> Coordinator {
        let inner = Inner {
            unplug_wait: match self.unplug_wait {
                UnplugWait::Bounded(d) => Some(d),
                UnplugWait::Unbounded => None,
            },
            switch_wait: self.switch_wait,
            ..Inner::default()
        };
        Coordinator {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                settled: Condvar::new(),
                clock: self.clock,
                listeners: Mutex::new(self.listeners),
                delivering: Mutex::new(()),
                waker: Mutex::new(self.waker),
                switching: AtomicBool::new(false),
            }),
        }
    }
}

/// The failover coordinator. See the [crate documentation](crate).
///
/// Cloning shares it. It implements [`FeaturesListener`]: give a clone to the
/// standby's transport (`VirtioPciDevice::add_features_listener`), to the
/// standby device (`StandbyNet::add_standby_listener`), or call
/// [`features_acked`](Self::features_acked) from your own frontend. Wire one
/// route per standby: each event counts as one negotiation.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.shared.lock();
        f.debug_struct("Coordinator")
            .field("standbys", &i.standbys.len())
            .field("primaries", &i.primaries.len())
            .field("outgoing", &i.outgoing.as_ref().map(|m| m.state))
            .field("incoming", &i.incoming)
            .finish_non_exhaustive()
    }
}

impl Default for Coordinator {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl Coordinator {
    /// A builder with real time, the default unplug wait, no listener and no
    /// waker.
    pub fn builder() -> CoordinatorBuilder {
        CoordinatorBuilder {
            clock: Arc::new(MonotonicClock::new()),
            unplug_wait: UnplugWait::default(),
            switch_wait: DEFAULT_SWITCH_WAIT,
            listeners: Vec::new(),
            waker: None,
        }
    }

    /// Adds a listener for the events from now on.
    pub fn add_listener(&self, listener: Arc<dyn EventListener>) {
        lock(&self.shared.listeners).push(listener);
    }

    /// Sets how the coordinator asks for [`run_deferred`](Self::run_deferred):
    /// `waker` is called (from inside a guest register write, with a slot
    /// locked) when slot work or events are queued that cannot be done or
    /// delivered there. It should
    /// only signal the VMM's event loop (write an eventfd, post a message),
    /// which then calls `run_deferred`. Without a waker the coordinator runs
    /// the work on a short-lived thread of its own.
    pub fn set_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        *lock(&self.shared.waker) = Some(Arc::new(waker));
    }

    /// Delivers the events and makes the slot calls queued by completions (see
    /// [`set_waker`](Self::set_waker)); returns how many slot calls there
    /// were. Listeners run on this thread. Call it with no slot locked.
    pub fn run_deferred(&self) -> usize {
        self.shared.run_deferred()
    }

    /// Registers a standby. A primary already registered with this
    /// `failover_pair_id` is paired with it now (and stays hidden if failover
    /// is on), or, with failover off, plugged as an ordinary device.
    ///
    /// Refused for an empty or already registered id.
    pub fn add_standby(&self, standby: Standby) -> registry::Result<()> {
        self.shared.update(Ctx::Vmm, |i| i.add_standby(standby))
    }

    /// Registers a primary. If its standby has failover on it stays hidden
    /// until the guest acknowledges STANDBY (and is plugged at once if it has
    /// already); if its standby has failover off it goes into its slot as an
    /// ordinary device (cold-plugged before [`machine_ready`](Self::machine_ready),
    /// hot-plugged after). If its standby is not registered yet it stays
    /// hidden until the standby is, or until `machine_ready` when it is not.
    ///
    /// Refused, naming the devices: no id, an empty pair id or one naming
    /// itself, a slot that cannot hot-plug, an id already registered, a second
    /// primary for the same standby, a slot another primary has, a slot that
    /// holds some other device. A slot that already holds this primary's own
    /// device is accepted, and the primary counts as plugged.
    pub fn add_primary(&self, primary: Primary) -> registry::Result<()> {
        primary.check()?;
        let in_slot = {
            let slot = lock(&primary.slot.slot);
            match slot.device() {
                None => false,
                Some(d) if std::ptr::addr_eq(Arc::as_ptr(&d), Arc::as_ptr(&primary.device)) => true,
                Some(_) => {
                    return Err(registry::Error::SlotOccupied {
                        primary: primary.id,
                        slot: primary.slot.name,
                    });
                }
            }
        };
        let (id, port) = (primary.id.clone(), primary.slot.port.clone());
        self.shared
            .update(Ctx::Vmm, |i| i.add_primary(primary, in_slot))?;
        if let Some(port) = port {
            self.shared.watch_removals(id, &port);
        }
        Ok(())
    }

    /// The machine's configuration is complete and the guest is about to run
    /// (QEMU's "machine init done"). A primary whose standby was never
    /// registered is cold-plugged as an ordinary device now (QEMU's
    /// params/on_mismatch); every later plug of an ordinary device is a hot
    /// plug. A primary registered after this whose standby is not registered
    /// stays hidden until it is (QEMU plugs it at once, its hotplug/2_reverse
    /// bug). Calling it again does nothing.
    pub fn machine_ready(&self) {
        self.shared.update(Ctx::Vmm, Inner::machine_ready)
    }

    /// The driver acknowledged a feature set on a device (the
    /// [`FeaturesListener`] route). For a registered standby with failover on
    /// and `VIRTIO_NET_F_STANDBY` in the set: emits `FAILOVER_NEGOTIATED` and
    /// plugs its primary (if hidden, and no outgoing migration is holding the
    /// primaries out), or warns that it has none. Acknowledgements without
    /// STANDBY change nothing (a reset does not re-hide a primary the guest
    /// has); a second acknowledgement plugs nothing twice.
    ///
    /// With `restored: true` during an incoming migration, the plug waits for
    /// [`complete_incoming`](Self::complete_incoming).
    ///
    /// Called from the standby's `FEATURES_OK` handler, it locks the primary's
    /// slot (never the standby's transport).
    pub fn features_acked(&self, event: &FeaturesAcked) {
        self.shared.update(Ctx::Vmm, |i| i.features_acked(event))
    }

    /// Starts an outgoing migration: requests the unplug of every failover
    /// primary the guest has (`UNPLUG_PRIMARY` for each) and returns its
    /// handle, in wait-unplug (or active at once when there was nothing to
    /// unplug, or failed when a slot refused: see the handle's reason). See
    /// [`migration`](crate::migration) for the states.
    ///
    /// A primary with a link hook ([`Primary::link`]) is switched first
    /// (make before break): its link goes down (`PRIMARY_LINK_DOWN`, state
    /// [`PrimaryState::LinkDown`]), and its unplug is requested when its
    /// standby transmits ([`standby_traffic`](Self::standby_traffic)) or when
    /// the switch wait runs out ([`CoordinatorBuilder::switch_wait`], on the
    /// [`deadline`](Self::deadline) timer): `SWITCHED_TO_STANDBY`, then
    /// `UNPLUG_PRIMARY`. A hook that fails is logged and the primary is
    /// unplugged at once. A cancel or failure brings every link it took down
    /// back up (`PRIMARY_LINK_UP`), before the primary is plugged back if it
    /// left. After `complete()` the link stays down with the primary gone.
    ///
    /// [`prepare_outgoing_to`](Self::prepare_outgoing_to) checks the
    /// destination first.
    ///
    /// Refused while another outgoing migration or an incoming one is in
    /// progress.
    pub fn prepare_outgoing(&self) -> migration::Result<OutgoingMigration> {
        let id = self.shared.update(Ctx::Vmm, Inner::prepare_outgoing)?;
        self.shared.update(Ctx::Vmm, |i| i.requests_made(id));
        Ok(OutgoingMigration {
            shared: self.shared.clone(),
            id,
        })
    }

    /// Pre-flight, on the source: [`preflight`](Self::preflight) against the
    /// destination's `offer`, then [`prepare_outgoing`](Self::prepare_outgoing),
    /// as one step (no acknowledgement can slip in between). A refusal
    /// ([`migration::Error::Preflight`]) unplugs nothing, starts no migration
    /// and emits no event.
    pub fn prepare_outgoing_to(
        &self,
        offer: &DestinationOffer,
    ) -> migration::Result<OutgoingMigration> {
        let id = self.shared.update(Ctx::Vmm, |i| {
            i.can_prepare_outgoing()?;
            i.preflight(offer)?;
            i.prepare_outgoing()
        })?;
        self.shared.update(Ctx::Vmm, |i| i.requests_made(id));
        Ok(OutgoingMigration {
            shared: self.shared.clone(),
            id,
        })
    }

    /// Pre-flight, on the destination: what it can take, for the source's
    /// [`preflight`](Self::preflight): each registered standby with whether
    /// failover is on, the features its device offers (as registered with
    /// [`Standby::offered_features`]) and the primary registered for it.
    /// Send it to the source over the migration channel (serde with the
    /// `serde` feature).
    pub fn destination_offer(&self) -> DestinationOffer {
        self.shared.lock().destination_offer()
    }

    /// Pre-flight, on the source: whether the destination that sent `offer`
    /// can take this VM's standbys and pairs, checked before anything is
    /// unplugged (QEMU unplugs first, and reports success when the
    /// destination then rejects the standby's features while the guest is
    /// lost). Changes nothing.
    ///
    /// Every problem is reported at once, one line each, naming the standby:
    /// - the destination has no standby with its id;
    /// - the guest negotiated STANDBY here but the destination's standby has
    ///   failover off;
    /// - the destination's device does not offer every feature bit the guest
    ///   acknowledged here (named in hex; checked when both sides know them:
    ///   the last `FeaturesAcked` here, [`Standby::offered_features`] there);
    /// - the destination has no primary for a pair the guest negotiated,
    ///   unless [`preflight_allow_missing_primary`](Self::preflight_allow_missing_primary)
    ///   allows it (the guest then runs on the standby there, with
    ///   `PRIMARY_MISSING`).
    pub fn preflight(&self, offer: &DestinationOffer) -> migration::Result<()> {
        self.shared.lock().preflight(offer)
    }

    /// Whether [`preflight`](Self::preflight) accepts a destination without a
    /// primary for a negotiated pair (default: no, it refuses). Allow it when
    /// the destination knowingly has no VF for the guest: it then runs on the
    /// standby alone there. A source-side policy, independent of any offer.
    pub fn preflight_allow_missing_primary(&self, allow: bool) {
        self.shared.lock().allow_missing_primary = allow;
    }

    /// Make before break: the standby `standby` transmitted a frame for the
    /// guest. Call it from the standby's transmit path for every frame (or
    /// batch) it sends; while nothing waits it is one atomic load.
    ///
    /// While an outgoing migration waits for a primary's guest to move its
    /// traffic to `standby` (its link taken down, `PRIMARY_LINK_DOWN`), this
    /// is the sign that it has: `SWITCHED_TO_STANDBY` (`traffic_seen: true`)
    /// and the primary's unplug follow. Like a completion it may run inside
    /// a guest's register write (a queue notify): it makes no slot call and
    /// delivers no event itself; both wait for
    /// [`run_deferred`](Self::run_deferred), and the waker is called.
    ///
    /// Traffic counts once the link hook's down call has returned (a frame
    /// on the standby before that is not taken as the switch).
    pub fn standby_traffic(&self, standby: &str) {
        if !self.shared.switching.load(Ordering::Acquire) {
            return;
        }
        let _scope = DepthScope::completion();
        self.shared
            .update(Ctx::Completion, |i| i.standby_traffic(standby));
    }

    /// This VM is a migration destination: call before restoring any state.
    /// Until [`complete_incoming`](Self::complete_incoming), a restored
    /// acknowledgement of STANDBY is recorded (`FAILOVER_NEGOTIATED`) but
    /// plugs nothing, so the ports can be restored first.
    pub fn prepare_incoming(&self) -> migration::Result<()> {
        self.shared.update(Ctx::Vmm, Inner::prepare_incoming)
    }

    /// Every state is restored and the vCPUs are about to run: plugs the
    /// primary of every standby whose restored state had STANDBY acknowledged,
    /// and warns (`PRIMARY_MISSING`) for each such standby without a primary:
    /// its guest runs on the standby. Standbys the guest never negotiated keep
    /// their primaries hidden.
    ///
    /// The machine counts as ready from then on (see
    /// [`machine_ready`](Self::machine_ready)), without cold-plugging anything:
    /// on a destination the restored ports say what is in their slots (an
    /// ordinary primary is cold-plugged when registered with its failover-off
    /// standby, or registered after its port is restored with it in the slot).
    pub fn complete_incoming(&self) -> migration::Result<()> {
        self.shared.update(Ctx::Vmm, Inner::complete_incoming)
    }

    /// When the coordinator's timer must fire, on the coordinator's clock
    /// (which must be the ports' clock, the VM's run-time clock): the earliest
    /// of when the current migration's wait gives up, when the switch wait of
    /// a primary whose link is down runs out (make before break), and the
    /// [`next_deadline`](pcie_hotplug::HotplugSlot::next_deadline) of the
    /// slot of each primary being unplugged (a cancel the port resolves by
    /// time alone). Arm a timer for it and call
    /// [`check_deadline`](Self::check_deadline) when it fires. `None` while
    /// nothing waits (or with [`UnplugWait::Unbounded`] and no slot
    /// deadline). Locks those slots (never while holding the coordinator's
    /// lock).
    pub fn deadline(&self) -> Option<Duration> {
        let own = self.shared.lock().deadline();
        self.shared
            .unplugging_slots()
            .iter()
            .filter_map(|s| lock(s).next_deadline())
            .chain(own)
            .min()
    }

    /// The VMM's timer for [`deadline`](Self::deadline) fired: a primary
    /// whose switch wait ran out without traffic on its standby is unplugged
    /// (`SWITCHED_TO_STANDBY` with `traffic_seen: false`, then
    /// `UNPLUG_PRIMARY`); a migration still in wait-unplug fails (and its
    /// unplugs are withdrawn); one still cancelling stops waiting and is
    /// cancelled. Early or repeated calls do nothing.
    ///
    /// First it calls [`poll`](pcie_hotplug::HotplugSlot::poll) on the slot
    /// of each primary being unplugged (each slot locked in turn, the
    /// coordinator's lock released), so an unplug the port resolves by time
    /// completes, and makes the slot calls that follows (a primary to plug
    /// back); then it checks the migration's own deadline.
    pub fn check_deadline(&self) {
        for s in self.shared.unplugging_slots() {
            let mut s = lock(&s);
            let _scope = DepthScope::execute();
            s.poll();
        }
        self.shared.run_deferred();
        self.shared.update(Ctx::Vmm, Inner::check_deadline)
    }

    /// Where primary `id` is, if it is registered.
    pub fn primary_state(&self, id: &str) -> Option<PrimaryState> {
        self.shared
            .lock()
            .primaries
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.state)
    }

    /// Whether the guest acknowledged STANDBY on standby `id`, if it is
    /// registered.
    pub fn negotiated(&self, id: &str) -> Option<bool> {
        self.shared.lock().standby(id).map(|s| s.negotiated)
    }

    /// Whether the primaries' slots can be saved now
    /// ([`device_state::Persist::save`] of a port refuses while a plug or
    /// unplug is in flight): `Busy`, naming each primary in flight and what to
    /// wait for, otherwise `Ok`.
    pub fn ready_to_save(&self) -> Result<(), device_state::Error> {
        let i = self.shared.lock();
        let busy: Vec<String> = i
            .primaries
            .iter()
            .filter_map(|p| match p.state {
                PrimaryState::Plugging => Some(format!(
                    "primary '{}' is being plugged into '{}' (wait for PRIMARY_PLUGGED)",
                    p.id, p.slot.name
                )),
                PrimaryState::LinkDown => Some(format!(
                    "primary '{}' is switching to its standby before its unplug (wait for the \
                     migration to become active)",
                    p.id
                )),
                PrimaryState::Unplugging => Some(format!(
                    "primary '{}' is being unplugged from '{}' (wait for the migration to \
                     become active)",
                    p.id, p.slot.name
                )),
                _ => None,
            })
            .collect();
        if busy.is_empty() {
            Ok(())
        } else {
            Err(device_state::Error::Busy(format!(
                "failover: {}",
                busy.join("; ")
            )))
        }
    }

    /// The slot primary `id` goes into, if it is registered.
    pub fn slot_of(&self, id: &str) -> Option<SharedSlot> {
        self.shared
            .lock()
            .primaries
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.slot.slot.clone())
    }

    /// The coordinator's clock, now.
    pub fn now(&self) -> Duration {
        self.shared.clock.now()
    }
}

impl FeaturesListener for Coordinator {
    fn features_acked(&self, event: &FeaturesAcked) {
        Coordinator::features_acked(self, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    use pcie_hotplug::{HotplugSlot, RootPort, RootPortBuilder};
    use vmm_pci::PciFunction;
    use vmm_pci::pcie::{
        SLTCTL, SLTCTL_PCC, SLTCTL_PIC, SLTCTL_PIC_BLINK, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP,
    };
    use vmm_pci::testing::{RecordingMsi, StubEndpoint};

    use super::*;
    use crate::event::EventLog;

    const STANDBY: u64 = 1 << VIRTIO_NET_F_STANDBY;

    struct Rig {
        coord: Coordinator,
        events: EventLog,
        ports: Vec<Arc<Mutex<RootPort>>>,
        devices: Vec<PciHandle>,
        time: Arc<AtomicU64>,
        wakes: Arc<AtomicUsize>,
    }

    fn rig(pairs: usize, waker: bool) -> Rig {
        let time = Arc::new(AtomicU64::new(0));
        let t = time.clone();
        let events = EventLog::new();
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let mut b = Coordinator::builder()
            .clock(move || Duration::from_millis(t.load(Ordering::SeqCst)))
            .listener(Arc::new(events.clone()));
        if waker {
            b = b.waker(move || {
                w.fetch_add(1, Ordering::SeqCst);
            });
        }
        let ports = (0..pairs)
            .map(|i| {
                Arc::new(Mutex::new(
                    RootPortBuilder::new(format!("rp{i}"), i as u16 + 1)
                        .build(Arc::new(RecordingMsi::default())),
                ))
            })
            .collect();
        Rig {
            coord: b.build(),
            events,
            ports,
            devices: (0..pairs).map(|_| StubEndpoint::vf()).collect(),
            time,
            wakes,
        }
    }

    impl Rig {
        fn standby(&self, i: usize, failover: bool) -> registry::Result<()> {
            self.coord
                .add_standby(Standby::new(format!("net{i}")).failover(failover))
        }

        fn primary(&self, i: usize) -> registry::Result<()> {
            self.coord.add_primary(self.primary_config(i))
        }

        fn primary_config(&self, i: usize) -> Primary {
            Primary::new(
                format!("hostdev{i}"),
                format!("net{i}"),
                self.devices[i].clone(),
                Slot::port(format!("rp{i}"), &self.ports[i]),
            )
        }

        /// Pair `i` registered with a link hook and plugged in the guest.
        fn plugged_with_link(&self, i: usize, link: Arc<dyn PrimaryLink>) {
            self.standby(i, true).unwrap();
            self.coord
                .add_primary(self.primary_config(i).link(link))
                .unwrap();
            self.ack(i, STANDBY, false);
            self.guest_enables(i);
            self.coord.run_deferred();
        }

        fn ack(&self, i: usize, features: u64, restored: bool) {
            self.coord.features_acked(&FeaturesAcked {
                device_id: format!("net{i}"),
                device_type: 1,
                features,
                restored,
            });
        }

        /// A guest write of Slot Control (`f` maps the old value to the new).
        fn write_ctl(&self, i: usize, f: impl FnOnce(u16) -> u16) {
            let mut p = self.ports[i].lock().unwrap();
            let off = p.pcie_cap_offset() + SLTCTL;
            let v = f(p.config().get_u16(off));
            p.write_config(off, &v.to_le_bytes());
        }

        /// The guest powers the slot and lights its indicator (a plug done).
        fn guest_enables(&self, i: usize) {
            self.write_ctl(i, |c| (c & !(SLTCTL_PCC | SLTCTL_PIC)) | SLTCTL_PIC_ON);
        }

        /// The guest powers the slot off (an unplug done).
        fn guest_powers_off(&self, i: usize) {
            self.write_ctl(i, |c| c | SLTCTL_PCC);
        }

        /// The guest's interrupt handler takes a button press.
        fn guest_takes_press(&self, i: usize) {
            let mut p = self.ports[i].lock().unwrap();
            let off = p.pcie_cap_offset() + SLTSTA;
            let mut b = [0; 2];
            p.read_config(off, &mut b);
            p.write_config(off, &SLTSTA_ABP.to_le_bytes());
        }

        fn in_slot(&self, i: usize) -> bool {
            self.ports[i].lock().unwrap().device().is_some()
        }
    }

    #[test]
    fn a_primary_is_held_until_standby_is_acknowledged_once() {
        let r = rig(1, true);
        r.primary(0).unwrap();
        r.standby(0, true).unwrap();
        r.coord.machine_ready();
        assert!(!r.in_slot(0));
        // Not STANDBY, not a standby, not this standby: nothing.
        r.ack(0, 1 << 32, false);
        r.ack(7, STANDBY, false);
        assert!(!r.in_slot(0));
        assert_eq!(r.coord.negotiated("net0"), Some(false));
        r.ack(0, STANDBY, false);
        assert!(r.in_slot(0));
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugging)
        );
        r.ack(0, STANDBY, false);
        r.guest_enables(0);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugged)
        );
        r.coord.run_deferred();
        let n = r
            .events
            .kinds()
            .iter()
            .filter(|e| matches!(e, Event::PrimaryPlugged { .. }))
            .count();
        assert_eq!(n, 1);
        assert_eq!(r.ports[0].lock().unwrap().counters().button_presses, 1);
    }

    #[test]
    fn a_restored_acknowledgement_waits_for_complete_incoming() {
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        assert_eq!(
            r.coord.complete_incoming(),
            Err(migration::Error::NoIncoming)
        );
        r.coord.prepare_incoming().unwrap();
        assert_eq!(
            r.coord.prepare_incoming(),
            Err(migration::Error::IncomingInProgress)
        );
        assert!(matches!(
            r.coord.prepare_outgoing(),
            Err(migration::Error::IncomingInProgress)
        ));
        r.ack(0, STANDBY, true);
        assert!(!r.in_slot(0));
        r.coord.complete_incoming().unwrap();
        assert!(r.in_slot(0));
        // Without an incoming migration, a restored acknowledgement plugs at once.
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, true);
        assert!(r.in_slot(0));
    }

    #[test]
    fn a_late_unplug_is_plugged_back_through_deferred_work() {
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        r.guest_enables(0);
        // PRIMARY_PLUGGED was queued inside that write.
        assert_eq!(r.wakes.load(Ordering::SeqCst), 1);
        assert_eq!(r.coord.run_deferred(), 0);
        let m = r.coord.prepare_outgoing().unwrap();
        // The guest took the press: a cancel cannot take it back.
        r.guest_takes_press(0);
        m.fail("the stream broke").unwrap();
        assert_eq!(m.state(), MigrationState::Failed);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugging)
        );
        // The guest goes on and powers the slot off: the completion fires inside
        // this write, with the port locked; the replug and the events wait for
        // run_deferred.
        let before = r.events.kinds().len();
        r.guest_powers_off(0);
        assert_eq!(r.wakes.load(Ordering::SeqCst), 2);
        assert!(!r.in_slot(0));
        assert_eq!(
            r.events.kinds().len(),
            before,
            "no listener inside the guest write"
        );
        assert_eq!(r.coord.run_deferred(), 1);
        assert_eq!(r.coord.run_deferred(), 0);
        let tail: Vec<Event> = r.events.kinds().into_iter().rev().take(2).collect();
        assert_eq!(
            tail,
            [
                Event::UnplugNotCancelled {
                    primary: "hostdev0".into()
                },
                Event::PrimaryUnplugged {
                    primary: "hostdev0".into()
                }
            ]
        );
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugging)
        );
        assert_eq!(
            r.ports[0].lock().unwrap().slot_state().pending,
            Some(pcie_hotplug::Operation::Plug)
        );
    }

    #[test]
    fn an_unplug_left_over_from_a_cancel_is_adopted_by_the_next_migration() {
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        r.guest_enables(0);
        let m1 = r.coord.prepare_outgoing().unwrap();
        // The guest took the press and then does nothing: the withdrawal is
        // never answered, and the cancel ends at the bound.
        r.guest_takes_press(0);
        m1.cancel().unwrap();
        assert_eq!(m1.state(), MigrationState::Cancelling);
        r.time.store(31_000, Ordering::SeqCst);
        r.coord.check_deadline();
        assert_eq!(m1.state(), MigrationState::Cancelled);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugging)
        );
        assert!(r.in_slot(0));
        // The next migration waits for it instead of going active with the
        // primary in the guest.
        let m2 = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m2.state(), MigrationState::WaitUnplug);
        assert_eq!(m2.waiting_for(), ["hostdev0"]);
        assert!(matches!(
            m2.complete(),
            Err(migration::Error::NotActive { .. })
        ));
        // The guest finally powers the slot off: that ends m2's wait, and
        // nothing plugs it back while m2 goes ahead.
        r.guest_powers_off(0);
        r.coord.run_deferred();
        assert_eq!(m2.state(), MigrationState::Active);
        assert_eq!(r.coord.run_deferred(), 0);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugged)
        );
        assert!(!r.in_slot(0));
        assert_eq!(r.ports[0].lock().unwrap().slot_state().pending, None);
        m2.complete().unwrap();
        assert_eq!(r.coord.run_deferred(), 0);
        assert!(!r.in_slot(0), "on the destination only");
    }

    #[test]
    fn an_unplug_left_over_from_a_cancel_is_plugged_back_when_the_next_one_is() {
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        r.guest_enables(0);
        let m1 = r.coord.prepare_outgoing().unwrap();
        r.guest_takes_press(0);
        m1.cancel().unwrap();
        r.time.store(31_000, Ordering::SeqCst);
        r.coord.check_deadline();
        let m2 = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m2.state(), MigrationState::WaitUnplug);
        m2.fail("the stream broke").unwrap();
        r.guest_powers_off(0);
        assert_eq!(r.coord.run_deferred(), 1);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugging)
        );
        assert_eq!(
            r.ports[0].lock().unwrap().slot_state().pending,
            Some(pcie_hotplug::Operation::Plug),
            "back on the source"
        );
    }

    #[test]
    fn without_a_waker_a_thread_of_its_own_does_the_deferred_work() {
        let r = rig(1, false);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        r.guest_enables(0);
        let m = r.coord.prepare_outgoing().unwrap();
        r.guest_takes_press(0);
        m.cancel().unwrap();
        r.guest_powers_off(0);
        assert_eq!(m.state(), MigrationState::Cancelled);
        let start = Instant::now();
        while r.ports[0].lock().unwrap().slot_state().pending != Some(pcie_hotplug::Operation::Plug)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the replug never came"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_refused_unplug_fails_the_migration_before_any_other_unplug() {
        let r = rig(2, true);
        for i in 0..2 {
            r.standby(i, true).unwrap();
            r.primary(i).unwrap();
            r.ack(i, STANDBY, false);
        }
        r.guest_enables(0);
        r.guest_enables(1);
        // The guest is busy with hostdev0's slot: indicator blinking.
        r.write_ctl(0, |c| (c & !SLTCTL_PIC) | SLTCTL_PIC_BLINK);
        r.coord.run_deferred();
        r.events.take();
        let m = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m.state(), MigrationState::Failed);
        let reason = m.reason().unwrap();
        assert_eq!(
            reason,
            "cannot unplug primary 'hostdev0' from slot 'rp0': Hot-unplug failed: guest is busy \
             (power indicator blinking)"
        );
        assert!(
            !r.events
                .kinds()
                .iter()
                .any(|e| matches!(e, Event::UnplugPrimary { .. })),
            "{:#?}",
            r.events.kinds()
        );
        assert_eq!(
            r.coord.primary_state("hostdev1"),
            Some(PrimaryState::Plugged)
        );
        assert_eq!(r.ports[1].lock().unwrap().counters().button_presses, 1);
        // It stays in the guest.
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugged)
        );
    }

    #[test]
    fn a_plug_in_flight_is_unplugged_once_the_guest_has_enabled_it() {
        let r = rig(1, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        // The guest is enabling hostdev0: slot powered, indicator blinking.
        r.write_ctl(0, |c| (c & !(SLTCTL_PCC | SLTCTL_PIC)) | SLTCTL_PIC_BLINK);
        let m = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m.state(), MigrationState::WaitUnplug);
        assert_eq!(m.waiting_for(), ["hostdev0"]);
        assert_eq!(r.ports[0].lock().unwrap().counters().button_presses, 1);
        // The indicator goes on: the plug completes inside that write, and the
        // unplug is requested from the deferred work.
        r.guest_enables(0);
        assert_eq!(r.coord.run_deferred(), 1);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugging)
        );
        assert_eq!(r.ports[0].lock().unwrap().counters().button_presses, 2);
        assert_eq!(m.state(), MigrationState::WaitUnplug);
        r.guest_takes_press(0);
        r.guest_powers_off(0);
        r.coord.run_deferred();
        assert_eq!(m.state(), MigrationState::Active);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugged)
        );
        assert!(!r.events.kinds().iter().any(|e| matches!(
            e,
            Event::Migration {
                status: MigrationState::Failed,
                ..
            }
        )));
    }

    #[test]
    fn a_stale_handle_reports_how_its_migration_ended() {
        let r = rig(1, true);
        let m1 = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m1.state(), MigrationState::Active);
        m1.complete().unwrap();
        let m2 = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m2.id(), 2);
        assert_eq!(
            m1.cancel(),
            Err(migration::Error::Finished {
                state: MigrationState::Completed
            })
        );
        assert_eq!(m1.state(), MigrationState::Completed);
        m2.cancel().unwrap();
        assert_eq!(
            m2.wait_timeout(Duration::from_secs(1)),
            MigrationState::Cancelled
        );
        assert!(format!("{m2:?}").contains("Cancelled"));
    }

    #[test]
    fn listeners_may_call_back_and_events_stay_in_order() {
        let r = rig(1, true);
        let c = r.coord.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        r.coord.add_listener(Arc::new(move |e: &TimedEvent| {
            s.lock().unwrap().push(e.event.clone());
            if matches!(e.event, Event::PrimaryHidden { .. }) {
                // Registering from inside a listener: its events come after.
                c.add_standby(Standby::new("net0")).unwrap();
                assert_eq!(c.primary_state("hostdev0"), Some(PrimaryState::Hidden));
            }
        }));
        r.primary(0).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                Event::PrimaryHidden {
                    primary: "hostdev0".into(),
                    standby: "net0".into()
                },
                Event::Paired {
                    primary: "hostdev0".into(),
                    standby: "net0".into()
                }
            ]
        );
        assert_eq!(r.events.kinds(), *seen.lock().unwrap());
    }

    #[test]
    fn listeners_never_run_inside_the_guests_register_write() {
        let r = rig(2, true);
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        r.ack(0, STANDBY, false);
        let c = r.coord.clone();
        let (dev, port) = (r.devices[1].clone(), r.ports[1].clone());
        let port0 = r.ports[0].clone();
        let called = Arc::new(AtomicUsize::new(0));
        let called2 = called.clone();
        r.coord.add_listener(Arc::new(move |e: &TimedEvent| {
            if matches!(e.event, Event::PrimaryPlugged { .. }) {
                called2.fetch_add(1, Ordering::SeqCst);
                // Not inside the guest's write to rp0: its port is not
                // locked (by this thread or any other), and a listener may
                // call the coordinator, which plugs into rp1 at once.
                assert!(port0.try_lock().is_ok(), "called with the port locked");
                c.add_standby(Standby::new("net1")).unwrap();
                c.features_acked(&FeaturesAcked {
                    device_id: "net1".into(),
                    device_type: 1,
                    features: STANDBY,
                    restored: false,
                });
                c.add_primary(Primary::new(
                    "hostdev1",
                    "net1",
                    dev.clone(),
                    Slot::port("rp1", &port),
                ))
                .unwrap();
            }
        }));
        r.guest_enables(0);
        assert_eq!(called.load(Ordering::SeqCst), 0, "called inside the write");
        assert!(r.wakes.load(Ordering::SeqCst) >= 1);
        assert_eq!(r.coord.run_deferred(), 0);
        assert_eq!(called.load(Ordering::SeqCst), 1);
        assert_eq!(
            r.coord.primary_state("hostdev1"),
            Some(PrimaryState::Plugging)
        );
        assert!(r.in_slot(1));
    }

    #[test]
    fn a_slot_holding_the_primary_itself_is_accepted_as_plugged() {
        let r = rig(1, true);
        r.ports[0]
            .lock()
            .unwrap()
            .cold_plug(r.devices[0].clone())
            .unwrap();
        r.standby(0, true).unwrap();
        r.primary(0).unwrap();
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugged)
        );
        assert!(r.coord.slot_of("hostdev0").is_some());
        assert!(r.coord.slot_of("nope").is_none());
        assert!(format!("{:?}", r.coord).contains("primaries: 1"));
    }

    #[test]
    fn standby_traffic_is_a_no_op_while_nothing_waits() {
        let r = rig(2, true);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        // Before anything is registered.
        r.coord.standby_traffic("net0");
        r.plugged_with_link(
            0,
            Arc::new(move |up: bool| {
                c.lock().unwrap().push(up);
                Ok(())
            }),
        );
        r.standby(1, true).unwrap();
        r.primary(1).unwrap();
        r.ack(1, STANDBY, false);
        r.guest_enables(1);
        r.coord.run_deferred();
        let quiet = |r: &Rig| {
            let (events, wakes) = (r.events.kinds().len(), r.wakes.load(Ordering::SeqCst));
            r.coord.standby_traffic("net0");
            r.coord.standby_traffic("net1");
            r.coord.standby_traffic("nope");
            assert!(!r.coord.shared.switching.load(Ordering::SeqCst));
            assert_eq!(r.events.kinds().len(), events);
            assert_eq!(r.wakes.load(Ordering::SeqCst), wakes);
            assert!(r.coord.shared.lock().deferred.is_empty());
        };
        // Plugged, no migration.
        quiet(&r);
        // hostdev1 (no hook) is being unplugged, hostdev0 waits: traffic on
        // net1 is nobody's signal, and changes nothing.
        let m = r.coord.prepare_outgoing().unwrap();
        assert!(r.coord.shared.switching.load(Ordering::SeqCst));
        let wakes = r.wakes.load(Ordering::SeqCst);
        r.coord.standby_traffic("net1");
        assert_eq!(r.wakes.load(Ordering::SeqCst), wakes);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::LinkDown)
        );
        // net0's traffic switches it; from then on nothing waits again.
        r.coord.standby_traffic("net0");
        assert_eq!(r.wakes.load(Ordering::SeqCst), wakes + 1);
        assert_eq!(r.coord.run_deferred(), 1);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Unplugging)
        );
        quiet(&r);
        m.cancel().unwrap();
        quiet(&r);
        assert_eq!(*calls.lock().unwrap(), [false, true]);
    }

    #[test]
    fn the_link_hook_runs_with_no_lock_held_and_may_call_back() {
        let r = rig(2, true);
        let coord: Arc<Mutex<Option<Coordinator>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, n, port0) = (coord.clone(), calls.clone(), r.ports[0].clone());
        r.plugged_with_link(
            0,
            Arc::new(move |up: bool| {
                n.fetch_add(1, Ordering::SeqCst);
                let c = c.lock().unwrap().clone().unwrap();
                // Neither the coordinator's lock nor the primary's slot is
                // held (by this thread or any other).
                assert!(c.shared.inner.try_lock().is_ok(), "called under the lock");
                assert!(port0.try_lock().is_ok(), "called with the slot locked");
                // Calling back works; what it queues for slots waits.
                let state = c.primary_state("hostdev0");
                assert_eq!(
                    state,
                    Some(if up {
                        PrimaryState::Plugged
                    } else {
                        PrimaryState::LinkDown
                    })
                );
                let _ = c.deadline();
                assert!(c.ready_to_save().is_err() != up);
                c.standby_traffic("net0");
                assert_eq!(c.run_deferred(), 0, "no slot call from inside the hook");
                c.check_deadline();
                if !up {
                    assert!(matches!(
                        c.prepare_outgoing(),
                        Err(migration::Error::OutgoingInProgress { .. })
                    ));
                } else {
                    // The guest acknowledges STANDBY on net1 meanwhile (the
                    // migration was cancelled): its plug is deferred, not
                    // made from inside the hook.
                    c.features_acked(&FeaturesAcked {
                        device_id: "net1".into(),
                        device_type: 1,
                        features: STANDBY,
                        restored: false,
                    });
                }
                Ok(())
            }),
        );
        *coord.lock().unwrap() = Some(r.coord.clone());
        r.standby(1, true).unwrap();
        r.primary(1).unwrap();
        let m = r.coord.prepare_outgoing().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // While the hook ran the link was not down yet: its own traffic
        // call was no signal.
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::LinkDown)
        );
        assert!(r.coord.shared.switching.load(Ordering::SeqCst));
        let wakes = r.wakes.load(Ordering::SeqCst);
        m.cancel().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(m.state(), MigrationState::Cancelled);
        assert!(r.wakes.load(Ordering::SeqCst) > wakes);
        assert!(!r.in_slot(1), "the plug waits for run_deferred");
        assert_eq!(r.coord.run_deferred(), 1);
        assert!(r.in_slot(1));
        let tail: Vec<Event> = r.events.kinds().into_iter().rev().take(4).collect();
        assert_eq!(
            tail,
            [
                // Reported once the call that caused it returned.
                Event::PrimaryLinkUp {
                    primary: "hostdev0".into()
                },
                Event::FailoverNegotiated {
                    standby: "net1".into()
                },
                Event::Migration {
                    status: MigrationState::Cancelled,
                    reason: None
                },
                Event::Migration {
                    status: MigrationState::Cancelling,
                    reason: None
                },
            ]
        );
    }

    #[test]
    fn a_hook_that_cancels_the_migration_leaves_the_link_up() {
        let r = rig(1, true);
        let coord: Arc<Mutex<Option<Coordinator>>> = Arc::default();
        let ups = Arc::new(Mutex::new(Vec::new()));
        let (c, u) = (coord.clone(), ups.clone());
        r.plugged_with_link(
            0,
            Arc::new(move |up: bool| {
                u.lock().unwrap().push(up);
                let Some(c) = c.lock().unwrap().clone() else {
                    return Ok(());
                };
                if !up {
                    // From inside the down call (the management layer
                    // cancels): the link call this causes waits until this
                    // one has returned.
                    let id = c.shared.lock().outgoing.as_ref().unwrap().id;
                    let m = OutgoingMigration {
                        shared: c.shared.clone(),
                        id,
                    };
                    m.cancel().unwrap();
                    assert_eq!(m.state(), MigrationState::Cancelled);
                }
                Ok(())
            }),
        );
        *coord.lock().unwrap() = Some(r.coord.clone());
        r.events.take();
        let m = r.coord.prepare_outgoing().unwrap();
        assert_eq!(m.state(), MigrationState::Cancelled);
        assert_eq!(*ups.lock().unwrap(), [false, true]);
        r.coord.run_deferred();
        assert_eq!(*ups.lock().unwrap(), [false, true], "no third call");
        let status = |status| Event::Migration {
            status,
            reason: None,
        };
        assert_eq!(
            r.events.kinds(),
            [
                status(MigrationState::Setup),
                status(MigrationState::Cancelling),
                status(MigrationState::Cancelled),
                Event::PrimaryLinkDown {
                    primary: "hostdev0".into()
                },
                Event::PrimaryLinkUp {
                    primary: "hostdev0".into()
                },
            ]
        );
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugged)
        );
        assert_eq!(r.ports[0].lock().unwrap().counters().button_presses, 1);
        assert_eq!(r.coord.deadline(), None);
    }

    #[test]
    fn link_calls_for_one_primary_never_overlap_and_keep_their_order() {
        let r = rig(1, true);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicBool::new(false));
        let (c, b) = (calls.clone(), busy.clone());
        r.plugged_with_link(
            0,
            Arc::new(move |up: bool| {
                assert!(!b.swap(true, Ordering::SeqCst), "two calls at once");
                c.lock().unwrap().push(up);
                if !up {
                    // The PF is slow to answer.
                    entered_tx.send(()).unwrap();
                    release_rx.lock().unwrap().recv().unwrap();
                }
                b.store(false, Ordering::SeqCst);
                Ok(())
            }),
        );
        let coord = r.coord.clone();
        let preparing = std::thread::spawn(move || coord.prepare_outgoing().unwrap());
        entered.recv().unwrap();
        // The management layer cancels from another thread meanwhile: its
        // link call waits for the down call to return.
        let id = r.coord.shared.lock().outgoing.as_ref().unwrap().id;
        let m = OutgoingMigration {
            shared: r.coord.shared.clone(),
            id,
        };
        let cancelling = std::thread::spawn(move || m.cancel());
        std::thread::sleep(Duration::from_millis(20));
        release.send(()).unwrap();
        cancelling.join().unwrap().unwrap();
        let m = preparing.join().unwrap();
        r.coord.run_deferred();
        assert_eq!(m.state(), MigrationState::Cancelled);
        assert_eq!(*calls.lock().unwrap(), [false, true]);
        assert_eq!(
            r.coord.primary_state("hostdev0"),
            Some(PrimaryState::Plugged)
        );
        let links: Vec<Event> = r
            .events
            .kinds()
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::PrimaryLinkDown { .. } | Event::PrimaryLinkUp { .. }
                )
            })
            .collect();
        assert_eq!(
            links,
            [
                Event::PrimaryLinkDown {
                    primary: "hostdev0".into()
                },
                Event::PrimaryLinkUp {
                    primary: "hostdev0".into()
                }
            ]
        );
        assert_eq!(r.ports[0].lock().unwrap().counters().button_presses, 1);
    }

    #[test]
    fn a_failing_link_hook_is_logged_and_the_unplug_goes_on() {
        let r = rig(1, true);
        r.plugged_with_link(
            0,
            Arc::new(|up: bool| {
                if up {
                    Ok(())
                } else {
                    Err(std::io::Error::other("no PF"))
                }
            }),
        );
        r.events.take();
        let m = r.coord.prepare_outgoing().unwrap();
        assert_eq!(
            r.events.take_kinds(),
            [
                Event::Migration {
                    status: MigrationState::Setup,
                    reason: None
                },
                Event::UnplugPrimary {
                    primary: "hostdev0".into()
                },
                Event::Migration {
                    status: MigrationState::WaitUnplug,
                    reason: None
                },
            ]
        );
        assert!(!r.coord.shared.switching.load(Ordering::SeqCst));
        m.cancel().unwrap();
        // The link is brought up (it may be half down) but no
        // PRIMARY_LINK_UP is claimed for a down that never was.
        assert!(
            !r.events
                .kinds()
                .iter()
                .any(|e| matches!(e, Event::PrimaryLinkUp { .. }))
        );
    }

    /// Every VMM call in any order, with guest register writes between them:
    /// nothing panics, and the migration rules hold.
    #[test]
    fn no_call_order_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let r = rig(2, true);
            // Make before break on the primaries registered with a hook.
            let up: Vec<Arc<AtomicBool>> =
                (0..2).map(|_| Arc::new(AtomicBool::new(true))).collect();
            let link = |i: usize| -> Arc<dyn PrimaryLink> {
                let (up, port) = (up[i].clone(), r.ports[i].clone());
                Arc::new(move |u: bool| {
                    assert!(port.try_lock().is_ok(), "called with the slot locked");
                    up.store(u, Ordering::SeqCst);
                    Ok(())
                })
            };
            let mut handles: Vec<OutgoingMigration> = Vec::new();
            for _ in 0..150 {
                let i = next(2) as usize;
                match next(18) {
                    0 => drop(r.standby(i, next(4) != 0)),
                    1 if next(2) == 0 => drop(r.primary(i)),
                    1 => drop(r.coord.add_primary(r.primary_config(i).link(link(i)))),
                    2 => r.coord.machine_ready(),
                    3 => r.ack(
                        i,
                        if next(3) == 0 { 1 << 32 } else { STANDBY },
                        next(2) == 0,
                    ),
                    4 => {
                        if let Ok(m) = r.coord.prepare_outgoing() {
                            handles.push(m);
                        }
                    }
                    5 => drop(handles.last().map(|m| m.cancel())),
                    6 => drop(handles.last().map(|m| m.fail("x"))),
                    7 => drop(handles.last().map(|m| m.complete())),
                    8 => drop(r.coord.prepare_incoming()),
                    9 => drop(r.coord.complete_incoming()),
                    10 => r.guest_enables(i),
                    11 => r.guest_powers_off(i),
                    12 => r.guest_takes_press(i),
                    13 => r.write_ctl(i, |c| (c & !SLTCTL_PIC) | SLTCTL_PIC_BLINK),
                    14 => {
                        r.time.fetch_add(next(40_000), Ordering::SeqCst);
                        r.coord.check_deadline();
                    }
                    15 => drop(r.coord.run_deferred()),
                    16 => r.coord.standby_traffic(&format!("net{i}")),
                    _ => drop(r.coord.ready_to_save()),
                }
                let live = handles.iter().filter(|m| !m.state().is_terminal()).count();
                assert!(live <= 1, "two migrations in progress");
                if let Some(m) = handles.last() {
                    if m.state().is_terminal() {
                        assert_eq!(m.deadline(), None);
                    }
                }
            }
            // Once the deferred work is done, every link is where it is
            // wanted, and up for a primary in (or going into) the guest.
            while r.coord.run_deferred() > 0 {}
            let i = r.coord.shared.lock();
            for p in &i.primaries {
                if p.link.is_none() {
                    continue;
                }
                let idx: usize = p.id["hostdev".len()..].parse().unwrap();
                assert_eq!(
                    up[idx].load(Ordering::SeqCst),
                    !p.link_want_down,
                    "{}",
                    p.id
                );
                if matches!(p.state, PrimaryState::Plugged | PrimaryState::Plugging) {
                    assert!(!p.link_want_down, "{} is {:?}", p.id, p.state);
                }
                if p.state == PrimaryState::LinkDown {
                    assert!(i.migration_going_ahead(), "{} left LinkDown", p.id);
                }
            }
        }
    }
}
