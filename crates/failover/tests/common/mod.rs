//! A VMM model for the failover scenarios: root ports on one PCI segment, a
//! virtio-net standby behind one port per pair and an empty hot-plug port for
//! its primary (a stub 82599 VF), the coordinator wired to the standby's
//! transport, and the VMM's event loop between the scripted guest's steps
//! (deferred coordinator work when woken, the coordinator's timer when due),
//! all on one virtual clock.
//!
//! The bus: pair `i` has its standby's port at 00:(1+2i).0 (the standby at
//! bus 1+2i) and its primary's port at 00:(2+2i).0 (the primary at bus 2+2i),
//! as QEMU's failover tests lay them out; a port without hot-plug follows.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_state::{Persist, from_bytes, to_bytes};
use failover::{
    Coordinator, Event, EventLog, MacAddress, MigrationState, Primary, Slot, Standby,
    UnpairedReason, UnplugWait,
};
use pcie_hotplug::{HotplugSlot, RootPort, RootPortBuilder, RootPortState};
use test_guest::{Guest, IrqQueue, Pciehp, StubEndpoint, Timings, VirtualClock};
use virtio_net_standby::testing::{GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{NetState, StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice, VirtioPciState};
use vmm_pci::{Bdf, PciHandle, PciRoot};

pub type Net = StandbyNet<GuestMem, RecordingBackend>;
pub type StandbyFn = VirtioPciDevice<GuestMem, Net>;

/// QEMU's test MACs.
pub const MAC_PRIMARY: [[u8; 6]; 2] = [
    [0x52, 0x54, 0x00, 0x11, 0x11, 0x11],
    [0x52, 0x54, 0x00, 0x33, 0x33, 0x33],
];
pub const MAC_STANDBY: [[u8; 6]; 2] = [
    [0x52, 0x54, 0x00, 0x22, 0x22, 0x22],
    [0x52, 0x54, 0x00, 0x44, 0x44, 0x44],
];
pub const STANDBY_BIT: u64 = 1 << 62;
/// A guest whose virtio_net supports everything, STANDBY included.
pub const GUEST_FAILOVER: u64 = u64::MAX;
/// A guest whose driver does not know STANDBY (an old driver).
pub const GUEST_NO_STANDBY: u64 = !STANDBY_BIT;

/// How long the scenarios let the guest run to settle a hot-plug operation.
pub const SETTLE: Duration = Duration::from_secs(20);

/// One standby/primary pair of a VM.
pub struct Pair {
    pub standby_id: String,
    pub primary_id: String,
    pub standby: Arc<Mutex<StandbyFn>>,
    pub standby_port: Arc<Mutex<RootPort>>,
    pub primary_port: Arc<Mutex<RootPort>>,
    /// This host's primary (a stub VF).
    pub primary: PciHandle,
    pub standby_mac: [u8; 6],
    pub primary_mac: [u8; 6],
    /// Where the guest finds the standby and the primary.
    pub standby_fn: Bdf,
    pub primary_fn: Bdf,
    pub primary_port_bdf: Bdf,
}

impl Pair {
    /// The VMM's view (QEMU's `query-pci`): the primary is in its slot.
    pub fn primary_in_slot(&self) -> bool {
        self.primary_port.lock().unwrap().device().is_some()
    }

    /// The standby as the coordinator registers it.
    pub fn standby_config(&self, failover: bool) -> Standby {
        Standby::new(self.standby_id.clone())
            .failover(failover)
            .mac(self.standby_mac)
    }

    /// The feature bits this side's standby device offers.
    pub fn offered_features(&self) -> u64 {
        self.standby
            .lock()
            .unwrap()
            .device()
            .offered_features()
            .bits()
    }

    /// The standby as a VMM registers it for the migration pre-flight: with
    /// what its device offers.
    pub fn standby_config_offering(&self, failover: bool) -> Standby {
        self.standby_config(failover)
            .offered_features(self.offered_features())
    }

    /// The primary with a recording link hook (make before break).
    pub fn primary_config_with_link(&self, link: &Arc<RecordingLink>) -> Primary {
        self.primary_config().link(link.clone())
    }

    /// The primary as the coordinator registers it.
    pub fn primary_config(&self) -> Primary {
        Primary::new(
            self.primary_id.clone(),
            self.standby_id.clone(),
            self.primary.clone(),
            Slot::port(
                format!("root{}", self.primary_port_bdf.device - 1),
                &self.primary_port,
            ),
        )
        .mac(self.primary_mac)
    }
}

/// How to build a [`Vm`].
pub struct Spec {
    pub pairs: usize,
    /// The standbys offer STANDBY (QEMU's `failover=on`).
    pub failover: bool,
    /// The standbys are cold-plugged when the VM is built (a destination
    /// attaches them when it restores the ports; a hot-plug scenario plugs
    /// them itself).
    pub cold_standby: bool,
    /// Give each primary its standby's MAC (QEMU's tests give different ones).
    pub same_mac: bool,
    pub unplug_wait: UnplugWait,
    /// Make before break: the coordinator's switch wait.
    pub switch_wait: Duration,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            pairs: 1,
            failover: true,
            cold_standby: true,
            same_mac: true,
            unplug_wait: UnplugWait::default(),
            switch_wait: failover::DEFAULT_SWITCH_WAIT,
        }
    }
}

