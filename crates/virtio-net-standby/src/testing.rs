//! Test doubles and a guest-side driver, for tests, benchmarks and fuzzing
//! (feature `test-utils`).
//!
//! - [`TestMemory`]: mmap-backed guest memory with a bump allocator.
//! - [`DriverQueue`]: the driver's half of a split virtqueue: it owns the rings
//!   in guest memory, adds chains, publishes them, and reads used elements back.
//!   It writes exactly what a driver writes, so the device under test cannot
//!   tell it from a real one.
//! - [`RecordingInterrupt`]: counts interrupts per queue.
//! - [`GuestDriver`]: negotiates and activates a whole [`StandbyNet`], posts RX
//!   buffers and sends frames, like a minimal virtio-net driver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// The guest memory type of the test helpers: mmap-backed, with a dirty bitmap
/// (as a VMM that migrates uses), so tests also check the dirty log.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

use crate::backend::NetBackend;
use crate::device::StandbyNet;
use crate::features::Features;
use crate::ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_device::{ActivateQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory for tests: one mmap region at guest address 0 and a bump
/// allocator that hands out the upper half (the lower half is free for tests
/// that place buffers at fixed addresses).
#[derive(Clone)]
pub struct TestMemory {
    mem: Arc<GuestMem>,
    next: Arc<Mutex<u64>>,
    size: u64,
}

impl std::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestMemory({:#x} bytes)", self.size)
    }
}

impl TestMemory {
    /// `size` bytes of guest memory.
    pub fn new(size: u64) -> Self {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), size as usize)]).expect("mmap guest memory");
        TestMemory {
            mem: Arc::new(mem),
            next: Arc::new(Mutex::new(size / 2)),
            size,
        }
    }

    /// The memory map.
    pub fn arc(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// An atomic handle to the memory map, as a device's `activate` wants it.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestMem> {
        GuestMemoryAtomic::from(Arc::clone(&self.mem))
    }

    /// Whether the page holding `gpa` is marked dirty.
    pub fn dirty(&self, gpa: u64) -> bool {
        self.mem
            .iter()
            .next()
            .is_some_and(|r| r.bitmap().dirty_at(gpa as usize))
    }

    /// Clears the dirty log.
    pub fn clear_dirty(&self) {
        for r in self.mem.iter() {
            // The mapping's own bitmap (not the trait's slice view).
            vm_memory::MmapRegion::bitmap(r).reset();
        }
    }

    /// Allocates `len` bytes aligned to `align` from the upper half.
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        let mut next = self.next.lock().expect("allocator lock");
        let at = next.div_ceil(align) * align;
        assert!(at + len <= self.size, "test memory exhausted");
        *next = at + len;
        at
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("write guest memory");
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("read guest memory");
        v
    }

    /// Writes a raw descriptor at `gpa` (for building indirect tables by hand).
    pub fn write_descriptor(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(gpa, &d);
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read u16")
    }

    fn set_u16(&self, gpa: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(gpa)).expect("write u16");
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read u32")
    }
}

/// The driver's half of a split virtqueue. See the module documentation.
pub struct DriverQueue {
    mem: TestMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    published: u16,
    last_used: u16,
    event_idx: bool,
}

impl std::fmt::Debug for DriverQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverQueue")
            .field("size", &self.size)
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish()
    }
}

