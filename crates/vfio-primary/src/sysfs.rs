//! A PCI function's sysfs directory, as VFIO needs it: before anything is opened
//! under `/dev/vfio`, this says which IOMMU group the function is in, who else is
//! in that group, which drivers they are bound to, and whether the group is
//! *viable* (usable by VFIO), with an error naming every device in the way.
//!
//! What is read, relative to a function's directory (normally
//! `/sys/bus/pci/devices/<address>`, e.g. `/sys/bus/pci/devices/0000:3b:02.1`):
//!
//! | path | what it gives |
//! |---|---|
//! | `iommu_group` (symlink to `.../kernel/iommu_groups/<n>`) | the group number `n` |
//! | `iommu_group/devices/*` | the group's members, by address |
//! | `<member>/driver` (symlink to `.../drivers/<name>`) | the member's driver, or none when absent |
//! | `vendor`, `device`, `class` (`0x8086`, `0x154c`, `0x020000`) | identity, for messages |
//! | `config` byte `0x0e` (header type), else `class` | whether a member is a bridge |
//!
//! Nothing here needs privileges: these files are world-readable. The sysfs root
//! is a parameter ([`PciSysfsDevice::from_address`]) or implied by the path given
//! ([`PciSysfsDevice::new`]), so tests run against a fake tree.
//!
//! # Viability
//!
//! The kernel's rule (Documentation/driver-api/vfio.rst and `drivers/vfio`): a
//! group is viable when every device in it is
//!
//! - bound to a VFIO bus driver (`vfio-pci`, or a vendor variant driver such as
//!   `mlx5_vfio_pci`),
//! - bound to `pci-stub` (which claims a device without using it), or
//! - not bound to any driver;
//!
//! PCI bridges (a header type other than 0) are allowed whatever their driver,
//! since isolation on PCI puts every device below a bridge in the bridge's group.
//! [`IommuGroup::is_viable`] applies this rule to what sysfs shows. The kernel has
//! the last word when the group is opened; this check exists to fail early with a
//! message that names the devices to rebind.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The driver a function must be bound to for VFIO to open it.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// The stub driver the kernel accepts in a viable group.
pub const PCI_STUB_DRIVER: &str = "pci-stub";

/// Errors from reading a function's sysfs directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is not a PCI function's sysfs directory.
    #[error(
        "no PCI function at {path}: {source}; pass the function's sysfs directory, \
         e.g. /sys/bus/pci/devices/0000:3b:02.1 (see `lspci -D`)"
    )]
    NoDevice {
        /// The path given.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },

    /// The function has no `iommu_group` link: the host runs without an IOMMU.
    #[error(
        "{address} is in no IOMMU group ({path} does not exist): the IOMMU is off; enable \
         VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    )]
    NoIommuGroup {
        /// The function's PCI address.
        address: String,
        /// The missing link.
        path: PathBuf,
    },

    /// A sysfs file or link could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or link.
        path: PathBuf,
        /// The error from the read.
        #[source]
        source: io::Error,
    },

    /// A sysfs file or link held something other than what the kernel writes there.
    #[error("unexpected contents in {path}: {found:?} (expected {expected})")]
    Parse {
        /// The file or link.
        path: PathBuf,
        /// What it held.
        found: String,
        /// What it should have held.
        expected: &'static str,
    },

    /// Some member of the group is bound to a driver VFIO does not accept.
    #[error(
        "IOMMU group {group} is not viable: {}; bind them to vfio-pci or unbind them",
        describe_offenders(.offenders)
    )]
    NotViable {
        /// The group number.
        group: u32,
        /// Every member in the way, in address order.
        offenders: Vec<GroupMember>,
    },

    /// The group is viable but the function itself is not bound to a VFIO driver,
    /// so VFIO cannot hand it out.
    #[error(
        "{address} ({ids}) is {}, not to vfio-pci, so VFIO cannot open it; bind it: \
         `echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override`, then \
         `echo {address} > /sys/bus/pci/drivers_probe` (unbinding it from its driver first)",
        describe_driver(.driver.as_deref())
    )]
    NotBoundToVfio {
        /// The function's PCI address.
        address: String,
        /// The function's vendor/device/class.
        ids: PciIds,
        /// Its driver, if any.
        driver: Option<String>,
    },
}

