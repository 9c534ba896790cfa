//! The guest: environment shared by its drivers, and the run loop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pci::config::{CAP_ID_MSI, CAP_ID_PCIE};
use pci::pcie::{FLAGS, FLAGS_SLOT, SLTCAP, SLTCAP_HPC};
use pci::{Bdf, MsiMessage, MsiSink, PciRoot, ecam_offset};

use crate::clock::VirtualClock;
use crate::enumerate::Enumerator;
use crate::pciehp::{Pciehp, Timings};
use crate::virtio::{self, VirtioProbe};

/// The guest's interrupt controller: every MSI the devices send lands here, and
/// the guest dispatches by message data. Give it to devices as their
/// [`MsiSink`].
#[derive(Debug, Default)]
pub struct IrqQueue {
    q: Mutex<VecDeque<MsiMessage>>,
}

impl IrqQueue {
    /// An empty queue.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<MsiMessage>> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the messages carrying `data`; returns how many there were.
    pub fn take_matching(&self, data: u32) -> usize {
        let mut q = self.lock();
        let before = q.len();
        q.retain(|m| m.data != data);
        before - q.len()
    }

    /// Removes and returns everything queued.
    pub fn drain(&self) -> Vec<MsiMessage> {
        self.lock().drain(..).collect()
    }
}

impl MsiSink for IrqQueue {
    fn deliver(&self, _vector: u16, message: MsiMessage) {
        self.lock().push_back(message);
    }
}

/// What the guest's drivers share.
#[derive(Debug)]
pub struct Env {
    /// The PCI segment.
    pub root: Arc<PciRoot>,
    /// Guest time.
    pub clock: VirtualClock,
    /// Interrupts.
    pub irqs: Arc<IrqQueue>,
    /// The enumerator and what it found.
    pub enumerator: Enumerator,
    /// Driver waits.
    pub timings: Timings,
    /// Features the guest's virtio driver supports.
    pub virtio_features: u64,
    /// Bound virtio devices.
    pub virtio: Vec<VirtioProbe>,
    /// Functions with a driver bound.
    pub bound: Vec<Bdf>,
    /// Functions that failed to bind, with why.
    pub bind_errors: Vec<(Bdf, String)>,
    /// Interrupts for vectors no driver here owns (virtio queues), by data value.
    pub other_irqs: Vec<u32>,
    /// A dmesg: (time, line).
    pub log: Vec<(Duration, String)>,
    next_vector: u32,
    ring_next: u64,
    ring_end: u64,
}

impl Env {
    /// A config read through ECAM.
    pub fn cfg_read(&mut self, bdf: Bdf, off: u16, len: usize) -> u32 {
        self.enumerator.read(&self.root, bdf, off, len)
    }

    /// A config write through ECAM.
    pub fn cfg_write(&mut self, bdf: Bdf, off: u16, len: usize, v: u32) {
        self.enumerator.write(&self.root, bdf, off, len, v);
    }