/// One side's VMM.
pub struct Vm {
    pub root: Arc<PciRoot>,
    pub irqs: Arc<IrqQueue>,
    pub pairs: Vec<Pair>,
    /// A port whose slot cannot hot-plug (QEMU's `pcie.0` in params/error/pcie).
    pub fixed_port: Arc<Mutex<RootPort>>,
    pub coord: Coordinator,
    pub events: EventLog,
    pub clock: VirtualClock,
    woken: Arc<AtomicBool>,
    pub wakes: Arc<AtomicUsize>,
}

impl Vm {
    /// Builds the topology and the coordinator (nothing registered yet).
    pub fn new(spec: Spec, mem: &TestMemory, clock: &VirtualClock) -> Vm {
        let irqs = IrqQueue::new();
        let events = EventLog::new();
        let woken = Arc::new(AtomicBool::new(false));
        let wakes = Arc::new(AtomicUsize::new(0));
        let (w, n) = (woken.clone(), wakes.clone());
        let c = clock.clone();
        let coord = Coordinator::builder()
            .clock(move || c.now())
            .unplug_wait(spec.unplug_wait)
            .switch_wait(spec.switch_wait)
            .listener(Arc::new(events.clone()))
            .waker(move || {
                n.fetch_add(1, Ordering::SeqCst);
                w.store(true, Ordering::SeqCst);
            })
            .build();
        let port = |name: String, slot: u16, hotplug: bool| {
            Arc::new(Mutex::new(
                RootPortBuilder::new(name, slot)
                    .port_number(slot as u8)
                    .hotplug(hotplug)
                    // The ports' cancel and replug-window rules run on guest time.
                    .clock(clock.now_fn())
                    .build(irqs.clone()),
            ))
        };
        let mut root = PciRoot::new();
        let mut pairs = Vec::new();
        for i in 0..spec.pairs {
            let standby_id = format!("standby{i}");
            let standby_mac = MAC_STANDBY[i];
            let net: Net = StandbyNetBuilder::new()
                .id(standby_id.clone())
                .mac(standby_mac)
                .standby(spec.failover)
                .build(vec![RecordingBackend::default()])
                .unwrap();
            let mut standby = VirtioPciBuilder::new()
                .id(standby_id.clone())
                .build(net, mem.atomic(), irqs.clone())
                .unwrap();
            // The transport route: FEATURES_OK (and a restore) reach the coordinator.
            standby.add_features_listener(Arc::new(coord.clone()));
            let standby = Arc::new(Mutex::new(standby));
            let (sd, pd) = (1 + 2 * i as u8, 2 + 2 * i as u8);
            let standby_port = port(format!("root{}", sd - 1), sd as u16, true);
            let primary_port = port(format!("root{}", pd - 1), pd as u16, true);
            if spec.cold_standby {
                standby_port
                    .lock()
                    .unwrap()
                    .cold_plug(standby.clone())
                    .unwrap();
            }
            root.add(sd, 0, standby_port.clone()).unwrap();
            root.add(pd, 0, primary_port.clone()).unwrap();
            pairs.push(Pair {
                standby_id,
                primary_id: format!("primary{i}"),
                standby,
                standby_port,
                primary_port,
                primary: StubEndpoint::vf(),
                standby_mac,
                primary_mac: if spec.same_mac {
                    standby_mac
                } else {
                    MAC_PRIMARY[i]
                },
                standby_fn: Bdf::new(sd, 0, 0),
                primary_fn: Bdf::new(pd, 0, 0),
                primary_port_bdf: Bdf::new(0, pd, 0),
            });
        }
        let fd = 1 + 2 * spec.pairs as u8;
        let fixed_port = port("pcie.0".into(), fd as u16, false);
        root.add(fd, 0, fixed_port.clone()).unwrap();
        Vm {
            root: Arc::new(root),
            irqs,
            pairs,
            fixed_port,
            coord,
            events,
            clock: clock.clone(),
            woken,
            wakes,
        }
    }

