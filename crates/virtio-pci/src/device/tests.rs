//! Register-level tests of the transport. The Linux-like probe sequence over a
//! bus is in the `test-guest` crate's scenarios.

use std::sync::Mutex;

use virtio_device::testing::{ActivatedQueue, FakeDevice};
use virtio_device::virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_device::virtio_bindings::virtio_net::VIRTIO_NET_F_STANDBY;
use virtio_device::{FeaturesAcked, VirtioInterruptType};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_pci::PciFunction;
use vmm_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vmm_pci::msix::MSIX_CTRL_ENABLE;
use vmm_pci::testing::{RecordingIntx, RecordingMsi};

use super::*;
use crate::caps::*;
use crate::common::*;
use crate::state::VirtioPciState;
use virtio_device::status::{
    ACKNOWLEDGE as STATUS_ACKNOWLEDGE, DRIVER as STATUS_DRIVER, DRIVER_OK as STATUS_DRIVER_OK,
    FEATURES_OK as STATUS_FEATURES_OK,
};
use virtio_device::testing::FakeState;

type Mem = GuestMemoryMmap<()>;
type Dev = VirtioPciDevice<Mem, FakeDevice>;

/// What the fake net device offers: VERSION_1, EVENT_IDX and STANDBY.
const OFFER: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << 29 | 1 << VIRTIO_NET_F_STANDBY;

