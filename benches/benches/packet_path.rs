//! The standby device's packet path, against floors measured in the same run.
//!
//! Every measurement is one batch of 256 frames: the guest's rings are refilled
//! and the backend drained outside the timed region, then one `process_tx` or
//! `process_rx` call is timed.
//!
//! - `pair_tx/<size>` and `pair_rx/<size>`: the device on the in-process pair;
//!   floor `memcpy/<size>`: copying the same bytes once.
//! - `tap_tx/<size>`: the device on a real tap; floor `tap_writev/<size>`: one raw
//!   `writev` per frame of the same guest buffers into the same tap.
//! - `tap_rx/<size>`: the device reading frames a packet socket injected; floor
//!   `tap_readv/<size>`: raw `readv` of the same frames from the same tap.
//!
//! `python3 benches/report.py` prints ns/packet, Mpps or GB/s, and the ratios.

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::testing::{
    GuestDriver, GuestMem, PacketSocket, TestMemory, pair_send, tcp4_frame, tso4_header,
};
use virtio_net_standby::{NetBackend, PairConfig, StandbyNet, StandbyNetBuilder, Tap, pair};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

const BATCH: usize = 256;
const QSIZE: u16 = 256;
const SIZES: [usize; 3] = [64, 1514, 65536];
const DST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A frame of `len` bytes (without the virtio-net header), header included.
/// 64 KiB frames carry a TSO header, as a guest's would.
fn make_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    if len > 1514 {
        let h = tso4_header(1448);
        f.copy_from_slice(&h.to_bytes());
    }
    // IPv4/TCP, so that a kernel taking the frame can parse it.
    f.extend(tcp4_frame(
        DST,
        [0x02, 0, 0, 0, 0, 1],
        len.saturating_sub(54),
    ));
    f.resize(12 + len, 0xab);
    f
}

/// A device with one guest whose TX queue holds 256 one-descriptor chains over
/// fixed buffers, and whose RX queue holds 256 buffers of `rx_len` bytes.
struct Rig<B: NetBackend> {
    dev: StandbyNet<GuestMem, B>,
    g: GuestDriver,
    tx_heads: Vec<u16>,
    tx_addrs: Vec<u64>,
    rx_heads: Vec<u16>,
    frame_len: usize,
    tx_avail: u16,
    rx_avail: u16,
    tx_ring: u64,
    rx_ring: u64,
}

impl<B: NetBackend> Rig<B> {
    fn new(backend: B, frame: &[u8], rx_len: u32) -> Self {
        let mut dev: StandbyNet<GuestMem, B> = StandbyNetBuilder::new()
            .queue_size(QSIZE)
            .build(vec![backend])
            .unwrap();
        let mem = TestMemory::new(1 << 30);
        let mut g = GuestDriver::bring_up(&mut dev, &mem, DEFAULT_OFFER, QSIZE).unwrap();
        let mut tx_heads = Vec::new();
        let mut tx_addrs = Vec::new();
        // Buffers packed at cache-line alignment, as a guest's slab places them
        // (page-aligned buffers would all fall into one L1 set).
        for _ in 0..BATCH {
            let a = mem.alloc(frame.len() as u64, 64);
            mem.write(a, frame);
            tx_heads.push(g.tx[0].add_readable(&[a], &[frame.len() as u32]));
            tx_addrs.push(a);
        }
        let mut rx_heads = Vec::new();
        for _ in 0..BATCH {
            let a = mem.alloc(u64::from(rx_len), 64);
            rx_heads.push(g.rx[0].add_writable(&[a], &[rx_len]));
        }
        // Nothing is published yet: each iteration publishes a full batch.
        Rig {
            dev,
            tx_heads,
            tx_addrs,
            rx_heads,
            frame_len: frame.len(),
            tx_avail: 0,
            rx_avail: 0,
            tx_ring: g.tx[0].queue().avail_ring(),
            rx_ring: g.rx[0].queue().avail_ring(),
            g,
        }
    }

