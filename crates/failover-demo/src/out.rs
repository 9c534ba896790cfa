//! What a side prints: the coordinator's events and the guest's
//! `net_failover` lines as they happen, each with guest (virtual) time and the
//! real time since the process started; human-readable, or JSON lines.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failover::{EventListener, TimedEvent};

/// One side's printer. Clones share the start time.
#[derive(Debug, Clone)]
pub struct Out {
    side: &'static str,
    json: bool,
    start: Instant,
}

fn secs(d: Duration) -> String {
    format!("{:>3}.{:06}", d.as_secs(), d.subsec_micros())
}

impl Out {
    /// A printer for `side` ("source" or "destination").
    pub fn new(side: &'static str, json: bool) -> Out {
        Out {
            side,
            json,
            start: Instant::now(),
        }
    }

    /// Whether it prints JSON lines.
    pub fn json(&self) -> bool {
        self.json
    }

    fn real_ms(&self) -> f64 {
        (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3
    }

    fn line(&self, s: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    /// A coordinator event.
    pub fn event(&self, e: &TimedEvent) {
        if self.json {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("side".into(), self.side.into());
                m.insert("real_ms".into(), self.real_ms().into());
            }
            self.line(&v.to_string());
        } else {
            self.line(&format!(
                "[{:<11}] guest {} s  real {:>8.1} ms  {}",
                self.side,
                secs(e.timestamp),
                self.real_ms(),
                e.event
            ));
        }
    }

    /// A line of the guest's `net_failover` log.
    pub fn guest(&self, at: Duration, text: &str) {
        if self.json {
            let v = serde_json::json!({
                "side": self.side,
                "real_ms": self.real_ms(),
                "guest": { "seconds": at.as_secs(), "microseconds": at.subsec_micros() },
                "net_failover": text,
            });
            self.line(&v.to_string());
        } else {
            self.line(&format!(
                "[{:<11}] guest {} s  real {:>8.1} ms    guest: net_failover: {text}",
                self.side,
                secs(at),
                self.real_ms()
            ));
        }
    }

    /// A note from the VMM (human output only).
    pub fn note(&self, at: Duration, text: &str) {
        if self.json {
            let v = serde_json::json!({
                "side": self.side,
                "real_ms": self.real_ms(),
                "guest": { "seconds": at.as_secs(), "microseconds": at.subsec_micros() },
                "vmm": text,
            });
            self.line(&v.to_string());
        } else {
            self.line(&format!(
                "[{:<11}] guest {} s  real {:>8.1} ms    vmm: {text}",
                self.side,
                secs(at),
                self.real_ms()
            ));
        }
    }

    /// A coordinator listener that prints every event.
    pub fn listener(&self) -> Arc<dyn EventListener> {
        let me = self.clone();
        Arc::new(move |e: &TimedEvent| me.event(e))
    }
}
