//! Migration: the states of an outgoing migration, the handle the VMM's
//! migration code holds, the wait policy for a guest that never ejects, and the
//! errors of calls that do not fit the current state.
//!
//! # Source
//!
//! [`Coordinator::prepare_outgoing`](crate::Coordinator::prepare_outgoing)
//! requests the unplug of every failover primary the guest has, emits
//! `UNPLUG_PRIMARY` for each, and returns an [`OutgoingMigration`]:
//!
//! ```text
//!  setup ──► wait-unplug ──(last eject completes)──► active ──complete()──► completed
//!    │            │                                     │           │
//!    │            ├─cancel()─► cancelling ──(unplugs resolved)──► cancelled
//!    │            ├─fail() / deadline ──────────────────────────► failed
//!    └─(nothing to unplug)──► active ──cancel()/fail()──────────► cancelled / failed
//! ```
//!
//! With make before break ([`Primary::link`](crate::Primary::link)) a
//! primary's part of wait-unplug starts with its link going down
//! (`PrimaryState::LinkDown`); its unplug is requested when its standby
//! transmits or after [`DEFAULT_SWITCH_WAIT`]. A cancel or failure then brings
//! the link back up; nothing was asked of the slot, and the primary never
//! leaves.
//!
//! [`Coordinator::prepare_outgoing_to`](crate::Coordinator::prepare_outgoing_to)
//! first checks the destination's [`DestinationOffer`] (pre-flight): a
//! destination that cannot take the pairs is refused with every problem at
//! once ([`Error::Preflight`]), before anything is unplugged.
//!
//! It leaves wait-unplug the moment the guest's register write that ejects the
//! last primary completes (QEMU re-checks every 250 ms). A guest that never
//! ejects fails the migration after [`UnplugWait`] (30 s by default; QEMU waits
//! forever). Cancel or failure in wait-unplug withdraws every unplug the guest
//! has not acted on (a second attention-button press, so those primaries never
//! leave) and plugs back each one the guest removed anyway; after wait-unplug
//! every primary is plugged back. Either way each primary ends up in exactly
//! one place: back in the source guest, or (after `complete()`) gone from the
//! source for the destination to plug its own.
//!
//! # Destination
//!
//! [`Coordinator::prepare_incoming`](crate::Coordinator::prepare_incoming)
//! before restoring any state, then restore (the standby's transport raises
//! `FeaturesAcked { restored: true }`, `FAILOVER_NEGOTIATED` follows), then
//! [`Coordinator::complete_incoming`](crate::Coordinator::complete_incoming)
//! before the vCPUs run: every negotiated standby's primary is plugged, and a
//! standby without one is reported (`PRIMARY_MISSING`); the guest runs on the
//! standby.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::coordinator::Shared;

/// How long an outgoing migration waits for the guest to eject its primaries
/// by default: 30 seconds.
///
/// Linux's pciehp takes 5 seconds (its attention-button delay) plus the driver
/// unbind; ACPI hot-plug answers at once. 30 s leaves a busy guest six times the
/// slowest normal answer, and is what QEMU allows a cancelled migration to
/// finish a pending unplug. QEMU itself waits forever in wait-unplug
/// ([`UnplugWait::Unbounded`]).
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an outgoing migration waits, after taking a primary's link down
/// (make before break, [`Primary::link`](crate::Primary::link)), for traffic
/// on its standby before it requests the unplug anyway: 200 ms.
///
/// A guest that transmits moves to the standby within milliseconds of the
/// carrier loss (the primary's driver reports it from its interrupt or
/// mailbox work; `net_failover` picks the transmit path per frame), and its
/// first frame on the standby ends the wait at once
/// ([`Coordinator::standby_traffic`](crate::Coordinator::standby_traffic)).
/// So the wait only runs out for a guest that sends nothing, which has nothing
/// in flight to lose, or for one whose carrier work is delayed by a busy vCPU:
/// 200 ms covers tens of scheduler ticks of such delay while adding 4% to the
/// 5 s Linux's pciehp takes to release the primary anyway, and the VM keeps
/// running meanwhile (no downtime). `Duration::ZERO` requests the unplug right
/// after the link is down.
pub const DEFAULT_SWITCH_WAIT: Duration = Duration::from_millis(200);

