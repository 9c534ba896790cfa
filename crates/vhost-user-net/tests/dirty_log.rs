//! Dirty logging through the protocol, as a migrating frontend drives it: the
//! `vhost` crate's frontend shares guest memory (a memory file at a guest
//! physical address other than 0) and a log (a second memory file), sets up
//! the RX and TX rings, and turns logging on the way QEMU does
//! (`SET_LOG_BASE`, `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`, `SET_FEATURES`
//! with `VHOST_F_LOG_ALL`). Frames then arrive from the device's backend. The
//! log must mark every page the device wrote (each RX buffer's bytes, header
//! included, and the used ring at its `log_guest_addr`) and nothing else;
//! with logging off again it must stay clear. `SEND_RARP` sends the
//! announcement on the backend.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_net::{Server, VhostUserNet, control, rarp_frame};
use virtio_net_standby::{PairBackend, PairConfig, StandbyNetBuilder, pair};
use vmm_sys_util::eventfd::EventFd;

use support::{ServerThread, map_shared, memfd, send_frame, wait_until};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Guest physical address and size of the one memory region.
const GPA: u64 = 0x10_0000;
const SIZE: u64 = 4 << 20;
/// The address the frontend says it mapped the region at (the backend only
/// translates ring addresses with it).
const USER: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 64;
/// Ring areas, as guest physical addresses.
const RX_DESC: u64 = GPA;
const RX_AVAIL: u64 = GPA + 0x1000;
const RX_USED: u64 = GPA + 0x2000;
const TX_DESC: u64 = GPA + 0x4000;
const TX_AVAIL: u64 = GPA + 0x5000;
const TX_USED: u64 = GPA + 0x6000;
/// Where the frontend asks the RX used ring to be logged: elsewhere than the
/// ring, so that the test tells the two apart (QEMU gives the ring's own
/// address; the TX ring here does the same).
const RX_USED_LOG: u64 = GPA + 0x30_0000;
/// RX buffers: 16 KiB apart, so that no two share or neighbour a page.
const BUF0: u64 = GPA + 0x10_0000;
const BUF_STRIDE: u64 = 0x4000;
const BUF_LEN: u32 = 2048;
const BUFFERS: u16 = 32;
const PAGE: u64 = 4096;
/// The log covers guest memory up to 64 MiB.
const LOG_LEN: u64 = 4096;

/// A shared mapping of a memory file, accessed by offset.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: &OwnedFd, len: u64) -> Map {
        Map {
            ptr: map_shared(fd, len as usize),
            len: len as usize,
        }
    }

    fn at(&self, off: u64, n: usize) -> *mut u8 {
        assert!(off as usize + n <= self.len);
        // SAFETY: within the mapping, checked above.
        unsafe { self.ptr.add(off as usize) }
    }

    fn write(&self, off: u64, b: &[u8]) {
        // SAFETY: `at` checked the range; the device only writes other bytes
        // meanwhile (or the same bytes, as a guest racing its own device).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.at(off, b.len()), b.len()) };
    }

    fn read(&self, off: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.at(off, n), v.as_mut_ptr(), n) };
        v
    }

    fn zero(&self) {
        // SAFETY: the whole mapping.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) };
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest memory by guest physical address.
struct Guest(Map);

impl Guest {
    fn w16(&self, gpa: u64, v: u16) {
        self.0.write(gpa - GPA, &v.to_le_bytes());
    }
    fn w32(&self, gpa: u64, v: u32) {
        self.0.write(gpa - GPA, &v.to_le_bytes());
    }
    fn w64(&self, gpa: u64, v: u64) {
        self.0.write(gpa - GPA, &v.to_le_bytes());
    }
    fn r16(&self, gpa: u64) -> u16 {
        // SAFETY: an aligned u16 inside the mapping, read atomically as the
        // device writes it.
        let a = unsafe { &*(self.0.at(gpa - GPA, 2) as *const std::sync::atomic::AtomicU16) };
        u16::from_le(a.load(std::sync::atomic::Ordering::Acquire))
    }
    fn r32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.0.read(gpa - GPA, 4).try_into().unwrap())
    }
    fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        self.0.read(gpa - GPA, n)
    }
}

fn buf(i: u16) -> u64 {
    BUF0 + u64::from(i) * BUF_STRIDE
}

