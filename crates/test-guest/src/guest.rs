//! The guest: boot and the run loop. What its drivers share is [`Env`].

use std::sync::Arc;
use std::time::Duration;

use vmm_pci::config::{CAP_ID_MSI, CAP_ID_PCIE};
use vmm_pci::pcie::{FLAGS, FLAGS_SLOT, SLTCAP, SLTCAP_HPC};
use vmm_pci::{Bdf, PciRoot, ecam_offset};

use crate::clock::VirtualClock;
use crate::env::Env;
use crate::irq::IrqQueue;
use crate::pciehp::{Pciehp, Timings};

/// A booted guest: its environment and its pciehp instances.
#[derive(Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
        rings: (u64, u64),
    ) -> Guest {
        Guest::boot_with_clock(
            VirtualClock::new(),
            root,
            irqs,
            timings,
            virtio_features,
            rings,
        )
    }

    /// [`Guest::boot`] on `clock`, which the VMM side shares (give a
    /// `pcie_hotplug::RootPortBuilder::clock` [`VirtualClock::now_fn`], so the
    /// ports judge the guest's windows on the guest's time).
    pub fn boot_with_clock(
        clock: VirtualClock,
        root: Arc<PciRoot>,
        irqs: Arc<IrqQueue>,
        timings: Timings,
        virtio_features: u64,
        (ring_base, ring_end): (u64, u64),
    ) -> Guest {
        let mut env = Env::new(
            clock,
            root,
            irqs,
            timings,
            virtio_features,
            (ring_base, ring_end),
        );
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

    /// Live migration: the guest resumes on the destination's PCI segment and
    /// interrupts. It keeps everything it enumerated and every driver's state,
    /// as a migrated guest does; nothing is re-read, so the destination must
    /// show it the same functions and registers.
    pub fn resume_on(&mut self, root: Arc<PciRoot>, irqs: Arc<IrqQueue>) {
        self.env.root = root;
        self.env.irqs = irqs;
    }

    /// Live migration to another process: the guest, restored from what it
    /// saved (serde, with the `serde` feature), runs on `clock` from now on,
    /// which moves forward to the time the guest had reached. Give the
    /// destination's ports the same clock, then call [`Guest::resume_on`].
    pub fn adopt_clock(&mut self, clock: VirtualClock) {
        clock.advance_to(self.env.clock.now());
        self.env.clock = clock;
    }

    /// The pciehp instance of `port`.
    pub fn pciehp(&self, port: Bdf) -> Option<&Pciehp> {
        self.hotplug.iter().find(|p| p.port == port)
    }

    /// The pciehp instance of `port`, to set a hook on.
    pub fn pciehp_mut(&mut self, port: Bdf) -> Option<&mut Pciehp> {
        self.hotplug.iter_mut().find(|p| p.port == port)
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
                // A step may raise an interrupt (a driver it binds, a port
                // event): that is progress, service again.
                if p.run_due(&mut self.env) {
                    progress = true;
                }
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
