//! The standby device's packet path, against floors measured in the same run.
//!
//! Every measurement is one batch of 256 frames: the guest's rings are refilled
//! and the backend drained outside the timed region, then one `process_tx` or
//! `process_rx` call is timed.
//!
//! - `pair_tx/<size>` and `pair_rx/<size>`: the device on the in-process pair;
//!   floor `memcpy/<size>`: copying the same bytes once.
//! - `pair_tx/virtio_queue/<size>` and `pair_rx/virtio_queue/<size>`: the peer
//!   floor, in the same groups: what a device built on virtio-queue does with
//!   the same batch (`pop_descriptor_chain`, the bytes through vm-memory,
//!   `add_used`, `enable_notification`/`needs_notification` with EVENT_IDX), over
//!   rings laid out here, whose descriptors name the device row's guest buffers.
//!   Each iteration runs one device batch and one floor batch, in alternating
//!   order (see [`interleaved`]).
//! - `tap_tx/<size>`: the device on a real tap; floor `tap_writev/<size>`: one raw
//!   `writev` per frame of the same guest buffers into the same tap.
//! - `tap_rx/<size>`: the device reading frames a packet socket injected; floor
//!   `tap_readv/<size>`: one raw `readv` per frame of the same frames from the
//!   same tap, into the same guest buffers; `tap_readv_room/<size>`: the same
//!   with a second iovec for the rest of the largest frame the tap may deliver;
//!   `tap_rx_nogso/<size>`: the device for a guest without TSO or UFO, whose
//!   largest frame fits the buffer, paired with the `tap_readv` floor.
//!
//! `python3 benches/report.py` prints ns/packet, Mpps or GB/s, and the ratios.

use std::cell::RefCell;
use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};
use virtio_net_standby::features::{DEFAULT_OFFER, F_RING_EVENT_IDX, Features};
use virtio_net_standby::header::{MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET};
use virtio_net_standby::ring::VRING_DESC_F_WRITE;
use virtio_net_standby::testing::{
    GuestDriver, GuestMem, PacketSocket, TestMemory, pair_send, tcp4_frame, tso4_header,
};
use virtio_net_standby::{NetBackend, PairConfig, StandbyNet, StandbyNetBuilder, Tap, pair};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
};

const BATCH: usize = 256;
const QSIZE: u16 = 256;
const SIZES: [usize; 3] = [64, 1514, 65536];
/// The length of every guest RX buffer on the tap rows.
const RX_LEN: u32 = 1536;
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
    rx_addrs: Vec<u64>,
    frame_len: usize,
    tx_avail: u16,
    rx_avail: u16,
    tx_ring: u64,
    rx_ring: u64,
}

impl<B: NetBackend> Rig<B> {
    fn new(backend: B, frame: &[u8], rx_len: u32) -> Self {
        Self::with_offer(backend, frame, rx_len, DEFAULT_OFFER)
    }

