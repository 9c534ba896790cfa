//! The root port: a type 1 bridge with a PCI Express capability and one hot-plug
//! slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_pci::config::{COMMAND, ConfigSpace, HeaderType};
use vmm_pci::pcie::{
    self, LNKSTA, LNKSTA_DLLLA, PcieCapConfig, PortType, SLTCAP, SLTCAP_ABP, SLTCAP_AIP,
    SLTCAP_EIP, SLTCAP_HPC, SLTCAP_HPS, SLTCAP_PCP, SLTCAP_PIP, SLTCAP_PSN_SHIFT, SLTCTL,
    SLTCTL_ABPE, SLTCTL_AIC_OFF, SLTCTL_CCIE, SLTCTL_DLLSCE, SLTCTL_EIC, SLTCTL_HPIE,
    SLTCTL_MRLSCE, SLTCTL_PCC, SLTCTL_PDCE, SLTCTL_PFDE, SLTCTL_PIC, SLTCTL_PIC_BLINK,
    SLTCTL_PIC_OFF, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP, SLTSTA_CC, SLTSTA_DLLSC, SLTSTA_EIS,
    SLTSTA_MRLSC, SLTSTA_PDC, SLTSTA_PDS, SLTSTA_PFD,
};
use vmm_pci::{
    BarMove, BarRegions, BusRange, ClassCode, Delivery, IntxSink, MAX_BARS, Msi, MsiSink,
    PciFunction, PciHandle, PciIds,
};

use crate::completion::{Completion, HotplugOutcome};
use crate::slot::{Error, HotplugSlot, Operation, Result, SlotState};

mod state;

pub use state::RootPortState;

/// The IDs QEMU's generic `pcie-root-port` reports (Red Hat, 0x000c), which
/// guests bind to their generic port driver by class.
pub const DEFAULT_IDS: PciIds = PciIds {
    vendor_id: 0x1b36,
    device_id: 0x000c,
    subsystem_vendor_id: 0,
    subsystem_id: 0,
    revision: 0,
    class: ClassCode::PCI_BRIDGE,
};

/// Counters of what the port did, for VMM statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Guest writes to Slot Control (each is one command, answered with Command
    /// Completed).
    pub slot_control_writes: u64,
    /// Hot-plug interrupts sent as MSI.
    pub msi_sent: u64,
    /// Hot-plug interrupts held pending because the MSI vector was masked.
    pub msi_masked: u64,
    /// Hot-plug interrupts with nowhere to go (MSI enabled but bus mastering off).
    pub interrupts_dropped: u64,
    /// INTx assertions.
    pub intx_assertions: u64,
    /// Attention button presses.
    pub button_presses: u64,
    /// Plugs held until the guest had turned the power indicator off after a
    /// power off (see [`RootPort`]).
    pub plugs_held: u64,
    /// Times the guest powered off a slot holding a device with no unplug
    /// pending (a removal the VMM did not ask for, such as sysfs `power`, or a
    /// power off after a cancel already reported `Cancelled`). Each also runs
    /// the [`RootPort::on_guest_removal`] callback.
    pub guest_removals: u64,
}

/// What the port reads the time from: a monotonic time since any fixed origin.
///
/// The port never waits on it. It compares two readings to know whether a
/// cancel can still land inside Linux's 5-second attention-button window (see
/// [`HotplugSlot::cancel_unplug`]) and when a late-answered cancel resolves
/// (see [`HotplugSlot::next_deadline`]).
///
/// **A VMM must give the VM's run-time clock**: time that stops while the
/// vCPUs are paused (stopped VM, migration downtime, snapshot). The guest's
/// timers (its 5 s button window, its 1 s waits) run on that time; on the host
/// clock a pause inside the window makes the port misjudge whether a cancel
/// can still land, and resolve a late-answered cancel as kept while the guest
/// has not run. The default, the host's monotonic clock, is only right for
/// tests and for VMMs that never pause a running guest. A guest on a virtual
/// clock (the scripted guest) gives the port that clock.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// Linux's attention-button delay: `schedule_delayed_work(&ctrl->button_work,
/// 5 * HZ)` in `pciehp_ctrl.c: pciehp_handle_button_press`.
pub const LINUX_BUTTON_DELAY: Duration = Duration::from_secs(5);

/// The earliest Linux's button work can run after the guest opened its window:
/// one jiffy short of [`LINUX_BUTTON_DELAY`] at HZ=100, the coarsest tick
/// (timers never fire early by more than the partial first jiffy).
const BUTTON_WORK_EARLIEST: Duration = Duration::from_millis(4990);

/// A cancel is pressed only while the guest has at least this long left in its
/// window to take the press (its interrupt handler and thread); later, it is
/// not pressed and the unplug goes on (see [`HotplugSlot::cancel_unplug`]).
pub const CANCEL_MARGIN: Duration = Duration::from_millis(500);

