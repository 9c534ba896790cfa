//! One VMM model: guest memory, a PCI segment with two PCIe root ports, the
//! virtio-net standby (offering STANDBY) cold-plugged behind the first, the
//! primary stand-in (a virtio-net function without STANDBY, same MAC) that the
//! coordinator hot-plugs behind the second, the host network, and the VMM's
//! event loop on the guest's virtual clock.
//!
//! The guest is the scripted Linux-like guest of `test-guest`: its PCI
//! enumeration, `virtio_pci`, pciehp and `net_failover`, and the ping program
//! of [`crate::app`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_state::{Persist, from_bytes, to_bytes};
use failover::{Coordinator, EventLog, Primary, PrimaryLink, Slot, Standby};
use pcie_hotplug::{HotplugSlot, RootPort, RootPortBuilder, RootPortState};
use test_guest::{Guest, GuestRam, IrqQueue, NetFailover, Pciehp, Slave, Timings, VirtualClock};
use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::testing::{GuestMem, TestMemory};
use virtio_net_standby::{Features, NetBackend, NetState, StandbyNet, StandbyNetBuilder, Tap};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice, VirtioPciState};
use vmm_pci::{PciHandle, PciRoot};

use crate::app::Ping;
use crate::out::Out;
use crate::topology::Topology;
use crate::wire::Wire;

/// Guest RAM.
pub const RAM_SIZE: u64 = 8 << 20;
/// Where the guest's drivers put rings and buffers.
const DRIVER_MEMORY: (u64, u64) = (1 << 20, RAM_SIZE);
/// The ping's cadence.
pub const PING_INTERVAL: Duration = Duration::from_millis(10);

/// The network device type: over the demo's wire, or a tap.
pub type Net = StandbyNet<GuestMem, Box<dyn NetBackend>>;
/// A virtio-net PCI function.
pub type NetFn = VirtioPciDevice<GuestMem, Net>;

/// The make-before-break switch of the stand-in: its LINK_UP bit, which the
/// device reports to the guest with a config interrupt; with `--tap`, its tap
/// too (the bridge forgets the port).
struct StandInLink(Arc<Mutex<NetFn>>, bool);

impl PrimaryLink for StandInLink {
    fn set_link(&self, up: bool) -> io::Result<()> {
        {
            let f = self.0.lock().unwrap_or_else(|e| e.into_inner());
            f.device().set_link_up(up);
        }
        if self.1 {
            crate::host::set_port(crate::host::PRIMARY_TAP, up)?;
        }
        Ok(())
    }
}

/// The guest's RAM, for the guest's own drivers.
pub struct Ram(pub TestMemory);

impl GuestRam for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.read(gpa, buf.len()));
    }
    fn write(&self, gpa: u64, data: &[u8]) {
        self.0.write(gpa, data);
    }
}

/// How to build a side.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Take the primary's link down before its unplug.
    pub make_before_break: bool,
    /// Migration removes the primary by surprise instead of through the
    /// guest's attention-button path.
    pub surprise: bool,
    /// Real taps on a bridge in a network namespace of this process's own,
    /// instead of the in-process wire (see [`crate::host`]).
    pub tap: bool,
    /// The standby offers this many fewer feature bits (a destination whose
    /// device is older): `Some(mask)` clears `mask` from the offer.
    pub withhold_features: Option<u64>,
}

/// The guest as it runs: the scripted kernel, its failover master and its
/// program.
pub struct GuestSide {
    /// The kernel.
    pub kernel: Guest,
    /// `net_failover`.
    pub nf: NetFailover,
    /// The ping.
    pub app: Ping,
}

/// What crosses the socket in a migration.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// The standby's transport and device (device-state wire form).
    pub standby: Vec<u8>,
    /// The standby's port.
    pub standby_port: Vec<u8>,
    /// The primary's port (empty slot: the primary is out).
    pub primary_port: Vec<u8>,
    /// The guest: its kernel's state (JSON), failover master and program.
    pub kernel: serde_json::Value,
    /// `net_failover`.
    pub nf: NetFailover,
    /// The ping.
    pub app: Ping,
}

