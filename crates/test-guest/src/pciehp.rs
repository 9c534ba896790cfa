//! Linux pciehp, modelled over the register interface.
//!
//! The model follows `drivers/pci/hotplug/pciehp_{core,ctrl,hpc}.c`: the same
//! states, the same order of register writes, the hard interrupt handler that
//! acknowledges Slot Status and re-reads it in MSI mode, the interrupt thread
//! that handles button presses before presence/link changes, the delayed button
//! work, and the waits (Command Completed up to 1 s, link up to 1 s polled every
//! 10 ms, 100 ms settle after link up, 1 s after power off).

use std::collections::VecDeque;
use std::time::Duration;

use vmm_pci::Bdf;
use vmm_pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vmm_pci::pcie::{
    LNKSTA, LNKSTA_DLLLA, SLTCAP, SLTCAP_ABP, SLTCAP_NCCS, SLTCAP_PCP, SLTCTL, SLTCTL_ABPE,
    SLTCTL_AIC, SLTCTL_AIC_OFF, SLTCTL_AIC_ON, SLTCTL_CCIE, SLTCTL_DLLSCE, SLTCTL_HPIE,
    SLTCTL_MRLSCE, SLTCTL_PCC, SLTCTL_PDCE, SLTCTL_PFDE, SLTCTL_PIC, SLTCTL_PIC_BLINK,
    SLTCTL_PIC_OFF, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP, SLTSTA_CC, SLTSTA_DLLSC, SLTSTA_MRLSC,
    SLTSTA_PDC, SLTSTA_PDS, SLTSTA_PFD,
};

use crate::env::Env;

/// pciehp's synthetic "disable slot" request (bit 16 of its pending events).
const DISABLE_SLOT: u32 = 1 << 16;
const ISR_EVENTS: u16 = SLTSTA_ABP | SLTSTA_PFD | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC;

/// The slot states of `struct controller`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The waits the model uses; Linux's values by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Attention button delay before acting (`5 * HZ`).
    pub button_delay: Duration,
    /// Link-active poll interval.
    pub link_poll: Duration,
    /// Give up on the link after this long.
    pub link_timeout: Duration,
    /// Wait after link up before config cycles to the device.
    pub link_settle: Duration,
    /// Wait after power off (`msleep(1000)` in `remove_board`).
    pub power_off_wait: Duration,
    /// Command Completed timeout.
    pub cmd_timeout: Duration,
    /// How long binding a driver to a new device takes.
    pub bind: Duration,
    /// How long unbinding a device's driver takes (what pciehp waits for before
    /// it powers the slot off).
    pub unbind: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            button_delay: Duration::from_secs(5),
            link_poll: Duration::from_millis(10),
            link_timeout: Duration::from_secs(1),
            link_settle: Duration::from_millis(100),
            power_off_wait: Duration::from_secs(1),
            cmd_timeout: Duration::from_secs(1),
            bind: Duration::ZERO,
            unbind: Duration::from_millis(20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    PowerOn,
    Indicators(Option<u16>, Option<u16>),
    WaitLink(Duration),
    CheckDevice,
    Configure,
    Unconfigure,
    PowerOff,
    IgnorePowerOffEvents,
    Finish(PciehpState),
    Recheck,
}

/// One hot-plug port's pciehp instance.
#[derive(Debug)]
pub struct Pciehp {
    /// The port.
    pub port: Bdf,
    cap: u16,
    /// The MSI data value the port was given.
    pub vector: u32,
    state: PciehpState,
    pending: u32,
    cmd_busy: bool,
    cmd_started: Duration,
    slot_ctrl: u16,
    button_at: Option<Duration>,
    steps: VecDeque<Step>,
    wake: Duration,
    /// Commands that timed out waiting for Command Completed.
    pub cmd_timeouts: u64,
    /// Interrupts handled.
    pub interrupts: u64,
}

