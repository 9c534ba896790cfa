//! The PCI Express capability (version 2): device, link, slot and root registers.
//!
//! Offsets are relative to the capability; bit names are the specification's
//! abbreviations. [`add_pcie_capability`] lays the capability out with the masks
//! the specification gives each bit; the slot's behaviour (what happens when the
//! guest writes Slot Control) belongs to the port that owns the slot.

use crate::config::{self, CAP_ID_PCIE, ConfigSpace};

/// Length of a version 2 PCI Express capability.
pub const PCIE_CAP_LEN: u16 = 0x3c;

/// PCI Express Capabilities register (16 bits).
pub const FLAGS: u16 = 0x02;
/// Device Capabilities.
pub const DEVCAP: u16 = 0x04;
/// Device Control.
pub const DEVCTL: u16 = 0x08;
/// Device Status.
pub const DEVSTA: u16 = 0x0a;
/// Link Capabilities.
pub const LNKCAP: u16 = 0x0c;
/// Link Control.
pub const LNKCTL: u16 = 0x10;
/// Link Status.
pub const LNKSTA: u16 = 0x12;
/// Slot Capabilities.
pub const SLTCAP: u16 = 0x14;
/// Slot Control.
pub const SLTCTL: u16 = 0x18;
/// Slot Status.
pub const SLTSTA: u16 = 0x1a;
/// Root Control.
pub const RTCTL: u16 = 0x1c;
/// Root Capabilities.
pub const RTCAP: u16 = 0x1e;
/// Root Status.
pub const RTSTA: u16 = 0x20;
/// Device Capabilities 2.
pub const DEVCAP2: u16 = 0x24;
/// Device Control 2.
pub const DEVCTL2: u16 = 0x28;
/// Link Capabilities 2.
pub const LNKCAP2: u16 = 0x2c;
/// Link Control 2.
pub const LNKCTL2: u16 = 0x30;
/// Link Status 2.
pub const LNKSTA2: u16 = 0x32;

/// Capabilities register: capability version 2.
pub const FLAGS_VERSION_2: u16 = 0x2;
/// Capabilities register: Slot Implemented.
pub const FLAGS_SLOT: u16 = 1 << 8;

/// Device Capabilities: Role-Based Error Reporting (required since 1.1).
pub const DEVCAP_RBER: u32 = 1 << 15;
/// Device Control default: relaxed ordering, no snoop, 512-byte max read request.
pub const DEVCTL_DEFAULT: u16 = 0x2810;
/// Device Status: the four error-detected bits (RW1C).
pub const DEVSTA_ERRORS: u16 = 0x000f;

/// Link Capabilities: max link speed 2.5 GT/s.
pub const LNKCAP_SLS_2_5GT: u32 = 0x1;
/// Link Capabilities: max link width x1.
pub const LNKCAP_MLW_X1: u32 = 1 << 4;
/// Link Capabilities: Data Link Layer Link Active Reporting Capable.
pub const LNKCAP_DLLLARC: u32 = 1 << 20;
/// Link Capabilities: Link Bandwidth Notification Capability.
pub const LNKCAP_LBNC: u32 = 1 << 21;
/// Link Status: current speed 2.5 GT/s, negotiated width x1.
pub const LNKSTA_2_5GT_X1: u16 = 0x0011;
/// Link Status: Data Link Layer Link Active.
pub const LNKSTA_DLLLA: u16 = 1 << 13;
/// Link Status: Link Bandwidth Management Status (RW1C).
pub const LNKSTA_LBMS: u16 = 1 << 14;
/// Link Status: Link Autonomous Bandwidth Status (RW1C).
pub const LNKSTA_LABS: u16 = 1 << 15;

