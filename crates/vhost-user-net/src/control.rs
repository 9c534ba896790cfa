//! A line-based control socket for the daemon: an operator or a test changes
//! the link and reads counters while a guest runs.
//!
//! Commands, one per line; each gets one reply line starting with `ok` or
//! `error`:
//!
//! | command | effect |
//! |---|---|
//! | `link up`, `link down` | sets the link status the guest sees (config-change notification) |
//! | `announce` | asks the guest to announce itself, if it negotiated `GUEST_ANNOUNCE` |
//! | `status` | `ok active=<0/1> link=<up/down> mac=<mac> mtu=<n> tx_frames=<n> tx_bytes=<n> rx_frames=<n> rx_bytes=<n> malformed=<n> dropped=<n> ctrl_ok=<n> ctrl_err=<n> config_notifications=<n> promisc=<0/1> allmulti=<0/1> filter_mac=<mac> multicast=<n> workers=<n> dirty_log=<off/on/forced> dirty_writes=<n> dirty_missed=<n> pair<i>_tid=<n> pair<i>_chains=<n>...`: the device's state, counters and receive filter; dirty logging (on while a frontend migrates, forced for measurements) with the writes reported to the log and those it could not take; the worker threads (one per queue pair) and, per pair, the OS thread id that last moved chains on its rings (0: none yet) and the chains moved |
//!
//! ```text
//! $ echo "link down" | socat - UNIX-CONNECT:/run/vu-net.ctl
//! ok
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_net_standby::NetBackend;

use crate::backend::VhostUserNet;

/// Listens on `path` (replacing a stale socket; only its owner may connect,
/// see [`spawn_with_mode`]) and serves commands for `net` on a background
/// thread, one client at a time.
pub fn spawn<B: NetBackend + 'static>(
    path: &Path,
    net: Arc<VhostUserNet<B>>,
) -> io::Result<JoinHandle<()>> {
    spawn_with_mode(path, net, crate::server::DEFAULT_SOCKET_MODE)
}

/// [`spawn`] with the socket file's permission bits.
pub fn spawn_with_mode<B: NetBackend + 'static>(
    path: &Path,
    net: Arc<VhostUserNet<B>>,
    mode: u32,
) -> io::Result<JoinHandle<()>> {
    let listener = crate::server::bind_socket(path, mode)?;
    std::thread::Builder::new()
        .name(format!("{}-control", net.name()))
        .spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        if let Err(e) = serve(s, &net) {
                            log::debug!("{}: control client: {e}", net.name());
                        }
                    }
                    Err(e) => log::warn!("{}: control socket accept failed: {e}", net.name()),
                }
            }
        })
}

fn serve<B: NetBackend + 'static>(s: UnixStream, net: &VhostUserNet<B>) -> io::Result<()> {
    let mut out = s.try_clone()?;
    for line in BufReader::new(s).lines() {
        let reply = execute(line?.trim(), net);
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

/// Runs one command; returns the reply line.
pub fn execute<B: NetBackend + 'static>(cmd: &str, net: &VhostUserNet<B>) -> String {
    match cmd {
        "link up" | "link down" => {
            let up = cmd == "link up";
            net.set_link_up(up);
            log::info!("{}: link {}", net.name(), if up { "up" } else { "down" });
            "ok".into()
        }
        "announce" => match net.announce() {
            Ok(()) => "ok".into(),
            Err(e) => format!("error {e}"),
        },
        "status" => {
            let pairs: String = net
                .pair_stats()
                .iter()
                .map(|p| {
                    format!(
                        " pair{}_tid={} pair{}_chains={}",
                        p.worker, p.tid, p.worker, p.chains
                    )
                })
                .collect();
            let c = net.counters();
            let cfg = net.config();
            let f = net.with_device(|d| d.rx_filter());
            let ml = net.migration_log();
            let dirty = ml.stats();
            format!(
                "ok active={} link={} mac={} mtu={} tx_frames={} tx_bytes={} rx_frames={} rx_bytes={} malformed={} dropped={} ctrl_ok={} ctrl_err={} config_notifications={} promisc={} allmulti={} filter_mac={} multicast={} workers={} dirty_log={} dirty_writes={} dirty_missed={}{pairs}",
                u8::from(net.is_active()),
                if cfg.status & 1 != 0 { "up" } else { "down" },
                mac(&cfg.mac),
                cfg.mtu,
                c.tx_frames,
                c.tx_bytes,
                c.rx_frames,
                c.rx_bytes,
                c.malformed(),
                c.dropped(),
                c.ctrl_ok,
                c.ctrl_err,
                c.config_notifications,
                u8::from(f.promisc),
                u8::from(f.allmulti),
                mac(&f.mac),
                f.multicast.len(),
                net.workers(),
                match (ml.logging(), ml.forced()) {
                    (false, _) => "off",
                    (true, false) => "on",
                    (true, true) => "forced",
                },
                dirty.logged,
                dirty.missed,
            )
        }
        other => {
            format!("error unknown command {other:?}; try: link up, link down, announce, status")
        }
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
