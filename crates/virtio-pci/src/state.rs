//! The transport's saved state: what the driver programmed into the function,
//! and the device's own state behind it.
//!
//! [`VirtioPciState`] carries the config space (BAR addresses, command
//! register, the MSI-X capability and the PCI configuration access window), the
//! MSI-X table and PBA, the common configuration (feature selects, the
//! driver's features, the status, the queue select, every queue's size, enable
//! and ring addresses), the vector assignments, the ISR, `config_generation`,
//! and the device's state (`D::State`, from the device's own [`Persist`]).
//!
//! Restore onto a transport built the same way (same builder settings, same
//! device configuration). It checks everything it can before it changes
//! anything; then it restores the device, which raises the device's own
//! restored events (the net device's STANDBY listeners), then the registers,
//! then raises [`virtio_device::FeaturesAcked`] with `restored: true` if the
//! saved status had `FEATURES_OK`, and, if the driver had the device running,
//! activates it again with the queues as the registers describe them (the
//! device resumes its rings where it saved them). Nothing is delivered to the
//! guest by the restore itself: pending MSI-X vectors stay pending until
//! unmasked.

use device_state::{Encode, Error, Persist, Reader, Result, Writer};
use virtio_device::VirtioDevice;
use virtio_device::status::{
    DRIVER_OK as STATUS_DRIVER_OK, FEATURES_OK as STATUS_FEATURES_OK,
    NEEDS_RESET as STATUS_NEEDS_RESET,
};
use vm_memory::GuestMemoryBackend;
use vmm_pci::{ConfigSpaceState, MsixState};

use crate::common::{CommonConfig, NO_VECTOR, QueueRegs};
use crate::device::VirtioPciDevice;
use crate::interrupt::{ISR_CONFIG, ISR_QUEUE};

/// One queue's registers as the driver programmed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct QueueRegsState {
    /// The device's maximum (configuration: must match the destination).
    pub max: u16,
    /// The size the driver chose.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
    /// The MSI-X vector assigned to the queue.
    pub vector: u16,
}

/// The state of a [`VirtioPciDevice`] and of the device behind it; see the
/// module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VirtioPciState<S> {
    /// The PCI configuration space.
    pub config: ConfigSpaceState,
    /// The MSI-X table, PBA and flags.
    pub msix: MsixState,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The status as the driver set it (without `DEVICE_NEEDS_RESET`, which is
    /// [`needs_reset`](Self::needs_reset)).
    pub status: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// Every queue's registers, in queue-index order.
    pub queues: Vec<QueueRegsState>,
    /// The configuration-change vector.
    pub config_vector: u16,
    /// The ISR bits not yet read by the driver.
    pub isr: u8,
    /// `config_generation`.
    pub generation: u8,
    /// Whether the transport had shown `DEVICE_NEEDS_RESET` (a failed
    /// activation).
    pub needs_reset: bool,
    /// The device's own state.
    pub device: S,
}

impl<S: Encode> Encode for VirtioPciState<S> {
    const MAGIC: [u8; 8] = *b"VIRTIOPC";
    const VERSION: u16 = 1;