/// Slot Capabilities: Attention Button Present.
pub const SLTCAP_ABP: u32 = 1 << 0;
/// Slot Capabilities: Power Controller Present.
pub const SLTCAP_PCP: u32 = 1 << 1;
/// Slot Capabilities: MRL Sensor Present.
pub const SLTCAP_MRLSP: u32 = 1 << 2;
/// Slot Capabilities: Attention Indicator Present.
pub const SLTCAP_AIP: u32 = 1 << 3;
/// Slot Capabilities: Power Indicator Present.
pub const SLTCAP_PIP: u32 = 1 << 4;
/// Slot Capabilities: Hot-Plug Surprise.
pub const SLTCAP_HPS: u32 = 1 << 5;
/// Slot Capabilities: Hot-Plug Capable.
pub const SLTCAP_HPC: u32 = 1 << 6;
/// Slot Capabilities: Electromechanical Interlock Present.
pub const SLTCAP_EIP: u32 = 1 << 17;
/// Slot Capabilities: No Command Completed Support.
pub const SLTCAP_NCCS: u32 = 1 << 18;
/// Slot Capabilities: Physical Slot Number shift (bits 31:19).
pub const SLTCAP_PSN_SHIFT: u32 = 19;

/// Slot Control: Attention Button Pressed Enable.
pub const SLTCTL_ABPE: u16 = 1 << 0;
/// Slot Control: Power Fault Detected Enable.
pub const SLTCTL_PFDE: u16 = 1 << 1;
/// Slot Control: MRL Sensor Changed Enable.
pub const SLTCTL_MRLSCE: u16 = 1 << 2;
/// Slot Control: Presence Detect Changed Enable.
pub const SLTCTL_PDCE: u16 = 1 << 3;
/// Slot Control: Command Completed Interrupt Enable.
pub const SLTCTL_CCIE: u16 = 1 << 4;
/// Slot Control: Hot-Plug Interrupt Enable.
pub const SLTCTL_HPIE: u16 = 1 << 5;
/// Slot Control: Attention Indicator Control (bits 7:6).
pub const SLTCTL_AIC: u16 = 3 << 6;
/// Attention indicator on.
pub const SLTCTL_AIC_ON: u16 = 1 << 6;
/// Attention indicator blinking.
pub const SLTCTL_AIC_BLINK: u16 = 2 << 6;
/// Attention indicator off.
pub const SLTCTL_AIC_OFF: u16 = 3 << 6;
/// Slot Control: Power Indicator Control (bits 9:8).
pub const SLTCTL_PIC: u16 = 3 << 8;
/// Power indicator on.
pub const SLTCTL_PIC_ON: u16 = 1 << 8;
/// Power indicator blinking.
pub const SLTCTL_PIC_BLINK: u16 = 2 << 8;
/// Power indicator off.
pub const SLTCTL_PIC_OFF: u16 = 3 << 8;
/// Slot Control: Power Controller Control (1 = power off).
pub const SLTCTL_PCC: u16 = 1 << 10;
/// Slot Control: Electromechanical Interlock Control (write 1 to toggle; reads 0).
pub const SLTCTL_EIC: u16 = 1 << 11;
/// Slot Control: Data Link Layer State Changed Enable.
pub const SLTCTL_DLLSCE: u16 = 1 << 12;

/// Slot Status: Attention Button Pressed (RW1C).
pub const SLTSTA_ABP: u16 = 1 << 0;
/// Slot Status: Power Fault Detected (RW1C).
pub const SLTSTA_PFD: u16 = 1 << 1;
/// Slot Status: MRL Sensor Changed (RW1C).
pub const SLTSTA_MRLSC: u16 = 1 << 2;
/// Slot Status: Presence Detect Changed (RW1C).
pub const SLTSTA_PDC: u16 = 1 << 3;
/// Slot Status: Command Completed (RW1C).
pub const SLTSTA_CC: u16 = 1 << 4;
/// Slot Status: MRL Sensor State (RO).
pub const SLTSTA_MRLSS: u16 = 1 << 5;
/// Slot Status: Presence Detect State (RO).
pub const SLTSTA_PDS: u16 = 1 << 6;
/// Slot Status: Electromechanical Interlock Status (RO; 1 = engaged).
pub const SLTSTA_EIS: u16 = 1 << 7;
/// Slot Status: Data Link Layer State Changed (RW1C).
pub const SLTSTA_DLLSC: u16 = 1 << 8;
/// Slot Status: every event bit (RW1C).
pub const SLTSTA_EVENTS: u16 =
    SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC;

