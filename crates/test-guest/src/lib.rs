//! A scripted guest for tests and benches: Linux's PCI, virtio-pci and pciehp
//! sequences over the register interface only, on a virtual clock.
//!
//! - [`VirtualClock`]: time the guest's waits advance without real sleeping, so
//!   pciehp's 5-second button window costs nothing.
//! - [`Enumerator`]: an ECAM walk that numbers buses, sizes and assigns BARs,
//!   programs bridge windows (with Linux's 2 MiB hot-plug reserve) and parses
//!   capability lists.
//! - [`virtio`]: the `virtio_pci_modern` probe sequence, including re-reading
//!   `FEATURES_OK` and MSI-X vector read-back.
//! - [`Pciehp`]: Linux 6.1 pciehp (Debian's 6.1.192), step for step: its state
//!   machine (`OFF`, `ON`, `BLINKINGON`, `BLINKINGOFF`, `POWERON`, `POWEROFF`),
//!   interrupt handler and thread, the command-completed handshake, the 5 s
//!   button delay, the link wait (20 ms, then polls every 10 ms for 1 s, then
//!   100 ms), the vendor ID check (every 20 ms for up to 1 s), and the 1 s wait
//!   after power off; [`PciehpHook`] lands a test's VMM call at an exact point.
//! - [`net`]: a virtio-net driver polling the probed rings ([`NetIf`]) and
//!   Linux's `net_failover` choosing its transmit path ([`NetFailover`]).
//! - [`Guest`]: all of it wired together with an interrupt queue that stands in
//!   for the local APIC.

#![deny(missing_docs)]

mod clock;
mod enumerate;
mod env;
mod guest;
mod irq;
pub mod net;
mod pciehp;
pub mod virtio;

/// The workspace README's embedding examples, compiled as doctests here (this
/// crate's dev-dependencies cover every crate they use) so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// `docs/EMBEDDING.md`'s VMM wiring, compiled the same way.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/EMBEDDING.md")]
pub struct EmbeddingDoctests;

pub use clock::VirtualClock;
pub use enumerate::{Enumerator, Found, FoundBar};
pub use env::Env;
pub use guest::Guest;
pub use irq::IrqQueue;
pub use net::{GuestRam, NetFailover, NetIf, Slave};
pub use pciehp::{Pciehp, PciehpHook, PciehpState, Timings};
pub use virtio::{QueueRings, VirtioProbe};
/// A stub endpoint for devices whose insides a scenario does not need (such as
/// the VF a failover test plugs); defined in `vmm-pci`'s `test-utils`.
pub use vmm_pci::testing::StubEndpoint;
