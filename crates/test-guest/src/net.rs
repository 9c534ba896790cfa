//! The guest's network stack, as far as failover needs it: a virtio-net
//! driver on the rings the probe set up ([`NetIf`]), and Linux's
//! `net_failover` choosing between the standby and the primary
//! ([`NetFailover`]).
//!
//! Both poll (as NAPI does under load) and keep all their state in plain data,
//! so a guest saved with the `serde` feature carries its network interfaces
//! across a migration: the rings live in guest memory, which moves with it.

use std::time::Duration;

use vmm_pci::Bdf;

use crate::env::Env;
use crate::virtio::{QueueRings, VirtioProbe};

/// Guest RAM as the guest's drivers see it (the VMM's guest memory).
pub trait GuestRam {
    /// Reads `buf.len()` bytes at guest physical address `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]);
    /// Writes `data` at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]);
}

/// `VIRTIO_NET_F_STATUS`: the device reports its link in config.
const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_STANDBY`.
const F_STANDBY: u64 = 1 << 62;
/// `VIRTIO_NET_S_LINK_UP`.
const S_LINK_UP: u16 = 1;
/// The virtio-net header with `num_buffers` (VIRTIO_F_VERSION_1).
const HDR_LEN: usize = 12;
/// Bytes of each buffer the driver posts or sends from.
const BUF_LEN: u32 = 2048;
/// `VRING_DESC_F_WRITE`.
const DESC_WRITE: u16 = 2;

fn rd16(ram: &dyn GuestRam, gpa: u64) -> u16 {
    let mut b = [0u8; 2];
    ram.read(gpa, &mut b);
    u16::from_le_bytes(b)
}

fn rd32(ram: &dyn GuestRam, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    ram.read(gpa, &mut b);
    u32::from_le_bytes(b)
}

/// One split virtqueue, driver side, with a fixed buffer per descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Vq {
    rings: QueueRings,
    notify: u64,
    index: u16,
    /// Our copy of `avail.idx`.
    avail_idx: u16,
    /// The next used entry to read.
    last_used: u16,
    /// Descriptors not in the device's hands.
    free: Vec<u16>,
    /// The buffer of each descriptor.
    bufs: Vec<u64>,
}

impl Vq {
    fn new(env: &mut Env, rings: QueueRings, notify: u64, index: u16) -> Option<Vq> {
        let mut bufs = Vec::with_capacity(usize::from(rings.size));
        for _ in 0..rings.size {
            bufs.push(env.alloc(u64::from(BUF_LEN), 64)?);
        }
        Some(Vq {
            rings,
            notify,
            index,
            avail_idx: 0,
            last_used: 0,
            free: (0..rings.size).rev().collect(),
            bufs,
        })
    }

    /// Hands descriptor `d` (`len` bytes of its buffer) to the device.
    fn offer(&mut self, ram: &dyn GuestRam, d: u16, len: u32, flags: u16) {
        let r = self.rings;
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&self.bufs[usize::from(d)].to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        ram.write(r.desc + 16 * u64::from(d), &desc);
        let slot = u64::from(self.avail_idx % r.size);
        ram.write(r.avail + 4 + 2 * slot, &d.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.write(r.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// The next used element, if the device returned one.
    fn pop_used(&mut self, ram: &dyn GuestRam) -> Option<(u16, u32)> {
        let r = self.rings;
        if rd16(ram, r.used + 2) == self.last_used {
            return None;
        }
        let e = r.used + 4 + 8 * u64::from(self.last_used % r.size);
        self.last_used = self.last_used.wrapping_add(1);
        let id = rd32(ram, e);
        let len = rd32(ram, e + 4);
        // A device returning a descriptor it does not own is a device bug the
        // guest survives by ignoring the element.
        if id >= u32::from(r.size) || self.free.contains(&(id as u16)) {
            return None;
        }
        Some((id as u16, len))
    }

    fn kick(&self, env: &mut Env) {
        env.mmio_write(self.notify, 2, u64::from(self.index));
    }

    fn in_flight(&self) -> usize {
        usize::from(self.rings.size) - self.free.len()
    }
}

/// A virtio-net interface on a probed function: queue pair 0, every receive
/// buffer posted, polled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetIf {
    /// The function.
    pub bdf: Bdf,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Features the driver negotiated.
    pub features: u64,
    /// Carrier, as the driver last read it (`netif_carrier_ok`).
    pub carrier: bool,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames received.
    pub rx_frames: u64,
    device_cfg: u64,
    config_vector: Option<u32>,
    vectors: Vec<u32>,
    rx: Vq,
    tx: Vq,
}

impl NetIf {
    /// Opens the interface on `probe` (a net device with at least one queue
    /// pair): allocates a buffer per descriptor, posts every receive buffer
    /// and reads the link. `None` if it is not a net device or guest memory
    /// for the buffers ran out.
    pub fn open(env: &mut Env, ram: &dyn GuestRam, probe: &VirtioProbe) -> Option<NetIf> {
        if probe.device_type != 1 || probe.queues.len() < 2 || probe.notify.len() < 2 {
            return None;
        }
        let rx = Vq::new(env, probe.queues[0], probe.notify[0], 0)?;
        let tx = Vq::new(env, probe.queues[1], probe.notify[1], 1)?;
        let mut n = NetIf {
            bdf: probe.bdf,
            mac: probe.mac,
            features: probe.features,
            carrier: true,
            tx_frames: 0,
            rx_frames: 0,
            device_cfg: probe.device_cfg,
            config_vector: probe.vectors.first().copied(),
            vectors: probe.vectors.clone(),
            rx,
            tx,
        };
        while let Some(d) = n.rx.free.pop() {
            n.rx.offer(ram, d, BUF_LEN, DESC_WRITE);
        }
        n.rx.kick(env);
        n.read_carrier(env);
        Some(n)
    }

    /// `virtnet_config_changed_work`: the link from the device's status.
    fn read_carrier(&mut self, env: &mut Env) {
        self.carrier = if self.features & F_STATUS != 0 {
            env.mmio_read(self.device_cfg + 6, 2) as u16 & S_LINK_UP != 0
        } else {
            true
        };
    }

    /// Takes this interface's interrupts off the guest's queue; a config
    /// interrupt re-reads the link. Returns whether the carrier changed.
    pub fn handle_interrupts(&mut self, env: &mut Env) -> bool {
        let mut config = false;
        env.other_irqs.retain(|d| {
            if Some(*d) == self.config_vector {
                config = true;
            }
            !self.vectors.contains(d)
        });
        let before = self.carrier;
        if config {
            self.read_carrier(env);
        }
        before != self.carrier
    }

    /// Sends `frame` (Ethernet header on) with an empty virtio-net header.
    /// `false` when every transmit descriptor is in the device's hands.
    pub fn send(&mut self, env: &mut Env, ram: &dyn GuestRam, frame: &[u8]) -> bool {
        self.reclaim(ram);
        let len = HDR_LEN + frame.len();
        if len > BUF_LEN as usize {
            return false;
        }
        let Some(d) = self.tx.free.pop() else {
            return false;
        };
        let buf = self.tx.bufs[usize::from(d)];
        ram.write(buf, &[0u8; HDR_LEN]);
        ram.write(buf + HDR_LEN as u64, frame);
        self.tx.offer(ram, d, len as u32, 0);
        self.tx.kick(env);
        self.tx_frames += 1;
        true
    }

    /// Takes back the transmit descriptors the device has used.
    pub fn reclaim(&mut self, ram: &dyn GuestRam) {
        while let Some((d, _)) = self.tx.pop_used(ram) {
            self.tx.free.push(d);
        }
    }

    /// Frames the device has delivered (virtio-net header stripped); their
    /// buffers are posted again.
    pub fn recv(&mut self, env: &mut Env, ram: &dyn GuestRam) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((d, len)) = self.rx.pop_used(ram) {
            let len = (len as usize).min(BUF_LEN as usize);
            if len > HDR_LEN {
                let mut f = vec![0u8; len - HDR_LEN];
                ram.read(self.rx.bufs[usize::from(d)] + HDR_LEN as u64, &mut f);
                out.push(f);
            }
            self.rx.offer(ram, d, BUF_LEN, DESC_WRITE);
        }
        if !out.is_empty() {
            self.rx_frames += out.len() as u64;
            self.rx.kick(env);
        }
        out
    }

    /// Frames handed to the device for sending that it has not returned.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.in_flight()
    }
}

/// Which of a failover pair's interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Slave {
    /// The virtio-net device that offered STANDBY.
    Standby,
    /// The other device with the same MAC (the passthrough VF, or a stand-in).
    Primary,
}

/// Linux's `net_failover` for one MAC, over virtio-net slaves.
///
/// The standby is the virtio-net function with that MAC that negotiated
/// STANDBY (its `virtnet_probe` creates the failover master); the primary is
/// any other net function with the same MAC (`failover_slave_register` matches
/// by MAC). It transmits on the primary while that is present with carrier
/// (`net_failover_start_xmit`: `xmit_dev = primary if
/// net_failover_xmit_ready(primary)`), else on the standby, and receives on
/// both.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetFailover {
    /// The pair's MAC.
    pub mac: [u8; 6],
    /// The standby slave.
    pub standby: Option<NetIf>,
    /// The primary slave.
    pub primary: Option<NetIf>,
    /// What happened, with the guest's time: slaves registered and gone,
    /// carrier changes.
    pub log: Vec<(Duration, String)>,
}