    fn encode(&self, w: &mut Writer) {
        w.put(&self.config);
        w.put(&self.msix);
        w.u32(self.device_feature_select);
        w.u32(self.driver_feature_select);
        w.u64(self.driver_features);
        w.u8(self.status);
        w.u16(self.queue_select);
        w.seq(&self.queues, |w, q| {
            w.u16(q.max);
            w.u16(q.size);
            w.bool(q.enabled);
            w.u64(q.desc);
            w.u64(q.driver);
            w.u64(q.device);
            w.u16(q.vector);
        });
        w.u16(self.config_vector);
        w.u8(self.isr);
        w.u8(self.generation);
        w.bool(self.needs_reset);
        // The device's state, with its own type and version.
        w.raw(&S::MAGIC);
        w.u16(S::VERSION);
        w.put(&self.device);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let config = r.get()?;
        let msix = r.get()?;
        let device_feature_select = r.u32("device_feature_select")?;
        let driver_feature_select = r.u32("driver_feature_select")?;
        let driver_features = r.u64("driver features")?;
        let status = r.u8("device status")?;
        let queue_select = r.u16("queue_select")?;
        let queues = r.seq(2 + 2 + 1 + 3 * 8 + 2, "queue registers", |r| {
            Ok(QueueRegsState {
                max: r.u16("queue maximum size")?,
                size: r.u16("queue size")?,
                enabled: r.bool("queue enable")?,
                desc: r.u64("queue descriptor table")?,
                driver: r.u64("queue driver ring")?,
                device: r.u64("queue device ring")?,
                vector: r.u16("queue vector")?,
            })
        })?;
        let config_vector = r.u16("config vector")?;
        let isr = r.u8("ISR")?;
        let generation = r.u8("config_generation")?;
        let needs_reset = r.bool("needs-reset flag")?;
        let magic: [u8; 8] = r.array("the device state's magic")?;
        if magic != S::MAGIC {
            return Err(Error::BadMagic {
                expected: String::from_utf8_lossy(&S::MAGIC)
                    .trim_end_matches('\0')
                    .to_string(),
            });
        }
        let version = r.u16("the device state's version")?;
        if version != S::VERSION {
            return Err(Error::UnsupportedVersion {
                what: String::from_utf8_lossy(&S::MAGIC)
                    .trim_end_matches('\0')
                    .to_string(),
                found: version,
                supported: S::VERSION,
            });
        }
        Ok(VirtioPciState {
            config,
            msix,
            device_feature_select,
            driver_feature_select,
            driver_features,
            status,
            queue_select,
            queues,
            config_vector,
            isr,
            generation,
            needs_reset,
            device: r.get()?,
        })
    }
}

/// The status values a driver can leave: bits only ever set in the order the
/// specification gives, so `DRIVER_OK` implies `FEATURES_OK`.
fn check_status(status: u8) -> Result<()> {
    if status & STATUS_NEEDS_RESET != 0 {
        return Err(Error::Invalid(format!(
            "device status {status:#x} holds DEVICE_NEEDS_RESET, which only the device shows"
        )));
    }
    if status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
        return Err(Error::Invalid(format!(
            "device status {status:#x} has DRIVER_OK without FEATURES_OK"
        )));
    }
    Ok(())
}

impl<M, D> Persist for VirtioPciDevice<M, D>
where
    M: GuestMemoryBackend,
    D: VirtioDevice<M> + Persist,
{
    type State = VirtioPciState<D::State>;

    /// Saves the transport and the device. Call it with the device quiesced
    /// (no vCPU or device thread touching it).
    fn save(&self) -> Result<Self::State> {
        let device = self.device.save()?;
        let irq = self.interrupts.lock();
        let c = &self.common;
        Ok(VirtioPciState {
            config: self.cs.save()?,
            msix: irq.msix.save()?,
            device_feature_select: c.device_feature_select,
            driver_feature_select: c.driver_feature_select,
            driver_features: c.driver_features,
            status: c.status,
            queue_select: c.queue_select,
            queues: c
                .queues
                .iter()
                .zip(&irq.queue_vectors)
                .map(|(q, &vector)| QueueRegsState {
                    max: q.max,
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    vector,
                })
                .collect(),
            config_vector: irq.config_vector,
            isr: irq.isr,
            generation: self.interrupts.generation(),
            needs_reset: self.needs_reset,
            device,
        })
    }

    /// Restores onto a transport built the same way; see the module
    /// documentation. A state that does not fit is refused before anything
    /// changes; one that fails while being applied (the device refusing its
    /// part) leaves the function reset, as freshly built.
    fn restore(&mut self, state: &Self::State) -> Result<()> {
        // Everything that can be checked without changing anything.
        check_status(state.status)?;
        let maxes: Vec<u16> = self.common.queues.iter().map(|q| q.max).collect();
        Error::check("queue count", state.queues.len(), maxes.len())?;
        let vectors = state.msix.vectors;
        let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
        for (i, (q, &max)) in state.queues.iter().zip(&maxes).enumerate() {
            Error::check(&format!("queue {i} maximum size"), q.max, max)?;
            if q.size == 0 || !q.size.is_power_of_two() || q.size > max {
                return Err(Error::Invalid(format!(
                    "queue {i} size {} is not a power of two up to {max}",
                    q.size
                )));
            }
            if !vector_ok(q.vector) {
                return Err(Error::Invalid(format!(
                    "queue {i} vector {} is past the {vectors}-entry MSI-X table",
                    q.vector
                )));
            }
        }
        if !vector_ok(state.config_vector) {
            return Err(Error::Invalid(format!(
                "config vector {} is past the {vectors}-entry MSI-X table",
                state.config_vector
            )));
        }
        if state.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(Error::Invalid(format!(
                "ISR {:#x} holds bits other than queue and config",
                state.isr
            )));
        }
        let offered = self.device.features();
        if state.status & STATUS_FEATURES_OK != 0 && state.driver_features & !offered != 0 {
            return Err(Error::Mismatch {
                field: "the features the driver accepted".into(),
                saved: format!("{:#x}", state.driver_features),
                device: format!("{offered:#x} offered"),
            });
        }
        self.cs.check_restore(&state.config)?;
        let mut msix = self.interrupts.lock().msix.clone();
        msix.restore(&state.msix)?;

        // Apply. From here a refusal leaves the function reset.
        self.reset_state();
        let applied = (|| {
            self.device.restore(&state.device)?;
            self.cs.restore(&state.config)?;
            msix.check_config(&self.cs)
        })();
        if let Err(e) = applied {
            self.reset_state();
            return Err(e);
        }
        self.common = common_of(state);
        self.needs_reset = state.needs_reset;
        {
            let mut irq = self.interrupts.lock();
            msix.sync_routes(self.interrupts.msi_sink());
            irq.msix = msix;
            irq.config_vector = state.config_vector;
            for (v, q) in irq.queue_vectors.iter_mut().zip(&state.queues) {
                *v = q.vector;
            }
            irq.isr = state.isr;
            irq.intx_disabled = self.cs.intx_disabled();
            self.interrupts.update_intx(&mut irq);
        }
        self.interrupts.set_generation(state.generation);
        self.finish_restore();
        Ok(())
    }
}

