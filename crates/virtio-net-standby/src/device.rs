//! The standby virtio-net device: features, configuration, queues, activation,
//! reset, the STANDBY hook and snapshots, tied together behind
//! [`VirtioDevice`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use device_state::Persist;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_device::{AckNotifier, ActivateQueue, FeaturesListener, VirtioDevice, VirtioInterrupt};
use virtio_queue::{QueueState, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};

use crate::backend::NetBackend;
use crate::config::{
    self, DUPLEX_UNKNOWN, NetConfigSpace, SPEED_UNKNOWN, STATUS_ANNOUNCE, STATUS_LINK_UP,
};
use crate::counters::NetCounters;
use crate::ctrl::{ControlQueue, CtrlState};
use crate::features::{self, DEFAULT_OFFER, F_STANDBY, Features, GUEST_OFFLOADS, HOST_OFFLOADS};
use crate::filter::{MacAddr, RxFilter};
use crate::header::{HDR_LEN, MAX_BUFFER_LEN};
use crate::memory;
use crate::memory::MemoryWatch;
use crate::processed::Processed;
use crate::queue_pair::{QueuePair, QueuePairHandle, RxGeometry};
use crate::ring;
use crate::shared::Shared;
use crate::snapshot::{self, NetState, SavedPair, SavedQueue};

/// The most queue pairs a device can have: 2N + 1 queues (the control queue
/// last) must fit a 16-bit queue index. (The control command allows 32768.)
pub const MAX_QUEUE_PAIRS: u16 = 32767;

/// Errors building or operating the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One backend per queue pair is needed.
    #[error("{expected} backends are needed (one per queue pair), {got} were given")]
    BackendCount {
        /// Queue pairs configured.
        expected: usize,
        /// Backends given.
        got: usize,
    },
    /// Split queue sizes are powers of two.
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    /// Queue pairs must be between 1 and 32767: with the control queue, 2N + 1
    /// queues must be numbered by a 16-bit queue index.
    #[error("the device needs between 1 and 32767 queue pairs, not {0}")]
    QueuePairs(u16),
    /// The MTU is too small for IPv4.
    #[error("MTU {0} is below the IPv4 minimum of 68")]
    Mtu(u16),
    /// A multicast address cannot be a station address.
    #[error("{0:02x?} is a multicast address and cannot be the device's MAC")]
    MulticastMac(MacAddr),
    /// The configured offer is not usable, or the driver's feature set was
    /// refused (the transport clears `FEATURES_OK`).
    #[error("the feature set was refused")]
    Features(#[from] features::Error),
    /// The operation needs an inactive device.
    #[error("the device is active: reset it first")]
    Active,
    /// `activate` before a successful `ack_features`.
    #[error("activate was called before the driver's features were accepted")]
    NotNegotiated,
    /// A queue the device needs was not handed over, or not set ready.
    #[error("queue {0} is needed but the driver did not set it up")]
    MissingQueue(u16),
    /// A queue index the device does not have.
    #[error("queue {0} does not exist on this device")]
    UnknownQueue(u16),
    /// A queue's rings cannot be used.
    #[error("queue {index} cannot be used")]
    Queue {
        /// The queue index.
        index: u16,
        /// Why.
        #[source]
        source: ring::Error,
    },
    /// Guest memory cannot be used by the packet path.
    #[error("guest memory cannot be used")]
    Memory(#[from] memory::Error),
    /// `announce` without `VIRTIO_NET_F_GUEST_ANNOUNCE` negotiated.
    #[error(
        "the driver did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE: the host must announce the guest itself (for example with a RARP)"
    )]
    AnnounceNotNegotiated,
    /// [`StandbyNet::set_active_queue_pairs`] outside 1 to the pairs the
    /// negotiation allows.
    #[error(
        "{requested} active queue pairs asked for, but the negotiation allows 1 to {available} (more than 1 needs VIRTIO_NET_F_MQ)"
    )]
    ActivePairs {
        /// Pairs asked for.
        requested: u16,
        /// The most the negotiation allows.
        available: usize,
    },
    /// A snapshot could not be restored.
    #[error("the snapshot cannot be restored")]
    Snapshot(#[from] snapshot::Error),
    /// The backend refused a setting.
    #[error("the backend refused a setting")]
    Backend(#[source] io::Error),
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a [`StandbyNet`].
#[derive(Debug, Clone)]
pub struct StandbyNetBuilder {
    id: String,
    mac: MacAddr,
    mtu: u16,
    queue_pairs: u16,
    queue_size: u16,
    offer: Features,
    standby: bool,
    link_up: bool,
    speed: u32,
    duplex: u8,
}

impl Default for StandbyNetBuilder {
    fn default() -> Self {
        StandbyNetBuilder {
            id: "net0".into(),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_pairs: 1,
            queue_size: 256,
            offer: DEFAULT_OFFER,
            standby: true,
            link_up: true,
            speed: SPEED_UNKNOWN,
            duplex: DUPLEX_UNKNOWN,
        }
    }
}

impl StandbyNetBuilder {
    /// A builder with the defaults: a standby device `net0` with one queue pair of
    /// 256 entries, MAC 52:54:00:12:34:56, MTU 1500, every feature offered.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device id: what a primary's `failover_pair_id` names, and what the
    /// STANDBY event reports. Default `net0`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The MAC address the guest reads (and pairs the primary by). Default
    /// 52:54:00:12:34:56.
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = mac;
        self
    }

    /// The MTU advised to the guest (`VIRTIO_NET_F_MTU`). Default 1500.
    pub fn mtu(mut self, mtu: u16) -> Self {
        self.mtu = mtu;
        self
    }

    /// Number of queue pairs (one backend each). Default 1; more offers `MQ`.
    pub fn queue_pairs(mut self, n: u16) -> Self {
        self.queue_pairs = n;
        self
    }

    /// Maximum size of every queue. Default 256.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// The feature set to offer (before removing what the backends cannot
    /// carry). Default: everything implemented ([`DEFAULT_OFFER`]).
    pub fn features(mut self, offer: Features) -> Self {
        self.offer = offer;
        self
    }

    /// Whether to offer `VIRTIO_NET_F_STANDBY`. Default true: this is the standby
    /// crate; false builds a plain virtio-net device.
    pub fn standby(mut self, on: bool) -> Self {
        self.standby = on;
        self
    }

    /// Whether the link starts up. Default true.
    pub fn link_up(mut self, up: bool) -> Self {
        self.link_up = up;
        self
    }

    /// Link speed (Mbit/s) and duplex reported with `SPEED_DUPLEX`. Default
    /// unknown.
    pub fn speed_duplex(mut self, speed: u32, duplex: u8) -> Self {
        self.speed = speed;
        self.duplex = duplex;
        self
    }

    /// Builds the device with one backend per queue pair.
    pub fn build<M, B>(self, backends: Vec<B>) -> Result<StandbyNet<M, B>>
    where
        M: GuestMemoryBackend + Send + Sync + 'static,
        M::R: Sync,
        B: NetBackend,
    {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(Error::QueuePairs(self.queue_pairs));
        }
        if backends.len() != usize::from(self.queue_pairs) {
            return Err(Error::BackendCount {
                expected: usize::from(self.queue_pairs),
                got: backends.len(),
            });
        }
        if self.queue_size < 2 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(Error::QueueSize(self.queue_size));
        }
        if self.mtu < 68 {
            return Err(Error::Mtu(self.mtu));
        }
        if self.mac[0] & 1 != 0 {
            return Err(Error::MulticastMac(self.mac));
        }
        let mut offer = self.offer;
        if !self.standby {
            offer = offer.without(F_STANDBY);
        }
        if self.queue_pairs == 1 {
            offer = offer.without(VIRTIO_NET_F_MQ);
        }
        features::validate_offer(offer)?;
        // Offer no offload some backend cannot carry, and nothing that depended on
        // what was removed.
        let carried = backends
            .iter()
            .fold(GUEST_OFFLOADS.union(HOST_OFFLOADS), |acc, b| {
                acc.intersection(b.offloads_supported())
            });
        offer = features::prune(
            offer.difference(GUEST_OFFLOADS.union(HOST_OFFLOADS).difference(carried)),
        );

        let config = NetConfigSpace {
            mac: self.mac,
            status: if self.link_up { STATUS_LINK_UP } else { 0 },
            max_virtqueue_pairs: self.queue_pairs,
            mtu: self.mtu,
            speed: self.speed,
            duplex: self.duplex,
        };
        let shared = Arc::new(Shared::new(self.id, config, config::config_len(offer)));
        let pairs: Vec<_> = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| QueuePairHandle::new(QueuePair::new(i as u16, b, Arc::clone(&shared))))
            .collect();
        let ctrl = ControlQueue::new(Arc::clone(&shared), pairs.clone());
        let negotiation =
            AckNotifier::new(shared.id.clone(), VIRTIO_ID_NET).requiring(1 << F_STANDBY);
        Ok(StandbyNet {
            shared,
            mac: self.mac,
            offered: offer,
            acked: None,
            queue_size: self.queue_size,
            mtu: self.mtu,
            pairs,
            ctrl: Arc::new(Mutex::new(ctrl)),
            negotiation,
            restored_queues: Vec::new(),
            active: false,
        })
    }
}

