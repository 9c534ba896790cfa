//! What the protocol-level tests share: the server on a thread of its own,
//! stopped when the test ends, and guest memory files.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

use vhost_user_net::{Server, ShutdownHandle};
use virtio_net_standby::NetBackend;

/// A [`Server`] running on its own thread; dropping it shuts the server down
/// and joins the thread (a server error fails the test there).
pub struct ServerThread {
    stop: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    pub fn spawn<B: NetBackend + 'static>(server: Server<B>) -> ServerThread {
        let stop = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().unwrap());
        ServerThread {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// A memory file of `len` bytes, as a frontend shares guest memory.
pub fn memfd(name: &CStr, len: u64) -> OwnedFd {
    // SAFETY: a fresh descriptor from a C string; checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0);
    fd
}
