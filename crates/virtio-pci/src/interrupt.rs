//! Interrupt state shared between the transport and the device's threads.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_device::{VirtioInterrupt, VirtioInterruptType};
use vmm_pci::{IntxSink, MsiSink, Msix};

use crate::common::NO_VECTOR;

/// ISR bit: a queue has used buffers.
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed.
pub(crate) const ISR_CONFIG: u8 = 2;

pub(crate) struct IrqState {
    pub msix: Msix,
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub intx_disabled: bool,
    intx_level: bool,
}

/// The transport's [`VirtioInterrupt`]: MSI-X vectors when enabled, otherwise the
/// ISR and INTx.
pub(crate) struct Interrupts {
    state: Mutex<IrqState>,
    msi: Arc<dyn MsiSink>,
    intx: Option<Arc<dyn IntxSink>>,
    generation: AtomicU8,
}

impl Interrupts {
    pub fn new(
        msix: Msix,
        queues: usize,
        msi: Arc<dyn MsiSink>,
        intx: Option<Arc<dyn IntxSink>>,
    ) -> Self {
        Interrupts {
            state: Mutex::new(IrqState {
                msix,
                isr: 0,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
                intx_disabled: false,
                intx_level: false,
            }),
            msi,
            intx,
            generation: AtomicU8::new(0),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, IrqState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn msi_sink(&self) -> &dyn MsiSink {
        &*self.msi
    }

    pub fn generation(&self) -> u8 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sets `config_generation` (a restore).
    pub fn set_generation(&self, g: u8) {
        self.generation.store(g, Ordering::Release);
    }

    /// Drives the INTx line from the ISR (asserted while any ISR bit is set,
    /// MSI-X is off and the command register allows INTx).
    pub fn update_intx(&self, s: &mut IrqState) {
        let level = s.isr != 0 && !s.msix.enabled() && !s.intx_disabled;
        if level != s.intx_level {
            s.intx_level = level;
            if let Some(l) = &self.intx {
                l.set_level(level);
            }
        }
    }

    /// Reads and clears the ISR (the driver's ISR read).
    pub fn take_isr(&self) -> u8 {
        let mut s = self.lock();
        let isr = std::mem::take(&mut s.isr);
        self.update_intx(&mut s);
        isr
    }

    /// Whether INTx is asserted now (for the PCI status register).
    pub fn intx_asserted(&self) -> bool {
        self.lock().intx_level
    }

    /// A device reset: no vectors assigned, ISR clear, INTx low.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.isr = 0;
        s.config_vector = NO_VECTOR;
        s.queue_vectors.fill(NO_VECTOR);
        self.update_intx(&mut s);
    }
}

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        if int_type == VirtioInterruptType::Config {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let mut s = self.lock();
        if s.msix.enabled() {
            let vector = match int_type {
                VirtioInterruptType::Config => s.config_vector,
                VirtioInterruptType::Queue(q) => s
                    .queue_vectors
                    .get(q as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            };
            if vector != NO_VECTOR {
                s.msix.trigger(vector, &*self.msi);
            }
        } else {
            s.isr |= match int_type {
                VirtioInterruptType::Config => ISR_CONFIG,
                VirtioInterruptType::Queue(_) => ISR_QUEUE,
            };
            self.update_intx(&mut s);
        }
        Ok(())
    }
}