    /// A VM with the default spec and a fresh clock.
    pub fn simple() -> (Vm, TestMemory) {
        let mem = TestMemory::new(4 << 20);
        let vm = Vm::new(Spec::default(), &mem, &VirtualClock::new());
        (vm, mem)
    }

    /// Registers pair `i`'s standby (failover as built) and primary, standby
    /// first, then tells the coordinator the machine is ready.
    pub fn register_all(&self, failover: bool) {
        for p in &self.pairs {
            self.coord.add_standby(p.standby_config(failover)).unwrap();
            self.coord.add_primary(p.primary_config()).unwrap();
        }
        self.coord.machine_ready();
    }

    /// Boots the scripted guest on this VM; from then on the guest's clock is
    /// the VM's.
    pub fn boot(&self, guest_features: u64) -> Guest {
        let mut g = Guest::boot_with_clock(
            self.clock.clone(),
            self.root.clone(),
            self.irqs.clone(),
            Timings::default(),
            guest_features,
            (0x10_0000, 0x20_0000),
        );
        self.service(&mut g);
        g
    }

    /// The guest's interrupts and threads, then the VMM's deferred work when
    /// the coordinator woke it, until nothing changes.
    ///
    /// `Guest::service` stops when no interrupt arrived and no interrupt
    /// thread ran in a pass, even if a due step (a driver probe acknowledging
    /// STANDBY, say) raised a new interrupt meanwhile; so it is repeated here
    /// until the guest's log and interrupt counts stand still.
    pub fn service(&self, g: &mut Guest) {
        let activity = |g: &Guest| {
            (
                g.env.log.len(),
                g.hotplug.iter().map(|p| p.interrupts).sum::<u64>(),
            )
        };
        loop {
            let before = activity(g);
            g.service();
            if self.woken.swap(false, Ordering::SeqCst) {
                self.coord.run_deferred();
                continue;
            }
            if activity(g) == before {
                return;
            }
        }
    }

    fn fire_timer(&self) {
        if self.coord.deadline().is_some_and(|d| d <= self.clock.now()) {
            self.coord.check_deadline();
        }
    }

    fn next_wake(&self, g: &Guest) -> Option<Duration> {
        g.hotplug
            .iter()
            .filter_map(Pciehp::next_wake)
            .chain(self.coord.deadline())
            .min()
    }

    /// Runs the guest and the VMM for `d` of virtual time.
    pub fn run_for(&self, g: &mut Guest, d: Duration) {
        let end = self.clock.now() + d;
        loop {
            self.service(g);
            self.fire_timer();
            match self.next_wake(g) {
                Some(t) if t <= end => self.clock.advance_to(t),
                _ => {
                    self.clock.advance_to(end);
                    self.service(g);
                    self.fire_timer();
                    self.service(g);
                    return;
                }
            }
        }
    }

