//! The hot-plug root port under the scripted Linux 6.1 pciehp guest, with the
//! VMM's plug, unplug, cancel and surprise requests, the interlock, polls,
//! raw guest writes to Slot Control, Slot Status and Link Control, and
//! virtual clock advances interleaved at arbitrary points.
//!
//! Checked after every step: no panic; every request's completion fires at
//! most once, and only with its true outcome (Plugged: the device is in the
//! slot, present and powered; Unplugged: it left; Cancelled for an unplug: it
//! stayed; Cancelled or Aborted for a plug: it is not in the slot); at most
//! one request is unresolved, exactly when the slot says one is pending, and
//! of that kind; a repeated cancel returns the same completion; a device is
//! reachable on the secondary bus exactly when presence is set and the slot
//! is powered. At the end, after the guest settles, nothing is left
//! unresolved unless the slot still says so.

#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pcie_hotplug::{Completion, HotplugOutcome, HotplugSlot, Operation, RootPort, RootPortBuilder};
use test_guest::{Guest, IrqQueue, StubEndpoint, Timings, VirtualClock};
use vmm_pci::{Bdf, PciHandle, PciRoot, ecam_offset};

#[derive(Arbitrary, Debug)]
enum Op {
    Plug,
    Unplug,
    Cancel,
    Surprise,
    Interlock(bool),
    Poll,
    /// The guest runs for this many milliseconds (its interrupts, threads and
    /// timers), the VMM's timer firing the port's deadline.
    Run(u16),
    /// The guest handles what is pending without time passing.
    Service,
    /// A raw guest write into the PCI Express capability: Slot Control (0),
    /// Slot Status (1), Link Control (2), or the MSI capability's mask (3).
    Raw {
        reg: u8,
        value: u16,
    },
    /// A raw guest read of Slot Control or Slot Status.
    Read(bool),
}

#[derive(Arbitrary, Debug)]
struct Input {
    surprise: bool,
    cold: bool,
    ops: Vec<Op>,
}

const PORT: Bdf = Bdf::new(0, 1, 0);
const SLTCTL: u16 = 0x18;
const SLTSTA: u16 = 0x1a;
const LNKCTL: u16 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plug,
    Unplug,
}

struct Request {
    kind: Kind,
    device: *const (),
    completion: Completion,
    fired: Arc<AtomicU32>,
    checked: bool,
}

fn addr(h: &PciHandle) -> *const () {
    Arc::as_ptr(h) as *const ()
}

struct Rig {
    clock: VirtualClock,
    port: Arc<Mutex<RootPort>>,
    guest: Guest,
    root: Arc<PciRoot>,
    requests: Vec<Request>,
    /// The completion a cancel returned, and the unplug it belongs to.
    cancels: Vec<(Completion, usize)>,
    cap: u16,
    msi: Option<u16>,
}

