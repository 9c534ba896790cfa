//! The RX queue under a guest that writes descriptor tables, indirect tables,
//! available rings and indices by hand (beyond the queue size, loops,
//! overlapping and out-of-bounds buffers), with any negotiated feature set
//! (MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, IN_ORDER or not), frames of any size,
//! link and backend changes.
//!
//! Checked on every processing pass (`fuzz_rigs::net::Rig::process`): no
//! panic; nothing written outside the used ring and the device-writable buffers
//! (guest memory against a shadow copy); every used length within its chain's
//! writable length; the counters add up (chains, frames and bytes).

#![no_main]

use fuzz_rigs::net::{QueueInput, Which, run_queue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: QueueInput| {
    run_queue(Which::Rx, &input);
});
