//! Linux pciehp, modelled over the register interface.
//!
//! The reference is the kernel the project's real guests run: Debian's Linux
//! 6.1 (package `linux-source-6.1` 6.1.192-3, `SUBLEVEL = 192`), read from
//! `drivers/pci/hotplug/pciehp_{core,ctrl,hpc,pci}.c`, `drivers/pci/pci.c`
//! and `drivers/pci/probe.c`. The model has the same states, the same register
//! accesses in the same order, the hard interrupt handler that acknowledges
//! Slot Status and re-reads it in MSI mode, the interrupt thread that handles
//! button presses before disable requests before presence/link changes, the
//! delayed button work, and the waits: Command Completed up to 1 s; on enable
//! 20 ms before the first Link Active poll, polls every 10 ms for 1 s, 100 ms
//! after link up, then the vendor ID read every 20 ms for up to 1 s; 1 s after
//! power off.
//!
//! Where it departs from 6.1.192 on purpose, the code says so. In general:
//! - sleeps are the nominal `msleep()` values. Linux's `msleep(m)` sleeps
//!   `msecs_to_jiffies(m) + 1` jiffies (Debian's config has HZ=250, so
//!   `msleep(20)` is 20 to 24 ms): real figures are a few ms longer;
//! - things our ports do not have are left out: poll mode (`pciehp_poll_mode`),
//!   runtime PM, DPC recovery (`pciehp_ignore_dpc_link_change`), in-band presence
//!   disable (`pcie_wait_for_presence`, only with Slot Capabilities 2 IBPD or on
//!   Dell systems), the Intel Command Completed erratum (`broken_cmd_compl`,
//!   Intel and some Qualcomm/HXT ports only), sysfs requests, suspend/resume;
//! - driver binding and unbinding take [`Timings::bind`] and
//!   [`Timings::unbind`], stand-ins for the guest's drivers.

use std::collections::VecDeque;
use std::time::Duration;

use vmm_pci::Bdf;
use vmm_pci::config::{
    COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY, COMMAND_SERR,
};
use vmm_pci::pcie::{
    LNKCAP, LNKCAP_DLLLARC, LNKCTL, LNKSTA, LNKSTA_DLLLA, SLTCAP, SLTCAP_ABP, SLTCAP_AIP,
    SLTCAP_MRLSP, SLTCAP_NCCS, SLTCAP_PCP, SLTCAP_PIP, SLTCAP_PSN_SHIFT, SLTCTL, SLTCTL_ABPE,
    SLTCTL_AIC, SLTCTL_AIC_OFF, SLTCTL_AIC_ON, SLTCTL_CCIE, SLTCTL_DLLSCE, SLTCTL_HPIE,
    SLTCTL_MRLSCE, SLTCTL_PCC, SLTCTL_PDCE, SLTCTL_PFDE, SLTCTL_PIC, SLTCTL_PIC_BLINK,
    SLTCTL_PIC_OFF, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP, SLTSTA_CC, SLTSTA_DLLSC, SLTSTA_MRLSC,
    SLTSTA_MRLSS, SLTSTA_PDC, SLTSTA_PDS, SLTSTA_PFD,
};

use crate::env::Env;

/// pciehp's synthetic "disable slot" request (`pciehp.h: DISABLE_SLOT`, bit 16
/// of its pending events).
const DISABLE_SLOT: u32 = 1 << 16;
/// The Slot Status bits `pciehp_hpc.c: pciehp_isr` collects.
const ISR_EVENTS: u16 = SLTSTA_ABP | SLTSTA_PFD | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC;
/// `PCI_EXP_LNKCTL_LD`: Link Disable.
const LNKCTL_LD: u16 = 0x0010;
/// `PCI_EXP_LNKSTA_LT`: Link Training.
const LNKSTA_LT: u16 = 0x0800;
/// `PCI_EXP_LNKSTA_NLW`: Negotiated Link Width.
const LNKSTA_NLW: u16 = 0x03f0;
/// One jiffy of Debian's 6.1 kernel (CONFIG_HZ=250): what `pcie_wait_cmd`
/// waits when a command has already timed out.
const JIFFY: Duration = Duration::from_millis(4);

/// The slot states of `struct controller` (`pciehp.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PciehpState {
    /// Slot off.
    Off,
    /// Slot on, device in use.
    On,
    /// Button pressed on an off slot: will power on in 5 s.
    BlinkingOn,
    /// Button pressed on an on slot: will power off in 5 s.
    BlinkingOff,
    /// Enabling.
    PowerOn,
    /// Disabling.
    PowerOff,
}

impl PciehpState {
    /// The value of the `*_STATE` define, as Linux prints it.
    fn value(self) -> u8 {
        match self {
            PciehpState::Off => 0,
            PciehpState::BlinkingOn => 1,
            PciehpState::BlinkingOff => 2,
            PciehpState::PowerOn => 3,
            PciehpState::PowerOff => 4,
            PciehpState::On => 5,
        }
    }
}

