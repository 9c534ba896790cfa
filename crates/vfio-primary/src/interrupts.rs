//! Interrupts: the guest programs emulated MSI and MSI-X capabilities (and the
//! emulated MSI-X table); the device signals one eventfd per vector, routed to it
//! through [`VfioDeviceOps::enable_irq`]; the VMM turns each eventfd into an
//! irqfd.
//!
//! The eventfds are created once, when the primary is built, and live as long
//! as it does, so a VMM registers each as an irqfd once and only reprograms its
//! GSI route when [`MsiSink::update_route`] says the vector's message changed
//! (`None`: it cannot fire now; unregister or disable the irqfd then).
//!
//! Masking is emulated, never programmed into the device: a vector that fires
//! while masked (by its entry, by the function mask, or MSI's mask bits) sets its
//! pending bit when the primary sees the eventfd
//! ([`VfioPrimary::service_interrupts`](crate::VfioPrimary::service_interrupts),
//! and before every PBA read and unmask, so the PBA is current); unmasking it
//! sends the message through [`MsiSink::deliver`].
//!
//! Only one index is routed at a time, as VFIO allows: MSI-X when the guest
//! enabled it, else MSI, else INTx when the device has it; nothing while the
//! primary is detached. INTx comes with a resample eventfd (KVM's irqfd
//! resamplefd): the device's line is unmasked when it is signalled, or on
//! [`VfioPrimary::intx_eoi`](crate::VfioPrimary::intx_eoi).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_pci::config::{COMMAND, ClassCode, HeaderType, PciIds};
use vmm_pci::msi::{MSI_MASK, MSI_PENDING};
use vmm_pci::{ConfigSpace, Delivery, IntxSink, Msi, MsiSink, Msix};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bars::MsixPlacement;
use crate::config::{u16_at, u32_at};
use crate::ops::{VfioDeviceOps, irq};

/// Where the emulated capabilities sit in their private config spaces.
const BASE: u16 = 0x40;