fn describe_driver(driver: Option<&str>) -> String {
    match driver {
        Some(d) => format!("bound to {d}"),
        None => "bound to no driver".to_owned(),
    }
}

fn describe_offenders(offenders: &[GroupMember]) -> String {
    offenders
        .iter()
        .map(|m| format!("{} is {}", m.address, describe_driver(m.driver.as_deref())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A function's vendor, device and class, as sysfs shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID (`vendor`).
    pub vendor: u16,
    /// Device ID (`device`).
    pub device: u16,
    /// Class code: base class, subclass, programming interface (`class`).
    pub class: u32,
}

impl fmt::Display for PciIds {
    /// `8086:154c, class 020000`, as `lspci -n` would show them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x}, class {:06x}",
            self.vendor, self.device, self.class
        )
    }
}

/// One device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Its address, the name in `iommu_group/devices` (`0000:3b:02.0`).
    pub address: String,
    /// The driver it is bound to, or `None`.
    pub driver: Option<String>,
    /// Whether it is a PCI bridge (allowed in a viable group with any driver).
    pub bridge: bool,
}

impl GroupMember {
    /// Whether this member keeps its group viable: see the [module docs](self).
    pub fn allows_vfio(&self) -> bool {
        self.bridge
            || match self.driver.as_deref() {
                None => true,
                Some(d) => d == PCI_STUB_DRIVER || is_vfio_driver(d),
            }
    }
}

/// Whether `driver` is a VFIO bus driver for PCI: `vfio-pci` or a vendor variant
/// of it (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`, `virtio-vfio-pci`, ...).
pub fn is_vfio_driver(driver: &str) -> bool {
    driver == VFIO_PCI_DRIVER || driver.ends_with("vfio_pci") || driver.ends_with("-vfio-pci")
}

/// An IOMMU group and its members, as sysfs showed them when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuGroup {
    /// The group number: `/dev/vfio/<id>` once a member is bound to vfio-pci.
    pub id: u32,
    /// Every device in the group (the function itself included), in address order.
    pub members: Vec<GroupMember>,
}

impl IommuGroup {
    /// The members that make the group unusable by VFIO.
    pub fn offenders(&self) -> impl Iterator<Item = &GroupMember> {
        self.members.iter().filter(|m| !m.allows_vfio())
    }

    /// Whether VFIO can use the group: see the [module docs](self).
    pub fn is_viable(&self) -> bool {
        self.offenders().next().is_none()
    }

    /// `Ok(())` if the group is viable, else [`Error::NotViable`] listing every
    /// member in the way.
    pub fn check_viable(&self) -> Result<(), Error> {
        let offenders: Vec<GroupMember> = self.offenders().cloned().collect();
        if offenders.is_empty() {
            Ok(())
        } else {
            Err(Error::NotViable {
                group: self.id,
                offenders,
            })
        }
    }
}

/// One PCI function's sysfs directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSysfsDevice {
    path: PathBuf,
    address: String,
}