/// When the guest restores the power indicator so late in its window that its
/// button work may already have queued the power off (`DISABLE_SLOT`), the
/// port waits for the power off. Linux reads Slot Control at once when it
/// starts one (`pciehp_ctrl.c: __pciehp_disable_slot`); without that read for
/// this long, the guest kept the device. A Slot Control read (which may be
/// another reader's, such as `lspci`) not followed by the power off within
/// this long from the read also means kept.
const RESTORED_QUIET: Duration = Duration::from_secs(1);

/// Builds a [`RootPort`].
#[derive(Clone)]
pub struct RootPortBuilder {
    name: String,
    slot_number: u16,
    port_number: u8,
    hotplug: bool,
    surprise: bool,
    ids: PciIds,
    intx: Option<Arc<dyn IntxSink>>,
    clock: Clock,
}

impl std::fmt::Debug for RootPortBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPortBuilder")
            .field("name", &self.name)
            .field("slot_number", &self.slot_number)
            .field("hotplug", &self.hotplug)
            .field("surprise", &self.surprise)
            .finish_non_exhaustive()
    }
}

impl RootPortBuilder {
    /// A hot-plug capable port called `name` (used in error messages) whose slot
    /// has physical slot number `slot_number` (13 bits). Hot-plug surprise is off.
    pub fn new(name: impl Into<String>, slot_number: u16) -> Self {
        RootPortBuilder {
            name: name.into(),
            slot_number: slot_number & 0x1fff,
            port_number: 0,
            hotplug: true,
            surprise: false,
            ids: DEFAULT_IDS,
            intx: None,
            clock: host_clock(),
        }
    }

    /// Link Capabilities port number.
    pub fn port_number(mut self, n: u8) -> Self {
        self.port_number = n;
        self
    }

    /// Whether the slot is Hot-Plug Capable (default on). Without it, only cold
    /// plug works and hot-plug requests are refused.
    pub fn hotplug(mut self, on: bool) -> Self {
        self.hotplug = on;
        self
    }

    /// Whether the slot reports Hot-Plug Surprise (default off), which allows
    /// [`HotplugSlot::surprise_remove`].
    pub fn surprise(mut self, on: bool) -> Self {
        self.surprise = on;
        self
    }

    /// Vendor, device and revision IDs (class stays PCI-to-PCI bridge).
    pub fn ids(mut self, ids: PciIds) -> Self {
        self.ids = PciIds {
            class: ClassCode::PCI_BRIDGE,
            ..ids
        };
        self
    }

    /// The INTx line the port asserts when the guest has not enabled MSI.
    pub fn intx(mut self, sink: Arc<dyn IntxSink>) -> Self {
        self.intx = Some(sink);
        self
    }

    /// The clock the port compares guest register writes on (default: the
    /// host's monotonic clock).
    ///
    /// **A VMM must pass the VM's run-time clock**: time that stops while the
    /// vCPUs are paused, since the guest's 5 s button window and 1 s waits run
    /// on it. With the default host clock, a VM pause during the window makes
    /// the port misjudge cancels (see [`Clock`]). The default is meant for
    /// tests and for VMMs that never pause a running guest. Give a guest on a
    /// virtual clock that clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the port; its hot-plug MSI goes to `msi` (vector 0).
    pub fn build(self, msi: Arc<dyn MsiSink>) -> RootPort {
        let mut port = RootPort {
            cs: ConfigSpace::new(HeaderType::Bridge, &self.ids, true),
            cap: 0,
            msi: None,
            msi_sink: msi,
            device: None,
            pending: None,
            irq_asserted: false,
            intx_level: false,
            guest_powering_off: false,
            counters: PortCounters::default(),
            on_guest_removal: None,
            cfg: self,
        };
        port.init_config();
        port
    }
}

fn host_clock() -> Clock {
    let origin = Instant::now();
    Arc::new(move || origin.elapsed())
}

/// Where a VMM's cancel of an unplug stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    /// Not asked.
    None,
    /// Asked after the guest took the first press and before it opened its
    /// window: a press now would merge with the first, so it is pressed when
    /// the guest starts blinking.
    Held,
    /// The second press was sent inside the window.
    Pressed,
    /// Asked with less than [`CANCEL_MARGIN`] left in the guest's window: not
    /// pressed (it could land with the power off in one `pciehp_ist` batch, or
    /// after it, where Linux takes it for a power-on request on the emptied
    /// slot). The unplug goes on.
    TooLate,
}

/// The guest put the power indicator back on (BLINK -> ON) so late in its
/// window that its button work may have queued the power off already.
#[derive(Debug, Clone, Copy)]
struct Restored {
    at: Duration,
    /// When the guest last read Slot Control since: a power off may be under
    /// way (or it was another reader).
    read_at: Option<Duration>,
}

impl Restored {
    /// When the guest has kept quiet long enough to have kept the device.
    fn deadline(&self) -> Duration {
        self.read_at
            .unwrap_or(self.at)
            .saturating_add(RESTORED_QUIET)
    }
}

