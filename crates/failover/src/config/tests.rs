use std::sync::{Arc, Mutex};

use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A valid pair: a virtio standby in rp0, a hostdev primary in rp1.
const VALID_TOML: &str = r#"
[[interface]]
alias = "net1"
model = "virtio"
mac = "52:54:00:12:34:56"
slot = "rp0"
teaming = { type = "persistent" }

[[interface]]
alias = "hostdev0"
model = "hostdev"
mac = "52:54:00:12:34:56"
source = "/sys/bus/pci/devices/0000:3b:02.1"
slot = "rp1"
teaming = { type = "transient", persistent = "net1" }
"#;

const VALID_JSON: &str = r#"{"interfaces": [
  {"alias": "net1", "model": "virtio", "mac": "52:54:00:12:34:56", "slot": "rp0",
   "teaming": {"type": "persistent"}},
  {"alias": "hostdev0", "model": "hostdev", "mac": "52:54:00:12:34:56",
   "source": "/sys/bus/pci/devices/0000:3b:02.1", "slot": "rp1",
   "teaming": {"type": "transient", "persistent": "net1"}}
]}"#;

fn standby(alias: &str) -> Interface {
    Interface::new(alias, Model::Virtio).teaming(Teaming::persistent())
}

fn hostdev(alias: &str, standby: &str, slot: &str) -> Interface {
    Interface::new(alias, Model::Hostdev)
        .source("0000:3b:02.1")
        .slot(slot)
        .teaming(Teaming::transient(standby))
}

fn config(interfaces: Vec<Interface>) -> TeamingConfig {
    TeamingConfig { interfaces }
}

/// The (field, kind) of each error `validate` reports.
fn errors_of(c: &TeamingConfig) -> Vec<(String, ConfigErrorKind)> {
    c.validate()
        .unwrap_err()
        .into_iter()
        .map(|e| (e.field, e.kind))
        .collect()
}

/// The fields of the errors reading `toml` reports.
fn toml_error_fields(toml: &str) -> Vec<String> {
    TeamingConfig::from_toml_str(toml)
        .unwrap_err()
        .into_iter()
        .map(|e| e.field)
        .collect()
}

fn label(alias: &str) -> String {
    format!("'{alias}'")
}

#[test]
fn a_valid_pair() {
    let c = TeamingConfig::from_toml_str(VALID_TOML).unwrap();
    let pairs = c.validate().unwrap();
    assert_eq!(pairs.len(), 1);
    let p = pairs[0];
    assert_eq!(p.standby_interface().alias, "net1");
    assert_eq!(p.primary_interface().unwrap().alias, "hostdev0");
    assert_eq!(p.pair_id(), "net1");
    assert_eq!(p.primary_id(), Some("hostdev0"));
    assert_eq!(p.primary_model(), Some(Model::Hostdev));
    assert_eq!(p.standby_mac(), Some(MacAddress(MAC)));
    assert_eq!(p.primary_mac(), Some(MacAddress(MAC)));
    assert_eq!(p.slot(), Some("rp1"));
    assert_eq!(p.source(), Some("/sys/bus/pci/devices/0000:3b:02.1"));
    assert_eq!(
        p.sysfs_path(),
        Some("/sys/bus/pci/devices/0000:3b:02.1".into())
    );
    assert_eq!(
        p.host_function(),
        Some(HostFunction {
            domain: 0,
            bdf: vmm_pci::Bdf::new(0x3b, 2, 1)
        })
    );
    assert_eq!(
        p.standby(),
        crate::Standby::new("net1").failover(true).mac(MAC)
    );
    assert!(c.warnings().is_empty());
}

#[test]
fn a_standby_alone_and_plain_interfaces_are_valid() {
    let c = config(vec![
        standby("net1"),
        Interface::new("net2", Model::Virtio),
        Interface::new("vf9", Model::Hostdev).source("3b:02.7"),
        Interface::new("s0", Model::StandIn).teaming(Teaming {
            kind: TeamingType::None,
            persistent: None,
        }),
    ]);
    let pairs = c.validate().unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].pair_id(), "net1");
    assert_eq!(pairs[0].primary_interface(), None);
    assert_eq!(pairs[0].primary_id(), None);
    assert_eq!(pairs[0].slot(), None);
    assert_eq!(pairs[0].standby(), crate::Standby::new("net1"));
    assert!(TeamingConfig::default().validate().unwrap().is_empty());
}