impl Pciehp {
    /// Binds pciehp to the port at `port` whose PCIe capability is at `cap`:
    /// enables the port's MSI (as the port driver does), clears stale events,
    /// enables notifications and checks presence.
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
        let sltcap = env.cfg_read(port, cap + SLTCAP, 4);
        let mut p = Pciehp {
            port,
            cap,
            vector,
            state: PciehpState::Off,
            pending: 0,
            cmd_busy: false,
            cmd_started: Duration::ZERO,
            slot_ctrl: env.cfg_read(port, cap + SLTCTL, 2) as u16,
            button_at: None,
            steps: VecDeque::new(),
            wake: Duration::ZERO,
            cmd_timeouts: 0,
            interrupts: 0,
        };
        // pcie_init: an empty slot left powered is powered off, without
        // notifications.
        if sltcap & SLTCAP_PCP != 0 && !p.occupied(env) && p.powered(env) {
            p.write_cmd(env, SLTCTL_PCC, SLTCTL_PCC, true);
        }
        p.write_sta(
            env,
            SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC,
        );
        // pcie_enable_notification.
        let mut cmd = SLTCTL_DLLSCE | SLTCTL_HPIE;
        cmd |= if sltcap & SLTCAP_ABP != 0 {
            SLTCTL_ABPE
        } else {
            SLTCTL_PDCE
        };
        if sltcap & SLTCAP_NCCS == 0 {
            cmd |= SLTCTL_CCIE;
        }
        let mask = SLTCTL_PDCE
            | SLTCTL_ABPE
            | SLTCTL_PFDE
            | SLTCTL_MRLSCE
            | SLTCTL_CCIE
            | SLTCTL_HPIE
            | SLTCTL_DLLSCE;
        p.write_cmd(env, cmd, mask, true);
        // pciehp_probe: initial state, then pciehp_check_presence.
        let occupied = p.occupied(env);
        p.state = if occupied && p.powered(env) {
            PciehpState::On
        } else {
            PciehpState::Off
        };
        if occupied != (p.state == PciehpState::On) {
            p.pending |= SLTSTA_PDC as u32;
        }
        env.log(format!("pciehp {port}: probed, slot {:?}", p.state));
        p
    }

    /// The slot state.
    pub fn state(&self) -> PciehpState {
        self.state
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

    fn occupied(&self, env: &mut Env) -> bool {
        env.cfg_read(self.port, self.cap + SLTSTA, 2) as u16 & SLTSTA_PDS != 0
            || env.cfg_read(self.port, self.cap + LNKSTA, 2) as u16 & LNKSTA_DLLLA != 0
    }

    fn powered(&self, env: &mut Env) -> bool {
        env.cfg_read(self.port, self.cap + SLTCTL, 2) as u16 & SLTCTL_PCC == 0
    }

    fn write_sta(&self, env: &mut Env, bits: u16) {
        env.cfg_write(self.port, self.cap + SLTSTA, 2, bits as u32);
    }

    /// `pcie_wait_cmd`.
    fn wait_cmd(&mut self, env: &mut Env) {
        if !self.cmd_busy {
            return;
        }
        self.take_own_interrupts(env);
        if !self.cmd_busy {
            return;
        }
        let irq_mode = self.slot_ctrl & SLTCTL_HPIE != 0 && self.slot_ctrl & SLTCTL_CCIE != 0;
        if !irq_mode {
            // pcie_poll_cmd: read Slot Status, acknowledge Command Completed.
            if env.cfg_read(self.port, self.cap + SLTSTA, 2) as u16 & SLTSTA_CC != 0 {
                self.write_sta(env, SLTSTA_CC);
                self.cmd_busy = false;
                return;
            }
        }
        let deadline = self.cmd_started + env.timings.cmd_timeout;
        env.clock.advance_to(deadline);
        self.cmd_timeouts += 1;
        self.cmd_busy = false;
        env.log(format!("pciehp {}: Timeout on hotplug command", self.port));
    }

    /// `pcie_do_write_cmd`: wait for the previous command, read-modify-write
    /// Slot Control, and optionally wait for this one.
    fn write_cmd(&mut self, env: &mut Env, cmd: u16, mask: u16, wait: bool) {
        self.wait_cmd(env);
        let orig = env.cfg_read(self.port, self.cap + SLTCTL, 2) as u16;
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

    /// `pciehp_set_indicators` (no wait).
    fn set_indicators(&mut self, env: &mut Env, pic: Option<u16>, aic: Option<u16>) {
        let (mut cmd, mut mask) = (0, 0);
        if let Some(p) = pic {
            cmd |= p;
            mask |= SLTCTL_PIC;
        }
        if let Some(a) = aic {
            cmd |= a;
            mask |= SLTCTL_AIC;
        }
        if mask != 0 {
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
        let mut events = 0u16;
        for _ in 0..16 {
            let status = env.cfg_read(self.port, self.cap + SLTSTA, 2) as u16 & ISR_EVENTS;
            if status == 0 {
                break;
            }
            events |= status;
            self.write_sta(env, status);
        }
        if events & SLTSTA_CC != 0 {
            self.cmd_busy = false;
            events &= !SLTSTA_CC;
        }
        self.pending |= events as u32;
    }

    /// `pciehp_ist`, when the thread is free and has events.
    pub fn ist(&mut self, env: &mut Env) {
        if !self.steps.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.pending);
        if events & SLTSTA_ABP as u32 != 0 {
            env.log(format!("pciehp {}: Attention button pressed", self.port));
            self.button_press(env);
        }
        if events & DISABLE_SLOT != 0 {
            self.state = PciehpState::PowerOff;
            self.start_disable(env, false);
        } else if events & (SLTSTA_PDC | SLTSTA_DLLSC) as u32 != 0 {
            self.presence_or_link_change(env);
        }
    }

    fn button_press(&mut self, env: &mut Env) {
        match self.state {
            PciehpState::On | PciehpState::Off => {
                let (next, what) = if self.state == PciehpState::On {
                    (PciehpState::BlinkingOff, "power off")
                } else {
                    (PciehpState::BlinkingOn, "power on")
                };
                self.state = next;
                env.log(format!(
                    "pciehp {}: Button press: will {what} in 5 sec",
                    self.port
                ));
                self.set_indicators(env, Some(SLTCTL_PIC_BLINK), Some(SLTCTL_AIC_OFF));
                self.button_at = Some(env.clock.now() + env.timings.button_delay);
            }
            PciehpState::BlinkingOff | PciehpState::BlinkingOn => {
                self.button_at = None;
                if self.state == PciehpState::BlinkingOff {
                    self.state = PciehpState::On;
                    self.set_indicators(env, Some(SLTCTL_PIC_ON), Some(SLTCTL_AIC_OFF));
                } else {
                    self.state = PciehpState::Off;
                    self.set_indicators(env, Some(SLTCTL_PIC_OFF), Some(SLTCTL_AIC_OFF));
                }
                env.log(format!(
                    "pciehp {}: Action canceled due to button press",
                    self.port
                ));
            }
            s => env.log(format!(
                "pciehp {}: Ignoring invalid state {s:?}",
                self.port
            )),
        }
    }

    /// First half of `pciehp_handle_presence_or_link_change`; the second half
    /// (`Recheck`) runs after a disable finishes.
    fn presence_or_link_change(&mut self, env: &mut Env) {
        match self.state {
            PciehpState::BlinkingOff | PciehpState::On => {
                self.button_at = None;
                self.state = PciehpState::PowerOff;
                env.log(format!(
                    "pciehp {}: Card not present / Link Down",
                    self.port
                ));
                self.start_disable(env, true);
            }
            _ => self.recheck(env),
        }
    }

    fn recheck(&mut self, env: &mut Env) {
        if !self.occupied(env) {
            if self.state == PciehpState::BlinkingOn {
                self.state = PciehpState::Off;
                self.button_at = None;
                self.set_indicators(env, Some(SLTCTL_PIC_OFF), None);
            }
            return;
        }
        if matches!(self.state, PciehpState::BlinkingOn | PciehpState::Off) {
            self.button_at = None;
            self.state = PciehpState::PowerOn;
            env.log(format!("pciehp {}: Card present", self.port));
            self.start(
                env,
                &[
                    Step::PowerOn,
                    Step::Indicators(Some(SLTCTL_PIC_BLINK), None),
                    Step::WaitLink(env.clock.now() + env.timings.link_timeout),
                    Step::CheckDevice,
                    Step::Configure,
                    Step::Indicators(Some(SLTCTL_PIC_ON), Some(SLTCTL_AIC_OFF)),
                    Step::Finish(PciehpState::On),
                ],
            );
        }
    }

    fn start_disable(&mut self, env: &mut Env, recheck: bool) {
        let mut steps = vec![
            Step::Unconfigure,
            Step::PowerOff,
            Step::IgnorePowerOffEvents,
            Step::Indicators(Some(SLTCTL_PIC_OFF), None),
            Step::Finish(PciehpState::Off),
        ];
        if recheck {
            steps.push(Step::Recheck);
        }
        self.start(env, &steps);
    }

    fn start(&mut self, env: &mut Env, steps: &[Step]) {
        self.steps = steps.iter().copied().collect();
        self.wake = env.clock.now();
        self.run_steps(env);
    }

    fn fail_enable(&mut self, env: &mut Env) {
        env.log(format!("pciehp {}: enable failed; slot off", self.port));
        self.steps = [
            Step::PowerOff,
            Step::Indicators(Some(SLTCTL_PIC_OFF), Some(SLTCTL_AIC_ON)),
            Step::Finish(PciehpState::Off),
        ]
        .into_iter()
        .collect();
    }

    /// Runs due steps and the button work.
    pub fn run_due(&mut self, env: &mut Env) {
        if self.button_at.is_some_and(|t| t <= env.clock.now()) {
            self.button_at = None;
            // pciehp_queue_pushbutton_work: becomes an event for the thread.
            match self.state {
                PciehpState::BlinkingOff => self.pending |= DISABLE_SLOT,
                PciehpState::BlinkingOn => self.pending |= SLTSTA_PDC as u32,
                _ => {}
            }
        }
        self.run_steps(env);
    }

    fn run_steps(&mut self, env: &mut Env) {
        while let Some(&step) = self.steps.front() {
            if self.wake > env.clock.now() {
                return;
            }
            self.steps.pop_front();
            let delay = self.exec(env, step);
            self.wake = env.clock.now() + delay;
        }
    }

    fn exec(&mut self, env: &mut Env, step: Step) -> Duration {
        let t = env.timings;
        match step {
            Step::PowerOn => {
                if env.cfg_read(self.port, self.cap + SLTSTA, 2) as u16 & SLTSTA_PFD != 0 {
                    self.write_sta(env, SLTSTA_PFD);
                }
                self.write_cmd(env, 0, SLTCTL_PCC, true);
            }
            Step::Indicators(pic, aic) => self.set_indicators(env, pic, aic),
            Step::WaitLink(deadline) => {
                if env.cfg_read(self.port, self.cap + LNKSTA, 2) as u16 & LNKSTA_DLLLA != 0 {
                    return t.link_settle;
                }
                if env.clock.now() >= deadline {
                    self.fail_enable(env);
                    return Duration::ZERO;
                }
                self.steps.push_front(Step::WaitLink(deadline));
                return t.link_poll;
            }
            Step::CheckDevice => {
                let sec =
                    (env.cfg_read(self.port, vmm_pci::config::PRIMARY_BUS, 4) >> 8 & 0xff) as u8;
                if env.cfg_read(Bdf::new(sec, 0, 0), 0, 2) == 0xffff {
                    self.fail_enable(env);
                }
            }
            Step::Configure => {
                let added = env.configure_slot(self.port);
                env.log(format!("pciehp {}: configured {added:?}", self.port));
                return t.bind;
            }
            Step::Unconfigure => {
                env.unconfigure_slot(self.port);
                return t.unbind;
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
