//! `failover-demo`: virtio-net failover end to end, in two processes.
//!
//! The source VMM model starts the destination as a second process and talks
//! to it over a Unix socket. Each has two PCIe root ports, a virtio-net
//! standby offering STANDBY, and a primary stand-in (a virtio-net function
//! without STANDBY and with the same MAC: any Ethernet-class function can be a
//! primary). The guest is the scripted Linux-like guest (PCI enumeration,
//! `virtio_pci`, Linux 6.1's pciehp step by step, `net_failover`) running a
//! ping every 10 ms of guest time.
//!
//! 1. The guest acknowledges STANDBY; the coordinator plugs the primary; the
//!    ping goes through the primary.
//! 2. Migration: pre-flight against the destination's offer; the primary's
//!    link goes down (make-before-break) and the guest moves to the standby;
//!    then the unplug, through pciehp's 5 s attention-button window.
//! 3. The standby side's state, the guest and its RAM cross the socket.
//! 4. The destination plugs its primary before the guest resumes, and the
//!    ping moves back to a primary there.
//!
//! It prints the event timeline (guest and real time) and the counters, and
//! exits 0 only if every request was answered intact.

#![deny(missing_docs)]

mod app;
mod host;
mod out;
mod proto;
mod topology;
mod vm;
mod wire;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use failover::{Event, MigrationState};
use pcie_hotplug::HotplugSlot;
use virtio_device::virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

use crate::out::Out;
use crate::proto::{Msg, Report};
use crate::topology::Topology;
use crate::vm::{GuestSide, Spec, Vm};

/// virtio-net failover, end to end: a source and a destination VMM model in
/// two processes, a scripted guest, the primary unplugged with
/// make-before-break, the migration, and the primary plugged on the
/// destination.
#[derive(Debug, Parser)]
#[command(name = "failover-demo", version)]
struct Args {
    /// Cancel the migration one second into the guest's 5 s attention-button
    /// window: the primary never leaves.
    #[arg(long)]
    cancel: bool,
    /// Give the destination an older standby (no VIRTIO_NET_F_MRG_RXBUF,
    /// which the guest acknowledged): pre-flight refuses the migration before
    /// anything is unplugged.
    #[arg(long)]
    fail_destination: bool,
    /// QEMU's order: unplug the primary while its link is up. Shows the
    /// frames that make-before-break saves (and exits 1 when any is lost).
    #[arg(long)]
    no_make_before_break: bool,
    /// How the primary leaves: `pciehp`, the guest's attention-button path
    /// (Linux's 5 s delay), or `surprise`, out at once (the port reports
    /// Hot-Plug Surprise), safe because make-before-break moved the guest
    /// first.
    #[arg(long, value_enum, default_value_t = Hotplug::Pciehp)]
    hotplug: Hotplug,
    /// The pair, as a teaming configuration in libvirt's vocabulary (TOML or
    /// JSON, by extension): a `virtio` standby with `teaming persistent` and a
    /// `stand-in` primary with `teaming transient`. The built-in one is printed
    /// by `--print-config`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the built-in teaming configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Real taps: each process in a network namespace of its own, the
    /// standby's and the primary's taps on a Linux bridge, the host a packet
    /// socket on the bridge (needs root, and ip(8) from iproute2).
    #[arg(long)]
    tap: bool,
    /// Print the event stream as JSON lines (QMP-style events with `side`
    /// and `real_ms`), then a JSON summary.
    #[arg(long)]
    json: bool,
    /// Internal: run as the destination, connecting to this socket.
    #[arg(long, hide = true)]
    destination: Option<PathBuf>,
}

