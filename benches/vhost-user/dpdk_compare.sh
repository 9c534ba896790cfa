#!/usr/bin/env bash
# Our vhost-user backend against DPDK's (net_vhost), driven by the same DPDK
# virtio-user client (dpdk-testpmd), side by side in one run.
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
# CPU 1. A measurement is the client's own Tx-pps / Rx-pps, the median of the
# last three 2-second samples of a 12-second run. Each round measures every row
# for both backends back to back (which goes first alternates by round); a row's
# figures are the medians over the rounds, its ratio the median of the rounds'
# ratios, with their range. On a noisy virtual machine one round proves little.
#
# The client offers VIRTIO_F_IN_ORDER (virtio-user's default); IN_ORDER=0 in the
# environment makes it leave the bit out, for both backends.
#
# Needs: Debian's dpdk (dpdk-testpmd), root, python3 and the release binary
# (cargo build --release -p vhost-user-net-daemon). About 3 minutes a round. Usage:
#   [IN_ORDER=0] [ROUNDS=5] [ONLY=rx|tx] [OURS=path/to/vhost-user-net] \
#       bash benches/vhost-user/dpdk_compare.sh [POLL_US]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/../.."
POLL_US=${1:-100}
IN_ORDER=${IN_ORDER:-1}
ROUNDS=${ROUNDS:-5}
OURS=${OURS:-${CARGO_TARGET_DIR:-target}/release/vhost-user-net}
# ONLY=rx or ONLY=tx measures the rows of one direction only; OURS_ARGS adds
# arguments to every run of ours (e.g. "--poll-settle-pauses 0").
ONLY=${ONLY:-}
DIR=$(mktemp -d /tmp/vu-bench.XXXXXX)
trap 'pkill -f "$DIR" 2>/dev/null || true; rm -rf "$DIR"' EXIT
command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd (apt-get install dpdk-dev)" >&2; exit 1; }
[ -x "$OURS" ] || cargo build --release -p vhost-user-net-daemon

EAL=(--no-huge -m 1024 --no-pci)

# client MODE LEN SOCKET -> median pps of the direction MODE measures
client() {
    local mode=$1 len=$2 sock=$3 key
    [ "$mode" = txonly ] && key=Tx-pps || key=Rx-pps
    timeout 12 taskset -c 0,1 dpdk-testpmd -l 0,1 --main-lcore 1 "${EAL[@]}" \
        --file-prefix "vu$$" --vdev "net_virtio_user0,path=$sock,queues=1,in_order=$IN_ORDER" -- \
        --forward-mode="$mode" --txpkts="$len" --nb-cores=1 --stats-period 2 \
        > "$DIR/client.out" 2>&1 || true
    grep -E "$key" "$DIR/client.out" | tail -3 | awk '{print $2}' | sort -n | sed -n 2p
}

ours() { # DIRECTION LEN [EXTRA ARGS]
    local sock="$DIR/ours.sock" args
    [ "$1" = tx ] && args=(--discard) || args=(--generate "$2")
    args+=("${@:3}")
    # shellcheck disable=SC2206 # OURS_ARGS is split into words on purpose
    args+=(${OURS_ARGS:-})
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

# Rows: label, direction, frame length, extra arguments for ours.
ROWS=("guest TX|tx|64|" "guest TX, our sink copying each frame|tx|64|--copy-frames"
      "guest TX|tx|1514|" "guest TX, our sink copying each frame|tx|1514|--copy-frames"
      "guest RX|rx|64|" "guest RX|rx|1514|")
: > "$DIR/results"
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r label dir len extra <<< "$row"
        [ -n "$ONLY" ] && [ "$ONLY" != "$dir" ] && continue
        # shellcheck disable=SC2086 # extra is zero or one word
        if [ $((round % 2)) -eq 1 ]; then
            d=$(dpdk "$dir" "$len"); o=$(ours "$dir" "$len" $extra)
        else
            o=$(ours "$dir" "$len" $extra); d=$(dpdk "$dir" "$len")
        fi
        echo "$label|$len|${d:-0}|${o:-0}" >> "$DIR/results"
        echo "round $round: $label, $len B: DPDK ${d:-?} ours ${o:-?} pps" >&2
    done
done

python3 - "$DIR/results" "$IN_ORDER" "$POLL_US" "$ROUNDS" <<'EOP'
import statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    label, length, d, o = line.rstrip("\n").split("|")
    rows.setdefault((label, length), []).append((float(d), float(o)))
print(f"| direction (client in_order={sys.argv[2]}) | frame | DPDK net_vhost | ours (--poll-us {sys.argv[3]}) "
      f"| ratio, median of {sys.argv[4]} rounds | ratio range |")
print("|---|---|---|---|---|---|")
for (label, length), v in rows.items():
    ok = [(d, o) for d, o in v if d > 0 and o > 0]
    if not ok:
        print(f"| {label} | {length} B | no figure | no figure | - | - |"); continue
    r = [o / d for d, o in ok]
    print(f"| {label} | {length} B | {st.median(d for d, _ in ok) / 1e6:.2f} Mpps "
          f"| {st.median(o for _, o in ok) / 1e6:.2f} Mpps | {st.median(r):.2f}x | {min(r):.2f}–{max(r):.2f}x |")
EOP
