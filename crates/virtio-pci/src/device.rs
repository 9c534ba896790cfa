//! The virtio-pci function: config space, BARs and the status machine.

use std::sync::Arc;

use virtio_device::status::{
    DRIVER_OK as STATUS_DRIVER_OK, FEATURES_OK as STATUS_FEATURES_OK,
    NEEDS_RESET as STATUS_NEEDS_RESET,
};
use virtio_device::virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_device::virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_device::{
    AckNotifier, ActivateQueue, FeaturesListener, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};
use vmm_pci::config::{STATUS, STATUS_INTERRUPT};
use vmm_pci::pcie::{self, PcieCapConfig};
use vmm_pci::{
    BarKind, BarMove, BarRegions, ClassCode, ConfigSpace, HeaderType, IntxSink, MsiSink, Msix,
    PciFunction, PciIds,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::caps::{
    self, COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET,
    MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA_OFFSET, NOTIFY_CFG_LEN, NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER, PCI_CFG_BAR, PCI_CFG_DATA, PCI_CFG_LENGTH, PCI_CFG_OFFSET, VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
};
use crate::common::{CommonConfig, NO_VECTOR, View, Write};
use crate::interrupt::{Interrupts, IrqState};

/// Virtio's PCI vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// `VIRTIO_RING_F_EVENT_IDX` as a mask.
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device has no queues, or more than MSI-X vectors allow (2047).
    #[error("a virtio-pci device needs 1 to 2047 queues; this one has {0}")]
    QueueCount(usize),
    /// Config space layout failed (a bug in the transport).
    #[error("cannot lay out config space")]
    Config(#[from] vmm_pci::config::Error),
    /// MSI-X setup failed.
    #[error("cannot set up MSI-X")]
    Msix(#[from] vmm_pci::msix::Error),
    /// An eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Result of transport construction.
pub type Result<T> = std::result::Result<T, Error>;

/// What the transport refused or did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Driver writes ignored: clearing status bits, queue registers after
    /// enable, invalid queue sizes, writes to read-only fields.
    pub ignored_writes: u64,
    /// Feature sets the device refused (FEATURES_OK read back clear).
    pub features_refused: u64,
    /// Activations that failed (the device shows NEEDS_RESET).
    pub activation_failures: u64,
    /// Notifications that arrived as BAR writes (not through an ioeventfd).
    pub notifications: u64,
    /// Device resets (status 0).
    pub resets: u64,
}

/// Builds a [`VirtioPciDevice`].
#[derive(Clone, Default)]
pub struct VirtioPciBuilder {
    pcie: bool,
    intx: Option<Arc<dyn IntxSink>>,
    id: String,
}

impl std::fmt::Debug for VirtioPciBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciBuilder")
            .field("pcie", &self.pcie)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl VirtioPciBuilder {
    /// A PCI Express endpoint with MSI-X and no INTx line.
    pub fn new() -> Self {
        VirtioPciBuilder {
            pcie: true,
            intx: None,
            id: String::new(),
        }
    }

    /// The device's id in the VMM, carried by the [`virtio_device::FeaturesAcked`]
    /// events the transport raises (for a failover standby: what the primary's
    /// `failover_pair_id` names). Empty by default.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Whether the function is a PCI Express endpoint (default) or conventional PCI.
    pub fn pcie(mut self, on: bool) -> Self {
        self.pcie = on;
        self
    }

    /// The INTx line used while the driver has MSI-X off.
    pub fn intx(mut self, line: Arc<dyn IntxSink>) -> Self {
        self.intx = Some(line);
        self
    }

    /// Wraps `device`; its queues will use `mem`, its MSI-X messages go to `msi`.
    pub fn build<M, D>(
        self,
        device: D,
        mem: GuestMemoryAtomic<M>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<VirtioPciDevice<M, D>>
    where
        M: GuestMemoryBackend,
        D: VirtioDevice<M>,
    {
        let maxes = device.queue_max_sizes();
        if maxes.is_empty() || maxes.len() > 2047 {
            return Err(Error::QueueCount(maxes.len()));
        }
        let dtype = device.device_type();
        let class = if dtype == VIRTIO_ID_NET {
            ClassCode::ETHERNET
        } else {
            ClassCode::new(0xff, 0, 0)
        };
        let ids = PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(dtype as u16),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x1100,
            revision: 1,
            class,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, self.pcie);
        cs.set_interrupt_pin(1);
        if self.pcie {
            pcie::add_pcie_capability(&mut cs, &PcieCapConfig::endpoint())?;
        }
        let pci_cfg_cap = caps::add_virtio_caps(&mut cs, maxes.len() as u16)?;
        let vectors = maxes.len() as u16 + 1;
        let msix = Msix::add(&mut cs, vectors, MSIX_BAR, 0, MSIX_BAR, MSIX_PBA_OFFSET)?;
        cs.add_bar(
            MSIX_BAR,
            BarKind::Memory32 {
                prefetchable: false,
            },
            MSIX_BAR_SIZE,
        )?;
        cs.add_bar(
            VIRTIO_BAR,
            BarKind::Memory64 { prefetchable: true },
            VIRTIO_BAR_SIZE,
        )?;
        let kicks = (0..maxes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::EventFd)?;
        Ok(VirtioPciDevice {
            common: CommonConfig::new(&maxes),
            interrupts: Arc::new(Interrupts::new(msix, maxes.len(), msi, self.intx)),
            cs,
            pci_cfg_cap,
            device,
            mem,
            kicks,
            activated: false,
            needs_reset: false,
            counters: TransportCounters::default(),
            negotiation: AckNotifier::new(self.id, dtype),
        })
    }
}

/// A virtio device on PCI. See the crate documentation.
pub struct VirtioPciDevice<M: GuestMemoryBackend, D: VirtioDevice<M>> {
    pub(crate) cs: ConfigSpace,
    pci_cfg_cap: u16,
    pub(crate) common: CommonConfig,
    pub(crate) interrupts: Arc<Interrupts>,
    pub(crate) device: D,
    mem: GuestMemoryAtomic<M>,
    kicks: Vec<EventFd>,
    activated: bool,
    pub(crate) needs_reset: bool,
    counters: TransportCounters,
    pub(crate) negotiation: AckNotifier,
}

impl<M: GuestMemoryBackend, D: VirtioDevice<M>> std::fmt::Debug for VirtioPciDevice<M, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.status)
            .finish_non_exhaustive()
    }
}

