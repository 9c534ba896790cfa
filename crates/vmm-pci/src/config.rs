//! Configuration space: bytes plus a read-write mask and a write-1-to-clear mask.
//!
//! Every byte of config space has three parts: its value, the bits a guest write
//! may change (`wmask`), and the bits a guest writes 1 to clear (`w1cmask`). All
//! other bits are read-only to the guest. Device code changes any bit through the
//! `set_*` methods, which bypass the masks. Read-only bits that device code changes
//! as the function runs (Interrupt Status, MSI Pending Bits, Presence Detect State)
//! are marked *dynamic* (`set_dynamic_*`): a saved state carries them, while every
//! other read-only bit is configuration that a restore checks (see
//! [`ConfigSpaceState`]). The BAR sizing protocol falls out of
//! the masks: only the address bits above the BAR's size are writable, so writing
//! all ones reads back `!(size - 1)` with the read-only type bits.

use crate::bar::{BarKind, BarMove, BarRegion, BarRegions, MAX_BARS};

mod state;

pub use state::{BarState, ConfigSpaceState};

/// Size of a conventional PCI function's config space.
pub const PCI_CONFIG_SIZE: u16 = 256;
/// Size of a PCI Express function's config space.
pub const PCIE_CONFIG_SIZE: u16 = 4096;

/// Vendor ID (16 bits, read-only).
pub const VENDOR_ID: u16 = 0x00;
/// Device ID (16 bits, read-only).
pub const DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const COMMAND: u16 = 0x04;
/// Status register (16 bits).
pub const STATUS: u16 = 0x06;
/// Revision ID (8 bits).
pub const REVISION_ID: u16 = 0x08;
/// Programming interface, subclass and base class (3 bytes from here).
pub const CLASS_PROG_IF: u16 = 0x09;
/// Cache line size (8 bits, read-write).
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency timer (8 bits).
pub const LATENCY_TIMER: u16 = 0x0d;
/// Header type (8 bits; bit 7 = multi-function).
pub const HEADER_TYPE: u16 = 0x0e;
/// First BAR register.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID (type 0).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (type 0).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Capabilities pointer (8 bits).
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line (8 bits, read-write scratch for the OS).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin (8 bits, read-only; 1 = INTA).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Type 1: primary bus number.
pub const PRIMARY_BUS: u16 = 0x18;
/// Type 1: secondary bus number.
pub const SECONDARY_BUS: u16 = 0x19;
/// Type 1: subordinate bus number.
pub const SUBORDINATE_BUS: u16 = 0x1a;
/// Type 1: secondary latency timer.
pub const SECONDARY_LATENCY: u16 = 0x1b;
/// Type 1: I/O base (bits 7:4 = address 15:12).
pub const IO_BASE: u16 = 0x1c;
/// Type 1: I/O limit (bits 7:4 = address 15:12).
pub const IO_LIMIT: u16 = 0x1d;
/// Type 1: secondary status.
pub const SECONDARY_STATUS: u16 = 0x1e;
/// Type 1: memory base (bits 15:4 = address 31:20).
pub const MEMORY_BASE: u16 = 0x20;
/// Type 1: memory limit (bits 15:4 = address 31:20).
pub const MEMORY_LIMIT: u16 = 0x22;
/// Type 1: prefetchable memory base (bits 15:4 = address 31:20; bits 3:0 = 1: 64-bit).
pub const PREF_MEMORY_BASE: u16 = 0x24;
/// Type 1: prefetchable memory limit.
pub const PREF_MEMORY_LIMIT: u16 = 0x26;
/// Type 1: prefetchable base, upper 32 bits.
pub const PREF_BASE_UPPER32: u16 = 0x28;
/// Type 1: prefetchable limit, upper 32 bits.
pub const PREF_LIMIT_UPPER32: u16 = 0x2c;
/// Type 1: bridge control (16 bits).
pub const BRIDGE_CONTROL: u16 = 0x3e;

/// Command: respond to I/O space cycles.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command: respond to memory space cycles.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: INTx asserted (read-only, driven by the device).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status: the error bits a guest clears by writing 1 (parity, aborts, SERR).
pub const STATUS_ERRORS: u16 = 1 << 8 | 0xf800;

