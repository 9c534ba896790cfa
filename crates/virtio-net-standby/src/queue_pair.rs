//! One receive/transmit queue pair and its backend: the unit a VMM thread drives.
//!
//! The device creates one [`QueuePair`] per pair when it is built and hands out
//! [`QueuePairHandle`]s. A VMM calls [`QueuePairHandle::process_tx`] when the
//! driver kicks the TX queue or the backend becomes writable again, and
//! [`QueuePairHandle::process_rx`] when the driver kicks the RX queue or the
//! backend becomes readable. Different pairs can be driven from different threads;
//! nothing is shared between them on the packet path but the device's read-mostly
//! state.
//!
//! Each call checks (one atomic load) whether the VMM has installed a new guest
//! memory map and, if so, re-translates the rings before touching them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueState;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{NetBackend, Readiness, RxBuffers, RxPeek};
use crate::counters::{AtomicCounters, NetCounters};
use crate::features::Features;
use crate::filter::FilterView;
use crate::header::MAX_BUFFER_LEN;
use crate::memory::{GuestRam, MemoryWatch};
use crate::processed::Processed;
use crate::ring::{RingFeatures, SplitRing};
use crate::rx::{PendingRx, RxQueue};
use crate::shared::Shared;
use crate::tx::TxQueue;
use virtio_device::{ActivateQueue, VirtioInterrupt, VirtioInterruptType};

use crate::device;

/// Sizes the RX path needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RxGeometry {
    pub mrg: bool,
    pub max_frame: usize,
    pub small_frame: usize,
}

struct Active<M: GuestMemoryBackend> {
    watch: MemoryWatch<M>,
    ram: GuestRam<M>,
    tx: TxQueue,
    rx: RxQueue,
    filter: FilterView,
    interrupt: Arc<dyn VirtioInterrupt>,
    features: Features,
    tx_kick: Option<EventFd>,
    rx_kick: Option<EventFd>,
    broken: bool,
}

/// A queue pair. Reached through a [`QueuePairHandle`].
pub struct QueuePair<M: GuestMemoryBackend, B: NetBackend> {
    index: u16,
    backend: B,
    shared: Arc<Shared>,
    counters: Arc<AtomicCounters>,
    pending: PendingRx,
    staged: Vec<u16>,
    active: Option<Active<M>>,
    budget: usize,
    /// The driver enabled this pair (`VIRTIO_NET_CTRL_MQ`); pair 0 always is.
    enabled: bool,
    /// Kicks are held off between polls.
    polling: bool,
}

/// The state of a queue pair a snapshot records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PairState {
    pub rx: Option<QueueState>,
    pub tx: Option<QueueState>,
    pub rx_staged: Vec<u16>,
    pub pending: Vec<Vec<u8>>,
}

