//! The guest's network: a virtio-net driver on the probed rings, and
//! `net_failover`'s choice of transmit path, against the real standby device
//! behind the real virtio-pci transport.
//!
//! The standby (STANDBY offered) sits behind one root port and a stand-in
//! primary (virtio-net without STANDBY, same MAC) behind another, both
//! cold-plugged. The guest sends on the primary while it has carrier, moves to
//! the standby when the primary's link goes down (a config interrupt), and
//! back when it comes up; frames from the host arrive on either.

use std::sync::{Arc, Mutex};

use pcie_hotplug::{HotplugSlot, RootPort, RootPortBuilder};
use test_guest::{Guest, GuestRam, IrqQueue, NetFailover, Slave, Timings, VirtualClock};
use virtio_net_standby::testing::{GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};
use vmm_pci::{PciHandle, PciRoot};

type Net = StandbyNet<GuestMem, RecordingBackend>;
type Function = VirtioPciDevice<GuestMem, Net>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc];
const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

struct Ram(TestMemory);

impl GuestRam for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.read(gpa, buf.len()));
    }
    fn write(&self, gpa: u64, data: &[u8]) {
        self.0.write(gpa, data);
    }
}

fn function(
    id: &str,
    standby: bool,
    mem: &TestMemory,
    irqs: &Arc<IrqQueue>,
) -> Arc<Mutex<Function>> {
    let net: Net = StandbyNetBuilder::new()
        .id(id)
        .mac(MAC)
        .standby(standby)
        .build(vec![RecordingBackend::default()])
        .unwrap();
    let f = VirtioPciBuilder::new()
        .id(id)
        .build(net, mem.atomic(), irqs.clone())
        .unwrap();
    Arc::new(Mutex::new(f))
}

fn port(
    name: &str,
    slot: u16,
    dev: &Arc<Mutex<Function>>,
    irqs: &Arc<IrqQueue>,
) -> Arc<Mutex<RootPort>> {
    let p = Arc::new(Mutex::new(
        RootPortBuilder::new(name, slot)
            .port_number(slot as u8)
            .build(irqs.clone()),
    ));
    let h: PciHandle = dev.clone();
    p.lock().unwrap().cold_plug(h).unwrap();
    p
}

fn eth(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5, tag, 1, 2, 3]);
    f
}

/// What the device sent to its backend, without the virtio-net header.
fn sent(f: &Arc<Mutex<Function>>) -> Vec<Vec<u8>> {
    let g = f.lock().unwrap();
    let dev = g.device();
    let qp = dev.queue_pair(0).unwrap();
    qp.process_tx();
    let log = qp.lock().backend().log.clone();
    let frames = log.lock().unwrap().sent.drain(..).collect::<Vec<_>>();
    frames.into_iter().map(|f| f[12..].to_vec()).collect()
}

/// Queues `frame` at the device's backend and lets the device deliver.
fn inject(f: &Arc<Mutex<Function>>, frame: Vec<u8>) {
    let g = f.lock().unwrap();
    let qp = g.device().queue_pair(0).unwrap();
    let mut with_hdr = vec![0u8; 12];
    with_hdr.extend(frame);
    let incoming = qp.lock().backend().incoming.clone();
    incoming.lock().unwrap().push_back(with_hdr);
    qp.process_rx();
}

#[test]
fn net_failover_follows_the_primary_carrier_and_receives_on_both() {
    let mem = TestMemory::new(8 << 20);
    let ram = Ram(mem.clone());
    let irqs = IrqQueue::new();
    let standby = function("net1", true, &mem, &irqs);
    let primary = function("hostdev0", false, &mem, &irqs);
    let mut root = PciRoot::new();
    root.add(1, 0, port("rp1", 1, &standby, &irqs)).unwrap();
    root.add(2, 0, port("rp2", 2, &primary, &irqs)).unwrap();
    let mut g = Guest::boot_with_clock(
        VirtualClock::new(),
        Arc::new(root),
        irqs.clone(),
        Timings::default(),
        u64::MAX,
        (1 << 20, 8 << 20),
    );
    let mut nf = NetFailover::new(MAC);
    nf.sync(&mut g.env, &ram);
    assert!(
        nf.standby
            .as_ref()
            .is_some_and(|s| s.features & (1 << 62) != 0)
    );
    assert!(nf.primary.as_ref().is_some_and(|p| p.carrier));
    assert_eq!(nf.tx_path(), Some(Slave::Primary));

    let f1 = eth(HOST, MAC, 1);
    assert_eq!(nf.send(&mut g.env, &ram, &f1), Some(Slave::Primary));
    assert_eq!(sent(&primary), vec![f1]);
    assert!(sent(&standby).is_empty());

    // The primary's link goes down: a config interrupt, the guest re-reads
    // the status, net_failover moves to the standby.
    primary.lock().unwrap().device().set_link_up(false);
    g.service();
    nf.sync(&mut g.env, &ram);
    assert!(!nf.primary.as_ref().unwrap().carrier);
    assert_eq!(nf.tx_path(), Some(Slave::Standby));
    let f2 = eth(HOST, MAC, 2);
    assert_eq!(nf.send(&mut g.env, &ram, &f2), Some(Slave::Standby));
    assert_eq!(sent(&standby), vec![f2]);
    assert!(sent(&primary).is_empty());
    assert!(
        nf.log.iter().any(|(_, l)| l.contains("carrier off")),
        "{:?}",
        nf.log
    );

    // A host frame arrives on the standby; the primary, link down, drops
    // what reaches it (as a NIC without link does).
    inject(&standby, eth(MAC, HOST, 3));
    inject(&primary, eth(MAC, HOST, 4));
    assert_eq!(
        nf.recv(&mut g.env, &ram),
        vec![(Slave::Standby, eth(MAC, HOST, 3))]
    );

    // Link back up: back to the primary, which delivers again.
    primary.lock().unwrap().device().set_link_up(true);
    g.service();
    nf.sync(&mut g.env, &ram);
    assert_eq!(nf.tx_path(), Some(Slave::Primary));
    inject(&primary, eth(MAC, HOST, 5));
    assert_eq!(
        nf.recv(&mut g.env, &ram),
        vec![(Slave::Primary, eth(MAC, HOST, 5))]
    );
    assert_eq!(nf.primary.as_ref().unwrap().tx_frames, 1);
    assert_eq!(nf.standby.as_ref().unwrap().tx_frames, 1);
}

#[cfg(feature = "serde")]
#[test]
fn a_saved_guest_round_trips_through_json() {
    let irqs = IrqQueue::new();
    let mem = TestMemory::new(8 << 20);
    let standby = function("net1", true, &mem, &irqs);
    let mut root = PciRoot::new();
    root.add(1, 0, port("rp1", 1, &standby, &irqs)).unwrap();
    let root = Arc::new(root);
    let clock = VirtualClock::new();
    clock.sleep(std::time::Duration::from_millis(1234));
    let g = Guest::boot_with_clock(
        clock,
        root.clone(),
        irqs.clone(),
        Timings::default(),
        u64::MAX,
        (1 << 20, 8 << 20),
    );
    let json = serde_json::to_string(&g).unwrap();
    let mut back: Guest = serde_json::from_str(&json).unwrap();
    let dest_clock = VirtualClock::new();
    back.adopt_clock(dest_clock.clone());
    back.resume_on(root, irqs);
    assert_eq!(dest_clock.now(), std::time::Duration::from_millis(1234));
    assert_eq!(back.env.bound, g.env.bound);
    assert_eq!(back.env.virtio, g.env.virtio);
    assert_eq!(back.env.enumerator.found, g.env.enumerator.found);
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
}
