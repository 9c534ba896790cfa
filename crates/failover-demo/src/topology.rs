//! The pair the demo builds, read from a teaming configuration in libvirt's
//! vocabulary (`failover::config`): the built-in one below, or `--config FILE`
//! (TOML or JSON). The demo has no VFIO, so its primary must be a `stand-in`.

use std::path::Path;

use failover::config::{Model, TeamingConfig};

/// The demo's own configuration.
pub const DEFAULT_CONFIG: &str = r#"
# The standby: virtio-net with failover (QEMU's failover=on, libvirt's teaming persistent).
[[interface]]
alias = "net1"
model = "virtio"
mac = "52:54:00:6f:55:cc"
slot = "rp1"
teaming = { type = "persistent" }

# The primary: a virtio-net function without STANDBY standing in for a VF (teaming transient).
[[interface]]
alias = "hostdev0"
model = "stand-in"
mac = "52:54:00:6f:55:cc"
slot = "rp2"
teaming = { type = "transient", persistent = "net1" }
"#;

/// One failover pair and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The standby's id.
    pub standby_id: String,
    /// The primary's id.
    pub primary_id: String,
    /// The standby's MAC (the guest's).
    pub standby_mac: [u8; 6],
    /// The primary's MAC.
    pub primary_mac: [u8; 6],
    /// The standby's root port.
    pub standby_slot: String,
    /// The primary's root port.
    pub primary_slot: String,
}

impl Topology {
    /// Reads `path`, or the built-in configuration; every problem at once.
    pub fn load(path: Option<&Path>) -> Result<(Topology, Vec<String>), String> {
        let config = match path {
            Some(p) => TeamingConfig::from_path(p),
            None => TeamingConfig::from_toml_str(DEFAULT_CONFIG),
        }
        .map_err(|e| format!("the teaming configuration:\n{e}"))?;
        let pairs = config
            .validate()
            .map_err(|e| format!("the teaming configuration:\n{e}"))?;
        let warnings = config.warnings().iter().map(|w| w.to_string()).collect();
        let [pair] = pairs.as_slice() else {
            return Err(format!(
                "the demo runs one failover pair; the configuration has {}",
                pairs.len()
            ));
        };
        let (Some(primary), Some(model)) = (pair.primary_id(), pair.primary_model()) else {
            return Err(format!(
                "standby '{}' has no transient primary: the demo needs one",
                pair.pair_id()
            ));
        };
        if model != Model::StandIn {
            return Err(format!(
                "primary '{primary}' is model '{}'; the demo has no VFIO, use model \"stand-in\"",
                model.name()
            ));
        }
        let mac = |m: Option<failover::MacAddress>, who: &str| {
            m.map(|m| m.0)
                .ok_or_else(|| format!("'{who}' needs a mac for the guest to pair it"))
        };
        let standby_slot = pair
            .standby_interface()
            .slot
            .clone()
            .unwrap_or_else(|| "rp1".into());
        let primary_slot = pair.slot().unwrap_or("rp2").to_string();
        if standby_slot == primary_slot {
            return Err(format!(
                "the standby and the primary are both in slot '{primary_slot}'"
            ));
        }
        Ok((
            Topology {
                standby_id: pair.pair_id().to_string(),
                primary_id: primary.to_string(),
                standby_mac: mac(pair.standby_mac(), pair.pair_id())?,
                primary_mac: mac(pair.primary_mac(), primary)?,
                standby_slot,
                primary_slot,
            },
            warnings,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_configuration_is_one_stand_in_pair() {
        let (t, warnings) = Topology::load(None).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            (t.standby_id.as_str(), t.primary_id.as_str()),
            ("net1", "hostdev0")
        );
        assert_eq!(t.standby_mac, t.primary_mac);
        assert_eq!(
            (t.standby_slot.as_str(), t.primary_slot.as_str()),
            ("rp1", "rp2")
        );
    }

    #[test]
    fn a_hostdev_primary_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("failover-demo-topo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vm.toml");
        let cfg = DEFAULT_CONFIG.replace(
            "model = \"stand-in\"",
            "model = \"hostdev\"\nsource = \"0000:3b:02.1\"",
        );
        std::fs::write(&p, cfg).unwrap();
        let e = Topology::load(Some(&p)).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("use model \"stand-in\""), "{e}");
    }
}
