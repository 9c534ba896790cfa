//! The saved state of an [`Msi`] capability.
//!
//! Every MSI register lives in config space, so the guest-programmed state
//! (Enable, Multiple Message Enable, address, data, Mask Bits and Pending Bits)
//! is saved and restored with the [`ConfigSpace`](crate::ConfigSpace). What is
//! left is the capability's layout, which a restore checks.
//!
//! Restoring sends nothing: a vector that was masked with its pending bit set
//! stays pending and is sent when the guest unmasks it; an unmasked vector sends
//! on its next trigger. After restoring the config space, call
//! [`Msi::sync_routes`] so the destination's sink learns the routes.

use device_state::{Encode, Error, Persist, Reader, Result, Writer};

use super::Msi;

/// The layout of an [`Msi`] capability (its registers travel in the config
/// space's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MsiState {
    /// The capability's offset in config space.
    pub offset: u16,
    /// The vectors the capability offers (1, 2, 4, 8, 16 or 32).
    pub vectors: u8,
}

impl Encode for MsiState {
    const MAGIC: [u8; 8] = *b"PCIMSI\0\0";
    const VERSION: u16 = 1;

    fn encode(&self, w: &mut Writer) {
        w.u16(self.offset);
        w.u8(self.vectors);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(MsiState {
            offset: r.u16("MSI capability offset")?,
            vectors: r.u8("MSI vector count")?,
        })
    }
}

impl Persist for Msi {
    type State = MsiState;

    fn save(&self) -> Result<MsiState> {
        Ok(MsiState {
            offset: self.cap,
            vectors: self.vectors,
        })
    }