    /// Makes `heads` available again on the queue whose avail ring is at `ring`
    /// (the device returned them all): what a guest driver writes.
    fn refill(&self, ring: u64, heads: &[u16], idx: &mut u16) {
        let p = self.host_ptr(ring) as *mut u16;
        for (i, h) in heads.iter().enumerate() {
            let slot = usize::from(idx.wrapping_add(i as u16) % QSIZE);
            // SAFETY: the avail ring holds QSIZE entries after its 4-byte header,
            // inside guest memory this process mapped.
            unsafe { p.add(2 + slot).write_volatile(h.to_le()) };
        }
        *idx = idx.wrapping_add(heads.len() as u16);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: the avail index, as above.
        unsafe { p.add(1).write_volatile(idx.to_le()) };
    }

    fn refill_tx(&mut self) {
        let mut idx = self.tx_avail;
        self.refill(self.tx_ring, &self.tx_heads, &mut idx);
        self.tx_avail = idx;
    }

    fn refill_rx(&mut self) {
        let mut idx = self.rx_avail;
        self.refill(self.rx_ring, &self.rx_heads, &mut idx);
        self.rx_avail = idx;
    }

    fn host_ptr(&self, gpa: u64) -> *mut u8 {
        self.g
            .mem
            .arc()
            .get_host_address(GuestAddress(gpa))
            .unwrap()
    }
}

fn bench_pair(c: &mut Criterion) {
    for &size in &SIZES {
        let frame = make_frame(size);

        // Floor: one copy of the same bytes.
        let mut g = c.benchmark_group("memcpy");
        g.throughput(Throughput::Elements(BATCH as u64));
        let src = vec![0x5au8; frame.len() * BATCH];
        let mut dst = vec![0u8; frame.len() * BATCH + 8 * BATCH];
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let mut off = 0;
                for f in src.chunks_exact(frame.len()) {
                    dst[off..off + f.len()].copy_from_slice(black_box(f));
                    off += f.len() + 8;
                }
                black_box(&dst);
            })
        });
        g.finish();

        // TX into the pair. The ring holds one batch, as the floor's buffer does:
        // a ring far larger than the batch would make every batch write cold
        // memory, which a consumer keeping up never sees.
        let ring = PairConfig {
            capacity: (frame.len() + 16) * BATCH,
        };
        let (end, peer) = pair(ring).unwrap();
        let peer = std::cell::RefCell::new(peer);
        let rig = std::cell::RefCell::new(Rig::new(end, &frame, 1536));
        let mut g = c.benchmark_group("pair_tx");
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| {
                let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
                let mut guard = qp.lock();
                timed(
                    iters,
                    || {
                        rig.borrow_mut().refill_tx();
                        peer.borrow_mut().discard_incoming();
                    },
                    || assert_eq!(guard.process_tx().chains, BATCH),
                )
            })
        });
        g.finish();

        // RX from the pair: the peer queued 256 frames; the guest posted 256
        // buffers (1536 bytes, or one 64 KiB buffer per frame for 64 KiB frames).
        let (end, peer) = pair(ring).unwrap();
        let peer = std::cell::RefCell::new(peer);
        let rx_len = if size > 1514 { 65_562 } else { 1536 };
        let rig = std::cell::RefCell::new(Rig::new(end, &frame, rx_len));
        let mut g = c.benchmark_group("pair_rx");
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| {
                let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
                let mut guard = qp.lock();
                timed(
                    iters,
                    || {
                        rig.borrow_mut().refill_rx();
                        let mut p = peer.borrow_mut();
                        for _ in 0..BATCH {
                            pair_send(&mut p, &frame).unwrap();
                        }
                    },
                    || assert_eq!(guard.process_rx().chains, BATCH),
                )
            })
        });
        g.finish();
    }
}

fn open_tap() -> Option<Tap> {
    let tap = match Tap::open("vnsbb%d") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tap benchmarks skipped: {e}");
            return None;
        }
    };
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name()),
        "1",
    );
    tap.set_up().ok()?;
    Some(tap)
}