/// The waits the model uses; Linux 6.1's values by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Timings {
    /// Attention button delay before acting (`pciehp_ctrl.c:
    /// pciehp_handle_button_press`, `5 * HZ`).
    pub button_delay: Duration,
    /// Wait before the first Link Active poll (`pci.c:
    /// pcie_wait_for_link_delay`, `msleep(20)`: a component enters LTSSM
    /// Detect within 20 ms).
    pub link_active_delay: Duration,
    /// Link Active poll interval (`pcie_wait_for_link_delay`, `msleep(10)`).
    pub link_poll: Duration,
    /// Give up on the link after polling this long (`pcie_wait_for_link_delay`,
    /// `timeout = 1000`).
    pub link_timeout: Duration,
    /// Wait after link up before config cycles to the device
    /// (`pcie_wait_for_link`, `delay = 100`).
    pub link_settle: Duration,
    /// Vendor ID retry interval (`pciehp_hpc.c: pci_bus_check_dev`, `step = 20`).
    pub vendor_id_poll: Duration,
    /// Give up on the vendor ID after this long (`pci_bus_check_dev`,
    /// `delay = 1000`).
    pub vendor_id_timeout: Duration,
    /// Wait after power off (`pciehp_ctrl.c: remove_board` and `set_slot_off`,
    /// `msleep(1000)`).
    pub power_off_wait: Duration,
    /// Command Completed timeout (`pciehp_hpc.c: pcie_wait_cmd`, 1000 ms).
    pub cmd_timeout: Duration,
    /// How long binding a driver to a new device takes (model stand-in).
    pub bind: Duration,
    /// How long unbinding a device's driver takes (model stand-in: what pciehp
    /// waits for before it powers the slot off).
    pub unbind: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            button_delay: Duration::from_secs(5),
            link_active_delay: Duration::from_millis(20),
            link_poll: Duration::from_millis(10),
            link_timeout: Duration::from_secs(1),
            link_settle: Duration::from_millis(100),
            vendor_id_poll: Duration::from_millis(20),
            vendor_id_timeout: Duration::from_secs(1),
            power_off_wait: Duration::from_secs(1),
            cmd_timeout: Duration::from_secs(1),
            bind: Duration::ZERO,
            unbind: Duration::from_millis(20),
        }
    }
}

/// Points in the model where a test can act, as a VMM call landing at that
/// exact moment in the guest would. See [`Pciehp::set_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciehpHook {
    /// `pciehp_isr` read these event bits from Slot Status and has not written
    /// them back yet.
    IsrRead(u16),
    /// The 5 s button work ran (`pciehp_queue_pushbutton_work`) and queued its
    /// request; the interrupt thread has not taken it yet. An interrupt raised
    /// now is handled before the thread takes its events.
    ButtonWork,
}

type HookFn = Box<dyn FnMut(PciehpHook) + Send>;

#[derive(Default)]
struct Hook(Option<HookFn>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// One step of the interrupt thread's current work; each may sleep after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
enum Step {
    /// `pciehp_ctrl.c: __pciehp_enable_slot`: latch and power checks, then
    /// `board_added`.
    EnableSlot,
    /// `pciehp_hpc.c: pciehp_power_on_slot`.
    PowerOn,
    /// `pciehp_set_indicators` (power, attention; `None` is `INDICATOR_NOOP`).
    Indicators(Option<u16>, Option<u16>),
    /// `pciehp_check_link_status` -> `pcie_wait_for_link`: the 20 ms first.
    CheckLink,
    /// `pcie_wait_for_link_delay`'s poll, with this much of its timeout left.
    PollLink(Duration),
    /// `pci_bus_check_dev`, with this much of its 1 s left.
    CheckDevice(Duration),
    /// The rest of `pciehp_check_link_status`: Link Status, then whether the
    /// device answered.
    LinkStatus(bool),
    /// `board_added`'s power fault check.
    CheckPowerFault,
    /// `pciehp_configure_device`.
    Configure,
    /// `pciehp_ctrl.c: __pciehp_disable_slot` (safe removal or surprise):
    /// power check, then `remove_board`.
    DisableSlot(bool),
    /// `pciehp_unconfigure_device`: unbind and remove the slot's functions.
    Unconfigure(bool),
    /// `pciehp_unconfigure_device` on safe removal: bus mastering and SERR off,
    /// INTx disabled, in each removed function.
    Quiesce,
    /// `pciehp_power_off_slot`, then `msleep(1000)`.
    PowerOff,
    /// `remove_board`: "Ignore link or presence changes caused by power off".
    IgnorePowerOffEvents,
    /// `pciehp_enable_slot` / `pciehp_disable_slot`: the final state.
    Finish(PciehpState),
    /// The second half of `pciehp_handle_presence_or_link_change`.
    Recheck,
}

/// One hot-plug port's pciehp instance.
#[derive(Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Pciehp {
    /// The port.
    pub port: Bdf,
    cap: u16,
    /// The MSI data value the port was given.
    pub vector: u32,
    slot_cap: u32,
    link_active_reporting: bool,
    state: PciehpState,
    pending: u32,
    cmd_busy: bool,
    cmd_started: Duration,
    slot_ctrl: u16,
    power_fault_detected: bool,
    button_at: Option<Duration>,
    steps: VecDeque<Step>,
    wake: Duration,
    removed: Vec<Bdf>,
    /// Hooks are the test's, not the guest's: a saved guest has none.
    #[cfg_attr(feature = "serde", serde(skip))]
    hook: Hook,
    /// Commands that timed out waiting for Command Completed.
    pub cmd_timeouts: u64,
    /// Interrupts handled.
    pub interrupts: u64,
}

