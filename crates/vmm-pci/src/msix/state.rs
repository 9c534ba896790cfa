//! The saved state of an [`Msix`]: its table, PBA and the capability bits it
//! keeps a copy of.
//!
//! # Restoring a function with MSI-X
//!
//! The capability's registers (Enable, Function Mask, the table size and
//! locations) are config space bytes and travel in the
//! [`ConfigSpaceState`](crate::ConfigSpaceState); the table, the PBA and this
//! object's copy of Enable, Function Mask and Bus Master travel in
//! [`MsixState`]. The two restores read nothing of each other, so their order
//! does not matter; after both:
//!
//! 1. [`Msix::check_config`] confirms the two states came from the same save
//!    (the config space then agrees with the copy, so the next
//!    [`Msix::config_written`] changes nothing and releases nothing);
//! 2. [`Msix::sync_routes`] tells the destination's sink every vector's route.
//!
//! Neither restore sends anything. A vector that was masked (or under the
//! function mask) with its pending bit set stays pending, reads so in the PBA,
//! and is sent when the guest unmasks it; an unmasked vector sends on its next
//! [`Msix::trigger`].

use device_state::{Encode, Error, Persist, Reader, Result, Writer};

use super::{
    MSIX_CTRL, MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK, MSIX_ENTRY_MASKED, MSIX_MAX_VECTORS,
    MSIX_PBA, MSIX_TABLE, Msix, MsixEntry,
};
use crate::config::{CAP_ID_MSIX, ConfigSpace};

/// The state of an [`Msix`]; see the module documentation for the restore
/// order with the config space.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MsixState {
    /// The capability's offset in config space (configuration).
    pub offset: u16,
    /// The number of vectors (configuration); the table has this many entries.
    pub vectors: u16,
    /// BAR holding the table (configuration).
    pub table_bar: u8,
    /// Offset of the table in its BAR (configuration).
    pub table_offset: u32,
    /// BAR holding the PBA (configuration).
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (configuration).
    pub pba_offset: u32,
    /// The vector table as the guest programmed it.
    pub entries: Vec<MsixEntry>,
    /// The pending-bit array, 64 vectors a word.
    pub pending: Vec<u64>,
    /// MSI-X Enable, as last seen in config space.
    pub enabled: bool,
    /// Function Mask, as last seen in config space.
    pub function_masked: bool,
    /// Bus Master Enable, as last seen in config space.
    pub bus_master: bool,
}

impl Encode for MsixState {
    const MAGIC: [u8; 8] = *b"PCIMSIX\0";
    const VERSION: u16 = 1;

    fn encode(&self, w: &mut Writer) {
        w.u16(self.offset);
        w.u16(self.vectors);
        w.u8(self.table_bar);
        w.u32(self.table_offset);
        w.u8(self.pba_bar);
        w.u32(self.pba_offset);
        w.seq(&self.entries, |w, e| {
            w.u64(e.address);
            w.u32(e.data);
            w.u32(e.control);
        });
        w.seq(&self.pending, |w, p| w.u64(*p));
        w.bool(self.enabled);
        w.bool(self.function_masked);
        w.bool(self.bus_master);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(MsixState {
            offset: r.u16("MSI-X capability offset")?,
            vectors: r.u16("MSI-X vector count")?,
            table_bar: r.u8("MSI-X table BAR")?,
            table_offset: r.u32("MSI-X table offset")?,
            pba_bar: r.u8("MSI-X PBA BAR")?,
            pba_offset: r.u32("MSI-X PBA offset")?,
            entries: r.seq(16, "MSI-X table", |r| {
                Ok(MsixEntry {
                    address: r.u64("MSI-X entry address")?,
                    data: r.u32("MSI-X entry data")?,
                    control: r.u32("MSI-X entry vector control")?,
                })
            })?,
            pending: r.seq(8, "MSI-X PBA", |r| r.u64("MSI-X PBA word"))?,
            enabled: r.bool("MSI-X enable")?,
            function_masked: r.bool("MSI-X function mask")?,
            bus_master: r.bool("bus master enable")?,
        })
    }
}