    /// The same with the driver acknowledging `offer` (what the device offers of it).
    fn with_offer(backend: B, frame: &[u8], rx_len: u32, offer: Features) -> Self {
        let mut dev: StandbyNet<GuestMem, B> = StandbyNetBuilder::new()
            .queue_size(QSIZE)
            .build(vec![backend])
            .unwrap();
        let mem = TestMemory::new(1 << 30);
        let mut g = GuestDriver::bring_up(&mut dev, &mem, offer, QSIZE).unwrap();
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
        let mut rx_addrs = Vec::new();
        for _ in 0..BATCH {
            let a = mem.alloc(u64::from(rx_len), 64);
            rx_heads.push(g.rx[0].add_writable(&[a], &[rx_len]));
            rx_addrs.push(a);
        }
        // Nothing is published yet: each iteration publishes a full batch.
        Rig {
            dev,
            tx_heads,
            tx_addrs,
            rx_heads,
            rx_addrs,
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
        refill_avail(self.host_ptr(ring) as *mut u16, heads, idx);
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

/// Makes `heads` available on the avail ring at host address `p`, from avail
/// index `idx` on: what a guest driver writes (entries, release fence, index).
fn refill_avail(p: *mut u16, heads: &[u16], idx: &mut u16) {
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

/// The pair's record header before each frame.
const REC_HDR: usize = 8;
/// A record header that says "continue at the start of the ring".
const REC_PAD: u64 = u64::MAX;

fn record_len(frame_len: usize) -> usize {
    REC_HDR + frame_len.next_multiple_of(8)
}

/// A byte ring shaped like one direction of the pair (same capacity, 8-byte
/// length before each frame, records padded to 8 bytes, a pad marker where a
/// record would not fit before the end), so that the floor's copies touch
/// host memory at the offsets and stride the device's backend does.
struct Records {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    pending: usize,
}

impl Records {
    fn new(capacity: usize) -> Self {
        Records {
            buf: vec![0; capacity],
            head: 0,
            tail: 0,
            pending: 0,
        }
    }

    /// Appends a record header for `len` frame bytes; returns where the frame
    /// goes.
    fn push(&mut self, len: usize) -> usize {
        let rec = record_len(len);
        assert!(rec <= self.buf.len(), "record larger than the ring");
        if self.tail + rec > self.buf.len() {
            if self.tail < self.buf.len() {
                self.buf[self.tail..self.tail + REC_HDR].copy_from_slice(&REC_PAD.to_le_bytes());
            }
            self.tail = 0;
        }
        let at = self.tail;
        self.buf[at..at + REC_HDR].copy_from_slice(&(len as u64).to_le_bytes());
        self.tail += rec;
        self.pending += 1;
        at + REC_HDR
    }

    /// Takes the oldest record: where its frame is, and how long.
    fn pop(&mut self) -> Option<(usize, usize)> {
        if self.pending == 0 {
            return None;
        }
        loop {
            if self.head + REC_HDR > self.buf.len() {
                self.head = 0;
            }
            let h =
                u64::from_le_bytes(self.buf[self.head..self.head + REC_HDR].try_into().unwrap());
            if h == REC_PAD {
                self.head = 0;
                continue;
            }
            let len = h as usize;
            let at = self.head + REC_HDR;
            self.head += record_len(len);
            self.pending -= 1;
            return Some((at, len));
        }
    }

    /// Drops every record (what the pair's `discard_incoming` does).
    fn discard(&mut self) {
        self.head = self.tail;
        self.pending = 0;
    }
}

/// Where the areas of one split virtqueue sit in guest memory.
#[derive(Debug, Clone, Copy)]
struct RingLayout {
    desc: u64,
    avail: u64,
    used: u64,
}

impl RingLayout {
    /// Lays out a queue of `size` entries with the split ring's alignments
    /// (table 16, avail 2, used 4): the table on a fresh page, the avail ring
    /// right after it, the used ring 4-aligned after the avail ring's last field
    /// (`used_event`). Not virtio-queue 0.18's `MockSplitQueue`: it puts the used
    /// ring at avail + 4 + size (`SplitQueueRing::end` adds entries, not bytes),
    /// so with 256 entries the used index sits on avail entry 129 and the used
    /// elements on entries 130 to 255 and `used_event`.
    fn new(mem: &TestMemory, size: u16) -> Self {
        let n = u64::from(size);
        let (desc_len, avail_len, used_len) = (16 * n, 6 + 2 * n, 6 + 8 * n);
        let used_off = (desc_len + avail_len).next_multiple_of(4);
        let desc = mem.alloc(used_off + used_len, 4096);
        let l = RingLayout {
            desc,
            avail: desc + desc_len,
            used: desc + used_off,
        };
        let areas = [
            (l.desc, desc_len, 16),
            (l.avail, avail_len, 2),
            (l.used, used_len, 4),
        ];
        for (i, &(a, a_len, align)) in areas.iter().enumerate() {
            assert_eq!(a % align, 0, "ring area at {a:#x} is not {align}-aligned");
            for &(b, b_len, _) in &areas[i + 1..] {
                assert!(
                    a + a_len <= b || b + b_len <= a,
                    "ring areas {a:#x}+{a_len} and {b:#x}+{b_len} overlap"
                );
            }
        }
        l
    }
}

/// The peer floor: a device built on virtio-queue 0.18 and vm-memory, doing the
/// same batch as the device row over its own rings (a [`RingLayout`] in the
/// row's guest memory) whose descriptors name the row's guest buffers.
struct VqFloor {
    mem: GuestMemoryAtomic<GuestMem>,
    q: Queue,
    ring: RingLayout,
    avail: *mut u16,
    heads: Vec<u16>,
    avail_idx: u16,
    /// One chain's descriptors, gathered before its record is placed.
    segs: Vec<(GuestAddress, usize)>,
    notifications: u64,
    dropped: u64,
}

impl VqFloor {
    /// A one-descriptor chain per buffer of `bufs`, `len` bytes each,
    /// device-writable if `write`. Nothing is made available yet.
    fn new(mem: &TestMemory, bufs: &[u64], len: u32, write: bool, event_idx: bool) -> Self {
        let ring = RingLayout::new(mem, QSIZE);
        let flags = if write { VRING_DESC_F_WRITE } else { 0 };
        let heads: Vec<u16> = (0..bufs.len() as u16).collect();
        for (&h, &a) in heads.iter().zip(bufs) {
            mem.write_descriptor(ring.desc + 16 * u64::from(h), a, len, flags, 0);
        }
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(ring.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(ring.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(ring.used))
            .unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&**mem.arc()));
        let avail = mem
            .arc()
            .get_host_address(GuestAddress(ring.avail))
            .unwrap()
            .cast::<u16>();
        VqFloor {
            mem: mem.atomic(),
            q,
            ring,
            avail,
            heads,
            avail_idx: 0,
            segs: Vec::with_capacity(usize::from(QSIZE)),
            notifications: 0,
            dropped: 0,
        }
    }

    /// Makes every chain available again, as the device row's driver does.
    fn refill(&mut self) {
        refill_avail(self.avail, &self.heads, &mut self.avail_idx);
    }

    /// TX: every available chain's readable bytes into a record of `out`, each
    /// chain returned with length 0. Returns the chains used.
    fn tx_batch(&mut self, out: &mut Records) -> usize {
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let mut chains = 0;
        loop {
            self.q.disable_notification(mem).unwrap();
            while let Some(chain) = self.q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.segs.clear();
                let mut len = 0;
                let mut ok = true;
                for d in chain {
                    len += d.len() as usize;
                    if d.is_write_only() || len > MAX_BUFFER_LEN {
                        ok = false;
                        break;
                    }
                    self.segs.push((d.addr(), d.len() as usize));
                }
                if ok {
                    let mut at = out.push(len);
                    for &(addr, l) in &self.segs {
                        mem.read_slice(&mut out.buf[at..at + l], addr).unwrap();
                        at += l;
                    }
                } else {
                    self.dropped += 1;
                }
                self.q.add_used(mem, head, 0).unwrap();
                chains += 1;
            }
            if !self.q.enable_notification(mem).unwrap() {
                break;
            }
        }
        if self.q.needs_notification(mem).unwrap() {
            self.notifications += 1;
        }
        chains
    }

    /// RX: every record of `src` into one available chain, `num_buffers` set to
    /// 1, the chain returned with the frame's length. Returns the chains used.
    fn rx_batch(&mut self, src: &mut Records) -> usize {
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let mut chains = 0;
        self.q.disable_notification(mem).unwrap();
        while src.pending > 0 {
            let Some(chain) = self.q.pop_descriptor_chain(mem) else {
                if self.q.enable_notification(mem).unwrap() {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let (at, len) = src.pop().unwrap();
            let frame = &src.buf[at..at + len];
            let (mut written, mut first) = (0, None);
            for d in chain {
                if !d.is_write_only() {
                    break;
                }
                let l = (d.len() as usize).min(len - written);
                mem.write_slice(&frame[written..written + l], d.addr())
                    .unwrap();
                first.get_or_insert(d.addr());
                written += l;
                if written == len {
                    break;
                }
            }
            match first {
                Some(a) if written == len => {
                    mem.write_obj(1u16.to_le(), a.unchecked_add(NUM_BUFFERS_OFFSET as u64))
                        .unwrap();
                    self.q.add_used(mem, head, len as u32).unwrap();
                }
                _ => {
                    self.dropped += 1;
                    self.q.add_used(mem, head, 0).unwrap();
                }
            }
            chains += 1;
        }
        if self.q.needs_notification(mem).unwrap() {
            self.notifications += 1;
        }
        chains
    }

    /// Checks the batch that moved the used index from `from`: every chain came
    /// back once, in order, with length `len`, and the device's writes left the
    /// driver's avail ring as the driver wrote it.
    fn check_batch(&self, from: u16, len: u32) {
        let m = self.mem.memory();
        let u16_at = |a: u64| u16::from_le(m.read_obj(GuestAddress(a)).unwrap());
        let u32_at = |a: u64| u32::from_le(m.read_obj(GuestAddress(a)).unwrap());
        let n = self.heads.len() as u16;
        assert_eq!(
            u16_at(self.ring.used + 2),
            from.wrapping_add(n),
            "used index"
        );
        assert_eq!(u16_at(self.ring.avail + 2), self.avail_idx, "avail index");
        for (i, &h) in self.heads.iter().enumerate() {
            let pos = u64::from(from.wrapping_add(i as u16) % QSIZE);
            let e = self.ring.used + 4 + 8 * pos;
            assert_eq!((u32_at(e), u32_at(e + 4)), (u32::from(h), len), "used {i}");
            let a = self.avail_idx.wrapping_sub(n).wrapping_add(i as u16) % QSIZE;
            assert_eq!(
                u16_at(self.ring.avail + 4 + 2 * u64::from(a)),
                h,
                "avail {i}"
            );
        }
        assert_eq!(self.dropped, 0);
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
        let peer = RefCell::new(peer);
        let rig = RefCell::new(Rig::new(end, &frame, 1536));
        let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
        // The peer floor reads the same guest buffers into a ring shaped like
        // the pair's.
        let floor = {
            let r = rig.borrow();
            let event_idx = r.g.features.has(F_RING_EVENT_IDX);
            RefCell::new(VqFloor::new(
                &r.g.mem,
                &r.tx_addrs,
                frame.len() as u32,
                false,
                event_idx,
            ))
        };
        let out = RefCell::new(Records::new(peer.borrow().capacity()));
        {
            // One checked batch first, so that the floor cannot time nothing.
            let (mut f, mut o) = (floor.borrow_mut(), out.borrow_mut());
            f.refill();
            assert_eq!(f.tx_batch(&mut o), BATCH);
            f.check_batch(0, 0);
            assert_eq!(o.pending, BATCH);
            while let Some((at, len)) = o.pop() {
                assert!(o.buf[at..at + len] == frame[..], "record at {at}");
            }
        }
        let dev_tx = || {
            rig.borrow_mut().refill_tx();
            peer.borrow_mut().discard_incoming();
            let mut q = qp.lock();
            let start = Instant::now();
            assert_eq!(q.process_tx().chains, BATCH);
            start.elapsed()
        };
        let vq_tx = || {
            let (mut f, mut o) = (floor.borrow_mut(), out.borrow_mut());
            f.refill();
            o.discard();
            let start = Instant::now();
            assert_eq!(f.tx_batch(&mut o), BATCH);
            start.elapsed()
        };
        let mut g = c.benchmark_group("pair_tx");
        g.throughput(Throughput::Elements(BATCH as u64));
        for (id, device) in [
            (BenchmarkId::new("virtio_queue", size), false),
            (BenchmarkId::from_parameter(size), true),
        ] {
            g.bench_function(id, |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_tx, vq_tx))
            });
        }
        g.finish();
        assert_eq!(floor.borrow().dropped, 0);
        black_box(floor.borrow().notifications);

        // RX from the pair: the peer queued 256 frames; the guest posted 256
        // buffers (1536 bytes, or one 64 KiB buffer per frame for 64 KiB frames).
        // The peer floor takes the same frames from a ring shaped like the
        // pair's, written just before as the peer writes its ring, into the same
        // guest buffers.
        let (end, peer) = pair(ring).unwrap();
        let peer = RefCell::new(peer);
        let rx_len = if size > 1514 { 65_562 } else { 1536 };
        let rig = RefCell::new(Rig::new(end, &frame, rx_len));
        let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
        let floor = {
            let r = rig.borrow();
            let event_idx = r.g.features.has(F_RING_EVENT_IDX);
            RefCell::new(VqFloor::new(&r.g.mem, &r.rx_addrs, rx_len, true, event_idx))
        };
        let src = RefCell::new(Records::new(peer.borrow().capacity()));
        let stage = |src: &mut Records| {
            for _ in 0..BATCH {
                let at = src.push(frame.len());
                src.buf[at..at + frame.len()].copy_from_slice(&frame);
            }
        };
        {
            let (mut f, mut s) = (floor.borrow_mut(), src.borrow_mut());
            f.refill();
            stage(&mut s);
            assert_eq!(f.rx_batch(&mut s), BATCH);
            assert_eq!(s.pending, 0);
            f.check_batch(0, frame.len() as u32);
            let mut expect = frame.clone();
            expect[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
            let r = rig.borrow();
            for &a in &r.rx_addrs {
                assert!(r.g.mem.read(a, frame.len()) == expect, "frame at {a:#x}");
            }
        }
        let dev_rx = || {
            rig.borrow_mut().refill_rx();
            {
                let mut p = peer.borrow_mut();
                for _ in 0..BATCH {
                    pair_send(&mut p, &frame).unwrap();
                }
            }
            let mut q = qp.lock();
            let start = Instant::now();
            assert_eq!(q.process_rx().chains, BATCH);
            start.elapsed()
        };
        let vq_rx = || {
            let (mut f, mut s) = (floor.borrow_mut(), src.borrow_mut());
            f.refill();
            stage(&mut s);
            let start = Instant::now();
            assert_eq!(f.rx_batch(&mut s), BATCH);
            start.elapsed()
        };
        let mut g = c.benchmark_group("pair_rx");
        g.throughput(Throughput::Elements(BATCH as u64));
        for (id, device) in [
            (BenchmarkId::new("virtio_queue", size), false),
            (BenchmarkId::from_parameter(size), true),
        ] {
            g.bench_function(id, |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_rx, vq_rx))
            });
        }
        g.finish();
        assert_eq!(floor.borrow().dropped, 0);
        black_box(floor.borrow().notifications);
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
        PAIRED.with_borrow_mut(|r| r.push(d.as_secs_f64() / f.as_secs_f64().max(1e-12)));
    }
    t
}

