#!/usr/bin/env bash
# Our vhost-user backend against DPDK's (net_vhost), driven by the same DPDK
# virtio-user client (dpdk-testpmd), one after the other in one run.
#
#   guest TX: client --forward-mode=txonly, backend discards
#             (ours: --discard, which reads only each frame's header, and
#             --discard --copy-frames, which copies every frame out of guest
#             memory as DPDK's dequeue does into an mbuf; DPDK: testpmd
#             --forward-mode=rxonly on net_vhost)
#   guest RX: backend generates, client --forward-mode=rxonly
#             (ours: --generate LEN; DPDK: testpmd --forward-mode=txonly on net_vhost)
#
# One forwarding core per side: the client polls on CPU 0, the backend runs on
# CPU 1. Packet rates are the client's own Tx-pps / Rx-pps, the median of the
# last three 2-second samples of a 12-second run.
#
# Needs: Debian's dpdk (dpdk-testpmd), root, and the release binary
# (cargo build --release -p vhost-user-net). Usage:
#   bash benches/vhost-user/dpdk_compare.sh [POLL_US]      (default 100)
set -euo pipefail
cd "$(dirname "$0")/../.."
POLL_US=${1:-100}
OURS=target/release/vhost-user-net
DIR=$(mktemp -d /tmp/vu-bench.XXXXXX)
trap 'pkill -f "$DIR" 2>/dev/null || true; rm -rf "$DIR"' EXIT
command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd (apt-get install dpdk)" >&2; exit 1; }
[ -x "$OURS" ] || cargo build --release -p vhost-user-net

EAL=(--no-huge -m 1024 --no-pci)

# client MODE LEN SOCKET -> median pps of the direction MODE measures
client() {
    local mode=$1 len=$2 sock=$3 key
    [ "$mode" = txonly ] && key=Tx-pps || key=Rx-pps
    timeout 12 taskset -c 0,1 dpdk-testpmd -l 0,1 --main-lcore 1 "${EAL[@]}" \
        --file-prefix "vu$$" --vdev "net_virtio_user0,path=$sock,queues=1" -- \
        --forward-mode="$mode" --txpkts="$len" --nb-cores=1 --stats-period 2 \
        > "$DIR/client.out" 2>&1 || true
    grep -E "$key" "$DIR/client.out" | tail -3 | awk '{print $2}' | sort -n | sed -n 2p
}

ours() { # DIRECTION LEN [EXTRA ARGS]
    local sock="$DIR/ours.sock" args
    [ "$1" = tx ] && args=(--discard) || args=(--generate "$2")
    args+=("${@:3}")
    rm -f "$sock"
    taskset -c 1 "$OURS" --socket "$sock" --poll-us "$POLL_US" "${args[@]}" \
        > "$DIR/ours.log" 2>&1 &
    local pid=$!
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    if [ "$1" = tx ]; then client txonly "$2" "$sock"; else client rxonly "$2" "$sock"; fi
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

dpdk() { # DIRECTION LEN
    local sock="$DIR/dpdk.sock" fwd
    [ "$1" = tx ] && fwd=rxonly || fwd=txonly
    rm -f "$sock"
    timeout 20 taskset -c 0,1 dpdk-testpmd -l 1,0 --main-lcore 0 "${EAL[@]}" \
        --file-prefix "vh$$" --vdev "net_vhost0,iface=$sock,queues=1" -- \
        --forward-mode="$fwd" --txpkts="$2" --nb-cores=1 --stats-period 60 \
        > "$DIR/dpdk.out" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    sleep 1
    if [ "$1" = tx ]; then client txonly "$2" "$sock"; else client rxonly "$2" "$sock"; fi
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

printf '| direction | frame | DPDK net_vhost | ours (--poll-us %s) | ratio |\n|---|---|---|---|---|\n' "$POLL_US"
row() { # LABEL LEN DPDK OURS
    python3 -c "import sys; d,o=float(sys.argv[3]),float(sys.argv[4]); print(f'| {sys.argv[1]} | {sys.argv[2]} B | {d/1e6:.2f} Mpps | {o/1e6:.2f} Mpps | {o/d:.2f}x |')" "$@"
}
for dir in tx rx; do
    for len in 64 1514; do
        d=$(dpdk "$dir" "$len"); o=$(ours "$dir" "$len")
        if [ "$dir" = tx ]; then
            row "guest TX" "$len" "$d" "$o"
            row "guest TX, our sink copying each frame" "$len" "$d" "$(ours tx "$len" --copy-frames)"
        else
            row "guest RX" "$len" "$d" "$o"
        fi
    done
done
