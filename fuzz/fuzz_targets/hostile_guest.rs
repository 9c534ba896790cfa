//! The hostile guest of the test suite, with libFuzzer choosing every scribble,
//! frame, buffer and processing call: queue handling under coverage guidance.
//! The device must not panic, loop, or break its ring invariants (checked inside
//! `HostileGuest` on every processing pass).

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_net_standby::testing::{HostileGuest, InputBytes};

fuzz_target!(|data: &[u8]| {
    let mut input = InputBytes(data);
    let Some(mut guest) = HostileGuest::new(&mut input) else {
        return;
    };
    while !input.is_empty() {
        guest.step(&mut input);
    }
});
