//! The expansion ROM: hidden by default, or exposed as an emulated ROM BAR
//! over an image ([`RomPolicy`], QEMU's `rombar=` and `romfile=`).
//!
//! Hidden (the default), the ROM register at 0x30 reads 0 and ignores writes:
//! the guest finds no ROM. See the `config` module's table for why.
//!
//! Exposed, the register is emulated and the window it decodes is served from a
//! copy of the image taken when the primary is built, never from the device:
//!
//! - sizing: writing all ones reads back the size mask (address bits 31:11
//!   that the size leaves writable) with the enable bit (bit 0) as written;
//!   bits 10:1 read 0;
//! - the address bits and the enable bit keep what the guest writes;
//! - the window decodes while the enable bit is set, Memory Space is on in the
//!   command register and the address is not 0 ([`RomWindow`],
//!   [`VfioPrimary::rom_window`](crate::VfioPrimary::rom_window));
//! - reads inside a decoding window return the image; reads while it does not
//!   decode return all ones; writes are dropped and counted.
//!
//! The ROM is never mmapped for the guest: its window is trapped, and
//! accesses go to [`PciFunction::read_bar`](vmm_pci::PciFunction::read_bar)
//! with BAR index [`ROM_BAR`] (VFIO's ROM region index, Linux's
//! `PCI_ROM_RESOURCE`, `vmm_pci::ROM_INDEX`). `vmm_pci::PciRoot` routes them
//! itself: the window is the function's
//! [`rom_region`](vmm_pci::PciFunction::rom_region).
//!
//! A VMM that traps MMIO outside the bus learns where the window is as for the
//! mmappable parts of the BARs, by polling a generation counter after config
//! writes ([`VfioPrimary::rom_window`](crate::VfioPrimary::rom_window) and
//! `rom_generation`, like `mmap_ranges` and `mmap_generation`). A ROM move is
//! not returned as a [`vmm_pci::BarMove`] from `write_config`: `BarMove` and
//! [`vmm_pci::BarRegions`] number BAR registers 0 to 5, so a `BarListener`
//! that indexes the function's regions by the move's index would go out of
//! range.

use std::io;
use std::sync::Arc;

use vmm_pci::config::COMMAND_MEMORY;

use crate::ops::{VfioDeviceOps, region};

/// The BAR index the ROM window answers to in
/// [`PciFunction::read_bar`](vmm_pci::PciFunction::read_bar) and `write_bar`.
pub const ROM_BAR: u8 = vmm_pci::ROM_INDEX;
/// The smallest ROM BAR: its address field starts at bit 11.
pub const ROM_MIN_SIZE: u64 = 2 * 1024;
/// The largest image accepted.
pub const ROM_MAX_SIZE: u64 = 16 * 1024 * 1024;
/// The ROM register's enable bit.
pub const ROM_ENABLE: u32 = 1;
/// The ROM register's address bits.
const ROM_ADDRESS_MASK: u32 = !(ROM_MIN_SIZE as u32 - 1);

/// What the guest sees of the device's expansion ROM.
///
/// Exposing a ROM on a failover primary needs the same ROM on the source and
/// the destination: see the `config` module's table.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RomPolicy {
    /// No ROM: the ROM register reads 0 and ignores writes (the default;
    /// QEMU's `rombar=0`).
    #[default]
    Hidden,
    /// The device's own ROM, read once through VFIO's ROM region
    /// ([`region::ROM`]) when the primary is built (QEMU's `rombar=1`).
    Device,
    /// An image the VMM supplies (QEMU's `romfile=`): padded with 0xff to a
    /// power of two of at least 2 KiB; at most 16 MiB.
    Image(Arc<[u8]>),
}

impl std::fmt::Debug for RomPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RomPolicy::Hidden => f.write_str("Hidden"),
            RomPolicy::Device => f.write_str("Device"),
            RomPolicy::Image(b) => write!(f, "Image({} bytes)", b.len()),
        }
    }
}