fn dev_with(intx: Option<Arc<dyn IntxSink>>) -> (Dev, Arc<RecordingMsi>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // A net-typed device with two queues and a control queue, refusing sets
    // without VERSION_1 as a modern device does.
    let fake = FakeDevice::new(1, vec![256; 3], OFFER)
        .requiring(1 << VIRTIO_F_VERSION_1)
        .with_config(vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
    let msis = Arc::new(RecordingMsi::new());
    let mut b = VirtioPciBuilder::new().id("net1");
    if let Some(line) = intx {
        b = b.intx(line);
    }
    let d = b
        .build(fake, GuestMemoryAtomic::new(mem), msis.clone())
        .unwrap();
    (d, msis)
}

fn dev() -> (Dev, Arc<RecordingMsi>) {
    dev_with(None)
}

fn rc(d: &mut Dev, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.read_bar(VIRTIO_BAR, COMMON_CFG_OFFSET + off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wc(d: &mut Dev, off: u64, v: u64, len: usize) {
    d.write_bar(VIRTIO_BAR, COMMON_CFG_OFFSET + off, &v.to_le_bytes()[..len]);
}

fn features(d: &mut Dev) -> u64 {
    wc(d, DEVICE_FEATURE_SELECT as u64, 0, 4);
    let lo = rc(d, DEVICE_FEATURE as u64, 4);
    wc(d, DEVICE_FEATURE_SELECT as u64, 1, 4);
    lo | rc(d, DEVICE_FEATURE as u64, 4) << 32
}

fn set_driver_features(d: &mut Dev, f: u64) {
    wc(d, DRIVER_FEATURE_SELECT as u64, 0, 4);
    wc(d, DRIVER_FEATURE as u64, f & 0xffff_ffff, 4);
    wc(d, DRIVER_FEATURE_SELECT as u64, 1, 4);
    wc(d, DRIVER_FEATURE as u64, f >> 32, 4);
}

fn status(d: &mut Dev) -> u8 {
    rc(d, DEVICE_STATUS as u64, 1) as u8
}

#[test]
fn identity_capabilities_and_bars() {
    let (mut d, _) = dev();
    let cs = d.config();
    assert_eq!(cs.get_u32(0), 0x1041_1af4);
    assert_eq!(cs.get_u32(0x08), 0x0200_0001);
    assert_eq!(cs.get_u32(0x2c), 0x1100_1af4);
    assert!(cs.find_capability(vmm_pci::config::CAP_ID_PCIE).is_some());
    // The vendor capabilities, in order, with their BAR windows.
    let mut found = Vec::new();
    let mut p = cs.get_u8(0x34) as u16;
    while p != 0 {
        if cs.get_u8(p) == vmm_pci::config::CAP_ID_VENDOR {
            found.push((
                cs.get_u8(p + 3),
                cs.get_u8(p + 4),
                cs.get_u32(p + 8),
                cs.get_u32(p + 12),
            ));
            if cs.get_u8(p + 3) == VIRTIO_PCI_CAP_NOTIFY_CFG {
                assert_eq!(cs.get_u32(p + 16), NOTIFY_OFF_MULTIPLIER);
            }
        }
        p = cs.get_u8(p + 1) as u16;
    }
    assert_eq!(
        found,
        [
            (VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x38),
            (VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 1),
            (VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 12),
            (VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0),
        ]
    );
    let msix = cs.find_capability(vmm_pci::config::CAP_ID_MSIX).unwrap();
    assert_eq!(cs.get_u16(msix + 2) & 0x7ff, 3, "config + 3 queues");
    assert_eq!(d.config().bar_size(1), Some(0x1000));
    assert_eq!(d.config().bar_size(4), Some(0x4000));
    assert_eq!(rc(&mut d, NUM_QUEUES as u64, 2), 3);
}

#[test]
fn standby_is_word_1_bit_30() {
    let (mut d, _) = dev();
    let f = features(&mut d);
    wc(&mut d, DEVICE_FEATURE_SELECT as u64, 1, 4);
    assert_ne!(rc(&mut d, DEVICE_FEATURE as u64, 4) & 1 << 30, 0);
    assert_eq!(f, OFFER);
    wc(&mut d, DEVICE_FEATURE_SELECT as u64, 2, 4);
    assert_eq!(rc(&mut d, DEVICE_FEATURE as u64, 4), 0);
}

#[test]
fn features_ok_reads_back_clear_when_refused() {
    let (mut d, _) = dev();
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64,
        1,
    );
    // STANDBY without VERSION_1 is refused by the device.
    set_driver_features(&mut d, 1 << 62);
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
        1,
    );
    assert_eq!(status(&mut d), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    assert_eq!(d.counters().features_refused, 1);
    // DRIVER_OK without FEATURES_OK is ignored.
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK) as u64,
        1,
    );
    assert_eq!(status(&mut d), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    let f = features(&mut d);
    set_driver_features(&mut d, f);
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
        1,
    );
    assert_eq!(
        status(&mut d),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
    assert_eq!(d.device().acked, Some(f));
    // Driver features are frozen once accepted; status bits cannot be cleared.
    set_driver_features(&mut d, 0);
    assert_eq!(d.driver_features(), f);
    wc(&mut d, DEVICE_STATUS as u64, STATUS_ACKNOWLEDGE as u64, 1);
    assert_eq!(
        status(&mut d),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
}

fn setup_queue(d: &mut Dev, q: u16, vector: u16) {
    wc(d, QUEUE_SELECT as u64, q as u64, 2);
    wc(d, QUEUE_SIZE as u64, 64, 2);
    wc(d, QUEUE_MSIX_VECTOR as u64, vector as u64, 2);
    let base = 0x10000 * (q as u64 + 1);
    wc(d, QUEUE_DESC as u64, base, 4);
    wc(d, QUEUE_DESC as u64 + 4, 0, 4);
    wc(d, QUEUE_DRIVER as u64, base + 0x1000, 8);
    wc(d, QUEUE_DEVICE as u64, base + 0x2000, 8);
    wc(d, QUEUE_ENABLE as u64, 1, 2);
}

#[test]
fn driver_ok_activates_and_zero_resets_everything() {
    let (mut d, msis) = dev();
    // MSI-X on, bus master on, vectors unmasked.
    d.write_config(
        COMMAND,
        &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
    );
    let msix = d
        .config()
        .find_capability(vmm_pci::config::CAP_ID_MSIX)
        .unwrap();
    d.write_config(msix + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
    for v in 0..4u64 {
        d.write_bar(MSIX_BAR, v * 16, &0xfee0_0000u64.to_le_bytes());
        d.write_bar(MSIX_BAR, v * 16 + 12, &0u32.to_le_bytes());
    }
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64,
        1,
    );
    let f = features(&mut d);
    set_driver_features(&mut d, f);
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
        1,
    );
    wc(&mut d, CONFIG_MSIX_VECTOR as u64, 0, 2);
    assert_eq!(rc(&mut d, CONFIG_MSIX_VECTOR as u64, 2), 0);
    // A vector past the table reads back NO_VECTOR (the driver then falls back).
    wc(&mut d, QUEUE_SELECT as u64, 0, 2);
    wc(&mut d, QUEUE_MSIX_VECTOR as u64, 9, 2);
    assert_eq!(rc(&mut d, QUEUE_MSIX_VECTOR as u64, 2), NO_VECTOR as u64);
    // Invalid sizes are refused; the maximum stays.
    wc(&mut d, QUEUE_SIZE as u64, 100, 2);
    assert_eq!(rc(&mut d, QUEUE_SIZE as u64, 2), 256);
    for q in 0..3 {
        setup_queue(&mut d, q, q + 1);
    }
    assert_eq!(rc(&mut d, QUEUE_DRIVER as u64, 8), 0x31000);
    assert_eq!(rc(&mut d, QUEUE_NOTIFY_OFF as u64, 2), 2);
    // Enabled queues are frozen.
    wc(&mut d, QUEUE_SIZE as u64, 32, 2);
    assert_eq!(rc(&mut d, QUEUE_SIZE as u64, 2), 64);
    wc(&mut d, DEVICE_STATUS as u64, 0xf, 1);
    assert_eq!(status(&mut d), 0xf);
    assert!(d.device().active);
    // The device got the queues as the driver set them up, with their kicks.
    let q1 = d.device().queues[1];
    assert_eq!(d.device().queues.len(), 3);
    assert_eq!(
        q1,
        ActivatedQueue {
            index: 1,
            size: 64,
            desc: 0x20000,
            avail: 0x21000,
            used: 0x22000,
            event_idx: true,
            has_kick: true,
        }
    );
    // A config change: config interrupt on vector 0 and a new generation.
    let g = rc(&mut d, CONFIG_GENERATION as u64, 1);
    assert!(d.device().raise(VirtioInterruptType::Config));
    assert_eq!(rc(&mut d, CONFIG_GENERATION as u64, 1), g + 1);
    assert_eq!(msis.delivered_vectors().last(), Some(&0));
    // A notification through the BAR reaches the queue's eventfd.
    d.write_bar(VIRTIO_BAR, NOTIFY_CFG_OFFSET + 8, &2u16.to_le_bytes());
    assert_eq!(d.queue_eventfd(2).unwrap().read().unwrap(), 1);
    d.write_bar(VIRTIO_BAR, NOTIFY_CFG_OFFSET + 12, &3u16.to_le_bytes());
    assert_eq!(d.counters().notifications, 1);

    wc(&mut d, DEVICE_STATUS as u64, 0, 1);
    assert_eq!(status(&mut d), 0);
    assert!(!d.device().active);
    assert_eq!(d.device().resets, 1);
    assert_eq!(rc(&mut d, CONFIG_MSIX_VECTOR as u64, 2), NO_VECTOR as u64);
    wc(&mut d, QUEUE_SELECT as u64, 1, 2);
    assert_eq!(rc(&mut d, QUEUE_MSIX_VECTOR as u64, 2), NO_VECTOR as u64);
    assert_eq!(rc(&mut d, QUEUE_ENABLE as u64, 2), 0);
    assert_eq!(rc(&mut d, QUEUE_SIZE as u64, 2), 256);
    assert_eq!(rc(&mut d, QUEUE_DESC as u64, 8), 0);
    assert_eq!(d.counters().resets, 1);
}

#[test]
fn isr_and_intx_without_msix() {
    let line = Arc::new(RecordingIntx::new());
    let (mut d, _) = dev_with(Some(line.clone()));
    d.interrupt().trigger(VirtioInterruptType::Config).unwrap();
    assert!(line.level());
    let mut st = [0u8; 2];
    d.read_config(vmm_pci::config::STATUS, &mut st);
    assert_ne!(u16::from_le_bytes(st) & STATUS_INTERRUPT, 0);
    let mut isr = [0u8];
    d.read_bar(VIRTIO_BAR, ISR_CFG_OFFSET, &mut isr);
    assert_eq!(isr, [2]);
    assert!(!line.level());
    d.read_bar(VIRTIO_BAR, ISR_CFG_OFFSET, &mut isr);
    assert_eq!(isr, [0], "read clears");
}

#[test]
fn pci_cfg_window_reaches_the_bars() {
    let (mut d, _) = dev();
    let cap = d.pci_cfg_cap;
    d.write_config(cap + PCI_CFG_BAR, &[VIRTIO_BAR]);
    d.write_config(cap + PCI_CFG_OFFSET, &(NUM_QUEUES as u32).to_le_bytes());
    d.write_config(cap + PCI_CFG_LENGTH, &2u32.to_le_bytes());
    let mut b = [0u8; 4];
    d.read_config(cap + PCI_CFG_DATA, &mut b);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 3);
    // A write through the window sets the status.
    d.write_config(cap + PCI_CFG_OFFSET, &(DEVICE_STATUS as u32).to_le_bytes());
    d.write_config(cap + PCI_CFG_LENGTH, &1u32.to_le_bytes());
    d.write_config(cap + PCI_CFG_DATA, &[STATUS_ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(status(&mut d), STATUS_ACKNOWLEDGE);
}

#[test]
fn hostile_bar_and_config_traffic_never_panics() {
    let (mut d, _) = dev();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        let data = (x >> 16).to_le_bytes();
        let off = (x >> 24) % 0x4100;
        match (x >> 8) % 4 {
            0 => d.write_bar(VIRTIO_BAR, off, &data[..len]),
            1 => d.write_bar(MSIX_BAR, off % 0x1000, &data[..len]),
            2 => {
                // Any offset a VMM might pass, even without the bus's checks.
                let off = (x >> 40) as u16;
                d.write_config(off, &data[..len.min(4)]);
                let mut b = [0u8; 4];
                d.read_config(off, &mut b[..len.min(4)]);
            }
            _ => {
                let mut b = [0u8; 8];
                d.read_bar(VIRTIO_BAR, off, &mut b[..len]);
            }
        }
    }
}

fn recorder(d: &mut Dev) -> Arc<Mutex<Vec<FeaturesAcked>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    d.add_features_listener(Arc::new(move |e: &FeaturesAcked| {
        s.lock().unwrap().push(e.clone())
    }));
    seen
}

