//! The rules a configuration must follow, all checked in one pass, and the
//! pairs a valid one forms.

use std::collections::HashMap;
use std::path::PathBuf;

use vmm_pci::PciHandle;

use crate::event::MacAddress;
use crate::registry::{Primary, Slot, Standby};

use super::error::{ConfigError, ConfigErrorKind, ConfigWarning, ConfigWarningKind};
use super::raw::{Unread, label, shown};
use super::syntax::{HostFunction, alias_well_formed, parse_source};
use super::{Interface, Model, TeamingType};

/// What checking found.
pub(crate) struct Report {
    pub(crate) errors: Vec<ConfigError>,
    pub(crate) warnings: Vec<ConfigWarning>,
    /// For each interface that is a persistent standby, the transient
    /// interface paired with it (index into the interfaces).
    pub(crate) primary_of: Vec<Option<usize>>,
}

/// Checks `interfaces`. Fields marked in `unread` (parallel, or empty: all
/// read) were not read and already have their error: rules that need them
/// are skipped rather than reporting them again.
pub(crate) fn check(interfaces: &[Interface], unread: &[Unread]) -> Report {
    let none = Unread::default();
    let unread_of = |i: usize| unread.get(i).copied().unwrap_or(none);
    // How many interfaces share each alias: a shared one is named with its
    // position too, so "'net1' ... 'net1'" never leaves the reader guessing.
    let mut alias_count: HashMap<&str, usize> = HashMap::new();
    for x in interfaces {
        *alias_count.entry(x.alias.as_str()).or_default() += 1;
    }
    let name = |i: usize| match interfaces.get(i) {
        Some(x)
            if !x.alias.is_empty() && alias_count.get(x.alias.as_str()).is_some_and(|&n| n > 1) =>
        {
            format!("{} (interface[{i}])", label(i, &x.alias))
        }
        Some(x) => label(i, &x.alias),
        None => String::new(),
    };
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut primary_of: Vec<Option<usize>> = vec![None; interfaces.len()];

    // Aliases first: the transient teamings refer to them.
    let mut by_alias: HashMap<&str, usize> = HashMap::new();
    for (i, x) in interfaces.iter().enumerate() {
        if unread_of(i).alias {
            continue;
        }
        let field = format!("interface[{i}].alias");
        if x.alias.is_empty() {
            errors.push(ConfigError::new(
                field,
                ConfigErrorKind::EmptyAlias { interface: name(i) },
            ));
            continue;
        }
        if !alias_well_formed(&x.alias) {
            errors.push(ConfigError::new(
                field.clone(),
                ConfigErrorKind::BadAlias { interface: name(i) },
            ));
        }
        if let Some(&first) = by_alias.get(x.alias.as_str()) {
            errors.push(ConfigError::new(
                field,
                ConfigErrorKind::DuplicateAlias {
                    interface: name(i),
                    first,
                },
            ));
        } else {
            by_alias.insert(&x.alias, i);
        }
    }

    let mut by_slot: HashMap<&str, usize> = HashMap::new();
    for (i, x) in interfaces.iter().enumerate() {
        let u = unread_of(i);
        let path = format!("interface[{i}]");
        let model = (!u.model).then_some(x.model);

        // Teaming.
        if let Some(t) = x.teaming.as_ref().filter(|_| !u.teaming) {
            let persistent_field = format!("{path}.teaming.persistent");
            match t.kind {
                TeamingType::Transient => {
                    if model == Some(Model::Virtio) {
                        errors.push(ConfigError::new(
                            format!("{path}.model"),
                            ConfigErrorKind::TransientIsVirtio { interface: name(i) },
                        ));
                    }
                    match &t.persistent {
                        None if u.persistent => {}
                        None => errors.push(ConfigError::new(
                            persistent_field,
                            ConfigErrorKind::TransientWithoutPersistent { interface: name(i) },
                        )),
                        Some(p) => match by_alias.get(p.as_str()).copied() {
                            None => errors.push(ConfigError::new(
                                persistent_field,
                                ConfigErrorKind::UnknownPersistent {
                                    interface: name(i),
                                    persistent: shown(p),
                                },
                            )),
                            Some(j) => {
                                let other = &interfaces[j];
                                let other_kind = other.teaming.as_ref().map(|t| t.kind);
                                if unread_of(j).teaming {
                                    // Its teaming has its own error.
                                } else if j == i || other_kind != Some(TeamingType::Persistent) {
                                    errors.push(ConfigError::new(
                                        persistent_field,
                                        ConfigErrorKind::NotPersistent {
                                            interface: name(i),
                                            persistent: shown(p),
                                            teaming: other_kind,
                                        },
                                    ));
                                } else if let Some(first) = primary_of[j] {
                                    errors.push(ConfigError::new(
                                        persistent_field,
                                        ConfigErrorKind::SecondPrimary {
                                            interface: name(i),
                                            standby: name(j),
                                            first: name(first),
                                        },
                                    ));
                                } else {
                                    primary_of[j] = Some(i);
                                    if let (Some(s), Some(p)) = (other.mac, x.mac) {
                                        if s != p {
                                            warnings.push(ConfigWarning {
                                                field: format!("{path}.mac"),
                                                kind: ConfigWarningKind::MacMismatch {
                                                    standby: name(j),
                                                    standby_mac: s,
                                                    primary: name(i),
                                                    primary_mac: p,
                                                },
                                            });
                                        }
                                    }
                                }
                            }
                        },
                    }
                    if x.slot.is_none() && !u.slot {
                        errors.push(ConfigError::new(
                            format!("{path}.slot"),
                            ConfigErrorKind::TransientWithoutSlot { interface: name(i) },
                        ));
                    }
                }
                TeamingType::Persistent | TeamingType::None => {
                    if let Some(p) = &t.persistent {
                        errors.push(ConfigError::new(
                            persistent_field,
                            ConfigErrorKind::PersistentNotAllowed {
                                interface: name(i),
                                teaming: t.kind,
                                persistent: shown(p),
                            },
                        ));
                    }
                    if t.kind == TeamingType::Persistent {
                        if let Some(m) = model.filter(|&m| m != Model::Virtio) {
                            errors.push(ConfigError::new(
                                format!("{path}.model"),
                                ConfigErrorKind::PersistentNotVirtio {
                                    interface: name(i),
                                    model: m,
                                },
                            ));
                        }
                    }
                }
            }
        }

        // Source.
        let source_field = format!("{path}.source");
        match (model, &x.source) {
            (Some(Model::Hostdev), None) if !u.source => errors.push(ConfigError::new(
                source_field,
                ConfigErrorKind::HostdevWithoutSource { interface: name(i) },
            )),
            (Some(Model::Hostdev), Some(s)) => {
                if let Err(reason) = parse_source(s) {
                    errors.push(ConfigError::new(
                        source_field,
                        ConfigErrorKind::BadSource {
                            interface: name(i),
                            value: shown(s),
                            reason,
                        },
                    ));
                }
            }
            (Some(m), Some(_)) => errors.push(ConfigError::new(
                source_field,
                ConfigErrorKind::SourceNotHostdev {
                    interface: name(i),
                    model: m,
                },
            )),
            _ => {}
        }

        // Slot.
        if let Some(s) = &x.slot {
            let field = format!("{path}.slot");
            if s.is_empty() {
                errors.push(ConfigError::new(
                    field,
                    ConfigErrorKind::EmptySlot { interface: name(i) },
                ));
            } else if let Some(&other) = by_slot.get(s.as_str()) {
                errors.push(ConfigError::new(
                    field,
                    ConfigErrorKind::SlotTaken {
                        interface: name(i),
                        slot: shown(s),
                        other: name(other),
                    },
                ));
            } else {
                by_slot.insert(s, i);
            }
        }
    }

    Report {
        errors,
        warnings,
        primary_of,
    }
}

