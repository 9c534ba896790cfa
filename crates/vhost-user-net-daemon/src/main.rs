//! `vhost-user-net`: serves a standby virtio-net device on a vhost-user socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, ValueEnum};
use vhost_user_net::{Server, VhostUserNet, control};
use virtio_net_standby::{Discard, Generator, NetBackend, StandbyNetBuilder, Tap};

/// Serve a virtio-net device that offers VIRTIO_NET_F_STANDBY (the standby half
/// of a net_failover pair) to a vhost-user frontend: QEMU, Cloud Hypervisor,
/// User-Mode Linux or DPDK's virtio-user.
///
/// The guest's frames go to a tap device (--tap), are counted and dropped
/// (--discard), or the guest receives generated frames (--generate). The server
/// waits for a frontend, serves it, and waits for the next one when it leaves.
///
/// Example, with QEMU's failover as the frontend (the standby on this socket,
/// a passthrough primary with the same MAC whose failover_pair_id names
/// QEMU's -device id= of the standby):
///
///   vhost-user-net --socket-path /run/vu-net0.sock --tap vu-tap0 --mac 52:54:00:12:34:56 \
///     --id net1 --control /run/vu-net0.ctl
///
///   qemu-system-x86_64 ... -m 4G \
///     -object memory-backend-memfd,id=mem0,size=4G,share=on -numa node,memdev=mem0 \
///     -chardev socket,id=c0,path=/run/vu-net0.sock,reconnect=1 \
///     -netdev vhost-user,id=n0,chardev=c0 \
///     -device virtio-net-pci,netdev=n0,id=net1,mac=52:54:00:12:34:56,failover=on \
///     -device vfio-pci,host=0000:3b:02.0,id=hostdev0,failover_pair_id=net1
///
/// QEMU refuses vhost-user without guest memory it can share
/// (memory-backend-memfd or -file with share=on). It keeps the MAC, MTU and
/// link status the guest reads itself, so "link down" on --control
/// disconnects it (its guest sees the link down) and closes the socket until
/// "link up"; reconnect=1 brings QEMU back, after a link change or a daemon
/// restart. The guest live-migrates: the daemon logs its writes to guest
/// memory in QEMU's dirty log while QEMU migrates (start a daemon for the
/// destination QEMU too).
///
/// With --client the daemon connects to a socket QEMU listens on
/// (-chardev socket,id=c0,path=/run/vu-net0.sock,server=on; libvirt's
/// <source mode='server'>) and connects again whenever QEMU goes away.
///
/// The sockets are created mode 0600 (--socket-mode to change it): run QEMU
/// as the same user, or give its group access with --socket-mode 660.
///
/// Logging goes to stderr; set RUST_LOG=debug for more (every vhost-user
/// request the frontend sends is logged, decoded).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
#[command(group(ArgGroup::new("backend").required(true).args(["tap", "discard", "generate"])))]
struct Args {
    /// Path of the vhost-user socket to listen on (replaced if it exists), or
    /// with --client the socket the frontend listens on.
    #[arg(
        short = 's',
        long = "socket-path",
        visible_alias = "socket",
        value_name = "PATH"
    )]
    socket: PathBuf,

    /// Connect to the frontend's socket instead of listening (QEMU with
    /// server=on, libvirt's mode='server'); connect again, every 500 ms,
    /// whenever it is not there.
    #[arg(long)]
    client: bool,

    /// Permission bits (octal) of the sockets the daemon creates: the
    /// vhost-user socket and --control.
    #[arg(long, default_value = "600", value_name = "OCTAL", value_parser = parse_mode)]
    socket_mode: u32,

    /// Connect the device to this tap interface, created if missing (needs
    /// CAP_NET_ADMIN) and brought up. Give it an address yourself.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,

    /// Count and drop everything the guest sends; the guest receives nothing.
    #[arg(long)]
    discard: bool,

    /// With --discard: copy every frame out of guest memory before dropping
    /// it, as a backend that moves frames must (for benchmarks).
    #[arg(long, requires = "discard")]
    copy_frames: bool,

    /// Fill every receive buffer the guest posts with numbered frames of this
    /// many bytes (60 to 65550, Ethernet header included), addressed to --mac.
    /// What the guest sends is dropped.
    #[arg(long, value_name = "BYTES")]
    generate: Option<usize>,

    /// Measurement option: log every write to guest memory as during a live
    /// migration, into a log the daemon allocates (one bit per 4 KiB page up
    /// to the highest address of each frontend's memory table; address space
    /// reserved without memory, as DPDK's virtio-user gives its own virtual
    /// addresses as guest addresses). For measuring the log's cost with
    /// frontends that never migrate, such as DPDK's virtio-user; nothing
    /// reads this log. A frontend that shares its own log (SET_LOG_BASE)
    /// gets the writes logged there instead.
    #[arg(long)]
    force_dirty_log: bool,

    /// MAC address the guest reads from the device.
    #[arg(long, default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    mac: [u8; 6],

    /// MTU the guest reads from the device.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,

    /// Queue pairs offered, each served by a worker thread of its own (more
    /// than one needs a multiqueue tap; with QEMU, `queues=N` on the netdev
    /// and `mq=on` on the device).
    #[arg(long, default_value_t = 1)]
    queue_pairs: u16,

    /// Entries per queue (a power of two up to 32768).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,

    /// Offer VIRTIO_NET_F_STANDBY, so that the guest's net_failover pairs this
    /// device with a primary of the same MAC.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    standby: OnOff,

    /// Identifier of the device, as a primary's failover_pair_id names it (with
    /// QEMU, failover_pair_id names QEMU's -device id=; give the same name here
    /// for the logs).
    #[arg(long, default_value = "net0")]
    id: String,

    /// After the rings run dry, keep polling them for this many microseconds
    /// before sleeping on the guest's kicks (0: never poll). Polling costs a
    /// busy core and saves wake-ups: for throughput tests and DPDK guests.
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS")]
    poll_us: u64,

    /// While polling, a pass that moved fewer chains than this is followed by
    /// --poll-settle-pauses pause instructions, so that the guest's buffers
    /// gather and move in bursts (0: no settle pause).
    #[arg(long, default_value_t = vhost_user_net::DEFAULT_SETTLE_CHAINS, value_name = "CHAINS")]
    poll_settle_chains: u32,

    /// Pause instructions in one settle pause (about 30 ns each on current x86
    /// cores; 0: no settle pause).
    #[arg(long, default_value_t = vhost_user_net::DEFAULT_SETTLE_PAUSES, value_name = "PAUSES")]
    poll_settle_pauses: u32,

    /// Also listen on this socket for control commands: "link up",
    /// "link down", "announce", "status" (one per line).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address like 52:54:00:12:34:56"));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{p:?} in {s:?} is not a hex byte"))?;
    }
    Ok(mac)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode like 600"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: a socket's mode is at most 777"));
    }
    Ok(m)
}

