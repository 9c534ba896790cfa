//! The failover pair id: which standby a primary belongs to, validated as QEMU
//! validates a device that carries `failover_pair_id`.
//!
//! A primary is any Ethernet-class PCI function: a passed-through VF in
//! production, an emulated NIC (such as a virtio-net function that does not offer
//! STANDBY) in tests and demos. The check reads the function's own header through
//! [`PciFunction::read_config`] and looks at where the VMM places it
//! ([`Placement`]). QEMU's conditions, with its texts (see [`Violation`]):
//!
//! - the device has an id (`"Device with failover_pair_id needs to have id"`) and
//!   names a standby other than itself;
//! - its bus can hot-plug (`"Bus '...' does not support hotplugging"`): the
//!   primary arrives by hot-plug once the guest acknowledges STANDBY;
//! - the bus is PCI Express (`"failover primary device must be on PCIExpress
//!   bus"`);
//! - it is an Ethernet controller, class 0x0200 (`"failover primary device is not
//!   an Ethernet device"`);
//! - it is alone in its slot: function 0, header not multi-function
//!   (`"failover: primary device must be in its own PCI slot"`).
//!
//! QEMU stops at the first failure; [`FailoverPair::validate`] reports every one
//! at once, in the order QEMU checks them.

use std::fmt;

use vmm_pci::config::{
    CAP_ID_PCIE, CAPABILITIES_POINTER, CLASS_PROG_IF, HEADER_TYPE, STATUS, STATUS_CAP_LIST,
    VENDOR_ID,
};
use vmm_pci::pcie::{FLAGS, FLAGS_SLOT, PortType, SLTCAP, SLTCAP_HPC};
use vmm_pci::{ClassCode, PciFunction};

/// The class QEMU requires of a primary: base class 0x02 (network), subclass
/// 0x00 (Ethernet), any programming interface (`PCI_CLASS_NETWORK_ETHERNET`).
pub const CLASS_ETHERNET: u16 = 0x0200;

/// Header Type register: the multi-function bit.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Header Type register: the layout bits (0: endpoint, 1: PCI-to-PCI bridge).
pub const HEADER_TYPE_LAYOUT: u8 = 0x7f;

/// Capability ID of the Standard Hot-Plug Controller (a conventional PCI bridge
/// whose secondary bus can hot-plug).
pub const CAP_ID_SHPC: u8 = 0x0c;

/// The first offset a capability may sit at.
const CAP_START: u16 = 0x40;

/// Reads the aligned dword at `offset & !3` of `f`'s config space.
fn config_u32<F: PciFunction + ?Sized>(f: &mut F, offset: u16) -> u32 {
    let mut b = [0; 4];
    f.read_config(offset & !3, &mut b);
    u32::from_le_bytes(b)
}

fn config_u16<F: PciFunction + ?Sized>(f: &mut F, offset: u16) -> u16 {
    (config_u32(f, offset) >> ((offset & 2) * 8)) as u16
}

fn config_u8<F: PciFunction + ?Sized>(f: &mut F, offset: u16) -> u8 {
    (config_u32(f, offset) >> ((offset & 3) * 8)) as u8
}

/// The offset of `f`'s first capability with `id`, walking the list as a guest
/// does (at most 48 entries, so a looping list ends).
pub fn find_capability<F: PciFunction + ?Sized>(f: &mut F, id: u8) -> Option<u16> {
    if config_u16(f, STATUS) & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut ptr = u16::from(config_u8(f, CAPABILITIES_POINTER)) & !3;
    for _ in 0..48 {
        if ptr < CAP_START {
            return None;
        }
        let head = config_u16(f, ptr);
        if head as u8 == id {
            return Some(ptr);
        }
        ptr = (head >> 8) & !3;
    }
    None
}

