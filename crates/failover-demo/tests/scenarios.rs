//! The demo's scenarios, run as a user runs them (two processes), checked
//! from the JSON event stream and summary.

use std::process::Command;

use serde_json::Value;

struct Run {
    code: i32,
    lines: Vec<Value>,
}

impl Run {
    fn summary(&self) -> &Value {
        self.lines
            .last()
            .expect("output")
            .get("summary")
            .expect("the last line is the summary")
    }

    /// The events of `side`, by name, in order.
    fn events(&self, side: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l["side"] == side && l.get("event").is_some())
            .map(|l| l["event"].as_str().unwrap().to_string())
            .collect()
    }

    fn status(&self, side: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l["side"] == side && l["event"] == "MIGRATION")
            .map(|l| l["data"]["status"].as_str().unwrap().to_string())
            .collect()
    }

    fn vmm_notes(&self, side: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l["side"] == side)
            .filter_map(|l| l.get("vmm").and_then(Value::as_str).map(str::to_string))
            .collect()
    }
}

fn run(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_failover-demo"))
        .arg("--json")
        .args(args)
        .output()
        .expect("run failover-demo");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        lines,
    }
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn migration_with_make_before_break_loses_nothing() {
    let r = run(&[]);
    let s = r.summary();
    assert_eq!(r.code, 0, "{s}");
    assert_eq!(s["ok"], true);
    assert_eq!(count(&s["lost"]), 0);
    assert_eq!(count(&s["corrupted_or_unexpected"]), 0);
    assert_eq!(count(&s["source_wire"]["lost_in_port"]), 0);
    // Traffic used both paths, and the primary again on the destination.
    assert!(count(&s["requests_sent"]["primary"]) > 0);
    assert!(count(&s["requests_sent"]["standby"]) > 0);
    assert!(count(&s["destination_wire"]["requests"][1]) > 0, "{s}");
    let src = r.events("source");
    let order = [
        "FAILOVER_NEGOTIATED",
        "PRIMARY_PLUGGED",
        "PRIMARY_LINK_DOWN",
        "SWITCHED_TO_STANDBY",
        "UNPLUG_PRIMARY",
        "PRIMARY_UNPLUGGED",
    ];
    let mut at = 0;
    for e in order {
        at += src[at..]
            .iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("{e} missing or out of order in {src:?}"));
    }
    assert_eq!(
        r.status("source"),
        ["setup", "wait-unplug", "active", "completed"]
    );
    let dst = r.events("destination");
    assert!(dst.contains(&"FAILOVER_NEGOTIATED".to_string()), "{dst:?}");
    assert!(dst.contains(&"PRIMARY_PLUGGED".to_string()), "{dst:?}");
}

#[test]
fn without_make_before_break_the_primary_takes_frames_with_it() {
    let r = run(&["--no-make-before-break"]);
    let s = r.summary();
    assert_eq!(r.code, 1, "{s}");
    assert!(count(&s["lost"]) > 0, "{s}");
    assert_eq!(s["lost"], s["source_wire"]["lost_in_port"], "{s}");
    assert!(
        !r.events("source")
            .contains(&"PRIMARY_LINK_DOWN".to_string())
    );
}

#[test]
fn a_cancel_inside_the_button_window_keeps_the_primary() {
    let r = run(&["--cancel"]);
    let s = r.summary();
    assert_eq!(r.code, 0, "{s}");
    assert_eq!(count(&s["lost"]), 0);
    let src = r.events("source");
    assert!(src.contains(&"UNPLUG_CANCELLED".to_string()), "{src:?}");
    assert!(src.contains(&"PRIMARY_LINK_UP".to_string()), "{src:?}");
    assert!(!src.contains(&"PRIMARY_UNPLUGGED".to_string()), "{src:?}");
    assert_eq!(
        r.status("source").last().map(String::as_str),
        Some("cancelled")
    );
    assert!(
        r.events("destination")
            .iter()
            .all(|e| e != "PRIMARY_PLUGGED")
    );
}

