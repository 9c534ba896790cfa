//! The contract itself.

use crate::error::Result;
use crate::wire::Encode;

/// A device whose guest-visible state can move to another instance of it.
///
/// The life of a state:
///
/// 1. Source: quiesce the device (no vCPU or worker thread touching it), then
///    [`save`](Persist::save). Encode the state with [`to_bytes`](crate::to_bytes),
///    or nest it in the VMM's own snapshot (the `serde` feature).
/// 2. Destination: build the device from the same configuration as the source
///    (same ids, sizes, capabilities, queue counts), then
///    [`restore`](Persist::restore) the state onto it before the guest runs.
///
/// `restore` checks the configuration first and refuses a state that does not
/// fit with [`Error::Mismatch`](crate::Error::Mismatch), leaving the device as it
/// was built. It never panics, whatever the state holds: a state is input from
/// another host.
pub trait Persist {
    /// The saved state: plain data, separate from the live device.
    type State: Encode + Clone + std::fmt::Debug + PartialEq;

    /// Takes the guest-visible state. Fails with
    /// [`Error::Busy`](crate::Error::Busy) when the device is in the middle of
    /// something that cannot be carried across (the text says what to wait for).
    fn save(&self) -> Result<Self::State>;

    /// Applies `state` to this freshly built device.
    fn restore(&mut self, state: &Self::State) -> Result<()>;
}
