//! The whole guest-visible topology moves to a destination.
//!
//! A scripted Linux-like guest enumerates two root ports, a virtio-net standby
//! behind one and a primary stand-in (a virtio-net function without STANDBY,
//! same MAC) behind the other, brings MSI-X up and runs traffic. The VMM saves
//! every device, builds the same topology from its configuration on a
//! destination, and restores. The guest goes on without re-enumerating: its
//! next TX and RX work through the rings it set up on the source, interrupts
//! arrive on the vectors it programmed, and the next hot-plug event on a
//! restored port runs to completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_state::{Persist, from_bytes, to_bytes};
use pcie_hotplug::{HotplugOutcome, HotplugSlot, RootPort, RootPortBuilder, RootPortState};
use test_guest::{Guest, IrqQueue, Timings, VirtioProbe};
use virtio_net_standby::testing::{DriverQueue, GuestMem, RecordingBackend, TestMemory, frame};
use virtio_net_standby::{
    FeaturesAcked, FeaturesListener, NetState, StandbyNet, StandbyNetBuilder,
};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice, VirtioPciState};
use vmm_pci::{Bdf, PciHandle, PciRoot};

type Net = StandbyNet<GuestMem, RecordingBackend>;
type Function = VirtioPciDevice<GuestMem, Net>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc];
const STANDBY_PORT: Bdf = Bdf::new(0, 1, 0);
const PRIMARY_PORT: Bdf = Bdf::new(0, 2, 0);
const STANDBY_FN: Bdf = Bdf::new(1, 0, 0);
const PRIMARY_FN: Bdf = Bdf::new(2, 0, 0);
/// The virtio-net header with MRG_RXBUF.
const HDR: usize = 12;

type Events = Arc<Mutex<Vec<FeaturesAcked>>>;

fn recorder() -> (Events, Arc<dyn FeaturesListener>) {
    let seen: Events = Arc::default();
    let s = seen.clone();
    (
        seen,
        Arc::new(move |e: &FeaturesAcked| s.lock().unwrap().push(e.clone())),
    )
}

/// One side's VMM, built from the same configuration on source and destination.
struct Vmm {
    root: Arc<PciRoot>,
    irqs: Arc<IrqQueue>,
    standby: Arc<Mutex<Function>>,
    primary: Arc<Mutex<Function>>,
    standby_port: Arc<Mutex<RootPort>>,
    primary_port: Arc<Mutex<RootPort>>,
    standby_wire: RecordingBackend,
    /// What the net device raised (the device route).
    device_acks: Events,
    /// What the standby's transport raised (the transport route).
    transport_acks: Events,
}

/// Builds the topology. The source cold-plugs its functions; a destination
/// attaches them when it restores the ports.
fn build(mem: &TestMemory, cold_plug: bool) -> Vmm {
    let irqs = IrqQueue::new();
    let standby_wire = RecordingBackend::default();
    let mut net: Net = StandbyNetBuilder::new()
        .id("net1")
        .mac(MAC)
        .build(vec![standby_wire.clone()])
        .unwrap();
    let (device_acks, l) = recorder();
    net.add_standby_listener(l);
    let mut standby = VirtioPciBuilder::new()
        .id("net1")
        .build(net, mem.atomic(), irqs.clone())
        .unwrap();
    let (transport_acks, l) = recorder();
    standby.add_features_listener(l);
    let primary_net: Net = StandbyNetBuilder::new()
        .id("hostdev0")
        .mac(MAC)
        .standby(false)
        .build(vec![RecordingBackend::default()])
        .unwrap();
    let primary = VirtioPciBuilder::new()
        .id("hostdev0")
        .build(primary_net, mem.atomic(), irqs.clone())
        .unwrap();
    let (standby, primary) = (Arc::new(Mutex::new(standby)), Arc::new(Mutex::new(primary)));
    let port = |name: &str, slot: u16| {
        Arc::new(Mutex::new(
            RootPortBuilder::new(name, slot)
                .port_number(slot as u8)
                .build(irqs.clone()),
        ))
    };
    let (standby_port, primary_port) = (port("rp-standby", 1), port("rp-primary", 2));
    if cold_plug {
        standby_port
            .lock()
            .unwrap()
            .cold_plug(standby.clone())
            .unwrap();
        primary_port
            .lock()
            .unwrap()
            .cold_plug(primary.clone())
            .unwrap();
    }
    let mut root = PciRoot::new();
    root.add(1, 0, standby_port.clone()).unwrap();
    root.add(2, 0, primary_port.clone()).unwrap();
    Vmm {
        root: Arc::new(root),
        irqs,
        standby,
        primary,
        standby_port,
        primary_port,
        standby_wire,
        device_acks,
        transport_acks,
    }
}

/// The guest's virtio_net driver for the standby's first queue pair, on the
/// rings its probe placed.
struct NetDriver {
    mem: TestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_bufs: HashMap<u16, u64>,
    probe: VirtioProbe,
}