impl DriverQueue {
    /// A queue of `size` entries with its rings allocated in `mem`.
    pub fn new(mem: &TestMemory, size: u16) -> Self {
        let n = u64::from(size);
        let desc = mem.alloc(16 * n, 16);
        let avail = mem.alloc(6 + 2 * n, 2);
        let used = mem.alloc(6 + 8 * n, 4);
        // Rings start zeroed (fresh mmap), as after a driver's allocation.
        DriverQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            avail_idx: 0,
            published: 0,
            last_used: 0,
            event_idx: false,
        }
    }

    /// Declares whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// The queue as the transport hands it to the device.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        q
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The descriptor the next chain will start with, if one is free. Lets a
    /// driver keep one buffer per descriptor and fill it before adding the chain.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers; returns its head.
    /// The chain is not visible to the device until [`publish`](Self::publish).
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!(
            !bufs.is_empty() && bufs.len() <= self.free.len(),
            "descriptors exhausted"
        );
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("free"))
            .collect();
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if *w { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < ids.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            self.write_desc(ids[i], *addr, *len, flags, next);
        }
        let head = ids[0];
        self.chain_len[usize::from(head)] = ids.len() as u16;
        self.push_avail(head);
        head
    }

    /// Adds a device-readable chain of buffers at `addrs` with lengths `lens`.
    pub fn add_readable(&mut self, addrs: &[u64], lens: &[u32]) -> u16 {
        let b: Vec<_> = addrs
            .iter()
            .zip(lens)
            .map(|(a, l)| (*a, *l, false))
            .collect();
        self.add_chain(&b)
    }

    /// Adds a device-writable chain.
    pub fn add_writable(&mut self, addrs: &[u64], lens: &[u32]) -> u16 {
        let b: Vec<_> = addrs
            .iter()
            .zip(lens)
            .map(|(a, l)| (*a, *l, true))
            .collect();
        self.add_chain(&b)
    }

    /// Adds one descriptor pointing to an indirect table (allocated in guest
    /// memory) holding `bufs`.
    pub fn add_indirect(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let table = self.mem.alloc(16 * bufs.len() as u64, 16);
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if *w { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.mem.write_descriptor(
                table + 16 * i as u64,
                *addr,
                *len,
                flags,
                (i + 1) as u16 % bufs.len() as u16,
            );
        }
        let head = self.free.pop().expect("descriptors exhausted");
        self.write_desc(
            head,
            table,
            16 * bufs.len() as u32,
            VRING_DESC_F_INDIRECT,
            0,
        );
        self.chain_len[usize::from(head)] = 1;
        self.push_avail(head);
        head
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mem
            .write_descriptor(self.desc + 16 * u64::from(i), addr, len, flags, next);
    }

    /// Reads descriptor `i` as `(addr, len, flags, next)`.
    pub fn descriptor(&self, i: u16) -> (u64, u32, u16, u16) {
        let b = self.mem.read(self.desc + 16 * u64::from(i), 16);
        (
            u64::from_le_bytes(b[0..8].try_into().expect("8")),
            u32::from_le_bytes(b[8..12].try_into().expect("4")),
            u16::from_le_bytes([b[12], b[13]]),
            u16::from_le_bytes([b[14], b[15]]),
        )
    }

    /// Overwrites fields of descriptor `i` (the hostile driver's tool).
    pub fn poke_descriptor(
        &self,
        i: u16,
        addr: Option<u64>,
        len: Option<u32>,
        flags: Option<u16>,
        next: Option<u16>,
    ) {
        let (a, l, f, n) = self.descriptor(i);
        self.write_desc(
            i,
            addr.unwrap_or(a),
            len.unwrap_or(l),
            flags.unwrap_or(f),
            next.unwrap_or(n),
        );
    }

    fn push_avail(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem.set_u16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every chain added so far visible to the device.
    pub fn publish(&mut self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.set_u16(self.avail + 2, self.avail_idx);
        self.published = self.avail_idx;
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Writes the available index directly (the hostile driver's tool).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.set_u16(self.avail + 2, idx);
    }

    /// Writes the avail ring entry for position `pos` directly.
    pub fn set_avail_entry(&self, pos: u16, head: u16) {
        self.mem
            .set_u16(self.avail + 4 + 2 * u64::from(pos % self.size), head);
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn set_no_interrupt(&self, on: bool) {
        self.mem
            .set_u16(self.avail, if on { VRING_AVAIL_F_NO_INTERRUPT } else { 0 });
    }

    /// Writes `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        self.mem
            .set_u16(self.avail + 4 + 2 * u64::from(self.size), v);
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.mem.u16_at(self.used + 4 + 8 * u64::from(self.size))
    }

    /// The device's used-ring flags.
    pub fn used_flags(&self) -> u16 {
        self.mem.u16_at(self.used)
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.u16_at(self.used + 2)
    }

    /// Takes the next used element `(id, len)`, freeing its descriptors. With
    /// EVENT_IDX it then asks for an interrupt at the next used element, as
    /// Linux's `virtqueue_get_buf` does while callbacks are enabled.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let popped = self.take_used();
        if self.event_idx {
            self.set_used_event(self.last_used);
        }
        Some(popped)
    }

    fn take_used(&mut self) -> (u16, u32) {
        let slot = u64::from(self.last_used % self.size);
        let id = self.mem.u32_at(self.used + 4 + 8 * slot);
        let len = self.mem.u32_at(self.used + 8 + 8 * slot);
        self.last_used = self.last_used.wrapping_add(1);
        let id16 = id as u16;
        if let Some(n) = self.chain_len.get(usize::from(id16)).copied() {
            let mut d = id16;
            for i in 0..n {
                self.free.push(d);
                if i + 1 < n {
                    d = self.descriptor(d).3;
                }
            }
            self.chain_len[usize::from(id16)] = 0;
        }
        (id16, len)
    }

    /// Chains published and not yet returned by the device.
    pub fn in_flight(&self) -> u16 {
        self.published.wrapping_sub(self.used_idx())
    }
}

