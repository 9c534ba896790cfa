//! The backend-request channel: how the backend tells the frontend that the
//! device configuration changed (link up or down, an announce request).
//!
//! The frontend hands the channel over with `SET_BACKEND_REQ_FD`. The `vhost`
//! crate's handler takes it too, but offers no configuration-change message, so
//! the relay keeps a duplicate here and this module writes
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` itself. Holding the duplicate also
//! keeps the channel open for as long as the connection lives: User-Mode Linux
//! takes an end-of-file on it for a disconnect.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::vhost_user::message::BackendReq;

/// How long to wait for the frontend's acknowledgement of a notification.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

#[derive(Debug, Default)]
struct Inner {
    sock: Option<UnixStream>,
    protocol_features: u64,
    sent: u64,
}

/// The backend-request channel of the current connection, if the frontend
/// provided one.
#[derive(Debug, Default)]
pub struct BackendChannel {
    inner: Mutex<Inner>,
}

impl BackendChannel {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the protocol features the frontend acknowledged.
    pub(crate) fn set_protocol_features(&self, features: u64) {
        self.lock().protocol_features = features;
    }

    /// Takes the channel the frontend handed over.
    pub(crate) fn attach(&self, sock: UnixStream) {
        self.lock().sock = Some(sock);
    }

    /// Forgets the channel (the connection ended).
    pub(crate) fn detach(&self) {
        let mut g = self.lock();
        g.sock = None;
        g.protocol_features = 0;
    }

    /// Whether a channel is attached.
    pub fn is_attached(&self) -> bool {
        self.lock().sock.is_some()
    }

    /// Notifications sent so far.
    pub fn notifications_sent(&self) -> u64 {
        self.lock().sent
    }

    /// Tells the frontend the configuration space changed. With `REPLY_ACK`
    /// negotiated it waits (up to 2 s) for the frontend's acknowledgement.
    pub fn config_changed(&self) -> io::Result<()> {
        let mut g = self.lock();
        let need_reply = g.protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        let Some(sock) = g.sock.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the frontend gave no backend-request channel (BACKEND_REQ not negotiated)",
            ));
        };
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
            let status = u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"));
            if code != request || rflags & FLAG_REPLY == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the frontend answered a config change with request {code}"),
                ));
            }
            if status != 0 {
                return Err(io::Error::other(format!(
                    "the frontend refused the config change notification (status {status})"
                )));
            }
        }
        g.sent += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_without_and_with_reply_ack() {
        let ch = BackendChannel::default();
        assert_eq!(
            ch.config_changed().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ch.attach(ours);
        ch.config_changed().unwrap();
        let mut m = [0u8; 12];
        theirs.read_exact(&mut m).unwrap();
        assert_eq!(m[0], BackendReq::CONFIG_CHANGE_MSG as u8);
        assert_eq!(m[4], FLAG_VERSION_1 as u8);
        // With REPLY_ACK: the frontend's answer is awaited and checked.
        ch.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK.bits());
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
        ch.detach();
        assert!(!ch.is_attached());
    }
}