/// A virtio-net device that offers `VIRTIO_NET_F_STANDBY`. See the crate
/// documentation for a walk-through.
pub struct StandbyNet<M: GuestMemoryBackend, B: NetBackend> {
    shared: Arc<Shared>,
    mac: MacAddr,
    offered: Features,
    acked: Option<Features>,
    queue_size: u16,
    mtu: u16,
    pairs: Vec<QueuePairHandle<M, B>>,
    ctrl: Arc<Mutex<ControlQueue<M, B>>>,
    negotiation: AckNotifier,
    /// The queues of a restored state: their ring positions are applied to the
    /// queues of the next activation, and until then a snapshot saves them as
    /// they were restored.
    restored_queues: Vec<SavedQueue>,
    active: bool,
}

impl<M: GuestMemoryBackend, B: NetBackend> std::fmt::Debug for StandbyNet<M, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandbyNet")
            .field("id", &self.shared.id)
            .field("offered", &self.offered)
            .field("acked", &self.acked)
            .field("queue_pairs", &self.pairs.len())
            .field("active", &self.active)
            .finish()
    }
}

/// A shared handle to the device's control queue.
pub type ControlQueueHandle<M, B> = Arc<Mutex<ControlQueue<M, B>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<M, B> StandbyNet<M, B>
where
    M: GuestMemoryBackend + Send + Sync + 'static,
    M::R: Sync,
    B: NetBackend,
{
    /// The device id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The features offered.
    pub fn offered_features(&self) -> Features {
        self.offered
    }

    /// The features the driver acknowledged, once it has.
    pub fn acked_features(&self) -> Option<Features> {
        self.acked
    }

    /// Whether the driver acknowledged STANDBY in the current negotiation.
    pub fn standby_negotiated(&self) -> bool {
        self.acked.is_some_and(|f| f.has(F_STANDBY))
    }

    /// Registers a listener told when the driver acknowledges STANDBY (once per
    /// negotiation, and on restoring a state in which it was acknowledged: that
    /// is where the failover coordinator plugs the primary). If the current
    /// negotiation already acknowledged it, the listener is told at once.
    ///
    /// The event is the one every route raises ([`virtio_device::FeaturesAcked`]):
    /// a transport that sees `FEATURES_OK` raises the same type.
    pub fn add_standby_listener(&mut self, listener: Arc<dyn FeaturesListener>) {
        self.negotiation.add_listener(listener);
    }

    /// The guest-visible configuration fields.
    pub fn config(&self) -> NetConfigSpace {
        self.shared.config()
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.shared.link_up()
    }

    /// Sets the link state; raises a configuration interrupt when it changes on
    /// an active device. While the link is down, TX frames are consumed and
    /// dropped and RX frames are read from the backend and dropped (counted).
    /// A standby must keep its link up while the primary is away: the guest's
    /// net_failover sends through it then.
    pub fn set_link_up(&self, up: bool) {
        let changed = self.shared.update_config(|c| {
            if up {
                c.status |= STATUS_LINK_UP;
            } else {
                c.status &= !STATUS_LINK_UP;
            }
        });
        if changed && self.active {
            self.shared.signal_config();
        }
    }

    /// Asks the guest to announce itself (gratuitous ARP / unsolicited neighbour
    /// advertisement), as after a migration: sets `VIRTIO_NET_S_ANNOUNCE` and
    /// raises a configuration interrupt. The driver acknowledges with
    /// `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
    pub fn announce(&self) -> Result<()> {
        let acked = self.acked.unwrap_or_default();
        if !acked.has(VIRTIO_NET_F_GUEST_ANNOUNCE) || !acked.has(VIRTIO_NET_F_CTRL_VQ) {
            return Err(Error::AnnounceNotNegotiated);
        }
        self.shared.update_config(|c| c.status |= STATUS_ANNOUNCE);
        if self.active {
            self.shared.signal_config();
        }
        Ok(())
    }

    /// Handles to the queue pairs, pair 0 first.
    pub fn queue_pairs(&self) -> &[QueuePairHandle<M, B>] {
        &self.pairs
    }

    /// The handle of queue pair `i`.
    pub fn queue_pair(&self, i: usize) -> Option<&QueuePairHandle<M, B>> {
        self.pairs.get(i)
    }

    /// A handle to the control queue.
    pub fn control_queue(&self) -> ControlQueueHandle<M, B> {
        Arc::clone(&self.ctrl)
    }

    /// Executes the commands on the control queue. Call it when the driver kicks
    /// the control queue.
    pub fn process_ctrl(&self) -> Processed {
        lock(&self.ctrl).process()
    }

    /// How many queue pairs the driver enabled (`VIRTIO_NET_CTRL_MQ`).
    pub fn active_queue_pairs(&self) -> u16 {
        lock(&self.ctrl).state().active_pairs
    }

    /// Accepts the features a frontend that serves the control queue itself
    /// acknowledged (a vhost-user frontend): as
    /// [`VirtioDevice::ack_features`], except that `MQ` is valid without
    /// `CTRL_VQ` ([`features::negotiate_with_frontend_control`]). Such a
    /// frontend enables queue pairs by their rings; tell the device with
    /// [`set_active_queue_pairs`](Self::set_active_queue_pairs).
    pub fn ack_features_from_frontend(&mut self, features: u64) -> Result<()> {
        if self.active {
            return Err(Error::Active);
        }
        let acked =
            features::negotiate_with_frontend_control(self.offered, Features::from_bits(features))?;
        self.accept_features(acked)?;
        self.negotiation.acked(acked.bits());
        Ok(())
    }

    /// Enables queue pairs 0 to `n - 1` and disables the others, as the
    /// driver's `VQ_PAIRS_SET` does: for a frontend that serves the control
    /// queue itself and enables pairs by their rings. Needs `MQ` negotiated
    /// and `n` between 1 and the device's queue pairs.
    pub fn set_active_queue_pairs(&mut self, n: u16) -> Result<()> {
        let acked = self.acked.ok_or(Error::NotNegotiated)?;
        if !acked.has(VIRTIO_NET_F_MQ) || n == 0 || usize::from(n) > self.pairs.len() {
            return Err(Error::ActivePairs {
                requested: n,
                available: if acked.has(VIRTIO_NET_F_MQ) {
                    self.pairs.len()
                } else {
                    1
                },
            });
        }
        lock(&self.ctrl).apply_pairs(n).map_err(Error::Backend)
    }

    /// The receive filter the driver programmed.
    pub fn rx_filter(&self) -> Arc<RxFilter> {
        self.shared.filter.load()
    }

    /// Counters summed over every queue pair and the control queue.
    pub fn counters(&self) -> NetCounters {
        let mut c = self.shared.counters.snapshot();
        for p in &self.pairs {
            c += p.counters();
        }
        c
    }

    /// Whether the driver's `DRIVER_OK` activated the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Stops the queues but keeps what the driver negotiated, its receive filter
    /// and the frames waiting for it: what a vhost-user backend does on
    /// `GET_VRING_BASE`, or a VMM pausing the device. Receive buffers the device
    /// had taken but not yet filled go back to the driver (the RX position is
    /// rewound over them), so the returned positions are where the next
    /// [`activate`](VirtioDevice::activate) resumes. Returns `(queue index,
    /// state)` for every queue that was active; empty if the device was not.
    pub fn stop(&mut self) -> Vec<(u16, QueueState)> {
        let mut out = Vec::new();
        for (i, p) in self.pairs.iter().enumerate() {
            if let Some((rx, tx)) = p.lock().stop() {
                out.push((2 * i as u16, rx));
                out.push((2 * i as u16 + 1, tx));
            }
        }
        let mut ctrl = lock(&self.ctrl);
        if let Some(q) = ctrl.queue_state() {
            out.push(q);
        }
        ctrl.deactivate();
        drop(ctrl);
        self.active = false;
        self.shared.set_interrupt(None);
        out
    }

    fn accept_features(&mut self, acked: Features) -> Result<()> {
        self.acked = Some(acked);
        let vlan_filtering = acked.has(VIRTIO_NET_F_CTRL_VLAN);
        self.shared
            .filter
            .update(|f| f.set_all_vlans(!vlan_filtering));
        lock(&self.ctrl).negotiated(acked).map_err(Error::Backend)
    }

    /// Saves the guest-visible state. Call it with the device quiesced (no thread
    /// processing its queues). Frames the backends already hold are moved into the
    /// device (bounded) so they travel with the state rather than being lost.
    pub fn snapshot(&self) -> NetState {
        let mut pairs = Vec::with_capacity(self.pairs.len());
        let mut queues = Vec::new();
        for (i, p) in self.pairs.iter().enumerate() {
            let mut p = p.lock();
            if self.active {
                p.drain_backend();
            }
            let st = p.state();
            let i = 2 * i as u16;
            if let Some(rx) = st.rx {
                queues.push(SavedQueue {
                    index: i,
                    state: rx,
                });
            }
            if let Some(tx) = st.tx {
                queues.push(SavedQueue {
                    index: i + 1,
                    state: tx,
                });
            }
            pairs.push(SavedPair {
                rx_staged: st.rx_staged,
                pending_rx: st.pending,
            });
        }
        let ctrl = lock(&self.ctrl);
        if let Some((index, state)) = ctrl.queue_state() {
            queues.push(SavedQueue { index, state });
        }
        // Restored and not activated since (then no queue above is live): the
        // queues exist only as restored (their staged buffers and ring
        // positions belong to them), and a snapshot taken now must restore to
        // the same device. Saved in index order, as live queues are.
        queues.extend_from_slice(&self.restored_queues);
        queues.sort_by_key(|q| q.index);
        let cs = ctrl.state();
        NetState {
            device_id: self.shared.id.clone(),
            offered: self.offered,
            acked: self.acked,
            config: self.shared.config(),
            filter: RxFilter::clone(&self.shared.filter.load()),
            active_pairs: cs.active_pairs,
            guest_offloads: cs.guest_offloads,
            queues,
            pairs,
        }
    }

    /// Restores a state saved by [`snapshot`](Self::snapshot) into this (inactive)
    /// device, built with the same configuration. If the state says STANDBY was
    /// acknowledged, the STANDBY listeners are told (`restored: true`): that is
    /// where a migration destination plugs its primary. The transport then
    /// restores its registers and activates the device as usual: the next
    /// activation resumes each queue at the ring positions the state saved
    /// (a VMM without a transport of its own can build the queues from
    /// [`NetState::queues`]). Incompatible state is refused and leaves the
    /// device reset.
    pub fn restore(&mut self, state: &NetState) -> Result<()> {
        if self.active {
            return Err(Error::Active);
        }
        state.check_compatible(self.offered, self.pairs.len(), self.queue_size)?;
        self.reset_state();
        if let Some(acked) = state.acked {
            let acked = features::negotiate(self.offered, acked).map_err(|e| {
                snapshot::Error::Refused(format!(
                    "the saved feature negotiation is not valid on this device: {e}"
                ))
            })?;
            self.accept_features(acked)?;
        }
        self.shared.update_config(|c| *c = state.config);
        self.shared.filter.publish(state.filter.clone());
        lock(&self.ctrl)
            .restore(CtrlState {
                active_pairs: state.active_pairs,
                guest_offloads: state.guest_offloads,
            })
            .map_err(Error::Backend)?;
        for (p, saved) in self.pairs.iter().zip(&state.pairs) {
            p.lock()
                .restore(saved.rx_staged.clone(), saved.pending_rx.clone());
        }
        self.restored_queues = state.queues.clone();
        if let Some(acked) = self.acked {
            self.negotiation.restored(acked.bits());
        }
        Ok(())
    }

    fn reset_state(&mut self) {
        for p in &self.pairs {
            p.lock().reset();
        }
        lock(&self.ctrl).reset();
        self.acked = None;
        self.active = false;
        self.negotiation.reset();
        self.restored_queues.clear();
        self.shared.set_interrupt(None);
        self.shared.clear_needs_reset();
        let mac = self.mac;
        self.shared.update_config(|c| {
            c.mac = mac;
            c.status &= !STATUS_ANNOUNCE;
        });
        self.shared.filter.publish(RxFilter::new(mac));
    }
}

