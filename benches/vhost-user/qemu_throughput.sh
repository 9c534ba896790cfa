#!/usr/bin/env bash
# TCP throughput of one QEMU guest through two virtio-net-pci devices side by
# side: one on our vhost-user daemon ("ours"), one on QEMU's own in-process
# virtio-net on a tap ("qemu": -netdev tap,vhost=off; no /dev/vhost-net here).
# Same guest, same boot, interleaved rounds: the order of the two backends
# reverses every round.
#
# Debian's qemu-system-x86_64 (7.2, TCG, one vCPU, no KVM needed) boots
# Debian's 6.1 kernel with a busybox initramfs built here. Guest memory is a
# shared memfd (vhost-user needs it). Both devices are plain virtio-net (no
# failover) with vectors=0 (QEMU 7.2 under TCG crashes when a vhost-user
# virtio-net-pci with MSI-X starts; QEMU's own device gets the same INTx so
# the guest drives both the same way).
#
# Per round and backend, timed on the host (Debian's python3):
#   guest -> host: the host connects to the guest's busybox `nc -ll -e`, whose
#                  program is busybox `dd if=/dev/zero bs=64k` writing straight
#                  into the socket; the host reads until EOF;
#   host -> guest: the host connects and sends, the guest's `dd of=/dev/null
#                  bs=64k` reads straight from the socket; timed until the
#                  guest closes (every byte read by the guest).
# (nc -e, so the guest copies 64 KiB per system call, not busybox nc's 1 KiB.)
# Beside each transfer (from /proc/*/task/*/schedstat), per second of transfer:
# the time QEMU's vCPU thread ("CPU 0/TCG") ran on a host CPU and the time it
# waited for one (runnable), the time QEMU's other threads and the daemon ran.
# vCPU run + wait near 100% means the emulated guest's CPU is the bottleneck
# (on a shared host, "wait" is the share other processes took from it).
# Optional (UDP=1, the default): 60-byte UDP frames flooded from the host for
# 3 s, counted by the guest's rx_packets.
#
# Each round runs holding the build mutex (LOCK, default /tmp/cargo.lock) so
# that builds on a shared machine do not run during a transfer; one hold is
# one round (about 2 minutes at the default 4 GiB per transfer here; under
# TCG a 64 MiB transfer takes a third of a second, so the size is set for
# transfers of 10-30 s).
#
# Needs root, qemu-system-x86 (7.2), busybox-static, cpio, python3, iproute2,
# util-linux (unshare, flock) and kmod (modinfo), all Debian packages, and the
# unpacked kernel package in VHOST_USER_NET_QEMU_KERNEL_DIR (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-net/qemu-kernel, where .ci/run
# unpacks it). Runs in a network namespace of its own; no process outlives it.
# Usage:
#   bash benches/vhost-user/qemu_throughput.sh
#   ROUNDS=3 MIB=1024 UDP=0 KEEP=1 bash benches/vhost-user/qemu_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-5} MIB=${MIB:-4096} UDP=${UDP:-1} LOCK=${LOCK:-/tmp/cargo.lock}

if [ -z "${QPERF_IN_NETNS:-}" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "needs root (network namespace, taps)" >&2; exit 1; }
    for t in qemu-system-x86_64 cpio modinfo unshare flock ip /usr/bin/python3; do
        command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
    done
    flock "$LOCK" cargo build --release --locked -p vhost-user-net-daemon
    BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/vhost-user-net"
    # Copy it under the mutex: another build may replace it during the run.
    DIR=$(mktemp -d /tmp/qemu-bench.XXXXXX)
    flock "$LOCK" cp "$BIN" "$DIR/vhost-user-net"
    # The whole run in a new network namespace: its taps and addresses are
    # nobody else's, and they go away with it.
    exec unshare -n env QPERF_IN_NETNS=1 QPERF_DIR="$DIR" bash "$0" "$@"
fi