/// What a function says about itself in its header: identity, class and layout,
/// as the failover checks (and a coordinator logging a primary) need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code (bytes 0x09..0x0b).
    pub class: ClassCode,
    /// Header layout, bits 6:0 of the Header Type register (0: endpoint, 1:
    /// PCI-to-PCI bridge).
    pub layout: u8,
    /// Header Type bit 7: the device has more than one function.
    pub multifunction: bool,
}

impl FunctionHeader {
    /// Reads the header of `f` through [`PciFunction::read_config`] (aligned
    /// dword reads of offsets 0x00, 0x08 and 0x0c).
    pub fn read<F: PciFunction + ?Sized>(f: &mut F) -> Self {
        let ids = config_u32(f, VENDOR_ID);
        let class = config_u32(f, CLASS_PROG_IF);
        let header = config_u8(f, HEADER_TYPE);
        FunctionHeader {
            vendor_id: ids as u16,
            device_id: (ids >> 16) as u16,
            class: ClassCode::new((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
            layout: header & HEADER_TYPE_LAYOUT,
            multifunction: header & HEADER_TYPE_MULTIFUNCTION != 0,
        }
    }

    /// Base class and subclass as one number (0x0200 for Ethernet), as QEMU
    /// reads `PCI_CLASS_DEVICE`.
    pub const fn class_id(&self) -> u16 {
        (self.class.class as u16) << 8 | self.class.subclass as u16
    }

    /// Whether the function is an Ethernet controller (class 0x0200, any
    /// programming interface).
    pub const fn is_ethernet(&self) -> bool {
        self.class_id() == CLASS_ETHERNET
    }
}

/// The kind of bus a function sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// The secondary bus of a PCI Express root port (QEMU's `pcie-root-port`,
    /// `pcie_hotplug::RootPort`).
    RootPort,
    /// The secondary bus of a PCI Express switch downstream port (QEMU's
    /// `xio3130-downstream`).
    DownstreamPort,
    /// Any other PCI Express bus: the root complex's own bus (QEMU's `pcie.0`),
    /// a switch's internal bus.
    Express,
    /// A conventional PCI bus: a PC's `pci.0`, a PCI-to-PCI bridge's secondary
    /// bus, the bus below a PCI Express-to-PCI bridge.
    Conventional,
}

impl BusKind {
    /// Whether the bus is PCI Express.
    pub const fn is_express(self) -> bool {
        !matches!(self, BusKind::Conventional)
    }
}

/// Where the VMM places a function: the bus (its name for error texts, its kind,
/// whether it can hot-plug) and the function number in the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The bus's name as the VMM calls it (QEMU: the port's id), used in texts.
    pub bus: String,
    /// What kind of bus it is.
    pub kind: BusKind,
    /// Whether a device can be hot-plugged onto the bus: for a PCI Express port,
    /// its slot's Hot-Plug Capable bit; for a conventional bus, whatever
    /// hot-plug the VMM provides there (SHPC, ACPI).
    pub hotplug: bool,
    /// The function number (0 to 7) in the slot.
    pub function: u8,
}

impl Placement {
    /// Function 0 on bus `bus` of kind `kind`, hot-plug as given.
    pub fn new(bus: impl Into<String>, kind: BusKind, hotplug: bool) -> Self {
        Placement {
            bus: bus.into(),
            kind,
            hotplug,
            function: 0,
        }
    }

    /// The same placement at function `function`.
    pub fn with_function(mut self, function: u8) -> Self {
        self.function = function;
        self
    }

