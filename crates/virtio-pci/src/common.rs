//! The common configuration structure (`struct virtio_pci_common_cfg`).

use virtio_device::status::{DRIVER_OK as STATUS_DRIVER_OK, FEATURES_OK as STATUS_FEATURES_OK};

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector assigned.
pub const NO_VECTOR: u16 = 0xffff;

pub(crate) const DEVICE_FEATURE_SELECT: usize = 0x00;
pub(crate) const DEVICE_FEATURE: usize = 0x04;
pub(crate) const DRIVER_FEATURE_SELECT: usize = 0x08;
pub(crate) const DRIVER_FEATURE: usize = 0x0c;
pub(crate) const CONFIG_MSIX_VECTOR: usize = 0x10;
pub(crate) const NUM_QUEUES: usize = 0x12;
pub(crate) const DEVICE_STATUS: usize = 0x14;
pub(crate) const CONFIG_GENERATION: usize = 0x15;
pub(crate) const QUEUE_SELECT: usize = 0x16;
pub(crate) const QUEUE_SIZE: usize = 0x18;
pub(crate) const QUEUE_MSIX_VECTOR: usize = 0x1a;
pub(crate) const QUEUE_ENABLE: usize = 0x1c;
pub(crate) const QUEUE_NOTIFY_OFF: usize = 0x1e;
pub(crate) const QUEUE_DESC: usize = 0x20;
pub(crate) const QUEUE_DRIVER: usize = 0x28;
pub(crate) const QUEUE_DEVICE: usize = 0x30;
pub(crate) const COMMON_LEN: usize = 0x38;

