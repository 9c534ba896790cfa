//! A stub endpoint: a PCI function with IDs, a class and one 64-bit BAR, for a
//! device (such as a passed-through VF) whose insides a test does not need.

use std::sync::{Arc, Mutex};

use vmm_pci::config::HeaderType;
use vmm_pci::{
    BarKind, BarMove, BarRegions, ClassCode, ConfigSpace, PciFunction, PciHandle, PciIds,
};

/// See the module documentation. BAR reads return 0; writes are dropped.
#[derive(Debug)]
pub struct StubEndpoint {
    cs: ConfigSpace,
}

impl StubEndpoint {
    /// A PCI Express Ethernet endpoint `vendor:device` with a prefetchable 64-bit
    /// BAR 0 of `bar_size` bytes, as a handle for a bus or slot.
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
        // A power of two of at least 16 bytes always fits BAR 0.
        let _ = cs.add_bar(
            0,
            BarKind::Memory64 { prefetchable: true },
            bar_size.next_power_of_two().max(16),
        );
        Arc::new(Mutex::new(StubEndpoint { cs }))
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
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}
