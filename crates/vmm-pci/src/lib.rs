//! A register-exact PCI and PCI Express function model for VMMs.
//!
//! - [`ConfigSpace`]: 256 or 4096 bytes of configuration space where every bit is
//!   read-only, read-write or write-1-to-clear, type 0 and type 1 headers, the BAR
//!   sizing protocol and capability lists.
//! - [`pcie`]: the PCI Express capability (version 2) with device, link and slot
//!   registers, named as the specification names them.
//! - [`Msi`] and [`Msix`]: message-signalled interrupts with masking and pending bits,
//!   delivered through [`MsiSink`], which the VMM implements (an irqfd per vector in a
//!   KVM VMM; [`EventFdMsi`] is that implementation).
//! - [`PciFunction`]: what every device implements; [`PciRoot`]: a bus that routes
//!   configuration cycles by bus/device/function through bridges (with ECAM
//!   helpers), and MMIO/IO cycles to the BAR that decodes them.
//!
//! Migration: [`ConfigSpace`], [`Msi`] and [`Msix`] implement
//! [`device_state::Persist`] with [`ConfigSpaceState`], [`MsiState`] and
//! [`MsixState`]; the [`msix`] module documentation gives the restore order of a
//! function with MSI-X.
//!
//! Test doubles ([`MsiSink`] and [`IntxSink`] recorders, a stub endpoint) are in
//! `testing`, behind the `test-utils` feature.
//!
//! Guest accesses never panic: an access that is not 1, 2 or 4 bytes within one
//! dword, or that falls outside the space, reads as all-ones and is ignored when
//! written, and each is counted.

#![deny(missing_docs)]

mod address;
mod bar;
mod bus;
pub mod config;
mod function;
mod interrupt;
pub mod msi;
pub mod msix;
pub mod pcie;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use address::{Bdf, ecam_offset};
pub use bar::{BarKind, BarMove, BarRegion, BarRegions, MAX_BARS, ROM_INDEX};
pub use bus::{BarListener, Error as BusError, PciRoot, handle};
pub use config::{BarState, ClassCode, ConfigSpace, ConfigSpaceState, HeaderType, PciIds};
pub use function::{BusRange, PciFunction, PciHandle};
pub use interrupt::{Delivery, EventFdMsi, IntxSink, MsiMessage, MsiSink};
pub use msi::{Msi, MsiState};
pub use msix::{Msix, MsixEntry, MsixState};