/// Capability ID of the power-management capability.
pub const CAP_ID_PM: u8 = 0x01;
/// Capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID of vendor-specific capabilities (virtio uses these).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID of the PCI Express capability.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// First byte available to capabilities in the standard header.
const CAP_START: u16 = 0x40;

/// Errors building a config space (device code mistakes, not guest actions).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A BAR index past the header's BAR registers.
    #[error("BAR {0} does not exist in this header (type 0 has BARs 0-5, type 1 none)")]
    BarIndex(u8),
    /// A BAR register already in use (also by the upper half of a 64-bit BAR).
    #[error("BAR {0} is already in use")]
    BarInUse(u8),
    /// A BAR size that is not a power of two, or below the minimum for its kind.
    #[error("BAR size {size:#x} is invalid: it must be a power of two of at least {min} bytes")]
    BarSize {
        /// The size asked for.
        size: u64,
        /// The minimum for the BAR's kind.
        min: u64,
    },
    /// A 32-bit BAR (or I/O BAR) larger than its address space.
    #[error("BAR size {0:#x} does not fit a 32-bit BAR; use a 64-bit memory BAR")]
    BarTooLarge(u64),
    /// No room left in the 192 bytes after the header for a capability.
    #[error("no room for a {len}-byte capability in the standard config space")]
    NoCapabilitySpace {
        /// The capability's length.
        len: u16,
    },
}

/// Result of config space construction.
pub type Result<T> = std::result::Result<T, Error>;

/// The two header layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum HeaderType {
    /// Type 0: an endpoint, with six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge (root ports, switch ports), with bus numbers and
    /// forwarding windows.
    Bridge,
}

/// Base class, subclass and programming interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCode {
    /// Base class (byte 0x0b).
    pub class: u8,
    /// Subclass (byte 0x0a).
    pub subclass: u8,
    /// Programming interface (byte 0x09).
    pub prog_if: u8,
}

impl ClassCode {
    /// 0x0200: Ethernet controller.
    pub const ETHERNET: ClassCode = ClassCode::new(0x02, 0x00, 0x00);
    /// 0x0604: PCI-to-PCI bridge.
    pub const PCI_BRIDGE: ClassCode = ClassCode::new(0x06, 0x04, 0x00);
    /// 0x0600: host bridge.
    pub const HOST_BRIDGE: ClassCode = ClassCode::new(0x06, 0x00, 0x00);

    /// A class code.
    pub const fn new(class: u8, subclass: u8, prog_if: u8) -> Self {
        ClassCode {
            class,
            subclass,
            prog_if,
        }
    }
}

/// The identity a function reports in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID (type 0 only).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (type 0 only).
    pub subsystem_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code.
    pub class: ClassCode,
}

#[derive(Debug, Clone, Copy)]
struct BarSlot {
    kind: BarKind,
    size: u64,
    /// The last address the guest programmed (not a sizing pattern).
    programmed: u64,
}

/// One function's configuration space. See the module documentation.
pub struct ConfigSpace {
    bytes: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    wmask: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    w1cmask: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    /// Read-only bits device code changes at run time (saved, not compared).
    dynamic: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    size: u16,
    header: HeaderType,
    bars: [Option<BarSlot>; MAX_BARS],
    last_cap: u16,
    cap_end: u16,
    ignored: u64,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &self.get_u16(VENDOR_ID))
            .field("device_id", &self.get_u16(DEVICE_ID))
            .field("header", &self.header)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Whether a guest access of `len` bytes at `offset` is well formed: 1, 2 or 4 bytes
/// that stay inside one dword of a `size`-byte space.
pub fn access_ok(offset: u16, len: usize, size: u16) -> bool {
    matches!(len, 1 | 2 | 4)
        && (offset as usize & 3) + len <= 4
        && offset as usize + len <= size as usize
}