/// Errors preparing the ROM image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The supplied image has no bytes.
    #[error(
        "the ROM image is empty: supply the option ROM's bytes, or use RomPolicy::Hidden for no ROM"
    )]
    Empty,
    /// The image, or the device's ROM, is larger than [`ROM_MAX_SIZE`].
    #[error(
        "the ROM {what} is {size} bytes; at most 16 MiB (16777216 bytes) is accepted: check that the file is an option ROM"
    )]
    TooLarge {
        /// "image" or "region".
        what: &'static str,
        /// Its size in bytes.
        size: u64,
    },
    /// [`RomPolicy::Device`] on a device VFIO reports no ROM for.
    #[error(
        "RomPolicy::Device: the device has no expansion ROM (VFIO's ROM region is absent or empty; SR-IOV VFs have none): use RomPolicy::Hidden, or supply an image with RomPolicy::Image"
    )]
    NoDeviceRom,
    /// Reading the device's ROM through VFIO failed.
    #[error(
        "RomPolicy::Device: reading the device's {size}-byte ROM through VFIO failed; the ROM may be unreadable on this device (try RomPolicy::Hidden or a ROM image)"
    )]
    Read {
        /// The ROM region's size.
        size: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// The padded size of an image of `len` bytes.
fn padded_size(len: u64) -> u64 {
    len.next_power_of_two().max(ROM_MIN_SIZE)
}

/// Checks and pads an image: a power of two of at least 2 KiB, 0xff after
/// the supplied bytes.
fn pad(bytes: &[u8], what: &'static str) -> Result<Box<[u8]>, Error> {
    if bytes.is_empty() {
        return Err(Error::Empty);
    }
    let len = bytes.len() as u64;
    if len > ROM_MAX_SIZE {
        return Err(Error::TooLarge { what, size: len });
    }
    let mut image = vec![0xffu8; padded_size(len) as usize];
    image[..bytes.len()].copy_from_slice(bytes);
    Ok(image.into_boxed_slice())
}

/// The ROM image a policy yields, or `None` for [`RomPolicy::Hidden`].
pub(crate) fn load(policy: &RomPolicy, dev: &dyn VfioDeviceOps) -> Result<Option<RomBar>, Error> {
    let image = match policy {
        RomPolicy::Hidden => return Ok(None),
        RomPolicy::Image(bytes) => pad(bytes, "image")?,
        RomPolicy::Device => {
            let info = dev
                .region_info(region::ROM)
                .filter(|i| i.size > 0 && i.read)
                .ok_or(Error::NoDeviceRom)?;
            if info.size > ROM_MAX_SIZE {
                return Err(Error::TooLarge {
                    what: "region",
                    size: info.size,
                });
            }
            let mut bytes = vec![0u8; info.size as usize];
            dev.region_read(region::ROM, 0, &mut bytes)
                .map_err(|source| Error::Read {
                    size: info.size,
                    source,
                })?;
            pad(&bytes, "region")?
        }
    };
    Ok(Some(RomBar::new(image)))
}

/// Where the ROM window decodes now: `size` bytes at guest physical
/// `guest_address`. The VMM traps it and routes accesses to
/// [`PciFunction::read_bar`](vmm_pci::PciFunction::read_bar) (and
/// `write_bar`) with BAR [`ROM_BAR`] and the offset into the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RomWindow {
    /// Guest physical address.
    pub guest_address: u64,
    /// Bytes (a power of two of at least 2 KiB).
    pub size: u64,
}

/// The emulated ROM BAR over an image.
#[derive(Clone)]
pub(crate) struct RomBar {
    image: Box<[u8]>,
    /// The register as the guest wrote it, masked to the writable bits.
    register: u32,
}

impl std::fmt::Debug for RomBar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RomBar")
            .field("size", &self.image.len())
            .field("register", &format_args!("{:#x}", self.register))
            .finish()
    }
}

impl RomBar {
    fn new(image: Box<[u8]>) -> RomBar {
        if image.get(..2) != Some(&[0x55, 0xaa][..]) {
            log::warn!(
                "the expansion ROM image does not start with the 55 AA signature; the guest's firmware will ignore it"
            );
        }
        RomBar { image, register: 0 }
    }

    /// The window's size.
    pub fn size(&self) -> u64 {
        self.image.len() as u64
    }

    /// The bits of the register the guest can set.
    fn writable(&self) -> u32 {
        (!(self.size() as u32 - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE
    }

    /// Byte `at` (0 to 3) of the register.
    pub fn register_byte(&self, at: usize) -> u8 {
        self.register.to_le_bytes().get(at).copied().unwrap_or(0)
    }

    /// The address the register holds (the enable bit aside).
    pub fn address(&self) -> u64 {
        (self.register & !ROM_ENABLE) as u64
    }

    /// A write of `data` at byte `at` of the register.
    pub fn write_register(&mut self, at: usize, data: &[u8]) {
        let mut bytes = self.register.to_le_bytes();
        for (k, &b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(at + k) {
                *slot = b;
            }
        }
        self.register = u32::from_le_bytes(bytes) & self.writable();
    }

    /// The window, when it decodes under `command`.
    pub fn window(&self, command: u16) -> Option<RomWindow> {
        let on = self.register & ROM_ENABLE != 0 && command & COMMAND_MEMORY != 0;
        (on && self.address() != 0).then(|| RomWindow {
            guest_address: self.address(),
            size: self.size(),
        })
    }

    /// Reads `data.len()` bytes of the image at `offset`; `false` when the
    /// access is not 1, 2, 4 or 8 bytes inside the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let ok = matches!(data.len(), 1 | 2 | 4 | 8);
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.image.get(o..o.checked_add(data.len())?));
        match src {
            Some(src) if ok => {
                data.copy_from_slice(src);
                true
            }
            _ => false,
        }
    }

