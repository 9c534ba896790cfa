//! The listening socket: one frontend at a time, reconnections welcome.
//!
//! For each frontend that connects, the server starts a fresh
//! `vhost_user_backend::VhostUserDaemon` (so no vring state leaks from one
//! connection into the next) and relays the frontend's socket to it through
//! the [`relay`]. When the frontend goes away, or sends something
//! the protocol forbids, the error is logged, the device is reset and the server
//! waits for the next frontend.
//!
//! # The link and frontends that keep their own configuration space
//!
//! A frontend that acknowledged `VHOST_USER_PROTOCOL_F_CONFIG` and
//! `BACKEND_REQ` (User-Mode Linux) reads the link status from our
//! configuration space and is told of changes. QEMU's virtio-net keeps its own
//! configuration space and takes no change notification; what it does show its
//! guest is the connection: the link goes down when its vhost-user backend
//! disconnects, and up when it reconnects (`-chardev socket,...,reconnect=N`).
//! So while the link is down ([`VhostUserNet::set_link_up`]) and such a
//! frontend has started the device (acknowledged its features), the server
//! closes that connection and stops listening (the socket file is removed, so
//! QEMU's reconnection attempts are refused rather than left waiting); when the
//! link comes back it listens again and QEMU reconnects within its `reconnect`
//! interval. Without `reconnect=` QEMU does not come back. The device itself
//! drops traffic while the link is down, whatever the frontend.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use virtio_net_standby::NetBackend;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::VhostUserNet;
use crate::relay::{self, Relay};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path cannot be listened on.
    #[error("cannot listen on {path}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Accepting or setting up a connection failed.
    #[error("cannot set up the connection to the frontend")]
    Connection(#[source] io::Error),
    /// The vhost-user handler failed, or refused a message.
    #[error("the vhost-user handler stopped: {0}")]
    Daemon(String),
    /// The relay refused what the frontend sent.
    #[error(transparent)]
    Relay(relay::Error),
}

/// Result of server operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Asks a running [`Server::run`] to return. Cloneable, usable from any thread
/// or a signal-handling thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl ShutdownHandle {
    /// Stops accepting, closes the current connection and makes `run` return.
    pub fn shutdown(&self) {
        let _ = self.stop.write(1);
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// How many connections a server has seen, and how they ended.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Frontends accepted.
    pub connections: AtomicU64,
    /// Connections that ended with an error (malformed message, socket error).
    pub failed: AtomicU64,
    /// Connections that ended, either way, once everything the server held
    /// for them (threads, descriptors, the device's rings) is released.
    pub ended: AtomicU64,
}

/// Mode of a socket the daemon creates when nothing else is said: only its
/// owner may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// How long a [`Server::connect`] waits between attempts to reach a frontend
/// that is not listening (yet, or again).
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

/// A vhost-user server for one [`VhostUserNet`] device.
pub struct Server<B: NetBackend + 'static> {
    path: PathBuf,
    /// `None` while the link is down after a frontend that cannot be told was
    /// disconnected (see the module documentation), and always in client
    /// mode.
    listener: Mutex<Option<UnixListener>>,
    /// Client mode: connect to the frontend's socket instead of listening.
    client: bool,
    /// Mode of the socket file created when listening.
    mode: u32,
    net: Arc<VhostUserNet<B>>,
    stop: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
    stats: Arc<ServerStats>,
}

impl<B: NetBackend + 'static> std::fmt::Debug for Server<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

static PRIVATE_ID: AtomicU64 = AtomicU64::new(0);