/// One VMM.
pub struct Vm {
    /// Guest time.
    pub clock: VirtualClock,
    /// Guest RAM.
    pub ram: Ram,
    /// The PCI segment.
    pub root: Arc<PciRoot>,
    /// The guest's interrupt controller.
    pub irqs: Arc<IrqQueue>,
    /// The standby function.
    pub standby: Arc<Mutex<NetFn>>,
    /// The primary stand-in function.
    pub primary: Arc<Mutex<NetFn>>,
    /// The standby's root port (00:01.0).
    pub standby_port: Arc<Mutex<RootPort>>,
    /// The primary's root port (00:02.0).
    pub primary_port: Arc<Mutex<RootPort>>,
    /// The host network.
    pub wire: Wire,
    /// The coordinator.
    pub coord: Coordinator,
    /// Every event it emitted.
    pub events: EventLog,
    /// The printer.
    pub out: Out,
    /// The guest's MAC (the standby's).
    pub mac: [u8; 6],
    /// The standby's id.
    pub standby_id: String,
    /// With `--tap`: the host on the bridge.
    pub responder: Option<crate::host::Responder>,
    woken: Arc<AtomicBool>,
    standby_tx: u64,
    nf_printed: usize,
}

fn net_fn(
    id: &str,
    mac: [u8; 6],
    standby: bool,
    withhold: u64,
    backend: Box<dyn NetBackend>,
    mem: &TestMemory,
    irqs: &Arc<IrqQueue>,
) -> Arc<Mutex<NetFn>> {
    // The builder still drops what the backend cannot carry.
    let offer = Features::from_bits(DEFAULT_OFFER.bits() & !withhold);
    let net: Net = StandbyNetBuilder::new()
        .id(id)
        .mac(mac)
        .standby(standby)
        .features(offer)
        .build(vec![backend])
        .expect("the demo's device configuration is valid");
    let f = VirtioPciBuilder::new()
        .id(id)
        .build(net, mem.atomic(), irqs.clone())
        .expect("the demo's transport configuration is valid");
    Arc::new(Mutex::new(f))
}

impl Vm {
    /// Builds the machine and registers the pair with the coordinator;
    /// `out` prints every event as it is delivered.
    pub fn new(spec: Spec, topo: &Topology, out: Out) -> Result<Vm, String> {
        let clock = VirtualClock::new();
        let mem = TestMemory::new(RAM_SIZE);
        let irqs = IrqQueue::new();
        let wire = Wire::new(topo.standby_mac);
        let events = EventLog::new();
        let woken = Arc::new(AtomicBool::new(false));
        let (w, c) = (woken.clone(), clock.clone());
        let coord = Coordinator::builder()
            .clock(move || c.now())
            .listener(Arc::new(events.clone()))
            .listener(out.listener())
            .waker(move || w.store(true, Ordering::SeqCst))
            .build();
        let withhold = spec.withhold_features.unwrap_or(0);
        let backend = |port: Slave| -> Result<Box<dyn NetBackend>, String> {
            if !spec.tap {
                return Ok(Box::new(wire.backend(port)));
            }
            let name = match port {
                Slave::Standby => crate::host::STANDBY_TAP,
                Slave::Primary => crate::host::PRIMARY_TAP,
            };
            let tap = Tap::open(name).map_err(|e| format!("cannot open tap {name}: {e}"))?;
            Ok(Box::new(tap))
        };
        let standby = net_fn(
            &topo.standby_id,
            topo.standby_mac,
            true,
            withhold,
            backend(Slave::Standby)?,
            &mem,
            &irqs,
        );
        let primary = net_fn(
            &topo.primary_id,
            topo.primary_mac,
            false,
            0,
            backend(Slave::Primary)?,
            &mem,
            &irqs,
        );
        let responder = if spec.tap {
            for name in [crate::host::STANDBY_TAP, crate::host::PRIMARY_TAP] {
                crate::host::attach(name).map_err(|e| format!("tap {name}: {e}"))?;
            }
            Some(
                crate::host::Responder::open(topo.standby_mac)
                    .map_err(|e| format!("the host's packet socket: {e}"))?,
            )
        } else {
            None
        };
        standby
            .lock()
            .unwrap()
            .add_features_listener(Arc::new(coord.clone()));
        let port = |name: &str, slot: u16| {
            Arc::new(Mutex::new(
                RootPortBuilder::new(name, slot)
                    .port_number(slot as u8)
                    .surprise(spec.surprise)
                    .clock(clock.now_fn())
                    .build(irqs.clone()),
            ))
        };
        let standby_port = port(&topo.standby_slot, 1);
        let primary_port = port(&topo.primary_slot, 2);
        let mut root = PciRoot::new();
        root.add(1, 0, standby_port.clone())
            .expect("slot 1 is free");
        root.add(2, 0, primary_port.clone())
            .expect("slot 2 is free");
        let offered = standby.lock().unwrap().device().offered_features().bits();
        coord
            .add_standby(
                Standby::new(topo.standby_id.clone())
                    .mac(topo.standby_mac)
                    .offered_features(offered),
            )
            .expect("the standby registers");
        let handle: PciHandle = primary.clone();
        let mut p = Primary::new(
            topo.primary_id.clone(),
            topo.standby_id.clone(),
            handle,
            Slot::port(topo.primary_slot.clone(), &primary_port).surprise(spec.surprise),
        )
        .mac(topo.primary_mac);
        if spec.make_before_break {
            p = p.link(Arc::new(StandInLink(primary.clone(), spec.tap)));
        }
        coord.add_primary(p).expect("the primary registers");
        Ok(Vm {
            clock,
            ram: Ram(mem),
            root: Arc::new(root),
            irqs,
            standby,
            primary,
            standby_port,
            primary_port,
            wire,
            coord,
            events,
            out,
            mac: topo.standby_mac,
            standby_id: topo.standby_id.clone(),
            woken,
            standby_tx: 0,
            nf_printed: 0,
            responder,
        })
    }

