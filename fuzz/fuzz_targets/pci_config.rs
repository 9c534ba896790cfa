//! Arbitrary configuration reads and writes (any offset, any size, any
//! alignment) on the hot-plug root port, the virtio-pci function and the VFIO
//! primary over the recorded 82599 VF model.
//!
//! Checked after every access: no panic; the identity (IDs, class, header
//! type, subsystem, interrupt pin) and the capability lists never change;
//! a write never sets a Status bit; for the emulated functions every byte
//! follows its masks (read-only bits keep their value, writable bits take the
//! written one, write-1-to-clear bits clear where 1 is written unless the
//! function raises that event again, only dynamic bits and events change by
//! themselves); every BAR keeps its flag bits
//! and holds no address bit below its size, sizing it (all ones) reads the
//! same mask as at the start, and the BARs the function reports decoding agree
//! with its registers.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pcie_hotplug::{RootPort, RootPortBuilder};
use vfio_primary::testing::RecordedVf;
use vfio_primary::{RomPolicy, VfioPrimary, VfioPrimaryBuilder};
use virtio_device::testing::FakeDevice;
use virtio_net_standby::testing::{GuestMem, TestMemory};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};
use vmm_pci::testing::RecordingMsi;
use vmm_pci::{ConfigSpace, PciFunction};

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        off: u16,
        len: u8,
    },
    Write {
        off: u16,
        len: u8,
        value: u32,
    },
    /// A dword write at a register the function is known for (BARs, command,
    /// capability registers), so the fuzzer reaches them often.
    Reg {
        which: u8,
        value: u32,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    function: u8,
    ops: Vec<Op>,
}

enum Func {
    Port(Box<RootPort>),
    Virtio(Box<VirtioPciDevice<GuestMem, FakeDevice>>),
    Vfio(Box<VfioPrimary>),
}

impl Func {
    fn f(&mut self) -> &mut dyn PciFunction {
        match self {
            Func::Port(p) => &mut **p,
            Func::Virtio(v) => &mut **v,
            Func::Vfio(v) => &mut **v,
        }
    }

    fn space(&self) -> Option<&ConfigSpace> {
        match self {
            Func::Port(p) => Some(p.config()),
            Func::Virtio(v) => Some(v.config()),
            Func::Vfio(_) => None,
        }
    }

    /// Bits the masks do not describe: `(byte offset, bits)`. The root port's
    /// Electromechanical Interlock Control is writable but always reads 0 (a 1
    /// toggles the interlock).
    fn exempt(&self) -> Vec<(usize, u8)> {
        match self {
            Func::Port(p) => vec![(usize::from(p.pcie_cap_offset()) + 0x19, 0x08)],
            _ => Vec::new(),
        }
    }

    fn bars(&self) -> usize {
        if matches!(self, Func::Port(_)) { 2 } else { 6 }
    }
}

fn build(which: u8) -> Func {
    match which % 4 {
        0 => Func::Port(Box::new(
            RootPortBuilder::new("rp0", 1)
                .surprise(which & 4 != 0)
                .build(Arc::new(RecordingMsi::new())),
        )),
        1 => {
            let mem = TestMemory::new(64 << 10);
            let fake = FakeDevice::new(1, vec![256; 3], 1 << 32);
            Func::Virtio(Box::new(
                VirtioPciBuilder::new()
                    .build(fake, mem.atomic(), Arc::new(RecordingMsi::new()))
                    .expect("virtio"),
            ))
        }
        n => {
            // 3: the expansion ROM exposed (the model's own), else hidden.
            let rom = if n == 3 {
                RomPolicy::Device
            } else {
                RomPolicy::Hidden
            };
            let vf = Arc::new(RecordedVf::intel_82599_vf());
            Func::Vfio(Box::new(
                VfioPrimaryBuilder::new("hostdev0", vf.clone(), vf, Arc::new(RecordingMsi::new()))
                    .page_size(0x1000)
                    .failover_pair_id("net0")
                    .rom(rom)
                    .build()
                    .expect("primary"),
            ))
        }
    }
}

fn r32(f: &mut dyn PciFunction, off: u16) -> u32 {
    let mut b = [0u8; 4];
    f.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(f: &mut dyn PciFunction, off: u16, v: u32) {
    f.write_config(off, &v.to_le_bytes());
}

/// `(offset, id, next)` of every capability, then every extended one.
fn caps(f: &mut dyn PciFunction) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut p = (r32(f, 0x34) & 0xfc) as u16;
    for _ in 0..64 {
        if p == 0 {
            break;
        }
        let h = r32(f, p) & 0xffff;
        out.push((p, h));
        p = ((h >> 8) & 0xfc) as u16;
    }
    let mut p = 0x100u16;
    for _ in 0..512 {
        let h = r32(f, p);
        if h == 0 || h == u32::MAX {
            break;
        }
        out.push((p, h & 0xfff0_ffff));
        p = ((h >> 20) & 0xffc) as u16;
        if p < 0x100 {
            break;
        }
    }
    out
}