    /// Runs until neither the guest nor the coordinator has anything
    /// scheduled, or `limit` passes; returns the virtual time spent.
    pub fn settle(&self, g: &mut Guest, limit: Duration) -> Duration {
        let start = self.clock.now();
        let end = start + limit;
        loop {
            self.service(g);
            self.fire_timer();
            match self.next_wake(g) {
                Some(t) if t <= end => self.clock.advance_to(t),
                _ => {
                    self.service(g);
                    return self.clock.now() - start;
                }
            }
        }
    }

    /// Per pair: (standby bound by the guest, primary bound by the guest).
    pub fn guest_view(&self, g: &Guest) -> Vec<(bool, bool)> {
        self.pairs
            .iter()
            .map(|p| {
                (
                    g.env.bound.contains(&p.standby_fn),
                    g.env.bound.contains(&p.primary_fn),
                )
            })
            .collect()
    }

    /// Per pair: the primary is in its slot (the VMM's view).
    pub fn slots(&self) -> Vec<bool> {
        self.pairs.iter().map(Pair::primary_in_slot).collect()
    }

    /// Saves what crosses to the destination: each standby (transport and
    /// device) and both ports of each pair.
    pub fn save(&self) -> Vec<Saved> {
        self.coord.ready_to_save().unwrap();
        self.pairs
            .iter()
            .map(|p| Saved {
                standby: to_bytes(&p.standby.lock().unwrap().save().unwrap()),
                standby_port: to_bytes(&p.standby_port.lock().unwrap().save().unwrap()),
                primary_port: to_bytes(&p.primary_port.lock().unwrap().save().unwrap()),
            })
            .collect()
    }

    /// Restores saved states onto this (freshly built, not cold-plugged)
    /// topology: each standby first (its transport raises the restored
    /// acknowledgement), then the ports. The primary's port gets no device
    /// (a failover primary is out on the source; an ordinary one was
    /// cold-plugged here at registration).
    pub fn restore(&self, saved: &[Saved]) {
        for (p, s) in self.pairs.iter().zip(saved) {
            let state: VirtioPciState<NetState> = from_bytes(&s.standby).unwrap();
            p.standby.lock().unwrap().restore(&state).unwrap();
            let port: RootPortState = from_bytes(&s.standby_port).unwrap();
            let behind: PciHandle = p.standby.clone();
            p.standby_port
                .lock()
                .unwrap()
                .restore_with_device(&port, Some(behind))
                .unwrap();
            let port: RootPortState = from_bytes(&s.primary_port).unwrap();
            p.primary_port
                .lock()
                .unwrap()
                .restore_with_device(&port, None)
                .unwrap();
        }
    }
}

/// One pair's saved states.
pub struct Saved {
    pub standby: Vec<u8>,
    pub standby_port: Vec<u8>,
    pub primary_port: Vec<u8>,
}

/// One call of a [`RecordingLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkCall {
    /// When, on the VM's clock.
    pub at: Duration,
    /// `true`: link up; `false`: link down.
    pub up: bool,
    /// Whether the primary was in its slot then (the port is locked by the
    /// hook to see: the coordinator never calls it with a slot locked).
    pub in_slot: bool,
}

/// A primary's link as the VMM switches it (make before break): records each
/// call, and can be made to fail. While it is down, the guest's
/// `net_failover` transmits on the standby.
pub struct RecordingLink {
    clock: VirtualClock,
    port: Arc<Mutex<RootPort>>,
    pub calls: Mutex<Vec<LinkCall>>,
    up: AtomicBool,
    pub fail: AtomicBool,
}

