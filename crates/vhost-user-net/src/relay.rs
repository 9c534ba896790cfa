//! The frontend's socket, relayed message by message to the `vhost` crate's
//! request handler.
//!
//! The relay frames every message the frontend sends (12-byte header, payload,
//! attached descriptors) and passes it on unchanged except for what real
//! frontends get wrong:
//!
//! - User-Mode Linux sizes `SET_MEM_TABLE` for more regions than it describes;
//!   the `vhost` crate insists on the exact size and would drop the connection.
//!   The relay trims the payload to the regions the message counts.
//! - QEMU sends `SET_VRING_ENABLE` before `SET_FEATURES`: it takes
//!   `VHOST_USER_F_PROTOCOL_FEATURES` as negotiated once `GET_FEATURES` offered
//!   it and `SET_PROTOCOL_FEATURES` went through, as the specification's
//!   protocol-feature negotiation reads, and enables a queue pair's rings as
//!   soon as its virtio-net device attaches the queues, at every device reset
//!   (see the `QEMU` section below). The `vhost` crate's
//!   handler (and `vhost-user-backend`'s, behind it) only accept
//!   `SET_VRING_ENABLE` once `SET_FEATURES` acknowledged bit 30, and end the
//!   connection otherwise (`inactive feature: 1073741824`). The relay holds such
//!   an early `SET_VRING_ENABLE`, acknowledges it itself if the frontend asked
//!   for a reply, and hands the handler the last state of each held ring right
//!   after the `SET_FEATURES` that acknowledges bit 30; without bit 30 the rings
//!   start enabled and the held states are dropped, as the specification says.
//!
//! It refuses, by closing the connection with a logged reason, what no frontend
//! may send: a message longer than the protocol's 4096-byte limit, a header cut
//! short, or more descriptors than the protocol allows. An early
//! `SET_VRING_ENABLE` it would hold that names a ring beyond the device's
//! (`GET_QUEUE_NUM`) is refused as the handler refuses a bad ring index in any
//! other request: a failure reply if the frontend asked for one, then the
//! connection ends.
//!
//! It also watches messages on their way through: the protocol features the
//! frontend acknowledged and the backend-request channel it hands over, which the
//! [`BackendChannel`] uses to send configuration-change notifications; and for
//! live migration (see [`crate::dirty`]) `SET_LOG_BASE`, whose log it
//! maps for the device (a log it cannot map ends the connection, so that the
//! frontend's migration fails rather than copying stale memory), and
//! `SET_VRING_ADDR`, whose `VHOST_VRING_F_LOG` and `log_guest_addr` say where a
//! ring's used-ring writes are logged. `SEND_RARP`, which the `vhost` crate's
//! handler does not know (it would end the connection), the relay answers
//! itself: the device sends the RARP announcement on its backend.
//!
//! Every request is logged at debug level (`RUST_LOG=vhost_user_net::relay=debug`),
//! decoded: the way to see a frontend's message sequence.
//!
//! # QEMU
//!
//! What QEMU 7.2's `-netdev vhost-user` under `-device virtio-net-pci` sends, in
//! its order, as this relay logged it (Debian's 7.2, a Linux 6.1 guest booting,
//! running, losing and regaining the link, powering off), and what the daemon
//! does with each. QEMU keeps one `vhost_dev` per queue pair: per-device
//! requests go once, per-ring ones for rings 0 and 1 (and the rings of further
//! pairs with `queues=`); the control queue stays in QEMU.
//!
//! | # | QEMU sends | when | the daemon |
//! |---|---|---|---|
//! | 1 | `GET_FEATURES` | connection (`vhost_user_backend_init`) | the device's virtio features and bit 30 |
//! | 2 | `GET_PROTOCOL_FEATURES` | | `CONFIG`, `MQ`, `REPLY_ACK`, `BACKEND_REQ`, `RESET_DEVICE`, `LOG_SHMFD`, `RARP` |
//! | 3 | `SET_PROTOCOL_FEATURES 0x202f` | | recorded; QEMU masked `CONFIG` out (and warns that it did) |
//! | 4 | `GET_QUEUE_NUM` | `MQ` | the device's queue count |
//! | 5 | `SET_BACKEND_REQ_FD`, reply wanted | `BACKEND_REQ` | kept; no configuration change is sent on it, since `CONFIG` is not acknowledged |
//! | 6 | `SET_OWNER` | `vhost_dev_init` | accepted |
//! | 7 | `GET_FEATURES` | | as 1 |
//! | 8 | `SET_VRING_CALL`, `SET_VRING_ERR`, rings 0 and 1 | `vhost_virtqueue_init` | stored |
//! | 9 | `SET_VRING_ENABLE` rings 0 and 1 → 1 | machine reset, then every reset and feature write of the guest's driver (`peer_attach`) | **before `SET_FEATURES`: held** by the relay (acknowledged if a reply is wanted; 7.2 wants none) |
//! | 10 | `SET_FEATURES` with bit 30 | the driver's `DRIVER_OK` (`vhost_net_start`) | the device negotiates; the relay then hands over the held ring states (QEMU 7.2 sends no `SET_VRING_ENABLE` after starting the rings: without them the rings would stay disabled) |
//! | 11 | `SET_MEM_TABLE`, reply wanted | | mapped; QEMU refuses vhost-user without shared guest memory (`memory-backend-memfd,share=on`) |
//! | 12 | `SET_VRING_NUM`, `SET_VRING_BASE`, `SET_VRING_ADDR`, `SET_VRING_KICK`, `SET_VRING_CALL`, ring 0 then ring 1 | | rings started; the device activates on the first kick |
//! | 13 | `GET_VRING_BASE` rings 0 and 1 | the driver's reset or power-off, QEMU's link down | the device stops and returns each ring's position |
//! | 14 | `SET_VRING_ENABLE` rings 0 and 1 → 1 | the reset that follows | passed on (features are acknowledged by then) |
//!
//! A migration, as the source's daemon saw it (`migrate` of a running guest):
//!
//! | # | QEMU sends | when | the daemon |
//! |---|---|---|---|
//! | M1 | `SET_LOG_BASE` with the log's memory file | the migration's setup (dirty logging starts) | the relay maps the log; the handler answers |
//! | M2 | `SET_FEATURES` with `VHOST_F_LOG_ALL`, reply wanted | | logging on; the device keeps running (only the log switch changed) |
//! | M3 | `SET_VRING_ADDR` rings 0 and 1 with `VHOST_VRING_F_LOG`, reply wanted | | each ring's `log_guest_addr` noted (QEMU's is the used ring's own address) |
//! | M4 | `GET_VRING_BASE` rings 0 and 1 | the source stops | the device stops; its last writes are in the log before the reply |
//!
//! The destination's QEMU starts the rings as at 10 to 12, with `SET_VRING_BASE`
//! at the positions the source reported. After the migration QEMU sends
//! `SEND_RARP` only if the guest did not negotiate `GUEST_ANNOUNCE` (a Linux
//! guest does, and announces itself).
//!
//! With `queues=N` (and `--queue-pairs N`), every further pair's `vhost_dev`
//! repeats 1 to 3 and 7 to 13 for its own rings (`SET_FEATURES` once per pair,
//! per-device requests once), and at each reset QEMU enables pair 0 and
//! disables the others (`SET_VRING_ENABLE` → 0 for rings 2 and up) until the
//! guest raises the pair count through the control queue QEMU serves.
//!
//! After a disconnection QEMU (with `reconnect=`) starts over at 1, and at 10
//! resends the features it had, with `SET_VRING_BASE` at the positions it
//! recovered from the used rings. QEMU acknowledges only the virtio bits a
//! vhost-user net backend may carry: not `STANDBY`, `CTRL_VQ`, `CTRL_RX`,
//! `MAC` or `STATUS`, which its own virtio-net serves; it forwards
//! `GUEST_ANNOUNCE` without `CTRL_VQ` (the backend prunes it) and `MQ`
//! without `CTRL_VQ` (kept: QEMU enables pairs by their rings). It sends no
//! `GET_CONFIG`, `SET_CONFIG`, `RESET_OWNER` or `RESET_DEVICE`. User-Mode
//! Linux and DPDK's virtio-user send `SET_FEATURES` before any
//! `SET_VRING_ENABLE`, which is why only QEMU met the `vhost` crate's check.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use vhost::vhost_user::message::{
    FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};