/// Runs when the guest removes a device nobody asked it to remove: see
/// [`RootPort::on_guest_removal`].
pub type GuestRemovalCallback = Arc<dyn Fn(PciHandle) + Send + Sync>;

struct Pending {
    op: Operation,
    completion: Completion,
    /// Unplug: when the guest started blinking the power indicator (its 5 s
    /// window).
    window_opened: Option<Duration>,
    /// Unplug: the guest read Slot Status with the press set, so the press may
    /// be in its hands (its interrupt handler reads, then writes back).
    press_seen: bool,
    /// Unplug: the VMM's cancel.
    cancel: Cancel,
    /// Unplug: see [`Restored`].
    restored: Option<Restored>,
    /// Plug: the device, held until the guest turns the power indicator off
    /// after its power off.
    held: Option<PciHandle>,
}

impl Pending {
    fn new(op: Operation, completion: Completion) -> Pending {
        Pending {
            op,
            completion,
            window_opened: None,
            press_seen: false,
            cancel: Cancel::None,
            restored: None,
            held: None,
        }
    }
}

/// A PCI Express root port with one hot-plug slot. See the crate documentation.
///
/// # The replug window
///
/// After Linux powers a slot off (`pciehp_ctrl.c: remove_board`) it sleeps 1 s,
/// discards the Presence Detect Changed and Data Link Layer State Changed
/// events that arrived meanwhile, then turns the power indicator off. An unplug
/// completes at the power off, so a VMM can plug again at once; the events of
/// such a plug would be discarded, and Linux would see only its attention
/// button: a 5 s blink before it powers the slot on. So a plug requested after
/// the guest powered the slot off (or after a surprise removal of a powered
/// slot) and before it turned the power indicator off is held, and delivered
/// (presence and link, without the button) by the write that turns the
/// indicator off. Linux then enables the slot at once: 0.12 s later with the
/// scripted Linux 6.1 guest.
///
/// Put it on the bus as a [`PciHandle`] (an `Arc<Mutex<RootPort>>` coerces to
/// one) and keep a typed clone for the [`HotplugSlot`] calls.
///
/// It implements [`device_state::Persist`] with [`RootPortState`]; the device
/// in the slot is saved separately (see there).
///
/// # Time
///
/// The port has no timer. A pending decision that can resolve by time alone
/// (a cancel the guest answered at the very end of its window, see
/// [`HotplugSlot::next_deadline`]) resolves on the next guest config access,
/// VMM request, [`HotplugSlot::slot_state`], `save`, or
/// [`HotplugSlot::poll`]; a VMM with a timer arms it for `next_deadline` and
/// calls `poll`. The clock must be the VM's run-time clock (see
/// [`RootPortBuilder::clock`]).
///
/// # Guest removals
///
/// When the guest powers the slot off with no unplug pending (sysfs `power`,
/// or a power off after a cancel already reported `Cancelled`), the device
/// leaves and the [`RootPort::on_guest_removal`] callback runs with it.
pub struct RootPort {
    cfg: RootPortBuilder,
    cs: ConfigSpace,
    cap: u16,
    msi: Option<Msi>,
    msi_sink: Arc<dyn MsiSink>,
    device: Option<PciHandle>,
    pending: Option<Pending>,
    irq_asserted: bool,
    intx_level: bool,
    /// The guest powered the slot off (or the device was removed by surprise
    /// from a powered slot) and has not turned the power indicator off yet: a
    /// plug is held. See "The replug window".
    guest_powering_off: bool,
    counters: PortCounters,
    on_guest_removal: Option<GuestRemovalCallback>,
}

impl std::fmt::Debug for RootPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPort")
            .field("name", &self.cfg.name)
            .field("state", &self.slot_state())
            .finish_non_exhaustive()
    }
}

fn overlaps(offset: u16, len: usize, reg: u16, reg_len: u16) -> bool {
    let (a, b) = (offset as u32, offset as u32 + len as u32);
    let (c, d) = (reg as u32, reg as u32 + reg_len as u32);
    a < d && c < b
}

/// The Slot Status events whose own enable is set in `ctl`.
fn enabled_events(ctl: u16) -> u16 {
    let mut m = 0;
    for (enable, event) in [
        (SLTCTL_ABPE, SLTSTA_ABP),
        (SLTCTL_PFDE, SLTSTA_PFD),
        (SLTCTL_MRLSCE, SLTSTA_MRLSC),
        (SLTCTL_PDCE, SLTSTA_PDC),
        (SLTCTL_CCIE, SLTSTA_CC),
        (SLTCTL_DLLSCE, SLTSTA_DLLSC),
    ] {
        if ctl & enable != 0 {
            m |= event;
        }
    }
    m
}

impl RootPort {
    fn sltcap_bits(&self) -> u32 {
        let mut cap = SLTCAP_ABP
            | SLTCAP_PCP
            | SLTCAP_AIP
            | SLTCAP_PIP
            | SLTCAP_EIP
            | (self.cfg.slot_number as u32) << SLTCAP_PSN_SHIFT;
        if self.cfg.hotplug {
            cap |= SLTCAP_HPC;
            if self.cfg.surprise {
                cap |= SLTCAP_HPS;
            }
        }
        cap
    }