fn marked(log: &Map) -> Vec<u64> {
    let bytes = log.read(0, LOG_LEN as usize);
    (0..LOG_LEN * 8)
        .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

fn pages(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    gpa / PAGE..=(gpa + len - 1) / PAGE
}

/// A served device and a frontend double connected to it, rings started.
struct Session {
    net: Arc<VhostUserNet<PairBackend>>,
    /// The host's side of the device's backend.
    peer: PairBackend,
    f: Frontend,
    stream: UnixStream,
    guest: Guest,
    /// The features acknowledged (without `LOG_ALL`), and those offered.
    features: u64,
    offered: u64,
    _mem: OwnedFd,
    _kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    _server: ServerThread,
}

fn ring(desc: u64, avail: u64, used: u64, log: Option<u64>) -> VringConfigData {
    let user = |gpa: u64| USER + (gpa - GPA);
    VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: if log.is_some() {
            VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
        } else {
            0
        },
        desc_table_addr: user(desc),
        used_ring_addr: user(used),
        avail_ring_addr: user(avail),
        log_addr: log,
    }
}

/// Serves a device on socket `name` (`forced`: with dirty logging forced
/// on) and connects the frontend double: memory, both rings with every RX
/// buffer posted, the device started. No `LOG_ALL`, no log shared.
fn start(name: &str, forced: bool) -> Session {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let (ours, peer) = pair(PairConfig::default()).unwrap();
    let dev = StandbyNetBuilder::new()
        .mac(MAC)
        .queue_size(QSIZE)
        .build(vec![ours])
        .unwrap();
    let net: Arc<VhostUserNet<PairBackend>> = VhostUserNet::new("dirty", dev).unwrap();
    if forced {
        net.migration_log().set_forced(true);
    }
    let server = Server::bind(&path, net.clone()).unwrap();
    let server = ServerThread::spawn(server);

    let mem_fd = memfd(c"guest", SIZE);
    let guest = Guest(Map::new(&mem_fd, SIZE));

    let stream = UnixStream::connect(&path).unwrap();
    let mut f = Frontend::from_stream(stream.try_clone().unwrap(), 2);
    f.set_owner().unwrap();
    let offered = f.get_features().unwrap();
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(offered & log_all, 0, "VHOST_F_LOG_ALL offered");
    let features = (1u64 << 32) // VERSION_1
        | (1 << 29) // EVENT_IDX
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    f.set_features(features).unwrap();
    let pf = f.get_protocol_features().unwrap();
    for needed in [
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::RARP,
    ] {
        assert!(pf.contains(needed), "{needed:?} offered");
    }
    f.set_protocol_features(
        VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA,
        memory_size: SIZE,
        userspace_addr: USER,
        mmap_offset: 0,
        mmap_handle: mem_fd.as_raw_fd(),
    }])
    .unwrap();
    let rings = [(RX_DESC, RX_AVAIL, RX_USED), (TX_DESC, TX_AVAIL, TX_USED)];
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    // RX buffers, all posted before the rings start.
    for i in 0..BUFFERS {
        let d = RX_DESC + 16 * u64::from(i);
        guest.w64(d, buf(i));
        guest.w32(d + 8, BUF_LEN);
        guest.w16(d + 12, 2); // VRING_DESC_F_WRITE
        guest.w16(RX_AVAIL + 4 + 2 * u64::from(i), i);
    }
    guest.w16(RX_AVAIL + 2, BUFFERS);
    for (q, &(d, a, u)) in rings.iter().enumerate() {
        f.set_vring_num(q, QSIZE).unwrap();
        f.set_vring_addr(q, &ring(d, a, u, None)).unwrap();
        f.set_vring_base(q, 0).unwrap();
        f.set_vring_call(q, &calls[q]).unwrap();
        f.set_vring_kick(q, &kicks[q]).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }
    kicks[0].write(1).unwrap();
    wait_until("the device to start", || net.is_active());
    Session {
        net,
        peer,
        f,
        stream,
        guest,
        features,
        offered,
        _mem: mem_fd,
        _kicks: kicks,
        _calls: calls,
        _server: server,
    }
}

/// Frame lengths the tests send, each into its own buffer.
const LENS: [usize; 8] = [60, 1514, 300, 2048, 1000, 64, 1500, 777];

