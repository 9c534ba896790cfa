//! Two standby devices back to back through the in-process pair: one million
//! frames of mixed sizes go from guest A's TX queue to guest B's RX queue, and
//! every byte of every frame arrives, in order.

use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::testing::{DriverQueue, Entropy, GuestDriver, GuestMem, Rng, TestMemory};
use virtio_net_standby::{PairBackend, PairConfig, StandbyNet, StandbyNetBuilder, pair};

const FRAMES: u64 = 1_000_000;
const QSIZE: u16 = 256;
const TX_SLOT: u64 = 65_562;
const RX_BUF: u32 = 4096;

/// Length of frame `i` (Ethernet frame, without the 12-byte header): mostly
/// small and MTU-sized, sometimes jumbo, now and then 64 KiB.
fn frame_len(rng: &mut Rng) -> usize {
    match rng.next_u64() % 100 {
        0..=44 => 60 + (rng.next_u64() % 200) as usize,
        45..=84 => 1000 + (rng.next_u64() % 515) as usize,
        85..=98 => 1515 + (rng.next_u64() % 7500) as usize,
        _ => 9000 + (rng.next_u64() % 56_550) as usize,
    }
}

/// 192 KiB of random bytes; frame `i` carries the slice starting at
/// `(i * 7919) % 65536`, so every frame differs from its neighbours and a
/// misordered, duplicated or corrupted frame cannot go unnoticed.
fn pattern() -> Vec<u8> {
    let mut r = Rng(42);
    (0..3 * 65536).map(|_| r.next_u64() as u8).collect()
}

fn payload(pattern: &[u8], frame: u64, len: usize) -> &[u8] {
    let start = (frame as usize * 7919) % 65536;
    &pattern[start..start + len]
}

const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn fill(buf: &mut Vec<u8>, pattern: &[u8], frame: u64, len: usize) {
    buf.clear();
    buf.extend_from_slice(&[0u8; 12]);
    // A unicast destination: both devices start promiscuous, and this checks
    // that the filter does not eat anything.
    buf.extend_from_slice(&DST);
    buf.extend_from_slice(payload(pattern, frame, len - 6));
}

#[test]
fn one_million_frames_arrive_intact_and_in_order() {
    let (a_end, b_end) = pair(PairConfig { capacity: 8 << 20 }).unwrap();
    let mut a: StandbyNet<GuestMem, PairBackend> =
        StandbyNetBuilder::new().id("a").build(vec![a_end]).unwrap();
    let mut b: StandbyNet<GuestMem, PairBackend> =
        StandbyNetBuilder::new().id("b").build(vec![b_end]).unwrap();
    let mem_a = TestMemory::new(64 << 20);
    let mem_b = TestMemory::new(64 << 20);
    let mut ga = GuestDriver::bring_up(&mut a, &mem_a, DEFAULT_OFFER, QSIZE).unwrap();
    let mut gb = GuestDriver::bring_up(&mut b, &mem_b, DEFAULT_OFFER, QSIZE).unwrap();

    // One TX slot per descriptor of A; RX buffers of 4 KiB on B.
    let tx_base = mem_a.alloc(TX_SLOT * u64::from(QSIZE), 4096);
    gb.rx_buf_len = RX_BUF;
    gb.post_rx(0, usize::from(QSIZE));

    let mut send_rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut recv_rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(TX_SLOT as usize);
    let pattern = pattern();
    let mut total_bytes = 0u64;
    let txq: &mut DriverQueue = &mut ga.tx[0];
    while received < FRAMES {
        // Guest A queues what fits.
        while sent < FRAMES {
            let Some(d) = txq.next_free() else { break };
            let len = frame_len(&mut send_rng);
            fill(&mut buf, &pattern, sent, len);
            let addr = tx_base + u64::from(d) * TX_SLOT;
            mem_a.write(addr, &buf);
            let h = txq.add_readable(&[addr], &[buf.len() as u32]);
            assert_eq!(h, d);
            sent += 1;
        }
        txq.publish();
        a.queue_pair(0).unwrap().process_tx();
        while txq.pop_used().is_some() {}
        // Device B delivers into guest B's buffers; guest B checks every byte.
        b.queue_pair(0).unwrap().process_rx();
        while let Some(got) = gb.recv(0) {
            let len = frame_len(&mut recv_rng);
            assert_eq!(got.len(), 12 + len, "frame {received}: length");
            let num_buffers = u16::from_le_bytes([got[10], got[11]]);
            assert_eq!(
                usize::from(num_buffers),
                (12 + len).div_ceil(RX_BUF as usize),
                "frame {received}"
            );
            assert_eq!(&got[12..18], &DST);
            assert!(
                got[18..] == *payload(&pattern, received, len - 6),
                "frame {received}: payload differs"
            );
            total_bytes += len as u64;
            received += 1;
        }
    }
    let ca = a.counters();
    let cb = b.counters();
    assert_eq!(ca.tx_frames, FRAMES);
    assert_eq!(cb.rx_frames, FRAMES);
    assert_eq!(ca.tx_bytes, total_bytes);
    assert_eq!(cb.rx_bytes, total_bytes);
    assert_eq!(ca.dropped() + cb.dropped(), 0);
    assert_eq!(ca.malformed() + cb.malformed(), 0);
    // Interrupts were batched, not one per frame.
    assert!(cb.notifications_sent < FRAMES / 4, "{cb:?}");
    println!("{FRAMES} frames, {total_bytes} bytes; A {ca:?}; B {cb:?}");
}