DIR=$QPERF_DIR
KDIR=${VHOST_USER_NET_QEMU_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-net/qemu-kernel}
MAC_OURS=52:54:00:6f:55:01 MAC_QEMU=52:54:00:6f:55:02
TAP_OURS=qbtap-ours TAP_QEMU=qbtap-qemu
HOST_OURS=10.81.1.1 GUEST_OURS=10.81.1.2 HOST_QEMU=10.81.2.1 GUEST_QEMU=10.81.2.2
QEMU_PID= DAEMON_PID=
cleanup() {
    for p in $QEMU_PID $DAEMON_PID; do kill "$p" 2>/dev/null || true; done
    for p in $QEMU_PID $DAEMON_PID; do wait "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && echo "kept $DIR" >&2 || rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The kernel and the modules the guest loads, dependencies first.
KERNEL=$(ls "$KDIR"/boot/vmlinuz-* 2>/dev/null | sort | tail -1)
[ -n "$KERNEL" ] || { echo "no kernel under $KDIR/boot (see .ci/run)" >&2; exit 1; }
MODDIR=$KDIR/lib/modules/${KERNEL##*/vmlinuz-}
declare -A KO
while read -r f; do n=${f##*/}; n=${n%.ko}; KO[${n//-/_}]=$f; done < <(find "$MODDIR/kernel" -name '*.ko')
ORDER=() SEEN=" "
load() {
    local n=${1//-/_} d
    case "$SEEN" in *" $n "*) return ;; esac
    SEEN="$SEEN$n "
    grep -q "/$1.ko$\|/${n}.ko$" "$MODDIR/modules.builtin" 2>/dev/null && return
    [ -n "${KO[$n]:-}" ] || { echo "module $n not found under $MODDIR" >&2; exit 1; }
    for d in $(modinfo -F depends "${KO[$n]}" | tr ',' ' '); do load "$d"; done
    ORDER+=("${KO[$n]}")
}
load virtio_pci; load virtio_net

R=$DIR/root
mkdir -p "$R"/{bin,proc,sys,dev,tmp,mod}
cp /bin/busybox "$R/bin/"
for m in "${ORDER[@]}"; do cp "$m" "$R/mod/"; echo "${m##*/}" >> "$R/mod/order"; done
COUNT=$((MIB * 16)) # 64 KiB blocks
cat > "$R/send.sh" <<EOS
#!/bin/sh
exec dd if=/dev/zero bs=64k count=$COUNT 2>/dev/null
EOS
cat > "$R/recv.sh" <<'EOS'
#!/bin/sh
exec dd of=/dev/null bs=64k 2>/dev/null
EOS
cat > "$R/stats.sh" <<EOS
#!/bin/sh
for d in /sys/class/net/eth*; do
  case \$(cat \$d/address) in $MAC_OURS) b=ours ;; $MAC_QEMU) b=qemu ;; *) continue ;; esac
  echo "\$b \$(cat \$d/statistics/rx_packets) \$(cat \$d/statistics/tx_packets)"
done
EOS
cat > "$R/init" <<EOS
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in \$(cat /mod/order); do insmod /mod/\$m || echo "INSMOD_FAILED \$m"; done
i=0; while [ \$(ls /sys/class/net | grep -c eth) -lt 2 ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
ip link set lo up
for d in /sys/class/net/eth*; do
  n=\${d##*/}
  case \$(cat \$d/address) in
    $MAC_OURS) ip addr add $GUEST_OURS/24 dev \$n ;;
    $MAC_QEMU) ip addr add $GUEST_QEMU/24 dev \$n ;;
  esac
  ip link set \$n up
  echo "NETDEV \$n \$(cat \$d/address) features=\$(cat \$d/device/features)"