use crate::channel::BackendChannel;
use crate::dirty::{self, LogArea, MigrationLog};

/// Length of a vhost-user message header.
pub const HEADER_LEN: usize = 12;
/// Bytes of `VhostUserMemory` before its regions (`num_regions`, padding).
const MEM_TABLE_HEAD: usize = 8;
/// Bytes of one `VhostUserMemoryRegion`.
const MEM_REGION_LEN: usize = 32;
/// The protocol's limit on regions in one `SET_MEM_TABLE`.
const MAX_MEM_REGIONS: usize = 8;
/// Header flags: the protocol version, a reply, a reply wanted.
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Errors that end a relayed connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket failed.
    #[error("the relay's socket failed: {0}")]
    Io(#[from] io::Error),
    /// A message longer than the protocol allows.
    #[error(
        "the frontend sent request {request} with a {size}-byte payload; vhost-user messages carry at most {MAX_MSG_SIZE}"
    )]
    Oversized {
        /// The request code.
        request: u32,
        /// The size the header claimed.
        size: u32,
    },
    /// The connection ended inside a message.
    #[error("the frontend closed the connection in the middle of a message")]
    Truncated,
    /// Descriptors beyond what a message may carry (or a control message cut
    /// short by the kernel).
    #[error("the frontend attached more file descriptors than a message may carry")]
    TooManyFds,
    /// `SET_LOG_BASE` came without its descriptor or with a malformed payload.
    #[error(
        "the frontend sent SET_LOG_BASE with {fds} descriptor(s) and a {size}-byte payload; it needs one memory file and 16 bytes"
    )]
    LogBaseMalformed {
        /// Descriptors attached.
        fds: usize,
        /// Payload size.
        size: usize,
    },
    /// A `SET_VRING_ENABLE` the relay would hold names a ring the device
    /// does not have.
    #[error(
        "the frontend sent SET_VRING_ENABLE for ring {ring}; the device offers {queues} ring(s)"
    )]
    NoSuchRing {
        /// The ring index the request named.
        ring: u32,
        /// Rings the device offers (`GET_QUEUE_NUM`).
        queues: u32,
    },
    /// The frontend's dirty log cannot be mapped: a migration would copy
    /// stale memory, so the connection ends (and the frontend's migration
    /// fails) instead.
    #[error(transparent)]
    LogBase(dirty::Error),
}

