//! The receive filter the control queue programs: rx mode (promiscuous,
//! all-multicast, ...), unicast and multicast MAC tables, and the VLAN table.
//!
//! The order of the checks follows QEMU's `receive_filter`, which Linux guests
//! have been tested against for years: promiscuous accepts everything; then a
//! tagged frame must carry an allowed VLAN; then broadcast, multicast and unicast
//! destinations are judged by their mode flags and tables.
//!
//! The filter is shared by every queue pair. The control queue publishes a new
//! version as a whole ([`FilterCell::publish`]); the packet path picks it up at the
//! start of a batch when the generation number moved, so a frame is always judged
//! by one consistent filter and the check costs no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Entries per MAC table before the table overflows (QEMU's `MAC_TABLE_ENTRIES`).
/// An overflowing table accepts every address of its kind.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// VLAN IDs are 12 bits.
pub const MAX_VLAN: u16 = 4096;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// The receive filter's state.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RxFilter {
    /// Accept every frame.
    pub promisc: bool,
    /// Accept every multicast frame.
    pub allmulti: bool,
    /// Accept every unicast frame.
    pub alluni: bool,
    /// Reject every multicast frame.
    pub nomulti: bool,
    /// Reject every unicast frame.
    pub nouni: bool,
    /// Reject broadcast frames.
    pub nobcast: bool,
    /// The device's own MAC address.
    pub mac: MacAddr,
    /// Extra unicast addresses to accept.
    pub unicast: Vec<MacAddr>,
    /// Multicast addresses to accept.
    pub multicast: Vec<MacAddr>,
    /// The driver sent more unicast addresses than fit: accept all unicast.
    pub unicast_overflow: bool,
    /// The driver sent more multicast addresses than fit: accept all multicast.
    pub multicast_overflow: bool,
    /// Allowed VLAN IDs, one bit each; all set when VLAN filtering was not
    /// negotiated. With the `serde` feature: a sequence of exactly 64 words.
    #[cfg_attr(
        feature = "serde",
        serde(
            serialize_with = "vlan_words::serialize",
            deserialize_with = "vlan_words::deserialize"
        )
    )]
    pub vlans: Box<[u64; 64]>,
}

/// serde for [`RxFilter::vlans`]: serde derives arrays only up to 32 elements,
/// so the table travels as a sequence of its 64 words and any other length is
/// a deserialization error.
#[cfg(feature = "serde")]
mod vlan_words {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const WORDS: usize = 64;

    pub(super) fn serialize<S: Serializer>(vlans: &[u64; WORDS], s: S) -> Result<S::Ok, S::Error> {
        vlans.as_slice().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Box<[u64; WORDS]>, D::Error> {
        let words = Vec::<u64>::deserialize(d)?;
        let len = words.len();
        words
            .into_boxed_slice()
            .try_into()
            .map_err(|_| D::Error::invalid_length(len, &"the 64 words of the VLAN table"))
    }
}

impl RxFilter {
    /// The state after a device reset (QEMU's defaults): promiscuous, every VLAN
    /// allowed, empty tables.
    pub fn new(mac: MacAddr) -> Self {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
            unicast_overflow: false,
            multicast_overflow: false,
            vlans: Box::new([u64::MAX; 64]),
        }
    }

    /// Allows or forbids every VLAN (the driver negotiated `CTRL_VLAN` or not).
    pub fn set_all_vlans(&mut self, allowed: bool) {
        *self.vlans = [if allowed { u64::MAX } else { 0 }; 64];
    }

    /// Allows or forbids one VLAN. Returns false for an ID of 4096 or more.
    pub fn set_vlan(&mut self, vid: u16, allowed: bool) -> bool {
        if vid >= MAX_VLAN {
            return false;
        }
        let (w, b) = (usize::from(vid / 64), vid % 64);
        if allowed {
            self.vlans[w] |= 1 << b;
        } else {
            self.vlans[w] &= !(1 << b);
        }
        true
    }

    /// Whether VLAN `vid` is allowed.
    pub fn vlan_allowed(&self, vid: u16) -> bool {
        let vid = vid & 0xfff;
        self.vlans[usize::from(vid / 64)] & (1 << (vid % 64)) != 0
    }

    /// Whether to accept an Ethernet frame whose first bytes (destination,
    /// source, EtherType, and the VLAN tag if any) are `eth`. Frames shorter than
    /// an Ethernet header are judged on what is there: a runt is rejected unless
    /// promiscuous.
    pub fn accepts(&self, eth: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        if eth.len() < 14 {
            return false;
        }
        if eth[12] == 0x81 && eth[13] == 0x00 {
            let Some(tci) = eth.get(14..16) else {
                return false;
            };
            if !self.vlan_allowed(u16::from_be_bytes([tci[0], tci[1]])) {
                return false;
            }
        }
        let dst: &MacAddr = eth[..6].try_into().expect("6 bytes");
        if dst == &[0xff; 6] {
            return !self.nobcast;
        }
        if dst[0] & 1 != 0 {
            if self.nomulti {
                return false;
            }
            return self.allmulti || self.multicast_overflow || self.multicast.contains(dst);
        }
        if self.nouni {
            return false;
        }
        self.alluni || self.unicast_overflow || dst == &self.mac || self.unicast.contains(dst)
    }
}

