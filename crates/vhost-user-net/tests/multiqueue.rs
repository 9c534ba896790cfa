//! Two queue pairs, each served by a worker thread of its own.
//!
//! The `vhost` crate's frontend negotiates `MQ` with the control queue (as a
//! driver whose control queue the backend serves: User-Mode Linux's
//! `virtio_uml`), starts the rings of both pairs and the control queue, and
//! enables the second pair with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` on the control
//! queue. Frames then arrive on both pairs' backends; each pair's RX ring must
//! receive its own, and the device must report that a different thread moved
//! each pair's chains.

mod support;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_net::{Server, VhostUserNet};
use virtio_net_standby::{PairBackend, PairConfig, StandbyNetBuilder, pair};
use vmm_sys_util::eventfd::EventFd;

use support::{ServerThread, map_shared, memfd, send_frame, wait_until};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
const GPA: u64 = 0x10_0000;
const SIZE: u64 = 4 << 20;
const USER: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 64;
/// Rings 0..=4 (RX0, TX0, RX1, TX1, control), 16 KiB apart: descriptors,
/// then the available ring at +4 KiB, the used ring at +8 KiB.
const RINGS: u64 = GPA;
/// RX buffers: pair `p`'s `i`-th at `BUFS + (p * 32 + i) * 4 KiB`.
const BUFS: u64 = GPA + 0x10_0000;
const BUF_LEN: u32 = 2048;
const BUFFERS: u16 = 32;
/// The control command: header, the pair count, the device's ack.
const CMD: u64 = GPA + 0x8_0000;

/// `VIRTIO_NET_F_CTRL_VQ`, `VIRTIO_NET_F_MQ`, `VIRTIO_F_VERSION_1`.
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
const F_VERSION_1: u64 = 1 << 32;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn desc(q: u64) -> u64 {
    RINGS + 0x4000 * q
}
fn avail(q: u64) -> u64 {
    desc(q) + 0x1000
}
fn used(q: u64) -> u64 {
    desc(q) + 0x2000
}

/// Guest memory: a memory file shared with the backend, by guest physical
/// address.
struct Guest {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Guest {
    fn new() -> Guest {
        let fd = memfd(c"guest", SIZE);
        let ptr = map_shared(&fd, SIZE as usize);
        Guest { fd, ptr }
    }

    fn at(&self, gpa: u64, n: usize) -> *mut u8 {
        assert!(gpa >= GPA && gpa - GPA + n as u64 <= SIZE);
        // SAFETY: within the mapping, checked above.
        unsafe { self.ptr.add((gpa - GPA) as usize) }
    }

    fn write(&self, gpa: u64, b: &[u8]) {
        // SAFETY: `at` checked the range; the device writes other bytes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.at(gpa, b.len()), b.len()) };
    }

    fn w16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn r8(&self, gpa: u64) -> u8 {
        // SAFETY: a byte inside the mapping.
        unsafe { std::ptr::read_volatile(self.at(gpa, 1)) }
    }

    fn r16(&self, gpa: u64) -> u16 {
        // SAFETY: an aligned u16 inside the mapping, read atomically as the
        // device writes it.
        let a = unsafe { &*(self.at(gpa, 2) as *const AtomicU16) };
        u16::from_le(a.load(Ordering::Acquire))
    }

    /// Descriptor `i` of ring `q`.
    fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = desc(q) + 16 * u64::from(i);
        self.write(d, &addr.to_le_bytes());
        self.write(d + 8, &len.to_le_bytes());
        self.w16(d + 12, flags);
        self.w16(d + 14, next);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), SIZE as usize) };
    }
}

