//! The device-specific configuration space, `struct virtio_net_config`.
//!
//! Layout (little-endian, virtio spec 5.1.4):
//!
//! | offset | size | field                 | valid when offered      |
//! |--------|------|-----------------------|-------------------------|
//! | 0      | 6    | `mac`                 | `VIRTIO_NET_F_MAC`      |
//! | 6      | 2    | `status`              | `VIRTIO_NET_F_STATUS`   |
//! | 8      | 2    | `max_virtqueue_pairs` | `VIRTIO_NET_F_MQ`       |
//! | 10     | 2    | `mtu`                 | `VIRTIO_NET_F_MTU`      |
//! | 12     | 4    | `speed`               | `VIRTIO_NET_F_SPEED_DUPLEX` |
//! | 16     | 1    | `duplex`              | `VIRTIO_NET_F_SPEED_DUPLEX` |
//!
//! The space is as long as the last field the offered features make valid (QEMU
//! sizes it the same way). Accesses may start at any offset and have any length:
//! bytes past the end read as zero, and every driver write is ignored (a modern
//! driver never writes the net config space; the MAC is set through the control
//! queue), which the device counts.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MTU, VIRTIO_NET_F_SPEED_DUPLEX, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};

use crate::features::Features;

/// `status` bit: the link is up.
pub const STATUS_LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// `status` bit: the device asks the driver to announce itself (gratuitous ARP).
pub const STATUS_ANNOUNCE: u16 = VIRTIO_NET_S_ANNOUNCE as u16;
/// `speed` value for "unknown".
pub const SPEED_UNKNOWN: u32 = u32::MAX;
/// `duplex` value for half duplex.
pub const DUPLEX_HALF: u8 = 0;
/// `duplex` value for full duplex.
pub const DUPLEX_FULL: u8 = 1;
/// `duplex` value for "unknown".
pub const DUPLEX_UNKNOWN: u8 = 0xff;

/// The largest configuration space this device exposes (through `duplex`).
pub const MAX_CONFIG_LEN: usize = 17;

/// The guest-visible configuration fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetConfigSpace {
    /// The MAC address the guest reads.
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` bits.
    pub status: u16,
    /// The number of queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// The MTU the device advises.
    pub mtu: u16,
    /// Link speed in Mbit/s, or [`SPEED_UNKNOWN`].
    pub speed: u32,
    /// [`DUPLEX_FULL`], [`DUPLEX_HALF`] or [`DUPLEX_UNKNOWN`].
    pub duplex: u8,
}

impl NetConfigSpace {
    /// The raw little-endian bytes of the whole structure.
    pub fn to_bytes(&self) -> [u8; MAX_CONFIG_LEN] {
        let mut b = [0u8; MAX_CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&self.speed.to_le_bytes());
        b[16] = self.duplex;
        b
    }

    /// Reads `data.len()` bytes at `offset` of a space `len` bytes long (see
    /// [`config_len`]). Bytes outside `0..len` read as zero. Never panics.
    pub fn read(&self, len: usize, offset: u64, data: &mut [u8]) {
        let bytes = self.to_bytes();
        let len = len.min(MAX_CONFIG_LEN);
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|o| *o < len)
                .map_or(0, |o| bytes[o]);
        }
    }
}

/// The length of the configuration space for an offered feature set: up to the end
/// of the last field those features make valid, and at least the MAC.
pub fn config_len(offered: Features) -> usize {
    if offered.has(VIRTIO_NET_F_SPEED_DUPLEX) {
        17
    } else if offered.has(VIRTIO_NET_F_MTU) {
        12
    } else if offered.has(VIRTIO_NET_F_MQ) {
        10
    } else if offered.has(VIRTIO_NET_F_STATUS) {
        8
    } else {
        // The MAC field is always there, offered or not.
        6
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::DEFAULT_OFFER;

    fn sample() -> NetConfigSpace {
        NetConfigSpace {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 4,
            mtu: 1500,
            speed: 10_000,
            duplex: DUPLEX_FULL,
        }
    }

    #[test]
    fn layout_is_little_endian_at_spec_offsets() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..6], &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(&b[6..8], &[1, 0]);
        assert_eq!(&b[8..10], &[4, 0]);
        assert_eq!(&b[10..12], &[0xdc, 0x05]);
        assert_eq!(&b[12..16], &10_000u32.to_le_bytes());
        assert_eq!(b[16], 1);
    }

    #[test]
    fn any_offset_and_length() {
        let c = sample();
        let mut word = [0u8; 4];
        c.read(17, 6, &mut word);
        assert_eq!(word, [1, 0, 4, 0]);
        let mut one = [0xffu8; 1];
        c.read(17, 11, &mut one);
        assert_eq!(one, [0x05]);
        // Straddling the end: the tail reads as zero.
        let mut tail = [0xffu8; 4];
        c.read(17, 15, &mut tail);
        assert_eq!(tail, [0, 1, 0, 0]);
        // Entirely outside, including offsets near u64::MAX.
        let mut far = [0xffu8; 8];
        c.read(17, u64::MAX - 2, &mut far);
        assert_eq!(far, [0; 8]);
        // A shorter space hides the later fields.
        let mut mtu = [0xffu8; 2];
        c.read(8, 10, &mut mtu);
        assert_eq!(mtu, [0, 0]);
    }

    #[test]
    fn length_follows_offer() {
        assert_eq!(config_len(DEFAULT_OFFER), 17);
        assert_eq!(
            config_len(DEFAULT_OFFER.without(VIRTIO_NET_F_SPEED_DUPLEX)),
            12
        );
        assert_eq!(config_len(Features::empty().with(VIRTIO_NET_F_MQ)), 10);
        assert_eq!(config_len(Features::empty().with(VIRTIO_NET_F_STATUS)), 8);
        assert_eq!(config_len(Features::empty()), 6);
    }
}
