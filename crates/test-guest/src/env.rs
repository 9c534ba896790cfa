//! What the guest's drivers share: [`Env`], with the PCI segment, the clock,
//! interrupts, what the enumerator found and which drivers are bound, and the
//! steps the drivers take through it (config and memory accesses, binding,
//! slot configuration).

use std::sync::Arc;
use std::time::Duration;

use vmm_pci::{Bdf, PciRoot};

use crate::clock::VirtualClock;
use crate::enumerate::Enumerator;
use crate::irq::IrqQueue;
use crate::pciehp::Timings;
use crate::virtio::{self, VirtioProbe};

/// What the guest's drivers share.
#[derive(Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Env {
    /// The PCI segment. A saved guest does not carry it: a restored one is on
    /// an empty segment until [`Guest::resume_on`](crate::Guest::resume_on).
    #[cfg_attr(feature = "serde", serde(skip, default = "Env::no_root"))]
    pub root: Arc<PciRoot>,
    /// Guest time (saved as the time it shows; a restored guest gets a clock
    /// of its own at that time until [`Guest::adopt_clock`](crate::Guest::adopt_clock)).
    pub clock: VirtualClock,
    /// Interrupts. Not saved: save a guest with none pending
    /// ([`Guest::service`](crate::Guest::service) first).
    #[cfg_attr(feature = "serde", serde(skip, default = "IrqQueue::new"))]
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
    #[cfg(feature = "serde")]
    fn no_root() -> Arc<PciRoot> {
        Arc::new(PciRoot::new())
    }

    /// A fresh environment on `clock`: nothing enumerated or bound yet.
    /// Virtio rings are placed in guest memory from `ring_base` up to `ring_end`.
    pub(crate) fn new(
        clock: VirtualClock,
        root: Arc<PciRoot>,
        irqs: Arc<IrqQueue>,
        timings: Timings,
        virtio_features: u64,
        (ring_base, ring_end): (u64, u64),
    ) -> Env {
        Env {
            root,
            clock,
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
        }
    }

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

    /// Guest memory for driver buffers (`len` bytes, `align`-aligned), from
    /// the same region as the rings; `None` when it is exhausted.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let a = self.ring_next.div_ceil(align.max(1)) * align.max(1);
        let end = a.checked_add(len)?;
        if end > self.ring_end {
            self.log(format!("driver memory exhausted: {len} bytes at {a:#x}"));
            return None;
        }
        self.ring_next = end;
        Some(a)
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

    /// pciehp's unconfigure step: unbind and forget the slot's functions;
    /// returns them.
    pub fn unconfigure_slot(&mut self, port: Bdf) -> Vec<Bdf> {
        let sec = (self.cfg_read(port, vmm_pci::config::PRIMARY_BUS, 4) >> 8 & 0xff) as u8;
        let gone: Vec<Bdf> = self
            .enumerator
            .found
            .iter()
            .filter(|f| f.bdf.bus == sec)
            .map(|f| f.bdf)
            .collect();
        // Linux removes them in reverse (pciehp_unconfigure_device: "remove
        // the VFs first, then the PF").
        for &b in gone.iter().rev() {
            self.unbind(b);
        }
        let root = self.root.clone();
        self.enumerator.remove_slot(&root, port);
        gone.into_iter().rev().collect()
    }
}
