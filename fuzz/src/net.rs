//! The standby device behind a guest that writes its rings by hand, with a
//! shadow copy of guest memory: what the queue targets (`tx_queue`, `rx_queue`,
//! `ctrl_queue`) share.
//!
//! Guest memory is [`MEM`] bytes: the data area ([`DATA_LEN`] bytes at 0) where
//! well-formed buffers go, four indirect tables after it, and the rings the
//! [`GuestDriver`] allocated in the upper half. Around every processing call
//! the rig copies guest memory and checks that the device wrote nothing
//! outside the used ring and the device-writable buffers the guest ever
//! described, that each used length fits its chain's writable length, and
//! that the counters add up.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use virtio_device::VirtioDevice;
use virtio_net_standby::features::{self, F_VERSION_1, Features};
use virtio_net_standby::testing::{GuestDriver, GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{NetCounters, Processed, StandbyNet, StandbyNetBuilder};
use virtio_queue::QueueT;

/// Guest memory size.
pub const MEM: u64 = 128 << 10;
/// The data area, at guest address 0.
pub const DATA_LEN: u64 = 48 << 10;
/// Where the indirect tables start (right after the data area).
pub const IND_BASE: u64 = DATA_LEN;
/// Entries per indirect table.
pub const IND_ENTRIES: u64 = 32;
/// Indirect tables.
pub const IND_TABLES: u64 = 4;
/// The virtio-net header (VERSION_1 is always negotiated).
pub const HDR_LEN: u64 = 12;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Which queue a rig drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Pair 0's receive queue.
    Rx,
    /// Pair 0's transmit queue.
    Tx,
    /// The control queue.
    Ctrl,
}

/// A descriptor as the fuzzer writes it, before its fields are mapped to
/// interesting values.
#[derive(Arbitrary, Debug, Clone)]
pub struct RawDesc {
    /// Chooses how `addr` is read (data area, near the end of memory, a ring...).
    pub addr_kind: u8,
    /// The address seed.
    pub addr: u32,
    /// Chooses how `len` is read (small, zero, huge...).
    pub len_kind: u8,
    /// The length seed.
    pub len: u32,
    /// NEXT, WRITE and INDIRECT, and whatever else.
    pub flags: u8,
    /// `next`: mostly inside the table, sometimes anything.
    pub next: u16,
}

/// What a guest does to the queue.
#[derive(Arbitrary, Debug, Clone)]
pub enum QueueOp {
    /// Writes one descriptor of the main table (`table` 0) or of an indirect
    /// table (1 to 4).
    Desc {
        /// Which table.
        table: u8,
        /// Which entry.
        index: u16,
        /// What.
        d: RawDesc,
    },
    /// Writes a well-formed chain into the data area starting at descriptor
    /// `head` and makes it available.
    Chain {
        /// The first descriptor.
        head: u16,
        /// `(length, device-writable)` of each buffer.
        bufs: Vec<(u16, bool)>,
        /// Put the buffers in an indirect table.
        indirect: bool,
    },
    /// Puts `head` in the next available entry and moves the index by `step`.
    Publish {
        /// The head.
        head: u16,
        /// How far the index moves (usually 1).
        step: u8,
    },
    /// Writes the available index.
    AvailIdx(u16),
    /// Writes the available ring's flags and `used_event`.
    Suppress {
        /// VRING_AVAIL_F_NO_INTERRUPT and others.
        flags: u16,
        /// `used_event` (EVENT_IDX).
        used_event: u16,
    },
    /// Raw bytes anywhere in guest memory.
    Poke {
        /// Where (modulo the memory size).
        at: u32,
        /// What.
        bytes: Vec<u8>,
    },
    /// A frame arrives at the backend (RX), header included.
    Frame {
        /// Its length (header included).
        len: u16,
        /// Destination: ours, broadcast, multicast, someone else's.
        dst: u8,
        /// Filler byte.
        fill: u8,
    },
    /// The backend fills up or drains (TX).
    Full(bool),
    /// The link goes down or up.
    Link(bool),
    /// The device processes the queue.
    Process,
}

