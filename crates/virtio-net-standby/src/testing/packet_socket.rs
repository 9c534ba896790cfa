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
        let ifindex = tap.if_index().map_err(std::io::Error::other)? as i32;
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
        let set = |level, name, value: *const libc::c_void, len: usize| {
            // SAFETY: `value` points to a live option value of `len` bytes.
            let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value, len as u32) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        if vnet_hdr {
            let one: libc::c_int = 1;
            set(
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            )?;
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        set(
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>(),
        )?;
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

    /// The next frame the interface received (not one this host sent) for which
    /// `want` holds, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: std::time::Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        while std::time::Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into a live buffer of its stated size.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let f = &buf[..n as usize];
            if want(f) {
                return Some(f.to_vec());
            }
        }
        None
    }
}
