//! The control queue: rx mode, MAC tables, MAC address, VLANs, announce
//! acknowledgement, queue-pair count and guest offloads.
//!
//! A command is `class, command, data...` in device-readable buffers followed by
//! a one-byte ack in a device-writable buffer. Every command the device does not
//! know, that the driver did not negotiate, or whose data is the wrong size is
//! answered `VIRTIO_NET_ERR` and changes nothing. A chain without room for the
//! ack, or that breaks a ring rule, is returned with length 0 and counted.

use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{NetBackend, copy_from_iovecs, copy_to_iovecs};
use crate::chain::{Access, ChainBuf, walk};
use crate::config::STATUS_ANNOUNCE;
use crate::counters::NetCounters;
use crate::features::{F_RING_INDIRECT_DESC, Features, GUEST_OFFLOADS};
use crate::filter::{MAC_TABLE_ENTRIES, MacAddr, RxFilter};
use crate::memory::{GuestRam, MemoryWatch};
use crate::queue_pair::QueuePairHandle;
use crate::ring::{self, SplitRing};
use crate::shared::Shared;
use crate::tx::Processed;
use crate::virtio::{self, ActivateQueue, VirtioInterrupt, VirtioInterruptType};

/// The longest command the device reads: two MAC tables of 64 entries with
/// headroom. Longer commands are answered `VIRTIO_NET_ERR`.
pub const MAX_COMMAND_LEN: usize = 4096;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

/// State the control queue programs that the device must snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CtrlState {
    pub active_pairs: u16,
    pub guest_offloads: Features,
}

struct Active<M: GuestMemoryBackend> {
    watch: MemoryWatch<M>,
    ram: GuestRam<M>,
    ring: SplitRing,
    index: u16,
    interrupt: Arc<dyn VirtioInterrupt>,
    kick: Option<EventFd>,
    broken: bool,
}

/// The control queue. Reached through the device
/// ([`StandbyNet::process_ctrl`](crate::StandbyNet::process_ctrl)) or its worker.
pub struct ControlQueue<M: GuestMemoryBackend, B: NetBackend> {
    shared: Arc<Shared>,
    pairs: Vec<QueuePairHandle<M, B>>,
    active: Option<Active<M>>,
    state: CtrlState,
    features: Features,
    buf: ChainBuf,
    cmd: Vec<u8>,
}

