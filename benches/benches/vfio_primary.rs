//! The VFIO primary over the recorded 82599 VF model (event log off), through
//! `VfioDeviceOps`:
//!
//! - `access/*`: one trapped BAR read and write of a register (forwarded to the
//!   region), a config read the device answers and one the primary emulates
//!   (a BAR register), an MSI-X table write. The floor is the same register
//!   read straight from the model, without the primary.
//! - `cycle/attach_detach`: attach (reset, DMA-map two regions of guest memory,
//!   route interrupts) and detach (tear down, reset, unmap), with the guest's
//!   MSI-X bring-up between them in `cycle/attach_msix_detach`. The floor is the
//!   model's share: the same resets, maps and unmaps called directly.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vfio_primary::testing::{RecordedVf, regs};
use vfio_primary::{DmaMapper, VfioDeviceOps, VfioPrimary, VfioPrimaryBuilder};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_pci::PciFunction;
use vmm_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vmm_pci::testing::RecordingMsi;

const MSIX: u16 = 0x70;

fn primary() -> (Arc<RecordedVf>, VfioPrimary) {
    let vf = Arc::new(RecordedVf::intel_82599_vf());
    vf.set_recording(false);
    let p = VfioPrimaryBuilder::new(
        "hostdev0",
        vf.clone(),
        vf.clone(),
        Arc::new(RecordingMsi::new()),
    )
    .failover_pair_id("net0")
    .build()
    .unwrap();
    (vf, p)
}

fn w(p: &mut VfioPrimary, off: u16, v: u32, len: usize) {
    p.write_config(off, &v.to_le_bytes()[..len]);
}

fn assign(p: &mut VfioPrimary) {
    for (reg, addr) in [(0x10u16, 0xc000_0000u32), (0x1c, 0xc000_4000)] {
        w(p, reg, addr, 4);
        w(p, reg + 4, 0, 4);
    }
    w(p, COMMAND, (COMMAND_MEMORY | COMMAND_BUS_MASTER) as u32, 2);
}

fn enable_msix(p: &mut VfioPrimary) {
    w(p, MSIX + 2, 0xc000, 2);
    for v in 0..3u64 {
        p.write_bar(3, v * 16, &0xfee0_0000u32.to_le_bytes());
        p.write_bar(3, v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
    }
    w(p, MSIX + 2, 0x8000, 2);
    for v in 0..3u64 {
        p.write_bar(3, v * 16 + 12, &0u32.to_le_bytes());
    }
}

fn access(c: &mut Criterion) {
    let mut g = c.benchmark_group("vfio_primary/access");
    g.measurement_time(Duration::from_secs(3));
    let (vf, mut p) = primary();
    assign(&mut p);
    g.bench_function("floor_model_region_read", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            vf.region_read(0, black_box(regs::VFLINKS), &mut d).unwrap();
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("trapped_bar_read", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            p.read_bar(0, black_box(regs::VFLINKS), &mut d);
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("trapped_bar_write", |b| {
        b.iter(|| p.write_bar(0, black_box(regs::VTEIMS), &7u32.to_le_bytes()))
    });
    g.bench_function("config_read_device", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            p.read_config(black_box(0), &mut d);
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("config_read_emulated_bar", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            p.read_config(black_box(0x10), &mut d);
            u32::from_le_bytes(d)
        })
    });
    enable_msix(&mut p);
    g.bench_function("msix_table_write", |b| {
        b.iter(|| p.write_bar(3, black_box(16 + 8), &0x41u32.to_le_bytes()))
    });
    g.finish();
}

fn cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("vfio_primary/cycle");
    g.measurement_time(Duration::from_secs(3));
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x100_0000), 0x10_0000),
    ])
    .unwrap();
    let (vf, mut p) = primary();
    // The floor: the model's share of a cycle, called directly.
    let regions: Vec<(u64, u64, u64)> = mem
        .iter()
        .map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
            (r.start_addr().0, r.len(), host)
        })
        .collect();
    g.bench_function("floor_model_reset_map_unmap", |b| {
        b.iter(|| {
            vf.reset().unwrap();
            for &(iova, size, host) in &regions {
                // SAFETY: `mem` outlives the mapping, which is removed below; the
                // model never dereferences the host address.
                unsafe { vf.dma_map(iova, size, host).unwrap() };
            }
            vf.reset().unwrap();
            for &(iova, size, _) in &regions {
                vf.dma_unmap(iova, size).unwrap();
            }
        })
    });
    g.bench_function("attach_detach", |b| {
        b.iter(|| {
            p.attach(&mem).unwrap();
            p.detach().unwrap();
        })
    });
    g.bench_function("attach_msix_detach", |b| {
        b.iter(|| {
            p.attach(&mem).unwrap();
            assign(&mut p);
            enable_msix(&mut p);
            p.detach().unwrap();
        })
    });
    assert!(vf.mappings().is_empty());
    assert_eq!(vf.open_fds(), 0);
    g.finish();
}

criterion_group!(benches, access, cycle);
criterion_main!(benches);
