//! The device's BARs: what each one is, which parts the VMM may mmap into the
//! guest, and which the primary must trap.
//!
//! The MSI-X table and PBA are always trapped, even where VFIO would let them be
//! mmapped (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`): the guest programs the
//! emulated table, never the device's. When they share a BAR with registers, the
//! BAR is split around them at host page granularity, as QEMU and Cloud
//! Hypervisor do: the pages holding the table and the PBA are trapped (accesses
//! there outside the table and PBA go to the device through the region), the
//! rest of the BAR is offered for mmap ([`MmapRange`]). A BAR (or part) VFIO
//! does not let be mmapped is trapped whole.

use vmm_pci::{BarKind, BarRegions, MAX_BARS};

use crate::config::u32_at;
use crate::ops::{RegionInfo, VfioDeviceOps, region};

/// Errors describing the device's BARs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A BAR whose region size is not a power of two of at least 16 bytes (4
    /// for I/O).
    #[error(
        "BAR {bar}: VFIO reports {size:#x} bytes, not a power of two of at least {min}: the device or the kernel reports a broken BAR"
    )]
    Size {
        /// BAR index.
        bar: u8,
        /// Reported size.
        size: u64,
        /// Minimum for the BAR's kind.
        min: u64,
    },
    /// The last BAR register claims a 64-bit BAR.
    #[error(
        "BAR 5 claims to be 64-bit, which needs a sixth BAR register: the config space is corrupt"
    )]
    Bar5Is64,
    /// The MSI-X table or PBA lies outside its BAR.
    #[error(
        "the MSI-X {what} ({len:#x} bytes at BAR {bar} offset {offset:#x}) is outside that BAR: the MSI-X capability is corrupt"
    )]
    MsixOutside {
        /// "table" or "PBA".
        what: &'static str,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The host page size is not a power of two.
    #[error("page size {0:#x} is not a power of two")]
    PageSize(u64),
}

/// A part of a BAR the VMM may map into the guest (a KVM memory slot over an
/// mmap of the device fd): `size` bytes at guest physical `guest_address`,
/// backed by the device fd at `fd_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapRange {
    /// BAR index.
    pub bar: u8,
    /// Guest physical address.
    pub guest_address: u64,
    /// Bytes (a multiple of the page size).
    pub size: u64,
    /// Offset in the device fd to mmap.
    pub fd_offset: u64,
}

/// Where the MSI-X table and PBA are, in BAR coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsixPlacement {
    /// Table BAR, offset and length.
    pub table: (u8, u64, u64),
    /// PBA BAR, offset and length.
    pub pba: (u8, u64, u64),
}

/// Where a BAR access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The emulated MSI-X table, at this offset into it.
    Table(u64),
    /// The emulated PBA, at this offset into it.
    Pba(u64),
    /// The device's region.
    Device,
}

#[derive(Debug, Clone)]
struct Bar {
    kind: BarKind,
    size: u64,
    info: RegionInfo,
    /// Page-aligned ranges never offered for mmap, as (offset, size).
    trapped: Vec<(u64, u64)>,
}

/// The device's BARs. See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct BarLayout {
    bars: [Option<Bar>; MAX_BARS],
    msix: Option<MsixPlacement>,
}