#[test]
fn two_queue_pairs_each_on_its_own_worker_thread() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("multiqueue.sock");
    let (ours0, mut peer0) = pair(PairConfig::default()).unwrap();
    let (ours1, mut peer1) = pair(PairConfig::default()).unwrap();
    let dev = StandbyNetBuilder::new()
        .mac(MAC)
        .queue_pairs(2)
        .queue_size(QSIZE)
        .build(vec![ours0, ours1])
        .unwrap();
    let net: Arc<VhostUserNet<PairBackend>> = VhostUserNet::new("mq", dev).unwrap();
    assert_eq!(net.workers(), 2, "one worker per queue pair");
    let server = Server::bind(&path, net.clone()).unwrap();
    let _running = ServerThread::spawn(server);

    let guest = Guest::new();
    // RX buffers of both pairs, posted before the rings start.
    for p in 0..2u64 {
        let q = 2 * p;
        for i in 0..BUFFERS {
            let buf = BUFS + (p * 32 + u64::from(i)) * 0x1000;
            guest.desc(q, i, buf, BUF_LEN, VRING_DESC_F_WRITE, 0);
            guest.w16(avail(q) + 4 + 2 * u64::from(i), i);
        }
        guest.w16(avail(q) + 2, BUFFERS);
    }
    // VIRTIO_NET_CTRL_MQ (4), VQ_PAIRS_SET (0), 2 pairs; the ack starts at 0xff.
    guest.write(CMD, &[4, 0]);
    guest.w16(CMD + 0x10, 2);
    guest.write(CMD + 0x20, &[0xff]);
    guest.desc(4, 0, CMD, 2, VRING_DESC_F_NEXT, 1);
    guest.desc(4, 1, CMD + 0x10, 2, VRING_DESC_F_NEXT, 2);
    guest.desc(4, 2, CMD + 0x20, 1, VRING_DESC_F_WRITE, 0);

    let mut f = Frontend::connect(&path, 5).unwrap();
    f.set_owner().unwrap();
    let offered = f.get_features().unwrap();
    let features =
        F_VERSION_1 | F_CTRL_VQ | F_MQ | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(
        offered & features,
        features,
        "MQ and the control queue offered"
    );
    f.set_features(features).unwrap();
    f.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    assert_eq!(f.get_queue_num().unwrap(), 5);
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA,
        memory_size: SIZE,
        userspace_addr: USER,
        mmap_offset: 0,
        mmap_handle: guest.fd.as_raw_fd(),
    }])
    .unwrap();
    let user = |gpa: u64| USER + (gpa - GPA);
    let kicks: Vec<EventFd> = (0..5).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..5).map(|_| EventFd::new(0).unwrap()).collect();
    for q in 0..5usize {
        let qq = q as u64;
        f.set_vring_num(q, QSIZE).unwrap();
        f.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: user(desc(qq)),
                used_ring_addr: user(used(qq)),
                avail_ring_addr: user(avail(qq)),
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(q, 0).unwrap();
        f.set_vring_call(q, &calls[q]).unwrap();
        f.set_vring_kick(q, &kicks[q]).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }
    kicks[0].write(1).unwrap();
    wait_until("the device to start", || net.is_active());

    // The driver enables the second pair on the control queue.
    guest.w16(avail(4) + 4, 0);
    guest.w16(avail(4) + 2, 1);
    kicks[4].write(1).unwrap();
    wait_until("the control command's completion", || {
        guest.r16(used(4) + 2) == 1
    });
    assert_eq!(guest.r8(CMD + 0x20), 0, "VIRTIO_NET_OK");

    // Frames on both pairs' backends land in their own RX rings.
    for n in 0..8u8 {
        send_frame(&mut peer0, MAC, 12 + 60, n);
        send_frame(&mut peer1, MAC, 12 + 60, 0x80 | n);
    }
    wait_until("pair 0's frames", || guest.r16(used(0) + 2) == 8);
    wait_until("pair 1's frames", || guest.r16(used(2) + 2) == 8);
    let stats = net.pair_stats();
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert!(s.chains >= 8, "{stats:?}");
        assert!(s.tid > 0, "{stats:?}");
    }
    assert_ne!(
        stats[0].tid, stats[1].tid,
        "each pair on a thread of its own: {stats:?}"
    );
    // Neither is the server's or the test's thread.
    // SAFETY: gettid has no arguments and cannot fail.
    let me = unsafe { libc::gettid() };
    assert!(stats.iter().all(|s| s.tid != me));
    drop(f);
}