/// The rings of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Rings {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Queue size.
    pub size: u16,
}

impl Rings {
    fn used_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }
}

/// A byte range `[start, end)` of guest memory.
type Range = (u64, u64);

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn clip(addr: u64, len: u64) -> Option<Range> {
    if addr >= MEM || len == 0 {
        return None;
    }
    Some((addr, addr.saturating_add(len).min(MEM)))
}

/// A descriptor read from the shadow copy.
fn desc_at(mem: &[u8], at: u64) -> Option<(u64, u32, u16, u16)> {
    let at = usize::try_from(at).ok()?;
    let b = mem.get(at..at.checked_add(16)?)?;
    Some((
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u16::from_le_bytes(b[12..14].try_into().ok()?),
        u16::from_le_bytes(b[14..16].try_into().ok()?),
    ))
}

fn u16_at(mem: &[u8], at: u64) -> u16 {
    let at = at as usize;
    u16::from_le_bytes([mem[at], mem[at + 1]])
}

fn u32_at(mem: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(mem[at..at + 4].try_into().expect("4 bytes"))
}

/// The standby device with one queue driven by hand.
pub struct Rig {
    /// The device.
    pub dev: StandbyNet<GuestMem, RecordingBackend>,
    /// Its backend (shares its log and incoming queue).
    pub be: RecordingBackend,
    /// Guest memory.
    pub mem: TestMemory,
    /// The queues' layout and what was negotiated.
    pub g: GuestDriver,
    /// Which queue the ops go to.
    pub which: Which,
    /// That queue's rings.
    pub rings: Rings,
    /// Every device-writable range any descriptor ever described.
    writable: Vec<Range>,
    /// Every indirect table any descriptor ever pointed at.
    tables: Vec<Range>,
    /// A device-writable range overlapped a descriptor table or the used ring:
    /// the device may legitimately have rewritten its own descriptors, so the
    /// memory checks stop.
    unclean: bool,
    /// The guest wrote over the used index since the last pass.
    used_index_poked: bool,
    /// Per head, the largest writable length its chain had when the device
    /// could take it: a receive chain the device staged keeps the buffers it
    /// read, even if the guest rewrites its descriptors afterwards.
    room_seen: Vec<u64>,
    /// Where the next well-formed buffer goes in the data area.
    cursor: u64,
    /// Frames handed to the backend.
    pub fed: u64,
    /// Processing passes run.
    pub passes: u64,
}

impl Rig {
    /// Queue sizes the rigs pick from.
    pub const SIZES: [u16; 6] = [1, 2, 4, 8, 16, 256];

    /// Builds the device, negotiates `features` (pruned to a valid set of what
    /// the device offers, VERSION_1 always) and activates it with queues of
    /// `size` entries.
    pub fn new(
        which: Which,
        features: u64,
        size: u16,
        opaque: bool,
        truncating: bool,
    ) -> Option<Rig> {
        let be = RecordingBackend {
            opaque,
            truncating,
            ..Default::default()
        };
        let mut dev: StandbyNet<GuestMem, RecordingBackend> = StandbyNetBuilder::new()
            .queue_size(256)
            .build(vec![be.clone()])
            .ok()?;
        let mem = TestMemory::new(MEM);
        let mut f = Features::from_bits(features::DEFAULT_OFFER.bits() & features);
        if which == Which::Ctrl {
            f = f.with(virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ);
        }
        let f = features::prune(f.with(F_VERSION_1));
        if which == Which::Ctrl && !f.has(virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ) {
            return None;
        }
        let g = GuestDriver::bring_up(&mut dev, &mem, f, size).ok()?;
        let q = match which {
            Which::Rx => g.rx[0].queue(),
            Which::Tx => g.tx[0].queue(),
            Which::Ctrl => g.ctrl.as_ref()?.queue(),
        };
        let rings = Rings {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size,
        };
        Some(Rig {
            dev,
            be,
            mem,
            g,
            which,
            rings,
            writable: Vec::new(),
            tables: Vec::new(),
            unclean: false,
            used_index_poked: false,
            room_seen: vec![0; usize::from(size)],
            cursor: 0,
            fed: 0,
            passes: 0,
        })
    }

