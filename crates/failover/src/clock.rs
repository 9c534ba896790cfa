//! Where event timestamps and the unplug deadline come from.

use std::time::{Duration, Instant};

/// A monotonic clock: time since an origin of the clock's choosing, never going
/// backwards. Every [`TimedEvent`](crate::TimedEvent) carries a reading, and the
/// bounded wait for a guest's eject is measured on it.
///
/// A VMM uses [`MonotonicClock`] (real time). Tests use the scripted guest's
/// virtual clock through a closure, for which the trait is implemented:
///
/// ```
/// # use std::time::Duration;
/// # let guest_clock = || Duration::from_millis(5020);
/// let clock = move || guest_clock(); // e.g. `move || virtual_clock.now()`
/// let coordinator = failover::Coordinator::builder().clock(clock).build();
/// # let _ = coordinator;
/// ```
pub trait Clock: Send + Sync {
    /// Time since the clock's origin.
    fn now(&self) -> Duration;
}

impl<F: Fn() -> Duration + Send + Sync> Clock for F {
    fn now(&self) -> Duration {
        self()
    }
}

/// Real monotonic time (`std::time::Instant`) since the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn monotonic_clock_moves_forward_from_zero() {
        let c = MonotonicClock::new();
        let a = c.now();
        let b = c.now();
        assert!(a <= b);
        assert!(a < Duration::from_secs(60));
    }

    #[test]
    fn a_closure_is_a_clock() {
        let t = Arc::new(AtomicU64::new(0));
        let t2 = t.clone();
        let c: Box<dyn Clock> = Box::new(move || Duration::from_millis(t2.load(Ordering::SeqCst)));
        assert_eq!(c.now(), Duration::ZERO);
        t.store(5020, Ordering::SeqCst);
        assert_eq!(c.now(), Duration::from_millis(5020));
    }
}