impl Pciehp {
    /// Binds pciehp to the port at `port` whose PCIe capability is at `cap`:
    /// enables the port's MSI (as the port driver does), then `pciehp_probe`:
    /// `pcie_init` (initial state from what enumeration found, stale events
    /// cleared, an empty slot left powered powered off), notifications enabled
    /// (`pcie_init_notification`) and presence checked
    /// (`pciehp_check_presence`).
    pub fn probe(env: &mut Env, port: Bdf, cap: u16, msi_cap: u16, vector: u32) -> Pciehp {
        let cmd = env.cfg_read(port, COMMAND, 2) as u16;
        env.cfg_write(
            port,
            COMMAND,
            2,
            (cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER) as u32,
        );
        env.cfg_write(port, msi_cap + 4, 4, 0xfee0_0000);
        env.cfg_write(port, msi_cap + 8, 4, 0);
        env.cfg_write(port, msi_cap + 0xc, 2, vector);
        let ctrl = env.cfg_read(port, msi_cap + 2, 2);
        env.cfg_write(port, msi_cap + 2, 2, (ctrl & !0x70) | 1);
        // probe.c: pci_set_bus_speed.
        let link_cap = env.cfg_read(port, cap + LNKCAP, 4);
        // pciehp_hpc.c: pcie_init.
        let slot_cap = env.cfg_read(port, cap + SLTCAP, 4);
        let mut p = Pciehp {
            port,
            cap,
            vector,
            slot_cap,
            link_active_reporting: link_cap & LNKCAP_DLLLARC != 0,
            state: PciehpState::Off,
            pending: 0,
            // kzalloc'd: no command in flight, slot_ctrl 0.
            cmd_busy: false,
            cmd_started: Duration::ZERO,
            slot_ctrl: 0,
            power_fault_detected: false,
            button_at: None,
            steps: VecDeque::new(),
            wake: Duration::ZERO,
            removed: Vec::new(),
            hook: Hook::default(),
            cmd_timeouts: 0,
            interrupts: 0,
        };
        // "ctrl->state = list_empty(&subordinate->devices) ? OFF_STATE : ON_STATE".
        let sec = p.secondary(env);
        let enumerated = env.enumerator.found.iter().any(|f| Some(f.bdf.bus) == sec);
        p.state = if enumerated {
            PciehpState::On
        } else {
            PciehpState::Off
        };
        // "Clear all remaining event bits in Slot Status register."
        p.write_sta(
            env,
            SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_CC | SLTSTA_DLLSC | SLTSTA_PDC,
        );
        env.log(format!(
            "pciehp {port}: Slot #{} AttnBtn{} PwrCtrl{} MRL{} AttnInd{} PwrInd{} LLActRep{}",
            p.slot_number(),
            flag(slot_cap & SLTCAP_ABP != 0),
            flag(slot_cap & SLTCAP_PCP != 0),
            flag(slot_cap & SLTCAP_MRLSP != 0),
            flag(slot_cap & SLTCAP_AIP != 0),
            flag(slot_cap & SLTCAP_PIP != 0),
            flag(p.link_active_reporting),
        ));
        // "If empty slot's power status is on, turn power off. The IRQ isn't
        // requested yet, so avoid triggering a notification with this command."
        if slot_cap & SLTCAP_PCP != 0 && p.powered(env) && !p.occupied(env) {
            // pcie_disable_notification.
            let mask = SLTCTL_PDCE
                | SLTCTL_ABPE
                | SLTCTL_MRLSCE
                | SLTCTL_PFDE
                | SLTCTL_HPIE
                | SLTCTL_CCIE
                | SLTCTL_DLLSCE;
            p.write_cmd(env, 0, mask, true);
            p.write_cmd(env, SLTCTL_PCC, SLTCTL_PCC, true);
        }
        // pciehp_probe -> pcie_init_notification -> pcie_enable_notification
        // (no wait): link events always, presence only without a button.
        let mut cmd = SLTCTL_DLLSCE | SLTCTL_HPIE | SLTCTL_CCIE;
        cmd |= if slot_cap & SLTCAP_ABP != 0 {
            SLTCTL_ABPE
        } else {
            SLTCTL_PDCE
        };
        let mask =
            SLTCTL_PDCE | SLTCTL_ABPE | SLTCTL_PFDE | SLTCTL_HPIE | SLTCTL_CCIE | SLTCTL_DLLSCE;
        p.write_cmd(env, cmd, mask, false);
        // pciehp_core.c: pciehp_check_presence.
        let occupied = p.occupied(env);
        if (occupied && matches!(p.state, PciehpState::Off | PciehpState::BlinkingOn))
            || (!occupied && matches!(p.state, PciehpState::On | PciehpState::BlinkingOff))
        {
            p.pending |= SLTSTA_PDC as u32;
        }
        env.log(format!("pciehp {port}: probed, slot {:?}", p.state));
        p
    }

