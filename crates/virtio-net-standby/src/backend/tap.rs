//! A Linux tap device as a backend.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and
//! `TUNSETVNETHDRSZ 12`, so its frames carry exactly the `virtio_net_hdr_v1` the
//! guest uses: TX is one `writev` of the guest's buffers, RX one `readv` into them.
//! The receive offloads the guest negotiated are passed on with `TUNSETOFFLOAD`,
//! and the kernel segments or checksums whatever the guest cannot take.
//!
//! With several queue pairs the tap is opened `IFF_MULTI_QUEUE`, one fd per queue
//! pair; `VIRTIO_NET_CTRL_MQ` attaches and detaches queues with `TUNSETQUEUE`.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::{NetBackend, Readiness, RxBuffers, TxFrame};
use crate::features::Features;
use crate::header::HDR_LEN;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and may this process use it?)")]
    OpenTun(#[source] io::Error),
    /// The interface name does not fit `IFNAMSIZ`.
    #[error("tap name {0:?} is not a valid interface name (at most 15 bytes, no NUL)")]
    InvalidName(String),
    /// An ioctl on the tap failed.
    #[error("{ioctl} on tap {name:?} failed")]
    Ioctl {
        /// The ioctl.
        ioctl: &'static str,
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An fd handed in is not a tap configured the way the device needs.
    #[error("fd is not a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (flags {0:#x})")]
    WrongFlags(i32),
    /// No queues were asked for.
    #[error("a tap needs at least one queue")]
    NoQueues,
}

/// Result of tap operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One queue of a tap device. See the module documentation.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    multi_queue: bool,
    supported: Features,
}