impl<M, B> QueuePair<M, B>
where
    M: GuestMemoryBackend + Send + Sync,
    M::R: Sync,
    B: NetBackend,
{
    pub(crate) fn new(index: u16, backend: B, shared: Arc<Shared>) -> Self {
        QueuePair {
            index,
            backend,
            shared,
            counters: Arc::new(AtomicCounters::default()),
            pending: PendingRx::default(),
            staged: Vec::new(),
            active: None,
            budget: 1024,
            enabled: index == 0,
            polling: false,
        }
    }

    fn rx_queue_index(&self) -> u16 {
        2 * self.index
    }

    fn tx_queue_index(&self) -> u16 {
        2 * self.index + 1
    }

    pub(crate) fn activate(
        &mut self,
        watch: MemoryWatch<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        features: Features,
        geometry: RxGeometry,
        rx: ActivateQueue,
        tx: ActivateQueue,
    ) -> device::Result<()> {
        let ram = GuestRam::new(watch.current())?;
        let ring_features = RingFeatures::from_features(features);
        let ring = |q: &ActivateQueue| {
            SplitRing::new(&q.queue, &ram, ring_features).map_err(|source| device::Error::Queue {
                index: q.index,
                source,
            })
        };
        let mut rx_ring = ring(&rx)?;
        let mut tx_ring = ring(&tx)?;
        rx_ring.hold_kicks(self.polling);
        tx_ring.hold_kicks(self.polling);
        let staged = std::mem::take(&mut self.staged);
        self.active = Some(Active {
            filter: FilterView::new(&self.shared.filter),
            rx: RxQueue::new(
                rx_ring,
                geometry.mrg,
                geometry.max_frame,
                geometry.small_frame,
                staged,
            ),
            tx: TxQueue::new(tx_ring),
            watch,
            ram,
            interrupt,
            features,
            tx_kick: tx.kick,
            rx_kick: rx.kick,
            broken: false,
        });
        Ok(())
    }

    /// Stops processing but keeps what the guest will want back: the receive
    /// chains the device holds and the frames pending for it (a failed activation
    /// after a restore must not lose them).
    pub(crate) fn deactivate(&mut self) {
        if let Some(a) = self.active.take() {
            self.staged = a.rx.staged_heads();
        }
    }

    /// Stops processing and gives the queues back to the driver: receive chains
    /// taken but not filled are handed back by rewinding the RX position, so
    /// the next activation takes them again from the available ring. Frames
    /// pending for the guest stay. Returns the RX and TX queue states.
    pub(crate) fn stop(&mut self) -> Option<(QueueState, QueueState)> {
        let a = self.active.take()?;
        self.staged.clear();
        let rewind = u16::try_from(a.rx.staged_heads().len()).unwrap_or(u16::MAX);
        Some((a.rx.ring.state(rewind), a.tx.ring.state(0)))
    }

    /// While `on`, processing leaves the driver's kicks off when the rings run
    /// dry, for a caller that polls (see [`SplitRing::hold_kicks`]). Turn it off
    /// and process once more before sleeping on the kicks again.
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
        if let Some(a) = self.active.as_mut() {
            a.tx.ring.hold_kicks(on);
            a.rx.ring.hold_kicks(on);
        }
    }

    /// Stops processing and forgets the queues and held frames (device reset).
    pub(crate) fn reset(&mut self) {
        self.active = None;
        self.pending = PendingRx::default();
        self.staged.clear();
        self.enabled = self.index == 0;
        if let Err(e) = self.backend.set_offloads(Features::empty()) {
            log::warn!("{}: resetting backend offloads failed: {e}", self.shared.id);
        }
        if let Err(e) = self.backend.set_enabled(self.index == 0) {
            log::warn!(
                "{}: re-enabling queue pair {} failed: {e}",
                self.shared.id,
                self.index
            );
        }
    }

    pub(crate) fn set_offloads(&mut self, guest: Features) -> io::Result<()> {
        self.backend.set_offloads(guest)
    }

    pub(crate) fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.enabled = enabled;
        self.backend.set_enabled(enabled)
    }

    /// Makes sure the rings point into the installed memory map.
    fn refresh_memory(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if a.broken {
            return false;
        }
        if a.watch.is_current(&a.ram) {
            return true;
        }
        let rebuilt = GuestRam::new(a.watch.current())
            .map_err(|e| e.to_string())
            .and_then(|ram| {
                a.tx.ring.retranslate(&ram).map_err(|e| e.to_string())?;
                a.rx.ring.retranslate(&ram).map_err(|e| e.to_string())?;
                Ok(ram)
            });
        match rebuilt {
            Ok(ram) => {
                a.rx.unstage_all();
                a.ram = ram;
                true
            }
            Err(e) => {
                a.broken = true;
                self.shared.fail(&format_args!(
                    "queue pair {} after a memory map change: {e}",
                    self.index
                ));
                false
            }
        }
    }

    fn notify(&self, a: &Active<M>, queue: u16, c: &mut NetCounters) {
        if let Err(e) = a.interrupt.trigger(VirtioInterruptType::Queue(queue)) {
            log::warn!("{}: queue {queue} interrupt failed: {e}", self.shared.id);
        }
        c.notifications_sent += 1;
    }

    /// Processes the TX queue. See [`QueuePairHandle::process_tx`].
    pub fn process_tx(&mut self) -> Processed {
        if !self.refresh_memory() {
            return Processed::default();
        }
        let link_up = self.shared.link_up();
        let mut c = NetCounters::default();
        let Some(a) = self.active.as_mut() else {
            return Processed::default();
        };
        let (out, notify, result) = a.tx.process(
            &a.ram,
            &mut self.backend,
            a.features,
            link_up,
            self.budget,
            &mut c,
        );
        // The chains used before a ring error are published and counted: the
        // driver is told about them as about any others, then that the device
        // needs a reset.
        if notify {
            let a = self.active.as_ref().expect("active");
            self.notify(a, self.tx_queue_index(), &mut c);
        } else if out.chains > 0 {
            c.notifications_suppressed += 1;
        }
        if let Err(e) = result {
            self.active.as_mut().expect("active").broken = true;
            self.shared
                .fail(&format_args!("TX queue {}: {e}", self.tx_queue_index()));
        }
        let out = Processed {
            notified: notify,
            ..out
        };
        self.counters.add(&c);
        out
    }

    /// Processes the RX queue. See [`QueuePairHandle::process_rx`]. A pair the
    /// driver disabled (`VIRTIO_NET_CTRL_MQ`) receives nothing.
    pub fn process_rx(&mut self) -> Processed {
        if !self.enabled || !self.refresh_memory() {
            return Processed::default();
        }
        let link_up = self.shared.link_up();
        let mut c = NetCounters::default();
        let Some(a) = self.active.as_mut() else {
            return Processed::default();
        };
        a.filter.refresh(&self.shared.filter);
        let (out, notify, result) = a.rx.process(
            &a.ram,
            &mut self.backend,
            &a.filter,
            &mut self.pending,
            link_up,
            self.budget,
            &mut c,
        );
        // The chains used before a ring error are published and counted: the
        // driver is told about them as about any others, then that the device
        // needs a reset.
        if notify {
            let a = self.active.as_ref().expect("active");
            self.notify(a, self.rx_queue_index(), &mut c);
        } else if out.chains > 0 {
            c.notifications_suppressed += 1;
        }
        if let Err(e) = result {
            self.active.as_mut().expect("active").broken = true;
            self.shared
                .fail(&format_args!("RX queue {}: {e}", self.rx_queue_index()));
        }
        let out = Processed {
            notified: notify,
            ..out
        };
        self.counters.add(&c);
        out
    }

    /// Moves frames the backend already holds into the device's pending queue
    /// (bounded), so that a snapshot carries them. Returns how many moved.
    pub(crate) fn drain_backend(&mut self) -> usize {
        let mut moved = 0;
        let mut scratch = vec![0u8; MAX_BUFFER_LEN];
        loop {
            if self.pending.len() >= PendingRx::MAX_FRAMES {
                break;
            }
            if self.backend.peek() == RxPeek::Empty {
                break;
            }
            let iov = [libc::iovec {
                iov_base: scratch.as_mut_ptr().cast(),
                iov_len: scratch.len(),
            }];
            // SAFETY: the iovec covers `scratch`, untouched by anything else meanwhile.
            let mut bufs = unsafe { RxBuffers::new(&iov, scratch.len()) };
            match self.backend.recv(&mut bufs) {
                Ok(n) => {
                    if !self.pending.push(scratch[..n].to_vec()) {
                        log::warn!("{}: pending RX full, a frame is lost", self.shared.id);
                        break;
                    }
                    moved += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!(
                        "{}: backend lost a frame while draining: {e}",
                        self.shared.id
                    );
                }
            }
        }
        self.counters.add(&NetCounters {
            rx_pending_queued: moved as u64,
            ..Default::default()
        });
        moved
    }

    pub(crate) fn state(&self) -> PairState {
        let (rx, tx, rx_staged) = match &self.active {
            Some(a) => (
                Some(a.rx.ring.state(0)),
                Some(a.tx.ring.state(0)),
                a.rx.staged_heads(),
            ),
            None => (None, None, self.staged.clone()),
        };
        PairState {
            rx,
            tx,
            rx_staged,
            pending: self.pending.iter().map(<[u8]>::to_vec).collect(),
        }
    }

    /// Installs restored state before activation.
    pub(crate) fn restore(&mut self, staged: Vec<u16>, pending: Vec<Vec<u8>>) {
        self.staged = staged;
        self.pending = PendingRx::default();
        for f in pending {
            self.pending.push(f);
        }
    }

    /// After an activation that left this pair idle (the driver enabled none of
    /// its rings): receive buffers a restored state staged on its receive ring
    /// cannot be used and are forgotten, so that the device's state stays one
    /// its restore accepts (no staged buffers without their queue).
    pub(crate) fn forget_staged_if_idle(&mut self) {
        if self.active.is_none() {
            self.staged.clear();
        }
    }

    /// The RX and TX queues' current state (ring addresses and positions), while
    /// active.
    pub fn queue_states(&self) -> Option<(QueueState, QueueState)> {
        self.active
            .as_ref()
            .map(|a| (a.rx.ring.state(0), a.tx.ring.state(0)))
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (for tests and tools; the device must not be
    /// processing meanwhile, which holding the lock guarantees).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// This pair's counters.
    pub fn counters(&self) -> NetCounters {
        self.counters.snapshot()
    }

    /// Frames the device holds for the guest.
    pub fn pending(&self) -> &PendingRx {
        &self.pending
    }

    /// Whether the pair is active (the driver set it up and the device is not
    /// broken).
    pub fn is_active(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.broken)
    }

    /// Sets how many chains (TX) or frames (RX, delivered or dropped) one
    /// processing call handles at most before it returns with
    /// [`Processed::more`] (default 1024), so one busy queue cannot starve the
    /// others served by the same thread.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget.max(1);
    }

    pub(crate) fn kick_fds(&self) -> (Option<&EventFd>, Option<&EventFd>) {
        match &self.active {
            Some(a) => (a.rx_kick.as_ref(), a.tx_kick.as_ref()),
            None => (None, None),
        }
    }

    pub(crate) fn readiness(&self) -> (Option<Readiness>, Option<Readiness>) {
        (self.backend.rx_readiness(), self.backend.tx_readiness())
    }
}

