//! The ready-made epoll worker: two devices back to back, each served by its
//! own `NetWorker`, moved only by eventfd kicks (what a KVM VMM's ioeventfds
//! deliver) and the pair backend's readiness eventfds.

use std::time::{Duration, Instant};

use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::testing::{GuestDriver, GuestMem, TestMemory, frame};
use virtio_net_standby::{NetWorker, PairBackend, PairConfig, StandbyNet, StandbyNetBuilder, pair};

const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];

#[test]
fn workers_move_frames_on_kicks_alone() {
    let (ea, eb) = pair(PairConfig { capacity: 0 }).unwrap();
    let mut a: StandbyNet<GuestMem, PairBackend> =
        StandbyNetBuilder::new().id("a").build(vec![ea]).unwrap();
    let mut b: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .id("b")
        .mac(MAC_B)
        .build(vec![eb])
        .unwrap();
    assert!(
        NetWorker::start(&a).is_err(),
        "nothing to serve before activation"
    );
    let (ma, mb) = (TestMemory::new(64 << 20), TestMemory::new(64 << 20));
    let mut ga = GuestDriver::bring_up(&mut a, &ma, DEFAULT_OFFER, 256).unwrap();
    let mut gb = GuestDriver::bring_up(&mut b, &mb, DEFAULT_OFFER, 256).unwrap();
    let wa = NetWorker::start(&a).unwrap();
    let wb = NetWorker::start(&b).unwrap();

    // More than fits the pair ring at once (64 KiB frames into a 256 KiB ring),
    // so the sender must block and be woken by the receiver.
    let n = 2000usize;
    gb.post_rx(0, 256);
    gb.kick(0);
    let mut sent = 0;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "stalled after {} frames",
            got.len()
        );
        while sent < n && ga.tx[0].free_descriptors() > 0 {
            let len = if sent % 10 == 0 {
                60_000
            } else {
                64 + sent % 1400
            };
            ga.queue_tx(0, &frame(MAC_B, &vec![(sent % 251) as u8; len]));
            sent += 1;
        }
        ga.tx[0].publish();
        ga.kick(1);
        while ga.tx[0].pop_used().is_some() {}
        let before = got.len();
        while let Some(f) = gb.recv(0) {
            got.push(f);
        }
        if got.len() > before {
            gb.kick(0);
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    for (i, f) in got.iter().enumerate() {
        let len = if i % 10 == 0 { 60_000 } else { 64 + i % 1400 };
        assert_eq!(f.len(), 12 + 14 + len, "frame {i}");
        assert!(f[26..].iter().all(|x| *x == (i % 251) as u8), "frame {i}");
    }
    // The control queue is served too (by pair 0's thread).
    let (h, ack) = ga.queue_ctrl(0, 0, &[0]);
    ga.kick(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let ctrl = ga.ctrl.as_mut().unwrap();
    let used = loop {
        if let Some(u) = ctrl.pop_used() {
            break u;
        }
        assert!(Instant::now() < deadline, "control command not served");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(used, (h, 1));
    assert_eq!(ma.read(ack, 1)[0], 0);
    assert!(!a.rx_filter().promisc);
    wa.stop();
    drop(wb);
    let c = a.counters();
    assert_eq!(c.tx_frames, n as u64);
    assert!(
        c.tx_backpressure > 0,
        "the small ring made the sender wait: {c:?}"
    );
    assert_eq!(b.counters().rx_frames, n as u64);
}
