#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/<target>/seed-*: the unit tests' and
scenarios' inputs (a Linux driver's bring-up, well-formed chains and commands, the
vhost-user session, the hot-plug and migration scenarios, every valid saved state)
encoded the way `arbitrary` 1.x decodes the targets' input types:

- an enum variant is a little-endian u32 `v`, variant `(v * count) >> 32`;
- a collection in the last field takes the rest, with a byte whose low bit says
  "one more element" before each element; elsewhere the same, ending on a 0 byte;
- `Option` is a bool byte then the value; integers are little-endian, bools a byte.

Run it from anywhere: `python3 fuzz/seeds.py`. The rest of each corpus is the last
long run's, merged (see README.md).
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def variant(k, count):
    """The smallest u32 that selects variant k of count."""
    v = ((k << 32) + count - 1) // count
    assert (v * count) >> 32 == k
    return struct.pack("<I", v)


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def boolean(b):
    return u8(1 if b else 0)


def items(elems):
    """A collection that is not the last field: (1, element)* then 0."""
    return b"".join(b"\x01" + e for e in elems) + b"\x00"


def rest(elems):
    """A collection in the last field: (1, element)*."""
    return b"".join(b"\x01" + e for e in elems)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# tx_queue / rx_queue: QueueInput { features, size, opaque, truncating, ops }.
Q = 10  # QueueOp variants


def chain(head, bufs, indirect=False):
    return variant(1, Q) + u16(head) + items([u16(l) + boolean(w) for l, w in bufs]) + boolean(indirect)


def frame(length, dst=0, fill=0xAB):
    return variant(6, Q) + u16(length) + u8(dst) + u8(fill)


PROCESS = variant(9, Q)
ALL = u64(-1)
SIZE16 = u8(4)  # Rig::SIZES[4] = 16

for name, feats in [("all", ALL), ("plain", u64(0)), ("mrg", u64(1 << 15 | 1 << 29 | 1 << 28))]:
    write("tx_queue", name, feats + SIZE16 + boolean(False) + boolean(False) + rest([
        chain(0, [(12 + 60, False)]),
        PROCESS,
        chain(1, [(12, False), (1500, False)]),
        chain(3, [(12 + 200, False)], indirect=True),
        PROCESS,
    ]))
    write("rx_queue", name, feats + SIZE16 + boolean(False) + boolean(False) + rest([
        chain(0, [(1536, True)]),
        chain(1, [(12, True), (2000, True)]),
        frame(12 + 60),
        frame(12 + 1514, dst=2),
        PROCESS,
        chain(2, [(64, True)]),
        chain(3, [(4000, True)], indirect=True),
        frame(12 + 3000, dst=3),
        PROCESS,
    ]))
write("rx_queue", "tap", ALL + SIZE16 + boolean(True) + boolean(True) + rest([
    chain(0, [(100, True)] * 4),
    frame(12 + 60),
    frame(12 + 9000),
    PROCESS,
]))

# ctrl_queue: Input { features, size, ops }; Op::Known { which, arg, macs, head }.


def known(which, arg, macs=(), head=0):
    return variant(1, 3) + u8(which) + u16(arg) + items(list(macs)) + u16(head)


mac = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
write("ctrl_queue", "commands", ALL + SIZE16 + rest([
    known(0, 0x0000),          # promisc off
    known(0, 0x0101),          # allmulti on
    known(1, 0, [mac]),        # MAC address set
    known(2, 10 << 1),         # VLAN 10 add
    known(2, 10 << 1 | 1),     # VLAN 10 del
    known(3, 1, [mac, bytes([1, 0, 0x5e, 0, 0, 1])]),  # MAC tables: 1 unicast, 1 multicast
    known(4, 1),               # MQ pairs 1
    known(5, 0),               # announce ack
]))

# virtio_pci_regs: Input { intx, requiring, ops }; 10 Op variants.
V = 10


def status(s):
    return variant(6, V) + u8(s)


def driver_features(high, value):
    return variant(7, V) + boolean(high) + u32(value)


def queue_setup(q, size, enable, addr):
    return variant(8, V) + u16(q) + u16(size) + boolean(enable) + u32(addr)


write("virtio_pci_regs", "linux-probe", boolean(False) + u64(0) + rest([
    status(1), status(3),
    driver_features(False, 1 << 29 | 1 << 28), driver_features(True, 1 | 1 << 30),
    status(0xB),
    queue_setup(0, 256, True, 0x1000), queue_setup(1, 256, True, 0x8000), queue_setup(2, 64, True, 0x10000),
    status(0xF),
    variant(9, V),
    status(1), status(3), status(0xB), status(0xF),
]))