    fn map_addr(&self, d: &RawDesc) -> u64 {
        let a = u64::from(d.addr);
        match d.addr_kind % 16 {
            0 => u64::MAX - a % 64,
            1 => MEM - a % 64,
            2 => {
                let r = &self.rings;
                [r.desc, r.avail, r.used][(a % 3) as usize] + (a >> 8) % 64
            }
            3 => IND_BASE + a % (IND_TABLES * IND_ENTRIES * 16),
            4 => a,
            _ => a % DATA_LEN,
        }
    }

    fn map_len(d: &RawDesc) -> u32 {
        match d.len_kind % 8 {
            0 => u32::MAX - d.len % 16,
            1 => 0,
            2 => 65_536 + d.len % 100_000,
            3 => HDR_LEN as u32,
            _ => d.len % 2048,
        }
    }

    fn table_base(&self, table: u8) -> (u64, u64) {
        match table % (IND_TABLES as u8 + 1) {
            0 => (self.rings.desc, u64::from(self.rings.size)),
            t => (IND_BASE + u64::from(t - 1) * IND_ENTRIES * 16, IND_ENTRIES),
        }
    }

    fn avail_idx(&self) -> u16 {
        u16::from_le_bytes(
            self.mem
                .read(self.rings.avail + 2, 2)
                .try_into()
                .expect("2 bytes"),
        )
    }

    fn publish(&self, head: u16, step: u16) {
        let idx = self.avail_idx();
        let slot = self.rings.avail + 4 + 2 * u64::from(idx % self.rings.size);
        self.mem.write(slot, &head.to_le_bytes());
        self.mem
            .write(self.rings.avail + 2, &idx.wrapping_add(step).to_le_bytes());
    }

    /// `len` bytes of the data area for a well-formed buffer.
    fn take_buffer(&mut self, len: u64) -> u64 {
        if self.cursor + len > DATA_LEN {
            self.cursor = 0;
        }
        let at = self.cursor;
        self.cursor += len;
        at
    }

    /// Writes `bufs` as a chain at `head` (or as an indirect table at `head`)
    /// with the given addresses; publishes it. Returns the head.
    pub fn chain_at(&mut self, head: u16, bufs: &[(u64, u32, bool)], indirect: bool) -> u16 {
        let size = self.rings.size;
        let head = head % size;
        if indirect {
            let n = bufs.len().min(IND_ENTRIES as usize);
            let table = IND_BASE + u64::from(head % IND_TABLES as u16) * IND_ENTRIES * 16;
            for (i, (addr, len, w)) in bufs[..n].iter().enumerate() {
                let mut flags = if *w { F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= F_NEXT;
                }
                self.mem
                    .write_descriptor(table + 16 * i as u64, *addr, *len, flags, i as u16 + 1);
            }
            self.mem.write_descriptor(
                self.rings.desc + 16 * u64::from(head),
                table,
                16 * n as u32,
                F_INDIRECT,
                0,
            );
        } else {
            let n = bufs.len().min(usize::from(size));
            for (i, (addr, len, w)) in bufs[..n].iter().enumerate() {
                let idx = (usize::from(head) + i) % usize::from(size);
                let next = ((idx + 1) % usize::from(size)) as u16;
                let mut flags = if *w { F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= F_NEXT;
                }
                self.mem.write_descriptor(
                    self.rings.desc + 16 * idx as u64,
                    *addr,
                    *len,
                    flags,
                    next,
                );
            }
        }
        self.publish(head, 1);
        head
    }

    /// A well-formed chain of buffers in the data area, filled with `fill`
    /// where device-readable; returns its head.
    pub fn chain(&mut self, head: u16, bufs: &[(u16, bool)], indirect: bool, fill: &[u8]) -> u16 {
        let mut placed = Vec::new();
        let mut off = 0usize;
        for (len, w) in bufs.iter().take(64) {
            let len = u64::from(*len % 4096);
            let at = self.take_buffer(len.max(1));
            if !*w && !fill.is_empty() {
                let n = (len as usize).min(fill.len().saturating_sub(off));
                self.mem.write(at, &fill[off..off + n]);
                off += n;
            }
            placed.push((at, len as u32, *w));
        }
        if placed.is_empty() {
            placed.push((self.take_buffer(16), 16, self.which != Which::Tx));
        }
        self.chain_at(head, &placed, indirect)
    }

