//! Where frames go and where they come from.
//!
//! A [`NetBackend`] moves frames between one queue pair and the outside world.
//! Frames cross the boundary as iovecs over guest memory, header included, so a
//! backend built on `readv`/`writev` (the [`Tap`]) never copies: the kernel reads
//! the guest's TX buffers and writes the guest's RX buffers directly.
//!
//! Every frame starts with the 12-byte `virtio_net_hdr_v1`, exactly the layout a
//! Linux tap uses with `IFF_VNET_HDR` and `TUNSETVNETHDRSZ 12`.
//!
//! Implementations that come with the crate: [`Tap`] (what a VMM uses),
//! [`PairBackend`] (two devices back to back in one process, for tests and
//! benchmarks), and [`Discard`] and [`Generator`] (a sink and a source with no
//! network behind them, for measuring the device and a guest's driver alone).

mod generator;
mod pair;
mod sink;
mod tap;

pub use generator::{Error as GeneratorError, GENERATOR_ETHERTYPE, Generator};
pub use pair::{PairBackend, PairConfig, pair};
pub use sink::{Discard, SinkStats};
pub use tap::{Error as TapError, Tap};

use std::io;
use std::os::fd::RawFd;

use crate::features::Features;
use crate::header::{HDR_LEN, VirtioNetHdr};
use crate::iovec::{copy_from_iovecs, copy_to_iovecs};

/// A frame the guest sent: its virtio-net header and Ethernet frame, as iovecs
/// over guest memory. Only the device creates these, and only over memory it has
/// validated.
pub struct TxFrame<'a> {
    iov: &'a [libc::iovec],
    len: usize,
}

impl<'a> TxFrame<'a> {
    /// A frame over the caller's iovecs (the device builds its own from the
    /// guest's buffers; a VMM or vhost-user backend that originates a frame,
    /// such as a RARP announcement, builds one here). The frame starts with
    /// the 12-byte `virtio_net_hdr_v1` every backend frame carries.
    ///
    /// # Safety
    /// Every iovec must be valid for reads of its length for `'a`, and `len` must
    /// be their total length.
    pub unsafe fn new(iov: &'a [libc::iovec], len: usize) -> Self {
        TxFrame { iov, len }
    }

    /// Total length, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame is empty (never, for frames the device hands out).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The iovecs, for `writev`/`sendmsg`.
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iov
    }

    /// Copies the first `dst.len()` bytes (or all, if fewer) into `dst`; returns
    /// how many were copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        copy_from_iovecs(self.iov, 0, dst)
    }

    /// The virtio-net header.
    pub fn header(&self) -> VirtioNetHdr {
        let mut b = [0u8; HDR_LEN];
        copy_from_iovecs(self.iov, 0, &mut b);
        VirtioNetHdr::from_bytes(&b)
    }
}

/// Buffers the guest posted for one incoming frame (possibly several merged
/// buffers), as iovecs over guest memory. Only the device creates these.
pub struct RxBuffers<'a> {
    iov: &'a [libc::iovec],
    capacity: usize,
}

impl<'a> RxBuffers<'a> {
    /// # Safety
    /// Every iovec must be valid for writes of its length for `'a`, nothing else
    /// may access that memory through Rust references meanwhile, and `capacity`
    /// must be their total length.
    pub(crate) unsafe fn new(iov: &'a [libc::iovec], capacity: usize) -> Self {
        RxBuffers { iov, capacity }
    }

    /// Total bytes the buffers hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The iovecs, for `readv`/`recvmsg`.
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iov
    }

    /// Copies `src` to byte `offset` of the buffers; returns how many bytes fitted.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> usize {
        copy_to_iovecs(self.iov, offset, src)
    }
}

/// What a backend knows about its next incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxPeek {
    /// Nothing is waiting.
    Empty,
    /// A frame of this many bytes (header included) is waiting.
    Frame(usize),
    /// The backend cannot tell without reading (a tap): the device then only
    /// reads into buffers large enough for any frame.
    Unknown,
}

