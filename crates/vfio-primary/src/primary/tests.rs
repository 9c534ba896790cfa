//! The primary over the recorded 82599 VF model.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY};
use vmm_pci::msix::{MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK};
use vmm_pci::testing::{RecordingIntx, RecordingMsi};
use vmm_pci::{BarKind, MsiMessage, PciFunction};

use super::*;
use crate::PrimaryError;
use crate::ops::irq;
use crate::rom::{self, RomPolicy, RomWindow};
use crate::testing::{Event, ModelSpec, Op, RecordedVf, regs};

const MSIX: u16 = 0x70;
const PAGE: u64 = 0x1000;
const BAR0_AT: u64 = 0xc000_0000;
const BAR3_AT: u64 = 0xc000_4000;

struct Rig {
    vf: Arc<RecordedVf>,
    msi: Arc<RecordingMsi>,
    p: VfioPrimary,
}

fn rig_with(spec: ModelSpec, pair: bool) -> Rig {
    let vf = Arc::new(RecordedVf::new(spec));
    let msi = Arc::new(RecordingMsi::new());
    let mut b =
        VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf.clone(), msi.clone()).page_size(PAGE);
    if pair {
        b = b.failover_pair_id("net0");
    }
    let p = b.build().unwrap();
    Rig { vf, msi, p }
}

fn rig() -> Rig {
    rig_with(ModelSpec::intel_82599_vf(), true)
}

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x2_0000),
        (GuestAddress(0x10_0000), 0x1_0000),
    ])
    .unwrap()
}

fn r32(p: &mut VfioPrimary, off: u16) -> u32 {
    let mut b = [0u8; 4];
    p.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(p: &mut VfioPrimary, off: u16, v: u32) -> Option<BarMove> {
    p.write_config(off, &v.to_le_bytes())
}

fn w16(p: &mut VfioPrimary, off: u16, v: u16) {
    p.write_config(off, &v.to_le_bytes());
}

fn bar_r32(p: &mut VfioPrimary, bar: u8, off: u64) -> u32 {
    let mut b = [0u8; 4];
    p.read_bar(bar, off, &mut b);
    u32::from_le_bytes(b)
}

fn bar_w32(p: &mut VfioPrimary, bar: u8, off: u64, v: u32) {
    p.write_bar(bar, off, &v.to_le_bytes());
}

/// Sizes and assigns both BARs and enables decoding and bus mastering, as
/// Linux's enumeration and `pci_enable_device`/`pci_set_master` do.
fn assign(p: &mut VfioPrimary) {
    for (reg, addr) in [(0x10, BAR0_AT), (0x1c, BAR3_AT)] {
        w32(p, reg, u32::MAX);
        w32(p, reg + 4, u32::MAX);
        w32(p, reg, addr as u32);
        w32(p, reg + 4, (addr >> 32) as u32);
    }
    w16(p, COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER);
}

fn msg(v: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data: 0x40 + v as u32,
    }
}