/// Counts interrupts per kind. Implements [`VirtioInterrupt`].
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    config: AtomicU64,
    queues: Mutex<Vec<u64>>,
}

impl RecordingInterrupt {
    /// Configuration-change interrupts raised.
    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::SeqCst)
    }

    /// Interrupts raised for queue `q`.
    pub fn queue_count(&self, q: u16) -> u64 {
        self.queues
            .lock()
            .expect("lock")
            .get(usize::from(q))
            .copied()
            .unwrap_or(0)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        match t {
            VirtioInterruptType::Config => {
                self.config.fetch_add(1, Ordering::SeqCst);
            }
            VirtioInterruptType::Queue(q) => {
                let mut v = self.queues.lock().expect("lock");
                if v.len() <= usize::from(q) {
                    v.resize(usize::from(q) + 1, 0);
                }
                v[usize::from(q)] += 1;
            }
        }
        Ok(())
    }
}

/// Builds an Ethernet frame with a virtio-net header in front: destination,
/// a fixed source, EtherType 0x88b5 (local experimental) and `payload`.
pub fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; crate::header::HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}

/// A minimal IPv4/TCP Ethernet frame (no virtio-net header) carrying `payload`
/// bytes `0, 1, 2, ...`: what a kernel on the other side of a tap can parse. The
/// TCP checksum is left zero (partial), as a guest using checksum offload leaves it.
pub fn tcp4_frame(dst: [u8; 6], src: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    // Ports 12345 -> 80, seq 1, data offset 5, ACK|PSH, window 65535.
    f.extend_from_slice(&[
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

/// Where a randomized driver gets its choices: a generator in tests, a fuzzer's
/// input in fuzz targets.
pub trait Entropy {
    /// The next 64 bits.
    fn next_u64(&mut self) -> u64;

    /// A value in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The header of a TCP/IPv4 TSO frame built by [`tcp4_frame`]: partial checksum
/// at the TCP checksum field, segments of `gso_size` bytes.
pub fn tso4_header(gso_size: u16) -> crate::VirtioNetHdr {
    crate::VirtioNetHdr {
        flags: crate::header::FLAG_NEEDS_CSUM,
        gso_type: crate::header::GSO_TCPV4,
        hdr_len: 54,
        gso_size,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// xorshift64*: a small deterministic generator for randomized tests.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Entropy for Rng {
    /// The next 64 random bits. The seed must not be zero.
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A fuzzer's input as [`Entropy`]: 8 bytes per draw, zeros once it runs out.
#[derive(Debug, Clone)]
pub struct InputBytes<'a>(pub &'a [u8]);

impl InputBytes<'_> {
    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Entropy for InputBytes<'_> {
    fn next_u64(&mut self) -> u64 {
        let n = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(b)
    }
}

/// A minimal virtio-net driver over [`DriverQueue`]s: negotiates, activates,
/// sends frames and posts receive buffers.
pub struct GuestDriver {
    /// Guest memory.
    pub mem: TestMemory,
    /// Receive queues, per pair.
    pub rx: Vec<DriverQueue>,
    /// Transmit queues, per pair.
    pub tx: Vec<DriverQueue>,
    /// The control queue, if negotiated.
    pub ctrl: Option<DriverQueue>,
    /// Interrupts the device raised.
    pub interrupt: Arc<RecordingInterrupt>,
    /// What was negotiated.
    pub features: Features,
    /// Bytes per receive buffer.
    pub rx_buf_len: u32,
    rx_bufs: Vec<Vec<u64>>,
    /// The kick eventfd of every queue, by queue index (the device holds clones).
    pub kicks: Vec<EventFd>,
}

impl std::fmt::Debug for GuestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDriver")
            .field("features", &self.features)
            .finish()
    }
}

impl GuestDriver {
    /// Acknowledges `features` (intersected with the offer), sets up every queue
    /// with `queue_size` entries and activates the device.
    pub fn bring_up<B: NetBackend>(
        dev: &mut StandbyNet<GuestMem, B>,
        mem: &TestMemory,
        features: Features,
        queue_size: u16,
    ) -> Result<GuestDriver, crate::Error> {
        let acked = features.intersection(Features::from_bits(dev.features()));
        dev.ack_features(acked.bits())?;
        Self::attach(dev, mem, acked, queue_size)
    }

    /// Sets up the queues and activates a device whose features were already
    /// acknowledged (or restored).
    pub fn attach<B: NetBackend>(
        dev: &mut StandbyNet<GuestMem, B>,
        mem: &TestMemory,
        acked: Features,
        queue_size: u16,
    ) -> Result<GuestDriver, crate::Error> {
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
        let event_idx = acked.has(crate::features::F_RING_EVENT_IDX);
        let pairs = if acked.has(VIRTIO_NET_F_MQ) {
            dev.queue_pairs().len()
        } else {
            1
        };
        let mk = || {
            let mut q = DriverQueue::new(mem, queue_size);
            q.set_event_idx(event_idx);
            q
        };
        let rx: Vec<_> = (0..pairs).map(|_| mk()).collect();
        let tx: Vec<_> = (0..pairs).map(|_| mk()).collect();
        let ctrl = acked.has(VIRTIO_NET_F_CTRL_VQ).then(mk);
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        let mut add = |index: usize, queue: Queue| {
            let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            queues.push(ActivateQueue {
                index: index as u16,
                queue,
                kick: Some(kick.try_clone().expect("eventfd clone")),
            });
            kicks.push(kick);
        };
        for i in 0..pairs {
            add(2 * i, rx[i].queue());
            add(2 * i + 1, tx[i].queue());
        }
        if let Some(c) = &ctrl {
            add(2 * pairs, c.queue());
        }
        let interrupt = Arc::new(RecordingInterrupt::default());
        dev.activate(mem.atomic(), interrupt.clone(), queues)?;
        Ok(GuestDriver {
            mem: mem.clone(),
            rx,
            tx,
            ctrl,
            interrupt,
            features: acked,
            rx_buf_len: 1536,
            rx_bufs: vec![Vec::new(); pairs],
            kicks,
        })
    }

    /// Kicks queue `index` (what the driver's notify write does).
    pub fn kick(&self, index: usize) {
        self.kicks[index].write(1).expect("kick");
    }

    /// Posts `n` receive buffers of [`rx_buf_len`](Self::rx_buf_len) bytes on
    /// pair `pair`, each a one-descriptor chain.
    pub fn post_rx(&mut self, pair: usize, n: usize) {
        for _ in 0..n {
            let addr = self.mem.alloc(u64::from(self.rx_buf_len), 64);
            let h = self.rx[pair].add_writable(&[addr], &[self.rx_buf_len]);
            let bufs = &mut self.rx_bufs[pair];
            if bufs.len() <= usize::from(h) {
                bufs.resize(usize::from(h) + 1, 0);
            }
            bufs[usize::from(h)] = addr;
        }
        self.rx[pair].publish();
    }

    /// Re-posts the buffer of chain `head` (after the device used it).
    pub fn repost_rx(&mut self, pair: usize, head: u16) {
        let addr = self.rx_bufs[pair][usize::from(head)];
        let h = self.rx[pair].add_writable(&[addr], &[self.rx_buf_len]);
        let bufs = &mut self.rx_bufs[pair];
        if bufs.len() <= usize::from(h) {
            bufs.resize(usize::from(h) + 1, 0);
        }
        bufs[usize::from(h)] = addr;
    }

    /// Guest address of the buffer behind RX chain `head`.
    pub fn rx_buffer(&self, pair: usize, head: u16) -> u64 {
        self.rx_bufs[pair][usize::from(head)]
    }

    /// Reads the next received frame (header included) from pair `pair`,
    /// collecting merged buffers, and re-posts the buffers. `None` when the
    /// device returned nothing.
    pub fn recv(&mut self, pair: usize) -> Option<Vec<u8>> {
        let (head, len) = self.rx[pair].pop_used()?;
        let mut out = self.mem.read(self.rx_buffer(pair, head), len as usize);
        self.repost_rx(pair, head);
        let num = u16::from_le_bytes([out[10], out[11]]);
        for _ in 1..num {
            let (h, l) = self.rx[pair].pop_used().expect("merged buffer");
            out.extend(self.mem.read(self.rx_buffer(pair, h), l as usize));
            self.repost_rx(pair, h);
        }
        self.rx[pair].publish();
        Some(out)
    }

    /// Copies `frame` (header included) into fresh guest memory and queues it on
    /// pair `pair`'s TX queue as one descriptor (not yet published).
    pub fn queue_tx(&mut self, pair: usize, frame: &[u8]) -> u16 {
        let addr = self.mem.alloc(frame.len() as u64, 64);
        self.mem.write(addr, frame);
        self.tx[pair].add_readable(&[addr], &[frame.len() as u32])
    }

    /// Sends a control command; returns the chain head. Publish and process the
    /// control queue, then read the ack with [`ctrl_ack`](Self::ctrl_ack).
    pub fn queue_ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> (u16, u64) {
        let mut bytes = vec![class, cmd];
        bytes.extend_from_slice(data);
        let out = self.mem.alloc(bytes.len() as u64, 8);
        self.mem.write(out, &bytes);
        let ack = self.mem.alloc(1, 1);
        self.mem.write(ack, &[0xee]);
        let ctrl = self.ctrl.as_mut().expect("control queue negotiated");
        let h = ctrl.add_chain(&[(out, bytes.len() as u32, false), (ack, 1, true)]);
        ctrl.publish();
        (h, ack)
    }

    /// Runs a control command through the device; returns the ack byte.
    pub fn ctrl<B: NetBackend>(
        &mut self,
        dev: &StandbyNet<GuestMem, B>,
        class: u8,
        cmd: u8,
        data: &[u8],
    ) -> u8 {
        let (h, ack) = self.queue_ctrl(class, cmd, data);
        dev.process_ctrl();
        let (id, len) = self
            .ctrl
            .as_mut()
            .expect("ctrl")
            .pop_used()
            .expect("ctrl used");
        assert_eq!((id, len), (h, 1));
        self.mem.read(ack, 1)[0]
    }
}

/// Sends `frame` (header included) into a pair end, as if a peer device had.
pub fn pair_send(end: &mut crate::PairBackend, frame: &[u8]) -> std::io::Result<()> {
    let iov = [libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    }];
    // SAFETY: the iovec describes `frame`, readable for its length, and the
    // backend only reads through it.
    let f = unsafe { crate::TxFrame::new(&iov, frame.len()) };
    end.send(&f)?;
    end.flush()
}

/// Receives the next frame (header included) a pair end holds.
pub fn pair_recv(end: &mut crate::PairBackend) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; crate::header::MAX_BUFFER_LEN];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, writable for its length, untouched
    // meanwhile.
    let mut b = unsafe { crate::RxBuffers::new(&iov, buf.len()) };
    let n = end.recv(&mut b)?;
    end.flush()?;
    buf.truncate(n);
    Ok(buf)
}