    /// Function 0 in the slot of `port`, a bridge called `bus`, derived from the
    /// port's own config space (read through [`PciFunction::read_config`]):
    ///
    /// - with a PCI Express capability, the port type says the kind (root port,
    ///   downstream port; a PCI Express-to-PCI bridge's secondary bus is
    ///   conventional) and the slot can hot-plug when the port implements a
    ///   slot (Capabilities register Slot Implemented) whose Slot Capabilities
    ///   has Hot-Plug Capable;
    /// - without one, the secondary bus is conventional PCI and can hot-plug
    ///   when the bridge has a Standard Hot-Plug Controller capability.
    ///
    /// A VMM that hot-plugs through ACPI instead sets [`Placement::hotplug`]
    /// itself. `None` when `port` is not a bridge (its header layout is not 1).
    pub fn behind_port<F: PciFunction + ?Sized>(
        bus: impl Into<String>,
        port: &mut F,
    ) -> Option<Self> {
        if config_u8(port, HEADER_TYPE) & HEADER_TYPE_LAYOUT != 1 {
            return None;
        }
        let (kind, hotplug) = match find_capability(port, CAP_ID_PCIE) {
            Some(cap) => {
                let flags = config_u16(port, cap + FLAGS);
                let kind = match (flags >> 4) & 0xf {
                    t if t == PortType::RootPort as u16 => BusKind::RootPort,
                    t if t == PortType::DownstreamPort as u16 => BusKind::DownstreamPort,
                    // PCI Express-to-PCI(-X) bridge.
                    7 => BusKind::Conventional,
                    _ => BusKind::Express,
                };
                let slot = flags & FLAGS_SLOT != 0
                    && matches!(kind, BusKind::RootPort | BusKind::DownstreamPort);
                (
                    kind,
                    slot && config_u32(port, cap + SLTCAP) & SLTCAP_HPC != 0,
                )
            }
            None => (
                BusKind::Conventional,
                find_capability(port, CAP_ID_SHPC).is_some(),
            ),
        };
        Some(Placement::new(bus, kind, hotplug))
    }
}

/// One reason a function cannot be the failover primary it is configured as.
/// Each text carries QEMU's, naming the device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The primary has no id (QEMU: "Device with failover_pair_id needs to have
    /// id"): the coordinator and the migration events name it by its id.
    MissingId {
        /// The standby it names.
        standby: String,
    },
    /// `failover_pair_id` is empty: it names no standby.
    EmptyPairId {
        /// The primary's id.
        primary: String,
    },
    /// `failover_pair_id` names the primary itself.
    PairedWithItself {
        /// The primary's id.
        primary: String,
    },
    /// The bus cannot hot-plug (QEMU: "Bus '%s' does not support hotplugging").
    NoHotplug {
        /// The primary's id.
        primary: String,
        /// The bus's name.
        bus: String,
    },
    /// The bus is conventional PCI (QEMU: "failover primary device must be on
    /// PCIExpress bus").
    NotExpress {
        /// The primary's id.
        primary: String,
        /// The bus's name.
        bus: String,
    },
    /// The class is not 0x0200 (QEMU: "failover primary device is not an
    /// Ethernet device").
    NotEthernet {
        /// The primary's id.
        primary: String,
        /// Base class and subclass the function reports.
        class: u16,
    },
    /// Not function 0, or a multi-function header (QEMU: "failover: primary
    /// device must be in its own PCI slot").
    NotAloneInSlot {
        /// The primary's id.
        primary: String,
        /// The function number it is placed at.
        function: u8,
        /// Whether its header says multi-function.
        multifunction: bool,
    },
}

/// `device 'id'`, or `device without id`.
struct Who<'a>(&'a str);

impl fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            write!(f, "device without id")
        } else {
            write!(f, "device '{}'", self.0)
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::MissingId { standby } if standby.is_empty() => {
                write!(f, "Device with failover_pair_id needs to have id")
            }
            Violation::MissingId { standby } => write!(
                f,
                "Device with failover_pair_id needs to have id (failover_pair_id '{standby}')"
            ),
            Violation::EmptyPairId { primary } => write!(
                f,
                "{}: failover_pair_id is empty; it must name the standby virtio-net device's id",
                Who(primary)
            ),
            Violation::PairedWithItself { primary } => write!(
                f,
                "{}: failover_pair_id names the device itself; it must name the standby \
                 virtio-net device's id",
                Who(primary)
            ),
            Violation::NoHotplug { primary, bus } => write!(
                f,
                "{}: Bus '{bus}' does not support hotplugging (a failover primary is \
                 hot-plugged when the guest acknowledges STANDBY)",
                Who(primary)
            ),
            Violation::NotExpress { primary, bus } => write!(
                f,
                "{}: failover primary device must be on PCIExpress bus ('{bus}' is \
                 conventional PCI)",
                Who(primary)
            ),
            Violation::NotEthernet { primary, class } => write!(
                f,
                "{}: failover primary device is not an Ethernet device (class {class:#06x}, \
                 not {CLASS_ETHERNET:#06x})",
                Who(primary)
            ),
            Violation::NotAloneInSlot {
                primary,
                function,
                multifunction,
            } => {
                write!(
                    f,
                    "{}: failover: primary device must be in its own PCI slot (",
                    Who(primary)
                )?;
                match (*function != 0, *multifunction) {
                    (true, true) => write!(f, "function {function}, multi-function header)"),
                    (true, false) => write!(f, "function {function}, not 0)"),
                    _ => write!(f, "multi-function header)"),
                }
            }
        }
    }
}

