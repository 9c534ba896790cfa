//! The VFIO primary end to end: the recorded Intel 82599 VF behind a
//! `vfio_primary::VfioPrimary`, hot-plugged into a PCIe root port and
//! enumerated by the scripted Linux-like guest. The guest has no ixgbevf
//! driver, so the test brings MSI-X up the way Linux's `pci_enable_device`,
//! `pci_set_master` and `msix_capability_init` do, through config and BAR
//! writes, and "the device" raises interrupts on the eventfds the primary gave
//! it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcie_hotplug::{HotplugOutcome, HotplugSlot, RootPort, RootPortBuilder};
use test_guest::{Guest, IrqQueue, PciehpState, Timings};
use vfio_primary::testing::{RecordedVf, regs};
use vfio_primary::{VfioPrimary, VfioPrimaryBuilder, irq};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_pci::config::{
    CAP_ID_MSIX, CAP_ID_PCIE, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY,
};
use vmm_pci::msix::{MSIX_CTRL, MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK};
use vmm_pci::{Bdf, PciRoot};

const PORT: Bdf = Bdf::new(0, 1, 0);
const VF: Bdf = Bdf::new(1, 0, 0);

struct Vmm {
    root: Arc<PciRoot>,
    irqs: Arc<IrqQueue>,
    port: Arc<Mutex<RootPort>>,
    vf: Arc<RecordedVf>,
    primary: Arc<Mutex<VfioPrimary>>,
    mem: GuestMemoryMmap,
}

fn vmm() -> Vmm {
    let irqs = IrqQueue::new();
    let vf = Arc::new(RecordedVf::intel_82599_vf());
    let primary = VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf.clone(), irqs.clone())
        .failover_pair_id("net0")
        .page_size(0x1000)
        .build()
        .unwrap();
    let port = Arc::new(Mutex::new(
        RootPortBuilder::new("rp-primary", 1)
            .port_number(1)
            .build(irqs.clone()),
    ));
    let mut root = PciRoot::new();
    root.add(1, 0, port.clone()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x100_0000), 0x10_0000),
    ])
    .unwrap();
    Vmm {
        root: Arc::new(root),
        irqs,
        port,
        vf,
        primary: Arc::new(Mutex::new(primary)),
        mem,
    }
}

fn boot(v: &Vmm) -> Guest {
    Guest::boot(
        v.root.clone(),
        v.irqs.clone(),
        Timings::default(),
        u64::MAX,
        (0x10_0000, 0x20_0000),
    )
}

/// The coordinator's plug: attach (DMA map), then hot-plug; the guest's pciehp
/// powers the slot and enumerates the VF.
fn plug(v: &Vmm, g: &mut Guest) {
    v.primary.lock().unwrap().attach(&v.mem).unwrap();
    let handle: vmm_pci::PciHandle = v.primary.clone();
    let c = v.port.lock().unwrap().plug(handle).unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Plugged));
}

/// The coordinator's unplug: the attention button, the guest powers the slot
/// off, then detach (reset, unmap).
fn unplug(v: &Vmm, g: &mut Guest) {
    let c = v.port.lock().unwrap().request_unplug().unwrap();
    g.settle(Duration::from_secs(10));
    assert_eq!(c.outcome(), Some(HotplugOutcome::Unplugged));
    v.primary.lock().unwrap().detach().unwrap();
}

/// What a Linux driver's probe does before `request_irq`: `pci_enable_device`
/// and `pci_set_master`, then `msix_capability_init` (enable with the function
/// masked, mask every entry, write the messages, disable INTx, clear the
/// function mask). Returns the message data of each vector.
fn bring_up_msix(g: &mut Guest, bar3: u64, cap: u16) -> Vec<u32> {
    let cmd = g.env.cfg_read(VF, COMMAND, 2) as u16;
    g.env.cfg_write(
        VF,
        COMMAND,
        2,
        (cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER) as u32,
    );
    g.env.cfg_write(
        VF,
        cap + MSIX_CTRL,
        2,
        (MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) as u32,
    );
    let vectors = (g.env.cfg_read(VF, cap + MSIX_CTRL, 2) & 0x7ff) as u64 + 1;
    for v in 0..vectors {
        g.env.mmio_write(bar3 + v * 16 + 12, 4, 1);
    }
    let data: Vec<u32> = (0..vectors).map(|_| g.env.alloc_vector()).collect();
    for (v, &d) in data.iter().enumerate() {
        let e = bar3 + v as u64 * 16;
        g.env.mmio_write(e, 4, 0xfee0_0000);
        g.env.mmio_write(e + 4, 4, 0);
        g.env.mmio_write(e + 8, 4, d as u64);
    }
    let cmd = g.env.cfg_read(VF, COMMAND, 2) as u16;
    g.env
        .cfg_write(VF, COMMAND, 2, (cmd | COMMAND_INTX_DISABLE) as u32);
    g.env
        .cfg_write(VF, cap + MSIX_CTRL, 2, MSIX_CTRL_ENABLE as u32);
    data
}

/// `request_irq` on vector `v`: unmask its entry.
fn unmask(g: &mut Guest, bar3: u64, v: u64) {
    g.env.mmio_write(bar3 + v * 16 + 12, 4, 0);
}

/// The VMM's event loop noticed an eventfd; the guest takes its interrupts.
fn run(v: &Vmm, g: &mut Guest) {
    v.primary.lock().unwrap().service_interrupts();
    g.service();
}

