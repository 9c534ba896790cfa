//! Reading: TOML or JSON into a loose tree of any values first, then field by
//! field into a [`TeamingConfig`], so that one bad value (a MAC with a typo, a
//! number where a string belongs) is reported with its field and does not
//! hide the others.

use std::collections::HashSet;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::error::{ConfigError, ConfigErrorKind};
use super::syntax::parse_mac;
use super::{Interface, Model, Teaming, TeamingConfig, TeamingType};

/// The key under which the `toml` crate hands a date-time to `deserialize_any`.
const TOML_DATETIME: &str = "$__toml_private_datetime";

/// The top-level fields.
const TOP_FIELDS: &str = "'interface' (or 'interfaces')";
/// An interface's fields.
const INTERFACE_FIELDS: &str = "alias, model, mac, teaming, source, slot";
/// A teaming's fields.
const TEAMING_FIELDS: &str = "type, persistent";

/// Any TOML or JSON value, keeping only what reading a configuration needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Raw {
    Bool,
    Int,
    Float,
    Str(String),
    Seq(Vec<Raw>),
    /// Entries in file order; JSON may repeat a key.
    Map(Vec<(String, Raw)>),
    Null,
    DateTime,
    Other,
}

impl Raw {
    /// What it is, for "expected ..., found ...".
    fn kind(&self) -> &'static str {
        match self {
            Raw::Bool => "a boolean",
            Raw::Int => "an integer",
            Raw::Float => "a number",
            Raw::Str(_) => "a string",
            Raw::Seq(_) => "an array",
            Raw::Map(_) => "a table (object)",
            Raw::Null => "null",
            Raw::DateTime => "a date-time",
            Raw::Other => "a value of another kind",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        RawSeed { depth: 0 }.deserialize(d)
    }
}

/// How deep a tree may nest. A configuration needs 4 levels (document,
/// interface list, interface, teaming); the bound keeps any deserializer's
/// input from recursing deeper here, whatever the format's own limit.
const MAX_DEPTH: u32 = 32;

/// Reads a [`Raw`] at nesting `depth`.
#[derive(Clone, Copy)]
struct RawSeed {
    depth: u32,
}