#[test]
fn a_stand_in_primary_by_address() {
    let c = config(vec![
        standby("ua-net1").mac(MAC),
        Interface::new("ua-standin0", Model::StandIn)
            .slot("rp1")
            .teaming(Teaming::transient("ua-net1")),
        standby("net2"),
        hostdev("vf0", "net2", "rp2"),
    ]);
    let pairs = c.validate().unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0].primary_model(), Some(Model::StandIn));
    assert_eq!(pairs[0].primary_mac(), None);
    assert_eq!(pairs[0].host_function(), None);
    assert_eq!(pairs[1].primary_id(), Some("vf0"));
    assert_eq!(
        pairs[1].sysfs_path(),
        Some("/sys/bus/pci/devices/0000:3b:02.1".into())
    );
}

#[test]
fn pair_builds_the_coordinators_primary() {
    let c = TeamingConfig::from_toml_str(VALID_TOML).unwrap();
    let pair = c.validate().unwrap()[0];
    let irqs = Arc::new(vmm_pci::EventFdMsi::new(1).unwrap());
    let rp1 = Arc::new(Mutex::new(
        pcie_hotplug::RootPortBuilder::new("rp1", 2).build(irqs),
    ));
    let vf: vmm_pci::PciHandle = vmm_pci::testing::StubEndpoint::vf();
    let primary = pair
        .primary(vf, crate::Slot::port(pair.slot().unwrap(), &rp1))
        .unwrap();
    assert_eq!(primary.id(), "hostdev0");
    assert_eq!(primary.failover_pair_id(), "net1");
    // The coordinator takes both and forms the pair.
    let events = crate::EventLog::new();
    let coordinator = crate::Coordinator::builder()
        .listener(Arc::new(events.clone()))
        .build();
    coordinator.add_standby(pair.standby()).unwrap();
    coordinator.add_primary(primary).unwrap();
    assert!(
        !events
            .kinds()
            .iter()
            .any(|e| matches!(e, crate::Event::MacMismatch { .. }))
    );

    let alone = config(vec![standby("net1")]);
    let pair = alone.validate().unwrap()[0];
    let vf: vmm_pci::PciHandle = vmm_pci::testing::StubEndpoint::vf();
    assert!(pair.primary(vf, crate::Slot::port("rp1", &rp1)).is_none());
}

#[test]
fn transient_without_persistent() {
    let mut p = hostdev("hostdev0", "net1", "rp1");
    p.teaming = Some(Teaming {
        kind: TeamingType::Transient,
        persistent: None,
    });
    let e = errors_of(&config(vec![standby("net1"), p]));
    assert_eq!(
        e,
        [(
            "interface[1].teaming.persistent".into(),
            ConfigErrorKind::TransientWithoutPersistent {
                interface: label("hostdev0")
            }
        )]
    );
    let text = e[0].1.to_string();
    assert!(text.contains("'hostdev0'") && text.contains("set teaming.persistent"));
}

#[test]
fn persistent_attribute_only_on_transient() {
    let mut s = standby("net1");
    s.teaming.as_mut().unwrap().persistent = Some("net9".into());
    let none = Interface::new("net2", Model::Virtio).teaming(Teaming {
        kind: TeamingType::None,
        persistent: Some("net1".into()),
    });
    let e = errors_of(&config(vec![s, none]));
    assert_eq!(
        e,
        [
            (
                "interface[0].teaming.persistent".into(),
                ConfigErrorKind::PersistentNotAllowed {
                    interface: label("net1"),
                    teaming: TeamingType::Persistent,
                    persistent: "net9".into()
                }
            ),
            (
                "interface[1].teaming.persistent".into(),
                ConfigErrorKind::PersistentNotAllowed {
                    interface: label("net2"),
                    teaming: TeamingType::None,
                    persistent: "net1".into()
                }
            ),
        ]
    );
    assert!(e[1].1.to_string().contains("teaming type 'none'"));
    assert!(
        e[1].1
            .to_string()
            .contains("remove the persistent attribute")
    );
}

