#!/usr/bin/env python3
"""Prints the packet-path figures from criterion's last run, with their floors.

Run after `cargo bench -p benches`. Reads the median of every benchmark from
target/criterion/<group>/<size>/new/estimates.json; each measurement is one batch
of 256 frames, so ns/packet = median / 256.

The in-process rows have a second floor, the peer: the same batch through
virtio-queue's pop_descriptor_chain / add_used path (pair_tx/virtio_queue/<size>,
pair_rx/virtio_queue/<size>, measured interleaved with the device's batches).
Its ratio is device / peer: below 1 the device is faster.
"""
import json
import os
import sys

BATCH = 256
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "target"
)
ROOT = os.path.join(TARGET, "criterion")

# (device group, floor group, peer floor group or None, direction label)
PAIRS = [
    ("pair_tx", "memcpy", "pair_tx/virtio_queue", "TX, in-process pair"),
    ("pair_rx", "memcpy", "pair_rx/virtio_queue", "RX, in-process pair"),
    ("tap_tx", "tap_writev", None, "TX, tap"),
    ("tap_rx", "tap_readv", None, "RX, tap"),
    ("tap_rx", "tap_readv_room", None, "RX, tap, vs readv with room for 64 KiB"),
]
SIZES = ["64", "1514", "65536"]


def median_ns(group, size):
    if group is None:
        return None
    path = os.path.join(ROOT, *group.split("/"), size, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except FileNotFoundError:
        return None


def rate(ns_per_packet, size):
    pps = 1e9 / ns_per_packet
    if int(size) >= 1514:
        return "%.2f GB/s" % (pps * int(size) / 1e9)
    return "%.2f Mpps" % (pps / 1e6)


def main():
    if not os.path.isdir(ROOT):
        sys.exit("no criterion results: run `cargo bench -p benches` first")
    print(
        "| path | frame | device ns/packet | rate | floor | floor ns/packet | ratio"
        " | virtio-queue ns/packet | ratio to virtio-queue |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dev, floor, peer, label in PAIRS:
        for size in SIZES:
            d = median_ns(dev, size)
            if d is None:
                continue
            dn = d / BATCH
            f = median_ns(floor, size)
            fn = f / BATCH if f is not None else None
            p = median_ns(peer, size)
            pn = p / BATCH if p is not None else None
            print(
                "| %s | %s B | %.1f | %s | %s | %s | %s | %s | %s |"
                % (
                    label,
                    size,
                    dn,
                    rate(dn, size),
                    floor,
                    "%.1f" % fn if fn is not None else "-",
                    "%.2fx" % (dn / fn) if fn else "-",
                    "%.1f" % pn if pn is not None else "-",
                    "%.2fx" % (dn / pn) if pn else "-",
                )
            )


if __name__ == "__main__":
    main()