#[test]
fn pre_flight_refuses_an_older_destination_before_unplugging_anything() {
    let r = run(&["--fail-destination"]);
    let s = r.summary();
    assert_eq!(r.code, 0, "{s}");
    assert_eq!(count(&s["lost"]), 0);
    let src = r.events("source");
    for e in ["PRIMARY_LINK_DOWN", "UNPLUG_PRIMARY", "PRIMARY_UNPLUGGED"] {
        assert!(!src.contains(&e.to_string()), "{e} in {src:?}");
    }
    assert!(
        r.vmm_notes("source")
            .iter()
            .any(|n| n.contains("pre-flight refused") && n.contains("0x8000")),
        "{:?}",
        r.vmm_notes("source")
    );
    assert_eq!(count(&s["requests_sent"]["standby"]), 0, "{s}");
}

#[test]
fn the_pair_comes_from_a_json_teaming_configuration() {
    let dir = std::env::temp_dir().join(format!("failover-demo-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("pair.json");
    std::fs::write(
        &p,
        r#"{"interfaces": [
            {"alias": "ua-net7", "model": "virtio", "mac": "52:54:00:aa:bb:07",
             "slot": "port7", "teaming": {"type": "persistent"}},
            {"alias": "hostdev7", "model": "stand-in", "mac": "52:54:00:aa:bb:07",
             "slot": "port8", "teaming": {"type": "transient", "persistent": "ua-net7"}}
        ]}"#,
    )
    .unwrap();
    let r = run(&["--config", p.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(r.code, 0, "{}", r.summary());
    let plugged: Vec<_> = r
        .lines
        .iter()
        .filter(|l| l["event"] == "PRIMARY_PLUGGED")
        .map(|l| {
            (
                l["side"].as_str().unwrap(),
                l["data"]["primary"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        plugged,
        [("source", "hostdev7"), ("destination", "hostdev7")]
    );
}

/// `--tap` needs root (a network namespace, taps, a bridge) and ip(8); CI
/// runs as root with iproute2. Elsewhere it says why it skips.
#[test]
fn with_real_taps_on_a_bridge_nothing_is_lost() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !ip || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: --tap needs root, ip(8) and /dev/net/tun");
        return;
    }
    let r = run(&["--tap"]);
    let s = r.summary();
    assert_eq!(r.code, 0, "{s}");
    assert_eq!(s["tap"], true);
    assert_eq!(count(&s["lost"]), 0);
    let sent = count(&s["requests_sent"]["primary"]) + count(&s["requests_sent"]["standby"]);
    let answered = count(&s["host_answered"]["source"]) + count(&s["host_answered"]["destination"]);
    assert_eq!(sent, answered, "{s}");
    assert!(
        r.events("source")
            .contains(&"PRIMARY_LINK_DOWN".to_string())
    );
}

/// The guest time of `side`'s first MIGRATION event with `status`.
fn status_at(r: &Run, side: &str, status: &str) -> f64 {
    let l = r
        .lines
        .iter()
        .find(|l| l["side"] == side && l["event"] == "MIGRATION" && l["data"]["status"] == status)
        .unwrap_or_else(|| panic!("no {status} on the {side}"));
    l["timestamp"]["seconds"].as_f64().unwrap()
        + l["timestamp"]["microseconds"].as_f64().unwrap() / 1e6
}

#[test]
fn surprise_removal_after_make_before_break_ends_wait_unplug_at_once() {
    let r = run(&["--hotplug", "surprise"]);
    let s = r.summary();
    assert_eq!(r.code, 0, "{s}");
    assert_eq!(count(&s["lost"]), 0);
    let waited = status_at(&r, "source", "active") - status_at(&r, "source", "wait-unplug");
    // One ping interval for the guest's first frame on the standby, then out.
    assert!(
        (0.0..0.05).contains(&waited),
        "wait-unplug took {waited} s of guest time"
    );
    let pciehp = run(&[]);
    let waited_pciehp =
        status_at(&pciehp, "source", "active") - status_at(&pciehp, "source", "wait-unplug");
    assert!(waited_pciehp > 5.0, "{waited_pciehp}");
}
