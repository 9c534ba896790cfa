//! [`HostileGuest`]: a randomized hostile driver, shared by the hostile-guest
//! test and the fuzz target.

use virtio_device::VirtioDevice;

use super::{Entropy, GuestDriver, GuestMem, TestMemory, pair_send};
use crate::device::StandbyNet;
use crate::features::Features;

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
