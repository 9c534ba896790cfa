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

use crate::backend::NetBackend;
use crate::chain::{Access, ChainBuf, walk};
use crate::config::STATUS_ANNOUNCE;
use crate::counters::NetCounters;
use crate::features::{Features, GUEST_OFFLOADS};
use crate::filter::{MAC_TABLE_ENTRIES, MacAddr, RxFilter};
use crate::iovec::{copy_from_iovecs, copy_to_iovecs};
use crate::memory::{GuestRam, MemoryWatch};
use crate::processed::Processed;
use crate::queue_pair::QueuePairHandle;
use crate::ring::{self, RingFeatures, SplitRing};
use crate::shared::Shared;
use virtio_device::{ActivateQueue, VirtioInterrupt, VirtioInterruptType};

use crate::device;

/// How much of a command the device copies out of guest memory: every command
/// but a long MAC table fits. A MAC table of any length is read in place (only
/// its counts once it overflows), so no command makes the device copy more.
pub const MAX_COMMAND_LEN: usize = 4096;

/// Commands handled per call before it returns with `more`, so a driver that
/// keeps queueing commands cannot hold the control queue (and, through MQ and
/// offload commands, the queue pairs) forever.
pub const CTRL_BUDGET: usize = 256;

/// A command's device-readable bytes: a copied prefix, and the iovecs to read
/// the rest in place.
struct Command<'a> {
    prefix: &'a [u8],
    iov: &'a [libc::iovec],
    len: usize,
}

