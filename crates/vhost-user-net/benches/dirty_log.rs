//! What dirty logging costs the device's receive path, the path that writes
//! guest memory most (every frame into a buffer, its `num_buffers`, the used
//! ring).
//!
//! One device batch is 256 frames from the in-process pair into 256 one-buffer
//! chains, `process_rx` timed alone (the rings are refilled and the frames
//! staged outside the timed region). Three memories, the same device code:
//!
//! - `unit`: `GuestMemoryMmap<()>`, which reports to nothing (the memory type
//!   before logging existed);
//! - `off`: [`VhostUserMemory`], bound to a [`MigrationLog`] with a log
//!   shared but `VHOST_F_LOG_ALL` off (every connection, all the time);
//! - `on`: the same with `LOG_ALL` on (while a migration runs).
//!
//! Each iteration runs one batch of each, in rotating order, so the three
//! rows see the same machine.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vhost_user_net::dirty::LogArea;
use vhost_user_net::{MigrationLog, VhostUserMemory};
use virtio_net_standby::testing::pair_send;
use virtio_net_standby::{
    ActivateQueue, PairBackend, PairConfig, QueuePairHandle, StandbyNetBuilder, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, pair,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion,
};

const BATCH: u16 = 256;
const QSIZE: u16 = 256;
const MEM: u64 = 16 << 20;
const BUFS: u64 = 0x10_0000;
const BUF_LEN: u32 = 1536;
const DST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device on `mem` with its RX ring at 0 and TX ring at 0x4000, 256
/// buffers from `BUFS`, and the pair end that feeds it.
struct Rig<M: GuestMemoryBackend> {
    mem: Arc<M>,
    qp: QueuePairHandle<M, PairBackend>,
    peer: PairBackend,
    avail: u16,
}

fn queue(desc: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some((desc + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((desc + 0x2000) as u32), Some(0));
    q.set_event_idx(true);
    q.set_ready(true);
    q
}

impl<M> Rig<M>
where
    M: GuestMemoryBackend + Bytes<GuestAddress> + Send + Sync + 'static,
    M::R: Sync,
    <M as Bytes<GuestAddress>>::E: std::fmt::Debug,
{
    fn new(mem: M) -> Self {
        let (ours, peer) = pair(PairConfig::default()).unwrap();
        let mut dev = StandbyNetBuilder::new()
            .mac(DST)
            .queue_size(QSIZE)
            .build::<M, _>(vec![ours])
            .unwrap();
        // VERSION_1 and EVENT_IDX.
        dev.ack_features((1 << 32) | (1 << 29)).unwrap();
        for i in 0..u64::from(QSIZE) {
            let d = GuestAddress(16 * i);
            mem.write_obj(BUFS + i * u64::from(BUF_LEN), d).unwrap();
            mem.write_obj(BUF_LEN, d.unchecked_add(8)).unwrap();
            mem.write_obj(2u16, d.unchecked_add(12)).unwrap(); // WRITE
        }
        let atomic = GuestMemoryAtomic::new(mem);
        let mem = atomic.memory().into_inner();
        let queues = vec![
            ActivateQueue {
                index: 0,
                queue: queue(0),
                kick: None,
            },
            ActivateQueue {
                index: 1,
                queue: queue(0x4000),
                kick: None,
            },
        ];
        VirtioDevice::activate(&mut dev, atomic, Arc::new(NoInterrupt), queues).unwrap();
        let qp = dev.queue_pair(0).unwrap().clone();
        // The device stays alive through the handle's shared state.
        std::mem::forget(dev);
        Rig {
            mem,
            qp,
            peer,
            avail: 0,
        }
    }

    /// Posts every buffer again and stages a batch of `frame`s.
    fn stage(&mut self, frame: &[u8]) {
        for k in 0..BATCH {
            let slot = u64::from(self.avail.wrapping_add(k) % QSIZE);
            self.mem
                .write_obj(slot as u16, GuestAddress(0x1000 + 4 + 2 * slot))
                .unwrap();
        }
        self.avail = self.avail.wrapping_add(BATCH);
        self.mem
            .write_obj(self.avail, GuestAddress(0x1000 + 2))
            .unwrap();
        for _ in 0..BATCH {
            pair_send(&mut self.peer, frame).unwrap();
        }
    }

    /// Stages a batch, calls `then` (which switches logging), and times the
    /// device's `process_rx` alone.
    fn batch(&mut self, frame: &[u8], then: impl FnOnce()) -> Duration {
        self.stage(frame);
        then();
        let mut q = self.qp.lock();
        let t = Instant::now();
        let r = q.process_rx();
        let e = t.elapsed();
        assert_eq!(r.chains, usize::from(BATCH));
        e
    }
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: a fresh descriptor from a C string; checked below.
    let fd = unsafe { libc::memfd_create(c"bench-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0);
    fd
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12 + len];
    f[12..18].copy_from_slice(&DST);
    f[18..24].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[24..26].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

fn bench(c: &mut Criterion) {
    let unit = RefCell::new(Rig::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap(),
    ));
    let log = MigrationLog::new();
    let fd = memfd(4096);
    log.set_area(LogArea::map(fd.as_fd(), 0, 4096).unwrap());
    let mem = VhostUserMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    for r in mem.iter() {
        r.bitmap().bind(r.start_addr().0, &log);
    }
    let logged = RefCell::new(Rig::new(mem));
    // How many reports one batch makes (with logging on, each is counted).
    for size in [64usize, 1514] {
        let before = log.stats().logged;
        logged
            .borrow_mut()
            .batch(&frame(size), || log.set_logging(true));
        log.set_logging(false);
        eprintln!(
            "{size} B: {} reports to the dirty log for one batch of {BATCH} frames",
            log.stats().logged - before
        );
    }
    for size in [64usize, 1514] {
        let f = frame(size);
        let mut g = c.benchmark_group("rx_dirty_log");
        g.throughput(Throughput::Elements(u64::from(BATCH)));
        for (name, which) in [("unit", 0), ("off", 1), ("on", 2)] {
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        for k in 0..3 {
                            let row = (i as usize + k) % 3;
                            let t = match row {
                                0 => unit.borrow_mut().batch(&f, || ()),
                                r => logged.borrow_mut().batch(&f, || log.set_logging(r == 2)),
                            };
                            if row == which {
                                total += t;
                            }
                        }
                    }
                    total
                })
            });
        }
        g.finish();
    }
    let st = log.stats();
    assert_eq!(st.missed, 0);
    assert!(st.logged > 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