/// What the relay hands to the device on the way: the backend-request
/// channel, the dirty log and the announcement `SEND_RARP` asks for.
#[derive(Clone)]
pub(crate) struct Hooks {
    /// Rings the device offers: a held request naming another is refused.
    pub queues: u32,
    /// The backend-request channel.
    pub channel: Arc<BackendChannel>,
    /// The device's dirty log.
    pub log: Arc<MigrationLog>,
    /// Sends a RARP announcement for the MAC address.
    pub rarp: Arc<dyn Fn([u8; 6]) -> io::Result<()> + Send + Sync>,
}

impl Hooks {
    /// Hooks around `channel` with a fresh log and no RARP.
    #[cfg(test)]
    pub(crate) fn with_channel(channel: Arc<BackendChannel>) -> Self {
        Hooks {
            queues: 3,
            channel,
            log: MigrationLog::new(),
            rarp: Arc::new(|_| Ok(())),
        }
    }
}

/// Result of relay operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What the relay changed or saw, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quirk {
    /// A `SET_MEM_TABLE` payload was trimmed from `from` to `to` bytes.
    MemTableTrimmed { from: usize, to: usize },
}

/// A running relay: one thread per direction.
pub(crate) struct Relay {
    frontend: UnixStream,
    handler: UnixStream,
    down: JoinHandle<Result<()>>,
    up: JoinHandle<()>,
}

impl Relay {
    /// Relays between `frontend` (the connection the frontend made) and
    /// `handler` (the socket the `vhost` request handler serves).
    pub(crate) fn start(
        name: &str,
        frontend: UnixStream,
        handler: UnixStream,
        hooks: Hooks,
    ) -> io::Result<Relay> {
        let (f_in, h_out) = (frontend.try_clone()?, handler.try_clone()?);
        let h_in = handler.try_clone()?;
        // Both directions answer the frontend: the handler's replies, and the
        // relay's own acknowledgements of the requests it holds. One message
        // at a time goes out whole.
        let f_out = Arc::new(Mutex::new(frontend.try_clone()?));
        let f_ack = Arc::clone(&f_out);
        let tag = name.to_string();
        let down = thread::Builder::new()
            .name(format!("{name}-relay-in"))
            .spawn(move || {
                let r = forward_requests(&tag, &f_in, &f_ack, &h_out, &hooks);
                match &r {
                    Ok(()) => log::info!("{tag}: the connection closed"),
                    Err(e) => log::error!("{tag}: dropping the frontend's connection: {e}"),
                }
                let _ = f_in.shutdown(Shutdown::Both);
                let _ = h_out.shutdown(Shutdown::Both);
                r
            })?;
        let tag = name.to_string();
        let up = thread::Builder::new()
            .name(format!("{name}-relay-out"))
            .spawn(move || {
                if let Err(e) = forward_replies(&h_in, &f_out) {
                    log::debug!("{tag}: reply path closed: {e}");
                }
                let _ = lock(&f_out).shutdown(Shutdown::Both);
                let _ = h_in.shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            frontend,
            handler,
            down,
            up,
        })
    }

    /// Closes both sides, waits for the threads and tells why the frontend's
    /// side ended: `Ok` for a disconnect, the refusal otherwise.
    pub(crate) fn close(self) -> Result<()> {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        let _ = self.up.join();
        match self.down.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Io(io::Error::other("the relay thread panicked"))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one message: its header, the descriptors attached to it and its
/// payload (into `payload`). `None` at end of file before a header.
fn recv_message(
    s: &UnixStream,
    payload: &mut Vec<u8>,
) -> Result<Option<([u8; HEADER_LEN], Vec<OwnedFd>)>> {
    let mut hdr = [0u8; HEADER_LEN];
    let (n, fds) = recv_with_fds(s, &mut hdr)?;
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_LEN {
        read_exact(s, &mut hdr[n..])?;
    }
    let (request, size) = (field(&hdr, 0), field(&hdr, 8));
    if size as usize > MAX_MSG_SIZE {
        return Err(Error::Oversized { request, size });
    }
    payload.clear();
    payload.resize(size as usize, 0);
    read_exact(s, payload)?;
    Ok(Some((hdr, fds)))
}

/// The little-endian `u32` at `at`.
fn field(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The payload as one `u64`, if it is one.
fn as_u64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.try_into().ok()?))
}

