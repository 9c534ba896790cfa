//! What the protocol-level tests share: the server on a thread of its own,
//! stopped when the test ends, guest memory files and their shared mappings,
//! frames sent from the host's side, and waiting for a condition.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_net::{Server, ShutdownHandle};
use virtio_net_standby::{NetBackend, TxFrame};

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

/// Maps `len` bytes of `fd` shared and writable, as a frontend maps the guest
/// memory it shares; the caller unmaps it (`libc::munmap`).
pub fn map_shared(fd: &OwnedFd, len: usize) -> *mut u8 {
    // SAFETY: a fresh shared mapping of a file the caller owns; no fixed
    // address, so no existing mapping is touched; checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    ptr.cast()
}

/// Sends, from the host's side of `peer`, a frame of `len` bytes (the 12-byte
/// header included) to `mac`, IPv4 ethertype, its payload a pattern from
/// `seed`; returns the frame.
pub fn send_frame(peer: &mut impl NetBackend, mac: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[12..18].copy_from_slice(&mac);
    f[18..24].copy_from_slice(&[2, 0, 0, 0, 0, seed]);
    f[24..26].copy_from_slice(&0x0800u16.to_be_bytes());
    for (i, b) in f[26..].iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    let iov = [libc::iovec {
        iov_base: f.as_ptr() as *mut libc::c_void,
        iov_len: f.len(),
    }];
    // SAFETY: the iovec describes `f`, alive for the call.
    let tx = unsafe { TxFrame::new(&iov, f.len()) };
    peer.send(&tx).unwrap();
    peer.flush().unwrap();
    f
}

/// Polls `f` until it holds; fails the test after 10 seconds.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
