//! Saved state from an untrusted source (a migration stream): decoding and
//! restoring arbitrary bytes must be an error or a working device, never a panic.
//! Inputs are checksummed after mutation (the first 4 bytes choose whether), so
//! the fuzzer also reaches the field checks behind the CRC.

#![no_main]

use device_state::crc32;
use libfuzzer_sys::fuzz_target;
use virtio_net_standby::testing::GuestMem;
use virtio_net_standby::{NetState, PairBackend, PairConfig, StandbyNet, StandbyNetBuilder, pair};

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    // Half the time, fix the trailing CRC so the decoder looks past it.
    if bytes.len() > 24 && bytes[0] & 1 == 1 {
        bytes[..8].copy_from_slice(b"VNSTANDB");
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        let body = (bytes.len() - 20) as u32;
        bytes[12..16].copy_from_slice(&body.to_le_bytes());
        let end = bytes.len() - 4;
        let crc = crc32(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(state) = NetState::from_bytes(&bytes) else {
        return;
    };
    // What decodes must round-trip exactly.
    assert_eq!(NetState::from_bytes(&state.to_bytes()).as_ref(), Ok(&state));
    let (a, _b) = pair(PairConfig::default()).unwrap();
    let pairs = usize::from(state.config.max_virtqueue_pairs).clamp(1, 4);
    let mut backends = vec![a];
    for _ in 1..pairs {
        backends.push(pair(PairConfig::default()).unwrap().0);
    }
    let mut dev: StandbyNet<GuestMem, PairBackend> = StandbyNetBuilder::new()
        .queue_pairs(pairs as u16)
        .build(backends)
        .unwrap();
    let _ = dev.restore(&state);
});