thread_local! {
    /// The device / floor ratio of every iteration [`interleaved`] ran since
    /// [`print_paired`] last took them.
    static PAIRED: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Prints the median, over the iterations of the benchmark just run, of the ratio
/// of its two batches (`paired: <row> <floor> <ratio>`), and forgets them. Two
/// criterion medians are measured seconds apart, and on a shared machine the
/// system calls' cost drifts by more than the difference between device and
/// floor in that time; the two batches of one iteration run back to back.
fn print_paired(row: &str, floor: &str) {
    let mut r = PAIRED.take();
    if r.is_empty() {
        return;
    }
    r.sort_by(f64::total_cmp);
    println!(
        "paired: {row} {floor} {:.4} ({} iterations)",
        r[r.len() / 2],
        r.len()
    );
}

fn bench_tap(c: &mut Criterion) {
    for &size in &SIZES {
        // A fresh tap per size; the device owns it, the floors use its fd.
        let Some(tap) = open_tap() else { return };
        let injector = PacketSocket::open(&tap, false).expect("packet socket on the tap");
        let frame = make_frame(size);
        let rig = std::cell::RefCell::new(Rig::new(tap, &frame, RX_LEN));
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
            PAIRED.take();
            let mut g = c.benchmark_group(group);
            g.throughput(Throughput::Elements(BATCH as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_tx, raw_tx))
            });
            g.finish();
            print_paired(&format!("{group}/{size}"), "tap_tx/tap_writev");
        }
        assert_eq!(rig.borrow().dev.counters().tx_dropped_backend, 0);

        // RX: frames up to the MTU can be injected through the interface.
        if size > 1514 {
            continue;
        }
        let inject = || inject_batch(&injector, &frame);
        // Both floors read each frame into the guest buffer the device fills with
        // it (the same 256 buffers, in ring order), as the TX floor writes the
        // guest's TX buffers. `tap_readv` gives `readv` that buffer alone: the
        // raw system call, which could not take a frame longer than the buffer.
        // `tap_readv_room` adds a host buffer for the rest of the largest frame
        // the tap may deliver (the guest took TSO, so up to 64 KiB), as a device
        // must when it cannot know the next frame's length: the kernel then
        // copies through a two-segment iovec instead of a single user buffer
        // (docs/PERFORMANCE.md, "On a tap: the 1514-byte gap").
        let rx_iovs = guest_rx_iovecs(&rig.borrow());
        let raw_rx = || raw_rx_batch(fd, &rx_iovs, inject);
        let rest = RefCell::new(vec![0u8; MAX_BUFFER_LEN - RX_LEN as usize]);
        let raw_rx_room = || {
            inject();
            let mut rest = rest.borrow_mut();
            let start = Instant::now();
            profiled_readv_room(fd, &rx_iovs, &mut rest);
            start.elapsed()
        };
        let dev_rx = || device_rx_batch(&rig, &qp, inject);
        for (group, device) in [("tap_readv", false), ("tap_rx", true)] {
            PAIRED.take();
            let mut g = c.benchmark_group(group);
            g.throughput(Throughput::Elements(BATCH as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter_custom(|iters| interleaved(iters, device, dev_rx, raw_rx))
            });
            g.finish();
            print_paired(&format!("{group}/{size}"), "tap_rx/tap_readv");
        }
        PAIRED.take();
        let mut g = c.benchmark_group("tap_readv_room");
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| interleaved(iters, false, dev_rx, raw_rx_room))
        });
        g.finish();
        print_paired(&format!("tap_readv_room/{size}"), "tap_rx/tap_readv_room");
        drop(rig);
        bench_tap_rx_without_gso(c, size, &frame);
    }
}

