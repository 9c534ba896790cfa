//! DPDK's virtio-user driver (`dpdk-testpmd --vdev net_virtio_user0`) against the
//! `vhost-user-net` binary: a second real driver, in userspace, which negotiates
//! `VIRTIO_F_IN_ORDER` (Linux 6.1 does not) and drives the rings at millions of
//! frames per second.
//!
//! One backend process per direction (`--generate` for guest RX, `--discard` for
//! guest TX) and worker mode (sleeping on kicks, or `--poll-us`) serves two
//! clients in turn, with and without IN_ORDER: the device
//! must activate with the bit exactly when the client offered it, every frame the
//! client counts must be one the device counts, no chain may be malformed, and
//! the backend must serve the next client after each one leaves.
//!
//! Without `dpdk-testpmd` (Debian: `dpdk-dev`), root, or two CPUs the test prints why
//! and passes, unless `VHOST_USER_NET_REQUIRE_DPDK=1` (set by CI), where it fails.

mod harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{Backend, scratch, serial, wait_for};

/// `VIRTIO_F_IN_ORDER`.
const IN_ORDER: u32 = 35;

/// The driver's queue size (virtio-user's default).
const RING: u64 = 256;

fn testpmd() -> Option<PathBuf> {
    let required = std::env::var("VHOST_USER_NET_REQUIRE_DPDK").is_ok_and(|v| v == "1");
    let missing = |what: &str| {
        if required {
            panic!("VHOST_USER_NET_REQUIRE_DPDK=1 but {what}");
        }
        eprintln!("skipping the DPDK test: {what} (apt-get install dpdk)");
        None
    };
    let Some(bin) = ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        return missing("dpdk-testpmd is missing");
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing("dpdk-testpmd without hugepages needs root");
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return missing("testpmd needs two CPUs (a main and a forwarding lcore)");
    }
    Some(bin)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The client receives what the backend generates.
    GuestRx,
    /// The client transmits; the backend discards.
    GuestTx,
}

/// The client's own totals, from the statistics testpmd prints as it exits.
#[derive(Debug, Default)]
struct ClientTotals {
    rx: u64,
    tx: u64,
}

