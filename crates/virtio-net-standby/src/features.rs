//! Feature bits of the virtio-net device, the offered set, and negotiation.
//!
//! A virtio feature set is a 64-bit word. [`Features`] wraps it with names, and
//! [`negotiate`] checks the set a driver acknowledged against the set the device
//! offered, the way the transport must before it accepts `FEATURES_OK`.
//!
//! `VIRTIO_NET_F_STANDBY` is bit 62: in the modern virtio-pci transport that is bit
//! 30 of feature word 1, which a legacy (32-bit) transport cannot carry, so STANDBY
//! without `VIRTIO_F_VERSION_1` is refused.

use std::fmt;

use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Errors of feature negotiation. Each one means the transport must refuse
/// `FEATURES_OK` (the driver reads the status back and sees the bit cleared).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The driver acknowledged bits the device never offered.
    #[error("the driver acknowledged feature bits the device did not offer: {0}")]
    NotOffered(Features),
    /// STANDBY lives in feature word 1, which only a virtio 1.x driver can acknowledge.
    #[error(
        "VIRTIO_NET_F_STANDBY was acknowledged without VIRTIO_F_VERSION_1: a failover standby needs a virtio 1.x driver"
    )]
    StandbyWithoutVersion1,
    /// The device implements the modern (virtio 1.x) interface only.
    #[error(
        "the driver did not acknowledge VIRTIO_F_VERSION_1: this device has no legacy interface"
    )]
    LegacyDriver,
    /// A feature was acknowledged without one of the features it depends on.
    #[error(
        "{feature} was acknowledged without {requires}, which it requires (virtio spec 5.1.3.1)"
    )]
    MissingDependency {
        /// The feature whose dependency is missing.
        feature: &'static str,
        /// What it requires, in words ("A or B" when either will do).
        requires: String,
    },
    /// The device was configured to offer a feature without one it depends on.
    #[error("the offered feature set is inconsistent: {feature} is offered without {requires}")]
    InconsistentOffer {
        /// The feature whose dependency is not offered.
        feature: &'static str,
        /// What it requires.
        requires: String,
    },
}

/// Result of feature operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Bit number of `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u32 = VIRTIO_F_VERSION_1;
/// Bit number of `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_RING_INDIRECT_DESC: u32 = VIRTIO_RING_F_INDIRECT_DESC;
/// Bit number of `VIRTIO_RING_F_EVENT_IDX`.
pub const F_RING_EVENT_IDX: u32 = VIRTIO_RING_F_EVENT_IDX;
/// Bit number of `VIRTIO_F_IN_ORDER` (35): the device uses buffers in the order
/// the driver made them available.
pub const F_IN_ORDER: u32 = VIRTIO_F_IN_ORDER;
/// Bit number of `VIRTIO_NET_F_STANDBY` (62).
pub const F_STANDBY: u32 = VIRTIO_NET_F_STANDBY;

/// A set of virtio feature bits.
///
/// Bits are addressed by number, as the specification numbers them
/// (`VIRTIO_NET_F_MAC` is 5, `VIRTIO_NET_F_STANDBY` is 62).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Features(u64);

impl Features {
    /// The empty set.
    pub const fn empty() -> Self {
        Features(0)
    }

    /// The set whose 64-bit word is `bits`.
    pub const fn from_bits(bits: u64) -> Self {
        Features(bits)
    }

    /// The set holding exactly the listed bit numbers. Bit numbers of 64 and above
    /// are ignored.
    pub const fn from_bit_numbers(bits: &[u32]) -> Self {
        let mut word = 0u64;
        let mut i = 0;
        while i < bits.len() {
            if bits[i] < 64 {
                word |= 1 << bits[i];
            }
            i += 1;
        }
        Features(word)
    }