fn ifreq(name: &str, flags: i32) -> Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Error::InvalidName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    // SAFETY: the kernel NUL-terminates ifr_name; we zeroed it, so a NUL exists
    // within IFNAMSIZ either way.
    unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl Tap {
    /// Opens (creating it if needed) the single-queue tap `name`. An empty name
    /// lets the kernel choose (`tap0`, `tap1`, ...); [`name`](Self::name) tells
    /// which.
    pub fn open(name: &str) -> Result<Tap> {
        let mut v = Self::open_queues(name, 1)?;
        Ok(v.remove(0))
    }

    /// Opens `queues` queues of the tap `name` (`IFF_MULTI_QUEUE` when more than
    /// one), one per queue pair.
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>> {
        if queues == 0 {
            return Err(Error::NoQueues);
        }
        let multi_queue = queues > 1;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut name = name.to_string();
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(Error::OpenTun)?;
            let mut req = ifreq(&name, flags)?;
            // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
            let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
            if ret < 0 {
                return Err(Error::Ioctl {
                    ioctl: "TUNSETIFF",
                    name,
                    source: io::Error::last_os_error(),
                });
            }
            // Later queues attach to the interface the first one created.
            name = ifreq_name(&req);
            taps.push(Self::configure(file, name.clone(), multi_queue)?);
        }
        Ok(taps)
    }

    /// Takes a tap fd the VMM already has (from libvirt, or opened with more
    /// privileges). It must have been opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`;
    /// it is switched to non-blocking mode and a 12-byte header.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap> {
        let file = File::from(fd);
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes an ifreq, which `req` is.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(Error::Ioctl {
                ioctl: "TUNGETIFF",
                name: format!("fd {}", file.as_raw_fd()),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: TUNGETIFF filled the flags member.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        let need = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & need != need {
            return Err(Error::WrongFlags(flags));
        }
        // SAFETY: plain fcntl calls on an fd we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(Error::Ioctl {
                    ioctl: "fcntl(O_NONBLOCK)",
                    name: ifreq_name(&req),
                    source: io::Error::last_os_error(),
                });
            }
        }
        Self::configure(file, ifreq_name(&req), flags & libc::IFF_MULTI_QUEUE != 0)
    }

    fn configure(file: File, name: String, multi_queue: bool) -> Result<Tap> {
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int, which `hdr_len` is.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(Error::Ioctl {
                ioctl: "TUNSETVNETHDRSZ",
                name,
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap {
            file,
            name,
            multi_queue,
            supported: Features::empty(),
        };
        tap.supported = tap.probe_offloads()?;
        Ok(tap)
    }

    /// Finds which offloads this kernel's tap accepts, then turns them all off
    /// until the guest negotiates some.
    fn probe_offloads(&self) -> Result<Features> {
        let base = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        let mut supported = Features::from_bit_numbers(&[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
        ]);
        if self.tun_set_offload(base).is_ok() {
            supported = supported
                .with(VIRTIO_NET_F_GUEST_CSUM)
                .with(VIRTIO_NET_F_GUEST_TSO4)
                .with(VIRTIO_NET_F_GUEST_TSO6)
                .with(VIRTIO_NET_F_GUEST_ECN);
        }
        if self.tun_set_offload(base | libc::TUN_F_UFO).is_ok() {
            supported = supported
                .with(VIRTIO_NET_F_GUEST_UFO)
                .with(VIRTIO_NET_F_HOST_UFO);
        }
        self.tun_set_offload(0).map_err(|source| Error::Ioctl {
            ioctl: "TUNSETOFFLOAD",
            name: self.name.clone(),
            source,
        })?;
        Ok(supported)
    }

    fn tun_set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, flags.into()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is one queue of a multi-queue tap.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// Brings the interface up (`IFF_UP`), as `ip link set <name> up` would. A
    /// tap that is down refuses writes with `EIO`. VMMs usually leave this to the
    /// host's network configuration; tests and demos use it.
    pub fn set_up(&self) -> Result<()> {
        let ioctl_err = |ioctl| Error::Ioctl {
            ioctl,
            name: self.name.clone(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(ioctl_err("socket"));
        }
        // SAFETY: `sock` is a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = ifreq(&self.name, 0)?;
        // SAFETY: SIOCGIFFLAGS reads and writes an ifreq.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(ioctl_err("SIOCGIFFLAGS"));
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads an ifreq.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(ioctl_err("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// The interface index (for binding packet sockets in tests and tools).
    pub fn if_index(&self) -> Result<u32> {
        let c = std::ffi::CString::new(self.name.clone())
            .map_err(|_| Error::InvalidName(self.name.clone()))?;
        // SAFETY: `c` is a valid NUL-terminated string.
        let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if idx == 0 {
            return Err(Error::Ioctl {
                ioctl: "if_nametoindex",
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(idx)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    #[inline]
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        let iov = frame.iovecs();
        // SAFETY: the iovecs describe readable guest memory (TxFrame contract) and
        // their count is at most IOV_MAX (the chain walker's limit).
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[inline]
    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        let iov = bufs.iovecs();
        // SAFETY: the iovecs describe writable guest memory (RxBuffers contract)
        // and their count is at most IOV_MAX.
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn offloads_supported(&self) -> Features {
        self.supported
    }

    fn set_offloads(&mut self, guest: Features) -> io::Result<()> {
        let mut flags = 0;
        if guest.has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if guest.has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if guest.has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if guest.has(VIRTIO_NET_F_GUEST_ECN) {
                flags |= libc::TUN_F_TSO_ECN;
            }
            if guest.has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        self.tun_set_offload(flags)
    }

    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let req = ifreq("", flag).map_err(io::Error::other)?;
        // SAFETY: TUNSETQUEUE reads an ifreq.
        if unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE, &req) } < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is EINVAL.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn rx_readiness(&self) -> Option<Readiness> {
        Some(Readiness {
            fd: self.file.as_raw_fd(),
            writable: false,
        })
    }

    fn tx_readiness(&self) -> Option<Readiness> {
        Some(Readiness {
            fd: self.file.as_raw_fd(),
            writable: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(matches!(
            ifreq("a-name-longer-than-15", 0),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(ifreq("nul\0", 0), Err(Error::InvalidName(_))));
        let r = ifreq("tap7", libc::IFF_TAP).unwrap();
        assert_eq!(ifreq_name(&r), "tap7");
        assert!(matches!(Tap::open_queues("x", 0), Err(Error::NoQueues)));
    }

    #[test]
    fn from_fd_refuses_a_non_tap() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(f.into()),
            Err(Error::Ioctl {
                ioctl: "TUNGETIFF",
                ..
            })
        ));
    }
}
