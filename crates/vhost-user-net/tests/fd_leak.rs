//! Descriptors across connections: every frontend hands the server eventfds
//! (`SET_VRING_KICK`, `SET_VRING_CALL`) and a memory file (`SET_MEM_TABLE`);
//! when it goes away the server must close all of them. Many connections in a
//! row, then the process's open descriptors (`/proc/self/fd`) must be back at
//! what they were before, give or take a small constant.
//!
//! This file holds one test on purpose: the descriptor count is the whole
//! process's, and another test running alongside would move it.

mod support;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_net::{Server, VhostUserNet};
use virtio_net_standby::{Discard, StandbyNetBuilder};
use vmm_sys_util::eventfd::EventFd;

use support::{ServerThread, memfd};

/// Connections served in a row.
const CONNECTIONS: usize = 50;
/// Descriptors the count may differ by after them: a constant (a lazily
/// created descriptor, a thread's), far below one per connection.
const SLACK: usize = 4;
const SIZE: u64 = 1 << 20;
/// Where the frontend says it mapped guest memory.
const USER: u64 = 0x7f00_0000_0000;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// What the open descriptors are, by kind (`anon_inode:[eventfd]`,
/// `socket`, `/memfd:guest`...), with how many of each.
fn fd_kinds() -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy();
            // `socket:[1234]` and `/memfd:guest (deleted)` by kind only;
            // `anon_inode:[eventfd]` as it is.
            let kind = if t.starts_with("anon_inode:") {
                t.to_string()
            } else {
                t.split(['[', ' ']).next().unwrap_or("").to_string()
            };
            *kinds.entry(kind).or_insert(0) += 1;
        }
    }
    kinds
}

/// One frontend's session, as far as handing over its descriptors, then a
/// disconnect. `start`: also give the rings their size and addresses and kick
/// them, so that the device activates on them (its interrupts then go to the
/// call eventfds).
fn session(path: &PathBuf, net: &VhostUserNet<Discard>, start: bool) {
    let mem = memfd(c"guest", SIZE);
    let mut f = Frontend::connect(path, 2).unwrap();
    f.set_owner().unwrap();
    f.get_features().unwrap();
    // VERSION_1 and protocol features: no control queue to start.
    f.set_features((1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    f.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: SIZE,
        userspace_addr: USER,
        mmap_offset: 0,
        mmap_handle: mem.as_raw_fd(),
    }])
    .unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    for q in 0..2 {
        if start {
            // Rings in the (zeroed) region: nothing posted, nothing to move.
            let at = USER + 0x1_0000 * q as u64;
            f.set_vring_num(q, 64).unwrap();
            f.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: 256,
                    queue_size: 64,
                    flags: 0,
                    desc_table_addr: at,
                    avail_ring_addr: at + 0x1000,
                    used_ring_addr: at + 0x2000,
                    log_addr: None,
                },
            )
            .unwrap();
            f.set_vring_base(q, 0).unwrap();
        }
        f.set_vring_call(q, &calls[q]).unwrap();
        f.set_vring_kick(q, &kicks[q]).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }
    if start {
        kicks[0].write(1).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !net.is_active() {
            assert!(Instant::now() < end, "the device did not activate");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // A round trip: every message before it was handled.
    f.get_features().unwrap();
    // Dropping the frontend, the eventfds and the memory file closes our
    // copies; only the server's can remain.
}

#[test]
fn connections_leave_no_descriptor_behind() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fd-leak.sock");
    let dev = StandbyNetBuilder::new()
        .mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        .build(vec![Discard::new()])
        .unwrap();
    let net: Arc<VhostUserNet<Discard>> = VhostUserNet::new("leak", dev).unwrap();
    let server = Server::bind(&path, net.clone()).unwrap();
    let stats = server.stats();
    let _running = ServerThread::spawn(server);
    // Whatever the first connection creates once for good is part of the
    // baseline.
    session(&path, &net, true);
    // Waits until the server has torn down `n` connections.
    let settled = |n: u64| {
        let end = Instant::now() + Duration::from_secs(10);
        while stats.ended.load(Ordering::Acquire) < n {
            assert!(
                Instant::now() < end,
                "the server did not end connection {n}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    session(&path, &net, false);
    settled(2);
    let baseline = open_fds();
    let kinds_before = fd_kinds();

    for i in 0..CONNECTIONS {
        session(&path, &net, i % 2 == 0);
    }
    settled(2 + CONNECTIONS as u64);
    let now = open_fds();
    assert!(
        now <= baseline + SLACK,
        "{now} descriptors open after {CONNECTIONS} connections, {baseline} before: the server \
         keeps about {:.1} per connection; by kind, before {kinds_before:?}, after {:?}",
        (now - baseline) as f64 / CONNECTIONS as f64,
        fd_kinds()
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "no connection failed"
    );
}