/// The registers of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueRegs {
    pub max: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegs {
    pub fn new(max: u16) -> Self {
        QueueRegs {
            max,
            size: max,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The common configuration the transport keeps (vectors live with the
/// interrupt state, which device threads also read).
#[derive(Debug, Clone)]
pub(crate) struct CommonConfig {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
}

/// What the transport shows the driver that is not in [`CommonConfig`].
pub(crate) struct View<'a> {
    pub device_features: u64,
    pub status: u8,
    pub generation: u8,
    pub config_vector: u16,
    pub queue_vectors: &'a [u16],
}

/// A write the transport must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Plain register update, already applied.
    Done,
    /// Refused (wrong time or value); nothing changed.
    Ignored,
    /// The driver wrote the status register.
    Status(u8),
    /// The driver set the config vector.
    ConfigVector(u16),
    /// The driver set queue `.0`'s vector.
    QueueVector(u16, u16),
}

fn field(img: &[u8; COMMON_LEN], off: usize, len: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..len].copy_from_slice(&img[off..off + len]);
    u64::from_le_bytes(b)
}

impl CommonConfig {
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        CommonConfig {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: queue_max_sizes.iter().map(|&m| QueueRegs::new(m)).collect(),
        }
    }

    /// Back to the reset state, keeping the queues' maximum sizes.
    pub fn reset(&mut self) {
        let maxes: Vec<u16> = self.queues.iter().map(|q| q.max).collect();
        *self = CommonConfig::new(&maxes);
    }

    fn image(&self, view: &View<'_>) -> [u8; COMMON_LEN] {
        let mut img = [0u8; COMMON_LEN];
        let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        let word = match self.device_feature_select {
            0 => view.device_features as u32,
            1 => (view.device_features >> 32) as u32,
            _ => 0,
        };
        put(DEVICE_FEATURE, &word.to_le_bytes());
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(DRIVER_FEATURE, &word.to_le_bytes());
        put(CONFIG_MSIX_VECTOR, &view.config_vector.to_le_bytes());
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[view.status]);
        put(CONFIG_GENERATION, &[view.generation]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(self.queue_select as usize) {
            let vector = view
                .queue_vectors
                .get(self.queue_select as usize)
                .copied()
                .unwrap_or(NO_VECTOR);
            put(QUEUE_SIZE, &q.size.to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(QUEUE_ENABLE, &(q.enabled as u16).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(QUEUE_DESC, &q.desc.to_le_bytes());
            put(QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(QUEUE_DEVICE, &q.device.to_le_bytes());
        } else {
            // A queue that does not exist reads size 0 and no vector.
            put(QUEUE_MSIX_VECTOR, &NO_VECTOR.to_le_bytes());
        }
        img
    }

    /// A driver read of `data.len()` bytes at `offset`. Reads past the structure
    /// return zeros.
    pub fn read(&self, offset: u64, data: &mut [u8], view: &View<'_>) {
        data.fill(0);
        let img = self.image(view);
        let start = offset.min(COMMON_LEN as u64) as usize;
        let end = offset
            .saturating_add(data.len() as u64)
            .min(COMMON_LEN as u64) as usize;
        if start < end {
            data[..end - start].copy_from_slice(&img[start..end]);
        }
    }

    /// A driver write. Applies plain registers itself and returns the first
    /// field the transport must act on (status or a vector). Writes to read-only
    /// fields, past the structure, or to queue registers after the queue is
    /// enabled or the driver is running are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8], view: &View<'_>) -> Write {
        let start = offset.min(COMMON_LEN as u64) as usize;
        let end = offset
            .saturating_add(data.len() as u64)
            .min(COMMON_LEN as u64) as usize;
        if start >= end {
            return Write::Ignored;
        }
        let mut img = self.image(view);
        img[start..end].copy_from_slice(&data[..end - start]);
        let touches = |off: usize, len: usize| start < off + len && off < end;
        let running = self.status & STATUS_DRIVER_OK != 0;
        let mut result = Write::Ignored;
        let done = |r: &mut Write| {
            if *r == Write::Ignored {
                *r = Write::Done;
            }
        };
        if touches(DEVICE_FEATURE_SELECT, 4) {
            self.device_feature_select = field(&img, DEVICE_FEATURE_SELECT, 4) as u32;
            done(&mut result);
        }
        if touches(DRIVER_FEATURE_SELECT, 4) {
            self.driver_feature_select = field(&img, DRIVER_FEATURE_SELECT, 4) as u32;
            done(&mut result);
        }
        if touches(DRIVER_FEATURE, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = field(&img, DRIVER_FEATURE, 4);
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                _ => {}
            }
            done(&mut result);
        }
        if touches(QUEUE_SELECT, 2) {
            self.queue_select = field(&img, QUEUE_SELECT, 2) as u16;
            done(&mut result);
        }
        let sel = self.queue_select as usize;
        if let Some(q) = self.queues.get_mut(sel).filter(|q| !q.enabled && !running) {
            if touches(QUEUE_SIZE, 2) {
                let size = field(&img, QUEUE_SIZE, 2) as u16;
                if size.is_power_of_two() && size <= q.max {
                    q.size = size;
                    done(&mut result);
                }
            }
            for (off, slot) in [
                (QUEUE_DESC, &mut q.desc),
                (QUEUE_DRIVER, &mut q.driver),
                (QUEUE_DEVICE, &mut q.device),
            ] {
                if touches(off, 8) {
                    *slot = field(&img, off, 8);
                    done(&mut result);
                }
            }
            if touches(QUEUE_ENABLE, 2) && field(&img, QUEUE_ENABLE, 2) == 1 {
                q.enabled = true;
                done(&mut result);
            }
        }
        if touches(CONFIG_MSIX_VECTOR, 2) {
            return Write::ConfigVector(field(&img, CONFIG_MSIX_VECTOR, 2) as u16);
        }
        if touches(QUEUE_MSIX_VECTOR, 2) && sel < self.queues.len() {
            return Write::QueueVector(sel as u16, field(&img, QUEUE_MSIX_VECTOR, 2) as u16);
        }
        if touches(DEVICE_STATUS, 1) {
            return Write::Status(img[DEVICE_STATUS]);
        }
        result
    }
}