    fn init_config(&mut self) {
        let mut cs = ConfigSpace::new(HeaderType::Bridge, &self.cfg.ids, true);
        cs.set_interrupt_pin(1);
        let pcie_cfg = PcieCapConfig {
            port_type: PortType::RootPort,
            port_number: self.cfg.port_number,
            slot: Some(self.sltcap_bits()),
            dll_link_active_reporting: true,
        };
        // A fresh 256-byte header always has room for these two capabilities.
        let cap = pcie::add_pcie_capability(&mut cs, &pcie_cfg).unwrap_or(0x40);
        self.msi = Msi::add(&mut cs, 1).ok();
        self.cs = cs;
        self.cap = cap;
        self.irq_asserted = false;
        self.set_intx(false);
        // Slot reset values: indicators per population, power on iff populated.
        let populated = self.device.is_some();
        let mut ctl = SLTCTL_AIC_OFF;
        if populated {
            ctl |= SLTCTL_PIC_ON;
        } else {
            ctl |= SLTCTL_PIC_OFF | SLTCTL_PCC;
        }
        self.cs.set_u16(self.cap + SLTCTL, ctl);
        let mut sta = 0;
        if populated {
            sta |= SLTSTA_PDS;
            self.cs.set_bits_u16(self.cap + LNKSTA, LNKSTA_DLLLA);
        }
        self.cs.set_u16(self.cap + SLTSTA, sta);
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The PCI Express capability's offset.
    pub fn pcie_cap_offset(&self) -> u16 {
        self.cap
    }

    /// What the port has done so far.
    pub fn counters(&self) -> PortCounters {
        self.counters
    }

    /// The config space (for inspection and snapshots).
    pub fn config(&self) -> &ConfigSpace {
        &self.cs
    }

    /// Engages or releases the electromechanical interlock from the VMM side (the
    /// guest toggles it by writing Slot Control EIC).
    pub fn set_interlock(&mut self, engaged: bool) {
        if engaged {
            self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_EIS);
        } else {
            self.cs.clear_bits_u16(self.cap + SLTSTA, SLTSTA_EIS);
        }
    }

    /// Resets the port (a conventional reset of the bridge): config space back to
    /// its reset values, slot power and power indicator on iff a device is
    /// present, interlock released, events cleared. A pending unplug completes
    /// (the rebooting guest cannot act on it); a pending plug completes when the
    /// device is reachable, which it now is (a held plug's device goes into the
    /// slot).
    pub fn reset(&mut self) {
        if let Some(mut p) = self.pending.take() {
            match p.op {
                Operation::Unplug => {
                    self.device = None;
                    p.completion.complete(HotplugOutcome::Unplugged);
                }
                Operation::Plug => {
                    if let Some(d) = p.held.take() {
                        self.device = Some(d);
                    }
                    p.completion.complete(HotplugOutcome::Plugged)
                }
            }
        }
        self.guest_powering_off = false;
        self.init_config();
    }

    /// Sets the callback run with the removed device each time the guest
    /// powers the slot off with no unplug pending: a removal the VMM did not
    /// ask for (sysfs `power`), or a power off that comes after a cancel
    /// already reported [`Cancelled`](HotplugOutcome::Cancelled) (the guest's
    /// button work had queued it). The device has left the slot; a
    /// coordinator can report it and plug the device back. Replaces any
    /// earlier callback.
    ///
    /// Like [`Completion`] callbacks, it runs inside the guest's config write
    /// with the port locked (after the port's own state is updated and its
    /// interrupt sent): keep it short and do not call back into the port from
    /// it; hand the work to another thread or event loop instead.
    pub fn on_guest_removal(&mut self, f: impl Fn(PciHandle) + Send + Sync + 'static) {
        self.on_guest_removal = Some(Arc::new(f));
    }

