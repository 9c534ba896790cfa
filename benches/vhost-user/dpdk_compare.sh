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
# DIRTY_LOG=1 adds to every row a third run, of ours with --force-dirty-log
# (every write to guest memory logged as during a live migration, into a log the
# daemon allocates), interleaved with the other two (the order rotates by
# round), and a second table: ours with the log against ours without, and
# against DPDK. RESULTS=FILE appends each run's figures to FILE and reports over
# all of FILE, so that rounds run one at a time (FIRST_ROUND=N continues the
# rotation) add up to one table.
#
# Needs: Debian's dpdk (dpdk-testpmd), root, python3 and the release binary
# (cargo build --release -p vhost-user-net-daemon). About 3 minutes a round. Usage:
#   [IN_ORDER=0] [ROUNDS=5] [ONLY=rx|tx] [OURS=path/to/vhost-user-net] \
#   [DIRTY_LOG=1] [RESULTS=file] [FIRST_ROUND=1] \
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
DIRTY_LOG=${DIRTY_LOG:-0}
FIRST_ROUND=${FIRST_ROUND:-1}
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
    local pps
    if [ "$1" = tx ]; then pps=$(client txonly "$2" "$sock"); else pps=$(client rxonly "$2" "$sock"); fi
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    case " ${*:3} " in *" --force-dirty-log "*)
        grep -q "log allocated" "$DIR/ours.log" || {
            echo "ours with --force-dirty-log allocated no log:" >&2; cat "$DIR/ours.log" >&2; pps=; } ;;
    esac
    echo "$pps"
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
RESULTS=${RESULTS:-$DIR/results}
[ "$RESULTS" = "$DIR/results" ] && : > "$RESULTS"
for round in $(seq "$FIRST_ROUND" $((FIRST_ROUND + ROUNDS - 1))); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r label dir len extra <<< "$row"
        [ -n "$ONLY" ] && [ "$ONLY" != "$dir" ] && continue
        l=
        # shellcheck disable=SC2086 # extra is zero or one word
        if [ "$DIRTY_LOG" = 1 ]; then
            # The three runs in one of three orders, by round.
            case $((round % 3)) in
            1) d=$(dpdk "$dir" "$len"); o=$(ours "$dir" "$len" $extra)
               l=$(ours "$dir" "$len" $extra --force-dirty-log) ;;
            2) o=$(ours "$dir" "$len" $extra)
               l=$(ours "$dir" "$len" $extra --force-dirty-log); d=$(dpdk "$dir" "$len") ;;
            0) l=$(ours "$dir" "$len" $extra --force-dirty-log); d=$(dpdk "$dir" "$len")
               o=$(ours "$dir" "$len" $extra) ;;
            esac
            echo "$round|$label|$len|${d:-0}|${o:-0}|${l:-0}" >> "$RESULTS"
            echo "round $round: $label, $len B: DPDK ${d:-?} ours ${o:-?} ours logging ${l:-?} pps" >&2
        elif [ $((round % 2)) -eq 1 ]; then
            d=$(dpdk "$dir" "$len"); o=$(ours "$dir" "$len" $extra)
        else
            o=$(ours "$dir" "$len" $extra); d=$(dpdk "$dir" "$len")
        fi
        if [ "$DIRTY_LOG" != 1 ]; then
            echo "$round|$label|$len|${d:-0}|${o:-0}" >> "$RESULTS"
            echo "round $round: $label, $len B: DPDK ${d:-?} ours ${o:-?} pps" >&2
        fi
    done
done

python3 - "$RESULTS" "$IN_ORDER" "$POLL_US" <<'EOP'
import statistics as st, sys
rows, logged, rounds = {}, {}, set()
for line in open(sys.argv[1]):
    rnd, label, length, d, o, *l = line.rstrip("\n").split("|")
    rounds.add(rnd)
    rows.setdefault((label, length), []).append((float(d), float(o)))
    if l:
        logged.setdefault((label, length), []).append((float(d), float(o), float(l[0])))
n = len(rounds)
print(f"| direction (client in_order={sys.argv[2]}) | frame | DPDK net_vhost | ours (--poll-us {sys.argv[3]}) "
      f"| ratio, median of {n} rounds | ratio range |")
print("|---|---|---|---|---|---|")
for (label, length), v in rows.items():
    ok = [(d, o) for d, o in v if d > 0 and o > 0]
    if not ok:
        print(f"| {label} | {length} B | no figure | no figure | - | - |"); continue
    r = [o / d for d, o in ok]
    frame = f"{length} B" + (f" ({len(ok)} rounds)" if len(ok) < n else "")
    print(f"| {label} | {frame} | {st.median(d for d, _ in ok) / 1e6:.2f} Mpps "
          f"| {st.median(o for _, o in ok) / 1e6:.2f} Mpps | {st.median(r):.2f}x | {min(r):.2f}–{max(r):.2f}x |")
if logged:
    print()
    print(f"| direction (client in_order={sys.argv[2]}) | frame | ours | ours, --force-dirty-log "
          f"| logging/not, median of {n} rounds | range | logging/DPDK, median | range |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, length), v in logged.items():
        ok = [t for t in v if min(t) > 0]
        if not ok:
            print(f"| {label} | {length} B | no figure | no figure | - | - | - | - |"); continue
        frame = f"{length} B" + (f" ({len(ok)} rounds)" if len(ok) < n else "")
        lo = [l / o for _, o, l in ok]
        ld = [l / d for d, _, l in ok]
        print(f"| {label} | {frame} | {st.median(o for _, o, _ in ok) / 1e6:.2f} Mpps "
              f"| {st.median(l for _, _, l in ok) / 1e6:.2f} Mpps | {st.median(lo):.2f}x | {min(lo):.2f}–{max(lo):.2f}x "
              f"| {st.median(ld):.2f}x | {min(ld):.2f}–{max(ld):.2f}x |")
EOP
