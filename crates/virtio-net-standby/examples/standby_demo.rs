//! The standby device's part of virtio-net failover, end to end, in one process.
//!
//! Two VMs share a wire (the in-process pair backend): `net1` is a failover
//! standby, `peer0` a plain virtio-net device on the other end. A scripted guest
//! driver negotiates `net1` the way Linux's virtio_net does; the STANDBY hook tells
//! the (here simulated) failover coordinator to plug the primary. Traffic flows,
//! the link goes down and up, the guest is asked to announce itself, and then the
//! VM migrates: `net1`'s state is snapshotted, restored into a fresh device on the
//! "destination", which fires the hook again (plug the destination's primary) and
//! carries on with the same guest rings.
//!
//! Run: `cargo run --release -p virtio-net-standby --example standby_demo`

use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_net::{VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK};
use virtio_net_standby::config::STATUS_ANNOUNCE;
use virtio_net_standby::features::{DEFAULT_OFFER, F_STANDBY};
use virtio_net_standby::testing::{GuestDriver, GuestMem, TestMemory, frame};
use virtio_net_standby::{
    ActivateQueue, FeaturesAcked, FeaturesListener, NetState, PairBackend, PairConfig, StandbyNet,
    StandbyNetBuilder, VirtioDevice, pair,
};

const NET1_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];

/// The failover coordinator's hook: it would hot-plug the primary here.
fn coordinator(side: &'static str) -> Arc<dyn FeaturesListener> {
    Arc::new(move |e: &FeaturesAcked| {
        println!(
            "  [{side}] FAILOVER_NEGOTIATED {{device-id: {}}}{} -> plug the primary whose failover_pair_id is {}",
            e.device_id,
            if e.restored {
                " (from migrated state)"
            } else {
                ""
            },
            e.device_id
        );
    })
}

/// Sends `n` frames from `from` to `to` and lets `to` receive them all.
fn traffic(
    from: &StandbyNet<GuestMem, PairBackend>,
    gfrom: &mut GuestDriver,
    to: &StandbyNet<GuestMem, PairBackend>,
    gto: &mut GuestDriver,
    n: usize,
) -> usize {
    let mut sent = 0;
    let mut received = 0;
    while received < n {
        while sent < n && gfrom.tx[0].free_descriptors() > 0 {
            let len = [60, 590, 1500][sent % 3];
            let payload: Vec<u8> = (0..len).map(|i| (i + sent) as u8).collect();
            gfrom.queue_tx(0, &frame(PEER_MAC, &payload));
            sent += 1;
        }
        gfrom.tx[0].publish();
        from.queue_pair(0).unwrap().process_tx();
        while gfrom.tx[0].pop_used().is_some() {}
        to.queue_pair(0).unwrap().process_rx();
        while let Some(f) = gto.recv(0) {
            let len = [60, 590, 1500][received % 3];
            assert_eq!(f.len(), 12 + 14 + len, "frame {received} intact");
            assert!(
                f[26..]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == (i + received) as u8)
            );
            received += 1;
        }
    }
    received
}

fn main() {
    println!("virtio-net standby demo: the standby half of a net_failover pair\n");

    // The wire, and the two devices on it.
    let (net1_end, peer_end) = pair(PairConfig::default()).expect("pair");
    let mut net1: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .id("net1")
        .mac(NET1_MAC)
        .build(vec![net1_end])
        .expect("net1");
    let mut peer: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .id("peer0")
        .mac(PEER_MAC)
        .standby(false)
        .build(vec![peer_end])
        .expect("peer0");
    println!("1. devices built");
    println!(
        "  net1 offers {:#018x} (STANDBY, bit 62: {})",
        net1.features(),
        net1.offered_features().has(F_STANDBY)
    );
    println!(
        "  peer0 offers {:#018x} (STANDBY: {})",
        peer.features(),
        peer.offered_features().has(F_STANDBY)
    );
    net1.add_standby_listener(coordinator("source"));
    peer.add_standby_listener(coordinator("peer"));

    println!("\n2. guests negotiate (FEATURES_OK) and start (DRIVER_OK)");
    let mem1 = TestMemory::new(128 << 20);
    let memp = TestMemory::new(128 << 20);
    let mut g1 = GuestDriver::bring_up(&mut net1, &mem1, DEFAULT_OFFER, 256).expect("net1 up");
    let mut gp = GuestDriver::bring_up(&mut peer, &memp, DEFAULT_OFFER, 256).expect("peer up");
    println!(
        "  net1 guest acked STANDBY: {}; peer0 guest: {} (no event)",
        net1.standby_negotiated(),
        peer.standby_negotiated()
    );
    gp.post_rx(0, 256);
    g1.post_rx(0, 256);

    println!("\n3. traffic through the standby while the primary is away");
    let t = Instant::now();
    let n = traffic(&net1, &mut g1, &peer, &mut gp, 30_000);
    println!(
        "  {n} frames net1 -> peer0, every byte checked, in {:?}",
        t.elapsed()
    );

    println!("\n4. link down and up, then an announce request");
    net1.set_link_up(false);
    net1.set_link_up(true);
    net1.announce().expect("GUEST_ANNOUNCE negotiated");
    let ack = g1.ctrl(
        &net1,
        VIRTIO_NET_CTRL_ANNOUNCE as u8,
        VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
        &[],
    );
    println!(
        "  config interrupts: {}; guest acked the announce: {} (status bit now {})",
        g1.interrupt.config_count(),
        ack == 0,
        net1.config().status & STATUS_ANNOUNCE
    );

    println!("\n5. migration: the primary is unplugged (not shown), the standby's state moves");
    let state = net1.snapshot();
    let bytes = state.to_bytes();
    println!(
        "  snapshot: {} bytes, {} queues, STANDBY acked: {}",
        bytes.len(),
        state.queues.len(),
        state.acked.is_some_and(|f| f.has(F_STANDBY))
    );
    // The destination VMM builds the same device on its own wire end and restores.
    drop(net1);
    let (dst_end, peer_end2) = pair(PairConfig::default()).expect("pair");
    let mut dst: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .id("net1")
        .mac(NET1_MAC)
        .build(vec![dst_end])
        .expect("destination");
    dst.add_standby_listener(coordinator("destination"));
    let state = NetState::from_bytes(&bytes).expect("state");
    dst.restore(&state).expect("restore");
    let queues = state
        .queues
        .iter()
        .map(|q| ActivateQueue {
            index: q.index,
            queue: virtio_queue::Queue::try_from(q.state).expect("queue"),
            kick: None,
        })
        .collect();
    dst.activate(mem1.atomic(), g1.interrupt.clone(), queues)
        .expect("activate");
    // The peer moves to the destination's wire too.
    peer.reset();
    let mut peer2: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .id("peer0")
        .mac(PEER_MAC)
        .standby(false)
        .build(vec![peer_end2])
        .expect("peer0");
    let mut gp2 =
        GuestDriver::bring_up(&mut peer2, &TestMemory::new(128 << 20), DEFAULT_OFFER, 256)
            .expect("peer up");
    gp2.post_rx(0, 256);
    let n = traffic(&dst, &mut g1, &peer2, &mut gp2, 30_000);
    println!("  the guest kept its rings: {n} more frames after the move");

    let c = dst.counters();
    println!(
        "\n6. destination counters: {} TX frames, {} bytes, {} dropped, {} malformed, {} interrupts sent, {} suppressed",
        c.tx_frames,
        c.tx_bytes,
        c.dropped(),
        c.malformed(),
        c.notifications_sent,
        c.notifications_suppressed
    );
    println!("\ndone");
}