    /// Power on: the standby is cold-plugged, the machine is ready (the
    /// coordinator plugs nothing until the guest acknowledges STANDBY).
    pub fn power_on(&self) {
        let handle: PciHandle = self.standby.clone();
        self.standby_port
            .lock()
            .unwrap()
            .cold_plug(handle)
            .expect("the standby's slot is empty");
        self.coord.machine_ready();
    }

    /// Boots the scripted guest with a `net_failover` master for the pair and
    /// the ping program (stopped).
    pub fn boot(&mut self) -> GuestSide {
        let kernel = Guest::boot_with_clock(
            self.clock.clone(),
            self.root.clone(),
            self.irqs.clone(),
            Timings::default(),
            u64::MAX,
            DRIVER_MEMORY,
        );
        let mut g = GuestSide {
            kernel,
            nf: NetFailover::new(self.mac),
            app: Ping::new(self.mac, PING_INTERVAL),
        };
        self.step(&mut g);
        g
    }

    /// The guest's interrupts and threads, the VMM's deferred work, the
    /// guest's network and program, the devices' queues, until nothing
    /// changes at this instant.
    pub fn step(&mut self, g: &mut GuestSide) {
        for _ in 0..64 {
            let before = self.activity(g);
            g.kernel.service();
            if self.woken.swap(false, Ordering::SeqCst) {
                self.coord.run_deferred();
            }
            let env = &mut g.kernel.env;
            g.nf.sync(env, &self.ram);
            for (at, line) in &g.nf.log[self.nf_printed.min(g.nf.log.len())..] {
                self.out.guest(*at, line);
            }
            self.nf_printed = g.nf.log.len();
            g.app.receive(env, &self.ram, &mut g.nf);
            g.app.send_due(env, &self.ram, &mut g.nf);
            self.pump();
            if self.activity(g) == before {
                return;
            }
        }
    }

    fn activity(&self, g: &GuestSide) -> (usize, u64, usize, u64, u64) {
        let c = g.app.counters;
        (
            g.kernel.env.log.len(),
            g.kernel.hotplug.iter().map(|p| p.interrupts).sum(),
            g.nf.log.len(),
            c.replies[0] + c.replies[1] + c.sent[0] + c.sent[1],
            self.events.events().len() as u64,
        )
    }

    /// The devices' queues: what the guest sent goes to the host, what the
    /// host sent goes to the guest; the coordinator hears of the standby's
    /// traffic.
    fn pump(&mut self) {
        let present = self.primary_port.lock().unwrap().device().is_some();
        let link = self.primary.lock().unwrap().device().link_up();
        self.wire.set_port(Slave::Primary, present, link);
        self.wire.set_port(Slave::Standby, true, true);
        let mut fns = vec![&self.standby];
        if present {
            fns.push(&self.primary);
        }
        let mut sent = 0;
        for f in &fns {
            let f = f.lock().unwrap();
            let dev = f.device();
            if dev.is_active()
                && let Some(qp) = dev.queue_pair(0)
            {
                let before = qp.counters().tx_frames;
                qp.process_tx();
                sent += qp.counters().tx_frames - before;
            }
        }
        if let Some(r) = &mut self.responder {
            // The kernel answers within the write that carried the request;
            // a few milliseconds cover a softirq that runs late.
            r.respond(sent as usize, 5);
        }
        for f in &fns {
            let f = f.lock().unwrap();
            let dev = f.device();
            if dev.is_active()
                && let Some(qp) = dev.queue_pair(0)
            {
                qp.process_rx();
            }
        }
        let tx = self.standby.lock().unwrap().device().counters().tx_frames;
        if tx != self.standby_tx {
            self.standby_tx = tx;
            self.coord.standby_traffic(&self.standby_id);
        }
    }