/// Frontend to handler: one message at a time, quirks mended.
fn forward_requests(
    name: &str,
    frontend: &UnixStream,
    frontend_out: &Mutex<UnixStream>,
    handler: &UnixStream,
    hooks: &Hooks,
) -> Result<()> {
    let mut payload = Vec::with_capacity(MAX_MSG_SIZE);
    let mut negotiation = Negotiation::new(hooks.queues);
    loop {
        let Some((mut hdr, fds)) = recv_message(frontend, &mut payload)? else {
            return Ok(());
        };
        let request = field(&hdr, 0);
        log::debug!("{name}: frontend: {}", describe(&hdr, &payload, fds.len()));
        if let Some(q) = mend(request, &mut payload) {
            log::debug!("{name}: relay: {q:?}");
            hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        observe(request, &payload, &fds, &hooks.channel);
        if let Some(reply) = migration(name, &hdr, &payload, &fds, hooks)? {
            // Answered here: the handler does not know the request.
            if let Some(reply) = reply {
                send_with_fds(&lock(frontend_out), &[&reply], &[])?;
            }
            continue;
        }
        match negotiation.before(&hdr, &payload) {
            Action::Forward => {
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                send_with_fds(handler, &[&hdr, &payload], &raw)?;
            }
            Action::Hold { ack } => {
                log::debug!(
                    "{name}: relay: holding SET_VRING_ENABLE until SET_FEATURES acknowledges VHOST_USER_F_PROTOCOL_FEATURES{}",
                    if ack.is_some() { " (acknowledged)" } else { "" }
                );
                if let Some(ack) = ack {
                    send_with_fds(&lock(frontend_out), &[&ack], &[])?;
                }
                continue;
            }
            Action::Refuse { nack, ring } => {
                // As the handler treats a ring index it does not have in any
                // other request: a failure reply if one is wanted, then the
                // connection ends.
                if let Some(nack) = nack {
                    send_with_fds(&lock(frontend_out), &[&nack], &[])?;
                }
                return Err(Error::NoSuchRing {
                    ring,
                    queues: hooks.queues,
                });
            }
        }
        for (held, m) in negotiation.after(request, &payload) {
            match held {
                Held::Replay => log::debug!(
                    "{name}: relay: replaying {}",
                    describe(
                        m[..HEADER_LEN].try_into().expect("a header"),
                        &m[HEADER_LEN..],
                        0
                    )
                ),
                Held::Dropped => log::info!(
                    "{name}: relay: the frontend acknowledged no VHOST_USER_F_PROTOCOL_FEATURES; every ring starts enabled, dropping its earlier {}",
                    describe(
                        m[..HEADER_LEN].try_into().expect("a header"),
                        &m[HEADER_LEN..],
                        0
                    )
                ),
            }
            if held == Held::Replay {
                send_with_fds(handler, &[&m], &[])?;
            }
        }
    }
}

/// Handler to frontend: message by message, descriptors included.
fn forward_replies(handler: &UnixStream, frontend: &Mutex<UnixStream>) -> Result<()> {
    let mut payload = Vec::with_capacity(MAX_MSG_SIZE);
    loop {
        let Some((hdr, fds)) = recv_message(handler, &mut payload)? else {
            return Ok(());
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(&lock(frontend), &[&hdr, &payload], &raw)?;
    }
}

/// What the relay does with a request, per [`Negotiation::before`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Pass it to the handler.
    Forward,
    /// Keep it for later; send `ack` to the frontend now if it wants a reply.
    Hold {
        /// The acknowledgement (header and a zero `u64`).
        ack: Option<[u8; HEADER_LEN + 8]>,
    },
    /// Refuse it, ending the connection: it names a ring the device lacks.
    /// Send `nack` (a failure reply) first if the frontend wants a reply.
    Refuse {
        /// The failure reply (header and the `u64` 1).
        nack: Option<[u8; HEADER_LEN + 8]>,
        /// The ring the request named.
        ring: u32,
    },
}

/// What becomes of a held request, per [`Negotiation::after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Send it to the handler now.
    Replay,
    /// The negotiation made it moot.
    Dropped,
}

/// The relay's view of the negotiation, for the requests it must hold.
///
/// `SET_VRING_ENABLE` is valid, in the specification's terms, once
/// `VHOST_USER_F_PROTOCOL_FEATURES` is negotiated; frontends read that as
/// "the backend offered bit 30 and `SET_PROTOCOL_FEATURES` went through"
/// (QEMU enables rings long before `SET_FEATURES`), the `vhost` crate as
/// "`SET_FEATURES` acknowledged bit 30". Between the two, the relay holds the
/// request: the last state asked for each ring is handed over right after the
/// `SET_FEATURES` that acknowledges bit 30. Nothing is lost by the wait: no
/// ring runs before `SET_FEATURES`. A `SET_FEATURES` without bit 30 enables
/// every ring, and the held states are dropped; `RESET_OWNER` and
/// `RESET_DEVICE` forget the acknowledgement, and requests are held again.
///
/// A request it would hold that names a ring beyond the device's is refused
/// as the handler refuses a bad ring index in any request: a failure reply if
/// the frontend wants one, and the connection ends. (Held, it would have been
/// acknowledged as done and refused only later, at `SET_FEATURES`.)
#[derive(Debug, Default)]
pub(crate) struct Negotiation {
    /// Rings the device offers.
    queues: u32,
    /// What `SET_PROTOCOL_FEATURES` acknowledged, once it came.
    protocol: Option<u64>,
    /// A `SET_FEATURES` with bit 30 reached the handler.
    features_acked: bool,
    /// Held `SET_VRING_ENABLE` states: (ring, 0 or 1), the last per ring.
    held: Vec<(u32, u32)>,
}

impl Negotiation {
    /// For a device with `queues` rings.
    pub(crate) fn new(queues: u32) -> Self {
        Negotiation {
            queues,
            ..Default::default()
        }
    }

    /// Decides what to do with the request `hdr`/`payload` before it is sent.
    pub(crate) fn before(&mut self, hdr: &[u8; HEADER_LEN], payload: &[u8]) -> Action {
        let (request, flags) = (field(hdr, 0), field(hdr, 4));
        if request != FrontendReq::SET_VRING_ENABLE as u32
            || self.features_acked
            || payload.len() != 8
        {
            return Action::Forward;
        }
        // Without SET_PROTOCOL_FEATURES the frontend never negotiated bit 30:
        // the handler refuses it, as it should.
        let Some(protocol) = self.protocol else {
            return Action::Forward;
        };
        let (ring, num) = (field(payload, 0), field(payload, 4));
        if num > 1 {
            return Action::Forward;
        }
        let wants_ack = flags & FLAG_NEED_REPLY != 0
            && protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        if ring >= self.queues {
            return Action::Refuse {
                nack: wants_ack.then(|| ack(request, 1)),
                ring,
            };
        }
        self.held.retain(|&(r, _)| r != ring);
        self.held.push((ring, num));
        Action::Hold {
            ack: wants_ack.then(|| ack(request, 0)),
        }
    }

