//! The device's saved state, and its versioned binary form.
//!
//! [`NetState`] is everything a destination needs to show the guest the exact
//! same device: the features offered and acknowledged, the configuration space,
//! the receive filter, what the control queue programmed, every queue's
//! `virtio_queue::QueueState`, the receive buffers the device had taken but not
//! used, and frames it held for the guest.
//!
//! [`NetState::to_bytes`] writes it as:
//!
//! ```text
//! magic "VNSTANDB" | version u16 | reserved u16 | body length u32 | body | CRC-32 u32
//! ```
//!
//! all little-endian, the CRC (IEEE) over everything before it: the workspace's
//! common state form (`device_state::to_bytes`), which [`NetState`] implements
//! through [`Encode`]. [`NetState::from_bytes`] checks every length against what
//! is left before reading, so corrupt input is an [`Error`], never a panic or a
//! huge allocation; [`NetState::check_compatible`] then checks the state against
//! the device that is to take it.

use device_state::{Encode, Reader, Writer};
use virtio_queue::QueueState;

use crate::config::NetConfigSpace;
use crate::features::{self, Features, GUEST_OFFLOADS};
use crate::filter::{MAC_TABLE_ENTRIES, MacAddr, RxFilter};
use crate::header::{HDR_LEN, MAX_BUFFER_LEN};
use crate::rx::PendingRx;

/// The magic at the start of a saved state.
pub const MAGIC: [u8; 8] = *b"VNSTANDB";
/// The format version this crate writes and reads.
pub const VERSION: u16 = 1;

/// Errors reading or applying a saved state: the workspace's state contract
/// errors.
pub use device_state::Error;

/// Result of snapshot operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One queue's saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SavedQueue {
    /// Queue index.
    pub index: u16,
    /// The queue's registers and ring positions.
    #[cfg_attr(feature = "serde", serde(with = "QueueStateDef"))]
    pub state: QueueState,
}

/// serde for `virtio_queue::QueueState`, which has none of its own: serde's
/// remote derive, field for field.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// One queue pair's saved receive state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SavedPair {
    /// Heads of receive chains taken from the ring and not yet used, oldest
    /// first. The restored device uses them before taking new ones.
    pub rx_staged: Vec<u16>,
    /// Frames held for the guest (header included), oldest first.
    pub pending_rx: Vec<Vec<u8>>,
}

/// The device's saved state. See the module documentation.
///
/// With the `serde` feature it also derives `Serialize` and `Deserialize`, so a
/// VMM can nest it in its own snapshot; restore checks a deserialized state
/// exactly as a decoded one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetState {
    /// The device id at save time (informational).
    pub device_id: String,
    /// Features the saving device offered.
    pub offered: Features,
    /// Features the driver acknowledged, if it had.
    pub acked: Option<Features>,
    /// The configuration space.
    pub config: NetConfigSpace,
    /// The receive filter.
    pub filter: RxFilter,
    /// Queue pairs the driver enabled.
    pub active_pairs: u16,
    /// Receive offloads in force.
    pub guest_offloads: Features,
    /// Every active queue, for the transport to restore its registers from.
    pub queues: Vec<SavedQueue>,
    /// Per queue pair receive state.
    pub pairs: Vec<SavedPair>,
}

fn write_macs(w: &mut Writer, m: &[MacAddr]) {
    w.seq(m, |w, a| w.raw(a));
}