impl RawSeed {
    fn nested<E: de::Error>(self) -> Result<RawSeed, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "values nest deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(RawSeed {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Raw;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RawSeed {
    type Value = Raw;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Raw, E> {
        Ok(Raw::Bool)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Raw, E> {
        Ok(Raw::Int)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Raw, E> {
        Ok(Raw::Int)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Raw, E> {
        Ok(Raw::Int)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Raw, E> {
        Ok(Raw::Int)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Raw, E> {
        Ok(Raw::Float)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Raw, E> {
        Ok(Raw::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        self.nested()?.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        self.nested()?.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        // No capacity from the size hint: the input chooses it.
        let inner = self.nested()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let inner = self.nested()?;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(inner)?;
            entries.push((key, value));
        }
        if let [(key, _)] = entries.as_slice() {
            if key == TOML_DATETIME {
                return Ok(Raw::DateTime);
            }
        }
        Ok(Raw::Map(entries))
    }
}

/// Which fields of an interface could not be read (their error is reported):
/// the checks skip them rather than report them again as missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Unread {
    pub(crate) alias: bool,
    pub(crate) model: bool,
    pub(crate) teaming: bool,
    pub(crate) persistent: bool,
    pub(crate) source: bool,
    pub(crate) slot: bool,
}

impl Unread {
    const ALL: Unread = Unread {
        alias: true,
        model: true,
        teaming: true,
        persistent: true,
        source: true,
        slot: true,
    };
}

/// A configuration as far as it could be read, and the errors reading it.
pub(crate) struct Read {
    pub(crate) config: TeamingConfig,
    pub(crate) unread: Vec<Unread>,
    pub(crate) errors: Vec<ConfigError>,
}

/// How messages name interface `index` with `alias` (escaped: always one line).
pub(crate) fn label(index: usize, alias: &str) -> String {
    if alias.is_empty() {
        format!("[{index}] (no alias)")
    } else {
        format!("'{}'", alias.escape_debug())
    }
}

/// A value from the file, as messages show it.
pub(crate) fn shown(value: &str) -> String {
    value.escape_debug().to_string()
}

/// Reads a configuration from its loose tree.
pub(crate) fn read(raw: Raw) -> Read {
    let mut out = Read {
        config: TeamingConfig::default(),
        unread: Vec::new(),
        errors: Vec::new(),
    };
    let entries = match raw {
        Raw::Map(entries) => entries,
        other => {
            out.errors.push(ConfigError::new(
                "",
                ConfigErrorKind::WrongType {
                    interface: None,
                    expected: "a table (object) with the interface list",
                    found: other.kind(),
                },
            ));
            return out;
        }
    };
    let mut list_seen = false;
    for (key, value) in entries {
        if key != "interface" && key != "interfaces" {
            out.errors.push(ConfigError::new(
                shown(&key),
                ConfigErrorKind::UnknownField {
                    interface: None,
                    name: shown(&key),
                    known: TOP_FIELDS,
                },
            ));
            continue;
        }
        if list_seen {
            out.errors.push(ConfigError::new(
                shown(&key),
                ConfigErrorKind::InterfacesTwice,
            ));
            continue;
        }
        list_seen = true;
        match value {
            Raw::Seq(items) => {
                for item in items {
                    let index = out.config.interfaces.len();
                    let (interface, unread) = read_interface(index, item, &mut out.errors);
                    out.config.interfaces.push(interface);
                    out.unread.push(unread);
                }
            }
            Raw::Null => {}
            other => out.errors.push(ConfigError::new(
                shown(&key),
                ConfigErrorKind::WrongType {
                    interface: None,
                    expected: "an array of interface tables ([[interface]] in TOML)",
                    found: other.kind(),
                },
            )),
        }
    }
    out
}

/// Reads an optional string: absent and `null` are `None`.
fn optional_string(
    value: Raw,
    field: &str,
    label: &str,
    errors: &mut Vec<ConfigError>,
) -> Result<Option<String>, ()> {
    match value {
        Raw::Str(s) => Ok(Some(s)),
        Raw::Null => Ok(None),
        other => {
            errors.push(ConfigError::new(
                field,
                ConfigErrorKind::WrongType {
                    interface: Some(label.to_string()),
                    expected: "a string",
                    found: other.kind(),
                },
            ));
            Err(())
        }
    }
}

/// Reads interface `index`; fields that could not be read are left at a
/// placeholder and marked in the returned [`Unread`].
fn read_interface(index: usize, raw: Raw, errors: &mut Vec<ConfigError>) -> (Interface, Unread) {
    let path = format!("interface[{index}]");
    let mut interface = Interface::new("", Model::Virtio);
    let entries = match raw {
        Raw::Map(entries) => entries,
        other => {
            errors.push(ConfigError::new(
                path,
                ConfigErrorKind::WrongType {
                    interface: None,
                    expected: "a table (object) of interface fields",
                    found: other.kind(),
                },
            ));
            return (interface, Unread::ALL);
        }
    };
    let alias_text = entries
        .iter()
        .find_map(|(k, v)| match (k.as_str(), v) {
            ("alias", Raw::Str(s)) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("");
    let label = label(index, alias_text);
    let mut unread = Unread::default();
    let mut seen: HashSet<String> = HashSet::new();
    let (mut alias, mut model) = (None, None);
    for (key, value) in entries {
        let field = format!("{path}.{}", shown(&key));
        if !seen.insert(key.clone()) {
            errors.push(ConfigError::new(
                field,
                ConfigErrorKind::DuplicateField {
                    interface: Some(label.clone()),
                    name: shown(&key),
                },
            ));
            continue;
        }
        match key.as_str() {
            "alias" => match optional_string(value, &field, &label, errors) {
                Ok(a) => alias = a,
                Err(()) => unread.alias = true,
            },
            "model" => match optional_string(value, &field, &label, errors) {
                Ok(Some(m)) => match Model::from_name(&m) {
                    Some(m) => model = Some(m),
                    None => {
                        unread.model = true;
                        errors.push(ConfigError::new(
                            field,
                            ConfigErrorKind::UnknownModel {
                                interface: label.clone(),
                                value: shown(&m),
                            },
                        ));
                    }
                },
                Ok(None) => {}
                Err(()) => unread.model = true,
            },
            "mac" => {
                if let Ok(Some(m)) = optional_string(value, &field, &label, errors) {
                    match parse_mac(&m) {
                        Ok(mac) => interface.mac = Some(mac),
                        Err(reason) => errors.push(ConfigError::new(
                            field,
                            ConfigErrorKind::BadMac {
                                interface: label.clone(),
                                value: shown(&m),
                                reason,
                            },
                        )),
                    }
                }
            }
            "source" => match optional_string(value, &field, &label, errors) {
                Ok(s) => interface.source = s,
                Err(()) => unread.source = true,
            },
            "slot" => match optional_string(value, &field, &label, errors) {
                Ok(s) => interface.slot = s,
                Err(()) => unread.slot = true,
            },
            "teaming" => match value {
                Raw::Map(entries) => {
                    interface.teaming = read_teaming(&field, &label, entries, &mut unread, errors)
                }
                Raw::Null => {}
                other => {
                    unread.teaming = true;
                    errors.push(ConfigError::new(
                        field,
                        ConfigErrorKind::WrongType {
                            interface: Some(label.clone()),
                            expected: "a table (object): { type = \"persistent\" } or { type = \"transient\", persistent = \"<standby alias>\" }",
                            found: other.kind(),
                        },
                    ));
                }
            },
            _ => errors.push(ConfigError::new(
                field,
                ConfigErrorKind::UnknownField {
                    interface: Some(label.clone()),
                    name: shown(&key),
                    known: INTERFACE_FIELDS,
                },
            )),
        }
    }
    match alias {
        Some(a) => interface.alias = a,
        None if unread.alias => {}
        None => {
            unread.alias = true;
            errors.push(ConfigError::new(
                format!("{path}.alias"),
                ConfigErrorKind::MissingField {
                    interface: label.clone(),
                    name: "alias",
                    hint: "alias = \"<device id>\", e.g. \"net1\"",
                },
            ));
        }
    }
    match model {
        Some(m) => interface.model = m,
        None if unread.model => {}
        None => {
            unread.model = true;
            errors.push(ConfigError::new(
                format!("{path}.model"),
                ConfigErrorKind::MissingField {
                    interface: label,
                    name: "model",
                    hint: "model = \"virtio\", \"hostdev\" or \"stand-in\"",
                },
            ));
        }
    }
    (interface, unread)
}

/// Reads a teaming table; `None` when its type could not be read.
fn read_teaming(
    path: &str,
    label: &str,
    entries: Vec<(String, Raw)>,
    unread: &mut Unread,
    errors: &mut Vec<ConfigError>,
) -> Option<Teaming> {
    let mut kind = None;
    let mut persistent = None;
    let mut seen: HashSet<String> = HashSet::new();
    for (key, value) in entries {
        let field = format!("{path}.{}", shown(&key));
        if !seen.insert(key.clone()) {
            errors.push(ConfigError::new(
                field,
                ConfigErrorKind::DuplicateField {
                    interface: Some(label.to_string()),
                    name: shown(&key),
                },
            ));
            continue;
        }
        match key.as_str() {
            "type" => match optional_string(value, &field, label, errors) {
                Ok(Some(t)) => match TeamingType::from_name(&t) {
                    Some(t) => kind = Some(t),
                    None => {
                        unread.teaming = true;
                        errors.push(ConfigError::new(
                            field,
                            ConfigErrorKind::UnknownTeamingType {
                                interface: label.to_string(),
                                value: shown(&t),
                            },
                        ));
                    }
                },
                Ok(None) => {}
                Err(()) => unread.teaming = true,
            },
            "persistent" => match optional_string(value, &field, label, errors) {
                Ok(p) => persistent = p,
                Err(()) => unread.persistent = true,
            },
            _ => errors.push(ConfigError::new(
                field,
                ConfigErrorKind::UnknownField {
                    interface: Some(label.to_string()),
                    name: shown(&key),
                    known: TEAMING_FIELDS,
                },
            )),
        }
    }
    if kind.is_none() && !unread.teaming {
        unread.teaming = true;
        errors.push(ConfigError::new(
            format!("{path}.type"),
            ConfigErrorKind::MissingField {
                interface: label.to_string(),
                name: "teaming.type",
                hint: "type = \"persistent\" (the virtio standby) or \"transient\" (its primary)",
            },
        ));
    }
    kind.map(|kind| Teaming { kind, persistent })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_json(s: &str) -> Raw {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn loose_tree_takes_any_value() {
        assert_eq!(
            raw_json(r#"{"a": [1, -2, 1.5, true, null, "x"], "b": {"c": {}}}"#),
            Raw::Map(vec![
                (
                    "a".into(),
                    Raw::Seq(vec![
                        Raw::Int,
                        Raw::Int,
                        Raw::Float,
                        Raw::Bool,
                        Raw::Null,
                        Raw::Str("x".into())
                    ])
                ),
                ("b".into(), Raw::Map(vec![("c".into(), Raw::Map(vec![]))])),
            ])
        );
        let t: Raw = toml::from_str("d = 1979-05-27T07:32:00Z\n").unwrap();
        assert_eq!(t, Raw::Map(vec![("d".into(), Raw::DateTime)]));
    }

    #[test]
    fn json_keeps_repeated_keys() {
        assert_eq!(
            raw_json(r#"{"a": 1, "a": "x"}"#),
            Raw::Map(vec![
                ("a".into(), Raw::Int),
                ("a".into(), Raw::Str("x".into()))
            ])
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}1{}", "[".repeat(31), "]".repeat(31));
        assert!(serde_json::from_str::<Raw>(&ok).is_ok());
        let deep = format!("{}1{}", "[".repeat(33), "]".repeat(33));
        let e = serde_json::from_str::<Raw>(&deep).unwrap_err();
        assert!(e.to_string().contains("deeper than 32 levels"), "{e}");
        let deep = format!("a = {}1{}", "[".repeat(40), "]".repeat(40));
        assert!(toml::from_str::<Raw>(&deep).is_err());
    }

    #[test]
    fn labels_escape() {
        assert_eq!(label(3, ""), "[3] (no alias)");
        assert_eq!(label(0, "net1"), "'net1'");
        assert_eq!(label(0, "a\nb"), "'a\\nb'");
    }
}
