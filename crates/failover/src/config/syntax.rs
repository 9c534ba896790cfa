//! The syntax of the values a configuration spells as strings: device ids
//! (aliases), MAC addresses, and where a host function is (a PCI address or
//! its sysfs directory).

use std::fmt;
use std::path::PathBuf;

use vmm_pci::Bdf;

use crate::event::MacAddress;

/// Where Linux lists the PCI functions by address.
const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A host PCI function as Linux names it: domain, bus, device, function
/// (`0000:3b:02.1`), what a hostdev interface's `source` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostFunction {
    /// The PCI domain (segment): 0 on most hosts; Intel VMD domains start at
    /// 0x10000.
    pub domain: u32,
    /// Bus, device and function.
    pub bdf: Bdf,
}

impl HostFunction {
    /// The function's directory under `/sys/bus/pci/devices`, what
    /// `vfio_primary` opens.
    pub fn sysfs_path(&self) -> PathBuf {
        PathBuf::from(SYSFS_PCI_DEVICES).join(self.to_string())
    }
}

impl fmt::Display for HostFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{}", self.domain, self.bdf)
    }
}

/// Whether `alias` is a device id: a letter, then letters, digits, `-`, `.`
/// and `_` (QEMU's rule for `id=`; libvirt's user aliases, `ua-net1`, fit it).
pub(crate) fn alias_well_formed(alias: &str) -> bool {
    let mut chars = alias.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parses a unicast MAC address, `52:54:00:12:34:56` (either case). The error
/// says what is wrong, as the end of a sentence about the value.
pub(crate) fn parse_mac(s: &str) -> Result<MacAddress, String> {
    let parts: Vec<&str> = s.split(':').take(7).collect();
    if parts.len() != 6 {
        let n = if parts.len() == 7 {
            "more than 6".to_string()
        } else {
            parts.len().to_string()
        };
        return Err(format!("has {n} ':'-separated parts, not 6"));
    }
    let mut b = [0u8; 6];
    for (byte, part) in b.iter_mut().zip(&parts) {
        *byte = hex_byte(part).ok_or_else(|| {
            format!(
                "has '{}' where a two-digit hex byte belongs",
                part.escape_debug()
            )
        })?;
    }
    if b[0] & 1 != 0 {
        return Err(format!(
            "is a multicast address (its first byte, {:02x}, is odd); a NIC needs a unicast MAC",
            b[0]
        ));
    }
    Ok(MacAddress(b))
}

/// Two hex digits, nothing else (no sign, no space).
fn hex_byte(s: &str) -> Option<u8> {
    let d = s.as_bytes();
    if d.len() != 2 {
        return None;
    }
    Some(hex_digit(d[0])? << 4 | hex_digit(d[1])?)
}

fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Parses `n` to `max_digits` hex digits (at least `min_digits`).
fn hex_field(s: &str, min_digits: usize, max_digits: usize) -> Option<u32> {
    if s.len() < min_digits || s.len() > max_digits || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Parses a PCI address, `0000:3b:02.1` or `3b:02.1` (domain 0). With
/// `need_domain`, the domain must be written (as sysfs names do).
fn parse_address(s: &str, need_domain: bool) -> Option<HostFunction> {
    let (rest, function) = s.rsplit_once('.')?;
    let function = match function.as_bytes() {
        [c @ b'0'..=b'7'] => c - b'0',
        _ => return None,
    };
    let mut parts = rest.rsplitn(3, ':');
    let device = hex_field(parts.next()?, 2, 2).filter(|&d| d < 32)?;
    let bus = hex_field(parts.next()?, 2, 2)?;
    let domain = match parts.next() {
        // Linux prints 4 digits; VMD domains (0x10000 and up) take 5.
        Some(d) => hex_field(d, 4, 8)?,
        None if need_domain => return None,
        None => 0,
    };
    // Both fields were checked to fit in 8 bits (bus: two digits; device < 32).
    let bdf = Bdf::new(
        u8::try_from(bus).ok()?,
        u8::try_from(device).ok()?,
        function,
    );
    Some(HostFunction { domain, bdf })
}

/// What a hostdev's `source` names: the function's address and, when the
/// source was a sysfs path, that path as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub(crate) function: HostFunction,
    pub(crate) sysfs: PathBuf,
}

/// Parses a hostdev `source`: a sysfs directory of a PCI function
/// (`/sys/bus/pci/devices/0000:3b:02.1`, or its `/sys/devices/...` path),
/// or a PCI address (`0000:3b:02.1`, `3b:02.1`). The error says what is
/// wrong, as the end of a sentence about the value.
pub(crate) fn parse_source(s: &str) -> Result<Source, &'static str> {
    if s.starts_with('/') {
        if !s.starts_with("/sys/") {
            return Err("is a path outside /sys");
        }
        let trimmed = s.trim_end_matches('/');
        if trimmed.split('/').any(|c| c == ".." || c == ".") {
            return Err("is a sysfs path with '.' or '..' in it");
        }
        let last = trimmed.rsplit('/').next().unwrap_or("");
        let function = parse_address(last, true)
            .ok_or("is a sysfs path that does not end in a PCI function's address")?;
        return Ok(Source {
            function,
            sysfs: PathBuf::from(trimmed),
        });
    }
    let function = parse_address(s, false)
        .ok_or("is neither a sysfs path (it does not start with /sys/) nor a PCI address")?;
    Ok(Source {
        function,
        sysfs: function.sysfs_path(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        for ok in ["net1", "ua-net1", "hostdev0", "a.b_c-d", "N"] {
            assert!(alias_well_formed(ok), "{ok}");
        }
        for bad in ["", "1net", "-net", "net 1", "net/1", "nét", "net1\n"] {
            assert!(!alias_well_formed(bad), "{bad:?}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5F"),
            Ok(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x5f]))
        );
        assert_eq!(
            parse_mac("52:54:00:12:34").unwrap_err(),
            "has 5 ':'-separated parts, not 6"
        );
        assert_eq!(
            parse_mac("52:54:00:12:34:56:78:9a").unwrap_err(),
            "has more than 6 ':'-separated parts, not 6"
        );
        assert!(parse_mac("52:54:00:12:34:5g").unwrap_err().contains("'5g'"));
        // No sign, no single digit, no dashes.
        assert!(parse_mac("+2:54:00:12:34:56").is_err());
        assert!(parse_mac("2:54:00:12:34:56").is_err());
        assert!(parse_mac("52-54-00-12-34-56").is_err());
        assert!(parse_mac("").is_err());
        assert!(
            parse_mac("01:00:5e:00:00:01")
                .unwrap_err()
                .contains("multicast")
        );
        // Multi-byte characters never split inside a character.
        assert!(parse_mac("é:54:00:12:34:56").is_err());
        assert!(parse_mac("5é:54:00:12:34:56").is_err());
    }

    #[test]
    fn sources() {
        let f = parse_source("0000:3b:02.1").unwrap();
        assert_eq!(f.function.to_string(), "0000:3b:02.1");
        assert_eq!(f.sysfs, PathBuf::from("/sys/bus/pci/devices/0000:3b:02.1"));
        let short = parse_source("3b:02.1").unwrap();
        assert_eq!(short.function, f.function);
        let vmd = parse_source("10000:e1:00.0").unwrap();
        assert_eq!(vmd.function.domain, 0x10000);

        let p = parse_source("/sys/bus/pci/devices/0000:3b:02.1/").unwrap();
        assert_eq!(p.function, f.function);
        assert_eq!(p.sysfs, PathBuf::from("/sys/bus/pci/devices/0000:3b:02.1"));
        let long = parse_source("/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:02.1").unwrap();
        assert_eq!(long.function, f.function);
        assert_eq!(
            long.sysfs,
            PathBuf::from("/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:02.1")
        );

        for bad in [
            "",
            "3b:02.8",
            "3b:20.1",
            "3b:2.1",
            "03b:02.1",
            "000:3b:02.1",
            "0000:3b:02",
            "0000:3b:02.1.1",
            "eth0",
            "/dev/vfio/12",
            "/sys/bus/pci/devices/3b:02.1",
            "/sys/bus/pci/devices/../0000:3b:02.1",
            "/sys/",
            "/sys",
            "0000:3b:0é.1",
        ] {
            assert!(parse_source(bad).is_err(), "{bad:?}");
        }
    }
}