impl<B: NetBackend + 'static> Server<B> {
    /// Listens on `path` (an existing socket file there is replaced), a
    /// socket only its owner may connect to ([`DEFAULT_SOCKET_MODE`]).
    pub fn bind(path: impl AsRef<Path>, net: Arc<VhostUserNet<B>>) -> Result<Self> {
        Self::bind_with_mode(path, net, DEFAULT_SOCKET_MODE)
    }

    /// [`bind`](Self::bind) with the socket file's permission bits: `0o660`
    /// lets the group connect (a QEMU run as another user of the group).
    /// The socket appears at `path` with its mode already set.
    pub fn bind_with_mode(
        path: impl AsRef<Path>,
        net: Arc<VhostUserNet<B>>,
        mode: u32,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, mode).map_err(|source| Error::Listen {
            path: path.clone(),
            source,
        })?;
        Self::new(path, Some(listener), net, mode)
    }

    /// Client mode: connects to the socket a frontend listens on at `path`
    /// (QEMU's `-chardev socket,server=on`, libvirt's `mode='server'`, Open
    /// vSwitch's `dpdkvhostuserclient` style), serves it, and when it goes
    /// away connects again, every [`RECONNECT_INTERVAL`] until it listens.
    pub fn connect(path: impl AsRef<Path>, net: Arc<VhostUserNet<B>>) -> Result<Self> {
        let mut s = Self::new(path.as_ref().to_path_buf(), None, net, DEFAULT_SOCKET_MODE)?;
        s.client = true;
        Ok(s)
    }

    fn new(
        path: PathBuf,
        listener: Option<UnixListener>,
        net: Arc<VhostUserNet<B>>,
        mode: u32,
    ) -> Result<Self> {
        Ok(Server {
            path,
            listener: Mutex::new(listener),
            client: false,
            mode,
            net,
            stop: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::Connection)?),
            current: Arc::default(),
            stats: Arc::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that makes [`run`](Self::run) return.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: Arc::clone(&self.stop),
            current: Arc::clone(&self.current),
        }
    }

    /// Connection counts.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Whether the server connects to its frontend rather than listening.
    pub fn is_client(&self) -> bool {
        self.client
    }

    /// Serves frontends one after the other until shut down.
    pub fn run(&self) -> Result<()> {
        let mut link_wait = false;
        loop {
            let stream = if self.client {
                if link_wait && !self.wait_for_link()? {
                    return Ok(());
                }
                match self.connect_frontend()? {
                    Some(s) => s,
                    None => return Ok(()),
                }
            } else {
                if !self.is_listening() && !self.wait_for_link()? {
                    return Ok(());
                }
                match self.accept()? {
                    Some(s) => s,
                    None => return Ok(()),
                }
            };
            link_wait = false;
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "{}: frontend connected on {}",
                self.net.name(),
                self.path.display()
            );
            let dropped_for_link = match self.serve_one(stream) {
                Ok(dropped) => dropped,
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    log::error!("{}: connection failed: {e}", self.net.name());
                    false
                }
            };
            self.net.disconnected();
            self.stats.ended.fetch_add(1, Ordering::Release);
            if self.stop.read().is_ok() {
                return Ok(());
            }
            if dropped_for_link && !self.net.link_up() {
                if self.client {
                    log::info!(
                        "{}: link down: not connecting to {} until the link is up",
                        self.net.name(),
                        self.path.display()
                    );
                    link_wait = true;
                } else {
                    self.stop_listening();
                }
                continue;
            }
            log::info!(
                "{}: waiting for the next frontend on {}",
                self.net.name(),
                self.path.display()
            );
        }
    }

    /// Client mode: connects to the frontend's socket, retrying every
    /// [`RECONNECT_INTERVAL`]. `None`: shut down meanwhile.
    fn connect_frontend(&self) -> Result<Option<UnixStream>> {
        let mut told = false;
        loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => return Ok(Some(s)),
                Err(e) => {
                    if !told {
                        log::info!(
                            "{}: cannot connect to the frontend at {} ({e}); retrying every {} ms",
                            self.net.name(),
                            self.path.display(),
                            RECONNECT_INTERVAL.as_millis()
                        );
                        told = true;
                    }
                }
            }
            if self.wait_stop(RECONNECT_INTERVAL)? {
                return Ok(None);
            }
        }
    }

    /// Waits up to `timeout` for the stop event; true if it came (it is left
    /// set for `run`'s later checks).
    fn wait_stop(&self, timeout: Duration) -> Result<bool> {
        let mut fd = libc::pollfd {
            fd: self.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::Connection(e));
        }
        Ok(n > 0)
    }

    fn listener(&self) -> std::sync::MutexGuard<'_, Option<UnixListener>> {
        self.listener.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_listening(&self) -> bool {
        self.listener().is_some()
    }

    /// Closes the listening socket and removes its path, so that a
    /// reconnecting frontend is refused rather than left waiting.
    fn stop_listening(&self) {
        if self.listener().take().is_some() {
            if let Err(e) = remove_stale_socket(&self.path) {
                log::warn!(
                    "{}: cannot remove {}: {e}",
                    self.net.name(),
                    self.path.display()
                );
            }
            log::info!(
                "{}: link down: not listening on {} until the link is up",
                self.net.name(),
                self.path.display()
            );
        }
    }

    /// Waits for the link to come up, then listens again. `false`: shut down
    /// meanwhile.
    fn wait_for_link(&self) -> Result<bool> {
        let mut seen = 0;
        loop {
            if self.stop.read().is_ok() {
                return Ok(false);
            }
            if self.net.link_up() {
                if self.client {
                    return Ok(true);
                }
                let l = bind_socket(&self.path, self.mode).map_err(|source| Error::Listen {
                    path: self.path.clone(),
                    source,
                })?;
                *self.listener() = Some(l);
                log::info!(
                    "{}: link up: waiting for the next frontend on {}",
                    self.net.name(),
                    self.path.display()
                );
                return Ok(true);
            }
            // The stop event is an eventfd, not part of the channel's
            // changes: look at it at least this often.
            seen = self
                .net
                .channel()
                .wait_changed(seen, Duration::from_millis(100));
        }
    }

    /// While the connection lives: when the link is down and the frontend
    /// started the device without `CONFIG` (it cannot be told), disconnects
    /// it and records that in `dropped`.
    fn watch_link(&self, frontend: &UnixStream, done: &AtomicBool, dropped: &AtomicBool) {
        let channel = self.net.channel();
        let mut seen = 0;
        while !done.load(Ordering::Acquire) {
            if !self.net.link_up()
                // Not told configuration changes: CONFIG not acknowledged, or no
                // protocol features negotiated at all.
                && channel.takes_config_changes() != Some(true)
                && self.net.features_accepted()
            {
                log::info!(
                    "{}: link down, and the frontend did not acknowledge VHOST_USER_PROTOCOL_F_CONFIG \
                     (QEMU's virtio-net keeps its own configuration space): disconnecting it, which it \
                     shows its guest as link down",
                    self.net.name()
                );
                dropped.store(true, Ordering::Release);
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                return;
            }
            seen = channel.wait_changed(seen, Duration::from_millis(500));
        }
    }

    /// Waits for a frontend or the stop event.
    fn accept(&self) -> Result<Option<UnixStream>> {
        let guard = self.listener();
        let Some(listener) = guard.as_ref() else {
            return Err(Error::Connection(io::Error::other("not listening")));
        };
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Connection(e));
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents != 0 {
                let (s, _) = listener.accept().map_err(Error::Connection)?;
                return Ok(Some(s));
            }
        }
    }

    fn hooks(&self) -> relay::Hooks {
        let net = Arc::clone(&self.net);
        relay::Hooks {
            channel: Arc::clone(self.net.channel()),
            log: Arc::clone(self.net.migration_log()),
            rarp: Arc::new(move |mac| net.send_rarp(mac)),
        }
    }

    /// Serves one frontend; returns whether it was disconnected because the
    /// link went down.
    fn serve_one(&self, frontend: UnixStream) -> Result<bool> {
        let _current = CurrentGuard::set(
            &self.current,
            frontend.try_clone().map_err(Error::Connection)?,
        );
        if self.stop.read().is_ok() {
            // Shut down between accept and here: put the event back for run().
            let _ = self.stop.write(1);
            return Ok(false);
        }
        let watched = frontend.try_clone().map_err(Error::Connection)?;
        // The handler listens on a private socket in a directory only we can
        // enter; the relay connects to it before the handler accepts, and the
        // path is gone before anyone else could look.
        let private = PrivateSocket::new()?;
        let mut daemon = self
            .net
            .daemon()
            .map_err(|e| Error::Daemon(e.to_string()))?;
        for h in daemon.get_epoll_handlers() {
            for (fd, ev, token) in self.net.backend_listeners() {
                h.register_listener(fd, ev, token)
                    .map_err(Error::Connection)?;
            }
        }
        let (listener, inner) = private.connect()?;
        daemon
            .start(&mut Listener::from(listener))
            .map_err(|e| Error::Daemon(e.to_string()))?;
        let relay = Relay::start(self.net.name(), frontend, inner, self.hooks())
            .map_err(Error::Connection)?;
        let (done, dropped) = (AtomicBool::new(false), AtomicBool::new(false));
        let result = std::thread::scope(|scope| {
            let watcher = std::thread::Builder::new()
                .name(format!("{}-link", self.net.name()))
                .spawn_scoped(scope, || self.watch_link(&watched, &done, &dropped));
            if let Err(e) = &watcher {
                log::warn!(
                    "{}: cannot watch the link for this connection: {e}",
                    self.net.name()
                );
            }
            let result = daemon.wait();
            done.store(true, Ordering::Release);
            self.net.channel().bump();
            result
        });
        let relayed = relay.close();
        // Stop the device before the daemon's worker is joined (on drop).
        self.net.disconnected();
        drop(daemon);
        if dropped.load(Ordering::Acquire) {
            // Disconnected by us for the link, whatever either side was doing.
            return Ok(true);
        }
        match result {
            // A frontend that went away, even mid-message, is not a failure;
            // the relay tells whether it sent something it must not.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => match relayed {
                // Gone mid-message: a disconnect, as the handler sees it too.
                Err(relay::Error::Truncated) => Ok(false),
                r => r.map(|()| false).map_err(Error::Relay),
            },
            Err(e) => Err(Error::Daemon(e.to_string())),
        }
    }
}

