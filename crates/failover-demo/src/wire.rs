//! The host side of one VMM model's network: a host that answers the guest,
//! and the switch between it and the VM's two ports.
//!
//! The switch follows an SR-IOV NIC with a host bridge: frames for the guest's
//! MAC go to the primary's port while the primary is in its slot with its link
//! up (the NIC's own entry for its VF), and to the standby's port otherwise
//! (the bridge). What the guest sends from either port reaches the host.
//!
//! A port queues what it is given until its function takes it, as a tap
//! does; what a port holds when its function leaves the slot is lost with it.
//! That is where a primary unplugged while it still carries traffic loses
//! frames, and what make-before-break avoids: with the link down first, the
//! switch sends nothing more to the primary.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use test_guest::Slave;
use virtio_net_standby::header::HDR_LEN;
use virtio_net_standby::{Features, NetBackend, RxBuffers, RxPeek, TxFrame};

/// The host's MAC (locally administered).
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// The demo's EtherType (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// Payload bytes after the sequence number.
const PATTERN: usize = 56;
/// Frames a port holds for a function that has not taken them.
const PORT_QUEUE: usize = 1024;

/// A request or reply: Ethernet header, then the sequence number, then a
/// pattern derived from it and the direction (so a corrupted or misrouted
/// frame is told apart).
pub fn frame(dst: [u8; 6], src: [u8; 6], seq: u64, reply: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 8 + PATTERN);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend((0..PATTERN).map(|i| pattern_byte(seq, i, reply)));
    f
}

fn pattern_byte(seq: u64, i: usize, reply: bool) -> u8 {
    (seq as u8)
        .wrapping_mul(31)
        .wrapping_add(i as u8)
        .wrapping_add(if reply { 0x80 } else { 0 })
}

/// What a frame is, checked: `Some(seq)` for an intact demo frame in the
/// given direction from `src` to `dst`, `None` otherwise.
pub fn parse(f: &[u8], dst: [u8; 6], src: [u8; 6], reply: bool) -> Option<u64> {
    if f.len() != 14 + 8 + PATTERN || f[0..6] != dst || f[6..12] != src {
        return None;
    }
    if u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE {
        return None;
    }
    let seq = u64::from_le_bytes(f[14..22].try_into().ok()?);
    f[22..]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern_byte(seq, i, reply))
        .then_some(seq)
}

/// Counters of the host side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireCounters {
    /// Requests the host received intact, from the standby's port and the
    /// primary's.
    pub requests: [u64; 2],
    /// Frames the host received that were not intact requests.
    pub bad_requests: u64,
    /// Replies the switch put on the standby's port and the primary's.
    pub replies: [u64; 2],
    /// Frames lost in a port when its function left the slot.
    pub lost_in_port: u64,
    /// Frames dropped because a port's queue was full.
    pub port_overflow: u64,
}

#[derive(Debug, Default)]
struct Port {
    rx: VecDeque<Vec<u8>>,
    present: bool,
    link_up: bool,
}

#[derive(Debug)]
struct State {
    guest_mac: [u8; 6],
    ports: [Port; 2],
    counters: WireCounters,
}

/// The host side of one VMM's network. Clones share it.
#[derive(Debug, Clone)]
pub struct Wire(Arc<Mutex<State>>);

fn idx(s: Slave) -> usize {
    match s {
        Slave::Standby => 0,
        Slave::Primary => 1,
    }
}

