//! QEMU as the frontend: Debian's `qemu-system-x86_64` (7.2, TCG, no KVM
//! needed) with its own failover (`virtio-net-pci,failover=on` on our socket,
//! an `e1000e` primary with `failover_pair_id`), booting Debian's 6.1 kernel
//! with a busybox initramfs built here. One boot serves every assertion.
//!
//! The test runs in a network namespace of its own (its thread unshares one):
//! the daemon, QEMU and the host end of every connection live in it, on a tap
//! the test creates. What is asserted comes from the guest's console, from
//! QMP and from the daemon:
//!
//! - the guest negotiated STANDBY, registered the failover master and its
//!   standby slave;
//! - QMP's `FAILOVER_NEGOTIATED` for `net1`; QEMU then plugs the e1000e
//!   primary, which the guest enslaves to the master;
//! - `device_del` of the primary (what a migration does first): the master
//!   falls back to our standby; ping, and 4 MiB each way through the master,
//!   every byte compared (guest to host here, host to guest by the guest's
//!   `cmp` against the same bytes in its initramfs);
//! - `link down` and `link up` on the daemon's control socket, seen by the
//!   guest as the standby's and the master's carrier, and traffic after.
//!
//! Two more tests migrate a failover guest between two QEMUs on this machine,
//! each QEMU with its own daemon: one measures what the guest's traffic
//! loses, the other (a standby without `GUEST_ANNOUNCE`) checks the RARP the
//! destination's daemon sends when QEMU asks for it (`SEND_RARP`).
//!
//! Another boot runs a plain multiqueue virtio-net (`queues=2`, `mq=on`, two
//! vCPUs) against the daemon with two queue pairs: the guest shows
//! `rx-0 rx-1 tx-0 tx-1` and pings from each vCPU, and each of the daemon's
//! pairs moves chains on its own worker.
//!
//! QEMU's virtio-net keeps its own configuration space, so the daemon shows it
//! a link change by disconnecting (QEMU's `reconnect=1` brings it back when
//! the link is up); see `vhost_user_net::server`.
//!
//! `vectors=0` on the virtio-net-pci: QEMU 7.2 under TCG crashes (SIGSEGV in
//! `virtio_pci_set_guest_notifiers`, through `msix_set_vector_notifiers` into
//! the KVM irqfd path) when any vhost-user net device with MSI-X starts; DPDK's
//! vhost backend crashes it the same way. With KVM, or without MSI-X, it does
//! not.
//!
//! Needs `qemu-system-x86_64`, `cpio`, a static busybox, root (for the
//! namespace and the tap) and the unpacked kernel package in
//! `VHOST_USER_NET_QEMU_KERNEL_DIR` (default
//! `${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-net/qemu-kernel`: `.ci/run`
//! downloads `linux-image-amd64`'s package and unpacks it there). Without them
//! it prints why and passes, unless `VHOST_USER_NET_REQUIRE_QEMU=1` (set by
//! CI), where it fails.

mod harness;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Backend, feature_bit, serial, wait_for};
use virtio_net_standby::testing::PacketSocket;

const MAC: &str = "52:54:00:6f:55:cc";
const TAP: &str = "vuqtap0";
const HOST_IP: &str = "10.89.0.1";
const GUEST_IP: &str = "10.89.0.2";
const BULK: usize = 4 << 20;
/// MSI-X vectors of the multiqueue test's virtio-net (`VHOST_USER_NET_QEMU_MQ_VECTORS`,
/// default 0: see the module documentation on MSI-X under TCG).
static VECTORS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("VHOST_USER_NET_QEMU_MQ_VECTORS").unwrap_or_else(|_| "0".into())
});
/// `VIRTIO_NET_F_STANDBY`, as the guest's sysfs string shows it (bit 0 first).
const STANDBY: usize = 62;
/// Guest modules, in the order asked for; their dependencies go first.
const MODULES: [&str; 5] = [
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "e1000e",
];

/// What the host provides.
struct Env {
    qemu: PathBuf,
    busybox: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
}

fn env() -> Option<Env> {
    let required = std::env::var("VHOST_USER_NET_REQUIRE_QEMU").is_ok_and(|v| v == "1");
    let missing = |what: String| {
        if required {
            panic!("VHOST_USER_NET_REQUIRE_QEMU=1 but {what}");
        }
        eprintln!("skipping the QEMU test: {what} (.ci/run installs and unpacks what it needs)");
        None
    };
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    };
    let Some(qemu) = on_path("qemu-system-x86_64") else {
        return missing("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)".into());
    };
    if on_path("cpio").is_none() {
        return missing("cpio is missing (apt-get install cpio)".into());
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        return missing("busybox is missing (apt-get install busybox-static)".into());
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing("it needs root for its network namespace and tap".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return missing("/dev/net/tun is missing".into());
    }
    let dir = kernel_dir();
    let Some((kernel, modules)) = find_kernel(&dir) else {
        return missing(format!(
            "no boot/vmlinuz-* with its lib/modules/ under {} (set VHOST_USER_NET_QEMU_KERNEL_DIR, \
             or: apt-get download linux-image-6.1.0-N-amd64 && dpkg -x the .deb there)",
            dir.display()
        ));
    };
    Some(Env {
        qemu,
        busybox,
        kernel,
        modules,
    })
}

/// Where `.ci/run` unpacks the kernel package.
fn kernel_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VHOST_USER_NET_QEMU_KERNEL_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("vhost-user-net/qemu-kernel")
}

/// `boot/vmlinuz-<version>` and `lib/modules/<version>` of the newest version
/// that has both.
fn find_kernel(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?;
            let modules = dir.join("lib/modules").join(version);
            modules.join("kernel").is_dir().then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The `.ko` files under `modules/kernel`, by module name (`-` read as `_`).
fn module_index(modules: &Path) -> HashMap<String, PathBuf> {
    let mut index = HashMap::new();
    let mut dirs = vec![modules.join("kernel")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(stem.replace('-', "_"), p);
            }
        }
    }
    index
}