impl ConfigSpace {
    /// A config space with the given header. `express` selects 4096 bytes (a PCI
    /// Express function) instead of 256. Only the command register's enable bits,
    /// the cache line size, the interrupt line and the status error bits are
    /// writable; the header's other fields are read-only.
    pub fn new(header: HeaderType, ids: &PciIds, express: bool) -> Self {
        let mut cs = ConfigSpace {
            bytes: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            wmask: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            w1cmask: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            dynamic: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            size: if express {
                PCIE_CONFIG_SIZE
            } else {
                PCI_CONFIG_SIZE
            },
            header,
            bars: [None; MAX_BARS],
            last_cap: 0,
            cap_end: CAP_START,
            ignored: 0,
        };
        cs.set_u16(VENDOR_ID, ids.vendor_id);
        cs.set_u16(DEVICE_ID, ids.device_id);
        cs.set_u8(REVISION_ID, ids.revision);
        cs.set_u8(CLASS_PROG_IF, ids.class.prog_if);
        cs.set_u8(CLASS_PROG_IF + 1, ids.class.subclass);
        cs.set_u8(CLASS_PROG_IF + 2, ids.class.class);
        cs.set_wmask_u16(
            COMMAND,
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_BUS_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE,
        );
        cs.set_w1c_u16(STATUS, STATUS_ERRORS);
        cs.set_dynamic_u16(STATUS, STATUS_INTERRUPT);
        cs.set_wmask_u8(CACHE_LINE_SIZE, 0xff);
        cs.set_wmask_u8(INTERRUPT_LINE, 0xff);
        match header {
            HeaderType::Endpoint => {
                cs.set_u8(HEADER_TYPE, 0x00);
                cs.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
                cs.set_u16(SUBSYSTEM_ID, ids.subsystem_id);
            }
            HeaderType::Bridge => {
                cs.set_u8(HEADER_TYPE, 0x01);
                for reg in [
                    PRIMARY_BUS,
                    SECONDARY_BUS,
                    SUBORDINATE_BUS,
                    SECONDARY_LATENCY,
                ] {
                    cs.set_wmask_u8(reg, 0xff);
                }
                // 16-bit I/O decode: address bits 15:12 writable, type nibble 0.
                cs.set_wmask_u8(IO_BASE, 0xf0);
                cs.set_wmask_u8(IO_LIMIT, 0xf0);
                cs.set_w1c_u16(SECONDARY_STATUS, STATUS_ERRORS);
                cs.set_wmask_u16(MEMORY_BASE, 0xfff0);
                cs.set_wmask_u16(MEMORY_LIMIT, 0xfff0);
                // 64-bit prefetchable window.
                cs.set_u16(PREF_MEMORY_BASE, 0x1);
                cs.set_u16(PREF_MEMORY_LIMIT, 0x1);
                cs.set_wmask_u16(PREF_MEMORY_BASE, 0xfff0);
                cs.set_wmask_u16(PREF_MEMORY_LIMIT, 0xfff0);
                cs.set_wmask_u32(PREF_BASE_UPPER32, 0xffff_ffff);
                cs.set_wmask_u32(PREF_LIMIT_UPPER32, 0xffff_ffff);
                // Parity, SERR, ISA, VGA, VGA 16-bit decode, secondary bus reset.
                cs.set_wmask_u16(BRIDGE_CONTROL, 0x005f);
            }
        }
        cs
    }

    /// The header layout.
    pub fn header(&self) -> HeaderType {
        self.header
    }

