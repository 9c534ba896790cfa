//! The frontend's socket, relayed message by message to the `vhost` crate's
//! request handler.
//!
//! The relay frames every message the frontend sends (12-byte header, payload,
//! attached descriptors) and passes it on unchanged except for what real
//! frontends get wrong:
//!
//! - User-Mode Linux sizes `SET_MEM_TABLE` for more regions than it describes;
//!   the `vhost` crate insists on the exact size and would drop the connection.
//!   The relay trims the payload to the regions the message counts.
//!
//! It refuses, by closing the connection with a logged reason, what no frontend
//! may send: a message longer than the protocol's 4096-byte limit, a header cut
//! short, or more descriptors than the protocol allows.
//!
//! It also watches two messages on their way through: the protocol features the
//! frontend acknowledged and the backend-request channel it hands over, which the
//! [`BackendChannel`] uses to send configuration-change notifications.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};

use crate::channel::BackendChannel;

/// Length of a vhost-user message header.
pub const HEADER_LEN: usize = 12;
/// Bytes of `VhostUserMemory` before its regions (`num_regions`, padding).
const MEM_TABLE_HEAD: usize = 8;
/// Bytes of one `VhostUserMemoryRegion`.
const MEM_REGION_LEN: usize = 32;
/// The protocol's limit on regions in one `SET_MEM_TABLE`.
const MAX_MEM_REGIONS: usize = 8;

/// Errors that end a relayed connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket failed.
    #[error("the relay's socket failed: {0}")]
    Io(#[from] io::Error),
    /// A message longer than the protocol allows.
    #[error(
        "the frontend sent request {request} with a {size}-byte payload; vhost-user messages carry at most {MAX_MSG_SIZE}"
    )]
    Oversized {
        /// The request code.
        request: u32,
        /// The size the header claimed.
        size: u32,
    },
    /// The connection ended inside a message.
    #[error("the frontend closed the connection in the middle of a message")]
    Truncated,
    /// Descriptors beyond what a message may carry (or a control message cut
    /// short by the kernel).
    #[error("the frontend attached more file descriptors than a message may carry")]
    TooManyFds,
}

/// Result of relay operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What the relay changed or saw, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quirk {
    /// A `SET_MEM_TABLE` payload was trimmed from `from` to `to` bytes.
    MemTableTrimmed { from: usize, to: usize },
}

/// A running relay: one thread per direction.
pub(crate) struct Relay {
    frontend: UnixStream,
    handler: UnixStream,
    down: JoinHandle<Result<()>>,
    up: JoinHandle<()>,
}

impl Relay {
    /// Relays between `frontend` (the connection the frontend made) and
    /// `handler` (the socket the `vhost` request handler serves).
    pub(crate) fn start(
        name: &str,
        frontend: UnixStream,
        handler: UnixStream,
        channel: Arc<BackendChannel>,
    ) -> io::Result<Relay> {
        let (f_in, h_out) = (frontend.try_clone()?, handler.try_clone()?);
        let (h_in, f_out) = (handler.try_clone()?, frontend.try_clone()?);
        let tag = name.to_string();
        let down = thread::Builder::new()
            .name(format!("{name}-relay-in"))
            .spawn(move || {
                let r = forward_requests(&f_in, &h_out, &channel);
                match &r {
                    Ok(()) => log::info!("{tag}: the connection closed"),
                    Err(e) => log::error!("{tag}: dropping the frontend's connection: {e}"),
                }
                let _ = f_in.shutdown(Shutdown::Both);
                let _ = h_out.shutdown(Shutdown::Both);
                r
            })?;
        let tag = name.to_string();
        let up = thread::Builder::new()
            .name(format!("{name}-relay-out"))
            .spawn(move || {
                if let Err(e) = forward_replies(&h_in, &f_out) {
                    log::debug!("{tag}: reply path closed: {e}");
                }
                let _ = f_out.shutdown(Shutdown::Both);
                let _ = h_in.shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            frontend,
            handler,
            down,
            up,
        })
    }

