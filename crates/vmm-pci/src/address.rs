//! Bus/device/function addresses and ECAM (enhanced configuration access) offsets.

use std::fmt;

/// A PCI function address: bus, device (0..32) and function (0..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl Bdf {
    /// A function address; `device` and `function` are masked to 5 and 3 bits.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Bdf {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }

    /// Splits an offset into an ECAM window into the function it addresses and the
    /// config register within that function (0..4096). Offsets past the 256 buses an
    /// ECAM window covers return `None`.
    pub const fn from_ecam_offset(offset: u64) -> Option<(Bdf, u16)> {
        if offset >= 1 << 28 {
            return None;
        }
        let bdf = Bdf::new(
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
        );
        Some((bdf, (offset & 0xfff) as u16))
    }

    /// The 16-bit routing ID (`bus << 8 | device << 3 | function`).
    pub const fn routing_id(self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The offset of config register `register` of `bdf` in an ECAM window.
pub const fn ecam_offset(bdf: Bdf, register: u16) -> u64 {
    (bdf.bus as u64) << 20
        | (bdf.device as u64) << 15
        | (bdf.function as u64) << 12
        | (register & 0xfff) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecam_round_trip() {
        let bdf = Bdf::new(3, 31, 7);
        let off = ecam_offset(bdf, 0xffc);
        assert_eq!(off, 3 << 20 | 31 << 15 | 7 << 12 | 0xffc);
        assert_eq!(Bdf::from_ecam_offset(off), Some((bdf, 0xffc)));
        assert_eq!(Bdf::from_ecam_offset(1 << 28), None);
        assert_eq!(bdf.to_string(), "03:1f.7");
        assert_eq!(bdf.routing_id(), 0x03ff);
        assert_eq!(Bdf::new(0, 0x25, 9), Bdf::new(0, 5, 1));
    }
}