/// What a [`RecordingBackend`] was told.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackendLog {
    /// Frames sent, header included.
    pub sent: Vec<Vec<u8>>,
    /// Every `set_offloads` call.
    pub offloads: Vec<Features>,
    /// Every `set_enabled` call.
    pub enabled: Vec<bool>,
}

/// A backend that records what the device does to it and delivers frames
/// queued in [`RecordingBackend::incoming`].
#[derive(Debug, Default, Clone)]
pub struct RecordingBackend {
    /// Behave like a tap: never tell the length of the next frame.
    pub opaque: bool,
    /// Behave like a tap given too little room: copy what fits and report the
    /// frame's full length (instead of failing with `EFAULT`).
    pub truncating: bool,
    /// Fail every receive with `EBADFD`, as a detached tap queue does.
    pub failing: bool,
    /// What the device did.
    pub log: Arc<Mutex<BackendLog>>,
    /// Frames to deliver, header included, oldest first.
    pub incoming: Arc<Mutex<std::collections::VecDeque<Vec<u8>>>>,
    /// Make `send` return `WouldBlock`.
    pub full: Arc<std::sync::atomic::AtomicBool>,
}

impl NetBackend for RecordingBackend {
    fn send(&mut self, frame: &crate::TxFrame<'_>) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let mut v = vec![0u8; frame.len()];
        frame.copy_to(&mut v);
        self.log.lock().expect("lock").sent.push(v);
        Ok(())
    }

