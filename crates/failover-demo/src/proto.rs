//! What the two VMM processes say to each other over their Unix socket: one
//! frame per message, a 4-byte little-endian length and then JSON, except
//! guest RAM, which follows the state message as one raw frame.

use std::io::{self, Read, Write};

use failover::{DestinationOffer, TimedEvent};

use crate::app::AppCounters;
use crate::vm::Saved;
use crate::wire::WireCounters;

/// The largest frame either side accepts (guest RAM plus room).
const MAX_FRAME: usize = 64 << 20;

/// A message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Msg {
    /// Destination to source, first: what it can take (pre-flight).
    Offer(DestinationOffer),
    /// Source to destination: the migration goes ahead; guest RAM follows.
    State(Box<Saved>),
    /// Source to destination: no migration after all (cancelled, refused).
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination to source, last: how the guest fared there.
    Report(Box<Report>),
}

/// How one side ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The coordinator's events.
    pub events: Vec<TimedEvent>,
    /// The host network's counters (the in-process wire; zero with `--tap`).
    pub wire: WireCounters,
    /// Requests the host answered (the wire's, or the bridge responder's).
    pub host_answered: u64,
    /// The guest program's counters (cumulative: they migrate with it).
    pub app: AppCounters,
    /// Requests still without a reply at the end.
    pub unanswered: u64,
    /// `net_failover`'s log.
    pub nf_log: Vec<(std::time::Duration, String)>,
    /// Guest time at the end.
    pub guest_time: std::time::Duration,
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent a frame of {len} bytes, more than {MAX_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Sends a message.
pub fn send(w: &mut impl Write, msg: &Msg) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, &bytes)
}

/// Receives a message.
pub fn recv(r: &mut impl Read) -> io::Result<Msg> {
    let bytes = read_frame(r)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends guest RAM.
pub fn send_ram(w: &mut impl Write, ram: &[u8]) -> io::Result<()> {
    write_frame(w, ram)
}

/// Receives guest RAM.
pub fn recv_ram(r: &mut impl Read) -> io::Result<Vec<u8>> {
    read_frame(r)
}