impl MsixState {
    /// [`Error::Invalid`] for a state no [`Msix`] could have saved.
    fn validate(&self) -> Result<()> {
        let n = self.vectors;
        if n == 0 || n > MSIX_MAX_VECTORS {
            return Err(Error::Invalid(format!(
                "MSI-X vector count {n} is not between 1 and {MSIX_MAX_VECTORS}"
            )));
        }
        if self.entries.len() != n as usize {
            return Err(Error::Invalid(format!(
                "the MSI-X table has {} entries but the vector count is {n}",
                self.entries.len()
            )));
        }
        let words = (n as usize).div_ceil(64);
        if self.pending.len() != words {
            return Err(Error::Invalid(format!(
                "the MSI-X PBA has {} words; {n} vectors need {words}",
                self.pending.len()
            )));
        }
        let tail = n % 64;
        if tail != 0 && self.pending[words - 1] >> tail != 0 {
            return Err(Error::Invalid(format!(
                "MSI-X pending bits are set past vector {}",
                n - 1
            )));
        }
        for (v, e) in self.entries.iter().enumerate() {
            if e.control & !MSIX_ENTRY_MASKED != 0 {
                return Err(Error::Invalid(format!(
                    "MSI-X vector {v} control {:#x} sets reserved bits",
                    e.control
                )));
            }
            let pending = self.pending[v / 64] & 1 << (v % 64) != 0;
            let deliverable =
                self.enabled && !self.function_masked && !e.masked() && self.bus_master;
            if pending && deliverable {
                return Err(Error::Invalid(format!(
                    "MSI-X vector {v} is pending although nothing holds it back"
                )));
            }
        }
        Ok(())
    }
}

impl Persist for Msix {
    type State = MsixState;

    fn save(&self) -> Result<MsixState> {
        Ok(MsixState {
            offset: self.cap,
            vectors: self.vectors(),
            table_bar: self.table.0,
            table_offset: self.table.1,
            pba_bar: self.pba.0,
            pba_offset: self.pba.1,
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
            bus_master: self.bus_master,
        })
    }

    /// Checks the state, then the layout against this object ([`Error::Mismatch`]:
    /// capability offset, vector count, table and PBA BAR and offset), then takes
    /// the table, PBA and flags. Sends nothing and leaves the refused-access
    /// counter.
    fn restore(&mut self, state: &MsixState) -> Result<()> {
        state.validate()?;
        Error::check_hex("MSI-X capability offset", state.offset, self.cap)?;
        Error::check("MSI-X vector count", state.vectors, self.vectors())?;
        Error::check("MSI-X table BAR", state.table_bar, self.table.0)?;
        Error::check_hex("MSI-X table offset", state.table_offset, self.table.1)?;
        Error::check("MSI-X PBA BAR", state.pba_bar, self.pba.0)?;
        Error::check_hex("MSI-X PBA offset", state.pba_offset, self.pba.1)?;
        self.entries.clone_from(&state.entries);
        self.pending.clone_from(&state.pending);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        self.bus_master = state.bus_master;
        Ok(())
    }
}