/// Linux's `msix_capability_init`: enable with the function masked, mask every
/// entry, write the messages, disable INTx, clear the function mask; then
/// `request_irq` unmasks every vector not in `masked`.
fn enable_msix(p: &mut VfioPrimary, masked: &[u16]) {
    w16(p, MSIX + 2, MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
    for v in 0..3u64 {
        bar_w32(p, 3, v * 16 + 12, 1);
    }
    for v in 0..3u16 {
        let m = msg(v);
        let e = v as u64 * 16;
        bar_w32(p, 3, e, m.address as u32);
        bar_w32(p, 3, e + 4, (m.address >> 32) as u32);
        bar_w32(p, 3, e + 8, m.data);
    }
    w16(
        p,
        COMMAND,
        COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
    );
    w16(p, MSIX + 2, MSIX_CTRL_ENABLE);
    for v in (0..3u16).filter(|v| !masked.contains(v)) {
        bar_w32(p, 3, v as u64 * 16 + 12, 0);
    }
}

fn config_writes(vf: &RecordedVf) -> Vec<(u64, Vec<u8>)> {
    vf.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RegionWrite {
                index: region::CONFIG,
                offset,
                data,
            } => Some((offset, data)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_guest_sees_the_vf_with_what_the_vmm_owns_virtualized() {
    let Rig { vf, mut p, .. } = rig();
    let p = &mut p;
    assert_eq!(r32(p, 0x00), 0x10ed_8086);
    assert_eq!(r32(p, 0x08), 0x0200_0001);
    assert_eq!(r32(p, 0x2c), 0x000c_8086);
    assert_eq!(r32(p, 0x0c) >> 16 & 0xff, 0, "single-function type 0");
    assert_ne!(r32(p, 0x04) >> 16 & 0x10, 0, "capability list");
    // BAR registers show their type, never the host's addresses.
    assert_eq!(vf.config()[0x10..0x18], 0x3f_fe00_0004u64.to_le_bytes());
    assert_eq!((r32(p, 0x10), r32(p, 0x14)), (0x4, 0));
    assert_eq!((r32(p, 0x1c), r32(p, 0x20)), (0x4, 0));
    assert_eq!((r32(p, 0x18), r32(p, 0x24)), (0, 0), "no BAR 2 or 5");
    // The expansion ROM is hidden: reads 0, sizing finds nothing, the device
    // never sees the write.
    assert_ne!(vf.config()[0x30..0x34], [0; 4]);
    assert_eq!(r32(p, 0x30), 0);
    w32(p, 0x30, u32::MAX);
    assert_eq!(r32(p, 0x30), 0);
    // Capabilities: MSI-X at 0x70, PCI Express at 0xa0, version fixed up to 1.
    assert_eq!(r32(p, 0x34) & 0xff, 0x70);
    assert_eq!(r32(p, 0x70), 0x0002_a011);
    assert_eq!((r32(p, 0x74), r32(p, 0x78)), (0x3, 0x2003));
    assert_eq!(vf.config()[0xa2], 0x00, "the VF reports version 0");
    assert_eq!(r32(p, 0xa0), 0x0001_0010);
    // Extended: AER ends the list, ARI is gone.
    assert_eq!(r32(p, 0x100), 0x0001_0001);
    let hidden: Vec<_> = p
        .hidden_capabilities()
        .iter()
        .map(|h| (h.id, h.offset, h.extended))
        .collect();
    assert_eq!(hidden, [(0x0e, 0x150, true)]);
    // The interrupt line is the guest's scratch; the command register is the
    // device's.
    p.write_config(0x3c, &[0x0b]);
    assert_eq!(r32(p, 0x3c), 0x0b);
    assert_eq!(vf.config()[0x3c], 0);
    w16(p, COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER);
    assert_eq!(vf.config()[4], 0x06);
    let writes = config_writes(&vf);
    assert_eq!(
        writes,
        [(0x04, vec![0x06, 0x00])],
        "only the command register"
    );
}

#[test]
fn a_hidden_head_of_the_extended_list_and_other_layouts() {
    let mut spec = ModelSpec::intel_82599_vf();
    // ARI first, then AER; an integrated endpoint; a 32-bit MSI capability.
    spec.config[0x100..0x104].copy_from_slice(&(0x000eu32 | 1 << 16 | 0x150 << 20).to_le_bytes());
    spec.config[0x150..0x154].copy_from_slice(&(0x0001u32 | 1 << 16).to_le_bytes());
    spec.config[0xa2] = 0x90;
    spec.insert_capability(0x50, &[0x05, 0, 0x00, 0x00]);
    let Rig { mut p, .. } = rig_with(spec, true);
    let p = &mut p;
    assert_eq!(r32(p, 0x100), 0x1500_0000, "ID 0 pointing at AER");
    assert_eq!(r32(p, 0x150), 0x0001_0001);
    assert_eq!(r32(p, 0xa0) >> 16, 0x0001, "an endpoint, version 1");
    assert_eq!(r32(p, 0xa0 + 0x0c), 0x11, "x1 at 2.5 GT/s");
    assert_eq!(r32(p, 0x34) & 0xff, 0x70, "the 32-bit MSI is dropped");
    assert_eq!(p.hidden_capabilities().len(), 2);
}

#[test]
fn bar_sizing_and_relocation_with_the_split_msix_bar() {
    let Rig { vf, mut p, .. } = rig();
    let p = &mut p;
    w32(p, 0x10, u32::MAX);
    w32(p, 0x14, u32::MAX);
    assert_eq!((r32(p, 0x10), r32(p, 0x14)), (0xffff_c004, u32::MAX));
    w32(p, 0x1c, u32::MAX);
    assert_eq!(r32(p, 0x1c), 0xffff_c004);
    assert!(p.mmap_ranges().is_empty());
    let g0 = p.mmap_generation();
    assign(p);
    assert!(p.mmap_generation() > g0);
    let ranges: Vec<_> = p
        .mmap_ranges()
        .iter()
        .map(|m| (m.bar, m.guest_address, m.size, m.fd_offset))
        .collect();
    assert_eq!(
        ranges,
        [
            (0, BAR0_AT, 0x4000, 0),
            (3, BAR3_AT + 0x1000, 0x1000, 3 << 40 | 0x1000),
            (3, BAR3_AT + 0x3000, 0x1000, 3 << 40 | 0x3000),
        ],
        "BAR 3 split around the table (page 0) and the PBA (page 2)"
    );
    let r = p.bar_regions();
    assert_eq!(
        (r[0].unwrap().address, r[3].unwrap().address),
        (BAR0_AT, BAR3_AT)
    );
    // A move is reported and the ranges follow.
    let g1 = p.mmap_generation();
    let m = w32(p, 0x1c, 0xd000_0000).unwrap();
    assert_eq!(
        (m.index, m.old, m.new, m.size),
        (3, BAR3_AT, 0xd000_0000, 0x4000)
    );
    assert_eq!(p.mmap_generation(), g1 + 1);
    let bar3: Vec<_> = p
        .mmap_ranges()
        .iter()
        .filter(|m| m.bar == 3)
        .map(|m| m.guest_address)
        .collect();
    assert_eq!(bar3, [0xd000_1000, 0xd000_3000]);
    // Decoding off: nothing may stay mapped.
    w16(p, COMMAND, 0);
    assert!(p.mmap_ranges().is_empty());
    assert!(p.bar_regions().iter().all(Option::is_none));
    // The device never saw a BAR register.
    assert!(
        config_writes(&vf)
            .iter()
            .all(|(off, _)| !(0x10..0x28).contains(off))
    );
}

#[test]
fn msix_vectors_reach_their_eventfds_with_masking_and_the_pending_bit() {
    let Rig { vf, msi, mut p } = rig();
    p.attach(&memory()).unwrap();
    assign(&mut p);
    assert_eq!(
        vf.routed(irq::MSIX),
        0,
        "nothing routed before MSI-X is enabled"
    );
    enable_msix(&mut p, &[2]);
    assert_eq!(vf.routed(irq::MSIX), 3);
    // The device signals vector 1's eventfd: the message the guest wrote goes out.
    assert!(vf.signal_irq(irq::MSIX, 1));
    assert_eq!(p.msix_eventfd(1).unwrap().read().ok(), Some(1));
    assert!(vf.signal_irq(irq::MSIX, 1));
    assert_eq!(p.service_interrupts(), 1);
    assert_eq!(msi.take_delivered(), [(1, msg(1))]);
    assert_eq!(msi.last_route(1), Some(Some(msg(1))));
    assert_eq!(msi.last_route(2), Some(None), "masked: no route");
    // Vector 2 is masked: its signal sets the pending bit, seen by the very next
    // PBA read; unmasking sends it and clears the bit.
    assert!(vf.signal_irq(irq::MSIX, 2));
    assert_eq!(bar_r32(&mut p, 3, 0x2000), 0b100);
    assert!(msi.delivered().is_empty());
    bar_w32(&mut p, 3, 2 * 16 + 12, 0);
    assert_eq!(msi.take_delivered(), [(2, msg(2))]);
    assert_eq!(bar_r32(&mut p, 3, 0x2000), 0);
    // The function mask holds everything back until it is cleared.
    w16(&mut p, MSIX + 2, MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
    assert!(vf.signal_irq(irq::MSIX, 0));
    p.service_interrupts();
    assert!(msi.delivered().is_empty());
    assert_eq!(bar_r32(&mut p, 3, 0x2000), 0b1);
    w16(&mut p, MSIX + 2, MSIX_CTRL_ENABLE);
    assert_eq!(msi.take_delivered(), [(0, msg(0))]);
    // The table reads back what the guest wrote; the device's own table was
    // never written, and the capability's control never reached it.
    assert_eq!(bar_r32(&mut p, 3, 16 + 8), msg(1).data);
    assert_eq!(r32(&mut p, MSIX) >> 16, 0x8002);
    assert!(vf.events().iter().all(|e| !matches!(
        e,
        Event::RegionWrite { index: 3, offset, .. } if *offset < 0x1000
    )));
    assert!(
        config_writes(&vf)
            .iter()
            .all(|(off, _)| !(0x70..0x7c).contains(off))
    );
    // Disabling MSI-X tears the route down.
    w16(&mut p, MSIX + 2, 0);
    assert_eq!(vf.routed(irq::MSIX), 0);
    let c = p.counters().irq;
    assert_eq!((c.fired, c.delivered, c.pending), (3, 3, 2));
}

#[test]
fn bar_accesses_outside_the_msix_structures_reach_the_device() {
    let Rig { vf, mut p, .. } = rig();
    assign(&mut p);
    assert_eq!(
        bar_r32(&mut p, 0, regs::VFLINKS),
        regs::LINKS_UP | regs::LINKS_SPEED_10G
    );
    bar_w32(&mut p, 0, regs::VTEIMS, 7);
    assert_eq!(vf.region_u32(0, regs::VTEIMS), Some(7));
    // In the trapped page of BAR 3, past the table: the device's.
    bar_w32(&mut p, 3, 0x100, 0xabcd);
    assert_eq!(vf.region_u32(3, 0x100), Some(0xabcd));
    let mut q = [0u8; 8];
    p.read_bar(0, regs::VTEIMS, &mut q);
    assert_eq!(q[..4], 7u32.to_le_bytes());
    assert_eq!(p.counters().trapped, 4);
    // A device error reads as all ones and is counted.
    vf.fail_next(Op::RegionRead, 1);
    assert_eq!(bar_r32(&mut p, 0, regs::VFLINKS), u32::MAX);
    assert_eq!(p.counters().device_errors, 1);
}

/// xorshift64: deterministic noise for the hostile guest.
fn noise(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn hostile_config_and_bar_accesses_never_panic_and_are_counted() {
    hostile(RomPolicy::Hidden);
    // BAR index 6 and register 0x30 reach the emulated ROM BAR.
    hostile(RomPolicy::Device);
}

fn hostile(policy: RomPolicy) {
    let Rig { vf, mut p, .. } = rom_rig(policy);
    vf.set_recording(false);
    p.attach(&memory()).unwrap();
    assign(&mut p);
    enable_msix(&mut p, &[]);
    // Malformed accesses, one of each kind.
    let mut b = [0u8; 8];
    p.read_config(0xffe, &mut b[..4]);
    assert_eq!(b[..4], [0xff; 4]);
    p.write_config(0x3d, &[1, 2, 3, 4]);
    p.read_config(0, &mut b[..3]);
    p.read_bar(0, u64::MAX, &mut b);
    p.read_bar(0, 0x3ffc, &mut b);
    p.write_bar(3, 0x2c, &b);
    p.write_bar(7, 0, &b[..4]);
    p.read_bar(3, 0x1, &mut b[..4]); // a misaligned table read: MSI-X refuses it
    p.write_bar(3, 0x2000, &b); // the PBA is read-only
    let c = p.counters();
    assert_eq!((c.ignored_config, c.ignored_bar), (3, 6));
    // Then noise: any offset, any size, any value.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = [0u8; 16];
    for _ in 0..50_000 {
        let n = noise(&mut s);
        let len = [0, 1, 2, 3, 4, 5, 8, 16][(n & 7) as usize];
        buf.iter_mut().for_each(|x| *x = noise(&mut s) as u8);
        let off = (n >> 8) as u16;
        match n >> 60 & 3 {
            0 => {
                p.write_config(off, &buf[..len]);
            }
            1 => p.read_config(off, &mut buf[..len]),
            2 => {
                let offset = if n & 8 != 0 {
                    noise(&mut s)
                } else {
                    n >> 40 & 0x7fff
                };
                p.write_bar((n >> 32) as u8 & 7, offset, &buf[..len]);
            }
            _ => p.read_bar((n >> 32) as u8 & 7, n >> 40 & 0x7fff, &mut buf[..len]),
        }
        if n & 0xff == 0 {
            vf.signal_irq(irq::MSIX, (n >> 8) as usize % 4);
            p.service_interrupts();
        }
    }
    let c = p.counters();
    assert!(c.ignored_config > 1000 && c.ignored_bar > 1000, "{c:?}");
    // Whatever the guest did, detach leaves nothing behind.
    p.detach().unwrap();
    assert!(vf.mappings().is_empty());
    assert_eq!(vf.open_fds(), 0);
}

#[test]
fn attach_and_detach_reset_map_and_unmap_in_order() {
    let Rig { vf, mut p, .. } = rig();
    p.attach(&memory()).unwrap();
    assert!(p.is_attached());
    assign(&mut p);
    enable_msix(&mut p, &[]);
    p.detach().unwrap();
    let events: Vec<_> = vf
        .take_events()
        .into_iter()
        .filter(|e| !matches!(e, Event::RegionRead { .. } | Event::RegionWrite { .. }))
        .collect();
    let host = |e: &Event| match e {
        Event::DmaMap { host_addr, .. } => *host_addr,
        _ => 0,
    };
    assert_eq!(
        events,
        [
            Event::Reset,
            Event::DmaMap {
                iova: 0,
                size: 0x2_0000,
                host_addr: host(&events[1]),
            },
            Event::DmaMap {
                iova: 0x10_0000,
                size: 0x1_0000,
                host_addr: host(&events[2]),
            },
            Event::EnableIrq {
                index: irq::MSIX,
                vectors: 3
            },
            Event::DisableIrq { index: irq::MSIX },
            Event::Reset,
            Event::DmaUnmap {
                iova: 0,
                size: 0x2_0000
            },
            Event::DmaUnmap {
                iova: 0x10_0000,
                size: 0x1_0000
            },
        ]
    );
    // Back to power-on: BARs unassigned, decoding off (the device was reset),
    // MSI-X disabled, nothing to map.
    assert!(!p.is_attached());
    assert_eq!((r32(&mut p, 0x10), r32(&mut p, 0x1c)), (0x4, 0x4));
    assert_eq!(r32(&mut p, 0x04) & 0xffff, 0);
    assert_eq!(r32(&mut p, MSIX) >> 16, 0x0002);
    assert!(p.mmap_ranges().is_empty());
    assert!(matches!(
        p.attach(&memory()).and_then(|()| p.attach(&memory())),
        Err(PrimaryError::AlreadyAttached { mappings: 2, .. })
    ));
}

#[test]
fn a_thousand_attach_detach_cycles_leak_nothing() {
    let Rig { vf, msi, mut p } = rig();
    vf.set_recording(false);
    let mem = memory();
    assert_eq!(p.counters().live_eventfds, 3);
    for i in 0..1000u64 {
        p.attach(&mem).unwrap();
        assign(&mut p);
        enable_msix(&mut p, &[]);
        assert_eq!((vf.mappings().len(), vf.open_fds()), (2, 3));
        if i % 100 == 0 {
            assert!(vf.signal_irq(irq::MSIX, 1));
            p.service_interrupts();
            assert_eq!(msi.take_delivered(), [(1, msg(1))]);
        }
        p.detach().unwrap();
        assert!(vf.mappings().is_empty());
        assert_eq!(vf.open_fds(), 0);
        assert_eq!(r32(&mut p, 0x10), 0x4, "BARs unassigned after detach");
    }
    let c = p.counters();
    assert_eq!((c.attaches, c.detaches, c.resets), (1000, 1000, 2000));
    assert_eq!((c.dma_maps, c.dma_unmaps, c.live_mappings), (2000, 2000, 0));
    assert_eq!(
        c.live_eventfds, 3,
        "the primary's eventfds are its own, for life"
    );
    assert_eq!(vf.resets(), 2000);
    assert_eq!(vf.dma_counts(), (2000, 2000));
    assert_eq!(vf.fd_totals(), (3000, 3000));
}

#[test]
fn a_failed_map_is_rolled_back_and_a_failed_unmap_retried() {
    let Rig { vf, mut p, .. } = rig();
    let mem = memory();
    vf.fail_after(Op::DmaMap, 1, 1);
    let e = p.attach(&mem).unwrap_err();
    assert!(
        matches!(
            e,
            PrimaryError::DmaMap {
                regions: 2,
                mapped: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("after 1 of 2 regions"));
    assert!(vf.mappings().is_empty() && !p.is_attached());
    p.attach(&mem).unwrap();
    vf.fail_next(Op::DmaUnmap, 1);
    let e = p.detach().unwrap_err();
    assert!(matches!(e, PrimaryError::DmaUnmap { remaining: 1, .. }));
    assert!(e.to_string().contains("retry detach"));
    assert_eq!(vf.mappings().len(), 1);
    assert!(matches!(
        p.attach(&mem),
        Err(PrimaryError::AlreadyAttached { mappings: 1, .. })
    ));
    p.detach().unwrap();
    assert!(vf.mappings().is_empty());
    vf.fail_next(Op::Reset, 1);
    assert!(matches!(p.attach(&mem), Err(PrimaryError::Reset { .. })));
    assert!(vf.mappings().is_empty());
    // Dropped while attached: unmapped on the way out.
    p.attach(&mem).unwrap();
    drop(p);
    assert!(vf.mappings().is_empty());
}

#[test]
fn intx_with_resample() {
    let vf = Arc::new(RecordedVf::new(ModelSpec::intel_82599_vf().with_intx()));
    let line = Arc::new(RecordingIntx::new());
    let mut p = VfioPrimaryBuilder::new(
        "hostdev0",
        vf.clone(),
        vf.clone(),
        Arc::new(RecordingMsi::new()),
    )
    .intx(line.clone())
    .page_size(PAGE)
    .build()
    .unwrap();
    assert_eq!(
        p.counters().live_eventfds,
        5,
        "3 MSI-X vectors, INTx trigger and resample"
    );
    assert_eq!(vf.routed(irq::INTX), 0);
    p.attach(&memory()).unwrap();
    assert_eq!(vf.routed(irq::INTX), 1);
    assert!(
        vf.events()
            .contains(&Event::SetResample { index: irq::INTX })
    );
    assert!(vf.signal_irq(irq::INTX, 0));
    p.service_interrupts();
    assert!(line.level());
    assert!(
        !vf.signal_irq(irq::INTX, 0),
        "masked by the device until EOI"
    );
    p.intx_eoi();
    assert!(!line.level());
    assert!(vf.events().contains(&Event::UnmaskIrq { index: irq::INTX }));
    // KVM's resampler instead: the resample eventfd unmasks the device's line.
    assert!(vf.signal_irq(irq::INTX, 0));
    p.service_interrupts();
    p.intx_eventfds().unwrap().1.write(1).unwrap();
    assert!(vf.signal_irq(irq::INTX, 0));
    // MSI-X replaces INTx, and gives it back when disabled.
    assign(&mut p);
    enable_msix(&mut p, &[]);
    assert_eq!((vf.routed(irq::INTX), vf.routed(irq::MSIX)), (0, 3));
    assert!(!line.level());
    w16(&mut p, MSIX + 2, 0);
    assert_eq!((vf.routed(irq::INTX), vf.routed(irq::MSIX)), (1, 0));
    p.detach().unwrap();
    assert_eq!(vf.open_fds(), 0);
}

#[test]
fn msi_is_emulated_with_masking_and_pending_bits() {
    let Rig { vf, msi, mut p } = rig_with(ModelSpec::intel_82599_vf().with_msi(4), true);
    let p = &mut p;
    assert_eq!(r32(p, 0x34) & 0xff, 0x50);
    assert_eq!(
        r32(p, 0x50),
        0x0184_7005,
        "64-bit, maskable, 4 vectors; next MSI-X"
    );
    p.attach(&memory()).unwrap();
    assign(p);
    // Linux's msi_capability_init: message, mask, then enable 4 vectors.
    w32(p, 0x54, 0xfee0_0000);
    w32(p, 0x58, 0);
    w16(p, 0x5c, 0x40);
    w32(p, 0x60, 0b10);
    w16(p, 0x52, 1 | 2 << 4);
    assert_eq!(vf.routed(irq::MSI), 4);
    assert!(vf.signal_irq(irq::MSI, 0));
    p.service_interrupts();
    assert_eq!(msi.take_delivered(), [(0, msg(0))]);
    assert!(vf.signal_irq(irq::MSI, 1));
    p.service_interrupts();
    assert!(msi.delivered().is_empty());
    assert_eq!(p.irqs.msi_pending(), 0b10);
    assert_eq!(r32(p, 0x64), 0b10, "the guest reads the pending bit");
    w32(p, 0x60, 0);
    assert_eq!(msi.take_delivered(), [(1, msg(1))]);
    assert_eq!(r32(p, 0x64), 0);
    // MSI-X wins over MSI.
    enable_msix(p, &[]);
    assert_eq!((vf.routed(irq::MSI), vf.routed(irq::MSIX)), (0, 3));
    p.detach().unwrap();
}

#[test]
fn a_primary_without_a_pair_blocks_migration() {
    assert_eq!(rig().p.migration_blocker(), None);
    let text = rig_with(ModelSpec::intel_82599_vf(), false)
        .p
        .migration_blocker()
        .unwrap();
    assert!(text.starts_with("VFIO device doesn't support migration"));
    assert!(text.contains("'hostdev0'") && text.contains("failover_pair_id"));
}

#[test]
fn broken_devices_are_refused_with_reasons() {
    let mut spec = ModelSpec::intel_82599_vf();
    spec.config[0x74..0x78].copy_from_slice(&0x0000_3ff3u32.to_le_bytes()); // table past BAR 3
    let vf = Arc::new(RecordedVf::new(spec));
    let e = VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf, Arc::new(RecordingMsi::new()))
        .build()
        .unwrap_err();
    assert!(matches!(e, PrimaryError::Bars { .. }));
    let mut spec = ModelSpec::intel_82599_vf();
    spec.config.truncate(64);
    spec.config_wmask.truncate(64);
    let vf = Arc::new(RecordedVf::new(spec));
    let e = VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf, Arc::new(RecordingMsi::new()))
        .build()
        .unwrap_err();
    assert!(matches!(
        e,
        PrimaryError::Config {
            source: config::Error::TooSmall(64),
            ..
        }
    ));
}

#[test]
fn a_memory_map_change_remaps_only_what_changed() {
    let Rig { vf, mut p, .. } = rig();
    let region = |at: u64, size: usize| {
        Arc::new(
            vm_memory::GuestRegionMmap::<()>::from_range(GuestAddress(at), size, None).unwrap(),
        )
    };
    let (low, mid) = (region(0, 0x2_0000), region(0x10_0000, 0x1_0000));
    let mem = GuestMemoryMmap::from_arc_regions(vec![low.clone(), mid]).unwrap();
    // Not attached: nothing to do, nothing mapped.
    p.update_memory(&mem).unwrap();
    assert!(vf.mappings().is_empty());
    p.attach(&mem).unwrap();
    let low_mapping = vf
        .mappings()
        .into_iter()
        .find(|m| m.0 == 0)
        .expect("the low region mapped");
    // Memory hot-plug: the low region stays as it is, the 1 MiB region goes,
    // a 4 MiB one arrives.
    let grown = GuestMemoryMmap::from_arc_regions(vec![low, region(0x40_0000, 0x1_0000)]).unwrap();
    p.update_memory(&grown).unwrap();
    let now = vf.mappings();
    assert_eq!(now.len(), 2);
    assert!(
        now.contains(&low_mapping),
        "an unchanged region is not remapped"
    );
    assert!(now.iter().any(|m| m.0 == 0x40_0000 && m.1 == 0x1_0000));
    assert!(!now.iter().any(|m| m.0 == 0x10_0000));
    let c = p.counters();
    assert_eq!((c.dma_maps, c.dma_unmaps, c.live_mappings), (3, 1, 2));
    p.detach().unwrap();
    assert!(vf.mappings().is_empty());
}

fn rom_rig(policy: RomPolicy) -> Rig {
    let vf = Arc::new(RecordedVf::new(ModelSpec::intel_82599_vf()));
    let msi = Arc::new(RecordingMsi::new());
    let p = VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf.clone(), msi.clone())
        .page_size(PAGE)
        .failover_pair_id("net0")
        .rom(policy)
        .build()
        .unwrap();
    Rig { vf, msi, p }
}

fn rom_error(spec: ModelSpec, policy: RomPolicy, fail_rom_read: bool) -> rom::Error {
    let vf = Arc::new(RecordedVf::new(spec));
    if fail_rom_read {
        // The config space is read first; the ROM second.
        vf.fail_after(Op::RegionRead, 1, 1);
    }
    let msi = Arc::new(RecordingMsi::new());
    let err = VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf, msi)
        .rom(policy)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("hostdev0"), "{err}");
    match err {
        PrimaryError::Rom { source, .. } => source,
        other => panic!("not a ROM error: {other}"),
    }
}

const ROM_AT: u32 = 0xfeb0_0000;

#[test]
fn the_rom_is_hidden_by_default() {
    let Rig { vf, mut p, .. } = rig();
    let p = &mut p;
    assert_eq!(p.rom_size(), None);
    assert_eq!(r32(p, 0x30), 0);
    assert_eq!(w32(p, 0x30, ROM_AT | 1), None);
    assert_eq!(r32(p, 0x30), 0);
    w16(p, COMMAND, COMMAND_MEMORY);
    assert_eq!(p.rom_window(), None);
    assert_eq!(p.rom_generation(), 0);
    let before = p.counters().ignored_bar;
    assert_eq!(bar_r32(p, rom::ROM_BAR, 0), u32::MAX);
    assert_eq!(p.counters().ignored_bar, before + 1);
    assert!(config_writes(&vf).iter().all(|w| w.0 != 0x30));
    assert!(
        vf.events().iter().all(|e| !matches!(
            e,
            Event::RegionRead {
                index: region::ROM,
                ..
            }
        )),
        "a hidden ROM is never read"
    );
}

#[test]
fn the_device_rom_exposed_sizes_moves_enables_and_decodes() {
    let Rig { vf, mut p, .. } = rom_rig(RomPolicy::Device);
    let p = &mut p;
    assert_eq!(p.rom_size(), Some(0x10000));
    // Power-on: disabled at 0, not the host's address.
    assert_ne!(vf.config()[0x30..0x34], [0; 4]);
    assert_eq!(r32(p, 0x30), 0);
    // Sizing: the size mask, enable as written; no BAR move.
    assert_eq!(w32(p, 0x30, u32::MAX), None);
    assert_eq!(r32(p, 0x30), 0xffff_0001);
    w32(p, 0x30, 0xffff_fffe);
    assert_eq!(r32(p, 0x30), 0xffff_0000);
    // Assigned, enabled, but memory decode off: no window, reads all ones.
    w32(p, 0x30, ROM_AT | 0x7fe | 1);
    assert_eq!(r32(p, 0x30), ROM_AT | 1, "bits 10:1 read 0");
    assert_eq!(p.rom_window(), None);
    assert_eq!(bar_r32(p, rom::ROM_BAR, 0), u32::MAX);
    // Memory decode on: the window decodes, the image reads through it.
    let g = p.rom_generation();
    w16(p, COMMAND, COMMAND_MEMORY);
    assert_eq!(
        p.rom_window(),
        Some(RomWindow {
            guest_address: ROM_AT as u64,
            size: 0x10000
        })
    );
    assert_eq!(p.rom_generation(), g + 1);
    let mut sig = [0u8; 2];
    p.read_bar(rom::ROM_BAR, 0, &mut sig);
    assert_eq!(sig, [0x55, 0xaa]);
    assert_eq!(bar_r32(p, rom::ROM_BAR, 0xfffc), 0);
    assert_eq!(p.counters().rom_reads, 2);
    // Reads past the window, or of odd sizes, are all ones and counted.
    let ignored = p.counters().ignored_bar;
    let mut q = [0u8; 8];
    p.read_bar(rom::ROM_BAR, 0xfffc, &mut q);
    assert_eq!(q, [0xff; 8]);
    p.read_bar(rom::ROM_BAR, 0, &mut [0u8; 3]);
    assert_eq!(p.counters().ignored_bar, ignored + 2);
    // Writes to the window are dropped and counted; the image is unchanged.
    bar_w32(p, rom::ROM_BAR, 0, 0);
    assert_eq!(p.counters().rom_writes, 1);
    p.read_bar(rom::ROM_BAR, 0, &mut sig);
    assert_eq!(sig, [0x55, 0xaa]);
    // Relocation: the window follows the register; no BAR move reported.
    assert_eq!(w32(p, 0x30, 0xc010_0001), None);
    assert_eq!(p.rom_window().unwrap().guest_address, 0xc010_0000);
    assert_eq!(p.rom_generation(), g + 2);
    // Disable: the window is gone, reads are all ones again.
    w32(p, 0x30, 0xc010_0000);
    assert_eq!(p.rom_window(), None);
    assert_eq!(bar_r32(p, rom::ROM_BAR, 0), u32::MAX);
    w32(p, 0x30, 0xc010_0001);
    assert!(p.rom_window().is_some());
    // Memory decode off again closes it.
    w16(p, COMMAND, 0);
    assert_eq!(p.rom_window(), None);
    // The BARs are untouched by all this, and the device never saw 0x30.
    assert_eq!((r32(p, 0x10), r32(p, 0x1c)), (0x4, 0x4));
    assert!(config_writes(&vf).iter().all(|w| w.0 != 0x30));
    // The ROM was read once, at build; the window never reaches the device.
    let rom_reads = vf
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::RegionRead {
                    index: region::ROM,
                    ..
                }
            )
        })
        .count();
    assert_eq!(rom_reads, 1);
    // Detach returns the register to power-on.
    w16(p, COMMAND, COMMAND_MEMORY);
    assert!(p.rom_window().is_some());
    p.detach().unwrap();
    assert_eq!(r32(p, 0x30), 0);
    assert_eq!(p.rom_window(), None);
}