    /// Notes a request that went to the handler; returns the held requests it
    /// settles, each a whole message (sent without `NEED_REPLY`: the frontend
    /// has had its answer).
    pub(crate) fn after(&mut self, request: u32, payload: &[u8]) -> Vec<(Held, Vec<u8>)> {
        let held = |h: Held, list: Vec<(u32, u32)>| {
            list.into_iter()
                .map(|(ring, num)| {
                    let mut m = Vec::with_capacity(HEADER_LEN + 8);
                    m.extend_from_slice(&(FrontendReq::SET_VRING_ENABLE as u32).to_le_bytes());
                    m.extend_from_slice(&FLAG_VERSION_1.to_le_bytes());
                    m.extend_from_slice(&8u32.to_le_bytes());
                    m.extend_from_slice(&ring.to_le_bytes());
                    m.extend_from_slice(&num.to_le_bytes());
                    (h, m)
                })
                .collect()
        };
        match (request, as_u64(payload)) {
            (r, Some(v)) if r == FrontendReq::SET_PROTOCOL_FEATURES as u32 => {
                self.protocol = Some(v);
            }
            (r, Some(v)) if r == FrontendReq::SET_FEATURES as u32 => {
                self.features_acked = v & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
                let list = std::mem::take(&mut self.held);
                return held(
                    if self.features_acked {
                        Held::Replay
                    } else {
                        Held::Dropped
                    },
                    list,
                );
            }
            (r, _)
                if r == FrontendReq::RESET_OWNER as u32
                    || r == FrontendReq::RESET_DEVICE as u32 =>
            {
                self.features_acked = false;
                self.held.clear();
            }
            _ => {}
        }
        Vec::new()
    }
}

/// A request decoded for the log: its name, flags, size, descriptors and, for
/// the common payloads, what they say.
pub(crate) fn describe(hdr: &[u8; HEADER_LEN], payload: &[u8], fds: usize) -> String {
    let (code, flags, size) = (field(hdr, 0), field(hdr, 4), field(hdr, 8));
    let Ok(req) = FrontendReq::try_from(code) else {
        return format!("request {code} (unknown), flags {flags:#x}, {size} bytes, {fds} fds");
    };
    let body =
        match req {
            FrontendReq::SET_FEATURES | FrontendReq::SET_PROTOCOL_FEATURES => {
                as_u64(payload).map(|v| format!(" {v:#x}"))
            }
            FrontendReq::SET_VRING_NUM
            | FrontendReq::SET_VRING_BASE
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::SET_VRING_ENABLE
                if payload.len() == 8 =>
            {
                Some(format!(
                    " ring {} num {}",
                    field(payload, 0),
                    field(payload, 4)
                ))
            }
            FrontendReq::SET_VRING_KICK
            | FrontendReq::SET_VRING_CALL
            | FrontendReq::SET_VRING_ERR => as_u64(payload).map(|v| {
                format!(
                    " ring {}{}",
                    v & 0xff,
                    if v & 0x100 != 0 { " (no fd)" } else { "" }
                )
            }),
            FrontendReq::SET_VRING_ADDR if payload.len() >= 4 => {
                Some(format!(" ring {}", field(payload, 0)))
            }
            FrontendReq::SET_MEM_TABLE if payload.len() >= 4 => {
                Some(format!(" {} region(s)", field(payload, 0)))
            }
            FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG if payload.len() >= 8 => Some(
                format!(" offset {} size {}", field(payload, 0), field(payload, 4)),
            ),
            _ => None,
        };
    format!(
        "{req:?}{}{}{}",
        body.unwrap_or_default(),
        if flags & FLAG_NEED_REPLY != 0 {
            " (reply wanted)"
        } else {
            ""
        },
        if fds > 0 {
            format!(" [{fds} fd]")
        } else {
            String::new()
        }
    )
}

/// Rewrites what real frontends get wrong. Returns what it changed.
pub(crate) fn mend(request: u32, payload: &mut Vec<u8>) -> Option<Quirk> {
    if request == FrontendReq::SET_MEM_TABLE as u32 && payload.len() >= MEM_TABLE_HEAD {
        let regions = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")) as usize;
        let exact = MEM_TABLE_HEAD + regions.min(MAX_MEM_REGIONS) * MEM_REGION_LEN;
        if regions <= MAX_MEM_REGIONS && payload.len() > exact {
            let from = payload.len();
            payload.truncate(exact);
            return Some(Quirk::MemTableTrimmed { from, to: exact });
        }
    }
    None
}