impl NetDriver {
    fn new(g: &mut Guest, mem: &TestMemory) -> Self {
        let probe = g
            .env
            .virtio
            .iter()
            .find(|p| p.bdf == STANDBY_FN)
            .expect("standby probed")
            .clone();
        let mut queue = |q: u64| {
            let c = probe.common;
            g.env.mmio_write(c + 0x16, 2, q);
            let size = g.env.mmio_read(c + 0x18, 2) as u16;
            let (desc, avail, used) = (
                g.env.mmio_read(c + 0x20, 8),
                g.env.mmio_read(c + 0x28, 8),
                g.env.mmio_read(c + 0x30, 8),
            );
            let mut dq = DriverQueue::at(mem, size, desc, avail, used);
            dq.set_event_idx(probe.features & 1 << 29 != 0);
            dq
        };
        let (rx, tx) = (queue(0), queue(1));
        NetDriver {
            mem: mem.clone(),
            rx,
            tx,
            rx_bufs: HashMap::new(),
            probe,
        }
    }

    fn post_rx(&mut self, g: &mut Guest, n: usize) {
        for _ in 0..n {
            let addr = self.mem.alloc(2048, 64);
            let head = self.rx.add_writable(&[addr], &[2048]);
            self.rx_bufs.insert(head, addr);
        }
        self.rx.publish();
        g.env.mmio_write(self.probe.notify[0], 2, 0);
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        let (head, len) = self.rx.pop_used()?;
        let frame = self.mem.read(self.rx_bufs[&head], len as usize);
        assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 1, "one buffer");
        Some(frame[HDR..].to_vec())
    }

    fn send(&mut self, g: &mut Guest, f: &[u8]) {
        let mut bytes = vec![0u8; HDR];
        bytes.extend_from_slice(f);
        let addr = self.mem.alloc(bytes.len() as u64, 64);
        self.mem.write(addr, &bytes);
        self.tx.add_readable(&[addr], &[bytes.len() as u32]);
        self.tx.publish();
        g.env.mmio_write(self.probe.notify[1], 2, 1);
    }

    /// The MSI data value of queue `q`'s vector.
    fn vector(&self, q: usize) -> u32 {
        self.probe.vectors[q + 1]
    }
}

/// The VMM side of one RX frame and one TX frame (no worker thread: the test
/// is the event loop).
fn rx_frame(v: &Vmm, payload: u8) -> Vec<u8> {
    let f = frame(MAC, &[payload; 60]);
    let mut wire = vec![0u8; HDR];
    wire.extend_from_slice(&f);
    v.standby_wire.incoming.lock().unwrap().push_back(wire);
    let s = v.standby.lock().unwrap();
    s.device().queue_pair(0).unwrap().process_rx();
    f
}

fn process_tx(v: &Vmm) {
    let s = v.standby.lock().unwrap();
    s.device().queue_pair(0).unwrap().process_tx();
}

fn sent(v: &Vmm) -> Vec<Vec<u8>> {
    v.standby_wire.log.lock().unwrap().sent.clone()
}

/// Every config dword of `bdf` as the guest reads it through ECAM.
fn config_dump(root: &PciRoot, bdf: Bdf) -> Vec<u8> {
    let mut out = Vec::new();
    for off in (0..0x1000u16).step_by(4) {
        let mut b = [0u8; 4];
        root.ecam_read(vmm_pci::ecam_offset(bdf, off), &mut b);
        out.extend_from_slice(&b);
    }
    out
}

struct Saved {
    standby: Vec<u8>,
    primary: Vec<u8>,
    standby_port: Vec<u8>,
    primary_port: Vec<u8>,
}

fn save(v: &Vmm) -> Saved {
    Saved {
        standby: to_bytes(&v.standby.lock().unwrap().save().unwrap()),
        primary: to_bytes(&v.primary.lock().unwrap().save().unwrap()),
        standby_port: to_bytes(&v.standby_port.lock().unwrap().save().unwrap()),
        primary_port: to_bytes(&v.primary_port.lock().unwrap().save().unwrap()),
    }
}

fn restore(v: &Vmm, s: &Saved) {
    let function: VirtioPciState<NetState> = from_bytes(&s.standby).unwrap();
    v.standby.lock().unwrap().restore(&function).unwrap();
    let function: VirtioPciState<NetState> = from_bytes(&s.primary).unwrap();
    v.primary.lock().unwrap().restore(&function).unwrap();
    let port: RootPortState = from_bytes(&s.standby_port).unwrap();
    let behind: PciHandle = v.standby.clone();
    v.standby_port
        .lock()
        .unwrap()
        .restore_with_device(&port, Some(behind))
        .unwrap();
    let port: RootPortState = from_bytes(&s.primary_port).unwrap();
    let behind: PciHandle = v.primary.clone();
    v.primary_port
        .lock()
        .unwrap()
        .restore_with_device(&port, Some(behind))
        .unwrap();
}

