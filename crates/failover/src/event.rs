//! The coordinator's event stream: what happened to each pair and migration,
//! typed, timestamped on the coordinator's [`Clock`](crate::Clock), and (with
//! the `serde` feature) serializable as JSON lines in the spirit of QMP events.
//!
//! Two events carry QMP's own names and data, so tooling written for QEMU reads
//! them as it reads QEMU's: `FAILOVER_NEGOTIATED` and `UNPLUG_PRIMARY`, each
//! with `device-id`. `MIGRATION` carries QMP's `status` values (`setup`,
//! `wait-unplug`, `active`, `cancelling`, `cancelled`, `failed`, `completed`).
//! The others are ours: QEMU has no event for them and reports some of them as
//! log lines or not at all.
//!
//! ```text
//! {"timestamp":{"seconds":12,"microseconds":20000},"event":"UNPLUG_PRIMARY","data":{"device-id":"hostdev0"}}
//! ```
//!
//! QMP's timestamps are wall-clock time; these are the coordinator's monotonic
//! clock (real time since the coordinator was built, or a test's virtual time).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::migration::MigrationState;

/// A MAC address, shown and serialized as `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl From<[u8; 6]> for MacAddress {
    fn from(b: [u8; 6]) -> Self {
        MacAddress(b)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(|| {
                format!("'{s}' is not a MAC address (six hex pairs, ':'-separated)")
            })?;
            *byte = u8::from_str_radix(p, 16)
                .map_err(|_| format!("'{s}' is not a MAC address: '{p}' is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(format!("'{s}' is not a MAC address: more than six bytes"));
        }
        Ok(MacAddress(b))
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a primary went into its slot as an ordinary device rather than being
/// held for failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum UnpairedReason {
    /// Its standby is registered with failover off (QEMU's `failover=off`).
    FailoverOff,
    /// No standby with its `failover_pair_id` was registered by the time the
    /// machine was ready (QEMU's params/on_mismatch).
    NoStandby,
}

impl fmt::Display for UnpairedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnpairedReason::FailoverOff => "its standby has failover off",
            UnpairedReason::NoStandby => "no standby with that id is registered",
        })
    }
}