impl Msix {
    /// After restoring both this and `config`: checks that they agree.
    /// [`Error::Mismatch`] when the capability in `config` is not this one (ID,
    /// table size, table or PBA location); [`Error::Invalid`] when Enable,
    /// Function Mask or Bus Master in `config` differ from this object's copy
    /// (the two states were not saved together).
    pub fn check_config(&self, config: &ConfigSpace) -> Result<()> {
        Error::check_hex(
            "capability ID at the MSI-X offset",
            config.get_u8(self.cap),
            CAP_ID_MSIX,
        )?;
        let ctrl = config.get_u16(self.cap + MSIX_CTRL);
        Error::check(
            "MSI-X vector count in config space",
            (ctrl & 0x7ff) + 1,
            self.vectors(),
        )?;
        Error::check_hex(
            "MSI-X table offset and BIR in config space",
            config.get_u32(self.cap + MSIX_TABLE),
            self.table.1 | self.table.0 as u32,
        )?;
        Error::check_hex(
            "MSI-X PBA offset and BIR in config space",
            config.get_u32(self.cap + MSIX_PBA),
            self.pba.1 | self.pba.0 as u32,
        )?;
        for (what, in_config, here) in [
            ("Enable", ctrl & MSIX_CTRL_ENABLE != 0, self.enabled),
            (
                "Function Mask",
                ctrl & MSIX_CTRL_FUNCTION_MASK != 0,
                self.function_masked,
            ),
            ("Bus Master", config.bus_master(), self.bus_master),
        ] {
            if in_config != here {
                return Err(Error::Invalid(format!(
                    "MSI-X {what} is {in_config} in config space but {here} in the MSI-X state; \
                     restore both from the same save"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{COMMAND, COMMAND_BUS_MASTER, ClassCode, HeaderType, PciIds};
    use crate::{BarKind, Delivery, MsiMessage};
    use device_state::{from_bytes, to_bytes};

    use crate::testing::RecordingMsi as Log;

    fn build_with(vectors: u16, table: (u8, u32), pba: (u8, u32)) -> (ConfigSpace, Msix) {
        let ids = PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 1,
            class: ClassCode::ETHERNET,
        };
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids, true);
        cs.add_bar(
            1,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x4000,
        )
        .unwrap();
        let msix = Msix::add(&mut cs, vectors, table.0, table.1, pba.0, pba.1).unwrap();
        (cs, msix)
    }

    fn build(vectors: u16) -> (ConfigSpace, Msix) {
        build_with(vectors, (1, 0), (1, 0x2000))
    }

    fn ctrl(cs: &mut ConfigSpace, m: &mut Msix, v: u16, log: &Log) {
        cs.write(m.offset() + MSIX_CTRL, &v.to_le_bytes());
        m.config_written(cs, log);
    }

    fn entry(m: &mut Msix, v: u16, address: u64, data: u32, masked: bool, log: &Log) {
        let o = 16 * v as u64;
        m.write_table(o, &address.to_le_bytes(), log);
        m.write_table(o + 8, &data.to_le_bytes(), log);
        m.write_table(o + 12, &(masked as u32).to_le_bytes(), log);
    }

    /// Every table and PBA dword as the guest reads it.
    fn guest_view(m: &mut Msix) -> (Vec<u32>, Vec<u32>) {
        let mut d = [0u8; 4];
        let table = (0..m.table_len())
            .step_by(4)
            .map(|o| {
                m.read_table(o, &mut d);
                u32::from_le_bytes(d)
            })
            .collect();
        let pba = (0..m.pba_len())
            .step_by(4)
            .map(|o| {
                m.read_pba(o, &mut d);
                u32::from_le_bytes(d)
            })
            .collect();
        (table, pba)
    }

    fn config_view(cs: &mut ConfigSpace) -> Vec<u32> {
        (0..cs.size()).step_by(4).map(|o| cs.read_u32(o)).collect()
    }

    const M0: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };

    /// 70 vectors (two PBA words): 0 live, 1 and 65 masked and pending, the
    /// rest at reset.
    fn programmed() -> (ConfigSpace, Msix, Log) {
        let (mut cs, mut m) = build(70);
        let log = Log::default();
        cs.write(COMMAND, &COMMAND_BUS_MASTER.to_le_bytes());
        ctrl(&mut cs, &mut m, MSIX_CTRL_ENABLE, &log);
        entry(&mut m, 0, M0.address, M0.data, false, &log);
        entry(&mut m, 1, 0xfee0_1000, 0x42, true, &log);
        entry(&mut m, 65, 0xfee0_2000, 0x43, true, &log);
        assert_eq!(m.trigger(1, &log), Delivery::Pending);
        assert_eq!(m.trigger(65, &log), Delivery::Pending);
        log.take_delivered();
        log.take_routes();
        (cs, m, log)
    }

    /// Restores the config space and the MSI-X, in either order.
    fn restore_both(cs_first: bool) -> (ConfigSpace, Msix, ConfigSpace, Msix) {
        let (mut scs, mut sm, _) = programmed();
        let cs_bytes = to_bytes(&scs.save().unwrap());
        let m_bytes = to_bytes(&sm.save().unwrap());
        assert_eq!(&m_bytes[..8], b"PCIMSIX\0");
        let (mut dcs, mut dm) = build(70);
        let cs_state = from_bytes(&cs_bytes).unwrap();
        let m_state: MsixState = from_bytes(&m_bytes).unwrap();
        if cs_first {
            dcs.restore(&cs_state).unwrap();
            dm.restore(&m_state).unwrap();
        } else {
            dm.restore(&m_state).unwrap();
            dcs.restore(&cs_state).unwrap();
        }
        dm.check_config(&dcs).unwrap();
        assert_eq!(dm.save().unwrap(), sm.save().unwrap());
        assert_eq!(guest_view(&mut dm), guest_view(&mut sm));
        assert_eq!(config_view(&mut dcs), config_view(&mut scs));
        (scs, sm, dcs, dm)
    }

    #[test]
    fn round_trip_in_either_order_keeps_table_pba_and_delivery() {
        for cs_first in [true, false] {
            let (_, _, mut dcs, mut dm) = restore_both(cs_first);
            let sink = Log::default();
            assert!(dm.is_pending(1) && dm.is_pending(65) && !dm.is_pending(0));
            dm.sync_routes(&sink);
            assert!(sink.take_delivered().is_empty(), "restoring sends nothing");
            let routes = sink.take_routes();
            assert_eq!(routes.len(), 70);
            assert_eq!(routes[0], (0, Some(M0)));
            assert!(routes[1..].iter().all(|r| r.1.is_none()));
            // The config space agrees with the copy: a config write releases
            // nothing.
            dm.config_written(&dcs, &sink);
            assert!(sink.take_delivered().is_empty());
            // Live vector: sent on its next trigger.
            assert_eq!(dm.trigger(0, &sink), Delivery::Sent);
            assert_eq!(sink.take_delivered(), [(0, M0)]);
            // Masked vector: still masked, stays pending, goes out on unmask.
            assert_eq!(dm.trigger(1, &sink), Delivery::Pending);
            dm.write_table(16 + 12, &0u32.to_le_bytes(), &sink);
            let m1 = MsiMessage {
                address: 0xfee0_1000,
                data: 0x42,
            };
            assert_eq!(sink.take_delivered(), [(1, m1)]);
            assert!(!dm.is_pending(1) && dm.is_pending(65));
            // Disabling and re-enabling goes through the restored copy.
            ctrl(&mut dcs, &mut dm, 0, &sink);
            assert_eq!(dm.trigger(0, &sink), Delivery::Dropped);
        }
    }

    #[test]
    fn function_mask_pending_survives_restore() {
        let (mut cs, mut m, log) = programmed();
        ctrl(
            &mut cs,
            &mut m,
            MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK,
            &log,
        );
        assert_eq!(m.trigger(0, &log), Delivery::Pending);
        let (mut dcs, mut dm) = build(70);
        dcs.restore(&from_bytes(&to_bytes(&cs.save().unwrap())).unwrap())
            .unwrap();
        dm.restore(&from_bytes(&to_bytes(&m.save().unwrap())).unwrap())
            .unwrap();
        dm.check_config(&dcs).unwrap();
        let sink = Log::default();
        assert!(dm.is_pending(0) && dm.function_masked());
        ctrl(&mut dcs, &mut dm, MSIX_CTRL_ENABLE, &sink);
        assert_eq!(
            sink.take_delivered(),
            [(0, M0)],
            "released by clearing the mask"
        );
    }

    #[test]
    fn corrupt_bytes_are_refused() {
        let (_, m, _) = programmed();
        let bytes = to_bytes(&m.save().unwrap());
        for n in 0..bytes.len() {
            assert!(from_bytes::<MsixState>(&bytes[..n]).is_err(), "cut {n}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut c = bytes.clone();
                c[i] ^= 1 << bit;
                assert!(from_bytes::<MsixState>(&c).is_err(), "flip {i}.{bit}");
            }
        }
    }

    #[test]
    fn each_mismatch_names_the_field_and_applies_nothing() {
        let (_, m, _) = programmed();
        let state = m.save().unwrap();
        let cases = [
            (
                build(64),
                "MSI-X vector count is 70 in the saved state but 64",
            ),
            (
                build_with(70, (2, 0), (1, 0x2000)),
                "MSI-X table BAR is 1 in the saved state but 2",
            ),
            (
                build_with(70, (1, 0x1000), (1, 0x2000)),
                "MSI-X table offset is 0x0 in the saved state but 0x1000",
            ),
            (
                build_with(70, (1, 0), (2, 0x2000)),
                "MSI-X PBA BAR is 1 in the saved state but 2",
            ),
            (
                build_with(70, (1, 0), (1, 0x3000)),
                "MSI-X PBA offset is 0x2000 in the saved state but 0x3000",
            ),
            (
                {
                    let (mut cs, _) = build(1);
                    let m = Msix::add(&mut cs, 70, 1, 0, 1, 0x2000).unwrap();
                    (cs, m)
                },
                "MSI-X capability offset is 0x40 in the saved state but 0x4c",
            ),
        ];
        for ((_, mut dst), expect) in cases {
            let before = dst.save().unwrap();
            let e = dst.restore(&state).unwrap_err();
            assert!(matches!(e, Error::Mismatch { .. }), "{e}");
            assert!(e.to_string().contains(expect), "{e}\n  wants: {expect}");
            assert_eq!(dst.save().unwrap(), before);
        }
    }

    #[test]
    fn invalid_states_are_refused_and_apply_nothing() {
        let (_, m, _) = programmed();
        let state = m.save().unwrap();
        let (_, mut dst) = build(70);
        let before = dst.save().unwrap();
        let bad = [
            MsixState {
                vectors: 0,
                ..state.clone()
            },
            MsixState {
                vectors: 69,
                ..state.clone()
            },
            MsixState {
                pending: vec![0],
                ..state.clone()
            },
            MsixState {
                pending: vec![0, 1 << 6],
                ..state.clone()
            },
            {
                let mut s = state.clone();
                s.entries[3].control = 0x8000_0001;
                s
            },
            {
                let mut s = state.clone();
                s.pending[0] |= 1;
                s
            },
        ];
        let texts = [
            "MSI-X vector count 0",
            "the MSI-X table has 70 entries but the vector count is 69",
            "the MSI-X PBA has 1 words; 70 vectors need 2",
            "MSI-X pending bits are set past vector 69",
            "MSI-X vector 3 control 0x80000001 sets reserved bits",
            "MSI-X vector 0 is pending although nothing holds it back",
        ];
        for (s, text) in bad.iter().zip(texts) {
            let e = dst.restore(s).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert!(e.to_string().contains(text), "{e}\n  wants: {text}");
            assert_eq!(dst.save().unwrap(), before);
        }
        // A forged count cannot make the decoder allocate.
        let mut w = Writer::new();
        w.u16(0x40);
        w.u16(70);
        w.u8(1);
        w.u32(0);
        w.u8(1);
        w.u32(0x2000);
        w.u32(u32::MAX);
        let body = w.into_inner();
        let mut r = Reader::new(&body);
        assert_eq!(
            MsixState::decode(&mut r),
            Err(Error::Truncated("MSI-X table"))
        );
    }

    #[test]
    fn check_config_catches_states_not_saved_together() {
        let (mut scs, mut sm, log) = programmed();
        let cs_state = scs.save().unwrap();
        // The guest disables MSI-X after the config space was saved.
        ctrl(&mut scs, &mut sm, 0, &log);
        let (mut dcs, mut dm) = build(70);
        dcs.restore(&cs_state).unwrap();
        dm.restore(&sm.save().unwrap()).unwrap();
        let e = dm.check_config(&dcs).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the saved state is invalid: MSI-X Enable is true in config space but false in the MSI-X state; restore both from the same save"
        );
        // A config space with another MSI-X layout.
        let (other, _) = build(8);
        let (_, m70) = build(70);
        let e = m70.check_config(&other).unwrap_err();
        assert!(
            e.to_string()
                .contains("MSI-X vector count in config space is 8 in the saved state but 70"),
            "{e}"
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_keeps_table_pba_and_delivery() {
        let (mut scs, mut sm, _) = programmed();
        let cs_state = scs.save().unwrap();
        let m_state = sm.save().unwrap();
        let cs_json = serde_json::to_string(&cs_state).unwrap();
        let m_json = serde_json::to_string(&m_state).unwrap();
        let cs_back: crate::ConfigSpaceState = serde_json::from_str(&cs_json).unwrap();
        let m_back: MsixState = serde_json::from_str(&m_json).unwrap();
        assert_eq!(cs_back, cs_state);
        assert_eq!(m_back, m_state);

        let (mut dcs, mut dm) = build(70);
        dcs.restore(&cs_back).unwrap();
        dm.restore(&m_back).unwrap();
        dm.check_config(&dcs).unwrap();
        assert_eq!(dm.save().unwrap(), m_state);
        assert_eq!(guest_view(&mut dm), guest_view(&mut sm));
        assert_eq!(config_view(&mut dcs), config_view(&mut scs));
        let sink = Log::default();
        dm.sync_routes(&sink);
        assert!(sink.take_delivered().is_empty(), "restoring sends nothing");
        assert_eq!(sink.take_routes()[0], (0, Some(M0)));
        assert_eq!(dm.trigger(0, &sink), Delivery::Sent);
        assert_eq!(sink.take_delivered(), [(0, M0)]);
        // Vector 65 (second PBA word) was masked and pending: unmasking sends.
        dm.write_table(65 * 16 + 12, &0u32.to_le_bytes(), &sink);
        let m65 = MsiMessage {
            address: 0xfee0_2000,
            data: 0x43,
        };
        assert_eq!(sink.take_delivered(), [(65, m65)]);

        // A deserialized state is checked as a decoded one: a table of the
        // wrong length is refused.
        let mut short: MsixState = serde_json::from_str(&m_json).unwrap();
        short.entries.pop();
        assert!(build(70).1.restore(&short).is_err());
    }
}
