//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! The table and PBA live in BAR memory the function owns; the function forwards
//! its BAR accesses to [`Msix::read_table`], [`Msix::write_table`] and
//! [`Msix::read_pba`], and calls [`Msix::config_written`] after each config write.
//!
//! The capability's registers live in the function's [`ConfigSpace`]; the table,
//! the PBA and a copy of Enable, Function Mask and Bus Master live here. A
//! migration saves both ([`MsixState`]); see there for the restore order.

use crate::config::{self, CAP_ID_MSIX, ConfigSpace};
use crate::interrupt::{Delivery, MsiMessage, MsiSink};

mod state;

pub use state::MsixState;

/// Message Control (16 bits).
pub const MSIX_CTRL: u16 = 0x02;
/// Table offset and BIR.
pub const MSIX_TABLE: u16 = 0x04;
/// PBA offset and BIR.
pub const MSIX_PBA: u16 = 0x08;
/// Capability length.
pub const MSIX_CAP_LEN: u16 = 0x0c;
/// Message Control: Function Mask.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: MSI-X Enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// Size of one table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector Control: Mask Bit.
pub const MSIX_ENTRY_MASKED: u32 = 1;
/// MSI-X allows at most 2048 vectors.
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// Errors adding MSI-X.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// MSI-X allows 1 to 2048 vectors.
    #[error("MSI-X supports 1 to 2048 vectors, not {0}")]
    VectorCount(u16),
    /// Table and PBA offsets must be 8-byte aligned, and the BIR a BAR index.
    #[error(
        "MSI-X {what} at BAR {bar} offset {offset:#x} is invalid: BAR must be 0-5 and the offset 8-byte aligned"
    )]
    Placement {
        /// "table" or "PBA".
        what: &'static str,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u32,
    },
    /// The capability does not fit.
    #[error("cannot add the MSI-X capability")]
    Config(#[from] config::Error),
}

/// Result of MSI-X setup.
pub type Result<T> = std::result::Result<T, Error>;

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector Control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    const RESET: MsixEntry = MsixEntry {
        address: 0,
        data: 0,
        control: MSIX_ENTRY_MASKED,
    };

    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & MSIX_ENTRY_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: self.address,
            data: self.data,
        }
    }
}

/// MSI-X state of one function. See the module documentation.
#[derive(Debug, Clone)]
pub struct Msix {
    cap: u16,
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    bus_master: bool,
    table: (u8, u32),
    pba: (u8, u32),
    ignored: u64,
}

impl Msix {
    /// Appends an MSI-X capability with `vectors` vectors, its table at
    /// `table_offset` in BAR `table_bar` and its PBA at `pba_offset` in `pba_bar`.
    /// The function must declare BARs large enough for [`Msix::table_len`] and
    /// [`Msix::pba_len`].
    pub fn add(
        config: &mut ConfigSpace,
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<Msix> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(Error::VectorCount(vectors));
        }
        for (what, bar, offset) in [
            ("table", table_bar, table_offset),
            ("PBA", pba_bar, pba_offset),
        ] {
            if bar > 5 || offset % 8 != 0 {
                return Err(Error::Placement { what, bar, offset });
            }
        }
        let cap = config.add_capability(CAP_ID_MSIX, MSIX_CAP_LEN)?;
        config.set_u16(cap + MSIX_CTRL, vectors - 1);
        config.set_wmask_u16(cap + MSIX_CTRL, MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        config.set_u32(cap + MSIX_TABLE, table_offset | table_bar as u32);
        config.set_u32(cap + MSIX_PBA, pba_offset | pba_bar as u32);
        Ok(Msix {
            cap,
            entries: vec![MsixEntry::RESET; vectors as usize],
            pending: vec![0; (vectors as usize).div_ceil(64)],
            enabled: false,
            function_masked: false,
            bus_master: false,
            table: (table_bar, table_offset),
            pba: (pba_bar, pba_offset),
            ignored: 0,
        })
    }

