//! The control queue: arbitrary commands (class, command, data) in arbitrary
//! chain layouts (split anywhere, the ack first, no room for the ack, a long
//! ack, indirect), interleaved with raw scribbles on the rings.
//!
//! Checked: no panic; the rig's memory and counter checks on every pass
//! (`fuzz_rigs::net::Rig::process`); a command processed alone is answered
//! with length 1 and `VIRTIO_NET_OK` or `VIRTIO_NET_ERR` (length 0 only for a
//! malformed chain); an ERR leaves the receive filter unchanged; an OK leaves
//! it as the command says (rx modes, MAC address, VLANs, MAC tables), and the
//! unambiguous commands of a negotiated class are never refused.

#![no_main]

use fuzz_rigs::net::{QueueOp, Rig, Which};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::*;
use virtio_net_standby::RxFilter;
use virtio_net_standby::features::Features;

#[derive(Arbitrary, Debug)]
struct Layout {
    /// Sizes of the readable pieces the command is split into (the rest goes
    /// in one last piece).
    splits: Vec<u8>,
    /// Length of the device-writable ack buffer (0: none).
    ack_len: u8,
    /// The ack buffer comes first (malformed).
    ack_first: bool,
    /// Through an indirect table.
    indirect: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A command, processed alone.
    Cmd {
        class: u8,
        cmd: u8,
        data: Vec<u8>,
        layout: Layout,
        head: u16,
    },
    /// A well-known command with well-formed data (so the handlers run).
    Known {
        which: u8,
        arg: u16,
        macs: Vec<[u8; 6]>,
        head: u16,
    },
    /// Anything to the rings.
    Raw(QueueOp),
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    size: u8,
    ops: Vec<Op>,
}

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

fn table(macs: &[[u8; 6]]) -> Option<(Vec<[u8; 6]>, bool, usize)> {
    Some(if macs.len() > 64 {
        (Vec::new(), true, 4 + 6 * macs.len())
    } else {
        (macs.to_vec(), false, 4 + 6 * macs.len())
    })
}

/// What the filter must be after `class, cmd, data` answered OK; `None` if the
/// command cannot succeed. `Some(None)`: succeeds without a filter change.
/// The second value: the command is unambiguous, so it must succeed.
fn model(
    f: Features,
    before: &RxFilter,
    class: u8,
    cmd: u8,
    data: &[u8],
) -> (Option<RxFilter>, bool) {
    let mut after = before.clone();
    let class = u32::from(class);
    let cmd = u32::from(cmd);
    match class {
        VIRTIO_NET_CTRL_RX if f.has(VIRTIO_NET_F_CTRL_RX) => {
            let [on] = data else { return (None, false) };
            let on = *on != 0;
            let extra = f.has(VIRTIO_NET_F_CTRL_RX_EXTRA);
            match cmd {
                VIRTIO_NET_CTRL_RX_PROMISC => after.promisc = on,
                VIRTIO_NET_CTRL_RX_ALLMULTI => after.allmulti = on,
                VIRTIO_NET_CTRL_RX_ALLUNI if extra => after.alluni = on,
                VIRTIO_NET_CTRL_RX_NOMULTI if extra => after.nomulti = on,
                VIRTIO_NET_CTRL_RX_NOUNI if extra => after.nouni = on,
                VIRTIO_NET_CTRL_RX_NOBCAST if extra => after.nobcast = on,
                _ => return (None, false),
            }
            (Some(after), true)
        }
        VIRTIO_NET_CTRL_MAC if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET => {
            if !f.has(VIRTIO_NET_F_CTRL_MAC_ADDR) {
                return (None, false);
            }
            let Ok(mac) = <[u8; 6]>::try_from(data) else {
                return (None, false);
            };
            after.mac = mac;
            (Some(after), true)
        }
        VIRTIO_NET_CTRL_MAC if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET => {
            if !f.has(VIRTIO_NET_F_CTRL_RX) {
                return (None, false);
            }
            // Two tables, each a count and that many addresses, nothing after.
            let read = |at: usize| -> Option<(Vec<[u8; 6]>, bool, usize)> {
                let n = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
                let end = at.checked_add(4)?.checked_add(n.checked_mul(6)?)?;
                if end > data.len() {
                    return None;
                }
                let macs: Vec<[u8; 6]> = data[at + 4..end]
                    .chunks(6)
                    .map(|c| c.try_into().expect("6 bytes"))
                    .collect();
                let (m, over, _) = table(&macs)?;
                Some((m, over, end))
            };
            let Some((uni, uo, next)) = read(0) else {
                return (None, false);
            };
            let Some((multi, mo, end)) = read(next) else {
                return (None, false);
            };
            if end != data.len() {
                return (None, false);
            }
            after.unicast = uni;
            after.unicast_overflow = uo;
            after.multicast = multi;
            after.multicast_overflow = mo;
            (Some(after), true)
        }
        VIRTIO_NET_CTRL_VLAN if f.has(VIRTIO_NET_F_CTRL_VLAN) => {
            let Ok(v) = <[u8; 2]>::try_from(data) else {
                return (None, false);
            };
            let vid = u16::from_le_bytes(v);
            let allow = match cmd {
                VIRTIO_NET_CTRL_VLAN_ADD => true,
                VIRTIO_NET_CTRL_VLAN_DEL => false,
                _ => return (None, false),
            };
            if !after.set_vlan(vid, allow) {
                return (None, false);
            }
            (Some(after), true)
        }
        // Announce, MQ and offloads change no filter; their success depends on
        // state the model does not keep.
        _ => (Some(after), false),
    }
}

