#!/usr/bin/env bash
# Throughput and packet rate between a User-Mode Linux guest (Linux 6.1's
# virtio_net under net_failover) and a host tap, through our vhost-user backend.
#
# The guest sends 64 MiB of TCP to the host, then receives 64 MiB; the host side
# times each transfer, and the backend's counters give the frames per second.
# Needs root, Debian's user-mode-linux and busybox-static, cc (for the test
# shim UML needs on hosts with AVX-512/AMX) and python3. Usage:
#   bash benches/vhost-user/uml_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x target/release/vhost-user-net ] || cargo build --release -p vhost-user-net
DIR=$(mktemp -d /tmp/uml-bench.XXXXXX)
TAP=vutap-bench HOST=10.79.0.1 GUEST=10.79.0.2 MIB=64
cleanup() { pkill -f "$DIR" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT

cc -shared -fPIC -O2 -o "$DIR/shim.so" crates/vhost-user-net/tests/uml/xstate_shim.c -ldl
MODS=$(dirname "$(find /usr/lib/uml/modules -name net_failover.ko | head -1)")/../..
R="$DIR/root"; mkdir -p "$R"/{bin,proc,sys,mod,dev}
cp /bin/busybox "$R/bin/"
cp "$MODS"/net/core/failover.ko "$MODS"/drivers/net/net_failover.ko "$MODS"/drivers/net/virtio_net.ko "$R/mod/"
cat > "$R/init.sh" <<EOS
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
insmod /mod/failover.ko; insmod /mod/net_failover.ko; insmod /mod/virtio_net.ko
ip link set eth0 up; ip addr add $GUEST/24 dev eth0; sleep 1
dd if=/dev/zero bs=65536 count=$((MIB * 16)) 2>/dev/null | nc $HOST 5001
nc -l -p 5002 > /dev/null
echo BENCH_DONE
poweroff -f
EOS
chmod +x "$R/init.sh"

target/release/vhost-user-net --socket "$DIR/vu.sock" --control "$DIR/vu.ctl" --tap "$TAP" \
    > "$DIR/backend.log" 2>&1 &
for _ in $(seq 50); do [ -S "$DIR/vu.ctl" ] && break; sleep 0.1; done
ip addr add "$HOST/24" dev "$TAP"

python3 - "$DIR" "$HOST" "$GUEST" "$MIB" <<'EOP' &
import socket, subprocess, sys, time
d, host, guest, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
total = mib << 20
def status():
    s = socket.socket(socket.AF_UNIX); s.connect(f"{d}/vu.ctl"); s.sendall(b"status\n")
    r = s.makefile().readline().split()[1:]; s.close()
    return {k: int(v) for k, v in (x.split("=") for x in r) if v.isdigit()}
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, 5001)); l.listen(1)
c, _ = l.accept(); a = status(); t = time.perf_counter(); got = 0
while got < total:
    n = len(c.recv(1 << 20))
    if n == 0: break
    got += n
dt = time.perf_counter() - t; b = status(); c.close()
fr = b["tx_frames"] - a["tx_frames"]
print(f"| guest -> host (guest TX) | {got * 8 / dt / 1e9:.2f} Gbit/s | {fr / dt / 1e3:.0f} kframes/s | {(b['tx_bytes'] - a['tx_bytes']) // max(fr, 1)} B |")
s = None
for _ in range(300):
    try:
        s = socket.create_connection((guest, 5002)); break
    except OSError: time.sleep(0.1)
if s is None: sys.exit("the guest never listened on 5002")
a = status(); t = time.perf_counter(); buf = bytes(1 << 20)
for _ in range(mib): s.sendall(buf)
s.shutdown(socket.SHUT_WR); s.recv(1); dt = time.perf_counter() - t; b = status()
fr = b["rx_frames"] - a["rx_frames"]
print(f"| host -> guest (guest RX) | {total * 8 / dt / 1e9:.2f} Gbit/s | {fr / dt / 1e3:.0f} kframes/s | {(b['rx_bytes'] - a['rx_bytes']) // max(fr, 1)} B |")
EOP
HOSTPID=$!
echo "| direction | throughput | frames/s through the device | average frame |"
echo "|---|---|---|---|"
TMPDIR=/dev/shm LD_PRELOAD="$DIR/shim.so" timeout 300 linux.uml mem=256M rootfstype=hostfs \
    rootflags="$R" rw init=/init.sh "virtio_uml.device=$DIR/vu.sock:1" con0=null,fd:1 con=null \
    > "$DIR/guest.log" 2>&1 || true
wait "$HOSTPID"
grep -q BENCH_DONE "$DIR/guest.log" || { echo "the guest did not finish:"; tail -20 "$DIR/guest.log"; exit 1; }