/// The `depends=` entry of a module's `.modinfo`.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// `MODULES` and what they depend on, dependencies first, without what the
/// kernel has built in (`modules.builtin`). The package ships no
/// `modules.dep` (depmod runs at install), so each `.modinfo` is read.
fn modules_in_load_order(modules: &Path) -> Vec<PathBuf> {
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l)
                .file_stem()?
                .to_str()
                .map(|s| s.replace('-', "_"))
        })
        .collect();
    let index = module_index(modules);
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) {
        if builtin.contains(name) || !done.insert(name.to_string()) {
            return;
        }
        let path = index
            .get(name)
            .unwrap_or_else(|| panic!("module {name} is neither built in nor a .ko"));
        let ko = std::fs::read(path).unwrap();
        for dep in module_depends(&ko) {
            visit(&dep, index, builtin, done, order);
        }
        order.push(path.clone());
    }
    let (mut done, mut order) = (BTreeSet::new(), Vec::new());
    for m in MODULES {
        visit(m, &index, &builtin, &mut done, &mut order);
    }
    order
}

/// Deterministic bytes that no protocol compresses or mistakes.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The guest's `/init`. Every line the test waits for starts with a marker.
fn init_script(modules: &[PathBuf]) -> String {
    let insmod: String = modules
        .iter()
        .map(|p| {
            let f = p.file_name().unwrap().to_str().unwrap();
            format!("insmod /mod/{f} || echo \"INSMOD_FAILED {f}\"\n")
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmod}
# The master and its standby appear with virtio_net; QEMU plugs the primary
# once the driver acknowledged STANDBY.
names() {{ dmesg | sed -n "s/.*failover $1:\([a-z0-9]*\) registered.*/\1/p" | tail -n 1; }}
i=0; while [ -z "$(names 'primary slave')" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
M=$(names master); S=$(names 'standby slave'); P=$(names 'primary slave')
dmesg | grep ' failover ' | sed 's/^/DMESG /'
echo "STANDBY_FEATURES $(cat /sys/class/net/$S/device/features)"
for d in $M $S $P; do
  echo "NETDEV $d driver=$(basename "$(readlink /sys/class/net/$d/device/driver)") master=$(basename "$(readlink /sys/class/net/$d/master)") mac=$(cat /sys/class/net/$d/address)"
done
ip link set lo up
ip link set $M up
ip addr add {GUEST_IP}/24 dev $M
echo "PRIMARY_ENSLAVED $P"
i=0; while [ -e /sys/class/net/$P ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo "PRIMARY_GONE $(ls /sys/class/net | tr '\n' ' ')"
i=0; while [ "$(cat /sys/class/net/$M/carrier)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ping -c 3 -W 3 {HOST_IP} > /tmp/ping.txt 2>&1; r=$?
sed 's/^/PING /' /tmp/ping.txt
[ $r = 0 ] && echo PING_OK
echo TX_START
nc {HOST_IP} 5001 < /data/tx.bin
echo TX_DONE
nc -l -p 5002 > /tmp/rx.bin &
sleep 0.3
echo RX_LISTENING
wait
echo "RX_DONE $(wc -c < /tmp/rx.bin)"
cmp /tmp/rx.bin /data/rx.bin && echo RX_SAME
echo LINK_WAIT
i=0; while [ "$(cat /sys/class/net/$S/carrier)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "CARRIER_DOWN $(cat /sys/class/net/$S/carrier) $(cat /sys/class/net/$M/carrier)"
i=0; while [ "$(cat /sys/class/net/$S/carrier)" != 1 ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "CARRIER_UP $(cat /sys/class/net/$S/carrier) $(cat /sys/class/net/$M/carrier)"
ping -c 2 -W 3 {HOST_IP} > /dev/null 2>&1 && echo PING_AFTER_LINK_OK
echo RESTART_WAIT
i=0; while [ "$(cat /sys/class/net/$S/carrier)" != 0 ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "RESTART_DOWN $(cat /sys/class/net/$S/carrier)"
i=0; while [ "$(cat /sys/class/net/$S/carrier)" != 1 ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "RESTART_UP $(cat /sys/class/net/$S/carrier)"
ping -c 2 -W 3 {HOST_IP} > /dev/null 2>&1 && echo PING_AFTER_RESTART_OK
echo '== END'
poweroff -f
"#
    )
}

/// Builds the initramfs (newc cpio, uncompressed) under `dir`.
fn initramfs(
    env: &Env,
    dir: &Path,
    tx: &[u8],
    rx: &[u8],
    script: fn(&[PathBuf]) -> String,
) -> PathBuf {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "mod", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&env.busybox, root.join("bin/busybox")).unwrap();
    let modules = modules_in_load_order(&env.modules);
    for m in &modules {
        std::fs::copy(m, root.join("mod").join(m.file_name().unwrap())).unwrap();
    }
    std::fs::write(root.join("data/tx.bin"), tx).unwrap();
    std::fs::write(root.join("data/rx.bin"), rx).unwrap();
    let init = root.join("init");
    std::fs::write(&init, script(&modules)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut names = Vec::new();
    let mut dirs = vec![PathBuf::from(".")];
    while let Some(d) = dirs.pop() {
        names.push(d.clone());
        for e in std::fs::read_dir(root.join(&d)).unwrap().flatten() {
            let rel = d.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                dirs.push(rel);
            } else {
                names.push(rel);
            }
        }
    }
    let out = dir.join("initrd.cpio");
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .expect("run cpio");
    {
        let mut stdin = cpio.stdin.take().unwrap();
        for n in &names {
            writeln!(stdin, "{}", n.display()).unwrap();
        }
    }
    assert!(cpio.wait().unwrap().success(), "cpio failed");
    out
}

/// Runs `ip` in the calling thread's network namespace.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A QMP connection: events collected as they come, commands answered.
struct Qmp {
    writer: UnixStream,
    lines: Receiver<serde_json::Value>,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let mut sock = None;
        wait_for(Duration::from_secs(10), || {
            sock = UnixStream::connect(path).ok();
            sock.is_some()
        })
        .expect("QEMU's QMP socket");
        let sock = sock.unwrap();
        let writer = sock.try_clone().unwrap();
        let (tx, rx) = channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = Arc::clone(&events);
        std::thread::spawn(move || {
            for line in BufReader::new(sock).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v.get("event").is_some() {
                    ev.lock().unwrap().push(v);
                } else if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut q = Qmp {
            writer,
            lines: rx,
            events,
        };
        let greeting = q.reply();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn reply(&self) -> serde_json::Value {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("QMP answers")
    }

    fn execute(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.writer, "{cmd}").unwrap();
        let r = self.reply();
        assert!(r.get("return").is_some(), "{cmd}: {r}");
        r
    }

    /// Waits for an event named `name` whose data satisfies `data`.
    fn event(
        &self,
        name: &str,
        timeout: Duration,
        data: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        wait_for(timeout, || {
            found = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["event"] == name && data(&e["data"]))
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no QMP event {name}; events: {:?}",
                self.events.lock().unwrap()
            )
        })
    }
}

/// The running QEMU, its console read line by line.
struct Qemu {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    stderr: PathBuf,
}

/// One QEMU's place: its name (for its files), the daemon's socket, its QMP
/// socket, the primary's tap (`None`: user networking, a dead end) and the
/// migration stream it waits for (`-incoming`).
struct Machine<'a> {
    name: &'a str,
    socket: &'a Path,
    qmp: &'a Path,
    primary_tap: Option<&'a str>,
    incoming: Option<&'a Path>,
    /// QEMU listens on the socket (`server=on`) and the daemon connects
    /// (`--client`), as libvirt's `mode='server'`.
    listen: bool,
    /// The standby offers `GUEST_ANNOUNCE` (QEMU's default). Without it, QEMU
    /// asks the daemon to announce the guest after a migration (`SEND_RARP`).
    announce: bool,
    /// `Some(n)`: a plain multiqueue virtio-net with `n` queue pairs
    /// (`queues=n`, `mq=on`) and two vCPUs, no failover and no primary.
    queues: Option<u16>,
}

impl Qemu {
    fn start(env: &Env, dir: &Path, initrd: &Path, m: &Machine<'_>) -> Qemu {
        let stderr = dir.join(format!("{}.stderr", m.name));
        let mem = "256M";
        let primary_netdev = match m.primary_tap {
            Some(tap) => format!("tap,id=hostnet0,ifname={tap},script=no,downscript=no,vhost=off"),
            None => "user,id=hostnet0,restrict=on".to_string(),
        };
        let mut cmd = Command::new(&env.qemu);
        let smp = if m.queues.is_some() { "2" } else { "1" };
        cmd.args(["-machine", "q35", "-accel", "tcg", "-smp", smp, "-m", mem])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-monitor", "none", "-serial", "stdio"])
            // vhost-user needs guest memory the daemon can map: shared.
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem0,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem0"])
            .arg("-kernel")
            .arg(&env.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", m.qmp.display()))
            .args(["-device", "pcie-root-port,id=root1,chassis=1,slot=1"])
            .args(["-device", "pcie-root-port,id=root2,chassis=2,slot=2"])
            .arg("-chardev")
            .arg(if m.listen {
                format!(
                    "socket,id=c0,path={},server=on,wait=off",
                    m.socket.display()
                )
            } else {
                format!("socket,id=c0,path={},reconnect=1", m.socket.display())
            });
        if let Some(n) = m.queues {
            // MSI-X would make QEMU 7.2 crash under TCG (see the module
            // documentation): the queues share the INTx line.
            cmd.arg("-netdev")
                .arg(format!("vhost-user,id=n0,chardev=c0,queues={n}"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n0,id=net1,mac={MAC},bus=root2,mq=on,vectors={},romfile=",
                    *VECTORS
                ));
        } else {
            cmd.args(["-netdev", "vhost-user,id=n0,chardev=c0"])
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n0,id=net1,mac={MAC},bus=root2,failover=on,vectors=0,romfile=,guest_announce={}",
                    if m.announce { "on" } else { "off" }
                ))
                .args(["-netdev", &primary_netdev])
                .arg("-device")
                .arg(format!(
                    "e1000e,netdev=hostnet0,id=hostdev0,mac={MAC},failover_pair_id=net1,bus=root1,romfile="
                ));
        }
        if let Some(incoming) = m.incoming {
            cmd.arg("-incoming")
                .arg(format!("unix:{}", incoming.display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start qemu-system-x86_64");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                s.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Qemu {
            child,
            lines: rx,
            seen,
            stderr,
        }
    }

    /// Waits for a console line starting with `marker`; returns the rest.
    fn expect(&self, marker: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(marker) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("the guest never printed {marker:?}\n{}", self.diagnostics()),
            }
        }
    }

    fn console(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    fn diagnostics(&self) -> String {
        format!(
            "console:\n{}\nQEMU's stderr:\n{}",
            self.console(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for QEMU to exit (the guest powers off).
    fn wait(&mut self, timeout: Duration) {
        if wait_for(timeout, || self.child.try_wait().unwrap().is_some()).is_none() {
            panic!("QEMU did not exit\n{}", self.diagnostics());
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread of its own in a new network namespace; children it
/// starts and sockets it (or threads it spawns) open live there. The
/// namespace goes away with the last of them.
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    let t = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f();
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn qemu_failover_with_the_daemon_as_standby() {
    let Some(env) = env() else { return };
    let _g = serial();
    in_new_netns(move || run(env));
}

fn run(env: Env) {
    let started = Instant::now();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-failover");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tx_data = payload(BULK, 11);
    let rx_data = payload(BULK, 12);
    let initrd = initramfs(&env, &dir, &tx_data, &rx_data, init_script);

    // The test's own tap, in its own namespace; the daemon attaches to it.
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    let daemon_args = ["--tap", TAP, "--mac", MAC, "--id", "net1"];
    let mut be = Backend::start_binary(
        Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir,
        "vu",
        &daemon_args,
    );
    let listener = TcpListener::bind((HOST_IP, 5001)).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < BULK {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });

    let qmp_path = dir.join("qmp.sock");
    let mut qemu = Qemu::start(
        &env,
        &dir,
        &initrd,
        &Machine {
            name: "qemu",
            socket: &be.socket,
            qmp: &qmp_path,
            primary_tap: None,
            incoming: None,
            listen: false,
            announce: true,
            queues: None,
        },
    );
    let mut qmp = Qmp::connect(&qmp_path);
    let fail = |what: &str, qemu: &Qemu, be: &Backend| -> ! {
        panic!(
            "{what}\n{}\ndaemon's log:\n{}",
            qemu.diagnostics(),
            be.log_text()
        )
    };

    // STANDBY negotiated; the master, its standby and the primary.
    let features = qemu.expect("STANDBY_FEATURES ", Duration::from_secs(40));
    if !feature_bit(&features, STANDBY) {
        fail(&format!("STANDBY not negotiated: {features}"), &qemu, &be);
    }
    let primary = qemu.expect("PRIMARY_ENSLAVED ", Duration::from_secs(15));
    let console = qemu.console();
    for needle in [
        "failover master:eth0 registered",
        "failover standby slave:eth1 registered",
        &format!("failover primary slave:{primary} registered"),
        &format!("NETDEV eth1 driver=virtio_net master=eth0 mac={MAC}"),
        &format!("NETDEV {primary} driver=e1000e master=eth0 mac={MAC}"),
    ] {
        if !console.contains(needle) {
            fail(&format!("the guest did not print {needle:?}"), &qemu, &be);
        }
    }
    qmp.event("FAILOVER_NEGOTIATED", Duration::from_secs(5), |d| {
        d["device-id"] == "net1"
    });

    // The primary leaves, as at the start of a migration: the master falls
    // back to our standby.
    qmp.execute(r#"{"execute":"device_del","arguments":{"id":"hostdev0"}}"#);
    qmp.event("DEVICE_DELETED", Duration::from_secs(15), |d| {
        d["device"] == "hostdev0"
    });
    let left = qemu.expect("PRIMARY_GONE ", Duration::from_secs(25));
    assert!(!left.contains(&primary), "{left}");
    let t_ping = Instant::now();
    qemu.expect("PING_OK", Duration::from_secs(20));
    let ping = qemu.console();
    assert!(
        ping.contains("PING 3 packets transmitted, 3 packets received"),
        "{ping}"
    );

    // 4 MiB each way through the failover master.
    let t_bulk = Instant::now();
    qemu.expect("TX_DONE", Duration::from_secs(60));
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), tx_data.len(), "guest to host: bytes lost");
    assert!(got == tx_data, "guest to host: bytes differ");
    let tx_secs = t_bulk.elapsed().as_secs_f64();
    qemu.expect("RX_LISTENING", Duration::from_secs(10));
    let t_rx = Instant::now();
    let mut s = TcpStream::connect((GUEST_IP, 5002)).unwrap();
    s.write_all(&rx_data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let size = qemu.expect("RX_DONE ", Duration::from_secs(60));
    drop(s);
    assert_eq!(size, BULK.to_string(), "host to guest: bytes lost");
    qemu.expect("RX_SAME", Duration::from_secs(10));
    let rx_secs = t_rx.elapsed().as_secs_f64();

    // Link down and up from the daemon's control socket.
    let t_link = Instant::now();
    qemu.expect("LINK_WAIT", Duration::from_secs(10));
    assert_eq!(be.control("link down"), "ok");
    let down = qemu.expect("CARRIER_DOWN ", Duration::from_secs(15));
    assert_eq!(
        down, "0 0",
        "standby and master lose carrier (the primary is gone)"
    );
    assert_eq!(be.control("link up"), "ok");
    let up = qemu.expect("CARRIER_UP ", Duration::from_secs(20));
    assert_eq!(up, "1 1");
    qemu.expect("PING_AFTER_LINK_OK", Duration::from_secs(15));
    let link_secs = t_link.elapsed().as_secs_f64();

    // The daemon dies and a new one starts on the same socket while QEMU
    // runs: QEMU's reconnect=1 brings the guest's traffic back.
    qemu.expect("RESTART_WAIT", Duration::from_secs(10));
    let t_restart = Instant::now();
    let first_log = be.log_text();
    be.kill();
    assert_eq!(
        qemu.expect("RESTART_DOWN ", Duration::from_secs(20)),
        "0",
        "the guest saw the daemon go"
    );
    let be = Backend::start_binary(
        Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir,
        "vu",
        &daemon_args,
    );
    assert_eq!(qemu.expect("RESTART_UP ", Duration::from_secs(20)), "1");
    qemu.expect("PING_AFTER_RESTART_OK", Duration::from_secs(15));
    let restart_secs = t_restart.elapsed().as_secs_f64();

    qemu.expect("== END", Duration::from_secs(10));
    qemu.wait(Duration::from_secs(20));
    let log = first_log;
    let second_log = be.log_text();
    assert!(
        second_log.contains("device active on 2 queue(s)"),
        "the restarted daemon serves QEMU again:\n{second_log}"
    );
    assert!(!log.contains("connection failed"), "{log}");
    assert!(
        log.matches("device active on 2 queue(s)").count() >= 2,
        "active at boot and after the link came back:\n{log}"
    );
    assert!(
        log.contains("link down: not listening on"),
        "QEMU was disconnected for the link:\n{log}"
    );
    eprintln!(
        "QEMU test: {:.1} s in all; ping+bulk from {:.1} s, guest TX {:.1} s, guest RX {:.1} s ({} MiB each), link down/up {:.1} s, daemon restart {restart_secs:.1} s",
        started.elapsed().as_secs_f64(),
        t_ping.duration_since(started).as_secs_f64(),
        tx_secs,
        rx_secs,
        BULK >> 20,
        link_secs,
    );
}

/// The migration guest's `/init`: up through its primary, a TCP stream from
/// the host compared byte for byte as it arrives, then it waits for its
/// primary to leave (the source unplugs it) and for a new one (the
/// destination plugs its own), and reports.
fn migration_init_script(modules: &[PathBuf]) -> String {
    let insmod: String = modules
        .iter()
        .map(|p| {
            let f = p.file_name().unwrap().to_str().unwrap();
            format!("insmod /mod/{f} || echo \"INSMOD_FAILED {f}\"\n")
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmod}
names() {{ dmesg | sed -n "s/.*failover $1:\([a-z0-9]*\) registered.*/\1/p" | tail -n 1; }}
i=0; while [ -z "$(names 'primary slave')" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
M=$(names master); S=$(names 'standby slave'); P=$(names 'primary slave')
ip link set lo up
ip link set $M up
ip addr add {GUEST_IP}/24 dev $M
i=0; while ! ping -c 1 -W 1 {HOST_IP} > /dev/null 2>&1 && [ $i -lt 30 ]; do i=$((i+1)); done
echo "NET_UP $M $S $P"
(nc -l -p 5002 | cmp - /data/rx.bin > /tmp/cmp.txt 2>&1; echo "CMP_RC $?") &
sleep 0.3
echo RX_LISTENING
i=0; while [ -e /sys/class/net/$P ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
echo "PRIMARY_GONE $(ls /sys/class/net | tr '\n' ' ')"
i=0; while [ "$(dmesg | grep -c 'failover primary slave:[a-z0-9]* registered')" -lt 2 ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done
echo "PRIMARY_BACK $(names 'primary slave')"
wait
cat /tmp/cmp.txt
dmesg | grep -E 'failover|e1000e|virtio_net|pciehp' | sed 's/^/DMESG /'
echo '== END'
poweroff -f
"#
    )
}

/// The host's `busybox ping -i 0.05` of the guest, each reply's sequence
/// number stamped as it arrives.
struct Pinger {
    child: Child,
    replies: Arc<Mutex<Vec<(u64, Instant)>>>,
}

const PING_INTERVAL: f64 = 0.05;

impl Pinger {
    fn start(busybox: &Path, target: &str) -> Pinger {
        let mut child = Command::new(busybox)
            .args(["ping", "-i", &PING_INTERVAL.to_string(), target])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run busybox ping");
        let out = child.stdout.take().unwrap();
        let replies = Arc::new(Mutex::new(Vec::new()));
        let r = Arc::clone(&replies);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let seq = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("seq="))
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(seq) = seq {
                    r.lock().unwrap().push((seq, Instant::now()));
                }
            }
        });
        Pinger { child, replies }
    }

    fn stop(&mut self) -> Vec<(u64, Instant)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        self.replies.lock().unwrap().clone()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which bridge port the guest's MAC is learnt on, polled every 20 ms; each
/// change stamped.
struct FdbWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, String)>>,
}

impl FdbWatch {
    fn start() -> FdbWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<(Instant, String)> = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new("bridge")
                    .args(["fdb", "show", "br", "br0"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                let dev = out
                    .lines()
                    .find(|l| l.starts_with(MAC) && !l.contains("permanent"))
                    .and_then(|l| {
                        let mut w = l.split_whitespace();
                        w.find(|&x| x == "dev").and_then(|_| w.next())
                    })
                    .unwrap_or("(none)")
                    .to_string();
                if seen.last().is_none_or(|l| l.1 != dev) {
                    seen.push((Instant::now(), dev));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        FdbWatch { stop, thread }
    }

    fn stop(self) -> Vec<(Instant, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A QMP event's time, in seconds since `since` (wall clock).
fn event_time(e: &serde_json::Value, since: std::time::SystemTime) -> f64 {
    let t = e["timestamp"]["seconds"].as_f64().unwrap_or(0.0)
        + e["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
    let base = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    t - base
}

/// The two hosts of a migration test on one bridge with the host's address:
/// the standbys' taps (`vuqtap0` source, `vuqtap1` destination) and the
/// primaries' (`vuptap0`, `vuptap1`). Starts the source's daemon on its own
/// socket and the destination's as a client of the socket its QEMU will
/// listen on (libvirt's `mode='server'`), whose path it returns.
fn two_hosts_on_a_bridge(dir: &Path) -> (Backend, Backend, PathBuf) {
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "br0", "type", "bridge"]);
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
    ip(&["link", "set", "br0", "up"]);
    for tap in ["vuqtap0", "vuqtap1", "vuptap0", "vuptap1"] {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ip(&["link", "set", tap, "master", "br0"]);
        ip(&["link", "set", tap, "up"]);
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_vhost-user-net"));
    let be_src = Backend::start_binary(
        bin,
        dir,
        "vu-src",
        &["--tap", "vuqtap0", "--mac", MAC, "--id", "net1"],
    );
    let dst_socket = dir.join("dst-qemu-vu.sock");
    let be_dst = Backend::start_client(
        bin,
        dir,
        "vu-dst",
        &dst_socket,
        &["--tap", "vuqtap1", "--mac", MAC, "--id", "net1"],
    );
    (be_src, be_dst, dst_socket)
}

#[test]
fn qemu_live_migration_with_the_daemon_as_standby() {
    let Some(env) = env() else { return };
    let _g = serial();
    in_new_netns(move || run_migration(env));
}

/// Two QEMUs on this machine, each with its own daemon; their taps and the
/// primaries' taps on one bridge with the host's address. The guest's
/// traffic runs through its e1000e primary; `migrate` unplugs it, our
/// standby carries the traffic through wait-unplug and the copy, the
/// destination resumes and plugs its own primary. A ping every 50 ms and a
/// TCP stream into the guest (compared byte for byte as it arrives) run
/// throughout.
fn run_migration(env: Env) {
    const MIG_BULK: usize = 8 << 20;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-migration");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rx_data = payload(MIG_BULK, 21);
    let initrd = initramfs(&env, &dir, &[], &rx_data, migration_init_script);

    let (be_src, be_dst, dst_socket) = two_hosts_on_a_bridge(&dir);
    let (src_qmp, dst_qmp) = (dir.join("src-qmp.sock"), dir.join("dst-qmp.sock"));
    let mig = dir.join("migration.sock");
    let src = Qemu::start(
        &env,
        &dir,
        &initrd,
        &Machine {
            name: "src",
            socket: &be_src.socket,
            qmp: &src_qmp,
            primary_tap: Some("vuptap0"),
            incoming: None,
            listen: false,
            announce: true,
            queues: None,
        },
    );
    let mut qs = Qmp::connect(&src_qmp);
    let fail = |what: &str, src: &Qemu, dst: Option<&Qemu>| -> ! {
        panic!(
            "{what}\nsource {}\ndestination {}\nsource daemon:\n{}\ndestination daemon:\n{}",
            src.diagnostics(),
            dst.map(Qemu::diagnostics).unwrap_or_default(),
            be_src.log_text(),
            be_dst.log_text()
        )
    };
    let up = src.expect("NET_UP ", Duration::from_secs(60));
    src.expect("RX_LISTENING", Duration::from_secs(10));
    let dst = Qemu::start(
        &env,
        &dir,
        &initrd,
        &Machine {
            name: "dst",
            socket: &dst_socket,
            qmp: &dst_qmp,
            primary_tap: Some("vuptap1"),
            incoming: Some(&mig),
            listen: true,
            announce: true,
            queues: None,
        },
    );
    let mut qd = Qmp::connect(&dst_qmp);
    let caps = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}"#;
    qs.execute(caps);
    qd.execute(caps);

    // The flows: a ping every 50 ms, and the stream, slow until the
    // destination has its primary, then as fast as it goes.
    let mut pinger = Pinger::start(&env.busybox, GUEST_IP);
    let fdb = FdbWatch::start();
    let migrated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let m = Arc::clone(&migrated);
    let data = rx_data.clone();
    let sender = std::thread::spawn(move || {
        let mut s = TcpStream::connect((GUEST_IP, 5002)).expect("connect to the guest");
        for chunk in data.chunks(4096) {
            s.write_all(chunk).expect("stream to the guest");
            if !m.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        s.shutdown(Shutdown::Write).unwrap();
    });
    std::thread::sleep(Duration::from_secs(1));

    let t0 = Instant::now();
    let wall0 = std::time::SystemTime::now();
    qs.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        mig.display()
    ));
    // `VHOST_USER_NET_MIGRATION_ANNOUNCE=1` (a measurement, off by default):
    // what a management layer can do about the source's share of the loss.
    // Once the guest has ejected its primary (wait-unplug ends), QEMU is asked to announce the
    // guest (its `GUEST_ANNOUNCE`, sent through the standby), so the bridge
    // stops sending the guest's frames to the primary's tap, which nothing
    // reads any more.
    let announce = std::env::var_os("VHOST_USER_NET_MIGRATION_ANNOUNCE").is_some_and(|v| v == "1");
    if announce {
        // QEMU hides the primary rather than deleting it: the end of
        // wait-unplug is the sign the guest ejected it.
        qs.event("MIGRATION", Duration::from_secs(60), |d| {
            d["status"] == "active"
        });
        qs.execute(
            r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":5,"step":50}}"#,
        );
    }
    let completed = |d: &serde_json::Value| d["status"] == "completed" || d["status"] == "failed";
    let end = qs.event("MIGRATION", Duration::from_secs(180), completed);
    if end["data"]["status"] != "completed" {
        fail(&format!("the migration failed: {end}"), &src, Some(&dst));
    }
    let info = qs.execute(r#"{"execute":"query-migrate"}"#);
    qd.event("RESUME", Duration::from_secs(30), |_| true);
    let back = dst.expect("PRIMARY_BACK ", Duration::from_secs(90));
    let t_back = t0.elapsed().as_secs_f64();
    migrated.store(true, std::sync::atomic::Ordering::Relaxed);
    let rc = dst.expect("CMP_RC ", Duration::from_secs(120));
    if rc != "0" {
        fail(
            &format!("the stream arrived corrupted or cut (cmp exit {rc})"),
            &src,
            Some(&dst),
        );
    }
    sender.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let replies = pinger.stop();
    let fdb = fdb.stop();
    dst.expect("== END", Duration::from_secs(20));

    // The timeline: QMP events of both sides, the guest's lines.
    let mut timeline: Vec<(f64, String)> = Vec::new();
    for (side, q) in [("source", &qs), ("destination", &qd)] {
        for e in q.events.lock().unwrap().iter() {
            timeline.push((
                event_time(e, wall0),
                format!("{side} {} {}", e["event"], e["data"]),
            ));
        }
    }
    for (t, dev) in fdb {
        let t = t
            .checked_duration_since(t0)
            .map(|d| d.as_secs_f64())
            .unwrap_or_else(|| -t0.duration_since(t).as_secs_f64());
        timeline.push((t, format!("bridge: the guest's MAC is learnt on {dev}")));
    }
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Pings: the replies' sequence numbers; the holes are frames lost.
    let first = replies.first().map(|r| r.0).unwrap_or(0);
    let last = replies.last().map(|r| r.0).unwrap_or(0);
    let got: BTreeSet<u64> = replies.iter().map(|r| r.0).collect();
    let lost: Vec<u64> = (first..=last).filter(|s| !got.contains(s)).collect();
    // Reply times relative to `migrate`: send times, by sequence number.
    let at = |seq: u64| -> f64 {
        replies
            .iter()
            .min_by_key(|r| r.0.abs_diff(seq))
            .map(|r| {
                r.1.checked_duration_since(t0)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_else(|| -t0.duration_since(r.1).as_secs_f64())
                    + (seq as f64 - r.0 as f64) * PING_INTERVAL
            })
            .unwrap_or(0.0)
    };
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for &s in &lost {
        match gaps.last_mut() {
            Some(g) if g.1 + 1 == s => g.1 = s,
            _ => gaps.push((s, s)),
        }
    }
    let resume = timeline
        .iter()
        .find(|(_, l)| l.starts_with("destination \"RESUME\""))
        .map(|t| t.0)
        .unwrap_or(f64::NAN);
    let after_resume = replies
        .iter()
        .filter(|r| {
            r.1.checked_duration_since(t0)
                .is_some_and(|d| d.as_secs_f64() > resume)
        })
        .count();
    let mut report = format!(
        "QEMU migration: {}{}\nguest before: {up}; destination primary: {back} at {t_back:.2} s\n\
         downtime (QEMU): {} ms, total {} ms\nping every {PING_INTERVAL} s: {} replies, {} lost, {after_resume} after RESUME\n",
        info["return"]["status"],
        if announce {
            " (announce-self once wait-unplug ended)"
        } else {
            ""
        },
        info["return"]["downtime"],
        info["return"]["total-time"],
        replies.len(),
        lost.len()
    );
    for (a, b) in &gaps {
        report.push_str(&format!(
            "  lost seq {a}..={b} ({} frames) from {:.2} s\n",
            b - a + 1,
            at(*a)
        ));
    }
    for (t, l) in &timeline {
        report.push_str(&format!("  {t:8.3} s  {l}\n"));
    }
    for l in dst.console().lines().filter(|l| l.starts_with("DMESG ")) {
        report.push_str(&format!("  guest {l}\n"));
    }
    eprintln!("{report}");
    std::fs::write(dir.join("report.txt"), &report).unwrap();

    let src_log = be_src.log_text();
    let dst_log = be_dst.log_text();
    assert!(src_log.contains("dirty logging on"), "{src_log}");
    assert!(src_log.contains("dirty log shared"), "{src_log}");
    assert!(!src_log.contains("is not logged"), "{src_log}");
    assert!(
        dst_log.contains("device active on 2 queue(s)"),
        "the destination's daemon runs the standby:\n{dst_log}"
    );
    assert!(
        after_resume > 20,
        "ping goes on after the destination resumed: {after_resume} replies\n{report}"
    );
}

#[test]
fn qemu_migration_of_a_guest_that_cannot_announce_itself_gets_a_rarp_from_the_daemon() {
    let Some(env) = env() else { return };
    let _g = serial();
    in_new_netns(move || run_rarp(env));
}

/// A migration whose standby does not offer `GUEST_ANNOUNCE`: the destination
/// QEMU then asks its backend to announce the guest's MAC (`SEND_RARP`), and
/// the destination's daemon must put a RARP for that MAC on its tap, so the
/// switches learn where the guest went before it sends anything itself.
fn run_rarp(env: Env) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-rarp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = initramfs(&env, &dir, &[], &payload(4096, 31), migration_init_script);
    let (be_src, be_dst, dst_socket) = two_hosts_on_a_bridge(&dir);
    let (src_qmp, dst_qmp) = (dir.join("src-qmp.sock"), dir.join("dst-qmp.sock"));
    let mig = dir.join("migration.sock");
    let machine = |name, socket, qmp, primary_tap, incoming, listen| Machine {
        name,
        socket,
        qmp,
        primary_tap: Some(primary_tap),
        incoming,
        listen,
        announce: false,
        queues: None,
    };
    let src = Qemu::start(
        &env,
        &dir,
        &initrd,
        &machine("src", &be_src.socket, &src_qmp, "vuptap0", None, false),
    );
    let mut qs = Qmp::connect(&src_qmp);
    let fail = |what: &str, src: &Qemu, dst: &Qemu| -> ! {
        panic!(
            "{what}\nsource {}\ndestination {}\nsource daemon:\n{}\ndestination daemon:\n{}",
            src.diagnostics(),
            dst.diagnostics(),
            be_src.log_text(),
            be_dst.log_text()
        )
    };
    src.expect("NET_UP ", Duration::from_secs(60));
    let dst = Qemu::start(
        &env,
        &dir,
        &initrd,
        &machine("dst", &dst_socket, &dst_qmp, "vuptap1", Some(&mig), true),
    );
    let mut qd = Qmp::connect(&dst_qmp);
    let caps = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}"#;
    qs.execute(caps);
    qd.execute(caps);
    // What arrives from the destination's standby tap: the daemon's frames.
    let wire = PacketSocket::open_interface("vuqtap1", false).expect("packet socket on vuqtap1");
    qs.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        mig.display()
    ));
    let completed = |d: &serde_json::Value| d["status"] == "completed" || d["status"] == "failed";
    let end = qs.event("MIGRATION", Duration::from_secs(180), completed);
    if end["data"]["status"] != "completed" {
        fail(&format!("the migration failed: {end}"), &src, &dst);
    }
    qd.event("RESUME", Duration::from_secs(30), |_| true);
    let mac: Vec<u8> = MAC
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    // A RARP request (ethertype 0x8035) from the guest's MAC to everyone,
    // whose sender and target hardware addresses are the guest's.
    let rarp = wire.recv_matching(Duration::from_secs(10), |f| {
        f.len() >= 42
            && f[0..6] == [0xff; 6]
            && f[6..12] == mac[..]
            && f[12..14] == [0x80, 0x35]
            && f[20..22] == [0, 3]
            && f[22..28] == mac[..]
            && f[32..38] == mac[..]
    });
    if rarp.is_none() {
        fail(
            "no RARP for the guest's MAC came out of the destination's tap after RESUME",
            &src,
            &dst,
        );
    }
}

/// The guest's side of the multiqueue test: its queues as sysfs shows them,
/// then a ping from each vCPU (the guest's transmit queue follows the CPU).
fn multiqueue_init_script(modules: &[PathBuf]) -> String {
    let insmod: String = modules
        .iter()
        .map(|p| {
            let f = p.file_name().unwrap().to_str().unwrap();
            format!("insmod /mod/{f} || echo \"INSMOD_FAILED {f}\"\n")
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmod}
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "CPUS $(grep -c ^processor /proc/cpuinfo)"
echo "QUEUES $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
i=0; while [ "$(cat /sys/class/net/eth0/carrier)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
for c in 0 1; do
  taskset -c $c ping -c 3 -W 3 {HOST_IP} > /tmp/ping$c.txt 2>&1 && echo "PING_CPU$c OK" || echo "PING_CPU$c FAILED"
  sed "s/^/PING$c /" /tmp/ping$c.txt
done
grep -i virtio /proc/interrupts | sed 's/^/IRQ /'
echo '== END'
poweroff -f
"#
    )
}

/// QEMU with `queues=2` and `mq=on` on two vCPUs, the daemon with two queue
/// pairs: the guest shows two queue pairs (`rx-0 rx-1 tx-0 tx-1`) and pings
/// from each vCPU, so through each of its transmit queues; both of the
/// daemon's pairs move chains, each on its own worker, without the device
/// restarting at every event. QEMU keeps the control queue and acknowledges
/// `MQ` without `CTRL_VQ`, enabling pairs by their rings (`SET_VRING_ENABLE`).
///
/// `vectors=0`: with `vectors=6` QEMU 7.2 under TCG exits before the guest's
/// init runs (the MSI-X crash of the module documentation).
#[test]
fn qemu_multiqueue_two_queue_pairs_each_carry_traffic() {
    let Some(env) = env() else { return };
    let _g = serial();
    in_new_netns(move || run_multiqueue(env));
}

fn run_multiqueue(env: Env) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-multiqueue");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = initramfs(&env, &dir, &[], &[], multiqueue_init_script);
    ip(&["link", "set", "lo", "up"]);
    ip(&[
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ]);
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    let be = Backend::start_binary(
        Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir,
        "vu",
        &[
            "--tap",
            TAP,
            "--mac",
            MAC,
            "--id",
            "net1",
            "--queue-pairs",
            "2",
        ],
    );
    let qmp_path = dir.join("qmp.sock");
    let mut qemu = Qemu::start(
        &env,
        &dir,
        &initrd,
        &Machine {
            name: "qemu",
            socket: &be.socket,
            qmp: &qmp_path,
            primary_tap: None,
            incoming: None,
            listen: false,
            announce: true,
            queues: Some(2),
        },
    );
    let fail = |what: &str, qemu: &Qemu, be: &Backend| -> ! {
        panic!(
            "{what}\n{}\ndaemon's log:\n{}",
            qemu.diagnostics(),
            be.log_text()
        )
    };
    let cpus = qemu.expect("CPUS ", Duration::from_secs(40));
    let queues = qemu.expect("QUEUES ", Duration::from_secs(10));
    qemu.expect("== END", Duration::from_secs(60));
    let status = be.status();
    qemu.wait(Duration::from_secs(20));
    let console = qemu.console();
    eprintln!(
        "guest: {cpus} CPUs, queues {queues}\n{}\ndaemon: workers={} pair0_chains={} pair1_chains={}",
        console
            .lines()
            .filter(|l| l.starts_with("PING") || l.starts_with("IRQ"))
            .collect::<Vec<_>>()
            .join("\n"),
        status["workers"],
        status["pair0_chains"],
        status["pair1_chains"]
    );
    if cpus != "2" {
        fail(&format!("the guest has {cpus} CPUs"), &qemu, &be);
    }
    // Two queue pairs as the guest sees them.
    let q: BTreeSet<&str> = queues.split_whitespace().collect();
    let want: BTreeSet<&str> = ["rx-0", "rx-1", "tx-0", "tx-1"].into();
    if q != want {
        fail(&format!("the guest's queues: {queues}"), &qemu, &be);
    }
    assert_eq!(status["workers"], "2");
    if !console.contains("PING_CPU0 OK") {
        fail("no ping from vCPU 0", &qemu, &be);
    }
    let activations = be.log_text().matches("device active on").count();
    if activations > 3 {
        fail(
            &format!("the device was activated {activations} times"),
            &qemu,
            &be,
        );
    }
    // Traffic from each vCPU, so through each of the guest's transmit queues.
    for c in 0..2 {
        if !console.contains(&format!("PING_CPU{c} OK")) {
            fail(&format!("no ping from vCPU {c}"), &qemu, &be);
        }
    }
    // Both of the daemon's pairs moved chains, each on its own thread.
    let chains = |p: u32| -> u64 { status[&format!("pair{p}_chains")].parse().unwrap() };
    if chains(0) == 0 || chains(1) == 0 {
        fail(
            &format!("chains per pair: {} and {}", chains(0), chains(1)),
            &qemu,
            &be,
        );
    }
    assert_ne!(status["pair0_tid"], status["pair1_tid"]);
}
