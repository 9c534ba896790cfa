//! [`RecordingIntx`]: an INTx line that records its level.

use std::sync::Mutex;

use crate::interrupt::IntxSink;

/// Records every [`IntxSink::set_level`]: the line's level now and every level
/// it was set to, in order (repeats included, since a function may set the level
/// it already has). The line starts deasserted.
#[derive(Debug, Default)]
pub struct RecordingIntx {
    history: Mutex<Vec<bool>>,
}

impl RecordingIntx {
    /// A deasserted line that has recorded nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the line is asserted now: the last level set, `false` before any.
    pub fn level(&self) -> bool {
        self.lock().last().copied().unwrap_or(false)
    }

    /// Every level set so far, oldest first.
    pub fn history(&self) -> Vec<bool> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IntxSink for RecordingIntx {
    fn set_level(&self, asserted: bool) {
        self.lock().push(asserted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_follows_the_last_set_and_history_keeps_all() {
        let line = RecordingIntx::new();
        assert!(!line.level());
        line.set_level(true);
        assert!(line.level());
        line.set_level(true);
        line.set_level(false);
        assert!(!line.level());
        assert_eq!(line.history(), [true, true, false]);
    }
}
