//! Boots User-Mode Linux guests against the `vhost-user-net` binary.
//!
//! The guest is Debian's `linux.uml` with a hostfs root built here: a static
//! busybox, the `failover`, `net_failover` and `virtio_net` modules of the same
//! kernel, and an `/init.sh` each test writes. Its console is its stdout, read
//! line by line; files the guest writes under its root appear on the host.
//!
//! Without UML (or busybox-static) the tests print why and pass, unless
//! `VHOST_USER_NET_REQUIRE_UML=1` (set by CI), where they fail instead.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One UML guest at a time: two cores, and each guest takes one.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the host provides.
pub struct Env {
    pub uml: PathBuf,
    pub busybox: PathBuf,
    pub modules: PathBuf,
    pub shim: PathBuf,
    pub backend: PathBuf,
}

fn first_existing(c: &[&str]) -> Option<PathBuf> {
    c.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The environment, or `None` (with the reason printed) when UML cannot run.
pub fn env() -> Option<Env> {
    let required = std::env::var("VHOST_USER_NET_REQUIRE_UML").is_ok_and(|v| v == "1");
    let missing = |what: &str| {
        if required {
            panic!("VHOST_USER_NET_REQUIRE_UML=1 but {what}");
        }
        eprintln!(
            "skipping the User-Mode Linux test: {what} (apt-get install user-mode-linux busybox-static)"
        );
        None
    };
    let Some(uml) = first_existing(&["/usr/bin/linux.uml"]) else {
        return missing("/usr/bin/linux.uml is missing");
    };
    let Some(busybox) = first_existing(&["/bin/busybox", "/usr/bin/busybox"]) else {
        return missing("busybox is missing");
    };
    let modules = std::fs::read_dir("/usr/lib/uml/modules")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("kernel/drivers/net/net_failover.ko").exists());
    let Some(modules) = modules else {
        return missing("no net_failover.ko under /usr/lib/uml/modules");
    };
    if !Path::new("/dev/net/tun").exists() {
        return missing("/dev/net/tun is missing");
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let shim = tmp.join("xstate_shim.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/uml/xstate_shim.c");
    if !shim.exists() {
        let ok = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&shim)
            .arg(&src)
            .arg("-ldl")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return missing("cc could not build tests/uml/xstate_shim.c");
        }
    }
    Some(Env {
        uml,
        busybox,
        modules,
        shim,
        backend: PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-net")),
    })
}

/// A scratch directory for one test, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("uml-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds the guest's root under `dir/root` with `body` as the test part of
/// `/init.sh`. The prelude mounts /proc and /sys and loads the modules in the
/// order net_failover needs; the epilogue prints `== END` and powers off.
pub fn guest_root(env: &Env, dir: &Path, body: &str) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "mod", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&env.busybox, root.join("bin/busybox")).unwrap();
    for m in [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ] {
        let src = env.modules.join(m);
        std::fs::copy(&src, root.join("mod").join(src.file_name().unwrap())).unwrap();
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         insmod /mod/failover.ko\n\
         insmod /mod/net_failover.ko\n\
         insmod /mod/virtio_net.ko\n\
         {body}\n\
         echo '== END'\n\
         poweroff -f\n"
    );
    let path = root.join("init.sh");
    std::fs::write(&path, init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// A running `vhost-user-net` process.
pub struct Backend {
    child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Backend {
    /// Starts the binary with `args` (socket and control paths are added) and
    /// waits for its socket.
    pub fn start(env: &Env, dir: &Path, tag: &str, args: &[&str]) -> Backend {
        Self::start_binary(&env.backend, dir, tag, args)
    }

    /// [`start`](Self::start) for tests that need no guest environment.
    pub fn start_binary(binary: &Path, dir: &Path, tag: &str, args: &[&str]) -> Backend {
        let socket = dir.join(format!("{tag}.sock"));
        let control = dir.join(format!("{tag}.ctl"));
        let log = dir.join(format!("{tag}.log"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .args(args)
            .env("RUST_LOG", "debug,vhost::vhost_user::connection=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start vhost-user-net");
        let b = Backend {
            child,
            socket,
            control,
            log,
        };
        wait_for(Duration::from_secs(10), || {
            b.socket.exists() && b.control.exists()
        })
        .unwrap_or_else(|| panic!("the backend never listened:\n{}", b.log_text()));
        b
    }

    /// Starts the binary in client mode (`--client`): it connects to
    /// `socket`, where the frontend listens. Waits for its control socket only.
    pub fn start_client(
        binary: &Path,
        dir: &Path,
        tag: &str,
        socket: &Path,
        args: &[&str],
    ) -> Backend {
        let control = dir.join(format!("{tag}.ctl"));
        let log = dir.join(format!("{tag}.log"));
        let child = Command::new(binary)
            .arg("--client")
            .arg("-s")
            .arg(socket)
            .arg("--control")
            .arg(&control)
            .args(args)
            .env("RUST_LOG", "debug,vhost::vhost_user::connection=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start vhost-user-net");
        let b = Backend {
            child,
            socket: socket.to_path_buf(),
            control,
            log,
        };
        wait_for(Duration::from_secs(10), || b.control.exists())
            .unwrap_or_else(|| panic!("the backend never started:\n{}", b.log_text()));
        b
    }

    /// Sends a control command; returns the reply line.
    pub fn control(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(&self.control).unwrap();
        writeln!(s, "{cmd}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// `status` as key/value pairs.
    pub fn status(&self) -> std::collections::HashMap<String, String> {
        let reply = self.control("status");
        assert!(reply.starts_with("ok "), "{reply}");
        reply
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A booted UML guest.
pub struct Guest {
    child: Child,
    lines: Receiver<String>,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Guest {
    /// Boots `root` against `socket`.
    pub fn boot(env: &Env, root: &Path, socket: &Path) -> Guest {
        let mut child = Command::new(&env.uml)
            .arg("mem=128M")
            .arg("rootfstype=hostfs")
            .arg(format!("rootflags={}", root.display()))
            .arg("rw")
            .arg("init=/init.sh")
            .arg(format!("virtio_uml.device={}:1", socket.display()))
            .arg("con0=null,fd:1")
            .arg("con=null")
            .env("TMPDIR", "/dev/shm")
            .env("LD_PRELOAD", &env.shim)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start linux.uml");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                s.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines: rx,
            seen,
        }
    }

    /// Waits for a console line containing `needle`; returns it.
    pub fn expect(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "the guest never printed {needle:?}; its console:\n{}",
                    self.console()
                ),
            }
        }
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Lines starting with `prefix`, prefix removed.
    pub fn values(&self, prefix: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_string()))
            .collect()
    }

    /// Waits for the guest to power off.
    pub fn wait(mut self, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return self.console();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!(
            "the guest did not power off; its console:\n{}",
            self.console()
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs `ip` on the host.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Bit `bit` of a sysfs virtio `features` string ("0101...", bit 0 first).
pub fn feature_bit(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}
