//! [`PacketSocket`]: the host side of a tap, for tests that need a kernel on
//! the other side.

/// The host side of a tap: a raw packet socket bound to the tap's interface.
/// What the guest sends through the tap arrives here; what is sent here comes out
/// of the tap into the device. Needs CAP_NET_RAW.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    const ETH_P_ALL: u16 = 0x0003;

    /// Opens a socket on `tap`'s interface. With `vnet_hdr`, frames sent carry a
    /// 10-byte `virtio_net_hdr` in front (`PACKET_VNET_HDR`), so the kernel can be
    /// handed GSO frames.
    pub fn open(tap: &crate::Tap, vnet_hdr: bool) -> std::io::Result<PacketSocket> {
        let ifindex = tap.if_index().map_err(std::io::Error::other)?;
        Self::open_index(ifindex as i32, vnet_hdr)
    }

    /// Opens a socket on the interface called `name` (a bridge, a veth, a tap
    /// another process owns), as [`PacketSocket::open`] does on a tap.
    pub fn open_interface(name: &str, vnet_hdr: bool) -> std::io::Result<PacketSocket> {
        let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: a NUL-terminated name; the result is checked.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("no network interface {name}: {e}"),
            ));
        }
        Self::open_index(ifindex as i32, vnet_hdr)
    }

    fn open_index(ifindex: i32, vnet_hdr: bool) -> std::io::Result<PacketSocket> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let proto = i32::from(Self::ETH_P_ALL.to_be());
        // SAFETY: plain socket(2); the result is checked.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let sll = Self::address(ifindex, Self::ETH_P_ALL.to_be());
        // SAFETY: binding with a correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if vnet_hdr {
            let one: libc::c_int = 1;
            // SAFETY: `one` is a live c_int and the length says so.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(PacketSocket { fd, ifindex })
    }

    fn address(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll
    }

    /// Sends one frame (Ethernet header first; with `vnet_hdr`, the 10-byte
    /// header before it) out of the tap's interface, towards the tap's reader.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let sll = Self::address(self.ifindex, 0);
        // SAFETY: sending from a live buffer with a correctly sized address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n != frame.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies the next frame the interface received (not one this host sent)
    /// into `buf` and returns its length, or `None` when none arrived within
    /// `timeout` (with a zero timeout: when none is already waiting). A frame
    /// longer than `buf` is cut to its length.
    pub fn recv(
        &self,
        buf: &mut [u8],
        timeout: std::time::Duration,
    ) -> std::io::Result<Option<usize>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r == 0 {
                return Ok(None);
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into a live buffer of its stated size.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Ok(Some(n as usize));
            }
        }
    }

    /// The next frame the interface received (not one this host sent) for which
    /// `want` holds, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: std::time::Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let n = self.recv(&mut buf, left).ok()??;
            if want(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
}