    /// The capability's offset.
    pub fn offset(&self) -> u16 {
        self.cap
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes the table takes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA takes.
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// BAR index and offset of the table.
    pub fn table_location(&self) -> (u8, u32) {
        self.table
    }

    /// BAR index and offset of the PBA.
    pub fn pba_location(&self) -> (u8, u32) {
        self.pba
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the whole function is masked.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Table entry `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(vector as usize).copied()
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = vector as usize;
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// Malformed table or PBA accesses (not a dword or qword, misaligned, out of
    /// range, or a PBA write), each ignored or read as all ones.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored
    }

    fn access_ok(offset: u64, len: usize, size: u64) -> bool {
        matches!(len, 4 | 8)
            && offset % len as u64 == 0
            && offset.checked_add(len as u64).is_some_and(|e| e <= size)
    }

    /// A guest read of the table at `offset` (relative to the table's start).
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len(), self.table_len()) {
            data.fill(0xff);
            self.ignored += 1;
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            let e = &self.entries[(off / MSIX_ENTRY_SIZE) as usize];
            let v = match off % MSIX_ENTRY_SIZE {
                0 => e.address as u32,
                4 => (e.address >> 32) as u32,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A guest write to the table at `offset`. Unmasking a vector with its pending
    /// bit set sends the message now.
    pub fn write_table(&mut self, offset: u64, data: &[u8], sink: &dyn MsiSink) {
        if !Self::access_ok(offset, data.len(), self.table_len()) {
            self.ignored += 1;
            return;
        }
        let vector = (offset / MSIX_ENTRY_SIZE) as usize;
        let before = self.entries[vector];
        for (i, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * i as u64;
            let v = u32::from_le_bytes(chunk.try_into().unwrap_or([0; 4]));
            let e = &mut self.entries[vector];
            match off % MSIX_ENTRY_SIZE {
                0 => e.address = (e.address & !0xffff_ffff) | v as u64,
                4 => e.address = (e.address & 0xffff_ffff) | (v as u64) << 32,
                8 => e.data = v,
                // Bits other than the mask are reserved (read 0).
                _ => e.control = v & MSIX_ENTRY_MASKED,
            }
        }
        if self.entries[vector] != before {
            self.route(vector as u16, sink);
            self.release(vector as u16, sink);
        }
    }

    /// A guest read of the PBA at `offset` (relative to its start).
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len(), self.pba_len()) {
            data.fill(0xff);
            self.ignored += 1;
            return;
        }
        let word = self.pending[(offset / 8) as usize].to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&word[start..start + data.len()]);
    }

    /// PBA writes: the PBA is read-only; the write is ignored and counted.
    pub fn write_pba(&mut self, _offset: u64, _data: &[u8]) {
        self.ignored += 1;
    }

    /// Call after every guest config write: picks up Enable, Function Mask and Bus
    /// Master, updates routes, and sends what an unmask released.
    pub fn config_written(&mut self, config: &ConfigSpace, sink: &dyn MsiSink) {
        let ctrl = config.get_u16(self.cap + MSIX_CTRL);
        let enabled = ctrl & MSIX_CTRL_ENABLE != 0;
        let masked = ctrl & MSIX_CTRL_FUNCTION_MASK != 0;
        let bus_master = config.bus_master();
        let was_live = self.enabled && !self.function_masked;
        let changed =
            (enabled, masked, bus_master) != (self.enabled, self.function_masked, self.bus_master);
        self.enabled = enabled;
        self.function_masked = masked;
        self.bus_master = bus_master;
        if !changed {
            return;
        }
        if was_live != (enabled && !masked) {
            for v in 0..self.vectors() {
                self.route(v, sink);
            }
        }
        for v in 0..self.vectors() {
            self.release(v, sink);
        }
    }

    /// Raises `vector`: sent when MSI-X is enabled, bus mastering is on and neither
    /// the function nor the vector is masked; otherwise the pending bit is set
    /// (masked) or nothing happens (disabled, or no such vector).
    pub fn trigger(&mut self, vector: u16, sink: &dyn MsiSink) -> Delivery {
        let Some(entry) = self.entries.get(vector as usize).copied() else {
            return Delivery::Dropped;
        };
        if !self.enabled || !self.bus_master {
            return Delivery::Dropped;
        }
        if self.function_masked || entry.masked() {
            self.pending[vector as usize / 64] |= 1 << (vector % 64);
            return Delivery::Pending;
        }
        sink.deliver(vector, entry.message());
        Delivery::Sent
    }

    /// Resets the table (every vector masked), the PBA, and Enable and Function
    /// Mask in `config`.
    pub fn reset(&mut self, config: &mut ConfigSpace) {
        self.entries.fill(MsixEntry::RESET);
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
        config.clear_bits_u16(
            self.cap + MSIX_CTRL,
            MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK,
        );
    }

    /// Tells `sink` what each vector sends now ([`MsiSink::update_route`]: the
    /// entry's message while MSI-X is enabled and neither the function nor the
    /// vector is masked, `None` otherwise), and sends nothing. After a restore,
    /// call it so a new sink (a new VMM's irqfd routes) learns the routes the
    /// guest programmed.
    pub fn sync_routes(&self, sink: &dyn MsiSink) {
        for v in 0..self.vectors() {
            self.route(v, sink);
        }
    }

    fn live(&self, vector: u16) -> bool {
        self.enabled && !self.function_masked && !self.entries[vector as usize].masked()
    }

    fn route(&self, vector: u16, sink: &dyn MsiSink) {
        let m = self
            .live(vector)
            .then(|| self.entries[vector as usize].message());
        sink.update_route(vector, m);
    }

    fn release(&mut self, vector: u16, sink: &dyn MsiSink) {
        if self.is_pending(vector) && self.live(vector) && self.bus_master {
            self.pending[vector as usize / 64] &= !(1 << (vector % 64));
            sink.deliver(vector, self.entries[vector as usize].message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{COMMAND, COMMAND_BUS_MASTER, ClassCode, HeaderType, PciIds};
    use crate::testing::RecordingMsi;

    fn setup(vectors: u16) -> (ConfigSpace, Msix) {
        let ids = PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 1,
            class: ClassCode::ETHERNET,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
        let msix = Msix::add(&mut cs, vectors, 1, 0, 1, 0x800).unwrap();
        (cs, msix)
    }

    fn ctrl(cs: &mut ConfigSpace, m: &mut Msix, v: u16, log: &RecordingMsi) {
        cs.write(m.offset() + MSIX_CTRL, &v.to_le_bytes());
        m.config_written(cs, log);
    }

    #[test]
    fn capability_layout() {
        let (mut cs, m) = setup(3);
        assert_eq!(cs.get_u16(m.offset() + MSIX_CTRL), 2);
        assert_eq!(cs.get_u32(m.offset() + MSIX_TABLE), 1);
        assert_eq!(cs.get_u32(m.offset() + MSIX_PBA), 0x801);
        assert_eq!((m.table_len(), m.pba_len()), (48, 8));
        cs.write(m.offset() + MSIX_CTRL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(m.offset() + MSIX_CTRL), 0xc002);
        assert_eq!(
            Msix::add(&mut cs, 0, 0, 0, 0, 0).unwrap_err(),
            Error::VectorCount(0)
        );
        assert!(matches!(
            Msix::add(&mut cs, 1, 6, 0, 0, 0),
            Err(Error::Placement { what: "table", .. })
        ));
        assert!(matches!(
            Msix::add(&mut cs, 1, 0, 0, 0, 4),
            Err(Error::Placement { what: "PBA", .. })
        ));
    }

    #[test]
    fn table_reads_writes_and_malformed_accesses() {
        let (_cs, mut m) = setup(2);
        let log = RecordingMsi::new();
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vectors start masked");
        m.write_table(16, &0xfee0_0000_0000_0001u64.to_le_bytes(), &log);
        assert_eq!(m.entry(1).unwrap().address, 0xfee0_0000_0000_0001);
        m.write_table(28, &0xffff_ffffu32.to_le_bytes(), &log);
        assert_eq!(m.entry(1).unwrap().control, 1);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000_0000_0001);
        // Byte access, misaligned dword, past the end, PBA write: all refused.
        let mut b = [0u8; 1];
        m.read_table(0, &mut b);
        assert_eq!(b, [0xff]);
        m.write_table(2, &[0; 4], &log);
        m.write_table(32, &[0; 4], &log);
        m.write_pba(0, &[0; 8]);
        let mut q = [0u8; 8];
        m.read_pba(8, &mut q);
        assert_eq!(q, [0xff; 8]);
        assert_eq!(m.ignored_accesses(), 5);
    }

    #[test]
    fn masking_pending_and_function_mask() {
        let (mut cs, mut m) = setup(2);
        let log = RecordingMsi::new();
        assert_eq!(m.trigger(0, &log), Delivery::Dropped);
        cs.write(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
        ctrl(&mut cs, &mut m, MSIX_CTRL_ENABLE, &log);
        // Vector 0 still masked in its entry: pending.
        assert_eq!(m.trigger(0, &log), Delivery::Pending);
        let mut q = [0u8; 8];
        m.read_pba(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1);
        m.write_table(8, &0x30u32.to_le_bytes(), &log);
        assert!(log.delivered().is_empty());
        m.write_table(12, &0u32.to_le_bytes(), &log);
        assert_eq!(log.delivered_vectors(), [0]);
        assert!(!m.is_pending(0));
        // Function mask holds everything back, and releases it when cleared.
        ctrl(
            &mut cs,
            &mut m,
            MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK,
            &log,
        );
        assert_eq!(m.trigger(0, &log), Delivery::Pending);
        assert_eq!(m.trigger(5, &log), Delivery::Dropped);
        ctrl(&mut cs, &mut m, MSIX_CTRL_ENABLE, &log);
        assert_eq!(log.delivered_vectors(), [0, 0]);
        assert_eq!(m.trigger(0, &log), Delivery::Sent);
        // Routes: vector 0 live after its unmask, dead under the function mask.
        assert!(log.routes().contains(&(0, None)));
        assert_eq!(log.routes().last(), Some(&(1, None)));
        m.reset(&mut cs);
        assert!(!m.enabled() && m.entry(0).unwrap().masked());
        assert_eq!(cs.get_u16(m.offset() + MSIX_CTRL), 1);
    }
}