fn negotiate(d: &mut Dev, f: u64) {
    wc(
        d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64,
        1,
    );
    set_driver_features(d, f);
    wc(
        d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
        1,
    );
}

#[test]
fn features_acked_is_raised_once_per_negotiation() {
    let (mut d, _) = dev();
    assert_eq!(d.id(), "net1");
    let seen = recorder(&mut d);
    // A refused set raises nothing.
    negotiate(&mut d, 1 << VIRTIO_NET_F_STANDBY);
    assert!(seen.lock().unwrap().is_empty());
    wc(&mut d, DEVICE_STATUS as u64, 0, 1);
    // Accepted: one event, carrying the id, the type and the set.
    negotiate(&mut d, OFFER);
    // FEATURES_OK written again, and DRIVER_OK: still the same negotiation.
    wc(
        &mut d,
        DEVICE_STATUS as u64,
        (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64,
        1,
    );
    wc(&mut d, DEVICE_STATUS as u64, 0xf, 1);
    assert_eq!(
        *seen.lock().unwrap(),
        [FeaturesAcked {
            device_id: "net1".into(),
            device_type: 1,
            features: OFFER,
            restored: false,
        }]
    );
    // A late listener hears the current negotiation at once, once.
    let late = recorder(&mut d);
    assert_eq!(late.lock().unwrap().len(), 1);
    // Reset: the next acceptance is a new negotiation.
    wc(&mut d, DEVICE_STATUS as u64, 0, 1);
    negotiate(&mut d, OFFER & !(1 << VIRTIO_NET_F_STANDBY));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].has(VIRTIO_NET_F_STANDBY));
    assert!(!seen[1].has(VIRTIO_NET_F_STANDBY));
    assert_eq!(late.lock().unwrap().len(), 2);
}