    /// A memory read.
    pub fn mmio_read(&mut self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.root.mmio_read(addr, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// A memory write.
    pub fn mmio_write(&mut self, addr: u64, len: usize, v: u64) {
        self.root.mmio_write(addr, &v.to_le_bytes()[..len]);
    }

    /// A fresh MSI data value.
    pub fn alloc_vector(&mut self) -> u32 {
        self.next_vector += 1;
        self.next_vector
    }

    /// Guest memory for a ring of `num` entries (16 KiB-aligned blocks).
    pub fn alloc_ring(&mut self, num: u64) -> u64 {
        let a = self.ring_next;
        self.ring_next += (num * 16).max(0x1000) * 8;
        if self.ring_next > self.ring_end {
            self.log(format!("ring memory exhausted at {a:#x}"));
        }
        a
    }

    /// Adds a dmesg line.
    pub fn log(&mut self, line: String) {
        self.log.push((self.clock.now(), line));
    }

    /// Binds a driver to `bdf` (virtio devices are probed; others just bound).
    pub fn bind(&mut self, bdf: Bdf) {
        let Some(f) = self.enumerator.get(bdf).cloned() else {
            return;
        };
        if f.vendor == 0x1af4 {
            let supported = self.virtio_features;
            match virtio::probe(self, &f, supported) {
                Ok(p) => self.virtio.push(p),
                Err(e) => {
                    self.log(format!("{bdf}: probe failed: {e}"));
                    self.bind_errors.push((bdf, e));
                    return;
                }
            }
        }
        self.bound.push(bdf);
        self.log(format!("{bdf}: [{:04x}:{:04x}] bound", f.vendor, f.device));
    }

    /// Unbinds `bdf`'s driver.
    pub fn unbind(&mut self, bdf: Bdf) {
        if let Some(i) = self.virtio.iter().position(|p| p.bdf == bdf) {
            let p = self.virtio.remove(i);
            virtio::remove(self, &p);
        }
        self.bound.retain(|b| *b != bdf);
        self.log(format!("{bdf}: removed"));
    }

    /// pciehp's configure step: scan the slot and bind drivers.
    pub fn configure_slot(&mut self, port: Bdf) -> Vec<Bdf> {
        let root = self.root.clone();
        let added = self.enumerator.scan_slot(&root, port);
        for &b in &added {
            self.bind(b);
        }
        added
    }

    /// pciehp's unconfigure step: unbind and forget the slot's functions.
    pub fn unconfigure_slot(&mut self, port: Bdf) {
        let sec = (self.cfg_read(port, pci::config::PRIMARY_BUS, 4) >> 8 & 0xff) as u8;
        let gone: Vec<Bdf> = self
            .enumerator
            .found
            .iter()
            .filter(|f| f.bdf.bus == sec)
            .map(|f| f.bdf)
            .collect();
        for b in gone {
            self.unbind(b);
        }
        let root = self.root.clone();
        self.enumerator.remove_slot(&root, port);
    }
}

/// A booted guest: its environment and its pciehp instances.
#[derive(Debug)]
pub struct Guest {
    /// Shared driver state.
    pub env: Env,
    /// One pciehp per hot-plug capable port.
    pub hotplug: Vec<Pciehp>,
}

impl Guest {
    /// Boots: enumerates the hierarchy, binds drivers to what it finds, and
    /// probes pciehp on every hot-plug capable port. Virtio rings are placed in
    /// guest memory from `ring_base` up to `ring_end`.
    pub fn boot(
        root: Arc<PciRoot>,
        irqs: Arc<IrqQueue>,
        timings: Timings,
        virtio_features: u64,
        (ring_base, ring_end): (u64, u64),
    ) -> Guest {
        let mut env = Env {
            root,
            clock: VirtualClock::new(),
            irqs,
            enumerator: Enumerator::new(),
            timings,
            virtio_features,
            virtio: Vec::new(),
            bound: Vec::new(),
            bind_errors: Vec::new(),
            other_irqs: Vec::new(),
            log: Vec::new(),
            next_vector: 0x30,
            ring_next: ring_base,
            ring_end,
        };
        let root = env.root.clone();
        env.enumerator.scan(&root);
        let found = env.enumerator.found.clone();
        let mut hotplug = Vec::new();
        for f in &found {
            if f.header_type == 0 {
                env.bind(f.bdf);
                continue;
            }
            let (Some(cap), Some(msi)) = (f.cap(CAP_ID_PCIE), f.cap(CAP_ID_MSI)) else {
                continue;
            };
            let flags = env.cfg_read(f.bdf, cap + FLAGS, 2) as u16;
            if flags & FLAGS_SLOT != 0 && env.cfg_read(f.bdf, cap + SLTCAP, 4) & SLTCAP_HPC != 0 {
                let v = env.alloc_vector();
                hotplug.push(Pciehp::probe(&mut env, f.bdf, cap, msi, v));
            }
        }
        let mut g = Guest { env, hotplug };
        g.service();
        g
    }

    /// The pciehp instance of `port`.
    pub fn pciehp(&self, port: Bdf) -> Option<&Pciehp> {
        self.hotplug.iter().find(|p| p.port == port)
    }

    /// Handles queued interrupts and lets idle interrupt threads run, until
    /// nothing changes.
    pub fn service(&mut self) {
        for _ in 0..1000 {
            let mut progress = false;
            for m in self.env.irqs.drain() {
                progress = true;
                match self.hotplug.iter_mut().find(|p| p.vector == m.data) {
                    Some(p) => p.isr(&mut self.env),
                    None => self.env.other_irqs.push(m.data),
                }
            }
            for p in &mut self.hotplug {
                p.run_due(&mut self.env);
                if p.has_work() {
                    p.ist(&mut self.env);
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Runs the guest for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.env.clock.now() + d;
        loop {
            self.service();
            let next = self.hotplug.iter().filter_map(Pciehp::next_wake).min();
            match next {
                Some(t) if t <= end => self.env.clock.advance_to(t),
                _ => {
                    self.env.clock.advance_to(end);
                    self.service();
                    return;
                }
            }
        }
    }

    /// Runs until no driver has anything scheduled (or `limit` passes); returns
    /// the virtual time spent.
    pub fn settle(&mut self, limit: Duration) -> Duration {
        let start = self.env.clock.now();
        let end = start + limit;
        loop {
            self.service();
            match self.hotplug.iter().filter_map(Pciehp::next_wake).min() {
                Some(t) if t <= end => self.env.clock.advance_to(t),
                _ => return self.env.clock.now() - start,
            }
        }
    }

    /// Reads a config dword of `bdf` through ECAM, as the guest would.
    pub fn config_read32(&self, bdf: Bdf, off: u16) -> u32 {
        let mut b = [0u8; 4];
        self.env.root.ecam_read(ecam_offset(bdf, off), &mut b);
        u32::from_le_bytes(b)
    }
}