    /// Checks the layout; there is nothing else to apply (restore the config
    /// space for the registers).
    fn restore(&mut self, state: &MsiState) -> Result<()> {
        if !state.vectors.is_power_of_two() || state.vectors > 32 {
            return Err(Error::Invalid(format!(
                "MSI vector count {} is not 1, 2, 4, 8, 16 or 32",
                state.vectors
            )));
        }
        Error::check_hex("MSI capability offset", state.offset, self.cap)?;
        Error::check("MSI vector count", state.vectors, self.vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{COMMAND, COMMAND_BUS_MASTER, ClassCode, ConfigSpace, HeaderType, PciIds};
    use crate::msi::{MSI_ADDRESS_LO, MSI_CTRL, MSI_CTRL_ENABLE, MSI_DATA, MSI_MASK, MSI_PENDING};
    use crate::{Delivery, MsiMessage};
    use device_state::{from_bytes, to_bytes};

    use crate::testing::RecordingMsi as Log;

    fn build(vectors: u8) -> (ConfigSpace, Msi) {
        let ids = PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 1,
            class: ClassCode::ETHERNET,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
        let msi = Msi::add(&mut cs, vectors).unwrap();
        (cs, msi)
    }

    fn gw(cs: &mut ConfigSpace, msi: &Msi, off: u16, data: &[u8], sink: &Log) {
        cs.write(msi.offset() + off, data);
        msi.config_written(cs, msi.offset() + off, data.len(), sink);
    }

    fn guest_view(cs: &mut ConfigSpace) -> Vec<u32> {
        (0..cs.size()).step_by(4).map(|o| cs.read_u32(o)).collect()
    }

    /// Four vectors at 0xfee0_1000 / 0x4040, enabled, bus master on, vector 1
    /// masked with its pending bit set.
    fn programmed() -> (ConfigSpace, Msi) {
        let (mut cs, msi) = build(4);
        let log = Log::default();
        gw(
            &mut cs,
            &msi,
            MSI_ADDRESS_LO,
            &0xfee0_1000u32.to_le_bytes(),
            &log,
        );
        gw(&mut cs, &msi, MSI_DATA, &0x4040u16.to_le_bytes(), &log);
        gw(
            &mut cs,
            &msi,
            MSI_CTRL,
            &(MSI_CTRL_ENABLE | 2 << 4).to_le_bytes(),
            &log,
        );
        cs.write(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
        gw(&mut cs, &msi, MSI_MASK, &0b10u32.to_le_bytes(), &log);
        assert_eq!(msi.trigger(&mut cs, 1, &log), Delivery::Pending);
        (cs, msi)
    }

    #[test]
    fn round_trip_keeps_pending_and_delivers_after_restore() {
        let (mut cs, msi) = programmed();

        let cs_bytes = to_bytes(&crate::ConfigSpace::save(&cs).unwrap());
        let msi_bytes = to_bytes(&msi.save().unwrap());
        assert_eq!(&msi_bytes[..8], b"PCIMSI\0\0");

        let (mut dst, mut dmsi) = build(4);
        dst.restore(&from_bytes(&cs_bytes).unwrap()).unwrap();
        dmsi.restore(&from_bytes(&msi_bytes).unwrap()).unwrap();
        assert_eq!(dmsi.save().unwrap(), msi.save().unwrap());
        assert_eq!(guest_view(&mut dst), guest_view(&mut cs));
        assert_eq!(dst.get_u32(dmsi.offset() + MSI_PENDING), 0b10);

        let new_sink = Log::default();
        dmsi.sync_routes(&dst, &new_sink);
        assert!(
            new_sink.take_delivered().is_empty(),
            "restoring sends nothing"
        );
        let routes = new_sink.routes();
        let m0 = MsiMessage {
            address: 0xfee0_1000,
            data: 0x4040,
        };
        assert_eq!(
            routes,
            [
                (0, Some(m0)),
                (1, None),
                (2, Some(MsiMessage { data: 0x4042, ..m0 })),
                (3, Some(MsiMessage { data: 0x4043, ..m0 })),
            ]
        );
        // An unmasked vector sends on its next trigger; the masked one was
        // pending and goes out when the guest unmasks it.
        assert_eq!(dmsi.trigger(&mut dst, 0, &new_sink), Delivery::Sent);
        assert_eq!(new_sink.take_delivered(), [(0, m0)]);
        gw(&mut dst, &dmsi, MSI_MASK, &0u32.to_le_bytes(), &new_sink);
        assert_eq!(
            new_sink.take_delivered(),
            [(1, MsiMessage { data: 0x4041, ..m0 })]
        );
        assert_eq!(dst.get_u32(dmsi.offset() + MSI_PENDING), 0);
    }

    #[test]
    fn corrupt_bytes_and_mismatches_are_refused() {
        let (_, msi) = build(4);
        let bytes = to_bytes(&msi.save().unwrap());
        for n in 0..bytes.len() {
            assert!(from_bytes::<MsiState>(&bytes[..n]).is_err(), "cut {n}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut c = bytes.clone();
                c[i] ^= 1 << bit;
                assert!(from_bytes::<MsiState>(&c).is_err(), "flip {i}.{bit}");
            }
        }
        let state = msi.save().unwrap();
        let e = build(8).1.restore(&state).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the saved state does not fit this device: MSI vector count is 4 in the saved state but 8 on this device"
        );
        let mut moved = build(4).1;
        moved.cap = 0x50;
        let e = moved.restore(&state).unwrap_err();
        assert!(
            e.to_string().contains("MSI capability offset is 0x40"),
            "{e}"
        );
        let e = build(4)
            .1
            .restore(&MsiState {
                vectors: 3,
                ..state
            })
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_keeps_pending_and_delivers_after_restore() {
        let (mut cs, msi) = programmed();
        let cs_state = crate::ConfigSpace::save(&cs).unwrap();
        let msi_state = msi.save().unwrap();
        let cs_json = serde_json::to_string(&cs_state).unwrap();
        let msi_json = serde_json::to_string(&msi_state).unwrap();
        let cs_back: crate::ConfigSpaceState = serde_json::from_str(&cs_json).unwrap();
        let msi_back: MsiState = serde_json::from_str(&msi_json).unwrap();
        assert_eq!(cs_back, cs_state);
        assert_eq!(msi_back, msi_state);

        let (mut dst, mut dmsi) = build(4);
        dst.restore(&cs_back).unwrap();
        dmsi.restore(&msi_back).unwrap();
        assert_eq!(dmsi.save().unwrap(), msi_state);
        assert_eq!(guest_view(&mut dst), guest_view(&mut cs));
        let sink = Log::default();
        dmsi.sync_routes(&dst, &sink);
        assert!(sink.take_delivered().is_empty(), "restoring sends nothing");
        // The masked vector was pending: unmasking sends it.
        gw(&mut dst, &dmsi, MSI_MASK, &0u32.to_le_bytes(), &sink);
        let m1 = MsiMessage {
            address: 0xfee0_1000,
            data: 0x4041,
        };
        assert_eq!(sink.take_delivered(), [(1, m1)]);

        // A deserialized layout is checked as a decoded one.
        let mut other: MsiState = serde_json::from_str(&msi_json).unwrap();
        other.vectors = 8;
        assert!(build(4).1.restore(&other).is_err());
    }
}