# pci_config: Input { function, ops }; Read, Write, Reg.


def reg(which, value):
    return variant(2, 3) + u8(which) + u32(value)


def wr(off, length, value):
    return variant(1, 3) + u16(off) + u8(length) + u32(value)


for f in range(3):
    write("pci_config", "enumerate-%d" % f, u8(f) + rest(
        [reg(i, 0xFFFFFFFF) for i in range(6)]
        + [reg(0, 0xFE000000), reg(1, 0), reg(2, 0xFE100000), reg(3, 0)]
        + [wr(0x04, 2, 0x0006), wr(0x06, 2, 0xFFFF), wr(0x3C, 1, 11)]
        + [reg(6 + i, 0xFFFFFFFF) for i in range(12)]
    ))

# hotplug_slot: Input { surprise, cold, ops }; 10 Op variants.
H = 10
PLUG, UNPLUG, CANCEL, SURPRISE = (variant(k, H) for k in range(4))
SERVICE = variant(7, H)


def run(ms):
    return variant(6, H) + u16(ms // 4)


write("hotplug_slot", "plug", boolean(False) + boolean(False) + rest([PLUG, run(5000), UNPLUG, run(7000)]))
write("hotplug_slot", "cancel-in-window", boolean(False) + boolean(True) + rest([UNPLUG, SERVICE, run(1000), CANCEL, run(7000)]))
write("hotplug_slot", "cancel-unread", boolean(False) + boolean(True) + rest([UNPLUG, CANCEL, run(7000)]))
write("hotplug_slot", "surprise-replug", boolean(True) + boolean(True) + rest([SURPRISE, PLUG, run(3000), run(3000)]))

# failover_events: Input { two_pairs, standby_guest, wait, ops }; 10 Op variants.
F = 10
SETTLE, MIGRATE, FCANCEL, FAIL, COMPLETE, DEADLINE = (variant(k, F) for k in range(1, 7))


def frun(ms):
    return variant(0, F) + u16(ms // 8)


def mask(pair, masked):
    return variant(8, F) + u8(pair) + boolean(masked)


write("failover_events", "migrate-out-in", boolean(False) + boolean(True) + u8(0) + rest([MIGRATE, SETTLE, COMPLETE]))
write("failover_events", "abort-in-window", boolean(False) + boolean(True) + u8(0) + rest([MIGRATE, frun(2000), FCANCEL, SETTLE]))
write("failover_events", "guest-never-ejects", boolean(True) + boolean(True) + u8(1) + rest([mask(0, True), MIGRATE, frun(3000), DEADLINE, SETTLE]))
write("failover_events", "fail-active", boolean(False) + boolean(True) + u8(2) + rest([MIGRATE, SETTLE, FAIL, SETTLE, MIGRATE, SETTLE, COMPLETE]))
write("failover_events", "old-driver", boolean(False) + boolean(False) + u8(0) + rest([MIGRATE, SETTLE, COMPLETE]))

# device_state: Input (6 variants) of Bytes::Edited { xors: [], cut: None, tail: [] }:
# every type's valid state, unedited.
for k, name in enumerate(["net", "transport", "config", "msix", "msi", "root-port"]):
    write("device_state", name, variant(k, 6) + variant(2, 3) + b"\x00" + b"\x00")

# vhost_user_messages: Vec<Msg> of Msg::Step(i): the protocol test's session.
write("vhost_user_messages", "session", rest([variant(1, 3) + u8(i) for i in range(12)]))
write("vhost_user_messages", "session-4-rings", rest([variant(1, 3) + u8(i) for i in list(range(12)) + list(range(18, 24)) + list(range(30, 36)) + list(range(42, 48))]))

# hostile_guest: its input is raw entropy (8 bytes a draw); the hostile-guest test
# draws from xorshift64* seeded 1, 2, 3: the same streams, 4 KiB each.


def xorshift(seed, n):
    x, out = seed, bytearray()
    while len(out) < n:
        x ^= x >> 12
        x ^= (x << 25) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 27
        out += u64(x * 0x2545F4914F6CDD1D)
    return bytes(out[:n])


for s in (1, 2, 3):
    write("hostile_guest", "rng-%d" % s, xorshift(s, 4096))