impl<M, B> VirtioDevice<M> for StandbyNet<M, B>
where
    M: GuestMemoryBackend + Send + Sync + 'static,
    M::R: Sync,
    B: NetBackend,
{
    type Error = Error;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut n = 2 * self.pairs.len();
        if self.offered.has(VIRTIO_NET_F_CTRL_VQ) {
            n += 1;
        }
        vec![self.queue_size; n]
    }

    fn features(&self) -> u64 {
        self.offered.bits()
    }

    fn ack_features(&mut self, features: u64) -> Result<()> {
        if self.active {
            return Err(Error::Active);
        }
        let acked = features::negotiate(self.offered, Features::from_bits(features))?;
        self.accept_features(acked)?;
        // Once per negotiation: a set written twice is not raised again, a
        // different set is a new negotiation.
        self.negotiation.acked(acked.bits());
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.shared
            .config()
            .read(self.shared.config_len, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: ignoring a {}-byte driver write at config offset {offset}",
            self.shared.id,
            data.len()
        );
        self.shared.counters.add(&NetCounters {
            config_writes_ignored: 1,
            ..Default::default()
        });
    }

    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivateQueue>,
    ) -> Result<()> {
        if self.active {
            return Err(Error::Active);
        }
        let acked = self.acked.ok_or(Error::NotNegotiated)?;
        let mq = acked.has(VIRTIO_NET_F_MQ);
        let n_pairs = if mq { self.pairs.len() } else { 1 };
        let ctrl_index =
            acked
                .has(VIRTIO_NET_F_CTRL_VQ)
                .then_some(if mq { 2 * self.pairs.len() } else { 2 } as u16);

        let mut rx: Vec<Option<ActivateQueue>> = (0..n_pairs).map(|_| None).collect();
        let mut tx: Vec<Option<ActivateQueue>> = (0..n_pairs).map(|_| None).collect();
        let mut ctrl = None;
        for mut q in queues {
            if let Some(saved) = self.restored_queues.iter().find(|r| r.index == q.index) {
                q.queue.set_next_avail(saved.state.next_avail);
                q.queue.set_next_used(saved.state.next_used);
            }
            let i = usize::from(q.index);
            if i < 2 * n_pairs {
                let slot = if i % 2 == 0 {
                    &mut rx[i / 2]
                } else {
                    &mut tx[i / 2]
                };
                *slot = Some(q);
            } else if Some(q.index) == ctrl_index {
                ctrl = Some(q);
            } else {
                return Err(Error::UnknownQueue(q.index));
            }
        }
        if let Some(ci) = ctrl_index {
            if ctrl.is_none() {
                return Err(Error::MissingQueue(ci));
            }
        }
        let guest_gso = [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ]
        .iter()
        .any(|b| acked.has(*b));
        let small_frame = HDR_LEN + 18 + usize::from(self.mtu);
        let geometry = RxGeometry {
            mrg: acked.has(VIRTIO_NET_F_MRG_RXBUF),
            max_frame: if guest_gso {
                MAX_BUFFER_LEN
            } else {
                small_frame
            },
            small_frame,
        };
        let watch = MemoryWatch::new(mem);
        let result = (|| {
            for (i, (r, t)) in rx.into_iter().zip(tx).enumerate() {
                match (r, t) {
                    (Some(r), Some(t)) => self.pairs[i].lock().activate(
                        watch.clone(),
                        Arc::clone(&interrupt),
                        acked,
                        geometry,
                        r,
                        t,
                    )?,
                    // Pair 0 is mandatory; a further pair the driver left alone
                    // simply stays idle.
                    (None, None) if i > 0 => {}
                    (None, _) => return Err(Error::MissingQueue(2 * i as u16)),
                    (_, None) => return Err(Error::MissingQueue(2 * i as u16 + 1)),
                }
            }
            if let Some(q) = ctrl {
                lock(&self.ctrl).activate(watch.clone(), Arc::clone(&interrupt), q)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Keep the negotiation and any restored state: the transport may
            // retry activation.
            for p in &self.pairs {
                p.lock().deactivate();
            }
            lock(&self.ctrl).deactivate();
            return Err(e);
        }
        self.shared.set_interrupt(Some(interrupt));
        self.active = true;
        for p in &self.pairs {
            p.lock().forget_staged_if_idle();
        }
        self.restored_queues.clear();
        Ok(())
    }

    fn reset(&mut self) {
        self.reset_state();
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset()
    }
}

impl<M, B> Persist for StandbyNet<M, B>
where
    M: GuestMemoryBackend + Send + Sync + 'static,
    M::R: Sync,
    B: NetBackend,
{
    type State = NetState;

    /// [`StandbyNet::snapshot`]: call it with the device quiesced.
    fn save(&self) -> device_state::Result<NetState> {
        Ok(self.snapshot())
    }

    /// [`StandbyNet::restore`], with its refusals as state-contract errors.
    fn restore(&mut self, state: &NetState) -> device_state::Result<()> {
        StandbyNet::restore(self, state).map_err(|e| match e {
            Error::Snapshot(e) => e,
            other => device_state::Error::Refused(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DUPLEX_FULL, STATUS_LINK_UP};
    use crate::features::{F_VERSION_1, IMPLEMENTED};
    use crate::testing::{
        DriverQueue, GuestDriver, GuestMem, RecordingBackend, RecordingInterrupt, TestMemory, frame,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_device::FeaturesAcked;

    type Dev = StandbyNet<GuestMem, RecordingBackend>;

    fn dev() -> Dev {
        StandbyNetBuilder::new()
            .build(vec![RecordingBackend::default()])
            .unwrap()
    }

    fn counting_listener(dev: &mut Dev) -> Arc<Mutex<Vec<FeaturesAcked>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        dev.add_standby_listener(Arc::new(move |e: &FeaturesAcked| {
            s.lock().unwrap().push(e.clone())
        }));
        seen
    }

    #[test]
    fn builder_validation() {
        let b = || StandbyNetBuilder::new();
        let one = || vec![RecordingBackend::default()];
        let e = |r: Result<Dev>| r.unwrap_err().to_string();
        assert!(e(b().build(vec![])).contains("1 backends are needed"));
        assert!(e(b().queue_size(100).build(one())).contains("queue size 100"));
        assert!(e(b().queue_pairs(0).build(vec![])).contains("between 1 and 32767"));
        assert!(matches!(
            b().queue_pairs(32768)
                .build::<GuestMem, RecordingBackend>(vec![]),
            Err(Error::QueuePairs(32768))
        ));
        assert!(e(b().mtu(67).build(one())).contains("MTU 67"));
        assert!(e(b().mac([1, 0, 0, 0, 0, 0]).build(one())).contains("multicast"));
        assert!(matches!(
            b().features(DEFAULT_OFFER.without(F_VERSION_1))
                .build::<GuestMem, _>(one()),
            Err(Error::Features(_))
        ));
        // Defaults: a standby that offers everything but MQ (one pair).
        let d = dev();
        assert_eq!(d.offered_features(), IMPLEMENTED.without(VIRTIO_NET_F_MQ));
        assert_eq!(d.queue_max_sizes(), vec![256, 256, 256]);
        assert_eq!(d.device_type(), 1);
        assert_eq!(d.id(), "net0");
        // Standby off.
        let d: Dev = b().standby(false).build(one()).unwrap();
        assert!(!d.offered_features().has(F_STANDBY));
    }

    #[test]
    fn backend_limits_the_offered_offloads() {
        struct NoUfo(RecordingBackend);
        impl NetBackend for NoUfo {
            fn send(&mut self, f: &crate::TxFrame<'_>) -> io::Result<()> {
                self.0.send(f)
            }
            fn recv(&mut self, b: &mut crate::RxBuffers<'_>) -> io::Result<usize> {
                self.0.recv(b)
            }
            fn offloads_supported(&self) -> Features {
                self.0
                    .offloads_supported()
                    .without(VIRTIO_NET_F_GUEST_UFO)
                    .without(VIRTIO_NET_F_HOST_UFO)
                    .without(VIRTIO_NET_F_GUEST_CSUM)
            }
            fn set_offloads(&mut self, g: Features) -> io::Result<()> {
                self.0.set_offloads(g)
            }
        }
        let d: StandbyNet<GuestMem, NoUfo> = StandbyNetBuilder::new()
            .build(vec![NoUfo(RecordingBackend::default())])
            .unwrap();
        let o = d.offered_features();
        for gone in [
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_ECN,
        ] {
            assert!(!o.has(gone), "{gone}");
        }
        assert!(o.has(VIRTIO_NET_F_HOST_TSO4));
        features::validate_offer(o).unwrap();
    }

    #[test]
    fn standby_listener_fires_once_per_negotiation() {
        let mut d = dev();
        let seen = counting_listener(&mut d);
        // Refused acks fire nothing.
        assert!(
            d.ack_features(Features::empty().with(F_STANDBY).bits())
                .is_err()
        );
        assert!(
            d.ack_features(DEFAULT_OFFER.with(VIRTIO_NET_F_MQ).bits())
                .is_err()
        );
        assert!(seen.lock().unwrap().is_empty());
        let all = d.offered_features();
        d.ack_features(all.bits()).unwrap();
        d.ack_features(all.bits()).unwrap(); // FEATURES_OK written twice
        {
            let s = seen.lock().unwrap();
            assert_eq!(s.len(), 1);
            assert_eq!(
                s[0],
                FeaturesAcked {
                    device_id: "net0".into(),
                    device_type: VIRTIO_ID_NET,
                    features: all.bits(),
                    restored: false
                }
            );
        }
        assert!(d.standby_negotiated());
        // A listener added later hears about the current negotiation at once.
        let late = Arc::new(AtomicUsize::new(0));
        let l = Arc::clone(&late);
        d.add_standby_listener(Arc::new(move |_: &FeaturesAcked| {
            l.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(late.load(Ordering::SeqCst), 1);
        // Reset: a new negotiation, a new event.
        d.reset();
        assert!(!d.standby_negotiated());
        d.ack_features(all.bits()).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
        // A driver that does not ack STANDBY: no event.
        d.reset();
        d.ack_features(all.without(F_STANDBY).bits()).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(!d.standby_negotiated());
    }

    #[test]
    fn config_space_reads_and_ignored_writes() {
        let mut d: Dev = StandbyNetBuilder::new()
            .mac([2, 1, 2, 3, 4, 5])
            .mtu(9000)
            .queue_pairs(2)
            .speed_duplex(25_000, DUPLEX_FULL)
            .build(vec![
                RecordingBackend::default(),
                RecordingBackend::default(),
            ])
            .unwrap();
        let mut b = [0u8; 20];
        d.read_config(0, &mut b);
        assert_eq!(&b[0..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), STATUS_LINK_UP);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 9000);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 25_000);
        assert_eq!(b[16], DUPLEX_FULL);
        assert_eq!(&b[17..], &[0, 0, 0], "past the end reads zero");
        d.write_config(0, &[0xff; 6]);
        d.write_config(u64::MAX, &[1]);
        d.read_config(0, &mut b[..6]);
        assert_eq!(&b[0..6], &[2, 1, 2, 3, 4, 5], "writes are ignored");
        assert_eq!(d.counters().config_writes_ignored, 2);
    }

    #[test]
    fn link_changes_interrupt_only_when_they_change() {
        let mut d = dev();
        let g =
            GuestDriver::bring_up(&mut d, &TestMemory::new(4 << 20), DEFAULT_OFFER, 64).unwrap();
        d.set_link_up(true);
        assert_eq!(g.interrupt.config_count(), 0);
        d.set_link_up(false);
        assert!(!d.link_up());
        let mut st = [0u8; 2];
        d.read_config(6, &mut st);
        assert_eq!(st, [0, 0]);
        assert_eq!(g.interrupt.config_count(), 1);
        d.set_link_up(true);
        assert_eq!(g.interrupt.config_count(), 2);
        assert_eq!(d.counters().config_notifications, 2);
    }

    #[test]
    fn activation_errors() {
        let mem = TestMemory::new(4 << 20);
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::default());
        let q = |i: u16| ActivateQueue {
            index: i,
            queue: DriverQueue::new(&mem, 64).queue(),
            kick: None,
        };
        let mut d = dev();
        assert!(matches!(
            d.activate(mem.atomic(), irq.clone(), vec![]),
            Err(Error::NotNegotiated)
        ));
        d.ack_features(d.offered_features().bits()).unwrap();
        assert!(matches!(
            d.activate(mem.atomic(), irq.clone(), vec![q(0), q(1)]),
            Err(Error::MissingQueue(2))
        ));
        assert!(matches!(
            d.activate(mem.atomic(), irq.clone(), vec![q(0), q(2)]),
            Err(Error::MissingQueue(1))
        ));
        assert!(matches!(
            d.activate(mem.atomic(), irq.clone(), vec![q(0), q(1), q(2), q(3)]),
            Err(Error::UnknownQueue(3))
        ));
        let mut bad = q(1);
        {
            use virtio_queue::QueueT;
            // Aligned, but outside guest memory.
            bad.queue.set_desc_table_address(Some(0x7000_0000), Some(0));
        }
        let r = d.activate(mem.atomic(), irq.clone(), vec![q(0), bad, q(2)]);
        assert!(matches!(r, Err(Error::Queue { index: 1, .. })), "{r:?}");
        // After failures the negotiation stands and a correct activation works.
        d.activate(mem.atomic(), irq.clone(), vec![q(0), q(1), q(2)])
            .unwrap();
        assert!(d.is_active());
        assert!(matches!(d.ack_features(0), Err(Error::Active)));
        assert!(matches!(
            d.activate(mem.atomic(), irq, vec![]),
            Err(Error::Active)
        ));
    }

    #[test]
    fn event_idx_follows_the_negotiation_not_the_transport() {
        // A transport that never calls Queue::set_event_idx: the device still
        // honours the EVENT_IDX the driver negotiated (and writes avail_event).
        let mem = TestMemory::new(4 << 20);
        let mut d = dev();
        d.ack_features(d.offered_features().bits()).unwrap();
        let qs: Vec<DriverQueue> = (0..3).map(|_| DriverQueue::new(&mem, 64)).collect();
        let queues = qs
            .iter()
            .enumerate()
            .map(|(i, q)| ActivateQueue {
                index: i as u16,
                queue: q.queue(), // event_idx left false
                kick: None,
            })
            .collect();
        d.activate(
            mem.atomic(),
            Arc::new(RecordingInterrupt::default()),
            queues,
        )
        .unwrap();
        let mut tx = qs.into_iter().nth(1).unwrap();
        let a = mem.alloc(64, 8);
        mem.write(a, &frame([2, 0, 0, 0, 0, 1], &[0; 30]));
        tx.add_readable(&[a], &[56]);
        tx.publish();
        d.queue_pair(0).unwrap().process_tx();
        assert_eq!(
            tx.avail_event(),
            1,
            "avail_event written: EVENT_IDX in force"
        );
        assert_eq!(tx.used_flags(), 0, "no VRING_USED_F_NO_NOTIFY games");
    }

    #[test]
    fn a_failed_activation_keeps_restored_state() {
        let mem = TestMemory::new(16 << 20);
        let be = RecordingBackend::default();
        let mut src: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mut g = GuestDriver::bring_up(&mut src, &mem, DEFAULT_OFFER, 64).unwrap();
        g.post_rx(0, 4);
        for i in 0..2u8 {
            be.incoming
                .lock()
                .unwrap()
                .push_back(frame([2, 0, 0, 0, 0, 1], &[i; 60]));
        }
        let state = src.snapshot();
        assert_eq!(state.pairs[0].pending_rx.len(), 2);
        let mut dst = dev();
        dst.restore(&state).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let queues = |bad: bool| -> Vec<ActivateQueue> {
            state
                .queues
                .iter()
                .filter(|q| !(bad && q.index == 2))
                .map(|q| ActivateQueue {
                    index: q.index,
                    queue: virtio_queue::Queue::try_from(q.state).unwrap(),
                    kick: None,
                })
                .collect()
        };
        assert!(
            dst.activate(mem.atomic(), irq.clone(), queues(true))
                .is_err()
        );
        dst.activate(mem.atomic(), irq, queues(false)).unwrap();
        dst.queue_pair(0).unwrap().process_rx();
        assert_eq!(g.recv(0).unwrap()[26], 0);
        assert_eq!(g.recv(0).unwrap()[26], 1);
    }

    #[test]
    fn a_restored_device_resumes_its_rings_when_a_transport_activates_it() {
        // A transport knows only its registers (sizes and addresses), not where
        // the rings stood: the restored device supplies the positions.
        let mem = TestMemory::new(16 << 20);
        let be = RecordingBackend::default();
        let mut src: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mut g = GuestDriver::bring_up(&mut src, &mem, DEFAULT_OFFER, 64).unwrap();
        g.post_rx(0, 8);
        for i in 0..3u8 {
            be.incoming
                .lock()
                .unwrap()
                .push_back(frame([2, 0, 0, 0, 0, 1], &[i; 60]));
        }
        src.queue_pair(0).unwrap().process_rx();
        for i in 0..3u8 {
            assert_eq!(g.recv(0).unwrap()[26], i);
        }
        let state = Persist::save(&src).unwrap();
        let rx = state.queues.iter().find(|q| q.index == 0).unwrap().state;
        assert_eq!(rx.next_used, 3);
        let mut dst: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        Persist::restore(&mut dst, &state).unwrap();
        let from_registers = state
            .queues
            .iter()
            .map(|q| {
                let mut queue = virtio_queue::Queue::try_from(q.state).unwrap();
                queue.set_next_avail(0);
                queue.set_next_used(0);
                ActivateQueue {
                    index: q.index,
                    queue,
                    kick: None,
                }
            })
            .collect();
        let irq = Arc::new(RecordingInterrupt::default());
        dst.activate(mem.atomic(), irq, from_registers).unwrap();
        be.incoming
            .lock()
            .unwrap()
            .push_back(frame([2, 0, 0, 0, 0, 1], &[7; 60]));
        dst.queue_pair(0).unwrap().process_rx();
        // The fourth frame lands in the fourth buffer, not over the first.
        assert_eq!(g.recv(0).unwrap()[26], 7);
        let (rx, _) = dst.queue_pair(0).unwrap().lock().queue_states().unwrap();
        assert_eq!(rx.next_used, 4);
    }

    #[test]
    fn a_restored_device_saves_its_queues_before_it_is_activated() {
        // Restored, then saved again before any activation (a destination that
        // hands the state on, or a VMM that snapshots right after restoring):
        // the queues, their positions and the receive buffers staged on them
        // travel on, and the state restores into a twin (fuzz finding
        // device_state-staged-heads-without-queue).
        let mem = TestMemory::new(16 << 20);
        let be = RecordingBackend::default();
        let mut src: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mut g = GuestDriver::bring_up(&mut src, &mem, DEFAULT_OFFER, 64).unwrap();
        g.post_rx(0, 8);
        be.incoming
            .lock()
            .unwrap()
            .push_back(frame([2, 0, 0, 0, 0, 1], &[1; 60]));
        src.queue_pair(0).unwrap().process_rx();
        let mut state = Persist::save(&src).unwrap();
        // A buffer staged but not filled, as a tap's pass leaves one.
        state.pairs[0].rx_staged = vec![5];
        assert!(!state.queues.is_empty());
        let mut dst: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        Persist::restore(&mut dst, &state).unwrap();
        let again = Persist::save(&dst).unwrap();
        assert_eq!(again, state);
        let mut twin: Dev = StandbyNetBuilder::new().build(vec![be]).unwrap();
        Persist::restore(&mut twin, &again).unwrap();
        assert_eq!(Persist::save(&twin).unwrap(), state);
    }

    #[test]
    fn a_pair_left_idle_by_the_activation_forgets_its_restored_staged_buffers() {
        // Restored with buffers staged on pair 1, then activated by a driver
        // that enabled pair 0 only: pair 1's ring is not running, its staged
        // buffers go, and the device's state stays one its restore accepts.
        let mem = TestMemory::new(16 << 20);
        let two = || {
            StandbyNetBuilder::new()
                .queue_pairs(2)
                .build(vec![
                    RecordingBackend::default(),
                    RecordingBackend::default(),
                ])
                .unwrap()
        };
        let mut src: Dev = two();
        let _g = GuestDriver::bring_up(&mut src, &mem, DEFAULT_OFFER, 64).unwrap();
        let mut state = Persist::save(&src).unwrap();
        assert!(state.queues.iter().any(|q| q.index == 2));
        state.pairs[1].rx_staged = vec![3];
        let mut dst: Dev = two();
        Persist::restore(&mut dst, &state).unwrap();
        let pair0_and_ctrl = state
            .queues
            .iter()
            .filter(|q| q.index != 2 && q.index != 3)
            .map(|q| ActivateQueue {
                index: q.index,
                queue: virtio_queue::Queue::try_from(q.state).unwrap(),
                kick: None,
            })
            .collect();
        let irq = Arc::new(RecordingInterrupt::default());
        dst.activate(mem.atomic(), irq, pair0_and_ctrl).unwrap();
        let saved = Persist::save(&dst).unwrap();
        assert!(saved.pairs[1].rx_staged.is_empty());
        assert!(!saved.queues.iter().any(|q| q.index == 2));
        let mut twin: Dev = two();
        Persist::restore(&mut twin, &saved).unwrap();
    }

    #[test]
    fn snapshot_restore_carries_the_guest_visible_device() {
        let mem = TestMemory::new(16 << 20);
        let src_be = RecordingBackend::default();
        let mut src: Dev = StandbyNetBuilder::new()
            .id("standby1")
            .build(vec![src_be.clone()])
            .unwrap();
        let mut g = GuestDriver::bring_up(&mut src, &mem, DEFAULT_OFFER, 64).unwrap();
        // Program state through the control queue.
        let ctrl = |g: &mut GuestDriver, d: &Dev, c: u32, m: u32, data: &[u8]| {
            assert_eq!(g.ctrl(d, c as u8, m as u8, data), 0);
        };
        ctrl(
            &mut g,
            &src,
            VIRTIO_NET_CTRL_RX,
            VIRTIO_NET_CTRL_RX_PROMISC,
            &[0],
        );
        ctrl(
            &mut g,
            &src,
            VIRTIO_NET_CTRL_VLAN,
            VIRTIO_NET_CTRL_VLAN_ADD,
            &7u16.to_le_bytes(),
        );
        ctrl(
            &mut g,
            &src,
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            &[2, 9, 9, 9, 9, 9],
        );
        let own = [2, 9, 9, 9, 9, 9];
        // Traffic: 3 frames received, 2 sent, and 2 more waiting in the backend.
        g.post_rx(0, 8);
        for i in 0..3u8 {
            src_be
                .incoming
                .lock()
                .unwrap()
                .push_back(frame(own, &[i; 100]));
        }
        src.queue_pair(0).unwrap().process_rx();
        for i in 0..2u8 {
            g.queue_tx(0, &frame(own, &[i; 10]));
        }
        g.tx[0].publish();
        src.queue_pair(0).unwrap().process_tx();
        for i in 3..5u8 {
            src_be
                .incoming
                .lock()
                .unwrap()
                .push_back(frame(own, &[i; 100]));
        }
        let state = src.snapshot();
        assert_eq!(
            state.pairs[0].pending_rx.len(),
            2,
            "backend frames travel with the state"
        );
        let bytes = state.to_bytes();

        // Destination: same configuration, fresh backend.
        let dst_be = RecordingBackend::default();
        let mut dst: Dev = StandbyNetBuilder::new()
            .id("standby1")
            .build(vec![dst_be.clone()])
            .unwrap();
        let seen = counting_listener(&mut dst);
        let state = NetState::from_bytes(&bytes).unwrap();
        dst.restore(&state).unwrap();
        {
            let s = seen.lock().unwrap();
            assert_eq!(s.len(), 1);
            assert!(s[0].restored);
            assert_eq!(s[0].device_id, "standby1");
        }
        assert_eq!(dst.acked_features(), src.acked_features());
        assert_eq!(dst.config(), src.config());
        assert_eq!(dst.rx_filter(), src.rx_filter());
        // The transport rebuilds its queues from the saved states and activates.
        let irq = Arc::new(RecordingInterrupt::default());
        let queues = state
            .queues
            .iter()
            .map(|q| ActivateQueue {
                index: q.index,
                queue: virtio_queue::Queue::try_from(q.state).unwrap(),
                kick: None,
            })
            .collect();
        dst.activate(mem.atomic(), irq.clone(), queues).unwrap();
        // The guest keeps running on the same rings: the pending frames arrive
        // first, in order, then new traffic.
        dst_be
            .incoming
            .lock()
            .unwrap()
            .push_back(frame(own, &[5; 100]));
        dst.queue_pair(0).unwrap().process_rx();
        let mut got = vec![];
        while let Some(f) = g.recv(0) {
            got.push(f[26]);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        // TX continues where it was.
        g.queue_tx(0, &frame(own, &[9; 10]));
        g.tx[0].publish();
        dst.queue_pair(0).unwrap().process_tx();
        assert_eq!(dst_be.log.lock().unwrap().sent.len(), 1);
        assert_eq!(src_be.log.lock().unwrap().sent.len(), 2);
        while g.tx[0].pop_used().is_some() {}
        assert_eq!(g.tx[0].in_flight(), 0);
    }

    #[test]
    fn restore_refuses_incompatible_state_without_panicking() {
        let mut src: Dev = StandbyNetBuilder::new()
            .queue_pairs(2)
            .build(vec![
                RecordingBackend::default(),
                RecordingBackend::default(),
            ])
            .unwrap();
        src.ack_features(src.offered_features().bits()).unwrap();
        let state = src.snapshot();
        // Fewer queue pairs.
        let mut d = dev();
        assert!(matches!(
            d.restore(&state),
            Err(Error::Snapshot(snapshot::Error::Mismatch { .. }))
        ));
        // No STANDBY offered on the destination: the guest acked it, refuse.
        let mut d: Dev = StandbyNetBuilder::new()
            .queue_pairs(2)
            .standby(false)
            .build(vec![
                RecordingBackend::default(),
                RecordingBackend::default(),
            ])
            .unwrap();
        let err = d.restore(&state).unwrap_err();
        assert!(format!("{:?}", err).contains("STANDBY"), "{err:?}");
        // Active devices cannot be restored into.
        let mut d = dev();
        let _g =
            GuestDriver::bring_up(&mut d, &TestMemory::new(4 << 20), DEFAULT_OFFER, 64).unwrap();
        let one = dev().snapshot();
        assert!(matches!(d.restore(&one), Err(Error::Active)));
    }

    #[test]
    fn stop_keeps_negotiation_and_resumes_where_it_left_off() {
        let mem = TestMemory::new(16 << 20);
        // Tap-like: the device takes buffers ahead of frames it cannot size.
        let be = RecordingBackend {
            opaque: true,
            ..Default::default()
        };
        let mut d: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        let mut g = GuestDriver::bring_up(&mut d, &mem, DEFAULT_OFFER, 64).unwrap();
        g.post_rx(0, 8);
        let tx = frame([2, 0, 0, 0, 0, 9], &[7; 60]);
        g.queue_tx(0, &tx);
        g.tx[0].publish();
        be.incoming
            .lock()
            .unwrap()
            .push_back(frame([2, 0, 0, 0, 0, 1], &[1; 60]));
        d.queue_pair(0).unwrap().process_tx();
        d.queue_pair(0).unwrap().process_rx();
        assert!(g.recv(0).is_some());
        let acked = d.acked_features();
        let states = d.stop();
        assert!(!d.is_active());
        assert_eq!(d.acked_features(), acked, "negotiation survives a stop");
        let pos = |i: u16| states.iter().find(|(q, _)| *q == i).unwrap().1;
        // One RX buffer filled: the position says so, whatever the device had
        // taken ahead; TX consumed its one chain; the control queue is there too.
        assert_eq!(pos(0).next_avail, 1);
        assert_eq!(pos(0).next_used, 1);
        assert_eq!(pos(1).next_avail, 1);
        assert_eq!(states.len(), 3);
        assert!(d.stop().is_empty(), "a stopped device has nothing to stop");
        // Processing a stopped device does nothing; a frame that arrives waits.
        be.incoming
            .lock()
            .unwrap()
            .push_back(frame([2, 0, 0, 0, 0, 1], &[2; 60]));
        assert_eq!(d.queue_pair(0).unwrap().process_rx(), Processed::default());
        // Resume from the returned positions: the frame lands in the next buffer.
        let queues = states
            .iter()
            .map(|(index, st)| ActivateQueue {
                index: *index,
                queue: virtio_queue::Queue::try_from(*st).unwrap(),
                kick: None,
            })
            .collect();
        d.activate(
            mem.atomic(),
            Arc::new(RecordingInterrupt::default()),
            queues,
        )
        .unwrap();
        d.queue_pair(0).unwrap().process_rx();
        let got = g.recv(0).expect("delivered after the resume");
        assert_eq!(&got[HDR_LEN + 14..], &[2; 60]);
        assert_eq!(be.log.lock().unwrap().sent.len(), 1, "TX not replayed");
    }

    #[test]
    fn memory_map_change_is_followed() {
        // Start on a map with one region; the VMM then adds a second region and
        // the guest places buffers there.
        let small = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 4 << 20)]).unwrap();
        let atomic = GuestMemoryAtomic::new(small);
        let be = RecordingBackend::default();
        let mut d: Dev = StandbyNetBuilder::new().build(vec![be.clone()]).unwrap();
        d.ack_features(d.offered_features().bits()).unwrap();
        // Rings at fixed addresses in the first region (zeroed: empty rings).
        let mk = |base: u64| {
            let mut q = virtio_queue::Queue::new(16).unwrap();
            use virtio_queue::QueueT;
            q.set_size(16);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
            q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
            q.set_ready(true);
            q
        };
        let qs = vec![
            ActivateQueue {
                index: 0,
                queue: mk(0x10000),
                kick: None,
            },
            ActivateQueue {
                index: 1,
                queue: mk(0x20000),
                kick: None,
            },
            ActivateQueue {
                index: 2,
                queue: mk(0x30000),
                kick: None,
            },
        ];
        d.activate(atomic.clone(), Arc::new(RecordingInterrupt::default()), qs)
            .unwrap();
        // Hotplug: the new map has the old region plus one at 1 GiB.
        let bigger = GuestMem::from_ranges(&[
            (vm_memory::GuestAddress(0), 4 << 20),
            (vm_memory::GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap();
        atomic.lock().unwrap().replace(bigger);
        assert_eq!(d.queue_pair(0).unwrap().process_tx(), Processed::default());
        assert!(!d.needs_reset(), "rings still inside the new map");
        // Unplug everything but a tiny region: the rings are gone, needs reset.
        let tiny = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap();
        atomic.lock().unwrap().replace(tiny);
        d.queue_pair(0).unwrap().process_rx();
        assert!(d.needs_reset());
        assert!(!d.queue_pair(0).unwrap().lock().is_active());
    }
}
