//! The MSI capability: 64-bit addresses and per-vector masking.

use crate::config::{self, CAP_ID_MSI, ConfigSpace};
use crate::interrupt::{Delivery, MsiMessage, MsiSink};

mod state;

pub use state::MsiState;

/// Message Control (16 bits).
pub const MSI_CTRL: u16 = 0x02;
/// Message Address, low dword.
pub const MSI_ADDRESS_LO: u16 = 0x04;
/// Message Address, high dword.
pub const MSI_ADDRESS_HI: u16 = 0x08;
/// Message Data (16 bits).
pub const MSI_DATA: u16 = 0x0c;
/// Mask Bits.
pub const MSI_MASK: u16 = 0x10;
/// Pending Bits (read-only).
pub const MSI_PENDING: u16 = 0x14;
/// Capability length with 64-bit addresses and per-vector masking.
pub const MSI_CAP_LEN: u16 = 0x18;
/// Message Control: MSI Enable.
pub const MSI_CTRL_ENABLE: u16 = 1 << 0;
/// Message Control: Multiple Message Enable (bits 6:4).
pub const MSI_CTRL_MME_SHIFT: u16 = 4;
/// Message Control: 64-bit address capable.
pub const MSI_CTRL_64BIT: u16 = 1 << 7;
/// Message Control: per-vector masking capable.
pub const MSI_CTRL_PVM: u16 = 1 << 8;

/// Errors adding an MSI capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// MSI allows 1, 2, 4, 8, 16 or 32 vectors.
    #[error("MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {0}")]
    VectorCount(u8),
    /// The capability does not fit.
    #[error("cannot add the MSI capability")]
    Config(#[from] config::Error),
}

/// Result of MSI setup.
pub type Result<T> = std::result::Result<T, Error>;

/// An MSI capability in a function's config space. The registers live in the
/// [`ConfigSpace`]; this remembers where, and implements triggering and masking.
///
/// The guest-programmed MSI state (enable, allocated vectors, address, data, mask
/// and pending bits) therefore travels in the config space's
/// [`ConfigSpaceState`](crate::ConfigSpaceState); [`MsiState`] holds only the
/// capability's layout, which restore checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    cap: u16,
    vectors: u8,
}

