//! `--tap`: the host side made of real Linux networking. Each VMM process
//! moves into a network namespace of its own (two hosts), where the standby's
//! and the primary's taps are ports of a bridge whose own address is the
//! host's MAC; a packet socket on the bridge answers the guest's requests.
//!
//! The bridge learns where the guest's MAC is from the frames the guest sends.
//! Make-before-break takes the primary's tap down with its link, which flushes
//! the bridge's entries for that port: replies then go to the standby's tap.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use crate::wire::{HOST_MAC, frame, parse};

/// The bridge.
pub const BRIDGE: &str = "fdbr0";
/// The standby's tap.
pub const STANDBY_TAP: &str = "fdts0";
/// The primary's tap.
pub const PRIMARY_TAP: &str = "fdtp0";

const ETH_P_ALL: u16 = 0x0003;

fn ip(args: &[&str]) -> io::Result<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run ip(8) (iproute2): {e}")))?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed: {st}",
            args.join(" ")
        )))
    }
}

/// Moves this process into a new network namespace (before it starts any
/// thread) with loopback up and IPv6 off (no router solicitations on the
/// taps), and creates the bridge.
pub fn enter_namespace() -> io::Result<()> {
    // SAFETY: unshare(2) with a flag; it changes this thread's (the only
    // one's) network namespace and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("--tap needs CAP_NET_ADMIN for a network namespace of its own: {e}"),
        ));
    }
    ip(&["link", "set", "lo", "up"])?;
    for f in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
    }
    let mac = HOST_MAC.map(|b| format!("{b:02x}")).join(":");
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["link", "set", BRIDGE, "address", &mac])?;
    ip(&["link", "set", BRIDGE, "up"])
}

/// Puts tap `name` on the bridge and brings it up.
pub fn attach(name: &str) -> io::Result<()> {
    ip(&["link", "set", name, "master", BRIDGE])?;
    ip(&["link", "set", name, "up"])
}

/// Takes tap `name` down or up (the bridge forgets what it learned there).
pub fn set_port(name: &str, up: bool) -> io::Result<()> {
    ip(&["link", "set", name, if up { "up" } else { "down" }])
}

/// The host: a packet socket on the bridge that answers every intact
/// request from `guest`.
#[derive(Debug)]
pub struct Responder {
    fd: OwnedFd,
    ifindex: i32,
    guest: [u8; 6],
    /// Requests answered.
    pub answered: u64,
    /// Frames for the host that were not intact requests.
    pub bad: u64,
}

fn sockaddr(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll
}

impl Responder {
    /// Opens the socket on the bridge.
    pub fn open(guest: [u8; 6]) -> io::Result<Responder> {
        let name = std::ffi::CString::new(BRIDGE).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name; the result is checked.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = i32::from(ETH_P_ALL.to_be());
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                proto,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sll = sockaddr(ifindex, ETH_P_ALL.to_be());
        // SAFETY: binding with a correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Responder {
            fd,
            ifindex,
            guest,
            answered: 0,
            bad: 0,
        })
    }

    fn send(&self, f: &[u8]) -> io::Result<()> {
        let sll = sockaddr(self.ifindex, 0);
        // SAFETY: sending from a live buffer with a correctly sized address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n == f.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Answers what has arrived, waiting up to `wait_ms` for the first frame
    /// when `expect` requests are on their way. Returns how many it answered.
    pub fn respond(&mut self, expect: usize, wait_ms: i32) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 2048];
        loop {
            if n < expect {
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, wait_ms) } <= 0 {
                    return n;
                }
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into a live buffer of its stated size.
            let r = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if r <= 0 {
                return n;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let f = &buf[..r as usize];
            if f.len() < 14 || f[0..6] != HOST_MAC {
                continue;
            }
            match parse(f, HOST_MAC, self.guest, false) {
                Some(seq) if self.send(&frame(self.guest, HOST_MAC, seq, true)).is_ok() => {
                    self.answered += 1;
                    n += 1;
                }
                _ => self.bad += 1,
            }
        }
    }
}