/// How long an outgoing migration waits for the guest to eject its primaries,
/// and a cancel for the guest to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnplugWait {
    /// Fail the migration (and withdraw the unplugs) when the guest has not
    /// ejected every primary this long after the request; give up waiting for
    /// a cancel's outcome this long after the cancel. The VMM arms a timer for
    /// [`Coordinator::deadline`](crate::Coordinator::deadline) and calls
    /// [`Coordinator::check_deadline`](crate::Coordinator::check_deadline)
    /// when it fires.
    Bounded(Duration),
    /// Wait as long as it takes (QEMU's behaviour). A guest that never ejects
    /// holds the migration in wait-unplug until the VMM cancels it.
    Unbounded,
}

impl Default for UnplugWait {
    fn default() -> Self {
        UnplugWait::Bounded(DEFAULT_UNPLUG_TIMEOUT)
    }
}

/// The state of a migration, with QMP's names (`query-migrate` `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum MigrationState {
    /// Unplug requests are being made (source), or states are being restored
    /// (destination).
    Setup,
    /// Waiting for the guest to eject its primaries.
    WaitUnplug,
    /// Every primary is out: the VMM may save and send the standby side.
    Active,
    /// Cancelled while unplugs were in flight: waiting for the guest's answer
    /// to each withdrawal.
    Cancelling,
    /// Cancelled; every primary this migration took out is being plugged back.
    Cancelled,
    /// Failed (a refused unplug, the wait's deadline, or the VMM's
    /// [`OutgoingMigration::fail`]); every primary is being plugged back.
    Failed,
    /// Done: on the source, the primaries stay out; on the destination, they
    /// are being plugged.
    Completed,
}

impl MigrationState {
    /// Whether the migration has ended (completed, cancelled or failed).
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Cancelled | MigrationState::Failed | MigrationState::Completed
        )
    }

    /// Whether the migration is going ahead: the primaries it took out stay
    /// out.
    pub(crate) const fn going_ahead(self) -> bool {
        matches!(
            self,
            MigrationState::Setup
                | MigrationState::WaitUnplug
                | MigrationState::Active
                | MigrationState::Completed
        )
    }

    /// Whether a waiter is still waiting for the guest (setup, wait-unplug,
    /// cancelling).
    pub(crate) const fn waiting(self) -> bool {
        matches!(
            self,
            MigrationState::Setup | MigrationState::WaitUnplug | MigrationState::Cancelling
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationState::Setup => "setup",
            MigrationState::WaitUnplug => "wait-unplug",
            MigrationState::Active => "active",
            MigrationState::Cancelling => "cancelling",
            MigrationState::Cancelled => "cancelled",
            MigrationState::Failed => "failed",
            MigrationState::Completed => "completed",
        })
    }
}

