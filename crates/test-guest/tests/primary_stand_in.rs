//! The failover pair check accepts the project's primary stand-in.
//!
//! Any Ethernet-class PCI function can be a failover primary; QEMU's own
//! failover tests use an emulated NIC. Where there is no VFIO, the demo and the
//! end-to-end tests use a virtio-net function that does not offer STANDBY, with
//! the standby's MAC, as the primary. `vfio_primary::FailoverPair` validates it
//! exactly as it validates a VF: placed behind a hot-plug root port it pairs with
//! the standby; behind a port without hot-plug it is refused with QEMU's text.

use std::sync::{Arc, Mutex};

use pcie_hotplug::{RootPort, RootPortBuilder};
use test_guest::IrqQueue;
use vfio_primary::{BusKind, FailoverPair, Placement, Violation};
use virtio_device::VirtioDevice;
use virtio_device::virtio_bindings::virtio_net::VIRTIO_NET_F_STANDBY;
use virtio_net_standby::testing::{GuestMem, RecordingBackend, TestMemory};
use virtio_net_standby::{StandbyNet, StandbyNetBuilder};
use virtio_pci::{VirtioPciBuilder, VirtioPciDevice};

type Net = StandbyNet<GuestMem, RecordingBackend>;
type Function = VirtioPciDevice<GuestMem, Net>;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc];

/// The stand-in: virtio-net without STANDBY, the standby's MAC, id "hostdev0".
fn stand_in(mem: &TestMemory, irqs: Arc<IrqQueue>) -> Arc<Mutex<Function>> {
    let net: Net = StandbyNetBuilder::new()
        .id("hostdev0")
        .mac(MAC)
        .standby(false)
        .build(vec![RecordingBackend::default()])
        .unwrap();
    let f = VirtioPciBuilder::new()
        .id("hostdev0")
        .build(net, mem.atomic(), irqs)
        .unwrap();
    Arc::new(Mutex::new(f))
}

fn port(name: &str, hotplug: bool, irqs: Arc<IrqQueue>) -> Arc<Mutex<RootPort>> {
    Arc::new(Mutex::new(
        RootPortBuilder::new(name, 2)
            .port_number(2)
            .hotplug(hotplug)
            .build(irqs),
    ))
}

#[test]
fn the_stand_in_pairs_behind_a_hotplug_root_port() {
    let mem = TestMemory::new(1 << 20);
    let irqs = IrqQueue::new();
    let primary = stand_in(&mem, irqs.clone());
    let rp = port("rp-primary", true, irqs);

    let placement = Placement::behind_port("rp-primary", &mut *rp.lock().unwrap()).unwrap();
    assert_eq!(
        placement,
        Placement::new("rp-primary", BusKind::RootPort, true)
    );
    let mut f = primary.lock().unwrap();
    assert_eq!(
        f.device().features() & (1 << VIRTIO_NET_F_STANDBY),
        0,
        "the stand-in does not offer STANDBY"
    );
    let id = f.id().to_owned();
    let pair = FailoverPair::validate(&id, "net1", &mut *f, &placement).unwrap();
    assert_eq!((pair.primary_id(), pair.standby_id()), ("hostdev0", "net1"));
    let h = pair.header();
    assert_eq!((h.vendor_id, h.device_id), (0x1af4, 0x1041));
    assert!(h.is_ethernet() && !h.multifunction);
    assert_eq!(pair.placement().bus, "rp-primary");
}

#[test]
fn the_stand_in_behind_a_port_without_hotplug_is_refused() {
    let mem = TestMemory::new(1 << 20);
    let irqs = IrqQueue::new();
    let primary = stand_in(&mem, irqs.clone());
    let rp = port("rp-cold", false, irqs);

    let placement = Placement::behind_port("rp-cold", &mut *rp.lock().unwrap()).unwrap();
    assert_eq!(
        placement,
        Placement::new("rp-cold", BusKind::RootPort, false)
    );
    let err = FailoverPair::validate(
        "hostdev0",
        "net1",
        &mut *primary.lock().unwrap(),
        &placement,
    )
    .unwrap_err();
    assert_eq!(
        err.as_slice(),
        [Violation::NoHotplug {
            primary: "hostdev0".into(),
            bus: "rp-cold".into()
        }]
    );
    assert!(
        err.to_string()
            .starts_with("device 'hostdev0': Bus 'rp-cold' does not support hotplugging"),
        "{err}"
    );

    // Placed at function 1 of that port's slot as well: both reasons, hot-plug first.
    let err = FailoverPair::validate(
        "hostdev0",
        "net1",
        &mut *primary.lock().unwrap(),
        &placement.with_function(1),
    )
    .unwrap_err();
    assert_eq!(err.len(), 2, "{err}");
    assert!(matches!(err.as_slice()[0], Violation::NoHotplug { .. }));
    assert!(
        err.to_string()
            .contains("failover: primary device must be in its own PCI slot (function 1, not 0)"),
        "{err}"
    );
}