fn backends(args: &Args) -> Result<Vec<Box<dyn NetBackend>>, String> {
    let n = usize::from(args.queue_pairs);
    if let Some(name) = &args.tap {
        let taps = Tap::open_queues(name, n).map_err(|e| format!("tap {name}: {e}"))?;
        if let Some(t) = taps.first() {
            t.set_up()
                .map_err(|e| format!("cannot bring tap {name} up: {e}"))?;
        }
        return Ok(taps
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn NetBackend>)
            .collect());
    }
    if let Some(len) = args.generate {
        return (0..n)
            .map(|_| {
                Generator::new(len, args.mac)
                    .map(|g| Box::new(g) as Box<dyn NetBackend>)
                    .map_err(|e| e.to_string())
            })
            .collect();
    }
    Ok((0..n)
        .map(|_| {
            let sink = if args.copy_frames {
                Discard::copying()
            } else {
                Discard::new()
            };
            Box::new(sink) as Box<dyn NetBackend>
        })
        .collect())
}

fn run(args: Args) -> Result<(), String> {
    let device = StandbyNetBuilder::new()
        .id(args.id.clone())
        .mac(args.mac)
        .mtu(args.mtu)
        .queue_pairs(args.queue_pairs)
        .queue_size(args.queue_size)
        .standby(args.standby == OnOff::On)
        .build(backends(&args)?)
        .map_err(|e| format!("invalid device configuration: {e}"))?;
    let net = VhostUserNet::new(args.id.clone(), device).map_err(|e| e.to_string())?;
    net.set_poll(std::time::Duration::from_micros(args.poll_us));
    net.set_poll_settle(args.poll_settle_chains, args.poll_settle_pauses);
    if args.force_dirty_log {
        net.migration_log().set_forced(true);
        log::info!(
            "{}: dirty logging forced on (--force-dirty-log): every write to guest memory is \
             logged into a log the daemon allocates when a frontend sends its memory table",
            args.id
        );
    }
    if let Some(path) = &args.control {
        control::spawn_with_mode(path, net.clone(), args.socket_mode)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    }
    let server = if args.client {
        Server::connect(&args.socket, net.clone())
    } else {
        Server::bind_with_mode(&args.socket, net.clone(), args.socket_mode)
    }
    .map_err(|e| error_chain(&e))?;
    log::info!(
        "{}: {} {} (standby {}, {} queue pair(s) of {})",
        args.id,
        if args.client {
            "connecting to"
        } else {
            "listening on"
        },
        args.socket.display(),
        if args.standby == OnOff::On {
            "on"
        } else {
            "off"
        },
        args.queue_pairs,
        args.queue_size
    );
    server.run().map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments() {
        Args::command().debug_assert();
        assert_eq!(
            parse_mac("52:54:00:ab:cd:EF").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        assert!(parse_mac("52:54:00").is_err());
        assert!(parse_mac("52:54:00:ab:cd:zz").is_err());
        // A backend is required, and only one.
        assert!(Args::try_parse_from(["x", "--socket", "s"]).is_err());
        assert!(Args::try_parse_from(["x", "--socket", "s", "--discard", "--tap", "t"]).is_err());
        // --copy-frames only modifies --discard.
        assert!(Args::try_parse_from(["x", "--socket", "s", "--copy-frames"]).is_err());
        let a = Args::try_parse_from(["x", "--socket", "s", "--discard", "--copy-frames"]).unwrap();
        assert!(a.discard && a.copy_frames);
        let a =
            Args::try_parse_from(["x", "--socket", "s", "--generate", "64", "--standby", "off"])
                .unwrap();
        assert_eq!(a.standby, OnOff::Off);
        assert_eq!(backends(&a).unwrap().len(), 1);
        let a = Args::try_parse_from(["x", "--socket", "s", "--generate", "10"]).unwrap();
        assert!(backends(&a).err().unwrap().contains("60 to"));
        // -s and --socket-path as rust-vmm's vhost-device daemons; --socket kept.
        for flag in ["-s", "--socket-path", "--socket"] {
            let a = Args::try_parse_from(["x", flag, "/run/s", "--discard"]).unwrap();
            assert_eq!(a.socket, PathBuf::from("/run/s"));
            assert!(!a.client);
            assert_eq!(a.socket_mode, 0o600);
        }
        let a = Args::try_parse_from(["x", "-s", "s", "--discard", "--client"]).unwrap();
        assert!(a.client);
        let a =
            Args::try_parse_from(["x", "-s", "s", "--discard", "--socket-mode", "660"]).unwrap();
        assert_eq!(a.socket_mode, 0o660);
        assert!(Args::try_parse_from(["x", "-s", "s", "--discard", "--socket-mode", "8"]).is_err());
        assert!(
            Args::try_parse_from(["x", "-s", "s", "--discard", "--socket-mode", "1777"]).is_err()
        );
        // --force-dirty-log: off by default, with any backend.
        assert!(!a.force_dirty_log);
        for backend in [&["--discard"][..], &["--generate", "64"], &["--tap", "t"]] {
            let a = Args::try_parse_from(
                ["x", "-s", "s", "--force-dirty-log"]
                    .into_iter()
                    .chain(backend.iter().copied()),
            )
            .unwrap();
            assert!(a.force_dirty_log, "{backend:?}");
        }
    }
}