/// What the driver sees of the common configuration beyond its own registers:
/// (device features, status, generation) and the vector assignments.
fn view((device_features, status, generation): (u64, u8, u8), irq: &IrqState) -> View<'_> {
    View {
        device_features,
        status,
        generation,
        config_vector: irq.config_vector,
        queue_vectors: &irq.queue_vectors,
    }
}

impl<M: GuestMemoryBackend, D: VirtioDevice<M>> VirtioPciDevice<M, D> {
    /// The device's id, as given to [`VirtioPciBuilder::id`].
    pub fn id(&self) -> &str {
        self.negotiation.device_id()
    }

    /// Registers a listener told when the driver's feature set is accepted
    /// (`FEATURES_OK`), once per negotiation, and when a saved state in which it
    /// was accepted is restored. If the current negotiation already accepted a
    /// set, the listener is told at once. It runs on the thread doing the
    /// driver's status write, with the transport borrowed: queue work rather
    /// than calling back into the transport.
    pub fn add_features_listener(&mut self, listener: Arc<dyn FeaturesListener>) {
        self.negotiation.add_listener(listener);
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status the driver reads.
    pub fn status(&self) -> u8 {
        let mut s = self.common.status;
        if self.needs_reset || (self.activated && self.device.needs_reset()) {
            s |= STATUS_NEEDS_RESET;
        }
        s
    }

    /// The features the driver wrote (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.common.driver_features
    }

    /// `config_generation` as the driver reads it.
    pub fn config_generation(&self) -> u8 {
        self.interrupts.generation()
    }