    fn next_wake(&self, g: &GuestSide) -> Option<Duration> {
        g.kernel
            .hotplug
            .iter()
            .filter_map(Pciehp::next_wake)
            .chain(self.coord.deadline())
            .chain(g.app.next_wake())
            .min()
    }

    /// Runs guest and VMM until `done` holds (checked at every step) or `for_`
    /// of guest time passes; returns whether `done` held.
    pub fn run(
        &mut self,
        g: &mut GuestSide,
        for_: Duration,
        mut done: impl FnMut(&Vm, &GuestSide) -> bool,
    ) -> bool {
        let end = self.clock.now() + for_;
        loop {
            self.step(g);
            if self.coord.deadline().is_some_and(|d| d <= self.clock.now()) {
                self.coord.check_deadline();
                self.step(g);
            }
            if done(self, g) {
                return true;
            }
            match self.next_wake(g) {
                Some(t) if t <= end => self.clock.advance_to(t.max(self.clock.now())),
                _ if self.clock.now() >= end => return false,
                _ => self.clock.advance_to(end),
            }
        }
    }

    /// Stop and copy: what the destination needs, the guest included. The
    /// guest's interrupts are serviced first, so none is pending.
    pub fn save(&mut self, g: &mut GuestSide) -> Result<(Saved, Vec<u8>), String> {
        self.step(g);
        self.coord
            .ready_to_save()
            .map_err(|e| format!("not ready to save: {e}"))?;
        let standby = self
            .standby
            .lock()
            .unwrap()
            .save()
            .map_err(|e| format!("saving the standby: {e}"))?;
        let sp = self
            .standby_port
            .lock()
            .unwrap()
            .save()
            .map_err(|e| format!("saving the standby's port: {e}"))?;
        let pp = self
            .primary_port
            .lock()
            .unwrap()
            .save()
            .map_err(|e| format!("saving the primary's port: {e}"))?;
        let kernel =
            serde_json::to_value(&g.kernel).map_err(|e| format!("saving the guest: {e}"))?;
        let saved = Saved {
            standby: to_bytes(&standby),
            standby_port: to_bytes(&sp),
            primary_port: to_bytes(&pp),
            kernel,
            nf: g.nf.clone(),
            app: g.app.clone(),
        };
        Ok((saved, self.ram.0.read(0, RAM_SIZE as usize)))
    }

    /// The destination's half: RAM, then the standby (its transport raises
    /// the restored acknowledgement, and the coordinator negotiates
    /// failover), then the ports, then the guest resumes here.
    pub fn restore(&mut self, saved: Saved, ram: &[u8]) -> Result<GuestSide, String> {
        if ram.len() as u64 != RAM_SIZE {
            return Err(format!(
                "RAM image of {} bytes, expected {RAM_SIZE}",
                ram.len()
            ));
        }
        self.ram.0.write(0, ram);
        let mut kernel: Guest =
            serde_json::from_value(saved.kernel).map_err(|e| format!("the guest's state: {e}"))?;
        kernel.adopt_clock(self.clock.clone());
        kernel.resume_on(self.root.clone(), self.irqs.clone());
        let st: VirtioPciState<NetState> =
            from_bytes(&saved.standby).map_err(|e| format!("the standby's state: {e}"))?;
        self.standby
            .lock()
            .unwrap()
            .restore(&st)
            .map_err(|e| format!("restoring the standby: {e}"))?;
        let sp: RootPortState = from_bytes(&saved.standby_port)
            .map_err(|e| format!("the standby port's state: {e}"))?;
        let handle: PciHandle = self.standby.clone();
        self.standby_port
            .lock()
            .unwrap()
            .restore_with_device(&sp, Some(handle))
            .map_err(|e| format!("restoring the standby's port: {e}"))?;
        let pp: RootPortState = from_bytes(&saved.primary_port)
            .map_err(|e| format!("the primary port's state: {e}"))?;
        self.primary_port
            .lock()
            .unwrap()
            .restore_with_device(&pp, None)
            .map_err(|e| format!("restoring the primary's port: {e}"))?;
        self.nf_printed = saved.nf.log.len();
        Ok(GuestSide {
            kernel,
            nf: saved.nf,
            app: saved.app,
        })
    }
}