    /// The 64-bit word.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The 32-bit word `select` (0: bits 0..31, 1: bits 32..63), as the virtio-pci
    /// `device_feature_select` register exposes it. Other selects read as zero.
    pub const fn word(self, select: u32) -> u32 {
        match select {
            0 => self.0 as u32,
            1 => (self.0 >> 32) as u32,
            _ => 0,
        }
    }

    /// Whether bit number `bit` is set.
    pub const fn has(self, bit: u32) -> bool {
        bit < 64 && self.0 & (1 << bit) != 0
    }

    /// This set with bit number `bit` set.
    pub const fn with(self, bit: u32) -> Self {
        if bit < 64 {
            Features(self.0 | (1 << bit))
        } else {
            self
        }
    }

    /// This set with bit number `bit` cleared.
    pub const fn without(self, bit: u32) -> Self {
        if bit < 64 {
            Features(self.0 & !(1 << bit))
        } else {
            self
        }
    }

    /// Bits in both sets.
    pub const fn intersection(self, other: Features) -> Self {
        Features(self.0 & other.0)
    }

    /// Bits in either set.
    pub const fn union(self, other: Features) -> Self {
        Features(self.0 | other.0)
    }

    /// Bits of `self` that are not in `other`.
    pub const fn difference(self, other: Features) -> Self {
        Features(self.0 & !other.0)
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bit numbers that are set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u32> {
        (0..64u32).filter(move |b| self.has(*b))
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x}: {})", self.0, self)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        for (i, bit) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            f.write_str(&describe_bit(bit))?;
        }
        Ok(())
    }
}

impl From<u64> for Features {
    fn from(bits: u64) -> Self {
        Features(bits)
    }
}

impl From<Features> for u64 {
    fn from(f: Features) -> Self {
        f.0
    }
}

/// The specification's name of a feature bit, if this crate knows it.
pub fn bit_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        VIRTIO_NET_F_CSUM => "VIRTIO_NET_F_CSUM",
        VIRTIO_NET_F_GUEST_CSUM => "VIRTIO_NET_F_GUEST_CSUM",
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS => "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
        VIRTIO_NET_F_MTU => "VIRTIO_NET_F_MTU",
        VIRTIO_NET_F_MAC => "VIRTIO_NET_F_MAC",
        VIRTIO_NET_F_GSO => "VIRTIO_NET_F_GSO",
        VIRTIO_NET_F_GUEST_TSO4 => "VIRTIO_NET_F_GUEST_TSO4",
        VIRTIO_NET_F_GUEST_TSO6 => "VIRTIO_NET_F_GUEST_TSO6",
        VIRTIO_NET_F_GUEST_ECN => "VIRTIO_NET_F_GUEST_ECN",
        VIRTIO_NET_F_GUEST_UFO => "VIRTIO_NET_F_GUEST_UFO",
        VIRTIO_NET_F_HOST_TSO4 => "VIRTIO_NET_F_HOST_TSO4",
        VIRTIO_NET_F_HOST_TSO6 => "VIRTIO_NET_F_HOST_TSO6",
        VIRTIO_NET_F_HOST_ECN => "VIRTIO_NET_F_HOST_ECN",
        VIRTIO_NET_F_HOST_UFO => "VIRTIO_NET_F_HOST_UFO",
        VIRTIO_NET_F_MRG_RXBUF => "VIRTIO_NET_F_MRG_RXBUF",
        VIRTIO_NET_F_STATUS => "VIRTIO_NET_F_STATUS",
        VIRTIO_NET_F_CTRL_VQ => "VIRTIO_NET_F_CTRL_VQ",
        VIRTIO_NET_F_CTRL_RX => "VIRTIO_NET_F_CTRL_RX",
        VIRTIO_NET_F_CTRL_VLAN => "VIRTIO_NET_F_CTRL_VLAN",
        VIRTIO_NET_F_CTRL_RX_EXTRA => "VIRTIO_NET_F_CTRL_RX_EXTRA",
        VIRTIO_NET_F_GUEST_ANNOUNCE => "VIRTIO_NET_F_GUEST_ANNOUNCE",
        VIRTIO_NET_F_MQ => "VIRTIO_NET_F_MQ",
        VIRTIO_NET_F_CTRL_MAC_ADDR => "VIRTIO_NET_F_CTRL_MAC_ADDR",
        VIRTIO_RING_F_INDIRECT_DESC => "VIRTIO_RING_F_INDIRECT_DESC",
        VIRTIO_RING_F_EVENT_IDX => "VIRTIO_RING_F_EVENT_IDX",
        VIRTIO_F_VERSION_1 => "VIRTIO_F_VERSION_1",
        VIRTIO_F_IN_ORDER => "VIRTIO_F_IN_ORDER",
        VIRTIO_NET_F_GUEST_USO4 => "VIRTIO_NET_F_GUEST_USO4",
        VIRTIO_NET_F_GUEST_USO6 => "VIRTIO_NET_F_GUEST_USO6",
        VIRTIO_NET_F_HOST_USO => "VIRTIO_NET_F_HOST_USO",
        VIRTIO_NET_F_HASH_REPORT => "VIRTIO_NET_F_HASH_REPORT",
        VIRTIO_NET_F_RSS => "VIRTIO_NET_F_RSS",
        VIRTIO_NET_F_STANDBY => "VIRTIO_NET_F_STANDBY",
        VIRTIO_NET_F_SPEED_DUPLEX => "VIRTIO_NET_F_SPEED_DUPLEX",
        _ => return None,
    })
}