/// A shared handle to one queue pair; clone it into the thread that drives the
/// pair. Each call locks the pair for its duration (uncontended unless two
/// threads drive the same pair).
pub struct QueuePairHandle<M: GuestMemoryBackend, B: NetBackend> {
    inner: Arc<Mutex<QueuePair<M, B>>>,
    index: u16,
}

impl<M: GuestMemoryBackend, B: NetBackend> Clone for QueuePairHandle<M, B> {
    fn clone(&self) -> Self {
        QueuePairHandle {
            inner: Arc::clone(&self.inner),
            index: self.index,
        }
    }
}

impl<M, B> QueuePairHandle<M, B>
where
    M: GuestMemoryBackend + Send + Sync,
    M::R: Sync,
    B: NetBackend,
{
    pub(crate) fn new(pair: QueuePair<M, B>) -> Self {
        QueuePairHandle {
            index: pair.index,
            inner: Arc::new(Mutex::new(pair)),
        }
    }

    /// The pair's index (0 for `receiveq1`/`transmitq1`).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Locks the pair for several operations at once.
    pub fn lock(&self) -> MutexGuard<'_, QueuePair<M, B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what the guest put on the TX queue. Call it when the driver kicks
    /// the TX queue, when the backend's TX readiness fires after
    /// [`Processed::blocked`], and again right away after [`Processed::more`].
    pub fn process_tx(&self) -> Processed {
        self.lock().process_tx()
    }

    /// Delivers waiting frames into the guest's RX buffers. Call it when the
    /// driver kicks the RX queue, when the backend's RX readiness fires, and again
    /// right away after [`Processed::more`].
    pub fn process_rx(&self) -> Processed {
        self.lock().process_rx()
    }

    /// This pair's counters.
    pub fn counters(&self) -> NetCounters {
        self.lock().counters()
    }
}