impl BarLayout {
    /// Reads the BARs of `dev` (sizes from VFIO's region info, types from the
    /// BAR registers in `host`, its config space) and places the MSI-X table and
    /// PBA; `page` is the host page size.
    pub fn new(
        dev: &dyn VfioDeviceOps,
        host: &[u8],
        msix: Option<MsixPlacement>,
        page: u64,
    ) -> Result<BarLayout, Error> {
        if !page.is_power_of_two() {
            return Err(Error::PageSize(page));
        }
        let mut bars: [Option<Bar>; MAX_BARS] = Default::default();
        let mut i = 0;
        while i < MAX_BARS {
            let reg = u32_at(host, 0x10 + 4 * i as u16);
            let kind = if reg & 1 == 1 {
                BarKind::Io
            } else if (reg >> 1) & 3 == 2 {
                BarKind::Memory64 {
                    prefetchable: reg & 8 != 0,
                }
            } else {
                BarKind::Memory32 {
                    prefetchable: reg & 8 != 0,
                }
            };
            let info = dev
                .region_info(region::BAR0 + i as u32)
                .filter(|info| info.size > 0);
            let present = info.is_some();
            if let Some(info) = info {
                if matches!(kind, BarKind::Memory64 { .. }) && i == MAX_BARS - 1 {
                    return Err(Error::Bar5Is64);
                }
                let min = if kind.is_memory() { 16 } else { 4 };
                if !info.size.is_power_of_two() || info.size < min {
                    return Err(Error::Size {
                        bar: i as u8,
                        size: info.size,
                        min,
                    });
                }
                bars[i] = Some(Bar {
                    kind,
                    size: info.size,
                    info,
                    trapped: Vec::new(),
                });
            }
            i += if present && matches!(kind, BarKind::Memory64 { .. }) {
                2
            } else {
                1
            };
        }
        if let Some(m) = msix {
            for (what, (bar, offset, len)) in [("table", m.table), ("PBA", m.pba)] {
                let Some(b) = bars.get_mut(bar as usize).and_then(Option::as_mut) else {
                    return Err(Error::MsixOutside {
                        what,
                        bar,
                        offset,
                        len,
                    });
                };
                if offset.checked_add(len).is_none_or(|e| e > b.size) {
                    return Err(Error::MsixOutside {
                        what,
                        bar,
                        offset,
                        len,
                    });
                }
                let start = offset & !(page - 1);
                let end = (offset + len).next_multiple_of(page).min(b.size.max(page));
                b.trapped.push((start, end - start));
            }
        }
        Ok(BarLayout { bars, msix })
    }