    /// Whether a plug is held until the guest turns the power indicator off
    /// (see "The replug window"). Its device is not in the slot yet.
    pub fn plug_held(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.held.is_some())
    }

    fn now(&self) -> Duration {
        (self.cfg.clock)()
    }

    fn ctl(&self) -> u16 {
        self.cs.get_u16(self.cap + SLTCTL)
    }

    fn sta(&self) -> u16 {
        self.cs.get_u16(self.cap + SLTSTA)
    }

    fn powered(&self) -> bool {
        self.ctl() & SLTCTL_PCC == 0
    }

    fn hotplug_capable(&self) -> bool {
        self.cs.get_u32(self.cap + SLTCAP) & SLTCAP_HPC != 0
    }

    fn set_link(&mut self, up: bool) {
        let was = self.cs.get_u16(self.cap + LNKSTA) & LNKSTA_DLLLA != 0;
        if up {
            self.cs.set_bits_u16(self.cap + LNKSTA, LNKSTA_DLLLA);
        } else {
            self.cs.clear_bits_u16(self.cap + LNKSTA, LNKSTA_DLLLA);
        }
        if was != up {
            self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_DLLSC);
        }
    }

    /// Takes the device out of the slot: presence and link drop, with their
    /// change events. Does not interrupt; callers follow with `update_interrupt`.
    fn detach(&mut self) -> Option<PciHandle> {
        let dev = self.device.take()?;
        self.cs.clear_bits_u16(self.cap + SLTSTA, SLTSTA_PDS);
        self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_PDC);
        self.set_link(false);
        Some(dev)
    }

    fn finish(&mut self, outcome: HotplugOutcome) {
        if let Some(p) = self.pending.take() {
            log::debug!("{}: {} finished: {outcome:?}", self.cfg.name, p.op);
            p.completion.complete(outcome);
        }
    }

    fn press_button(&mut self) {
        self.counters.button_presses += 1;
        self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_ABP);
    }

    /// Puts `device` in the slot as a hot plug: presence and link up with their
    /// change events, and the attention button when `button` (QEMU presses it
    /// with every plug). Completes at once when the guest left the empty slot
    /// powered with its indicator on. Callers follow with `update_interrupt`.
    fn insert(&mut self, device: PciHandle, button: bool) {
        self.device = Some(device);
        self.cs
            .set_bits_u16(self.cap + SLTSTA, SLTSTA_PDS | SLTSTA_PDC);
        if button {
            self.press_button();
        }
        self.set_link(true);
        if self.powered() && self.ctl() & SLTCTL_PIC == SLTCTL_PIC_ON {
            // The guest left the empty slot powered with its indicator on: the
            // device is reachable already.
            self.finish(HotplugOutcome::Plugged);
        }
    }

    /// When the pending operation resolves by time alone, if it can and has
    /// not (see [`Restored`]).
    fn deadline(&self) -> Option<Duration> {
        let p = self.pending.as_ref()?;
        if p.completion.outcome().is_some() {
            return None;
        }
        p.restored.map(|r| r.deadline())
    }

    /// [`Self::expire`] for `&self` queries: completes a due unplug's
    /// [`Completion`] (`Cancelled`); the next `&mut` call clears it from the
    /// port. Returns whether an operation is still in flight.
    fn expire_shared(&self) -> bool {
        let Some(p) = self.pending.as_ref() else {
            return false;
        };
        if self.deadline().is_some_and(|d| self.now() >= d) {
            log::info!(
                "{}: the guest kept the device after restoring its power indicator",
                self.cfg.name
            );
            p.completion.complete(HotplugOutcome::Cancelled);
        }
        p.completion.outcome().is_none()
    }

    /// Resolves an unplug whose guest restored the indicator late (see
    /// [`Restored`]) once it has kept quiet long enough: the guest kept the
    /// device. Runs on every access and request, since the port has no timer.
    fn expire(&mut self) {
        if self.pending.is_some() && !self.expire_shared() {
            // Resolved (now or by an earlier `&self` query): the outcome is
            // recorded already; `finish` only clears it.
            self.finish(HotplugOutcome::Cancelled);
        }
    }

    /// Whether a Slot Control read was recorded since the guest restored its
    /// indicator late.
    fn restored_read_seen(&self) -> bool {
        self.pending
            .as_ref()
            .and_then(|p| p.restored)
            .is_some_and(|r| r.read_at.is_some())
    }

    /// Notes what a guest read of `offset..offset+len` tells: the guest's
    /// interrupt handler saw the press, or Linux started a power off after
    /// restoring the indicator.
    fn config_read(&mut self, offset: u16, len: usize) {
        let (sta_read, ctl_read) = (
            overlaps(offset, len, self.cap + SLTSTA, 2),
            overlaps(offset, len, self.cap + SLTCTL, 2),
        );
        if !sta_read && !ctl_read {
            return;
        }
        let abp = self.sta() & SLTSTA_ABP != 0;
        let now = self.now();
        if let Some(p) = self.pending.as_mut().filter(|p| p.op == Operation::Unplug) {
            if sta_read && abp {
                p.press_seen = true;
            }
            if let Some(r) = p.restored.as_mut().filter(|_| ctl_read) {
                r.read_at = Some(now);
            }
        }
    }

    fn set_intx(&mut self, level: bool) {
        let level = level && !self.cs.intx_disabled();
        self.cs.set_interrupt_status(level);
        if level != self.intx_level {
            self.intx_level = level;
            if level {
                self.counters.intx_assertions += 1;
            }
            if let Some(intx) = &self.cfg.intx {
                intx.set_level(level);
            }
        }
    }

    /// Whether the hot-plug interrupt condition holds: Hot-Plug Interrupt Enable
    /// and an event whose own enable is set.
    fn interrupt_condition(&self) -> bool {
        let ctl = self.ctl();
        ctl & SLTCTL_HPIE != 0 && self.sta() & enabled_events(ctl) != 0
    }

    /// Re-evaluates the hot-plug interrupt: asserted while Hot-Plug Interrupt
    /// Enable is set and an event is set whose own enable is set. MSI is sent on
    /// each rising edge; INTx follows the level.
    fn update_interrupt(&mut self) {
        let assert = self.interrupt_condition();
        let msi_on = self.msi.is_some_and(|m| m.enabled(&self.cs));
        if msi_on {
            self.set_intx(false);
            if assert && !self.irq_asserted {
                if let Some(msi) = self.msi {
                    match msi.trigger(&mut self.cs, 0, &*self.msi_sink) {
                        Delivery::Sent => self.counters.msi_sent += 1,
                        Delivery::Pending => self.counters.msi_masked += 1,
                        Delivery::Dropped => self.counters.interrupts_dropped += 1,
                    }
                }
            }
        } else {
            self.set_intx(assert);
        }
        self.irq_asserted = assert;
    }

    /// Runs the command a guest write to Slot Control carries.
    fn slot_control_written(&mut self, old_ctl: u16) {
        self.counters.slot_control_writes += 1;
        let mut removed = None;
        let mut ctl = self.ctl();
        if ctl & SLTCTL_EIC != 0 {
            // EIC toggles the interlock and always reads 0.
            ctl &= !SLTCTL_EIC;
            self.cs.set_u16(self.cap + SLTCTL, ctl);
            let sta = self.sta();
            self.cs.set_u16(self.cap + SLTSTA, sta ^ SLTSTA_EIS);
        }
        let was_on = old_ctl & SLTCTL_PCC == 0;
        let on = ctl & SLTCTL_PCC == 0;
        let (old_pic, pic) = (old_ctl & SLTCTL_PIC, ctl & SLTCTL_PIC);
        if was_on && !on {
            // Linux sleeps 1 s after a power off and discards the presence and
            // link events of that second before it turns the indicator off
            // (pciehp_ctrl.c: remove_board): plugs wait for that write.
            if pic != SLTCTL_PIC_OFF {
                self.guest_powering_off = true;
            }
            if let Some(dev) = self.detach() {
                // The device leaves now, not when the indicator goes off.
                removed = self.device_powered_off(dev);
            }
        } else if self.guest_powering_off && ((on && !was_on) || pic == SLTCTL_PIC_OFF) {
            // Only the guest's move past the power off releases a held plug:
            // it turns the indicator off, or powers the slot back on. A write
            // that leaves a surprise-emptied slot powered (the indicator a
            // cancel restores) comes before Linux has handled the removal,
            // which would take the held device out again.
            self.guest_powering_off = false;
            if let Some(device) = self.pending.as_mut().and_then(|p| p.held.take()) {
                log::debug!(
                    "{}: the guest turned the power indicator off; delivering the held plug",
                    self.cfg.name
                );
                // Presence and link only: Linux enables an occupied slot on
                // those alone (pciehp_ctrl.c: pciehp_handle_presence_or_link_change).
                // A button press could be taken after a surprise removal's
                // re-check has already enabled the slot, as an unplug request.
                self.insert(device, false);
            }
        }
        let present = self.device.is_some();
        let mut press = false;
        let mut outcome = None;
        if let Some(p) = self.pending.as_mut() {
            match p.op {
                Operation::Unplug => {
                    let restores = old_pic == SLTCTL_PIC_BLINK && pic == SLTCTL_PIC_ON;
                    if p.window_opened.is_none()
                        && pic == SLTCTL_PIC_BLINK
                        && old_pic != SLTCTL_PIC_BLINK
                    {
                        p.window_opened = Some((self.cfg.clock)());
                        if p.cancel == Cancel::Held {
                            p.cancel = Cancel::Pressed;
                            press = true;
                        }
                    } else if let Some(opened) = p
                        .window_opened
                        .filter(|_| restores && on && present && p.restored.is_none())
                    {
                        // The guest aborted (pciehp_ctrl.c:
                        // pciehp_handle_button_press, BLINKINGOFF -> ON).
                        let now = (self.cfg.clock)();
                        if now < opened.saturating_add(BUTTON_WORK_EARLIEST) {
                            // Its button work cannot have run: nothing will
                            // power the slot off.
                            outcome = Some(HotplugOutcome::Cancelled);
                        } else {
                            // The work may have queued DISABLE_SLOT already, in
                            // this pciehp_ist batch or the next: Linux then
                            // powers the slot off anyway.
                            log::info!(
                                "{}: the guest restored its power indicator at the end of its window; \
                                 waiting to see whether it powers the slot off",
                                self.cfg.name
                            );
                            p.restored = Some(Restored {
                                at: now,
                                read_at: None,
                            });
                        }
                    } else if p.restored.is_some() && on {
                        // A command other than the power off: Linux's disable
                        // path writes none before it, so the guest moved on
                        // with the device.
                        outcome = Some(HotplugOutcome::Cancelled);
                    }
                }
                Operation::Plug => {
                    if present && on && pic == SLTCTL_PIC_ON {
                        outcome = Some(HotplugOutcome::Plugged);
                    }
                }
            }
        }
        if let Some(o) = outcome {
            self.finish(o);
        }
        self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_CC);
        if press {
            self.press_button();
        }
        self.update_interrupt();
        if let (Some(dev), Some(f)) = (removed, self.on_guest_removal.clone()) {
            f(dev);
        }
    }

    /// The guest powered off the slot holding `dev`, which has just left:
    /// completes what was pending with what happened. Returns the device when
    /// nothing was pending (a guest removal, for the callback).
    fn device_powered_off(&mut self, dev: PciHandle) -> Option<PciHandle> {
        let Some(p) = self.pending.as_ref() else {
            self.counters.guest_removals += 1;
            log::warn!(
                "{}: the guest powered the slot off with no unplug pending; the device left",
                self.cfg.name
            );
            return Some(dev);
        };
        match p.op {
            Operation::Plug => self.finish(HotplugOutcome::Aborted),
            Operation::Unplug => {
                if p.cancel != Cancel::None || p.restored.is_some() {
                    log::warn!(
                        "{}: the guest powered the slot off after the cancel: it came too late; \
                         the unplug completes, the device left",
                        self.cfg.name
                    );
                }
                self.finish(HotplugOutcome::Unplugged);
            }
        }
        None
    }
}

