//! The VMM-side cost of the failover handshake, without the guest's own waits.
//!
//! Each routine starts from a fresh coordinator and root port (set up outside
//! the timing) and plays the guest's decisive Slot Control writes straight
//! into the port, so what is timed is the coordinator, the port and the
//! completions between them:
//!
//! - `handshake/negotiate_plug`: `features_acked` with STANDBY →
//!   `FAILOVER_NEGOTIATED`, the plug request, the guest's power-on and
//!   indicator-on writes → `PRIMARY_PLUGGED` delivered.
//! - `handshake/migrate_out`: pre-flight against the destination's offer, the
//!   link-down hook, the standby's first frame → the unplug request, the
//!   guest's blink and power-off writes → `active`, `ready_to_save`,
//!   `complete`.
//! - `handshake/cancel_in_window`: the same up to the guest's blink, then
//!   `cancel()` → the unplug withdrawn and the link restored.
//! - `handshake/power_off_to_active`: only the guest's power-off write, the
//!   completion inside it and the deferred `MIGRATION active` delivery: the
//!   latency between the guest's eject and the migration going on.
//! - `floor/mutex_lock_unlock`: an uncontended lock and unlock, the unit the
//!   coordinator and the port are built from.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use failover::{
    Coordinator, DestinationOffer, EventLog, MigrationState, OutgoingMigration, Primary, Slot,
    Standby,
};
use pcie_hotplug::{RootPort, RootPortBuilder};
use test_guest::{IrqQueue, StubEndpoint};
use virtio_device::FeaturesAcked;
use vmm_pci::PciFunction;
use vmm_pci::pcie::SLTCTL;

const STANDBY: u64 = 1 << 62;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6f, 0x55, 0xcc];

struct Rig {
    coord: Coordinator,
    port: Arc<Mutex<RootPort>>,
    events: EventLog,
    woken: Arc<AtomicBool>,
    cap: u16,
    base: u16,
    link_down: Arc<AtomicBool>,
}

impl Rig {
    fn new() -> Rig {
        let irqs = IrqQueue::new();
        let port = Arc::new(Mutex::new(
            RootPortBuilder::new("rp1", 2).build(irqs.clone()),
        ));
        let events = EventLog::new();
        let woken = Arc::new(AtomicBool::new(false));
        let w = woken.clone();
        let coord = Coordinator::builder()
            .listener(Arc::new(events.clone()))
            .waker(move || w.store(true, Ordering::Relaxed))
            .build();
        let link_down = Arc::new(AtomicBool::new(false));
        let l = link_down.clone();
        coord
            .add_standby(Standby::new("net1").mac(MAC).offered_features(u64::MAX))
            .unwrap();
        coord
            .add_primary(
                Primary::new(
                    "hostdev0",
                    "net1",
                    StubEndpoint::vf(),
                    Slot::port("rp1", &port),
                )
                .mac(MAC)
                .link(Arc::new(move |up: bool| {
                    l.store(!up, Ordering::Relaxed);
                    Ok(())
                })),
            )
            .unwrap();
        coord.machine_ready();
        let cap = port.lock().unwrap().pcie_cap_offset();
        let base = port.lock().unwrap().config().get_u16(cap + SLTCTL) & !0x0f00;
        let r = Rig {
            coord,
            port,
            events,
            woken,
            cap,
            base,
            link_down,
        };
        // pciehp's probe of an empty slot: power off, indicator off.
        r.write(0x0700);
        r
    }

    /// A guest Slot Control write (power and indicator bits).
    fn write(&self, bits: u16) {
        self.port
            .lock()
            .unwrap()
            .write_config(self.cap + SLTCTL, &(self.base | bits).to_le_bytes());
        if self.woken.swap(false, Ordering::Relaxed) {
            self.coord.run_deferred();
        }
    }

    fn negotiate_and_plug(&self) {
        self.coord.features_acked(&FeaturesAcked {
            device_id: "net1".into(),
            device_type: 1,
            features: STANDBY | 1 << 32,
            restored: false,
        });
        self.write(0x0200); // power on, indicator blinking
        self.write(0x0100); // indicator on: the guest has it
    }

    /// Up to the guest's blink after the attention button.
    fn start_migration(&self, offer: &DestinationOffer) -> OutgoingMigration {
        let m = self.coord.prepare_outgoing_to(offer).unwrap();
        self.coord.standby_traffic("net1");
        // The unplug it calls for is deferred work: the VMM's loop runs it.
        if self.woken.swap(false, Ordering::Relaxed) {
            self.coord.run_deferred();
        }
        self.write(0x0200); // the press seen: power indicator blinking
        m
    }
}

fn offer() -> DestinationOffer {
    Rig::new().coord.destination_offer()
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.measurement_time(Duration::from_secs(4));
    let offer = offer();

    g.bench_function("negotiate_plug", |b| {
        b.iter_batched(
            Rig::new,
            |r| {
                r.negotiate_and_plug();
                r
            },
            BatchSize::SmallInput,
        )
    });
    // Check once that the routines do what they claim.
    let r = Rig::new();
    r.negotiate_and_plug();
    assert!(
        r.events
            .kinds()
            .iter()
            .any(|e| matches!(e, failover::Event::PrimaryPlugged { .. }))
    );
    let m = r.start_migration(&offer);
    assert!(
        r.link_down.load(Ordering::Relaxed),
        "{:#?}",
        r.events.kinds()
    );
    r.write(0x0600);
    assert_eq!(m.state(), MigrationState::Active);

    g.bench_function("migrate_out", |b| {
        b.iter_batched(
            || {
                let r = Rig::new();
                r.negotiate_and_plug();
                r
            },
            |r| {
                let m = r.start_migration(&offer);
                r.write(0x0600); // power off: the primary leaves
                r.coord.ready_to_save().unwrap();
                m.complete().unwrap();
                (r, m)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("cancel_in_window", |b| {
        b.iter_batched(
            || {
                let r = Rig::new();
                r.negotiate_and_plug();
                r
            },
            |r| {
                let m = r.start_migration(&offer);
                m.cancel().unwrap();
                (r, m)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("power_off_to_active", |b| {
        b.iter_batched(
            || {
                let r = Rig::new();
                r.negotiate_and_plug();
                let m = r.start_migration(&offer);
                (r, m)
            },
            |(r, m)| {
                r.write(0x0600);
                black_box(m.state());
                (r, m)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut f = c.benchmark_group("floor");
    let m = Mutex::new(0u64);
    f.bench_function("mutex_lock_unlock", |b| {
        b.iter(|| *black_box(&m).lock().unwrap() += 1)
    });
    f.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
