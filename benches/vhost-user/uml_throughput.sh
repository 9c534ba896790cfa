#!/usr/bin/env bash
# Throughput and frame rate between a User-Mode Linux guest (Linux 6.1's
# virtio_net under net_failover) and a host tap, through our vhost-user backend.
#
# Guest TX: the host downloads a 64 MiB file from busybox httpd in the guest.
# Guest RX: busybox wget in the guest downloads 64 MiB from an HTTP server on
# the host. Small frames: the host floods the guest with 60-byte UDP frames for
# 3 s (frames delivered into guest buffers per second), and the guest pings the
# host back-to-back (ping -A: one frame each way at a time, latency-bound).
# The host side times each transfer; the backend's counters (control socket)
# give the frames per second and the average frame size.
# (Not busybox nc: it writes 1 KiB at a time, and Nagle then holds every write
# until the previous one is acknowledged: one segment per round trip.)
#
# Needs root, Debian's user-mode-linux and busybox-static, cc (for the shim UML
# needs on hosts with AVX-512/AMX) and python3. Usage:
#   bash benches/vhost-user/uml_throughput.sh        (KEEP=1 keeps the temp dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x target/release/vhost-user-net ] || cargo build --release -p vhost-user-net-daemon
DIR=$(mktemp -d /tmp/uml-bench.XXXXXX)
TAP=vutap-bench HOST=10.79.0.1 GUEST=10.79.0.2 MIB=64
cleanup() { pkill -f "$DIR" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"; }
trap cleanup EXIT

cc -shared -fPIC -O2 -o "$DIR/shim.so" crates/vhost-user-net-daemon/tests/uml/xstate_shim.c -ldl
MODS=$(dirname "$(find /usr/lib/uml/modules -name net_failover.ko | head -1)")/../..
R="$DIR/root"; mkdir -p "$R"/{bin,proc,sys,mod,dev,www}
cp /bin/busybox "$R/bin/"
cp "$MODS"/net/core/failover.ko "$MODS"/drivers/net/net_failover.ko "$MODS"/drivers/net/virtio_net.ko "$R/mod/"
head -c $((MIB << 20)) /dev/urandom > "$R/www/blob"
cat > "$R/init.sh" <<EOS
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys
insmod /mod/failover.ko; insmod /mod/net_failover.ko; insmod /mod/virtio_net.ko
ip link set lo up; ip link set eth0 up; ip addr add $GUEST/24 dev eth0
ping -q -A -c 500 $HOST > /ping.txt
httpd -p 8080 -h /www
while [ ! -e /www/go ]; do sleep 0.2; done
wget -q -O /dev/null http://$HOST:5002/blob && echo RX_OK
while [ ! -e /www/stop ]; do sleep 0.2; done
poweroff -f
EOS
chmod +x "$R/init.sh"

target/release/vhost-user-net --socket "$DIR/vu.sock" --control "$DIR/vu.ctl" --tap "$TAP" \
    > "$DIR/backend.log" 2>&1 &
for _ in $(seq 50); do [ -S "$DIR/vu.ctl" ] && break; sleep 0.1; done
ip addr add "$HOST/24" dev "$TAP"

python3 - "$DIR" "$HOST" "$GUEST" "$MIB" <<'EOP' &
import socket, sys, time
d, host, guest, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
total = mib << 20
def status():
    s = socket.socket(socket.AF_UNIX); s.connect(f"{d}/vu.ctl"); s.sendall(b"status\n")
    r = s.makefile().readline().split()[1:]; s.close()
    return {k: int(v) for k, v in (x.split("=") for x in r) if v.isdigit()}
def row(name, nbytes, dt, a, b, key):
    fr = b[f"{key}_frames"] - a[f"{key}_frames"]
    avg = (b[f"{key}_bytes"] - a[f"{key}_bytes"]) // max(fr, 1)
    print(f"| {name} | {nbytes * 8 / dt / 1e6:.0f} Mbit/s | {fr / dt / 1e3:.1f} kframes/s | {avg} B |", flush=True)
# Guest TX: fetch the blob from the guest's httpd.
s = None
for _ in range(300):
    try:
        s = socket.create_connection((guest, 8080), timeout=60); break
    except OSError: time.sleep(0.1)
if s is None: sys.exit("the guest's httpd never answered")
a = status(); t = time.perf_counter()
s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
got = 0
while True:
    n = len(s.recv(1 << 20))
    if n == 0: break
    got += n
dt = time.perf_counter() - t; b = status(); s.close()
if got < total: sys.exit(f"guest TX: got {got} of {total} bytes")
row("guest -> host (guest TX)", got, dt, a, b, "tx")
# Guest RX: serve the guest's wget.
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, 5002)); l.listen(1)
open(f"{d}/root/www/go", "w").close()
c, _ = l.accept(); c.recv(4096)
a = status(); t = time.perf_counter()
c.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
buf = bytes(1 << 20)
for _ in range(mib): c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); dt = time.perf_counter() - t; b = status(); c.close()
row("host -> guest (guest RX)", total, dt, a, b, "rx")
# Small frames into the guest: 18-byte UDP payloads, 60-byte frames.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.setblocking(False)
a = status(); t = time.perf_counter(); sent = 0; payload = bytes(18)
while time.perf_counter() - t < 3:
    for _ in range(256):
        try:
            u.sendto(payload, (guest, 9)); sent += 1
        except BlockingIOError: pass
dt = time.perf_counter() - t; time.sleep(0.5); b = status()
fr = b["rx_frames"] - a["rx_frames"]
print(f"| host -> guest, 60 B UDP flood | {fr * 60 * 8 / dt / 1e6:.0f} Mbit/s | {fr / dt / 1e3:.1f} kframes/s delivered of {sent / dt / 1e3:.0f} k/s sent | 60 B |", flush=True)
open(f"{d}/root/www/stop", "w").close()
EOP
HOSTPID=$!
echo "| direction | TCP goodput | frames/s through the device | average frame |"
echo "|---|---|---|---|"
TMPDIR=/dev/shm LD_PRELOAD="$DIR/shim.so" timeout 600 linux.uml mem=256M rootfstype=hostfs \
    rootflags="$R" rw init=/init.sh "virtio_uml.device=$DIR/vu.sock:1" con0=null,fd:1 con=null \
    > "$DIR/guest.log" 2>&1 || true
wait "$HOSTPID"
grep -q RX_OK "$DIR/guest.log" || { echo "the guest did not finish:"; tail -20 "$DIR/guest.log"; exit 1; }
# round-trip min/avg/max = a/b/c ms, over 500 back-to-back pings.
python3 - "$R/ping.txt" <<'EOP'
import re, sys
t = open(sys.argv[1]).read()
avg = float(re.search(r"min/avg/max = [\d.]+/([\d.]+)/", t).group(1))
print(f"| guest ping -A, 64 B ICMP | - | {1 / avg:.2f} k round trips/s | avg RTT {avg:.2f} ms |")
EOP
