//! The state contract for migratable devices.
//!
//! A device that a guest can see must be rebuilt on a migration destination
//! exactly as the guest left it. This crate gives every device in the workspace
//! one contract for that, in the spirit of Firecracker's `Persist`:
//!
//! - [`Persist::State`] is a plain data type, separate from the live object: no
//!   file descriptors, no locks, no guest memory, only what the guest programmed.
//! - [`Persist::save`] takes it from a quiesced device. A device that cannot be
//!   saved right now (a hot-plug operation in flight) says why, as
//!   [`Error::Busy`].
//! - [`Persist::restore`] applies it to a device that the VMM has just built from
//!   the same configuration as the saved one. A state that does not fit the
//!   device is refused with [`Error::Mismatch`], naming what differs; it never
//!   panics.
//!
//! State types travel in a bounded, CRC-checked binary form ([`to_bytes`] /
//! [`from_bytes`], built on [`Encode`]): every length is checked against what
//! is left before anything is allocated, so corrupt or hostile input is an
//! [`Error`], never a panic or a huge allocation. With the `serde` feature the
//! state types also derive `Serialize` and `Deserialize`, so a VMM can nest them
//! in a snapshot of its own format.
//!
//! ```
//! use device_state::{Encode, Error, Persist, Reader, Result, Writer, from_bytes, to_bytes};
//!
//! /// A device with one guest-programmed register and one fixed size.
//! struct Timer { period: u32, width: u8 }
//!
//! #[derive(Debug, Clone, PartialEq)]
//! struct TimerState { period: u32, width: u8 }
//!
//! impl Encode for TimerState {
//!     const MAGIC: [u8; 8] = *b"EXTIMER\0";
//!     const VERSION: u16 = 1;
//!     fn encode(&self, w: &mut Writer) { w.u32(self.period); w.u8(self.width); }
//!     fn decode(r: &mut Reader<'_>) -> Result<Self> {
//!         Ok(TimerState { period: r.u32("period")?, width: r.u8("width")? })
//!     }
//! }
//!
//! impl Persist for Timer {
//!     type State = TimerState;
//!     fn save(&self) -> Result<TimerState> {
//!         Ok(TimerState { period: self.period, width: self.width })
//!     }
//!     fn restore(&mut self, s: &TimerState) -> Result<()> {
//!         Error::check("timer width", s.width, self.width)?;
//!         self.period = s.period;
//!         Ok(())
//!     }
//! }
//!
//! let bytes = to_bytes(&Timer { period: 10, width: 32 }.save().unwrap());
//! let mut dest = Timer { period: 0, width: 32 };
//! dest.restore(&from_bytes::<TimerState>(&bytes).unwrap()).unwrap();
//! assert_eq!(dest.period, 10);
//! // A destination built with another configuration refuses, naming the field.
//! let err = Timer { period: 0, width: 16 }.restore(&from_bytes(&bytes).unwrap());
//! assert!(err.unwrap_err().to_string().contains("timer width"));
//! ```

#![deny(missing_docs)]

mod error;
mod persist;
mod wire;

pub use error::{Error, Result};
pub use persist::Persist;
pub use wire::{Encode, Reader, Writer, crc32, from_bytes, to_bytes};
