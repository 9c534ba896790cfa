//! What one processing call did: [`Processed`], the outcome of a TX, RX or
//! control-queue pass.

/// What one processing call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    /// Chains taken from the available ring (sent, dropped or returned).
    pub chains: usize,
    /// The call stopped at its budget with work left: call it again soon (after
    /// serving other queues) rather than waiting for a kick.
    pub more: bool,
    /// TX: the backend is full; wait for its readiness fd. RX: the guest has no
    /// buffers; wait for its kick.
    pub blocked: bool,
    /// An interrupt was raised.
    pub notified: bool,
}