impl RecordingLink {
    /// The link of the primary in `port`, up.
    pub fn new(clock: &VirtualClock, port: &Arc<Mutex<RootPort>>) -> Arc<Self> {
        Arc::new(RecordingLink {
            clock: clock.clone(),
            port: port.clone(),
            calls: Mutex::new(Vec::new()),
            up: AtomicBool::new(true),
            fail: AtomicBool::new(false),
        })
    }

    /// The link of pair `i`'s primary in `vm`.
    pub fn for_pair(vm: &Vm, i: usize) -> Arc<Self> {
        Self::new(&vm.clock, &vm.pairs[i].primary_port)
    }

    pub fn calls(&self) -> Vec<LinkCall> {
        self.calls.lock().unwrap().clone()
    }

    /// (up, in_slot) of each call, without times.
    pub fn ups(&self) -> Vec<(bool, bool)> {
        self.calls().iter().map(|c| (c.up, c.in_slot)).collect()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}

impl failover::PrimaryLink for RecordingLink {
    fn set_link(&self, up: bool) -> std::io::Result<()> {
        let in_slot = self
            .port
            .try_lock()
            .expect("the link hook is called with the primary's slot locked")
            .device()
            .is_some();
        self.calls.lock().unwrap().push(LinkCall {
            at: self.clock.now(),
            up,
            in_slot,
        });
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("PF refused: vf 0 state"));
        }
        self.up.store(up, Ordering::SeqCst);
        Ok(())
    }
}

// Event constructors, to keep expected sequences readable.

pub fn hidden(primary: &str, standby: &str) -> Event {
    Event::PrimaryHidden {
        primary: primary.into(),
        standby: standby.into(),
    }
}

pub fn paired(primary: &str, standby: &str) -> Event {
    Event::Paired {
        primary: primary.into(),
        standby: standby.into(),
    }
}

pub fn unpaired(primary: &str, standby: &str, reason: UnpairedReason) -> Event {
    Event::PrimaryUnpaired {
        primary: primary.into(),
        standby: standby.into(),
        reason,
    }
}

pub fn mac_mismatch(primary: &str, pmac: [u8; 6], standby: &str, smac: [u8; 6]) -> Event {
    Event::MacMismatch {
        primary: primary.into(),
        primary_mac: MacAddress(pmac),
        standby: standby.into(),
        standby_mac: MacAddress(smac),
    }
}

pub fn negotiated(standby: &str) -> Event {
    Event::FailoverNegotiated {
        standby: standby.into(),
    }
}

pub fn missing(standby: &str) -> Event {
    Event::PrimaryMissing {
        standby: standby.into(),
    }
}

pub fn plugged(primary: &str) -> Event {
    Event::PrimaryPlugged {
        primary: primary.into(),
    }
}

pub fn unplug_primary(primary: &str) -> Event {
    Event::UnplugPrimary {
        primary: primary.into(),
    }
}

pub fn unplugged(primary: &str) -> Event {
    Event::PrimaryUnplugged {
        primary: primary.into(),
    }
}

pub fn unplug_cancelled(primary: &str) -> Event {
    Event::UnplugCancelled {
        primary: primary.into(),
    }
}

pub fn not_cancelled(primary: &str) -> Event {
    Event::UnplugNotCancelled {
        primary: primary.into(),
    }
}

pub fn link_down(primary: &str) -> Event {
    Event::PrimaryLinkDown {
        primary: primary.into(),
    }
}

pub fn link_up(primary: &str) -> Event {
    Event::PrimaryLinkUp {
        primary: primary.into(),
    }
}

pub fn switched(standby: &str, primary: &str, traffic_seen: bool) -> Event {
    Event::SwitchedToStandby {
        standby: standby.into(),
        primary: primary.into(),
        traffic_seen,
    }
}

pub fn migration(status: MigrationState) -> Event {
    Event::Migration {
        status,
        reason: None,
    }
}

/// The timestamp of the first `event` in `log`.
pub fn at(log: &EventLog, event: &Event) -> Duration {
    log.find(event)
        .unwrap_or_else(|| panic!("{event:?} not in {:#?}", log.kinds()))
        .timestamp
}
