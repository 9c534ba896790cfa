//! The root port: a type 1 bridge with a PCI Express capability and one hot-plug
//! slot.

use std::sync::Arc;

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
}

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
            counters: PortCounters::default(),
            cfg: self,
        };
        port.init_config();
        port
    }
}

struct Pending {
    op: Operation,
    completion: Completion,
    /// Unplug: the guest started blinking the power indicator (its 5 s window).
    saw_blink: bool,
    /// Unplug: cancel was asked before the guest blinked; press when it does.
    cancel_on_blink: bool,
}

/// A PCI Express root port with one hot-plug slot. See the crate documentation.
///
/// Put it on the bus as a [`PciHandle`] (an `Arc<Mutex<RootPort>>` coerces to
/// one) and keep a typed clone for the [`HotplugSlot`] calls.
///
/// It implements [`device_state::Persist`] with [`RootPortState`]; the device
/// in the slot is saved separately (see there).
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
    counters: PortCounters,
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
    /// device is reachable, which it now is.
    pub fn reset(&mut self) {
        if let Some(p) = self.pending.take() {
            match p.op {
                Operation::Unplug => {
                    self.device = None;
                    p.completion.complete(HotplugOutcome::Unplugged);
                }
                Operation::Plug => p.completion.complete(HotplugOutcome::Plugged),
            }
        }
        self.init_config();
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
        self.update_interrupt();
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
        if was_on && !on && self.device.is_some() {
            // Power off: the device leaves now, not when the indicator goes off.
            self.detach();
            let outcome = match self.pending.as_ref().map(|p| p.op) {
                Some(Operation::Plug) => HotplugOutcome::Aborted,
                _ => HotplugOutcome::Unplugged,
            };
            if self.pending.is_some() {
                self.finish(outcome);
            } else {
                log::info!(
                    "{}: guest powered the slot off; device removed",
                    self.cfg.name
                );
            }
        }
        let (old_pic, pic) = (old_ctl & SLTCTL_PIC, ctl & SLTCTL_PIC);
        let present = self.device.is_some();
        let mut press = false;
        let mut outcome = None;
        if let Some(p) = self.pending.as_mut() {
            match p.op {
                Operation::Unplug => {
                    if pic == SLTCTL_PIC_BLINK && old_pic != SLTCTL_PIC_BLINK {
                        p.saw_blink = true;
                        if std::mem::take(&mut p.cancel_on_blink) {
                            press = true;
                        }
                    } else if p.saw_blink
                        && old_pic == SLTCTL_PIC_BLINK
                        && pic == SLTCTL_PIC_ON
                        && on
                        && present
                    {
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
            self.counters.button_presses += 1;
            self.cs.set_bits_u16(self.cap + SLTSTA, SLTSTA_ABP);
        }
        self.update_interrupt();
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
        self.device = Some(device);
        self.cs
            .set_bits_u16(self.cap + SLTSTA, SLTSTA_PDS | SLTSTA_PDC | SLTSTA_ABP);
        self.counters.button_presses += 1;
        self.set_link(true);
        let completion = Completion::new();
        self.pending = Some(Pending {
            op: Operation::Plug,
            completion: completion.clone(),
            saw_blink: false,
            cancel_on_blink: false,
        });
        if self.powered() && self.ctl() & SLTCTL_PIC == SLTCTL_PIC_ON {
            // The guest left the empty slot powered with its indicator on: the
            // device is reachable already.
            self.finish(HotplugOutcome::Plugged);
        }
        self.update_interrupt();
        Ok(completion)
    }

    fn request_unplug(&mut self) -> Result<Completion> {
        if !self.hotplug_capable() {
            return Err(Error::UnplugUnsupported(self.cfg.name.clone()));
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
        self.pending = Some(Pending {
            op: Operation::Unplug,
            completion: completion.clone(),
            saw_blink: false,
            cancel_on_blink: false,
        });
        self.press_button();
        Ok(completion)
    }

    fn cancel_unplug(&mut self) -> Result<()> {
        let sta = self.sta();
        let Some(p) = self.pending.as_mut().filter(|p| p.op == Operation::Unplug) else {
            return Err(Error::NoUnplugPending(self.cfg.name.clone()));
        };
        if p.saw_blink {
            // Inside the guest's window this aborts the unplug; after it, the
            // guest ignores the press and the unplug completes.
            self.press_button();
        } else if sta & SLTSTA_ABP != 0 {
            // The guest has not read the press yet: take it back.
            self.cs.clear_bits_u16(self.cap + SLTSTA, SLTSTA_ABP);
            self.finish(HotplugOutcome::Cancelled);
            self.update_interrupt();
        } else {
            // The guest took the press but has not started its window: a press
            // now would merge with the first. Press when it starts blinking.
            p.cancel_on_blink = true;
        }
        Ok(())
    }

    fn surprise_remove(&mut self) -> Result<PciHandle> {
        if self.cs.get_u32(self.cap + SLTCAP) & SLTCAP_HPS == 0 {
            return Err(Error::NoSurprise(self.cfg.name.clone()));
        }
        let Some(dev) = self.detach() else {
            return Err(Error::Empty(self.cfg.name.clone()));
        };
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
        SlotState {
            present: self.sta() & SLTSTA_PDS != 0,
            powered: self.powered(),
            link_active: self.cs.get_u16(self.cap + LNKSTA) & LNKSTA_DLLLA != 0,
            locked: self.sta() & SLTSTA_EIS != 0,
            pending: self.pending.as_ref().map(|p| p.op),
        }
    }
}

impl PciFunction for RootPort {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.cs.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
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