/// A file descriptor the device's worker polls to learn that a backend can make
/// progress again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The descriptor.
    pub fd: RawFd,
    /// Poll for writability (`EPOLLOUT`) rather than readability (`EPOLLIN`).
    pub writable: bool,
}

/// One queue pair's connection to the network. See the module documentation.
///
/// Methods are called from the thread that processes the queue pair; a backend
/// is never used by two threads at once.
pub trait NetBackend: Send {
    /// Sends one frame (header included). `Err(WouldBlock)` means "not now": the
    /// device keeps the frame in the guest's ring and retries when
    /// [`tx_readiness`](Self::tx_readiness) fires. Any other error drops the frame.
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()>;

    /// Receives one frame (header included) into `bufs`; returns its length.
    /// `Err(WouldBlock)` when nothing is waiting. Any other error means a frame
    /// was lost. The header the backend writes must suit the guest's offloads as
    /// last set by [`set_offloads`](Self::set_offloads); the device writes
    /// `num_buffers` itself.
    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize>;

    /// What is waiting to be received. After it returns [`RxPeek::Empty`] (or
    /// `recv` returns `WouldBlock`), [`rx_readiness`](Self::rx_readiness) must
    /// fire when a frame arrives: the device stops reading until then.
    fn peek(&mut self) -> RxPeek {
        RxPeek::Unknown
    }

    /// Called after each batch of sends or receives: a backend that defers wake-ups
    /// or writes does them here.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The offload feature bits (`VIRTIO_NET_F_CSUM`, `GUEST_*`, `HOST_*`) the
    /// backend can carry. The device offers no offload outside this set.
    fn offloads_supported(&self) -> Features;

    /// The receive offloads the guest accepts (`GUEST_*` bits) changed: frames
    /// handed to [`recv`](Self::recv) from now on must not need more.
    fn set_offloads(&mut self, guest_offloads: Features) -> io::Result<()>;

    /// The driver enabled or disabled this queue pair (`VIRTIO_NET_CTRL_MQ`).
    fn set_enabled(&mut self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }

    /// What to poll to learn that frames may be waiting.
    fn rx_readiness(&self) -> Option<Readiness> {
        None
    }

    /// What to poll to learn that a send that returned `WouldBlock` may succeed.
    fn tx_readiness(&self) -> Option<Readiness> {
        None
    }
}

impl<B: NetBackend + ?Sized> NetBackend for Box<B> {
    fn send(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        (**self).send(frame)
    }
    fn recv(&mut self, bufs: &mut RxBuffers<'_>) -> io::Result<usize> {
        (**self).recv(bufs)
    }
    fn peek(&mut self) -> RxPeek {
        (**self).peek()
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn offloads_supported(&self) -> Features {
        (**self).offloads_supported()
    }
    fn set_offloads(&mut self, guest_offloads: Features) -> io::Result<()> {
        (**self).set_offloads(guest_offloads)
    }
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        (**self).set_enabled(enabled)
    }
    fn rx_readiness(&self) -> Option<Readiness> {
        (**self).rx_readiness()
    }
    fn tx_readiness(&self) -> Option<Readiness> {
        (**self).tx_readiness()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iovec::iov;

    #[test]
    fn tx_frame_reads_its_header_across_iovecs() {
        let mut a = [0u8; 5];
        let mut b = [0u8; 3];
        let mut c = [0u8; 10];
        let v = [iov(&mut a), iov(&mut b), iov(&mut c)];
        let src: Vec<u8> = (1..=18).collect();
        assert_eq!(copy_to_iovecs(&v, 0, &src), 18);
        // SAFETY: the iovecs point to live local arrays of their stated length.
        let frame = unsafe { TxFrame::new(&v, 18) };
        assert_eq!(frame.len(), 18);
        assert_eq!(frame.header().flags, 1);
        assert_eq!(frame.header().gso_type, 2);
    }
}