/// Clears the server's record of the current connection however `serve_one`
/// ends.
struct CurrentGuard<'a>(&'a Mutex<Option<UnixStream>>);

impl<'a> CurrentGuard<'a> {
    fn set(slot: &'a Mutex<Option<UnixStream>>, s: UnixStream) -> Self {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        CurrentGuard(slot)
    }
}

impl Drop for CurrentGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A listening socket in a fresh mode-0700 directory.
struct PrivateSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl PrivateSocket {
    fn new() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "vhost-user-net.{}.{}.{nanos}",
            std::process::id(),
            PRIVATE_ID.fetch_add(1, Ordering::Relaxed)
        ));
        // Fails if the name exists: nobody can have prepared it for us.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::Connection)?;
        let path = dir.join("handler.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(Error::Connection(e));
            }
        };
        Ok(PrivateSocket {
            dir,
            path,
            listener: Some(listener),
        })
    }

    /// Connects to the listener, removes the path, and returns both ends.
    fn connect(mut self) -> Result<(UnixListener, UnixStream)> {
        let s = UnixStream::connect(&self.path).map_err(Error::Connection)?;
        let l = self
            .listener
            .take()
            .ok_or_else(|| Error::Connection(io::Error::other("the private listener was taken")))?;
        Ok((l, s))
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Listens on `path` (replacing a stale socket there) with the socket file's
/// permission bits set to `mode` before it appears: it is bound in a fresh
/// mode-0700 directory beside `path`, given its mode, then renamed into place,
/// so that nobody can connect while it has the default mode.
pub(crate) fn bind_socket(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    remove_stale_socket(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the socket path names no file")
    })?;
    let dir = parent.join(format!(
        ".{}.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        PRIVATE_ID.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let result = (|| {
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Removes what is at `path` if it is a socket (a previous run's); refuses
/// to touch anything else.
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