/// `RX-packets: N` / `TX-packets: N` of the last "Forward statistics for
/// port 0" block.
fn parse_totals(out: &str) -> Option<ClientTotals> {
    let block = &out[out.rfind("Forward statistics for port 0")?..];
    let value = |key: &str| -> Option<u64> {
        let rest = &block[block.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some(ClientTotals {
        rx: value("RX-packets:")?,
        tx: value("TX-packets:")?,
    })
}

/// Runs one client with `queues` queue pairs for about three seconds against
/// `socket`; returns its output.
fn client(
    testpmd: &Path,
    dir: &Path,
    socket: &Path,
    direction: Direction,
    in_order: bool,
    queues: u16,
) -> String {
    let mode = match direction {
        Direction::GuestRx => "rxonly",
        Direction::GuestTx => "txonly",
    };
    let vdev = format!(
        "net_virtio_user0,path={},queues={queues},in_order={}",
        socket.display(),
        u8::from(in_order)
    );
    let out = dir.join(format!(
        "testpmd-{mode}-{}-{queues}.out",
        u8::from(in_order)
    ));
    let mut child = Command::new(testpmd)
        .args(["-l", "0,1", "--main-lcore", "0", "--no-huge", "-m", "512"])
        .args(["--no-pci", "--file-prefix"])
        .arg(format!("vut{}", std::process::id()))
        .arg("--vdev")
        .arg(&vdev)
        .args([
            "--",
            "--nb-cores=1",
            "--txpkts=128",
            "--total-num-mbufs=16384",
        ])
        .arg(format!("--rxq={queues}"))
        .arg(format!("--txq={queues}"))
        // Without this, testpmd drains and does not count what arrived before
        // forwarding started.
        .arg("--no-flush-rx")
        .arg(format!("--forward-mode={mode}"))
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start dpdk-testpmd");
    // testpmd forwards until a line arrives on its stdin ("Press enter to
    // exit"), then stops its port and prints its totals.
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = stdin.write_all(b"\n");
    drop(stdin);
    let exited = wait_for(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "dpdk-testpmd did not exit when told to:\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
    }
    std::fs::read_to_string(&out).unwrap()
}

/// The feature word of the backend's last activation.
fn last_activation_features(log: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("device active on"))
        .unwrap_or_else(|| panic!("the device never activated:\n{log}"));
    let hex = line.rsplit("0x").next().unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

fn counter(b: &Backend, key: &str) -> u64 {
    b.status()[key].parse().unwrap()
}

#[test]
fn dpdk_virtio_user_with_and_without_in_order() {
    let Some(testpmd) = testpmd() else { return };
    let _serial = serial();
    let dir = scratch("dpdk");
    // Each direction with the worker sleeping on kicks, and busy-polling with
    // the kicks held off (`--poll-us`).
    for (direction, args) in [
        (Direction::GuestRx, &["--generate", "128"][..]),
        (
            Direction::GuestRx,
            &["--generate", "128", "--poll-us", "100"][..],
        ),
        (Direction::GuestTx, &["--discard"][..]),
        (Direction::GuestTx, &["--discard", "--poll-us", "100"][..]),
    ] {
        let b = Backend::start_binary(
            Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
            &dir,
            "dpdk",
            args,
        );
        for (served, in_order) in [true, false].into_iter().enumerate() {
            let what = format!("{direction:?} {args:?}, in_order={in_order}");
            let (rx0, tx0) = (counter(&b, "rx_frames"), counter(&b, "tx_frames"));
            let out = client(&testpmd, &dir, &b.socket, direction, in_order, 1);
            let totals =
                parse_totals(&out).unwrap_or_else(|| panic!("{what}: no totals in:\n{out}"));
            // The device stops when the client's port stops; its counters are final.
            wait_for(Duration::from_secs(5), || b.status()["active"] == "0")
                .unwrap_or_else(|| panic!("{what}: the device stayed active"));
            let features = last_activation_features(&b.log_text());
            assert_eq!(
                (features >> IN_ORDER) & 1 == 1,
                in_order,
                "{what}: features {features:#x}"
            );
            let (rx, tx) = (
                counter(&b, "rx_frames") - rx0,
                counter(&b, "tx_frames") - tx0,
            );
            match direction {
                Direction::GuestRx => {
                    assert!(totals.rx > 10_000, "{what}: client got {totals:?}");
                    // Frames the device put in the used ring after the client's
                    // last poll are counted by the device only.
                    assert!(
                        rx >= totals.rx && rx - totals.rx <= RING,
                        "{what}: device delivered {rx}, client received {}",
                        totals.rx
                    );
                }
                Direction::GuestTx => {
                    assert!(totals.tx > 10_000, "{what}: client sent {totals:?}");
                    // testpmd counts a frame as sent once it is in the avail
                    // ring; the ones the device had not taken when the port
                    // stopped are counted by the client only.
                    assert!(
                        tx <= totals.tx && totals.tx - tx <= RING,
                        "{what}: client sent {}, the sink took {tx}",
                        totals.tx
                    );
                }
            }
            assert_eq!(counter(&b, "malformed"), 0, "{what}");
            // Each client that left cleanly is one "waiting" line, no error.
            wait_for(Duration::from_secs(5), || {
                b.log_text()
                    .matches("waiting for the next frontend")
                    .count()
                    == served + 1
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: the backend did not go back to listening:\n{}",
                    b.log_text()
                )
            });
            assert!(
                !b.log_text().contains("connection failed"),
                "{what}: {}",
                b.log_text()
            );
        }
    }
}

/// A 2-queue client. DPDK's virtio-user keeps the control queue itself (as
/// QEMU does): it acknowledges `MQ` without `CTRL_VQ` and enables the second
/// pair with `SET_VRING_ENABLE`. Both pairs carry frames, each on its own
/// worker, and the rings the client enables one by one do not make the
/// device restart at every event (they did: it was reactivated on the same
/// rings over and over).
#[test]
fn dpdk_two_queue_client_keeping_the_control_queue() {
    let Some(testpmd) = testpmd() else { return };
    let _serial = serial();
    let dir = scratch("dpdk-mq");
    let args = &[
        "--generate",
        "128",
        "--queue-pairs",
        "2",
        "--poll-us",
        "100",
    ][..];
    let b = Backend::start_binary(
        Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
        &dir,
        "dpdk-mq",
        args,
    );
    let out = client(&testpmd, &dir, &b.socket, Direction::GuestRx, true, 2);
    let totals = parse_totals(&out).unwrap_or_else(|| panic!("no totals in:\n{out}"));
    wait_for(Duration::from_secs(5), || b.status()["active"] == "0")
        .unwrap_or_else(|| panic!("the device stayed active"));
    let st = b.status();
    assert_eq!(st["workers"], "2", "{st:?}");
    assert!(totals.rx > 10_000, "client got {totals:?}");
    let chains0: u64 = st["pair0_chains"].parse().unwrap();
    let chains1: u64 = st["pair1_chains"].parse().unwrap();
    assert!(chains0 + chains1 >= totals.rx, "{st:?}");
    assert!(
        chains0 > 0 && chains1 > 0,
        "both pairs carry frames: {st:?}"
    );
    let log = b.log_text();
    let activations = log.matches("device active on").count();
    assert!(
        activations <= 2,
        "the device was activated {activations} times for one client:\n{log}"
    );
    eprintln!("2-queue DPDK client: pair 0 moved {chains0} chains, pair 1 {chains1}");
    assert_eq!(counter(&b, "malformed"), 0);
    assert!(!log.contains("connection failed"), "{log}");
}

/// `--force-dirty-log` with DPDK's virtio-user, which never migrates: its
/// memory table gives the client's virtual addresses as guest addresses, so
/// the daemon's own log covers up to 2^47 and must still be allocated (as
/// reserved address space), and every write of the device in both
/// directions must land in it, none missed.
#[test]
fn dpdk_virtio_user_with_forced_dirty_logging() {
    let Some(testpmd) = testpmd() else { return };
    let _serial = serial();
    let dir = scratch("dpdk-dirty");
    for (direction, args) in [
        (
            Direction::GuestRx,
            &["--generate", "128", "--poll-us", "100", "--force-dirty-log"][..],
        ),
        (
            Direction::GuestTx,
            &["--discard", "--poll-us", "100", "--force-dirty-log"][..],
        ),
    ] {
        let b = Backend::start_binary(
            Path::new(env!("CARGO_BIN_EXE_vhost-user-net")),
            &dir,
            "dpdk-dirty",
            args,
        );
        let what = format!("{direction:?} {args:?}");
        let out = client(&testpmd, &dir, &b.socket, direction, true, 1);
        let totals = parse_totals(&out).unwrap_or_else(|| panic!("{what}: no totals in:\n{out}"));
        wait_for(Duration::from_secs(5), || b.status()["active"] == "0")
            .unwrap_or_else(|| panic!("{what}: the device stayed active"));
        let st = b.status();
        let log = b.log_text();
        let moved = match direction {
            Direction::GuestRx => totals.rx,
            Direction::GuestTx => totals.tx,
        };
        assert!(moved > 10_000, "{what}: client {totals:?}");
        assert_eq!(st["dirty_log"], "forced", "{what}: {st:?}");
        assert_eq!(st["dirty_missed"], "0", "{what}: {st:?}\n{log}");
        let writes: u64 = st["dirty_writes"].parse().unwrap();
        assert!(writes > 0, "{what}: {st:?}");
        assert!(
            log.contains("forced dirty logging: log allocated"),
            "{what}: {log}"
        );
        assert!(!log.contains("is not logged"), "{what}: {log}");
        assert!(!log.contains("connection failed"), "{what}: {log}");
        let line = log
            .lines()
            .find(|l| l.contains("log allocated"))
            .unwrap_or_default();
        eprintln!("{what}: {writes} writes logged; {line}");
    }
}
