//! A PCI bus segment: bus 0 of a host bridge, with bridges below it.
//!
//! [`PciRoot`] routes configuration cycles by bus/device/function (directly, or
//! from an ECAM window offset) through bridges' bus numbers, and memory and I/O
//! cycles to the BAR that decodes them, through bridges' forwarding windows. It
//! holds at most one function lock at a time, so a function may lock its own
//! children.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::address::Bdf;
use crate::bar::BarMove;
use crate::config::{PCIE_CONFIG_SIZE, access_ok};
use crate::function::{PciFunction, PciHandle};

/// Errors placing functions on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The device number is past 31 or the function past 7.
    #[error("device {device}, function {function} is not a valid slot (device 0-31, function 0-7)")]
    InvalidSlot {
        /// Device number asked for.
        device: u8,
        /// Function number asked for.
        function: u8,
    },
    /// Something already sits there.
    #[error("00:{device:02x}.{function} is already occupied")]
    Occupied {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// A multi-function device needs function 0 first (guests skip devices
    /// without it).
    #[error("00:{device:02x}.{function} needs function 0 of device {device:#x} to be added first")]
    NoFunctionZero {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
}

/// Result of bus operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Told when the guest moves a BAR, for VMMs that map BARs outside the bus (KVM
/// memory slots, ioeventfds). Called without any function lock held.
pub trait BarListener: Send + Sync {
    /// The function at `bdf` moved a BAR.
    fn bar_moved(&self, bdf: Bdf, moved: &BarMove);
}

fn lock(h: &PciHandle) -> MutexGuard<'_, dyn PciFunction + 'static> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bus 0 of a PCI segment. See the module documentation.
#[derive(Default)]
pub struct PciRoot {
    slots: Vec<Option<PciHandle>>,
    listener: Option<Arc<dyn BarListener>>,
    malformed: AtomicU64,
    unclaimed: AtomicU64,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field(
                "functions",
                &self.slots.iter().filter(|s| s.is_some()).count(),
            )
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// An empty bus 0.
    pub fn new() -> Self {
        PciRoot {
            slots: vec![None; 256],
            ..Default::default()
        }
    }

    /// Sets who hears about BAR moves.
    pub fn set_bar_listener(&mut self, listener: Arc<dyn BarListener>) {
        self.listener = Some(listener);
    }

    /// Places `function` at 00:`device`.`function_number`.
    pub fn add(&mut self, device: u8, function_number: u8, function: PciHandle) -> Result<()> {
        if device > 31 || function_number > 7 {
            return Err(Error::InvalidSlot {
                device,
                function: function_number,
            });
        }
        if self.slots.len() < 256 {
            self.slots.resize(256, None);
        }
        let i = device as usize * 8 + function_number as usize;
        if self.slots[i].is_some() {
            return Err(Error::Occupied {
                device,
                function: function_number,
            });
        }
        if function_number != 0 && self.slots[device as usize * 8].is_none() {
            return Err(Error::NoFunctionZero {
                device,
                function: function_number,
            });
        }
        self.slots[i] = Some(function);
        Ok(())
    }

    /// Removes and returns the function at 00:`device`.`function`.
    pub fn remove(&mut self, device: u8, function: u8) -> Option<PciHandle> {
        if device > 31 || function > 7 {
            return None;
        }
        self.slots
            .get_mut(device as usize * 8 + function as usize)?
            .take()
    }

    /// Config accesses refused as malformed (wrong size, crossing a dword, past 4 KiB).
    pub fn malformed_accesses(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Cycles nothing claimed (config cycles to empty slots, MMIO/IO to no BAR).
    pub fn unclaimed_cycles(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    fn bus0(&self) -> impl Iterator<Item = &PciHandle> {
        self.slots.iter().flatten()
    }

    /// The function that answers config cycles for `bdf` now, if any.
    pub fn find(&self, bdf: Bdf) -> Option<PciHandle> {
        if bdf.bus == 0 {
            return self
                .slots
                .get(bdf.device as usize * 8 + bdf.function as usize)?
                .clone();
        }
        // Each step goes one bus deeper; 256 steps bound a malformed topology.
        // The first level is bus 0 itself, walked without copying.
        let mut level: Option<Vec<PciHandle>> = None;
        for _ in 0..256 {
            let mut next = None;
            let candidates: Box<dyn Iterator<Item = &PciHandle>> = match &level {
                None => Box::new(self.bus0()),
                Some(v) => Box::new(v.iter()),
            };
            for h in candidates {
                let g = lock(h);
                let Some(range) = g.bus_range() else { continue };
                if !range.contains(bdf.bus) {
                    continue;
                }
                let children = g.children();
                drop(g);
                if range.secondary == bdf.bus {
                    return children
                        .into_iter()
                        .find(|(d, f, _)| *d == bdf.device && *f == bdf.function)
                        .map(|(_, _, h)| h);
                }
                next = Some(children.into_iter().map(|(_, _, h)| h).collect());
                break;
            }
            level = Some(next?);
        }
        None
    }

    /// Every function that answers config cycles now, with its address, in bus
    /// order as a depth-first enumeration would find them.
    pub fn functions(&self) -> Vec<(Bdf, PciHandle)> {
        let mut out = Vec::new();
        let mut stack: Vec<(u8, u8, u8, PciHandle)> = Vec::new();
        for (i, h) in self.slots.iter().enumerate().rev() {
            if let Some(h) = h {
                stack.push((0, (i / 8) as u8, (i % 8) as u8, h.clone()));
            }
        }
        while let Some((bus, d, f, h)) = stack.pop() {
            out.push((Bdf::new(bus, d, f), h.clone()));
            if out.len() > 256 * 256 {
                break;
            }
            let g = lock(&h);
            if let Some(range) = g.bus_range().filter(|r| r.secondary > bus) {
                for (cd, cf, ch) in g.children().into_iter().rev() {
                    stack.push((range.secondary, cd, cf, ch));
                }
            }
        }
        out
    }

    /// A guest config read of `data.len()` bytes at `offset` of `bdf`. Malformed
    /// accesses and accesses to absent functions read as all ones.
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        if !access_ok(offset, data.len(), PCIE_CONFIG_SIZE) {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
            return;
        }
        match self.find(bdf) {
            Some(h) => lock(&h).read_config(offset, data),
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// A guest config write. Malformed writes and writes to absent functions are
    /// dropped and counted. A BAR move is passed to the function and the listener.
    pub fn config_write(&self, bdf: Bdf, offset: u16, data: &[u8]) {
        if !access_ok(offset, data.len(), PCIE_CONFIG_SIZE) {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(h) = self.find(bdf) else {
            self.unclaimed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let moved = {
            let mut g = lock(&h);
            let moved = g.write_config(offset, data);
            if let Some(m) = &moved {
                g.move_bar(m);
            }
            moved
        };
        if let (Some(m), Some(l)) = (moved, &self.listener) {
            l.bar_moved(bdf, &m);
        }
    }

    /// A read at `offset` into the ECAM window.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match Bdf::from_ecam_offset(offset) {
            Some((bdf, reg)) => self.config_read(bdf, reg, data),
            None => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// A write at `offset` into the ECAM window.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        match Bdf::from_ecam_offset(offset) {
            Some((bdf, reg)) => self.config_write(bdf, reg, data),
            None => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn dispatch(
        &self,
        address: u64,
        memory: bool,
        mut access: impl FnMut(&mut dyn PciFunction, u8, u64),
    ) -> bool {
        let mut level: Vec<PciHandle> = self.bus0().cloned().collect();
        for _ in 0..256 {
            if level.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for h in &level {
                let mut g = lock(h);
                let regions = g.bar_regions();
                let rom = if memory { g.rom_region() } else { None };
                if let Some(r) = regions
                    .iter()
                    .flatten()
                    .chain(rom.iter())
                    .find(|r| r.kind.is_memory() == memory && r.contains(address))
                {
                    access(&mut *g, r.index, address - r.address);
                    return true;
                }
                if g.forwards(address, memory) {
                    next.extend(g.children().into_iter().map(|(_, _, c)| c));
                }
            }
            level = next;
        }
        self.unclaimed.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn read(&self, address: u64, memory: bool, data: &mut [u8]) -> bool {
        let hit = self.dispatch(address, memory, |f, bar, off| f.read_bar(bar, off, data));
        if !hit {
            data.fill(0xff);
        }
        hit
    }

    /// A guest memory read at `address`; `false` (and all ones) when no BAR (or
    /// expansion ROM window, [`PciFunction::rom_region`]) claims it.
    pub fn mmio_read(&self, address: u64, data: &mut [u8]) -> bool {
        self.read(address, true, data)
    }

    /// A guest memory write at `address`; `false` when no BAR (or expansion ROM
    /// window) claims it.
    pub fn mmio_write(&self, address: u64, data: &[u8]) -> bool {
        self.dispatch(address, true, |f, bar, off| f.write_bar(bar, off, data))
    }

    /// A guest I/O read at `port`; `false` (and all ones) when no BAR claims it.
    pub fn io_read(&self, port: u64, data: &mut [u8]) -> bool {
        self.read(port, false, data)
    }

    /// A guest I/O write at `port`; `false` when no BAR claims it.
    pub fn io_write(&self, port: u64, data: &[u8]) -> bool {
        self.dispatch(port, false, |f, bar, off| f.write_bar(bar, off, data))
    }
}

/// Wraps a function into a [`PciHandle`].
pub fn handle<F: PciFunction + 'static>(function: F) -> PciHandle {
    Arc::new(Mutex::new(function))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::{BarKind, BarRegion, BarRegions};
    use crate::config::{
        BAR0, COMMAND, COMMAND_MEMORY, ClassCode, ConfigSpace, HeaderType, MEMORY_BASE,
        PRIMARY_BUS, PciIds,
    };
    use crate::ecam_offset;
    use crate::function::BusRange;
    use crate::testing::StubEndpoint;

    /// A minimal endpoint: vendor 0x1234, a 4 KiB memory BAR that reads back what
    /// was written.
    fn scratch(device_id: u16) -> StubEndpoint {
        let ids = PciIds {
            vendor_id: 0x1234,
            device_id,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class: ClassCode::ETHERNET,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
        cs.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        StubEndpoint::new(cs)
    }

    /// A plain bridge with one child at device 0.
    struct Bridge {
        cs: ConfigSpace,
        child: Option<PciHandle>,
    }
    impl PciFunction for Bridge {
        fn read_config(&mut self, offset: u16, data: &mut [u8]) {
            self.cs.read(offset, data)
        }
        fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
            self.cs.write(offset, data)
        }
        fn bar_regions(&self) -> BarRegions {
            self.cs.bar_regions()
        }
        fn read_bar(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(0xff)
        }
        fn write_bar(&mut self, _: u8, _: u64, _: &[u8]) {}
        fn bus_range(&self) -> Option<BusRange> {
            self.cs
                .bus_numbers()
                .map(|(secondary, subordinate)| BusRange {
                    secondary,
                    subordinate,
                })
        }
        fn forwards(&self, address: u64, memory: bool) -> bool {
            self.cs.bridge_forwards(address, memory)
        }
        fn children(&self) -> Vec<(u8, u8, PciHandle)> {
            self.child.iter().map(|c| (0, 0, c.clone())).collect()
        }
    }

    fn bridge(child: Option<PciHandle>) -> Bridge {
        let ids = PciIds {
            vendor_id: 0x1b36,
            device_id: 0xc,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class: ClassCode::PCI_BRIDGE,
        };
        Bridge {
            cs: ConfigSpace::new(HeaderType::Bridge, &ids, true),
            child,
        }
    }

    #[derive(Default)]
    struct Moves(Mutex<Vec<(Bdf, BarMove)>>);
    impl BarListener for Moves {
        fn bar_moved(&self, bdf: Bdf, moved: &BarMove) {
            self.0.lock().unwrap().push((bdf, *moved));
        }
    }

    fn r32(root: &PciRoot, bdf: Bdf, off: u16) -> u32 {
        let mut b = [0; 4];
        root.config_read(bdf, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(root: &PciRoot, bdf: Bdf, off: u16, v: u32) {
        root.config_write(bdf, off, &v.to_le_bytes())
    }

    /// A function with no BARs whose expansion ROM decodes at 0xfd00_0000
    /// (2 KiB) while `shown`; it records the (index, offset) of each access.
    struct RomOnly {
        cs: ConfigSpace,
        shown: bool,
        seen: Vec<(u8, u64)>,
    }
    impl PciFunction for RomOnly {
        fn read_config(&mut self, offset: u16, data: &mut [u8]) {
            self.cs.read(offset, data)
        }
        fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
            self.cs.write(offset, data)
        }
        fn bar_regions(&self) -> BarRegions {
            self.cs.bar_regions()
        }
        fn rom_region(&self) -> Option<BarRegion> {
            self.shown.then_some(BarRegion {
                index: crate::ROM_INDEX,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                address: 0xfd00_0000,
                size: 0x800,
            })
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            self.seen.push((bar, offset));
            data.fill(0x55);
        }
        fn write_bar(&mut self, bar: u8, offset: u64, _: &[u8]) {
            self.seen.push((bar, offset));
        }
    }

    #[test]
    fn memory_cycles_reach_an_expansion_rom_window_while_it_decodes() {
        let ids = PciIds {
            vendor_id: 0x1234,
            device_id: 9,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class: ClassCode::ETHERNET,
        };
        let f = Arc::new(Mutex::new(RomOnly {
            cs: ConfigSpace::new(HeaderType::Endpoint, &ids, true),
            shown: true,
            seen: Vec::new(),
        }));
        let mut root = PciRoot::new();
        root.add(3, 0, f.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(root.mmio_read(0xfd00_0010, &mut b));
        assert_eq!(b, [0x55; 2]);
        assert!(root.mmio_write(0xfd00_07ff, &[1]));
        // Past the window, and I/O cycles at the same number: not the ROM's.
        assert!(!root.mmio_read(0xfd00_0800, &mut b));
        assert!(!root.io_read(0xfd00_0010, &mut b));
        assert_eq!(
            f.lock().unwrap().seen,
            [(crate::ROM_INDEX, 0x10), (crate::ROM_INDEX, 0x7ff)]
        );
        f.lock().unwrap().shown = false;
        assert!(!root.mmio_read(0xfd00_0010, &mut b));
        assert_eq!(b, [0xff; 2]);
        assert_eq!(f.lock().unwrap().seen.len(), 2);
    }

    #[test]
    fn slots_and_errors() {
        let mut root = PciRoot::new();
        root.add(1, 0, handle(scratch(1))).unwrap();
        assert_eq!(
            root.add(1, 0, handle(scratch(2))),
            Err(Error::Occupied {
                device: 1,
                function: 0
            })
        );
        assert_eq!(
            root.add(2, 1, handle(scratch(2))),
            Err(Error::NoFunctionZero {
                device: 2,
                function: 1
            })
        );
        assert_eq!(
            root.add(32, 0, handle(scratch(2))),
            Err(Error::InvalidSlot {
                device: 32,
                function: 0
            })
        );
        assert_eq!(
            Error::NoFunctionZero {
                device: 2,
                function: 1
            }
            .to_string(),
            "00:02.1 needs function 0 of device 0x2 to be added first"
        );
        assert_eq!(r32(&root, Bdf::new(0, 1, 0), 0), 0x0001_1234);
        assert_eq!(r32(&root, Bdf::new(0, 3, 0), 0), u32::MAX);
        assert_eq!(root.unclaimed_cycles(), 1);
        let mut b = [0; 4];
        root.config_read(Bdf::new(0, 1, 0), 0x1002, &mut b);
        root.config_read(Bdf::new(0, 1, 0), 2, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(root.malformed_accesses(), 2);
        assert!(root.remove(1, 0).is_some());
        assert_eq!(r32(&root, Bdf::new(0, 1, 0), 0), u32::MAX);
    }

    #[test]
    fn routing_through_a_bridge_and_bar_dispatch() {
        let dev = handle(scratch(0x77));
        let mut root = PciRoot::new();
        let moves = Arc::new(Moves::default());
        root.set_bar_listener(moves.clone());
        root.add(0, 0, handle(scratch(1))).unwrap();
        root.add(1, 0, handle(bridge(Some(dev.clone())))).unwrap();
        let port = Bdf::new(0, 1, 0);
        let child = Bdf::new(2, 0, 0);
        // Until the bridge has bus numbers, bus 2 does not exist.
        assert_eq!(r32(&root, child, 0), u32::MAX);
        w32(&root, port, PRIMARY_BUS, 0x0003_0200);
        assert_eq!(r32(&root, child, 0), 0x0077_1234);
        assert_eq!(r32(&root, Bdf::new(2, 1, 0), 0), u32::MAX);
        assert_eq!(r32(&root, Bdf::new(3, 0, 0), 0), u32::MAX);
        // ECAM addressing reaches the same register.
        let mut b = [0; 2];
        root.ecam_read(ecam_offset(child, 2), &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x77);
        let listed: Vec<Bdf> = root.functions().into_iter().map(|(b, _)| b).collect();
        assert_eq!(listed, [Bdf::new(0, 0, 0), port, child]);

        // Assign the child's BAR; it only decodes once the bridge window and both
        // command registers allow it.
        w32(&root, child, BAR0, 0xfe00_0000);
        assert_eq!(moves.0.lock().unwrap()[0].0, child);
        assert_eq!(moves.0.lock().unwrap()[0].1.new, 0xfe00_0000);
        w32(&root, child, COMMAND, COMMAND_MEMORY as u32);
        assert!(!root.mmio_write(0xfe00_0004, &[9]));
        w32(&root, port, MEMORY_BASE, 0xfe00_fe00);
        assert!(!root.mmio_write(0xfe00_0004, &[9]));
        w32(&root, port, COMMAND, COMMAND_MEMORY as u32);
        assert!(root.mmio_write(0xfe00_0004, &[9]));
        let mut b = [0; 1];
        assert!(root.mmio_read(0xfe00_0004, &mut b));
        assert_eq!(b, [9]);
        assert!(!root.mmio_read(0xfe10_0000, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!root.io_write(0xc000, &[1]));
    }
}