    /// The interrupt object the device was (or will be) given; a VMM raises
    /// config-change interrupts through it.
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupts.clone()
    }

    /// The eventfd queue `index`'s notifications signal.
    pub fn queue_eventfd(&self, index: u16) -> Option<&EventFd> {
        self.kicks.get(index as usize)
    }

    /// Where each queue is notified, as (guest address, queue index), once the
    /// driver has assigned the BAR: register an ioeventfd for each (4-byte write,
    /// any value) with [`VirtioPciDevice::queue_eventfd`]. Re-register when the
    /// BAR moves.
    pub fn notify_addresses(&self) -> Vec<(u64, u16)> {
        let Some(base) = self.cs.bar_address(VIRTIO_BAR).filter(|&a| a != 0) else {
            return Vec::new();
        };
        (0..self.kicks.len() as u16)
            .map(|q| {
                (
                    base + NOTIFY_CFG_OFFSET + q as u64 * NOTIFY_OFF_MULTIPLIER as u64,
                    q,
                )
            })
            .collect()
    }

    /// What the transport refused or did.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// The config space.
    pub fn config(&self) -> &ConfigSpace {
        &self.cs
    }

    fn view_parts(&self) -> (u64, u8, u8) {
        (
            self.device.features(),
            self.status(),
            self.interrupts.generation(),
        )
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let parts = self.view_parts();
        let irq = self.interrupts.lock();
        self.common.read(offset, data, &view(parts, &irq));
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let parts = self.view_parts();
        let action = {
            let irq = self.interrupts.lock();
            self.common.write(offset, data, &view(parts, &irq))
        };
        match action {
            Write::Done => {}
            Write::Ignored => self.counters.ignored_writes += 1,
            Write::ConfigVector(v) => {
                let mut irq = self.interrupts.lock();
                irq.config_vector = if v < irq.msix.vectors() { v } else { NO_VECTOR };
            }
            Write::QueueVector(q, v) => {
                let mut irq = self.interrupts.lock();
                let v = if v < irq.msix.vectors() { v } else { NO_VECTOR };
                if let Some(slot) = irq.queue_vectors.get_mut(q as usize) {
                    *slot = v;
                }
            }
            Write::Status(s) => self.write_status(s),
        }
    }

    fn reset_device(&mut self) {
        self.reset_state();
        self.counters.resets += 1;
    }

    /// Back to the state of a freshly built function (the driver's reset, and
    /// the start of a restore).
    pub(crate) fn reset_state(&mut self) {
        if self.activated || self.common.status != 0 {
            self.device.reset();
        }
        self.activated = false;
        self.needs_reset = false;
        self.common.reset();
        self.interrupts.reset();
        self.negotiation.reset();
        for k in &self.kicks {
            // Drain stale notifications.
            let _ = k.read();
        }
    }

    /// The end of a restore: the restored negotiation is announced, and a
    /// device the driver had running is activated again from the registers.
    pub(crate) fn finish_restore(&mut self) {
        let status = self.common.status;
        if status & STATUS_FEATURES_OK != 0 {
            self.negotiation.restored(self.common.driver_features);
        }
        if status & STATUS_DRIVER_OK != 0 && !self.needs_reset {
            self.activate();
        }
    }

    fn write_status(&mut self, new: u8) {
        if new == 0 {
            self.reset_device();
            return;
        }
        let old = self.common.status;
        let new = new & !STATUS_NEEDS_RESET;
        if old & !new != 0 {
            // Drivers only set bits; clearing goes through a reset.
            self.counters.ignored_writes += 1;
            return;
        }
        let mut status = new;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            if let Err(e) = self.device.ack_features(self.common.driver_features) {
                log::warn!(
                    "virtio-pci: driver features {:#x} refused: {e}",
                    self.common.driver_features
                );
                self.counters.features_refused += 1;
                status &= !STATUS_FEATURES_OK;
            } else {
                self.negotiation.acked(self.common.driver_features);
            }
        }
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if status & STATUS_FEATURES_OK == 0 {
                self.counters.ignored_writes += 1;
                status &= !STATUS_DRIVER_OK;
            } else {
                self.common.status = status;
                self.activate();
                return;
            }
        }
        self.common.status = status;
    }

    pub(crate) fn activate(&mut self) {
        let event_idx = self.common.driver_features & F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let Ok(mut queue) = Queue::new(q.max) else {
                continue;
            };
            queue.set_size(q.size);
            queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
            queue.set_avail_ring_address(Some(q.driver as u32), Some((q.driver >> 32) as u32));
            queue.set_used_ring_address(Some(q.device as u32), Some((q.device >> 32) as u32));
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            let kick = self.kicks[i].try_clone().ok();
            queues.push(ActivateQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupts.clone();
        match self.device.activate(self.mem.clone(), interrupt, queues) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio-pci: activating the device failed: {e}");
                self.counters.activation_failures += 1;
                self.needs_reset = true;
                let _ = self.interrupts.trigger(VirtioInterruptType::Config);
            }
        }
    }

    fn notify(&mut self, offset: u64) {
        let q = offset / NOTIFY_OFF_MULTIPLIER as u64;
        match self.kicks.get(q as usize) {
            Some(k) => {
                self.counters.notifications += 1;
                if let Err(e) = k.write(1) {
                    log::warn!("virtio-pci: queue {q} notification lost: {e}");
                }
            }
            None => self.counters.ignored_writes += 1,
        }
    }

    fn pci_cfg_target(&self) -> Option<(u8, u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.cs.get_u8(cap + PCI_CFG_BAR);
        let off = self.cs.get_u32(cap + PCI_CFG_OFFSET) as u64;
        let len = self.cs.get_u32(cap + PCI_CFG_LENGTH) as usize;
        (matches!(len, 1 | 2 | 4) && off % len as u64 == 0).then_some((bar, off, len))
    }

    fn touches_pci_cfg_data(&self, offset: u16, len: usize) -> bool {
        let d = (self.pci_cfg_cap + PCI_CFG_DATA) as usize;
        (offset as usize) < d + 4 && d < offset as usize + len
    }
}

