//! Arbitrary text as a teaming configuration, TOML and JSON
//! (`failover::config`).
//!
//! Checked: reading and validating never panic; every error and warning
//! names its field (a path such as `interface[1].teaming.persistent`, or the
//! document for a syntax error) and says something; a configuration that
//! validates writes out as TOML and as JSON and reads back equal, and
//! validates the same way; its pairs build the coordinator's `Standby`.

#![no_main]

use failover::config::TeamingConfig;
use libfuzzer_sys::fuzz_target;

fn check(parsed: Result<TeamingConfig, failover::config::ConfigErrors>) {
    let config = match parsed {
        Ok(c) => c,
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal without an error");
            for e in errors.errors() {
                let text = e.to_string();
                assert!(!text.is_empty());
                // A syntax error is about the whole document (empty field);
                // anything else names the field it is about.
                assert!(text.starts_with(&e.field), "{text}");
            }
            return;
        }
    };
    for w in config.warnings() {
        assert!(!w.to_string().is_empty());
    }
    let Ok(pairs) = config.validate() else {
        return;
    };
    for p in &pairs {
        let standby = p.standby();
        assert_eq!(standby.id(), p.pair_id());
        let _ = (p.primary_id(), p.primary_mac(), p.slot(), p.sysfs_path());
    }
    let n = pairs.len();
    let toml = config
        .to_toml_string()
        .expect("a valid configuration writes as TOML");
    let back = TeamingConfig::from_toml_str(&toml).expect("what we write we read");
    assert_eq!(back, config, "TOML round trip:\n{toml}");
    let json = config
        .to_json_string()
        .expect("a valid configuration writes as JSON");
    let back = TeamingConfig::from_json_str(&json).expect("what we write we read");
    assert_eq!(back, config, "JSON round trip:\n{json}");
    assert_eq!(back.validate().map(|p| p.len()).ok(), Some(n));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(TeamingConfig::from_toml_str(text));
    check(TeamingConfig::from_json_str(text));
});