    /// The BARs to declare, as (index, kind, size).
    pub fn declared(&self) -> impl Iterator<Item = (u8, BarKind, u64)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i as u8, b.kind, b.size)))
    }

    /// Where an access of `len` bytes at `offset` into BAR `bar` goes, or
    /// `None` when it is malformed (no such BAR, a size other than 1, 2, 4 or
    /// 8, past the end, or straddling the table or PBA).
    pub fn target(&self, bar: u8, offset: u64, len: usize) -> Option<Target> {
        let b = self.bars.get(bar as usize)?.as_ref()?;
        if !matches!(len, 1 | 2 | 4 | 8) {
            return None;
        }
        let end = offset.checked_add(len as u64).filter(|&e| e <= b.size)?;
        if let Some(m) = self.msix {
            for (t, (mbar, start, mlen)) in [(0, m.table), (1, m.pba)] {
                if mbar != bar || end <= start || offset >= start + mlen {
                    continue;
                }
                if offset < start || end > start + mlen {
                    return None;
                }
                let rel = offset - start;
                return Some(if t == 0 {
                    Target::Table(rel)
                } else {
                    Target::Pba(rel)
                });
            }
        }
        Some(Target::Device)
    }

    /// The parts of the decoding BARs (`regions`, the function's
    /// [`vmm_pci::PciFunction::bar_regions`]) the VMM may mmap, by BAR and
    /// offset. A BAR whose guest address is not page aligned is not offered.
    pub fn mmap_ranges(&self, regions: &BarRegions, page: u64) -> Vec<MmapRange> {
        let mut out = Vec::new();
        for (i, b) in self.bars.iter().enumerate() {
            let (Some(b), Some(r)) = (b, regions[i]) else {
                continue;
            };
            if !b.info.mmap || !b.kind.is_memory() || r.address % page != 0 {
                continue;
            }
            let areas = if b.info.mmap_areas.is_empty() {
                vec![(0, b.size)]
            } else {
                b.info.mmap_areas.clone()
            };
            for (start, len) in areas {
                let Some(end) = start.checked_add(len).filter(|&e| e <= b.size) else {
                    continue;
                };
                let mut pieces = vec![(start, end)];
                for &(ts, tl) in &b.trapped {
                    let te = ts + tl;
                    pieces = pieces
                        .into_iter()
                        .flat_map(|(s, e)| {
                            if te <= s || ts >= e {
                                vec![(s, e)]
                            } else {
                                [(s, ts.max(s)), (te.min(e), e)]
                                    .into_iter()
                                    .filter(|(a, z)| z > a)
                                    .collect()
                            }
                        })
                        .collect();
                }
                for (s, e) in pieces {
                    if s % page != 0 || (e - s) % page != 0 {
                        continue;
                    }
                    out.push(MmapRange {
                        bar: i as u8,
                        guest_address: r.address + s,
                        size: e - s,
                        fd_offset: b.info.fd_offset + s,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ModelSpec, RecordedVf};
    use vmm_pci::BarRegion;

    const PAGE: u64 = 0x1000;

    fn vf_layout(spec: ModelSpec) -> BarLayout {
        let vf = RecordedVf::new(spec);
        let host = vf.config();
        let m = MsixPlacement {
            table: (3, 0, 48),
            pba: (3, 0x2000, 8),
        };
        BarLayout::new(&vf, &host, Some(m), PAGE).unwrap()
    }

    fn decoding(l: &BarLayout, addrs: &[(u8, u64)]) -> BarRegions {
        let mut r: BarRegions = [None; MAX_BARS];
        for &(i, address) in addrs {
            let (_, kind, size) = l.declared().find(|d| d.0 == i).unwrap();
            r[i as usize] = Some(BarRegion {
                index: i,
                kind,
                address,
                size,
            });
        }
        r
    }

    #[test]
    fn the_vf_bars_and_the_split_msix_bar() {
        let l = vf_layout(ModelSpec::intel_82599_vf());
        let declared: Vec<_> = l.declared().map(|d| (d.0, d.2)).collect();
        assert_eq!(declared, [(0, 0x4000), (3, 0x4000)]);
        let r = decoding(&l, &[(0, 0xc000_0000), (3, 0xc000_4000)]);
        let ranges = l.mmap_ranges(&r, PAGE);
        let got: Vec<_> = ranges
            .iter()
            .map(|m| (m.bar, m.guest_address, m.size, m.fd_offset))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0xc000_0000, 0x4000, 0),
                (3, 0xc000_5000, 0x1000, 3 << 40 | 0x1000),
                (3, 0xc000_7000, 0x1000, 3 << 40 | 0x3000),
            ]
        );
        // Larger pages trap more of the BAR.
        let l = vf_layout(ModelSpec::intel_82599_vf());
        let r = decoding(&l, &[(3, 0xc001_0000)]);
        assert!(l.mmap_ranges(&r, 0x4000).is_empty());
    }

    #[test]
    fn sparse_areas_are_honoured() {
        let spec = ModelSpec::intel_82599_vf().with_sparse_mmap(3, vec![(0x1000, 0x1000)]);
        let l = vf_layout(spec);
        let r = decoding(&l, &[(3, 0xc000_4000)]);
        let got: Vec<_> = l
            .mmap_ranges(&r, PAGE)
            .iter()
            .map(|m| m.guest_address)
            .collect();
        assert_eq!(got, [0xc000_5000]);
    }

    #[test]
    fn targets() {
        let l = vf_layout(ModelSpec::intel_82599_vf());
        assert_eq!(l.target(3, 0x10, 4), Some(Target::Table(0x10)));
        assert_eq!(l.target(3, 0x2000, 8), Some(Target::Pba(0)));
        assert_eq!(l.target(3, 0x30, 4), Some(Target::Device));
        assert_eq!(l.target(3, 0x2c, 8), None, "straddles the table's end");
        assert_eq!(l.target(0, 0x3ffc, 8), None, "past the BAR");
        assert_eq!(l.target(0, u64::MAX, 1), None);
        assert_eq!(l.target(0, 0, 3), None);
        assert_eq!(l.target(1, 0, 4), None, "upper half of BAR 0");
        assert_eq!(l.target(9, 0, 4), None);
    }

    #[test]
    fn broken_msix_placement_is_refused() {
        let vf = RecordedVf::intel_82599_vf();
        let host = vf.config();
        let m = MsixPlacement {
            table: (3, 0x3ff8, 48),
            pba: (3, 0x2000, 8),
        };
        assert!(matches!(
            BarLayout::new(&vf, &host, Some(m), PAGE),
            Err(Error::MsixOutside { what: "table", .. })
        ));
        let m = MsixPlacement {
            table: (2, 0, 48),
            pba: (3, 0x2000, 8),
        };
        assert!(BarLayout::new(&vf, &host, Some(m), PAGE).is_err());
        assert_eq!(
            BarLayout::new(&vf, &host, None, 3000).unwrap_err(),
            Error::PageSize(3000)
        );
    }
}
