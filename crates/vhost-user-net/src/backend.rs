//! The standby device as a `vhost-user-backend` [`VhostUserBackend`].
//!
//! vhost-user starts and stops rings one by one, where a virtio transport
//! activates the whole device at `DRIVER_OK`. [`VhostUserNet`] bridges the two:
//!
//! - `SET_FEATURES` is the driver's `FEATURES_OK`: the device accepts or refuses
//!   the set (STANDBY listeners fire here).
//! - The device is activated lazily, on the first kick after the rings it needs
//!   (RX and TX of pair 0, the control queue if negotiated) are started and
//!   enabled; further pairs join if they are ready by then. Activation processes
//!   every queue once, so no kick that came earlier is lost.
//! - `GET_VRING_BASE` stops the device ([`StandbyNet::stop`]) and writes every
//!   queue's position back into its vring, so the frontend reads the right
//!   base, and a later restart resumes where the device stopped.
//! - Queue interrupts go to the vring's call descriptor (eventfd or pipe);
//!   configuration interrupts go out as `BACKEND_CONFIG_CHANGE_MSG` on the
//!   backend-request channel.
//!
//! One worker thread serves each queue pair (`queues_per_thread`: rings `2p`
//! and `2p + 1` on worker `p`; the control queue on worker 0), so that pairs
//! run in parallel on as many cores; a pair's backend readiness descriptor (a
//! tap queue's fd) is registered, edge-triggered, with its own worker only.
//! Workers share no lock per frame: each pair has its own (taken once per
//! batch by the packet path), and the device's state is locked once per event
//! to see whether it is active. The device is activated by whichever worker
//! finds its rings ready first; it then wakes the others so that each
//! processes its pair once (no kick that came earlier is lost).

