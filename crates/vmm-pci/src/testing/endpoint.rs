//! [`StubEndpoint`]: a PCI function with a config space and memory-like BARs, for
//! a device (such as a passed-through VF) whose insides a test does not need.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bar::{BarKind, BarMove, BarRegions};
use crate::config::{ClassCode, ConfigSpace, HeaderType, PciIds};
use crate::function::{PciFunction, PciHandle};

/// See the module documentation. Config accesses go to its [`ConfigSpace`]; BAR
/// accesses act as plain memory: a read returns the bytes last written at the
/// same BAR and offset, and 0 where nothing was written (only written bytes are
/// stored, so any BAR size costs nothing).
#[derive(Debug)]
pub struct StubEndpoint {
    cs: ConfigSpace,
    memory: BTreeMap<(u8, u64), u8>,
}

impl StubEndpoint {
    /// A function with config space `cs` (IDs, header, BARs and capabilities as
    /// the test built them) and BARs that read 0 until written.
    pub fn new(cs: ConfigSpace) -> Self {
        StubEndpoint {
            cs,
            memory: BTreeMap::new(),
        }
    }

    /// A PCI Express Ethernet endpoint `vendor:device` (subsystem vendor
    /// `vendor`, revision 1) with a prefetchable 64-bit BAR 0 of `bar_size`
    /// bytes rounded up to a power of two of at least 16, as a handle for a bus
    /// or slot.
    pub fn ethernet(vendor: u16, device: u16, bar_size: u64) -> PciHandle {
        let ids = PciIds {
            vendor_id: vendor,
            device_id: device,
            subsystem_vendor_id: vendor,
            subsystem_id: 0,
            revision: 1,
            class: ClassCode::ETHERNET,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
        let size = bar_size
            .checked_next_power_of_two()
            .unwrap_or(1 << 63)
            .max(16);
        // A power of two of at least 16 bytes always fits BAR 0.
        let _ = cs.add_bar(0, BarKind::Memory64 { prefetchable: true }, size);
        Arc::new(Mutex::new(Self::new(cs)))
    }

    /// An Intel 82599 VF (8086:10ed) with a 16 KiB BAR: the usual failover primary.
    pub fn vf() -> PciHandle {
        Self::ethernet(0x8086, 0x10ed, 0x4000)
    }
}

impl PciFunction for StubEndpoint {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.cs.read(offset, data)
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        self.cs.write(offset, data)
    }

    fn bar_regions(&self) -> BarRegions {
        self.cs.bar_regions()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64);
            *b = at
                .and_then(|at| self.memory.get(&(bar, at)).copied())
                .unwrap_or(0);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            // Bytes past the top of the address space are dropped.
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if b == 0 {
                self.memory.remove(&(bar, at));
            } else {
                self.memory.insert((bar, at), b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vf_ids_bar_and_memory() {
        let vf = StubEndpoint::vf();
        let mut f = vf.lock().unwrap();
        let mut id = [0; 4];
        f.read_config(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x10ed_8086);
        // BAR 0 sizes as 16 KiB, 64-bit prefetchable.
        f.write_config(0x10, &u32::MAX.to_le_bytes());
        f.read_config(0x10, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xffff_c00c);
        let mut b = [0xaa; 4];
        f.read_bar(0, 8, &mut b);
        assert_eq!(b, [0; 4]);
        f.write_bar(0, 9, &[1, 2]);
        f.read_bar(0, 8, &mut b);
        assert_eq!(b, [0, 1, 2, 0]);
        f.read_bar(2, 8, &mut b);
        assert_eq!(b, [0; 4], "each BAR has its own memory");
        // Offsets at the top of the address space neither wrap nor panic.
        f.write_bar(0, u64::MAX, &[7, 8]);
        let mut top = [0xaa; 2];
        f.read_bar(0, u64::MAX, &mut top);
        assert_eq!(top, [7, 0]);
        f.read_bar(0, 0, &mut top);
        assert_eq!(top, [0, 0]);
    }
}