/// The current filter, shared by the control queue (writer) and every queue pair
/// (readers). See the module documentation.
#[derive(Debug)]
pub struct FilterCell {
    current: Mutex<Arc<RxFilter>>,
    generation: AtomicU64,
}

impl FilterCell {
    /// A cell holding `filter`.
    pub fn new(filter: RxFilter) -> Self {
        FilterCell {
            current: Mutex::new(Arc::new(filter)),
            generation: AtomicU64::new(1),
        }
    }

    /// The generation number; it changes with every publish.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current filter.
    pub fn load(&self) -> Arc<RxFilter> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes the filter with `f` and publishes the result.
    pub fn update<R>(&self, f: impl FnOnce(&mut RxFilter) -> R) -> R {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = RxFilter::clone(&guard);
        let r = f(&mut next);
        *guard = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// Replaces the filter.
    pub fn publish(&self, filter: RxFilter) {
        self.update(|f| *f = filter);
    }
}

/// A queue pair's cached copy of the filter.
#[derive(Debug)]
pub(crate) struct FilterView {
    filter: Arc<RxFilter>,
    generation: u64,
}

impl FilterView {
    pub fn new(cell: &FilterCell) -> Self {
        FilterView {
            generation: cell.generation(),
            filter: cell.load(),
        }
    }

    /// Picks up a newer filter if one was published. One atomic load when not.
    #[inline]
    pub fn refresh(&mut self, cell: &FilterCell) -> &RxFilter {
        let g = cell.generation();
        if g != self.generation {
            self.generation = g;
            self.filter = cell.load();
        }
        &self.filter
    }

    #[inline]
    pub fn get(&self) -> &RxFilter {
        &self.filter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: MacAddr = [0x52, 0x54, 0, 0, 0, 1];

    fn eth(dst: MacAddr, vlan: Option<u16>) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
        if let Some(v) = vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00, 0x45]);
        f
    }

    fn strict() -> RxFilter {
        RxFilter {
            promisc: false,
            ..RxFilter::new(OWN)
        }
    }

    #[test]
    fn reset_state_is_promiscuous() {
        let f = RxFilter::new(OWN);
        assert!(f.accepts(&eth([2, 0, 0, 0, 0, 7], None)));
        assert!(f.accepts(&[1, 2, 3]));
    }

    #[test]
    fn unicast_rules() {
        let mut f = strict();
        assert!(f.accepts(&eth(OWN, None)));
        let other = [2, 0, 0, 0, 0, 7];
        assert!(!f.accepts(&eth(other, None)));
        f.unicast.push(other);
        assert!(f.accepts(&eth(other, None)));
        f.unicast.clear();
        f.unicast_overflow = true;
        assert!(f.accepts(&eth(other, None)));
        f.unicast_overflow = false;
        f.alluni = true;
        assert!(f.accepts(&eth(other, None)));
        f.nouni = true;
        assert!(!f.accepts(&eth(OWN, None)));
        assert!(!f.accepts(&[0; 10]), "runt");
    }

    #[test]
    fn multicast_and_broadcast_rules() {
        let mut f = strict();
        let mc = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert!(!f.accepts(&eth(mc, None)));
        f.multicast.push(mc);
        assert!(f.accepts(&eth(mc, None)));
        f.multicast.clear();
        f.allmulti = true;
        assert!(f.accepts(&eth(mc, None)));
        f.allmulti = false;
        f.multicast_overflow = true;
        assert!(f.accepts(&eth(mc, None)));
        f.nomulti = true;
        assert!(!f.accepts(&eth(mc, None)));
        assert!(f.accepts(&eth([0xff; 6], None)));
        f.nobcast = true;
        assert!(!f.accepts(&eth([0xff; 6], None)));
    }

    #[test]
    fn vlan_rules() {
        let mut f = strict();
        // Not negotiated: every VLAN passes.
        assert!(f.accepts(&eth(OWN, Some(100))));
        f.set_all_vlans(false);
        assert!(!f.accepts(&eth(OWN, Some(100))));
        assert!(
            f.accepts(&eth(OWN, None)),
            "untagged frames are not VLAN-filtered"
        );
        assert!(f.set_vlan(100, true));
        assert!(f.accepts(&eth(OWN, Some(100))));
        // Priority bits do not matter.
        assert!(f.accepts(&eth(OWN, Some(0xe000 | 100))));
        assert!(f.set_vlan(100, false));
        assert!(!f.accepts(&eth(OWN, Some(100))));
        assert!(!f.set_vlan(4096, true));
        assert!(f.set_vlan(4095, true));
        assert!(f.vlan_allowed(4095));
        // Promiscuous beats the VLAN table.
        f.promisc = true;
        assert!(f.accepts(&eth(OWN, Some(7))));
        // A tag cut short is rejected.
        f.promisc = false;
        assert!(!f.accepts(&eth(OWN, Some(100))[..15]));
    }

    #[test]
    fn cell_publishes_generations() {
        let cell = FilterCell::new(RxFilter::new(OWN));
        let mut view = FilterView::new(&cell);
        assert!(view.get().promisc);
        cell.update(|f| f.promisc = false);
        assert!(view.get().promisc, "old copy until refresh");
        assert!(!view.refresh(&cell).promisc);
        cell.publish(RxFilter::new([9; 6]));
        assert_eq!(view.refresh(&cell).mac, [9; 6]);
    }
}
