//! The saved state of a [`ConfigSpace`].
//!
//! A config space's guest-visible state is its bytes: everything the guest
//! programmed (command register, BAR addresses, bridge bus numbers and windows,
//! capability registers such as MSI's) and the read-only bits device code keeps
//! current (the *dynamic* bits: Interrupt Status, MSI Pending Bits, Presence
//! Detect State). The rest is configuration, fixed when the function was built:
//! the masks, the BAR declarations, and every other read-only bit (IDs, class,
//! header type, capability list and capability registers). Restore refuses a
//! state whose configuration differs, naming what differs.

use device_state::{Encode, Error, Persist, Reader, Result, Writer};

use super::{
    CAP_START, CAPABILITIES_POINTER, CLASS_PROG_IF, ConfigSpace, DEVICE_ID, HEADER_TYPE,
    HeaderType, INTERRUPT_PIN, PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE, REVISION_ID, STATUS,
    STATUS_CAP_LIST, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use crate::bar::{BarKind, MAX_BARS};

/// A declared BAR in a saved [`ConfigSpaceState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BarState {
    /// What it decodes (configuration: must match the device).
    pub kind: BarKind,
    /// Size in bytes (configuration: must match the device).
    pub size: u64,
    /// The last address the guest (or the VMM) programmed. The register bytes hold
    /// what the guest reads, which differs while the guest is sizing the BAR; this
    /// is the address a later [`crate::BarMove`] reports as `old`.
    pub address: u64,
}

/// The guest-visible state of a [`ConfigSpace`]: see the module documentation.
///
/// Restore onto a config space built the same way (same header, size, IDs, BARs
/// and capabilities, in the same order). The function that owns the space must
/// restore what it keeps outside it too: [`crate::Msix`] keeps its table, PBA
/// and a copy of Enable, Function Mask and Bus Master (see
/// [`crate::MsixState`]).
///
/// After a restore the BARs decode where the saved state says; a VMM that maps
/// BARs itself reads them from [`ConfigSpace::bar_regions`] (no
/// [`crate::BarMove`] is reported for a restore).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ConfigSpaceState {
    /// The size of the space: 256 or 4096 bytes (configuration).
    pub size: u16,
    /// The header layout (configuration).
    pub header: HeaderType,
    /// The space's bytes, `size` of them.
    pub bytes: Vec<u8>,
    /// The declared BARs by register index (`None` also for the upper half of a
    /// 64-bit BAR).
    pub bars: [Option<BarState>; MAX_BARS],
}

impl ConfigSpaceState {
    /// The saved byte at `offset`, if the state has one.
    pub fn u8_at(&self, offset: u16) -> Option<u8> {
        self.bytes.get(offset as usize).copied()
    }

