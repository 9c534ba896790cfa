//! The 12-byte `virtio_net_hdr_v1` that precedes every frame on the TX and RX
//! queues, its validation against the negotiated offloads, and software checksum
//! completion for backends that must deliver a `NEEDS_CSUM` frame to a guest that
//! cannot take one.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

use crate::features::Features;

/// Size of `virtio_net_hdr_v1` (`virtio_net_hdr_mrg_rxbuf`): with VERSION_1 the
/// header is 12 bytes whether or not MRG_RXBUF is negotiated.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest Ethernet frame the device carries, without the virtio-net header:
/// a 64 KiB GSO frame plus a 14-byte Ethernet header.
pub const MAX_FRAME_LEN: usize = 65536 + 14;
/// The largest buffer (header + frame) on either queue.
pub const MAX_BUFFER_LEN: usize = HDR_LEN + MAX_FRAME_LEN;

/// `flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const FLAG_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum has been validated.
pub const FLAG_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `gso_type`: no segmentation.
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
/// `gso_type`: UDP fragmentation offload.
pub const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
/// `gso_type` modifier: the TCP stream uses ECN.
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// Why a header the guest sent cannot be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `NEEDS_CSUM` without `VIRTIO_NET_F_CSUM` negotiated.
    #[error("the header asks for checksum offload but VIRTIO_NET_F_CSUM was not negotiated")]
    ChecksumNotNegotiated,
    /// A GSO type whose host offload was not negotiated.
    #[error("the header asks for segmentation type {0} whose HOST_* offload was not negotiated")]
    GsoNotNegotiated(u8),
    /// A GSO type this device does not know.
    #[error("unknown segmentation type {0} in the header")]
    UnknownGsoType(u8),
    /// A GSO frame without the checksum offload it implies.
    #[error("a segmentation request must also ask for checksum offload (NEEDS_CSUM)")]
    GsoWithoutChecksum,
    /// A GSO frame with a zero segment size.
    #[error("a segmentation request with gso_size 0")]
    GsoSizeZero,
    /// The checksum location lies outside the frame.
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    ChecksumOutOfFrame {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length without the header.
        len: usize,
    },
}

/// Result of header operations.
pub type Result<T> = std::result::Result<T, Error>;

/// `struct virtio_net_hdr_v1`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers to replicate in every segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum is stored.
    pub csum_offset: u16,
    /// Number of merged receive buffers (RX only).
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Decodes a header from its 12 little-endian bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Whether the frame needs its checksum completed.
    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }

    /// The GSO type without the ECN modifier.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// Checks a header the guest put on the TX queue against the negotiated
    /// features; `frame_len` is the frame's length without the header.
    pub fn check_tx(&self, acked: Features, frame_len: usize) -> Result<()> {
        check_offloads(
            self,
            acked,
            frame_len,
            [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_UFO,
                VIRTIO_NET_F_HOST_ECN,
            ],
        )
    }

    /// Checks that a guest whose receive offloads are `guest_offloads` can take a
    /// frame with this header (what a backend must ensure before delivering it).
    pub fn check_rx(&self, guest_offloads: Features, frame_len: usize) -> Result<()> {
        check_offloads(
            self,
            guest_offloads,
            frame_len,
            [
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_UFO,
                VIRTIO_NET_F_GUEST_ECN,
            ],
        )
    }
}

/// `bits` = [csum, tso4, tso6, ufo, ecn] feature bit numbers of one direction.
fn check_offloads(
    hdr: &VirtioNetHdr,
    features: Features,
    frame_len: usize,
    bits: [u32; 5],
) -> Result<()> {
    let [csum, tso4, tso6, ufo, ecn] = bits;
    if hdr.needs_csum() {
        if !features.has(csum) {
            return Err(Error::ChecksumNotNegotiated);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > frame_len {
            return Err(Error::ChecksumOutOfFrame {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: frame_len,
            });
        }
    }
    let kind = hdr.gso_kind();
    if kind == GSO_NONE {
        return Ok(());
    }
    let needed = match kind {
        GSO_TCPV4 => tso4,
        GSO_TCPV6 => tso6,
        GSO_UDP => ufo,
        other => return Err(Error::UnknownGsoType(other)),
    };
    if !features.has(needed) {
        return Err(Error::GsoNotNegotiated(hdr.gso_type));
    }
    if hdr.gso_type & GSO_ECN != 0 && !features.has(ecn) {
        return Err(Error::GsoNotNegotiated(hdr.gso_type));
    }
    if !hdr.needs_csum() {
        return Err(Error::GsoWithoutChecksum);
    }
    if hdr.gso_size == 0 {
        return Err(Error::GsoSizeZero);
    }
    Ok(())
}

/// Completes a partial checksum in place: folds the ones' complement sum of
/// `frame[csum_start..]` into the 16 bits at `csum_start + csum_offset`, clears
/// `NEEDS_CSUM` and sets `DATA_VALID` in `hdr`. The frame excludes the
/// virtio-net header. Returns false, changing nothing, if the location lies
/// outside the frame.
pub fn complete_checksum(hdr: &mut VirtioNetHdr, frame: &mut [u8]) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return false;
    }
    // The guest seeded the checksum field with the pseudo-header sum; the sum runs
    // over it as it stands.
    let sum = ones_complement_sum(&frame[start..]);
    let folded = !sum;
    frame[at..at + 2].copy_from_slice(&folded.to_be_bytes());
    hdr.flags = (hdr.flags & !FLAG_NEEDS_CSUM) | FLAG_DATA_VALID;
    true
}

