//! Test doubles for the traits at this crate's boundaries, for tests and
//! benchmarks of functions, buses and ports (feature `test-utils`).
//!
//! - [`RecordingMsi`]: an [`MsiSink`](crate::MsiSink) that records every
//!   delivery and every route update.
//! - [`RecordingIntx`]: an [`IntxSink`](crate::IntxSink) that records the line's
//!   level and every change to it.
//! - [`StubEndpoint`]: a [`PciFunction`](crate::PciFunction) with a config space
//!   and BARs that act as plain memory, for a device whose insides a test does
//!   not need.

mod endpoint;
mod intx;
mod msi;

pub use endpoint::StubEndpoint;
pub use intx::RecordingIntx;
pub use msi::RecordingMsi;