/// Sends one batch of `frame` (without its virtio-net header) into the tap.
fn inject_batch(injector: &PacketSocket, frame: &[u8]) {
    for _ in 0..BATCH {
        injector.send(&frame[12..]).unwrap();
    }
}

/// The guest's RX buffers as iovecs, in ring order.
fn guest_rx_iovecs<B: NetBackend>(r: &Rig<B>) -> Vec<libc::iovec> {
    r.rx_addrs
        .iter()
        .map(|a| libc::iovec {
            iov_base: r.host_ptr(*a).cast(),
            iov_len: RX_LEN as usize,
        })
        .collect()
}

/// The one-iovec floor: `inject`, then one raw `readv` per frame, timed.
fn raw_rx_batch(fd: i32, iovs: &[libc::iovec], inject: impl Fn()) -> Duration {
    inject();
    let start = Instant::now();
    profiled_readv_guest(fd, iovs);
    start.elapsed()
}

/// The device: refill the guest's buffers, `inject`, then `process_rx` until the
/// batch is in, timed.
fn device_rx_batch(
    rig: &RefCell<Rig<Tap>>,
    qp: &virtio_net_standby::QueuePairHandle<GuestMem, Tap>,
    inject: impl Fn(),
) -> Duration {
    rig.borrow_mut().refill_rx();
    inject();
    let mut q = qp.lock();
    let mut done = 0;
    let start = Instant::now();
    while done < BATCH {
        done += q.process_rx().chains;
    }
    start.elapsed()
}

