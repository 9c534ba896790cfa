//! Virtual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A clock that only moves when the guest waits. Clones share the time, so a
/// completion callback can note when something happened.
#[derive(Debug, Clone, Default)]
pub struct VirtualClock {
    ns: Arc<AtomicU64>,
}

/// Saved as the time it shows; restored as a clock of its own at that time.
#[cfg(feature = "serde")]
impl serde::Serialize for VirtualClock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.now().serialize(s)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for VirtualClock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let now = Duration::deserialize(d)?;
        let c = VirtualClock::new();
        c.advance_to(now);
        Ok(c)
    }
}

impl VirtualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time since the guest booted.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.ns.load(Ordering::Acquire))
    }

    /// Advances time by `d` (a guest `msleep`).
    pub fn sleep(&self, d: Duration) {
        self.ns.fetch_add(d.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Moves time forward to `t` (never backwards).
    pub fn advance_to(&self, t: Duration) {
        self.ns.fetch_max(t.as_nanos() as u64, Ordering::AcqRel);
    }

    /// This clock as a function, the form `pcie_hotplug::RootPortBuilder::clock`
    /// takes.
    pub fn now_fn(&self) -> Arc<dyn Fn() -> Duration + Send + Sync> {
        let c = self.clone();
        Arc::new(move || c.now())
    }
}
