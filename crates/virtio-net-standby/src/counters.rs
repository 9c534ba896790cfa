//! Device counters: frames and bytes per direction, drops by reason, malformed
//! chains by rule broken, notifications sent and suppressed.
//!
//! The packet path counts into a plain [`NetCounters`] on its own stack and adds
//! it to the queue pair's [`AtomicCounters`] once per batch, so counting costs no
//! atomic operation per frame. A VMM reads a consistent-enough snapshot at any
//! time with [`AtomicCounters::snapshot`] (or the device's `counters()`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::chain::ChainError;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A snapshot of counters. All fields count events since the device was
        /// created (they survive reset, not snapshot/restore).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct NetCounters {
            $($(#[$doc])* pub $name: u64,)*
        }

        /// Counters that any thread may read while the packet path adds to them.
        #[derive(Debug, Default)]
        pub struct AtomicCounters {
            $($name: AtomicU64,)*
        }

        impl AtomicCounters {
            /// Adds a batch's worth of counts.
            pub fn add(&self, c: &NetCounters) {
                $(if c.$name != 0 {
                    self.$name.fetch_add(c.$name, Ordering::Relaxed);
                })*
            }

            /// Reads every counter.
            pub fn snapshot(&self) -> NetCounters {
                NetCounters {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl std::ops::AddAssign for NetCounters {
            fn add_assign(&mut self, o: NetCounters) {
                $(self.$name += o.$name;)*
            }
        }

        impl NetCounters {
            /// `(name, value)` of every counter, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name),)*].into_iter()
            }
        }
    };
}

counters! {
    /// Frames the guest sent that reached the backend.
    tx_frames,
    /// Bytes of those frames, without the virtio-net header.
    tx_bytes,
    /// Frames delivered into guest buffers.
    rx_frames,
    /// Bytes of those frames, without the virtio-net header.
    rx_bytes,
    /// Malformed TX chains, returned with length 0.
    tx_malformed,
    /// Malformed RX chains, returned with length 0.
    rx_malformed,
    /// Malformed control-queue chains, returned with length 0.
    ctrl_malformed,
    /// Malformed: head index outside the descriptor table.
    malformed_head_out_of_range,
    /// Malformed: `next` outside the table.
    malformed_next_out_of_range,
    /// Malformed: the chain loops.
    malformed_loop,
    /// Malformed: indirect descriptor misuse (not negotiated, nested, with NEXT, bad table).
    malformed_indirect,
    /// Malformed: a buffer outside guest memory.
    malformed_outside_memory,
    /// Malformed: wrong buffer direction for the queue, or readable after writable.
    malformed_direction,
    /// Malformed: more buffers than `IOV_MAX`.
    malformed_too_many_segments,
    /// Malformed: shorter than the 12-byte virtio-net header.
    malformed_header_short,
    /// Malformed: longer than 64 KiB plus Ethernet and virtio-net headers.
    malformed_too_long,
    /// TX frames dropped: the header asks for an offload that was not negotiated.
    tx_dropped_offload,
    /// TX frames dropped: the link is down.
    tx_dropped_link_down,
    /// TX frames dropped: the backend failed to send them.
    tx_dropped_backend,
    /// Times TX stopped because the backend could take no more (the frames wait
    /// in the guest's ring and go when the backend is writable again).
    tx_backpressure,
    /// RX frames dropped by the receive filter (MAC, multicast, VLAN, rx mode).
    rx_dropped_filtered,
    /// RX frames dropped: the link is down.
    rx_dropped_link_down,
    /// RX frames lost in the backend (read error, or the backend could not
    /// deliver the frame in a form the guest accepts).
    rx_dropped_backend,
    /// RX frames dropped: larger than any buffer the guest can post.
    rx_dropped_too_big,
    /// RX buffers returned unfilled (length 0): with `VIRTIO_F_IN_ORDER` a
    /// malformed RX chain can only be returned after the buffers made available
    /// before it, so those go back empty with it.
    rx_buffers_returned_empty,
    /// Times RX stopped for lack of guest buffers while frames were, or may have
    /// been, waiting (they stay queued and go on the next kick).
    rx_no_buffers,
    /// Frames moved from the backend into the device's pending queue (snapshot).
    rx_pending_queued,
    /// Frames delivered from the device's pending queue.
    rx_pending_delivered,
    /// Used-buffer interrupts sent to the guest.
    notifications_sent,
    /// Used-buffer interrupts the guest's suppression (EVENT_IDX, NO_INTERRUPT) avoided.
    notifications_suppressed,
    /// Configuration-change interrupts sent.
    config_notifications,
    /// Control-queue commands answered `VIRTIO_NET_OK`.
    ctrl_ok,
    /// Control-queue commands answered `VIRTIO_NET_ERR`.
    ctrl_err,
    /// Driver writes to the configuration space (ignored).
    config_writes_ignored,
}

impl NetCounters {
    /// Counts a malformed chain under the rule it broke.
    #[inline]
    pub fn count_malformed(&mut self, e: &ChainError) {
        match e {
            ChainError::HeadOutOfRange { .. } => self.malformed_head_out_of_range += 1,
            ChainError::NextOutOfRange { .. } => self.malformed_next_out_of_range += 1,
            ChainError::Loop(_) => self.malformed_loop += 1,
            ChainError::IndirectNotNegotiated
            | ChainError::NestedIndirect
            | ChainError::IndirectWithNext
            | ChainError::BadIndirectTable { .. } => self.malformed_indirect += 1,
            ChainError::OutsideMemory { .. } => self.malformed_outside_memory += 1,
            ChainError::WritableInReadOnlyQueue
            | ChainError::ReadableInWriteOnlyQueue
            | ChainError::ReadableAfterWritable => self.malformed_direction += 1,
            ChainError::TooManySegments => self.malformed_too_many_segments += 1,
        }
    }

    /// Total frames dropped for any reason, both directions.
    pub fn dropped(&self) -> u64 {
        self.tx_dropped_offload
            + self.tx_dropped_link_down
            + self.tx_dropped_backend
            + self.rx_dropped_filtered
            + self.rx_dropped_link_down
            + self.rx_dropped_backend
            + self.rx_dropped_too_big
    }

    /// Total malformed chains on all queues.
    pub fn malformed(&self) -> u64 {
        self.tx_malformed + self.rx_malformed + self.ctrl_malformed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_snapshot() {
        let a = AtomicCounters::default();
        let mut c = NetCounters {
            tx_frames: 3,
            rx_bytes: 100,
            ..Default::default()
        };
        c.count_malformed(&ChainError::Loop(8));
        c.count_malformed(&ChainError::ReadableAfterWritable);
        a.add(&c);
        a.add(&c);
        let s = a.snapshot();
        assert_eq!(s.tx_frames, 6);
        assert_eq!(s.rx_bytes, 200);
        assert_eq!(s.malformed_loop, 2);
        assert_eq!(s.malformed_direction, 2);
        let mut sum = s;
        sum += s;
        assert_eq!(sum.tx_frames, 12);
        assert!(s.iter().any(|(n, v)| n == "tx_frames" && v == 6));
        assert_eq!(s.iter().count(), 34);
    }

    #[test]
    fn every_chain_error_has_a_counter() {
        let all = [
            ChainError::HeadOutOfRange { head: 0, size: 0 },
            ChainError::NextOutOfRange { next: 0, size: 0 },
            ChainError::Loop(0),
            ChainError::IndirectNotNegotiated,
            ChainError::NestedIndirect,
            ChainError::IndirectWithNext,
            ChainError::BadIndirectTable { addr: 0, len: 0 },
            ChainError::OutsideMemory { addr: 0, len: 0 },
            ChainError::WritableInReadOnlyQueue,
            ChainError::ReadableInWriteOnlyQueue,
            ChainError::ReadableAfterWritable,
            ChainError::TooManySegments,
        ];
        let mut c = NetCounters::default();
        for e in &all {
            let before: u64 = c.iter().map(|(_, v)| v).sum();
            c.count_malformed(e);
            let after: u64 = c.iter().map(|(_, v)| v).sum();
            assert_eq!(after, before + 1, "{e}");
        }
    }
}
