//! Config-space access and the cost of a full unplug/replug cycle.
//!
//! - `config/*`: one dword read or word write, at each layer a VMM may call:
//!   the bare [`vmm_pci::ConfigSpace`], the root port as a `PciFunction`, and the
//!   bus (ECAM decode, routing, locking), on bus 0 and behind the port. The
//!   floor is a 4-byte load from a 4 KiB array in the same run.
//! - `cycle/*`: request unplug → the scripted Linux guest acts (5 s button
//!   window and 1 s power-off wait on the virtual clock) → plug → the guest
//!   enables the slot. Real time per cycle, for both sides together, and the
//!   VMM-side calls alone.

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pcie_hotplug::{HotplugOutcome, HotplugSlot, RootPort, RootPortBuilder};
use test_guest::{Guest, IrqQueue, StubEndpoint, Timings};
use vmm_pci::config::{COMMAND, COMMAND_MEMORY};
use vmm_pci::pcie::{SLTCTL, SLTSTA};
use vmm_pci::{Bdf, PciFunction, PciRoot};

fn topology() -> (Arc<PciRoot>, Arc<Mutex<RootPort>>, Arc<IrqQueue>) {
    let irqs = IrqQueue::new();
    let port = Arc::new(Mutex::new(
        RootPortBuilder::new("rp0", 1).build(irqs.clone()),
    ));
    port.lock().unwrap().cold_plug(StubEndpoint::vf()).unwrap();
    let mut root = PciRoot::new();
    root.add(1, 0, port.clone()).unwrap();
    (Arc::new(root), port, irqs)
}

fn config(c: &mut Criterion) {
    let mut g = c.benchmark_group("config");
    g.measurement_time(Duration::from_secs(3));
    let (root, port, irqs) = topology();
    // The guest numbers the bus and enables the port, so bus 1 routes.
    let _guest = Guest::boot(root.clone(), irqs, Timings::default(), 0, (0, 0));
    let cap = port.lock().unwrap().pcie_cap_offset();
    let rp = Bdf::new(0, 1, 0);
    let ep = Bdf::new(1, 0, 0);

    let floor = [0u8; 4096];
    g.bench_function("read/floor_array_load", |b| {
        b.iter(|| {
            let off = black_box(cap as usize + SLTSTA as usize) & !3;
            u32::from_le_bytes(black_box(&floor)[off..off + 4].try_into().unwrap())
        })
    });
    let mut cs = vmm_pci::ConfigSpace::new(
        vmm_pci::HeaderType::Endpoint,
        &vmm_pci::PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 1,
            class: vmm_pci::ClassCode::ETHERNET,
        },
        true,
    );
    g.bench_function("read/config_space", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            cs.read(black_box(0x04), &mut d);
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("read/root_port_slot_status", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            port.lock()
                .unwrap()
                .read_config(black_box(cap + SLTCTL), &mut d);
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("read/bus_ecam_bus0", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            root.ecam_read(vmm_pci::ecam_offset(black_box(rp), cap + SLTCTL), &mut d);
            u32::from_le_bytes(d)
        })
    });
    g.bench_function("read/bus_ecam_behind_port", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            root.ecam_read(vmm_pci::ecam_offset(black_box(ep), 0), &mut d);
            u32::from_le_bytes(d)
        })
    });
    let mut floor_w = [0u8; 4096];
    g.bench_function("write/floor_array_store", |b| {
        b.iter(|| {
            let off = black_box(COMMAND as usize);
            floor_w[off..off + 2].copy_from_slice(&black_box(COMMAND_MEMORY).to_le_bytes());
        })
    });
    g.bench_function("write/config_space_command", |b| {
        b.iter(|| cs.write(black_box(COMMAND), &COMMAND_MEMORY.to_le_bytes()))
    });
    // A Slot Control write is a command: Command Completed, interrupt logic.
    let ctl = port.lock().unwrap().config().get_u16(cap + SLTCTL);
    g.bench_function("write/bus_ecam_slot_control", |b| {
        b.iter(|| {
            root.ecam_write(
                vmm_pci::ecam_offset(rp, cap + SLTCTL),
                &black_box(ctl).to_le_bytes(),
            )
        })
    });
    g.finish();
}

fn cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(30);
    let (root, port, irqs) = topology();
    let mut guest = Guest::boot(root, irqs, Timings::default(), 0, (0, 0));
    let before = guest.env.enumerator.cycles;
    let one_cycle = |guest: &mut Guest| {
        let c = port.lock().unwrap().request_unplug().unwrap();
        guest.settle(Duration::from_secs(30));
        assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
        let c = port.lock().unwrap().plug(StubEndpoint::vf()).unwrap();
        guest.settle(Duration::from_secs(30));
        assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
    };
    let t0 = guest.env.clock.now();
    one_cycle(&mut guest);
    eprintln!(
        "cycle: {} guest config cycles, {:?} of virtual time per unplug+replug",
        guest.env.enumerator.cycles - before,
        guest.env.clock.now() - t0
    );
    g.bench_function("unplug_replug_with_guest", |b| {
        b.iter(|| one_cycle(&mut guest))
    });

    // The VMM's own share: the two requests, and the port's handling of the
    // guest's decisive writes (attention button to power off, power on to
    // indicator on), without the guest's enumeration and polling.
    let (_root2, port2, _irqs2) = topology();
    let cap = port2.lock().unwrap().pcie_cap_offset();
    let w = |p: &Arc<Mutex<RootPort>>, v: u16| {
        p.lock()
            .unwrap()
            .write_config(cap + SLTCTL, &v.to_le_bytes());
    };
    let base = port2.lock().unwrap().config().get_u16(cap + SLTCTL) & !0x0f00;
    g.bench_function("unplug_replug_vmm_side", |b| {
        b.iter(|| {
            let c = port2.lock().unwrap().request_unplug().unwrap();
            w(&port2, base | 0x0200); // power indicator blink
            w(&port2, base | 0x0600); // power off: the device leaves
            w(&port2, base | 0x0700); // 1 s later, power indicator off (a plug waits for it)
            let c2 = port2.lock().unwrap().plug(StubEndpoint::vf()).unwrap();
            w(&port2, base | 0x0200); // power on, blink
            w(&port2, base | 0x0100); // indicator on: plugged
            black_box((c.outcome(), c2.outcome()))
        })
    });
    g.finish();
}

criterion_group!(benches, config, cycle);
criterion_main!(benches);