/// Errors setting up interrupt emulation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for interrupt vectors (out of file descriptors?)")]
    EventFd(#[source] io::Error),
    /// The MSI-X capability cannot be emulated.
    #[error("the device's MSI-X capability cannot be emulated")]
    Msix(#[source] vmm_pci::msix::Error),
    /// The MSI capability cannot be emulated.
    #[error("the device's MSI capability cannot be emulated")]
    Msi(#[source] vmm_pci::msi::Error),
}

/// An eventfd counted while it lives, so leak tests can assert on the count.
#[derive(Debug)]
pub(crate) struct CountedFd {
    fd: EventFd,
    live: Arc<AtomicU64>,
}

impl CountedFd {
    fn new(live: &Arc<AtomicU64>) -> Result<Self, Error> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        live.fetch_add(1, Ordering::Relaxed);
        Ok(CountedFd {
            fd,
            live: live.clone(),
        })
    }

    /// Reads and clears the counter; 0 when it was not signalled.
    fn take(&self) -> u64 {
        self.fd.read().unwrap_or(0)
    }
}

impl Drop for CountedFd {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

fn private_space() -> ConfigSpace {
    let ids = PciIds {
        vendor_id: 0,
        device_id: 0,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        revision: 0,
        class: ClassCode::ETHERNET,
    };
    ConfigSpace::new(HeaderType::Endpoint, &ids, false)
}

#[derive(Debug)]
struct MsixPart {
    cs: ConfigSpace,
    msix: Msix,
    fds: Vec<CountedFd>,
}

impl MsixPart {
    /// Whether `v` would be held back (masked) rather than sent or dropped.
    fn blocked(&self, v: u16) -> bool {
        self.msix.enabled()
            && (self.msix.function_masked() || self.msix.entry(v).is_some_and(|e| e.masked()))
    }
}

#[derive(Debug)]
struct MsiPart {
    cs: ConfigSpace,
    msi: Msi,
    fds: Vec<CountedFd>,
}

#[derive(Debug)]
struct IntxPart {
    trigger: CountedFd,
    resample: CountedFd,
    asserted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Intx,
    Msi(u8),
    Msix,
}

/// Interrupt statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqCounters {
    /// Eventfd signals seen (a signal may count several device interrupts).
    pub fired: u64,
    /// Messages sent through the sink (directly or on unmask).
    pub delivered: u64,
    /// Signals that set a pending bit.
    pub pending: u64,
    /// Signals dropped (MSI/MSI-X disabled, or bus mastering off).
    pub dropped: u64,
    /// Failed routing calls (enable, disable, unmask): logged, and the index
    /// left off.
    pub routing_errors: u64,
}

/// The interrupt emulation. See the module documentation.
pub(crate) struct Interrupts {
    dev: Arc<dyn VfioDeviceOps>,
    sink: Arc<dyn MsiSink>,
    intx_sink: Option<Arc<dyn IntxSink>>,
    msix: Option<MsixPart>,
    msi: Option<MsiPart>,
    intx: Option<IntxPart>,
    mode: Mode,
    active: bool,
    counters: IrqCounters,
    command: u16,
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("mode", &self.mode)
            .field("active", &self.active)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The MSI-X capability of `host` at `cap`: vectors and placement.
pub(crate) fn msix_placement(host: &[u8], cap: u16) -> (u16, MsixPlacement) {
    let vectors = (u16_at(host, cap + 2) & 0x7ff) + 1;
    let table = u32_at(host, cap + 4);
    let pba = u32_at(host, cap + 8);
    let placement = MsixPlacement {
        table: (
            (table & 7) as u8,
            (table & !7) as u64,
            vectors as u64 * vmm_pci::msix::MSIX_ENTRY_SIZE,
        ),
        pba: (
            (pba & 7) as u8,
            (pba & !7) as u64,
            (vectors as u64).div_ceil(64) * 8,
        ),
    };
    (vectors, placement)
}

/// The MSI capability at `cap` when this crate can emulate it (64-bit
/// addressing and per-vector masking), with its vector count.
pub(crate) fn msi_vectors(host: &[u8], cap: u16) -> Option<u8> {
    let ctrl = u16_at(host, cap + 2);
    let (is64, pvm) = (ctrl & 1 << 7 != 0, ctrl & 1 << 8 != 0);
    (is64 && pvm && cap + crate::config::MSI_CAP_LEN <= 0x100)
        .then(|| 1u8 << ((ctrl >> 1) & 7).min(5))
}

impl Interrupts {
    /// The emulation of `host`'s MSI-X (at `msix`) and MSI (at `msi`)
    /// capabilities, and of INTx when the device has a pin and VFIO an INTx
    /// index. Eventfds are counted in `live`.
    pub fn new(
        dev: Arc<dyn VfioDeviceOps>,
        sink: Arc<dyn MsiSink>,
        intx_sink: Option<Arc<dyn IntxSink>>,
        host: &[u8],
        (msix, msi): (Option<u16>, Option<u16>),
        live: &Arc<AtomicU64>,
    ) -> Result<Interrupts, Error> {
        let msix = match msix {
            Some(cap) => {
                let (vectors, p) = msix_placement(host, cap);
                let mut cs = private_space();
                let m = Msix::add(
                    &mut cs,
                    vectors,
                    p.table.0,
                    p.table.1 as u32,
                    p.pba.0,
                    p.pba.1 as u32,
                )
                .map_err(Error::Msix)?;
                let fds = (0..vectors)
                    .map(|_| CountedFd::new(live))
                    .collect::<Result<_, _>>()?;
                Some(MsixPart { cs, msix: m, fds })
            }
            None => None,
        };
        let msi = match msi.and_then(|cap| msi_vectors(host, cap)) {
            Some(vectors) => {
                let mut cs = private_space();
                let m = Msi::add(&mut cs, vectors).map_err(Error::Msi)?;
                let fds = (0..vectors)
                    .map(|_| CountedFd::new(live))
                    .collect::<Result<_, _>>()?;
                Some(MsiPart { cs, msi: m, fds })
            }
            None => None,
        };
        let has_intx = host.get(0x3d).is_some_and(|&p| p != 0)
            && dev.irq_info(irq::INTX).is_some_and(|i| i.count > 0);
        let intx = if has_intx {
            Some(IntxPart {
                trigger: CountedFd::new(live)?,
                resample: CountedFd::new(live)?,
                asserted: false,
            })
        } else {
            None
        };
        Ok(Interrupts {
            dev,
            sink,
            intx_sink,
            msix,
            msi,
            intx,
            mode: Mode::Off,
            active: false,
            counters: IrqCounters::default(),
            command: 0,
        })
    }

    pub fn counters(&self) -> IrqCounters {
        self.counters
    }

    // ---- capabilities ----------------------------------------------------------

    /// Byte `rel` of the MSI-X capability (2..12).
    pub fn msix_cap_byte(&self, rel: u16) -> u8 {
        if rel >= vmm_pci::msix::MSIX_CAP_LEN {
            return 0;
        }
        self.msix.as_ref().map_or(0, |m| m.cs.get_u8(BASE + rel))
    }

    /// A guest write to the MSI-X capability at `rel` (a 1, 2 or 4-byte piece).
    pub fn write_msix_cap(&mut self, rel: u16, data: &[u8]) {
        if rel as usize + data.len() > vmm_pci::msix::MSIX_CAP_LEN as usize {
            return;
        }
        self.poll_blocked_msix(None);
        let before = self.pending();
        let Some(m) = self.msix.as_mut() else { return };
        m.cs.write(BASE + rel, data);
        m.msix.config_written(&m.cs, &*self.sink);
        self.count_released(before);
        self.update_mode();
    }

    /// Vectors pending now, MSI-X and MSI together.
    fn pending(&self) -> u32 {
        let msix = self.msix.as_ref().map_or(0, |m| {
            (0..m.msix.vectors())
                .filter(|&v| m.msix.is_pending(v))
                .count() as u32
        });
        let msi = self.msi.as_ref().map_or(0, |m| {
            m.cs.get_u32(m.msi.offset() + MSI_PENDING).count_ones()
        });
        msix + msi
    }

    /// Counts the pending vectors an unmask just sent.
    fn count_released(&mut self, before: u32) {
        self.counters.delivered += before.saturating_sub(self.pending()) as u64;
    }

    /// Byte `rel` of the MSI capability (2..0x18).
    pub fn msi_cap_byte(&self, rel: u16) -> u8 {
        if rel >= crate::config::MSI_CAP_LEN {
            return 0;
        }
        self.msi.as_ref().map_or(0, |m| m.cs.get_u8(BASE + rel))
    }

    /// A guest write to the MSI capability at `rel` (a 1, 2 or 4-byte piece).
    pub fn write_msi_cap(&mut self, rel: u16, data: &[u8]) {
        if rel as usize + data.len() > crate::config::MSI_CAP_LEN as usize {
            return;
        }
        self.poll_blocked_msi();
        let before = self.pending();
        let Some(m) = self.msi.as_mut() else { return };
        m.cs.write(BASE + rel, data);
        m.msi
            .config_written(&mut m.cs, BASE + rel, data.len(), &*self.sink);
        self.count_released(before);
        self.update_mode();
    }

    /// The guest wrote the command register: Bus Master gates MSI and MSI-X.
    pub fn command_written(&mut self, command: u16) {
        if command == self.command {
            return;
        }
        self.command = command;
        self.poll_blocked_msix(None);
        self.poll_blocked_msi();
        let before = self.pending();
        if let Some(m) = self.msix.as_mut() {
            m.cs.set_u16(COMMAND, command);
            m.msix.config_written(&m.cs, &*self.sink);
        }
        if let Some(m) = self.msi.as_mut() {
            m.cs.set_u16(COMMAND, command);
            // A write of the control register's own value: re-evaluates what the
            // new bus-master state releases.
            let ctrl = m.cs.get_u16(m.msi.offset() + 2);
            m.cs.write(m.msi.offset() + 2, &ctrl.to_le_bytes());
            m.msi
                .config_written(&mut m.cs, m.msi.offset() + 2, 2, &*self.sink);
        }
        self.count_released(before);
    }

    // ---- MSI-X table and PBA ------------------------------------------------------

    /// A guest read of the MSI-X table.
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        match self.msix.as_mut() {
            Some(m) => m.msix.read_table(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the MSI-X table. The vector's eventfd is polled first,
    /// so an unmask releases what fired while it was masked.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let vector = (offset / vmm_pci::msix::MSIX_ENTRY_SIZE) as u16;
        self.poll_blocked_msix(Some(vector));
        if let Some(m) = self.msix.as_mut() {
            let before = m.msix.is_pending(vector);
            m.msix.write_table(offset, data, &*self.sink);
            if before && !m.msix.is_pending(vector) {
                self.counters.delivered += 1;
            }
        }
    }

    /// A guest read of the PBA: masked vectors' eventfds are polled first.
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        self.poll_blocked_msix(None);
        match self.msix.as_mut() {
            Some(m) => m.msix.read_pba(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the PBA (read-only: ignored and counted by MSI-X).
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix.as_mut() {
            m.msix.write_pba(offset, data);
        }
    }

    /// Malformed table and PBA accesses.
    pub fn msix_ignored(&self) -> u64 {
        self.msix.as_ref().map_or(0, |m| m.msix.ignored_accesses())
    }

    // ---- eventfds -----------------------------------------------------------------

    pub fn msix_eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.msix.as_ref()?.fds.get(vector as usize).map(|f| &f.fd)
    }

    pub fn msi_eventfd(&self, vector: u8) -> Option<&EventFd> {
        self.msi.as_ref()?.fds.get(vector as usize).map(|f| &f.fd)
    }

    pub fn intx_eventfds(&self) -> Option<(&EventFd, &EventFd)> {
        self.intx.as_ref().map(|i| (&i.trigger.fd, &i.resample.fd))
    }

    fn record(&mut self, d: Delivery) {
        match d {
            Delivery::Sent => self.counters.delivered += 1,
            Delivery::Pending => self.counters.pending += 1,
            Delivery::Dropped => self.counters.dropped += 1,
        }
    }

    fn poll_blocked_msix(&mut self, only: Option<u16>) {
        let Some(m) = self.msix.as_mut() else { return };
        let mut results = Vec::new();
        for v in 0..m.msix.vectors() {
            if only.is_some_and(|o| o != v) || !m.blocked(v) {
                continue;
            }
            if m.fds[v as usize].take() > 0 {
                results.push(m.msix.trigger(v, &*self.sink));
            }
        }
        for d in results {
            self.counters.fired += 1;
            self.record(d);
        }
    }

    fn poll_blocked_msi(&mut self) {
        let Some(m) = self.msi.as_mut() else { return };
        let mask = m.cs.get_u32(m.msi.offset() + MSI_MASK);
        let mut results = Vec::new();
        for v in 0..m.fds.len() as u8 {
            if mask & 1 << v != 0 && m.fds[v as usize].take() > 0 {
                results.push(m.msi.trigger(&mut m.cs, v, &*self.sink));
            }
        }
        for d in results {
            self.counters.fired += 1;
            self.record(d);
        }
    }

    /// Reads every eventfd of the routed index and delivers what fired: sent
    /// through the sink, or held pending while masked; INTx asserts the line.
    /// Returns the signals seen.
    ///
    /// A VMM with irqfds registered for live vectors calls this for the
    /// eventfds it is not consuming (masked vectors, INTx without KVM); one
    /// without irqfds calls it when any eventfd is readable.
    pub fn service(&mut self) -> u64 {
        let before = self.counters.fired;
        match self.mode {
            Mode::Msix => {
                let Some(m) = self.msix.as_mut() else {
                    return 0;
                };
                let mut results = Vec::new();
                for v in 0..m.msix.vectors() {
                    if m.fds[v as usize].take() > 0 {
                        results.push(m.msix.trigger(v, &*self.sink));
                    }
                }
                for d in results {
                    self.counters.fired += 1;
                    self.record(d);
                }
            }
            Mode::Msi(n) => {
                let Some(m) = self.msi.as_mut() else { return 0 };
                let mut results = Vec::new();
                for v in 0..n.min(m.fds.len() as u8) {
                    if m.fds[v as usize].take() > 0 {
                        results.push(m.msi.trigger(&mut m.cs, v, &*self.sink));
                    }
                }
                for d in results {
                    self.counters.fired += 1;
                    self.record(d);
                }
            }
            Mode::Intx => {
                let Some(i) = self.intx.as_mut() else {
                    return 0;
                };
                if i.trigger.take() > 0 {
                    self.counters.fired += 1;
                    i.asserted = true;
                    if let Some(s) = &self.intx_sink {
                        s.set_level(true);
                        self.counters.delivered += 1;
                    } else {
                        self.counters.dropped += 1;
                    }
                }
            }
            Mode::Off => {}
        }
        self.counters.fired - before
    }

    /// The guest finished handling INTx (its EOI, without KVM's resampler):
    /// deasserts the line and lets the device raise it again.
    pub fn intx_eoi(&mut self) {
        let Some(i) = self.intx.as_mut() else { return };
        if !std::mem::take(&mut i.asserted) {
            return;
        }
        if let Some(s) = &self.intx_sink {
            s.set_level(false);
        }
        if self.mode == Mode::Intx && self.dev.unmask_irq(irq::INTX).is_err() {
            self.counters.routing_errors += 1;
        }
    }

    // ---- routing ------------------------------------------------------------------

    /// Routes interrupts (`true`, when attached) or tears every route down.
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
        self.update_mode();
    }

    fn wanted(&self) -> Mode {
        if !self.active {
            return Mode::Off;
        }
        if self.msix.as_ref().is_some_and(|m| m.msix.enabled()) {
            return Mode::Msix;
        }
        if let Some(m) = self.msi.as_ref().filter(|m| m.msi.enabled(&m.cs)) {
            return Mode::Msi(m.msi.allocated(&m.cs));
        }
        if self.intx.is_some() {
            return Mode::Intx;
        }
        Mode::Off
    }

    fn update_mode(&mut self) {
        let want = self.wanted();
        if want == self.mode {
            return;
        }
        let index = |m: Mode| match m {
            Mode::Intx => Some(irq::INTX),
            Mode::Msi(_) => Some(irq::MSI),
            Mode::Msix => Some(irq::MSIX),
            Mode::Off => None,
        };
        if let Some(old) = index(self.mode) {
            if let Err(e) = self.dev.disable_irq(old) {
                log::warn!("vfio-primary: disabling interrupt index {old}: {e}");
                self.counters.routing_errors += 1;
            }
        }
        self.drain();
        self.mode = Mode::Off;
        let result = match want {
            Mode::Off => Ok(()),
            Mode::Msix => {
                let fds: Vec<&EventFd> = self
                    .msix
                    .iter()
                    .flat_map(|m| m.fds.iter().map(|f| &f.fd))
                    .collect();
                self.dev.enable_irq(irq::MSIX, &fds)
            }
            Mode::Msi(n) => {
                let fds: Vec<&EventFd> = self
                    .msi
                    .iter()
                    .flat_map(|m| m.fds.iter().take(n as usize).map(|f| &f.fd))
                    .collect();
                self.dev.enable_irq(irq::MSI, &fds)
            }
            Mode::Intx => match &self.intx {
                Some(i) => self
                    .dev
                    .enable_irq(irq::INTX, &[&i.trigger.fd])
                    .and_then(|()| self.dev.set_irq_resample(irq::INTX, &i.resample.fd)),
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => self.mode = want,
            Err(e) => {
                log::warn!("vfio-primary: routing interrupts ({want:?}): {e}");
                self.counters.routing_errors += 1;
                if let Some(i) = index(want) {
                    let _ = self.dev.disable_irq(i);
                }
            }
        }
    }

    /// Clears every eventfd, so nothing stale fires after a re-route.
    fn drain(&mut self) {
        let msix = self.msix.iter().flat_map(|m| m.fds.iter());
        for f in msix.chain(self.msi.iter().flat_map(|m| m.fds.iter())) {
            f.take();
        }
        if let Some(i) = &mut self.intx {
            i.trigger.take();
            i.resample.take();
            if std::mem::take(&mut i.asserted) {
                if let Some(s) = &self.intx_sink {
                    s.set_level(false);
                }
            }
        }
    }

    /// Back to the power-on state the guest sees (MSI and MSI-X disabled, every
    /// MSI-X vector masked, nothing pending), routes torn down.
    pub fn reset(&mut self) {
        self.active = false;
        self.update_mode();
        self.drain();
        self.command = 0;
        if let Some(m) = self.msix.as_mut() {
            m.cs.set_u16(COMMAND, 0);
            m.msix.reset(&mut m.cs);
            m.msix.config_written(&m.cs, &*self.sink);
        }
        if let Some(m) = self.msi.as_mut() {
            m.cs.set_u16(COMMAND, 0);
            m.msi.reset(&mut m.cs);
            m.msi.sync_routes(&m.cs, &*self.sink);
        }
    }

    /// The MSI pending bits (for tests).
    #[cfg(test)]
    pub fn msi_pending(&self) -> u32 {
        self.msi
            .as_ref()
            .map_or(0, |m| m.cs.get_u32(m.msi.offset() + MSI_PENDING))
    }
}