    /// Closes both sides, waits for the threads and tells why the frontend's
    /// side ended: `Ok` for a disconnect, the refusal otherwise.
    pub(crate) fn close(self) -> Result<()> {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        let _ = self.up.join();
        match self.down.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Io(io::Error::other("the relay thread panicked"))),
        }
    }
}

/// Frontend to handler: one message at a time, quirks mended.
fn forward_requests(
    frontend: &UnixStream,
    handler: &UnixStream,
    channel: &BackendChannel,
) -> Result<()> {
    let mut payload = Vec::with_capacity(MAX_MSG_SIZE);
    loop {
        let mut hdr = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(frontend, &mut hdr)?;
        if n == 0 {
            return Ok(());
        }
        if n < HEADER_LEN {
            read_exact(frontend, &mut hdr[n..])?;
        }
        let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
        if size as usize > MAX_MSG_SIZE {
            return Err(Error::Oversized { request, size });
        }
        payload.clear();
        payload.resize(size as usize, 0);
        read_exact(frontend, &mut payload)?;
        if let Some(q) = mend(request, &mut payload) {
            log::debug!("relay: {q:?}");
            hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        observe(request, &payload, &fds, channel);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(handler, &[&hdr, &payload], &raw)?;
    }
}

/// Handler to frontend: bytes and descriptors as they come.
fn forward_replies(handler: &UnixStream, frontend: &UnixStream) -> Result<()> {
    let mut buf = vec![0u8; HEADER_LEN + MAX_MSG_SIZE];
    loop {
        let (n, fds) = recv_with_fds(handler, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(frontend, &[&buf[..n]], &raw)?;
    }
}

/// Rewrites what real frontends get wrong. Returns what it changed.
pub(crate) fn mend(request: u32, payload: &mut Vec<u8>) -> Option<Quirk> {
    if request == FrontendReq::SET_MEM_TABLE as u32 && payload.len() >= MEM_TABLE_HEAD {
        let regions = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")) as usize;
        let exact = MEM_TABLE_HEAD + regions.min(MAX_MEM_REGIONS) * MEM_REGION_LEN;
        if regions <= MAX_MEM_REGIONS && payload.len() > exact {
            let from = payload.len();
            payload.truncate(exact);
            return Some(Quirk::MemTableTrimmed { from, to: exact });
        }
    }
    None
}

/// Notes what the backend-request channel needs to know.
fn observe(request: u32, payload: &[u8], fds: &[OwnedFd], channel: &BackendChannel) {
    if request == FrontendReq::SET_PROTOCOL_FEATURES as u32 && payload.len() == 8 {
        let v = u64::from_le_bytes(payload.try_into().expect("8 bytes"));
        channel.set_protocol_features(v);
    } else if request == FrontendReq::SET_BACKEND_REQ_FD as u32 && fds.len() == 1 {
        match fds[0].try_clone() {
            Ok(fd) => channel.attach(UnixStream::from(fd)),
            Err(e) => log::warn!("cannot keep the backend-request channel: {e}"),
        }
    }
}

fn read_exact(s: &UnixStream, buf: &mut [u8]) -> Result<()> {
    let mut r = s;
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Io(e)
        }
    })
}

/// Control-message room for the most descriptors a message may carry.
const CMSG_ROOM: usize = 512;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_ROOM]);

/// `recvmsg` into `buf`, collecting attached descriptors.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_ROOM as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled,
    // bounded by `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // The kernel installed these descriptors for us: we own them.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(Error::TooManyFds);
    }
    Ok((n, fds))
}

