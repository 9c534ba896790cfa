//! How a device raises interrupts.

use std::io;

/// What an interrupt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration space changed (link, announce, needs-reset).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device raises interrupts. The transport implements it (an irqfd per
/// MSI-X vector in a KVM VMM). A transport's `trigger(Config)` is also where it
/// bumps `config_generation`.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt. A device calls it at most once per processed batch
    /// and only when the driver has not suppressed it.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;
}