impl std::error::Error for Violation {}

/// Every reason a primary was refused, in the order QEMU checks them: id, pair
/// id, hot-plug, PCI Express, Ethernet, own slot. Never empty when returned by
/// [`FailoverPair::validate`]. Its text is every violation's, joined by `"; "`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    /// The violations, in order.
    pub fn as_slice(&self) -> &[Violation] {
        &self.0
    }

    /// Iterates over the violations, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Violation> {
        self.0.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Violations {
    type Item = &'a Violation;
    type IntoIter = std::slice::Iter<'a, Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for Violations {
    type Item = Violation;
    type IntoIter = std::vec::IntoIter<Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// A validated failover pair: a primary that may be plugged for the standby its
/// `failover_pair_id` names. Only [`FailoverPair::validate`] and
/// [`FailoverPair::validate_header`] make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPair {
    primary_id: String,
    standby_id: String,
    placement: Placement,
    header: FunctionHeader,
}

impl FailoverPair {
    /// Validates `primary` (the device QEMU would write as
    /// `id=<primary_id>,failover_pair_id=<failover_pair_id>`) placed at
    /// `placement`: reads its header and checks everything QEMU checks, see
    /// [`FailoverPair::validate_header`].
    pub fn validate<F: PciFunction + ?Sized>(
        primary_id: &str,
        failover_pair_id: &str,
        primary: &mut F,
        placement: &Placement,
    ) -> Result<Self, Violations> {
        let header = FunctionHeader::read(primary);
        Self::validate_header(primary_id, failover_pair_id, &header, placement)
    }

    /// Validates a primary whose header was already read: an id, a pair id
    /// naming another device, a bus that can hot-plug and is PCI Express, class
    /// 0x0200, function 0 and no multi-function header. Every violation is
    /// reported, in that order.
    pub fn validate_header(
        primary_id: &str,
        failover_pair_id: &str,
        header: &FunctionHeader,
        placement: &Placement,
    ) -> Result<Self, Violations> {
        let primary = || primary_id.to_owned();
        let mut v = Vec::new();
        if primary_id.is_empty() {
            v.push(Violation::MissingId {
                standby: failover_pair_id.to_owned(),
            });
        }
        if failover_pair_id.is_empty() {
            v.push(Violation::EmptyPairId { primary: primary() });
        } else if failover_pair_id == primary_id {
            v.push(Violation::PairedWithItself { primary: primary() });
        }
        if !placement.hotplug {
            v.push(Violation::NoHotplug {
                primary: primary(),
                bus: placement.bus.clone(),
            });
        }
        if !placement.kind.is_express() {
            v.push(Violation::NotExpress {
                primary: primary(),
                bus: placement.bus.clone(),
            });
        }
        if !header.is_ethernet() {
            v.push(Violation::NotEthernet {
                primary: primary(),
                class: header.class_id(),
            });
        }
        if placement.function != 0 || header.multifunction {
            v.push(Violation::NotAloneInSlot {
                primary: primary(),
                function: placement.function,
                multifunction: header.multifunction,
            });
        }
        if !v.is_empty() {
            return Err(Violations(v));
        }
        Ok(FailoverPair {
            primary_id: primary_id.to_owned(),
            standby_id: failover_pair_id.to_owned(),
            placement: placement.clone(),
            header: *header,
        })
    }

