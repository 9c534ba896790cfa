//! A hostile guest: a seeded random driver writes garbage into descriptor
//! tables, ring indices, suppression fields and control commands, between
//! processing calls, snapshots and resets. The device must never panic, never
//! loop forever, and never break its own ring invariants: it returns at most what
//! the driver made available, never moves the used index backwards, and either
//! keeps serving or flags NEEDS_RESET.

use virtio_net_standby::features::{DEFAULT_OFFER, Features, prune};
use virtio_net_standby::testing::{GuestDriver, GuestMem, Rng, TestMemory, pair_send};
use virtio_net_standby::{
    NetState, PairBackend, PairConfig, StandbyNet, StandbyNetBuilder, VirtioDevice, pair,
};
use virtio_queue::QueueT;

const MEM: u64 = 4 << 20;
const QSIZE: u16 = 16;

/// An address: usually inside guest memory, sometimes at its edge, sometimes far
/// outside.
fn addr(r: &mut Rng) -> u64 {
    match r.below(10) {
        0 => u64::MAX - r.below(64),
        1 => MEM - r.below(64),
        2 => r.next_u64(),
        _ => r.below(MEM),
    }
}

fn len(r: &mut Rng) -> u32 {
    match r.below(10) {
        0 => u32::MAX - r.below(16) as u32,
        1 => 70_000 + r.below(100_000) as u32,
        2 => 0,
        _ => r.below(4096) as u32,
    }
}

struct Guest {
    dev: StandbyNet<GuestMem, PairBackend>,
    peer: PairBackend,
    g: GuestDriver,
    mem: TestMemory,
}

fn bring_up(r: &mut Rng) -> Option<Guest> {
    let (end, peer) = pair(PairConfig::default()).unwrap();
    let mut dev: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .queue_size(QSIZE)
        .build(vec![end])
        .unwrap();
    let mem = TestMemory::new(MEM);
    // A random but acceptable subset of the offer.
    let features = prune(Features::from_bits(DEFAULT_OFFER.bits() & r.next_u64()))
        .with(virtio_net_standby::features::F_VERSION_1);
    let g = GuestDriver::bring_up(&mut dev, &mem, features, QSIZE).ok()?;
    Some(Guest { dev, peer, g, mem })
}

/// Rings of every queue: (descriptor table, avail ring, used ring).
fn ring_areas(g: &GuestDriver) -> Vec<(u64, u64, u64)> {
    g.rx.iter()
        .chain(g.tx.iter())
        .chain(g.ctrl.iter())
        .map(|q| {
            let q = q.queue();
            (q.desc_table(), q.avail_ring(), q.used_ring())
        })
        .collect()
}

fn scribble(r: &mut Rng, s: &mut Guest) {
    let areas = ring_areas(&s.g);
    let (desc, avail, _used) = areas[r.below(areas.len() as u64) as usize];
    match r.below(8) {
        // A random descriptor.
        0..=2 => {
            let i = r.below(u64::from(QSIZE));
            let flags = (r.below(8)) as u16;
            let next = if r.chance(80) {
                r.below(u64::from(QSIZE))
            } else {
                r.next_u64()
            } as u16;
            s.mem
                .write_descriptor(desc + 16 * i, addr(r), len(r), flags, next);
        }
        // A random avail entry, published with a random step.
        3 | 4 => {
            let idx = u16::from_le_bytes(s.mem.read(avail + 2, 2).try_into().unwrap());
            let head = if r.chance(85) {
                r.below(u64::from(QSIZE))
            } else {
                r.next_u64()
            } as u16;
            s.mem
                .write(avail + 4 + 2 * u64::from(idx % QSIZE), &head.to_le_bytes());
            let step = match r.below(20) {
                0 => r.next_u64() as u16,
                1 => 0,
                _ => 1 + r.below(3) as u16,
            };
            s.mem
                .write(avail + 2, &idx.wrapping_add(step).to_le_bytes());
        }
        // Suppression fields.
        5 => {
            s.mem.write(avail, &(r.below(4) as u16).to_le_bytes());
            s.mem.write(
                avail + 4 + 2 * u64::from(QSIZE),
                &(r.next_u64() as u16).to_le_bytes(),
            );
        }
        // Random bytes over a whole descriptor: indirect tables included.
        6 => {
            let i = r.below(u64::from(QSIZE));
            let table = r.below(MEM / 2) & !15;
            let n = 1 + r.below(20);
            for k in 0..n {
                let next = r.below(n + 2) as u16;
                s.mem
                    .write_descriptor(table + 16 * k, addr(r), len(r), r.below(8) as u16, next);
            }
            s.mem.write_descriptor(
                desc + 16 * i,
                table,
                (16 * n) as u32 + if r.chance(10) { 8 } else { 0 },
                4,
                0,
            );
        }
        // Raw noise anywhere in a ring.
        _ => {
            let at = [desc, avail][r.below(2) as usize] + r.below(64);
            let noise: Vec<u8> = (0..1 + r.below(16)).map(|_| r.next_u64() as u8).collect();
            s.mem.write(at, &noise);
        }
    }
}