/// An acknowledgement of `request`: the header and a `u64` status (0: done).
fn ack(request: u32, status: u64) -> [u8; HEADER_LEN + 8] {
    let mut m = [0u8; HEADER_LEN + 8];
    m[0..4].copy_from_slice(&request.to_le_bytes());
    m[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    m[8..12].copy_from_slice(&8u32.to_le_bytes());
    m[12..].copy_from_slice(&status.to_le_bytes());
    m
}

/// The migration requests. `SET_LOG_BASE`: the log is mapped for the device
/// (and the request goes on to the handler, which answers it);
/// `SET_VRING_ADDR`: the ring's used-ring logging is noted (and the request
/// goes on); `SEND_RARP`, which the handler does not know: the announcement
/// is sent and the request answered here. Returns `Some(reply)` for a request
/// the relay consumed.
#[allow(clippy::type_complexity)]
fn migration(
    name: &str,
    hdr: &[u8; HEADER_LEN],
    payload: &[u8],
    fds: &[OwnedFd],
    hooks: &Hooks,
) -> Result<Option<Option<[u8; HEADER_LEN + 8]>>> {
    let (request, flags) = (field(hdr, 0), field(hdr, 4));
    if request == FrontendReq::SET_LOG_BASE as u32 {
        if fds.len() != 1 || payload.len() != 16 {
            return Err(Error::LogBaseMalformed {
                fds: fds.len(),
                size: payload.len(),
            });
        }
        let size = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        let offset = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        use std::os::fd::AsFd;
        let area = LogArea::map(fds[0].as_fd(), offset, size).map_err(Error::LogBase)?;
        log::debug!("{name}: relay: dirty log of {size} bytes at offset {offset}");
        hooks.log.set_area(area);
    } else if request == FrontendReq::SET_VRING_ADDR as u32 && payload.len() == 40 {
        let (index, addr_flags) = (field(payload, 0), field(payload, 4));
        let log_addr = u64::from_le_bytes(payload[32..40].try_into().expect("8 bytes"));
        hooks
            .log
            .set_ring_log(index, addr_flags & VRING_F_LOG != 0, log_addr);
    } else if request == FrontendReq::SEND_RARP as u32 {
        let status = match payload.get(..6) {
            Some(m) => {
                let mac: [u8; 6] = m.try_into().expect("6 bytes");
                match (hooks.rarp)(mac) {
                    Ok(()) => {
                        log::info!("{name}: RARP announcement sent for {}", fmt_mac(mac));
                        0
                    }
                    Err(e) => {
                        log::warn!("{name}: cannot send the RARP announcement: {e}");
                        1
                    }
                }
            }
            None => {
                log::warn!(
                    "{name}: SEND_RARP with a {}-byte payload carries no MAC address",
                    payload.len()
                );
                1
            }
        };
        let wants = flags & FLAG_NEED_REPLY != 0
            && hooks
                .channel
                .protocol_features()
                .is_some_and(|p| p & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0);
        return Ok(Some(wants.then(|| ack(request, status))));
    }
    Ok(None)
}

/// `VHOST_VRING_F_LOG` in `SET_VRING_ADDR`'s flags.
const VRING_F_LOG: u32 = 0x1;

fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Notes what the backend-request channel needs to know.
fn observe(request: u32, payload: &[u8], fds: &[OwnedFd], channel: &BackendChannel) {
    if request == FrontendReq::SET_PROTOCOL_FEATURES as u32 && payload.len() == 8 {
        let v = u64::from_le_bytes(payload.try_into().expect("8 bytes"));
        channel.set_protocol_features(v);
    } else if request == FrontendReq::SET_BACKEND_REQ_FD as u32 && fds.len() == 1 {
        match fds[0].try_clone() {
            Ok(fd) => channel.attach(UnixStream::from(fd)),
            Err(e) => log::warn!("cannot keep the backend-request channel: {e}"),
        }
    }
}

fn read_exact(s: &UnixStream, buf: &mut [u8]) -> Result<()> {
    let mut r = s;
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Io(e)
        }
    })
}

/// Control-message room for the most descriptors a message may carry.
const CMSG_ROOM: usize = 512;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_ROOM]);

/// `recvmsg` into `buf`, collecting attached descriptors.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_ROOM as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled,
    // bounded by `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // The kernel installed these descriptors for us: we own them.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(Error::TooManyFds);
    }
    Ok((n, fds))
}

