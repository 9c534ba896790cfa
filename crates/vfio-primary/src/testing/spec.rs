//! [`ModelSpec`]: what a device shows through vfio-pci, and the Intel 82599 VF.

use vmm_pci::BarKind;

/// Registers of the 82599 VF's BAR 0, as the Linux `ixgbevf` driver names them
/// (`drivers/net/ethernet/intel/ixgbevf/vf.h`, `regs.h`, `mbx.h`, `defines.h`).
pub mod regs {
    /// VF Control (`IXGBE_VFCTRL`).
    pub const VFCTRL: u64 = 0x0000;
    /// VF Status (`IXGBE_VFSTATUS`, read-only).
    pub const VFSTATUS: u64 = 0x0008;
    /// VF Link Status (`IXGBE_VFLINKS`, read-only).
    pub const VFLINKS: u64 = 0x0010;
    /// Extended Interrupt Cause (`IXGBE_VTEICR`).
    pub const VTEICR: u64 = 0x0100;
    /// Extended Interrupt Cause Set (`IXGBE_VTEICS`).
    pub const VTEICS: u64 = 0x0104;
    /// Extended Interrupt Mask Set (`IXGBE_VTEIMS`).
    pub const VTEIMS: u64 = 0x0108;
    /// Extended Interrupt Mask Clear (`IXGBE_VTEIMC`).
    pub const VTEIMC: u64 = 0x010c;
    /// Interrupt Vector Allocation, queue pair `n` (`IXGBE_VTIVAR(n)`).
    pub const fn vtivar(n: u64) -> u64 {
        0x0120 + 4 * n
    }
    /// Interrupt Vector Allocation for the mailbox cause (`IXGBE_VTIVAR_MISC`).
    pub const VTIVAR_MISC: u64 = 0x0140;
    /// Mailbox memory, 16 dwords (`IXGBE_VFMBMEM`).
    pub const VFMBMEM: u64 = 0x0200;
    /// Mailbox control (`IXGBE_VFMAILBOX`).
    pub const VFMAILBOX: u64 = 0x02fc;
    /// VFCTRL: software reset (`IXGBE_CTRL_RST`), self-clearing.
    pub const CTRL_RST: u32 = 1 << 26;
    /// VFLINKS: link up (`IXGBE_LINKS_UP`).
    pub const LINKS_UP: u32 = 0x4000_0000;
    /// VFLINKS: 10 Gb/s (`IXGBE_LINKS_SPEED_10G_82599`).
    pub const LINKS_SPEED_10G: u32 = 0x3000_0000;
}

/// One BAR as the model shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarSpec {
    /// Type bits the BAR register shows.
    pub kind: BarKind,
    /// Size in bytes (the region's size).
    pub size: u64,
    /// The host address the BAR register shows through vfio-pci (the primary
    /// must not let the guest see it).
    pub host_address: u64,
    /// The region can be mmapped.
    pub mmap: bool,
    /// Sparse mmap areas as (offset, size); empty: all of it.
    pub mmap_areas: Vec<(u64, u64)>,
}

/// What a device shows through vfio-pci: config space, BARs, ROM, interrupt
/// indices, and the BAR registers' reset values. Every field is public so a test
/// can build variations of a real device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The config region's bytes (256 or 4096 of them).
    pub config: Vec<u8>,
    /// The bits of each config byte a region write changes (the rest ignore it).
    pub config_wmask: Vec<u8>,
    /// BARs 0 to 5 (`None` for an unused register, including the upper half of
    /// a 64-bit BAR).
    pub bars: [Option<BarSpec>; 6],
    /// Expansion ROM contents; empty when the device has no ROM region.
    pub rom: Vec<u8>,
    /// Whether the INTx index has a vector.
    pub intx: bool,
    /// Vectors of the MSI index.
    pub msi_vectors: u32,
    /// Vectors of the MSI-X index.
    pub msix_vectors: u32,
    /// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE` on the BAR holding the MSI-X table.
    pub msix_mappable: bool,
    /// BAR register values after reset, as (BAR, offset, value).
    pub bar_defaults: Vec<(u8, u64, u32)>,
    /// Dword registers that ignore writes, as (BAR, offset).
    pub bar_read_only: Vec<(u8, u64)>,
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// MSI-X capability offset in the 82599 VF.
pub(crate) const VF_MSIX_CAP: u16 = 0x70;
/// PCI Express capability offset in the 82599 VF.
pub(crate) const VF_PCIE_CAP: u16 = 0xa0;
/// ARI extended capability offset in the 82599 VF.
pub(crate) const VF_ARI_CAP: u16 = 0x150;