    /// Applies one op; returns false once the device needs a reset (the run
    /// ends there).
    pub fn apply(&mut self, op: &QueueOp) -> bool {
        match op {
            QueueOp::Desc { table, index, d } => {
                let (base, n) = self.table_base(*table);
                let i = u64::from(*index) % n;
                let next = if d.next & 0x8000 != 0 {
                    d.next
                } else {
                    (u64::from(d.next) % n) as u16
                };
                let (addr, len) = (self.map_addr(d), Self::map_len(d));
                self.mem
                    .write_descriptor(base + 16 * i, addr, len, u16::from(d.flags), next);
            }
            QueueOp::Chain {
                head,
                bufs,
                indirect,
            } => {
                // A TX frame: a header of zeros then the filler.
                let fill = vec![0u8; 4096];
                self.chain(*head, bufs, *indirect, &fill);
            }
            QueueOp::Publish { head, step } => {
                let step = match step % 16 {
                    0 => u16::from(*step) << 8,
                    1 => 0,
                    s => u16::from(s).min(3),
                };
                self.publish(*head, step)
            }
            QueueOp::AvailIdx(v) => self.mem.write(self.rings.avail + 2, &v.to_le_bytes()),
            QueueOp::Suppress { flags, used_event } => {
                self.mem.write(self.rings.avail, &flags.to_le_bytes());
                let at = self.rings.avail + 4 + 2 * u64::from(self.rings.size);
                self.mem.write(at, &used_event.to_le_bytes());
            }
            QueueOp::Poke { at, bytes } => {
                let at = u64::from(*at) % MEM;
                let n = bytes.len().min((MEM - at) as usize);
                self.mem.write(at, &bytes[..n]);
                let index = self.rings.used + 2;
                if at < index + 2 && index < at + n as u64 {
                    self.used_index_poked = true;
                }
            }
            QueueOp::Frame { len, dst, fill } => {
                if self.which == Which::Rx {
                    let mac = self.dev.config().mac;
                    let mut f = vec![*fill; usize::from(*len)];
                    for b in f.iter_mut().take(HDR_LEN as usize) {
                        *b = 0;
                    }
                    let to: [u8; 6] = match dst % 4 {
                        0 | 1 => mac,
                        2 => [0xff; 6],
                        _ => [0x33, 0x33, 0, 0, 0, *dst],
                    };
                    let h = HDR_LEN as usize;
                    if f.len() >= h + 6 {
                        f[h..h + 6].copy_from_slice(&to);
                    }
                    self.be.incoming.lock().expect("lock").push_back(f);
                    self.fed += 1;
                }
            }
            QueueOp::Full(on) => self.be.full.store(*on, std::sync::atomic::Ordering::SeqCst),
            QueueOp::Link(up) => self.dev.set_link_up(*up),
            QueueOp::Process => return self.process().is_some(),
        }
        true
    }

    /// The writable ranges and indirect tables described in `mem` now.
    fn described(&self, mem: &[u8]) -> (Vec<Range>, Vec<Range>) {
        let mut writable = Vec::new();
        let mut tables = Vec::new();
        let note = |addr: u64, len: u32, flags: u16, w: &mut Vec<Range>| {
            if flags & F_WRITE != 0 {
                if let Some(r) = clip(addr, u64::from(len)) {
                    w.push(r);
                }
            }
        };
        for i in 0..u64::from(self.rings.size) {
            let Some((addr, len, flags, _)) = desc_at(mem, self.rings.desc + 16 * i) else {
                continue;
            };
            if flags & F_INDIRECT != 0 {
                if let Some(t) = clip(addr, u64::from(len)) {
                    tables.push(t);
                    let n = (u64::from(len) / 16).min(1024);
                    for k in 0..n {
                        if let Some((a, l, f, _)) = desc_at(mem, addr.saturating_add(16 * k)) {
                            note(a, l, f, &mut writable);
                        }
                    }
                }
            } else {
                note(addr, len, flags, &mut writable);
            }
        }
        (writable, tables)
    }