    fn recv(&mut self, bufs: &mut crate::RxBuffers<'_>) -> std::io::Result<usize> {
        if self.failing {
            return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
        }
        let f = self
            .incoming
            .lock()
            .expect("lock")
            .pop_front()
            .ok_or(std::io::ErrorKind::WouldBlock)?;
        if f.len() > bufs.capacity() {
            if self.truncating {
                bufs.write_at(0, &f[..bufs.capacity()]);
                return Ok(f.len());
            }
            // The frame is lost, EFAULT.
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        bufs.write_at(0, &f);
        Ok(f.len())
    }

    fn peek(&mut self) -> crate::RxPeek {
        if self.opaque {
            return crate::RxPeek::Unknown;
        }
        match self.incoming.lock().expect("lock").front() {
            Some(f) => crate::RxPeek::Frame(f.len()),
            None => crate::RxPeek::Empty,
        }
    }

    fn offloads_supported(&self) -> Features {
        crate::features::GUEST_OFFLOADS.union(crate::features::HOST_OFFLOADS)
    }

    fn set_offloads(&mut self, guest: Features) -> std::io::Result<()> {
        self.log.lock().expect("lock").offloads.push(guest);
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        self.log.lock().expect("lock").enabled.push(enabled);
        Ok(())
    }
}

/// A hostile guest driving one standby device on an in-process pair: it writes
/// garbage into descriptor tables, ring indices, suppression fields and control
/// commands, posts real buffers and frames too, and calls the device between
/// scribbles, snapshotting and resetting now and then. Every processing call
/// checks the device's own ring invariants (indices only move forward, by a bounded
/// amount, and the device never returns more buffers than it took); the device
/// must never panic or loop.
///
/// [`HostileGuest::run`] takes its choices from any [`Entropy`]: the hostile-guest
/// test uses a seeded generator, the fuzz target libFuzzer's input.
pub struct HostileGuest {
    dev: StandbyNet<GuestMem, crate::PairBackend>,
    peer: crate::PairBackend,
    g: GuestDriver,
    mem: TestMemory,
    /// Processing passes run so far.
    pub passes: u64,
    /// Times the device flagged NEEDS_RESET (and was reset).
    pub resets: u64,
}

impl std::fmt::Debug for HostileGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileGuest")
            .field("passes", &self.passes)
            .finish()
    }
}