impl PciSysfsDevice {
    /// The function whose sysfs directory is `path` (e.g.
    /// `/sys/bus/pci/devices/0000:3b:02.1`); its address is the last component.
    /// Fails with [`Error::NoDevice`] if `path` is not a directory.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::NoDevice {
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                    path,
                });
            }
            Err(source) => return Err(Error::NoDevice { path, source }),
        }
        let address = match path.file_name().and_then(|n| n.to_str()) {
            Some(a) => a.to_owned(),
            None => {
                return Err(Error::NoDevice {
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the path does not end in a PCI address",
                    ),
                    path,
                });
            }
        };
        Ok(Self { path, address })
    }

    /// The function at PCI address `address` (`0000:3b:02.1`) under the sysfs
    /// mounted at `sysfs_root` (`/sys` on a host): `<root>/bus/pci/devices/<address>`.
    pub fn from_address(sysfs_root: &Path, address: &str) -> Result<Self, Error> {
        Self::new(sysfs_root.join("bus/pci/devices").join(address))
    }

    /// The directory, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The PCI address (`0000:3b:02.1`): the name VFIO knows the device by.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The IOMMU group number, from the `iommu_group` link.
    pub fn iommu_group_id(&self) -> Result<u32, Error> {
        let link = self.path.join("iommu_group");
        let target = match fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoIommuGroup {
                    address: self.address.clone(),
                    path: link,
                });
            }
            Err(source) => return Err(Error::Read { path: link, source }),
        };
        target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Parse {
                path: link,
                found: target.display().to_string(),
                expected: "a link to .../iommu_groups/<number>",
            })
    }

    /// The driver the function is bound to (the `driver` link's last component),
    /// or `None` when it is bound to none.
    pub fn driver(&self) -> Result<Option<String>, Error> {
        driver_of(&self.path)
    }

    /// Vendor, device and class.
    pub fn ids(&self) -> Result<PciIds, Error> {
        ids_of(&self.path)
    }

    /// The function's IOMMU group and every member's driver.
    pub fn iommu_group(&self) -> Result<IommuGroup, Error> {
        let id = self.iommu_group_id()?;
        let dir = self.path.join("iommu_group/devices");
        let entries = fs::read_dir(&dir).map_err(|source| Error::Read {
            path: dir.clone(),
            source,
        })?;
        let mut members = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(address) = name.to_str() else {
                return Err(Error::Parse {
                    path: entry.path(),
                    found: name.to_string_lossy().into_owned(),
                    expected: "a device name",
                });
            };
            let path = entry.path();
            members.push(GroupMember {
                address: address.to_owned(),
                driver: driver_of(&path)?,
                bridge: is_bridge(&path),
            });
        }
        members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(IommuGroup { id, members })
    }

    /// Reads the group and checks that VFIO can use it: [`Error::NotViable`]
    /// names every member in the way and its driver.
    pub fn check_viable(&self) -> Result<IommuGroup, Error> {
        let group = self.iommu_group()?;
        group.check_viable()?;
        Ok(group)
    }

    /// Everything VFIO needs before the group is opened: the group is viable
    /// and the function itself is bound to a VFIO driver
    /// ([`Error::NotBoundToVfio`] otherwise). Returns the group.
    pub fn check_ready_for_vfio(&self) -> Result<IommuGroup, Error> {
        let group = self.check_viable()?;
        let driver = self.driver()?;
        if !driver.as_deref().is_some_and(is_vfio_driver) {
            return Err(Error::NotBoundToVfio {
                address: self.address.clone(),
                ids: self.ids()?,
                driver,
            });
        }
        Ok(group)
    }
}