impl ModelSpec {
    /// An Intel 82599 VF (8086:10ed, class 0x020000, revision 1) as vfio-pci
    /// shows it on an x86 host with interrupt remapping.
    ///
    /// | what | value | source |
    /// |---|---|---|
    /// | IDs, class, revision | 8086:10ed, 0x020000, rev 01 | `ixgbevf` (`IXGBE_DEV_ID_82599_VF`); `lspci` of 82599 VFs: `82599 Ethernet Controller Virtual Function [8086:10ed] (rev 01)` (G. Marxer's RHOSP 10 guide, source 1) |
    /// | subsystem | 8086:000c | an 82599 VF bound to vfio-pci, `lspci -vmm` "SDevice: Device 000c" (StarlingX sysinv test data, source 2). It comes from the PF's EEPROM, so boards differ |
    /// | BARs | BAR 0 and BAR 3, 64-bit memory, 16 KiB each; BAR 0 the registers, BAR 3 MSI-X | the PF's SR-IOV capability lists the VF BARs as "Region 0" and "Region 3", 64-bit, VF Device ID 10ed (`lspci -vv` of an 82599ES PF, source 3; the VF BAR 0 aperture at ...804000 is 16 KiB- but not 32 KiB-aligned); 16 KiB as the sibling X550 VF's sysfs `resource` shows (source 5); `ixgbevf_main.c` maps BAR 0 as `hw_addr`, register offsets from `vf.h`/`regs.h`/`mbx.h` |
    /// | prefetchable bit | clear (non-prefetchable) here; [`with_prefetchable`](Self::with_prefetchable) gives the other real setting | both exist: "64-bit, non-prefetchable" VF BARs on an X520-2 (82599ES) PF (source 4), "64-bit, prefetchable" on another 82599ES (source 3); it is the PF's EEPROM setting |
    /// | MSI-X | 3 vectors, capability at 0x70, table at BAR 3 offset 0, PBA at BAR 3 offset 0x2000 | 3 vectors: `ixgbevf.h` (`MAX_MSIX_Q_VECTORS 2` + `NON_Q_VECTORS 1`); `[70] MSI-X: Enable+ Count=3` on the sibling X550 VF (source 5) |
    /// | PCI Express capability | at 0xa0, version 0, Device/Link Capabilities and Device Capabilities 2 read 0 | 0xa0: the sibling X550 VF (source 5); version 0: 82599 Specification Update, erratum 35 ("SR-IOV: PCIe Capability Structure in VF Area Is Incorrectly Implemented"); QEMU `hw/vfio/pci.c` fixes the version up to 1 for these VFs |
    /// | extended capabilities | AER at 0x100, ARI at 0x150, the last | ARI: `Capabilities: [150] Alternative Routing-ID Interpretation (ARI)` at the bottom of every 82599 VF's `lspci -v` (source 1); AER at 0x100: the sibling X550 VF (source 5, which adds TPH at 0x1a0 and ACS at 0x1b0) |
    /// | INTx, MSI | none | a VF has no INTx pin (Linux `vfio_pci_get_irq_count` returns 0 for INTx when `is_virtfn`); no MSI capability (none on the sibling X550 VF, source 5) |
    /// | BAR 0 after reset | VFLINKS = link up, 10 Gb/s | `IXGBE_LINKS_UP`, `IXGBE_LINKS_SPEED_10G_82599` (`defines.h`) |
    ///
    /// Sources (public `lspci` output; facts only):
    ///
    /// 1. <https://github.com/grmarxer/Openstack/blob/01a8a1fa3950e288911ebbb1817a007f3cdfb947/VCP_Build_Intructions/VCP%201.x%20Configuration%20and%20Deployment%20Guide%20for%20RHOSP%2010.md>
    /// 2. <https://github.com/starlingx/config/blob/db0f52699ea20f8cb08d23e97b95c0451e2bd32f/sysinv/sysinv/sysinv/sysinv/tests/agent/test_pci.py>
    /// 3. Yicong Yang, "\[ISSUE\] Cannot enable VF after remove/rescan", netdev, 2022-08-19:
    ///    <https://lore.kernel.org/netdev/9f37e68c-e960-5188-f52a-4761866c37ad@huawei.com/>
    /// 4. James Denton, "DPDK and RMRR Compatibility Issues on the HP Proliant DL360e G8", 2018-08-06
    ///    (post `2018-08-06-proliant-intel-dpdk` of <https://www.jimmdenton.com/>)
    /// 5. Intel X550 VF (8086:1565, same `ixgbevf` family):
    ///    <https://github.com/jianyuewu/dpdk_playground/blob/291726eaa506db08a1689ee4c900ed37ee4ca215/network/X550_T2/README_X550.md>
    ///
    /// Still unconfirmed for the 82599 VF itself (no public `lspci -vvv` or
    /// `-xxx` of one was found): that its MSI-X table and PBA sit in BAR 3 at
    /// 0 and 0x2000 (the X550 VF's BAR 3 is the same 16 KiB and its capability
    /// the same 0x70; the 82599 PF puts them in BAR 4 at 0 and 0x2000), the
    /// capability offsets 0x70 and 0xa0 and AER at 0x100 (seen on the X550 VF
    /// only), and the AER registers' reset values (the specification's
    /// defaults here).
    ///
    /// Added for tests, not in the real VF: an expansion ROM (64 KiB, `55 aa`
    /// signature, register at 0x30 showing a host address), so that hiding
    /// and exposing it are tested. ARI is real and is a capability QEMU's
    /// vfio-pci hides.
    pub fn intel_82599_vf() -> ModelSpec {
        let mut c = vec![0u8; 4096];
        put(&mut c, 0x00, &0x8086u16.to_le_bytes());
        put(&mut c, 0x02, &0x10edu16.to_le_bytes());
        put(&mut c, 0x06, &0x0010u16.to_le_bytes()); // Capabilities List
        put(&mut c, 0x08, &[0x01, 0x00, 0x00, 0x02]); // revision 1, class 0x020000
        let bar0 = BarSpec {
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x4000,
            host_address: 0x3f_fe00_0000,
            mmap: true,
            mmap_areas: Vec::new(),
        };
        let bar3 = BarSpec {
            host_address: 0x3f_fe10_0000,
            ..bar0.clone()
        };
        put(&mut c, 0x2c, &0x8086u16.to_le_bytes());
        put(&mut c, 0x2e, &0x000cu16.to_le_bytes());
        put(&mut c, 0x30, &0xfe80_0000u32.to_le_bytes()); // ROM (test addition)
        c[0x34] = VF_MSIX_CAP as u8;
        // MSI-X: 3 vectors, table BAR 3 offset 0, PBA BAR 3 offset 0x2000.
        let m = VF_MSIX_CAP as usize;
        put(&mut c, m, &[0x11, VF_PCIE_CAP as u8]);
        put(&mut c, m + 2, &0x0002u16.to_le_bytes());
        put(&mut c, m + 4, &0x0000_0003u32.to_le_bytes());
        put(&mut c, m + 8, &0x0000_2003u32.to_le_bytes());
        // PCI Express: version 0, endpoint, capabilities all zero (erratum 35).
        put(&mut c, VF_PCIE_CAP as usize, &[0x10, 0x00]);
        // AER (ID 1, version 1, next 0x150) with the specification's defaults.
        put(
            &mut c,
            0x100,
            &(0x0001u32 | 1 << 16 | 0x150 << 20).to_le_bytes(),
        );
        put(&mut c, 0x10c, &0x0006_2030u32.to_le_bytes()); // uncorrectable severity
        put(&mut c, 0x114, &0x0000_2000u32.to_le_bytes()); // correctable mask
        // ARI (ID 0x0e, version 1, last).
        put(
            &mut c,
            VF_ARI_CAP as usize,
            &(0x000eu32 | 1 << 16).to_le_bytes(),
        );

        let mut w = vec![0u8; 4096];
        put(&mut w, 0x04, &0x0546u16.to_le_bytes()); // memory, master, parity, SERR, INTx disable
        w[0x0c] = 0xff; // cache line size
        w[0x3c] = 0xff; // interrupt line
        put(&mut w, VF_PCIE_CAP as usize + 8, &0x7fffu16.to_le_bytes()); // Device Control
        put(&mut w, 0x108, &u32::MAX.to_le_bytes()); // uncorrectable mask
        put(&mut w, 0x10c, &u32::MAX.to_le_bytes()); // uncorrectable severity
        put(&mut w, 0x114, &u32::MAX.to_le_bytes()); // correctable mask

        let mut spec = ModelSpec {
            config: c,
            config_wmask: w,
            bars: [None, None, None, None, None, None],
            rom: {
                let mut rom = vec![0u8; 0x10000];
                rom[0] = 0x55;
                rom[1] = 0xaa;
                rom
            },
            intx: false,
            msi_vectors: 0,
            msix_vectors: 3,
            msix_mappable: true,
            bar_defaults: vec![(0, regs::VFLINKS, regs::LINKS_UP | regs::LINKS_SPEED_10G)],
            bar_read_only: vec![(0, regs::VFSTATUS), (0, regs::VFLINKS)],
        };
        spec.set_bar(0, bar0);
        spec.set_bar(3, bar3);
        spec
    }

