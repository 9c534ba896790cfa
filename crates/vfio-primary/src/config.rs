//! Config space virtualization: the guest sees the device's own config space,
//! read through VFIO's config region, except what the VMM must own.
//!
//! Every byte has an owner, fixed when the primary is built:
//!
//! - **the device**: reads and writes go to the config region (the kernel's
//!   vfio-pci filters them further);
//! - **the device under a mask**: some bits are emulated (an overlay),
//!   the rest come from the device; writes go to the device;
//! - **the BAR shadow**: a [`vmm_pci::ConfigSpace`] holding the BAR registers
//!   (sizing and relocation are its BAR machinery) and the interrupt line; it
//!   also mirrors the command register, which decides what decodes;
//! - **MSI** and **MSI-X**: the capabilities' registers live in the primary's
//!   interrupt emulation (see the `interrupts` module).
//!
//! What is emulated or hidden, and why (QEMU's `hw/vfio/pci.c` does the same
//! unless noted):
//!
//! | what | how | why |
//! |---|---|---|
//! | BARs 0-5 | emulated, sizing included, host addresses never shown | the guest assigns its own addresses; the VMM maps or traps them there |
//! | expansion ROM (0x30), [`RomPolicy::Hidden`] (the default) | reads 0, writes dropped | QEMU's failover migration fails with `Unknown ramblock ... rom` when the primary has a ROM on one side only (QEMU migrates an option ROM as a RAM block named after its device, and the destination refuses a block it does not have): with no ROM on either side nothing can mismatch; an SR-IOV VF has no ROM, and a NIC needs none once the guest runs |
//! | expansion ROM (0x30), [`RomPolicy::Device`] or [`RomPolicy::Image`] | emulated ROM BAR over a copy of the image (see the [`rom`](crate::rom) module): sizing, address, enable; the window decodes with Memory Space on, never mmapped | the VMM chose to show a ROM (QEMU's `rombar=1`, `romfile=`), e.g. for network boot. On a failover primary the source and the destination must then expose the same ROM (same policy, same image), or QEMU-compatible migration fails as above |
//! | header type bit 7 | reads 0 | a failover primary must be single-function |
//! | interrupt line | emulated | the guest's scratch register, meaningless to the device |
//! | capabilities pointer, every next pointer, Status.Capabilities List | emulated | so capabilities can be dropped from the list |
//! | MSI, MSI-X capabilities | emulated whole | interrupts are routed by the VMM through eventfds, never programmed into the device by the guest |
//! | PCI Express capability, version 0 | reads version 1 | Intel 82599 VFs report version 0 (erratum 35); Windows refuses the device (Code 10) |
//! | PCI Express capability of a root-complex integrated endpoint | reads as an endpoint with a x1 2.5 GT/s link | the primary sits behind a root port |
//! | extended capabilities SR-IOV, ARI, Resizable BAR, ID 0 | dropped from the chain | read-only VF BARs confuse firmware; ARI needs next-function virtualization; a resizable BAR cannot be exposed read-only (QEMU virtualizes it when it can; this crate always hides it); ID 0 is a capability the kernel already masked |
//! | an MSI capability without 64-bit addressing or per-vector masking | dropped from the chain | this crate emulates only that layout (MSI-X or INTx serve instead); QEMU emulates all |
//!
//! Everything else (IDs, class, command and status, the PCI Express registers,
//! AER, power management, vendor capabilities) reads and writes through to the
//! device.

use std::io;

use vmm_pci::config::{
    BAR0, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCIE, CAPABILITIES_POINTER, HEADER_TYPE, INTERRUPT_LINE,
    PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE, STATUS, STATUS_CAP_LIST,
};
use vmm_pci::{ClassCode, ConfigSpace, HeaderType, PciIds};

use crate::bars::BarLayout;
use crate::ops::{VfioDeviceOps, region};
#[cfg(doc)]
use crate::rom::RomPolicy;

/// Offset of the expansion ROM register.
pub const ROM_ADDRESS: u16 = 0x30;
/// Extended capability ID of SR-IOV.
pub const EXT_CAP_ID_SRIOV: u16 = 0x10;
/// Extended capability ID of Alternative Routing-ID Interpretation.
pub const EXT_CAP_ID_ARI: u16 = 0x0e;
/// Extended capability ID of Resizable BAR.
pub const EXT_CAP_ID_REBAR: u16 = 0x15;