/// A migration call that does not fit the current state. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `prepare_outgoing` while another outgoing migration has not ended.
    #[error(
        "an outgoing migration is already in progress (state {state}); cancel it or wait for \
         it to end before preparing another"
    )]
    OutgoingInProgress {
        /// Its state.
        state: MigrationState,
    },
    /// `prepare_outgoing` or `prepare_incoming` while an incoming migration
    /// has not been completed.
    #[error(
        "an incoming migration is in progress; call complete_incoming once every state is \
         restored"
    )]
    IncomingInProgress,
    /// `complete_incoming` without `prepare_incoming`.
    #[error(
        "no incoming migration was prepared; call prepare_incoming before restoring the \
         standby's state"
    )]
    NoIncoming,
    /// A call on a migration that has ended.
    #[error("the migration has already ended ({state}); prepare a new one")]
    Finished {
        /// How it ended.
        state: MigrationState,
    },
    /// A call on a handle whose migration is no longer the coordinator's
    /// current one.
    #[error("this migration handle is stale: a newer migration was prepared")]
    Stale,
    /// `complete` before the migration is active.
    #[error(
        "the migration cannot complete in state {state}: {}",
        if waiting.is_empty() {
            "complete it only once it is active".to_string()
        } else {
            format!(
                "the guest has not ejected {} yet; wait for the state to become active",
                waiting.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ")
            )
        }
    )]
    NotActive {
        /// The current state.
        state: MigrationState,
        /// The primaries the guest still holds.
        waiting: Vec<String>,
    },
    /// The pre-flight check ([`Coordinator::preflight`](crate::Coordinator::preflight))
    /// found that the destination cannot take this VM's failover pairs.
    /// Nothing was unplugged and no migration was started; the guest keeps
    /// its primaries. Shown as one line per problem, each naming the device.
    #[error("{}", problems.join("\n"))]
    Preflight {
        /// Every problem found, one sentence each.
        problems: Vec<String>,
    },
}

/// Result of migration calls.
pub type Result<T> = std::result::Result<T, Error>;

/// What a migration destination can take, from its
/// [`Coordinator::destination_offer`](crate::Coordinator::destination_offer):
/// the source checks it with
/// [`Coordinator::preflight`](crate::Coordinator::preflight) before it unplugs
/// anything. The VMMs carry it over their migration channel (serde, with the
/// `serde` feature: JSON `{"standbys":[{"id":"net1","failover":true,
/// "offered-features":..,"primary":"hostdev0"}]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct DestinationOffer {
    /// Every standby registered on the destination.
    pub standbys: Vec<StandbyOffer>,
}

/// One standby a destination has, as [`DestinationOffer`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct StandbyOffer {
    /// The standby's id (the restored state goes to the standby of the same
    /// id).
    pub id: String,
    /// Whether it has failover on (its device offers `VIRTIO_NET_F_STANDBY`).
    pub failover: bool,
    /// The feature bits its device offers
    /// ([`Standby::offered_features`](crate::Standby::offered_features)), if
    /// the destination's VMM said; `None` is not checked.
    #[cfg_attr(feature = "serde", serde(default))]
    pub offered_features: Option<u64>,
    /// The id of the primary registered for it there, if any.
    #[cfg_attr(feature = "serde", serde(default))]
    pub primary: Option<String>,
}

/// The VMM's handle on an outgoing migration, from
/// [`Coordinator::prepare_outgoing`](crate::Coordinator::prepare_outgoing).
/// Cloning shares it. Dropping it changes nothing: the migration goes on, and
/// the coordinator still answers its completions.
#[derive(Clone)]
pub struct OutgoingMigration {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
}

impl fmt::Debug for OutgoingMigration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMigration")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

impl OutgoingMigration {
    /// The migration's number (1 for the coordinator's first).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its state now. A stale handle reports the state its migration ended in.
    pub fn state(&self) -> MigrationState {
        self.shared.migration_state(self.id)
    }

    /// Why it failed (or why a cancel stopped waiting), if it did.
    pub fn reason(&self) -> Option<String> {
        self.shared.migration_reason(self.id)
    }

    /// The primaries the guest has not ejected yet.
    pub fn waiting_for(&self) -> Vec<String> {
        self.shared.waiting_for(self.id)
    }

    /// When the wait for the guest gives up, on the coordinator's clock; see
    /// [`Coordinator::deadline`](crate::Coordinator::deadline).
    pub fn deadline(&self) -> Option<Duration> {
        self.shared.migration_deadline(self.id)
    }

    /// Cancels the migration (QMP `migrate_cancel`).
    ///
    /// - In setup or wait-unplug: every unplug the guest has not acted on is
    ///   withdrawn (a second attention-button press; those primaries never
    ///   leave), and each primary the guest removes anyway is plugged back. The
    ///   state is cancelling until the guest has answered every withdrawal,
    ///   then cancelled.
    /// - In active: every primary is plugged back; the state goes through
    ///   cancelling to cancelled at once.
    /// - Cancelling: nothing more to do.
    ///
    /// Refused once the migration has ended.
    pub fn cancel(&self) -> Result<()> {
        self.shared.cancel_outgoing(self.id)
    }

