//! What a VMM's hot-plug manager sees of a slot, and the errors it gets.

use std::time::Duration;

use vmm_pci::PciHandle;

use crate::completion::Completion;

/// Why a hot-plug request was refused. The texts follow QEMU's where QEMU has one,
/// so operators see familiar messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The port was built without Hot-Plug Capable.
    #[error("Hot-plug failed: unsupported by the port device '{0}'")]
    PlugUnsupported(String),
    /// The port was built without Hot-Plug Capable.
    #[error("Hot-unplug failed: unsupported by the port device '{0}'")]
    UnplugUnsupported(String),
    /// The electromechanical interlock is engaged (Slot Status EIS).
    #[error("slot is electromechanically locked")]
    Locked,
    /// The guest is in the middle of a hot-plug operation on the slot.
    #[error("Hot-unplug failed: guest is busy (power indicator blinking)")]
    GuestBusy,
    /// Plug into a slot that holds a device.
    #[error("Hot-plug failed: the slot of port '{0}' is occupied")]
    Occupied(String),
    /// Unplug or surprise removal of an empty slot.
    #[error("Hot-unplug failed: the slot of port '{0}' is empty")]
    Empty(String),
    /// Another operation has not finished.
    #[error("a {op} is already pending on port '{port}'; wait for its completion or cancel it")]
    Pending {
        /// The operation in flight.
        op: Operation,
        /// The port's name.
        port: String,
    },
    /// `cancel_unplug` with no unplug in flight.
    #[error("no unplug is pending on port '{0}'")]
    NoUnplugPending(String),
    /// Surprise removal on a port built without Hot-Plug Surprise.
    #[error("surprise removal needs a port built with hot-plug surprise; port '{0}' is not")]
    NoSurprise(String),
}

/// Result of hot-plug requests.
pub type Result<T> = std::result::Result<T, Error>;

/// An operation that completes asynchronously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Hot plug: waiting for the guest to power the slot and turn the indicator
    /// on (or, held, for it to finish powering the slot off first).
    Plug,
    /// Unplug: waiting for the guest to turn slot power off.
    Unplug,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Plug => "hot plug",
            Operation::Unplug => "hot unplug",
        })
    }
}

/// A snapshot of the slot, as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// A device is in the slot (Presence Detect State).
    pub present: bool,
    /// Slot power is on (Power Controller Control clear, or no power controller).
    pub powered: bool,
    /// The link is up (Data Link Layer Link Active).
    pub link_active: bool,
    /// The interlock is engaged.
    pub locked: bool,
    /// The operation in flight, if any.
    pub pending: Option<Operation>,
}

/// The hot-plug operations of a slot. Implemented by [`crate::RootPort`]; a VMM's
/// hot-plug manager can hold ports as `dyn HotplugSlot` without knowing them.
///
/// The guest can also remove a device nobody asked it to remove: it powers the
/// slot off with no unplug pending (sysfs `power`), or after a cancel already
/// reported [`Cancelled`](crate::HotplugOutcome::Cancelled). No completion
/// covers that; [`RootPort::on_guest_removal`](crate::RootPort::on_guest_removal)
/// reports it, with the device, so a coordinator can react (report it, plug
/// back).
///
/// Decisions that resolve by time alone need a timer the port does not have:
/// see [`next_deadline`](HotplugSlot::next_deadline) and
/// [`poll`](HotplugSlot::poll).
pub trait HotplugSlot {
    /// Puts `device` in the slot before the guest runs: presence, link active,
    /// slot power and power indicator on, no event.
    fn cold_plug(&mut self, device: PciHandle) -> Result<()>;

    /// Hot-plugs `device`: presence, link active, Presence Detect Changed, Data
    /// Link Layer State Changed and Attention Button Pressed, with an interrupt
    /// where enabled. Completes when the guest has powered the slot and turned the
    /// power indicator on.
    ///
    /// Right after an unplug (the guest powered the slot off and has not yet
    /// turned the power indicator off, its 1 s wait) the plug is held and
    /// delivered when the guest turns the indicator off: events sent inside that
    /// second are discarded by Linux. The completion covers the wait.
    fn plug(&mut self, device: PciHandle) -> Result<Completion>;

    /// Asks the guest to release the device. Refused when the slot is not
    /// hot-plug capable, is locked, or the guest is busy (power indicator
    /// blinking). If the slot is powered off the device leaves at once (a held
    /// plug is withdrawn: its completion says `Cancelled`); otherwise the
    /// attention button is pressed and the device leaves the moment the guest
    /// turns slot power off.
    fn request_unplug(&mut self) -> Result<Completion>;

    /// Withdraws a pending unplug. Returns the unplug's [`Completion`], which
    /// says how the cancel ended: [`Cancelled`](crate::HotplugOutcome::Cancelled)
    /// if it took (the device stays), [`Unplugged`](crate::HotplugOutcome::Unplugged)
    /// if it came too late (the device left). It completes once, with what the
    /// guest did:
    /// - a press the guest has not read yet is taken back: `Cancelled` at once;
    /// - a press the guest has read (or taken) is followed by a second press as
    ///   soon as the guest opens its 5-second window, and one inside the window
    ///   is pressed now; Linux aborts (`Cancelled`, when it turns the power
    ///   indicator back on) unless its button timer already queued the power off,
    ///   which it then does anyway (`Unplugged`, at the power off);
    /// - with less than [`CANCEL_MARGIN`](crate::CANCEL_MARGIN) left in the
    ///   window, nothing is pressed and the unplug goes on (`Unplugged`).
    ///
    /// Calling it again returns the same completion and presses nothing more.
    fn cancel_unplug(&mut self) -> Result<Completion>;

    /// Removes the device without the guest's help (ports built with hot-plug
    /// surprise only): presence and link drop at once, with their change events.
    /// A held plug is withdrawn instead (its completion says `Cancelled`).
    fn surprise_remove(&mut self) -> Result<PciHandle>;

    /// The device in the slot, if any.
    fn device(&self) -> Option<PciHandle>;

    /// The slot's state. A pending decision that is due by time (see
    /// [`next_deadline`](Self::next_deadline)) resolves first.
    fn slot_state(&self) -> SlotState;

    /// When a pending decision can resolve by time alone, on the port's clock
    /// (the same time base as [`crate::Clock`]; compare with the VM's
    /// run-time clock, not wall time), or `None` if nothing pending can.
    ///
    /// [`RootPort`](crate::RootPort) has one while a cancel the guest answered
    /// at the very end of its window is undecided: the guest turned its power
    /// indicator back on when its button work may already have queued the
    /// power off. If no power off (nor the Slot Control read that starts it)
    /// comes within 1 s, or within 1 s of a Slot Control read, the guest kept
    /// the device and the unplug resolves `Cancelled`. The port has no timer:
    /// without a guest config access or a VMM call it would stay unresolved, so
    /// a VMM or coordinator with a timer arms it for this time and calls
    /// [`poll`](Self::poll). The default implementation returns `None`.
    fn next_deadline(&self) -> Option<Duration> {
        None
    }

    /// Resolves whatever is due by time (see
    /// [`next_deadline`](Self::next_deadline)), completing its
    /// [`Completion`]. Harmless to call at any time. The default
    /// implementation does nothing.
    fn poll(&mut self) {}
}