/// The name of a bit for messages: its specification name, or `bit N`.
fn describe_bit(bit: u32) -> String {
    bit_name(bit).map_or_else(|| format!("bit {bit}"), str::to_string)
}

/// Every bit this device implements. Offering anything outside this set is refused
/// by the builder: the device would not honour it.
pub const IMPLEMENTED: Features = Features::from_bit_numbers(&[
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_F_IN_ORDER,
    VIRTIO_NET_F_STANDBY,
    VIRTIO_NET_F_SPEED_DUPLEX,
]);

/// The set a standby device offers by default: everything implemented. The
/// builder then removes what the backend cannot carry (for example UFO on a tap
/// whose kernel refuses it) and what the configuration turns off.
pub const DEFAULT_OFFER: Features = IMPLEMENTED;

/// The guest-receive offload bits (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`,
/// `GUEST_UFO`): the ones `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` may change and the
/// backend must be told about (`TUNSETOFFLOAD` on a tap).
pub const GUEST_OFFLOADS: Features = Features::from_bit_numbers(&[
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
]);

/// The host (device-receive) offload bits: what the guest may hand us un-checksummed
/// or un-segmented.
pub const HOST_OFFLOADS: Features = Features::from_bit_numbers(&[
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
]);

/// `(feature, any one of these is required)`: the dependencies of virtio spec
/// 5.1.3.1, plus the two the control-queue semantics imply (`CTRL_RX_EXTRA` extends
/// `CTRL_RX`; `CTRL_GUEST_OFFLOADS` is a control-queue command).
const DEPENDENCIES: &[(u32, &[u32])] = &[
    (VIRTIO_NET_F_GUEST_TSO4, &[VIRTIO_NET_F_GUEST_CSUM]),
    (VIRTIO_NET_F_GUEST_TSO6, &[VIRTIO_NET_F_GUEST_CSUM]),
    (
        VIRTIO_NET_F_GUEST_ECN,
        &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6],
    ),
    (VIRTIO_NET_F_GUEST_UFO, &[VIRTIO_NET_F_GUEST_CSUM]),
    (VIRTIO_NET_F_HOST_TSO4, &[VIRTIO_NET_F_CSUM]),
    (VIRTIO_NET_F_HOST_TSO6, &[VIRTIO_NET_F_CSUM]),
    (
        VIRTIO_NET_F_HOST_ECN,
        &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
    ),
    (VIRTIO_NET_F_HOST_UFO, &[VIRTIO_NET_F_CSUM]),
    (VIRTIO_NET_F_CTRL_RX, &[VIRTIO_NET_F_CTRL_VQ]),
    (VIRTIO_NET_F_CTRL_VLAN, &[VIRTIO_NET_F_CTRL_VQ]),
    (VIRTIO_NET_F_GUEST_ANNOUNCE, &[VIRTIO_NET_F_CTRL_VQ]),
    (VIRTIO_NET_F_MQ, &[VIRTIO_NET_F_CTRL_VQ]),
    (VIRTIO_NET_F_CTRL_MAC_ADDR, &[VIRTIO_NET_F_CTRL_VQ]),
    (VIRTIO_NET_F_CTRL_RX_EXTRA, &[VIRTIO_NET_F_CTRL_RX]),
    (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, &[VIRTIO_NET_F_CTRL_VQ]),
];