fn dev_from(fake: FakeDevice) -> (Dev, Arc<RecordingMsi>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let msis = Arc::new(RecordingMsi::new());
    let d = VirtioPciBuilder::new()
        .id("net1")
        .build(fake, GuestMemoryAtomic::new(mem), msis.clone())
        .unwrap();
    (d, msis)
}

fn fake(offer: u64) -> FakeDevice {
    FakeDevice::new(1, vec![256; 3], offer)
        .requiring(1 << VIRTIO_F_VERSION_1)
        .with_config(vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0])
}

/// Everything the driver can read: config space, the common configuration for
/// every queue select, the MSI-X table and PBA, and the device configuration.
fn guest_view(d: &mut Dev) -> Vec<u8> {
    let mut out = Vec::new();
    for off in (0..0x1000u16).step_by(4) {
        let mut b = [0u8; 4];
        d.read_config(off, &mut b);
        out.extend_from_slice(&b);
    }
    let select = rc(d, QUEUE_SELECT as u64, 2);
    for q in 0..3 {
        wc(d, QUEUE_SELECT as u64, q, 2);
        for off in (0..COMMON_LEN as u64).step_by(2) {
            out.extend_from_slice(&(rc(d, off, 2) as u16).to_le_bytes());
        }
    }
    wc(d, QUEUE_SELECT as u64, select, 2);
    for off in (0..0x1000u64).step_by(4) {
        let mut b = [0u8; 4];
        d.read_bar(MSIX_BAR, off, &mut b);
        out.extend_from_slice(&b);
    }
    for off in (0..16u64).step_by(4) {
        let mut b = [0u8; 4];
        d.read_bar(VIRTIO_BAR, DEVICE_CFG_OFFSET + off, &mut b);
        out.extend_from_slice(&b);
    }
    out
}