impl Command<'_> {
    /// The bytes after class and command, if the whole command was copied.
    fn data(&self) -> Option<&[u8]> {
        (self.prefix.len() == self.len).then(|| &self.prefix[2..])
    }

    /// `N` bytes at `offset`, wherever they lie.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        if end > self.len {
            return None;
        }
        let mut out = [0u8; N];
        if end <= self.prefix.len() {
            out.copy_from_slice(&self.prefix[offset..end]);
        } else if copy_from_iovecs(self.iov, offset, &mut out) != N {
            return None;
        }
        Some(out)
    }
}

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

    pub(crate) fn apply_pairs(&mut self, n: u16) -> std::io::Result<()> {
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
    ) -> device::Result<()> {
        let ram = GuestRam::new(watch.current())?;
        let ring = SplitRing::new(&q.queue, &ram, RingFeatures::from_features(self.features))
            .map_err(|source| device::Error::Queue {
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

    pub(crate) fn deactivate(&mut self) {
        self.active = None;
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
                if out.chains >= CTRL_BUDGET {
                    out.more = true;
                    return Ok(());
                }
                let a = self.active.as_mut().expect("active");
                let head = a.ring.pop_head()?;
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
                // Executing needs `&mut self`: lend the buffers out meanwhile (an
                // empty ChainBuf allocates nothing).
                let buf = std::mem::replace(&mut self.buf, ChainBuf::with_capacity(0));
                let mut prefix = std::mem::take(&mut self.cmd);
                let readable = &buf.iovecs()[..s.readable_segments];
                prefix.resize(s.readable_len.min(MAX_COMMAND_LEN), 0);
                copy_from_iovecs(readable, 0, &mut prefix);
                let status = self.execute(&Command {
                    prefix: &prefix,
                    iov: readable,
                    len: s.readable_len,
                });
                self.cmd = prefix;
                self.buf = buf;
                if status == OK {
                    c.ctrl_ok += 1;
                } else {
                    c.ctrl_err += 1;
                }
                let a = self.active.as_mut().expect("active");
                let ack = &self.buf.iovecs()[s.readable_segments..];
                copy_to_iovecs(ack, 0, &[status]);
                a.ram.mark_dirty(
                    self.buf.regions()[s.readable_segments],
                    ack[0].iov_base as *const u8,
                    1,
                );
                a.ring.push_used(head, 1);
            }
        }
    }

    /// Runs one command; returns the ack byte.
    fn execute(&mut self, cmd: &Command<'_>) -> u8 {
        let [class, command, ..] = cmd.prefix else {
            return ERR;
        };
        let (class, command) = (u32::from(*class), u32::from(*command));
        if class == VIRTIO_NET_CTRL_MAC && command == VIRTIO_NET_CTRL_MAC_TABLE_SET {
            let ok = self.features.has(VIRTIO_NET_F_CTRL_RX) && self.mac_tables(cmd);
            return if ok { OK } else { ERR };
        }
        // Every other command is short: one longer than the copied prefix is wrong.
        let Some(data) = cmd.data() else {
            return ERR;
        };
        let has = |bit| self.features.has(bit);
        let ok = match class {
            VIRTIO_NET_CTRL_RX if has(VIRTIO_NET_F_CTRL_RX) => self.rx_mode(command, data),
            VIRTIO_NET_CTRL_MAC => match command {
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

    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: a unicast and a multicast table, each a
    /// little-endian entry count followed by that many addresses, and nothing
    /// after. A table of more than [`MAC_TABLE_ENTRIES`] overflows: every address
    /// of its kind is accepted (as QEMU does), and its entries are not read.
    fn mac_tables(&mut self, cmd: &Command<'_>) -> bool {
        let table = |offset: usize| -> Option<(Vec<MacAddr>, bool, usize)> {
            let count = u32::from_le_bytes(cmd.read::<4>(offset)?) as usize;
            let start = offset + 4;
            let end = count.checked_mul(6)?.checked_add(start)?;
            if end > cmd.len {
                return None;
            }
            if count > MAC_TABLE_ENTRIES {
                return Some((Vec::new(), true, end));
            }
            let macs = (0..count)
                .map(|i| cmd.read::<6>(start + 6 * i))
                .collect::<Option<Vec<MacAddr>>>()?;
            Some((macs, false, end))
        };
        let Some((uni, uni_over, next)) = table(2) else {
            return false;
        };
        let Some((multi, multi_over, end)) = table(next) else {
            return false;
        };
        if end != cmd.len {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StandbyNetBuilder;
    use crate::device::StandbyNet;
    use crate::features::DEFAULT_OFFER;
    use crate::processed::Processed;
    use crate::testing::{GuestDriver, GuestMem, RecordingBackend, TestMemory};

    const C_OK: u8 = VIRTIO_NET_OK as u8;
    const C_ERR: u8 = VIRTIO_NET_ERR as u8;

    struct Fx {
        dev: StandbyNet<GuestMem, RecordingBackend>,
        be: Vec<RecordingBackend>,
        g: GuestDriver,
    }

    fn fx_pairs(features: Features, pairs: u16) -> Fx {
        let be: Vec<_> = (0..pairs).map(|_| RecordingBackend::default()).collect();
        let mut dev: StandbyNet<GuestMem, _> = StandbyNetBuilder::new()
            .queue_pairs(pairs)
            .build(be.clone())
            .unwrap();
        let g = GuestDriver::bring_up(&mut dev, &TestMemory::new(8 << 20), features, 64).unwrap();
        Fx { dev, be, g }
    }

    fn fx(features: Features) -> Fx {
        fx_pairs(features, 1)
    }

    impl Fx {
        fn cmd(&mut self, class: u32, cmd: u32, data: &[u8]) -> u8 {
            self.g.ctrl(&self.dev, class as u8, cmd as u8, data)
        }
    }

    fn mac_table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
        let mut v = (uni.len() as u32).to_le_bytes().to_vec();
        uni.iter().for_each(|m| v.extend_from_slice(m));
        v.extend_from_slice(&(multi.len() as u32).to_le_bytes());
        multi.iter().for_each(|m| v.extend_from_slice(m));
        v
    }

    #[test]
    fn rx_modes() {
        let mut f = fx(DEFAULT_OFFER);
        assert!(f.dev.rx_filter().promisc, "promiscuous after reset");
        type Getter = fn(&RxFilter) -> bool;
        let modes: [(u32, Getter); 6] = [
            (VIRTIO_NET_CTRL_RX_PROMISC, |f| f.promisc),
            (VIRTIO_NET_CTRL_RX_ALLMULTI, |f| f.allmulti),
            (VIRTIO_NET_CTRL_RX_ALLUNI, |f| f.alluni),
            (VIRTIO_NET_CTRL_RX_NOMULTI, |f| f.nomulti),
            (VIRTIO_NET_CTRL_RX_NOUNI, |f| f.nouni),
            (VIRTIO_NET_CTRL_RX_NOBCAST, |f| f.nobcast),
        ];
        for (cmd, get) in modes {
            assert_eq!(f.cmd(VIRTIO_NET_CTRL_RX, cmd, &[1]), C_OK);
            assert!(get(&f.dev.rx_filter()), "{cmd} on");
            assert_eq!(f.cmd(VIRTIO_NET_CTRL_RX, cmd, &[0]), C_OK);
            assert!(!get(&f.dev.rx_filter()), "{cmd} off");
        }
        // Wrong sizes and unknown commands.
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[]),
            C_ERR
        );
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[1, 1]),
            C_ERR
        );
        assert_eq!(f.cmd(VIRTIO_NET_CTRL_RX, 6, &[1]), C_ERR);
        // The extra modes need CTRL_RX_EXTRA.
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_RX_EXTRA));
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]),
            C_OK
        );
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
            C_ERR
        );
        // And all of them need CTRL_RX.
        let mut f = fx(crate::features::prune(
            DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_RX),
        ));
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
            C_ERR
        );
        let c = f.dev.counters();
        assert_eq!((c.ctrl_ok, c.ctrl_err), (0, 1));
    }

    #[test]
    fn mac_table_set() {
        let mut f = fx(DEFAULT_OFFER);
        let uni = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]];
        let multi = [[1, 0, 0x5e, 0, 0, 1]];
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &mac_table(&uni, &multi)
            ),
            C_OK
        );
        let fl = f.dev.rx_filter();
        assert_eq!(
            (fl.unicast.as_slice(), fl.multicast.as_slice()),
            (&uni[..], &multi[..])
        );
        // A table far longer than the copied prefix: read in place.
        let huge: Vec<[u8; 6]> = (0..1000u32)
            .map(|i| [2, 0, 0, 0, (i >> 8) as u8, i as u8])
            .collect();
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &mac_table(&huge, &multi)
            ),
            C_OK
        );
        let fl = f.dev.rx_filter();
        assert!(fl.unicast_overflow && fl.unicast.is_empty());
        assert_eq!(fl.multicast.as_slice(), &multi[..]);
        // Overflow: more than 64 entries accept all of that kind.
        let many: Vec<[u8; 6]> = (0..65u8).map(|i| [1, 0, 0x5e, 0, 0, i]).collect();
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &mac_table(&[], &many)
            ),
            C_OK
        );
        let fl = f.dev.rx_filter();
        assert!(fl.multicast_overflow && fl.multicast.is_empty() && !fl.unicast_overflow);
        // Malformed tables change nothing.
        let before = f.dev.rx_filter();
        let mut short = mac_table(&uni, &multi);
        short.pop();
        let mut long = mac_table(&uni, &multi);
        long.push(0);
        let mut lying = mac_table(&uni, &multi);
        lying[0] = 200;
        let mut huge = mac_table(&[], &[]);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        for bad in [short, long, lying, huge, vec![], vec![1, 0, 0]] {
            assert_eq!(
                f.cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &bad),
                C_ERR
            );
        }
        assert_eq!(f.dev.rx_filter(), before);
    }

    #[test]
    fn mac_addr_set_changes_filter_and_config() {
        let mut f = fx(DEFAULT_OFFER);
        let mac = [2, 0x11, 0x22, 0x33, 0x44, 0x55];
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &mac),
            C_OK
        );
        assert_eq!(f.dev.rx_filter().mac, mac);
        assert_eq!(f.dev.config().mac, mac);
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &mac[..5]),
            C_ERR
        );
        assert_eq!(f.cmd(VIRTIO_NET_CTRL_MAC, 7, &mac), C_ERR);
        // Reset brings back the configured MAC.
        crate::VirtioDevice::reset(&mut f.dev);
        assert_eq!(f.dev.config().mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_MAC_ADDR));
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &mac),
            C_ERR
        );
    }

    #[test]
    fn vlans() {
        let mut f = fx(DEFAULT_OFFER);
        assert!(
            !f.dev.rx_filter().vlan_allowed(100),
            "CTRL_VLAN negotiated: all filtered"
        );
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_VLAN,
                VIRTIO_NET_CTRL_VLAN_ADD,
                &100u16.to_le_bytes()
            ),
            C_OK
        );
        assert!(f.dev.rx_filter().vlan_allowed(100));
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_VLAN,
                VIRTIO_NET_CTRL_VLAN_DEL,
                &100u16.to_le_bytes()
            ),
            C_OK
        );
        assert!(!f.dev.rx_filter().vlan_allowed(100));
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_VLAN,
                VIRTIO_NET_CTRL_VLAN_ADD,
                &4096u16.to_le_bytes()
            ),
            C_ERR
        );
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, &[1]),
            C_ERR
        );
        assert_eq!(f.cmd(VIRTIO_NET_CTRL_VLAN, 2, &1u16.to_le_bytes()), C_ERR);
        let f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_CTRL_VLAN));
        assert!(
            f.dev.rx_filter().vlan_allowed(100),
            "not negotiated: all allowed"
        );
    }

    #[test]
    fn announce_ack_clears_the_bit() {
        let mut f = fx(DEFAULT_OFFER);
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
            C_ERR,
            "nothing to ack"
        );
        f.dev.announce().unwrap();
        assert_eq!(f.dev.config().status & STATUS_ANNOUNCE, STATUS_ANNOUNCE);
        assert_eq!(f.g.interrupt.config_count(), 1);
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
            C_OK
        );
        assert_eq!(f.dev.config().status & STATUS_ANNOUNCE, 0);
        let f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_GUEST_ANNOUNCE));
        assert!(matches!(
            f.dev.announce(),
            Err(crate::Error::AnnounceNotNegotiated)
        ));
    }

    #[test]
    fn mq_pairs_set_enables_backends() {
        let mut f = fx_pairs(DEFAULT_OFFER, 4);
        assert_eq!(f.g.rx.len(), 4);
        assert_eq!(f.dev.active_queue_pairs(), 1);
        for b in &f.be {
            b.log.lock().unwrap().enabled.clear();
        }
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &3u16.to_le_bytes()
            ),
            C_OK
        );
        assert_eq!(f.dev.active_queue_pairs(), 3);
        let enabled: Vec<_> =
            f.be.iter()
                .map(|b| b.log.lock().unwrap().enabled.clone())
                .collect();
        assert_eq!(
            enabled,
            vec![vec![true], vec![true], vec![true], vec![false]]
        );
        for bad in [0u16, 5] {
            assert_eq!(
                f.cmd(
                    VIRTIO_NET_CTRL_MQ,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                    &bad.to_le_bytes()
                ),
                C_ERR
            );
        }
        assert_eq!(
            f.cmd(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, &[0; 8]),
            C_ERR
        );
        assert_eq!(f.dev.active_queue_pairs(), 3);
    }

    #[test]
    fn disabled_pairs_receive_nothing() {
        let mut f = fx_pairs(DEFAULT_OFFER, 2);
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &2u16.to_le_bytes()
            ),
            C_OK
        );
        f.g.post_rx(1, 4);
        f.be[1]
            .incoming
            .lock()
            .unwrap()
            .push_back(crate::testing::frame([0xff; 6], &[1; 20]));
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &1u16.to_le_bytes()
            ),
            C_OK
        );
        // A detached tap queue fails every read: a disabled pair must not try.
        assert_eq!(
            f.dev.queue_pair(1).unwrap().process_rx(),
            Processed::default()
        );
        assert_eq!(f.be[1].incoming.lock().unwrap().len(), 1);
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &2u16.to_le_bytes()
            ),
            C_OK
        );
        assert_eq!(f.dev.queue_pair(1).unwrap().process_rx().chains, 1);
    }

    #[test]
    fn a_flood_of_commands_is_served_in_budgeted_rounds() {
        let be = vec![RecordingBackend::default()];
        let mut dev: StandbyNet<GuestMem, _> =
            StandbyNetBuilder::new().queue_size(1024).build(be).unwrap();
        let mut g = GuestDriver::bring_up(&mut dev, &TestMemory::new(8 << 20), DEFAULT_OFFER, 1024)
            .unwrap();
        for _ in 0..300 {
            g.queue_ctrl(
                VIRTIO_NET_CTRL_RX as u8,
                VIRTIO_NET_CTRL_RX_PROMISC as u8,
                &[1],
            );
        }
        let p = dev.process_ctrl();
        assert_eq!((p.chains, p.more), (CTRL_BUDGET, true));
        let p = dev.process_ctrl();
        assert_eq!((p.chains, p.more), (300 - CTRL_BUDGET, false));
        assert_eq!(dev.counters().ctrl_ok, 300);
    }

    #[test]
    fn guest_offloads_set_reaches_every_backend() {
        let mut f = fx_pairs(DEFAULT_OFFER, 2);
        let negotiated = f.be[0]
            .log
            .lock()
            .unwrap()
            .offloads
            .last()
            .copied()
            .unwrap();
        assert_eq!(
            negotiated, GUEST_OFFLOADS,
            "negotiated offloads applied at FEATURES_OK"
        );
        let csum_only = Features::empty().with(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &csum_only.bits().to_le_bytes()
            ),
            C_OK
        );
        for b in &f.be {
            assert_eq!(b.log.lock().unwrap().offloads.last(), Some(&csum_only));
        }
        // An offload never negotiated, or a host bit, is refused.
        let host = Features::empty().with(VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &host.bits().to_le_bytes()
            ),
            C_ERR
        );
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &[0; 4]
            ),
            C_ERR
        );
        let mut f = fx(DEFAULT_OFFER.without(VIRTIO_NET_F_GUEST_UFO));
        let ufo = Features::empty().with(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            f.cmd(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &ufo.bits().to_le_bytes()
            ),
            C_ERR
        );
    }

    #[test]
    fn unknown_and_malformed_commands() {
        let mut f = fx(DEFAULT_OFFER);
        assert_eq!(f.cmd(99, 0, &[]), C_ERR);
        assert_eq!(f.cmd(VIRTIO_NET_CTRL_NOTF_COAL, 0, &[0; 8]), C_ERR);
        // A command of one byte.
        let a = f.g.mem.alloc(2, 1);
        let ctrl = f.g.ctrl.as_mut().unwrap();
        ctrl.add_chain(&[(a, 1, false), (a + 1, 1, true)]);
        // No writable byte for the ack: returned with length 0.
        ctrl.add_chain(&[(a, 2, false)]);
        // Longer than the device copies, and not a MAC table: ERR.
        let big = f.g.mem.alloc(MAX_COMMAND_LEN as u64 + 10, 1);
        let ack = f.g.mem.alloc(1, 1);
        let ctrl = f.g.ctrl.as_mut().unwrap();
        ctrl.add_chain(&[(big, MAX_COMMAND_LEN as u32 + 1, false), (ack, 1, true)]);
        ctrl.publish();
        f.dev.process_ctrl();
        let ctrl = f.g.ctrl.as_mut().unwrap();
        let got: Vec<u32> = (0..3).map(|_| ctrl.pop_used().unwrap().1).collect();
        assert_eq!(got, vec![1, 0, 1]);
        assert_eq!(f.g.mem.read(a + 1, 1)[0], C_ERR);
        assert_eq!(f.g.mem.read(ack, 1)[0], C_ERR);
        let c = f.dev.counters();
        assert_eq!(c.ctrl_malformed, 1);
        assert_eq!(c.ctrl_err, 4);
        assert!(f.g.interrupt.queue_count(2) >= 1);
    }
}