#[test]
fn persistent_must_be_virtio() {
    for model in [Model::Hostdev, Model::StandIn] {
        let mut s = standby("net1");
        s.model = model;
        if model == Model::Hostdev {
            s.source = Some("0000:3b:02.1".into());
        }
        let e = errors_of(&config(vec![s]));
        assert_eq!(
            e,
            [(
                "interface[0].model".into(),
                ConfigErrorKind::PersistentNotVirtio {
                    interface: label("net1"),
                    model
                }
            )]
        );
        assert!(e[0].1.to_string().contains("must be model \"virtio\""));
    }
}

#[test]
fn transient_must_not_be_virtio() {
    let p = Interface::new("net2", Model::Virtio)
        .slot("rp1")
        .teaming(Teaming::transient("net1"));
    let e = errors_of(&config(vec![standby("net1"), p]));
    assert_eq!(
        e,
        [(
            "interface[1].model".into(),
            ConfigErrorKind::TransientIsVirtio {
                interface: label("net2")
            }
        )]
    );
    assert!(e[0].1.to_string().contains("\"hostdev\""));
}

#[test]
fn transient_names_an_unknown_alias() {
    let e = errors_of(&config(vec![
        standby("net1"),
        hostdev("hostdev0", "net9", "rp1"),
    ]));
    assert_eq!(
        e,
        [(
            "interface[1].teaming.persistent".into(),
            ConfigErrorKind::UnknownPersistent {
                interface: label("hostdev0"),
                persistent: "net9".into()
            }
        )]
    );
    assert!(e[0].1.to_string().contains("'net9'"));
}

#[test]
fn transient_names_an_interface_that_is_not_persistent() {
    let e = errors_of(&config(vec![
        Interface::new("net1", Model::Virtio),
        hostdev("hostdev0", "net1", "rp1"),
        hostdev("hostdev1", "hostdev0", "rp2"),
        hostdev("hostdev2", "hostdev2", "rp3"),
    ]));
    assert_eq!(
        e,
        [
            (
                "interface[1].teaming.persistent".into(),
                ConfigErrorKind::NotPersistent {
                    interface: label("hostdev0"),
                    persistent: "net1".into(),
                    teaming: None
                }
            ),
            (
                "interface[2].teaming.persistent".into(),
                ConfigErrorKind::NotPersistent {
                    interface: label("hostdev1"),
                    persistent: "hostdev0".into(),
                    teaming: Some(TeamingType::Transient)
                }
            ),
            (
                "interface[3].teaming.persistent".into(),
                ConfigErrorKind::NotPersistent {
                    interface: label("hostdev2"),
                    persistent: "hostdev2".into(),
                    teaming: Some(TeamingType::Transient)
                }
            ),
        ]
    );
    assert!(e[0].1.to_string().contains("whose teaming is not set"));
    assert!(
        e[0].1
            .to_string()
            .contains("give 'net1' teaming type 'persistent'")
    );
}

#[test]
fn two_primaries_for_one_standby() {
    let e = errors_of(&config(vec![
        standby("net1"),
        hostdev("hostdev0", "net1", "rp1"),
        hostdev("hostdev1", "net1", "rp2"),
    ]));
    assert_eq!(
        e,
        [(
            "interface[2].teaming.persistent".into(),
            ConfigErrorKind::SecondPrimary {
                interface: label("hostdev1"),
                standby: label("net1"),
                first: label("hostdev0")
            }
        )]
    );
    let text = e[0].1.to_string();
    assert!(text.contains("'hostdev1'") && text.contains("'net1'") && text.contains("'hostdev0'"));
}

#[test]
fn duplicate_empty_and_bad_aliases() {
    let e = errors_of(&config(vec![
        standby("net1"),
        standby("net1"),
        Interface::new("", Model::Virtio),
        Interface::new("1net", Model::Virtio),
    ]));
    assert_eq!(
        e,
        [
            (
                "interface[1].alias".into(),
                ConfigErrorKind::DuplicateAlias {
                    interface: "'net1' (interface[1])".into(),
                    first: 0
                }
            ),
            (
                "interface[2].alias".into(),
                ConfigErrorKind::EmptyAlias {
                    interface: "[2] (no alias)".into()
                }
            ),
            (
                "interface[3].alias".into(),
                ConfigErrorKind::BadAlias {
                    interface: label("1net")
                }
            ),
        ]
    );
    assert!(e[0].1.to_string().contains("interface[0]"));
}

