//! What is wrong with a teaming configuration: every error with the field it
//! is about, and the warnings that do not stop it.

use std::fmt;

use crate::event::MacAddress;

use super::{Model, TeamingType};

/// Result of reading or validating a configuration.
pub type Result<T> = std::result::Result<T, ConfigErrors>;

/// What is wrong, in words that name the interface and say what to change.
///
/// Fields that name an interface (`interface`, `standby`, `first`, `other`)
/// hold it as messages name it: its alias in quotes (`'net1'`), or its
/// position when it has none (`[2] (no alias)`), or both when another
/// interface has the same alias (`'net1' (interface[1])`). Values from the file are
/// kept escaped (as [`str::escape_debug`]), so a message is always one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The text is not TOML or not JSON.
    #[error("{format} syntax error at line {line}, column {column}: {message}; fix the file there")]
    Syntax {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read the configuration file: {message}")]
    Io {
        /// The operating system's message.
        message: String,
    },
    /// The file name does not say the format.
    #[error("the file name must end in .toml or .json, which says its format")]
    UnknownFormat,
    /// A value of the wrong type.
    #[error("{}expected {expected}, found {found}", on(interface))]
    WrongType {
        /// The interface, if the value is inside one.
        interface: Option<String>,
        /// What belongs there.
        expected: &'static str,
        /// What is there.
        found: &'static str,
    },
    /// A field this schema does not have (a typo, most likely).
    #[error("{}unknown field '{name}'; the fields here are {known}", on(interface))]
    UnknownField {
        /// The interface, if the field is inside one.
        interface: Option<String>,
        /// The field as written.
        name: String,
        /// The fields that belong there.
        known: &'static str,
    },
    /// A field given twice (JSON allows it; the second would win silently).
    #[error("{}'{name}' is given twice; keep one", on(interface))]
    DuplicateField {
        /// The interface, if the field is inside one.
        interface: Option<String>,
        /// The field.
        name: String,
    },
    /// The interface list is given twice, as `interface` and `interfaces`.
    #[error(
        "the interface list is given twice ('interface' and 'interfaces' are the same list); give it once"
    )]
    InterfacesTwice,
    /// A required field is missing.
    #[error("interface {interface} has no {name}; add {hint}")]
    MissingField {
        /// The interface.
        interface: String,
        /// The field (`alias`, `model`, `teaming.type`).
        name: &'static str,
        /// What to add.
        hint: &'static str,
    },
    /// A model this schema does not know.
    #[error(
        "interface {interface} has model '{value}'; use \"virtio\" (a standby), \"hostdev\" (a passed-through host function) or \"stand-in\" (a virtio-net function without STANDBY as primary)"
    )]
    UnknownModel {
        /// The interface.
        interface: String,
        /// The model as written.
        value: String,
    },
    /// A teaming type this schema does not know.
    #[error(
        "interface {interface} has teaming type '{value}'; use \"persistent\" (the virtio standby), \"transient\" (its primary) or \"none\""
    )]
    UnknownTeamingType {
        /// The interface.
        interface: String,
        /// The type as written.
        value: String,
    },
    /// A MAC address that does not parse, or is multicast.
    #[error(
        "interface {interface} has mac '{value}', which {reason}; write six two-digit hex bytes separated by ':', e.g. 52:54:00:12:34:56"
    )]
    BadMac {
        /// The interface.
        interface: String,
        /// The MAC as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An empty alias.
    #[error("interface {interface} has an empty alias; give it its device id, e.g. \"net1\"")]
    EmptyAlias {
        /// The interface (by position).
        interface: String,
    },
    /// An alias that is not a device id.
    #[error(
        "interface {interface}: the alias is not a device id; start it with a letter and use only letters, digits, '-', '.' and '_' (e.g. \"ua-net1\")"
    )]
    BadAlias {
        /// The interface.
        interface: String,
    },
    /// Two interfaces with one alias.
    #[error(
        "interface {interface} has the alias of interface[{first}]; give each interface its own alias"
    )]
    DuplicateAlias {
        /// The interface.
        interface: String,
        /// The index of the first interface with that alias.
        first: usize,
    },
    /// A transient teaming that names no standby (libvirt: "teaming persistent
    /// attribute must be set if teaming type is 'transient'").
    #[error(
        "interface {interface} has teaming type 'transient' but no persistent attribute; set teaming.persistent to the alias of its virtio standby"
    )]
    TransientWithoutPersistent {
        /// The interface.
        interface: String,
    },
    /// A `persistent` attribute on a teaming that is not transient (libvirt:
    /// "teaming persistent attribute not allowed if teaming type is '%s'").
    #[error(
        "interface {interface} has teaming type '{teaming}' with persistent = '{persistent}'; only a transient primary names its standby: remove the persistent attribute, or make the teaming transient"
    )]
    PersistentNotAllowed {
        /// The interface.
        interface: String,
        /// Its teaming type.
        teaming: TeamingType,
        /// The attribute as written.
        persistent: String,
    },
    /// A persistent (standby) interface that is not virtio (libvirt's rule
    /// that it is `<model type='virtio'/>`).
    #[error(
        "interface {interface} has teaming type 'persistent' but model '{model}'; the persistent interface is the standby and must be model \"virtio\""
    )]
    PersistentNotVirtio {
        /// The interface.
        interface: String,
        /// Its model.
        model: Model,
    },
    /// A transient (primary) interface that is virtio (libvirt: "virtio-net
    /// teaming transient interface must be type='hostdev'").
    #[error(
        "interface {interface} has teaming type 'transient' but model 'virtio'; the transient interface is the primary: make it model \"hostdev\" (with a source) or \"stand-in\""
    )]
    TransientIsVirtio {
        /// The interface.
        interface: String,
    },
    /// A transient teaming naming an alias no interface has.
    #[error(
        "interface {interface} names persistent '{persistent}', but no interface has that alias; set teaming.persistent to the alias of a virtio interface with teaming type 'persistent'"
    )]
    UnknownPersistent {
        /// The interface.
        interface: String,
        /// The alias it names.
        persistent: String,
    },
    /// A transient teaming naming an interface that is not persistent.
    #[error(
        "interface {interface} names persistent '{persistent}', whose teaming is {}; give '{persistent}' teaming type 'persistent', or name its standby", teaming_of(.teaming)
    )]
    NotPersistent {
        /// The interface.
        interface: String,
        /// The alias it names.
        persistent: String,
        /// That interface's teaming type (`None`: it has no teaming).
        teaming: Option<TeamingType>,
    },
    /// A second primary for one standby (QEMU: "Cannot attach more than one
    /// primary device to '%s'").
    #[error(
        "interface {interface} is a second transient primary for {standby}, which already has {first}; a standby takes one primary: remove one, or pair it with another standby"
    )]
    SecondPrimary {
        /// The interface.
        interface: String,
        /// The standby both name.
        standby: String,
        /// The first primary naming it.
        first: String,
    },
    /// A hostdev without a source.
    #[error(
        "interface {interface} is model 'hostdev' without a source; set source to the host function's sysfs path (/sys/bus/pci/devices/0000:3b:02.1) or its address (0000:3b:02.1)"
    )]
    HostdevWithoutSource {
        /// The interface.
        interface: String,
    },
    /// A source that is neither a sysfs path nor a PCI address.
    #[error(
        "interface {interface} has source '{value}', which {reason}; write the host function's sysfs path (/sys/bus/pci/devices/0000:3b:02.1) or its address (0000:3b:02.1)"
    )]
    BadSource {
        /// The interface.
        interface: String,
        /// The source as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A source on an interface that is not a hostdev.
    #[error(
        "interface {interface} is model '{model}' and has a source; only a hostdev comes from a host function: remove the source, or make it model \"hostdev\""
    )]
    SourceNotHostdev {
        /// The interface.
        interface: String,
        /// Its model.
        model: Model,
    },
    /// An empty slot name.
    #[error(
        "interface {interface} has an empty slot; name the root port it goes into (e.g. \"rp1\"), or leave slot out"
    )]
    EmptySlot {
        /// The interface.
        interface: String,
    },
    /// Two interfaces in one slot.
    #[error(
        "interface {interface} goes into slot '{slot}', which interface {other} already takes; a slot holds one device (a primary must be alone in its slot): give it a slot of its own"
    )]
    SlotTaken {
        /// The interface.
        interface: String,
        /// The slot.
        slot: String,
        /// The interface that has it first.
        other: String,
    },
    /// A primary without a slot to hot-plug it into.
    #[error(
        "interface {interface} is a transient primary without a slot; set slot to the hot-plug root port it goes into, e.g. \"rp1\""
    )]
    TransientWithoutSlot {
        /// The interface.
        interface: String,
    },
}