    /// Declares BAR `index` and writes its register (type bits and host address).
    pub fn set_bar(&mut self, index: u8, bar: BarSpec) {
        let i = index as usize;
        if i >= 6 {
            return;
        }
        let reg = 0x10 + 4 * i;
        let low = (bar.host_address as u32 & !0xf) | bar.kind.flag_bits();
        put(&mut self.config, reg, &low.to_le_bytes());
        if matches!(bar.kind, BarKind::Memory64 { .. }) && i < 5 {
            put(
                &mut self.config,
                reg + 4,
                &((bar.host_address >> 32) as u32).to_le_bytes(),
            );
        }
        self.bars[i] = Some(bar);
    }

    /// Sets every BAR's prefetchable bit (memory BARs only).
    pub fn with_prefetchable(mut self, prefetchable: bool) -> Self {
        for i in 0..6u8 {
            if let Some(mut bar) = self.bars[i as usize].clone() {
                bar.kind = match bar.kind {
                    BarKind::Memory32 { .. } => BarKind::Memory32 { prefetchable },
                    BarKind::Memory64 { .. } => BarKind::Memory64 { prefetchable },
                    BarKind::Io => BarKind::Io,
                };
                self.set_bar(i, bar);
            }
        }
        self
    }

    /// Gives BAR `index` sparse mmap areas (as an older kernel reports around
    /// the MSI-X table), and clears MSIX_MAPPABLE.
    pub fn with_sparse_mmap(mut self, index: u8, areas: Vec<(u64, u64)>) -> Self {
        if let Some(bar) = self.bars.get_mut(index as usize).and_then(Option::as_mut) {
            bar.mmap_areas = areas;
        }
        self.msix_mappable = false;
        self
    }

