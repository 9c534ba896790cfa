#!/usr/bin/env bash
# Runs two or more builds of the packet_path bench in interleaved rounds (the
# order reverses every round), each in a fresh network namespace (the tap rows
# need one; the others do not mind), and prints one line per row and build:
#   <round> <build> <row> <median> <unit>
# and, for rows measured in pairs with their floor (the tap rows), the median over
# the iterations of the ratio of the two batches run back to back:
#   <round> <build> <row>:<device>/<floor> <ratio> x
# Copy each build's target/release/deps/packet_path-* aside first. Usage:
#   bash benches/ab_rounds.sh ROUNDS 'FILTER' build1 build2 ...
# e.g. bash benches/ab_rounds.sh 3 '^(memcpy|pair_tx|pair_rx)/(64|1514)$' /tmp/before /tmp/after
set -euo pipefail
rounds=$1; filter=$2; shift 2
for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then bins=("$@"); else mapfile -t bins < <(printf '%s\n' "$@" | tac); fi
    for b in "${bins[@]}"; do
        unshare -n "$b" --bench --warm-up-time 1 --measurement-time 3 "$filter" 2>/dev/null |
            awk -v b="$(basename "$b")" -v r="$r" \
                '/^[a-z_]+\/[0-9a-z_\/]+/{name=$1}
                 /^paired: /{print r, b, $2 ":" $3, $4, "x"}
                 /time:/{ if (name!="") { if ($1=="time:") print r, b, name, $4, $5; else print r, b, name, $5, $6; name="" } }'
    done
done