impl HostileGuest {
    /// Guest memory size.
    pub const MEM: u64 = 4 << 20;
    /// Queue size.
    pub const QSIZE: u16 = 16;

    /// Builds the device and negotiates a random acceptable feature set.
    pub fn new(e: &mut impl Entropy) -> Option<Self> {
        let (dev, peer, g, mem) = Self::bring_up(e)?;
        Some(HostileGuest {
            dev,
            peer,
            g,
            mem,
            passes: 0,
            resets: 0,
        })
    }

    #[allow(clippy::type_complexity)]
    fn bring_up(
        e: &mut impl Entropy,
    ) -> Option<(
        StandbyNet<GuestMem, crate::PairBackend>,
        crate::PairBackend,
        GuestDriver,
        TestMemory,
    )> {
        let (end, peer) = crate::pair(crate::PairConfig { capacity: 0 }).ok()?;
        let mut dev: StandbyNet<GuestMem, crate::PairBackend> = crate::StandbyNetBuilder::new()
            .queue_size(Self::QSIZE)
            .build(vec![end])
            .ok()?;
        let mem = TestMemory::new(Self::MEM);
        let features = crate::features::prune(Features::from_bits(
            crate::features::DEFAULT_OFFER.bits() & e.next_u64(),
        ))
        .with(crate::features::F_VERSION_1);
        let g = GuestDriver::bring_up(&mut dev, &mem, features, Self::QSIZE).ok()?;
        Some((dev, peer, g, mem))
    }

    /// Runs `steps` random operations.
    pub fn run(&mut self, e: &mut impl Entropy, steps: usize) {
        for _ in 0..steps {
            self.step(e);
        }
    }

    fn addr(&self, e: &mut impl Entropy) -> u64 {
        match e.below(10) {
            0 => u64::MAX - e.below(64),
            1 => Self::MEM - e.below(64),
            2 => e.next_u64(),
            _ => e.below(Self::MEM),
        }
    }

    fn len(e: &mut impl Entropy) -> u32 {
        match e.below(10) {
            0 => u32::MAX - e.below(16) as u32,
            1 => 70_000 + e.below(100_000) as u32,
            2 => 0,
            _ => e.below(4096) as u32,
        }
    }