/// `sendmsg` of all of `parts`, with `fds` attached to the first byte.
fn send_with_fds(s: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    let mut fds = fds;
    while sent < total {
        // Rebuild the remaining slices.
        let mut skip = sent;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
        // SAFETY: an all-zero msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(Error::TooManyFds);
        }
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE of at most 32 descriptors (checked above) fits
            // CMSG_ROOM; the header and data are written inside `cbuf`.
            unsafe {
                let space = libc::CMSG_SPACE(bytes as u32) as usize;
                msg.msg_control = cbuf.0.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
            }
        }
        // SAFETY: `msg` points at live buffers of the lengths it states.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        sent += n as usize;
        fds = &[];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem_table(regions: u32, room_for: usize) -> Vec<u8> {
        let mut p = vec![0u8; MEM_TABLE_HEAD + room_for * MEM_REGION_LEN];
        p[0..4].copy_from_slice(&regions.to_le_bytes());
        p
    }

    #[test]
    fn mem_table_sized_for_more_regions_is_trimmed() {
        // What UML sends: one region, room for two.
        let mut p = mem_table(1, 2);
        assert_eq!(
            mend(FrontendReq::SET_MEM_TABLE as u32, &mut p),
            Some(Quirk::MemTableTrimmed { from: 72, to: 40 })
        );
        assert_eq!(p.len(), 40);
        // Exact, too short, or absurd region counts are left for the handler
        // to judge.
        for (regions, room) in [(1, 1), (3, 2), (9, 10), (u32::MAX, 1)] {
            let mut p = mem_table(regions, room);
            let before = p.clone();
            assert_eq!(mend(FrontendReq::SET_MEM_TABLE as u32, &mut p), None);
            assert_eq!(p, before);
        }
        // Other requests are never touched.
        let mut p = mem_table(1, 2);
        assert_eq!(mend(FrontendReq::SET_VRING_ADDR as u32, &mut p), None);
        let mut short = vec![1, 0, 0];
        assert_eq!(mend(FrontendReq::SET_MEM_TABLE as u32, &mut short), None);
    }

    fn header(request: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn messages_and_descriptors_cross_the_relay() {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (hand, hand_peer) = UnixStream::pair().unwrap();
        let ch = BackendChannel::new("t").unwrap();
        let relay = Relay::start("t", front_peer, hand_peer, Arc::clone(&ch)).unwrap();
        // SET_MEM_TABLE with one region in a two-region payload and an fd.
        let (a, _b) = UnixStream::pair().unwrap();
        let body = mem_table(1, 2);
        send_with_fds(
            &front,
            &[&header(FrontendReq::SET_MEM_TABLE as u32, 72), &body],
            &[a.as_raw_fd()],
        )
        .unwrap();
        let mut got = [0u8; 128];
        let (n, fds) = recv_with_fds(&hand, &mut got).unwrap();
        let n = if n < HEADER_LEN + 40 {
            let mut rest = [0u8; 128];
            let (m, _) = recv_with_fds(&hand, &mut rest).unwrap();
            got[n..n + m].copy_from_slice(&rest[..m]);
            n + m
        } else {
            n
        };
        assert_eq!(n, HEADER_LEN + 40);
        assert_eq!(&got[8..12], &40u32.to_le_bytes());
        assert_eq!(fds.len(), 1);
        // Replies go back untouched.
        send_with_fds(&hand, &[&[7u8; 20]], &[]).unwrap();
        let mut back = [0u8; 20];
        read_exact(&front, &mut back).unwrap();
        assert_eq!(back, [7u8; 20]);
        // The backend-request channel is kept.
        let (req, _req_peer) = UnixStream::pair().unwrap();
        send_with_fds(
            &front,
            &[&header(FrontendReq::SET_BACKEND_REQ_FD as u32, 0)],
            &[req.as_raw_fd()],
        )
        .unwrap();
        let mut h = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(&hand, &mut h).unwrap();
        assert_eq!((n, fds.len()), (HEADER_LEN, 1));
        assert!(ch.is_attached());
        // An oversized message ends the connection: the handler sees EOF.
        (&front)
            .write_all(&header(FrontendReq::SET_CONFIG as u32, 1 << 20))
            .unwrap();
        let mut end = [0u8; 1];
        assert_eq!((&hand).read(&mut end).unwrap(), 0);
        assert!(matches!(relay.close(), Err(Error::Oversized { .. })));
    }
}