impl NetFailover {
    /// A failover master for `mac`, with no slaves yet.
    pub fn new(mac: [u8; 6]) -> Self {
        NetFailover {
            mac,
            standby: None,
            primary: None,
            log: Vec::new(),
        }
    }

    /// Follows the guest's devices: registers a slave whose driver has just
    /// bound, forgets one whose device went away (what it had in flight is
    /// lost with it), and handles the slaves' config interrupts.
    pub fn sync(&mut self, env: &mut Env, ram: &dyn GuestRam) {
        let now = env.clock.now();
        for (slot, name) in [
            (&mut self.standby, "standby"),
            (&mut self.primary, "primary"),
        ] {
            if let Some(n) = slot
                && !env.virtio.iter().any(|p| p.bdf == n.bdf)
            {
                // What the device returned before it went is not lost.
                n.reclaim(ram);
                self.log.push((
                    now,
                    format!(
                        "{name} {} unregistered ({} frames in flight lost)",
                        n.bdf,
                        n.tx_in_flight()
                    ),
                ));
                *slot = None;
            }
        }
        let probes: Vec<VirtioProbe> = env
            .virtio
            .iter()
            .filter(|p| p.device_type == 1 && p.mac == self.mac)
            .cloned()
            .collect();
        for p in probes {
            let standby = p.features & F_STANDBY != 0;
            let (slot, name) = if standby {
                (&mut self.standby, "standby")
            } else {
                (&mut self.primary, "primary")
            };
            if slot.is_some() {
                continue;
            }
            match NetIf::open(env, ram, &p) {
                Some(n) => {
                    self.log.push((
                        now,
                        format!("{name} {} registered, carrier {}", p.bdf, onoff(n.carrier)),
                    ));
                    *slot = Some(n);
                }
                None => self
                    .log
                    .push((now, format!("{name} {}: cannot open", p.bdf))),
            }
        }
        for (slot, name) in [
            (&mut self.standby, "standby"),
            (&mut self.primary, "primary"),
        ] {
            if let Some(n) = slot
                && n.handle_interrupts(env)
            {
                self.log.push((
                    now,
                    format!("{name} {} carrier {}", n.bdf, onoff(n.carrier)),
                ));
            }
        }
    }

