//! The teaming configuration: which interfaces a VM has and how they pair for
//! failover, declared in TOML or JSON (one schema) in libvirt's vocabulary,
//! and checked with every error reported at once.
//!
//! - An interface with `teaming = { type = "persistent" }` is the virtio
//!   standby (libvirt's `<teaming type='persistent'/>`). Its alias is its
//!   device id, what the primary's `failover_pair_id` names.
//! - An interface with `teaming = { type = "transient", persistent = "net1" }`
//!   is the primary paired with standby `net1`: a `hostdev` (a host PCI
//!   function passed through, by `source`: its sysfs path or its address) or
//!   a `stand-in` (a virtio-net function without STANDBY, for hosts without a
//!   VF). Its `slot` names the hot-plug root port it goes into.
//! - `mac` is optional; the guest pairs by MAC, so a pair whose MACs differ
//!   is a warning ([`TeamingConfig::warnings`]).
//!
//! [`TeamingConfig::validate`] applies libvirt's teaming rules (in our words,
//! each naming the interface and saying what to change) and more, and returns
//! the [`Pair`]s, which give the coordinator's [`Standby`](crate::Standby) and
//! what a [`Primary`](crate::Primary) needs. Every error carries its field's
//! path, `interface[1].teaming.persistent` (indexes from 0, in file order).
//! Reading reports all the values it cannot read (a bad MAC, a number where a
//! string belongs, an unknown field) and, with them, what validation finds in
//! the rest, so one run shows everything to fix. No input makes it panic.
//!
//! ```
//! use failover::config::{Model, TeamingConfig};
//!
//! let config = TeamingConfig::from_toml_str(
//!     r#"
//!     [[interface]]
//!     alias = "net1"
//!     model = "virtio"
//!     mac = "52:54:00:12:34:56"
//!     slot = "rp0"
//!     teaming = { type = "persistent" }
//!
//!     [[interface]]
//!     alias = "hostdev0"
//!     model = "hostdev"
//!     mac = "52:54:00:12:34:56"
//!     source = "/sys/bus/pci/devices/0000:3b:02.1"
//!     slot = "rp1"
//!     teaming = { type = "transient", persistent = "net1" }
//!     "#,
//! )?;
//! let pairs = config.validate()?;
//! assert!(config.warnings().is_empty());
//! let pair = &pairs[0];
//! // Register the standby as is; build the primary from the VFIO function
//! // at `pair.sysfs_path()` and the port named `pair.slot()`:
//! // `coordinator.add_primary(pair.primary(vf, Slot::port("rp1", &rp1)).unwrap())`.
//! let standby: failover::Standby = pair.standby();
//! assert_eq!(standby.id(), "net1");
//! assert_eq!(pair.primary_id(), Some("hostdev0"));
//! assert_eq!(pair.pair_id(), "net1");
//! assert_eq!(pair.primary_model(), Some(Model::Hostdev));
//! assert_eq!(pair.slot(), Some("rp1"));
//! assert_eq!(pair.host_function().unwrap().to_string(), "0000:3b:02.1");
//!
//! // All mistakes at once, each with its field:
//! let errors = TeamingConfig::from_json_str(
//!     r#"{"interfaces": [
//!         {"alias": "net1", "model": "hostdev", "teaming": {"type": "persistent"}},
//!         {"alias": "vf0", "model": "virtio", "mac": "52:54:00:12:34",
//!          "teaming": {"type": "transient"}}
//!     ]}"#,
//! )
//! .unwrap_err();
//! let fields: Vec<&str> = errors.errors().iter().map(|e| e.field.as_str()).collect();
//! assert_eq!(
//!     fields,
//!     [
//!         "interface[1].mac",
//!         "interface[0].model",
//!         "interface[0].source",
//!         "interface[1].model",
//!         "interface[1].teaming.persistent",
//!         "interface[1].slot",
//!     ]
//! );
//! println!("{errors}"); // one line per error
//! # Ok::<(), failover::config::ConfigErrors>(())
//! ```

mod check;
mod error;
mod raw;
mod syntax;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::event::MacAddress;

pub use check::Pair;
pub use error::{
    ConfigError, ConfigErrorKind, ConfigErrors, ConfigWarning, ConfigWarningKind, Result,
};
pub use syntax::HostFunction;

