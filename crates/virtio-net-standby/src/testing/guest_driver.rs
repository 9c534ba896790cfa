//! [`GuestDriver`]: a minimal virtio-net driver over [`DriverQueue`]s.

use std::sync::Arc;

use virtio_device::{ActivateQueue, VirtioDevice};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{DriverQueue, GuestMem, RecordingInterrupt, TestMemory};
use crate::backend::NetBackend;
use crate::device::StandbyNet;
use crate::features::Features;

/// A minimal virtio-net driver over [`DriverQueue`]s: negotiates, activates,
/// sends frames and posts receive buffers.
pub struct GuestDriver {
    /// Guest memory.
    pub mem: TestMemory,
    /// Receive queues, per pair.
    pub rx: Vec<DriverQueue>,
    /// Transmit queues, per pair.
    pub tx: Vec<DriverQueue>,
    /// The control queue, if negotiated.
    pub ctrl: Option<DriverQueue>,
    /// Interrupts the device raised.
    pub interrupt: Arc<RecordingInterrupt>,
    /// What was negotiated.
    pub features: Features,
    /// Bytes per receive buffer.
    pub rx_buf_len: u32,
    rx_bufs: Vec<Vec<u64>>,
    /// The kick eventfd of every queue, by queue index (the device holds clones).
    pub kicks: Vec<EventFd>,
}

impl std::fmt::Debug for GuestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDriver")
            .field("features", &self.features)
            .finish()
    }
}

impl GuestDriver {
    /// Acknowledges `features` (intersected with the offer), sets up every queue
    /// with `queue_size` entries and activates the device.
    pub fn bring_up<B: NetBackend>(
        dev: &mut StandbyNet<GuestMem, B>,
        mem: &TestMemory,
        features: Features,
        queue_size: u16,
    ) -> Result<GuestDriver, crate::Error> {
        let acked = features.intersection(Features::from_bits(dev.features()));
        dev.ack_features(acked.bits())?;
        Self::attach(dev, mem, acked, queue_size)
    }

    /// Sets up the queues and activates a device whose features were already
    /// acknowledged (or restored).
    pub fn attach<B: NetBackend>(
        dev: &mut StandbyNet<GuestMem, B>,
        mem: &TestMemory,
        acked: Features,
        queue_size: u16,
    ) -> Result<GuestDriver, crate::Error> {
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
        let event_idx = acked.has(crate::features::F_RING_EVENT_IDX);
        let pairs = if acked.has(VIRTIO_NET_F_MQ) {
            dev.queue_pairs().len()
        } else {
            1
        };
        let mk = || {
            let mut q = DriverQueue::new(mem, queue_size);
            q.set_event_idx(event_idx);
            q
        };
        let rx: Vec<_> = (0..pairs).map(|_| mk()).collect();
        let tx: Vec<_> = (0..pairs).map(|_| mk()).collect();
        let ctrl = acked.has(VIRTIO_NET_F_CTRL_VQ).then(mk);
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        let mut add = |index: usize, queue: Queue| {
            let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            queues.push(ActivateQueue {
                index: index as u16,
                queue,
                kick: Some(kick.try_clone().expect("eventfd clone")),
            });
            kicks.push(kick);
        };
        for i in 0..pairs {
            add(2 * i, rx[i].queue());
            add(2 * i + 1, tx[i].queue());
        }
        if let Some(c) = &ctrl {
            add(2 * pairs, c.queue());
        }
        let interrupt = Arc::new(RecordingInterrupt::default());
        dev.activate(mem.atomic(), interrupt.clone(), queues)?;
        Ok(GuestDriver {
            mem: mem.clone(),
            rx,
            tx,
            ctrl,
            interrupt,
            features: acked,
            rx_buf_len: 1536,
            rx_bufs: vec![Vec::new(); pairs],
            kicks,
        })
    }

    /// Kicks queue `index` (what the driver's notify write does).
    pub fn kick(&self, index: usize) {
        self.kicks[index].write(1).expect("kick");
    }