/// Tap RX for a guest that took no receive offload (no TSO, no UFO): the tap then
/// delivers nothing longer than the MTU, which fits the 1536-byte buffer, so the
/// device gives `readv` the guest's buffer alone, like the `tap_readv` floor it is
/// paired with here (`tap_rx_nogso/<size>`, its own tap and device).
fn bench_tap_rx_without_gso(c: &mut Criterion, size: usize, frame: &[u8]) {
    let Some(tap) = open_tap() else { return };
    let injector = PacketSocket::open(&tap, false).expect("packet socket on the tap");
    // (`prune` drops what depends on them, GUEST_ECN.)
    let offer = virtio_net_standby::features::prune(
        DEFAULT_OFFER
            .without(VIRTIO_NET_F_GUEST_TSO4)
            .without(VIRTIO_NET_F_GUEST_TSO6)
            .without(VIRTIO_NET_F_GUEST_UFO),
    );
    let rig = RefCell::new(Rig::with_offer(tap, frame, RX_LEN, offer));
    let qp = rig.borrow().dev.queue_pair(0).unwrap().clone();
    let fd = qp.lock().backend().as_raw_fd();
    let inject = || inject_batch(&injector, frame);
    let rx_iovs = guest_rx_iovecs(&rig.borrow());
    let raw_rx = || raw_rx_batch(fd, &rx_iovs, inject);
    let dev_rx = || device_rx_batch(&rig, &qp, inject);
    PAIRED.take();
    let mut g = c.benchmark_group("tap_rx_nogso");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::from_parameter(size), |b| {
        b.iter_custom(|iters| interleaved(iters, true, dev_rx, raw_rx))
    });
    g.finish();
    print_paired(&format!("tap_rx_nogso/{size}"), "tap_rx_nogso/tap_readv");
    assert_eq!(rig.borrow().dev.counters().rx_dropped_backend, 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_pair, bench_tap
}
/// Runs `batches` timed-region batches of one row outside criterion, for
/// instruction-level profiles:
/// `PACKET_PATH_PROFILE=<row>:<size>:<batches>`, the row one of `rx`, `tx`,
/// `memcpy`, `taprx`, `tapreadv` (into the guest's buffers), `tapreadvroom` (the
/// same plus room for the largest frame), `tapreadvone` (into one host buffer)
/// or `taprxpair` (a device batch and a `tapreadv` batch in turn); the tap rows
/// need root: run them in a network namespace, `unshare -n`.
/// Every batch goes through one `#[inline(never)]` function (`profiled_rx`,
/// `profiled_tx`, `profiled_memcpy`, `profiled_rx_tap`, `profiled_readv_guest`,
/// `profiled_readv_room`, `profiled_readv`) so that a profiler can count exactly the
/// timed region, e.g.
/// `valgrind --tool=callgrind --toggle-collect='packet_path::profiled_*' <bench> `.
fn profile(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [dir, size, batches] = parts[..] else {
        panic!("PACKET_PATH_PROFILE is <row>:<size>:<batches>, not {spec:?}");
    };
    let size: usize = size.parse().expect("frame size");
    let batches: usize = batches.parse().expect("batches");
    let frame = make_frame(size);
    let ring = PairConfig {
        capacity: (frame.len() + 16) * BATCH,
    };
    match dir {
        "memcpy" => {
            let src = vec![0x5au8; frame.len() * BATCH];
            let mut dst = vec![0u8; frame.len() * BATCH + 8 * BATCH];
            for _ in 0..batches {
                profiled_memcpy(&src, &mut dst, frame.len());
            }
        }
        "tx" => {
            let (end, mut peer) = pair(ring).unwrap();
            let mut rig = Rig::new(end, &frame, 1536);
            let qp = rig.dev.queue_pair(0).unwrap().clone();
            for _ in 0..batches {
                rig.refill_tx();
                peer.discard_incoming();
                let mut q = qp.lock();
                assert_eq!(profiled_tx(&mut q), BATCH);
            }
        }
        "rx" => {
            let (end, mut peer) = pair(ring).unwrap();
            let rx_len = if size > 1514 { 65_562 } else { 1536 };
            let mut rig = Rig::new(end, &frame, rx_len);
            let qp = rig.dev.queue_pair(0).unwrap().clone();
            for _ in 0..batches {
                rig.refill_rx();
                for _ in 0..BATCH {
                    pair_send(&mut peer, &frame).unwrap();
                }
                let mut q = qp.lock();
                assert_eq!(profiled_rx(&mut q), BATCH);
            }
        }
        "taprx" | "taprxpair" | "tapreadv" | "tapreadvroom" | "tapreadvone" => {
            let tap = open_tap().expect("a tap (root, in a network namespace)");
            let injector = PacketSocket::open(&tap, false).expect("packet socket on the tap");
            let mut rig = Rig::new(tap, &frame, RX_LEN);
            let qp = rig.dev.queue_pair(0).unwrap().clone();
            let fd = qp.lock().backend().as_raw_fd();
            let mut buf = vec![0u8; 65_562];
            let rx_iovs: Vec<libc::iovec> = rig
                .rx_addrs
                .iter()
                .map(|a| libc::iovec {
                    iov_base: rig.host_ptr(*a).cast(),
                    iov_len: RX_LEN as usize,
                })
                .collect();
            for _ in 0..batches {
                for _ in 0..BATCH {
                    injector.send(&frame[12..]).unwrap();
                }
                if dir == "taprx" {
                    rig.refill_rx();
                    let mut q = qp.lock();
                    let mut done = 0;
                    while done < BATCH {
                        done += profiled_rx_tap(&mut q);
                    }
                } else if dir == "taprxpair" {
                    // Device and floor batches in turn, for one profile of both.
                    rig.refill_rx();
                    let mut q = qp.lock();
                    let mut done = 0;
                    while done < BATCH {
                        done += profiled_rx_tap(&mut q);
                    }
                    drop(q);
                    for _ in 0..BATCH {
                        injector.send(&frame[12..]).unwrap();
                    }
                    profiled_readv_guest(fd, &rx_iovs);
                } else if dir == "tapreadv" {
                    profiled_readv_guest(fd, &rx_iovs);
                } else if dir == "tapreadvroom" {
                    profiled_readv_room(fd, &rx_iovs, &mut buf[..MAX_BUFFER_LEN - RX_LEN as usize]);
                } else {
                    profiled_readv(fd, &mut buf);
                }
            }
        }
        _ => panic!(
            "PACKET_PATH_PROFILE row is rx, tx, memcpy, taprx, taprxpair, tapreadv, tapreadvroom \
             or tapreadvone, not {dir:?}"
        ),
    }
}

