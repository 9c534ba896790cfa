//! How the device's throughput scales from one queue pair to two, one worker
//! thread per pair, in process.
//!
//! Each worker owns one pair: it makes its 256 buffers available again (what a
//! guest driver does once the device used them), runs one `process_rx` (the
//! pair's backend a [`Generator`], which fills every buffer with a 64-byte
//! frame) or `process_tx` (the backend a [`Discard`] sink, which copies every
//! frame out as a backend that moves frames must), and counts the chains.
//! The figure is the sum over the workers of the chains in a fixed time.
//!
//! Not a criterion bench: it prints one line per measurement, for rounds that
//! alternate the order of the 1-pair and 2-pair runs:
//!
//! ```sh
//! cargo bench -p benches --bench multiqueue -- [ROUNDS] [SECONDS]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_OK,
};
use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::testing::{GuestDriver, GuestMem, TestMemory};
use virtio_net_standby::{Discard, Generator, NetBackend, StandbyNet, StandbyNetBuilder};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

const QSIZE: u16 = 256;
const FRAME: usize = 64;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Where one worker's queue keeps its avail ring (host address) and the heads
/// it makes available again.
struct Avail {
    ring: usize,
    heads: Vec<u16>,
}

/// Makes every head available again from avail index `idx` on.
fn refill(a: &Avail, idx: &mut u16) {
    let p = a.ring as *mut u16;
    for (i, h) in a.heads.iter().enumerate() {
        let slot = usize::from(idx.wrapping_add(i as u16) % QSIZE);
        // SAFETY: the avail ring holds QSIZE entries after its 4-byte header, in
        // guest memory the device under test keeps mapped for the whole run.
        unsafe { p.add(2 + slot).write_volatile(h.to_le()) };
    }
    *idx = idx.wrapping_add(a.heads.len() as u16);
    std::sync::atomic::fence(Ordering::Release);
    // SAFETY: the avail index, as above.
    unsafe { p.add(1).write_volatile(idx.to_le()) };
}

/// A device with `pairs` queue pairs, all enabled, each with 256 one-descriptor
/// chains on the queue `rx` names (RX: 1536-byte writable buffers; TX: readable
/// 64-byte frames), none available yet.
fn rig<B: NetBackend>(
    backends: Vec<B>,
    rx: bool,
) -> (StandbyNet<GuestMem, B>, GuestDriver, Vec<Avail>) {
    let pairs = backends.len();
    let mut dev: StandbyNet<GuestMem, B> = StandbyNetBuilder::new()
        .queue_size(QSIZE)
        .queue_pairs(pairs as u16)
        .build(backends)
        .unwrap();
    let mem = TestMemory::new(256 << 20);
    let mut g = GuestDriver::bring_up(&mut dev, &mem, DEFAULT_OFFER, QSIZE).unwrap();
    assert_eq!(g.rx.len(), pairs, "the driver sees every pair");
    if pairs > 1 {
        let ack = g.ctrl(
            &dev,
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            &(pairs as u16).to_le_bytes(),
        );
        assert_eq!(ack, VIRTIO_NET_OK as u8, "pairs enabled");
    }
    let mut frame = vec![0u8; 12 + FRAME];
    frame[12..18].copy_from_slice(&MAC);
    let mut avails = Vec::new();
    for p in 0..pairs {
        let mut heads = Vec::new();
        for _ in 0..QSIZE {
            if rx {
                let a = mem.alloc(1536, 64);
                heads.push(g.rx[p].add_writable(&[a], &[1536]));
            } else {
                let a = mem.alloc(frame.len() as u64, 64);
                mem.write(a, &frame);
                heads.push(g.tx[p].add_readable(&[a], &[frame.len() as u32]));
            }
        }
        let q = if rx { g.rx[p].queue() } else { g.tx[p].queue() };
        let ring = g
            .mem
            .arc()
            .get_host_address(GuestAddress(q.avail_ring()))
            .unwrap() as usize;
        avails.push(Avail { ring, heads });
    }
    (dev, g, avails)
}

/// Chains per second over all workers, one worker per backend's pair.
fn run<B: NetBackend + 'static>(backends: Vec<B>, rx: bool, secs: f64) -> f64 {
    let (dev, _g, avails) = rig(backends, rx);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = avails
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let qp = dev.queue_pair(i).unwrap().clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut idx, mut chains) = (0u16, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    refill(&a, &mut idx);
                    let mut q = qp.lock();
                    let n = if rx { q.process_rx() } else { q.process_tx() }.chains;
                    assert_eq!(n, usize::from(QSIZE), "every chain moved");
                    chains += n as u64;
                }
                chains
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; the numbers are the arguments that parse.
    let nums: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = nums.first().copied().unwrap_or(5.0) as usize;
    let secs = nums.get(1).copied().unwrap_or(2.0);
    println!("round direction pairs Mpps");
    for round in 1..=rounds {
        for rx in [true, false] {
            let order: [usize; 2] = if round % 2 == 1 { [1, 2] } else { [2, 1] };
            for pairs in order {
                let pps = if rx {
                    let b = (0..pairs).map(|_| Generator::new(FRAME, MAC).unwrap());
                    run(b.collect(), true, secs)
                } else {
                    run(
                        (0..pairs).map(|_| Discard::copying()).collect(),
                        false,
                        secs,
                    )
                };
                let dir = if rx { "rx" } else { "tx" };
                println!("{round} {dir} {pairs} {:.2}", pps / 1e6);
            }
        }
    }
}