    /// The writable length of the chain at `head` in `mem` (an upper bound for
    /// a malformed chain).
    fn chain_writable(&self, mem: &[u8], head: u16) -> u64 {
        let size = u64::from(self.rings.size);
        let mut total = 0u64;
        let mut i = u64::from(head);
        for _ in 0..size {
            if i >= size {
                break;
            }
            let Some((addr, len, flags, next)) = desc_at(mem, self.rings.desc + 16 * i) else {
                break;
            };
            if flags & F_INDIRECT != 0 {
                let n = (u64::from(len) / 16).min(1024);
                for k in 0..n {
                    if let Some((_, l, f, _)) = desc_at(mem, addr.saturating_add(16 * k)) {
                        if f & F_WRITE != 0 {
                            total += u64::from(l);
                        }
                    }
                }
            } else if flags & F_WRITE != 0 {
                total += u64::from(len);
            }
            if flags & F_NEXT == 0 {
                break;
            }
            i = u64::from(next);
        }
        total
    }

    fn counters(&self) -> NetCounters {
        self.dev.counters()
    }

    /// One processing pass on the rig's queue with every check. `None` when the
    /// device needs a reset.
    pub fn process(&mut self) -> Option<Processed> {
        let before = self.mem.read(0, MEM as usize);
        let (w, t) = self.described(&before);
        if self.which != Which::Tx {
            self.writable.extend(w);
        }
        self.tables.extend(t);
        self.writable.sort_unstable();
        self.writable.dedup();
        self.tables.sort_unstable();
        self.tables.dedup();
        let r = self.rings;
        let table = (r.desc, r.desc + 16 * u64::from(r.size));
        let used = (r.used, r.used + r.used_len());
        if self.writable.iter().any(|w| {
            overlaps(*w, table)
                || overlaps(*w, used)
                || self.tables.iter().any(|t| overlaps(*w, *t))
        }) {
            self.unclean = true;
        }
        // The chains the device may take in this pass, as they are now.
        if self.which != Which::Ctrl {
            let states = self
                .dev
                .queue_pair(0)
                .expect("pair 0")
                .lock()
                .queue_states();
            if let Some((rx, tx)) = states {
                let next = if self.which == Which::Rx {
                    rx.next_avail
                } else {
                    tx.next_avail
                };
                let idx = u16_at(&before, r.avail + 2);
                let n = idx.wrapping_sub(next).min(r.size);
                for k in 0..n {
                    let slot = r.avail + 4 + 2 * u64::from(next.wrapping_add(k) % r.size);
                    let head = u16_at(&before, slot);
                    if head < r.size {
                        let room = self.chain_writable(&before, head);
                        let seen = &mut self.room_seen[usize::from(head)];
                        *seen = (*seen).max(room);
                    }
                }
            }
        }
        let c0 = self.counters();
        let sent0 = self.be.log.lock().expect("lock").sent.len();
        let out = match self.which {
            Which::Rx => self.dev.queue_pair(0).expect("pair 0").process_rx(),
            Which::Tx => self.dev.queue_pair(0).expect("pair 0").process_tx(),
            Which::Ctrl => self.dev.process_ctrl(),
        };
        self.passes += 1;
        let after = self.mem.read(0, MEM as usize);
        let c1 = self.counters();
        // Nothing outside the used ring and the writable buffers changed. The
        // transmit path writes no buffer at all.
        if !self.unclean || self.which == Which::Tx {
            // Page by page (one memcmp each), then byte by byte where they differ.
            const PAGE: usize = 4096;
            for (p, (pa, pb)) in before.chunks(PAGE).zip(after.chunks(PAGE)).enumerate() {
                if pa == pb {
                    continue;
                }
                for (k, (a, b)) in pa.iter().zip(pb).enumerate() {
                    if a == b {
                        continue;
                    }
                    let i = (p * PAGE + k) as u64;
                    let in_used = (used.0..used.1).contains(&i);
                    let in_writable = self.writable.iter().any(|w| (w.0..w.1).contains(&i));
                    assert!(
                        in_used || in_writable,
                        "{:?}: the device wrote guest address {i:#x} ({a:#x} -> {b:#x}), outside \
                         the used ring {used:x?} and every device-writable buffer",
                        self.which
                    );
                }
            }
        }
        // The used entries of this pass.
        let mut used_sum = 0u64;
        let mut used_count = None;
        // A guest that wrote over the used index (raw bytes) gets the device's
        // own index back at the next pass that uses a chain: until then the
        // entries of a pass cannot be told from the index's move (fuzz finding
        // tx_queue-used-index-poked).
        let poked = self.used_index_poked;
        if poked && u16_at(&after, r.used + 2) != u16_at(&before, r.used + 2) {
            // The device wrote its index again: the next pass is checked.
            self.used_index_poked = false;
        }
        if !self.unclean && !poked {
            let old = u16_at(&before, r.used + 2);
            let new = u16_at(&after, r.used + 2);
            let n = new.wrapping_sub(old);
            assert!(
                n <= r.size,
                "{:?}: the used index moved by {n} in one pass, more than the queue size {}",
                self.which,
                r.size
            );
            for k in 0..n {
                let e = r.used + 4 + 8 * u64::from(old.wrapping_add(k) % r.size);
                let id = u32_at(&after, e);
                let len = u32_at(&after, e + 4);
                used_sum += u64::from(len);
                if id >= u32::from(r.size) {
                    assert_eq!(
                        len, 0,
                        "{:?}: used id {id} is outside the table but has length {len}",
                        self.which
                    );
                    continue;
                }
                let room = self
                    .chain_writable(&before, id as u16)
                    .max(self.room_seen[id as usize]);
                assert!(
                    u64::from(len) <= room,
                    "{:?}: used length {len} of chain {id} exceeds its writable length {room}",
                    self.which
                );
                if self.which == Which::Tx {
                    assert_eq!(len, 0, "TX chain {id} returned with length {len}");
                }
            }
            used_count = Some(u64::from(n));
        }
        // The counters add up.
        let d = |f: fn(&NetCounters) -> u64| f(&c1) - f(&c0);
        match self.which {
            Which::Tx => {
                let outcomes = d(|c| {
                    c.tx_frames
                        + c.tx_dropped_backend
                        + c.tx_malformed
                        + c.tx_dropped_offload
                        + c.tx_dropped_link_down
                });
                assert_eq!(
                    outcomes, out.chains as u64,
                    "TX: chains vs counted outcomes"
                );
                if let Some(n) = used_count {
                    assert_eq!(n, out.chains as u64, "TX: used entries vs chains taken");
                }
                let log = self.be.log.lock().expect("lock");
                let new = &log.sent[sent0..];
                assert_eq!(
                    new.len() as u64,
                    d(|c| c.tx_frames),
                    "TX: frames sent vs counted"
                );
                let bytes: u64 = new.iter().map(|f| f.len() as u64 - HDR_LEN).sum();
                assert_eq!(bytes, d(|c| c.tx_bytes), "TX: bytes sent vs counted");
            }
            Which::Rx => {
                let gone = c1.rx_frames
                    + c1.rx_dropped_filtered
                    + c1.rx_dropped_link_down
                    + c1.rx_dropped_backend
                    + c1.rx_dropped_too_big;
                let left = self.be.incoming.lock().expect("lock").len() as u64;
                let pending = self
                    .dev
                    .queue_pair(0)
                    .expect("pair 0")
                    .lock()
                    .pending()
                    .len() as u64;
                assert_eq!(
                    gone + left + pending,
                    self.fed,
                    "RX: frames delivered or dropped ({gone}) + waiting ({left} + {pending}) vs frames fed"
                );
                if used_count.is_some() {
                    assert_eq!(
                        used_sum,
                        d(|c| c.rx_bytes) + HDR_LEN * d(|c| c.rx_frames),
                        "RX: used lengths vs bytes counted"
                    );
                }
            }
            Which::Ctrl => {
                let outcomes = d(|c| c.ctrl_ok + c.ctrl_err + c.ctrl_malformed);
                assert_eq!(
                    outcomes, out.chains as u64,
                    "ctrl: chains vs counted outcomes"
                );
                if let Some(n) = used_count {
                    assert_eq!(n, out.chains as u64, "ctrl: used entries vs chains taken");
                }
            }
        }
        if self.dev.needs_reset() {
            None
        } else {
            Some(out)
        }
    }

