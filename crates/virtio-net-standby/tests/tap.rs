//! The standby device on a real tap. Frames go from guest memory into the tap
//! and are read back on a packet socket bound to the tap's interface; frames sent
//! on that socket come out in the guest's buffers. Needs `/dev/net/tun` and
//! CAP_NET_ADMIN: where the machine has neither, each test prints why and passes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};
use virtio_net_standby::features::DEFAULT_OFFER;
use virtio_net_standby::header::{GSO_TCPV4, VirtioNetHdr};
use virtio_net_standby::testing::{
    GuestDriver, GuestMem, PacketSocket, TestMemory, tcp4_frame, tso4_header,
};
use virtio_net_standby::{NetBackend, StandbyNet, StandbyNetBuilder, Tap};

const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// Opens a tap, or says why this machine cannot.
fn open_tap() -> Option<Tap> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: /dev/net/tun does not exist on this machine");
        return None;
    }
    let tap = match Tap::open("vnsbt%d") {
        Ok(t) => t,
        Err(e) => {
            println!(
                "SKIPPED: cannot create a tap ({e}: {:?}); run as root or with CAP_NET_ADMIN",
                std::error::Error::source(&e)
            );
            return None;
        }
    };
    // Quiet the interface: no IPv6 autoconfiguration chatter.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name()),
        "1",
    );
    tap.set_up().expect("bring the tap up");
    Some(tap)
}

/// The next incoming frame with the test or IPv4 EtherType, after `skip` leading
/// bytes (a vnet header); None after 5 s.
fn recv_test_frame(wire: &PacketSocket, skip: usize) -> Option<Vec<u8>> {
    wire.recv_matching(Duration::from_secs(5), |f| {
        let e = f.get(skip..).unwrap_or_default();
        e.len() >= 14 && (e[12..14] == ETHERTYPE_TEST || e[12..14] == [0x08, 0x00])
    })
}

fn standby(tap: Tap) -> StandbyNet<GuestMem, Tap> {
    StandbyNetBuilder::new()
        .mac(GUEST_MAC)
        .build(vec![tap])
        .unwrap()
}

fn test_frame(dst: [u8; 6], src: [u8; 6], i: usize, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST);
    f.extend((0..len - 14).map(|o| (i * 13 + o) as u8));
    f
}

