//! The virtio-pci transport's registers under arbitrary sequences of common
//! configuration, notification, ISR, device configuration, MSI-X and PCI
//! configuration accesses, of any size (1 to 8 bytes) and alignment, to the
//! virtio BAR, the MSI-X BAR, BARs that do not exist and the config space
//! (including the `VIRTIO_PCI_CAP_PCI_CFG` window).
//!
//! Checked after every access: no panic; the device is never activated
//! without `FEATURES_OK` accepted (its acknowledged features are the driver's,
//! and `DRIVER_OK` never shows without `FEATURES_OK`); a reset (status 0)
//! always returns every common configuration register, for every queue, to
//! what a freshly built transport shows, and deactivates the device.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_device::testing::FakeDevice;
use virtio_net_standby::testing::{GuestMem, TestMemory};
use virtio_pci::{
    COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET, MSIX_BAR, NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR, VirtioPciBuilder, VirtioPciDevice,
};
use vmm_pci::PciFunction;
use vmm_pci::testing::{RecordingIntx, RecordingMsi};

type Dev = VirtioPciDevice<GuestMem, FakeDevice>;

const VERSION_1: u64 = 1 << 32;
const OFFER: u64 = VERSION_1 | 1 << 29 | 1 << 28 | 1 << 62 | 1 << 5;
const STATUS: u64 = 20;
const FEATURES_OK: u8 = 8;
const DRIVER_OK: u8 = 4;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A common configuration access.
    Common {
        off: u8,
        size: u8,
        value: u64,
        write: bool,
    },
    /// A notification.
    Notify {
        off: u16,
        size: u8,
        value: u32,
    },
    /// An ISR access (reading clears it).
    Isr {
        off: u8,
        size: u8,
        write: bool,
    },
    /// A device configuration access.
    DevCfg {
        off: u8,
        size: u8,
        value: u64,
        write: bool,
    },
    /// Any BAR, any offset.
    Bar {
        bar: u8,
        off: u32,
        size: u8,
        value: u64,
        write: bool,
    },
    /// A PCI configuration access (any size, any offset).
    Config {
        off: u16,
        size: u8,
        value: u32,
        write: bool,
    },
    /// The driver's usual moves, so the paths past them run.
    Status(u8),
    DriverFeatures {
        high: bool,
        value: u32,
    },
    QueueSetup {
        queue: u16,
        size: u16,
        enable: bool,
        addr: u32,
    },
    /// Writes 0 to the status register.
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    intx: bool,
    requiring: u64,
    ops: Vec<Op>,
}