fn driver_of(device_dir: &Path) -> Result<Option<String>, Error> {
    let link = device_dir.join("driver");
    match fs::read_link(&link) {
        Ok(target) => match target.file_name().and_then(|n| n.to_str()) {
            Some(name) => Ok(Some(name.to_owned())),
            None => Err(Error::Parse {
                path: link,
                found: target.display().to_string(),
                expected: "a link to .../drivers/<name>",
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path: link, source }),
    }
}

fn read_hex(path: PathBuf) -> Result<u32, Error> {
    let text = fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let t = text.trim();
    t.strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or(Error::Parse {
            path,
            found: t.to_owned(),
            expected: "a hexadecimal number like 0x8086",
        })
}

fn read_hex16(path: PathBuf) -> Result<u16, Error> {
    let v = read_hex(path.clone())?;
    u16::try_from(v).map_err(|_| Error::Parse {
        path,
        found: format!("{v:#x}"),
        expected: "a 16-bit ID",
    })
}

fn ids_of(dir: &Path) -> Result<PciIds, Error> {
    Ok(PciIds {
        vendor: read_hex16(dir.join("vendor"))?,
        device: read_hex16(dir.join("device"))?,
        class: read_hex(dir.join("class"))?,
    })
}

/// Header type other than 0 (config byte 0x0e, multi-function bit masked),
/// as the kernel decides; the class code when `config` cannot be read.
fn is_bridge(dir: &Path) -> bool {
    if let Ok(config) = fs::read(dir.join("config")) {
        if let Some(header) = config.get(0x0e) {
            return header & 0x7f != 0;
        }
    }
    // PCI-to-PCI (0x0604), CardBus (0x0607), semi-transparent PCI-to-PCI (0x0609).
    read_hex(dir.join("class"))
        .map(|c| matches!(c >> 8, 0x0604 | 0x0607 | 0x0609))
        .unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake sysfs tree in a fresh temporary directory, laid out like the real
    /// one (relative symlinks included); removed on drop.
    pub(crate) struct FakeSysfs {
        pub(crate) root: PathBuf,
    }

    /// One device to put in a [`FakeSysfs`].
    #[derive(Clone, Copy)]
    pub(crate) struct FakeDev<'a> {
        pub(crate) address: &'a str,
        pub(crate) group: Option<u32>,
        pub(crate) driver: Option<&'a str>,
        pub(crate) ids: (u16, u16, u32),
        /// Header type byte; `None` writes no `config` file.
        pub(crate) header: Option<u8>,
    }

    impl<'a> FakeDev<'a> {
        pub(crate) fn vf(
            address: &'a str,
            group: u32,
            driver: Option<&'static str>,
        ) -> FakeDev<'a> {
            FakeDev {
                address,
                group: Some(group),
                driver,
                ids: (0x8086, 0x154c, 0x020000),
                header: Some(0x00),
            }
        }
    }

    impl FakeSysfs {
        pub(crate) fn new(devices: &[FakeDev<'_>]) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "vfio-primary-sysfs.{}.{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            let fake = Self { root };
            for d in devices {
                fake.add(d);
            }
            fake
        }

        fn add(&self, d: &FakeDev<'_>) {
            let rel = format!("devices/pci0000:3a/{}", d.address);
            let dir = self.root.join(&rel);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), format!("{:#06x}\n", d.ids.0)).unwrap();
            fs::write(dir.join("device"), format!("{:#06x}\n", d.ids.1)).unwrap();
            fs::write(dir.join("class"), format!("{:#08x}\n", d.ids.2)).unwrap();
            if let Some(h) = d.header {
                let mut config = vec![0u8; 64];
                config[0x0e] = h;
                fs::write(dir.join("config"), config).unwrap();
            }
            symlink(
                format!("../../../{rel}"),
                self.root.join("bus/pci/devices").join(d.address),
            )
            .unwrap();
            if let Some(driver) = d.driver {
                fs::create_dir_all(self.root.join("bus/pci/drivers").join(driver)).unwrap();
                symlink(
                    format!("../../../bus/pci/drivers/{driver}"),
                    dir.join("driver"),
                )
                .unwrap();
            }
            if let Some(g) = d.group {
                let gdir = self.root.join(format!("kernel/iommu_groups/{g}/devices"));
                fs::create_dir_all(&gdir).unwrap();
                symlink(format!("../../../../{rel}"), gdir.join(d.address)).unwrap();
                symlink(
                    format!("../../../kernel/iommu_groups/{g}"),
                    dir.join("iommu_group"),
                )
                .unwrap();
            }
        }

        pub(crate) fn device(&self, address: &str) -> PciSysfsDevice {
            PciSysfsDevice::from_address(&self.root, address).unwrap()
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn reads_group_driver_and_ids() {
        let fake = FakeSysfs::new(&[FakeDev::vf("0000:3b:02.1", 42, Some("vfio-pci"))]);
        let dev = fake.device("0000:3b:02.1");
        assert_eq!(dev.address(), "0000:3b:02.1");
        assert_eq!(dev.iommu_group_id().unwrap(), 42);
        assert_eq!(dev.driver().unwrap().as_deref(), Some("vfio-pci"));
        let ids = dev.ids().unwrap();
        assert_eq!(
            ids,
            PciIds {
                vendor: 0x8086,
                device: 0x154c,
                class: 0x020000
            }
        );
        assert_eq!(ids.to_string(), "8086:154c, class 020000");
        let group = dev.check_ready_for_vfio().unwrap();
        assert_eq!(group.id, 42);
        assert_eq!(
            group.members,
            vec![GroupMember {
                address: "0000:3b:02.1".into(),
                driver: Some("vfio-pci".into()),
                bridge: false
            }]
        );
    }

    #[test]
    fn a_group_of_vfio_stub_and_unbound_devices_is_viable() {
        let fake = FakeSysfs::new(&[
            FakeDev::vf("0000:3b:02.0", 7, Some("pci-stub")),
            FakeDev::vf("0000:3b:02.1", 7, Some("vfio-pci")),
            FakeDev::vf("0000:3b:02.2", 7, None),
            FakeDev::vf("0000:3b:02.3", 7, Some("mlx5_vfio_pci")),
            FakeDev::vf("0000:3b:02.4", 8, Some("ixgbevf")), // another group
        ]);
        let group = fake.device("0000:3b:02.1").check_viable().unwrap();
        assert_eq!(group.id, 7);
        let addrs: Vec<&str> = group.members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "0000:3b:02.0",
                "0000:3b:02.1",
                "0000:3b:02.2",
                "0000:3b:02.3"
            ]
        );
        assert!(group.is_viable());
        // The unbound member keeps the group viable but cannot itself be opened.
        let err = fake
            .device("0000:3b:02.2")
            .check_ready_for_vfio()
            .unwrap_err();
        assert!(matches!(err, Error::NotBoundToVfio { driver: None, .. }));
        assert_eq!(
            err.to_string(),
            "0000:3b:02.2 (8086:154c, class 020000) is bound to no driver, not to vfio-pci, \
             so VFIO cannot open it; bind it: `echo vfio-pci > \
             /sys/bus/pci/devices/0000:3b:02.2/driver_override`, then `echo 0000:3b:02.2 > \
             /sys/bus/pci/drivers_probe` (unbinding it from its driver first)"
        );
        let err = fake
            .device("0000:3b:02.0")
            .check_ready_for_vfio()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("is bound to pci-stub, not to vfio-pci")
        );
    }

    #[test]
    fn not_viable_names_every_offender_and_its_driver() {
        let fake = FakeSysfs::new(&[
            FakeDev::vf("0000:3b:02.2", 42, Some("ixgbevf")),
            FakeDev::vf("0000:3b:02.0", 42, Some("ixgbe")),
            FakeDev::vf("0000:3b:02.1", 42, Some("vfio-pci")),
        ]);
        let err = fake.device("0000:3b:02.1").check_viable().unwrap_err();
        assert_eq!(
            err.to_string(),
            "IOMMU group 42 is not viable: 0000:3b:02.0 is bound to ixgbe, \
             0000:3b:02.2 is bound to ixgbevf; bind them to vfio-pci or unbind them"
        );
        let Error::NotViable { group, offenders } = err else {
            panic!("wrong error")
        };
        assert_eq!(group, 42);
        assert_eq!(offenders.len(), 2);
        // The same answer from any member of the group.
        assert!(matches!(
            fake.device("0000:3b:02.0").check_ready_for_vfio(),
            Err(Error::NotViable { group: 42, .. })
        ));
    }

    #[test]
    fn bridges_are_allowed_with_any_driver() {
        let bridge = FakeDev {
            address: "0000:3a:00.0",
            group: Some(3),
            driver: Some("pcieport"),
            ids: (0x8086, 0x2030, 0x060400),
            header: Some(0x81), // type 1, multi-function
        };
        // Without a readable config, the class code says "bridge".
        let bridge_by_class = FakeDev {
            address: "0000:3a:01.0",
            header: None,
            ..bridge
        };
        // A type-0 device bound to the same driver is not a bridge.
        let not_bridge = FakeDev {
            address: "0000:3a:02.0",
            ids: (0x8086, 0x1234, 0x088000),
            header: Some(0x80),
            ..bridge
        };
        let fake = FakeSysfs::new(&[
            bridge,
            bridge_by_class,
            FakeDev::vf("0000:3b:00.0", 3, Some("vfio-pci")),
        ]);
        let group = fake.device("0000:3b:00.0").check_ready_for_vfio().unwrap();
        assert!(group.members.iter().filter(|m| m.bridge).count() == 2);

        let fake = FakeSysfs::new(&[not_bridge, FakeDev::vf("0000:3b:00.0", 3, Some("vfio-pci"))]);
        let err = fake.device("0000:3b:00.0").check_viable().unwrap_err();
        assert!(
            err.to_string()
                .contains("0000:3a:02.0 is bound to pcieport;"),
            "{err}"
        );
    }

    #[test]
    fn missing_device_and_missing_group_say_what_to_do() {
        let fake = FakeSysfs::new(&[FakeDev {
            group: None,
            ..FakeDev::vf("0000:3b:02.1", 0, Some("vfio-pci"))
        }]);
        let err = PciSysfsDevice::from_address(&fake.root, "0000:3b:09.0").unwrap_err();
        assert!(matches!(err, Error::NoDevice { .. }));
        assert!(
            err.to_string()
                .contains("pass the function's sysfs directory, e.g. /sys/bus/pci/devices/"),
            "{err}"
        );
        let err = fake.device("0000:3b:02.1").check_viable().unwrap_err();
        assert!(matches!(err, Error::NoIommuGroup { .. }));
        assert!(
            err.to_string()
                .starts_with("0000:3b:02.1 is in no IOMMU group (")
        );
        assert!(err.to_string().contains("intel_iommu=on"));
        // A file is not a device directory.
        let err = PciSysfsDevice::new(fake.device("0000:3b:02.1").path().join("vendor"));
        assert!(matches!(err, Err(Error::NoDevice { .. })));
    }

    #[test]
    fn malformed_files_are_reported_with_their_path() {
        let fake = FakeSysfs::new(&[FakeDev::vf("0000:3b:02.1", 42, Some("vfio-pci"))]);
        let dev = fake.device("0000:3b:02.1");
        fs::write(dev.path().join("vendor"), "8086\n").unwrap();
        let err = dev.ids().unwrap_err();
        assert!(matches!(err, Error::Parse { .. }));
        assert!(err.to_string().contains("vendor: \"8086\""), "{err}");
        fs::write(dev.path().join("vendor"), "0x18086\n").unwrap();
        assert!(dev.ids().unwrap_err().to_string().contains("a 16-bit ID"));
        fs::remove_file(dev.path().join("device")).unwrap();
        fs::write(dev.path().join("vendor"), "0x8086\n").unwrap();
        assert!(matches!(dev.ids(), Err(Error::Read { .. })));
    }

    #[test]
    fn vfio_driver_names() {
        for d in [
            "vfio-pci",
            "mlx5_vfio_pci",
            "hisi_acc_vfio_pci",
            "virtio-vfio-pci",
        ] {
            assert!(is_vfio_driver(d), "{d}");
        }
        for d in ["pci-stub", "ixgbevf", "vfio", "vfio-platform", "iavf"] {
            assert!(!is_vfio_driver(d), "{d}");
        }
    }
}
