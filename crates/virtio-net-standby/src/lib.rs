//! A virtio-net device that offers `VIRTIO_NET_F_STANDBY`: the standby half of a
//! net_failover pair, with a zero-copy packet path.
//!
//! The device is transport-agnostic: a VMM puts it behind its own virtio-pci or
//! virtio-mmio transport through [`VirtioDevice`], hands it guest memory as a
//! `vm_memory::GuestMemoryAtomic`, and drives its queue pairs from its own event
//! loop (or starts the ready-made [`NetWorker`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use virtio_net_standby::{FeaturesAcked, StandbyNet, StandbyNetBuilder, Tap, VirtioDevice};
//! use vm_memory::GuestMemoryMmap;
//!
//! let tap = Tap::open("tap-standby0").unwrap();
//! let mut net: StandbyNet<GuestMemoryMmap, Tap> = StandbyNetBuilder::new()
//!     .id("net1")                        // what the primary's failover_pair_id names
//!     .mac([0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc])
//!     .build(vec![tap])
//!     .unwrap();
//! // The failover coordinator plugs the primary when the guest acks STANDBY.
//! net.add_standby_listener(Arc::new(|e: &FeaturesAcked| {
//!     println!("{} negotiated STANDBY: plug the primary now", e.device_id);
//! }));
//! // The transport shows `net.features()` to the driver, calls
//! // `net.ack_features(..)` on FEATURES_OK and `net.activate(..)` on DRIVER_OK.
//! ```
//!
//! Modules, one concept each: [`features`] (bits and negotiation), [`config`]
//! (the configuration space), [`header`] (the virtio-net header), [`ring`] (the
//! split virtqueue over host pointers), [`memory`] (guest memory as host
//! pointers), [`backend`] (tap, in-process pair, sink and generator),
//! [`snapshot`] (saved state), [`worker`] (the optional epoll worker). The
//! receive filter ([`RxFilter`]), the counters ([`NetCounters`]), the rules a
//! chain can break ([`ChainError`]) and what a processing call did
//! ([`Processed`]) are at the crate root. The transport boundary
//! ([`VirtioDevice`], [`VirtioInterrupt`], [`ActivateQueue`]) and the STANDBY
//! event ([`FeaturesAcked`]) come from the `virtio-device` crate and are
//! re-exported here.

#![deny(missing_docs)]

pub mod backend;
pub(crate) mod chain;
pub mod config;
pub(crate) mod counters;
mod ctrl;
mod device;
pub mod features;
pub(crate) mod filter;
pub mod header;
mod iovec;
pub mod memory;
mod processed;
mod queue_pair;
pub mod ring;
mod rx;
mod shared;
pub mod snapshot;
mod tx;
pub mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use backend::{
    Discard, Generator, NetBackend, PairBackend, PairConfig, Readiness, RxBuffers, RxPeek,
    SinkStats, Tap, TxFrame, pair,
};
pub use chain::ChainError;
pub use config::NetConfigSpace;
pub use counters::NetCounters;
pub use ctrl::ControlQueue;
pub use device::{ControlQueueHandle, Error, Result, StandbyNet, StandbyNetBuilder};
pub use features::Features;
pub use filter::{MacAddr, RxFilter};
pub use header::VirtioNetHdr;
pub use processed::Processed;
pub use queue_pair::{QueuePair, QueuePairHandle};
pub use rx::PendingRx;
pub use snapshot::NetState;
pub use virtio_device::{
    ActivateQueue, FeaturesAcked, FeaturesListener, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
pub use worker::NetWorker;