/// Times `f` once per iteration after `setup`, summing only `f`'s time.
fn timed<S: FnMut(), F: FnMut()>(iters: u64, mut setup: S, mut f: F) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..iters {
        setup();
        let start = Instant::now();
        f();
        t += start.elapsed();
    }
    t
}

/// Runs `iters` rounds of one device batch and one floor batch, in alternating
/// order, and returns the time of the device batches (`device`) or of the floor
/// batches. Both benchmarks of a pair use it, so both see the same kernel
/// conditions: measuring them minutes apart made their ratio drift by 10%.
fn interleaved(
    iters: u64,
    device: bool,
    mut dev: impl FnMut() -> Duration,
    mut floor: impl FnMut() -> Duration,
) -> Duration {
    let mut t = Duration::ZERO;
    for i in 0..iters {
        let (d, f) = if i % 2 == 0 {
            let d = dev();
            (d, floor())
        } else {
            let f = floor();
            (dev(), f)
        };
        t += if device { d } else { f };
    }
    t
}

fn bench_tap(c: &mut Criterion) {
    for &size in &SIZES {
        // A fresh tap per size; the device owns it, the floors use its fd.
        let Some(tap) = open_tap() else { return };
        let injector = PacketSocket::open(&tap, false).expect("packet socket on the tap");
        let frame = make_frame(size);
        let rig = std::cell::RefCell::new(Rig::new(tap, &frame, 1536));
        let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
        let fd = qp.lock().backend().as_raw_fd();

        // TX: the device's batch against raw writev of the same guest buffers.
        let iovs: Vec<libc::iovec> = {
            let r = rig.borrow();
            r.tx_addrs
                .iter()
                .map(|a| libc::iovec {
                    iov_base: r.host_ptr(*a).cast(),
                    iov_len: r.frame_len,
                })
                .collect()
        };
        let dev_tx = || {
            rig.borrow_mut().refill_tx();
            let mut q = qp.lock();
            let start = Instant::now();
            assert_eq!(q.process_tx().chains, BATCH);
            start.elapsed()
        };
        let raw_tx = || {
            let start = Instant::now();
            for v in &iovs {
                // SAFETY: each iovec covers a live frame in guest memory.
                let n = unsafe { libc::writev(fd, v, 1) };
                assert!(n > 0, "writev: {}", std::io::Error::last_os_error());
            }
            start.elapsed()
        };
        for (group, device) in [("tap_writev", false), ("tap_tx", true)] {
            let mut g = c.benchmark_group(group);
            g.throughput(Throughput::Elements(BATCH as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_tx, raw_tx))
            });
            g.finish();
        }
        assert_eq!(rig.borrow().dev.counters().tx_dropped_backend, 0);

        // RX: frames up to the MTU can be injected through the interface.
        if size > 1514 {
            continue;
        }
        let inject = || {
            for _ in 0..BATCH {
                injector.send(&frame[12..]).unwrap();
            }
        };
        let buf = std::cell::RefCell::new(vec![0u8; 65_562]);
        let raw_rx = || {
            inject();
            let mut buf = buf.borrow_mut();
            let start = Instant::now();
            for _ in 0..BATCH {
                let v = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                // SAFETY: reading into a live buffer of its stated size.
                let n = unsafe { libc::readv(fd, &v, 1) };
                assert!(n > 0, "readv: {}", std::io::Error::last_os_error());
            }
            start.elapsed()
        };
        let dev_rx = || {
            rig.borrow_mut().refill_rx();
            inject();
            let mut q = qp.lock();
            let mut done = 0;
            let start = Instant::now();
            while done < BATCH {
                done += q.process_rx().chains;
            }
            start.elapsed()
        };
        for (group, device) in [("tap_readv", false), ("tap_rx", true)] {
            let mut g = c.benchmark_group(group);
            g.throughput(Throughput::Elements(BATCH as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_rx, raw_rx))
            });
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_pair, bench_tap
}
criterion_main!(benches);