    /// The primary's id.
    pub fn primary_id(&self) -> &str {
        &self.primary_id
    }

    /// The standby's id: the primary's `failover_pair_id`.
    pub fn standby_id(&self) -> &str {
        &self.standby_id
    }

    /// Where the primary goes.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The primary's header as validated.
    pub fn header(&self) -> &FunctionHeader {
        &self.header
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_pci::config::{ConfigSpace, HeaderType};
    use vmm_pci::pcie::{self, PcieCapConfig, SLTCAP_ABP, SLTCAP_PCP};
    use vmm_pci::testing::StubEndpoint;
    use vmm_pci::{PciHandle, PciIds};

    fn ids(class: ClassCode) -> PciIds {
        PciIds {
            vendor_id: 0x8086,
            device_id: 0x10ed,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 0,
            revision: 1,
            class,
        }
    }

    fn endpoint(class: ClassCode, multifunction: bool) -> StubEndpoint {
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(class), true);
        cs.set_multifunction(multifunction);
        StubEndpoint::new(cs)
    }

    fn slot() -> Placement {
        Placement::new("rp1", BusKind::RootPort, true)
    }

    fn validate(f: &mut StubEndpoint, placement: &Placement) -> Result<FailoverPair, Violations> {
        FailoverPair::validate("hostdev0", "net1", f, placement)
    }

    fn only(r: Result<FailoverPair, Violations>) -> Violation {
        let v = r.unwrap_err();
        assert_eq!(v.len(), 1, "{v}");
        v.0.into_iter().next().unwrap()
    }

    #[test]
    fn vf_on_a_hotplug_root_port_pairs() {
        let vf: PciHandle = StubEndpoint::vf();
        let pair =
            FailoverPair::validate("hostdev0", "net1", &mut *vf.lock().unwrap(), &slot()).unwrap();
        assert_eq!(pair.primary_id(), "hostdev0");
        assert_eq!(pair.standby_id(), "net1");
        assert_eq!(pair.placement(), &slot());
        let h = pair.header();
        assert_eq!((h.vendor_id, h.device_id), (0x8086, 0x10ed));
        assert_eq!(
            (h.class, h.layout, h.multifunction),
            (ClassCode::ETHERNET, 0, false)
        );
        // A switch downstream port with a hot-plug slot is as good, and any
        // Ethernet programming interface.
        let mut f = endpoint(ClassCode::new(0x02, 0x00, 0x01), false);
        let downstream = Placement::new("dsp0", BusKind::DownstreamPort, true);
        assert!(validate(&mut f, &downstream).is_ok());
    }

    #[test]
    fn missing_id() {
        let mut f = endpoint(ClassCode::ETHERNET, false);
        let v = only(FailoverPair::validate("", "net1", &mut f, &slot()));
        assert_eq!(
            v,
            Violation::MissingId {
                standby: "net1".into()
            }
        );
        assert_eq!(
            v.to_string(),
            "Device with failover_pair_id needs to have id (failover_pair_id 'net1')"
        );
    }

    #[test]
    fn empty_or_self_pair_id() {
        let mut f = endpoint(ClassCode::ETHERNET, false);
        let v = only(FailoverPair::validate("hostdev0", "", &mut f, &slot()));
        assert_eq!(
            v.to_string(),
            "device 'hostdev0': failover_pair_id is empty; it must name the standby \
             virtio-net device's id"
        );
        let v = only(FailoverPair::validate(
            "hostdev0",
            "hostdev0",
            &mut f,
            &slot(),
        ));
        assert!(matches!(v, Violation::PairedWithItself { .. }), "{v}");
        // Neither id nor pair id: both, and QEMU's text exactly.
        let v = FailoverPair::validate("", "", &mut f, &slot()).unwrap_err();
        assert_eq!(
            v.to_string(),
            "Device with failover_pair_id needs to have id; device without id: \
             failover_pair_id is empty; it must name the standby virtio-net device's id"
        );
    }