#[test]
fn hostdev_source() {
    let mut missing = hostdev("hostdev0", "net1", "rp1");
    missing.source = None;
    let bad = Interface::new("vf1", Model::Hostdev).source("eth0");
    let outside = Interface::new("vf2", Model::Hostdev).source("/dev/vfio/12");
    let on_virtio = Interface::new("net2", Model::Virtio).source("0000:3b:02.1");
    let e = errors_of(&config(vec![
        standby("net1"),
        missing,
        bad,
        outside,
        on_virtio,
    ]));
    assert_eq!(
        e,
        [
            (
                "interface[1].source".into(),
                ConfigErrorKind::HostdevWithoutSource {
                    interface: label("hostdev0")
                }
            ),
            (
                "interface[2].source".into(),
                ConfigErrorKind::BadSource {
                    interface: label("vf1"),
                    value: "eth0".into(),
                    reason: "is neither a sysfs path (it does not start with /sys/) nor a PCI address"
                }
            ),
            (
                "interface[3].source".into(),
                ConfigErrorKind::BadSource {
                    interface: label("vf2"),
                    value: "/dev/vfio/12".into(),
                    reason: "is a path outside /sys"
                }
            ),
            (
                "interface[4].source".into(),
                ConfigErrorKind::SourceNotHostdev {
                    interface: label("net2"),
                    model: Model::Virtio
                }
            ),
        ]
    );
    assert!(e[0].1.to_string().contains("set source to"));
}

#[test]
fn slots() {
    let mut no_slot = hostdev("hostdev0", "net1", "rp1");
    no_slot.slot = None;
    let e = errors_of(&config(vec![
        standby("net1").slot("rp1"),
        no_slot,
        standby("net2").slot("rp2"),
        hostdev("hostdev1", "net2", "rp2"),
        Interface::new("net3", Model::Virtio).slot(""),
    ]));
    assert_eq!(
        e,
        [
            (
                "interface[1].slot".into(),
                ConfigErrorKind::TransientWithoutSlot {
                    interface: label("hostdev0")
                }
            ),
            (
                "interface[3].slot".into(),
                ConfigErrorKind::SlotTaken {
                    interface: label("hostdev1"),
                    slot: "rp2".into(),
                    other: label("net2")
                }
            ),
            (
                "interface[4].slot".into(),
                ConfigErrorKind::EmptySlot {
                    interface: label("net3")
                }
            ),
        ]
    );
    assert!(e[1].1.to_string().contains("give it a slot of its own"));
}

#[test]
fn differing_macs_are_a_warning() {
    let primary_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    let c = config(vec![
        standby("net1").mac(MAC),
        hostdev("hostdev0", "net1", "rp1").mac(primary_mac),
    ]);
    assert_eq!(c.validate().unwrap().len(), 1);
    let w = c.warnings();
    assert_eq!(
        w,
        [ConfigWarning {
            field: "interface[1].mac".into(),
            kind: ConfigWarningKind::MacMismatch {
                standby: label("net1"),
                standby_mac: MacAddress(MAC),
                primary: label("hostdev0"),
                primary_mac: MacAddress(primary_mac),
            }
        }]
    );
    let text = w[0].to_string();
    assert!(text.contains("52:54:00:12:34:57") && text.contains("52:54:00:12:34:56"));
    assert!(text.contains("give both the same MAC"));
    // Only one side with a MAC: nothing to compare.
    let c = config(vec![
        standby("net1").mac(MAC),
        hostdev("hostdev0", "net1", "rp1"),
    ]);
    assert!(c.warnings().is_empty());
}

#[test]
fn bad_macs_each_with_its_field() {
    let toml = VALID_TOML
        .replacen("52:54:00:12:34:56", "52:54:00:12:34", 1)
        .replacen("52:54:00:12:34:56", "01:54:00:12:34:56", 1);
    let errors = TeamingConfig::from_toml_str(&toml).unwrap_err();
    let e: Vec<_> = errors.into_iter().collect();
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[0].field, "interface[0].mac");
    assert_eq!(
        e[0].kind,
        ConfigErrorKind::BadMac {
            interface: label("net1"),
            value: "52:54:00:12:34".into(),
            reason: "has 5 ':'-separated parts, not 6".into()
        }
    );
    assert_eq!(e[1].field, "interface[1].mac");
    assert!(e[1].to_string().contains("'hostdev0'"));
    assert!(e[1].to_string().contains("multicast"));
}