/// The read-only identity: IDs, class and revision, header type, subsystem,
/// capability pointer, interrupt pin.
fn identity(f: &mut dyn PciFunction, bridge: bool) -> Vec<u32> {
    let mut v = vec![
        r32(f, 0),
        r32(f, 8),
        (r32(f, 0xc) >> 16) & 0x7f,
        r32(f, 0x34) & 0xff,
    ];
    v.push((r32(f, 0x3c) >> 8) & 0xff);
    if !bridge {
        v.push(r32(f, 0x2c));
    }
    v
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    flags: u32,
    mask_lo: u32,
    /// The upper dword's mask of a 64-bit BAR.
    mask_hi: Option<u32>,
}

/// Sizes every BAR the way an OS does, then puts the registers back.
fn learn_bars(f: &mut dyn PciFunction, n: usize) -> Vec<Option<Bar>> {
    let mut out = vec![None; n];
    let mut i = 0;
    while i < n {
        let off = 0x10 + 4 * i as u16;
        let old = r32(f, off);
        w32(f, off, u32::MAX);
        let pat = r32(f, off);
        w32(f, off, old);
        if pat == 0 {
            i += 1;
            continue;
        }
        let io = pat & 1 != 0;
        let flags = if io { pat & 0x3 } else { pat & 0xf };
        let mut bar = Bar {
            flags,
            mask_lo: pat & !flags,
            mask_hi: None,
        };
        if !io && flags & 0x6 == 0x4 && i + 1 < n {
            let old = r32(f, off + 4);
            w32(f, off + 4, u32::MAX);
            bar.mask_hi = Some(r32(f, off + 4));
            w32(f, off + 4, old);
            out[i] = Some(bar);
            i += 2;
            continue;
        }
        out[i] = Some(bar);
        i += 1;
    }
    out
}

fn bar_size(b: &Bar) -> u64 {
    match b.mask_hi {
        Some(h) => (!(u64::from(b.mask_lo) | u64::from(h) << 32)).wrapping_add(1),
        None => u64::from((!b.mask_lo).wrapping_add(1)),
    }
}

fn check_bars(func: &mut Func, bars: &[Option<Bar>]) {
    let f = func.f();
    for (i, b) in bars.iter().enumerate() {
        let Some(b) = b else { continue };
        let off = 0x10 + 4 * i as u16;
        let v = r32(f, off);
        let flag_mask = if b.flags & 1 != 0 { 0x3 } else { 0xf };
        assert_eq!(v & flag_mask, b.flags, "BAR {i} flag bits changed: {v:#x}");
        assert_eq!(
            v & !flag_mask & !b.mask_lo,
            0,
            "BAR {i} holds address bits below its size: {v:#x} (mask {:#x})",
            b.mask_lo
        );
        if let Some(mh) = b.mask_hi {
            let h = r32(f, off + 4);
            assert_eq!(
                h & !mh,
                0,
                "BAR {i} upper dword {h:#x} outside its mask {mh:#x}"
            );
        }
    }
    // An expansion ROM window decodes only where the register says, enabled,
    // aligned to its size, and the register never holds bits 10:1.
    if !matches!(func, Func::Port(_)) {
        let f = func.f();
        let reg = r32(f, 0x30);
        assert_eq!(reg & 0x7fe, 0, "ROM register {reg:#x} holds bits 10:1");
        if let Some(r) = f.rom_region() {
            assert_eq!(r.index, vmm_pci::ROM_INDEX);
            assert!(
                r.size.is_power_of_two() && r.size >= 2048,
                "ROM size {:#x}",
                r.size
            );
            assert_eq!(
                reg & 1,
                1,
                "the ROM decodes at {:#x} while disabled",
                r.address
            );
            assert_eq!(
                r.address,
                u64::from(reg & 0xffff_f800),
                "ROM window vs register {reg:#x}"
            );
            assert_eq!(
                r.address % r.size,
                0,
                "ROM window {:#x} not aligned to {:#x}",
                r.address,
                r.size
            );
            assert_ne!(r.address, 0, "a ROM window at 0");
        }
    }
    let f = func.f();
    for r in f.bar_regions().iter().flatten() {
        let Some(Some(b)) = bars.get(usize::from(r.index)) else {
            panic!("BAR {} decodes but did not size", r.index);
        };
        let off = 0x10 + 4 * u16::from(r.index);
        let flag_mask: u32 = if b.flags & 1 != 0 { 0x3 } else { 0xf };
        let mut addr = u64::from(r32(f, off) & !flag_mask);
        if b.mask_hi.is_some() {
            addr |= u64::from(r32(f, off + 4)) << 32;
        }
        assert_eq!(
            r.address, addr,
            "BAR {} decodes at {:#x} but reads {addr:#x}",
            r.index, r.address
        );
        assert!(
            r.size.is_power_of_two(),
            "BAR {} size {:#x}",
            r.index,
            r.size
        );
        let sized = bar_size(b);
        if b.flags & 1 == 0 {
            assert_eq!(
                r.size, sized,
                "BAR {} decodes {:#x} bytes but sizes as {sized:#x}",
                r.index, r.size
            );
        }
    }
}