#[test]
fn guest_frames_go_into_the_tap_and_tap_frames_into_the_guest() {
    let Some(tap) = open_tap() else { return };
    let wire = PacketSocket::open(&tap, false).unwrap();
    let mut dev = standby(tap);
    let mem = TestMemory::new(64 << 20);
    let mut g = GuestDriver::bring_up(&mut dev, &mem, DEFAULT_OFFER, 256).unwrap();

    // TX: guest memory -> tap -> packet socket.
    let sizes = [60usize, 64, 128, 600, 1000, 1514];
    let frames: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &l)| test_frame(HOST_MAC, GUEST_MAC, i, l))
        .collect();
    for f in &frames {
        g.queue_tx(0, f);
    }
    g.tx[0].publish();
    let p = dev.queue_pair(0).unwrap().process_tx();
    assert_eq!(p.chains, frames.len());
    for f in &frames {
        let got = recv_test_frame(&wire, 0).expect("frame seen on the tap's interface");
        assert_eq!(
            got,
            f[12..],
            "the wire sees the frame without the virtio-net header"
        );
    }
    assert_eq!(dev.counters().tx_frames, frames.len() as u64);

    // RX: packet socket -> tap -> guest buffers.
    g.post_rx(0, 256);
    let frames: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &l)| test_frame(GUEST_MAC, HOST_MAC, i + 100, l))
        .collect();
    for f in &frames {
        wire.send(&f[12..]).unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < frames.len() && Instant::now() < deadline {
        dev.queue_pair(0).unwrap().process_rx();
        while let Some(f) = g.recv(0) {
            if f[24..26] == ETHERTYPE_TEST {
                got.push(f);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got.len(), frames.len(), "every frame reached the guest");
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(g[12..], f[12..]);
        assert_eq!(u16::from_le_bytes([g[10], g[11]]), 1, "num_buffers");
    }
}

#[test]
fn tso_frames_cross_the_tap_in_both_directions() {
    let Some(tap) = open_tap() else { return };
    let plain = PacketSocket::open(&tap, false).unwrap();
    let wire = PacketSocket::open(&tap, true).unwrap();
    let mut dev = standby(tap);
    let mem = TestMemory::new(64 << 20);
    let mut g = GuestDriver::bring_up(&mut dev, &mem, DEFAULT_OFFER, 256).unwrap();
    assert!(g.features.has(VIRTIO_NET_F_GUEST_TSO4));

    // Guest TX of a 20 000-byte TSO frame: the tap must accept our header.
    let hdr = tso4_header(1448);
    let mut f = hdr.to_bytes().to_vec();
    f.extend(tcp4_frame(HOST_MAC, GUEST_MAC, 20_000));
    g.queue_tx(0, &f);
    g.tx[0].publish();
    dev.queue_pair(0).unwrap().process_tx();
    let c = dev.counters();
    assert_eq!((c.tx_frames, c.tx_dropped_backend), (1, 0), "{c:?}");
    let seen = recv_test_frame(&plain, 0).expect("the TSO frame reached the interface");
    assert_eq!(
        seen.len(),
        20_054,
        "the stack sees one 20 000-byte segment train"
    );

    // Host -> guest with GSO: the tap hands the frame over unsegmented (the guest
    // negotiated GUEST_TSO4), spread over merged buffers.
    g.post_rx(0, 256);
    let mut f = Vec::new();
    // struct virtio_net_hdr for the packet socket (10 bytes).
    f.extend_from_slice(&hdr.to_bytes()[..10]);
    f.extend(tcp4_frame(GUEST_MAC, HOST_MAC, 30_000));
    wire.send(&f).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        dev.queue_pair(0).unwrap().process_rx();
        while let Some(fr) = g.recv(0) {
            if fr[24..26] == [0x08, 0x00] {
                got = Some(fr);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = got.expect("the GSO frame reached the guest");
    let rh = VirtioNetHdr::from_bytes(got[..12].try_into().unwrap());
    assert_eq!(rh.gso_type, GSO_TCPV4, "delivered as one GSO frame: {rh:?}");
    assert_eq!(rh.gso_size, 1448);
    assert_eq!(got.len(), 12 + 14 + 40 + 30_000);
    assert_eq!(usize::from(rh.num_buffers), got.len().div_ceil(1536));
    assert_eq!(got[12 + 54..], f[10 + 54..]);
}

#[test]
fn without_guest_tso_the_kernel_segments_for_the_guest() {
    let Some(tap) = open_tap() else { return };
    let wire = PacketSocket::open(&tap, true).unwrap();
    let mut dev = standby(tap);
    let mem = TestMemory::new(64 << 20);
    let no_gso = DEFAULT_OFFER
        .without(VIRTIO_NET_F_GUEST_TSO4)
        .without(VIRTIO_NET_F_GUEST_TSO6)
        .without(VIRTIO_NET_F_GUEST_UFO);
    let no_gso = virtio_net_standby::features::prune(no_gso);
    let mut g = GuestDriver::bring_up(&mut dev, &mem, no_gso, 256).unwrap();
    g.post_rx(0, 256);
    let hdr = tso4_header(1000);
    let mut f = hdr.to_bytes()[..10].to_vec();
    f.extend(tcp4_frame(GUEST_MAC, HOST_MAC, 5000));
    wire.send(&f).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut segments = Vec::new();
    while segments.len() < 5 && Instant::now() < deadline {
        dev.queue_pair(0).unwrap().process_rx();
        while let Some(fr) = g.recv(0) {
            if fr[24..26] == [0x08, 0x00] {
                segments.push(fr);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(segments.len(), 5, "5 000 bytes in 1 000-byte segments");
    for s in &segments {
        assert_eq!(s[1], 0, "no GSO type towards a guest without GUEST_TSO4");
        assert_eq!(s.len(), 12 + 14 + 40 + 1000);
    }
}

#[test]
fn multi_queue_taps_attach_and_detach() {
    if open_tap().is_none() {
        return;
    }
    let mut queues = Tap::open_queues("vnsbmq%d", 4).unwrap();
    assert_eq!(queues.len(), 4);
    let name = queues[0].name().to_string();
    assert!(
        queues
            .iter()
            .all(|q| q.name() == name && q.is_multi_queue())
    );
    for q in queues.iter_mut().skip(2) {
        q.set_enabled(false).unwrap();
        q.set_enabled(false).unwrap(); // idempotent
        q.set_enabled(true).unwrap();
    }
    // A device on four queues offers MQ.
    let dev: StandbyNet<GuestMem, Tap> = StandbyNetBuilder::new()
        .queue_pairs(4)
        .build(queues)
        .unwrap();
    assert!(
        dev.offered_features()
            .has(virtio_bindings::virtio_net::VIRTIO_NET_F_MQ)
    );
}

#[test]
fn a_tap_fd_from_elsewhere_is_taken_over() {
    let Some(tap) = open_tap() else { return };
    let name = tap.name().to_string();
    // Re-open by fd: dup the descriptor as a VMM receiving it from libvirt would.
    // SAFETY: F_DUPFD_CLOEXEC on a live fd; checked.
    let fd = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let again = Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap();
    assert_eq!(again.name(), name);
    assert!(
        again
            .offloads_supported()
            .has(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4)
    );
}