#[test]
fn the_guest_enumerates_the_vf_and_brings_up_msix() {
    let v = vmm();
    let mut g = boot(&v);
    assert!(g.env.enumerator.get(VF).is_none(), "the slot starts empty");
    plug(&v, &mut g);
    assert!(g.env.bound.contains(&VF));
    let f = g.env.enumerator.get(VF).unwrap().clone();
    assert_eq!(
        (f.vendor, f.device, f.class, f.header_type),
        (0x8086, 0x10ed, 0x02_0000, 0)
    );
    // Both BARs sized (16 KiB, 64-bit) and assigned in the port's window.
    let (bar0, bar3) = (f.bar(0).unwrap(), f.bar(3).unwrap());
    for b in [bar0, bar3] {
        assert!(
            b.memory && b.is64 && !b.prefetchable && b.size == 0x4000,
            "{b:?}"
        );
        assert!((0xc000_0000..0xfec0_0000).contains(&b.address), "{b:?}");
    }
    assert_eq!(f.bars.len(), 2);
    // MSI-X and PCI Express visible where the VF has them; the ROM and ARI not.
    assert_eq!(f.caps, [(CAP_ID_MSIX, 0x70), (CAP_ID_PCIE, 0xa0)]);
    assert_eq!(g.config_read32(VF, 0x30), 0);
    assert_eq!(g.config_read32(VF, 0xa0) >> 16 & 0xf, 1, "version 1");
    assert_eq!(g.config_read32(VF, 0x100), 0x0001_0001, "AER, then nothing");
    assert_eq!(g.pciehp(PORT).unwrap().state(), PciehpState::On);
    // Decoding is off until the driver enables the device.
    assert_eq!(
        g.env.mmio_read(bar0.address + regs::VFLINKS, 4) as u32,
        u32::MAX
    );

    // The driver's MSI-X bring-up; vectors 0 and 1 requested, 2 left masked.
    let data = bring_up_msix(&mut g, bar3.address, 0x70);
    assert_eq!(data.len(), 3);
    unmask(&mut g, bar3.address, 0);
    unmask(&mut g, bar3.address, 1);
    assert_eq!(v.vf.routed(irq::MSIX), 3);
    // Trapped BAR accesses reach the device's registers.
    assert_eq!(
        g.env.mmio_read(bar0.address + regs::VFLINKS, 4) as u32,
        regs::LINKS_UP | regs::LINKS_SPEED_10G
    );
    // The VMM may map BAR 0 whole and BAR 3 but for the table and PBA pages.
    let ranges: Vec<_> = v
        .primary
        .lock()
        .unwrap()
        .mmap_ranges()
        .iter()
        .map(|m| (m.bar, m.guest_address, m.size))
        .collect();
    assert_eq!(
        ranges,
        [
            (0, bar0.address, 0x4000),
            (3, bar3.address + 0x1000, 0x1000),
            (3, bar3.address + 0x3000, 0x1000),
        ]
    );

    // The device raises vector 1: the guest gets vector 1's message.
    assert!(v.vf.signal_irq(irq::MSIX, 1));
    run(&v, &mut g);
    assert_eq!(g.env.other_irqs, [data[1]]);
    // Vector 2 is masked: pending in the PBA until the driver unmasks it.
    assert!(v.vf.signal_irq(irq::MSIX, 2));
    run(&v, &mut g);
    assert_eq!(g.env.other_irqs.len(), 1);
    assert_eq!(g.env.mmio_read(bar3.address + 0x2000, 8), 0b100);
    unmask(&mut g, bar3.address, 2);
    g.service();
    assert_eq!(g.env.other_irqs, [data[1], data[2]]);
    assert_eq!(g.env.mmio_read(bar3.address + 0x2000, 8), 0);
    assert!(
        v.vf.mappings().len() == 2,
        "guest memory mapped while plugged"
    );
}

#[test]
fn unplug_detaches_and_a_replug_starts_clean() {
    let v = vmm();
    let mut g = boot(&v);
    plug(&v, &mut g);
    let f = g.env.enumerator.get(VF).unwrap().clone();
    let bar3 = f.bar(3).unwrap().address;
    bring_up_msix(&mut g, bar3, 0x70);
    assert_eq!(v.vf.routed(irq::MSIX), 3);

    unplug(&v, &mut g);
    assert!(g.env.enumerator.get(VF).is_none());
    assert!(v.vf.mappings().is_empty());
    assert_eq!((v.vf.open_fds(), v.vf.routed(irq::MSIX)), (0, 0));
    assert_eq!(v.vf.resets(), 2, "reset on attach and on detach");

    // Plugged again (a failed migration): enumerated afresh, nothing routed
    // until the driver enables MSI-X again.
    plug(&v, &mut g);
    let f2 = g.env.enumerator.get(VF).unwrap().clone();
    assert_eq!(f2.caps, f.caps);
    assert_eq!(f2.bar(3).unwrap().size, 0x4000);
    assert_eq!(v.vf.routed(irq::MSIX), 0);
    assert_eq!(v.vf.mappings().len(), 2);
    let data = bring_up_msix(&mut g, f2.bar(3).unwrap().address, 0x70);
    unmask(&mut g, f2.bar(3).unwrap().address, 0);
    assert!(v.vf.signal_irq(irq::MSIX, 0));
    run(&v, &mut g);
    assert_eq!(g.env.other_irqs, [data[0]]);
    let c = v.primary.lock().unwrap().counters();
    assert_eq!((c.attaches, c.detaches, c.live_mappings), (2, 1, 2));
    assert_eq!(v.primary.lock().unwrap().migration_blocker(), None);
}
