#!/usr/bin/env python3
"""Prints the packet-path figures from criterion's last run, with their floors.

Run after `cargo bench -p benches`. Reads the median of every benchmark from
target/criterion/<group>/<size>/new/estimates.json; each measurement is one batch
of 256 frames, so ns/packet = median / 256.
"""
import json
import os
import sys

BATCH = 256
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "criterion")

# (device group, floor group, direction label)
PAIRS = [
    ("pair_tx", "memcpy", "TX, in-process pair"),
    ("pair_rx", "memcpy", "RX, in-process pair"),
    ("tap_tx", "tap_writev", "TX, tap"),
    ("tap_rx", "tap_readv", "RX, tap"),
]
SIZES = ["64", "1514", "65536"]


def median_ns(group, size):
    path = os.path.join(ROOT, group, size, "new", "estimates.json")
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
    print("| path | frame | device ns/packet | rate | floor | floor ns/packet | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dev, floor, label in PAIRS:
        for size in SIZES:
            d = median_ns(dev, size)
            if d is None:
                continue
            f = median_ns(floor, size)
            dn = d / BATCH
            fn = f / BATCH if f is not None else None
            print(
                "| %s | %s B | %.1f | %s | %s | %s | %s |"
                % (
                    label,
                    size,
                    dn,
                    rate(dn, size),
                    floor,
                    "%.1f" % fn if fn is not None else "-",
                    "%.2fx" % (dn / fn) if fn else "-",
                )
            )


if __name__ == "__main__":
    main()