    /// Posts `n` receive buffers of [`rx_buf_len`](Self::rx_buf_len) bytes on
    /// pair `pair`, each a one-descriptor chain.
    pub fn post_rx(&mut self, pair: usize, n: usize) {
        for _ in 0..n {
            let addr = self.mem.alloc(u64::from(self.rx_buf_len), 64);
            let h = self.rx[pair].add_writable(&[addr], &[self.rx_buf_len]);
            let bufs = &mut self.rx_bufs[pair];
            if bufs.len() <= usize::from(h) {
                bufs.resize(usize::from(h) + 1, 0);
            }
            bufs[usize::from(h)] = addr;
        }
        self.rx[pair].publish();
    }

    /// Re-posts the buffer of chain `head` (after the device used it).
    pub fn repost_rx(&mut self, pair: usize, head: u16) {
        let addr = self.rx_bufs[pair][usize::from(head)];
        let h = self.rx[pair].add_writable(&[addr], &[self.rx_buf_len]);
        let bufs = &mut self.rx_bufs[pair];
        if bufs.len() <= usize::from(h) {
            bufs.resize(usize::from(h) + 1, 0);
        }
        bufs[usize::from(h)] = addr;
    }

    /// Guest address of the buffer behind RX chain `head`.
    pub fn rx_buffer(&self, pair: usize, head: u16) -> u64 {
        self.rx_bufs[pair][usize::from(head)]
    }

    /// Reads the next received frame (header included) from pair `pair`,
    /// collecting merged buffers, and re-posts the buffers. `None` when the
    /// device returned nothing.
    pub fn recv(&mut self, pair: usize) -> Option<Vec<u8>> {
        let (head, len) = self.rx[pair].pop_used()?;
        let mut out = self.mem.read(self.rx_buffer(pair, head), len as usize);
        self.repost_rx(pair, head);
        let num = u16::from_le_bytes([out[10], out[11]]);
        for _ in 1..num {
            let (h, l) = self.rx[pair].pop_used().expect("merged buffer");
            out.extend(self.mem.read(self.rx_buffer(pair, h), l as usize));
            self.repost_rx(pair, h);
        }
        self.rx[pair].publish();
        Some(out)
    }

    /// Copies `frame` (header included) into fresh guest memory and queues it on
    /// pair `pair`'s TX queue as one descriptor (not yet published).
    pub fn queue_tx(&mut self, pair: usize, frame: &[u8]) -> u16 {
        let addr = self.mem.alloc(frame.len() as u64, 64);
        self.mem.write(addr, frame);
        self.tx[pair].add_readable(&[addr], &[frame.len() as u32])
    }

    /// Queues and publishes a control command; returns the chain head and the
    /// guest address of its ack byte. Process the control queue, then read the
    /// ack there ([`ctrl`](Self::ctrl) does all of it).
    pub fn queue_ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> (u16, u64) {
        let mut bytes = vec![class, cmd];
        bytes.extend_from_slice(data);
        let out = self.mem.alloc(bytes.len() as u64, 8);
        self.mem.write(out, &bytes);
        let ack = self.mem.alloc(1, 1);
        self.mem.write(ack, &[0xee]);
        let ctrl = self.ctrl.as_mut().expect("control queue negotiated");
        let h = ctrl.add_chain(&[(out, bytes.len() as u32, false), (ack, 1, true)]);
        ctrl.publish();
        (h, ack)
    }

    /// Runs a control command through the device; returns the ack byte.
    pub fn ctrl<B: NetBackend>(
        &mut self,
        dev: &StandbyNet<GuestMem, B>,
        class: u8,
        cmd: u8,
        data: &[u8],
    ) -> u8 {
        let (h, ack) = self.queue_ctrl(class, cmd, data);
        dev.process_ctrl();
        let (id, len) = self
            .ctrl
            .as_mut()
            .expect("ctrl")
            .pop_used()
            .expect("ctrl used");
        assert_eq!((id, len), (h, 1));
        self.mem.read(ack, 1)[0]
    }
}