/// Root Control: the system-error and PME interrupt enables.
pub const RTCTL_ENABLES: u16 = 0x000f;
/// Root Status: PME Status (RW1C).
pub const RTSTA_PME_STATUS: u32 = 1 << 16;
/// Link Capabilities 2: supported link speeds vector, 2.5 GT/s.
pub const LNKCAP2_SLS_2_5GT: u32 = 1 << 1;

/// Device/port type, bits 7:4 of the Capabilities register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortType {
    /// PCI Express endpoint.
    Endpoint = 0,
    /// Legacy PCI Express endpoint.
    LegacyEndpoint = 1,
    /// Root port of a root complex.
    RootPort = 4,
    /// Upstream port of a switch.
    UpstreamPort = 5,
    /// Downstream port of a switch.
    DownstreamPort = 6,
    /// Root-complex integrated endpoint.
    RootComplexIntegratedEndpoint = 9,
}

impl PortType {
    /// Whether this type has a link below it (and so may implement a slot).
    pub const fn is_downstream(self) -> bool {
        matches!(self, PortType::RootPort | PortType::DownstreamPort)
    }
}

/// What [`add_pcie_capability`] lays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieCapConfig {
    /// Device/port type.
    pub port_type: PortType,
    /// Port number reported in Link Capabilities.
    pub port_number: u8,
    /// Slot Capabilities, for a downstream port that implements a slot.
    pub slot: Option<u32>,
    /// Whether the port reports Data Link Layer Link Active (Link Capabilities
    /// DLLLARC); hot-plug ports must.
    pub dll_link_active_reporting: bool,
}

impl PcieCapConfig {
    /// An endpoint's capability.
    pub const fn endpoint() -> Self {
        PcieCapConfig {
            port_type: PortType::Endpoint,
            port_number: 0,
            slot: None,
            dll_link_active_reporting: false,
        }
    }
}

/// The Slot Control bits a guest may write given Slot Capabilities `sltcap`: the
/// event enables and controls for what the slot has. Command Completed and
/// Hot-Plug Interrupt enables are always writable on a hot-plug slot.
pub const fn slot_control_wmask(sltcap: u32, dlllarc: bool) -> u16 {
    let mut m = SLTCTL_CCIE | SLTCTL_HPIE | SLTCTL_PDCE;
    if sltcap & SLTCAP_ABP != 0 {
        m |= SLTCTL_ABPE;
    }
    if sltcap & SLTCAP_PCP != 0 {
        m |= SLTCTL_PFDE | SLTCTL_PCC;
    }
    if sltcap & SLTCAP_MRLSP != 0 {
        m |= SLTCTL_MRLSCE;
    }
    if sltcap & SLTCAP_AIP != 0 {
        m |= SLTCTL_AIC;
    }
    if sltcap & SLTCAP_PIP != 0 {
        m |= SLTCTL_PIC;
    }
    if sltcap & SLTCAP_EIP != 0 {
        m |= SLTCTL_EIC;
    }
    if dlllarc {
        m |= SLTCTL_DLLSCE;
    }
    m
}

