//! Base address registers: what a BAR decodes and how it moved.

/// A type 0 header has six BAR registers.
pub const MAX_BARS: usize = 6;

/// The index BAR accesses use for the expansion ROM's window (register 0x30):
/// after BARs 0 to 5, as VFIO numbers its ROM region and Linux its
/// `PCI_ROM_RESOURCE`. See [`PciFunction::rom_region`](crate::PciFunction::rom_region).
pub const ROM_INDEX: u8 = 6;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum BarKind {
    /// I/O space (bit 0 set); at least 4 bytes.
    Io,
    /// 32-bit memory space; at least 16 bytes.
    Memory32 {
        /// Reads have no side effects (bit 3).
        prefetchable: bool,
    },
    /// 64-bit memory space, using this BAR register and the next; at least 16 bytes.
    Memory64 {
        /// Reads have no side effects (bit 3).
        prefetchable: bool,
    },
}

impl BarKind {
    /// The read-only low bits of the BAR register (space, type, prefetchable).
    pub const fn flag_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => (prefetchable as u32) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | (prefetchable as u32) << 3,
        }
    }

    /// Whether this BAR decodes memory (as opposed to I/O) cycles.
    pub const fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }
}

/// A BAR that currently decodes a range: its register index, kind, guest address
/// and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR register index (0..6).
    pub index: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Guest physical (or I/O port) address.
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl BarRegion {
    /// Whether `address` falls inside this region.
    pub const fn contains(&self, address: u64) -> bool {
        address >= self.address && address - self.address < self.size
    }
}

/// The BARs of one function that decode right now, by index.
pub type BarRegions = [Option<BarRegion>; MAX_BARS];

/// The guest reprogrammed a BAR: a VMM that maps BARs itself (ioeventfds, KVM memory
/// slots for passthrough) moves them from `old` to `new`.
///
/// Sizing writes (all ones) are not moves. A 64-bit BAR moves in two steps, one per
/// dword the guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR register index.
    pub index: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Address before the write.
    pub old: u64,
    /// Address after the write.
    pub new: u64,
    /// Size in bytes.
    pub size: u64,
}