fn build(intx: bool, requiring: u64) -> Dev {
    let mem = TestMemory::new(64 << 10);
    let fake = FakeDevice::new(1, vec![256, 256, 64], OFFER)
        .requiring(VERSION_1 | (requiring & OFFER))
        .with_config(vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
    let mut b = VirtioPciBuilder::new().id("net0");
    if intx {
        b = b.intx(Arc::new(RecordingIntx::new()));
    }
    b.build(fake, mem.atomic(), Arc::new(RecordingMsi::new()))
        .expect("transport")
}

fn size(s: u8) -> usize {
    1 + usize::from(s % 8)
}

fn rd(d: &mut Dev, bar: u8, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.read_bar(bar, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr(d: &mut Dev, bar: u8, off: u64, v: u64, len: usize) {
    d.write_bar(bar, off, &v.to_le_bytes()[..len]);
}

/// Every common configuration register, for every queue (and one past them).
fn common_dump(d: &mut Dev) -> Vec<u64> {
    let c = COMMON_CFG_OFFSET;
    let mut out = Vec::new();
    for (off, len) in [(0, 4), (8, 4), (12, 4), (16, 2), (18, 2), (20, 1), (22, 2)] {
        out.push(rd(d, VIRTIO_BAR, c + off, len));
    }
    for sel in [1u64, 0, 3] {
        wr(d, VIRTIO_BAR, c + 8, sel & 1, 4);
        out.push(rd(d, VIRTIO_BAR, c + 12, 4));
        wr(d, VIRTIO_BAR, c, sel & 1, 4);
        out.push(rd(d, VIRTIO_BAR, c + 4, 4));
    }
    for q in 0..4u64 {
        wr(d, VIRTIO_BAR, c + 22, q, 2);
        for (off, len) in [
            (24, 2),
            (26, 2),
            (28, 2),
            (30, 2),
            (32, 8),
            (40, 8),
            (48, 8),
        ] {
            out.push(rd(d, VIRTIO_BAR, c + off, len));
        }
    }
    // Back to what a fresh transport has selected.
    wr(d, VIRTIO_BAR, c + 22, 0, 2);
    wr(d, VIRTIO_BAR, c + 8, 0, 4);
    wr(d, VIRTIO_BAR, c, 0, 4);
    out
}

fuzz_target!(|input: Input| {
    let mut d = build(input.intx, input.requiring);
    let fresh = common_dump(&mut build(input.intx, input.requiring));
    let c = COMMON_CFG_OFFSET;
    for op in input.ops.iter().take(1000) {
        let activations = d.device().activations;
        let status_before = d.status();
        match op {
            Op::Common {
                off,
                size: s,
                value,
                write,
            } => {
                let off = c + u64::from(*off % 64);
                if *write {
                    wr(&mut d, VIRTIO_BAR, off, *value, size(*s));
                } else {
                    rd(&mut d, VIRTIO_BAR, off, size(*s));
                }
            }
            Op::Notify {
                off,
                size: s,
                value,
            } => {
                let off =
                    NOTIFY_CFG_OFFSET + u64::from(*off) % (8 * u64::from(NOTIFY_OFF_MULTIPLIER));
                wr(&mut d, VIRTIO_BAR, off, u64::from(*value), size(*s));
            }
            Op::Isr {
                off,
                size: s,
                write,
            } => {
                let off = ISR_CFG_OFFSET + u64::from(*off % 8);
                if *write {
                    wr(&mut d, VIRTIO_BAR, off, 0xff, size(*s));
                } else {
                    rd(&mut d, VIRTIO_BAR, off, size(*s));
                }
            }
            Op::DevCfg {
                off,
                size: s,
                value,
                write,
            } => {
                let off = DEVICE_CFG_OFFSET + u64::from(*off % 32);
                if *write {
                    wr(&mut d, VIRTIO_BAR, off, *value, size(*s));
                } else {
                    rd(&mut d, VIRTIO_BAR, off, size(*s));
                }
            }
            Op::Bar {
                bar,
                off,
                size: s,
                value,
                write,
            } => {
                let bar = match bar % 4 {
                    0 => VIRTIO_BAR,
                    1 => MSIX_BAR,
                    _ => bar % 8,
                };
                let off = u64::from(*off);
                if *write {
                    wr(&mut d, bar, off, *value, size(*s));
                } else {
                    rd(&mut d, bar, off, size(*s));
                }
            }
            Op::Config {
                off,
                size: s,
                value,
                write,
            } => {
                let off = off % 0x1100;
                let len = size(*s);
                if *write {
                    d.write_config(off, &u64::from(*value).to_le_bytes()[..len]);
                } else {
                    let mut b = [0u8; 8];
                    d.read_config(off, &mut b[..len]);
                }
            }
            Op::Status(s) => wr(&mut d, VIRTIO_BAR, c + STATUS, u64::from(*s), 1),
            Op::DriverFeatures { high, value } => {
                wr(&mut d, VIRTIO_BAR, c + 8, u64::from(*high), 4);
                wr(&mut d, VIRTIO_BAR, c + 12, u64::from(*value), 4);
            }
            Op::QueueSetup {
                queue,
                size: qs,
                enable,
                addr,
            } => {
                wr(&mut d, VIRTIO_BAR, c + 22, u64::from(queue % 4), 2);
                wr(&mut d, VIRTIO_BAR, c + 24, u64::from(*qs), 2);
                for (k, o) in [32u64, 40, 48].into_iter().enumerate() {
                    wr(
                        &mut d,
                        VIRTIO_BAR,
                        c + o,
                        u64::from(*addr) + 0x1000 * k as u64,
                        8,
                    );
                }
                wr(&mut d, VIRTIO_BAR, c + 28, u64::from(*enable), 2);
            }
            Op::Reset => wr(&mut d, VIRTIO_BAR, c + STATUS, 0, 1),
        }
        let status = d.status();
        let fake = d.device();
        // No activation without FEATURES_OK accepted.
        if fake.activations > activations {
            assert!(
                status & FEATURES_OK != 0 && status & DRIVER_OK != 0,
                "activated with status {status:#x} after {op:?}"
            );
            assert_eq!(
                fake.acked,
                Some(d.driver_features()),
                "activated with other features than the driver's"
            );
        }
        if fake.active {
            assert!(fake.acked.is_some(), "active without acknowledged features");
        }
        assert!(
            status & DRIVER_OK == 0 || status & FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {status:#x}"
        );
        if status & FEATURES_OK != 0 {
            assert_eq!(
                fake.acked,
                Some(d.driver_features()),
                "FEATURES_OK shown for features the device did not accept"
            );
            assert_eq!(
                d.driver_features() & VERSION_1,
                VERSION_1,
                "FEATURES_OK without a required feature"
            );
        }
        // A reset returns to the fresh state.
        if status == 0 && (status_before != 0 || matches!(op, Op::Reset)) {
            assert!(!d.device().active, "still active after a reset");
            let now = common_dump(&mut d);
            assert_eq!(
                now, fresh,
                "common configuration after a reset differs from a fresh transport's"
            );
        }
    }
});