    /// Rings of every queue: (descriptor table, avail ring).
    fn rings(&self) -> Vec<(u64, u64)> {
        use virtio_queue::QueueT;
        self.g
            .rx
            .iter()
            .chain(self.g.tx.iter())
            .chain(self.g.ctrl.iter())
            .map(|q| {
                let q = q.queue();
                (q.desc_table(), q.avail_ring())
            })
            .collect()
    }

    fn scribble(&mut self, e: &mut impl Entropy) {
        let rings = self.rings();
        let (desc, avail) = rings[e.below(rings.len() as u64) as usize];
        let q = u64::from(Self::QSIZE);
        match e.below(8) {
            // A random descriptor.
            0..=2 => {
                let i = e.below(q);
                let flags = e.below(8) as u16;
                let next = if e.chance(80) {
                    e.below(q)
                } else {
                    e.next_u64()
                } as u16;
                let (a, l) = (self.addr(e), Self::len(e));
                self.mem.write_descriptor(desc + 16 * i, a, l, flags, next);
            }
            // A random avail entry, published with a random step.
            3 | 4 => {
                let idx =
                    u16::from_le_bytes(self.mem.read(avail + 2, 2).try_into().expect("2 bytes"));
                let head = if e.chance(98) {
                    e.below(q)
                } else {
                    e.next_u64()
                } as u16;
                self.mem.write(
                    avail + 4 + 2 * u64::from(idx % Self::QSIZE),
                    &head.to_le_bytes(),
                );
                let step = match e.below(20) {
                    0 => e.next_u64() as u16,
                    1 => 0,
                    _ => 1 + e.below(3) as u16,
                };
                self.mem
                    .write(avail + 2, &idx.wrapping_add(step).to_le_bytes());
            }
            // Suppression fields.
            5 => {
                self.mem.write(avail, &(e.below(4) as u16).to_le_bytes());
                let used_event = e.next_u64() as u16;
                self.mem.write(avail + 4 + 2 * q, &used_event.to_le_bytes());
            }
            // An indirect table of random descriptors.
            6 => {
                let i = e.below(q);
                let table = e.below(Self::MEM / 2) & !15;
                let n = 1 + e.below(20);
                for k in 0..n {
                    let next = e.below(n + 2) as u16;
                    let (a, l) = (self.addr(e), Self::len(e));
                    self.mem
                        .write_descriptor(table + 16 * k, a, l, e.below(8) as u16, next);
                }
                let len = (16 * n) as u32 + if e.chance(10) { 8 } else { 0 };
                self.mem.write_descriptor(desc + 16 * i, table, len, 4, 0);
            }
            // Raw noise anywhere in a ring.
            _ => {
                let at = [desc, avail][e.below(2) as usize] + e.below(64);
                let noise: Vec<u8> = (0..1 + e.below(16)).map(|_| e.next_u64() as u8).collect();
                self.mem.write(at, &noise);
            }
        }
    }

    /// `(next_avail, next_used)` of the RX and TX queues, as the device sees them.
    /// (The guest's copy of the used index is no witness: a hostile guest may point
    /// receive buffers at its own used ring.)
    fn positions(&self) -> Vec<(u16, u16)> {
        match self
            .dev
            .queue_pair(0)
            .expect("pair 0")
            .lock()
            .queue_states()
        {
            Some((rx, tx)) => vec![(rx.next_avail, rx.next_used), (tx.next_avail, tx.next_used)],
            None => vec![],
        }
    }

    fn process(&mut self) {
        let before = self.positions();
        let qp = self.dev.queue_pair(0).expect("pair 0").clone();
        qp.process_tx();
        qp.process_rx();
        self.dev.process_ctrl();
        self.passes += 1;
        let after = self.positions();
        for ((ba, bu), (aa, au)) in before.iter().zip(&after) {
            assert!(
                aa.wrapping_sub(*ba) <= 2048,
                "avail position jumped {ba} -> {aa}"
            );
            assert!(
                au.wrapping_sub(*bu) <= 2048,
                "used position jumped {bu} -> {au}"
            );
            assert!(
                aa.wrapping_sub(*au) <= 2048,
                "used position {au} passed avail {aa}"
            );
        }
        // Take back what the device returned, so descriptors can be reused.
        for q in self
            .g
            .tx
            .iter_mut()
            .chain(self.g.ctrl.iter_mut())
            .chain(self.g.rx.iter_mut())
        {
            while q.pop_used().is_some() {}
        }
    }

