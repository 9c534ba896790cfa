//! A Linux-like PCI enumerator over ECAM.

use std::collections::HashMap;

use vmm_pci::config::{
    BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY, HEADER_TYPE, IO_BASE,
    IO_LIMIT, MEMORY_BASE, PREF_BASE_UPPER32, PREF_LIMIT_UPPER32, PREF_MEMORY_BASE, PRIMARY_BUS,
    STATUS, STATUS_CAP_LIST, SUBORDINATE_BUS,
};
use vmm_pci::pcie::{FLAGS, FLAGS_SLOT, SLTCAP, SLTCAP_HPC};
use vmm_pci::{Bdf, PciRoot, ecam_offset};

/// Linux's default hot-plug window reserve (`pci=hpmemsize`), per window.
pub const HOTPLUG_RESERVE: u64 = 2 << 20;
const MIB: u64 = 1 << 20;

/// A BAR the enumerator sized and assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FoundBar {
    /// BAR index.
    pub index: u8,
    /// Assigned address (0 if nothing could be assigned).
    pub address: u64,
    /// Size from the sizing protocol.
    pub size: u64,
    /// Memory (as opposed to I/O).
    pub memory: bool,
    /// 64-bit BAR.
    pub is64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// A function the enumerator found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Found {
    /// Where.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base << 16 | sub << 8 | prog-if).
    pub class: u32,
    /// Header type (bit 7 masked off).
    pub header_type: u8,
    /// Sized and assigned BARs.
    pub bars: Vec<FoundBar>,
    /// Capabilities as (ID, offset), in list order.
    pub caps: Vec<(u8, u16)>,
    /// For bridges, the secondary bus number it was given.
    pub secondary: Option<u8>,
}

impl Found {
    /// The offset of capability `id`.
    pub fn cap(&self, id: u8) -> Option<u16> {
        self.caps.iter().find(|c| c.0 == id).map(|c| c.1)
    }

    /// The BAR with `index`.
    pub fn bar(&self, index: u8) -> Option<FoundBar> {
        self.bars.iter().find(|b| b.index == index).copied()
    }
}

#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Window {
    mem: (u64, u64),
    pref: (u64, u64),
    mem_next: u64,
    pref_next: u64,
}

/// Walks and programs a PCI hierarchy through config cycles only.
#[derive(Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Enumerator {
    next_bus: u8,
    mem_next: u64,
    pref_next: u64,
    io_next: u64,
    windows: HashMap<u8, Window>,
    /// Everything found, in discovery order.
    pub found: Vec<Found>,
    /// Config cycles issued (reads + writes).
    pub cycles: u64,
}

