//! The `vfio-ioctls` implementation on a real device. Runs only when
//! `VFIO_PRIMARY_TEST_DEVICE` names a PCI function's sysfs directory, bound to
//! vfio-pci, with its IOMMU group viable and accessible to the test's user
//! (e.g. `VFIO_PRIMARY_TEST_DEVICE=/sys/bus/pci/devices/0000:3b:02.1`, as root);
//! otherwise it prints why it skipped and passes.
//!
//! It opens the device, reads vendor/device/class from its config space (and
//! compares them with sysfs), lists its regions (and the ROM's signature) and
//! interrupts, DMA-maps a small guest memory, changes the memory map, resets
//! the device and unmaps everything.

use std::io;
use std::path::Path;
use std::sync::Arc;

use vfio_primary::kernel::{self, VFIO_CONTAINER_PATH};
use vfio_primary::{DmaMappings, VfioDeviceOps, irq, region};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const ENV: &str = "VFIO_PRIMARY_TEST_DEVICE";

/// The device's sysfs path, or `None` after saying why the test skips.
fn test_device() -> Option<String> {
    match std::env::var(ENV) {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            let vfio = if Path::new(VFIO_CONTAINER_PATH).exists() {
                format!("{VFIO_CONTAINER_PATH} exists on this machine")
            } else {
                format!("{VFIO_CONTAINER_PATH} does not exist on this machine (no VFIO)")
            };
            println!(
                "SKIPPED: {ENV} is not set; set it to the sysfs directory of a function bound \
                 to vfio-pci (e.g. {ENV}=/sys/bus/pci/devices/0000:3b:02.1) to run this test; \
                 {vfio}"
            );
            None
        }
    }
}

fn read_config<const N: usize>(dev: &impl VfioDeviceOps, offset: u64) -> [u8; N] {
    let mut buf = [0u8; N];
    dev.region_read(region::CONFIG, offset, &mut buf)
        .unwrap_or_else(|e| panic!("config read at {offset:#x}: {e}"));
    buf
}

#[test]
fn open_describe_map_reset_unmap() {
    let Some(path) = test_device() else { return };
    let (container, dev) = kernel::open(&path).unwrap_or_else(|e| panic!("{ENV}={path}: {e}"));
    println!(
        "opened {} ({}) in IOMMU group {}",
        dev.address(),
        dev.ids(),
        dev.group()
    );

    // Identity through VFIO (vfio-pci fills in a VF's vendor/device IDs).
    let vendor = u16::from_le_bytes(read_config(&dev, 0x00));
    let device = u16::from_le_bytes(read_config(&dev, 0x02));
    let [prog_if, sub, base] = read_config::<3>(&dev, 0x09);
    let class = u32::from_le_bytes([prog_if, sub, base, 0]);
    println!("config space: {vendor:04x}:{device:04x}, class {class:06x}");
    let ids = dev.ids();
    assert_eq!(
        (vendor, device, class),
        (ids.vendor, ids.device, ids.class),
        "config space and sysfs disagree"
    );

    // Regions and interrupts.
    for index in 0..=region::CONFIG {
        match dev.region_info(index) {
            Some(r) => println!(
                "region {index}: {:#x} bytes at fd offset {:#x}, {}{}{}{}, mmap areas {:x?}",
                r.size,
                r.fd_offset,
                if r.read { "r" } else { "-" },
                if r.write { "w" } else { "-" },
                if r.mmap { "m" } else { "-" },
                if r.msix_mappable {
                    ", MSI-X mappable"
                } else {
                    ""
                },
                r.mmap_areas
            ),
            None => println!("region {index}: none"),
        }
    }
    let config = dev
        .region_info(region::CONFIG)
        .expect("a PCI function has config space");
    assert!(config.read && config.write && config.size >= 256);
    let past_end = dev.region_read(region::CONFIG, config.size, &mut [0u8; 4]);
    assert_eq!(past_end.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    // The expansion ROM, as `RomPolicy::Device` would read it (VFs have none).
    match dev.region_info(region::ROM).filter(|r| r.size > 0) {
        Some(r) => {
            let mut sig = [0u8; 2];
            match dev.region_read(region::ROM, 0, &mut sig) {
                Ok(()) => println!(
                    "ROM: {:#x} bytes, signature {sig:02x?}{}",
                    r.size,
                    if sig == [0x55, 0xaa] {
                        " (55 AA)"
                    } else {
                        " (not 55 AA)"
                    }
                ),
                Err(e) => println!("ROM: {:#x} bytes, unreadable: {e}", r.size),
            }
        }
        None => println!("ROM: none (RomPolicy::Device would be refused)"),
    }
    for (name, index) in [("INTx", irq::INTX), ("MSI", irq::MSI), ("MSI-X", irq::MSIX)] {
        println!("{name}: {:?}", dev.irq_info(index));
    }

    // DMA: map, change the memory map, reset, unmap.
    let low = Arc::new(GuestRegionMmap::<()>::from_range(GuestAddress(0), 1 << 20, None).unwrap());
    let high = Arc::new(
        GuestRegionMmap::<()>::from_range(GuestAddress(0x1_0000_0000), 1 << 20, None).unwrap(),
    );
    let mem = GuestMemoryMmap::from_arc_regions(vec![low.clone()]).unwrap();
    let bigger = GuestMemoryMmap::from_arc_regions(vec![low, high]).unwrap();
    let mut dma = DmaMappings::new();
    // SAFETY: `mem` and `bigger` outlive the mappings (all unmapped below) and
    // are not accessed at all while mapped.
    unsafe { dma.map_all(&container, &mem) }.unwrap_or_else(|e| panic!("DMA map: {e}"));
    assert_eq!(dma.mapped(), [(0, 1 << 20)]);
    // SAFETY: as above.
    unsafe { dma.update(&container, &bigger) }.unwrap_or_else(|e| panic!("DMA update: {e}"));
    assert_eq!(dma.mapped(), [(0, 1 << 20), (0x1_0000_0000, 1 << 20)]);

    match dev.reset() {
        Ok(()) => println!("reset done"),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            println!("no reset: {e}")
        }
        Err(e) => panic!("reset: {e}"),
    }
    let after = u16::from_le_bytes(read_config(&dev, 0x00));
    assert_eq!(after, vendor, "the device answers after reset");

    dma.unmap_all(&container)
        .unwrap_or_else(|e| panic!("DMA unmap: {e}"));
    assert!(dma.is_empty());
}
