//! What a VMM's hot-plug manager sees of a slot, and the errors it gets.

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
    /// Hot plug: waiting for the guest to power the slot and turn the indicator on.
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
pub trait HotplugSlot {
    /// Puts `device` in the slot before the guest runs: presence, link active,
    /// slot power and power indicator on, no event.
    fn cold_plug(&mut self, device: PciHandle) -> Result<()>;

    /// Hot-plugs `device`: presence, link active, Presence Detect Changed, Data
    /// Link Layer State Changed and Attention Button Pressed, with an interrupt
    /// where enabled. Completes when the guest has powered the slot and turned the
    /// power indicator on.
    fn plug(&mut self, device: PciHandle) -> Result<Completion>;

    /// Asks the guest to release the device. Refused when the slot is not
    /// hot-plug capable, is locked, or the guest is busy (power indicator
    /// blinking). If the slot is powered off the device leaves at once; otherwise
    /// the attention button is pressed and the device leaves the moment the guest
    /// turns slot power off.
    fn request_unplug(&mut self) -> Result<Completion>;

    /// Withdraws a pending unplug by pressing the attention button again. Linux
    /// aborts if the press comes inside its 5-second window; after that the
    /// unplug proceeds. The unplug's completion tells which happened.
    fn cancel_unplug(&mut self) -> Result<()>;

    /// Removes the device without the guest's help (ports built with hot-plug
    /// surprise only): presence and link drop at once, with their change events.
    fn surprise_remove(&mut self) -> Result<PciHandle>;

    /// The device in the slot, if any.
    fn device(&self) -> Option<PciHandle>;

    /// The slot's state.
    fn slot_state(&self) -> SlotState;
}