/// A standby and its primary from a valid configuration: what a VMM needs
/// to register them with the [`Coordinator`](crate::Coordinator).
///
/// The configuration cannot build the primary's device (a VFIO function, or
/// the stand-in), nor its slot (the VMM's root port): [`Pair::primary`] takes
/// both and builds the rest. A standby without a primary (none configured
/// yet, or a destination without one) has `primary_interface() == None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<'a> {
    pub(crate) standby: &'a Interface,
    pub(crate) primary: Option<&'a Interface>,
}

impl<'a> Pair<'a> {
    /// The persistent interface: the virtio standby.
    pub fn standby_interface(&self) -> &'a Interface {
        self.standby
    }

    /// The transient interface naming it: the primary, if any.
    pub fn primary_interface(&self) -> Option<&'a Interface> {
        self.primary
    }

    /// The standby as the coordinator registers it: its alias as the id,
    /// failover on, its MAC if the configuration gives one.
    pub fn standby(&self) -> Standby {
        let standby = Standby::new(self.standby.alias.clone()).failover(true);
        match self.standby.mac {
            Some(mac) => standby.mac(mac),
            None => standby,
        }
    }

    /// The id a primary names as its `failover_pair_id`: the standby's alias.
    pub fn pair_id(&self) -> &'a str {
        &self.standby.alias
    }

    /// The primary's id (its alias).
    pub fn primary_id(&self) -> Option<&'a str> {
        self.primary.map(|p| p.alias.as_str())
    }

    /// What the primary is: [`Model::Hostdev`] (open
    /// [`sysfs_path`](Self::sysfs_path) with VFIO) or [`Model::StandIn`].
    pub fn primary_model(&self) -> Option<Model> {
        self.primary.map(|p| p.model)
    }

    /// The standby's MAC, if configured.
    pub fn standby_mac(&self) -> Option<MacAddress> {
        self.standby.mac
    }

    /// The primary's MAC, if configured (for the coordinator's pairing-time
    /// check; [`TeamingConfig::warnings`](super::TeamingConfig::warnings)
    /// already compares it with the standby's).
    pub fn primary_mac(&self) -> Option<MacAddress> {
        self.primary.and_then(|p| p.mac)
    }

    /// The primary's `source` as written (hostdev only).
    pub fn source(&self) -> Option<&'a str> {
        self.primary.and_then(|p| p.source.as_deref())
    }

    /// The host function a hostdev primary's source names.
    pub fn host_function(&self) -> Option<HostFunction> {
        self.source()
            .and_then(|s| parse_source(s).ok())
            .map(|s| s.function)
    }

    /// The host function's sysfs directory: the source as written when it is
    /// a sysfs path, else `/sys/bus/pci/devices/<address>`.
    pub fn sysfs_path(&self) -> Option<PathBuf> {
        self.source()
            .and_then(|s| parse_source(s).ok())
            .map(|s| s.sysfs)
    }

    /// The name of the slot the primary is hot-plugged into (a valid pair's
    /// primary always has one).
    pub fn slot(&self) -> Option<&'a str> {
        self.primary.and_then(|p| p.slot.as_deref())
    }

    /// The primary as the coordinator registers it, with the VMM's `device`
    /// (the VFIO function at [`sysfs_path`](Self::sysfs_path), or the
    /// stand-in) and `slot` (build it from the port named
    /// [`slot()`](Self::slot)): its alias as the id, the standby's alias as
    /// `failover_pair_id`, its MAC if configured. `None` when the pair has no
    /// primary.
    pub fn primary(&self, device: PciHandle, slot: Slot) -> Option<Primary> {
        let p = self.primary?;
        let primary = Primary::new(p.alias.clone(), self.standby.alias.clone(), device, slot);
        Some(match p.mac {
            Some(mac) => primary.mac(mac),
            None => primary,
        })
    }
}