/// The first dependency `set` breaks: the feature, and the features any one of
/// which it needs.
fn first_broken_dependency(set: Features) -> Option<(u32, &'static [u32])> {
    broken_dependency(set, false)
}

/// As [`first_broken_dependency`]; with `frontend_control`, `MQ` needs no
/// `CTRL_VQ` (see [`negotiate_with_frontend_control`]).
fn broken_dependency(set: Features, frontend_control: bool) -> Option<(u32, &'static [u32])> {
    DEPENDENCIES
        .iter()
        .filter(|(feature, _)| !(frontend_control && *feature == VIRTIO_NET_F_MQ))
        .find(|(feature, any_of)| set.has(*feature) && !any_of.iter().any(|b| set.has(*b)))
        .map(|(f, any_of)| (*f, *any_of))
}

/// `(feature name, requirement in words)` for messages.
fn describe_dependency((feature, any_of): (u32, &[u32])) -> (&'static str, String) {
    let requires = any_of
        .iter()
        .map(|b| describe_bit(*b))
        .collect::<Vec<_>>()
        .join(" or ");
    // The dependency table only holds bits this crate names.
    (bit_name(feature).unwrap_or("a feature"), requires)
}

/// Removes, until none is left, every feature whose dependencies are missing:
/// what remains of an offer after the backend took some offloads away.
pub fn prune(mut set: Features) -> Features {
    while let Some((feature, _)) = first_broken_dependency(set) {
        set = set.without(feature);
    }
    set
}

/// [`prune`] for a frontend that serves the control queue itself: `MQ`
/// stays without `CTRL_VQ` (see [`negotiate_with_frontend_control`]).
pub fn prune_with_frontend_control(mut set: Features) -> Features {
    while let Some((feature, _)) = broken_dependency(set, true) {
        set = set.without(feature);
    }
    set
}

/// Checks that an offered set is self-consistent and implemented.
pub fn validate_offer(offered: Features) -> Result<()> {
    let unimplemented = offered.difference(IMPLEMENTED);
    if !unimplemented.is_empty() {
        return Err(Error::InconsistentOffer {
            feature: "the offer",
            requires: format!("only implemented bits (not {unimplemented})"),
        });
    }
    if offered.has(F_STANDBY) && !offered.has(F_VERSION_1) {
        return Err(Error::InconsistentOffer {
            feature: "VIRTIO_NET_F_STANDBY",
            requires: "VIRTIO_F_VERSION_1".into(),
        });
    }
    if let Some(broken) = first_broken_dependency(offered) {
        let (feature, requires) = describe_dependency(broken);
        return Err(Error::InconsistentOffer { feature, requires });
    }
    Ok(())
}

/// Checks the set a driver acknowledged against the offered set.
///
/// The order of the checks fixes which error a driver that breaks several rules
/// sees: unoffered bits, then STANDBY without VERSION_1, then a legacy driver, then
/// dependencies.
pub fn negotiate(offered: Features, acked: Features) -> Result<Features> {
    negotiate_as(offered, acked, false)
}