    /// The slave the next frame leaves on, if any.
    pub fn tx_path(&self) -> Option<Slave> {
        match (&self.primary, &self.standby) {
            (Some(p), _) if p.carrier => Some(Slave::Primary),
            (_, Some(_)) => Some(Slave::Standby),
            _ => None,
        }
    }

    /// Sends `frame` on [`tx_path`](Self::tx_path); returns the slave, or
    /// `None` when there is none or its ring is full (the frame is dropped, as
    /// a full qdisc would).
    pub fn send(&mut self, env: &mut Env, ram: &dyn GuestRam, frame: &[u8]) -> Option<Slave> {
        let path = self.tx_path()?;
        let dev = match path {
            Slave::Primary => self.primary.as_mut()?,
            Slave::Standby => self.standby.as_mut()?,
        };
        dev.send(env, ram, frame).then_some(path)
    }

    /// Frames received on either slave, with the slave.
    pub fn recv(&mut self, env: &mut Env, ram: &dyn GuestRam) -> Vec<(Slave, Vec<u8>)> {
        let mut out = Vec::new();
        for (slot, which) in [
            (&mut self.primary, Slave::Primary),
            (&mut self.standby, Slave::Standby),
        ] {
            if let Some(n) = slot {
                out.extend(n.recv(env, ram).into_iter().map(|f| (which, f)));
            }
        }
        out
    }
}

fn onoff(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}