    /// Back to power-on: disabled, address 0.
    pub fn reset(&mut self) {
        self.register = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(len: usize) -> RomBar {
        let mut b = vec![0u8; len];
        b[0] = 0x55;
        b[1] = 0xaa;
        RomBar::new(pad(&b, "image").unwrap())
    }

    fn reg(r: &RomBar) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| r.register_byte(i)))
    }

    #[test]
    fn images_are_padded_to_a_power_of_two_of_at_least_2k() {
        assert_eq!(pad(&[0x55], "image").unwrap().len(), 2048);
        let p = pad(&[0x55, 0xaa, 7], "image").unwrap();
        assert_eq!(&p[..4], &[0x55, 0xaa, 7, 0xff]);
        assert!(p[3..].iter().all(|&b| b == 0xff));
        assert_eq!(pad(&vec![0; 2049], "image").unwrap().len(), 4096);
        assert_eq!(pad(&vec![0; 65536], "image").unwrap().len(), 65536);
        let max = vec![0u8; ROM_MAX_SIZE as usize];
        assert_eq!(pad(&max, "image").unwrap().len() as u64, ROM_MAX_SIZE);
    }

    #[test]
    fn bad_images_are_refused_with_what_to_do() {
        let e = pad(&[], "image").unwrap_err();
        assert!(matches!(e, Error::Empty));
        assert!(e.to_string().contains("RomPolicy::Hidden"));
        let big = vec![0u8; ROM_MAX_SIZE as usize + 1];
        let e = pad(&big, "image").unwrap_err();
        assert!(matches!(
            e,
            Error::TooLarge {
                what: "image",
                size
            } if size == ROM_MAX_SIZE + 1
        ));
        assert!(e.to_string().contains("16 MiB"), "{e}");
    }

    #[test]
    fn sizing_address_and_enable() {
        let mut r = bar(0x10000);
        assert_eq!(reg(&r), 0);
        r.write_register(0, &u32::MAX.to_le_bytes());
        assert_eq!(reg(&r), 0xffff_0001, "size mask, enable as written");
        r.write_register(0, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(reg(&r), 0xffff_0000);
        // Low address bits below the size, and bits 10:1, read 0.
        r.write_register(0, &0xfeb1_27ffu32.to_le_bytes());
        assert_eq!(reg(&r), 0xfeb1_0001);
        assert_eq!(r.address(), 0xfeb1_0000);
        // A 2 KiB ROM keeps every address bit from 11 up.
        let mut small = bar(16);
        small.write_register(0, &u32::MAX.to_le_bytes());
        assert_eq!(reg(&small), 0xffff_f801);
        // Byte writes: the enable bit alone, then the top byte.
        r.write_register(0, &[0x00]);
        assert_eq!(reg(&r), 0xfeb1_0000);
        r.write_register(3, &[0xc0]);
        assert_eq!(reg(&r), 0xc0b1_0000);
        r.write_register(2, &[0x12, 0x34, 0x56]);
        assert_eq!(reg(&r), 0x3412_0000, "bytes past the register ignored");
    }

    #[test]
    fn the_window_needs_enable_memory_and_an_address() {
        let mut r = bar(0x800);
        r.write_register(0, &0xfe00_0000u32.to_le_bytes());
        assert_eq!(r.window(COMMAND_MEMORY), None, "not enabled");
        r.write_register(0, &0xfe00_0001u32.to_le_bytes());
        assert_eq!(r.window(0), None, "memory decode off");
        assert_eq!(
            r.window(COMMAND_MEMORY),
            Some(RomWindow {
                guest_address: 0xfe00_0000,
                size: 0x800
            })
        );
        r.write_register(0, &ROM_ENABLE.to_le_bytes());
        assert_eq!(r.window(COMMAND_MEMORY), None, "address 0");
        r.reset();
        assert_eq!(reg(&r), 0);
    }

    #[test]
    fn reads_inside_the_image_only() {
        let r = bar(0x800);
        let mut b = [0u8; 2];
        assert!(r.read(0, &mut b));
        assert_eq!(b, [0x55, 0xaa]);
        let mut q = [0u8; 8];
        assert!(r.read(0x7f8, &mut q));
        assert!(!r.read(0x7fc, &mut q), "past the end");
        assert!(!r.read(u64::MAX, &mut b));
        assert!(!r.read(0, &mut [0u8; 3]), "3 bytes");
    }
}
