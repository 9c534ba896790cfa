//! What can go wrong saving, decoding or restoring a state.

use std::fmt::Display;

/// Errors of the state contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes are not a saved state of the expected type.
    #[error("not a saved {expected} (bad magic)")]
    BadMagic {
        /// The type that was expected, from its magic.
        expected: String,
    },
    /// Written by a format version this build does not read.
    #[error("saved {what} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The state type.
        what: String,
        /// The version in the bytes.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The bytes end before the named field.
    #[error("the saved state is truncated: {0} needs more bytes than remain")]
    Truncated(&'static str),
    /// The checksum does not match.
    #[error("the saved state is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Computed over the bytes.
        expected: u32,
        /// Stored in the bytes.
        found: u32,
    },
    /// Bytes follow the state.
    #[error("{0} unexpected bytes follow the saved state")]
    TrailingBytes(usize),
    /// A field holds a value no device could have saved.
    #[error("the saved state is invalid: {0}")]
    Invalid(String),
    /// The state was saved from a device configured differently from the one it
    /// is restored onto. Build the destination device with the source's
    /// configuration.
    #[error(
        "the saved state does not fit this device: {field} is {saved} in the saved state but {device} on this device"
    )]
    Mismatch {
        /// What differs, in words (`"queue 1 maximum size"`).
        field: String,
        /// Its value in the saved state.
        saved: String,
        /// Its value on the device being restored.
        device: String,
    },
    /// The device cannot be saved right now; the text says why and what to wait
    /// for.
    #[error("the device cannot be saved now: {0}")]
    Busy(String),
    /// The device refused the state for a reason of its own.
    #[error("the device refused the saved state: {0}")]
    Refused(String),
}

impl Error {
    /// [`Error::Mismatch`] unless `saved == device`.
    pub fn check<T: PartialEq + Display>(field: &str, saved: T, device: T) -> Result<()> {
        if saved == device {
            Ok(())
        } else {
            Err(Error::Mismatch {
                field: field.to_string(),
                saved: saved.to_string(),
                device: device.to_string(),
            })
        }
    }

    /// [`Error::Mismatch`] for a value shown in hexadecimal.
    pub fn check_hex<T: PartialEq + std::fmt::LowerHex>(
        field: &str,
        saved: T,
        device: T,
    ) -> Result<()> {
        if saved == device {
            Ok(())
        } else {
            Err(Error::Mismatch {
                field: field.to_string(),
                saved: format!("{saved:#x}"),
                device: format!("{device:#x}"),
            })
        }
    }
}

/// Result of state operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_the_field_and_both_values() {
        assert_eq!(Error::check("queue count", 3u16, 3), Ok(()));
        let e = Error::check("queue count", 3u16, 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the saved state does not fit this device: queue count is 3 in the saved state but 5 on this device"
        );
        let e = Error::check_hex("vendor id", 0x8086u16, 0x1af4).unwrap_err();
        assert!(e.to_string().contains("0x8086") && e.to_string().contains("0x1af4"));
    }
}
