//! The trait every PCI function implements.

use std::sync::{Arc, Mutex};

use crate::bar::{BarMove, BarRegion, BarRegions};

/// A shared, lockable PCI function: how the bus, ports and the VMM hold devices.
pub type PciHandle = Arc<Mutex<dyn PciFunction>>;

/// The bus numbers a bridge forwards: its secondary bus and the highest bus below
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// Bus directly below the bridge.
    pub secondary: u8,
    /// Highest bus number below the bridge.
    pub subordinate: u8,
}

impl BusRange {
    /// Whether `bus` is below the bridge.
    pub const fn contains(&self, bus: u8) -> bool {
        self.secondary != 0 && self.secondary <= bus && bus <= self.subordinate
    }
}

/// A PCI function as the bus sees it: config space, BARs and, for bridges, what
/// sits below.
///
/// The bus validates guest config accesses before calling (1, 2 or 4 bytes within
/// one dword, offset below 4096), so implementations may rely on that; BAR
/// accesses come with the offset into the BAR and any length the CPU produced.
/// No method may panic on guest-controlled values.
pub trait PciFunction: Send {
    /// A guest config read.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);

    /// A guest config write; returns the BAR move it caused, if any (the bus then
    /// calls [`PciFunction::move_bar`] and its [`crate::BarListener`]).
    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove>;

    /// The BARs that decode right now.
    fn bar_regions(&self) -> BarRegions;

    /// The expansion ROM's window while it decodes (the ROM enabled in
    /// register 0x30, Memory Space on, an address assigned), with index
    /// [`ROM_INDEX`](crate::ROM_INDEX): the bus sends memory cycles in it to
    /// [`PciFunction::read_bar`] and [`PciFunction::write_bar`] with that
    /// index. Default: no ROM shown.
    fn rom_region(&self) -> Option<BarRegion> {
        None
    }

    /// A guest read at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// A guest write at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// A BAR moved: a function that registered something at the old address (an
    /// ioeventfd, a memory slot) moves it. Default: nothing to move.
    fn move_bar(&mut self, moved: &BarMove) {
        let _ = moved;
    }

    /// For a bridge: the bus numbers it forwards. Default: not a bridge.
    fn bus_range(&self) -> Option<BusRange> {
        None
    }

    /// For a bridge: whether a memory (or I/O) cycle at `address` is forwarded to
    /// the secondary side. Default: not a bridge.
    fn forwards(&self, address: u64, memory: bool) -> bool {
        let _ = (address, memory);
        false
    }

    /// For a bridge: the functions on its secondary bus that answer config cycles
    /// now, as (device, function, handle). A hot-plug port lists its device only
    /// while present and powered. Default: none.
    fn children(&self) -> Vec<(u8, u8, PciHandle)> {
        Vec::new()
    }
}
