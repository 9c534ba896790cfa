//! The standby virtio-net device: features, configuration, queues, activation,
//! reset, the STANDBY hook and snapshots, tied together behind
//! [`VirtioDevice`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_net::*;
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
use crate::memory::MemoryWatch;
use crate::queue_pair::{QueuePair, QueuePairHandle, RxGeometry};
use crate::shared::Shared;
use crate::snapshot::{self, NetState, SavedPair, SavedQueue};
use crate::standby::{StandbyListener, StandbyNegotiated};
use crate::tx::Processed;
use crate::virtio::{self, ActivateQueue, VIRTIO_ID_NET, VirtioDevice, VirtioInterrupt};

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
    /// Queue pairs must be between 1 and 32768 (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`).
    #[error("the device needs between 1 and 32768 queue pairs, not {0}")]
    QueuePairs(u16),
    /// The MTU is too small for IPv4.
    #[error("MTU {0} is below the IPv4 minimum of 68")]
    Mtu(u16),
    /// A multicast address cannot be a station address.
    #[error("{0:02x?} is a multicast address and cannot be the device's MAC")]
    MulticastMac(MacAddr),
    /// The configured offer is not usable.
    #[error("the configured feature set cannot be offered")]
    Features(#[from] features::Error),
    /// The operation needs an inactive device.
    #[error("the device is active: reset it first")]
    Active,
    /// `announce` without `VIRTIO_NET_F_GUEST_ANNOUNCE` negotiated.
    #[error(
        "the driver did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE: the host must announce the guest itself (for example with a RARP)"
    )]
    AnnounceNotNegotiated,
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
        if self.queue_pairs == 0 || u32::from(self.queue_pairs) > VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX {
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
        Ok(StandbyNet {
            shared,
            mac: self.mac,
            offered: offer,
            acked: None,
            queue_size: self.queue_size,
            mtu: self.mtu,
            pairs,
            ctrl: Arc::new(Mutex::new(ctrl)),
            listeners: Vec::new(),
            standby_fired: false,
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
    listeners: Vec<Arc<dyn StandbyListener>>,
    standby_fired: bool,
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

    /// Registers a listener told when the driver acknowledges STANDBY. If the
    /// current negotiation already acknowledged it, the listener is told at once.
    pub fn add_standby_listener(&mut self, listener: Arc<dyn StandbyListener>) {
        if self.standby_fired {
            if let Some(f) = self.acked {
                listener.standby_negotiated(&self.standby_event(f, false));
            }
        }
        self.listeners.push(listener);
    }

    fn standby_event(&self, features: Features, restored: bool) -> StandbyNegotiated {
        StandbyNegotiated {
            device_id: self.shared.id.clone(),
            features: features.bits(),
            restored,
        }
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

    fn accept_features(&mut self, acked: Features) -> virtio::Result<()> {
        self.acked = Some(acked);
        let vlan_filtering = acked.has(VIRTIO_NET_F_CTRL_VLAN);
        self.shared
            .filter
            .update(|f| f.set_all_vlans(!vlan_filtering));
        lock(&self.ctrl)
            .negotiated(acked)
            .map_err(virtio::Error::Backend)
    }

    fn fire_standby(&mut self, restored: bool) {
        let Some(acked) = self.acked else { return };
        if !acked.has(F_STANDBY) || self.standby_fired {
            return;
        }
        self.standby_fired = true;
        let event = self.standby_event(acked, restored);
        log::info!(
            "{}: driver acknowledged VIRTIO_NET_F_STANDBY{}",
            event.device_id,
            if restored { " (restored)" } else { "" }
        );
        for l in &self.listeners {
            l.standby_negotiated(&event);
        }
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
    /// restores its registers from [`NetState::queues`] and activates the device
    /// as usual. Incompatible state is refused and leaves the device reset.
    pub fn restore(&mut self, state: &NetState) -> Result<()> {
        if self.active {
            return Err(Error::Active);
        }
        state.check_compatible(self.offered, self.pairs.len(), self.queue_size)?;
        self.reset_state();
        if let Some(acked) = state.acked {
            let acked =
                features::negotiate(self.offered, acked).map_err(snapshot::Error::Features)?;
            self.accept_features(acked).map_err(|e| match e {
                virtio::Error::Backend(e) => Error::Backend(e),
                other => Error::Backend(io::Error::other(other.to_string())),
            })?;
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
        self.fire_standby(true);
        Ok(())
    }

    fn reset_state(&mut self) {
        for p in &self.pairs {
            p.lock().reset();
        }
        lock(&self.ctrl).reset();
        self.acked = None;
        self.active = false;
        self.standby_fired = false;
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

    fn ack_features(&mut self, features: u64) -> virtio::Result<()> {
        if self.active {
            return Err(virtio::Error::AlreadyActive);
        }
        let acked = features::negotiate(self.offered, Features::from_bits(features))?;
        if self.acked.is_some_and(|a| a != acked) {
            // A different set within one negotiation: it is a new negotiation.
            self.standby_fired = false;
        }
        self.accept_features(acked)?;
        self.fire_standby(false);
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
    ) -> virtio::Result<()> {
        if self.active {
            return Err(virtio::Error::AlreadyActive);
        }
        let acked = self.acked.ok_or(virtio::Error::NotNegotiated)?;
        let mq = acked.has(VIRTIO_NET_F_MQ);
        let n_pairs = if mq { self.pairs.len() } else { 1 };
        let ctrl_index =
            acked
                .has(VIRTIO_NET_F_CTRL_VQ)
                .then_some(if mq { 2 * self.pairs.len() } else { 2 } as u16);

        let mut rx: Vec<Option<ActivateQueue>> = (0..n_pairs).map(|_| None).collect();
        let mut tx: Vec<Option<ActivateQueue>> = (0..n_pairs).map(|_| None).collect();
        let mut ctrl = None;
        for q in queues {
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
                return Err(virtio::Error::UnknownQueue(q.index));
            }
        }
        if let Some(ci) = ctrl_index {
            if ctrl.is_none() {
                return Err(virtio::Error::MissingQueue(ci));
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
                    (None, _) => return Err(virtio::Error::MissingQueue(2 * i as u16)),
                    (_, None) => return Err(virtio::Error::MissingQueue(2 * i as u16 + 1)),
                }
            }
            if let Some(q) = ctrl {
                lock(&self.ctrl).activate(watch.clone(), Arc::clone(&interrupt), q)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in &self.pairs {
                p.lock().reset();
            }
            lock(&self.ctrl).reset();
            // Keep the negotiation: the transport may retry activation.
            let _ = self.accept_features(acked);
            return Err(e);
        }
        self.shared.set_interrupt(Some(interrupt));
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.reset_state();
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset()
    }
}