fn read_macs(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<MacAddr>> {
    r.seq(6, what, |r| r.array(what))
}

fn write_queue(w: &mut Writer, q: &SavedQueue) {
    let s = &q.state;
    w.u16(q.index);
    w.u16(s.max_size);
    w.u16(s.next_avail);
    w.u16(s.next_used);
    w.bool(s.event_idx_enabled);
    w.u16(s.size);
    w.bool(s.ready);
    w.u64(s.desc_table);
    w.u64(s.avail_ring);
    w.u64(s.used_ring);
}

fn read_queue(r: &mut Reader<'_>) -> Result<SavedQueue> {
    Ok(SavedQueue {
        index: r.u16("queue index")?,
        state: QueueState {
            max_size: r.u16("queue max size")?,
            next_avail: r.u16("queue next_avail")?,
            next_used: r.u16("queue next_used")?,
            event_idx_enabled: r.bool("queue event_idx")?,
            size: r.u16("queue size")?,
            ready: r.bool("queue ready")?,
            desc_table: r.u64("queue descriptor table")?,
            avail_ring: r.u64("queue available ring")?,
            used_ring: r.u64("queue used ring")?,
        },
    })
}

/// Bytes one saved queue takes.
const QUEUE_LEN: usize = 2 * 6 + 2 + 3 * 8;

impl Encode for NetState {
    const MAGIC: [u8; 8] = MAGIC;
    const VERSION: u16 = VERSION;

    fn encode(&self, w: &mut Writer) {
        w.str(&self.device_id);
        w.u64(self.offered.bits());
        w.bool(self.acked.is_some());
        w.u64(self.acked.unwrap_or_default().bits());
        let c = &self.config;
        w.raw(&c.mac);
        w.u16(c.status);
        w.u16(c.max_virtqueue_pairs);
        w.u16(c.mtu);
        w.u32(c.speed);
        w.u8(c.duplex);
        let f = &self.filter;
        for b in [
            f.promisc, f.allmulti, f.alluni, f.nomulti, f.nouni, f.nobcast,
        ] {
            w.bool(b);
        }
        w.raw(&f.mac);
        write_macs(w, &f.unicast);
        write_macs(w, &f.multicast);
        w.bool(f.unicast_overflow);
        w.bool(f.multicast_overflow);
        for v in f.vlans.iter() {
            w.u64(*v);
        }
        w.u16(self.active_pairs);
        w.u64(self.guest_offloads.bits());
        w.seq(&self.queues, write_queue);
        w.seq(&self.pairs, |w, p| {
            w.seq(&p.rx_staged, |w, h| w.u16(*h));
            w.seq(&p.pending_rx, |w, f| w.bytes(f));
        });
    }

    fn decode(r: &mut Reader<'_>) -> Result<NetState> {
        let device_id = r.str("device id")?;
        let offered = Features::from_bits(r.u64("offered features")?);
        let has_acked = r.bool("acked flag")?;
        let acked_bits = Features::from_bits(r.u64("acked features")?);
        let config = NetConfigSpace {
            mac: r.array("config mac")?,
            status: r.u16("config status")?,
            max_virtqueue_pairs: r.u16("config max_virtqueue_pairs")?,
            mtu: r.u16("config mtu")?,
            speed: r.u32("config speed")?,
            duplex: r.u8("config duplex")?,
        };
        let mut modes = [false; 6];
        for m in &mut modes {
            *m = r.bool("rx mode")?;
        }
        let [promisc, allmulti, alluni, nomulti, nouni, nobcast] = modes;
        let mac = r.array("filter mac")?;
        let unicast = read_macs(r, "unicast table")?;
        let multicast = read_macs(r, "multicast table")?;
        let unicast_overflow = r.bool("unicast overflow")?;
        let multicast_overflow = r.bool("multicast overflow")?;
        let mut vlans = Box::new([0u64; 64]);
        for v in vlans.iter_mut() {
            *v = r.u64("vlan table")?;
        }
        let filter = RxFilter {
            promisc,
            allmulti,
            alluni,
            nomulti,
            nouni,
            nobcast,
            mac,
            unicast,
            multicast,
            unicast_overflow,
            multicast_overflow,
            vlans,
        };
        let active_pairs = r.u16("active pairs")?;
        let guest_offloads = Features::from_bits(r.u64("guest offloads")?);
        let queues = r.seq(QUEUE_LEN, "queues", read_queue)?;
        let pairs = r.seq(8, "queue pairs", |r| {
            Ok(SavedPair {
                rx_staged: r.seq(2, "staged heads", |r| r.u16("staged head"))?,
                pending_rx: r.seq(4, "pending frames", |r| r.bytes("pending frame"))?,
            })
        })?;
        Ok(NetState {
            device_id,
            offered,
            acked: has_acked.then_some(acked_bits),
            config,
            filter,
            active_pairs,
            guest_offloads,
            queues,
            pairs,
        })
    }
}

impl NetState {
    /// The versioned binary form (see the module documentation):
    /// `device_state::to_bytes(self)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        device_state::to_bytes(self)
    }

    /// Reads the binary form. Checks the magic, version, length and checksum,
    /// then every field's encoding; [`check_compatible`](Self::check_compatible)
    /// checks the values against a device.
    pub fn from_bytes(bytes: &[u8]) -> Result<NetState> {
        device_state::from_bytes(bytes)
    }

    /// Checks that a device offering `offered`, with `pairs` queue pairs of
    /// `queue_size` entries, can take this state.
    pub fn check_compatible(&self, offered: Features, pairs: usize, queue_size: u16) -> Result<()> {
        let invalid = |s: String| Err(Error::Invalid(s));
        if let Some(acked) = self.acked {
            let missing = acked.difference(offered);
            if !missing.is_empty() {
                return Err(Error::Mismatch {
                    field: "the features the guest acknowledged".into(),
                    saved: format!("{missing}"),
                    device: "not offered".into(),
                });
            }
            features::negotiate(offered, acked).map_err(|e| {
                Error::Refused(format!(
                    "the saved feature negotiation is not valid on this device: {e}"
                ))
            })?;
        }
        Error::check(
            "queue pairs",
            usize::from(self.config.max_virtqueue_pairs),
            pairs,
        )?;
        Error::check("saved queue pairs", self.pairs.len(), pairs)?;
        if self.active_pairs == 0 || usize::from(self.active_pairs) > pairs {
            return invalid(format!(
                "{} active queue pairs of {pairs}",
                self.active_pairs
            ));
        }
        let acked = self.acked.unwrap_or_default();
        if !self
            .guest_offloads
            .difference(acked.intersection(GUEST_OFFLOADS))
            .is_empty()
        {
            return invalid(format!(
                "guest offloads {} were never negotiated",
                self.guest_offloads
            ));
        }
        if self.filter.unicast.len() > MAC_TABLE_ENTRIES
            || self.filter.multicast.len() > MAC_TABLE_ENTRIES
        {
            return invalid("a MAC table holds more than 64 entries".into());
        }
        let ctrl_index = 2 * pairs;
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            let i = usize::from(q.index);
            if i > ctrl_index || !seen.insert(i) {
                return invalid(format!("queue index {i} is out of range or repeated"));
            }
            let s = &q.state;
            if s.size == 0 || !s.size.is_power_of_two() || s.size > queue_size {
                return Err(Error::Mismatch {
                    field: format!("queue {i} size"),
                    saved: s.size.to_string(),
                    device: format!("a power of two up to {queue_size}"),
                });
            }
        }
        for (i, p) in self.pairs.iter().enumerate() {
            let rx_size = self
                .queues
                .iter()
                .find(|q| usize::from(q.index) == 2 * i)
                .map_or(0, |q| q.state.size);
            if p.rx_staged.len() > usize::from(rx_size) || p.rx_staged.iter().any(|h| *h >= rx_size)
            {
                return invalid(format!(
                    "queue pair {i} has staged heads outside its receive queue"
                ));
            }
            if p.pending_rx.len() > PendingRx::MAX_FRAMES
                || p.pending_rx.iter().map(Vec::len).sum::<usize>() > PendingRx::MAX_BYTES
            {
                return invalid(format!(
                    "queue pair {i} holds more pending frames than a device can"
                ));
            }
            if p.pending_rx
                .iter()
                .any(|f| f.len() < HDR_LEN || f.len() > MAX_BUFFER_LEN)
            {
                return invalid(format!(
                    "queue pair {i} holds a pending frame of impossible size"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::STATUS_LINK_UP;
    use crate::features::DEFAULT_OFFER;

    fn sample() -> NetState {
        let mut filter = RxFilter::new([2, 0, 0, 0, 0, 1]);
        filter.promisc = false;
        filter.multicast.push([1, 0, 0x5e, 0, 0, 1]);
        filter.set_all_vlans(false);
        filter.set_vlan(42, true);
        NetState {
            device_id: "standby0".into(),
            offered: DEFAULT_OFFER,
            acked: Some(DEFAULT_OFFER),
            config: NetConfigSpace {
                mac: [2, 0, 0, 0, 0, 1],
                status: STATUS_LINK_UP,
                max_virtqueue_pairs: 2,
                mtu: 1500,
                speed: 1000,
                duplex: 1,
            },
            filter,
            active_pairs: 2,
            guest_offloads: GUEST_OFFLOADS,
            queues: vec![
                SavedQueue {
                    index: 0,
                    state: QueueState {
                        max_size: 256,
                        next_avail: 300,
                        next_used: 290,
                        event_idx_enabled: true,
                        size: 256,
                        ready: true,
                        desc_table: 0x1000,
                        avail_ring: 0x2000,
                        used_ring: 0x3000,
                    },
                },
                SavedQueue {
                    index: 4,
                    state: QueueState {
                        max_size: 256,
                        size: 64,
                        ready: true,
                        ..Default::default()
                    },
                },
            ],
            pairs: vec![
                SavedPair {
                    rx_staged: vec![3, 4, 5],
                    pending_rx: vec![vec![0; 60], vec![7; 1514]],
                },
                SavedPair::default(),
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        let b = s.to_bytes();
        assert_eq!(&b[..8], b"VNSTANDB");
        let back = NetState::from_bytes(&b).unwrap();
        assert_eq!(back, s);
        back.check_compatible(DEFAULT_OFFER, 2, 256).unwrap();
        let unacked = NetState {
            acked: None,
            guest_offloads: Features::empty(),
            ..s
        };
        assert_eq!(NetState::from_bytes(&unacked.to_bytes()).unwrap(), unacked);
    }

    #[test]
    fn corruption_is_an_error_never_a_panic() {
        let b = sample().to_bytes();
        // Every truncation.
        for n in 0..b.len() {
            assert!(NetState::from_bytes(&b[..n]).is_err(), "truncated to {n}");
        }
        // Every single-bit flip.
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(NetState::from_bytes(&c).is_err(), "byte {i} bit {bit}");
            }
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(NetState::from_bytes(&long), Err(Error::TrailingBytes(1)));
        let mut v2 = b.clone();
        v2[8] = 2;
        assert!(matches!(
            NetState::from_bytes(&v2),
            Err(Error::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            })
        ));
        assert!(matches!(
            NetState::from_bytes(b"NOTSTATE\x01\x00\x00\x00"),
            Err(Error::BadMagic { .. })
        ));
    }

    #[test]
    fn huge_counts_with_a_valid_checksum_are_refused_cheaply() {
        // A body claiming 4 billion pending frames, correctly checksummed.
        let mut s = sample();
        s.pairs[1].pending_rx.clear();
        let mut b = s.to_bytes();
        let body_end = b.len() - 4;
        // The last pair's pending count is the last 4 bytes of the body.
        b[body_end - 4..body_end].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = device_state::crc32(&b[..body_end]);
        b[body_end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            NetState::from_bytes(&b),
            Err(Error::Truncated("pending frames"))
        );
    }

    #[test]
    fn compatibility_checks() {
        let s = sample();
        assert!(matches!(
            s.check_compatible(DEFAULT_OFFER.without(crate::features::F_STANDBY), 2, 256),
            Err(Error::Mismatch { saved, .. }) if saved.contains("VIRTIO_NET_F_STANDBY")
        ));
        assert_eq!(
            s.check_compatible(DEFAULT_OFFER, 1, 256)
                .unwrap_err()
                .to_string(),
            "the saved state does not fit this device: queue pairs is 2 in the saved state but 1 on this device"
        );
        assert!(matches!(
            s.check_compatible(DEFAULT_OFFER, 2, 128),
            Err(Error::Mismatch { field, .. }) if field == "queue 0 size"
        ));
        let mut bad = s.clone();
        bad.pairs[0].rx_staged.push(256);
        assert!(matches!(
            bad.check_compatible(DEFAULT_OFFER, 2, 256),
            Err(Error::Invalid(_))
        ));
        let mut bad = s.clone();
        bad.pairs[0].pending_rx.push(vec![0; 5]);
        assert!(matches!(
            bad.check_compatible(DEFAULT_OFFER, 2, 256),
            Err(Error::Invalid(_))
        ));
        let mut bad = s.clone();
        bad.active_pairs = 3;
        assert!(matches!(
            bad.check_compatible(DEFAULT_OFFER, 2, 256),
            Err(Error::Invalid(_))
        ));
        let mut bad = s.clone();
        bad.queues[1].index = 0;
        assert!(matches!(
            bad.check_compatible(DEFAULT_OFFER, 2, 256),
            Err(Error::Invalid(_))
        ));
        let mut bad = s;
        bad.acked = Some(Features::empty().with(crate::features::F_STANDBY));
        assert!(matches!(
            bad.check_compatible(DEFAULT_OFFER, 2, 256),
            Err(Error::Refused(m)) if m.contains("not valid on this device")
        ));
    }

    /// A device built as the one that saved [`sample`].
    #[cfg(feature = "serde")]
    fn destination() -> crate::StandbyNet<crate::testing::GuestMem, crate::testing::RecordingBackend>
    {
        use crate::testing::RecordingBackend;
        crate::StandbyNetBuilder::new()
            .id("standby0")
            .mac([2, 0, 0, 0, 0, 1])
            .queue_pairs(2)
            .build(vec![
                RecordingBackend::default(),
                RecordingBackend::default(),
            ])
            .unwrap()
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_restores_onto_a_fresh_device() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        let back: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // The binary form is unchanged by the derives.
        assert_eq!(back.to_bytes(), s.to_bytes());

        let mut dst = destination();
        dst.restore(&back).unwrap();
        assert_eq!(dst.acked_features(), s.acked);
        assert_eq!(dst.config(), s.config);
        assert_eq!(*dst.rx_filter(), s.filter);
        // Everything, the queues as restored: the device has not been
        // activated since, and saving it again must not lose them.
        assert_eq!(dst.snapshot(), s);

        // A deserialized state goes through the same checks as a decoded one.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["queues"][0]["state"]["size"] = 512.into();
        let bad: NetState = serde_json::from_value(v).unwrap();
        assert!(matches!(
            destination().restore(&bad),
            Err(crate::Error::Snapshot(Error::Mismatch { field, .. })) if field == "queue 0 size"
        ));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_with_a_wrong_length_vlan_table_is_an_error() {
        let good = serde_json::to_value(sample()).unwrap();
        assert_eq!(good["filter"]["vlans"].as_array().unwrap().len(), 64);
        for len in [0, 32, 63, 65, 4096] {
            let mut v = good.clone();
            v["filter"]["vlans"] = vec![0u64; len].into();
            let json = serde_json::to_string(&v).unwrap();
            let e = serde_json::from_str::<NetState>(&json).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "invalid length {len}, expected the 64 words of the VLAN table"
                )),
                "{len}: {e}"
            );
        }
        let mut v = good;
        v["filter"]["vlans"] = "not a table".into();
        assert!(serde_json::from_value::<NetState>(v).is_err());
    }
}