    /// The size of the space the guest sees: 256 or 4096 bytes.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest accesses refused (malformed or out of range) since creation.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored
    }

    /// Counts one refused guest access; for functions that validate accesses
    /// before reaching this space.
    pub fn count_ignored(&mut self) {
        self.ignored += 1;
    }

    // ---- guest accesses -------------------------------------------------------

    /// A guest read of `data.len()` bytes at `offset`. A malformed access (see
    /// [`access_ok`]) reads as all ones and is counted.
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        if !access_ok(offset, data.len(), self.size) {
            data.fill(0xff);
            self.ignored += 1;
            return;
        }
        let o = offset as usize;
        data.copy_from_slice(&self.bytes[o..o + data.len()]);
    }

    /// A guest write: each bit changes only where the write mask allows it, and
    /// write-1-to-clear bits clear where the guest writes 1. A malformed access is
    /// ignored and counted. Returns the BAR move the write caused, if any.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        if !access_ok(offset, data.len(), self.size) {
            self.ignored += 1;
            return None;
        }
        let o = offset as usize;
        for (i, &v) in data.iter().enumerate() {
            let old = self.bytes[o + i];
            let wm = self.wmask[o + i];
            let c = self.w1cmask[o + i];
            self.bytes[o + i] = ((old & !wm) | (v & wm)) & !(v & c);
        }
        self.bar_write(offset, data)
    }

    /// Reads a 32-bit register as the guest would see it (for helpers and tests).
    pub fn read_u32(&mut self, offset: u16) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    // ---- device-side accessors (no masks) -------------------------------------
    // Offsets here come from device code, not the guest; they must lie inside the
    // 4096-byte array, which every register constant does.

    /// The byte at `offset`.
    pub fn get_u8(&self, offset: u16) -> u8 {
        self.bytes[offset as usize]
    }
    /// The little-endian word at `offset`.
    pub fn get_u16(&self, offset: u16) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }
    /// The little-endian dword at `offset`.
    pub fn get_u32(&self, offset: u16) -> u32 {
        let o = offset as usize;
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap_or([0; 4]))
    }
    /// Sets a byte, ignoring the masks.
    pub fn set_u8(&mut self, offset: u16, v: u8) {
        self.bytes[offset as usize] = v;
    }
    /// Sets a word, ignoring the masks.
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        let o = offset as usize;
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets a dword, ignoring the masks.
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        let o = offset as usize;
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets `bits` in the word at `offset`; returns the old word.
    pub fn set_bits_u16(&mut self, offset: u16, bits: u16) -> u16 {
        let old = self.get_u16(offset);
        self.set_u16(offset, old | bits);
        old
    }
    /// Clears `bits` in the word at `offset`; returns the old word.
    pub fn clear_bits_u16(&mut self, offset: u16, bits: u16) -> u16 {
        let old = self.get_u16(offset);
        self.set_u16(offset, old & !bits);
        old
    }
    /// Sets the guest-writable bits of a byte.
    pub fn set_wmask_u8(&mut self, offset: u16, mask: u8) {
        self.wmask[offset as usize] = mask;
    }
    /// Sets the guest-writable bits of a word.
    pub fn set_wmask_u16(&mut self, offset: u16, mask: u16) {
        let o = offset as usize;
        self.wmask[o..o + 2].copy_from_slice(&mask.to_le_bytes());
    }
    /// Sets the guest-writable bits of a dword.
    pub fn set_wmask_u32(&mut self, offset: u16, mask: u32) {
        let o = offset as usize;
        self.wmask[o..o + 4].copy_from_slice(&mask.to_le_bytes());
    }
    /// Sets the write-1-to-clear bits of a word.
    pub fn set_w1c_u16(&mut self, offset: u16, mask: u16) {
        let o = offset as usize;
        self.w1cmask[o..o + 2].copy_from_slice(&mask.to_le_bytes());
    }
    /// Marks bits of the word at `offset` dynamic: read-only to the guest but
    /// changed by device code as the function runs (Interrupt Status, Presence
    /// Detect State). A saved state carries them as they were; every other
    /// read-only bit is configuration, and a restore refuses a state whose
    /// configuration bits differ from this space's.
    pub fn set_dynamic_u16(&mut self, offset: u16, mask: u16) {
        let o = offset as usize;
        self.dynamic[o..o + 2].copy_from_slice(&mask.to_le_bytes());
    }
    /// Marks bits of the dword at `offset` dynamic (see
    /// [`ConfigSpace::set_dynamic_u16`]).
    pub fn set_dynamic_u32(&mut self, offset: u16, mask: u32) {
        let o = offset as usize;
        self.dynamic[o..o + 4].copy_from_slice(&mask.to_le_bytes());
    }
    /// The dynamic bits of the word at `offset`.
    pub fn dynamic_u16(&self, offset: u16) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.dynamic[o], self.dynamic[o + 1]])
    }
    /// The guest-writable bits of the word at `offset`.
    pub fn wmask_u16(&self, offset: u16) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.wmask[o], self.wmask[o + 1]])
    }
    /// The write-1-to-clear bits of the word at `offset`.
    pub fn w1c_u16(&self, offset: u16) -> u16 {
        let o = offset as usize;
        u16::from_le_bytes([self.w1cmask[o], self.w1cmask[o + 1]])
    }

    /// Marks the function multi-function (header type bit 7).
    pub fn set_multifunction(&mut self, on: bool) {
        let h = self.get_u8(HEADER_TYPE) & 0x7f;
        self.set_u8(HEADER_TYPE, h | (on as u8) << 7);
    }

    /// Sets the interrupt pin (1 = INTA .. 4 = INTD, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(INTERRUPT_PIN, pin.min(4));
    }

    /// Sets or clears the status register's Interrupt Status bit (INTx asserted).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        if asserted {
            self.set_bits_u16(STATUS, STATUS_INTERRUPT);
        } else {
            self.clear_bits_u16(STATUS, STATUS_INTERRUPT);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get_u16(COMMAND)
    }

    /// Whether the guest enabled bus mastering (needed for DMA and MSI).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether INTx is disabled by the command register.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    // ---- BARs -------------------------------------------------------------------

    fn bar_count(&self) -> usize {
        match self.header {
            HeaderType::Endpoint => MAX_BARS,
            HeaderType::Bridge => 0,
        }
    }

    /// Declares BAR `index` of `kind` and `size` bytes. A 64-bit BAR also takes
    /// register `index + 1`. The address bits the size leaves free become
    /// writable; the type bits read back as the kind says.
    pub fn add_bar(&mut self, index: u8, kind: BarKind, size: u64) -> Result<()> {
        let i = index as usize;
        let regs = if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if i + regs > self.bar_count() {
            return Err(Error::BarIndex(index + regs as u8 - 1));
        }
        for r in i..i + regs {
            if self.bars[r].is_some() || self.bar_is_upper_half(r) {
                return Err(Error::BarInUse(r as u8));
            }
        }
        let min = if kind.is_memory() { 16 } else { 4 };
        if !size.is_power_of_two() || size < min {
            return Err(Error::BarSize { size, min });
        }
        if regs == 1 && size > 1 << 31 {
            return Err(Error::BarTooLarge(size));
        }
        let reg = BAR0 + 4 * index as u16;
        let addr_mask = !(size - 1);
        let low_flags = if kind.is_memory() { 0xf } else { 0x3 };
        self.set_u32(reg, kind.flag_bits());
        self.set_wmask_u32(reg, addr_mask as u32 & !low_flags);
        if regs == 2 {
            self.set_u32(reg + 4, 0);
            self.set_wmask_u32(reg + 4, (addr_mask >> 32) as u32);
        }
        self.bars[i] = Some(BarSlot {
            kind,
            size,
            programmed: 0,
        });
        Ok(())
    }

    fn bar_is_upper_half(&self, r: usize) -> bool {
        r > 0
            && matches!(
                self.bars[r - 1],
                Some(BarSlot {
                    kind: BarKind::Memory64 { .. },
                    ..
                })
            )
    }

    /// The address BAR `index` holds now, whether or not decoding is enabled.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let slot = self.bars.get(index as usize).copied().flatten()?;
        let reg = BAR0 + 4 * index as u16;
        let low = self.get_u32(reg) as u64;
        Some(match slot.kind {
            BarKind::Io => low & !0x3,
            BarKind::Memory32 { .. } => low & !0xf,
            BarKind::Memory64 { .. } => (self.get_u32(reg + 4) as u64) << 32 | (low & !0xf),
        })
    }

    /// The size of BAR `index`, if declared.
    pub fn bar_size(&self, index: u8) -> Option<u64> {
        self.bars
            .get(index as usize)
            .copied()
            .flatten()
            .map(|b| b.size)
    }

    /// Sets BAR `index`'s address from device code (a VMM that assigns BARs itself).
    /// Address bits below the BAR's size are dropped.
    pub fn set_bar_address(&mut self, index: u8, address: u64) {
        let Some(slot) = self.bars.get(index as usize).copied().flatten() else {
            return;
        };
        let reg = BAR0 + 4 * index as u16;
        let addr = address & !(slot.size - 1);
        self.set_u32(reg, addr as u32 | slot.kind.flag_bits());
        if matches!(slot.kind, BarKind::Memory64 { .. }) {
            self.set_u32(reg + 4, (addr >> 32) as u32);
        }
        if let Some(s) = self.bars[index as usize].as_mut() {
            s.programmed = addr;
        }
    }

    /// The BARs that decode right now: declared, enabled in the command register
    /// (memory or I/O space), and not left at the sizing pattern or at 0.
    pub fn bar_regions(&self) -> BarRegions {
        let mut out = [None; MAX_BARS];
        let cmd = self.command();
        for (i, slot) in self.bars.iter().enumerate() {
            let Some(slot) = slot else { continue };
            let enabled = if slot.kind.is_memory() {
                cmd & COMMAND_MEMORY != 0
            } else {
                cmd & COMMAND_IO != 0
            };
            if !enabled {
                continue;
            }
            let Some(address) = self.bar_address(i as u8) else {
                continue;
            };
            if address == 0 || address.checked_add(slot.size).is_none() {
                continue;
            }
            out[i] = Some(BarRegion {
                index: i as u8,
                kind: slot.kind,
                address,
                size: slot.size,
            });
        }
        out
    }

    fn bar_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        let end = BAR0 + 4 * self.bar_count() as u16;
        if offset < BAR0 || offset >= end {
            return None;
        }
        let r = ((offset - BAR0) / 4) as usize;
        let index = if self.bars[r].is_some() {
            r
        } else if self.bar_is_upper_half(r) {
            r - 1
        } else {
            return None;
        };
        // A sizing write sets every bit it touches.
        if data.iter().all(|&b| b == 0xff) {
            return None;
        }
        let new = self.bar_address(index as u8)?;
        let slot = self.bars[index].as_mut()?;
        if new == slot.programmed {
            return None;
        }
        let moved = BarMove {
            index: index as u8,
            kind: slot.kind,
            old: slot.programmed,
            new,
            size: slot.size,
        };
        slot.programmed = new;
        Some(moved)
    }

    // ---- capabilities -------------------------------------------------------------

    /// Appends a capability of `len` bytes (including its two-byte header) with ID
    /// `id` to the capability list and returns its offset. The body is zero and
    /// read-only until the caller sets values and masks.
    pub fn add_capability(&mut self, id: u8, len: u16) -> Result<u16> {
        let offset = self.cap_end.next_multiple_of(4);
        if len < 2 || offset as u32 + len as u32 > PCI_CONFIG_SIZE as u32 {
            return Err(Error::NoCapabilitySpace { len });
        }
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        if self.last_cap == 0 {
            self.set_u8(CAPABILITIES_POINTER, offset as u8);
        } else {
            self.set_u8(self.last_cap + 1, offset as u8);
        }
        self.set_bits_u16(STATUS, STATUS_CAP_LIST);
        self.last_cap = offset;
        self.cap_end = offset + len;
        Ok(offset)
    }

    /// The offset of the first capability with `id`, walking the list as a guest
    /// would (at most 48 entries, so a loop cannot hang it).
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        if self.get_u16(STATUS) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut ptr = self.get_u8(CAPABILITIES_POINTER) as u16 & !3;
        for _ in 0..48 {
            if ptr < CAP_START {
                return None;
            }
            if self.get_u8(ptr) == id {
                return Some(ptr);
            }
            ptr = self.get_u8(ptr + 1) as u16 & !3;
        }
        None
    }

    // ---- bridges ------------------------------------------------------------------

    /// For a type 1 header: the secondary and subordinate bus numbers.
    pub fn bus_numbers(&self) -> Option<(u8, u8)> {
        match self.header {
            HeaderType::Bridge => Some((self.get_u8(SECONDARY_BUS), self.get_u8(SUBORDINATE_BUS))),
            HeaderType::Endpoint => None,
        }
    }

    /// For a type 1 header: whether the bridge forwards a memory (or I/O) cycle at
    /// `address` to its secondary side, per its windows and command register.
    pub fn bridge_forwards(&self, address: u64, memory: bool) -> bool {
        if self.header != HeaderType::Bridge {
            return false;
        }
        let cmd = self.command();
        if memory {
            if cmd & COMMAND_MEMORY == 0 {
                return false;
            }
            let base = ((self.get_u16(MEMORY_BASE) & 0xfff0) as u64) << 16;
            let limit = ((self.get_u16(MEMORY_LIMIT) & 0xfff0) as u64) << 16 | 0xf_ffff;
            if base <= limit && (base..=limit).contains(&address) {
                return true;
            }
            let pbase = (self.get_u32(PREF_BASE_UPPER32) as u64) << 32
                | ((self.get_u16(PREF_MEMORY_BASE) & 0xfff0) as u64) << 16;
            let plimit = (self.get_u32(PREF_LIMIT_UPPER32) as u64) << 32
                | ((self.get_u16(PREF_MEMORY_LIMIT) & 0xfff0) as u64) << 16
                | 0xf_ffff;
            pbase <= plimit && (pbase..=plimit).contains(&address)
        } else {
            if cmd & COMMAND_IO == 0 {
                return false;
            }
            let base = ((self.get_u8(IO_BASE) & 0xf0) as u64) << 8;
            let limit = ((self.get_u8(IO_LIMIT) & 0xf0) as u64) << 8 | 0xfff;
            base <= limit && (base..=limit).contains(&address)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(class: ClassCode) -> PciIds {
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 1,
            class,
        }
    }

    fn endpoint() -> ConfigSpace {
        ConfigSpace::new(HeaderType::Endpoint, &ids(ClassCode::ETHERNET), true)
    }

    fn w32(cs: &mut ConfigSpace, off: u16, v: u32) -> Option<BarMove> {
        cs.write(off, &v.to_le_bytes())
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut cs = endpoint();
        assert_eq!(cs.read_u32(0), 0x1041_1af4);
        w32(&mut cs, 0, 0xdead_beef);
        assert_eq!(cs.read_u32(0), 0x1041_1af4);
        assert_eq!(cs.read_u32(0x08), 0x0200_0001);
        assert_eq!(cs.read_u32(0x2c), 0x1100_1af4);
        assert_eq!(cs.get_u8(HEADER_TYPE), 0);
        cs.set_multifunction(true);
        assert_eq!(cs.get_u8(HEADER_TYPE), 0x80);
    }

    #[test]
    fn command_and_status_masks() {
        let mut cs = endpoint();
        w32(&mut cs, COMMAND, 0xffff_ffff);
        assert_eq!(cs.command(), 0x0547);
        cs.set_u16(STATUS, 0xf900 | STATUS_CAP_LIST | STATUS_INTERRUPT);
        // Writing 1s clears only the error bits; writing 0s changes nothing.
        cs.write(STATUS, &0u16.to_le_bytes());
        assert_eq!(cs.get_u16(STATUS), 0xf918);
        cs.write(STATUS, &0x8100u16.to_le_bytes());
        assert_eq!(cs.get_u16(STATUS), 0x7818);
        cs.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(STATUS), STATUS_CAP_LIST | STATUS_INTERRUPT);
    }

    #[test]
    fn malformed_accesses_are_all_ones_and_counted() {
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(ClassCode::ETHERNET), false);
        let mut b = [0u8; 4];
        cs.read(0x100, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut b = [0u8; 2];
        cs.read(0x03, &mut b);
        assert_eq!(b, [0xff; 2]);
        let mut b = [0u8; 3];
        cs.read(0, &mut b);
        assert_eq!(b, [0xff; 3]);
        cs.write(0x3d, &[1, 2, 3, 4]);
        cs.write(0xffff, &[1]);
        assert_eq!(cs.ignored_accesses(), 5);
        // A word inside a dword at an odd offset is a legal byte-enable pattern.
        let mut b = [0u8; 2];
        cs.read(0x01, &mut b);
        assert_eq!(b, [0x1a, 0x41]);
        assert!(access_ok(0xffc, 4, 4096));
        assert!(!access_ok(0xffe, 4, 4096));
    }

    #[test]
    fn bar_sizing_32_64_prefetchable_io() {
        let mut cs = endpoint();
        cs.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        cs.add_bar(1, BarKind::Io, 0x20).unwrap();
        cs.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x4_0000_0000)
            .unwrap();
        assert_eq!(cs.add_bar(3, BarKind::Io, 4), Err(Error::BarInUse(3)));
        assert_eq!(
            cs.add_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                16
            ),
            Err(Error::BarIndex(6))
        );
        assert_eq!(
            cs.add_bar(4, BarKind::Io, 6),
            Err(Error::BarSize { size: 6, min: 4 })
        );
        assert_eq!(
            cs.add_bar(
                4,
                BarKind::Memory32 {
                    prefetchable: false
                },
                8
            ),
            Err(Error::BarSize { size: 8, min: 16 })
        );
        assert_eq!(
            cs.add_bar(4, BarKind::Io, 1 << 32),
            Err(Error::BarTooLarge(1 << 32))
        );

        for (reg, expect) in [
            (0x10, 0xffff_f000),
            (0x14, 0xffff_ffe1),
            (0x18, 0x0000_000c),
            (0x1c, 0xffff_fffc),
            (0x20, 0),
        ] {
            assert_eq!(w32(&mut cs, reg, 0xffff_ffff), None);
            assert_eq!(cs.read_u32(reg), expect, "reg {reg:#x}");
        }
        // Assign: each dword write that changes the address is a move.
        let m = w32(&mut cs, 0x10, 0xfebf_f000).unwrap();
        assert_eq!((m.index, m.old, m.new, m.size), (0, 0, 0xfebf_f000, 0x1000));
        w32(&mut cs, 0x18, 0).unwrap();
        let m = w32(&mut cs, 0x1c, 0x8).unwrap();
        assert_eq!((m.index, m.new), (2, 0x8_0000_0000));
        w32(&mut cs, 0x14, 0xc040).unwrap();
        assert_eq!(cs.bar_address(1), Some(0xc040));
        assert_eq!(cs.bar_address(2), Some(0x8_0000_0000));
        // No decode until the command register enables it.
        assert!(cs.bar_regions().iter().all(Option::is_none));
        cs.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let r = cs.bar_regions();
        assert_eq!(r[0].unwrap().address, 0xfebf_f000);
        assert!(r[1].is_none());
        assert_eq!(r[2].unwrap().size, 0x4_0000_0000);
        assert!(r[0].unwrap().contains(0xfebf_ffff) && !r[0].unwrap().contains(0xfec0_0000));
        // Sizing then restoring the same address is not a move.
        assert_eq!(w32(&mut cs, 0x10, 0xffff_ffff), None);
        let m = w32(&mut cs, 0x10, 0xfebf_f000);
        assert_eq!(m, None);
    }

    #[test]
    fn capability_list_is_walkable() {
        let mut cs = endpoint();
        assert_eq!(cs.find_capability(CAP_ID_MSIX), None);
        let a = cs.add_capability(CAP_ID_PCIE, 0x3c).unwrap();
        let b = cs.add_capability(CAP_ID_MSIX, 12).unwrap();
        assert_eq!((a, b), (0x40, 0x7c));
        assert_eq!(cs.get_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(cs.get_u16(0x40), 0x7c10);
        assert_eq!(cs.get_u16(0x7c), 0x0011);
        assert_eq!(cs.find_capability(CAP_ID_MSIX), Some(0x7c));
        assert!(cs.get_u16(STATUS) & STATUS_CAP_LIST != 0);
        assert_eq!(
            cs.add_capability(CAP_ID_VENDOR, 200),
            Err(Error::NoCapabilitySpace { len: 200 })
        );
        assert_eq!(
            cs.add_capability(CAP_ID_VENDOR, u16::MAX),
            Err(Error::NoCapabilitySpace { len: u16::MAX })
        );
        // A guest cannot rewrite the list.
        cs.write(0x41, &[0x40]);
        assert_eq!(cs.get_u8(0x41), 0x7c);
    }

    #[test]
    fn bridge_header_and_windows() {
        let mut cs = ConfigSpace::new(HeaderType::Bridge, &ids(ClassCode::PCI_BRIDGE), true);
        assert_eq!(cs.get_u8(HEADER_TYPE), 1);
        assert_eq!(cs.add_bar(0, BarKind::Io, 4), Err(Error::BarIndex(0)));
        w32(&mut cs, PRIMARY_BUS, 0x00_05_01_00);
        assert_eq!(cs.bus_numbers(), Some((1, 5)));
        cs.write(IO_BASE, &[0xff]);
        assert_eq!(cs.get_u8(IO_BASE), 0xf0);
        w32(&mut cs, MEMORY_BASE, 0xfe1f_fe00);
        w32(&mut cs, PREF_MEMORY_BASE, 0xffff_fff1);
        assert_eq!(cs.get_u32(PREF_MEMORY_BASE), 0xfff1_fff1);
        w32(&mut cs, PREF_BASE_UPPER32, 0x80);
        w32(&mut cs, PREF_LIMIT_UPPER32, 0x80);
        w32(&mut cs, PREF_MEMORY_BASE, 0x0011_0001);
        assert!(!cs.bridge_forwards(0xfe00_0000, true));
        cs.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(cs.bridge_forwards(0xfe00_0000, true));
        assert!(cs.bridge_forwards(0xfe1f_ffff, true));
        assert!(!cs.bridge_forwards(0xfe20_0000, true));
        assert!(cs.bridge_forwards(0x80_0000_0000, true));
        assert!(cs.bridge_forwards(0x80_001f_ffff, true));
        assert!(!cs.bridge_forwards(0x80_0020_0000, true));
        assert!(!cs.bridge_forwards(0x1000, false));
        cs.write(BRIDGE_CONTROL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(BRIDGE_CONTROL), 0x5f);
    }
}