impl Rig {
    fn port(&self) -> std::sync::MutexGuard<'_, RootPort> {
        self.port.lock().expect("port lock")
    }

    fn track(&mut self, kind: Kind, device: *const (), c: Completion) {
        let fired = Arc::new(AtomicU32::new(0));
        let f = fired.clone();
        c.on_complete(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        });
        self.requests.push(Request {
            kind,
            device,
            completion: c,
            fired,
            checked: false,
        });
    }

    /// The device of a plug not yet resolved (held, or waiting for the guest).
    fn held(&self) -> Option<*const ()> {
        self.requests
            .iter()
            .rfind(|r| r.kind == Kind::Plug && r.completion.outcome().is_none())
            .map(|r| r.device)
    }

    fn device_in_slot(&self) -> Option<*const ()> {
        self.port().device().map(|h| addr(&h))
    }

    fn run(&mut self, d: Duration) {
        let end = self.clock.now() + d;
        loop {
            self.guest.service();
            let due = self.port().next_deadline();
            if due.is_some_and(|t| t <= self.clock.now()) {
                self.port().poll();
                continue;
            }
            let next = self
                .guest
                .hotplug
                .iter()
                .filter_map(test_guest::Pciehp::next_wake)
                .chain(due)
                .min();
            match next {
                Some(t) if t <= end => self.clock.advance_to(t.max(self.clock.now())),
                _ => {
                    self.clock.advance_to(end);
                    self.guest.service();
                    return;
                }
            }
        }
    }

    fn check(&mut self) {
        if std::env::var_os("FUZZ_TRACE").is_some() {
            for (t, l) in self.guest.env.log.drain(..) {
                eprintln!("guest {t:?}: {l}");
            }
        }
        let state = self.port().slot_state();
        let in_slot = self.device_in_slot();
        let mut unresolved = Vec::new();
        for (i, r) in self.requests.iter_mut().enumerate() {
            let n = r.fired.load(Ordering::SeqCst);
            assert!(n <= 1, "request {i} ({:?}) completed {n} times", r.kind);
            let outcome = r.completion.outcome();
            assert_eq!(
                outcome.is_some(),
                n == 1,
                "request {i}: outcome {outcome:?} but {n} callbacks"
            );
            let Some(outcome) = outcome else {
                unresolved.push(i);
                continue;
            };
            if r.checked {
                continue;
            }
            r.checked = true;
            // The outcome is true right after the step that resolved it.
            match (r.kind, outcome) {
                (Kind::Plug, HotplugOutcome::Plugged) => {
                    assert_eq!(
                        in_slot,
                        Some(r.device),
                        "plug {i} says Plugged but the device is not in the slot"
                    );
                    assert!(
                        state.present && state.powered,
                        "plug {i} says Plugged in a slot {state:?}"
                    );
                }
                (Kind::Plug, HotplugOutcome::Cancelled | HotplugOutcome::Aborted) => {
                    assert_ne!(
                        in_slot,
                        Some(r.device),
                        "plug {i} says {outcome:?} but the device is in the slot"
                    );
                }
                (Kind::Unplug, HotplugOutcome::Unplugged) => {
                    assert_ne!(
                        in_slot,
                        Some(r.device),
                        "unplug {i} says Unplugged but the device is in the slot"
                    );
                }
                (Kind::Unplug, HotplugOutcome::Cancelled) => {
                    assert_eq!(
                        in_slot,
                        Some(r.device),
                        "unplug {i} says Cancelled but the device left"
                    );
                }
                (k, o) => panic!("request {i}: a {k:?} cannot end {o:?}"),
            }
        }
        assert!(
            unresolved.len() <= 1,
            "requests {unresolved:?} unresolved at once"
        );
        match (state.pending, unresolved.first()) {
            (None, None) => {}
            (Some(op), Some(&i)) => {
                let k = self.requests[i].kind;
                let want = match op {
                    Operation::Plug => Kind::Plug,
                    Operation::Unplug => Kind::Unplug,
                };
                assert_eq!(
                    k, want,
                    "the slot says {op} pending, the unresolved request is a {k:?}"
                );
            }
            (p, u) => panic!("the slot says pending {p:?}, unresolved request {u:?}"),
        }
        // A cancel's completion is its unplug's.
        for (c, i) in &self.cancels {
            assert_eq!(
                c.outcome(),
                self.requests[*i].completion.outcome(),
                "a cancel's completion is not its unplug's"
            );
        }
        // Reachable on the secondary bus exactly when present and powered.
        let mut b = [0u8; 4];
        self.port().read_config(0x18, &mut b);
        let secondary = b[1];
        if secondary != 0 {
            let mut id = [0u8; 2];
            self.root
                .ecam_read(ecam_offset(Bdf::new(secondary, 0, 0), 0), &mut id);
            let reachable = u16::from_le_bytes(id) != 0xffff;
            assert_eq!(
                reachable,
                state.present && state.powered && in_slot.is_some(),
                "device reachable: {reachable}, slot {state:?}, device in slot: {}",
                in_slot.is_some()
            );
        }
    }
}

use vmm_pci::PciFunction;

