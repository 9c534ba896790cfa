//! The server against a frontend in this process: the `vhost` crate's own
//! frontend for well-formed sessions, raw bytes for everything a frontend must
//! not send. After every bad connection the next frontend is served.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user_net::{Server, ServerStats, VhostUserNet, protocol_features};
use virtio_net_standby::features::F_STANDBY;
use virtio_net_standby::{Discard, StandbyNetBuilder};

use support::{ServerThread, wait_until};

struct Running {
    path: PathBuf,
    stats: Arc<ServerStats>,
    net: Arc<VhostUserNet<Discard>>,
    _server: ServerThread,
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
    let stats = server.stats();
    Running {
        path,
        stats,
        net,
        _server: ServerThread::spawn(server),
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

/// QEMU's order (see `vhost_user_net::relay`): protocol features without
/// `CONFIG`, then `SET_VRING_ENABLE` with a reply wanted, long before
/// `SET_FEATURES`. The connection must survive it; then, with the link down,
/// such a frontend (which cannot be told) is disconnected and the socket
/// closed until the link is up, while one that acknowledged `CONFIG` stays.
#[test]
fn qemu_order_and_the_link_of_a_frontend_without_config() {
    let r = start("qemu-order");
    let stream = UnixStream::connect(&r.path).unwrap();
    let mut f = Frontend::from_stream(stream.try_clone().unwrap(), 3);
    let features = f.get_features().unwrap();
    let pf = f.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
    f.set_protocol_features(pf - VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    assert_eq!(f.get_queue_num().unwrap(), 3);
    let (ours, _theirs) = UnixStream::pair().unwrap();
    f.set_backend_request_fd(&ours).unwrap();
    f.set_owner().unwrap();
    // What the `vhost` crate's frontend refuses to send this early.
    let mut s = &stream;
    for ring in 0u32..2 {
        let mut m = header(18, 8);
        m[4] = 0x1 | 0x8;
        m.extend_from_slice(&ring.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        s.write_all(&m).unwrap();
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply[0], 18, "a SET_VRING_ENABLE reply");
        assert_eq!(reply[4], 0x5, "flags: version 1, reply");
        assert_eq!(&reply[12..], &[0u8; 8], "success");
    }
    f.set_features(features).unwrap();
    assert_eq!(f.get_queue_num().unwrap(), 3, "still served");
    assert!(r.net.with_device(|d| d.standby_negotiated()));
    assert_eq!(r.net.channel().takes_config_changes(), Some(false));

    r.net.set_link_up(false);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "disconnected for the link");
    wait_until("the socket to close", || !r.path.exists());
    assert!(UnixStream::connect(&r.path).is_err());
    r.net.set_link_up(true);
    wait_until("the socket to come back", || r.path.exists());
    good_session(&r);

    // A frontend that acknowledged CONFIG is told instead.
    let mut f = Frontend::connect(&r.path, 3).unwrap();
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    f.set_features(features).unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf).unwrap();
    assert_eq!(f.get_queue_num().unwrap(), 3, "a round trip");
    assert_eq!(r.net.channel().takes_config_changes(), Some(true));
    r.net.set_link_up(false);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.get_queue_num().unwrap(), 3, "still connected");
    assert!(r.path.exists());
    r.net.set_link_up(true);
    assert_eq!(r.stats.failed.load(Ordering::Relaxed), 0);
}

#[test]
fn sockets_are_created_for_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let r = start("mode");
    let mode = std::fs::metadata(&r.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    good_session(&r);
    // Told otherwise.
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proto-mode660.sock");
    let dev = StandbyNetBuilder::new()
        .build(vec![Discard::new()])
        .unwrap();
    let net = VhostUserNet::new("mode660", dev).unwrap();
    let _server = Server::bind_with_mode(&path, net.clone(), 0o660).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // The control socket too.
    let ctl = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proto-mode.ctl");
    vhost_user_net::control::spawn(&ctl, net).unwrap();
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No leftovers beside the sockets.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".proto-mode"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn client_mode_connects_and_reconnects_to_a_listening_frontend() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proto-client.sock");
    let _ = std::fs::remove_file(&path);
    let dev = StandbyNetBuilder::new()
        .mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        .build(vec![Discard::new()])
        .unwrap();
    let net = VhostUserNet::new("client", dev).unwrap();
    let server = Server::connect(&path, net.clone()).unwrap();
    assert!(server.is_client());
    let stop = server.shutdown_handle();
    let stats = server.stats();
    let thread = std::thread::spawn(move || server.run().unwrap());
    // The frontend is not listening yet: the daemon keeps trying.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(stats.connections.load(Ordering::Relaxed), 0);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    for round in 0..3 {
        let (stream, _) = listener.accept().unwrap();
        let f = Frontend::from_stream(stream, 3);
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        assert_ne!(features & (1 << F_STANDBY), 0, "round {round}");
        f.set_features(features).unwrap();
        assert_eq!(f.get_features().unwrap(), features, "a round trip");
        assert!(net.with_device(|d| d.standby_negotiated()));
        // The frontend goes away (QEMU restarted): the daemon comes back.
        drop(f);
    }
    // The frontend's socket disappears for a while, then listens again.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let f = Frontend::from_stream(stream, 3);
    assert_ne!(f.get_features().unwrap() & (1 << F_STANDBY), 0);
    assert!(stats.connections.load(Ordering::Relaxed) >= 4);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    drop(f);
    stop.shutdown();
    thread.join().unwrap();
}
