//! Frames to send and the headers that go with them: [`frame`] (header
//! included, for the device), [`tcp4_frame`] (for a kernel behind a tap) and
//! [`tso4_header`].

/// Builds an Ethernet frame with a virtio-net header in front: destination,
/// a fixed source, EtherType 0x88b5 (local experimental) and `payload`.
pub fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; crate::header::HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}

/// A minimal IPv4/TCP Ethernet frame (no virtio-net header) carrying `payload`
/// bytes `0, 1, 2, ...`: what a kernel on the other side of a tap can parse. The
/// TCP checksum is left zero (partial), as a guest using checksum offload leaves it.
pub fn tcp4_frame(dst: [u8; 6], src: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    // Ports 12345 -> 80, seq 1, data offset 5, ACK|PSH, window 65535.
    f.extend_from_slice(&[
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

/// The header of a TCP/IPv4 TSO frame built by [`tcp4_frame`]: partial checksum
/// at the TCP checksum field, segments of `gso_size` bytes.
pub fn tso4_header(gso_size: u16) -> crate::VirtioNetHdr {
    crate::VirtioNetHdr {
        flags: crate::header::FLAG_NEEDS_CSUM,
        gso_type: crate::header::GSO_TCPV4,
        hdr_len: 54,
        gso_size,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}