#[test]
fn a_supplied_image_is_padded_and_served() {
    let mut image = vec![0x55, 0xaa, 0x06];
    image.extend((0..2997u32).map(|i| i as u8));
    let Rig { vf, mut p, .. } = rom_rig(RomPolicy::Image(image.clone().into()));
    let p = &mut p;
    assert_eq!(p.rom_size(), Some(4096), "3000 bytes padded to 4 KiB");
    w32(p, 0x30, u32::MAX);
    assert_eq!(r32(p, 0x30), 0xffff_f001);
    w32(p, 0x30, 0xfe00_0001);
    w16(p, COMMAND, COMMAND_MEMORY);
    assert_eq!(
        p.rom_window(),
        Some(RomWindow {
            guest_address: 0xfe00_0000,
            size: 4096
        })
    );
    let mut head = [0u8; 4];
    p.read_bar(rom::ROM_BAR, 0, &mut head);
    assert_eq!(head, [0x55, 0xaa, 0x06, 0x00]);
    let mut at = [0u8; 8];
    p.read_bar(rom::ROM_BAR, 2992, &mut at);
    assert_eq!(at[..], image[2992..3000]);
    p.read_bar(rom::ROM_BAR, 3000, &mut at);
    assert_eq!(at, [0xff; 8], "padding");
    assert_eq!(bar_r32(p, rom::ROM_BAR, 4092), u32::MAX);
    // The device's own ROM is not read for a supplied image.
    assert!(vf.events().iter().all(|e| !matches!(
        e,
        Event::RegionRead {
            index: region::ROM,
            ..
        }
    )));
}

