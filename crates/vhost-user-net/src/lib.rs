//! A vhost-user net backend for the standby device: the
//! [`virtio_net_standby::StandbyNet`] packet path, served to any vhost-user
//! frontend (QEMU, Cloud Hypervisor, User-Mode Linux, DPDK's virtio-user).
//!
//! ```no_run
//! use vhost_user_net::{Server, VhostUserNet};
//! use virtio_net_standby::{StandbyNetBuilder, Tap};
//!
//! let taps = Tap::open_queues("vu-tap0", 1).unwrap();
//! let device = StandbyNetBuilder::new()
//!     .id("net1")
//!     .mac([0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc])
//!     .build(taps)
//!     .unwrap();
//! let net = VhostUserNet::new("net1", device).unwrap();
//! let server = Server::bind("/run/vhost-user-net.sock", net.clone()).unwrap();
//! // From another thread: net.set_link_up(false), server.shutdown_handle().shutdown().
//! server.run().unwrap();
//! ```
//!
//! Modules: [`backend`] (the device as a `VhostUserBackend`), [`server`] (the
//! listening socket and reconnection), [`relay`] (message framing and frontend
//! quirks), [`channel`] (configuration-change notifications), [`control`] (a
//! text control socket for the daemon).
//!
//! The `vhost-user-net` daemon built on this library is the
//! `vhost-user-net-daemon` package (`cargo run -p vhost-user-net-daemon -- --help`),
//! so that the library does not depend on its command line and logging crates.

#![deny(missing_docs)]

pub mod backend;
pub mod channel;
pub mod control;
pub mod dirty;
pub mod relay;
pub mod server;

pub use backend::{
    DEFAULT_SETTLE_CHAINS, DEFAULT_SETTLE_PAUSES, PairStats, VhostUserMemory, VhostUserNet,
    protocol_features, rarp_frame,
};
pub use channel::BackendChannel;
pub use dirty::{LogBitmap, MigrationLog};
pub use server::{Server, ServerStats, ShutdownHandle};