/// Hot-plug flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Hotplug {
    /// PCIe native hot-plug with Linux's pciehp.
    Pciehp,
    /// Surprise removal.
    Surprise,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        print!("{}", topology::DEFAULT_CONFIG.trim_start());
        return ExitCode::SUCCESS;
    }
    let r = match &args.destination {
        Some(path) => destination(&args, path),
        None => source(&args),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("failover-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spec(args: &Args, destination: bool) -> Spec {
    Spec {
        make_before_break: !args.no_make_before_break,
        tap: args.tap,
        surprise: args.hotplug == Hotplug::Surprise,
        withhold_features: (destination && args.fail_destination)
            .then_some(1u64 << VIRTIO_NET_F_MRG_RXBUF),
    }
}

fn has_carrier_primary(g: &GuestSide) -> bool {
    g.nf.primary.as_ref().is_some_and(|p| p.carrier)
}

fn report(vm: &Vm, g: &GuestSide) -> Report {
    Report {
        events: vm.events.events(),
        wire: vm.wire.counters(),
        host_answered: match &vm.responder {
            Some(r) => r.answered,
            None => vm.wire.counters().requests.iter().sum(),
        },
        app: g.app.counters,
        unanswered: g.app.unanswered(),
        nf_log: g.nf.log.clone(),
        guest_time: vm.clock.now(),
    }
}

/// Lets the requests in flight come back, with the ping stopped.
fn drain(vm: &mut Vm, g: &mut GuestSide) {
    g.app.running = false;
    vm.run(g, Duration::from_millis(200), |_, _| false);
}

fn spawn_destination(args: &Args, sock: &PathBuf) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let mut c = Command::new(exe);
    c.arg("--destination").arg(sock);
    if args.json {
        c.arg("--json");
    }
    if args.fail_destination {
        c.arg("--fail-destination");
    }
    if args.no_make_before_break {
        c.arg("--no-make-before-break");
    }
    if let Some(p) = &args.config {
        c.arg("--config").arg(p);
    }
    if args.tap {
        c.arg("--tap");
    }
    if args.hotplug == Hotplug::Surprise {
        c.args(["--hotplug", "surprise"]);
    }
    c.spawn()
        .map_err(|e| format!("cannot start the destination process: {e}"))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn source(args: &Args) -> Result<ExitCode, String> {
    let real = Instant::now();
    let out = Out::new("source", args.json);
    let (topo, warnings) = Topology::load(args.config.as_deref())?;
    for w in warnings {
        out.note(Duration::ZERO, &format!("teaming configuration: {w}"));
    }
    let dir = std::env::temp_dir().join(format!("failover-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = TempDir(dir);
    let sock = dir.0.join("migration.sock");
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    let mut child = spawn_destination(args, &sock)?;
    let (mut s, _) = listener
        .accept()
        .map_err(|e| format!("the destination did not connect: {e}"))?;

    if args.tap {
        host::enter_namespace().map_err(|e| e.to_string())?;
    }
    let mut vm = Vm::new(spec(args, false), &topo, out.clone())?;
    vm.power_on();
    let mut g = vm.boot();
    out.note(
        vm.clock.now(),
        "guest booted; waiting for it to enslave the primary",
    );
    if !vm.run(&mut g, Duration::from_secs(10), |_, g| {
        has_carrier_primary(g)
    }) {
        return Err("the guest never got the primary".into());
    }
    g.app.start(vm.clock.now());
    out.note(
        vm.clock.now(),
        "ping every 10 ms through the failover master",
    );
    vm.run(&mut g, Duration::from_secs(1), |_, _| false);

    let offer =
        match proto::recv(&mut s).map_err(|e| format!("no offer from the destination: {e}"))? {
            Msg::Offer(o) => o,
            m => return Err(format!("expected the destination's offer, got {m:?}")),
        };
    out.note(
        vm.clock.now(),
        "migrate: pre-flight against the destination's offer",
    );
    let mig = match vm.coord.prepare_outgoing_to(&offer) {
        Ok(m) => m,
        Err(e) => {
            out.note(
                vm.clock.now(),
                &format!("pre-flight refused the migration: {e}"),
            );
            let _ = proto::send(
                &mut s,
                &Msg::Abort {
                    reason: e.to_string(),
                },
            );
            vm.run(&mut g, Duration::from_millis(500), |_, _| false);
            drain(&mut vm, &mut g);
            let kept =
                has_carrier_primary(&g) && vm.primary_port.lock().unwrap().device().is_some();
            return finish(
                args,
                &out,
                real,
                &mut child,
                report(&vm, &g),
                None,
                args.fail_destination && kept,
            );
        }
    };
    let wait_start = vm.clock.now();
    if args.cancel {
        vm.run(&mut g, Duration::from_secs(1), |_, _| false);
        out.note(
            vm.clock.now(),
            "migrate_cancel inside the guest's button window",
        );
        mig.cancel().map_err(|e| format!("cancel: {e}"))?;
        let back = vm.run(&mut g, Duration::from_secs(40), |_, g| {
            mig.state().is_terminal() && has_carrier_primary(g)
        });
        vm.run(&mut g, Duration::from_millis(500), |_, _| false);
        drain(&mut vm, &mut g);
        let _ = proto::send(
            &mut s,
            &Msg::Abort {
                reason: "cancelled".into(),
            },
        );
        let left = vm
            .events
            .kinds()
            .iter()
            .any(|e| matches!(e, Event::PrimaryUnplugged { .. }));
        let ok = back && mig.state() == MigrationState::Cancelled && !left;
        return finish(args, &out, real, &mut child, report(&vm, &g), None, ok);
    }
    if !vm.run(&mut g, Duration::from_secs(40), |_, _| {
        mig.state() == MigrationState::Active || mig.state().is_terminal()
    }) || mig.state() != MigrationState::Active
    {
        let _ = proto::send(
            &mut s,
            &Msg::Abort {
                reason: format!("{:?}", mig.state()),
            },
        );
        return Err(format!(
            "the migration did not become active: {:?} ({})",
            mig.state(),
            mig.reason().unwrap_or_default()
        ));
    }
    let wait_unplug = vm.clock.now() - wait_start;
    out.note(
        vm.clock.now(),
        &format!(
            "wait-unplug over after {:.3} s of guest time; RAM pre-copy while the guest runs on the standby",
            wait_unplug.as_secs_f64()
        ),
    );
    vm.run(&mut g, Duration::from_millis(200), |_, _| false);
    let (saved, ram) = vm.save(&mut g)?;
    let sizes = (
        saved.standby.len() + saved.standby_port.len() + saved.primary_port.len(),
        serde_json::to_vec(&saved.kernel)
            .map(|v| v.len())
            .unwrap_or(0),
        ram.len(),
    );
    out.note(
        vm.clock.now(),
        &format!(
            "stop and copy: standby side {} bytes (transport, device, ports), guest {} bytes, RAM {} bytes",
            sizes.0, sizes.1, sizes.2
        ),
    );
    proto::send(&mut s, &Msg::State(Box::new(saved))).map_err(|e| format!("sending state: {e}"))?;
    proto::send_ram(&mut s, &ram).map_err(|e| format!("sending RAM: {e}"))?;
    mig.complete().map_err(|e| format!("complete: {e}"))?;
    let src = report(&vm, &g);
    let dst =
        match proto::recv(&mut s).map_err(|e| format!("no report from the destination: {e}"))? {
            Msg::Report(r) => *r,
            m => return Err(format!("expected the destination's report, got {m:?}")),
        };
    let ok = dst.events.iter().any(
        |e| matches!(&e.event, Event::PrimaryPlugged { primary } if *primary == topo.primary_id),
    );
    finish(args, &out, real, &mut child, src, Some(dst), ok)
}

fn finish(
    args: &Args,
    out: &Out,
    real: Instant,
    child: &mut Child,
    src: Report,
    dst: Option<Report>,
    scenario_ok: bool,
) -> Result<ExitCode, String> {
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the destination: {e}"))?;
    // The guest's program moved with the guest: its counters are cumulative.
    let last = dst.as_ref().unwrap_or(&src);
    let c = last.app;
    let lost = last.unanswered + c.not_sent;
    let ok = scenario_ok && status.success() && lost == 0 && c.bad == 0;
    let real_ms = real.elapsed().as_secs_f64() * 1e3;
    if args.json || out.json() {
        let v = serde_json::json!({
            "summary": {
                "ok": ok,
                "requests_sent": { "standby": c.sent[0], "primary": c.sent[1] },
                "replies": { "standby": c.replies[0], "primary": c.replies[1] },
                "lost": lost,
                "corrupted_or_unexpected": c.bad,
                "tap": args.tap,
                "host_answered": { "source": src.host_answered, "destination": dst.as_ref().map(|d| d.host_answered) },
                "foreign_frames": c.foreign,
                "source_wire": src.wire,
                "destination_wire": dst.as_ref().map(|d| d.wire),
                "guest_seconds": last.guest_time.as_secs_f64(),
                "real_ms": real_ms,
                "destination_exit": status.code(),
            }
        });
        println!("{v}");
    } else {
        println!();
        println!(
            "summary ({:.3} s of guest time, {real_ms:.0} ms real)",
            last.guest_time.as_secs_f64()
        );
        println!(
            "  requests sent      {:>6} on the primary, {:>6} on the standby",
            c.sent[1], c.sent[0]
        );
        println!(
            "  replies received   {:>6} on the primary, {:>6} on the standby",
            c.replies[1], c.replies[0]
        );
        println!("  lost               {lost:>6}");
        println!("  corrupted          {:>6}", c.bad);
        let answered = |r: &Report| r.host_answered;
        println!(
            "  host answered      {:>6} on the source, {:>6} on the destination{}",
            answered(&src),
            dst.as_ref().map_or(0, answered),
            if args.tap {
                " (a Linux bridge per side)"
            } else {
                ""
            }
        );
        if !args.tap {
            println!(
                "  lost in a port     {:>6} on the source (the primary's, when it left), {:>6} on the destination",
                src.wire.lost_in_port,
                dst.as_ref().map_or(0, |d| d.wire.lost_in_port)
            );
        }
        println!(
            "  {}",
            if ok {
                "OK: every request answered intact"
            } else {
                "FAILED"
            }
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn destination(args: &Args, sock: &PathBuf) -> Result<ExitCode, String> {
    let out = Out::new("destination", args.json);
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to the source at {}: {e}", sock.display()))?;
    let (topo, _) = Topology::load(args.config.as_deref())?;
    if args.tap {
        host::enter_namespace().map_err(|e| e.to_string())?;
    }
    let mut vm = Vm::new(spec(args, true), &topo, out.clone())?;
    // The standby is attached by its restore; the machine is ready for the
    // coordinator's registrations (it plugs nothing before negotiation).
    vm.coord.machine_ready();
    proto::send(&mut s, &Msg::Offer(vm.coord.destination_offer()))
        .map_err(|e| format!("sending the offer: {e}"))?;
    let saved = match proto::recv(&mut s).map_err(|e| format!("waiting for the source: {e}"))? {
        Msg::State(saved) => saved,
        Msg::Abort { reason } => {
            out.note(vm.clock.now(), &format!("no incoming migration: {reason}"));
            return Ok(ExitCode::SUCCESS);
        }
        m => return Err(format!("expected state, got {m:?}")),
    };
    let ram = proto::recv_ram(&mut s).map_err(|e| format!("receiving RAM: {e}"))?;
    vm.coord
        .prepare_incoming()
        .map_err(|e| format!("prepare_incoming: {e}"))?;
    let mut g = vm.restore(*saved, &ram)?;
    out.note(
        vm.clock.now(),
        "state restored; plugging the primary before the guest resumes",
    );
    vm.coord
        .complete_incoming()
        .map_err(|e| format!("complete_incoming: {e}"))?;
    let resumed = vm.clock.now();
    if vm.run(&mut g, Duration::from_secs(10), |_, g| {
        has_carrier_primary(g)
    }) {
        let took = vm.clock.now() - resumed;
        let why = if took > Duration::from_millis(500) {
            ": the port held the plug until the guest turned the slot's power indicator \
             off (pciehp waits 1 s after the source's power-off, and a plug inside that \
             second loses its presence events), then pciehp's 0.12 s"
        } else {
            ""
        };
        out.note(
            vm.clock.now(),
            &format!(
                "the guest has the destination's primary {:.3} s after resuming{why}",
                took.as_secs_f64()
            ),
        );
    } else {
        out.note(
            vm.clock.now(),
            "the guest did not get the destination's primary",
        );
    }
    vm.run(&mut g, Duration::from_secs(1), |_, _| false);
    drain(&mut vm, &mut g);
    proto::send(&mut s, &Msg::Report(Box::new(report(&vm, &g))))
        .map_err(|e| format!("sending the report: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