    /// The used entry at `pos` of the used ring: `(id, len)`.
    pub fn used_entry(&self, pos: u16) -> (u32, u32) {
        let e = self.rings.used + 4 + 8 * u64::from(pos % self.rings.size);
        let b = self.mem.read(e, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().expect("4")),
            u32::from_le_bytes(b[4..8].try_into().expect("4")),
        )
    }

    /// The first byte of the first device-writable buffer of the chain at
    /// `head` (through its indirect table if `indirect`): where an ack goes.
    pub fn ack_byte(&self, head: u16, indirect: bool) -> u8 {
        let mem = self.mem.read(0, MEM as usize);
        let (base, n, mut i) = if indirect {
            let (table, _, _, _) =
                desc_at(&mem, self.rings.desc + 16 * u64::from(head)).expect("head");
            (table, IND_ENTRIES, 0u64)
        } else {
            (self.rings.desc, u64::from(self.rings.size), u64::from(head))
        };
        for _ in 0..n {
            let (addr, _, flags, next) = desc_at(&mem, base + 16 * i).expect("descriptor");
            if flags & F_WRITE != 0 {
                return mem[addr as usize];
            }
            i = u64::from(next) % n;
        }
        panic!("chain {head} has no writable buffer");
    }

    /// The used index in guest memory.
    pub fn used_idx(&self) -> u16 {
        u16::from_le_bytes(
            self.mem
                .read(self.rings.used + 2, 2)
                .try_into()
                .expect("2 bytes"),
        )
    }

    /// Whether the memory checks still hold (no writable buffer ever
    /// overlapped a descriptor table or the used ring).
    pub fn clean(&self) -> bool {
        !self.unclean
    }

    /// The queue's device-side position `(next_avail, next_used)` sanity: the
    /// number of chains in flight never exceeds the queue size.
    pub fn check_positions(&self) {
        if self.which == Which::Ctrl {
            return;
        }
        let Some((rx, tx)) = self
            .dev
            .queue_pair(0)
            .expect("pair 0")
            .lock()
            .queue_states()
        else {
            return;
        };
        let q = if self.which == Which::Rx { rx } else { tx };
        let in_flight = q.next_avail.wrapping_sub(q.next_used);
        assert!(
            in_flight <= self.rings.size,
            "{:?}: {in_flight} chains in flight on a queue of {}",
            self.which,
            self.rings.size
        );
    }
}

/// The input of the TX and RX targets.
#[derive(Arbitrary, Debug)]
pub struct QueueInput {
    /// Feature bits the driver asks for (pruned to a valid set).
    pub features: u64,
    /// Queue size choice.
    pub size: u8,
    /// The backend does not tell frame lengths (a tap).
    pub opaque: bool,
    /// The backend truncates what does not fit and reports the full length.
    pub truncating: bool,
    /// What the guest does.
    pub ops: Vec<QueueOp>,
}

/// Runs a TX or RX input.
pub fn run_queue(which: Which, input: &QueueInput) {
    let size = Rig::SIZES[usize::from(input.size) % Rig::SIZES.len()];
    let Some(mut rig) = Rig::new(which, input.features, size, input.opaque, input.truncating)
    else {
        return;
    };
    for op in input.ops.iter().take(512) {
        if !rig.apply(op) {
            return;
        }
        rig.check_positions();
    }
    // Whatever the guest left: one last pass, links up and backend drained.
    rig.dev.set_link_up(true);
    rig.be
        .full
        .store(false, std::sync::atomic::Ordering::SeqCst);
    if rig.process().is_some() {
        rig.check_positions();
    }
}