/// A VM's network interfaces and how they team: `[[interface]]` tables in
/// TOML, an `"interfaces"` array in JSON (either key is accepted in both).
///
/// `Serialize` writes the JSON form; [`to_toml_string`](Self::to_toml_string)
/// writes `[[interface]]` tables. `Deserialize` reads either form, so the
/// configuration can sit inside a VMM's own file; its error is every
/// [`ConfigError`], one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TeamingConfig {
    /// The interfaces, in file order.
    pub interfaces: Vec<Interface>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Its device id (libvirt's alias: `ua-net1`, or `net1`).
    pub alias: String,
    /// What it is.
    pub model: Model,
    /// Its MAC address (`52:54:00:12:34:56`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    /// A hostdev's host function: its sysfs directory
    /// (`/sys/bus/pci/devices/0000:3b:02.1`) or its address (`0000:3b:02.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The name of the root port or slot it goes into (`rp1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Its part in a failover pair, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teaming: Option<Teaming>,
}

impl Interface {
    /// An interface with no MAC, source, slot or teaming.
    pub fn new(alias: impl Into<String>, model: Model) -> Self {
        Interface {
            alias: alias.into(),
            model,
            mac: None,
            source: None,
            slot: None,
            teaming: None,
        }
    }

    /// With a MAC.
    pub fn mac(mut self, mac: impl Into<MacAddress>) -> Self {
        self.mac = Some(mac.into());
        self
    }

    /// With a host function (hostdev).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// In the slot named `slot`.
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = Some(slot.into());
        self
    }

    /// With a teaming.
    pub fn teaming(mut self, teaming: Teaming) -> Self {
        self.teaming = Some(teaming);
        self
    }
}

/// What an interface is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// A virtio-net device: with a persistent teaming, the standby.
    Virtio,
    /// A host PCI function passed through (an SR-IOV VF): a primary.
    Hostdev,
    /// A virtio-net function without STANDBY, used as the primary where
    /// there is no VF (`stand-in`).
    StandIn,
}

