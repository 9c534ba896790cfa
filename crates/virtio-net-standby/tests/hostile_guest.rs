//! A hostile guest (`testing::HostileGuest`) driven by a seeded generator:
//! garbage in descriptor tables, ring indices, suppression fields and control
//! commands, between processing calls, snapshots and resets. The device must never
//! panic, never loop forever, and never break its own ring invariants (checked on
//! every processing pass). `HOSTILE_ROUNDS` sets the number of seeds (default 300);
//! the fuzz target `hostile_guest` drives the same guest from libFuzzer's input.

use virtio_net_standby::testing::{HostileGuest, Rng};

#[test]
fn random_rings_never_break_the_device() {
    let rounds: u64 = std::env::var("HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (mut passes, mut resets) = (0, 0);
    for seed in 0..rounds {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let Some(mut h) = HostileGuest::new(&mut r) else {
            continue;
        };
        h.run(&mut r, 150);
        passes += h.passes;
        resets += h.resets;
        let c = h.counters();
        // Interrupts stay batched even under garbage: never more than one per
        // processed chain or command.
        assert!(
            c.notifications_sent
                <= c.tx_frames
                    + c.rx_frames
                    + c.malformed()
                    + c.ctrl_ok
                    + c.ctrl_err
                    + c.dropped()
                    + 3 * h.passes
        );
    }
    println!("{rounds} rounds, {passes} processing passes, {resets} NEEDS_RESET");
    assert!(
        passes > rounds * 10,
        "the random driver exercised the device"
    );
}