impl HotplugSlot for RootPort {
    fn cold_plug(&mut self, device: PciHandle) -> Result<()> {
        if self.sta() & SLTSTA_EIS != 0 {
            return Err(Error::Locked);
        }
        if self.device.is_some() {
            return Err(Error::Occupied(self.cfg.name.clone()));
        }
        self.device = Some(device);
        self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_PDS);
        self.cs.set_bits_u16(self.cap + LNKSTA, LNKSTA_DLLLA);
        let ctl = self.ctl() & !(SLTCTL_PCC | SLTCTL_PIC);
        self.cs.set_u16(self.cap + SLTCTL, ctl | SLTCTL_PIC_ON);
        Ok(())
    }

    fn plug(&mut self, device: PciHandle) -> Result<Completion> {
        self.expire();
        if !self.hotplug_capable() {
            return Err(Error::PlugUnsupported(self.cfg.name.clone()));
        }
        if self.sta() & SLTSTA_EIS != 0 {
            return Err(Error::Locked);
        }
        if self.device.is_some() {
            return Err(Error::Occupied(self.cfg.name.clone()));
        }
        if let Some(p) = &self.pending {
            return Err(Error::Pending {
                op: p.op,
                port: self.cfg.name.clone(),
            });
        }
        let completion = Completion::new();
        let mut pending = Pending::new(Operation::Plug, completion.clone());
        if self.guest_powering_off {
            log::debug!(
                "{}: plug held until the guest turns the power indicator off",
                self.cfg.name
            );
            self.counters.plugs_held += 1;
            pending.held = Some(device);
            self.pending = Some(pending);
            return Ok(completion);
        }
        self.pending = Some(pending);
        self.insert(device, true);
        self.update_interrupt();
        Ok(completion)
    }

    fn request_unplug(&mut self) -> Result<Completion> {
        self.expire();
        if !self.hotplug_capable() {
            return Err(Error::UnplugUnsupported(self.cfg.name.clone()));
        }
        if self.plug_held() {
            // The device never reached the slot: the guest saw nothing.
            self.finish(HotplugOutcome::Cancelled);
            return Ok(Completion::done(HotplugOutcome::Unplugged));
        }
        if self.sta() & SLTSTA_EIS != 0 {
            return Err(Error::Locked);
        }
        if self.ctl() & SLTCTL_PIC == SLTCTL_PIC_BLINK {
            return Err(Error::GuestBusy);
        }
        if self.device.is_none() {
            return Err(Error::Empty(self.cfg.name.clone()));
        }
        if !self.powered() {
            // Never powered by the guest (or a plug it has not acted on): the
            // device leaves without a round trip.
            if self.pending.is_some() {
                self.finish(HotplugOutcome::Cancelled);
            }
            self.detach();
            self.cs.clear_bits_u16(self.cap + SLTSTA, SLTSTA_ABP);
            self.update_interrupt();
            return Ok(Completion::done(HotplugOutcome::Unplugged));
        }
        if let Some(p) = &self.pending {
            return Err(Error::Pending {
                op: p.op,
                port: self.cfg.name.clone(),
            });
        }
        let completion = Completion::new();
        self.pending = Some(Pending::new(Operation::Unplug, completion.clone()));
        self.press_button();
        self.update_interrupt();
        Ok(completion)
    }

    fn cancel_unplug(&mut self) -> Result<Completion> {
        self.expire();
        let now = self.now();
        let Some(p) = self.pending.as_ref().filter(|p| p.op == Operation::Unplug) else {
            return Err(Error::NoUnplugPending(self.cfg.name.clone()));
        };
        let completion = p.completion.clone();
        if p.cancel != Cancel::None || p.restored.is_some() {
            // Asked already, or the guest has aborted: one press is enough (a
            // second would start a new unplug once the guest is back ON).
            return Ok(completion);
        }
        let cancel = match p.window_opened {
            None if self.sta() & SLTSTA_ABP != 0 && !p.press_seen => {
                // The guest has not read the press: take it back. It never
                // saw it, so nothing else happens.
                self.cs.clear_bits_u16(self.cap + SLTSTA, SLTSTA_ABP);
                self.finish(HotplugOutcome::Cancelled);
                self.update_interrupt();
                return Ok(completion);
            }
            // The guest read the press (its interrupt handler reads Slot
            // Status, then writes it back) or took it: it will open its
            // window, and a press before that would merge with the first.
            None => Cancel::Held,
            Some(opened)
                if now.saturating_add(CANCEL_MARGIN)
                    < opened.saturating_add(BUTTON_WORK_EARLIEST) =>
            {
                Cancel::Pressed
            }
            Some(opened) => {
                log::warn!(
                    "{}: cancel asked {:?} into the guest's 5 s window: too late to land in it; \
                     not pressed, the unplug goes on",
                    self.cfg.name,
                    now.saturating_sub(opened)
                );
                Cancel::TooLate
            }
        };
        if let Some(p) = self.pending.as_mut() {
            p.cancel = cancel;
        }
        if cancel == Cancel::Pressed {
            self.press_button();
            self.update_interrupt();
        }
        Ok(completion)
    }

    fn surprise_remove(&mut self) -> Result<PciHandle> {
        self.expire();
        if self.cs.get_u32(self.cap + SLTCAP) & SLTCAP_HPS == 0 {
            return Err(Error::NoSurprise(self.cfg.name.clone()));
        }
        if let Some(dev) = self.pending.as_mut().and_then(|p| p.held.take()) {
            self.finish(HotplugOutcome::Cancelled);
            return Ok(dev);
        }
        let powered = self.powered();
        let Some(dev) = self.detach() else {
            return Err(Error::Empty(self.cfg.name.clone()));
        };
        if powered {
            // Linux powers the emptied slot off, sleeps 1 s, turns the
            // indicator off (pciehp_ctrl.c: remove_board): plugs wait for it.
            self.guest_powering_off = true;
        }
        let outcome = match self.pending.as_ref().map(|p| p.op) {
            Some(Operation::Plug) => HotplugOutcome::Cancelled,
            _ => HotplugOutcome::Unplugged,
        };
        self.finish(outcome);
        self.update_interrupt();
        Ok(dev)
    }

    fn device(&self) -> Option<PciHandle> {
        self.device.clone()
    }

    fn slot_state(&self) -> SlotState {
        let in_flight = self.expire_shared();
        SlotState {
            present: self.sta() & SLTSTA_PDS != 0,
            powered: self.powered(),
            link_active: self.cs.get_u16(self.cap + LNKSTA) & LNKSTA_DLLLA != 0,
            locked: self.sta() & SLTSTA_EIS != 0,
            pending: self.pending.as_ref().filter(|_| in_flight).map(|p| p.op),
        }
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.deadline()
    }

    fn poll(&mut self) {
        self.expire();
    }
}

