//! A ready-made epoll worker: one thread per queue pair.
//!
//! The device spawns no threads by itself. A VMM with its own event loop
//! registers the kick eventfds and the backends' readiness fds there and calls
//! [`QueuePairHandle::process_tx`](crate::QueuePairHandle::process_tx) /
//! [`process_rx`](crate::QueuePairHandle::process_rx). A VMM that wants the
//! device to look after itself starts a [`NetWorker`] after activation and stops
//! it (drop, or [`NetWorker::stop`]) before resetting the device.
//!
//! Each thread waits on: the pair's TX and RX kick eventfds, its backend's
//! readiness fds (edge-triggered), a stop eventfd, and, for pair 0, the control
//! queue's kick. It duplicates every fd it waits on, so a device reset cannot pull
//! an fd from under it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::NetBackend;
use crate::ctrl::ControlQueue;
use crate::device::StandbyNet;
use crate::queue_pair::QueuePairHandle;

const STOP: u64 = 0;
const TX_KICK: u64 = 1;
const RX_KICK: u64 = 2;
const BACKEND_RX: u64 = 3;
const BACKEND_TX: u64 = 4;
const CTRL_KICK: u64 = 5;
const BACKEND_BOTH: u64 = 6;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device is not active, so there is nothing to serve.
    #[error("the device is not active: activate it before starting its worker")]
    NotActive,
    /// An epoll or eventfd operation failed.
    #[error("setting up the worker's event loop failed")]
    Io(#[from] io::Error),
}

/// Result of worker operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Threads serving a device's queues. See the module documentation.
pub struct NetWorker {
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NetWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("threads", &self.threads.len())
            .finish()
    }
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd the caller holds open; the result is checked.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

struct Sources {
    fds: Vec<OwnedFd>,
    tx_kick: Option<RawFd>,
    rx_kick: Option<RawFd>,
    ctrl_kick: Option<RawFd>,
}

impl NetWorker {
    /// Starts one thread per queue pair of an active device.
    pub fn start<M, B>(device: &StandbyNet<M, B>) -> Result<NetWorker>
    where
        M: GuestMemoryBackend + Send + Sync + 'static,
        M::R: Sync,
        B: NetBackend + 'static,
    {
        if !device.is_active() {
            return Err(Error::NotActive);
        }
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let mut threads = Vec::new();
        for pair in device.queue_pairs() {
            let ctrl = (pair.index() == 0).then(|| device.control_queue());
            let epoll = Epoll::new()?;
            let src = Self::register(&epoll, pair, ctrl.as_deref(), &stop)?;
            let pair = pair.clone();
            let name = format!("{}-q{}", device.id(), pair.index());
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || serve(epoll, src, pair, ctrl))?;
            threads.push(t);
        }
        Ok(NetWorker { stop, threads })
    }

    fn register<M, B>(
        epoll: &Epoll,
        pair: &QueuePairHandle<M, B>,
        ctrl: Option<&Mutex<ControlQueue<M, B>>>,
        stop: &EventFd,
    ) -> Result<Sources>
    where
        M: GuestMemoryBackend + Send + Sync,
        M::R: Sync,
        B: NetBackend,
    {
        let mut fds = Vec::new();
        let mut add = |fd: RawFd, events: EventSet, token: u64| -> io::Result<RawFd> {
            let owned = dup(fd)?;
            let raw = owned.as_raw_fd();
            epoll.ctl(ControlOperation::Add, raw, EpollEvent::new(events, token))?;
            fds.push(owned);
            Ok(raw)
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        let p = pair.lock();
        let (rx_kick, tx_kick) = p.kick_fds();
        let tx_kick = tx_kick
            .map(|k| add(k.as_raw_fd(), EventSet::IN, TX_KICK))
            .transpose()?;
        let rx_kick = rx_kick
            .map(|k| add(k.as_raw_fd(), EventSet::IN, RX_KICK))
            .transpose()?;
        let (brx, btx) = p.readiness();
        drop(p);
        match (brx, btx) {
            (Some(r), Some(t)) if r.fd == t.fd => {
                let mut ev = EventSet::EDGE_TRIGGERED | EventSet::IN;
                if t.writable {
                    ev |= EventSet::OUT;
                }
                add(r.fd, ev, BACKEND_BOTH)?;
            }
            (r, t) => {
                if let Some(r) = r {
                    let ev = if r.writable {
                        EventSet::OUT
                    } else {
                        EventSet::IN
                    };
                    add(r.fd, EventSet::EDGE_TRIGGERED | ev, BACKEND_RX)?;
                }
                if let Some(t) = t {
                    let ev = if t.writable {
                        EventSet::OUT
                    } else {
                        EventSet::IN
                    };
                    add(t.fd, EventSet::EDGE_TRIGGERED | ev, BACKEND_TX)?;
                }
            }
        }
        let ctrl_kick = match ctrl {
            Some(c) => {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                c.kick_fd()
                    .map(|k| add(k.as_raw_fd(), EventSet::IN, CTRL_KICK))
                    .transpose()?
            }
            None => None,
        };
        Ok(Sources {
            fds,
            tx_kick,
            rx_kick,
            ctrl_kick,
        })
    }

    /// Stops every thread and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot signal the worker threads to stop: {e}");
            return;
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn clear_eventfd(fd: Option<RawFd>) {
    if let Some(fd) = fd {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from an eventfd we own (dup).
        unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
    }
}

fn serve<M, B>(
    epoll: Epoll,
    src: Sources,
    pair: QueuePairHandle<M, B>,
    ctrl: Option<Arc<Mutex<ControlQueue<M, B>>>>,
) where
    M: GuestMemoryBackend + Send + Sync,
    M::R: Sync,
    B: NetBackend,
{
    let _keep_open = &src.fds;
    let mut events = vec![EpollEvent::default(); 8];
    let (mut tx_more, mut rx_more, mut ctl_more) = (true, true, ctrl.is_some());
    loop {
        let timeout = if tx_more || rx_more || ctl_more {
            0
        } else {
            -1
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!(
                    "queue pair {}: epoll_wait failed, worker exits: {e}",
                    pair.index()
                );
                return;
            }
        };
        let (mut tx, mut rx, mut ctl) = (tx_more, rx_more, ctl_more);
        for ev in &events[..n] {
            match ev.data() {
                STOP => return,
                TX_KICK => {
                    clear_eventfd(src.tx_kick);
                    tx = true;
                }
                RX_KICK => {
                    clear_eventfd(src.rx_kick);
                    rx = true;
                }
                BACKEND_RX => rx = true,
                BACKEND_TX => tx = true,
                BACKEND_BOTH => {
                    let set = ev.event_set();
                    rx |= set.contains(EventSet::IN);
                    tx |= set.contains(EventSet::OUT);
                }
                CTRL_KICK => {
                    clear_eventfd(src.ctrl_kick);
                    ctl = true;
                }
                _ => {}
            }
        }
        tx_more = false;
        rx_more = false;
        ctl_more = false;
        if ctl {
            if let Some(c) = &ctrl {
                ctl_more = c.lock().unwrap_or_else(|p| p.into_inner()).process().more;
            }
        }
        if tx {
            tx_more = pair.process_tx().more;
        }
        if rx {
            rx_more = pair.process_rx().more;
        }
    }
}