/// Sends [`LENS`] from the host's side, waits for them in the RX used ring
/// (which held `used` entries before), checks each one's bytes, and returns
/// the pages of the buffers they were written to.
fn receive(s: &mut Session, used: u16) -> BTreeSet<u64> {
    let sent: Vec<Vec<u8>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &l)| send_frame(&mut s.peer, MAC, l, i as u8 + 1))
        .collect();
    let n = LENS.len() as u16;
    wait_until("the frames in the used ring", || {
        s.guest.r16(RX_USED + 2) == used + n
    });
    let mut pages_written = BTreeSet::new();
    for k in 0..n {
        let e = RX_USED + 4 + 8 * u64::from(used + k);
        let (id, len) = (s.guest.r32(e) as u16, s.guest.r32(e + 4));
        assert!(id < BUFFERS);
        // The header's num_buffers is 1; the frame follows as sent.
        assert_eq!(len as usize, sent[usize::from(k)].len());
        let got = s.guest.read(buf(id), len as usize);
        assert_eq!(&got[12..], &sent[usize::from(k)][12..], "frame {k}");
        pages_written.extend(pages(buf(id), u64::from(len)));
    }
    pages_written
}

#[test]
fn every_page_the_device_writes_is_logged_and_nothing_else() {
    let mut s = start("dirty-log.sock", false);
    let log_fd = memfd(c"log", LOG_LEN);
    let log = Map::new(&log_fd, LOG_LEN);
    let (features, offered) = (s.features, s.offered);
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();

    // Logging on, in QEMU's order.
    s.f.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: LOG_LEN,
            mmap_offset: 0,
            mmap_handle: log_fd.as_raw_fd(),
        }),
    )
    .unwrap();
    s.f.set_vring_addr(0, &ring(RX_DESC, RX_AVAIL, RX_USED, Some(RX_USED_LOG)))
        .unwrap();
    s.f.set_vring_addr(1, &ring(TX_DESC, TX_AVAIL, TX_USED, Some(TX_USED)))
        .unwrap();
    s.f.set_features(features | log_all).unwrap();
    assert_eq!(
        s.f.get_features().unwrap() & log_all,
        log_all,
        "a round trip"
    );
    assert!(s.net.migration_log().logging());
    assert!(s.net.is_active(), "LOG_ALL does not restart the device");
    log.zero();

    // Frames of assorted lengths, each in its own buffer.
    let mut expected = receive(&mut s, 0);
    let n = LENS.len() as u16;
    // The used ring (entries, index, avail event) at its log_guest_addr.
    expected.extend(pages(RX_USED_LOG, 6 + 8 * u64::from(QSIZE)));
    let got: BTreeSet<u64> = marked(&log).into_iter().collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "pages written but not logged: {missing:x?}"
    );
    // The TX ring's avail event may have been written (its own address);
    // nothing else may be marked, not the RX used ring's own page either.
    let extra: Vec<_> = got
        .difference(&expected)
        .filter(|&&p| !pages(TX_USED, 6 + 8 * u64::from(QSIZE)).contains(&p))
        .collect();
    assert!(extra.is_empty(), "pages logged but not written: {extra:x?}");
    assert!(!got.contains(&(RX_USED / PAGE)));
    assert_eq!(s.net.migration_log().stats().missed, 0);

    // Logging off: further writes leave the log alone.
    s.f.set_features(features).unwrap();
    // SET_FEATURES wants no reply: a round trip makes sure it was handled.
    s.f.get_features().unwrap();
    assert!(!s.net.migration_log().logging());
    log.zero();
    send_frame(&mut s.peer, MAC, 200, 99);
    wait_until("one more frame", || s.guest.r16(RX_USED + 2) == n + 1);
    assert!(marked(&log).is_empty(), "{:x?}", marked(&log));

    // SEND_RARP (19), reply wanted: the announcement goes out on the backend.
    s.peer.discard_incoming();
    let mut m = Vec::new();
    m.extend_from_slice(&19u32.to_le_bytes());
    m.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&MAC);
    m.extend_from_slice(&[0, 0]);
    let mut stream = &s.stream;
    stream.write_all(&m).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 19);
    assert_eq!(reply[4], 0x5, "a reply");
    assert_eq!(&reply[12..], &[0u8; 8], "success");
    // One record: the frame and 8 to 15 bytes of the pair's framing.
    let got = s.peer.discard_incoming();
    let frame = rarp_frame(MAC).len();
    assert!(
        (frame + 8..frame + 16).contains(&got),
        "one RARP frame on the backend, {got} bytes"
    );
    // Still served.
    assert_eq!(s.f.get_features().unwrap(), offered);
}