fuzz_target!(|input: Input| {
    let clock = VirtualClock::new();
    let irqs = IrqQueue::new();
    let port = Arc::new(Mutex::new(
        RootPortBuilder::new("rp0", 1)
            .port_number(1)
            .surprise(input.surprise)
            .clock(clock.now_fn())
            .build(irqs.clone()),
    ));
    let mut requests = Vec::new();
    if input.cold {
        let dev = StubEndpoint::vf();
        port.lock()
            .expect("lock")
            .cold_plug(dev)
            .expect("cold plug");
    }
    let mut root = PciRoot::new();
    root.add(1, 0, port.clone()).expect("add port");
    let root = Arc::new(root);
    let guest = Guest::boot_with_clock(
        clock.clone(),
        root.clone(),
        irqs,
        Timings::default(),
        u64::MAX,
        (0x10_0000, 0x20_0000),
    );
    let cap = port.lock().expect("lock").pcie_cap_offset();
    let msi = guest
        .env
        .enumerator
        .get(PORT)
        .and_then(|f| f.cap(vmm_pci::config::CAP_ID_MSI));
    requests.clear();
    let mut rig = Rig {
        clock,
        port,
        guest,
        root,
        requests,
        cancels: Vec::new(),
        cap,
        msi,
    };
    rig.check();
    for op in input.ops.iter().take(200) {
        match op {
            Op::Plug => {
                let dev = StubEndpoint::vf();
                let a = addr(&dev);
                let r = rig.port().plug(dev);
                if let Ok(c) = r {
                    rig.track(Kind::Plug, a, c);
                }
            }
            Op::Unplug => {
                // The device in the slot, or the one a held plug would bring.
                let a = rig.device_in_slot().or(rig.held());
                let r = rig.port().request_unplug();
                if let Ok(c) = r {
                    rig.track(
                        Kind::Unplug,
                        a.expect("an unplug accepted for an empty slot with no plug held"),
                        c,
                    );
                }
            }
            Op::Cancel => {
                let r = rig.port().cancel_unplug();
                if let Ok(c) = r {
                    let i = rig
                        .requests
                        .iter()
                        .rposition(|r| r.kind == Kind::Unplug)
                        .expect("a cancel accepted without an unplug");
                    rig.cancels.push((c, i));
                }
            }
            Op::Surprise => {
                let before = rig.device_in_slot().or(rig.held());
                let r = rig.port().surprise_remove();
                if let Ok(h) = r {
                    assert_eq!(
                        Some(addr(&h)),
                        before,
                        "surprise removal returned another device"
                    );
                    assert!(
                        rig.device_in_slot().is_none(),
                        "the device stayed after a surprise removal"
                    );
                }
            }
            Op::Interlock(on) => rig.port().set_interlock(*on),
            Op::Poll => rig.port().poll(),
            Op::Run(ms) => rig.run(Duration::from_millis(u64::from(*ms) * 4)),
            Op::Service => rig.guest.service(),
            Op::Raw { reg, value } => {
                let (off, len) = match reg % 4 {
                    0 => (rig.cap + SLTCTL, 2),
                    1 => (rig.cap + SLTSTA, 2),
                    2 => (rig.cap + LNKCTL, 2),
                    _ => match rig.msi {
                        Some(m) => (m + 0x10, 4),
                        None => continue,
                    },
                };
                rig.guest.env.cfg_write(PORT, off, len, u32::from(*value));
            }
            Op::Read(status) => {
                let off = rig.cap + if *status { SLTSTA } else { SLTCTL };
                rig.guest.env.cfg_read(PORT, off, 2);
            }
        }
        if std::env::var_os("FUZZ_TRACE").is_some() {
            let st = rig.port().slot_state();
            eprintln!(
                "{:?} {op:?}: {st:?} in slot {:?}, outcomes {:?}",
                rig.clock.now(),
                rig.device_in_slot(),
                rig.requests
                    .iter()
                    .map(|r| (r.kind, r.completion.outcome()))
                    .collect::<Vec<_>>()
            );
        }
        rig.check();
    }
    for _ in 0..300 {
        rig.run(Duration::from_millis(100));
        if std::env::var_os("FUZZ_TRACE").is_some() {
            let st = rig.port().slot_state();
            eprintln!(
                "{:?} settle: {st:?} in slot {:?}, outcomes {:?}",
                rig.clock.now(),
                rig.device_in_slot(),
                rig.requests
                    .iter()
                    .map(|r| (r.kind, r.completion.outcome()))
                    .collect::<Vec<_>>()
            );
        }
        rig.check();
    }
});