impl Msi {
    /// Appends an MSI capability with `vectors` vectors (64-bit, per-vector mask).
    pub fn add(config: &mut ConfigSpace, vectors: u8) -> Result<Msi> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(Error::VectorCount(vectors));
        }
        let cap = config.add_capability(CAP_ID_MSI, MSI_CAP_LEN)?;
        let mmc = vectors.trailing_zeros() as u16;
        config.set_u16(cap + MSI_CTRL, MSI_CTRL_64BIT | MSI_CTRL_PVM | mmc << 1);
        config.set_wmask_u16(cap + MSI_CTRL, MSI_CTRL_ENABLE | 0x7 << MSI_CTRL_MME_SHIFT);
        config.set_wmask_u32(cap + MSI_ADDRESS_LO, 0xffff_fffc);
        config.set_wmask_u32(cap + MSI_ADDRESS_HI, 0xffff_ffff);
        config.set_wmask_u16(cap + MSI_DATA, 0xffff);
        config.set_wmask_u32(cap + MSI_MASK, mask_of(vectors as u32));
        config.set_dynamic_u32(cap + MSI_PENDING, mask_of(vectors as u32));
        Ok(Msi { cap, vectors })
    }

    /// The capability's offset.
    pub fn offset(&self) -> u16 {
        self.cap
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        config.get_u16(self.cap + MSI_CTRL) & MSI_CTRL_ENABLE != 0
    }

    /// Vectors the guest allocated (Multiple Message Enable, capped at what the
    /// capability offers).
    pub fn allocated(&self, config: &ConfigSpace) -> u8 {
        let mme = (config.get_u16(self.cap + MSI_CTRL) >> MSI_CTRL_MME_SHIFT) & 0x7;
        (1u8 << mme.min(5)).min(self.vectors)
    }

    /// The message `vector` sends: the programmed address, and the data with its
    /// low bits replaced by the vector number.
    pub fn message(&self, config: &ConfigSpace, vector: u8) -> MsiMessage {
        let allocated = self.allocated(config) as u32;
        let data = config.get_u16(self.cap + MSI_DATA) as u32;
        MsiMessage {
            address: (config.get_u32(self.cap + MSI_ADDRESS_HI) as u64) << 32
                | config.get_u32(self.cap + MSI_ADDRESS_LO) as u64,
            data: (data & !(allocated - 1)) | (vector as u32 & (allocated - 1)),
        }
    }

    /// Raises `vector`: sent when enabled, allocated, unmasked and bus mastering is
    /// on; remembered in the pending bits when masked.
    pub fn trigger(&self, config: &mut ConfigSpace, vector: u8, sink: &dyn MsiSink) -> Delivery {
        if !self.enabled(config) || !config.bus_master() || vector >= self.allocated(config) {
            return Delivery::Dropped;
        }
        let bit = 1u32 << vector;
        if config.get_u32(self.cap + MSI_MASK) & bit != 0 {
            let p = config.get_u32(self.cap + MSI_PENDING);
            config.set_u32(self.cap + MSI_PENDING, p | bit);
            return Delivery::Pending;
        }
        sink.deliver(vector as u16, self.message(config, vector));
        Delivery::Sent
    }

    /// Call after every guest config write of `len` bytes at `offset`: sends what
    /// an unmask released and updates the sink's routes when the message changed.
    pub fn config_written(
        &self,
        config: &mut ConfigSpace,
        offset: u16,
        len: usize,
        sink: &dyn MsiSink,
    ) {
        let end = offset as usize + len;
        if end <= (self.cap + MSI_CTRL) as usize || offset >= self.cap + MSI_PENDING {
            return;
        }
        self.sync_routes(config, sink);
        let enabled = self.enabled(config);
        let mask = config.get_u32(self.cap + MSI_MASK);
        let pending = config.get_u32(self.cap + MSI_PENDING);
        let release = pending & !mask;
        if release != 0 && enabled && config.bus_master() {
            config.set_u32(self.cap + MSI_PENDING, pending & mask);
            for v in 0..self.vectors {
                if release & (1 << v) != 0 {
                    sink.deliver(v as u16, self.message(config, v));
                }
            }
        }
    }

    /// Tells `sink` what each vector sends now ([`MsiSink::update_route`]: the
    /// message while enabled, allocated and unmasked, `None` otherwise), and sends
    /// nothing. After a restore, call it so a new sink (a new VMM's irqfd routes)
    /// learns the routes the guest programmed.
    pub fn sync_routes(&self, config: &ConfigSpace, sink: &dyn MsiSink) {
        let enabled = self.enabled(config);
        let mask = config.get_u32(self.cap + MSI_MASK);
        for v in 0..self.vectors {
            let live = enabled && v < self.allocated(config) && mask & (1 << v) == 0;
            sink.update_route(v as u16, live.then(|| self.message(config, v)));
        }
    }

    /// Returns the capability to its reset state (disabled, nothing masked or
    /// pending).
    pub fn reset(&self, config: &mut ConfigSpace) {
        let ctrl = config.get_u16(self.cap + MSI_CTRL);
        config.set_u16(
            self.cap + MSI_CTRL,
            ctrl & !(MSI_CTRL_ENABLE | 0x7 << MSI_CTRL_MME_SHIFT),
        );
        for reg in [MSI_ADDRESS_LO, MSI_ADDRESS_HI, MSI_MASK, MSI_PENDING] {
            config.set_u32(self.cap + reg, 0);
        }
        config.set_u16(self.cap + MSI_DATA, 0);
    }
}