    /// The saved little-endian word at `offset`, if the state has it.
    pub fn u16_at(&self, offset: u16) -> Option<u16> {
        let o = offset as usize;
        let b = self.bytes.get(o..o.checked_add(2)?)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    /// The saved little-endian dword at `offset`, if the state has it.
    pub fn u32_at(&self, offset: u16) -> Option<u32> {
        let o = offset as usize;
        let b = self.bytes.get(o..o.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn header_code(h: HeaderType) -> u8 {
    match h {
        HeaderType::Endpoint => 0,
        HeaderType::Bridge => 1,
    }
}

fn header_name(h: HeaderType) -> &'static str {
    match h {
        HeaderType::Endpoint => "type 0 (endpoint)",
        HeaderType::Bridge => "type 1 (bridge)",
    }
}

fn kind_code(k: BarKind) -> u8 {
    match k {
        BarKind::Io => 0,
        BarKind::Memory32 {
            prefetchable: false,
        } => 1,
        BarKind::Memory32 { prefetchable: true } => 2,
        BarKind::Memory64 {
            prefetchable: false,
        } => 3,
        BarKind::Memory64 { prefetchable: true } => 4,
    }
}

fn kind_from_code(c: u8) -> Result<BarKind> {
    Ok(match c {
        0 => BarKind::Io,
        1 => BarKind::Memory32 {
            prefetchable: false,
        },
        2 => BarKind::Memory32 { prefetchable: true },
        3 => BarKind::Memory64 {
            prefetchable: false,
        },
        4 => BarKind::Memory64 { prefetchable: true },
        c => return Err(Error::Invalid(format!("BAR kind {c} is not a BAR kind"))),
    })
}

/// How a BAR declaration reads in a mismatch.
fn describe_bar(bar: Option<(BarKind, u64)>) -> String {
    match bar {
        None => "not declared".to_string(),
        Some((kind, size)) => {
            let kind = match kind {
                BarKind::Io => "I/O",
                BarKind::Memory32 {
                    prefetchable: false,
                } => "32-bit memory",
                BarKind::Memory32 { prefetchable: true } => "32-bit prefetchable memory",
                BarKind::Memory64 {
                    prefetchable: false,
                } => "64-bit memory",
                BarKind::Memory64 { prefetchable: true } => "64-bit prefetchable memory",
            };
            format!("{kind} of {size:#x} bytes")
        }
    }
}

/// The capability list as a guest walks it in `bytes`: (offset, ID) pairs, at
/// most 48, never reading past the slice.
fn capability_list(bytes: &[u8]) -> Vec<(u16, u8)> {
    let get = |o: u16| bytes.get(o as usize).copied().unwrap_or(0);
    let status = u16::from_le_bytes([get(STATUS), get(STATUS + 1)]);
    let mut out = Vec::new();
    if status & STATUS_CAP_LIST == 0 {
        return out;
    }
    let mut ptr = get(CAPABILITIES_POINTER) as u16 & !3;
    for _ in 0..48 {
        if ptr < CAP_START {
            break;
        }
        out.push((ptr, get(ptr)));
        ptr = get(ptr + 1) as u16 & !3;
    }
    out
}

fn describe_caps(caps: &[(u16, u8)]) -> String {
    if caps.is_empty() {
        return "empty".to_string();
    }
    caps.iter()
        .map(|(off, id)| format!("ID {id:#04x} at {off:#04x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Encode for ConfigSpaceState {
    const MAGIC: [u8; 8] = *b"PCICFGSP";
    const VERSION: u16 = 1;

    fn encode(&self, w: &mut Writer) {
        w.u16(self.size);
        w.u8(header_code(self.header));
        w.bytes(&self.bytes);
        for bar in &self.bars {
            w.opt(bar.as_ref(), |w, b| {
                w.u8(kind_code(b.kind));
                w.u64(b.size);
                w.u64(b.address);
            });
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let size = r.u16("config space size")?;
        let header = match r.u8("header type")? {
            0 => HeaderType::Endpoint,
            1 => HeaderType::Bridge,
            h => return Err(Error::Invalid(format!("header type {h} is not 0 or 1"))),
        };
        let bytes = r.bytes("config space bytes")?;
        let mut bars = [None; MAX_BARS];
        for bar in &mut bars {
            *bar = r.opt("BAR", |r| {
                Ok(BarState {
                    kind: kind_from_code(r.u8("BAR kind")?)?,
                    size: r.u64("BAR size")?,
                    address: r.u64("BAR address")?,
                })
            })?;
        }
        Ok(ConfigSpaceState {
            size,
            header,
            bytes,
            bars,
        })
    }
}

impl ConfigSpace {
    /// The bits of byte `i` that are configuration: read-only to the guest and
    /// not changed by device code.
    fn fixed_bits(&self, i: usize) -> u8 {
        !(self.wmask[i] | self.w1cmask[i] | self.dynamic[i])
    }

    /// The configuration bits of the `len`-byte field at `offset` in `bytes`.
    fn fixed_field(&self, bytes: &[u8], offset: u16, len: u16) -> u32 {
        (0..len).fold(0, |acc, k| {
            let i = (offset + k) as usize;
            let b = bytes.get(i).copied().unwrap_or(0) & self.fixed_bits(i);
            acc | (b as u32) << (8 * k)
        })
    }

    /// Checks that `state` fits this config space, changing nothing: what
    /// [`Persist::restore`] checks before it applies anything. A device that
    /// embeds a config space calls it to check all its parts before applying any.
    ///
    /// Refuses a state of another configuration with [`Error::Mismatch`] (size,
    /// header type, IDs, class code, interrupt pin, BAR declarations, capability
    /// list, then any other read-only bit, by offset) and a state no config space
    /// could have saved with [`Error::Invalid`].
    pub fn check_restore(&self, state: &ConfigSpaceState) -> Result<()> {
        if state.size != PCI_CONFIG_SIZE && state.size != PCIE_CONFIG_SIZE {
            return Err(Error::Invalid(format!(
                "config space size {} is neither 256 nor 4096",
                state.size
            )));
        }
        Error::check("config space size", state.size, self.size)?;
        if state.bytes.len() != state.size as usize {
            return Err(Error::Invalid(format!(
                "the config space has {} bytes, not its size of {}",
                state.bytes.len(),
                state.size
            )));
        }
        Error::check(
            "header type",
            header_name(state.header),
            header_name(self.header),
        )?;
        let saved = &state.bytes[..];
        let own = &self.bytes[..self.size as usize];
        let mut fields = vec![
            ("vendor id", VENDOR_ID, 2),
            ("device id", DEVICE_ID, 2),
            ("revision id", REVISION_ID, 1),
            ("class code", CLASS_PROG_IF, 3),
            ("header type register", HEADER_TYPE, 1),
        ];
        if self.header == HeaderType::Endpoint {
            fields.push(("subsystem vendor id", SUBSYSTEM_VENDOR_ID, 2));
            fields.push(("subsystem id", SUBSYSTEM_ID, 2));
        }
        fields.push(("interrupt pin", INTERRUPT_PIN, 1));
        for (field, offset, len) in fields {
            Error::check_hex(
                field,
                self.fixed_field(saved, offset, len),
                self.fixed_field(own, offset, len),
            )?;
        }
        for (i, (s, d)) in state.bars.iter().zip(self.bars.iter()).enumerate() {
            Error::check(
                &format!("BAR {i}"),
                describe_bar(s.map(|b| (b.kind, b.size))),
                describe_bar(d.map(|b| (b.kind, b.size))),
            )?;
            if let Some(b) = s {
                let limit = match b.kind {
                    BarKind::Memory64 { .. } => u64::MAX,
                    _ => u32::MAX as u64,
                };
                if b.address % b.size.max(1) != 0 || b.address > limit {
                    return Err(Error::Invalid(format!(
                        "BAR {i} address {:#x} does not fit a {}",
                        b.address,
                        describe_bar(Some((b.kind, b.size)))
                    )));
                }
            }
        }
        let caps = capability_list(own);
        Error::check(
            "capability list",
            describe_caps(&capability_list(saved)),
            describe_caps(&caps),
        )?;
        for (i, (&s, &d)) in saved.iter().zip(own).enumerate() {
            let fixed = self.fixed_bits(i);
            if (s ^ d) & fixed == 0 {
                continue;
            }
            let place = caps
                .iter()
                .filter(|(off, _)| (*off as usize) <= i && i < PCI_CONFIG_SIZE as usize)
                .max_by_key(|(off, _)| *off)
                .map(|(off, id)| format!(" (capability ID {id:#04x} at {off:#04x})"))
                .unwrap_or_default();
            return Err(Error::Mismatch {
                field: format!("read-only bits of config byte {i:#05x}{place}"),
                saved: format!("{:#04x}", s & fixed),
                device: format!("{:#04x}", d & fixed),
            });
        }
        Ok(())
    }
}

impl Persist for ConfigSpace {
    type State = ConfigSpaceState;

    fn save(&self) -> Result<ConfigSpaceState> {
        let mut bars = [None; MAX_BARS];
        for (out, slot) in bars.iter_mut().zip(self.bars.iter()) {
            *out = slot.map(|s| BarState {
                kind: s.kind,
                size: s.size,
                address: s.programmed,
            });
        }
        Ok(ConfigSpaceState {
            size: self.size,
            header: self.header,
            bytes: self.bytes[..self.size as usize].to_vec(),
            bars,
        })
    }

    /// Checks with [`ConfigSpace::check_restore`], then takes the saved bytes and
    /// BAR addresses. Sends nothing and reports no BAR move; the refused-access
    /// counter is this host's and stays.
    fn restore(&mut self, state: &ConfigSpaceState) -> Result<()> {
        self.check_restore(state)?;
        self.bytes[..self.size as usize].copy_from_slice(&state.bytes);
        for (slot, saved) in self.bars.iter_mut().zip(state.bars.iter()) {
            if let (Some(slot), Some(saved)) = (slot.as_mut(), saved) {
                slot.programmed = saved.address;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY, ClassCode, INTERRUPT_LINE, MEMORY_BASE,
        PRIMARY_BUS, PciIds, STATUS_INTERRUPT,
    };
    use crate::msi::{MSI_MASK, MSI_PENDING, Msi};
    use crate::pcie::{self, PcieCapConfig};
    use device_state::{from_bytes, to_bytes};

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 1,
            class: ClassCode::ETHERNET,
        }
    }

    /// An endpoint as a device would build it: BARs, PCIe and MSI capabilities.
    fn build(ids: &PciIds) -> ConfigSpace {
        let mut cs = ConfigSpace::new(HeaderType::Endpoint, ids, true);
        cs.set_interrupt_pin(1);
        cs.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x4000)
            .unwrap();
        cs.add_bar(2, BarKind::Io, 0x20).unwrap();
        cs.add_bar(
            3,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        pcie::add_pcie_capability(&mut cs, &PcieCapConfig::endpoint()).unwrap();
        Msi::add(&mut cs, 4).unwrap();
        cs
    }

    fn w32(cs: &mut ConfigSpace, off: u16, v: u32) {
        cs.write(off, &v.to_le_bytes());
    }

    /// Every dword as the guest reads it.
    fn guest_view(cs: &mut ConfigSpace) -> Vec<u32> {
        (0..cs.size()).step_by(4).map(|o| cs.read_u32(o)).collect()
    }

    /// A config space the guest has programmed, with device-owned bits set.
    fn programmed() -> ConfigSpace {
        let mut cs = build(&ids());
        w32(&mut cs, BAR0, 0xfe00_000c);
        w32(&mut cs, BAR0 + 4, 0x80);
        w32(&mut cs, BAR0 + 8, 0xc041);
        w32(&mut cs, BAR0 + 12, 0xfebf_f000);
        // The guest is sizing BAR 3: the register reads the pattern, the
        // programmed address stays.
        w32(&mut cs, BAR0 + 12, 0xffff_ffff);
        cs.write(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        cs.write(INTERRUPT_LINE, &[11]);
        let msi = cs.find_capability(crate::config::CAP_ID_MSI).unwrap();
        w32(&mut cs, msi + MSI_MASK, 0b10);
        cs.set_u32(msi + MSI_PENDING, 0b10);
        cs.set_interrupt_status(true);
        cs
    }

    #[test]
    fn round_trip_reads_the_same_and_keeps_programmed_addresses() {
        let mut src = programmed();
        let state = src.save().unwrap();
        let bytes = to_bytes(&state);
        assert_eq!(&bytes[..8], b"PCICFGSP");
        let decoded: ConfigSpaceState = from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);

        let mut dst = build(&ids());
        assert_ne!(guest_view(&mut dst), guest_view(&mut src));
        dst.restore(&decoded).unwrap();
        assert_eq!(dst.save().unwrap(), state);
        assert_eq!(guest_view(&mut dst), guest_view(&mut src));
        assert_eq!(dst.bar_regions(), src.bar_regions());
        assert_eq!(dst.bar_address(0), Some(0x80_fe00_0000));
        assert_eq!(dst.get_u16(STATUS) & STATUS_INTERRUPT, STATUS_INTERRUPT);
        // BAR 3 was being sized: writing the old address back is no move.
        assert_eq!(w32_move(&mut dst, BAR0 + 12, 0xfebf_f000), None);
        // A guest write after restore moves from the restored address.
        let m = w32_move(&mut dst, BAR0 + 8, 0xc081).unwrap();
        assert_eq!((m.index, m.old, m.new), (2, 0xc040, 0xc080));
        // The masks are the destination's own: read-only bits stay read-only.
        w32(&mut dst, 0, 0);
        assert_eq!(dst.read_u32(0), 0x1041_1af4);
    }

    fn w32_move(cs: &mut ConfigSpace, off: u16, v: u32) -> Option<crate::BarMove> {
        cs.write(off, &v.to_le_bytes())
    }

    #[test]
    fn bridge_round_trip_keeps_bus_numbers_and_windows() {
        let bridge_ids = PciIds {
            class: ClassCode::PCI_BRIDGE,
            ..ids()
        };
        let mut src = ConfigSpace::new(HeaderType::Bridge, &bridge_ids, true);
        w32(&mut src, PRIMARY_BUS, 0x00_05_01_00);
        w32(&mut src, MEMORY_BASE, 0xfe1f_fe00);
        src.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let state = from_bytes(&to_bytes(&src.save().unwrap())).unwrap();
        let mut dst = ConfigSpace::new(HeaderType::Bridge, &bridge_ids, true);
        dst.restore(&state).unwrap();
        assert_eq!(dst.bus_numbers(), Some((1, 5)));
        assert!(dst.bridge_forwards(0xfe10_0000, true));
        assert_eq!(guest_view(&mut dst), guest_view(&mut src));
    }

    #[test]
    fn corrupt_bytes_are_refused() {
        let bytes = to_bytes(&programmed().save().unwrap());
        for n in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
            assert!(
                from_bytes::<ConfigSpaceState>(&bytes[..n]).is_err(),
                "truncated at {n}"
            );
        }
        for i in (0..bytes.len()).step_by(13) {
            for bit in [0, 3, 7] {
                let mut c = bytes.clone();
                c[i] ^= 1 << bit;
                assert!(
                    from_bytes::<ConfigSpaceState>(&c).is_err(),
                    "flip {i}.{bit}"
                );
            }
        }
    }

    /// Seals `body` with a valid header and checksum, as a forger would.
    fn seal(body: Vec<u8>) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&ConfigSpaceState::MAGIC);
        w.u16(ConfigSpaceState::VERSION);
        w.u16(0);
        w.len(body.len());
        w.raw(&body);
        let mut v = w.into_inner();
        let crc = device_state::crc32(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn forged_fields_are_invalid_not_panics() {
        let state = programmed().save().unwrap();
        let mut w = Writer::new();
        state.encode(&mut w);
        let body = w.into_inner();
        // Header type 7.
        let mut b = body.clone();
        b[2] = 7;
        assert!(matches!(
            from_bytes::<ConfigSpaceState>(&seal(b)),
            Err(Error::Invalid(_))
        ));
        // A BAR kind that does not exist (BAR 0's kind byte follows the bytes
        // and its presence byte).
        let mut b = body.clone();
        b[2 + 1 + 4 + 4096 + 1] = 9;
        assert_eq!(
            from_bytes::<ConfigSpaceState>(&seal(b)),
            Err(Error::Invalid("BAR kind 9 is not a BAR kind".into()))
        );
        // Decodable but invalid: restore refuses, the device is untouched.
        let mut dst = build(&ids());
        let before = guest_view(&mut dst);
        for bad in [
            ConfigSpaceState {
                size: 300,
                ..state.clone()
            },
            ConfigSpaceState {
                bytes: state.bytes[..256].to_vec(),
                ..state.clone()
            },
            {
                let mut s = state.clone();
                if let Some(b) = s.bars[0].as_mut() {
                    b.address = 0x1234;
                }
                s
            },
            {
                let mut s = state.clone();
                if let Some(b) = s.bars[3].as_mut() {
                    b.address = 1 << 32;
                }
                s
            },
        ] {
            assert!(
                matches!(dst.restore(&bad), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(guest_view(&mut dst), before);
    }

    fn refused(dst: &mut ConfigSpace, state: &ConfigSpaceState) -> String {
        let before = guest_view(dst);
        let e = dst.restore(state).unwrap_err();
        assert!(matches!(e, Error::Mismatch { .. }), "{e}");
        assert_eq!(guest_view(dst), before, "nothing applied");
        e.to_string()
    }

    #[test]
    fn each_configuration_mismatch_names_the_field() {
        let state = programmed().save().unwrap();
        let other = |f: &dyn Fn(&mut PciIds)| {
            let mut i = ids();
            f(&mut i);
            build(&i)
        };
        let cases: Vec<(ConfigSpace, &str)> = vec![
            (
                ConfigSpace::new(HeaderType::Endpoint, &ids(), false),
                "config space size is 4096 in the saved state but 256",
            ),
            (
                ConfigSpace::new(HeaderType::Bridge, &ids(), true),
                "header type is type 0 (endpoint) in the saved state but type 1 (bridge)",
            ),
            (
                other(&|i| i.vendor_id = 0x8086),
                "vendor id is 0x1af4 in the saved state but 0x8086",
            ),
            (other(&|i| i.device_id = 0x1000), "device id is 0x1041"),
            (other(&|i| i.revision = 2), "revision id is 0x1"),
            (
                other(&|i| i.class = ClassCode::HOST_BRIDGE),
                "class code is 0x20000 in the saved state but 0x60000",
            ),
            (other(&|i| i.subsystem_id = 1), "subsystem id is 0x1100"),
            (
                {
                    let mut cs = build(&ids());
                    cs.set_interrupt_pin(2);
                    cs
                },
                "interrupt pin is 0x1 in the saved state but 0x2",
            ),
            (
                {
                    let mut cs = build(&ids());
                    cs.set_multifunction(true);
                    cs
                },
                "header type register is 0x0 in the saved state but 0x80",
            ),
            (
                {
                    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(), true);
                    cs.set_interrupt_pin(1);
                    cs.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x8000)
                        .unwrap();
                    cs
                },
                "BAR 0 is 64-bit prefetchable memory of 0x4000 bytes in the saved state but 64-bit prefetchable memory of 0x8000 bytes",
            ),
            (
                {
                    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(), true);
                    cs.set_interrupt_pin(1);
                    cs.add_bar(
                        0,
                        BarKind::Memory64 {
                            prefetchable: false,
                        },
                        0x4000,
                    )
                    .unwrap();
                    cs
                },
                "BAR 0 is 64-bit prefetchable memory of 0x4000 bytes in the saved state but 64-bit memory",
            ),
            (
                {
                    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(), true);
                    cs.set_interrupt_pin(1);
                    cs.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x4000)
                        .unwrap();
                    cs
                },
                "BAR 2 is I/O of 0x20 bytes in the saved state but not declared",
            ),
            (
                {
                    let mut cs = ConfigSpace::new(HeaderType::Endpoint, &ids(), true);
                    cs.set_interrupt_pin(1);
                    cs.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x4000)
                        .unwrap();
                    cs.add_bar(2, BarKind::Io, 0x20).unwrap();
                    cs.add_bar(
                        3,
                        BarKind::Memory32 {
                            prefetchable: false,
                        },
                        0x1000,
                    )
                    .unwrap();
                    Msi::add(&mut cs, 4).unwrap();
                    cs
                },
                "capability list is ID 0x10 at 0x40, ID 0x05 at 0x7c in the saved state but ID 0x05 at 0x40",
            ),
        ];
        for (mut dst, expect) in cases {
            let e = refused(&mut dst, &state);
            assert!(e.contains(expect), "{e}\n  does not contain: {expect}");
        }
    }

    #[test]
    fn any_other_read_only_bit_is_a_mismatch_by_offset() {
        let state = programmed().save().unwrap();
        // Same layout, but MSI with 2 vectors: Message Control's read-only
        // Multiple Message Capable differs.
        let mut dst = ConfigSpace::new(HeaderType::Endpoint, &ids(), true);
        dst.set_interrupt_pin(1);
        dst.add_bar(0, BarKind::Memory64 { prefetchable: true }, 0x4000)
            .unwrap();
        dst.add_bar(2, BarKind::Io, 0x20).unwrap();
        dst.add_bar(
            3,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        pcie::add_pcie_capability(&mut dst, &PcieCapConfig::endpoint()).unwrap();
        Msi::add(&mut dst, 2).unwrap();
        let e = refused(&mut dst, &state);
        assert!(
            e.contains("read-only bits of config byte 0x07e (capability ID 0x05 at 0x7c)"),
            "{e}"
        );
        // A forged state that flips a read-only bit of the PCIe capability.
        let mut forged = state.clone();
        forged.bytes[0x44] ^= 0x80;
        let e = refused(&mut build(&ids()), &forged);
        assert!(
            e.contains("read-only bits of config byte 0x044 (capability ID 0x10 at 0x40)"),
            "{e}"
        );
        // Dynamic and writable bits are state, not configuration.
        let mut ok = state.clone();
        ok.bytes[STATUS as usize] ^= STATUS_INTERRUPT as u8;
        ok.bytes[INTERRUPT_LINE as usize] = 5;
        build(&ids()).restore(&ok).unwrap();
    }

    /// Through JSON and back, as a VMM that nests the state in its own
    /// snapshot would.
    #[cfg(feature = "serde")]
    fn via_json(state: &ConfigSpaceState) -> ConfigSpaceState {
        let json = serde_json::to_string(state).unwrap();
        let back: ConfigSpaceState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, state);
        back
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_restores_the_same_function() {
        let mut src = programmed();
        let state = src.save().unwrap();
        let back = via_json(&state);
        let mut dst = build(&ids());
        dst.restore(&back).unwrap();
        assert_eq!(dst.save().unwrap(), state);
        assert_eq!(guest_view(&mut dst), guest_view(&mut src));
        assert_eq!(dst.bar_regions(), src.bar_regions());
        // BAR 3 was being sized: its programmed address came through too.
        assert_eq!(w32_move(&mut dst, BAR0 + 12, 0xfebf_f000), None);

        // A deserialized state is checked as a decoded one: another device ID
        // is refused.
        let mut other = via_json(&state);
        other.bytes[DEVICE_ID as usize] ^= 1;
        assert!(matches!(
            build(&ids()).restore(&other),
            Err(Error::Mismatch { .. })
        ));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trip_keeps_a_bridge() {
        let bridge_ids = PciIds {
            class: ClassCode::PCI_BRIDGE,
            ..ids()
        };
        let mut src = ConfigSpace::new(HeaderType::Bridge, &bridge_ids, true);
        w32(&mut src, PRIMARY_BUS, 0x00_05_01_00);
        w32(&mut src, MEMORY_BASE, 0xfe1f_fe00);
        let back = via_json(&src.save().unwrap());
        let mut dst = ConfigSpace::new(HeaderType::Bridge, &bridge_ids, true);
        dst.restore(&back).unwrap();
        assert_eq!(dst.bus_numbers(), Some((1, 5)));
        assert_eq!(guest_view(&mut dst), guest_view(&mut src));
    }
}