    #[test]
    fn bus_without_hotplug() {
        let mut f = endpoint(ClassCode::ETHERNET, false);
        let v = only(validate(
            &mut f,
            &Placement::new("pcie.0", BusKind::Express, false),
        ));
        assert_eq!(
            v,
            Violation::NoHotplug {
                primary: "hostdev0".into(),
                bus: "pcie.0".into()
            }
        );
        assert!(
            v.to_string()
                .starts_with("device 'hostdev0': Bus 'pcie.0' does not support hotplugging"),
            "{v}"
        );
    }

    #[test]
    fn conventional_bus() {
        let mut f = endpoint(ClassCode::ETHERNET, false);
        let v = only(validate(
            &mut f,
            &Placement::new("pci.1", BusKind::Conventional, true),
        ));
        assert_eq!(
            v.to_string(),
            "device 'hostdev0': failover primary device must be on PCIExpress bus \
             ('pci.1' is conventional PCI)"
        );
    }

    #[test]
    fn not_ethernet() {
        // Mass storage, NVMe (0x0108), and a network controller that is not
        // Ethernet (0x0280).
        for (class, id) in [
            (ClassCode::new(0x01, 0x08, 0x02), 0x0108),
            (ClassCode::new(0x02, 0x80, 0x00), 0x0280),
        ] {
            let mut f = endpoint(class, false);
            let v = only(validate(&mut f, &slot()));
            assert_eq!(
                v,
                Violation::NotEthernet {
                    primary: "hostdev0".into(),
                    class: id
                }
            );
            assert_eq!(
                v.to_string(),
                format!(
                    "device 'hostdev0': failover primary device is not an Ethernet device \
                     (class {id:#06x}, not 0x0200)"
                )
            );
        }
    }

    #[test]
    fn multifunction_header() {
        let mut f = endpoint(ClassCode::ETHERNET, true);
        assert!(FunctionHeader::read(&mut f).multifunction);
        let v = only(validate(&mut f, &slot()));
        assert_eq!(
            v.to_string(),
            "device 'hostdev0': failover: primary device must be in its own PCI slot \
             (multi-function header)"
        );
    }

    #[test]
    fn function_three() {
        let mut f = endpoint(ClassCode::ETHERNET, false);
        let v = only(validate(&mut f, &slot().with_function(3)));
        assert_eq!(
            v,
            Violation::NotAloneInSlot {
                primary: "hostdev0".into(),
                function: 3,
                multifunction: false
            }
        );
        assert_eq!(
            v.to_string(),
            "device 'hostdev0': failover: primary device must be in its own PCI slot \
             (function 3, not 0)"
        );
        // Both reasons: still one violation, naming both.
        let mut f = endpoint(ClassCode::ETHERNET, true);
        let v = only(validate(&mut f, &slot().with_function(3)));
        assert!(
            v.to_string()
                .ends_with("(function 3, multi-function header)"),
            "{v}"
        );
    }