/// Errors reading or laying out the device's config space.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VFIO reports no config region.
    #[error(
        "the device has no config region (VFIO_PCI_CONFIG_REGION_INDEX): it is not a vfio-pci device"
    )]
    NoConfigRegion,
    /// The config region is smaller than a PCI header.
    #[error(
        "the device's config region is {0} bytes; a PCI function has 256 or 4096: check that the VFIO device is a PCI function"
    )]
    TooSmall(u64),
    /// Reading the config region failed.
    #[error(
        "reading the device's config space through VFIO failed; is it still bound to vfio-pci and powered on?"
    )]
    Read(#[source] io::Error),
    /// A BAR the device reports could not be emulated.
    #[error("BAR {bar} cannot be emulated")]
    Bar {
        /// BAR index.
        bar: u8,
        /// Why.
        #[source]
        source: vmm_pci::config::Error,
    },
}

/// A capability the guest does not see, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenCapability {
    /// Capability ID (extended IDs are 16-bit).
    pub id: u16,
    /// Offset in the device's config space.
    pub offset: u16,
    /// An extended (PCI Express) capability.
    pub extended: bool,
    /// Why it is hidden.
    pub reason: &'static str,
}

/// The device's capabilities as its config space lists them.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostCaps {
    /// Standard capabilities as (ID, offset), in list order.
    pub std: Vec<(u8, u16)>,
    /// Extended capabilities as (ID, version, offset), in list order.
    pub ext: Vec<(u16, u8, u16)>,
}

impl HostCaps {
    /// Walks both lists of `host`, stopping at loops and bad pointers.
    pub fn parse(host: &[u8]) -> HostCaps {
        let mut caps = HostCaps::default();
        let get = |o: usize| host.get(o).copied().unwrap_or(0);
        if get(STATUS as usize) as u16 & STATUS_CAP_LIST != 0 {
            let mut ptr = (get(CAPABILITIES_POINTER as usize) & 0xfc) as u16;
            while ptr >= 0x40 && caps.std.len() < 48 && !caps.std.iter().any(|c| c.1 == ptr) {
                caps.std.push((get(ptr as usize), ptr));
                ptr = (get(ptr as usize + 1) & 0xfc) as u16;
            }
        }
        let mut off = PCI_CONFIG_SIZE;
        while (off as usize) + 4 <= host.len()
            && caps.ext.len() < 960
            && !caps.ext.iter().any(|c| c.2 == off)
        {
            let header = u32_at(host, off);
            if header == 0 || header == u32::MAX {
                break;
            }
            caps.ext
                .push((header as u16, (header >> 16 & 0xf) as u8, off));
            off = (header >> 20) as u16 & 0xffc;
            if off < PCI_CONFIG_SIZE {
                break;
            }
        }
        caps
    }

    /// The offset of the first standard capability with `id`.
    pub fn find(&self, id: u8) -> Option<u16> {
        self.std.iter().find(|c| c.0 == id).map(|c| c.1)
    }
}