#[test]
fn the_whole_topology_moves_and_the_guest_goes_on() {
    // Guest memory is the VMM's to migrate; both sides map the same bytes.
    let mem = TestMemory::new(4 << 20);
    let src = build(&mem, true);
    let mut g = Guest::boot(
        src.root.clone(),
        src.irqs.clone(),
        Timings::default(),
        u64::MAX,
        (0x10_0000, 0x20_0000),
    );
    assert!(g.env.bound.contains(&STANDBY_FN) && g.env.bound.contains(&PRIMARY_FN));
    assert_eq!(src.device_acks.lock().unwrap().len(), 1);
    assert_eq!(src.transport_acks.lock().unwrap().len(), 1);

    // Traffic on the source.
    let mut d = NetDriver::new(&mut g, &mem);
    d.post_rx(&mut g, 8);
    for i in 0..3 {
        let f = rx_frame(&src, i);
        assert_eq!(d.recv().unwrap(), f);
        let out = frame([2, 0, 0, 0, 0, 1], &[0x40 + i; 50]);
        d.send(&mut g, &out);
        process_tx(&src);
        assert_eq!(sent(&src).last().unwrap()[HDR..], out);
    }
    g.service();
    assert!(g.env.other_irqs.contains(&d.vector(0)), "RX interrupts");

    // Source: everything stopped, everything saved.
    let saved = save(&src);
    let source_view = (
        config_dump(&src.root, STANDBY_PORT),
        config_dump(&src.root, STANDBY_FN),
        config_dump(&src.root, PRIMARY_PORT),
        config_dump(&src.root, PRIMARY_FN),
    );
    let source_standby = src.standby.lock().unwrap().save().unwrap();

    // Destination: the same topology from configuration, then the states.
    let dst = build(&mem, false);
    restore(&dst, &saved);
    // The negotiation is announced once through each route, as restored.
    for events in [&dst.device_acks, &dst.transport_acks] {
        let e = events.lock().unwrap();
        assert_eq!(e.len(), 1);
        assert!(e[0].restored && e[0].device_id == "net1" && e[0].has(62));
    }
    assert_eq!(dst.standby.lock().unwrap().save().unwrap(), source_standby);
    let destination_view = (
        config_dump(&dst.root, STANDBY_PORT),
        config_dump(&dst.root, STANDBY_FN),
        config_dump(&dst.root, PRIMARY_PORT),
        config_dump(&dst.root, PRIMARY_FN),
    );
    assert!(
        destination_view == source_view,
        "the guest reads the same config space on both sides"
    );

    // The guest resumes on the destination without re-enumerating.
    g.resume_on(dst.root.clone(), dst.irqs.clone());
    g.env.other_irqs.clear();
    let before_sent = sent(&src).len();
    // RX: the next frame lands in the next buffer the guest posted.
    let f = rx_frame(&dst, 9);
    assert_eq!(d.recv().unwrap(), f);
    g.service();
    assert!(
        g.env.other_irqs.contains(&d.vector(0)),
        "the RX interrupt arrives on the vector the guest programmed"
    );
    // TX: the notification reaches the destination's eventfd, the frame its wire.
    let out = frame([2, 0, 0, 0, 0, 1], &[0x77; 50]);
    d.send(&mut g, &out);
    assert_eq!(
        dst.standby
            .lock()
            .unwrap()
            .queue_eventfd(1)
            .unwrap()
            .read()
            .unwrap(),
        1
    );
    process_tx(&dst);
    assert_eq!(sent(&dst).len(), 1);
    assert_eq!(sent(&dst)[0][HDR..], out);
    assert_eq!(sent(&src).len(), before_sent, "nothing left on the source");
    // More posted buffers and frames keep flowing.
    d.post_rx(&mut g, 4);
    for i in 10..16 {
        let f = rx_frame(&dst, i);
        assert_eq!(d.recv().unwrap(), f);
    }

    // The next hot-plug event on a restored port: the primary leaves for the
    // next migration, the guest's pciehp does its part, and it comes back.
    let c = dst.primary_port.lock().unwrap().request_unplug().unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    assert!(!g.env.bound.contains(&PRIMARY_FN));
    let c = dst
        .primary_port
        .lock()
        .unwrap()
        .plug(dst.primary.clone())
        .unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    assert!(g.env.bound.contains(&PRIMARY_FN));
}

#[test]
fn a_port_with_a_plug_in_flight_refuses_to_save_and_says_why() {
    let mem = TestMemory::new(4 << 20);
    let src = build(&mem, true);
    let mut g = Guest::boot(
        src.root.clone(),
        src.irqs.clone(),
        Timings::default(),
        u64::MAX,
        (0x10_0000, 0x20_0000),
    );
    let c = src.primary_port.lock().unwrap().request_unplug().unwrap();
    let e = src.primary_port.lock().unwrap().save().unwrap_err();
    assert!(matches!(e, device_state::Error::Busy(_)), "{e}");
    assert!(e.to_string().contains("rp-primary"), "{e}");
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    src.primary_port.lock().unwrap().save().unwrap();
}
