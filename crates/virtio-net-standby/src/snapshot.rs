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
//! all little-endian, the CRC (IEEE) over everything before it. [`NetState::from_bytes`]
//! checks every length against what is left before reading, so corrupt input is
//! an [`Error`], never a panic or a huge allocation; [`NetState::check_compatible`]
//! then checks the state against the device that is to take it.

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

/// Errors reading or applying a saved state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a saved state of this device.
    #[error("not a virtio-net-standby state (bad magic)")]
    BadMagic,
    /// Written by a version this crate does not read.
    #[error("state format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// The bytes end early.
    #[error("the state is truncated: {0} needs more bytes than remain")]
    Truncated(&'static str),
    /// The checksum does not match.
    #[error("the state is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Computed over the bytes.
        expected: u32,
        /// Stored in the bytes.
        found: u32,
    },
    /// Bytes follow the state.
    #[error("{0} unexpected bytes follow the state")]
    TrailingBytes(usize),
    /// A field holds a value no device could have saved.
    #[error("the state is invalid: {0}")]
    Invalid(String),
    /// The state does not fit the device it is restored into.
    #[error("the state does not fit this device: {0}")]
    Incompatible(String),
    /// The acknowledged features cannot be negotiated on this device.
    #[error("the saved feature negotiation is not valid on this device")]
    Features(#[source] features::Error),
}

/// Result of snapshot operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One queue's saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedQueue {
    /// Queue index.
    pub index: u16,
    /// The queue's registers and ring positions.
    pub state: QueueState,
}

/// One queue pair's saved receive state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedPair {
    /// Heads of receive chains taken from the ring and not yet used, oldest
    /// first. The restored device uses them before taking new ones.
    pub rx_staged: Vec<u16>,
    /// Frames held for the guest (header included), oldest first.
    pub pending_rx: Vec<Vec<u8>>,
}

/// The device's saved state. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
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

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in data {
        c = CRC_TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn macs(&mut self, m: &[MacAddr]) {
        self.len(m.len());
        for a in m {
            self.0.extend_from_slice(a);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Truncated(what));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::Invalid(format!("{what} is {v}, not a boolean"))),
        }
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count of items of `item_size` bytes each; refused if they could not fit
    /// in what remains, so no allocation exceeds the input's size.
    fn count(&mut self, item_size: usize, what: &'static str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(item_size.max(1)) > self.0.len() {
            return Err(Error::Truncated(what));
        }
        Ok(n)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>> {
        let n = self.count(1, what)?;
        Ok(self.take(n, what)?.to_vec())
    }
    fn macs(&mut self, what: &'static str) -> Result<Vec<MacAddr>> {
        let n = self.count(6, what)?;
        (0..n).map(|_| self.array::<6>(what)).collect()
    }
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

impl NetState {
    /// The versioned binary form. See the module documentation.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.bytes(self.device_id.as_bytes());
        w.u64(self.offered.bits());
        w.bool(self.acked.is_some());
        w.u64(self.acked.unwrap_or_default().bits());
        let c = &self.config;
        w.0.extend_from_slice(&c.mac);
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
        w.0.extend_from_slice(&f.mac);
        w.macs(&f.unicast);
        w.macs(&f.multicast);
        w.bool(f.unicast_overflow);
        w.bool(f.multicast_overflow);
        for v in f.vlans.iter() {
            w.u64(*v);
        }
        w.u16(self.active_pairs);
        w.u64(self.guest_offloads.bits());
        w.len(self.queues.len());
        for q in &self.queues {
            write_queue(&mut w, q);
        }
        w.len(self.pairs.len());
        for p in &self.pairs {
            w.len(p.rx_staged.len());
            for h in &p.rx_staged {
                w.u16(*h);
            }
            w.len(p.pending_rx.len());
            for f in &p.pending_rx {
                w.bytes(f);
            }
        }
        let body = w.0;
        let mut out = Vec::with_capacity(body.len() + 20);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the binary form. Checks the magic, version, length and checksum,
    /// then every field's encoding; [`check_compatible`](Self::check_compatible)
    /// checks the values against a device.
    pub fn from_bytes(bytes: &[u8]) -> Result<NetState> {
        let mut r = Reader(bytes);
        if r.take(8, "magic")? != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        r.u16("reserved")?;
        let body_len = r.u32("body length")? as usize;
        let body = r.take(body_len, "body")?;
        let stored = r.u32("checksum")?;
        if !r.0.is_empty() {
            return Err(Error::TrailingBytes(r.0.len()));
        }
        let computed = crc32(&bytes[..bytes.len() - 4]);
        if computed != stored {
            return Err(Error::Checksum {
                expected: computed,
                found: stored,
            });
        }
        let mut r = Reader(body);
        let device_id = String::from_utf8(r.bytes("device id")?)
            .map_err(|_| Error::Invalid("device id is not UTF-8".into()))?;
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
        let unicast = r.macs("unicast table")?;
        let multicast = r.macs("multicast table")?;
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
        let nq = r.count(QUEUE_LEN, "queues")?;
        let queues = (0..nq)
            .map(|_| read_queue(&mut r))
            .collect::<Result<Vec<_>>>()?;
        let np = r.count(8, "queue pairs")?;
        let mut pairs = Vec::with_capacity(np);
        for _ in 0..np {
            let ns = r.count(2, "staged heads")?;
            let rx_staged = (0..ns)
                .map(|_| r.u16("staged head"))
                .collect::<Result<_>>()?;
            let nf = r.count(4, "pending frames")?;
            let pending_rx = (0..nf)
                .map(|_| r.bytes("pending frame"))
                .collect::<Result<_>>()?;
            pairs.push(SavedPair {
                rx_staged,
                pending_rx,
            });
        }
        if !r.0.is_empty() {
            return Err(Error::TrailingBytes(r.0.len()));
        }
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

    /// Checks that a device offering `offered`, with `pairs` queue pairs of
    /// `queue_size` entries, can take this state.
    pub fn check_compatible(&self, offered: Features, pairs: usize, queue_size: u16) -> Result<()> {
        let incompatible = |s: String| Err(Error::Incompatible(s));
        let invalid = |s: String| Err(Error::Invalid(s));
        if let Some(acked) = self.acked {
            let missing = acked.difference(offered);
            if !missing.is_empty() {
                return incompatible(format!(
                    "the guest acknowledged {missing}, which this device does not offer"
                ));
            }
            features::negotiate(offered, acked).map_err(Error::Features)?;
        }
        if usize::from(self.config.max_virtqueue_pairs) != pairs || self.pairs.len() != pairs {
            return incompatible(format!(
                "the state has {} queue pairs, this device {pairs}",
                self.config.max_virtqueue_pairs
            ));
        }
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
                return incompatible(format!(
                    "queue {i} has {} entries; this device allows up to {queue_size}",
                    s.size
                ));
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
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
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
        assert_eq!(NetState::from_bytes(&v2), Err(Error::UnsupportedVersion(2)));
        assert_eq!(
            NetState::from_bytes(b"NOTSTATE\x01\x00\x00\x00"),
            Err(Error::BadMagic)
        );
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
        let crc = crc32(&b[..body_end]);
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
            Err(Error::Incompatible(m)) if m.contains("VIRTIO_NET_F_STANDBY")
        ));
        assert!(matches!(
            s.check_compatible(DEFAULT_OFFER, 1, 256),
            Err(Error::Incompatible(_))
        ));
        assert!(matches!(
            s.check_compatible(DEFAULT_OFFER, 2, 128),
            Err(Error::Incompatible(_))
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
            Err(Error::Features(_))
        ));
    }
}