/// The common-configuration registers of a saved state.
fn common_of<S>(state: &VirtioPciState<S>) -> CommonConfig {
    CommonConfig {
        device_feature_select: state.device_feature_select,
        driver_feature_select: state.driver_feature_select,
        driver_features: state.driver_features,
        status: state.status,
        queue_select: state.queue_select,
        queues: state
            .queues
            .iter()
            .map(|q| QueueRegs {
                max: q.max,
                size: q.size,
                enabled: q.enabled,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            })
            .collect(),
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use std::sync::Arc;

    use device_state::{Error, Persist};
    use virtio_device::VirtioInterruptType;
    use virtio_device::testing::{FakeDevice, FakeState};
    use virtio_device::virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_pci::PciFunction;
    use vmm_pci::config::{CAP_ID_MSIX, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
    use vmm_pci::msix::MSIX_CTRL_ENABLE;

    use super::VirtioPciState;
    use crate::caps::{COMMON_CFG_OFFSET, MSIX_BAR, VIRTIO_BAR};
    use crate::common::{
        CONFIG_MSIX_VECTOR, DEVICE_STATUS, DRIVER_FEATURE, DRIVER_FEATURE_SELECT, QUEUE_DESC,
        QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_SELECT, QUEUE_SIZE,
    };
    use crate::{VirtioPciBuilder, VirtioPciDevice};

    use vmm_pci::testing::RecordingMsi as Msis;

    type Dev = VirtioPciDevice<GuestMemoryMmap<()>, FakeDevice>;

    /// VERSION_1 and EVENT_IDX.
    const OFFER: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << 29;

    /// A net-typed fake device with two queues and a control queue behind the
    /// transport, as in the device tests.
    fn dev() -> (Dev, Arc<Msis>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let fake = FakeDevice::new(1, vec![256; 3], OFFER)
            .with_config(vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
        let msis = Arc::new(Msis::default());
        let d = VirtioPciBuilder::new()
            .id("net1")
            .build(fake, GuestMemoryAtomic::new(mem), msis.clone())
            .unwrap();
        (d, msis)
    }

    /// A write to the common configuration.
    fn wc(d: &mut Dev, off: usize, v: u64, len: usize) {
        d.write_bar(
            VIRTIO_BAR,
            COMMON_CFG_OFFSET + off as u64,
            &v.to_le_bytes()[..len],
        );
    }

    /// A driver that brought the device up: MSI-X on with vector 3 masked,
    /// three queues, DRIVER_OK, then a queue-2 interrupt held pending by the
    /// mask.
    fn running() -> (Dev, Arc<Msis>) {
        let (mut d, msis) = dev();
        d.write_config(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let msix = d.config().find_capability(CAP_ID_MSIX).unwrap();
        d.write_config(msix + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
        for v in 0..4u64 {
            d.write_bar(MSIX_BAR, v * 16, &(0xfee0_0000u64 + v).to_le_bytes());
            d.write_bar(MSIX_BAR, v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
            d.write_bar(MSIX_BAR, v * 16 + 12, &u32::from(v == 3).to_le_bytes());
        }
        wc(&mut d, DEVICE_STATUS, 0x3, 1);
        wc(&mut d, DRIVER_FEATURE_SELECT, 0, 4);
        wc(&mut d, DRIVER_FEATURE, OFFER & 0xffff_ffff, 4);
        wc(&mut d, DRIVER_FEATURE_SELECT, 1, 4);
        wc(&mut d, DRIVER_FEATURE, OFFER >> 32, 4);
        wc(&mut d, DEVICE_STATUS, 0xb, 1);
        wc(&mut d, CONFIG_MSIX_VECTOR, 0, 2);
        for q in 0..3u64 {
            let base = 0x10000 * (q + 1);
            wc(&mut d, QUEUE_SELECT, q, 2);
            wc(&mut d, QUEUE_SIZE, 64, 2);
            wc(&mut d, QUEUE_MSIX_VECTOR, q + 1, 2);
            wc(&mut d, QUEUE_DESC, base, 8);
            wc(&mut d, QUEUE_DRIVER, base + 0x1000, 8);
            wc(&mut d, QUEUE_DEVICE, base + 0x2000, 8);
            wc(&mut d, QUEUE_ENABLE, 1, 2);
        }
        wc(&mut d, DEVICE_STATUS, 0xf, 1);
        assert!(d.device().active);
        assert!(d.device().raise(VirtioInterruptType::Queue(2)));
        wc(&mut d, QUEUE_SELECT, 1, 2);
        (d, msis)
    }

    /// serde for the fake device's state, a test double that has none: serde's
    /// remote derive, and a wrapper the transport's state is mapped onto.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(remote = "FakeState")]
    struct FakeStateDef {
        offered: u64,
        acked: Option<u64>,
        config: Vec<u8>,
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Fake(#[serde(with = "FakeStateDef")] FakeState);

    fn with_device<S, T>(s: VirtioPciState<S>, f: impl FnOnce(S) -> T) -> VirtioPciState<T> {
        VirtioPciState {
            config: s.config,
            msix: s.msix,
            device_feature_select: s.device_feature_select,
            driver_feature_select: s.driver_feature_select,
            driver_features: s.driver_features,
            status: s.status,
            queue_select: s.queue_select,
            queues: s.queues,
            config_vector: s.config_vector,
            isr: s.isr,
            generation: s.generation,
            needs_reset: s.needs_reset,
            device: f(s.device),
        }
    }

    fn from_json(json: &str) -> VirtioPciState<FakeState> {
        with_device(
            serde_json::from_str::<VirtioPciState<Fake>>(json).unwrap(),
            |f| f.0,
        )
    }

    #[test]
    fn json_round_trip_moves_a_running_function() {
        let (src, src_msis) = running();
        assert!(src_msis.delivered().is_empty(), "vector 3 is masked");
        let state = src.save().unwrap();
        let json = serde_json::to_string(&with_device(state.clone(), Fake)).unwrap();
        let back = from_json(&json);
        assert_eq!(back, state);

        let (mut dst, dst_msis) = dev();
        dst.restore(&back).unwrap();
        assert_eq!(dst.save().unwrap(), state);
        assert_eq!(dst.status(), 0xf);
        assert_eq!(dst.config_generation(), src.config_generation());
        // The device was restored and activated again with the same queues.
        assert!(dst.device().active);
        assert_eq!(dst.device().acked, Some(OFFER));
        assert_eq!(dst.device().queues, src.device().queues);
        // Nothing was delivered; the pending vector fires when unmasked.
        assert!(dst_msis.delivered().is_empty());
        dst.write_bar(MSIX_BAR, 3 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(dst_msis.delivered_vectors(), [3]);

        // A deserialized state is checked as a decoded one: DRIVER_OK without
        // FEATURES_OK is refused.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["status"] = 0x7.into();
        let bad = from_json(&v.to_string());
        let e = dev().0.restore(&bad).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
}