/// A driver that brought the device up: MSI-X on with vector 3 masked, three
/// queues, DRIVER_OK, then a queue-2 interrupt held pending by the mask.
fn running() -> (Dev, Arc<RecordingMsi>) {
    let (mut d, msis) = dev();
    d.write_config(
        COMMAND,
        &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
    );
    let msix = d
        .config()
        .find_capability(vmm_pci::config::CAP_ID_MSIX)
        .unwrap();
    d.write_config(msix + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
    for v in 0..4u64 {
        d.write_bar(MSIX_BAR, v * 16, &(0xfee0_0000u64 + v).to_le_bytes());
        d.write_bar(MSIX_BAR, v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        d.write_bar(MSIX_BAR, v * 16 + 12, &u32::from(v == 3).to_le_bytes());
    }
    negotiate(&mut d, OFFER);
    wc(&mut d, CONFIG_MSIX_VECTOR as u64, 0, 2);
    for q in 0..3 {
        setup_queue(&mut d, q, q + 1);
    }
    wc(&mut d, DEVICE_STATUS as u64, 0xf, 1);
    assert!(d.device().active);
    assert!(d.device().raise(VirtioInterruptType::Queue(2)));
    assert!(d.device().raise(VirtioInterruptType::Config));
    wc(&mut d, QUEUE_SELECT as u64, 1, 2);
    (d, msis)
}

#[test]
fn a_running_function_moves_whole_and_the_driver_goes_on() {
    use device_state::{Persist, from_bytes, to_bytes};
    let (mut src, src_msis) = running();
    assert_eq!(src_msis.delivered_vectors(), [0], "vector 3 is masked");
    let state = src.save().unwrap();
    let bytes = to_bytes(&state);
    let (mut dst, dst_msis) = dev();
    let events = recorder(&mut dst);
    dst.restore(&from_bytes(&bytes).unwrap()).unwrap();
    // The guest sees the same function, register for register.
    let (a, b) = (guest_view(&mut dst), guest_view(&mut src));
    assert_eq!(a.len(), b.len());
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_difference, None, "guest views differ");
    assert_eq!(dst.status(), 0xf);
    assert_eq!(dst.config_generation(), src.config_generation());
    // The device was restored and activated again with the same queues.
    assert!(dst.device().active);
    assert_eq!(dst.device().queues, src.device().queues);
    assert_eq!(dst.device().acked, Some(OFFER));
    // The negotiation is announced once, as restored; nothing was delivered.
    assert_eq!(
        *events.lock().unwrap(),
        [FeaturesAcked {
            device_id: "net1".into(),
            device_type: 1,
            features: OFFER,
            restored: true,
        }]
    );
    assert!(dst_msis.delivered().is_empty());
    // The pending vector fires when the guest unmasks it; others on trigger.
    dst.write_bar(MSIX_BAR, 3 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(dst_msis.delivered_vectors(), [3]);
    assert!(dst.device().raise(VirtioInterruptType::Queue(0)));
    assert_eq!(dst_msis.delivered_vectors(), [3, 1]);
    // Notifications reach the destination's eventfds.
    dst.write_bar(VIRTIO_BAR, NOTIFY_CFG_OFFSET + 4, &1u16.to_le_bytes());
    assert_eq!(dst.queue_eventfd(1).unwrap().read().unwrap(), 1);
    // The driver can reset and renegotiate as usual.
    wc(&mut dst, DEVICE_STATUS as u64, 0, 1);
    negotiate(&mut dst, OFFER);
    assert_eq!(events.lock().unwrap().len(), 2);
    assert!(!events.lock().unwrap()[1].restored);
}

#[test]
fn a_state_saved_mid_negotiation_round_trips() {
    use device_state::Persist;
    let (mut src, _) = dev();
    negotiate(&mut src, OFFER);
    let state = src.save().unwrap();
    let (mut dst, _) = dev();
    dst.restore(&state).unwrap();
    assert_eq!(dst.save().unwrap(), state);
    assert!(!dst.device().active, "the driver never set DRIVER_OK");
    assert_eq!(
        status(&mut dst),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
    wc(&mut dst, DEVICE_STATUS as u64, 0xf, 1);
    assert!(dst.device().active);
}

#[test]
fn a_state_that_does_not_fit_is_refused_and_changes_nothing() {
    use device_state::{Error, Persist, from_bytes, to_bytes};
    let (src, _) = running();
    let state = src.save().unwrap();
    let untouched = |d: &mut Dev| {
        assert_eq!(status(d), 0);
        assert!(!d.device().active);
        assert_eq!(d.device().acked, None);
    };
    // Another queue count.
    let (mut d, _) = dev_from(FakeDevice::new(1, vec![256; 2], OFFER));
    let e = d.restore(&state).unwrap_err();
    assert!(
        matches!(&e, Error::Mismatch { field, .. } if field == "queue count"),
        "{e}"
    );
    untouched(&mut d);
    // Another queue maximum.
    let (mut d, _) = dev_from(FakeDevice::new(1, vec![128; 3], OFFER));
    let e = d.restore(&state).unwrap_err();
    assert!(e.to_string().contains("queue 0 maximum size"), "{e}");
    // A destination device that refuses its part (it offers more): the
    // transport is left as freshly built.
    let (mut d, _) = dev_from(fake(OFFER | 1 << 5));
    let e = d.restore(&state).unwrap_err();
    assert!(e.to_string().contains("offered features"), "{e}");
    untouched(&mut d);
    // One that offers less than the driver accepted.
    let (mut d, _) = dev_from(fake(OFFER & !(1 << 29)));
    let e = d.restore(&state).unwrap_err();
    assert!(
        e.to_string().contains("the features the driver accepted"),
        "{e}"
    );
    untouched(&mut d);
    // Forged values.
    for (what, forge) in [
        (
            "DRIVER_OK without FEATURES_OK",
            Box::new(|s: &mut VirtioPciState<FakeState>| s.status = 0x7)
                as Box<dyn Fn(&mut VirtioPciState<FakeState>)>,
        ),
        ("NEEDS_RESET", Box::new(|s| s.status |= 0x40)),
        ("size 100", Box::new(|s| s.queues[0].size = 100)),
        ("vector 9", Box::new(|s| s.queues[2].vector = 9)),
        ("config vector 4", Box::new(|s| s.config_vector = 4)),
        ("ISR 0x4", Box::new(|s| s.isr = 4)),
    ] {
        let mut bad = state.clone();
        forge(&mut bad);
        let (mut d, _) = dev();
        let e = d.restore(&bad).unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
        untouched(&mut d);
    }
    // Corrupt bytes.
    let bytes = to_bytes(&state);
    for i in (0..bytes.len()).step_by(7) {
        let mut c = bytes.clone();
        c[i] ^= 0x10;
        assert!(
            from_bytes::<VirtioPciState<FakeState>>(&c).is_err(),
            "byte {i}"
        );
    }
    let _: VirtioPciState<FakeState> = from_bytes(&bytes).unwrap();
}