    /// The slot state.
    pub fn state(&self) -> PciehpState {
        self.state
    }

    /// Runs `hook` at the points [`PciehpHook`] names, replacing any hook set
    /// before. Tests use it to land a VMM call at an exact point of the
    /// guest's handling (between the interrupt handler's read of Slot Status
    /// and its write back, or together with the button work's request).
    pub fn set_hook(&mut self, hook: impl FnMut(PciehpHook) + Send + 'static) {
        self.hook = Hook(Some(Box::new(hook)));
    }

    /// Removes the hook.
    pub fn clear_hook(&mut self) {
        self.hook = Hook(None);
    }

    fn run_hook(&mut self, at: PciehpHook) {
        if let Some(h) = self.hook.0.as_mut() {
            h(at);
        }
    }

    /// When the model next needs to run (a step or the button work), if ever.
    pub fn next_wake(&self) -> Option<Duration> {
        let step = (!self.steps.is_empty()).then_some(self.wake);
        match (step, self.button_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the interrupt thread has events to handle and is free to.
    pub fn has_work(&self) -> bool {
        self.steps.is_empty() && self.pending != 0
    }

    fn slot_number(&self) -> u32 {
        self.slot_cap >> SLTCAP_PSN_SHIFT
    }

    /// The port's secondary bus (`ctrl->pcie->port->subordinate`), as the
    /// enumerator assigned it.
    fn secondary(&self, env: &mut Env) -> Option<u8> {
        match env.enumerator.get(self.port).and_then(|f| f.secondary) {
            Some(s) => Some(s),
            None => Some((env.cfg_read(self.port, vmm_pci::config::PRIMARY_BUS, 4) >> 8) as u8),
        }
    }

    fn log(&self, env: &mut Env, msg: impl std::fmt::Display) {
        env.log(format!("pciehp {}: {msg}", self.port));
    }

    /// `ctrl_info(ctrl, "Slot(%s): ...")`.
    fn slot_log(&self, env: &mut Env, msg: impl std::fmt::Display) {
        env.log(format!(
            "pciehp {}: Slot({}): {msg}",
            self.port,
            self.slot_number()
        ));
    }

    fn sta(&self, env: &mut Env) -> u16 {
        env.cfg_read(self.port, self.cap + SLTSTA, 2) as u16
    }

    /// `pciehp_card_present`.
    fn card_present(&self, env: &mut Env) -> bool {
        self.sta(env) & SLTSTA_PDS != 0
    }

    /// `pciehp_check_link_active`.
    fn link_active(&self, env: &mut Env) -> bool {
        env.cfg_read(self.port, self.cap + LNKSTA, 2) as u16 & LNKSTA_DLLLA != 0
    }

    /// `pciehp_card_present_or_link_active`.
    fn occupied(&self, env: &mut Env) -> bool {
        self.card_present(env) || self.link_active(env)
    }

    /// `pciehp_get_power_status`: reads Slot Control.
    fn powered(&self, env: &mut Env) -> bool {
        env.cfg_read(self.port, self.cap + SLTCTL, 2) as u16 & SLTCTL_PCC == 0
    }

    fn write_sta(&self, env: &mut Env, bits: u16) {
        env.cfg_write(self.port, self.cap + SLTSTA, 2, bits as u32);
    }

    /// `pcie_wait_cmd` (interrupt mode; the poll branch for while notifications
    /// are off).
    fn wait_cmd(&mut self, env: &mut Env) {
        if self.slot_cap & SLTCAP_NCCS != 0 || !self.cmd_busy {
            return;
        }
        // The hard interrupt handler runs as soon as Command Completed raises
        // the interrupt.
        self.take_own_interrupts(env);
        if !self.cmd_busy {
            return;
        }
        let deadline = self.cmd_started + env.timings.cmd_timeout;
        // "Even if the command has already timed out, we want to call
        // pcie_poll_cmd() so it can clear PCI_EXP_SLTSTA_CC": a timed-out
        // command costs each later one a jiffy.
        let deadline = deadline.max(env.clock.now() + JIFFY);
        let irq_mode = self.slot_ctrl & SLTCTL_HPIE != 0 && self.slot_ctrl & SLTCTL_CCIE != 0;
        if !irq_mode {
            // pcie_poll_cmd: read Slot Status every 10 ms, acknowledge CC.
            loop {
                if self.sta(env) & SLTSTA_CC != 0 {
                    self.write_sta(env, SLTSTA_CC);
                    self.cmd_busy = false;
                    return;
                }
                if env.clock.now() >= deadline {
                    break;
                }
                let next = (env.clock.now() + Duration::from_millis(10)).min(deadline);
                env.clock.advance_to(next);
            }
        } else {
            env.clock.advance_to(deadline);
        }
        // Linux leaves cmd_busy set: the next command waits again.
        self.cmd_timeouts += 1;
        let ago = (env.clock.now() - self.cmd_started).as_millis();
        let msg = format!(
            "Timeout on hotplug command {:#06x} (issued {ago} msec ago)",
            self.slot_ctrl
        );
        self.log(env, msg);
    }

    /// `pcie_do_write_cmd`: wait for the previous command, read-modify-write
    /// Slot Control, and optionally wait for this one.
    fn write_cmd(&mut self, env: &mut Env, cmd: u16, mask: u16, wait: bool) {
        self.wait_cmd(env);
        let orig = env.cfg_read(self.port, self.cap + SLTCTL, 2) as u16;
        if orig == 0xffff {
            self.log(env, "pcie_do_write_cmd: no response from device");
            return;
        }
        let ctl = (orig & !mask) | (cmd & mask);
        self.cmd_busy = true;
        self.slot_ctrl = ctl;
        env.cfg_write(self.port, self.cap + SLTCTL, 2, ctl as u32);
        self.cmd_started = env.clock.now();
        self.take_own_interrupts(env);
        if wait {
            self.wait_cmd(env);
        }
    }

    /// `pciehp_set_indicators` (no wait); only the indicators the slot has.
    fn set_indicators(&mut self, env: &mut Env, pic: Option<u16>, aic: Option<u16>) {
        let (mut cmd, mut mask) = (0, 0);
        if let Some(p) = pic.filter(|_| self.slot_cap & SLTCAP_PIP != 0) {
            cmd |= p;
            mask |= SLTCTL_PIC;
        }
        if let Some(a) = aic.filter(|_| self.slot_cap & SLTCAP_AIP != 0) {
            cmd |= a;
            mask |= SLTCTL_AIC;
        }
        if cmd != 0 {
            self.write_cmd(env, cmd, mask, false);
        }
    }

    fn take_own_interrupts(&mut self, env: &mut Env) {
        for _ in 0..env.irqs.take_matching(self.vector) {
            self.isr(env);
        }
    }

    /// `pciehp_isr`: read and acknowledge events (re-reading in MSI mode),
    /// complete a command, and queue the rest for the thread.
    pub fn isr(&mut self, env: &mut Env) {
        self.interrupts += 1;
        // "Interrupts only occur ... if enabled in the Slot Control register".
        if self.slot_ctrl & SLTCTL_HPIE == 0 {
            return;
        }
        let mut events = 0u16;
        // The ports use MSI: re-read until Slot Status has no event left (the
        // model bounds the loop; Linux does not).
        for _ in 0..16 {
            let raw = self.sta(env);
            if raw == 0xffff {
                self.log(env, "pciehp_isr: no response from device");
                return;
            }
            let mut status = raw & ISR_EVENTS;
            // "If we've already reported a power fault, don't report it again
            // until we've done something to handle it."
            if self.power_fault_detected {
                status &= !SLTSTA_PFD;
            } else if status & SLTSTA_PFD != 0 {
                self.power_fault_detected = true;
            }
            events |= status;
            if events == 0 {
                return;
            }
            if status == 0 {
                break;
            }
            self.run_hook(PciehpHook::IsrRead(status));
            self.write_sta(env, status);
        }
        if events & SLTSTA_CC != 0 {
            self.cmd_busy = false;
            if events == SLTSTA_CC {
                return;
            }
            events &= !SLTSTA_CC;
        }
        self.pending |= events as u32;
    }

    /// `pciehp_ist`, when the thread is free and has events.
    pub fn ist(&mut self, env: &mut Env) {
        if !self.steps.is_empty() {
            return;
        }
        // synchronize_hardirq(): an interrupt already raised is taken by the
        // hard handler before the thread takes the events.
        self.take_own_interrupts(env);
        let events = std::mem::take(&mut self.pending);
        if events == 0 {
            return;
        }
        if events & SLTSTA_ABP as u32 != 0 {
            self.slot_log(env, "Attention button pressed");
            self.button_press(env);
        }
        if events & SLTSTA_PFD as u32 != 0 {
            self.slot_log(env, "Power fault");
            self.set_indicators(env, Some(SLTCTL_PIC_OFF), Some(SLTCTL_AIC_ON));
        }
        // "Disable requests have higher priority than Presence Detect Changed
        // or Data Link Layer State Changed events."
        if events & DISABLE_SLOT != 0 {
            self.disable_request(env);
        } else if events & (SLTSTA_PDC | SLTSTA_DLLSC) as u32 != 0 {
            self.presence_or_link_change(env, events);
        }
        self.run_steps(env);
    }

    /// `pciehp_ctrl.c: pciehp_handle_button_press`.
    fn button_press(&mut self, env: &mut Env) {
        match self.state {
            PciehpState::On | PciehpState::Off => {
                if self.state == PciehpState::On {
                    self.state = PciehpState::BlinkingOff;
                    self.slot_log(env, "Powering off due to button press");
                } else {
                    self.state = PciehpState::BlinkingOn;
                    // 6.1.192's text has no colon after the slot here.
                    let msg = format!(
                        "pciehp {}: Slot({}) Powering on due to button press",
                        self.port,
                        self.slot_number()
                    );
                    env.log(msg);
                }
                self.set_indicators(env, Some(SLTCTL_PIC_BLINK), Some(SLTCTL_AIC_OFF));
                self.button_at = Some(env.clock.now() + env.timings.button_delay);
            }
            PciehpState::BlinkingOff | PciehpState::BlinkingOn => {
                self.slot_log(env, "Button cancel");
                self.button_at = None;
                if self.state == PciehpState::BlinkingOff {
                    self.state = PciehpState::On;
                    self.set_indicators(env, Some(SLTCTL_PIC_ON), Some(SLTCTL_AIC_OFF));
                } else {
                    self.state = PciehpState::Off;
                    self.set_indicators(env, Some(SLTCTL_PIC_OFF), Some(SLTCTL_AIC_OFF));
                }
                self.slot_log(env, "Action canceled due to button press");
            }
            s => {
                let msg = format!("Ignoring invalid state {:#x}", s.value());
                self.slot_log(env, msg);
            }
        }
    }

    /// `pciehp_ctrl.c: pciehp_handle_disable_request`.
    fn disable_request(&mut self, env: &mut Env) {
        if matches!(
            self.state,
            PciehpState::BlinkingOn | PciehpState::BlinkingOff
        ) {
            self.button_at = None;
        }
        self.state = PciehpState::PowerOff;
        self.start(
            env,
            &[Step::DisableSlot(true), Step::Finish(PciehpState::Off)],
        );
    }

    /// First half of `pciehp_handle_presence_or_link_change`; the second half
    /// (`Recheck`) runs after a disable finishes.
    fn presence_or_link_change(&mut self, env: &mut Env, events: u32) {
        match self.state {
            PciehpState::BlinkingOff | PciehpState::On => {
                self.button_at = None;
                self.state = PciehpState::PowerOff;
                if events & SLTSTA_DLLSC as u32 != 0 {
                    self.slot_log(env, "Link Down");
                }
                if events & SLTSTA_PDC as u32 != 0 {
                    self.slot_log(env, "Card not present");
                }
                self.start(
                    env,
                    &[
                        Step::DisableSlot(false),
                        Step::Finish(PciehpState::Off),
                        Step::Recheck,
                    ],
                );
            }
            _ => self.recheck(env),
        }
    }

    /// Second half of `pciehp_handle_presence_or_link_change`: "Turn the slot
    /// on if it's occupied or link is up".
    fn recheck(&mut self, env: &mut Env) {
        let present = self.card_present(env);
        let link_active = self.link_active(env);
        if !present && !link_active {
            // 6.1.192 has this: a slot blinking on (a press on an empty slot,
            // or a plug that left again) goes back OFF and stops blinking at
            // once. It is a stable backport (issue 13); a kernel without it
            // returns here and leaves the slot BLINKINGON.
            if self.state == PciehpState::BlinkingOn {
                self.state = PciehpState::Off;
                self.button_at = None;
                self.set_indicators(env, Some(SLTCTL_PIC_OFF), None);
                self.slot_log(env, "Card not present");
            }
            return;
        }
        if matches!(self.state, PciehpState::BlinkingOn | PciehpState::Off) {
            self.button_at = None;
            self.state = PciehpState::PowerOn;
            if present {
                self.slot_log(env, "Card present");
            }
            if link_active {
                self.slot_log(env, "Link Up");
            }
            self.start(env, &[Step::EnableSlot]);
        }
    }

    fn start(&mut self, env: &mut Env, steps: &[Step]) {
        self.steps = steps.iter().copied().collect();
        self.wake = env.clock.now();
    }

    /// `board_added`'s `err_exit` (`set_slot_off`) and `pciehp_enable_slot`'s
    /// failure path: the slot ends OFF.
    fn fail_enable(&mut self, env: &mut Env) {
        self.steps.clear();
        if self.slot_cap & SLTCAP_PCP != 0 {
            self.steps.push_back(Step::PowerOff);
        }
        self.steps
            .push_back(Step::Indicators(Some(SLTCTL_PIC_OFF), Some(SLTCTL_AIC_ON)));
        self.enable_failed(env);
    }

    /// `pciehp_enable_slot` after `__pciehp_enable_slot` failed: "may be
    /// blinking", then OFF.
    fn enable_failed(&mut self, env: &mut Env) {
        if self.slot_cap & SLTCAP_ABP != 0 {
            self.steps
                .push_back(Step::Indicators(Some(SLTCTL_PIC_OFF), None));
        }
        self.steps.push_back(Step::Finish(PciehpState::Off));
        self.log(env, "enable failed; slot off");
    }

    /// Runs due steps and the button work. Returns whether anything ran (a step
    /// can raise interrupts the guest must then service).
    pub fn run_due(&mut self, env: &mut Env) -> bool {
        let mut ran = false;
        if self.button_at.is_some_and(|t| t <= env.clock.now()) {
            ran = true;
            self.button_at = None;
            // pciehp_queue_pushbutton_work: becomes an event for the thread.
            match self.state {
                PciehpState::BlinkingOff => self.pending |= DISABLE_SLOT,
                PciehpState::BlinkingOn => self.pending |= SLTSTA_PDC as u32,
                _ => {}
            }
            self.run_hook(PciehpHook::ButtonWork);
        }
        self.run_steps(env) || ran
    }

    /// Runs the steps that are due; returns whether it ran any.
    fn run_steps(&mut self, env: &mut Env) -> bool {
        let mut ran = false;
        while let Some(&step) = self.steps.front() {
            if self.wake > env.clock.now() {
                break;
            }
            self.steps.pop_front();
            let delay = self.exec(env, step);
            self.wake = env.clock.now() + delay;
            ran = true;
        }
        ran
    }

    /// Runs `step`; returns how long the thread sleeps after it.
    fn exec(&mut self, env: &mut Env, step: Step) -> Duration {
        let t = env.timings;
        match step {
            Step::EnableSlot => {
                if self.slot_cap & SLTCAP_MRLSP != 0 && self.sta(env) & SLTSTA_MRLSS != 0 {
                    self.slot_log(env, "Latch open");
                    self.enable_failed(env);
                    return Duration::ZERO;
                }
                if self.slot_cap & SLTCAP_PCP != 0 && self.powered(env) {
                    self.slot_log(env, "Already enabled");
                    self.steps.push_front(Step::Finish(PciehpState::On));
                    return Duration::ZERO;
                }
                // board_added.
                let mut steps = Vec::new();
                if self.slot_cap & SLTCAP_PCP != 0 {
                    steps.push(Step::PowerOn);
                }
                steps.extend([
                    Step::Indicators(Some(SLTCTL_PIC_BLINK), None),
                    Step::CheckLink,
                    Step::CheckPowerFault,
                    Step::Configure,
                    Step::Indicators(Some(SLTCTL_PIC_ON), Some(SLTCTL_AIC_OFF)),
                    Step::Finish(PciehpState::On),
                ]);
                for s in steps.into_iter().rev() {
                    self.steps.push_front(s);
                }
            }
            Step::PowerOn => {
                // "Clear power-fault bit from previous power failures".
                if self.sta(env) & SLTSTA_PFD != 0 {
                    self.write_sta(env, SLTSTA_PFD);
                }
                self.power_fault_detected = false;
                self.write_cmd(env, 0, SLTCTL_PCC, true);
                // pciehp_link_enable: clear Link Disable.
                let lnkctl = env.cfg_read(self.port, self.cap + LNKCTL, 2) as u16;
                env.cfg_write(
                    self.port,
                    self.cap + LNKCTL,
                    2,
                    (lnkctl & !LNKCTL_LD) as u32,
                );
            }
            Step::Indicators(pic, aic) => self.set_indicators(env, pic, aic),
            Step::CheckLink => {
                if !self.link_active_reporting {
                    // "Some controllers might not implement link active
                    // reporting. In this case, we wait for 1000 ms + any delay".
                    self.steps
                        .push_front(Step::CheckDevice(t.vendor_id_timeout));
                    return t.link_timeout + t.link_settle;
                }
                self.steps.push_front(Step::PollLink(t.link_timeout));
                return t.link_active_delay;
            }
            Step::PollLink(left) => {
                if self.link_active(env) {
                    self.steps
                        .push_front(Step::CheckDevice(t.vendor_id_timeout));
                    return t.link_settle;
                }
                if left.is_zero() {
                    self.slot_log(env, "No link");
                    self.fail_enable(env);
                    return Duration::ZERO;
                }
                self.steps
                    .push_front(Step::PollLink(left.saturating_sub(t.link_poll)));
                return t.link_poll;
            }
            Step::CheckDevice(left) => {
                // pci_bus_check_dev -> pci_bus_read_dev_vendor_id(.., 0): a
                // dword read; an error response, 0, a half-empty value or a
                // Configuration Request Retry Status completion (vendor
                // 0x0001, not waited on with timeout 0) is "not found".
                let sec = self.secondary(env).unwrap_or(0);
                let l = env.cfg_read(Bdf::new(sec, 0, 0), 0, 4);
                let found = !matches!(l, 0xffff_ffff | 0 | 0x0000_ffff | 0xffff_0000)
                    && l & 0xffff != 0x0001;
                if found {
                    // pciehp_check_link_status: "ignore link or presence
                    // changes up to this point".
                    self.pending &= !((SLTSTA_DLLSC | SLTSTA_PDC) as u32);
                    self.steps.push_front(Step::LinkStatus(true));
                    return Duration::ZERO;
                }
                let left = left.saturating_sub(t.vendor_id_poll);
                self.steps.push_front(if left.is_zero() {
                    Step::LinkStatus(false)
                } else {
                    Step::CheckDevice(left)
                });
                return t.vendor_id_poll;
            }
            Step::LinkStatus(found) => {
                let lnk = env.cfg_read(self.port, self.cap + LNKSTA, 2) as u16;
                if lnk & LNKSTA_LT != 0 || lnk & LNKSTA_NLW == 0 {
                    let msg = format!("Cannot train link: status {lnk:#06x}");
                    self.slot_log(env, msg);
                    self.fail_enable(env);
                } else if !found {
                    self.slot_log(env, "No device found");
                    self.fail_enable(env);
                }
            }
            Step::CheckPowerFault => {
                if self.power_fault_detected || self.sta(env) & SLTSTA_PFD != 0 {
                    self.slot_log(env, "Power fault");
                    self.fail_enable(env);
                }
            }
            Step::Configure => {
                let sec = self.secondary(env).unwrap_or(0);
                if env.enumerator.get(Bdf::new(sec, 0, 0)).is_some() {
                    // -EEXIST: "The device is already there", not an error.
                    return Duration::ZERO;
                }
                let added = env.configure_slot(self.port);
                if added.is_empty() {
                    self.log(env, "No new device found");
                    let msg = format!("Cannot add device at 0000:{sec:02x}:00");
                    self.log(env, msg);
                    self.fail_enable(env);
                    return Duration::ZERO;
                }
                let msg = format!("configured {added:?}");
                self.log(env, msg);
                return t.bind;
            }
            Step::DisableSlot(safe) => {
                if self.slot_cap & SLTCAP_PCP != 0 && !self.powered(env) {
                    self.slot_log(env, "Already disabled");
                    return Duration::ZERO;
                }
                // remove_board.
                let mut steps = vec![Step::Unconfigure(safe)];
                if self.slot_cap & SLTCAP_PCP != 0 {
                    steps.extend([Step::PowerOff, Step::IgnorePowerOffEvents]);
                }
                steps.push(Step::Indicators(Some(SLTCTL_PIC_OFF), None));
                for s in steps.into_iter().rev() {
                    self.steps.push_front(s);
                }
            }
            Step::Unconfigure(safe) => {
                self.removed = env.unconfigure_slot(self.port);
                if safe {
                    self.steps.push_front(Step::Quiesce);
                } else {
                    self.removed.clear();
                }
                return t.unbind;
            }
            Step::Quiesce => {
                // "Ensure that no new Requests will be generated from the
                // device."
                for bdf in std::mem::take(&mut self.removed) {
                    let cmd = env.cfg_read(bdf, COMMAND, 2) as u16;
                    let cmd = (cmd & !(COMMAND_BUS_MASTER | COMMAND_SERR)) | COMMAND_INTX_DISABLE;
                    env.cfg_write(bdf, COMMAND, 2, cmd as u32);
                }
            }
            Step::PowerOff => {
                self.write_cmd(env, SLTCTL_PCC, SLTCTL_PCC, true);
                return t.power_off_wait;
            }
            Step::IgnorePowerOffEvents => self.pending &= !((SLTSTA_DLLSC | SLTSTA_PDC) as u32),
            Step::Finish(s) => self.state = s,
            Step::Recheck => self.recheck(env),
        }
        Duration::ZERO
    }
}

fn flag(on: bool) -> char {
    if on { '+' } else { '-' }
}