impl<M, B> ControlQueue<M, B>
where
    M: GuestMemoryBackend + Send + Sync,
    M::R: Sync,
    B: NetBackend,
{
    pub(crate) fn new(shared: Arc<Shared>, pairs: Vec<QueuePairHandle<M, B>>) -> Self {
        ControlQueue {
            shared,
            pairs,
            active: None,
            state: CtrlState {
                active_pairs: 1,
                guest_offloads: Features::empty(),
            },
            features: Features::empty(),
            buf: ChainBuf::default(),
            cmd: Vec::with_capacity(MAX_COMMAND_LEN),
        }
    }

    pub(crate) fn state(&self) -> CtrlState {
        self.state
    }

    /// A new negotiation: what the control queue may accept, and the
    /// guest-offload state that follows from it.
    pub(crate) fn negotiated(&mut self, features: Features) -> std::io::Result<()> {
        self.features = features;
        self.state.active_pairs = 1;
        self.apply_offloads(features.intersection(GUEST_OFFLOADS))?;
        for p in &self.pairs {
            p.lock().set_enabled(p.index() == 0)?;
        }
        Ok(())
    }

    /// Restores programmed state from a snapshot.
    pub(crate) fn restore(&mut self, state: CtrlState) -> std::io::Result<()> {
        self.apply_offloads(state.guest_offloads)?;
        self.apply_pairs(state.active_pairs)?;
        Ok(())
    }

    fn apply_offloads(&mut self, offloads: Features) -> std::io::Result<()> {
        for p in &self.pairs {
            p.lock().set_offloads(offloads)?;
        }
        self.state.guest_offloads = offloads;
        Ok(())
    }

    fn apply_pairs(&mut self, n: u16) -> std::io::Result<()> {
        for p in &self.pairs {
            p.lock().set_enabled(p.index() < n)?;
        }
        self.state.active_pairs = n;
        Ok(())
    }

    pub(crate) fn activate(
        &mut self,
        watch: MemoryWatch<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        q: ActivateQueue,
    ) -> virtio::Result<()> {
        let ram = GuestRam::new(watch.current())?;
        let ring = SplitRing::new(&q.queue, &ram, self.features.has(F_RING_INDIRECT_DESC))
            .map_err(|source| virtio::Error::Queue {
                index: q.index,
                source,
            })?;
        self.active = Some(Active {
            watch,
            ram,
            ring,
            index: q.index,
            interrupt,
            kick: q.kick,
            broken: false,
        });
        Ok(())
    }

    pub(crate) fn reset(&mut self) {
        self.active = None;
        self.features = Features::empty();
        self.state = CtrlState {
            active_pairs: 1,
            guest_offloads: Features::empty(),
        };
    }

    pub(crate) fn queue_state(&self) -> Option<(u16, virtio_queue::QueueState)> {
        self.active.as_ref().map(|a| (a.index, a.ring.state(0)))
    }

    pub(crate) fn kick_fd(&self) -> Option<&EventFd> {
        self.active.as_ref().and_then(|a| a.kick.as_ref())
    }

    /// Executes every command the driver queued.
    pub fn process(&mut self) -> Processed {
        let mut c = NetCounters::default();
        let out = self.process_inner(&mut c);
        self.shared.counters.add(&c);
        out
    }

    fn process_inner(&mut self, c: &mut NetCounters) -> Processed {
        let Some(a) = self.active.as_mut() else {
            return Processed::default();
        };
        if a.broken {
            return Processed::default();
        }
        if !a.watch.is_current(&a.ram) {
            match GuestRam::new(a.watch.current()) {
                Ok(ram) if a.ring.retranslate(&ram).is_ok() => a.ram = ram,
                _ => {
                    a.broken = true;
                    self.shared
                        .fail(&"control queue rings are gone after a memory map change");
                    return Processed::default();
                }
            }
        }
        let old = a.ring.next_used();
        let mut out = Processed::default();
        let r = self.run(c, &mut out);
        let a = self.active.as_mut().expect("active");
        if a.ring.next_used() != old {
            a.ring.publish_used(&a.ram, old);
            if a.ring.needs_interrupt(old) {
                if let Err(e) = a.interrupt.trigger(VirtioInterruptType::Queue(a.index)) {
                    log::warn!("{}: control queue interrupt failed: {e}", self.shared.id);
                }
                c.notifications_sent += 1;
                out.notified = true;
            } else {
                c.notifications_suppressed += 1;
            }
        }
        if let Err(e) = r {
            a.broken = true;
            self.shared.fail(&format_args!("control queue: {e}"));
        }
        out
    }

    fn run(&mut self, c: &mut NetCounters, out: &mut Processed) -> ring::Result<()> {
        loop {
            let a = self.active.as_mut().expect("active");
            let avail = a.ring.available()?;
            if avail == 0 {
                if a.ring.enable_kicks(&a.ram)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..avail {
                let a = self.active.as_mut().expect("active");
                let head = a.ring.pop_head();
                out.chains += 1;
                self.buf.clear();
                let s = match walk(&a.ring, &a.ram, head, Access::ReadThenWrite, &mut self.buf) {
                    Ok(s) if s.writable_len >= 1 => s,
                    Ok(_) => {
                        c.ctrl_malformed += 1;
                        c.malformed_direction += 1;
                        a.ring.push_used(head, 0);
                        continue;
                    }
                    Err(e) => {
                        c.ctrl_malformed += 1;
                        c.count_malformed(&e);
                        a.ring.push_used(head, 0);
                        continue;
                    }
                };
                let status = if s.readable_len > MAX_COMMAND_LEN {
                    ERR
                } else {
                    self.cmd.resize(s.readable_len, 0);
                    copy_from_iovecs(&self.buf.iov[..s.readable_segments], 0, &mut self.cmd);
                    let cmd = std::mem::take(&mut self.cmd);
                    let status = self.execute(&cmd);
                    self.cmd = cmd;
                    status
                };
                if status == OK {
                    c.ctrl_ok += 1;
                } else {
                    c.ctrl_err += 1;
                }
                let a = self.active.as_mut().expect("active");
                let ack = &self.buf.iov[s.readable_segments..];
                copy_to_iovecs(ack, 0, &[status]);
                a.ram.mark_dirty(
                    self.buf.regions[s.readable_segments],
                    ack[0].iov_base as *const u8,
                    1,
                );
                a.ring.push_used(head, 1);
            }
        }
    }

    /// Runs one command; returns the ack byte.
    fn execute(&mut self, cmd: &[u8]) -> u8 {
        let [class, command, data @ ..] = cmd else {
            return ERR;
        };
        let (class, command) = (u32::from(*class), u32::from(*command));
        let has = |bit| self.features.has(bit);
        let ok = match class {
            VIRTIO_NET_CTRL_RX if has(VIRTIO_NET_F_CTRL_RX) => self.rx_mode(command, data),
            VIRTIO_NET_CTRL_MAC => match command {
                VIRTIO_NET_CTRL_MAC_TABLE_SET if has(VIRTIO_NET_F_CTRL_RX) => self.mac_tables(data),
                VIRTIO_NET_CTRL_MAC_ADDR_SET if has(VIRTIO_NET_F_CTRL_MAC_ADDR) => {
                    self.mac_addr(data)
                }
                _ => false,
            },
            VIRTIO_NET_CTRL_VLAN if has(VIRTIO_NET_F_CTRL_VLAN) => self.vlan(command, data),
            VIRTIO_NET_CTRL_ANNOUNCE if has(VIRTIO_NET_F_GUEST_ANNOUNCE) => {
                self.announce_ack(command, data)
            }
            VIRTIO_NET_CTRL_MQ if has(VIRTIO_NET_F_MQ) => self.mq(command, data),
            VIRTIO_NET_CTRL_GUEST_OFFLOADS if has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) => {
                self.guest_offloads(command, data)
            }
            _ => false,
        };
        if ok { OK } else { ERR }
    }

    fn rx_mode(&mut self, command: u32, data: &[u8]) -> bool {
        let [on] = data else {
            return false;
        };
        let on = *on != 0;
        let extra = self.features.has(VIRTIO_NET_F_CTRL_RX_EXTRA);
        let set: fn(&mut RxFilter, bool) = match command {
            VIRTIO_NET_CTRL_RX_PROMISC => |f, on| f.promisc = on,
            VIRTIO_NET_CTRL_RX_ALLMULTI => |f, on| f.allmulti = on,
            VIRTIO_NET_CTRL_RX_ALLUNI if extra => |f, on| f.alluni = on,
            VIRTIO_NET_CTRL_RX_NOMULTI if extra => |f, on| f.nomulti = on,
            VIRTIO_NET_CTRL_RX_NOUNI if extra => |f, on| f.nouni = on,
            VIRTIO_NET_CTRL_RX_NOBCAST if extra => |f, on| f.nobcast = on,
            _ => return false,
        };
        self.shared.filter.update(|f| set(f, on));
        true
    }

    fn mac_tables(&mut self, data: &[u8]) -> bool {
        fn table(data: &[u8]) -> Option<(Vec<MacAddr>, bool, &[u8])> {
            let (count, rest) = data.split_first_chunk::<4>()?;
            let count = u32::from_le_bytes(*count) as usize;
            let bytes = count.checked_mul(6)?;
            if rest.len() < bytes {
                return None;
            }
            let (macs, rest) = rest.split_at(bytes);
            if count > MAC_TABLE_ENTRIES {
                return Some((Vec::new(), true, rest));
            }
            let macs = macs
                .chunks_exact(6)
                .map(|m| m.try_into().expect("6 bytes"))
                .collect();
            Some((macs, false, rest))
        }
        let Some((uni, uni_over, rest)) = table(data) else {
            return false;
        };
        let Some((multi, multi_over, rest)) = table(rest) else {
            return false;
        };
        if !rest.is_empty() {
            return false;
        }
        self.shared.filter.update(|f| {
            f.unicast = uni;
            f.unicast_overflow = uni_over;
            f.multicast = multi;
            f.multicast_overflow = multi_over;
        });
        true
    }

    fn mac_addr(&mut self, data: &[u8]) -> bool {
        let Ok(mac) = <MacAddr>::try_from(data) else {
            return false;
        };
        self.shared.filter.update(|f| f.mac = mac);
        self.shared.update_config(|c| c.mac = mac);
        true
    }

    fn vlan(&mut self, command: u32, data: &[u8]) -> bool {
        let Ok(vid) = <[u8; 2]>::try_from(data) else {
            return false;
        };
        let vid = u16::from_le_bytes(vid);
        let allow = match command {
            VIRTIO_NET_CTRL_VLAN_ADD => true,
            VIRTIO_NET_CTRL_VLAN_DEL => false,
            _ => return false,
        };
        self.shared.filter.update(|f| f.set_vlan(vid, allow))
    }

    fn announce_ack(&mut self, command: u32, data: &[u8]) -> bool {
        if command != VIRTIO_NET_CTRL_ANNOUNCE_ACK || !data.is_empty() {
            return false;
        }
        let mut was_pending = false;
        self.shared.update_config(|c| {
            was_pending = c.status & STATUS_ANNOUNCE != 0;
            c.status &= !STATUS_ANNOUNCE;
        });
        was_pending
    }

    fn mq(&mut self, command: u32, data: &[u8]) -> bool {
        if command != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
            return false;
        }
        let Ok(n) = <[u8; 2]>::try_from(data) else {
            return false;
        };
        let n = u16::from_le_bytes(n);
        if n < 1 || usize::from(n) > self.pairs.len() {
            return false;
        }
        match self.apply_pairs(n) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{}: enabling {n} queue pairs failed: {e}", self.shared.id);
                false
            }
        }
    }

    fn guest_offloads(&mut self, command: u32, data: &[u8]) -> bool {
        if command != VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET {
            return false;
        }
        let Ok(bits) = <[u8; 8]>::try_from(data) else {
            return false;
        };
        let wanted = Features::from_bits(u64::from_le_bytes(bits));
        // Only offloads the driver negotiated may be switched on.
        let allowed = self.features.intersection(GUEST_OFFLOADS);
        if !wanted.difference(allowed).is_empty() {
            return false;
        }
        match self.apply_offloads(wanted) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "{}: applying guest offloads {wanted} failed: {e}",
                    self.shared.id
                );
                false
            }
        }
    }
}