#[test]
fn the_pci_bus_routes_the_rom_window_while_it_decodes() {
    let Rig { p, .. } = rom_rig(RomPolicy::Device);
    let mut root = vmm_pci::PciRoot::new();
    root.add(1, 0, vmm_pci::handle(p)).unwrap();
    let bdf = vmm_pci::Bdf::new(0, 1, 0);
    let mut sig = [0u8; 2];
    root.config_write(bdf, 0x30, &(ROM_AT | 1).to_le_bytes());
    assert!(
        !root.mmio_read(ROM_AT as u64, &mut sig),
        "memory decode off"
    );
    root.config_write(bdf, COMMAND, &COMMAND_MEMORY.to_le_bytes());
    assert!(root.mmio_read(ROM_AT as u64, &mut sig));
    assert_eq!(sig, [0x55, 0xaa]);
    assert!(root.mmio_write(ROM_AT as u64 + 0xfffe, &[0; 2]));
    assert!(
        !root.mmio_read(ROM_AT as u64 + 0x1_0000, &mut sig),
        "past the window"
    );
    root.config_write(bdf, 0x30, &ROM_AT.to_le_bytes());
    assert!(!root.mmio_read(ROM_AT as u64, &mut sig), "ROM disabled");
    assert_eq!(sig, [0xff; 2]);
}