impl Wire {
    /// A network for a guest with `guest_mac`; both ports empty.
    pub fn new(guest_mac: [u8; 6]) -> Wire {
        Wire(Arc::new(Mutex::new(State {
            guest_mac,
            ports: Default::default(),
            counters: WireCounters::default(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend of `port`'s function.
    pub fn backend(&self, port: Slave) -> WireBackend {
        WireBackend {
            wire: self.clone(),
            port,
        }
    }

    /// What the VMM sees of `port`'s function: in its slot, with its link up.
    /// A function that left drops what its port held.
    pub fn set_port(&self, port: Slave, present: bool, link_up: bool) {
        let mut s = self.lock();
        let p = &mut s.ports[idx(port)];
        let lost = if p.present && !present {
            std::mem::take(&mut p.rx).len() as u64
        } else {
            0
        };
        p.present = present;
        p.link_up = link_up;
        s.counters.lost_in_port += lost;
    }

    /// Where frames for the guest go now.
    pub fn route(&self) -> Slave {
        let s = self.lock();
        let p = &s.ports[idx(Slave::Primary)];
        if p.present && p.link_up {
            Slave::Primary
        } else {
            Slave::Standby
        }
    }

    /// The counters.
    pub fn counters(&self) -> WireCounters {
        self.lock().counters
    }

    /// A frame the guest sent on `port`: the host answers an intact request.
    fn guest_sent(&self, port: Slave, f: &[u8]) {
        let route = self.route();
        let mut s = self.lock();
        let guest = s.guest_mac;
        match parse(f, HOST_MAC, guest, false) {
            Some(seq) => {
                s.counters.requests[idx(port)] += 1;
                s.counters.replies[idx(route)] += 1;
                let q = &mut s.ports[idx(route)].rx;
                if q.len() >= PORT_QUEUE {
                    s.counters.port_overflow += 1;
                } else {
                    q.push_back(frame(guest, HOST_MAC, seq, true));
                }
            }
            None => s.counters.bad_requests += 1,
        }
    }
}

/// One port's end of the [`Wire`], as the function's network backend.
#[derive(Debug)]
pub struct WireBackend {
    wire: Wire,
    port: Slave,
}

impl NetBackend for WireBackend {
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        let mut f = vec![0u8; frame.len()];
        frame.copy_to(&mut f);
        if f.len() > HDR_LEN {
            self.wire.guest_sent(self.port, &f[HDR_LEN..]);
        }
        Ok(())
    }

    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        let mut s = self.wire.lock();
        let q = &mut s.ports[idx(self.port)].rx;
        let Some(f) = q.front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if HDR_LEN + f.len() > bufs.capacity() {
            // Smaller buffers than the frame: the device posts more first.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let f = q.pop_front().unwrap_or_default();
        bufs.write_at(0, &[0u8; HDR_LEN]);
        bufs.write_at(HDR_LEN, &f);
        Ok(HDR_LEN + f.len())
    }

    fn peek(&mut self) -> RxPeek {
        let s = self.wire.lock();
        match s.ports[idx(self.port)].rx.front() {
            Some(f) => RxPeek::Frame(HDR_LEN + f.len()),
            None => RxPeek::Empty,
        }
    }

    fn offloads_supported(&self) -> Features {
        Features::empty()
    }

    fn set_offloads(&mut self, _guest_offloads: Features) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let f = frame(HOST_MAC, GUEST, 42, false);
        assert_eq!(parse(&f, HOST_MAC, GUEST, false), Some(42));
        assert_eq!(parse(&f, HOST_MAC, GUEST, true), None, "direction");
        let mut bad = f.clone();
        bad[30] ^= 1;
        assert_eq!(parse(&bad, HOST_MAC, GUEST, false), None);
        assert_eq!(parse(&f[..40], HOST_MAC, GUEST, false), None);
    }

    #[test]
    fn replies_follow_the_primary_link_and_die_with_its_port() {
        let w = Wire::new(GUEST);
        w.set_port(Slave::Standby, true, true);
        w.set_port(Slave::Primary, true, true);
        assert_eq!(w.route(), Slave::Primary);
        w.guest_sent(Slave::Standby, &frame(HOST_MAC, GUEST, 1, false));
        assert_eq!(w.counters().replies, [0, 1]);
        // The primary leaves with the reply still in its port.
        w.set_port(Slave::Primary, false, true);
        assert_eq!(w.counters().lost_in_port, 1);
        assert_eq!(w.route(), Slave::Standby);
        // With its link down, replies take the standby's port.
        w.set_port(Slave::Primary, true, false);
        assert_eq!(w.route(), Slave::Standby);
        w.guest_sent(Slave::Primary, &frame(HOST_MAC, GUEST, 2, false));
        assert_eq!(w.counters().requests, [1, 1]);
        assert_eq!(w.counters().replies, [1, 1]);
        w.guest_sent(Slave::Primary, b"junk");
        assert_eq!(w.counters().bad_requests, 1);
    }
}
