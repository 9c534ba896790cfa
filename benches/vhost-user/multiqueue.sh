#!/usr/bin/env bash
# Guest RX through the vhost-user daemon with 1 and with 2 queue pairs, against
# DPDK's net_vhost, with the same DPDK virtio-user client (dpdk-testpmd
# --forward-mode=rxonly) as dpdk_compare.sh.
#
# This machine has 2 cores: the client polls all its queues from one
# forwarding lcore on CPU 0, the backend runs on CPU 1 (ours: one worker
# thread per queue pair, both pinned to CPU 1 with the rest of the daemon;
# DPDK: one forwarding lcore for all queues). So the figure says what a second
# queue pair costs or gains with one core on each side, not how a second core
# scales (see the in-process `cargo bench -p benches --bench multiqueue`).
# DPDK's virtio-user keeps the control queue and acknowledges MQ without
# CTRL_VQ, which our device prunes: through our daemon the client's second
# queue pair stays idle (it runs pair 0 only), so "2" is two pairs configured,
# one carrying traffic.
#
# A measurement is the client's Rx-pps (all queues), the median of the last
# three 2-second samples of a 12-second run; rounds alternate the order.
# Needs root, dpdk-testpmd and the release daemon. Usage:
#   [ROUNDS=5] [LEN=64] [OURS=path] bash benches/vhost-user/multiqueue.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-5}
LEN=${LEN:-64}
OURS=${OURS:-${CARGO_TARGET_DIR:-target}/release/vhost-user-net}
DIR=$(mktemp -d /tmp/vu-mq.XXXXXX)
# The backends' pids (written from the command substitutions that start them),
# killed by id if the script is interrupted.
trap 'for p in $(cat "$DIR/pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"' EXIT
EAL=(--no-huge -m 1024 --no-pci)

client() { # QUEUES SOCKET
    timeout 12 taskset -c 0,1 dpdk-testpmd -l 0,1 --main-lcore 1 "${EAL[@]}" \
        --file-prefix "mqc$$" --vdev "net_virtio_user0,path=$2,queues=$1,in_order=1" -- \
        --forward-mode=rxonly --rxq="$1" --txq="$1" --nb-cores=1 --stats-period 2 \
        > "$DIR/client.out" 2>&1 || true
    grep -E "Rx-pps" "$DIR/client.out" | tail -3 | awk '{print $2}' | sort -n | sed -n 2p
}

ours() { # QUEUES
    local sock="$DIR/ours.sock"
    rm -f "$sock"
    taskset -c 1 "$OURS" --socket "$sock" --poll-us 100 --generate "$LEN" \
        --queue-pairs "$1" > "$DIR/ours.log" 2>&1 &
    local pid=$!
    echo "$pid" >> "$DIR/pids"
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    client "$1" "$sock"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

dpdk() { # QUEUES
    local sock="$DIR/dpdk.sock"
    rm -f "$sock"
    timeout 20 taskset -c 0,1 dpdk-testpmd -l 1,0 --main-lcore 0 "${EAL[@]}" \
        --file-prefix "mqh$$" --vdev "net_vhost0,iface=$sock,queues=$1" -- \
        --forward-mode=txonly --txpkts="$LEN" --rxq="$1" --txq="$1" --nb-cores=1 \
        --stats-period 60 > "$DIR/dpdk.out" 2>&1 &
    local pid=$!
    echo "$pid" >> "$DIR/pids"
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    sleep 1
    client "$1" "$sock"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

: > "$DIR/results"
for round in $(seq "$ROUNDS"); do
    order="1 2"; [ $((round % 2)) -eq 0 ] && order="2 1"
    for q in $order; do
        o=$(ours "$q"); d=$(dpdk "$q")
        echo "$q|${o:-0}|${d:-0}" >> "$DIR/results"
        echo "round $round: $q queue pair(s), $LEN B guest RX: ours ${o:-?} DPDK ${d:-?} pps" >&2
    done
done

python3 - "$DIR/results" "$ROUNDS" "$LEN" <<'EOP'
import statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    q, o, d = line.split("|")
    rows.setdefault(q, []).append((float(o), float(d)))
print(f"| queue pairs | guest RX {sys.argv[3]} B, ours | DPDK net_vhost | ours / DPDK, median (range) |")
print("|---|---|---|---|")
for q, v in sorted(rows.items()):
    r = [o / d for o, d in v if o > 0 and d > 0]
    rng = f"{st.median(r):.2f}x ({min(r):.2f}–{max(r):.2f}x)" if r else "-"
    print(f"| {q} | {st.median(o for o, _ in v) / 1e6:.2f} Mpps ({min(o for o, _ in v) / 1e6:.2f}–{max(o for o, _ in v) / 1e6:.2f}) "
          f"| {st.median(d for _, d in v) / 1e6:.2f} Mpps ({min(d for _, d in v) / 1e6:.2f}–{max(d for _, d in v) / 1e6:.2f}) | {rng} |")
EOP