#[test]
fn reading_errors() {
    // Missing alias and model, unknown fields, wrong types, unknown names.
    let fields = toml_error_fields(
        r#"
        colour = "blue"
        [[interface]]
        mac = "52:54:00:12:34:56"
        [[interface]]
        alias = 7
        model = "e1000"
        persistant = "net1"
        [[interface]]
        alias = "vf0"
        model = "hostdev"
        source = 12
        slot = ["rp1"]
        teaming = { type = "primary", persistent = "net1" }
        [[interface]]
        alias = "vf1"
        model = "hostdev"
        source = "0000:3b:02.1"
        slot = "rp3"
        teaming = { persistent = "net1", kind = "transient" }
        [[interface]]
        alias = "vf2"
        model = "stand-in"
        mac = 1979-05-27T07:32:00Z
        teaming = "transient"
        "#,
    );
    assert_eq!(
        fields,
        [
            "colour",
            "interface[0].alias",
            "interface[0].model",
            "interface[1].alias",
            "interface[1].model",
            "interface[1].persistant",
            "interface[2].source",
            "interface[2].slot",
            "interface[2].teaming.type",
            "interface[3].teaming.kind",
            "interface[3].teaming.type",
            "interface[4].mac",
            "interface[4].teaming",
        ]
    );
    let errors = TeamingConfig::from_toml_str(
        "[[interface]]\nalias = \"vf2\"\nmodel = \"stand-in\"\nmac = 1979-05-27T07:32:00Z\n",
    )
    .unwrap_err();
    assert_eq!(
        errors.errors()[0].to_string(),
        "interface[0].mac: interface 'vf2': expected a string, found a date-time"
    );
    let errors = TeamingConfig::from_toml_str(
        "[[interface]]\nalias = \"net1\"\nmodel = \"virtio\"\nmacc = \"x\"\n",
    )
    .unwrap_err();
    assert_eq!(
        errors.to_string(),
        "interface[0].macc: interface 'net1': unknown field 'macc'; the fields here are alias, model, mac, teaming, source, slot"
    );
    let e = TeamingConfig::from_toml_str("[[interface]]\nalias = \"net1\"\nmodel = \"e1000\"\n")
        .unwrap_err();
    assert!(e.to_string().contains("model 'e1000'; use \"virtio\""));
}

