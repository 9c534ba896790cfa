//! The guest's program: a ping at a fixed cadence through the failover
//! master, counting every request and reply by path. It lives in the guest, so
//! it migrates with it.

use std::collections::BTreeMap;
use std::time::Duration;

use test_guest::{Env, GuestRam, NetFailover, Slave};

use crate::wire::{ETHERTYPE, HOST_MAC, frame, parse};

/// Counters of the guest's program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppCounters {
    /// Requests sent on the standby and on the primary.
    pub sent: [u64; 2],
    /// Requests `net_failover` had no slave (or no room) for.
    pub not_sent: u64,
    /// Intact replies received on the standby and on the primary.
    pub replies: [u64; 2],
    /// Frames of the demo's EtherType received that were not an intact reply
    /// to an outstanding request (corrupted, duplicated or unknown).
    pub bad: u64,
    /// Other traffic the guest received (with `--tap`, whatever the host's
    /// kernel sends), ignored.
    pub foreign: u64,
}

/// The program's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ping {
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// Time between requests.
    pub interval: Duration,
    /// When the next request goes.
    pub next_at: Duration,
    /// The next sequence number.
    pub next_seq: u64,
    /// Requests without a reply yet: sequence number -> sent at.
    pub outstanding: BTreeMap<u64, Duration>,
    /// Counters.
    pub counters: AppCounters,
    /// Whether it sends.
    pub running: bool,
}

fn idx(s: Slave) -> usize {
    match s {
        Slave::Standby => 0,
        Slave::Primary => 1,
    }
}

impl Ping {
    /// A ping from `mac` every `interval`, stopped.
    pub fn new(mac: [u8; 6], interval: Duration) -> Ping {
        Ping {
            mac,
            interval,
            next_at: Duration::ZERO,
            next_seq: 0,
            outstanding: BTreeMap::new(),
            counters: AppCounters::default(),
            running: false,
        }
    }

    /// Starts sending at `now`.
    pub fn start(&mut self, now: Duration) {
        self.running = true;
        self.next_at = now;
    }

    /// When it next wants to run.
    pub fn next_wake(&self) -> Option<Duration> {
        self.running.then_some(self.next_at)
    }

    /// Sends what is due; returns how many went.
    pub fn send_due(&mut self, env: &mut Env, ram: &dyn GuestRam, nf: &mut NetFailover) -> usize {
        let now = env.clock.now();
        let mut n = 0;
        while self.running && self.next_at <= now {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.next_at += self.interval;
            match nf.send(env, ram, &frame(HOST_MAC, self.mac, seq, false)) {
                Some(path) => {
                    self.counters.sent[idx(path)] += 1;
                    self.outstanding.insert(seq, now);
                    n += 1;
                }
                None => self.counters.not_sent += 1,
            }
        }
        n
    }

    /// Takes what the slaves received.
    pub fn receive(&mut self, env: &mut Env, ram: &dyn GuestRam, nf: &mut NetFailover) {
        for (path, f) in nf.recv(env, ram) {
            match parse(&f, self.mac, HOST_MAC, true) {
                Some(seq) if self.outstanding.remove(&seq).is_some() => {
                    self.counters.replies[idx(path)] += 1
                }
                _ if f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes() => {
                    self.counters.foreign += 1
                }
                _ => self.counters.bad += 1,
            }
        }
    }

    /// Requests sent whose reply has not come (lost, once the network is
    /// drained).
    pub fn unanswered(&self) -> u64 {
        self.outstanding.len() as u64
    }
}