impl<M, D> PciFunction for VirtioPciDevice<M, D>
where
    M: GuestMemoryBackend + Send + Sync,
    D: VirtioDevice<M>,
{
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar, off, len)) = self.pci_cfg_target() {
                let mut b = [0u8; 4];
                self.read_bar(bar, off, &mut b[..len]);
                self.cs
                    .set_u32(self.pci_cfg_cap + PCI_CFG_DATA, u32::from_le_bytes(b));
            }
        }
        if offset & !3 == STATUS & !3 {
            let asserted = self.interrupts.intx_asserted();
            let st = self.cs.get_u16(STATUS);
            let st = if asserted {
                st | STATUS_INTERRUPT
            } else {
                st & !STATUS_INTERRUPT
            };
            self.cs.set_u16(STATUS, st);
        }
        self.cs.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        let moved = self.cs.write(offset, data);
        {
            let mut irq = self.interrupts.lock();
            irq.intx_disabled = self.cs.intx_disabled();
            irq.msix
                .config_written(&self.cs, self.interrupts.msi_sink());
            self.interrupts.update_intx(&mut irq);
        }
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar, off, len)) = self.pci_cfg_target() {
                let b = self
                    .cs
                    .get_u32(self.pci_cfg_cap + PCI_CFG_DATA)
                    .to_le_bytes();
                self.write_bar(bar, off, &b[..len]);
            }
        }
        moved
    }

    fn bar_regions(&self) -> BarRegions {
        self.cs.bar_regions()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar {
            MSIX_BAR => {
                let mut irq = self.interrupts.lock();
                if offset < MSIX_PBA_OFFSET as u64 {
                    irq.msix.read_table(offset, data);
                } else {
                    irq.msix.read_pba(offset - MSIX_PBA_OFFSET as u64, data);
                }
            }
            VIRTIO_BAR => {
                if offset < COMMON_CFG_OFFSET + COMMON_CFG_LEN {
                    self.common_read(offset - COMMON_CFG_OFFSET, data);
                } else if offset == ISR_CFG_OFFSET {
                    let isr = self.interrupts.take_isr();
                    if let Some(b) = data.first_mut() {
                        *b = isr;
                    }
                } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset)
                {
                    self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            MSIX_BAR => {
                let mut irq = self.interrupts.lock();
                if offset < MSIX_PBA_OFFSET as u64 {
                    irq.msix
                        .write_table(offset, data, self.interrupts.msi_sink());
                } else {
                    irq.msix.write_pba(offset - MSIX_PBA_OFFSET as u64, data);
                }
            }
            VIRTIO_BAR => {
                if offset < COMMON_CFG_OFFSET + COMMON_CFG_LEN {
                    self.common_write(offset - COMMON_CFG_OFFSET, data);
                } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset)
                {
                    self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
                } else if (NOTIFY_CFG_OFFSET..NOTIFY_CFG_OFFSET + NOTIFY_CFG_LEN).contains(&offset)
                {
                    self.notify(offset - NOTIFY_CFG_OFFSET);
                } else {
                    self.counters.ignored_writes += 1;
                }
            }
            _ => self.counters.ignored_writes += 1,
        }
    }
}

#[cfg(test)]
mod tests;