    /// The migration failed for a reason of the VMM's (the stream broke, the
    /// destination refused the state): the state becomes failed with `reason`,
    /// and every primary is withdrawn or plugged back as for a cancel.
    ///
    /// Also accepted after [`complete`](Self::complete), for a source that
    /// resumes because the destination could not start: the primaries come
    /// back. Refused once cancelled or failed.
    pub fn fail(&self, reason: impl Into<String>) -> Result<()> {
        self.shared.fail_outgoing(self.id, reason.into())
    }

    /// The migration completed: the source guest is stopped for good, and its
    /// primaries stay out. Refused unless active.
    pub fn complete(&self) -> Result<()> {
        self.shared.complete_outgoing(self.id)
    }

    /// Blocks until the migration leaves setup, wait-unplug and cancelling
    /// (or `timeout` passes, in real time), then returns its state. Woken by
    /// the completion that changes the state: no polling.
    pub fn wait_timeout(&self, timeout: Duration) -> MigrationState {
        self.shared.wait_migration(self.id, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_have_qmp_names() {
        let names: Vec<String> = [
            MigrationState::Setup,
            MigrationState::WaitUnplug,
            MigrationState::Active,
            MigrationState::Cancelling,
            MigrationState::Cancelled,
            MigrationState::Failed,
            MigrationState::Completed,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            names,
            [
                "setup",
                "wait-unplug",
                "active",
                "cancelling",
                "cancelled",
                "failed",
                "completed"
            ]
        );
        assert!(MigrationState::Completed.is_terminal());
        assert!(!MigrationState::Cancelling.is_terminal());
        assert!(MigrationState::Completed.going_ahead());
        assert!(!MigrationState::Failed.going_ahead());
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = Error::NotActive {
            state: MigrationState::WaitUnplug,
            waiting: vec!["hostdev0".into(), "hostdev1".into()],
        };
        assert_eq!(
            e.to_string(),
            "the migration cannot complete in state wait-unplug: the guest has not ejected \
             'hostdev0', 'hostdev1' yet; wait for the state to become active"
        );
        let e = Error::NotActive {
            state: MigrationState::Cancelling,
            waiting: vec![],
        };
        assert!(
            e.to_string()
                .ends_with("complete it only once it is active")
        );
        assert!(
            Error::OutgoingInProgress {
                state: MigrationState::WaitUnplug
            }
            .to_string()
            .contains("state wait-unplug")
        );
        assert_eq!(
            UnplugWait::default(),
            UnplugWait::Bounded(Duration::from_secs(30))
        );
        let e = Error::Preflight {
            problems: vec!["standby 'a': one".into(), "standby 'b': two".into()],
        };
        assert_eq!(e.to_string(), "standby 'a': one\nstandby 'b': two");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_destination_offer_crosses_as_json() {
        let offer = DestinationOffer {
            standbys: vec![StandbyOffer {
                id: "net1".into(),
                failover: true,
                offered_features: Some(1 << 62 | 1 << 32),
                primary: Some("hostdev0".into()),
            }],
        };
        let json = serde_json::to_string(&offer).unwrap();
        assert_eq!(
            json,
            r#"{"standbys":[{"id":"net1","failover":true,"offered-features":4611686022722355200,"primary":"hostdev0"}]}"#
        );
        assert_eq!(
            serde_json::from_str::<DestinationOffer>(&json).unwrap(),
            offer
        );
        let bare: DestinationOffer =
            serde_json::from_str(r#"{"standbys":[{"id":"net1","failover":false}]}"#).unwrap();
        assert_eq!(bare.standbys[0].offered_features, None);
        assert_eq!(bare.standbys[0].primary, None);
    }
}