use std::cell::RefCell;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use virtio_net_standby::features;
use virtio_net_standby::{
    ControlQueueHandle, Features, NetBackend, NetConfigSpace, NetCounters, QueuePairHandle,
    StandbyNet, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::channel::BackendChannel;
use crate::dirty::{LogBitmap, MigrationLog};

/// Errors creating a [`VhostUserNet`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// vhost-user-backend serves at most 64 queues per worker thread.
    #[error(
        "the device has {0} queues; vhost-user serves at most 64 (31 queue pairs with a control queue, 32 without)"
    )]
    TooManyQueues(usize),
    /// A worker's self-wake eventfd could not be created.
    #[error("cannot create a worker's wake-up eventfd: {0}")]
    Wake(#[source] io::Error),
    /// The configuration-change notifier thread could not start.
    #[error("cannot start the configuration-change notifier thread: {0}")]
    Notifier(#[source] io::Error),
}

/// Result of creating a [`VhostUserNet`].
pub type Result<T> = std::result::Result<T, Error>;

/// The guest memory type of a device served over vhost-user: the regions the
/// frontend shares with `SET_MEM_TABLE`, as the handler maps them, each with
/// a [`LogBitmap`] that reports the device's writes to the frontend's dirty
/// log while it migrates (see [`dirty`](crate::dirty)). Build the
/// [`StandbyNet`] handed to [`VhostUserNet::new`] over it.
pub type VhostUserMemory = GuestMemoryMmap<LogBitmap>;

/// The vring type the handler gives the backend.
pub type Vring = VringRwLock<GuestMemoryAtomic<VhostUserMemory>>;

/// The protocol features the backend offers: the frontend reads the
/// configuration space from us (`CONFIG`), learns of its changes through the
/// backend-request channel (`BACKEND_REQ`), may ask for acknowledgements
/// (`REPLY_ACK`), may use several queue pairs (`MQ`) and may reset the device
/// without reconnecting (`RESET_DEVICE`).
///
/// For live migration it offers `LOG_SHMFD` (the frontend shares its dirty
/// log, see [`dirty`](crate::dirty); with `VHOST_F_LOG_ALL` among the virtio
/// features) and `RARP` (after a migration, a frontend whose guest cannot
/// announce itself asks the backend to send a RARP for the guest's MAC).
///
/// `CONFIG` is offered to every frontend: User-Mode Linux's `virtio_uml` reads
/// MAC, MTU and link status only through it, and nothing tells one frontend
/// from another before this answer. QEMU's virtio-net keeps its own
/// configuration space; QEMU masks `CONFIG` out of `SET_PROTOCOL_FEATURES` and
/// prints `vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU
/// does not`, which costs nothing else: configuration changes go only to a
/// frontend that acknowledged `CONFIG`, and a link change reaches QEMU's guest
/// through the connection instead (see [`Server`](crate::Server)).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// The RARP announcement `SEND_RARP` asks for, as the backend sends it: a
/// zeroed 12-byte virtio-net header (every [`NetBackend`] frame carries one),
/// then an Ethernet broadcast of type 0x8035 whose reverse-ARP request names
/// `mac` as sender and target, padded to the 60-byte minimum frame.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 12 + 60] {
    let mut f = [0u8; 12 + 60];
    let e = &mut f[12..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(&mac); // sender hardware address
    // sender protocol address 0.0.0.0
    e[32..38].copy_from_slice(&mac); // target hardware address
    // target protocol address 0.0.0.0
    f
}

/// Rings per worker, for `queues_per_thread`: pair `p`'s two on worker `p`,
/// the rings beyond the pairs (the control queue) on worker 0. `num_queues`
/// is at most 64 ([`VhostUserNet::new`] checks).
fn queue_masks(pairs: usize, num_queues: usize) -> Vec<u64> {
    let mut masks: Vec<u64> = (0..pairs.max(1))
        .map(|p| {
            (2 * p..2 * p + 2)
                .filter(|&q| q < num_queues)
                .fold(0, |m, q| m | 1 << q)
        })
        .collect();
    for q in 2 * pairs..num_queues {
        masks[0] |= 1 << q;
    }
    masks
}

/// Epoll tokens for backend readiness start after the queues and the handler's
/// own reserved token.
fn listener_token(num_queues: usize, pair: usize, tx: bool) -> u64 {
    (num_queues + 1 + 2 * pair + usize::from(tx)) as u64
}

/// Longest the worker polls before returning to its event loop.
const MAX_POLL_TURN: Duration = Duration::from_millis(10);

/// Passes over queues that still have work before the worker returns to its
/// event loop (and wakes itself).
const MAX_PASSES: usize = 64;

/// While polling finds frames, the clock (for [`MAX_POLL_TURN`]) is read once
/// per this many passes.
const POLL_CLOCK_PASSES: u32 = 16;

/// Default of [`VhostUserNet::set_poll_settle`]'s `chains`: a polling pass that
/// moved fewer chains than this, and left none behind, is followed by a settle
/// pause before the next one: a device that takes every buffer the moment the
/// driver posts it makes both sides trade the ring's cache lines frame by
/// frame; letting a few buffers gather moves them in bursts. Chosen on machine
/// B of docs/PERFORMANCE.md; settable because the best value depends on the
/// machine and the driver.
pub const DEFAULT_SETTLE_CHAINS: u32 = 8;

/// Default of [`VhostUserNet::set_poll_settle`]'s `pauses`: `pause` instructions
/// in one settle pause, about a microsecond on current x86 cores.
pub const DEFAULT_SETTLE_PAUSES: u32 = 32;

thread_local! {
    /// While this thread builds a `VhostUserDaemon` in
    /// [`VhostUserNet::daemon`]: the descriptors of the exit events'
    /// consumers handed to its workers, which the daemon abandons (see
    /// [`ExitConsumers`]).
    static EXIT_CONSUMERS: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
}

/// Closes the exit-event consumers a `VhostUserDaemon` abandons.
///
/// vhost-user-backend 0.24's worker (`VringEpollHandler::new`) takes the
/// consumer of the exit event our [`VhostUserBackend::exit_event`] returns
/// out of its `EventConsumer` with `into_raw_fd`, adds that descriptor to its
/// epoll set and never closes it: nothing owns it any more, and every daemon
/// would leave one eventfd per worker thread open for the life of the process
/// (one per connection the [`Server`](crate::Server) serves). The worker
/// still needs the eventfd itself, but not that descriptor: epoll keeps
/// watching an open file as long as any descriptor refers to it, and the
/// notifier the daemon keeps to stop the worker is a duplicate of the same
/// open file. So once the daemon is built, the consumers' descriptors are
/// closed here; the eventfd goes away with the notifier, when the daemon is
/// dropped.
///
/// Only the exit events made on this thread while the daemon is being built
/// are recorded, so a consumer anyone else obtains from `exit_event` stays
/// theirs.
struct ExitConsumers;

impl ExitConsumers {
    fn record() -> Self {
        EXIT_CONSUMERS.with(|c| *c.borrow_mut() = Some(Vec::new()));
        ExitConsumers
    }
}

impl Drop for ExitConsumers {
    fn drop(&mut self) {
        let fds = EXIT_CONSUMERS
            .with(|c| c.borrow_mut().take())
            .unwrap_or_default();
        for fd in fds {
            // SAFETY: `fd` is the descriptor of a consumer that `exit_event`
            // handed to `VhostUserDaemon::new` on this thread, which gave it
            // to a worker's `VringEpollHandler::new`; that turned it into a
            // raw descriptor, registered it with epoll (or failed to) and
            // dropped the number without closing it (vhost-user-backend
            // 0.24). Nobody else owns or uses it: closing it is the release
            // its owner never made.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// State of the current connection.
#[derive(Default)]
struct Conn {
    mem: Option<GuestMemoryAtomic<VhostUserMemory>>,
    /// Every vring of the connection, by queue index, as its worker first
    /// handed it to `handle_event` (each worker sees only its own).
    known: Vec<Option<Vring>>,
    /// The vrings the device was activated on, by queue index.
    vrings: Vec<Option<Vring>>,
    /// The queue indices it was activated with.
    active: Vec<usize>,
    /// The last activation attempt failed (logged once, not per kick).
    activation_failed: bool,
}

/// A standby device served over vhost-user. Share it as `Arc<VhostUserNet<B>>`
/// (that is what [`Server`](crate::Server) and `VhostUserDaemon` take); keep a
/// clone to change the link or read counters while it runs.
pub struct VhostUserNet<B: NetBackend + 'static> {
    name: String,
    device: Mutex<StandbyNet<VhostUserMemory, B>>,
    pairs: Vec<QueuePairHandle<VhostUserMemory, B>>,
    ctrl: ControlQueueHandle<VhostUserMemory, B>,
    queue_size: u16,
    num_queues: usize,
    offered: Features,
    channel: Arc<BackendChannel>,
    migration: Arc<MigrationLog>,
    conn: Mutex<Conn>,
    /// How long the worker keeps polling the rings after they run dry.
    poll_ns: AtomicU64,
    /// See [`set_poll_settle`](Self::set_poll_settle).
    settle_chains: AtomicU32,
    settle_pauses: AtomicU32,
    /// One per worker (queue pair): written when the worker returns to its
    /// event loop with work left, so that it comes straight back, and by the
    /// worker that activates the device, so that the others process their
    /// pair once.
    wakes: Vec<EventFd>,
    /// Per worker: the rings it serves (`queues_per_thread`).
    masks: Vec<u64>,
    /// Per worker: its vrings were recorded in `Conn::known` on this
    /// connection.
    recorded: Vec<std::sync::atomic::AtomicBool>,
    /// Per queue pair: what its worker did (see [`PairStats`]).
    pair_stats: Vec<PairStatsCell>,
}

/// What the worker of one queue pair did on the current and past
/// connections, from [`VhostUserNet::pair_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairStats {
    /// The worker thread (`handle_event`'s `thread_id`: worker `p` serves
    /// pair `p`).
    pub worker: usize,
    /// The OS thread id (`gettid`) of the thread that last moved chains on
    /// this pair's rings; 0 before any did.
    pub tid: i32,
    /// Descriptor chains moved on the pair's rings (RX and TX).
    pub chains: u64,
}

/// Updated once per pass over a pair's rings, not per frame.
#[derive(Default)]
struct PairStatsCell {
    tid: std::sync::atomic::AtomicI32,
    chains: AtomicU64,
}

/// The calling thread's OS id.
fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

impl<B: NetBackend + 'static> std::fmt::Debug for VhostUserNet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNet")
            .field("name", &self.name)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Routes the device's interrupts: queues to their vring's call descriptor,
/// configuration changes to the backend-request channel.
struct VringInterrupt {
    vrings: Vec<Option<Vring>>,
    channel: Arc<BackendChannel>,
}

impl VirtioInterrupt for VringInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        match int_type {
            VirtioInterruptType::Queue(i) => match self.vrings.get(usize::from(i)) {
                Some(Some(v)) => v.signal_used_queue(),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no vring {i}"),
                )),
            },
            VirtioInterruptType::Config => self.channel.notify_config_changed(),
        }
    }
}

