//! [`DriverQueue`]: the driver's half of a split virtqueue.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};

use super::TestMemory;
use crate::ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// The driver's half of a split virtqueue: it owns the rings in guest memory,
/// adds chains, publishes them, and reads used elements back. It writes exactly
/// what a driver writes, so the device under test cannot tell it from a real one.
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
        Self::at(mem, size, desc, avail, used)
    }

    /// The driver's half of a queue whose rings were already placed (by a probe
    /// that programmed a transport's queue registers): `size` entries, the
    /// descriptor table at `desc`, the available ring at `avail`, the used ring
    /// at `used`, all still zeroed.
    pub fn at(mem: &TestMemory, size: u16, desc: u64, avail: u64, used: u64) -> Self {
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