done
nc -ll -p 5001 -e /send.sh &
nc -ll -p 5002 -e /recv.sh &
nc -ll -p 5003 -e /stats.sh &
sleep 1
echo GUEST_READY
wait
EOS
chmod +x "$R"/init "$R"/*.sh
(cd "$R" && find . | cpio -o -H newc --quiet) > "$DIR/initrd.cpio"

ip link set lo up
ip tuntap add dev "$TAP_OURS" mode tap vnet_hdr
ip tuntap add dev "$TAP_QEMU" mode tap vnet_hdr
ip addr add "$HOST_OURS/24" dev "$TAP_OURS"
ip addr add "$HOST_QEMU/24" dev "$TAP_QEMU"
ip link set "$TAP_QEMU" up

"$DIR/vhost-user-net" --socket "$DIR/vu.sock" --tap "$TAP_OURS" --mac "$MAC_OURS" --standby off \
    --id net-ours > "$DIR/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 50); do [ -S "$DIR/vu.sock" ] && break; sleep 0.1; done
[ -S "$DIR/vu.sock" ] || { echo "the daemon did not start:" >&2; cat "$DIR/daemon.log" >&2; exit 1; }

qemu-system-x86_64 -name qperf,debug-threads=on -machine q35 -accel tcg -smp 1 -m 512 \
    -nodefaults -no-reboot -display none -monitor none -serial "file:$DIR/console.log" \
    -object memory-backend-memfd,id=mem0,size=512M,share=on -numa node,memdev=mem0 \
    -kernel "$KERNEL" -initrd "$DIR/initrd.cpio" -append "console=ttyS0 quiet panic=-1" \
    -device pcie-root-port,id=root1,chassis=1,slot=1 -device pcie-root-port,id=root2,chassis=2,slot=2 \
    -chardev "socket,id=c0,path=$DIR/vu.sock" -netdev vhost-user,id=n0,chardev=c0 \
    -device "virtio-net-pci,netdev=n0,id=net-ours,mac=$MAC_OURS,bus=root1,vectors=0,romfile=" \
    -netdev "tap,id=n1,ifname=$TAP_QEMU,script=no,downscript=no,vhost=off" \
    -device "virtio-net-pci,netdev=n1,id=net-qemu,mac=$MAC_QEMU,bus=root2,vectors=0,romfile=" \
    > "$DIR/qemu.log" 2>&1 &
QEMU_PID=$!
for _ in $(seq 600); do
    grep -q GUEST_READY "$DIR/console.log" 2>/dev/null && break
    kill -0 "$QEMU_PID" 2>/dev/null || break
    sleep 0.1
done
grep -q GUEST_READY "$DIR/console.log" 2>/dev/null || {
    echo "the guest did not come up:" >&2; tail -30 "$DIR/console.log" "$DIR/qemu.log" "$DIR/daemon.log" >&2; exit 1; }
grep -E 'NETDEV|INSMOD_FAILED' "$DIR/console.log" | tr -d '\r' >&2

cat > "$DIR/xfer.py" <<'EOP'
# xfer.py ROUND BACKEND DIR(tx|rx|udp) GUEST_IP NBYTES QEMU_PID DAEMON_PID
import os, socket, sys, time
rnd, be, d, ip, nbytes, qpid, dpid = sys.argv[1:8]
nbytes = int(nbytes)
def sched(task):
    run, wait = open(f"{task}/schedstat").read().split()[:2]
    return int(run), int(wait)  # ns on a CPU, ns runnable but waiting for one
def cpu():
    """ns: vCPU thread on a CPU and waiting for one, QEMU's other threads, the daemon's."""
    vcpu = vwait = other = daemon = 0
    for t in os.listdir(f"/proc/{qpid}/task"):
        run, wait = sched(f"/proc/{qpid}/task/{t}")
        if "TCG" in open(f"/proc/{qpid}/task/{t}/comm").read():
            vcpu += run; vwait += wait
        else:
            other += run
    for t in os.listdir(f"/proc/{dpid}/task"):
        daemon += sched(f"/proc/{dpid}/task/{t}")[0]
    return vcpu, vwait, other, daemon
def load(c0, c1, dt):
    p = [(b - a) / 1e9 / dt * 100 for a, b in zip(c0, c1)]
    return f"vcpu={p[0]:.0f}%+{p[1]:.0f}%wait qemu_other={p[2]:.0f}% daemon={p[3]:.0f}%"
def stats():
    s = socket.create_connection((ip, 5003), timeout=30)
    out = b""
    while (c := s.recv(4096)):
        out += c
    return {l.split()[0]: int(l.split()[1]) for l in out.decode().splitlines() if l.strip()}
def connect(port):
    s = socket.create_connection((ip, port), timeout=120)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if port == 5001 else socket.SO_SNDBUF, 4 << 20)
    return s
if d == "udp":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.setblocking(False)
    a = stats()[be]; c0 = cpu(); t = time.perf_counter(); sent = 0; payload = bytes(18)
    while time.perf_counter() - t < 3:
        for _ in range(256):
            try:
                u.sendto(payload, (ip, 9)); sent += 1
            except BlockingIOError:
                pass
    dt = time.perf_counter() - t; c1 = cpu(); time.sleep(0.5); b = stats()[be]
    got = b - a
    print(f"{rnd} {be} udp60 {got} {dt:.3f} {got / dt / 1e3:.1f}kpps sent={sent / dt / 1e3:.0f}kpps "
          f"{load(c0, c1, dt)}", flush=True)
    sys.exit(0)
buf = bytes(1 << 20)
if d == "tx":  # guest -> host
    s = connect(5001); c0 = cpu(); t = time.perf_counter(); got = 0
    while (n := len(s.recv(1 << 20))):
        got += n
else:  # host -> guest
    s = connect(5002); c0 = cpu(); t = time.perf_counter(); left = nbytes
    while left:
        k = min(left, len(buf)); s.sendall(buf[:k]); left -= k
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # EOF once the guest's dd read everything and exited
    got = nbytes
dt = time.perf_counter() - t; c1 = cpu(); s.close()
if got != nbytes:
    sys.exit(f"{be} {d}: {got} of {nbytes} bytes")
print(f"{rnd} {be} {d} {got} {dt:.3f} {got * 8 / dt / 1e6:.1f}Mbit/s "
      f"{load(c0, c1, dt)}", flush=True)
EOP

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $MIB MiB per transfer, $ROUNDS rounds" 
echo "# CPU:$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2-); $(qemu-system-x86_64 --version | head -1); guest kernel ${KERNEL##*/}"
echo "# round backend direction bytes seconds rate vcpu(+runnable) qemu_other daemon"
BYTES=$((MIB << 20))
exec 9>>"$LOCK"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then order="ours qemu"; else order="qemu ours"; fi
    flock 9 # one round under the build mutex
    for dir in tx rx; do
        for be in $order; do
            ip=$GUEST_OURS; [ "$be" = qemu ] && ip=$GUEST_QEMU
            /usr/bin/python3 "$DIR/xfer.py" "$r" "$be" "$dir" "$ip" "$BYTES" "$QEMU_PID" "$DAEMON_PID"
        done
    done
    if [ "$UDP" = 1 ]; then
        for be in $order; do
            ip=$GUEST_OURS; [ "$be" = qemu ] && ip=$GUEST_QEMU
            /usr/bin/python3 "$DIR/xfer.py" "$r" "$be" udp "$ip" 0 "$QEMU_PID" "$DAEMON_PID"
        done
    fi
    flock -u 9
done