pub(crate) fn u16_at(b: &[u8], off: u16) -> u16 {
    let o = off as usize;
    match b.get(o..o + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(crate) fn u32_at(b: &[u8], off: u16) -> u32 {
    let o = off as usize;
    match b.get(o..o + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Reads the whole config region once (at most 4096 bytes).
pub(crate) fn read_host_config(dev: &dyn VfioDeviceOps) -> Result<Vec<u8>, Error> {
    let info = dev
        .region_info(region::CONFIG)
        .ok_or(Error::NoConfigRegion)?;
    if info.size < PCI_CONFIG_SIZE as u64 {
        return Err(Error::TooSmall(info.size));
    }
    let mut host = vec![0u8; info.size.min(PCIE_CONFIG_SIZE as u64) as usize];
    dev.region_read(region::CONFIG, 0, &mut host)
        .map_err(Error::Read)?;
    Ok(host)
}

/// Who answers for a config byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Owner {
    /// The device, with the overlay's masked bits emulated.
    Device = 0,
    /// The BAR shadow [`ConfigSpace`].
    Shadow = 1,
    /// The MSI emulation.
    Msi = 2,
    /// The MSI-X emulation.
    Msix = 3,
    /// The emulated ROM BAR (an exposed ROM).
    Rom = 4,
}

/// The fixed part of the virtualization: who owns each byte, and the emulated
/// bits of device-owned bytes.
pub(crate) struct Layout {
    owner: Box<[Owner; PCIE_CONFIG_SIZE as usize]>,
    overlay: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    mask: Box<[u8; PCIE_CONFIG_SIZE as usize]>,
    size: u16,
    hidden: Vec<HiddenCapability>,
    msi: Option<u16>,
    msix: Option<u16>,
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("size", &self.size)
            .field("hidden", &self.hidden)
            .finish_non_exhaustive()
    }
}

/// The length of the MSI capability this crate emulates (64-bit, per-vector
/// masking).
pub(crate) const MSI_CAP_LEN: u16 = 0x18;

impl Layout {
    /// Lays out the virtualization of `host`. `msi` is the MSI capability the
    /// interrupt emulation serves (an MSI capability of another layout is
    /// hidden); `msix` likewise. `rom`: the ROM register is the emulated ROM
    /// BAR's (an exposed ROM); otherwise it reads 0.
    pub fn new(
        host: &[u8],
        caps: &HostCaps,
        msi: Option<u16>,
        msix: Option<u16>,
        rom: bool,
    ) -> Layout {
        let express = caps.find(CAP_ID_PCIE).is_some() && host.len() >= PCIE_CONFIG_SIZE as usize;
        let mut l = Layout {
            owner: Box::new([Owner::Device; PCIE_CONFIG_SIZE as usize]),
            overlay: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            mask: Box::new([0; PCIE_CONFIG_SIZE as usize]),
            size: if express {
                PCIE_CONFIG_SIZE
            } else {
                PCI_CONFIG_SIZE
            },
            hidden: Vec::new(),
            msi,
            msix,
        };
        for o in BAR0..BAR0 + 24 {
            l.owner[o as usize] = Owner::Shadow;
        }
        l.owner[INTERRUPT_LINE as usize] = Owner::Shadow;
        l.emulate(HEADER_TYPE, 0x80, 0);
        for o in ROM_ADDRESS..ROM_ADDRESS + 4 {
            if rom {
                l.owner[o as usize] = Owner::Rom;
            } else {
                l.emulate(o, 0xff, 0);
            }
        }
        l.std_caps(host, caps);
        if express {
            l.ext_caps(caps);
        }
        l
    }

    fn emulate(&mut self, off: u16, mask: u8, value: u8) {
        let o = off as usize;
        self.mask[o] |= mask;
        self.overlay[o] = (self.overlay[o] & !mask) | (value & mask);
    }

    fn std_caps(&mut self, host: &[u8], caps: &HostCaps) {
        let mut visible = Vec::new();
        for &(id, off) in &caps.std {
            let reason = match id {
                CAP_ID_MSI if self.msi != Some(off) => Some(
                    "MSI without 64-bit addressing and per-vector masking (or a second MSI) is not emulated",
                ),
                CAP_ID_MSIX if self.msix != Some(off) => Some("a second MSI-X capability"),
                _ => None,
            };
            match reason {
                Some(reason) => self.hidden.push(HiddenCapability {
                    id: id as u16,
                    offset: off,
                    extended: false,
                    reason,
                }),
                None => visible.push((id, off)),
            }
        }
        let first = visible.first().map_or(0, |c| c.1 as u8);
        self.emulate(CAPABILITIES_POINTER, 0xff, first);
        self.emulate(
            STATUS,
            STATUS_CAP_LIST as u8,
            if first != 0 { 0xff } else { 0 },
        );
        for (i, &(id, off)) in visible.iter().enumerate() {
            let next = visible.get(i + 1).map_or(0, |c| c.1 as u8);
            self.emulate(off + 1, 0xff, next);
            match id {
                CAP_ID_MSI => self.own(off + 2, off + MSI_CAP_LEN, Owner::Msi),
                CAP_ID_MSIX => self.own(off + 2, off + vmm_pci::msix::MSIX_CAP_LEN, Owner::Msix),
                CAP_ID_PCIE => self.pcie(host, off),
                _ => {}
            }
        }
    }

    fn own(&mut self, from: u16, to: u16, owner: Owner) {
        for o in from..to.min(PCI_CONFIG_SIZE) {
            self.owner[o as usize] = owner;
        }
    }

    fn pcie(&mut self, host: &[u8], off: u16) {
        use vmm_pci::pcie::{FLAGS, LNKCAP, LNKCTL, PortType};
        if off + LNKCTL + 2 > PCI_CONFIG_SIZE {
            return;
        }
        let flags = u16_at(host, off + FLAGS);
        if flags & 0xf == 0 {
            self.emulate(off + FLAGS, 0x0f, 1);
        }
        if (flags >> 4) & 0xf == PortType::RootComplexIntegratedEndpoint as u16 {
            self.emulate(off + FLAGS, 0xf0, (PortType::Endpoint as u8) << 4);
            // x1 at 2.5 GT/s.
            for (i, b) in 0x11u32.to_le_bytes().into_iter().enumerate() {
                self.emulate(off + LNKCAP + i as u16, 0xff, b);
            }
            self.emulate(off + LNKCTL, 0xff, 0);
            self.emulate(off + LNKCTL + 1, 0xff, 0);
        }
    }

    fn ext_caps(&mut self, caps: &HostCaps) {
        let mut visible = Vec::new();
        for &(id, ver, off) in &caps.ext {
            let reason = match id {
                0 => Some("already masked by the kernel"),
                EXT_CAP_ID_SRIOV => Some("read-only VF BARs confuse guest firmware"),
                EXT_CAP_ID_ARI => Some("needs next-function virtualization"),
                EXT_CAP_ID_REBAR => Some("a resizable BAR cannot be exposed read-only"),
                _ => None,
            };
            match reason {
                Some(reason) => self.hidden.push(HiddenCapability {
                    id,
                    offset: off,
                    extended: true,
                    reason,
                }),
                None => visible.push((id, ver, off)),
            }
        }
        for (i, &(_, _, off)) in visible.iter().enumerate() {
            let next = visible.get(i + 1).map_or(0, |c| c.2);
            let v = (next as u32) << 20;
            self.emulate(off + 2, 0xf0, (v >> 16) as u8);
            self.emulate(off + 3, 0xff, (v >> 24) as u8);
        }
        // The head dword is emulated whole: when the first capability is hidden
        // it reads ID 0, version 0, and points at the first visible one.
        let head = match visible.first() {
            Some(&(id, ver, PCI_CONFIG_SIZE)) => {
                let next = visible.get(1).map_or(0, |c| c.2) as u32;
                id as u32 | (ver as u32) << 16 | next << 20
            }
            Some(&(_, _, off)) => (off as u32) << 20,
            None => 0,
        };
        for (i, b) in head.to_le_bytes().into_iter().enumerate() {
            self.emulate(PCI_CONFIG_SIZE + i as u16, 0xff, b);
        }
    }

    /// The size of the config space the guest sees.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Who owns byte `off` (which must be below 4096).
    pub fn owner(&self, off: usize) -> Owner {
        self.owner[off]
    }

    /// The emulated bits of byte `off` and their value.
    pub fn overlay(&self, off: usize) -> (u8, u8) {
        (self.mask[off], self.overlay[off])
    }

    /// The capabilities the guest does not see.
    pub fn hidden(&self) -> &[HiddenCapability] {
        &self.hidden
    }

    /// The MSI capability's offset, when emulated.
    pub fn msi(&self) -> Option<u16> {
        self.msi
    }

    /// The MSI-X capability's offset, when emulated.
    pub fn msix(&self) -> Option<u16> {
        self.msix
    }
}

/// A fresh BAR shadow: the device's IDs and class, and every BAR of `bars`
/// declared and unassigned.
pub(crate) fn shadow(host: &[u8], bars: &BarLayout) -> Result<ConfigSpace, Error> {
    let ids = PciIds {
        vendor_id: u16_at(host, 0),
        device_id: u16_at(host, 2),
        subsystem_vendor_id: u16_at(host, 0x2c),
        subsystem_id: u16_at(host, 0x2e),
        revision: host[8],
        class: ClassCode::new(host[0x0b], host[0x0a], host[0x09]),
    };
    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
    for (index, kind, size) in bars.declared() {
        cs.add_bar(index, kind, size)
            .map_err(|source| Error::Bar { bar: index, source })?;
    }
    Ok(cs)
}

/// Naturally aligned pieces of 1, 2 or 4 bytes covering `len` bytes at `off`.
pub(crate) fn pieces(off: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut at = off;
    let end = off + len;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = [4, 2, 1]
            .into_iter()
            .find(|&n| at % n == 0 && at + n <= end)
            .unwrap_or(1);
        let p = (at, n);
        at += n;
        Some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_aligned() {
        assert_eq!(pieces(0x3d, 3).collect::<Vec<_>>(), [(0x3d, 1), (0x3e, 2)]);
        assert_eq!(pieces(0x10, 4).collect::<Vec<_>>(), [(0x10, 4)]);
        assert_eq!(pieces(0x11, 2).collect::<Vec<_>>(), [(0x11, 1), (0x12, 1)]);
    }

    #[test]
    fn looping_and_broken_lists_end() {
        let mut h = vec![0u8; 4096];
        h[STATUS as usize] = 0x10;
        h[0x34] = 0x40;
        h[0x40] = 0x01;
        h[0x41] = 0x50;
        h[0x50] = 0x09;
        h[0x51] = 0x40; // loops back
        h[0x100..0x104].copy_from_slice(&(0x1u32 | 1 << 16 | 0x100 << 20).to_le_bytes());
        let caps = HostCaps::parse(&h);
        assert_eq!(caps.std, [(0x01, 0x40), (0x09, 0x50)]);
        assert_eq!(caps.ext, [(1, 1, 0x100)]);
        h[0x34] = 0x20; // points into the header
        assert!(HostCaps::parse(&h).std.is_empty());
    }
}