    /// One random operation.
    pub fn step(&mut self, e: &mut impl Entropy) {
        match e.below(10) {
            0..=4 => self.scribble(e),
            5 => {
                let n = 14 + e.below(3000) as usize;
                let mut f: Vec<u8> = (0..n).map(|_| e.next_u64() as u8).collect();
                // Mostly unicast to us, sometimes not.
                f[12] = 0x52;
                let _ = pair_send(&mut self.peer, &f);
            }
            6 => {
                // Legitimate buffers too, so the paths past validation run.
                if self.g.rx[0].free_descriptors() > 0 && e.chance(50) {
                    self.g.post_rx(0, 1);
                }
                if self.g.tx[0].free_descriptors() > 0 {
                    let f = vec![e.next_u64() as u8; 12 + e.below(1500) as usize];
                    self.g.queue_tx(0, &f);
                    self.g.tx[0].publish();
                }
            }
            7 => {
                if e.chance(20) {
                    // Snapshot, maybe corrupt, restore into a fresh device.
                    let mut bytes = self.dev.snapshot().to_bytes();
                    if e.chance(50) && !bytes.is_empty() {
                        let i = e.below(bytes.len() as u64) as usize;
                        bytes[i] ^= 1 << e.below(8);
                    }
                    if let Ok(state) = crate::NetState::from_bytes(&bytes) {
                        if let Ok((end, _peer)) = crate::pair(crate::PairConfig { capacity: 0 }) {
                            let built: Result<StandbyNet<GuestMem, crate::PairBackend>, _> =
                                crate::StandbyNetBuilder::new()
                                    .queue_size(Self::QSIZE)
                                    .build(vec![end]);
                            if let Ok(mut d) = built {
                                let _ = d.restore(&state);
                            }
                        }
                    }
                } else if e.chance(10) {
                    self.renew(e);
                }
            }
            _ => self.process(),
        }
        if self.dev.needs_reset() {
            self.resets += 1;
            self.renew(e);
        }
    }

    /// Resets the device and brings it up again with a new negotiation.
    fn renew(&mut self, e: &mut impl Entropy) {
        self.dev.reset();
        if let Some((dev, peer, g, mem)) = Self::bring_up(e) {
            self.dev = dev;
            self.peer = peer;
            self.g = g;
            self.mem = mem;
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> crate::NetCounters {
        self.dev.counters()
    }
}

/// The host side of a tap: a raw packet socket bound to the tap's interface.
/// What the guest sends through the tap arrives here; what is sent here comes out
/// of the tap into the device. Needs CAP_NET_RAW.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    const ETH_P_ALL: u16 = 0x0003;

    /// Opens a socket on `tap`'s interface. With `vnet_hdr`, frames sent carry a
    /// 10-byte `virtio_net_hdr` in front (`PACKET_VNET_HDR`), so the kernel can be
    /// handed GSO frames.
    pub fn open(tap: &crate::Tap, vnet_hdr: bool) -> std::io::Result<PacketSocket> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let proto = i32::from(Self::ETH_P_ALL.to_be());
        // SAFETY: plain socket(2); the result is checked.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let ifindex = tap.if_index().map_err(std::io::Error::other)? as i32;
        let sll = Self::address(ifindex, Self::ETH_P_ALL.to_be());
        // SAFETY: binding with a correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let set = |level, name, value: *const libc::c_void, len: usize| {
            // SAFETY: `value` points to a live option value of `len` bytes.
            let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value, len as u32) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        if vnet_hdr {
            let one: libc::c_int = 1;
            set(
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            )?;
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        set(
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>(),
        )?;
        Ok(PacketSocket { fd, ifindex })
    }

    fn address(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll
    }

    /// Sends one frame (Ethernet header first; with `vnet_hdr`, the 10-byte
    /// header before it) out of the tap's interface, towards the tap's reader.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let sll = Self::address(self.ifindex, 0);
        // SAFETY: sending from a live buffer with a correctly sized address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n != frame.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame the interface received (not one this host sent) for which
    /// `want` holds, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: std::time::Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        while std::time::Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into a live buffer of its stated size.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let f = &buf[..n as usize];
            if want(f) {
                return Some(f.to_vec());
            }
        }
        None
    }
}