impl PciFunction for RootPort {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        // The access is recorded before the time check: the Slot Control read
        // that starts a slow guest's power off must not itself resolve the
        // unplug as kept. A read after an earlier read's bound is checked
        // against that bound first.
        if !overlaps(offset, data.len(), self.cap + SLTCTL, 2) || self.restored_read_seen() {
            self.expire();
        }
        self.cs.read(offset, data);
        self.config_read(offset, data.len());
        self.expire();
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        self.expire();
        let old_ctl = self.ctl();
        let moved = self.cs.write(offset, data);
        let len = data.len();
        if let Some(msi) = self.msi {
            msi.config_written(&mut self.cs, offset, len, &*self.msi_sink);
        }
        if overlaps(offset, len, self.cap + SLTCTL, 2) {
            self.slot_control_written(old_ctl);
        } else if overlaps(offset, len, self.cap + SLTSTA, 2)
            || overlaps(offset, len, COMMAND, 2)
            || self
                .msi
                .is_some_and(|m| overlaps(offset, len, m.offset(), 4))
        {
            self.update_interrupt();
        }
        moved
    }

    fn bar_regions(&self) -> BarRegions {
        [None; MAX_BARS]
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn bus_range(&self) -> Option<BusRange> {
        self.cs
            .bus_numbers()
            .map(|(secondary, subordinate)| BusRange {
                secondary,
                subordinate,
            })
    }

    fn forwards(&self, address: u64, memory: bool) -> bool {
        self.cs.bridge_forwards(address, memory)
    }

    fn children(&self) -> Vec<(u8, u8, PciHandle)> {
        match &self.device {
            Some(d) if self.powered() => vec![(0, 0, d.clone())],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
