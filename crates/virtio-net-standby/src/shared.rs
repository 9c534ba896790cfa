//! State every part of one device reads: the configuration space, link state,
//! receive filter, interrupt object and needs-reset flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{NetConfigSpace, STATUS_LINK_UP};
use crate::counters::{AtomicCounters, NetCounters};
use crate::filter::{FilterCell, RxFilter};
use virtio_device::{VirtioInterrupt, VirtioInterruptType};

pub(crate) struct Shared {
    pub id: String,
    config: Mutex<NetConfigSpace>,
    pub config_len: usize,
    /// Mirror of `status & LINK_UP`, read once per batch by the packet path.
    link_up: AtomicBool,
    pub filter: FilterCell,
    needs_reset: AtomicBool,
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// Device-wide counters (control queue, config space, config interrupts).
    pub counters: AtomicCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(id: String, config: NetConfigSpace, config_len: usize) -> Self {
        Shared {
            id,
            link_up: AtomicBool::new(config.status & STATUS_LINK_UP != 0),
            filter: FilterCell::new(RxFilter::new(config.mac)),
            config: Mutex::new(config),
            config_len,
            needs_reset: AtomicBool::new(false),
            interrupt: Mutex::new(None),
            counters: AtomicCounters::default(),
        }
    }

    pub fn config(&self) -> NetConfigSpace {
        *lock(&self.config)
    }

    /// Changes the configuration space; returns whether it changed.
    pub fn update_config(&self, f: impl FnOnce(&mut NetConfigSpace)) -> bool {
        let mut c = lock(&self.config);
        let before = *c;
        f(&mut c);
        self.link_up
            .store(c.status & STATUS_LINK_UP != 0, Ordering::Release);
        *c != before
    }

    #[inline]
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    pub fn set_interrupt(&self, i: Option<Arc<dyn VirtioInterrupt>>) {
        *lock(&self.interrupt) = i;
    }

    /// Raises a configuration-change interrupt, if the device is active.
    pub fn signal_config(&self) {
        let i = lock(&self.interrupt).clone();
        if let Some(i) = i {
            if let Err(e) = i.trigger(VirtioInterruptType::Config) {
                log::warn!("{}: config interrupt failed: {e}", self.id);
            }
            self.counters.add(&NetCounters {
                config_notifications: 1,
                ..Default::default()
            });
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The device cannot go on: flag it, tell the driver.
    pub fn fail(&self, why: &dyn std::fmt::Display) {
        log::error!("{}: device needs reset: {why}", self.id);
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config();
        }
    }

    pub fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::Release);
    }
}