/// What happened. Device names are the ids the VMM registered them with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(
        tag = "event",
        content = "data",
        rename_all = "SCREAMING_SNAKE_CASE",
        rename_all_fields = "kebab-case"
    )
)]
#[non_exhaustive]
pub enum Event {
    /// A primary is held out of its slot: its standby has failover on (or is not
    /// registered yet) and the guest has not acknowledged STANDBY.
    PrimaryHidden {
        /// The primary's id.
        primary: String,
        /// Its `failover_pair_id`.
        standby: String,
    },
    /// A primary and a standby with failover on are registered: they are a pair.
    Paired {
        /// The primary's id.
        primary: String,
        /// The standby's id.
        standby: String,
    },
    /// Warning: the primary's MAC differs from its standby's. The guest's
    /// `net_failover` pairs the two by MAC, so it will not bond them; give the
    /// primary the standby's MAC. (QEMU and libvirt do not check.)
    MacMismatch {
        /// The primary's id.
        primary: String,
        /// The primary's MAC.
        primary_mac: MacAddress,
        /// The standby's id.
        standby: String,
        /// The standby's MAC.
        standby_mac: MacAddress,
    },
    /// A primary goes into its slot as an ordinary device, not hidden and not
    /// unplugged for migration.
    PrimaryUnpaired {
        /// The primary's id.
        primary: String,
        /// Its `failover_pair_id`.
        standby: String,
        /// Why.
        reason: UnpairedReason,
    },
    /// The guest's driver acknowledged `VIRTIO_NET_F_STANDBY` on the standby (or
    /// a state in which it had was restored). QMP `FAILOVER_NEGOTIATED`.
    FailoverNegotiated {
        /// The standby's id.
        #[cfg_attr(feature = "serde", serde(rename = "device-id"))]
        standby: String,
    },
    /// Warning: STANDBY was acknowledged but no primary is registered for the
    /// standby; the guest runs on the standby alone (QEMU: "Primary device not
    /// found"). On a migration destination: the destination has no primary.
    PrimaryMissing {
        /// The standby's id.
        standby: String,
    },
    /// The guest finished enabling a hot-plugged primary (powered the slot and
    /// turned its power indicator on).
    PrimaryPlugged {
        /// The primary's id.
        primary: String,
    },
    /// A plug did not happen: the slot refused it, or the guest powered the slot
    /// off before enabling the device. The primary stays hidden; the next
    /// acknowledgement of STANDBY tries again.
    PrimaryPlugFailed {
        /// The primary's id.
        primary: String,
        /// Why, with the slot's or the guest's reason.
        reason: String,
    },
    /// The coordinator asked the guest to release the primary for migration.
    /// QMP `UNPLUG_PRIMARY`.
    UnplugPrimary {
        /// The primary's id.
        #[cfg_attr(feature = "serde", serde(rename = "device-id"))]
        primary: String,
    },
    /// Make before break: the primary's link was taken down for migration
    /// ([`PrimaryLink`](crate::PrimaryLink)); the guest moves its traffic to
    /// the standby, and the unplug is requested once it does (or the switch
    /// wait has passed).
    PrimaryLinkDown {
        /// The primary's id.
        primary: String,
    },
    /// The primary's link was brought back up: its migration was cancelled
    /// or failed. Comes before the primary is plugged back, if it left.
    PrimaryLinkUp {
        /// The primary's id.
        primary: String,
    },
    /// Make before break: the guest transmits on the standby (or the switch
    /// wait passed without traffic), so the primary's unplug is requested now
    /// (`UNPLUG_PRIMARY` follows).
    SwitchedToStandby {
        /// The standby's id.
        standby: String,
        /// The primary's id.
        primary: String,
        /// Traffic was seen on the standby; `false`: the switch wait passed
        /// without any (an idle guest, or one slow to notice the carrier
        /// loss).
        traffic_seen: bool,
    },
    /// The primary left the guest (it powered the slot off).
    PrimaryUnplugged {
        /// The primary's id.
        primary: String,
    },
    /// An unplug was withdrawn before the guest acted on it: the primary never
    /// left.
    UnplugCancelled {
        /// The primary's id.
        primary: String,
    },
    /// Warning: an unplug was cancelled too late (the guest had passed its
    /// 5-second window) and the primary left anyway. It is plugged back.
    UnplugNotCancelled {
        /// The primary's id.
        primary: String,
    },
    /// An outgoing or incoming migration changed state. QMP `MIGRATION`.
    Migration {
        /// The new state.
        status: MigrationState,
        /// Why, for `failed` (and for a `cancelled` that gave up waiting).
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        reason: Option<String>,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::PrimaryHidden { primary, standby } => write!(
                f,
                "primary '{primary}' is hidden until the guest acknowledges STANDBY on '{standby}'"
            ),
            Event::Paired { primary, standby } => {
                write!(f, "primary '{primary}' is paired with standby '{standby}'")
            }
            Event::MacMismatch {
                primary,
                primary_mac,
                standby,
                standby_mac,
            } => write!(
                f,
                "primary '{primary}' has MAC {primary_mac} but its standby '{standby}' has \
                 {standby_mac}: the guest pairs them by MAC and will not bond them; give the \
                 primary the standby's MAC"
            ),
            Event::PrimaryUnpaired {
                primary,
                standby,
                reason,
            } => write!(
                f,
                "primary '{primary}' is plugged as an ordinary device: failover_pair_id \
                 '{standby}', but {reason}"
            ),
            Event::FailoverNegotiated { standby } => {
                write!(f, "the guest acknowledged STANDBY on '{standby}'")
            }
            Event::PrimaryMissing { standby } => write!(
                f,
                "Primary device not found for '{standby}': the guest runs on the standby alone \
                 (register a primary with failover_pair_id '{standby}')"
            ),
            Event::PrimaryPlugged { primary } => write!(f, "the guest enabled primary '{primary}'"),
            Event::PrimaryPlugFailed { primary, reason } => {
                write!(f, "primary '{primary}' was not plugged: {reason}")
            }
            Event::UnplugPrimary { primary } => {
                write!(f, "asked the guest to release primary '{primary}'")
            }
            Event::PrimaryLinkDown { primary } => write!(
                f,
                "took the link of primary '{primary}' down: the guest moves its traffic to the standby"
            ),
            Event::PrimaryLinkUp { primary } => {
                write!(f, "brought the link of primary '{primary}' back up")
            }
            Event::SwitchedToStandby {
                standby,
                primary,
                traffic_seen: true,
            } => write!(
                f,
                "the guest transmits on standby '{standby}': unplugging primary '{primary}'"
            ),
            Event::SwitchedToStandby {
                standby,
                primary,
                traffic_seen: false,
            } => write!(
                f,
                "no traffic on standby '{standby}' within the switch wait: unplugging primary \
                 '{primary}' anyway"
            ),
            Event::PrimaryUnplugged { primary } => {
                write!(f, "primary '{primary}' left the guest")
            }
            Event::UnplugCancelled { primary } => {
                write!(
                    f,
                    "the unplug of primary '{primary}' was withdrawn; it stays"
                )
            }
            Event::UnplugNotCancelled { primary } => write!(
                f,
                "primary '{primary}' left although its unplug was cancelled (the guest had \
                 passed its window); plugging it back"
            ),
            Event::Migration { status, reason } => {
                write!(f, "migration: {status}")?;
                match reason {
                    Some(r) => write!(f, ": {r}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// An [`Event`] with the time it happened on the coordinator's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TimedEvent {
    /// When, on the coordinator's monotonic clock. Serialized as QMP's
    /// `{"seconds": .., "microseconds": ..}`.
    #[cfg_attr(feature = "serde", serde(with = "timestamp"))]
    pub timestamp: Duration,
    /// What.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub event: Event,
}

impl fmt::Display for TimedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.timestamp;
        write!(
            f,
            "[{:>5}.{:06}] {}",
            t.as_secs(),
            t.subsec_micros(),
            self.event
        )
    }
}

#[cfg(feature = "serde")]
impl TimedEvent {
    /// The event as one line of JSON (no newline), QMP-style:
    /// `{"timestamp":{"seconds":5,"microseconds":20000},"event":"MIGRATION","data":{"status":"active"}}`.
    pub fn to_json_line(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }

    /// Parses a line [`to_json_line`](Self::to_json_line) wrote.
    pub fn from_json_line(line: &str) -> serde_json::Result<Self> {
        serde_json::from_str(line)
    }
}

#[cfg(feature = "serde")]
mod timestamp {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Qmp {
        seconds: u64,
        microseconds: u32,
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        Qmp {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let q = Qmp::deserialize(d)?;
        if q.microseconds >= 1_000_000 {
            return Err(serde::de::Error::custom(format!(
                "microseconds {} is not below 1000000",
                q.microseconds
            )));
        }
        Ok(Duration::from_secs(q.seconds) + Duration::from_micros(q.microseconds.into()))
    }
}

/// Told every event, in order. Implemented for closures.
///
/// Called on the thread of the VMM call that caused the event (the standby's
/// `FEATURES_OK` handler among them), never inside the guest's register write
/// that completed a plug or unplug: those events are queued and delivered by
/// `Coordinator::run_deferred` (see `Coordinator::set_waker`), by the
/// coordinator's own thread when no waker is set, or by the next coordinator
/// call, on its thread. No slot is locked by the coordinator then. A slow
/// listener delays that thread (and the delivery of later events), not a
/// vCPU. Calling the coordinator is allowed: the events it causes are
/// delivered after this one.
pub trait EventListener: Send + Sync {
    /// One event.
    fn event(&self, event: &TimedEvent);
}

impl<F: Fn(&TimedEvent) + Send + Sync> EventListener for F {
    fn event(&self, event: &TimedEvent) {
        self(event)
    }
}

/// A listener that keeps every event, for tests, diagnostics and a VMM's
/// `query`-style command. Clones share the log.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    events: Arc<Mutex<Vec<TimedEvent>>>,
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<TimedEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every event so far, with timestamps.
    pub fn events(&self) -> Vec<TimedEvent> {
        self.lock().clone()
    }

    /// Every event so far, without timestamps.
    pub fn kinds(&self) -> Vec<Event> {
        self.lock().iter().map(|e| e.event.clone()).collect()
    }

    /// Removes and returns every event so far.
    pub fn take(&self) -> Vec<TimedEvent> {
        std::mem::take(&mut *self.lock())
    }

    /// Removes and returns every event so far, without timestamps.
    pub fn take_kinds(&self) -> Vec<Event> {
        self.take().into_iter().map(|e| e.event).collect()
    }

    /// The first event equal to `event`, with its timestamp.
    pub fn find(&self, event: &Event) -> Option<TimedEvent> {
        self.lock().iter().find(|e| &e.event == event).cloned()
    }
}

impl EventListener for EventLog {
    fn event(&self, event: &TimedEvent) {
        self.lock().push(event.clone());
    }
}

/// A listener that writes each event as one JSON line (QMP-style) to a writer:
/// a socket to the management layer, a log file, stdout. Write errors are
/// logged and the event dropped; the coordinator goes on. It writes and
/// flushes on the delivering thread (see [`EventListener`]), never a vCPU's.
#[cfg(feature = "serde")]
pub struct JsonLines<W: std::io::Write + Send> {
    out: Mutex<W>,
}

#[cfg(feature = "serde")]
impl<W: std::io::Write + Send> JsonLines<W> {
    /// Writes to `out`, flushing after each line.
    pub fn new(out: W) -> Self {
        JsonLines {
            out: Mutex::new(out),
        }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(feature = "serde")]
impl<W: std::io::Write + Send> fmt::Debug for JsonLines<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLines").finish_non_exhaustive()
    }
}

#[cfg(feature = "serde")]
impl<W: std::io::Write + Send> EventListener for JsonLines<W> {
    fn event(&self, event: &TimedEvent) {
        let line = match event.to_json_line() {
            Ok(l) => l,
            Err(e) => {
                log::warn!("failover: cannot serialize event '{event}': {e}");
                return;
            }
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            log::warn!("failover: cannot write event '{event}': {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, event: Event) -> TimedEvent {
        TimedEvent {
            timestamp: Duration::from_millis(ms),
            event,
        }
    }

    #[test]
    fn mac_addresses_read_and_print_as_colon_hex() {
        let m = MacAddress([0x52, 0x54, 0x00, 0x11, 0x0a, 0xff]);
        assert_eq!(m.to_string(), "52:54:00:11:0a:ff");
        assert_eq!("52:54:00:11:0a:ff".parse::<MacAddress>().unwrap(), m);
        for bad in [
            "52:54:00:11:0a",
            "52:54:00:11:0a:ff:00",
            "52:54:00:11:0a:zz",
            "5254:00:11:0a:ff:0",
        ] {
            let e = bad.parse::<MacAddress>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn events_read_as_sentences_naming_the_devices() {
        let e = Event::MacMismatch {
            primary: "hostdev0".into(),
            primary_mac: MacAddress([0x52, 0x54, 0, 0x11, 0x11, 0x11]),
            standby: "net1".into(),
            standby_mac: MacAddress([0x52, 0x54, 0, 0x22, 0x22, 0x22]),
        };
        let s = e.to_string();
        for part in [
            "'hostdev0'",
            "52:54:00:11:11:11",
            "'net1'",
            "52:54:00:22:22:22",
        ] {
            assert!(s.contains(part), "{s}");
        }
        let t = at(
            5020,
            Event::PrimaryUnplugged {
                primary: "hostdev0".into(),
            },
        );
        assert_eq!(
            t.to_string(),
            "[    5.020000] primary 'hostdev0' left the guest"
        );
        let m = Event::Migration {
            status: MigrationState::Failed,
            reason: Some("the guest did not eject 'hostdev0'".into()),
        };
        assert_eq!(
            m.to_string(),
            "migration: failed: the guest did not eject 'hostdev0'"
        );
    }

    #[test]
    fn the_log_keeps_order_and_can_be_drained() {
        let log = EventLog::new();
        let l: &dyn EventListener = &log;
        l.event(&at(
            1,
            Event::FailoverNegotiated {
                standby: "net1".into(),
            },
        ));
        l.event(&at(
            2,
            Event::PrimaryPlugged {
                primary: "hostdev0".into(),
            },
        ));
        assert_eq!(log.events().len(), 2);
        assert_eq!(
            log.find(&Event::PrimaryPlugged {
                primary: "hostdev0".into()
            })
            .unwrap()
            .timestamp,
            Duration::from_millis(2)
        );
        assert_eq!(
            log.take_kinds(),
            [
                Event::FailoverNegotiated {
                    standby: "net1".into()
                },
                Event::PrimaryPlugged {
                    primary: "hostdev0".into()
                }
            ]
        );
        assert!(log.kinds().is_empty());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_lines_look_like_qmp_events_and_read_back() {
        let cases = [
            (
                at(
                    5020,
                    Event::UnplugPrimary {
                        primary: "hostdev0".into(),
                    },
                ),
                r#"{"timestamp":{"seconds":5,"microseconds":20000},"event":"UNPLUG_PRIMARY","data":{"device-id":"hostdev0"}}"#,
            ),
            (
                at(
                    0,
                    Event::FailoverNegotiated {
                        standby: "net1".into(),
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":0},"event":"FAILOVER_NEGOTIATED","data":{"device-id":"net1"}}"#,
            ),
            (
                at(
                    1,
                    Event::Migration {
                        status: MigrationState::WaitUnplug,
                        reason: None,
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":1000},"event":"MIGRATION","data":{"status":"wait-unplug"}}"#,
            ),
            (
                at(
                    30_000,
                    Event::Migration {
                        status: MigrationState::Failed,
                        reason: Some("timeout".into()),
                    },
                ),
                r#"{"timestamp":{"seconds":30,"microseconds":0},"event":"MIGRATION","data":{"status":"failed","reason":"timeout"}}"#,
            ),
            (
                at(
                    2,
                    Event::MacMismatch {
                        primary: "p".into(),
                        primary_mac: MacAddress([0x52, 0x54, 0, 0x11, 0x11, 0x11]),
                        standby: "s".into(),
                        standby_mac: MacAddress([0x52, 0x54, 0, 0x22, 0x22, 0x22]),
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":2000},"event":"MAC_MISMATCH","data":{"primary":"p","primary-mac":"52:54:00:11:11:11","standby":"s","standby-mac":"52:54:00:22:22:22"}}"#,
            ),
            (
                at(
                    3,
                    Event::PrimaryUnpaired {
                        primary: "p".into(),
                        standby: "s1".into(),
                        reason: UnpairedReason::NoStandby,
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":3000},"event":"PRIMARY_UNPAIRED","data":{"primary":"p","standby":"s1","reason":"no-standby"}}"#,
            ),
            (
                at(
                    4,
                    Event::SwitchedToStandby {
                        standby: "net1".into(),
                        primary: "hostdev0".into(),
                        traffic_seen: true,
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":4000},"event":"SWITCHED_TO_STANDBY","data":{"standby":"net1","primary":"hostdev0","traffic-seen":true}}"#,
            ),
            (
                at(
                    5,
                    Event::PrimaryLinkDown {
                        primary: "hostdev0".into(),
                    },
                ),
                r#"{"timestamp":{"seconds":0,"microseconds":5000},"event":"PRIMARY_LINK_DOWN","data":{"primary":"hostdev0"}}"#,
            ),
        ];
        for (event, line) in cases {
            assert_eq!(event.to_json_line().unwrap(), line);
            assert_eq!(TimedEvent::from_json_line(line).unwrap(), event);
        }
        assert!(
            TimedEvent::from_json_line(
                r#"{"timestamp":{"seconds":0,"microseconds":1000000},"event":"PRIMARY_PLUGGED","data":{"primary":"p"}}"#
            )
            .is_err()
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_lines_listener_writes_one_line_per_event() {
        let out = JsonLines::new(Vec::new());
        out.event(&at(
            1,
            Event::PrimaryPlugged {
                primary: "hostdev0".into(),
            },
        ));
        out.event(&at(
            2,
            Event::PrimaryUnplugged {
                primary: "hostdev0".into(),
            },
        ));
        let text = String::from_utf8(out.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("PRIMARY_PLUGGED") && lines[1].contains("PRIMARY_UNPLUGGED"));
        assert!(text.ends_with('\n'));
    }
}