    /// Not in the real VF: an INTx pin (A) and an INTx index, to test INTx.
    pub fn with_intx(mut self) -> Self {
        self.config[0x3d] = 1;
        self.intx = true;
        self
    }

    /// Not in the real VF: a 64-bit, per-vector-masking MSI capability with
    /// `vectors` vectors (1, 2, 4, 8, 16 or 32) at 0x50, first in the list.
    pub fn with_msi(mut self, vectors: u8) -> Self {
        let mmc = vectors.max(1).trailing_zeros().min(5) as u16;
        let ctrl: u16 = 1 << 7 | 1 << 8 | mmc << 1;
        let mut body = [0u8; 0x18];
        body[0] = 0x05;
        body[2..4].copy_from_slice(&ctrl.to_le_bytes());
        self.insert_capability(0x50, &body);
        self.msi_vectors = 1 << mmc;
        self
    }

    /// Puts a standard capability (`body[0]` is its ID) at `offset`, first in
    /// the list.
    pub fn insert_capability(&mut self, offset: u8, body: &[u8]) {
        let o = offset as usize;
        if o < 0x40 || o + body.len() > 0x100 || body.len() < 2 {
            return;
        }
        put(&mut self.config, o, body);
        self.config[o + 1] = self.config[0x34];
        self.config[0x34] = offset;
        self.config[0x06] |= 0x10;
    }
}