/// [`negotiate`] for a frontend that serves the control queue itself and
/// hands the device only the data rings: a vhost-user frontend (QEMU, DPDK's
/// virtio-user) acknowledges `MQ` without `CTRL_VQ` and enables queue pairs
/// by their rings (`SET_VRING_ENABLE`) rather than by `VQ_PAIRS_SET`. Every
/// other rule is [`negotiate`]'s.
pub fn negotiate_with_frontend_control(offered: Features, acked: Features) -> Result<Features> {
    negotiate_as(offered, acked, true)
}

fn negotiate_as(offered: Features, acked: Features, frontend_control: bool) -> Result<Features> {
    let unoffered = acked.difference(offered);
    if !unoffered.is_empty() {
        return Err(Error::NotOffered(unoffered));
    }
    if acked.has(F_STANDBY) && !acked.has(F_VERSION_1) {
        return Err(Error::StandbyWithoutVersion1);
    }
    if !acked.has(F_VERSION_1) {
        return Err(Error::LegacyDriver);
    }
    if let Some(broken) = broken_dependency(acked, frontend_control) {
        let (feature, requires) = describe_dependency(broken);
        return Err(Error::MissingDependency { feature, requires });
    }
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux_like_ack() -> Features {
        // What Linux 6.x virtio_net acks of our default offer.
        DEFAULT_OFFER
    }

    #[test]
    fn standby_is_bit_30_of_word_1() {
        let f = Features::empty().with(F_STANDBY);
        assert_eq!(f.word(0), 0);
        assert_eq!(f.word(1), 1 << 30);
        assert_eq!(f.word(2), 0);
        assert_eq!(F_STANDBY, 62);
    }

    #[test]
    fn default_offer_is_consistent() {
        validate_offer(DEFAULT_OFFER).unwrap();
        assert!(DEFAULT_OFFER.has(F_STANDBY));
        assert!(DEFAULT_OFFER.has(F_VERSION_1));
    }

    #[test]
    fn full_ack_is_accepted() {
        assert_eq!(
            negotiate(DEFAULT_OFFER, linux_like_ack()).unwrap(),
            DEFAULT_OFFER
        );
    }

    #[test]
    fn unoffered_bit_is_refused_and_named() {
        let offered = DEFAULT_OFFER.without(VIRTIO_NET_F_MQ);
        let err = negotiate(offered, DEFAULT_OFFER).unwrap_err();
        assert_eq!(
            err,
            Error::NotOffered(Features::empty().with(VIRTIO_NET_F_MQ))
        );
        assert!(err.to_string().contains("VIRTIO_NET_F_MQ"), "{err}");
    }

    #[test]
    fn standby_without_version_1_is_refused() {
        let acked = Features::empty().with(F_STANDBY).with(VIRTIO_NET_F_MAC);
        assert_eq!(
            negotiate(DEFAULT_OFFER, acked).unwrap_err(),
            Error::StandbyWithoutVersion1
        );
    }

    #[test]
    fn legacy_driver_is_refused() {
        let acked = Features::empty().with(VIRTIO_NET_F_MAC);
        assert_eq!(
            negotiate(DEFAULT_OFFER, acked).unwrap_err(),
            Error::LegacyDriver
        );
    }

    #[test]
    fn every_dependency_is_enforced() {
        for (feature, any_of) in DEPENDENCIES {
            let mut acked = Features::empty().with(F_VERSION_1).with(*feature);
            // Satisfy the dependencies of the requirement's own requirements, but
            // not the requirement itself.
            for b in *any_of {
                acked = acked.without(*b);
            }
            let err = negotiate(DEFAULT_OFFER, acked).unwrap_err();
            match err {
                Error::MissingDependency { feature: f, .. } => {
                    assert_eq!(Some(f), bit_name(*feature));
                }
                other => panic!("{feature}: unexpected {other:?}"),
            }
            // Adding any one of the requirements (and its own chain) fixes it.
            let fixed = acked
                .with(any_of[0])
                .with(VIRTIO_NET_F_CTRL_VQ)
                .with(VIRTIO_NET_F_CTRL_RX)
                .with(VIRTIO_NET_F_GUEST_CSUM)
                .with(VIRTIO_NET_F_CSUM);
            negotiate(DEFAULT_OFFER, fixed).unwrap();
        }
    }

    #[test]
    fn ecn_accepts_either_tso() {
        let base = Features::empty()
            .with(F_VERSION_1)
            .with(VIRTIO_NET_F_GUEST_CSUM)
            .with(VIRTIO_NET_F_GUEST_ECN);
        negotiate(DEFAULT_OFFER, base.with(VIRTIO_NET_F_GUEST_TSO6)).unwrap();
        negotiate(DEFAULT_OFFER, base.with(VIRTIO_NET_F_GUEST_TSO4)).unwrap();
        let err = negotiate(DEFAULT_OFFER, base).unwrap_err();
        assert!(
            err.to_string()
                .contains("VIRTIO_NET_F_GUEST_TSO4 or VIRTIO_NET_F_GUEST_TSO6"),
            "{err}"
        );
    }

    #[test]
    fn offer_validation() {
        assert!(validate_offer(DEFAULT_OFFER.without(F_VERSION_1)).is_err());
        assert!(validate_offer(DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_VQ)).is_err());
        assert!(validate_offer(DEFAULT_OFFER.with(VIRTIO_NET_F_RSS)).is_err());
        // A plain, non-standby device is fine.
        validate_offer(DEFAULT_OFFER.without(F_STANDBY)).unwrap();
    }

    #[test]
    fn prune_removes_orphans_transitively() {
        // Without GUEST_CSUM, TSO goes, and with it ECN.
        let p = prune(DEFAULT_OFFER.without(VIRTIO_NET_F_GUEST_CSUM));
        assert!(!p.has(VIRTIO_NET_F_GUEST_TSO4));
        assert!(!p.has(VIRTIO_NET_F_GUEST_ECN));
        assert!(!p.has(VIRTIO_NET_F_GUEST_UFO));
        assert!(p.has(VIRTIO_NET_F_HOST_TSO4));
        validate_offer(p).unwrap();
        // Without the control queue, everything that uses it goes.
        let p = prune(DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_VQ));
        for b in [
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_RX_EXTRA,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        ] {
            assert!(!p.has(b), "{}", describe_bit(b));
        }
        assert_eq!(prune(DEFAULT_OFFER), DEFAULT_OFFER);
    }

    #[test]
    fn a_frontend_that_serves_the_control_queue_keeps_mq_without_ctrl_vq() {
        let acked = DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_VQ);
        let p = prune_with_frontend_control(acked);
        assert!(p.has(VIRTIO_NET_F_MQ));
        for b in [VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS] {
            assert!(!p.has(b), "{}", describe_bit(b));
        }
        assert_eq!(negotiate_with_frontend_control(DEFAULT_OFFER, p), Ok(p));
        // A driver negotiating by itself still needs the control queue.
        assert!(matches!(
            negotiate(DEFAULT_OFFER, p),
            Err(Error::MissingDependency {
                feature: "VIRTIO_NET_F_MQ",
                ..
            })
        ));
        assert!(!prune(acked).has(VIRTIO_NET_F_MQ));
    }

    #[test]
    fn display_names_bits() {
        let f = Features::empty()
            .with(VIRTIO_NET_F_MAC)
            .with(F_STANDBY)
            .with(40);
        assert_eq!(
            f.to_string(),
            "VIRTIO_NET_F_MAC | bit 40 | VIRTIO_NET_F_STANDBY"
        );
        assert_eq!(Features::empty().to_string(), "(none)");
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![5, 40, 62]);
        assert!(!f.with(64).has(64));
    }
}