fn mask_of(vectors: u32) -> u32 {
    if vectors >= 32 {
        u32::MAX
    } else {
        (1 << vectors) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{COMMAND, COMMAND_BUS_MASTER, ClassCode, HeaderType, PciIds};
    use crate::testing::RecordingMsi;

    fn setup(vectors: u8) -> (ConfigSpace, Msi) {
        let ids = PciIds {
            vendor_id: 1,
            device_id: 2,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class: ClassCode::PCI_BRIDGE,
        };
        let mut cs = ConfigSpace::new(HeaderType::Bridge, &ids, true);
        let msi = Msi::add(&mut cs, vectors).unwrap();
        (cs, msi)
    }

    fn gw(cs: &mut ConfigSpace, msi: &Msi, off: u16, data: &[u8], sink: &RecordingMsi) {
        cs.write(msi.offset() + off, data);
        msi.config_written(cs, msi.offset() + off, data.len(), sink);
    }

    #[test]
    fn layout_and_vector_counts() {
        let (cs, msi) = setup(4);
        assert_eq!(cs.get_u16(msi.offset() + MSI_CTRL), 0x0184);
        assert!(matches!(
            Msi::add(&mut setup(1).0, 3),
            Err(Error::VectorCount(3))
        ));
        assert!(matches!(
            Msi::add(&mut setup(1).0, 64),
            Err(Error::VectorCount(64))
        ));
    }

    #[test]
    fn trigger_mask_pending_unmask() {
        let (mut cs, msi) = setup(4);
        let log = RecordingMsi::new();
        assert_eq!(msi.trigger(&mut cs, 0, &log), Delivery::Dropped);
        gw(
            &mut cs,
            &msi,
            MSI_ADDRESS_LO,
            &0xfee0_1003u32.to_le_bytes(),
            &log,
        );
        gw(&mut cs, &msi, MSI_DATA, &0x4043u16.to_le_bytes(), &log);
        // Enable with two vectors allocated.
        gw(
            &mut cs,
            &msi,
            MSI_CTRL,
            &(MSI_CTRL_ENABLE | 1 << 4).to_le_bytes(),
            &log,
        );
        // No bus mastering: a function cannot write the message.
        assert_eq!(msi.trigger(&mut cs, 0, &log), Delivery::Dropped);
        cs.write(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
        assert_eq!(msi.trigger(&mut cs, 1, &log), Delivery::Sent);
        assert_eq!(msi.trigger(&mut cs, 2, &log), Delivery::Dropped);
        assert_eq!(
            log.take_delivered(),
            [(
                1,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x4043
                }
            )]
        );
        // Mask vector 0, raise it, then unmask: one delivery on unmask.
        gw(&mut cs, &msi, MSI_MASK, &1u32.to_le_bytes(), &log);
        assert_eq!(msi.trigger(&mut cs, 0, &log), Delivery::Pending);
        assert_eq!(cs.get_u32(msi.offset() + MSI_PENDING), 1);
        assert!(log.delivered().is_empty());
        // Pending bits are read-only to the guest.
        gw(&mut cs, &msi, MSI_PENDING, &0u32.to_le_bytes(), &log);
        assert_eq!(cs.get_u32(msi.offset() + MSI_PENDING), 1);
        gw(&mut cs, &msi, MSI_MASK, &0u32.to_le_bytes(), &log);
        assert_eq!(cs.get_u32(msi.offset() + MSI_PENDING), 0);
        assert_eq!(
            log.delivered(),
            [(
                0,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x4042
                }
            )]
        );
        // Routes follow: the last update for vector 1 is live, vectors 2-3 are not.
        assert!(log.last_route(1).unwrap().is_some());
        assert_eq!(log.last_route(2), Some(None));
        // Only four mask bits exist.
        gw(&mut cs, &msi, MSI_MASK, &u32::MAX.to_le_bytes(), &log);
        assert_eq!(cs.get_u32(msi.offset() + MSI_MASK), 0xf);
        msi.reset(&mut cs);
        assert!(!msi.enabled(&cs));
        assert_eq!(cs.get_u32(msi.offset() + MSI_MASK), 0);
    }
}