/// The 16-bit ones' complement sum of `data` (RFC 1071), big-endian words, an odd
/// trailing byte padded with zero.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Four big-endian 16-bit words at once; carries accumulate in the high bits.
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::DEFAULT_OFFER;

    #[test]
    fn roundtrip_bytes() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 0x81);
        assert_eq!(&b[4..6], &1448u16.to_le_bytes());
        assert_eq!(&b[10..12], &[3, 0]);
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
    }

    #[test]
    fn tx_checks() {
        let all = DEFAULT_OFFER;
        let plain = VirtioNetHdr::default();
        plain.check_tx(Features::empty(), 60).unwrap();

        let csum = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        csum.check_tx(all, 60).unwrap();
        assert_eq!(
            csum.check_tx(Features::empty(), 60),
            Err(Error::ChecksumNotNegotiated)
        );
        assert!(matches!(
            csum.check_tx(all, 51),
            Err(Error::ChecksumOutOfFrame { .. })
        ));

        let tso = VirtioNetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..csum
        };
        tso.check_tx(all, 60000).unwrap();
        assert_eq!(
            tso.check_tx(all.without(VIRTIO_NET_F_HOST_TSO4), 60000),
            Err(Error::GsoNotNegotiated(GSO_TCPV4))
        );
        let ecn = VirtioNetHdr {
            gso_type: GSO_TCPV6 | GSO_ECN,
            ..tso
        };
        ecn.check_tx(all, 60000).unwrap();
        assert!(
            ecn.check_tx(all.without(VIRTIO_NET_F_HOST_ECN), 60000)
                .is_err()
        );
        let ufo = VirtioNetHdr {
            gso_type: GSO_UDP,
            ..tso
        };
        assert!(
            ufo.check_tx(all.without(VIRTIO_NET_F_HOST_UFO), 6000)
                .is_err()
        );
        assert_eq!(
            VirtioNetHdr { gso_type: 9, ..tso }.check_tx(all, 6000),
            Err(Error::UnknownGsoType(9))
        );
        assert_eq!(
            VirtioNetHdr { gso_size: 0, ..tso }.check_tx(all, 6000),
            Err(Error::GsoSizeZero)
        );
        assert_eq!(
            VirtioNetHdr { flags: 0, ..tso }.check_tx(all, 6000),
            Err(Error::GsoWithoutChecksum)
        );
    }

    #[test]
    fn rx_checks_use_guest_bits() {
        let tso = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        let guest = Features::empty()
            .with(VIRTIO_NET_F_GUEST_CSUM)
            .with(VIRTIO_NET_F_GUEST_TSO4);
        tso.check_rx(guest, 9000).unwrap();
        assert!(
            tso.check_rx(guest.without(VIRTIO_NET_F_GUEST_TSO4), 9000)
                .is_err()
        );
        // Host bits do not count for the receive direction.
        assert!(
            tso.check_rx(
                DEFAULT_OFFER.difference(crate::features::GUEST_OFFLOADS),
                9000
            )
            .is_err()
        );
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: 0001 f203 f4f5 f6f7 sums to 0xddf2.
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        // Odd length pads with zero; the 8-byte fast path agrees with the slow one.
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut slow: u32 = 0;
        for w in data.chunks(2) {
            slow += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
        }
        while slow >> 16 != 0 {
            slow = (slow & 0xffff) + (slow >> 16);
        }
        assert_eq!(ones_complement_sum(&data), slow as u16);
    }

    #[test]
    fn completed_checksum_verifies() {
        // A UDP-like payload: checksum field at offset 6 of the L4 header at 14.
        let mut frame = vec![0u8; 14 + 8 + 37];
        for (i, b) in frame.iter_mut().enumerate().skip(14) {
            *b = (i * 13) as u8;
        }
        frame[20] = 0;
        frame[21] = 0;
        let mut hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 14,
            csum_offset: 6,
            ..Default::default()
        };
        assert!(complete_checksum(&mut hdr, &mut frame));
        assert_eq!(hdr.flags, FLAG_DATA_VALID);
        // Summing over the completed region gives all ones.
        assert_eq!(ones_complement_sum(&frame[14..]), 0xffff);
        // Out of frame: nothing changes.
        let mut bad = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 60,
            csum_offset: 6,
            ..Default::default()
        };
        assert!(!complete_checksum(&mut bad, &mut frame));
        assert_eq!(bad.flags, FLAG_NEEDS_CSUM);
    }
}
