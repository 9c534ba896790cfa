//! The backend against a real Linux guest: User-Mode Linux 6.1's `virtio_net`,
//! `failover` and `net_failover` drivers as the vhost-user frontend.
//!
//! Every assertion about the guest comes from the guest's own console. The
//! primary half of net_failover needs PCI, which UML lacks; the scripted-guest
//! scenarios in `crates/test-guest` cover it.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use harness::{Backend, Guest, feature_bit, guest_root, ip, scratch, serial, wait_for};

const BOOT: Duration = Duration::from_secs(60);

// Feature bits, as the guest's sysfs string shows them (bit 0 first).
const CSUM: usize = 0;
const GUEST_CSUM: usize = 1;
const GUEST_TSO4: usize = 7;
const HOST_TSO4: usize = 11;
const MRG_RXBUF: usize = 15;
const CTRL_VQ: usize = 17;
const STANDBY: usize = 62;

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

#[test]
fn standby_guest_end_to_end() {
    let Some(env) = harness::env() else { return };
    let _g = serial();
    let dir = scratch("e2e");
    let tap = "vutap-e2e";
    let (host_ip, guest_ip) = ("10.77.77.1", "10.77.77.2");
    let up_to = 4 << 20;
    let tx_data = payload(up_to, 1);
    let rx_data = payload(up_to, 2);
    let body = format!(
        r#"
ip link set eth0 up
ip addr add {guest_ip}/24 dev eth0
i=0; while [ "$(cat /sys/class/net/eth1/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "FEATURES $(cat /sys/class/net/eth1/device/features)"
dmesg | grep 'failover' | sed 's/^/DMESG /'
echo "MAC $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth1/address)"
echo "MTU $(cat /sys/class/net/eth1/mtu)"
echo "MASTER $(basename $(readlink /sys/class/net/eth1/master))"
echo "CARRIER $(cat /sys/class/net/eth1/carrier)"
ping -c 3 -W 3 {host_ip} > /data/ping.txt 2>&1 && echo PING_OK
echo TX_START
nc {host_ip} 5001 < /data/tx.bin
echo TX_DONE
nc -l -p 5002 > /data/rx.bin &
sleep 0.5
echo RX_LISTENING
wait
echo RX_DONE
ip link set eth1 promisc on
sleep 0.3
echo PROMISC_ON
ip link set eth1 promisc off
sleep 0.3
echo PROMISC_OFF
echo LINK_WAIT
i=0; while [ "$(cat /sys/class/net/eth1/carrier)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "CARRIER_DOWN $(cat /sys/class/net/eth1/carrier) $(cat /sys/class/net/eth0/carrier)"
i=0; while [ "$(cat /sys/class/net/eth1/carrier)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "CARRIER_UP $(cat /sys/class/net/eth1/carrier) $(cat /sys/class/net/eth0/carrier)"
"#
    );
    let root = guest_root(&env, &dir, &body);
    std::fs::write(root.join("data/tx.bin"), &tx_data).unwrap();

    let be = Backend::start(
        &env,
        &dir,
        "be",
        &["--tap", tap, "--mac", "52:54:00:12:34:56", "--mtu", "1500"],
    );
    wait_for(Duration::from_secs(5), || {
        std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()
    })
    .expect("the backend created its tap");
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", tap]);
    let listener = TcpListener::bind((host_ip, 5001)).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < up_to {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    });

    let guest = Guest::boot(&env, &root, &be.socket);
    let features = guest.expect("FEATURES ", BOOT);
    let features = features.trim_start_matches("FEATURES ");
    for (name, bit) in [
        ("STANDBY", STANDBY),
        ("MRG_RXBUF", MRG_RXBUF),
        ("CSUM", CSUM),
        ("GUEST_CSUM", GUEST_CSUM),
        ("HOST_TSO4", HOST_TSO4),
        ("GUEST_TSO4", GUEST_TSO4),
        ("CTRL_VQ", CTRL_VQ),
    ] {
        assert!(
            feature_bit(features, bit),
            "{name} not negotiated: {features}"
        );
    }
    guest.expect("PING_OK", Duration::from_secs(20));
    guest.expect("TX_DONE", Duration::from_secs(60));
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), tx_data.len(), "guest to host: bytes lost");
    assert!(got == tx_data, "guest to host: bytes differ");

    guest.expect("RX_LISTENING", Duration::from_secs(10));
    let mut s = TcpStream::connect((guest_ip, 5002)).unwrap();
    s.write_all(&rx_data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    guest.expect("RX_DONE", Duration::from_secs(60));
    drop(s);
    let landed = std::fs::read(root.join("data/rx.bin")).unwrap();
    assert_eq!(landed.len(), rx_data.len(), "host to guest: bytes lost");
    assert!(landed == rx_data, "host to guest: bytes differ");
    let st = be.status();
    let avg = |bytes: &str, frames: &str| {
        st[bytes].parse::<u64>().unwrap() / st[frames].parse::<u64>().unwrap().max(1)
    };
    let (tx_avg, rx_avg) = (avg("tx_bytes", "tx_frames"), avg("rx_bytes", "rx_frames"));
    // Negotiated is asserted above; whether UML's stack then builds GSO
    // frames is its choice (seen here: MSS-sized frames both ways).
    eprintln!("average frame: guest TX {tx_avg} B, guest RX {rx_avg} B");

    // Control queue: the guest's rx-mode and MAC filter commands.
    guest.expect("PROMISC_ON", Duration::from_secs(10));
    assert_eq!(be.status()["promisc"], "1");
    guest.expect("PROMISC_OFF", Duration::from_secs(10));
    let st = be.status();
    assert_eq!(st["promisc"], "0");
    assert!(
        st["multicast"].parse::<u32>().unwrap() > 0,
        "the guest's multicast list reached the filter: {st:?}"
    );
    assert_eq!(st["ctrl_err"], "0");

    // Link down and up from the backend, seen by the guest.
    guest.expect("LINK_WAIT", Duration::from_secs(10));
    assert_eq!(be.control("link down"), "ok");
    let down = guest.expect("CARRIER_DOWN", Duration::from_secs(15));
    assert_eq!(
        down, "CARRIER_DOWN 0 0",
        "standby and failover master both lose carrier"
    );
    assert_eq!(be.control("link up"), "ok");
    let up = guest.expect("CARRIER_UP", Duration::from_secs(15));
    assert_eq!(up, "CARRIER_UP 1 1");

    let console = guest.wait(Duration::from_secs(30));
    assert_eq!(be.status()["ctrl_err"], "0");

    // What the guest read from our configuration space.
    assert!(
        console.contains("failover master:eth0 registered"),
        "{console}"
    );
    assert!(
        console.contains("failover standby slave:eth1 registered"),
        "{console}"
    );
    assert!(console.contains("MAC 52:54:00:12:34:56 52:54:00:12:34:56"));
    assert!(console.contains("MTU 1500"));
    assert!(console.contains("MASTER eth0"));
    assert!(console.contains("CARRIER 1"));
    let ping = std::fs::read_to_string(root.join("data/ping.txt")).unwrap();
    assert!(ping.contains("3 packets received"), "{ping}");
}

#[test]
fn mtu_and_mac_come_from_the_backend() {
    let Some(env) = harness::env() else { return };
    let _g = serial();
    let dir = scratch("config");
    let body = r#"
echo "MAC $(cat /sys/class/net/eth1/address)"
echo "MTU $(cat /sys/class/net/eth1/mtu)"
echo "CARRIER $(ip link set eth1 up; sleep 0.5; cat /sys/class/net/eth1/carrier)"
"#;
    let root = guest_root(&env, &dir, body);
    let be = Backend::start(
        &env,
        &dir,
        "be",
        &["--discard", "--mac", "02:11:22:33:44:55", "--mtu", "1400"],
    );
    assert_eq!(be.control("link down"), "ok");
    let guest = Guest::boot(&env, &root, &be.socket);
    let console = guest.wait(BOOT);
    assert!(console.contains("MAC 02:11:22:33:44:55"), "{console}");
    assert!(console.contains("MTU 1400"), "{console}");
    assert!(
        console.contains("CARRIER 0"),
        "link down before boot: {console}"
    );
}

/// Without STANDBY there is no failover master, and the guest may change its
/// MAC (Linux's virtio_net refuses that on a STANDBY device, EOPNOTSUPP).
#[test]
fn without_standby_there_is_no_failover_master() {
    let Some(env) = harness::env() else { return };
    let _g = serial();
    let dir = scratch("nostandby");
    let body = r#"
echo "FEATURES $(cat /sys/class/net/eth0/device/features)"
echo "NETDEVS $(ls /sys/class/net | tr '\n' ' ')"
dmesg | grep 'failover' | sed 's/^/DMESG /'
ip link set eth0 up
ip link set eth0 address 52:54:00:aa:bb:cc && echo MAC_SET
sleep 1
"#;
    let root = guest_root(&env, &dir, body);
    let be = Backend::start(&env, &dir, "be", &["--discard", "--standby", "off"]);
    let guest = Guest::boot(&env, &root, &be.socket);
    guest.expect("MAC_SET", BOOT);
    let st = be.status();
    assert_eq!(
        st["filter_mac"], "52:54:00:aa:bb:cc",
        "VIRTIO_NET_CTRL_MAC_ADDR_SET"
    );
    assert_eq!(st["ctrl_err"], "0");
    let console = guest.wait(BOOT);
    let features = guest_value(&console, "FEATURES ");
    assert!(!feature_bit(&features, STANDBY), "{features}");
    assert!(feature_bit(&features, MRG_RXBUF), "{features}");
    assert_eq!(guest_value(&console, "NETDEVS "), "eth0 lo");
    assert!(!console.contains("failover master"), "{console}");
}

#[test]
fn frontends_come_and_go_and_a_backend_crash_leaves_the_guest_running() {
    let Some(env) = harness::env() else { return };
    let _g = serial();
    let dir = scratch("restart");
    let short = r#"
dmesg | grep 'failover' | sed 's/^/DMESG /'
"#;
    let root = guest_root(&env, &dir, short);
    let mut be = Backend::start(&env, &dir, "be", &["--discard"]);

    // Two guests one after the other on one backend process: the second is
    // served after the first went away.
    for round in 0..2 {
        let guest = Guest::boot(&env, &root, &be.socket);
        let console = guest.wait(BOOT);
        assert!(
            console.contains("failover standby slave:eth1 registered"),
            "round {round}: {console}"
        );
    }
    assert!(be.is_running());

    // A guest whose backend dies under it: the guest keeps running and drops
    // the device; a restarted backend serves the next guest.
    let ticking = r#"
ip link set eth0 up
echo READY
i=0; while [ $i -lt 24 ]; do sleep 0.25; echo "TICK $i $(ls /sys/class/net | tr '\n' ' ')"; i=$((i+1)); done
"#;
    let root2 = guest_root(&env, &scratch("restart-2"), ticking);
    let guest = Guest::boot(&env, &root2, &be.socket);
    guest.expect("READY", BOOT);
    be.kill();
    let socket = be.socket.clone();
    let console = guest.wait(Duration::from_secs(60));
    let ticks = console.lines().filter(|l| l.starts_with("TICK ")).count();
    assert_eq!(ticks, 24, "the guest kept running: {console}");
    let last = console.lines().rfind(|l| l.starts_with("TICK ")).unwrap();
    assert!(
        !last.contains("eth0"),
        "the guest removed the device whose backend died: {last}"
    );

    let be2 = Backend::start(&env, &dir, "be", &["--discard"]);
    assert_eq!(be2.socket, socket);
    let waiting = r#"
ip link set eth0 up
echo READY
sleep 2
"#;
    let root3 = guest_root(&env, &scratch("restart-3"), waiting);
    let guest = Guest::boot(&env, &root3, &be2.socket);
    guest.expect("READY", BOOT);
    wait_for(Duration::from_secs(5), || be2.status()["active"] == "1")
        .expect("the restarted backend activated the device");
    let console = guest.wait(BOOT);
    assert!(console.contains("failover standby slave:eth1 registered"));
}

fn guest_value(console: &str, prefix: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{console}"))
        .trim()
        .to_string()
}
