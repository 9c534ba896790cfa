//! Test doubles and a guest-side driver, for tests, benchmarks and fuzzing
//! (feature `test-utils`).
//!
//! - [`TestMemory`]: mmap-backed guest memory ([`GuestMem`]) with a bump
//!   allocator.
//! - [`DriverQueue`]: the driver's half of a split virtqueue: it owns the rings
//!   in guest memory, adds chains, publishes them, and reads used elements back.
//!   It writes exactly what a driver writes, so the device under test cannot
//!   tell it from a real one.
//! - [`RecordingInterrupt`]: counts interrupts per queue.
//! - [`GuestDriver`]: negotiates and activates a whole
//!   [`StandbyNet`](crate::StandbyNet), posts RX buffers and sends frames, like a
//!   minimal virtio-net driver.
//! - [`RecordingBackend`]: a backend that records what the device does to it
//!   ([`BackendLog`]) and delivers queued frames.
//! - [`frame`], [`tcp4_frame`], [`tso4_header`]: frames to send.
//! - [`pair_send`], [`pair_recv`]: the peer's side of a [`pair`](crate::pair) end.
//! - [`Entropy`], [`Rng`], [`InputBytes`]: where randomized drivers get their
//!   choices.
//! - [`HostileGuest`]: a randomized hostile driver, shared by the tests and the
//!   fuzz target.
//! - [`PacketSocket`]: the host side of a tap.

mod driver_queue;
mod entropy;
mod frames;
mod guest_driver;
mod hostile_guest;
mod interrupt;
mod memory;
mod packet_socket;
mod pair_io;
mod recording_backend;

pub use driver_queue::DriverQueue;
pub use entropy::{Entropy, InputBytes, Rng};
pub use frames::{frame, tcp4_frame, tso4_header};
pub use guest_driver::GuestDriver;
pub use hostile_guest::HostileGuest;
pub use interrupt::RecordingInterrupt;
pub use memory::{GuestMem, TestMemory};
pub use packet_socket::PacketSocket;
pub use pair_io::{pair_recv, pair_send};
pub use recording_backend::{BackendLog, RecordingBackend};
