//! The server against a frontend in this process: the `vhost` crate's own
//! frontend for well-formed sessions, raw bytes for everything a frontend must
//! not send. After every bad connection the next frontend is served.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user_net::{Server, ServerStats, ShutdownHandle, VhostUserNet, protocol_features};
use virtio_net_standby::features::F_STANDBY;
use virtio_net_standby::{Discard, StandbyNetBuilder};

struct Running {
    path: PathBuf,
    stop: ShutdownHandle,
    stats: Arc<ServerStats>,
    net: Arc<VhostUserNet<Discard>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn start(tag: &str) -> Running {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("proto-{tag}.sock"));
    let dev = StandbyNetBuilder::new()
        .mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        .mtu(1400)
        .build(vec![Discard::new()])
        .unwrap();
    let net = VhostUserNet::new(tag, dev).unwrap();
    let server = Server::bind(&path, net.clone()).unwrap();
    let stop = server.shutdown_handle();
    let stats = server.stats();
    let thread = std::thread::spawn(move || server.run().unwrap());
    Running {
        path,
        stop,
        stats,
        net,
        thread: Some(thread),
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A well-formed session: features, protocol features, the configuration space.
fn good_session(r: &Running) {
    let mut f = Frontend::connect(&r.path, 3).unwrap();
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    assert_ne!(features & (1 << F_STANDBY), 0, "STANDBY offered");
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    f.set_features(features).unwrap();
    let pf = f.get_protocol_features().unwrap();
    assert_eq!(pf, protocol_features());
    f.set_protocol_features(pf).unwrap();
    assert_eq!(f.get_queue_num().unwrap(), 3);
    let (_, cfg) = f
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .unwrap();
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56], "MAC");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400, "MTU");
    // The device negotiated what the frontend acked (STANDBY fired).
    assert!(r.net.with_device(|d| d.standby_negotiated()));
}

fn header(request: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// Sends `bytes`, then expects the server to close the connection.
fn refused(r: &Running, bytes: &[u8]) {
    let mut s = UnixStream::connect(&r.path).unwrap();
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) => panic!("the server kept a bad connection open: {e}"),
        }
    }
}

#[test]
fn malformed_frontends_are_dropped_and_the_next_is_served() {
    let r = start("malformed");
    good_session(&r);
    let cases: Vec<Vec<u8>> = vec![
        // Oversized: a SET_CONFIG claiming a megabyte.
        header(25, 1 << 20),
        // An unknown request code.
        header(0xdead, 0),
        // GET_FEATURES with a reply flag and a body it must not have.
        {
            let mut m = header(1, 8);
            m[4] = 0x5;
            m.extend_from_slice(&[0; 8]);
            m
        },
        // SET_VRING_NUM for a queue that does not exist, then garbage.
        {
            let mut m = header(8, 8);
            m.extend_from_slice(&1000u32.to_le_bytes());
            m.extend_from_slice(&256u32.to_le_bytes());
            m.extend_from_slice(&header(0xffff_ffff, 0xffff_ffff));
            m
        },
        // SET_MEM_TABLE without its descriptors.
        {
            let mut m = header(5, 40);
            m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
            m.extend_from_slice(&[0u8; 32]);
            m
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        refused(&r, c);
        wait_until(&format!("case {i} to end"), || {
            r.stats.connections.load(Ordering::Relaxed) == 2 * i as u64 + 2
        });
        good_session(&r);
    }
    // A header cut short, then the frontend hangs up: a disconnect (as a
    // frontend that crashed mid-write), not a failure.
    {
        let mut s = UnixStream::connect(&r.path).unwrap();
        s.write_all(&[1, 0, 0]).unwrap();
    }
    good_session(&r);
    let failed = r.stats.failed.load(Ordering::Relaxed);
    assert!(failed >= 3, "refusals are counted as failures: {failed}");
}

#[test]
fn reconnecting_frontend_starts_from_a_reset_device() {
    let r = start("reconnect");
    for _ in 0..3 {
        good_session(&r);
        wait_until("the device to reset after the disconnect", || {
            !r.net.with_device(|d| d.standby_negotiated())
        });
        assert!(!r.net.channel().is_attached());
    }
    assert_eq!(r.stats.connections.load(Ordering::Relaxed), 3);
    assert_eq!(r.stats.failed.load(Ordering::Relaxed), 0);
}