    #[test]
    fn all_four_at_once_in_a_stable_order() {
        let mut f = endpoint(ClassCode::new(0x01, 0x08, 0x02), true);
        let placement = Placement::new("pci.1", BusKind::Conventional, false).with_function(3);
        let v = validate(&mut f, &placement).unwrap_err();
        let primary = || "hostdev0".to_string();
        let bus = || "pci.1".to_string();
        assert_eq!(
            v.as_slice(),
            [
                Violation::NoHotplug {
                    primary: primary(),
                    bus: bus()
                },
                Violation::NotExpress {
                    primary: primary(),
                    bus: bus()
                },
                Violation::NotEthernet {
                    primary: primary(),
                    class: 0x0108
                },
                Violation::NotAloneInSlot {
                    primary: primary(),
                    function: 3,
                    multifunction: true
                },
            ]
        );
        // The text lists every one, in that order.
        let text = v.to_string();
        let at = |s: &str| {
            text.find(s)
                .unwrap_or_else(|| panic!("{s:?} not in {text:?}"))
        };
        let order = [
            at("Bus 'pci.1' does not support hotplugging"),
            at("failover primary device must be on PCIExpress bus"),
            at("failover primary device is not an Ethernet device"),
            at("failover: primary device must be in its own PCI slot"),
        ];
        assert!(order.is_sorted(), "{text}");
        assert_eq!(text.matches("; ").count(), 3, "{text}");
        // Each time the same.
        assert_eq!(validate(&mut f, &placement).unwrap_err(), v);
        // And with the id missing too, all six.
        let v = FailoverPair::validate("", "", &mut f, &placement).unwrap_err();
        assert_eq!(v.len(), 6, "{v}");
        assert!(matches!(v.as_slice()[0], Violation::MissingId { .. }));
        assert!(matches!(v.as_slice()[1], Violation::EmptyPairId { .. }));
        assert!(
            v.to_string()
                .contains("device without id: failover primary device is not")
        );
    }

    /// A bridge with a PCI Express capability of `port_type` and Slot
    /// Capabilities `slot`.
    fn port(port_type: PortType, slot: Option<u32>) -> StubEndpoint {
        let mut cs = ConfigSpace::new(HeaderType::Bridge, &ids(ClassCode::PCI_BRIDGE), true);
        let cfg = PcieCapConfig {
            port_type,
            port_number: 1,
            slot,
            dll_link_active_reporting: true,
        };
        pcie::add_pcie_capability(&mut cs, &cfg).unwrap();
        StubEndpoint::new(cs)
    }

    #[test]
    fn placement_behind_a_port() {
        let hpc = SLTCAP_ABP | SLTCAP_PCP | SLTCAP_HPC;
        let cases = [
            (port(PortType::RootPort, Some(hpc)), BusKind::RootPort, true),
            (
                port(PortType::RootPort, Some(SLTCAP_ABP)),
                BusKind::RootPort,
                false,
            ),
            (port(PortType::RootPort, None), BusKind::RootPort, false),
            (
                port(PortType::DownstreamPort, Some(hpc)),
                BusKind::DownstreamPort,
                true,
            ),
            (
                port(PortType::UpstreamPort, Some(hpc)),
                BusKind::Express,
                false,
            ),
        ];
        for (mut p, kind, hotplug) in cases {
            let placement = Placement::behind_port("rp", &mut p).unwrap();
            assert_eq!(placement, Placement::new("rp", kind, hotplug));
        }
        // A conventional PCI-to-PCI bridge: hot-plug only with an SHPC.
        let bridge = || ConfigSpace::new(HeaderType::Bridge, &ids(ClassCode::PCI_BRIDGE), false);
        assert_eq!(
            Placement::behind_port("pci.1", &mut StubEndpoint::new(bridge())),
            Some(Placement::new("pci.1", BusKind::Conventional, false))
        );
        let mut cs = bridge();
        cs.add_capability(CAP_ID_SHPC, 8).unwrap();
        assert_eq!(
            Placement::behind_port("pci.1", &mut StubEndpoint::new(cs)),
            Some(Placement::new("pci.1", BusKind::Conventional, true))
        );
        // An endpoint is no port.
        assert_eq!(
            Placement::behind_port("x", &mut endpoint(ClassCode::ETHERNET, false)),
            None
        );
    }

    #[test]
    fn capability_list_that_loops_ends() {
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(ClassCode::ETHERNET), false);
        let cap = cs.add_capability(0x09, 8).unwrap();
        cs.set_u8(cap + 1, cap as u8);
        let mut f = StubEndpoint::new(cs);
        assert_eq!(find_capability(&mut f, 0x09), Some(cap));
        assert_eq!(find_capability(&mut f, CAP_ID_PCIE), None);
    }
}