impl Default for Enumerator {
    fn default() -> Self {
        Self::new()
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Enumerator {
    /// An enumerator with the usual x86 windows: 32-bit MMIO from 0xc000_0000,
    /// 64-bit prefetchable from 0x80_0000_0000, I/O from 0xc000.
    pub fn new() -> Self {
        Enumerator {
            next_bus: 1,
            mem_next: 0xc000_0000,
            pref_next: 0x80_0000_0000,
            io_next: 0xc000,
            windows: HashMap::new(),
            found: Vec::new(),
            cycles: 0,
        }
    }

    /// A config read.
    pub fn read(&mut self, root: &PciRoot, bdf: Bdf, off: u16, len: usize) -> u32 {
        self.cycles += 1;
        let mut b = [0u8; 4];
        root.ecam_read(ecam_offset(bdf, off), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    /// A config write.
    pub fn write(&mut self, root: &PciRoot, bdf: Bdf, off: u16, len: usize, v: u32) {
        self.cycles += 1;
        root.ecam_write(ecam_offset(bdf, off), &v.to_le_bytes()[..len]);
    }

    /// Enumerates everything below bus 0 and returns how many functions it found.
    pub fn scan(&mut self, root: &PciRoot) -> usize {
        self.scan_bus(root, 0);
        self.found.len()
    }

    /// The function found at `bdf`.
    pub fn get(&self, bdf: Bdf) -> Option<&Found> {
        self.found.iter().find(|f| f.bdf == bdf)
    }

    fn scan_bus(&mut self, root: &PciRoot, bus: u8) {
        for dev in 0..32 {
            self.scan_device(root, bus, dev);
        }
    }

    fn scan_device(&mut self, root: &PciRoot, bus: u8, dev: u8) -> usize {
        let before = self.found.len();
        if self.read(root, Bdf::new(bus, dev, 0), 0, 2) == 0xffff {
            return 0;
        }
        let multi = self.read(root, Bdf::new(bus, dev, 0), HEADER_TYPE, 1) & 0x80 != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let bdf = Bdf::new(bus, dev, func);
            if self.read(root, bdf, 0, 2) != 0xffff {
                self.probe(root, bdf);
            }
        }
        self.found.len() - before
    }

    /// Scans the slot below hot-plug port `port` (device 0 on its secondary bus),
    /// assigning BARs inside the port's windows, as pciehp's configure step does.
    /// Returns the functions added.
    pub fn scan_slot(&mut self, root: &PciRoot, port: Bdf) -> Vec<Bdf> {
        let sec = self.read(root, port, PRIMARY_BUS, 4) >> 8 & 0xff;
        let sec = sec as u8;
        let Some(w) = self.windows.get(&sec).copied() else {
            return Vec::new();
        };
        let (saved_mem, saved_pref) = (self.mem_next, self.pref_next);
        self.mem_next = w.mem_next;
        self.pref_next = w.pref_next;
        let before = self.found.len();
        self.scan_device(root, sec, 0);
        if let Some(w) = self.windows.get_mut(&sec) {
            w.mem_next = self.mem_next;
            w.pref_next = self.pref_next;
        }
        self.mem_next = saved_mem;
        self.pref_next = saved_pref;
        self.found[before..].iter().map(|f| f.bdf).collect()
    }

    /// Forgets the functions on `port`'s secondary bus and frees its window, as
    /// pciehp's unconfigure step does.
    pub fn remove_slot(&mut self, root: &PciRoot, port: Bdf) -> Vec<Bdf> {
        let sec = (self.read(root, port, PRIMARY_BUS, 4) >> 8 & 0xff) as u8;
        let gone: Vec<Bdf> = self
            .found
            .iter()
            .filter(|f| f.bdf.bus == sec)
            .map(|f| f.bdf)
            .collect();
        self.found.retain(|f| f.bdf.bus != sec);
        if let Some(w) = self.windows.get_mut(&sec) {
            w.mem_next = w.mem.0;
            w.pref_next = w.pref.0;
        }
        gone
    }

    fn caps(&mut self, root: &PciRoot, bdf: Bdf) -> Vec<(u8, u16)> {
        let mut caps = Vec::new();
        if self.read(root, bdf, STATUS, 2) as u16 & STATUS_CAP_LIST == 0 {
            return caps;
        }
        let mut ptr = (self.read(root, bdf, CAPABILITIES_POINTER, 1) & 0xfc) as u16;
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            let v = self.read(root, bdf, ptr, 2);
            caps.push(((v & 0xff) as u8, ptr));
            ptr = ((v >> 8) & 0xfc) as u16;
        }
        caps
    }

    fn probe(&mut self, root: &PciRoot, bdf: Bdf) {
        let id = self.read(root, bdf, 0, 4);
        let class = self.read(root, bdf, 0x08, 4) >> 8;
        let header_type = (self.read(root, bdf, HEADER_TYPE, 1) & 0x7f) as u8;
        let caps = self.caps(root, bdf);
        let mut found = Found {
            bdf,
            vendor: id as u16,
            device: (id >> 16) as u16,
            class,
            header_type,
            bars: Vec::new(),
            caps,
            secondary: None,
        };
        if header_type == 1 {
            let idx = self.found.len();
            self.found.push(found);
            self.probe_bridge(root, bdf, idx);
        } else {
            found.bars = self.size_and_assign(root, bdf);
            self.found.push(found);
        }
    }

    fn size_and_assign(&mut self, root: &PciRoot, bdf: Bdf) -> Vec<FoundBar> {
        let cmd = self.read(root, bdf, COMMAND, 2);
        // Decode off while sizing, as Linux does.
        self.write(root, bdf, COMMAND, 2, cmd & !0x3);
        let mut bars = Vec::new();
        let mut i = 0u8;
        while i < 6 {
            let off = BAR0 + 4 * i as u16;
            let orig = self.read(root, bdf, off, 4);
            self.write(root, bdf, off, 4, u32::MAX);
            let sz = self.read(root, bdf, off, 4);
            self.write(root, bdf, off, 4, orig);
            if sz == 0 {
                i += 1;
                continue;
            }
            let bar = if sz & 1 == 1 {
                let mask = (sz & !3) as u64
                    | 0xffff_ffff_0000_0000
                    | if sz & 0xffff_0000 == 0 {
                        0xffff_0000
                    } else {
                        0
                    };
                FoundBar {
                    index: i,
                    address: 0,
                    size: (!mask).wrapping_add(1),
                    memory: false,
                    is64: false,
                    prefetchable: false,
                }
            } else {
                let is64 = (sz >> 1) & 3 == 2;
                let mut mask = (sz & !0xf) as u64 | 0xffff_ffff_0000_0000;
                if is64 && i < 5 {
                    let hi_off = off + 4;
                    let orig_hi = self.read(root, bdf, hi_off, 4);
                    self.write(root, bdf, hi_off, 4, u32::MAX);
                    let hi = self.read(root, bdf, hi_off, 4);
                    self.write(root, bdf, hi_off, 4, orig_hi);
                    mask = (hi as u64) << 32 | (sz & !0xf) as u64;
                }
                FoundBar {
                    index: i,
                    address: 0,
                    size: (!mask).wrapping_add(1),
                    memory: true,
                    is64,
                    prefetchable: sz & 8 != 0,
                }
            };
            bars.push(bar);
            i += if bar.is64 { 2 } else { 1 };
        }
        for b in &mut bars {
            if b.size == 0 {
                continue;
            }
            let off = BAR0 + 4 * b.index as u16;
            let addr = if !b.memory {
                if bdf.bus != 0 {
                    continue; // bridges here forward no I/O
                }
                let a = align_up(self.io_next, b.size);
                self.io_next = a + b.size;
                a
            } else if b.is64 && b.prefetchable {
                let a = align_up(self.pref_next, b.size);
                self.pref_next = a + b.size;
                a
            } else {
                let a = align_up(self.mem_next, b.size);
                self.mem_next = a + b.size;
                a
            };
            self.write(root, bdf, off, 4, addr as u32);
            if b.is64 {
                self.write(root, bdf, off + 4, 4, (addr >> 32) as u32);
            }
            b.address = addr;
        }
        self.write(root, bdf, COMMAND, 2, cmd);
        bars
    }

    fn hotplug_capable(&mut self, root: &PciRoot, bdf: Bdf, idx: usize) -> bool {
        let Some(cap) = self.found[idx].cap(vmm_pci::config::CAP_ID_PCIE) else {
            return false;
        };
        let flags = self.read(root, bdf, cap + FLAGS, 2) as u16;
        flags & FLAGS_SLOT != 0 && self.read(root, bdf, cap + SLTCAP, 4) & SLTCAP_HPC != 0
    }

    fn probe_bridge(&mut self, root: &PciRoot, bdf: Bdf, idx: usize) {
        let sec = self.next_bus;
        self.next_bus = self.next_bus.saturating_add(1);
        self.found[idx].secondary = Some(sec);
        self.write(
            root,
            bdf,
            PRIMARY_BUS,
            4,
            (bdf.bus as u32) | (sec as u32) << 8 | 0xff << 16,
        );
        let hotplug = self.hotplug_capable(root, bdf, idx);
        self.mem_next = align_up(self.mem_next, MIB);
        self.pref_next = align_up(self.pref_next, MIB);
        let (mem_base, pref_base) = (self.mem_next, self.pref_next);
        self.scan_bus(root, sec);
        let sub = self.next_bus - 1;
        self.write(root, bdf, SUBORDINATE_BUS, 1, sub as u32);
        let reserve = if hotplug { HOTPLUG_RESERVE } else { 0 };
        let mem_end = align_up(self.mem_next.max(mem_base + reserve), MIB);
        let pref_end = align_up(self.pref_next.max(pref_base + reserve), MIB);
        let w = Window {
            mem: (mem_base, mem_end),
            pref: (pref_base, pref_end),
            mem_next: self.mem_next,
            pref_next: self.pref_next,
        };
        self.windows.insert(sec, w);
        self.mem_next = mem_end;
        self.pref_next = pref_end;
        if mem_end > mem_base {
            let v =
                ((mem_base >> 16) as u32 & 0xfff0) | (((mem_end - 1) >> 16) as u32 & 0xfff0) << 16;
            self.write(root, bdf, MEMORY_BASE, 4, v);
        } else {
            self.write(root, bdf, MEMORY_BASE, 4, 0x0000_fff0);
        }
        if pref_end > pref_base {
            let v = ((pref_base >> 16) as u32 & 0xfff0)
                | (((pref_end - 1) >> 16) as u32 & 0xfff0) << 16
                | 0x0001_0001;
            self.write(root, bdf, PREF_MEMORY_BASE, 4, v);
            self.write(root, bdf, PREF_BASE_UPPER32, 4, (pref_base >> 32) as u32);
            self.write(
                root,
                bdf,
                PREF_LIMIT_UPPER32,
                4,
                ((pref_end - 1) >> 32) as u32,
            );
        } else {
            self.write(root, bdf, PREF_MEMORY_BASE, 4, 0x0000_fff0);
        }
        // No I/O window: base above limit.
        self.write(root, bdf, IO_BASE, 1, 0xf0);
        self.write(root, bdf, IO_LIMIT, 1, 0x00);
        let cmd = self.read(root, bdf, COMMAND, 2) as u16;
        self.write(
            root,
            bdf,
            COMMAND,
            2,
            (cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER) as u32,
        );
    }
}
