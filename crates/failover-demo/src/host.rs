//! `--tap`: the host side made of real Linux networking. Each VMM process
//! moves into a network namespace of its own (two hosts), where the standby's
//! and the primary's taps are ports of a bridge whose own address is the
//! host's MAC; a packet socket on the bridge answers the guest's requests.
//!
//! The bridge learns where the guest's MAC is from the frames the guest sends.
//! Make-before-break takes the primary's tap down with its link, which flushes
//! the bridge's entries for that port: replies then go to the standby's tap.

use std::io;
use std::process::Command;
use std::time::Duration;

use virtio_net_standby::testing::PacketSocket;

use crate::wire::{HOST_MAC, frame, parse};

/// The bridge.
pub const BRIDGE: &str = "fdbr0";
/// The standby's tap.
pub const STANDBY_TAP: &str = "fdts0";
/// The primary's tap.
pub const PRIMARY_TAP: &str = "fdtp0";

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
    socket: PacketSocket,
    guest: [u8; 6],
    /// Requests answered.
    pub answered: u64,
    /// Frames for the host that were not intact requests.
    pub bad: u64,
}

impl Responder {
    /// Opens the socket on the bridge.
    pub fn open(guest: [u8; 6]) -> io::Result<Responder> {
        Ok(Responder {
            socket: PacketSocket::open_interface(BRIDGE, false)?,
            guest,
            answered: 0,
            bad: 0,
        })
    }

    /// Answers what has arrived, waiting up to `wait_ms` for each frame while
    /// fewer than `expect` requests have been answered. Returns how many it
    /// answered.
    pub fn respond(&mut self, expect: usize, wait_ms: u64) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 2048];
        loop {
            let wait = if n < expect {
                Duration::from_millis(wait_ms)
            } else {
                Duration::ZERO
            };
            let len = match self.socket.recv(&mut buf, wait) {
                Ok(Some(len)) => len,
                _ => return n,
            };
            let f = &buf[..len];
            if f.len() < 14 || f[0..6] != HOST_MAC {
                continue;
            }
            let reply = parse(f, HOST_MAC, self.guest, false)
                .map(|seq| frame(self.guest, HOST_MAC, seq, true));
            match reply {
                Some(r) if self.socket.send(&r).is_ok() => {
                    self.answered += 1;
                    n += 1;
                }
                _ => self.bad += 1,
            }
        }
    }
}
