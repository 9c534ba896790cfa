//! The `virtio_pci_modern` probe sequence, as Linux runs it.

use vmm_pci::Bdf;
use vmm_pci::config::{CAP_ID_MSIX, CAP_ID_VENDOR, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};

use crate::enumerate::Found;
use crate::env::Env;

use virtio_device::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};

/// `VIRTIO_MSI_NO_VECTOR`.
const NO_VECTOR: u16 = 0xffff;

// Common configuration offsets.
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_AVAIL: u64 = 0x28;
const Q_USED: u64 = 0x30;

/// What a successful probe leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VirtioProbe {
    /// The function.
    pub bdf: Bdf,
    /// Device type (device ID - 0x1040).
    pub device_type: u16,
    /// Features the driver ended up with.
    pub features: u64,
    /// The first 6 bytes of device config (a net device's MAC).
    pub mac: [u8; 6],
    /// Guest address of each queue's notification register.
    pub notify: Vec<u64>,
    /// MSI data value of each MSI-X vector (config first, then queues).
    pub vectors: Vec<u32>,
    /// Base of the common configuration (for reset on unbind).
    pub common: u64,
    /// Base of the device-specific configuration (a net device's MAC, then
    /// its status).
    pub device_cfg: u64,
    /// Where each queue's rings are, in queue order.
    pub queues: Vec<QueueRings>,
}

/// Where a queue's split rings are in guest memory, as the probe set them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct QueueRings {
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

fn find_vendor_cap(env: &mut Env, f: &Found, cfg_type: u8) -> Option<(u16, u64)> {
    for &(id, off) in &f.caps {
        if id == CAP_ID_VENDOR && env.cfg_read(f.bdf, off + 3, 1) as u8 == cfg_type {
            let bar = env.cfg_read(f.bdf, off + 4, 1) as u8;
            let offset = env.cfg_read(f.bdf, off + 8, 4) as u64;
            let base = f.bar(bar)?.address;
            return Some((off, base + offset));
        }
    }
    None
}

