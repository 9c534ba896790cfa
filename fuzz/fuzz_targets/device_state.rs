//! Arbitrary bytes as the saved state of every type with the state contract:
//! the net device (`NetState`), the virtio-pci transport with the net device
//! behind it (`VirtioPciState<NetState>`), a config space, MSI-X, MSI and the
//! hot-plug root port. Raw streams, framed bodies, and valid states with
//! edited bodies (framed with a correct CRC, so the field checks run).
//!
//! Checked (`fuzz_rigs::state::check`): decoding and restoring never panic;
//! what decodes re-encodes to the same state; a restore is refused with a
//! message, or yields a device whose saved state restores into a twin and
//! saves identically.

#![no_main]

use std::sync::Arc;

use device_state::Persist;
use fuzz_rigs::state::{Bytes, check};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pcie_hotplug::{RootPort, RootPortBuilder};
use virtio_net_standby::features::{DEFAULT_OFFER, Features};
use virtio_net_standby::testing::{GuestDriver, GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};
use vmm_pci::testing::RecordingMsi;
use vmm_pci::{BarKind, ClassCode, ConfigSpace, HeaderType, Msi, Msix, PciIds};

type Net = StandbyNet<GuestMem, RecordingBackend>;

#[derive(Arbitrary, Debug)]
enum Input {
    Net(Bytes),
    Transport(Bytes),
    Config(Bytes),
    Msix(Bytes),
    Msi(Bytes),
    RootPort(Bytes),
}

fn net() -> Net {
    StandbyNetBuilder::new()
        .queue_pairs(2)
        .queue_size(64)
        .build(vec![
            RecordingBackend::default(),
            RecordingBackend::default(),
        ])
        .expect("net device")
}

/// A net device's state after a guest brought it up with everything offered.
fn net_state() -> <Net as Persist>::State {
    let mut d = net();
    let mem = TestMemory::new(1 << 20);
    let mut g = GuestDriver::bring_up(&mut d, &mem, Features::from_bits(DEFAULT_OFFER.bits()), 16)
        .expect("bring up");
    g.post_rx(0, 4);
    d.save().expect("save")
}

fn transport() -> VirtioPciDevice<GuestMem, Net> {
    let mem = TestMemory::new(64 << 10);
    VirtioPciBuilder::new()
        .id("net0")
        .build(net(), mem.atomic(), Arc::new(RecordingMsi::new()))
        .expect("transport")
}

fn space() -> ConfigSpace {
    let ids = PciIds {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        revision: 1,
        class: ClassCode::ETHERNET,
    };
    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
    cs.add_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .expect("bar 0");
    cs.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x4000)
        .expect("bar 2");
    cs
}

fn msix() -> Msix {
    let mut cs = space();
    Msix::add(&mut cs, 8, 0, 0, 0, 0x800).expect("msix")
}

fn msi() -> Msi {
    let mut cs = space();
    Msi::add(&mut cs, 4).expect("msi")
}

fn port() -> RootPort {
    RootPortBuilder::new("rp0", 1)
        .surprise(true)
        .build(Arc::new(RecordingMsi::new()))
}

fuzz_target!(|input: Input| {
    match &input {
        Input::Net(b) => check(net, &net_state(), b),
        Input::Transport(b) => {
            let valid = transport().save().expect("save");
            check(transport, &valid, b)
        }
        Input::Config(b) => check(space, &space().save().expect("save"), b),
        Input::Msix(b) => check(msix, &msix().save().expect("save"), b),
        Input::Msi(b) => check(msi, &msi().save().expect("save"), b),
        Input::RootPort(b) => check(port, &port().save().expect("save"), b),
    }
});