/// Appends a version 2 PCI Express capability to `config` and returns its offset.
///
/// Device Control, Link Control, Root Control and (with a slot) Slot Control get
/// their writable bits; Device Status errors, Link Status bandwidth bits, Slot
/// Status events and Root Status PME are write-1-to-clear; everything else is
/// read-only. Link Status reads 2.5 GT/s x1 with Link Active clear. Link Active
/// (with `dll_link_active_reporting`) and the slot's Presence Detect, MRL Sensor
/// and Interlock state are dynamic: the port changes them, a saved state carries
/// them.
pub fn add_pcie_capability(config: &mut ConfigSpace, cfg: &PcieCapConfig) -> config::Result<u16> {
    let cap = config.add_capability(CAP_ID_PCIE, PCIE_CAP_LEN)?;
    let has_slot = cfg.slot.is_some() && cfg.port_type.is_downstream();
    let flags =
        FLAGS_VERSION_2 | (cfg.port_type as u16) << 4 | if has_slot { FLAGS_SLOT } else { 0 };
    config.set_u16(cap + FLAGS, flags);

    config.set_u32(cap + DEVCAP, DEVCAP_RBER);
    config.set_u16(cap + DEVCTL, DEVCTL_DEFAULT);
    // Error reporting enables, relaxed ordering, max payload, extended tags, no
    // snoop, max read request.
    config.set_wmask_u16(cap + DEVCTL, 0x7fff);
    config.set_w1c_u16(cap + DEVSTA, DEVSTA_ERRORS);

    let mut lnkcap = LNKCAP_SLS_2_5GT | LNKCAP_MLW_X1 | (cfg.port_number as u32) << 24;
    if cfg.dll_link_active_reporting {
        lnkcap |= LNKCAP_DLLLARC;
    }
    if cfg.port_type.is_downstream() {
        lnkcap |= LNKCAP_LBNC;
    }
    config.set_u32(cap + LNKCAP, lnkcap);
    // ASPM, RCB, link disable, common clock, extended synch, clock PM, HW autonomous
    // width disable, bandwidth interrupt enables. Retrain Link always reads 0.
    config.set_wmask_u16(cap + LNKCTL, 0x0fdb);
    config.set_u16(cap + LNKSTA, LNKSTA_2_5GT_X1);
    config.set_w1c_u16(cap + LNKSTA, LNKSTA_LBMS | LNKSTA_LABS);
    if cfg.dll_link_active_reporting {
        config.set_dynamic_u16(cap + LNKSTA, LNKSTA_DLLLA);
    }
    config.set_u32(cap + LNKCAP2, LNKCAP2_SLS_2_5GT);
    config.set_u16(cap + LNKCTL2, 0x1);
    config.set_wmask_u16(cap + LNKCTL2, 0x000f);

    if let Some(sltcap) = cfg.slot.filter(|_| has_slot) {
        config.set_u32(cap + SLTCAP, sltcap & !SLTCAP_NCCS);
        config.set_wmask_u16(
            cap + SLTCTL,
            slot_control_wmask(sltcap, cfg.dll_link_active_reporting),
        );
        config.set_w1c_u16(cap + SLTSTA, SLTSTA_EVENTS);
        // Presence, MRL and interlock state follow the slot, not the configuration.
        config.set_dynamic_u16(cap + SLTSTA, SLTSTA_PDS | SLTSTA_MRLSS | SLTSTA_EIS);
    }
    if cfg.port_type == PortType::RootPort {
        config.set_wmask_u16(cap + RTCTL, RTCTL_ENABLES);
        config.set_w1c_u16(cap + RTSTA + 2, (RTSTA_PME_STATUS >> 16) as u16);
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClassCode, HeaderType, PciIds};

    fn bridge() -> ConfigSpace {
        let ids = PciIds {
            vendor_id: 0x1b36,
            device_id: 0x000c,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class: ClassCode::PCI_BRIDGE,
        };
        ConfigSpace::new(HeaderType::Bridge, &ids, true)
    }

    #[test]
    fn root_port_with_slot() {
        let mut cs = bridge();
        let sltcap = SLTCAP_ABP
            | SLTCAP_PCP
            | SLTCAP_AIP
            | SLTCAP_PIP
            | SLTCAP_HPC
            | SLTCAP_EIP
            | SLTCAP_NCCS
            | 7 << SLTCAP_PSN_SHIFT;
        let cap = add_pcie_capability(
            &mut cs,
            &PcieCapConfig {
                port_type: PortType::RootPort,
                port_number: 3,
                slot: Some(sltcap),
                dll_link_active_reporting: true,
            },
        )
        .unwrap();
        assert_eq!(cap, 0x40);
        assert_eq!(cs.get_u16(cap + FLAGS), 0x0142);
        // NCCS is never advertised: Linux waits for Command Completed.
        assert_eq!(cs.get_u32(cap + SLTCAP), sltcap & !SLTCAP_NCCS);
        assert_eq!(cs.get_u32(cap + LNKCAP), 0x0330_0011);
        assert_eq!(
            cs.wmask_u16(cap + SLTCTL),
            SLTCTL_ABPE
                | SLTCTL_PFDE
                | SLTCTL_PDCE
                | SLTCTL_CCIE
                | SLTCTL_HPIE
                | SLTCTL_AIC
                | SLTCTL_PIC
                | SLTCTL_PCC
                | SLTCTL_EIC
                | SLTCTL_DLLSCE
        );
        // Guest writes: control bits stick, status events clear by 1, state is RO.
        cs.write(cap + SLTCTL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + SLTCTL), 0x1ffb);
        cs.set_u16(cap + SLTSTA, SLTSTA_EVENTS | SLTSTA_PDS | SLTSTA_EIS);
        cs.write(cap + SLTSTA, &SLTSTA_PDC.to_le_bytes());
        assert_eq!(
            cs.get_u16(cap + SLTSTA),
            (SLTSTA_EVENTS & !SLTSTA_PDC) | SLTSTA_PDS | SLTSTA_EIS
        );
        cs.write(cap + SLTSTA, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + SLTSTA), SLTSTA_PDS | SLTSTA_EIS);
        cs.set_bits_u16(cap + LNKSTA, LNKSTA_DLLLA);
        cs.write(cap + LNKSTA, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + LNKSTA), LNKSTA_DLLLA | LNKSTA_2_5GT_X1);
    }

    #[test]
    fn device_link_and_root_register_masks() {
        let mut cs = bridge();
        let mut cfg = PcieCapConfig::endpoint();
        cfg.port_type = PortType::RootPort;
        let cap = add_pcie_capability(&mut cs, &cfg).unwrap();
        assert_eq!(cs.get_u32(cap + DEVCAP) & DEVCAP_RBER, DEVCAP_RBER);
        assert_eq!(cs.get_u16(cap + DEVCTL), DEVCTL_DEFAULT);
        cs.write(cap + DEVCTL, &0xffffu16.to_le_bytes());
        assert_eq!(
            cs.get_u16(cap + DEVCTL),
            0x7fff,
            "bit 15 is read-only on a port"
        );
        cs.set_u16(cap + DEVSTA, 0x003f);
        cs.write(cap + DEVSTA, &0xffffu16.to_le_bytes());
        assert_eq!(
            cs.get_u16(cap + DEVSTA),
            0x0030,
            "only the four error bits clear"
        );
        cs.write(cap + LNKCTL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + LNKCTL), 0x0fdb, "Retrain Link reads 0");
        cs.set_bits_u16(cap + LNKSTA, LNKSTA_LBMS | LNKSTA_LABS);
        cs.write(cap + LNKSTA, &LNKSTA_LBMS.to_le_bytes());
        assert_eq!(cs.get_u16(cap + LNKSTA), LNKSTA_LABS | LNKSTA_2_5GT_X1);
        assert_eq!(
            cs.get_u32(cap + LNKCAP) & (LNKCAP_DLLLARC | LNKCAP_LBNC),
            LNKCAP_LBNC
        );
        cs.write(cap + RTCTL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + RTCTL), RTCTL_ENABLES);
        cs.set_u32(cap + RTSTA, RTSTA_PME_STATUS | 0x1234);
        cs.write(cap + RTSTA, &u32::MAX.to_le_bytes());
        assert_eq!(
            cs.get_u32(cap + RTSTA),
            0x1234,
            "PME Status clears, the requester ID stays"
        );
        cs.write(cap + LNKCTL2, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + LNKCTL2), 0x000f);
        assert_eq!(cs.get_u32(cap + LNKCAP2), LNKCAP2_SLS_2_5GT);
        // No slot: Slot Control stays read-only.
        cs.write(cap + SLTCTL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + SLTCTL), 0);
    }

    #[test]
    fn endpoint_has_no_slot() {
        let mut cs = bridge();
        let mut cfg = PcieCapConfig::endpoint();
        cfg.slot = Some(SLTCAP_HPC);
        let cap = add_pcie_capability(&mut cs, &cfg).unwrap();
        assert_eq!(cs.get_u16(cap + FLAGS), 0x0002);
        assert_eq!(cs.get_u32(cap + SLTCAP), 0);
        cs.write(cap + SLTCTL, &0xffffu16.to_le_bytes());
        assert_eq!(cs.get_u16(cap + SLTCTL), 0);
    }
}