#[test]
fn reading_structure_errors() {
    assert_eq!(
        TeamingConfig::from_json_str("[1]")
            .unwrap_err()
            .errors()
            .to_vec(),
        [ConfigError::new(
            "",
            ConfigErrorKind::WrongType {
                interface: None,
                expected: "a table (object) with the interface list",
                found: "an array"
            }
        )]
    );
    let e = TeamingConfig::from_toml_str("[interface]\nalias = \"net1\"\n").unwrap_err();
    assert_eq!(e.errors()[0].field, "interface");
    assert!(
        e.to_string()
            .contains("expected an array of interface tables")
    );
    let e = TeamingConfig::from_json_str(r#"{"interfaces": [1, {"alias": "net1", "alias": "x", "model": "virtio"}], "interface": []}"#)
        .unwrap_err();
    let got: Vec<_> = e.into_iter().map(|e| (e.field, e.kind)).collect();
    assert_eq!(
        got,
        [
            (
                "interface[0]".into(),
                ConfigErrorKind::WrongType {
                    interface: None,
                    expected: "a table (object) of interface fields",
                    found: "an integer"
                }
            ),
            (
                "interface[1].alias".into(),
                ConfigErrorKind::DuplicateField {
                    interface: Some(label("net1")),
                    name: "alias".into()
                }
            ),
            ("interface".into(), ConfigErrorKind::InterfacesTwice),
        ]
    );
    // Nulls are absent values; an absent list is an empty configuration.
    let c = TeamingConfig::from_json_str(
        r#"{"interfaces": [{"alias": "net1", "model": "virtio", "mac": null, "teaming": null}]}"#,
    )
    .unwrap();
    assert_eq!(c, config(vec![Interface::new("net1", Model::Virtio)]));
    assert_eq!(TeamingConfig::from_toml_str("").unwrap(), config(vec![]));
    assert_eq!(TeamingConfig::from_json_str("{}").unwrap(), config(vec![]));
}

#[test]
fn syntax_errors_say_where() {
    let e = TeamingConfig::from_toml_str("[[interface]]\nalias = \"net1\nmodel = 1\n").unwrap_err();
    assert_eq!(e.len(), 1);
    match &e.errors()[0].kind {
        ConfigErrorKind::Syntax {
            format: "TOML",
            line: 2,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(!e.to_string().contains('\n'));
    let e = TeamingConfig::from_json_str("{\"interfaces\": [\n  {\"alias\": }\n]}").unwrap_err();
    match &e.errors()[0].kind {
        ConfigErrorKind::Syntax {
            format: "JSON",
            line: 2,
            column,
            message,
        } => {
            assert!(*column > 1);
            assert!(!message.contains("at line"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("JSON syntax error at line 2, column ")
    );
}

#[test]
fn all_errors_at_once() {
    let toml = r#"
        [[interface]]
        alias = "net1"
        model = "hostdev"
        mac = "52:54:00:12:34:5x"
        slot = "rp1"
        teaming = { type = "persistent", persistent = "net1" }

        [[interface]]
        alias = "net1"
        model = "virtio"
        mac = "52:54:00:zz:34:56"
        slot = "rp1"
        teaming = { type = "transient" }

        [[interface]]
        alias = "vf0"
        model = "hostdev"
        source = "eth0"
        teaming = { type = "transient", persistent = "net9" }

        [[interface]]
        alias = "vf1"
        model = "stand-in"
        slot = "rp2"
        teaming = { type = "transient", persistent = "net2" }

        [[interface]]
        alias = "net2"
        model = "virtio"
        teaming = { type = "persistent" }

        [[interface]]
        alias = "vf2"
        model = "hostdev"
        source = "/sys/bus/pci/devices/0000:3b:02.2"
        slot = "rp3"
        teaming = { type = "transient", persistent = "net2" }
    "#;
    let errors = TeamingConfig::from_toml_str(toml).unwrap_err();
    let got: Vec<(&str, &ConfigErrorKind)> = errors
        .errors()
        .iter()
        .map(|e| (e.field.as_str(), &e.kind))
        .collect();
    let fields: Vec<&str> = got.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        fields,
        [
            // Reading: both bad MACs.
            "interface[0].mac",
            "interface[1].mac",
            // Then validation of the rest.
            "interface[1].alias",
            "interface[0].teaming.persistent",
            "interface[0].model",
            "interface[0].source",
            "interface[1].model",
            "interface[1].teaming.persistent",
            "interface[1].slot",
            "interface[2].teaming.persistent",
            "interface[2].slot",
            "interface[2].source",
            "interface[5].teaming.persistent",
        ]
    );
    assert!(matches!(
        got[2].1,
        ConfigErrorKind::DuplicateAlias { first: 0, .. }
    ));
    assert!(matches!(
        got[3].1,
        ConfigErrorKind::PersistentNotAllowed { .. }
    ));
    assert!(matches!(
        got[4].1,
        ConfigErrorKind::PersistentNotVirtio { .. }
    ));
    assert!(matches!(
        got[5].1,
        ConfigErrorKind::HostdevWithoutSource { .. }
    ));
    assert!(matches!(
        got[6].1,
        ConfigErrorKind::TransientIsVirtio { .. }
    ));
    assert!(matches!(
        got[7].1,
        ConfigErrorKind::TransientWithoutPersistent { .. }
    ));
    assert_eq!(
        got[8].1.to_string(),
        "interface 'net1' (interface[1]) goes into slot 'rp1', which interface 'net1' (interface[0]) already takes; a slot holds one device (a primary must be alone in its slot): give it a slot of its own"
    );
    assert!(matches!(
        got[9].1,
        ConfigErrorKind::UnknownPersistent { .. }
    ));
    assert!(matches!(
        got[10].1,
        ConfigErrorKind::TransientWithoutSlot { .. }
    ));
    assert!(matches!(got[11].1, ConfigErrorKind::BadSource { .. }));
    assert!(matches!(got[12].1, ConfigErrorKind::SecondPrimary { .. }));
    // One line each, each naming its interface.
    let text = errors.to_string();
    assert_eq!(text.lines().count(), errors.len());
    for (line, e) in text.lines().zip(errors.errors()) {
        assert!(line.starts_with(&e.field), "{line}");
        assert!(line.contains("interface '"), "{line}");
    }
}

#[test]
fn toml_and_json_read_equal() {
    let t = TeamingConfig::from_toml_str(VALID_TOML).unwrap();
    let j = TeamingConfig::from_json_str(VALID_JSON).unwrap();
    assert_eq!(t, j);
    assert_eq!(
        t,
        config(vec![
            standby("net1").mac(MAC).slot("rp0"),
            Interface::new("hostdev0", Model::Hostdev)
                .mac(MAC)
                .source("/sys/bus/pci/devices/0000:3b:02.1")
                .slot("rp1")
                .teaming(Teaming::transient("net1")),
        ])
    );
    // Either list name in either format.
    let swapped = VALID_JSON.replacen("\"interfaces\"", "\"interface\"", 1);
    assert_eq!(TeamingConfig::from_json_str(&swapped).unwrap(), t);
    let swapped = VALID_TOML.replace("[[interface]]", "[[interfaces]]");
    assert_eq!(TeamingConfig::from_toml_str(&swapped).unwrap(), t);
    // And the same errors from both.
    let bad_t = VALID_TOML.replace("persistent = \"net1\"", "persistent = \"net9\"");
    let bad_j = VALID_JSON.replace("\"persistent\": \"net1\"", "\"persistent\": \"net9\"");
    let et = TeamingConfig::from_toml_str(&bad_t)
        .unwrap()
        .validate()
        .unwrap_err();
    let ej = TeamingConfig::from_json_str(&bad_j)
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(et, ej);
}

#[test]
fn round_trips() {
    let c = config(vec![
        standby("net1").mac(MAC).slot("rp0"),
        hostdev("hostdev0", "net1", "rp1").mac(MAC),
        standby("net2"),
        Interface::new("standin0", Model::StandIn)
            .slot("rp2")
            .teaming(Teaming::transient("net2")),
        Interface::new("plain", Model::Virtio).teaming(Teaming {
            kind: TeamingType::None,
            persistent: None,
        }),
    ]);
    let toml = c.to_toml_string().unwrap();
    assert!(toml.contains("[[interface]]"), "{toml}");
    assert_eq!(TeamingConfig::from_toml_str(&toml).unwrap(), c);
    let json = c.to_json_string().unwrap();
    assert!(json.contains("\"interfaces\""), "{json}");
    assert!(json.contains("\"stand-in\""), "{json}");
    assert_eq!(TeamingConfig::from_json_str(&json).unwrap(), c);
    // Through serde, as part of a VMM's own configuration.
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Vmm {
        name: String,
        network: TeamingConfig,
    }
    let vmm = Vmm {
        name: "vm0".into(),
        network: c.clone(),
    };
    let text = toml::to_string(&vmm).unwrap();
    assert_eq!(toml::from_str::<Vmm>(&text).unwrap(), vmm);
    let text = serde_json::to_string(&vmm).unwrap();
    assert_eq!(serde_json::from_str::<Vmm>(&text).unwrap(), vmm);
    let err = serde_json::from_str::<Vmm>(
        r#"{"name": "vm0", "network": {"interfaces": [{"alias": "net1", "model": "virtio", "mac": "x"}]}}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("interface[0].mac"), "{err}");
}

#[test]
fn from_path_by_extension() {
    let dir = std::env::temp_dir().join(format!("failover-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("pairs.TOML");
    let json = dir.join("pairs.json");
    let other = dir.join("pairs.yaml");
    std::fs::write(&toml, VALID_TOML).unwrap();
    std::fs::write(&json, VALID_JSON).unwrap();
    std::fs::write(&other, VALID_JSON).unwrap();
    let t = TeamingConfig::from_path(&toml).unwrap();
    assert_eq!(t, TeamingConfig::from_path(&json).unwrap());
    let e = TeamingConfig::from_path(&other).unwrap_err();
    assert_eq!(e.errors()[0].kind, ConfigErrorKind::UnknownFormat);
    assert_eq!(e.errors()[0].field, other.display().to_string());
    let missing = dir.join("missing.toml");
    let e = TeamingConfig::from_path(&missing).unwrap_err();
    assert!(matches!(e.errors()[0].kind, ConfigErrorKind::Io { .. }));
    assert!(e.to_string().starts_with(&missing.display().to_string()));
    // TOML in a .json file is a JSON syntax error.
    std::fs::write(&json, VALID_TOML).unwrap();
    let e = TeamingConfig::from_path(&json).unwrap_err();
    assert!(matches!(
        e.errors()[0].kind,
        ConfigErrorKind::Syntax { format: "JSON", .. }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interface_lookup() {
    let c = TeamingConfig::from_toml_str(VALID_TOML).unwrap();
    assert_eq!(c.interface("hostdev0").unwrap().model, Model::Hostdev);
    assert!(c.interface("net9").is_none());
}

#[test]
fn control_characters_stay_on_one_line() {
    let e = TeamingConfig::from_json_str(
        r#"{"interfaces": [{"alias": "net\n1", "model": "virtio\r", "mac": "52:54\n", "x\ny": 1}], "a\nb": 2}"#,
    )
    .unwrap_err();
    let text = e.to_string();
    assert_eq!(text.lines().count(), e.len(), "{text}");
    assert!(text.contains("'net\\n1'"), "{text}");
}

/// A small deterministic generator (xorshift), for the inputs below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Reads and validates `text` as both formats; returns whether either read.
fn exercise(text: &str) -> bool {
    let mut any = false;
    for result in [
        TeamingConfig::from_toml_str(text),
        TeamingConfig::from_json_str(text),
    ] {
        match result {
            Ok(c) => {
                any = true;
                let _ = c.warnings();
                match c.validate() {
                    Ok(pairs) => {
                        for p in pairs {
                            let _ = (p.standby(), p.sysfs_path(), p.host_function());
                        }
                    }
                    Err(e) => assert!(!e.is_empty() && !e.to_string().is_empty()),
                }
            }
            Err(e) => {
                assert!(!e.is_empty());
                assert_eq!(e.to_string().lines().count(), e.len(), "{e}");
            }
        }
    }
    any
}

#[test]
fn no_input_panics() {
    let fragments = [
        "[[interface]]\n",
        "alias = \"net1\"\n",
        "alias = \"hostdev0\"\n",
        "model = \"virtio\"\n",
        "model = \"hostdev\"\n",
        "model = \"stand-in\"\n",
        "mac = \"52:54:00:12:34:56\"\n",
        "mac = \"52:54:00:12:34:5\"\n",
        "source = \"/sys/bus/pci/devices/0000:3b:02.1\"\n",
        "source = \"/sys/\"\n",
        "slot = \"rp1\"\n",
        "slot = \"\"\n",
        "teaming = { type = \"persistent\" }\n",
        "teaming = { type = \"transient\", persistent = \"net1\" }\n",
        "teaming = { type = \"transient\", persistent = \"hostdev0\" }\n",
        "teaming = { type = \"transient\" }\n",
        "teaming = {}\n",
        "alias = 1\n",
        "x = [1, {a = 2}]\n",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut read = 0;
    for _ in 0..3000 {
        let mut text = String::new();
        for _ in 0..rng.below(14) {
            text.push_str(fragments[rng.below(fragments.len())]);
        }
        if exercise(&text) {
            read += 1;
        }
        // And a mutated valid file, byte by byte (kept UTF-8).
        let base = if rng.below(2) == 0 {
            VALID_TOML
        } else {
            VALID_JSON
        };
        let mut bytes = base.as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] = b" \"{}[]=:,.\n0az-#\\"[rng.below(17)];
        }
        exercise(&String::from_utf8_lossy(&bytes));
    }
    assert!(
        read > 100,
        "the generator should produce readable files too: {read}"
    );
    // Deep nesting and odd values.
    let deep = "[".repeat(100_000);
    exercise(&deep);
    exercise(&format!("a = {}", "[".repeat(100_000)));
    exercise(&format!("{}1{}", "[".repeat(5000), "]".repeat(5000)));
    exercise(r#"{"interfaces": [{"alias": "a", "model": "virtio", "mac": 1e999}]}"#);
    exercise(r#"{"interfaces": [{"alias": "é", "model": "hostdev", "source": "é:é.é"}]}"#);
    exercise("\u{feff}[[interface]]");
    exercise("\0");
}

#[test]
fn deep_dotted_keys() {
    let n = 100_000;
    exercise(&format!("{} = 1", vec!["a"; n].join(".")));
    exercise(&format!("[{}]\nb = 1", vec!["a"; n].join(".")));
    exercise(&format!("[[{}]]\nb = 1", vec!["a"; n].join(".")));
    exercise(&format!("x = {}1{}", "{a = ".repeat(n), "}".repeat(n)));
}
