//! The backend-request channel: how the backend tells the frontend that the
//! device configuration changed (link up or down, an announce request).
//!
//! The frontend hands the channel over with `SET_BACKEND_REQ_FD`. The `vhost`
//! crate's handler takes it too, but offers no configuration-change message, so
//! the relay keeps a duplicate here and this module writes
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` itself. Holding the duplicate also
//! keeps the channel open for as long as the connection lives: User-Mode Linux
//! takes an end-of-file on it for a disconnect.
//!
//! The message belongs to `VHOST_USER_PROTOCOL_F_CONFIG`: it goes only to a
//! frontend that acknowledged `CONFIG`. QEMU's virtio-net does not (it keeps the
//! configuration space itself and masks the bit out); the
//! [`Server`](crate::Server) shows it a link change by disconnecting instead.
//!
//! The device raises configuration interrupts with its own locks held, and a
//! frontend may be waiting on us at that moment, so the interrupt path only
//! marks a notification pending ([`BackendChannel::notify_config_changed`]); a
//! notifier thread sends it. A frontend that does not answer in time, or
//! answers out of turn, loses its channel rather than leaving it out of step.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::vhost_user::message::BackendReq;

/// How long to wait for the frontend to take a notification or acknowledge it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

#[derive(Debug, Default)]
struct Inner {
    sock: Option<UnixStream>,
    /// What `SET_PROTOCOL_FEATURES` acknowledged on this connection, once it came.
    protocol_features: Option<u64>,
    sent: u64,
}

#[derive(Debug, Default)]
struct Pending {
    config: bool,
    closed: bool,
}

/// The backend-request channel of the current connection, if the frontend
/// provided one.
#[derive(Debug, Default)]
pub struct BackendChannel {
    inner: Mutex<Inner>,
    pending: Mutex<Pending>,
    wakeup: Condvar,
    /// Bumped when the negotiation or the link changes, for whoever watches
    /// whether the frontend can still be told ([`Server`](crate::Server)).
    changes: Mutex<u64>,
    changed: Condvar,
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.wakeup.notify_all();
    }
}

impl BackendChannel {
    /// A channel with its notifier thread (named after `name`).
    pub fn new(name: &str) -> io::Result<Arc<BackendChannel>> {
        let ch = Arc::new(BackendChannel::default());
        let weak = Arc::downgrade(&ch);
        std::thread::Builder::new()
            .name(format!("{name}-notify"))
            .spawn(move || notifier(weak))?;
        Ok(ch)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a configuration-change notification pending and returns at once;
    /// the notifier thread sends it (several pending ones go as one). Fails
    /// only if no channel is attached.
    pub fn notify_config_changed(&self) -> io::Result<()> {
        if !self.is_attached() {
            return Err(not_attached());
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config = true;
        self.wakeup.notify_all();
        Ok(())
    }

    /// Records the protocol features the frontend acknowledged.
    pub(crate) fn set_protocol_features(&self, features: u64) {
        self.lock().protocol_features = Some(features);
        self.bump();
    }

    /// The protocol features the frontend acknowledged on this connection.
    pub fn protocol_features(&self) -> Option<u64> {
        self.lock().protocol_features
    }

    /// Whether the frontend takes configuration-change notifications: it
    /// acknowledged `CONFIG` and `BACKEND_REQ`. `None` until it acknowledged
    /// protocol features on this connection. QEMU's virtio-net says no: it
    /// keeps its own configuration space and masks `CONFIG` out.
    pub fn takes_config_changes(&self) -> Option<bool> {
        let need = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ;
        self.lock()
            .protocol_features
            .map(|f| f & need.bits() == need.bits())
    }

    /// Wakes [`wait_changed`](Self::wait_changed).
    pub(crate) fn bump(&self) {
        *self.changes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// Waits until something changed after `seen` (a value this returned
    /// before; 0 at first), or `timeout`; returns the current count.
    pub(crate) fn wait_changed(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |n| *n == seen)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    /// Takes the channel the frontend handed over.
    pub(crate) fn attach(&self, sock: UnixStream) {
        self.lock().sock = Some(sock);
    }

    /// Forgets the channel (the connection ended).
    pub(crate) fn detach(&self) {
        let mut g = self.lock();
        g.sock = None;
        g.protocol_features = None;
        drop(g);
        self.bump();
    }

    /// Whether a channel is attached.
    pub fn is_attached(&self) -> bool {
        self.lock().sock.is_some()
    }

    /// Notifications sent so far.
    pub fn notifications_sent(&self) -> u64 {
        self.lock().sent
    }

    /// Tells the frontend the configuration space changed, now, on the
    /// calling thread. With `REPLY_ACK` negotiated it waits (up to 2 s) for the
    /// frontend's acknowledgement. On a timeout or an answer out of turn the
    /// channel is dropped, so that it never runs one reply behind.
    pub fn config_changed(&self) -> io::Result<()> {
        let mut g = self.lock();
        let r = Self::send_config_change(&mut g);
        if let Err(e) = &r {
            if !matches!(
                e.kind(),
                io::ErrorKind::NotConnected | io::ErrorKind::Other | io::ErrorKind::Unsupported
            ) {
                g.sock = None;
            }
        } else {
            g.sent += 1;
        }
        r
    }

    fn send_config_change(g: &mut Inner) -> io::Result<()> {
        let Some(sock) = g.sock.as_mut() else {
            return Err(not_attached());
        };
        let protocol = g.protocol_features.unwrap_or(0);
        if protocol & VhostUserProtocolFeatures::CONFIG.bits() == 0 {
            // The message belongs to CONFIG; QEMU's virtio-net masks it out
            // and would answer with a refusal.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the frontend did not acknowledge VHOST_USER_PROTOCOL_F_CONFIG",
            ));
        }
        let need_reply = protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let request = BackendReq::CONFIG_CHANGE_MSG as u32;
        let flags = FLAG_VERSION_1 | if need_reply { FLAG_NEED_REPLY } else { 0 };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&request.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        sock.write_all(&msg)?;
        if need_reply {
            sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
            let mut reply = [0u8; 20];
            sock.read_exact(&mut reply)?;
            let code = u32::from_le_bytes(reply[0..4].try_into().expect("4 bytes"));
            let rflags = u32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
            let size = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
            let status = u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"));
            if code != request || rflags & FLAG_REPLY == 0 || size != 8 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the frontend answered a config change with request {code}, flags {rflags:#x}, size {size}"
                    ),
                ));
            }
            if status != 0 {
                return Err(io::Error::other(format!(
                    "the frontend refused the config change notification (status {status})"
                )));
            }
        }
        Ok(())
    }
}

fn not_attached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "no backend-request channel is attached (the frontend did not negotiate BACKEND_REQ, or the daemon is not run through Server)",
    )
}

/// Sends pending notifications until the channel is dropped.
fn notifier(ch: Weak<BackendChannel>) {
    loop {
        let Some(c) = ch.upgrade() else { return };
        let mut p = c.pending.lock().unwrap_or_else(|p| p.into_inner());
        while !p.config && !p.closed {
            p = c.wakeup.wait(p).unwrap_or_else(|p| p.into_inner());
        }
        if p.closed {
            return;
        }
        p.config = false;
        drop(p);
        match c.config_changed() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                log::debug!("configuration change not notified: {e}");
            }
            Err(e) => log::warn!("cannot notify the frontend of a configuration change: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_without_and_with_reply_ack() {
        let ch = BackendChannel::new("t").unwrap();
        assert_eq!(
            ch.config_changed().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ch.attach(ours);
        assert_eq!(ch.takes_config_changes(), None);
        // Without CONFIG (QEMU's virtio-net): nothing is sent, the channel stays.
        ch.set_protocol_features(VhostUserProtocolFeatures::BACKEND_REQ.bits());
        assert_eq!(ch.takes_config_changes(), Some(false));
        assert_eq!(
            ch.config_changed().unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        assert!(ch.is_attached());
        let config =
            (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ).bits();
        ch.set_protocol_features(config);
        assert_eq!(ch.takes_config_changes(), Some(true));
        ch.config_changed().unwrap();
        let mut m = [0u8; 12];
        theirs.read_exact(&mut m).unwrap();
        assert_eq!(m[0], BackendReq::CONFIG_CHANGE_MSG as u8);
        assert_eq!(m[4], FLAG_VERSION_1 as u8);
        // With REPLY_ACK: the frontend's answer is awaited and checked.
        ch.set_protocol_features(config | VhostUserProtocolFeatures::REPLY_ACK.bits());
        let t = std::thread::spawn(move || {
            let mut m = [0u8; 12];
            theirs.read_exact(&mut m).unwrap();
            assert_eq!(m[4] as u32, FLAG_VERSION_1 | FLAG_NEED_REPLY);
            let mut r = [0u8; 20];
            r[0] = BackendReq::CONFIG_CHANGE_MSG as u8;
            r[4] = (FLAG_VERSION_1 | FLAG_REPLY) as u8;
            r[8] = 8;
            theirs.write_all(&r).unwrap();
            // Then a refusal.
            theirs.read_exact(&mut m).unwrap();
            r[12] = 1;
            theirs.write_all(&r).unwrap();
        });
        ch.config_changed().unwrap();
        assert!(ch.config_changed().is_err());
        t.join().unwrap();
        assert_eq!(ch.notifications_sent(), 2);
        let seen = ch.wait_changed(0, Duration::ZERO);
        ch.detach();
        assert!(!ch.is_attached());
        assert_eq!(ch.takes_config_changes(), None);
        assert!(ch.wait_changed(seen, Duration::from_secs(5)) > seen);
    }

    #[test]
    fn pending_notifications_go_from_the_notifier_thread_and_silence_drops_the_channel() {
        let ch = BackendChannel::new("t").unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ch.attach(ours);
        let config =
            (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ).bits();
        ch.set_protocol_features(config);
        ch.notify_config_changed().unwrap();
        let mut m = [0u8; 12];
        theirs.read_exact(&mut m).unwrap();
        assert_eq!(m[0], BackendReq::CONFIG_CHANGE_MSG as u8);
        // With REPLY_ACK and a frontend that never answers: after the timeout
        // the channel is dropped, not left one reply behind.
        ch.set_protocol_features(config | VhostUserProtocolFeatures::REPLY_ACK.bits());
        assert_eq!(
            ch.config_changed().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!ch.is_attached());
        assert_eq!(
            ch.notify_config_changed().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
    }
}