impl Model {
    /// The model named `name` as the configuration spells it.
    pub fn from_name(name: &str) -> Option<Model> {
        match name {
            "virtio" => Some(Model::Virtio),
            "hostdev" => Some(Model::Hostdev),
            "stand-in" => Some(Model::StandIn),
            _ => None,
        }
    }

    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Model::Virtio => "virtio",
            Model::Hostdev => "hostdev",
            Model::StandIn => "stand-in",
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An interface's part in a failover pair (libvirt's `<teaming>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Teaming {
    /// `type`: persistent (the standby), transient (the primary) or none.
    #[serde(rename = "type")]
    pub kind: TeamingType,
    /// The standby's alias, for a transient teaming only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<String>,
}

impl Teaming {
    /// `{ type = "persistent" }`: the standby.
    pub fn persistent() -> Self {
        Teaming {
            kind: TeamingType::Persistent,
            persistent: None,
        }
    }

    /// `{ type = "transient", persistent = "<standby>" }`: the primary of
    /// `standby`.
    pub fn transient(standby: impl Into<String>) -> Self {
        Teaming {
            kind: TeamingType::Transient,
            persistent: Some(standby.into()),
        }
    }
}

/// A teaming's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeamingType {
    /// Not in a pair (libvirt's `none`).
    None,
    /// The standby: stays across migration.
    Persistent,
    /// The primary: unplugged for migration.
    Transient,
}

impl TeamingType {
    /// The type named `name` as the configuration spells it.
    pub fn from_name(name: &str) -> Option<TeamingType> {
        match name {
            "none" => Some(TeamingType::None),
            "persistent" => Some(TeamingType::Persistent),
            "transient" => Some(TeamingType::Transient),
            _ => None,
        }
    }

    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            TeamingType::None => "none",
            TeamingType::Persistent => "persistent",
            TeamingType::Transient => "transient",
        }
    }
}

impl fmt::Display for TeamingType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A parser's message on one line.
fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

impl TeamingConfig {
    /// Reads a TOML configuration (`[[interface]]` tables). Every value that
    /// cannot be read is an error with its field, and when there is any,
    /// what [`validate`](Self::validate) finds in the rest comes with them.
    /// A configuration that reads is returned as is: validate it.
    pub fn from_toml_str(s: &str) -> Result<TeamingConfig> {
        match toml::from_str::<raw::Raw>(s) {
            Ok(raw) => Self::from_raw(raw),
            Err(e) => {
                let (line, column) = line_column(s, e.span().map_or(0, |r| r.start));
                Err(ConfigErrors(vec![ConfigError::new(
                    "",
                    ConfigErrorKind::Syntax {
                        format: "TOML",
                        line,
                        column,
                        message: one_line(e.message()),
                    },
                )]))
            }
        }
    }

    /// Reads a JSON configuration (an `"interfaces"` array), as
    /// [`from_toml_str`](Self::from_toml_str).
    pub fn from_json_str(s: &str) -> Result<TeamingConfig> {
        match serde_json::from_str::<raw::Raw>(s) {
            Ok(raw) => Self::from_raw(raw),
            Err(e) => {
                let message = e.to_string();
                // serde_json appends " at line L column C"; we say it first.
                let message = match message.rfind(" at line ") {
                    Some(n) => &message[..n],
                    None => &message,
                };
                Err(ConfigErrors(vec![ConfigError::new(
                    "",
                    ConfigErrorKind::Syntax {
                        format: "JSON",
                        line: e.line(),
                        column: e.column(),
                        message: one_line(message),
                    },
                )]))
            }
        }
    }

    /// Reads the file at `path`, TOML or JSON by its extension (`.toml`,
    /// `.json`, in any case).
    pub fn from_path(path: &Path) -> Result<TeamingConfig> {
        let field = path.display().to_string();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let parse = match ext.as_deref() {
            Some("toml") => Self::from_toml_str,
            Some("json") => Self::from_json_str,
            _ => {
                return Err(ConfigErrors(vec![ConfigError::new(
                    field,
                    ConfigErrorKind::UnknownFormat,
                )]));
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                field,
                ConfigErrorKind::Io {
                    message: e.to_string(),
                },
            )])
        })?;
        parse(&text)
    }

    fn from_raw(raw: raw::Raw) -> Result<TeamingConfig> {
        let mut read = raw::read(raw);
        if read.errors.is_empty() {
            return Ok(read.config);
        }
        let report = check::check(&read.config.interfaces, &read.unread);
        read.errors.extend(report.errors);
        Err(ConfigErrors(read.errors))
    }

    /// Checks every rule and returns the pairs, one per persistent interface
    /// in file order, or every error found:
    ///
    /// - aliases: present, device ids, unique;
    /// - a transient teaming names (`persistent`) the alias of an interface
    ///   whose teaming is persistent, and no other transient names it too;
    ///   only a transient teaming has the `persistent` attribute;
    /// - a persistent interface is model `virtio`; a transient one is not
    ///   (`hostdev` or `stand-in`) and has a slot;
    /// - a hostdev has a source, a sysfs path of a PCI function or its
    ///   address; no other model has one;
    /// - a slot is not empty and holds one interface.
    ///
    /// MACs that differ within a pair are not an error: see
    /// [`warnings`](Self::warnings).
    pub fn validate(&self) -> Result<Vec<Pair<'_>>> {
        let report = check::check(&self.interfaces, &[]);
        if !report.errors.is_empty() {
            return Err(ConfigErrors(report.errors));
        }
        Ok(self
            .interfaces
            .iter()
            .zip(&report.primary_of)
            .filter(|(x, _)| {
                x.teaming
                    .as_ref()
                    .is_some_and(|t| t.kind == TeamingType::Persistent)
            })
            .map(|(standby, primary)| Pair {
                standby,
                primary: primary.and_then(|p| self.interfaces.get(p)),
            })
            .collect())
    }

    /// What is most likely a mistake but does not stop the configuration: a
    /// pair whose MACs differ (the guest pairs by MAC). Found also when
    /// [`validate`](Self::validate) fails, for the pairs that formed.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        check::check(&self.interfaces, &[]).warnings
    }

    /// The interface with `alias` (the first, if there are several).
    pub fn interface(&self, alias: &str) -> Option<&Interface> {
        self.interfaces.iter().find(|x| x.alias == alias)
    }

    /// The configuration as TOML, `[[interface]]` tables, which
    /// [`from_toml_str`](Self::from_toml_str) reads back equal.
    pub fn to_toml_string(&self) -> std::result::Result<String, toml::ser::Error> {
        #[derive(Serialize)]
        struct Toml<'a> {
            interface: &'a [Interface],
        }
        toml::to_string(&Toml {
            interface: &self.interfaces,
        })
    }

    /// The configuration as pretty-printed JSON, an `"interfaces"` array,
    /// which [`from_json_str`](Self::from_json_str) reads back equal.
    pub fn to_json_string(&self) -> std::result::Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

impl<'de> Deserialize<'de> for TeamingConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = raw::Raw::deserialize(d)?;
        TeamingConfig::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