fn on(interface: &Option<String>) -> String {
    match interface {
        Some(i) => format!("interface {i}: "),
        None => String::new(),
    }
}

fn teaming_of(t: &Option<TeamingType>) -> String {
    match t {
        Some(t) => format!("'{t}'"),
        None => "not set".to_string(),
    }
}

/// One error: the field it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field's path, with 0-based interface indexes:
    /// `interface[1].teaming.persistent`. Empty for the whole document
    /// (a syntax error); the file's path for an I/O error.
    pub field: String,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, kind: ConfigErrorKind) -> Self {
        ConfigError {
            field: field.into(),
            kind,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.field, self.kind)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every error found: those of reading first, then validation's, each in
/// file order. Never empty when returned as an error. Its `Display` is one
/// line per error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The errors.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors about `field` (its exact path).
    pub fn for_field<'a>(&'a self, field: &'a str) -> impl Iterator<Item = &'a ConfigError> + 'a {
        self.0.iter().filter(move |e| e.field == field)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, e) in self.0.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Something that does not stop the configuration but is most likely a
/// mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigWarningKind {
    /// A pair whose MACs differ: the guest's `net_failover` pairs the primary
    /// with the standby by MAC, so it will not bond them (QEMU and libvirt
    /// never check).
    MacMismatch {
        /// The standby's alias.
        standby: String,
        /// The standby's MAC.
        standby_mac: MacAddress,
        /// The primary's alias.
        primary: String,
        /// The primary's MAC.
        primary_mac: MacAddress,
    },
}

impl fmt::Display for ConfigWarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarningKind::MacMismatch {
                standby,
                standby_mac,
                primary,
                primary_mac,
            } => write!(
                f,
                "primary {primary} has MAC {primary_mac} but its standby {standby} has {standby_mac}; the guest pairs them by MAC and will not bond them: give both the same MAC"
            ),
        }
    }
}

/// A warning: the field it is about and what is odd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The field's path (as [`ConfigError::field`]).
    pub field: String,
    /// What is odd.
    pub kind: ConfigWarningKind,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.kind)
    }
}