/// `(next_avail, next_used)` of the RX and TX queues, as the device sees them.
/// (The guest's own copy of the used index is no witness: a hostile guest may
/// point receive buffers at its own used ring.)
fn positions(s: &Guest) -> Vec<(u16, u16)> {
    match s.dev.queue_pair(0).unwrap().lock().queue_states() {
        Some((rx, tx)) => vec![(rx.next_avail, rx.next_used), (tx.next_avail, tx.next_used)],
        None => vec![],
    }
}

#[test]
fn random_rings_never_break_the_device() {
    let rounds: u64 = std::env::var("HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut needs_reset_seen = 0;
    let mut processed = 0u64;
    for seed in 0..rounds {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let Some(mut s) = bring_up(&mut r) else {
            continue;
        };
        for _ in 0..150 {
            match r.below(10) {
                0..=4 => scribble(&mut r, &mut s),
                5 => {
                    let n = 14 + r.below(3000) as usize;
                    let mut f: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
                    f[12] = 0x52; // mostly unicast-to-us, sometimes not
                    let _ = pair_send(&mut s.peer, &f);
                }
                6 => {
                    // Legitimate buffers too, so the paths past validation run.
                    if s.g.rx[0].free_descriptors() > 0 && r.chance(50) {
                        s.g.post_rx(0, 1);
                    }
                    if s.g.tx[0].free_descriptors() > 0 {
                        let f = vec![r.next_u64() as u8; 12 + r.below(1500) as usize];
                        s.g.queue_tx(0, &f);
                        s.g.tx[0].publish();
                    }
                }
                7 => {
                    if r.chance(20) {
                        // Snapshot, corrupt maybe, restore into a fresh device.
                        let mut bytes = s.dev.snapshot().to_bytes();
                        if r.chance(50) && !bytes.is_empty() {
                            let i = r.below(bytes.len() as u64) as usize;
                            bytes[i] ^= 1 << r.below(8);
                        }
                        if let Ok(state) = NetState::from_bytes(&bytes) {
                            let (end, _peer) = pair(PairConfig::default()).unwrap();
                            let mut d: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
                                .queue_size(QSIZE)
                                .build(vec![end])
                                .unwrap();
                            let _ = d.restore(&state);
                        }
                    } else if r.chance(10) {
                        s.dev.reset();
                        match bring_up(&mut r) {
                            Some(n) => s = n,
                            None => break,
                        }
                    }
                }
                _ => {
                    let before = positions(&s);
                    s.dev.queue_pair(0).unwrap().process_tx();
                    s.dev.queue_pair(0).unwrap().process_rx();
                    s.dev.process_ctrl();
                    processed += 1;
                    let after = positions(&s);
                    for ((ba, bu), (aa, au)) in before.iter().zip(&after) {
                        // Indices only move forward, by a bounded amount per call,
                        // and the device never returns more buffers than it took.
                        assert!(
                            aa.wrapping_sub(*ba) <= 2048,
                            "seed {seed}: avail {ba} -> {aa}"
                        );
                        assert!(
                            au.wrapping_sub(*bu) <= 2048,
                            "seed {seed}: used {bu} -> {au}"
                        );
                        assert!(
                            aa.wrapping_sub(*au) <= 2048,
                            "seed {seed}: used {au} passed avail {aa}"
                        );
                    }
                    // Drain what came back so descriptors are reusable.
                    for q in s.g.tx.iter_mut().chain(s.g.ctrl.iter_mut()) {
                        while q.pop_used().is_some() {}
                    }
                    while s.g.rx[0].pop_used().is_some() {}
                }
            }
            if s.dev.needs_reset() {
                needs_reset_seen += 1;
                s.dev.reset();
                match bring_up(&mut r) {
                    Some(n) => s = n,
                    None => break,
                }
            }
        }
        let c = s.dev.counters();
        assert!(
            c.notifications_sent
                <= c.tx_frames + c.rx_frames + c.malformed() + c.ctrl_ok + c.ctrl_err + 1000
        );
    }
    println!("{rounds} rounds, {processed} processing passes, {needs_reset_seen} NEEDS_RESET");
    assert!(
        processed > rounds * 10,
        "the random driver exercised the device"
    );
}