/// Every page a log of the backend's own has marked.
fn own_marked(net: &VhostUserNet<PairBackend>) -> BTreeSet<u64> {
    let area = net
        .migration_log()
        .area()
        .expect("a log of the backend's own");
    (0..area.covers() / PAGE)
        .filter(|&p| area.is_marked(p * PAGE))
        .collect()
}

/// Forced logging (the daemon's `--force-dirty-log`), with a frontend that
/// never migrates, as DPDK's virtio-user: no `LOG_ALL`, no `SET_LOG_BASE`,
/// no `VHOST_VRING_F_LOG`. The backend's own log, sized from the memory
/// table, marks the pages of every RX buffer written and the used ring at
/// its own address, and nothing else; the frontend switching `LOG_ALL`
/// does not turn it off.
#[test]
fn forced_logging_marks_what_the_device_writes_without_log_all() {
    let mut s = start("dirty-forced.sock", true);
    let ml = s.net.migration_log().clone();
    assert!(ml.logging() && ml.forced());
    let area = ml.area().expect("a log allocated at SET_MEM_TABLE");
    assert!(area.covers() >= GPA + SIZE, "covers {:#x}", area.covers());
    let used_pages = |used: u64| pages(used, 6 + 8 * u64::from(QSIZE));
    let rings: BTreeSet<u64> = used_pages(RX_USED).chain(used_pages(TX_USED)).collect();
    // Before any frame: at most the rings' avail events.
    let before = own_marked(&s.net);
    assert!(before.is_subset(&rings), "{before:x?}");

    let mut expected = receive(&mut s, 0);
    expected.extend(used_pages(RX_USED));
    // The device reports a batch's writes right after publishing it: the
    // used index may be seen a moment before the bits.
    wait_until("every page written in the log", || {
        expected.is_subset(&own_marked(&s.net))
    });
    let got = own_marked(&s.net);
    let extra: Vec<_> = got
        .difference(&expected)
        .filter(|p| !rings.contains(p))
        .collect();
    assert!(extra.is_empty(), "pages logged but not written: {extra:x?}");
    let stats = ml.stats();
    assert!(stats.logged > 0 && stats.missed == 0, "{stats:?}");
    let status = control::execute("status", &s.net);
    assert!(
        status.contains(" dirty_log=forced dirty_writes="),
        "{status}"
    );
    assert!(status.contains(" dirty_missed=0"), "{status}");

    // The frontend acknowledging LOG_ALL and leaving it again changes nothing.
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    s.f.set_features(s.features | log_all).unwrap();
    s.f.set_features(s.features).unwrap();
    // SET_FEATURES wants no reply: a round trip makes sure it was handled.
    s.f.get_features().unwrap();
    assert!(ml.logging());
    assert!(s.net.is_active());
    let n = LENS.len() as u16;
    send_frame(&mut s.peer, MAC, 1000, 77);
    wait_until("one more frame", || s.guest.r16(RX_USED + 2) == n + 1);
    let e = RX_USED + 4 + 8 * u64::from(n);
    let id = s.guest.r32(e) as u16;
    wait_until("the last buffer in the log", || {
        own_marked(&s.net).contains(&(buf(id) / PAGE))
    });
}

/// Without forcing, a frontend that does not migrate gets no log and no
/// write is reported to one.
#[test]
fn without_forcing_a_frontend_that_does_not_migrate_logs_nothing() {
    let mut s = start("dirty-unforced.sock", false);
    receive(&mut s, 0);
    let ml = s.net.migration_log();
    assert!(!ml.logging() && !ml.forced());
    assert!(ml.area().is_none());
    assert_eq!(ml.stats().logged, 0);
    let status = control::execute("status", &s.net);
    assert!(
        status.contains(" dirty_log=off dirty_writes=0 dirty_missed=0"),
        "{status}"
    );
}