#[test]
fn bad_roms_are_refused_with_reasons() {
    let vf = ModelSpec::intel_82599_vf;
    let e = rom_error(vf(), RomPolicy::Image(Vec::new().into()), false);
    assert!(matches!(e, rom::Error::Empty), "{e}");
    let big = vec![0u8; rom::ROM_MAX_SIZE as usize + 1];
    let e = rom_error(vf(), RomPolicy::Image(big.into()), false);
    assert!(
        matches!(e, rom::Error::TooLarge { what: "image", .. }),
        "{e}"
    );
    let mut no_rom = vf();
    no_rom.rom.clear();
    let e = rom_error(no_rom, RomPolicy::Device, false);
    assert!(matches!(e, rom::Error::NoDeviceRom), "{e}");
    assert!(e.to_string().contains("RomPolicy::Hidden"), "{e}");
    let mut huge = vf();
    huge.rom = vec![0; rom::ROM_MAX_SIZE as usize * 2];
    let e = rom_error(huge, RomPolicy::Device, false);
    assert!(
        matches!(e, rom::Error::TooLarge { what: "region", .. }),
        "{e}"
    );
    let e = rom_error(vf(), RomPolicy::Device, true);
    assert!(matches!(e, rom::Error::Read { size: 0x10000, .. }), "{e}");
}

/// Boards differ in the VF BARs' prefetchable bit (the PF's EEPROM decides):
/// the primary shows what the device reports, and handles both alike.
#[test]
fn prefetchable_vf_bars_as_some_boards_report_them() {
    let spec = ModelSpec::intel_82599_vf().with_prefetchable(true);
    assert_eq!(spec.config[0x10] & 0xf, 0xc, "64-bit prefetchable");
    let Rig { mut p, .. } = rig_with(spec, true);
    let p = &mut p;
    assert_eq!((r32(p, 0x10), r32(p, 0x1c)), (0xc, 0xc));
    w32(p, 0x10, u32::MAX);
    assert_eq!(r32(p, 0x10), 0xffff_c00c);
    assign(p);
    let r = p.bar_regions();
    let kinds = (r[0].unwrap().kind, r[3].unwrap().kind);
    assert_eq!(
        kinds,
        (
            BarKind::Memory64 { prefetchable: true },
            BarKind::Memory64 { prefetchable: true }
        )
    );
    let mapped: Vec<_> = p.mmap_ranges().iter().map(|m| m.guest_address).collect();
    assert_eq!(mapped, [BAR0_AT, BAR3_AT + 0x1000, BAR3_AT + 0x3000]);
}
