//! A scriptable fake device for testing transports (feature `test-utils`).
//!
//! [`FakeDevice`] implements [`VirtioDevice`] for any guest memory type and
//! records what the transport did to it, so a transport can be tested to the
//! register without a real device behind it.

use std::fmt;
use std::sync::Arc;

use device_state::{Encode, Error, Persist, Reader, Writer};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};

use crate::device::{ActivateQueue, VirtioDevice};
use crate::interrupt::{VirtioInterrupt, VirtioInterruptType};

/// Why a [`FakeDevice`] refused something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeError {
    /// The set lacks a bit the device requires, or holds one it did not offer.
    Features(u64),
    /// Activation before a feature set was accepted.
    NotNegotiated,
    /// Activation on an active device.
    Active,
    /// The device was told to refuse activation.
    Refused,
}

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeError::Features(s) => write!(f, "feature set {s:#x} refused"),
            FakeError::NotNegotiated => f.write_str("activate before features were accepted"),
            FakeError::Active => f.write_str("the device is already active"),
            FakeError::Refused => f.write_str("activation refused as scripted"),
        }
    }
}

impl std::error::Error for FakeError {}

/// One queue as the device received it at activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivatedQueue {
    /// Queue index.
    pub index: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Whether EVENT_IDX was negotiated for it.
    pub event_idx: bool,
    /// Whether a kick eventfd came with it.
    pub has_kick: bool,
}

/// A device that offers what it is told, keeps a device configuration space of
/// plain bytes, and records acknowledgements, activations and resets.
pub struct FakeDevice {
    device_type: u32,
    queue_max: Vec<u16>,
    offered: u64,
    required: u64,
    /// The device configuration space.
    pub config: Vec<u8>,
    /// The accepted feature set, if any.
    pub acked: Option<u64>,
    /// Every feature set acknowledged, accepted or not.
    pub ack_calls: Vec<u64>,
    /// Whether the device is active.
    pub active: bool,
    /// The queues of the last activation.
    pub queues: Vec<ActivatedQueue>,
    /// How many times the device was activated.
    pub activations: u32,
    /// How many times the device was reset.
    pub resets: u32,
    /// Refuse the next activations (the transport must show NEEDS_RESET).
    pub refuse_activation: bool,
    /// What [`VirtioDevice::needs_reset`] answers.
    pub needs_reset: bool,
    /// Device-config writes, as (offset, bytes).
    pub config_writes: Vec<(u64, Vec<u8>)>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

impl fmt::Debug for FakeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeDevice")
            .field("device_type", &self.device_type)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &self.acked)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl FakeDevice {
    /// A device of type `device_type` with one queue per entry of `queue_max`,
    /// offering `features`, with an empty configuration space.
    pub fn new(device_type: u32, queue_max: Vec<u16>, features: u64) -> Self {
        FakeDevice {
            device_type,
            queue_max,
            offered: features,
            required: 0,
            config: Vec::new(),
            acked: None,
            ack_calls: Vec::new(),
            active: false,
            queues: Vec::new(),
            activations: 0,
            resets: 0,
            refuse_activation: false,
            needs_reset: false,
            config_writes: Vec::new(),
            interrupt: None,
        }
    }

    /// Refuse feature sets that lack any bit of `mask`.
    pub fn requiring(mut self, mask: u64) -> Self {
        self.required = mask;
        self
    }

    /// Sets the device configuration space.
    pub fn with_config(mut self, config: Vec<u8>) -> Self {
        self.config = config;
        self
    }

    /// Raises an interrupt through the object the transport handed over at
    /// activation, as a real device would (a config change, used buffers).
    /// Returns false if the device is not active.
    pub fn raise(&self, t: VirtioInterruptType) -> bool {
        match &self.interrupt {
            Some(i) if self.active => i.trigger(t).is_ok(),
            _ => false,
        }
    }
}

impl<M: GuestMemoryBackend> VirtioDevice<M> for FakeDevice {
    type Error = FakeError;

    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_max.clone()
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) -> Result<(), FakeError> {
        self.ack_calls.push(features);
        if self.active {
            return Err(FakeError::Active);
        }
        if features & !self.offered != 0 || features & self.required != self.required {
            return Err(FakeError::Features(features));
        }
        self.acked = Some(features);
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivateQueue>,
    ) -> Result<(), FakeError> {
        use virtio_queue::QueueT;
        if self.active {
            return Err(FakeError::Active);
        }
        if self.acked.is_none() {
            return Err(FakeError::NotNegotiated);
        }
        if self.refuse_activation {
            return Err(FakeError::Refused);
        }
        self.queues = queues
            .iter()
            .map(|q| ActivatedQueue {
                index: q.index,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                event_idx: q.queue.event_idx_enabled(),
                has_kick: q.kick.is_some(),
            })
            .collect();
        self.interrupt = Some(interrupt);
        self.active = true;
        self.activations += 1;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = None;
        self.active = false;
        self.queues.clear();
        self.interrupt = None;
        self.needs_reset = false;
        self.resets += 1;
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }
}

/// The saved state of a [`FakeDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeState {
    /// The features offered (configuration).
    pub offered: u64,
    /// The accepted set.
    pub acked: Option<u64>,
    /// The configuration space.
    pub config: Vec<u8>,
}

impl Encode for FakeState {
    const MAGIC: [u8; 8] = *b"FAKEDEV\0";
    const VERSION: u16 = 1;

    fn encode(&self, w: &mut Writer) {
        w.u64(self.offered);
        w.opt(self.acked.as_ref(), |w, a| w.u64(*a));
        w.bytes(&self.config);
    }

    fn decode(r: &mut Reader<'_>) -> device_state::Result<Self> {
        Ok(FakeState {
            offered: r.u64("offered features")?,
            acked: r.opt("acked flag", |r| r.u64("acked features"))?,
            config: r.bytes("config")?,
        })
    }
}

impl Persist for FakeDevice {
    type State = FakeState;

    fn save(&self) -> device_state::Result<FakeState> {
        Ok(FakeState {
            offered: self.offered,
            acked: self.acked,
            config: self.config.clone(),
        })
    }

    /// Refuses a state offered differently, and any state while active.
    fn restore(&mut self, state: &FakeState) -> device_state::Result<()> {
        if self.active {
            return Err(Error::Refused("the device is active".into()));
        }
        Error::check_hex("offered features", state.offered, self.offered)?;
        self.acked = state.acked;
        self.config.clone_from(&state.config);
        Ok(())
    }
}