type PairQueue = virtio_net_standby::QueuePair<GuestMem, virtio_net_standby::PairBackend>;

#[inline(never)]
fn profiled_rx(q: &mut PairQueue) -> usize {
    q.process_rx().chains
}

#[inline(never)]
fn profiled_rx_tap(q: &mut virtio_net_standby::QueuePair<GuestMem, Tap>) -> usize {
    q.process_rx().chains
}

#[inline(never)]
fn profiled_readv(fd: i32, buf: &mut [u8]) {
    for _ in 0..BATCH {
        let v = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: reading into a live buffer of its stated size.
        let n = unsafe { libc::readv(fd, &v, 1) };
        assert!(n > 0, "readv: {}", std::io::Error::last_os_error());
    }
}

/// One raw `readv` per frame, each into the next of the guest's RX buffers and
/// then `rest`, so that the largest frame fits.
#[inline(never)]
fn profiled_readv_room(fd: i32, iovs: &[libc::iovec], rest: &mut [u8]) {
    for v in iovs {
        let two = [
            *v,
            libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            },
        ];
        // SAFETY: the first iovec covers a live guest buffer of its stated
        // length, the second `rest`; nothing else touches either meanwhile.
        let n = unsafe { libc::readv(fd, two.as_ptr(), 2) };
        assert!(n > 0, "readv: {}", std::io::Error::last_os_error());
    }
}

/// One raw `readv` per frame, each into the next of the guest's RX buffers.
#[inline(never)]
fn profiled_readv_guest(fd: i32, iovs: &[libc::iovec]) {
    for v in iovs {
        // SAFETY: each iovec covers a live guest buffer of its stated length, which
        // nothing else touches meanwhile.
        let n = unsafe { libc::readv(fd, v, 1) };
        assert!(n > 0, "readv: {}", std::io::Error::last_os_error());
    }
}

#[inline(never)]
fn profiled_tx(q: &mut PairQueue) -> usize {
    q.process_tx().chains
}

#[inline(never)]
fn profiled_memcpy(src: &[u8], dst: &mut [u8], len: usize) {
    let mut off = 0;
    for f in src.chunks_exact(len) {
        dst[off..off + f.len()].copy_from_slice(black_box(f));
        off += f.len() + 8;
    }
    black_box(&dst);
}

fn main() {
    if let Ok(spec) = std::env::var("PACKET_PATH_PROFILE") {
        profile(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