/// What one handled event asks a worker to process: its pair's rings, and
/// the control queue (whichever worker its ring belongs to).
#[derive(Default, Clone, Copy)]
struct Work {
    rx: bool,
    tx: bool,
    ctrl: bool,
}

impl Work {
    const ALL: Work = Work {
        rx: true,
        tx: true,
        ctrl: true,
    };
}

impl<B: NetBackend + 'static> VhostUserNet<B> {
    /// Serves `device` (built with [`StandbyNetBuilder`](virtio_net_standby::StandbyNetBuilder))
    /// over vhost-user. `name` prefixes log lines and thread names.
    ///
    /// Fails if the device has more queues than one vhost-user worker serves
    /// (64).
    pub fn new(
        name: impl Into<String>,
        device: StandbyNet<VhostUserMemory, B>,
    ) -> Result<Arc<Self>> {
        let pairs = device.queue_pairs().to_vec();
        let offered = device.offered_features();
        let num_queues = device.queue_max_sizes().len();
        if num_queues > 64 {
            return Err(Error::TooManyQueues(num_queues));
        }
        let queue_size = device.queue_max_sizes()[0];
        let ctrl = device.control_queue();
        let name = name.into();
        let channel = BackendChannel::new(&name).map_err(Error::Notifier)?;
        let pairs_len = pairs.len();
        let workers = pairs_len.max(1);
        let wakes = (0..workers)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::Wake)?;
        let pair_stats = (0..pairs.len()).map(|_| PairStatsCell::default()).collect();
        Ok(Arc::new(VhostUserNet {
            name,
            device: Mutex::new(device),
            pairs,
            ctrl,
            queue_size,
            num_queues,
            offered,
            channel,
            migration: MigrationLog::new(),
            conn: Mutex::new(Conn::default()),
            poll_ns: AtomicU64::new(0),
            settle_chains: AtomicU32::new(DEFAULT_SETTLE_CHAINS),
            settle_pauses: AtomicU32::new(DEFAULT_SETTLE_PAUSES),
            wakes,
            masks: queue_masks(pairs_len, num_queues),
            recorded: (0..workers).map(|_| Default::default()).collect(),
            pair_stats,
        }))
    }

    /// A `VhostUserDaemon` serving this device, for one connection: what
    /// [`Server`](crate::Server) starts for every frontend. A VMM that runs
    /// its own daemon should build it here rather than with
    /// `VhostUserDaemon::new`, which leaves an eventfd open per worker thread
    /// each time (vhost-user-backend 0.24 never closes the exit event's
    /// consumer; this closes it once the workers have registered it). Call
    /// [`disconnected`](Self::disconnected) after its `wait` returns.
    pub fn daemon(
        self: &Arc<Self>,
    ) -> std::result::Result<VhostUserDaemon<Arc<Self>>, vhost_user_backend::Error> {
        let _consumers = ExitConsumers::record();
        VhostUserDaemon::new(
            self.name.clone(),
            Arc::clone(self),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
    }

    /// After the rings run dry, keep polling them for `window` before going
    /// back to sleep on the kicks (0, the default: never poll). Each frame
    /// that arrives restarts the window. Polling trades a busy core for fewer
    /// wake-ups and kicks, as a polling backend such as DPDK's does all the time.
    pub fn set_poll(&self, window: Duration) {
        self.poll_ns.store(
            u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// While polling, a pass that moved fewer than `chains` chains (and left
    /// none behind) is followed by `pauses` `pause` instructions before the
    /// next pass, so that the driver's buffers gather and move in bursts
    /// rather than one by one. Defaults: [`DEFAULT_SETTLE_CHAINS`] and
    /// [`DEFAULT_SETTLE_PAUSES`]; `pauses` 0 (or `chains` 0) turns the pause off.
    pub fn set_poll_settle(&self, chains: u32, pauses: u32) {
        self.settle_chains.store(chains, Ordering::Relaxed);
        self.settle_pauses.store(pauses, Ordering::Relaxed);
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on the device (to add STANDBY listeners, snapshot, read
    /// features). Do not activate or reset it from here: the frontend does.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut StandbyNet<VhostUserMemory, B>) -> R) -> R {
        f(&mut lock(&self.device))
    }

    /// Sets the link state the guest sees. A frontend that acknowledged
    /// `CONFIG` is notified through the backend-request channel; one that did
    /// not (QEMU's virtio-net) is disconnected by the [`Server`](crate::Server)
    /// while the link is down, which QEMU shows its guest as link down.
    pub fn set_link_up(&self, up: bool) {
        lock(&self.device).set_link_up(up);
        self.channel.bump();
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        lock(&self.device).link_up()
    }

    /// Whether the current frontend's features were acknowledged and accepted
    /// (the driver is starting or running the device).
    pub(crate) fn features_accepted(&self) -> bool {
        lock(&self.device).acked_features().is_some()
    }

    /// Asks the guest to announce itself (gratuitous ARP), if it negotiated
    /// `GUEST_ANNOUNCE`.
    pub fn announce(&self) -> virtio_net_standby::Result<()> {
        lock(&self.device).announce()
    }

    /// The configuration space as the guest reads it.
    pub fn config(&self) -> NetConfigSpace {
        lock(&self.device).config()
    }

    /// Whether the device is activated on the current connection's rings.
    pub fn is_active(&self) -> bool {
        lock(&self.device).is_active()
    }

    /// The device's counters.
    pub fn counters(&self) -> NetCounters {
        lock(&self.device).counters()
    }

    /// The dirty log of the current connection (live migration).
    pub fn migration_log(&self) -> &Arc<MigrationLog> {
        &self.migration
    }

    /// Sends a RARP announcement for `mac` on the first queue pair's backend,
    /// as a frontend's `SEND_RARP` asks after a migration (the switches learn
    /// where the guest's MAC address now is).
    pub fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
        let frame = rarp_frame(mac);
        let iov = [libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        }];
        // SAFETY: the iovec describes `frame`, readable and alive for the
        // call, and its length is the frame's.
        let tx = unsafe { virtio_net_standby::TxFrame::new(&iov, frame.len()) };
        let pair = self
            .pairs
            .first()
            .ok_or_else(|| io::Error::other("the device has no queue pair"))?;
        let mut p = pair.lock();
        p.backend_mut().send(&tx)?;
        p.backend_mut().flush()
    }

    /// The backend-request channel of the current connection.
    pub fn channel(&self) -> &Arc<BackendChannel> {
        &self.channel
    }

    /// Worker threads: one per queue pair.
    pub fn workers(&self) -> usize {
        self.wakes.len()
    }

    /// What each queue pair's worker did: its thread, and the chains it moved.
    pub fn pair_stats(&self) -> Vec<PairStats> {
        self.pair_stats
            .iter()
            .enumerate()
            .map(|(i, c)| PairStats {
                worker: i,
                tid: c.tid.load(Ordering::Relaxed),
                chains: c.chains.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Epoll registrations of worker `thread` (`handle_event`'s `thread_id`):
    /// its pair's backend readiness and its self-wake, `(fd, events, token)`.
    pub(crate) fn backend_listeners(&self, thread: usize) -> Vec<(i32, EventSet, u64)> {
        let Some(wake) = self.wakes.get(thread) else {
            return Vec::new();
        };
        let mut out = vec![(wake.as_raw_fd(), EventSet::IN, self.wake_token())];
        for (i, p) in self.pairs.iter().enumerate().filter(|(i, _)| *i == thread) {
            let p = p.lock();
            let be = p.backend();
            let ev = |writable: bool| {
                EventSet::EDGE_TRIGGERED
                    | if writable {
                        EventSet::OUT
                    } else {
                        EventSet::IN
                    }
            };
            match (be.rx_readiness(), be.tx_readiness()) {
                (Some(r), Some(t)) if r.fd == t.fd => {
                    let mut e = ev(r.writable);
                    if t.writable {
                        e |= EventSet::OUT;
                    }
                    // One registration per fd: epoll refuses a second. The RX
                    // token covers both directions.
                    out.push((r.fd, e, listener_token(self.num_queues, i, false)));
                }
                (r, t) => {
                    if let Some(r) = r {
                        out.push((
                            r.fd,
                            ev(r.writable),
                            listener_token(self.num_queues, i, false),
                        ));
                    }
                    if let Some(t) = t {
                        out.push((
                            t.fd,
                            ev(t.writable),
                            listener_token(self.num_queues, i, true),
                        ));
                    }
                }
            }
        }
        out
    }

    fn wake_token(&self) -> u64 {
        listener_token(self.num_queues, self.pairs.len(), false)
    }

    /// The connection ended: stop, forget the negotiation, drop the channel.
    /// The next frontend starts from a reset device. [`Server`](crate::Server)
    /// calls it; a VMM running its own `VhostUserDaemon` calls it after
    /// `wait()` returns.
    pub fn disconnected(&self) {
        let mut dev = lock(&self.device);
        dev.stop();
        dev.reset();
        let mut conn = lock(&self.conn);
        conn.vrings.clear();
        conn.known.clear();
        conn.active.clear();
        conn.mem = None;
        conn.activation_failed = false;
        for r in &self.recorded {
            r.store(false, Ordering::Release);
        }
        self.channel.detach();
        self.migration.reset();
    }

    /// Stops the device and writes its queues' positions into the vrings.
    fn stop_device(&self, dev: &mut StandbyNet<VhostUserMemory, B>) {
        if !dev.is_active() {
            return;
        }
        let states = dev.stop();
        let mut conn = lock(&self.conn);
        conn.active.clear();
        for (index, st) in states {
            if let Some(Some(v)) = conn.vrings.get(usize::from(index)) {
                v.set_queue_next_avail(st.next_avail);
                v.set_queue_next_used(st.next_used);
            }
        }
        log::info!("{}: device stopped", self.name);
    }

    fn ctrl_index(&self, acked: Features) -> Option<usize> {
        acked.has(VIRTIO_NET_F_CTRL_VQ).then(|| {
            if acked.has(VIRTIO_NET_F_MQ) {
                2 * self.pairs.len()
            } else {
                2
            }
        })
    }

    /// The global queue index of worker `thread`'s `k`-th vring (its
    /// `queues_per_thread` mask's `k`-th set bit).
    fn queue_of(&self, thread: usize, k: usize) -> Option<usize> {
        let mask = *self.masks.get(thread)?;
        (0..64).filter(|i| mask >> i & 1 == 1).nth(k)
    }

    /// Notes worker `thread`'s vrings (once per connection).
    fn record(&self, thread: usize, vrings: &[Vring]) {
        let Some(flag) = self.recorded.get(thread) else {
            return;
        };
        if flag.load(Ordering::Acquire) {
            return;
        }
        let mut conn = lock(&self.conn);
        if conn.known.len() < self.num_queues {
            conn.known.resize(self.num_queues, None);
        }
        for (k, v) in vrings.iter().enumerate() {
            if let Some(q) = self.queue_of(thread, k) {
                conn.known[q] = Some(v.clone());
            }
        }
        flag.store(true, Ordering::Release);
    }

    /// Activates the device if the rings it needs are started and enabled.
    /// Returns whether it is active.
    fn try_activate(&self) -> bool {
        let mut dev = lock(&self.device);
        if dev.is_active() {
            return true;
        }
        let vrings = lock(&self.conn).known.clone();
        let Some(acked) = dev.acked_features() else {
            return false;
        };
        let Some(mem) = lock(&self.conn).mem.clone() else {
            return false;
        };
        let ready = |i: usize| {
            vrings
                .get(i)
                .is_some_and(|v| v.as_ref().is_some_and(ring_ready))
        };
        let ctrl = self.ctrl_index(acked);
        if !ready(0) || !ready(1) || ctrl.is_some_and(|c| !ready(c)) {
            return false;
        }
        let n_pairs = self.usable_pairs(acked);
        let indices: Vec<usize> = self.rings_to_use(acked, ready).collect();
        let mut queues = Vec::with_capacity(indices.len());
        for &i in &indices {
            let Some(Some(vring)) = vrings.get(i) else {
                return false;
            };
            let state = vring.get_ref().get_queue().state();
            match Queue::try_from(state) {
                Ok(queue) => {
                    self.migration.set_used_ring(
                        i as u16,
                        queue.used_ring(),
                        6 + 8 * u64::from(queue.size()),
                    );
                    queues.push(virtio_net_standby::ActivateQueue {
                        index: i as u16,
                        queue,
                        kick: None,
                    })
                }
                Err(e) => {
                    log::debug!("{}: vring {i} cannot be used: {e:?}", self.name);
                    return false;
                }
            }
        }
        let interrupt = Arc::new(VringInterrupt {
            vrings: vrings.clone(),
            channel: Arc::clone(&self.channel),
        });
        match dev.activate(mem, interrupt, queues) {
            Ok(()) => {
                // Without `CTRL_VQ` the frontend keeps the control queue and
                // enables pairs by their rings: the pairs in use are those
                // whose rings are ready, from pair 0 on.
                if acked.has(VIRTIO_NET_F_MQ) && ctrl.is_none() {
                    let n = (0..n_pairs)
                        .take_while(|p| ready(2 * p) && ready(2 * p + 1))
                        .count();
                    if let Err(e) = dev.set_active_queue_pairs(n as u16) {
                        log::warn!("{}: cannot enable {n} queue pair(s): {e}", self.name);
                    }
                }
                let mut conn = lock(&self.conn);
                conn.vrings = vrings;
                conn.active = indices.clone();
                conn.activation_failed = false;
                drop(conn);
                log::info!(
                    "{}: device active on {} queue(s), features {:#x}",
                    self.name,
                    indices.len(),
                    acked.bits()
                );
                true
            }
            Err(e) => {
                let mut conn = lock(&self.conn);
                if conn.activation_failed {
                    log::debug!("{}: cannot activate the device: {e}", self.name);
                } else {
                    log::error!("{}: cannot activate the device: {e}", self.name);
                    conn.activation_failed = true;
                }
                false
            }
        }
    }

    /// One pass over the queues `work` names, of `pair` and the control
    /// queue; returns (work left, chains of the pair, chains of the control
    /// queue).
    fn pass(
        &self,
        pair: Option<&QueuePairHandle<VhostUserMemory, B>>,
        work: &mut Work,
    ) -> (bool, usize, usize) {
        let (mut more, mut chains, mut ctrl) = (false, 0, 0);
        if work.ctrl {
            let r = lock(&self.ctrl).process();
            work.ctrl = r.more;
            more |= r.more;
            ctrl = r.chains;
        }
        if let Some(p) = pair {
            if work.tx {
                let r = p.process_tx();
                work.tx = r.more;
                more |= r.more;
                chains += r.chains;
            }
            if work.rx {
                let r = p.process_rx();
                work.rx = r.more;
                more |= r.more;
                chains += r.chains;
            }
        }
        (more, chains, ctrl)
    }

    /// Counts `chains` moved on `pair` by this thread (once per pass).
    fn account(&self, pair: usize, chains: usize) {
        if chains == 0 {
            return;
        }
        if let Some(c) = self.pair_stats.get(pair) {
            c.chains.fetch_add(chains as u64, Ordering::Relaxed);
            c.tid.store(gettid(), Ordering::Relaxed);
        }
    }

    /// Worker `thread` processes `work` on its pair, then polls its pair if
    /// configured. Returns to the event loop after [`MAX_PASSES`] passes or
    /// [`MAX_POLL_TURN`] with work left, waking itself so that kicks, the exit
    /// event and the control queue get their turn.
    fn process(&self, thread: usize, mut work: Work) {
        let pair = self.pairs.get(thread);
        let mut passes = 0;
        loop {
            let (mut more, chains, ctrl) = self.pass(pair, &mut work);
            self.account(thread, chains);
            if ctrl > 0 {
                // A command may have enabled pairs (`VQ_PAIRS_SET`) or changed
                // their filters: every worker looks at its pair again, since
                // what arrived meanwhile raised no new readiness.
                for t in (0..self.wakes.len()).filter(|&t| t != thread) {
                    self.wake_later(t);
                }
                work.rx = true;
                work.tx = true;
                more = true;
            }
            if !more {
                break;
            }
            passes += 1;
            if passes >= MAX_PASSES {
                self.wake_later(thread);
                return;
            }
        }
        let window = self.poll_ns.load(Ordering::Relaxed);
        let Some(pair) = pair.filter(|_| window != 0) else {
            return;
        };
        // Poll the pair's rings until they stay dry for the window, with the
        // driver's kicks held off meanwhile; then one pass with kicks back on,
        // which catches a frame that came after the last poll. While frames
        // flow the clock is read only every POLL_CLOCK_PASSES passes.
        pair.lock().set_polling(true);
        let started = Instant::now();
        let mut idle_since: Option<Instant> = None;
        let rings = Work {
            rx: true,
            tx: true,
            ctrl: false,
        };
        let mut busy_passes = 0u32;
        let mut moved = 0usize;
        let settle_chains = self.settle_chains.load(Ordering::Relaxed) as usize;
        let settle_pauses = self.settle_pauses.load(Ordering::Relaxed);
        loop {
            let (more, chains, _) = self.pass(Some(pair), &mut rings.clone());
            moved += chains;
            let now = if more || chains > 0 {
                idle_since = None;
                busy_passes += 1;
                if !more && chains < settle_chains {
                    for _ in 0..settle_pauses {
                        std::hint::spin_loop();
                    }
                }
                if busy_passes % POLL_CLOCK_PASSES != 0 {
                    std::hint::spin_loop();
                    continue;
                }
                Instant::now()
            } else {
                let now = Instant::now();
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since).as_nanos() as u64 >= window {
                    break;
                }
                now
            };
            if now.duration_since(started) >= MAX_POLL_TURN {
                break;
            }
            std::hint::spin_loop();
        }
        pair.lock().set_polling(false);
        let (more, chains, _) = self.pass(Some(pair), &mut rings.clone());
        self.account(thread, moved + chains);
        if more {
            self.wake_later(thread);
        }
    }

    fn wake_later(&self, thread: usize) {
        if let Some(w) = self.wakes.get(thread)
            && let Err(e) = w.write(1)
        {
            log::warn!("{}: cannot wake worker {thread}: {e}", self.name);
        }
    }

    /// Whether the rings that are started and enabled differ from those the
    /// device was activated with (a queue pair enabled later, a ring disabled).
    ///
    /// Only the rings the negotiation lets the device use count: without
    /// `MQ` the rings of further pairs may well be started, and restarting
    /// the device for them would only activate it on the same rings again,
    /// at every event.
    ///
    /// A pair counts once both its rings are ready: a frontend enables them
    /// one message at a time, and a pair with one ring ready would otherwise
    /// restart the device on the same rings at every event until the other
    /// came.
    fn rings_changed(&self) -> bool {
        let acked = lock(&self.device)
            .acked_features()
            .unwrap_or(Features::empty());
        let conn = lock(&self.conn);
        let ready = |i: usize| {
            conn.known
                .get(i)
                .is_some_and(|v| v.as_ref().is_some_and(ring_ready))
        };
        // `active` was collected from `rings_to_use` itself, in its order.
        !self
            .rings_to_use(acked, ready)
            .eq(conn.active.iter().copied())
    }

    /// The queue pairs the negotiation lets the device use.
    fn usable_pairs(&self, acked: Features) -> usize {
        if acked.has(VIRTIO_NET_F_MQ) {
            self.pairs.len()
        } else {
            1
        }
    }

    /// The rings the device runs on when `ready` says which are started and
    /// enabled: every usable pair whose two rings are ready, then the control
    /// queue if negotiated.
    /// Checked at every event, so it allocates nothing.
    fn rings_to_use(
        &self,
        acked: Features,
        ready: impl Fn(usize) -> bool + Copy,
    ) -> impl Iterator<Item = usize> {
        (0..self.usable_pairs(acked))
            .filter(move |p| ready(2 * p) && ready(2 * p + 1))
            .flat_map(|p| [2 * p, 2 * p + 1])
            .chain(self.ctrl_index(acked).filter(move |&c| ready(c)))
    }
}

impl<B: NetBackend + 'static> VhostUserBackend for VhostUserNet<B> {
    type Bitmap = LogBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.offered.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        // VHOST_F_LOG_ALL is the frontend migrating, not a device feature:
        // switching it changes nothing else.
        self.migration
            .set_logging(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let virtio = features
            & !(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | VhostUserVirtioFeatures::LOG_ALL.bits());
        let mut dev = lock(&self.device);
        if dev.acked_features().map(Features::bits) == Some(virtio) {
            return;
        }
        self.stop_device(&mut dev);
        // A frontend that services some queues itself (QEMU keeps the control
        // queue) acks features whose dependencies it does not forward: keep
        // the self-consistent part, as a driver's own negotiation would. `MQ`
        // stays without `CTRL_VQ`: such a frontend enables queue pairs by
        // their rings (`SET_VRING_ENABLE`), see `try_activate`.
        let consistent = features::prune_with_frontend_control(Features::from_bits(virtio));
        if consistent.bits() != virtio {
            log::info!(
                "{}: the frontend acked {virtio:#x}; using {:#x}, without the features whose dependencies it left out",
                self.name,
                consistent.bits()
            );
        }
        if let Err(e) = dev.ack_features_from_frontend(consistent.bits()) {
            // Never run on a previous negotiation the frontend no longer uses.
            dev.reset();
            log::error!(
                "{}: refusing the frontend's features {virtio:#x}, the device stays inactive: {e}",
                self.name
            );
        } else {
            log::info!("{}: features {:#x} accepted", self.name, consistent.bits());
        }
        drop(dev);
        self.channel.bump();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        let mut dev = lock(&self.device);
        self.stop_device(&mut dev);
        dev.reset();
        let mut conn = lock(&self.conn);
        conn.vrings.clear();
        conn.active.clear();
        drop(conn);
        log::info!("{}: device reset by the frontend", self.name);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The device reads EVENT_IDX from the acknowledged features.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size.min(256) as usize];
        lock(&self.device).read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.device).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<VhostUserMemory>) -> io::Result<()> {
        // The handler swaps the map inside the same atomic; an active device
        // follows through its memory watch. Each region's bitmap reports to
        // the dirty log at the region's guest physical address.
        let mut end = 0u64;
        for region in mem.memory().iter() {
            region.bitmap().bind(region.start_addr().0, &self.migration);
            end = end.max(region.start_addr().0.saturating_add(region.len()));
        }
        // With logging forced, a log of the backend's own must cover the
        // table: measuring without it would measure nothing.
        self.migration
            .cover(end)
            .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
        lock(&self.conn).mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                EXIT_CONSUMERS.with(|c| {
                    if let Some(fds) = c.borrow_mut().as_mut() {
                        fds.push(pair.0.as_raw_fd());
                    }
                });
                Some(pair)
            }
            Err(e) => {
                log::error!("{}: cannot create the worker's exit event: {e}", self.name);
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let mut dev = lock(&self.device);
        if dev.is_active() {
            log::debug!("{}: GET_VRING_BASE {queue_index}", self.name);
            self.stop_device(&mut dev);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.record(thread_id, vrings);
        let mut was_active = self.is_active();
        if was_active && self.rings_changed() {
            // Rings started, enabled or disabled after activation: restart on
            // the current set. Positions go through the vrings, nothing is lost.
            self.stop_device(&mut lock(&self.device));
            was_active = false;
        }
        if !self.try_activate() {
            return Ok(());
        }
        if !was_active {
            // Active from now on (whoever activated it): every other worker
            // processes its pair once.
            for t in (0..self.wakes.len()).filter(|&t| t != thread_id) {
                self.wake_later(t);
            }
        }
        let mut work = if was_active {
            Work::default()
        } else {
            Work::ALL
        };
        let ev = usize::from(device_event);
        if u64::from(device_event) == self.wake_token() {
            if let Some(w) = self.wakes.get(thread_id) {
                let _ = w.read();
            }
            work = Work::ALL;
        } else if ev < self.num_queues {
            // The `ev`-th ring of this worker.
            let q = self.queue_of(thread_id, ev).unwrap_or(usize::MAX);
            let acked = lock(&self.device)
                .acked_features()
                .unwrap_or(Features::empty());
            if Some(q) == self.ctrl_index(acked) {
                work.ctrl = true;
            } else if q / 2 == thread_id {
                if q % 2 == 0 {
                    work.rx = true;
                } else {
                    work.tx = true;
                }
            }
        } else if let Some(k) = ev.checked_sub(self.num_queues + 1) {
            let (pair, tx) = (k / 2, k % 2 == 1);
            if pair == thread_id {
                if tx {
                    work.tx = true;
                } else {
                    // A shared fd registered once: readable means RX, writable TX.
                    work.rx |= evset.contains(EventSet::IN);
                    work.tx |= evset.contains(EventSet::OUT);
                }
            }
        }
        self.process(thread_id, work);
        Ok(())
    }
}

/// Whether a vring is started and enabled.
fn ring_ready(v: &Vring) -> bool {
    let s = v.get_ref();
    s.get_queue().ready() && s.is_enabled()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_tokens_clear_the_reserved_range() {
        // Queues 0..=4 and the handler's token 5 are reserved for 2 pairs + ctrl.
        assert_eq!(listener_token(5, 0, false), 6);
        assert_eq!(listener_token(5, 0, true), 7);
        assert_eq!(listener_token(5, 1, false), 8);
        assert!(protocol_features().contains(VhostUserProtocolFeatures::BACKEND_REQ));
    }

    #[test]
    fn one_worker_per_queue_pair_and_the_control_queue_on_the_first() {
        // 1 pair + ctrl, 2 pairs + ctrl, 2 pairs without ctrl, 31 pairs + ctrl.
        assert_eq!(queue_masks(1, 3), vec![0b111]);
        assert_eq!(queue_masks(2, 5), vec![0b10011, 0b01100]);
        assert_eq!(queue_masks(2, 4), vec![0b0011, 0b1100]);
        let m = queue_masks(31, 63);
        assert_eq!(m.len(), 31);
        assert_eq!(m[0], 0b11 | 1 << 62);
        assert_eq!(m[30], 0b11 << 60);
        // Every ring on exactly one worker.
        assert_eq!(m.iter().fold(0, |a, b| a | b), u64::MAX >> 1);
        assert_eq!(m.iter().map(|b| b.count_ones()).sum::<u32>(), 63);
    }
}
