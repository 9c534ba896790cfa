//! [`RecordingMsi`]: an MSI sink that records what a function sends.

use std::sync::{Mutex, MutexGuard};

use crate::interrupt::{MsiMessage, MsiSink};

/// Records every [`MsiSink::deliver`] as `(vector, message)` and every
/// [`MsiSink::update_route`] as `(vector, route)`, in order. Share it with the
/// function under test (`Arc<RecordingMsi>` coerces to `Arc<dyn MsiSink>`) and
/// read it back with the accessors; the `take_*` ones also clear.
#[derive(Debug, Default)]
pub struct RecordingMsi {
    delivered: Mutex<Vec<(u16, MsiMessage)>>,
    routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RecordingMsi {
    /// A sink that has recorded nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The deliveries so far, oldest first, as `(vector, message)`.
    pub fn delivered(&self) -> Vec<(u16, MsiMessage)> {
        lock(&self.delivered).clone()
    }

    /// The vectors of the deliveries so far, oldest first.
    pub fn delivered_vectors(&self) -> Vec<u16> {
        lock(&self.delivered).iter().map(|d| d.0).collect()
    }

    /// The deliveries so far, oldest first; forgets them.
    pub fn take_delivered(&self) -> Vec<(u16, MsiMessage)> {
        std::mem::take(&mut *lock(&self.delivered))
    }

    /// The route updates so far, oldest first, as `(vector, route)`: `None` when
    /// the vector could no longer fire.
    pub fn routes(&self) -> Vec<(u16, Option<MsiMessage>)> {
        lock(&self.routes).clone()
    }

    /// The route updates so far, oldest first; forgets them.
    pub fn take_routes(&self) -> Vec<(u16, Option<MsiMessage>)> {
        std::mem::take(&mut *lock(&self.routes))
    }

    /// The route last reported for `vector`: `None` if it never was, `Some(None)`
    /// if the vector could not fire then, `Some(Some(message))` if it was live.
    pub fn last_route(&self, vector: u16) -> Option<Option<MsiMessage>> {
        lock(&self.routes)
            .iter()
            .rev()
            .find(|r| r.0 == vector)
            .map(|r| r.1)
    }
}

impl MsiSink for RecordingMsi {
    fn deliver(&self, vector: u16, message: MsiMessage) {
        lock(&self.delivered).push((vector, message));
    }

    fn update_route(&self, vector: u16, message: Option<MsiMessage>) {
        lock(&self.routes).push((vector, message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_deliveries_and_routes_in_order() {
        let sink = RecordingMsi::new();
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        sink.update_route(1, Some(m));
        sink.deliver(1, m);
        sink.update_route(1, None);
        sink.deliver(0, MsiMessage { data: 0x40, ..m });
        assert_eq!(sink.delivered_vectors(), [1, 0]);
        assert_eq!(sink.last_route(1), Some(None));
        assert_eq!(sink.last_route(0), None);
        assert_eq!(sink.routes(), [(1, Some(m)), (1, None)]);
        assert_eq!(sink.take_delivered()[0], (1, m));
        assert!(sink.delivered().is_empty());
        assert_eq!(sink.take_routes().len(), 2);
        assert!(sink.routes().is_empty());
    }
}