/// The masks of the byte at `o`: (writable, write-1-to-clear, dynamic).
fn masks(cs: &ConfigSpace, o: u16) -> (u8, u8, u8) {
    let w = o & !1;
    let sh = 8 * (o & 1);
    (
        (cs.wmask_u16(w) >> sh) as u8,
        (cs.w1c_u16(w) >> sh) as u8,
        (cs.dynamic_u16(w) >> sh) as u8,
    )
}

fn raw(cs: &ConfigSpace) -> Vec<u8> {
    (0..cs.size()).map(|o| cs.get_u8(o)).collect()
}

fn access_ok(off: u16, len: usize, size: usize) -> bool {
    matches!(len, 1 | 2 | 4) && (off as usize & 3) + len <= 4 && off as usize + len <= size
}

fuzz_target!(|input: Input| {
    let mut func = build(input.function);
    let bridge = matches!(func, Func::Port(_));
    let id0 = identity(func.f(), bridge);
    let caps0 = caps(func.f());
    let nbars = func.bars();
    let bars = learn_bars(func.f(), nbars);
    let size = func.space().map_or(4096, |cs| usize::from(cs.size()));
    let exempt = func.exempt();
    for op in input.ops.iter().take(1000) {
        let (off, len, value) = match op {
            Op::Read { off, len } => {
                let len = 1 + usize::from(len % 8);
                let mut b = [0u8; 8];
                func.f().read_config(off % 0x1100, &mut b[..len]);
                check_bars(&mut func, &bars);
                continue;
            }
            Op::Write { off, len, value } => (off % 0x1100, 1 + usize::from(len % 4), *value),
            Op::Reg { which, value } => {
                let regs: Vec<u16> = (0..6u16)
                    .map(|i| 0x10 + 4 * i)
                    .chain([0x04, 0x18, 0x1c, 0x20, 0x24, 0x30, 0x3c])
                    .chain(
                        caps0
                            .iter()
                            .flat_map(|(o, _)| [o + 0, o + 4, o + 8, o + 0xc, o + 0x10, o + 0x18]),
                    )
                    .collect();
                (regs[usize::from(*which) % regs.len()], 4, *value)
            }
        };
        let data = &value.to_le_bytes()[..len];
        let before = func.space().map(raw);
        let status0 = r32(func.f(), 4) >> 16;
        let masks0: Option<Vec<(u8, u8, u8)>> = func
            .space()
            .map(|cs| (0..cs.size()).map(|o| masks(cs, o)).collect());
        func.f().write_config(off, data);
        // A write never sets a Status bit (the interrupt status is the device's).
        let status1 = r32(func.f(), 4) >> 16;
        assert_eq!(
            status1 & !status0 & !0x8,
            0,
            "writing {data:x?} at {off:#x} set Status bits {status0:#x} -> {status1:#x}"
        );
        if let (Some(before), Some(masks0)) = (before, masks0) {
            let after = raw(func.space().expect("space"));
            let ok = access_ok(off, len, size);
            for o in 0..before.len() {
                let (wm, c, dynamic) = masks0[o];
                let (old, new) = (before[o], after[o]);
                let written = ok && (usize::from(off)..usize::from(off) + len).contains(&o);
                let expect = if written {
                    let v = data[o - usize::from(off)];
                    ((old & !wm) | (v & wm)) & !(v & c)
                } else {
                    old
                };
                // Write-1-to-clear bits are events: the function may set them
                // (a command completed), only the guest clears them.
                let events = c & new;
                let exempt: u8 = exempt
                    .iter()
                    .filter(|(b, _)| *b == o)
                    .map(|(_, m)| *m)
                    .fold(0, |a, m| a | m);
                assert_eq!(
                    (new ^ expect) & !dynamic & !events & !exempt,
                    0,
                    "config byte {o:#x}: {old:#x} -> {new:#x}, expected {expect:#x} (write {data:x?} at {off:#x}, wmask {wm:#x}, w1c {c:#x}, dynamic {dynamic:#x})"
                );
            }
        }
        assert_eq!(
            identity(func.f(), bridge),
            id0,
            "the identity changed after writing {data:x?} at {off:#x}"
        );
        assert_eq!(
            caps(func.f()),
            caps0,
            "the capability list changed after writing {data:x?} at {off:#x}"
        );
        check_bars(&mut func, &bars);
    }
    // Sizing at the end reads the masks of the start.
    assert_eq!(
        learn_bars(func.f(), nbars)
            .iter()
            .map(|b| b.map(|b| (b.flags, b.mask_lo, b.mask_hi)))
            .collect::<Vec<_>>(),
        bars.iter()
            .map(|b| b.map(|b| (b.flags, b.mask_lo, b.mask_hi)))
            .collect::<Vec<_>>(),
        "BAR sizing changed"
    );
});