/// Probes a virtio-pci function the way Linux's `virtio_pci_probe` +
/// `virtio_dev_probe` + `virtnet_probe` do, with `supported` as the driver's
/// feature set. Ring memory comes from `env`'s ring allocator.
pub fn probe(env: &mut Env, f: &Found, supported: u64) -> Result<VirtioProbe, String> {
    let bdf = f.bdf;
    if f.vendor != 0x1af4 || f.device < 0x1040 {
        return Err(format!("{bdf}: not a modern virtio device"));
    }
    // pci_enable_device + pci_set_master.
    let cmd = env.cfg_read(bdf, COMMAND, 2) as u16;
    env.cfg_write(
        bdf,
        COMMAND,
        2,
        (cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER) as u32,
    );
    let (_, common) = find_vendor_cap(env, f, 1).ok_or("no common config capability")?;
    let (ncap, notify_base) = find_vendor_cap(env, f, 2).ok_or("no notify capability")?;
    find_vendor_cap(env, f, 3).ok_or("no ISR capability")?;
    let (_, device_cfg) = find_vendor_cap(env, f, 4).ok_or("no device config capability")?;
    let multiplier = env.cfg_read(bdf, ncap + 16, 4) as u64;

    // virtio_reset_device: write 0, wait for 0.
    env.mmio_write(common + STATUS, 1, 0);
    while env.mmio_read(common + STATUS, 1) != 0 {
        env.clock.sleep(std::time::Duration::from_millis(1));
    }
    let add_status = |env: &mut Env, bits: u8| {
        let s = env.mmio_read(common + STATUS, 1) as u8;
        env.mmio_write(common + STATUS, 1, (s | bits) as u64);
    };
    add_status(env, ACKNOWLEDGE);
    add_status(env, DRIVER);
    env.mmio_write(common + DFSELECT, 4, 0);
    let mut device_features = env.mmio_read(common + DF, 4);
    env.mmio_write(common + DFSELECT, 4, 1);
    device_features |= env.mmio_read(common + DF, 4) << 32;
    let features = device_features & supported;
    env.mmio_write(common + GFSELECT, 4, 0);
    env.mmio_write(common + GF, 4, features & 0xffff_ffff);
    env.mmio_write(common + GFSELECT, 4, 1);
    env.mmio_write(common + GF, 4, features >> 32);
    add_status(env, FEATURES_OK);
    // virtio_features_ok: the device may have cleared it.
    if env.mmio_read(common + STATUS, 1) as u8 & FEATURES_OK == 0 {
        add_status(env, FAILED);
        return Err(format!("virtio: device refuses features: {features:#x}"));
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = env.mmio_read(device_cfg + i as u64, 1) as u8;
    }

    // vp_find_vqs_msix: enable MSI-X (function masked while programming).
    let msix = f.cap(CAP_ID_MSIX).ok_or("no MSI-X capability")?;
    let table_size = (env.cfg_read(bdf, msix + 2, 2) & 0x7ff) as u16 + 1;
    let tbl = env.cfg_read(bdf, msix + 4, 4);
    let table = f
        .bar((tbl & 7) as u8)
        .ok_or("MSI-X table BAR unassigned")?
        .address
        + (tbl & !7) as u64;
    env.cfg_write(bdf, msix + 2, 2, 0xc000);
    let queues = env.mmio_read(common + NUM_QUEUES, 2) as u16;
    let mut vectors = Vec::new();
    for v in 0..table_size.min(queues + 1) {
        let data = env.alloc_vector();
        let e = table + v as u64 * 16;
        env.mmio_write(e, 4, 0xfee0_0000);
        env.mmio_write(e + 4, 4, 0);
        env.mmio_write(e + 8, 4, data as u64);
        env.mmio_write(e + 12, 4, 0);
        vectors.push(data);
    }
    env.cfg_write(bdf, msix + 2, 2, 0x8000);
    env.mmio_write(common + MSIX_CONFIG, 2, 0);
    if env.mmio_read(common + MSIX_CONFIG, 2) as u16 == NO_VECTOR {
        add_status(env, FAILED);
        return Err("virtio: config vector refused".into());
    }
    let mut notify = Vec::new();
    let mut rings = Vec::new();
    for q in 0..queues {
        env.mmio_write(common + Q_SELECT, 2, q as u64);
        let size = env.mmio_read(common + Q_SIZE, 2);
        if size == 0 || env.mmio_read(common + Q_ENABLE, 2) != 0 {
            return Err(format!("virtio: queue {q} unavailable"));
        }
        let num = size.min(256);
        env.mmio_write(common + Q_SIZE, 2, num);
        let ring = env.alloc_ring(num);
        let r = QueueRings {
            size: num as u16,
            desc: ring,
            avail: ring + 16 * num,
            used: ring + 0x1000 * 4,
        };
        rings.push(r);
        for (off, addr) in [(Q_DESC, r.desc), (Q_AVAIL, r.avail), (Q_USED, r.used)] {
            env.mmio_write(common + off, 4, addr & 0xffff_ffff);
            env.mmio_write(common + off + 4, 4, addr >> 32);
        }
        env.mmio_write(common + Q_MSIX, 2, (q + 1) as u64);
        if env.mmio_read(common + Q_MSIX, 2) as u16 == NO_VECTOR {
            add_status(env, FAILED);
            return Err(format!("virtio: queue {q} vector refused"));
        }
        let off = env.mmio_read(common + Q_NOFF, 2);
        notify.push(notify_base + off * multiplier);
    }
    for q in 0..queues {
        env.mmio_write(common + Q_SELECT, 2, q as u64);
        env.mmio_write(common + Q_ENABLE, 2, 1);
    }
    add_status(env, DRIVER_OK);
    let status = env.mmio_read(common + STATUS, 1) as u8;
    if status & DRIVER_OK == 0 || status & 64 != 0 {
        return Err(format!("virtio: device status {status:#x} after DRIVER_OK"));
    }
    Ok(VirtioProbe {
        bdf,
        device_type: f.device - 0x1040,
        features,
        mac,
        notify,
        vectors,
        common,
        device_cfg,
        queues: rings,
    })
}

/// `virtio_pci_remove`: reset the device.
pub fn remove(env: &mut Env, p: &VirtioProbe) {
    env.mmio_write(p.common + STATUS, 1, 0);
}