fuzz_target!(|input: Input| {
    let size = Rig::SIZES[usize::from(input.size) % Rig::SIZES.len()].max(4);
    let Some(mut rig) = Rig::new(Which::Ctrl, input.features, size, false, false) else {
        return;
    };
    let features = rig.g.features;
    for op in input.ops.iter().take(256) {
        let (class, cmd, data, layout, head) = match op {
            Op::Raw(op) => {
                if !rig.apply(op) {
                    return;
                }
                continue;
            }
            Op::Cmd {
                class,
                cmd,
                data,
                layout,
                head,
            } => (*class, *cmd, data.clone(), Some(layout), *head),
            Op::Known {
                which,
                arg,
                macs,
                head,
            } => {
                let (class, cmd, data) = match which % 6 {
                    0 => (
                        VIRTIO_NET_CTRL_RX,
                        *arg as u32 % 6,
                        vec![(*arg >> 8) as u8 & 1],
                    ),
                    1 => (
                        VIRTIO_NET_CTRL_MAC,
                        VIRTIO_NET_CTRL_MAC_ADDR_SET,
                        macs.first().copied().unwrap_or([2, 0, 0, 0, 0, 1]).to_vec(),
                    ),
                    2 => (
                        VIRTIO_NET_CTRL_VLAN,
                        u32::from(arg & 1),
                        ((arg >> 1) % 4200).to_le_bytes().to_vec(),
                    ),
                    3 => {
                        let split = usize::from(*arg) % (macs.len() + 1);
                        let mut d = (split as u32).to_le_bytes().to_vec();
                        macs[..split].iter().for_each(|m| d.extend_from_slice(m));
                        d.extend_from_slice(&((macs.len() - split) as u32).to_le_bytes());
                        macs[split..].iter().for_each(|m| d.extend_from_slice(m));
                        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, d)
                    }
                    4 => (
                        VIRTIO_NET_CTRL_MQ,
                        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                        arg.to_le_bytes().to_vec(),
                    ),
                    _ => (
                        VIRTIO_NET_CTRL_ANNOUNCE,
                        VIRTIO_NET_CTRL_ANNOUNCE_ACK,
                        vec![],
                    ),
                };
                (class as u8, cmd as u8, data, None, *head)
            }
        };
        let before = (*rig.dev.rx_filter()).clone();
        let mut bytes = vec![class, cmd];
        bytes.extend_from_slice(&data);
        // The readable pieces, then the ack.
        let mut pieces: Vec<(u16, bool)> = Vec::new();
        let mut left = bytes.len();
        let (ack_len, ack_first, indirect) = match layout {
            Some(l) => {
                for s in &l.splits {
                    if left == 0 {
                        break;
                    }
                    let n = usize::from(*s).min(left);
                    pieces.push((n as u16, false));
                    left -= n;
                }
                (u16::from(l.ack_len), l.ack_first, l.indirect)
            }
            None => (1, false, false),
        };
        if left > 0 {
            pieces.push((left as u16, false));
        }
        if ack_len > 0 {
            if ack_first {
                pieces.insert(0, (ack_len, true));
            } else {
                pieces.push((ack_len, true));
            }
        }
        // A chain, indirect or not, may not be longer than the queue.
        let limit = if indirect {
            32.min(usize::from(size))
        } else {
            usize::from(size)
        };
        let well_formed = ack_len > 0
            && !ack_first
            && bytes.len() < 4096
            && pieces.len() <= limit.min(64)
            && (!indirect || features.has(virtio_net_standby::features::F_RING_INDIRECT_DESC));
        let old_used = rig.used_idx();
        let head = rig.chain(head, &pieces, indirect, &bytes);
        let Some(out) = rig.process() else { return };
        if !rig.clean() || out.chains != 1 || rig.used_idx() != old_used.wrapping_add(1) {
            // Other chains were pending (scribbles), or the layout is hostile:
            // the rig's checks are all that apply.
            continue;
        }
        let (id, len) = rig.used_entry(old_used);
        assert_eq!(id, u32::from(head), "the used entry names another chain");
        let after = (*rig.dev.rx_filter()).clone();
        if !well_formed {
            if ack_len == 0 || ack_first {
                assert_eq!(
                    len, 0,
                    "a chain without room for the ack was used with length {len}"
                );
                assert_eq!(after, before, "a malformed command changed the filter");
            }
            continue;
        }
        assert_eq!(len, 1, "a command was answered with length {len}");
        // Where the ack went: the first writable buffer, its first byte.
        let ack = rig.ack_byte(head, indirect);
        assert!(ack == OK || ack == ERR, "ack byte {ack:#x}");
        let (expect, must) = model(features, &before, class, cmd, &data);
        if ack == ERR {
            assert_eq!(
                after, before,
                "command {class}/{cmd} failed but changed the filter"
            );
            assert!(
                !must || expect.is_none(),
                "command {class}/{cmd} {data:x?} refused though negotiated and well formed"
            );
        } else {
            let Some(expect) = expect else {
                panic!("command {class}/{cmd} {data:x?} answered OK but cannot succeed");
            };
            assert_eq!(
                after, expect,
                "command {class}/{cmd} {data:x?} left the filter wrong"
            );
            if class as u32 == VIRTIO_NET_CTRL_MAC && cmd as u32 == VIRTIO_NET_CTRL_MAC_ADDR_SET {
                assert_eq!(
                    rig.dev.config().mac,
                    after.mac,
                    "MAC set in the filter, not the config"
                );
            }
        }
        // Tables never exceed their size; an overflowed table is empty.
        assert!(after.unicast.len() <= 64 && after.multicast.len() <= 64);
        assert!(!after.unicast_overflow || after.unicast.is_empty());
        assert!(!after.multicast_overflow || after.multicast.is_empty());
    }
});