/// `sendmsg` of all of `parts`, with `fds` attached to the first byte.
fn send_with_fds(s: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    let mut fds = fds;
    while sent < total {
        // Rebuild the remaining slices.
        let mut skip = sent;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
        // SAFETY: an all-zero msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(Error::TooManyFds);
        }
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE of at most 32 descriptors (checked above) fits
            // CMSG_ROOM; the header and data are written inside `cbuf`.
            unsafe {
                let space = libc::CMSG_SPACE(bytes as u32) as usize;
                msg.msg_control = cbuf.0.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
            }
        }
        // SAFETY: `msg` points at live buffers of the lengths it states.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        sent += n as usize;
        fds = &[];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem_table(regions: u32, room_for: usize) -> Vec<u8> {
        let mut p = vec![0u8; MEM_TABLE_HEAD + room_for * MEM_REGION_LEN];
        p[0..4].copy_from_slice(&regions.to_le_bytes());
        p
    }

    #[test]
    fn mem_table_sized_for_more_regions_is_trimmed() {
        // What UML sends: one region, room for two.
        let mut p = mem_table(1, 2);
        assert_eq!(
            mend(FrontendReq::SET_MEM_TABLE as u32, &mut p),
            Some(Quirk::MemTableTrimmed { from: 72, to: 40 })
        );
        assert_eq!(p.len(), 40);
        // Exact, too short, or absurd region counts are left for the handler
        // to judge.
        for (regions, room) in [(1, 1), (3, 2), (9, 10), (u32::MAX, 1)] {
            let mut p = mem_table(regions, room);
            let before = p.clone();
            assert_eq!(mend(FrontendReq::SET_MEM_TABLE as u32, &mut p), None);
            assert_eq!(p, before);
        }
        // Other requests are never touched.
        let mut p = mem_table(1, 2);
        assert_eq!(mend(FrontendReq::SET_VRING_ADDR as u32, &mut p), None);
        let mut short = vec![1, 0, 0];
        assert_eq!(mend(FrontendReq::SET_MEM_TABLE as u32, &mut short), None);
    }

    fn enable(ring: u32, num: u32, flags: u32) -> ([u8; HEADER_LEN], Vec<u8>) {
        let mut h = header(FrontendReq::SET_VRING_ENABLE as u32, 8);
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        let mut p = ring.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        (h, p)
    }

    fn u64_msg(request: FrontendReq, v: u64) -> (u32, Vec<u8>) {
        (request as u32, v.to_le_bytes().to_vec())
    }

    #[test]
    fn qemu_enables_rings_before_it_acknowledges_features() {
        let mut n = Negotiation::new(3);
        let pf = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let bit30 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // Before SET_PROTOCOL_FEATURES the frontend never negotiated bit 30:
        // the handler judges.
        let (h, p) = enable(0, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Forward);
        let (r, p) = u64_msg(FrontendReq::SET_PROTOCOL_FEATURES, pf);
        assert!(n.after(r, &p).is_empty());
        // Held; acknowledged only when asked.
        let (h, p) = enable(0, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Hold { ack: None });
        let (h, p) = enable(1, 0, FLAG_VERSION_1 | FLAG_NEED_REPLY);
        let Action::Hold { ack: Some(ack) } = n.before(&h, &p) else {
            panic!("a reply was wanted");
        };
        assert_eq!(field(&ack, 0), FrontendReq::SET_VRING_ENABLE as u32);
        assert_eq!(field(&ack, 4), FLAG_VERSION_1 | FLAG_REPLY);
        assert_eq!(field(&ack, 8), 8);
        assert_eq!(as_u64(&ack[HEADER_LEN..]), Some(0));
        // The last state per ring wins; a value other than 0/1 is the
        // handler's to refuse.
        let (h, p) = enable(1, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Hold { ack: None });
        let (h, p) = enable(1, 2, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Forward);
        // SET_FEATURES with bit 30 releases them, in order, without NEED_REPLY.
        let (r, p) = u64_msg(FrontendReq::SET_FEATURES, bit30 | 1);
        let out = n.after(r, &p);
        assert_eq!(out.len(), 2);
        for ((held, m), ring) in out.iter().zip([0u32, 1]) {
            assert_eq!(*held, Held::Replay);
            assert_eq!(m.len(), HEADER_LEN + 8);
            assert_eq!(field(m, 0), FrontendReq::SET_VRING_ENABLE as u32);
            assert_eq!(field(m, 4), FLAG_VERSION_1);
            assert_eq!((field(m, HEADER_LEN), field(m, HEADER_LEN + 4)), (ring, 1));
        }
        // From then on they go straight through.
        let (h, p) = enable(0, 0, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Forward);
        // RESET_DEVICE forgets the acknowledgement.
        assert!(n.after(FrontendReq::RESET_DEVICE as u32, &[]).is_empty());
        let (h, p) = enable(0, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Hold { ack: None });
        // SET_FEATURES without bit 30 enables every ring: held states dropped.
        let (r, p) = u64_msg(FrontendReq::SET_FEATURES, 1);
        let out = n.after(r, &p);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, Held::Dropped);
        let (h, p) = enable(0, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Hold { ack: None });
        // Other requests are never held.
        let h = header(FrontendReq::SET_VRING_NUM as u32, 8);
        assert_eq!(n.before(&h, &[0; 8]), Action::Forward);
    }

    #[test]
    fn a_held_enable_of_a_ring_the_device_lacks_is_refused() {
        let mut n = Negotiation::new(3);
        let pf = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let (r, p) = u64_msg(FrontendReq::SET_PROTOCOL_FEATURES, pf);
        assert!(n.after(r, &p).is_empty());
        // The last ring is held; the next one, or a wild index, is refused,
        // with a failure reply when one is wanted.
        let (h, p) = enable(2, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Hold { ack: None });
        for ring in [3, 255, u32::MAX] {
            let (h, p) = enable(ring, 1, FLAG_VERSION_1);
            assert_eq!(n.before(&h, &p), Action::Refuse { nack: None, ring });
            let (h, p) = enable(ring, 0, FLAG_VERSION_1 | FLAG_NEED_REPLY);
            let Action::Refuse {
                nack: Some(nack),
                ring: r,
            } = n.before(&h, &p)
            else {
                panic!("ring {ring}: refused with a failure reply");
            };
            assert_eq!(r, ring);
            assert_eq!(field(&nack, 0), FrontendReq::SET_VRING_ENABLE as u32);
            assert_eq!(field(&nack, 4), FLAG_VERSION_1 | FLAG_REPLY);
            assert_eq!(as_u64(&nack[HEADER_LEN..]), Some(1));
        }
        // A refused request was not held: SET_FEATURES replays ring 2 only.
        let bit30 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let (r, p) = u64_msg(FrontendReq::SET_FEATURES, bit30);
        let out = n.after(r, &p);
        assert_eq!(out.len(), 1);
        assert_eq!(field(&out[0].1, HEADER_LEN), 2);
        // Once features are acknowledged the handler judges every index.
        let (h, p) = enable(9, 1, FLAG_VERSION_1);
        assert_eq!(n.before(&h, &p), Action::Forward);
    }

    #[test]
    fn the_relay_drops_a_frontend_enabling_a_ring_the_device_lacks() {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (hand, hand_peer) = UnixStream::pair().unwrap();
        let ch = BackendChannel::new("t").unwrap();
        let relay = Relay::start("t", front_peer, hand_peer, Hooks::with_channel(ch)).unwrap();
        let pf = VhostUserProtocolFeatures::REPLY_ACK.bits().to_le_bytes();
        send_with_fds(
            &front,
            &[&header(FrontendReq::SET_PROTOCOL_FEATURES as u32, 8), &pf],
            &[],
        )
        .unwrap();
        let (h, p) = enable(3, 1, FLAG_VERSION_1 | FLAG_NEED_REPLY);
        send_with_fds(&front, &[&h, &p], &[]).unwrap();
        // The failure reply, then the end of the connection.
        let mut nack = [0u8; HEADER_LEN + 8];
        read_exact(&front, &mut nack).unwrap();
        assert_eq!(field(&nack, 0), FrontendReq::SET_VRING_ENABLE as u32);
        assert_eq!(as_u64(&nack[HEADER_LEN..]), Some(1));
        let mut end = [0u8; 1];
        assert_eq!((&front).read(&mut end).unwrap(), 0);
        // The handler saw SET_PROTOCOL_FEATURES only.
        let mut got = Vec::new();
        (&hand).read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), HEADER_LEN + 8);
        assert_eq!(field(&got, 0), FrontendReq::SET_PROTOCOL_FEATURES as u32);
        assert!(matches!(
            relay.close(),
            Err(Error::NoSuchRing { ring: 3, queues: 3 })
        ));
    }

    #[test]
    fn requests_are_described_for_the_log() {
        let (h, p) = enable(1, 1, FLAG_VERSION_1 | FLAG_NEED_REPLY);
        assert_eq!(
            describe(&h, &p, 0),
            "SET_VRING_ENABLE ring 1 num 1 (reply wanted)"
        );
        let h = header(FrontendReq::SET_VRING_KICK as u32, 8);
        assert_eq!(
            describe(&h, &0x101u64.to_le_bytes(), 0),
            "SET_VRING_KICK ring 1 (no fd)"
        );
        let h = header(FrontendReq::SET_MEM_TABLE as u32, 40);
        assert_eq!(
            describe(&h, &mem_table(1, 1), 1),
            "SET_MEM_TABLE 1 region(s) [1 fd]"
        );
        let h = header(FrontendReq::SET_FEATURES as u32, 8);
        assert_eq!(
            describe(&h, &0x4000_0000u64.to_le_bytes(), 0),
            "SET_FEATURES 0x40000000"
        );
        assert!(describe(&header(0xdead, 0), &[], 0).contains("unknown"));
    }

    fn header(request: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn messages_and_descriptors_cross_the_relay() {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (hand, hand_peer) = UnixStream::pair().unwrap();
        let ch = BackendChannel::new("t").unwrap();
        let relay = Relay::start(
            "t",
            front_peer,
            hand_peer,
            Hooks::with_channel(Arc::clone(&ch)),
        )
        .unwrap();
        // SET_MEM_TABLE with one region in a two-region payload and an fd.
        let (a, _b) = UnixStream::pair().unwrap();
        let body = mem_table(1, 2);
        send_with_fds(
            &front,
            &[&header(FrontendReq::SET_MEM_TABLE as u32, 72), &body],
            &[a.as_raw_fd()],
        )
        .unwrap();
        let mut got = [0u8; 128];
        let (n, fds) = recv_with_fds(&hand, &mut got).unwrap();
        let n = if n < HEADER_LEN + 40 {
            let mut rest = [0u8; 128];
            let (m, _) = recv_with_fds(&hand, &mut rest).unwrap();
            got[n..n + m].copy_from_slice(&rest[..m]);
            n + m
        } else {
            n
        };
        assert_eq!(n, HEADER_LEN + 40);
        assert_eq!(&got[8..12], &40u32.to_le_bytes());
        assert_eq!(fds.len(), 1);
        // Replies go back untouched, message by message.
        let mut reply = header(FrontendReq::GET_FEATURES as u32, 8).to_vec();
        reply[4] = (FLAG_VERSION_1 | FLAG_REPLY) as u8;
        reply.extend_from_slice(&[7u8; 8]);
        send_with_fds(&hand, &[&reply[..5]], &[]).unwrap();
        send_with_fds(&hand, &[&reply[5..]], &[]).unwrap();
        let mut back = [0u8; 20];
        read_exact(&front, &mut back).unwrap();
        assert_eq!(&back[..], &reply[..]);
        // The backend-request channel is kept.
        let (req, _req_peer) = UnixStream::pair().unwrap();
        send_with_fds(
            &front,
            &[&header(FrontendReq::SET_BACKEND_REQ_FD as u32, 0)],
            &[req.as_raw_fd()],
        )
        .unwrap();
        let mut h = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(&hand, &mut h).unwrap();
        assert_eq!((n, fds.len()), (HEADER_LEN, 1));
        assert!(ch.is_attached());
        // An oversized message ends the connection: the handler sees EOF.
        (&front)
            .write_all(&header(FrontendReq::SET_CONFIG as u32, 1 << 20))
            .unwrap();
        let mut end = [0u8; 1];
        assert_eq!((&hand).read(&mut end).unwrap(), 0);
        assert!(matches!(relay.close(), Err(Error::Oversized { .. })));
    }
}
