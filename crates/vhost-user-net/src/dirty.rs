//! Dirty-page logging for live migration: `VHOST_F_LOG_ALL` and
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`.
//!
//! While a frontend migrates the guest, it shares a log with the backend
//! (`SET_LOG_BASE`: a memory file, its size and offset) and acknowledges
//! `VHOST_F_LOG_ALL`. From then on, every byte of guest memory the backend
//! writes must be reported in the log before the frontend's next pass over it:
//! one bit per 4 KiB page of guest physical address, page `n` at bit `n % 8`
//! of byte `n / 8` (bit `n % 64` of the little-endian 64-bit word `n / 64`,
//! as the frontend reads it). Writes to a used ring whose `SET_VRING_ADDR`
//! carried `VHOST_VRING_F_LOG` are logged at that message's `log_guest_addr`
//! (the used ring's guest physical address as the frontend knows it), not at
//! the address the ring was reached through.
//!
//! The device writes guest memory through host pointers
//! (`virtio_net_standby`'s `GuestRam`) and reports each batch's writes to the
//! dirty bitmap of the region it wrote: RX buffers with their `num_buffers`
//! headers, used-ring entries and the used index, the available event. That
//! bitmap is [`LogBitmap`], the bitmap type of [`VhostUserMemory`]: it turns a
//! region offset into a guest physical address and sets the log's bit. With
//! logging off (no `LOG_ALL`, the usual case) a report costs one atomic load.
//!
//! [`MigrationLog`] is the device's shared state: the log mapping (installed by
//! the relay when `SET_LOG_BASE` passes, from a duplicate of the frontend's
//! descriptor), the `LOG_ALL` switch (set by the backend from `SET_FEATURES`)
//! and each ring's used-ring logging address (from `SET_VRING_ADDR`, matched
//! with the used ring the device was activated on).
//!
//! For measuring what logging costs with frontends that never migrate (DPDK's
//! virtio-user), [`MigrationLog::set_forced`] keeps logging on whatever the
//! frontend acknowledges, into a log the backend allocates itself
//! ([`LogArea::anonymous`]), sized from each memory table the frontend sends.
//! A used ring is then logged where the device reached it, since such a
//! frontend gives no `VHOST_VRING_F_LOG` address.
//!
//! [`VhostUserMemory`]: crate::VhostUserMemory

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use vhost_user_backend::bitmap::{BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::GuestMemoryRegion;
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;

/// The log's page size: one bit covers this many bytes of guest memory.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Errors mapping a frontend's log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `SET_LOG_BASE` gave an empty log.
    #[error("the frontend's dirty log (SET_LOG_BASE) is empty")]
    Empty,
    /// The size or offset does not fit this host's address space.
    #[error(
        "the frontend's dirty log (SET_LOG_BASE) of {size} bytes at offset {offset} cannot be mapped on this host"
    )]
    TooLarge {
        /// Size in bytes.
        size: u64,
        /// Offset in the file.
        offset: u64,
    },
    /// The log's file is shorter than the range `SET_LOG_BASE` names: setting
    /// a bit beyond the file's end would kill the daemon (`SIGBUS`).
    #[error(
        "the frontend's dirty log (SET_LOG_BASE) names {size} bytes at offset {offset} of a file of {file} bytes"
    )]
    BeyondFile {
        /// Size in bytes.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// The file's size.
        file: u64,
    },
    /// A log the backend allocates itself ([`LogArea::anonymous`]) was asked
    /// to cover no guest memory.
    #[error("a forced dirty log must cover some guest memory (0 bytes asked)")]
    NothingToCover,
    /// The address space for a log the backend allocates itself could not be
    /// reserved.
    #[error(
        "cannot allocate a dirty log of {size} bytes of address space to cover guest memory up to {covers:#x} \
         (forced logging; with DPDK's virtio-user, guest addresses are the client's virtual addresses): {source}"
    )]
    Allocate {
        /// Guest memory the log was to cover, in bytes from address 0.
        covers: u64,
        /// Size of the log in bytes.
        size: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `mmap` refused the log's descriptor.
    #[error(
        "cannot map the frontend's dirty log (SET_LOG_BASE, {size} bytes at offset {offset}): {source}"
    )]
    Map {
        /// Size in bytes.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of log operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A dirty log: the frontend's, mapped shared and writable ([`LogArea::map`]),
/// or one the backend allocates for forced logging ([`LogArea::anonymous`]).
#[derive(Debug)]
pub struct LogArea {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by the `LogArea` and only ever accessed through
// atomic byte operations, from any thread.
unsafe impl Send for LogArea {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for LogArea {}

impl LogArea {
    /// Maps `size` bytes of `fd` from `offset`, as `SET_LOG_BASE` describes them.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Self> {
        if size == 0 {
            return Err(Error::Empty);
        }
        let too_large = Error::TooLarge { size, offset };
        let len = usize::try_from(size).map_err(|_| Error::TooLarge { size, offset })?;
        let off = libc::off_t::try_from(offset).map_err(|_| too_large)?;
        // A regular file (a memfd, as QEMU's log is) must hold the whole range.
        // SAFETY: fstat fills the zeroed stat buffer for a descriptor we borrow.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
        {
            let file = u64::try_from(st.st_size).unwrap_or(0);
            if offset.checked_add(size).is_none_or(|end| end > file) {
                return Err(Error::BeyondFile { size, offset, file });
            }
        }
        // SAFETY: a fresh shared mapping of a descriptor we borrow for the
        // call; no fixed address, so no existing mapping is touched. The
        // result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map {
                size,
                offset,
                source: io::Error::last_os_error(),
            });
        }
        Ok(LogArea {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A zeroed log of the backend's own covering guest memory up to `covers`
    /// bytes from address 0 (one bit per 4 KiB page, rounded up), for forced
    /// logging. The mapping is private, anonymous and `MAP_NORESERVE`: only
    /// the pages of the log that get a bit set take memory, so a log covering
    /// guest addresses up to 2^47 (a virtio-user client's virtual addresses)
    /// reserves 4 GiB of address space but uses a few pages per GiB of guest
    /// memory actually written.
    pub fn anonymous(covers: u64) -> Result<Self> {
        if covers == 0 {
            return Err(Error::NothingToCover);
        }
        let size = covers.div_ceil(8 * LOG_PAGE_SIZE);
        let refused = |source| Error::Allocate {
            covers,
            size,
            source,
        };
        let len = usize::try_from(size).map_err(|_| {
            refused(io::Error::new(
                io::ErrorKind::InvalidInput,
                "larger than this host's address space",
            ))
        })?;
        // SAFETY: a fresh private anonymous mapping; no fixed address, so no
        // existing mapping is touched. The result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(refused(io::Error::last_os_error()));
        }
        Ok(LogArea {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The log's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log has no bytes (never: both constructors refuse that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest memory the log covers, in bytes from guest physical address 0.
    pub fn covers(&self) -> u64 {
        (self.len as u64).saturating_mul(8 * LOG_PAGE_SIZE)
    }

    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        // SAFETY: `i < len` bytes of the live mapping; AtomicU8 has the size
        // and alignment of u8, and every access to the mapping is atomic.
        (i < self.len).then(|| unsafe { AtomicU8::from_ptr(self.ptr.add(i)) })
    }

    /// Sets the bits of every page `len` bytes from `gpa` touch. Returns false
    /// if some of them lie beyond the log (their bits are not set).
    fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            let Some(b) = usize::try_from(page / 8).ok().and_then(|i| self.byte(i)) else {
                return false;
            };
            // Release: the device's writes to the page are visible to a
            // frontend that saw the bit (it reads the log atomically).
            b.fetch_or(1 << (page % 8), Ordering::Release);
        }
        true
    }

    /// Whether the page holding `gpa` is marked.
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }
}

impl Drop for LogArea {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, unmapped once; no reference into it
        // outlives `self` (`byte` borrows `self`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Where one ring's used-ring writes are logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RingLog {
    /// `SET_VRING_ADDR` carried `VHOST_VRING_F_LOG`.
    log: bool,
    /// Its `log_guest_addr`.
    log_addr: u64,
    /// The used ring the device runs on: guest physical address and length
    /// (0: not running).
    used: u64,
    used_len: u64,
}

#[derive(Debug, Default)]
struct LogState {
    area: Option<Arc<LogArea>>,
    /// `area` is the backend's own (forced logging), not the frontend's.
    own: bool,
    rings: Vec<RingLog>,
}

/// Logging counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Writes reported while logging was on.
    pub logged: u64,
    /// Writes reported while logging was on but the frontend had shared no log
    /// yet, or (partly) beyond the end of its log: their pages are not marked.
    pub missed: u64,
}

/// The device's dirty-logging state, shared by the relay (the log and ring
/// addresses), the backend (`LOG_ALL`, the rings it runs) and every
/// [`LogBitmap`] of the memory the frontend shared.
#[derive(Debug, Default)]
pub struct MigrationLog {
    on: AtomicBool,
    /// The frontend's `VHOST_F_LOG_ALL`.
    log_all: AtomicBool,
    /// Logging stays on whatever the frontend acknowledges (benchmarks).
    forced: AtomicBool,
    state: RwLock<LogState>,
    logged: AtomicU64,
    missed: AtomicU64,
    warned: AtomicBool,
}

impl MigrationLog {
    /// A log with nothing shared and logging off.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, LogState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns logging on or off (`VHOST_F_LOG_ALL` acknowledged or not). With
    /// logging forced ([`set_forced`](Self::set_forced)) it stays on.
    pub fn set_logging(&self, on: bool) {
        self.log_all.store(on, Ordering::Release);
        self.update();
    }

    /// Sets `on` from the frontend's switch and the forced one.
    fn update(&self) {
        let on = self.log_all.load(Ordering::Acquire) || self.forced();
        if self.on.swap(on, Ordering::AcqRel) != on {
            self.warned.store(false, Ordering::Relaxed);
            log::info!(
                "dirty logging {}",
                match (on, self.forced()) {
                    (false, _) => "off",
                    (true, false) => "on (VHOST_F_LOG_ALL)",
                    (true, true) => "on (forced)",
                }
            );
        }
    }

    /// Whether logging is on.
    pub fn logging(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Forces logging on, for measuring its cost with a frontend that never
    /// migrates (DPDK's virtio-user sends neither `VHOST_F_LOG_ALL` nor
    /// `SET_LOG_BASE`): every device write is logged as during a migration,
    /// whatever the frontend acknowledges and across connections, into a log
    /// the backend allocates ([`LogArea::anonymous`]) when the frontend's
    /// memory table arrives ([`cover`](Self::cover)). A log the frontend
    /// shares replaces it. Off by default; with it off nothing changes, and
    /// a write costs the same one atomic load.
    pub fn set_forced(&self, forced: bool) {
        self.forced.store(forced, Ordering::Release);
        if !forced {
            let mut s = self.state_mut();
            if s.own {
                s.area = None;
                s.own = false;
            }
        }
        self.update();
    }

    /// Whether logging is forced on ([`set_forced`](Self::set_forced)).
    pub fn forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }

    /// With logging forced, makes sure a log covers guest memory up to `end`
    /// (the highest address of the frontend's memory table, exclusive): when
    /// the frontend shared no log and the backend's own is missing or too
    /// small, allocates one ([`LogArea::anonymous`]). A larger log replaces
    /// the smaller one, whose bits are dropped. Without forced logging it
    /// does nothing.
    pub fn cover(&self, end: u64) -> Result<()> {
        if !self.forced() {
            return Ok(());
        }
        let mut s = self.state_mut();
        let shared = s.area.is_some() && !s.own;
        if shared || s.area.as_ref().is_some_and(|a| a.covers() >= end) {
            return Ok(());
        }
        let area = LogArea::anonymous(end)?;
        log::info!(
            "forced dirty logging: log allocated, {} bytes of address space (MAP_NORESERVE), \
             covering guest memory up to {:#x}",
            area.len,
            area.covers()
        );
        s.area = Some(Arc::new(area));
        s.own = true;
        Ok(())
    }

    /// Installs the frontend's log (`SET_LOG_BASE`), replacing any earlier one.
    pub fn set_area(&self, area: LogArea) {
        log::info!(
            "dirty log shared: {} bytes, covering guest memory up to {:#x}",
            area.len,
            area.covers()
        );
        let mut s = self.state_mut();
        s.area = Some(Arc::new(area));
        s.own = false;
    }

    /// The log in use: the one the frontend shared, or with forced logging
    /// the backend's own; `None` before either.
    pub fn area(&self) -> Option<Arc<LogArea>> {
        self.state().area.clone()
    }

    /// Records a `SET_VRING_ADDR`: whether ring `index` logs its used ring,
    /// and where.
    pub fn set_ring_log(&self, index: u32, log: bool, log_addr: u64) {
        let Ok(i) = usize::try_from(index) else {
            return;
        };
        // The protocol bounds rings far lower; a larger index is refused by
        // the handler, and never allocates here.
        if i >= 1024 {
            return;
        }
        let mut s = self.state_mut();
        if s.rings.len() <= i {
            s.rings.resize(i + 1, RingLog::default());
        }
        s.rings[i].log = log;
        s.rings[i].log_addr = log_addr;
    }

    /// Records the used ring the device runs ring `index` on (guest physical
    /// address, length in bytes; length 0 when it stops).
    pub fn set_used_ring(&self, index: u16, gpa: u64, len: u64) {
        let i = usize::from(index);
        let mut s = self.state_mut();
        if s.rings.len() <= i {
            s.rings.resize(i + 1, RingLog::default());
        }
        s.rings[i].used = gpa;
        s.rings[i].used_len = len;
        let r = s.rings[i];
        if len > 0 && r.log && r.log_addr != gpa {
            log::info!(
                "ring {index}: used ring at {gpa:#x} is logged at {:#x} (its log_guest_addr)",
                r.log_addr
            );
        }
    }

    /// Forgets the connection's log, ring addresses and the `LOG_ALL` switch
    /// (logging stays on if forced; the next memory table brings a new log).
    pub fn reset(&self) {
        self.log_all.store(false, Ordering::Release);
        self.on.store(self.forced(), Ordering::Release);
        *self.state_mut() = LogState::default();
    }

    /// Counters since creation.
    pub fn stats(&self) -> LogStats {
        LogStats {
            logged: self.logged.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
        }
    }

    /// Reports a device write of `len` bytes at guest physical address `gpa`.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        self.mark_slow(gpa, len);
    }

    #[cold]
    fn mark_slow(&self, gpa: u64, len: u64) {
        self.logged.fetch_add(1, Ordering::Relaxed);
        let s = self.state();
        let Some(area) = s.area.as_ref() else {
            let why = if self.forced() {
                "logging is forced but no log was allocated (no memory table yet)"
            } else {
                "the frontend acknowledged VHOST_F_LOG_ALL but shared no log (SET_LOG_BASE)"
            };
            self.miss(gpa, len, why);
            return;
        };
        let end = gpa.saturating_add(len);
        let mut ok = true;
        let mut direct = |from: u64, to: u64| {
            if to > from {
                ok &= area.mark(from, to - from);
            }
        };
        // A used-ring write with VHOST_VRING_F_LOG goes to the ring's
        // log_guest_addr; what lies outside every such ring, as written.
        let ring = s.rings.iter().find(|r| {
            r.log && r.used_len > 0 && gpa < r.used.saturating_add(r.used_len) && end > r.used
        });
        match ring {
            Some(r) => {
                let from = gpa.max(r.used);
                let to = end.min(r.used.saturating_add(r.used_len));
                direct(gpa, from);
                direct(to, end);
                ok &= area.mark(r.log_addr.saturating_add(from - r.used), to - from);
            }
            None => direct(gpa, end),
        }
        if !ok {
            self.miss(
                gpa,
                len,
                "the write lies beyond the end of the frontend's log",
            );
        }
    }

    fn miss(&self, gpa: u64, len: u64, why: &str) {
        self.missed.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::error!(
                "dirty log: a device write of {len} bytes at {gpa:#x} is not logged: {why}; \
                 a migration now copies stale guest memory"
            );
        }
    }
}

#[derive(Debug)]
struct Binding {
    /// Guest physical address of the region's first byte.
    start: u64,
    log: Arc<MigrationLog>,
}

/// The dirty bitmap of one region of [`VhostUserMemory`](crate::VhostUserMemory):
/// reports the device's writes to the device's [`MigrationLog`] once the
/// backend has bound it ([`LogBitmap::bind`], done when the frontend's memory
/// table arrives). Unbound, or with logging off, a report does nothing.
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    binding: Arc<OnceLock<Binding>>,
    /// Offset of this slice from the start of the region.
    offset: usize,
}

impl LogBitmap {
    /// Binds the region's bitmap to `log`; `start` is the region's guest
    /// physical address. A region is bound once: later calls change nothing.
    pub fn bind(&self, start: u64, log: &Arc<MigrationLog>) {
        let _ = self.binding.set(Binding {
            start,
            log: Arc::clone(log),
        });
    }

    fn gpa(&self, b: &Binding, offset: usize) -> u64 {
        b.start
            .saturating_add(self.offset as u64)
            .saturating_add(offset as u64)
    }
}

impl Bitmap for LogBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(b) = self.binding.get() {
            if b.log.on.load(Ordering::Relaxed) {
                b.log.mark_slow(self.gpa(b, offset), len as u64);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.binding.get().is_some_and(|b| {
            b.log
                .area()
                .is_some_and(|a| a.is_marked(self.gpa(b, offset)))
        })
    }

    fn slice_at(&self, offset: usize) -> Self {
        LogBitmap {
            binding: Arc::clone(&self.binding),
            offset: self.offset.saturating_add(offset),
        }
    }
}

impl WithBitmapSlice<'_> for LogBitmap {
    type S = Self;
}

impl BitmapSlice for LogBitmap {}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        LogBitmap::default()
    }
}

/// What `vhost-user-backend`'s handler builds per region at `SET_LOG_BASE`.
/// The relay has already mapped the log for the [`MigrationLog`] by then, so
/// this holds nothing.
#[derive(Debug)]
pub struct HandlerLog;

impl MemRegionBitmap for HandlerLog {
    fn new<R: GuestMemoryRegion>(_region: &R, _logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        Ok(HandlerLog)
    }
}

impl BitmapReplace for LogBitmap {
    type InnerBitmap = HandlerLog;

    fn replace(&self, _bitmap: HandlerLog) {}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A zeroed memory file of `len` bytes, as a frontend creates for its log.
    pub(crate) fn memfd(len: u64) -> OwnedFd {
        // SAFETY: a fresh descriptor from a C string literal; checked below.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a descriptor we own.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(r, 0);
        fd
    }

    /// The log's bits, read through a second mapping of the same file (what
    /// the frontend sees).
    pub(crate) fn marked_pages(fd: &OwnedFd, len: u64) -> Vec<u64> {
        let view = LogArea::map(fd.as_fd(), 0, len).unwrap();
        (0..len * 8)
            .filter(|&p| view.is_marked(p * LOG_PAGE_SIZE))
            .collect()
    }

    #[test]
    fn bits_follow_the_vhost_user_layout() {
        let fd = memfd(64);
        let log = MigrationLog::new();
        log.set_area(LogArea::map(fd.as_fd(), 0, 64).unwrap());
        // Off: nothing is marked.
        log.mark(0x3000, 1);
        assert!(marked_pages(&fd, 64).is_empty());
        log.set_logging(true);
        // Page 3; pages 9 and 10 (a write across the boundary); page 63.
        log.mark(0x3fff, 1);
        log.mark(0x9ff0, 0x20);
        log.mark(63 * 4096, 4096);
        assert_eq!(marked_pages(&fd, 64), vec![3, 9, 10, 63]);
        // Byte 1, bits 1 and 2: pages 9 and 10; byte 0 bit 3: page 3.
        let view = LogArea::map(fd.as_fd(), 0, 64).unwrap();
        assert_eq!(view.byte(0).unwrap().load(Ordering::Relaxed), 1 << 3);
        assert_eq!(view.byte(1).unwrap().load(Ordering::Relaxed), 0b110);
        assert_eq!(view.byte(7).unwrap().load(Ordering::Relaxed), 0x80);
        // As the frontend reads it: little-endian 64-bit words.
        let mut w = [0u8; 8];
        for (i, b) in w.iter_mut().enumerate() {
            *b = view.byte(i).unwrap().load(Ordering::Relaxed);
        }
        let word = u64::from_le_bytes(w);
        assert_eq!(word, (1 << 3) | (1 << 9) | (1 << 10) | (1 << 63));
        assert_eq!(
            log.stats(),
            LogStats {
                logged: 3,
                missed: 0
            }
        );
        // Beyond the log: counted, nothing written out of bounds.
        log.mark(64 * 8 * 4096, 1);
        assert_eq!(log.stats().missed, 1);
        // Off again.
        log.set_logging(false);
        log.mark(0x20000, 1);
        assert!(!view.is_marked(0x20000));
    }

    #[test]
    fn used_ring_writes_go_to_log_guest_addr() {
        let fd = memfd(64);
        let log = MigrationLog::new();
        log.set_area(LogArea::map(fd.as_fd(), 0, 64).unwrap());
        log.set_logging(true);
        // Ring 1: used ring at 0x10000 (256 entries: 6 + 8 * 256 bytes),
        // logged at 0x40000.
        log.set_ring_log(1, true, 0x40000);
        log.set_used_ring(1, 0x10000, 6 + 8 * 256);
        log.mark(0x10000, 4); // flags and index
        log.mark(0x10000 + 4 + 8 * 255, 8); // last entry
        assert_eq!(marked_pages(&fd, 64), vec![0x40]);
        // A write straddling the ring's end: the part outside is logged as is.
        log.mark(0x10000 + 6 + 8 * 256 - 2, 4096);
        assert_eq!(marked_pages(&fd, 64), vec![0x10, 0x11, 0x40]);
        // Without VHOST_VRING_F_LOG the used ring is logged where it is.
        log.set_ring_log(1, false, 0x40000);
        log.mark(0x10000, 4);
        assert_eq!(marked_pages(&fd, 64), vec![0x10, 0x11, 0x40]);
        // No log shared: counted as missed.
        log.reset();
        log.set_logging(true);
        log.mark(0, 1);
        assert_eq!(log.stats().missed, 1);
    }

    #[test]
    fn region_bitmaps_report_guest_physical_addresses() {
        let fd = memfd(64);
        let log = MigrationLog::new();
        log.set_area(LogArea::map(fd.as_fd(), 0, 64).unwrap());
        let b = LogBitmap::with_len(0x10000);
        // Unbound: nothing.
        log.set_logging(true);
        b.mark_dirty(0, 1);
        assert!(marked_pages(&fd, 64).is_empty());
        b.bind(0x100000, &log);
        b.mark_dirty(0x2000, 1);
        b.slice_at(0x5000).mark_dirty(0x10, 1);
        assert_eq!(marked_pages(&fd, 64), vec![0x102, 0x105]);
        assert!(b.dirty_at(0x2000));
        assert!(!b.dirty_at(0x3000));
        // A second bind changes nothing.
        b.bind(0, &log);
        b.mark_dirty(0, 1);
        assert_eq!(marked_pages(&fd, 64), vec![0x100, 0x102, 0x105]);
    }

    /// Every page an anonymous log has marked, scanning all it covers.
    fn own_marked_pages(area: &LogArea) -> Vec<u64> {
        (0..area.covers() / LOG_PAGE_SIZE)
            .filter(|&p| area.is_marked(p * LOG_PAGE_SIZE))
            .collect()
    }

    #[test]
    fn an_anonymous_log_marks_exactly_the_written_pages() {
        // 1 MiB + 1 byte: 257 pages, rounded up to 33 bytes (264 pages).
        let area = LogArea::anonymous((1 << 20) + 1).unwrap();
        assert_eq!(area.len(), 33);
        assert_eq!(area.covers(), 264 * LOG_PAGE_SIZE);
        assert!(own_marked_pages(&area).is_empty(), "zeroed");
        assert!(area.mark(0x1fff, 2));
        assert!(area.mark(0x40000, 1));
        assert!(area.mark(263 * LOG_PAGE_SIZE, LOG_PAGE_SIZE));
        assert!(!area.mark(264 * LOG_PAGE_SIZE, 1), "beyond the log");
        assert_eq!(own_marked_pages(&area), vec![1, 2, 0x40, 263]);

        // As the device reaches it: forced logging, no LOG_ALL.
        let log = MigrationLog::new();
        log.mark(0x1000, 1);
        log.set_forced(true);
        assert!(log.logging());
        log.cover(16 << 20).unwrap();
        let area = log.area().unwrap();
        assert_eq!(area.covers(), 16 << 20);
        log.mark(0x3000, 0x2000); // pages 3 and 4
        log.mark(0xff_ffff, 1); // the last page
        // A used ring without VHOST_VRING_F_LOG: logged where it is.
        log.set_used_ring(0, 0x8000, 6 + 8 * 256);
        log.mark(0x8000, 4);
        assert_eq!(own_marked_pages(&area), vec![3, 4, 8, 0xfff]);
        // The frontend turning LOG_ALL off changes nothing.
        log.set_logging(false);
        assert!(log.logging());
        log.mark(0x20000, 1);
        assert!(area.is_marked(0x20000));
        // A memory table the log already covers keeps it; a larger one
        // gets a larger log.
        log.cover(4 << 20).unwrap();
        assert!(Arc::ptr_eq(&area, &log.area().unwrap()));
        log.cover(64 << 20).unwrap();
        assert_eq!(log.area().unwrap().covers(), 64 << 20);
        assert_eq!(log.stats().missed, 0);
        // Across connections: still on, the next table brings a new log.
        log.reset();
        assert!(log.logging() && log.area().is_none());
        // A log the frontend shares is used and never replaced by ours.
        let fd = memfd(64);
        log.set_area(LogArea::map(fd.as_fd(), 0, 64).unwrap());
        log.cover(1 << 40).unwrap();
        assert_eq!(log.area().unwrap().covers(), 64 * 8 * LOG_PAGE_SIZE);
        // Not forced: off again with the frontend's switch, and no log of ours.
        log.reset();
        log.cover(1 << 20).unwrap();
        log.set_forced(false);
        assert!(!log.logging() && log.area().is_none());
        log.cover(1 << 20).unwrap();
        assert!(log.area().is_none());
    }

    #[test]
    fn a_log_covering_a_virtio_user_address_space_is_address_space_only() {
        // Guest "physical" addresses up to 2^47: 4 GiB of log, of which only
        // the pages written become memory.
        let area = LogArea::anonymous(1 << 47).unwrap();
        assert_eq!(area.len(), 4 << 30);
        let gpa = 0x7f12_3456_7000;
        assert!(area.mark(gpa, 1));
        assert!(area.is_marked(gpa));
        assert!(!area.is_marked(gpa + LOG_PAGE_SIZE));
        assert!(!area.is_marked(gpa - LOG_PAGE_SIZE));
    }

    #[test]
    fn bad_anonymous_logs_are_refused() {
        assert!(matches!(LogArea::anonymous(0), Err(Error::NothingToCover)));
        // 2^64 bytes of guest memory need 2^49 bytes of log: more address
        // space than x86-64 user space has.
        let e = LogArea::anonymous(u64::MAX).unwrap_err();
        assert!(matches!(e, Error::Allocate { .. }), "{e}");
        assert!(e.to_string().contains("cannot allocate a dirty log"), "{e}");
        // Forced logging passes the refusal on, and logs nothing meanwhile.
        let log = MigrationLog::new();
        log.set_forced(true);
        assert!(log.cover(u64::MAX).is_err());
        assert!(log.area().is_none());
        log.mark(0, 1);
        assert_eq!(log.stats().missed, 1);
    }

    #[test]
    fn bad_logs_are_refused() {
        let fd = memfd(64);
        assert!(matches!(LogArea::map(fd.as_fd(), 0, 0), Err(Error::Empty)));
        assert!(matches!(
            LogArea::map(fd.as_fd(), u64::MAX, 64),
            Err(Error::TooLarge { .. })
        ));
        // Not page-aligned offset: mmap refuses.
        assert!(matches!(
            LogArea::map(fd.as_fd(), 1, 32),
            Err(Error::Map { .. })
        ));
        // More than the file holds: refused before anything is mapped.
        assert!(matches!(
            LogArea::map(fd.as_fd(), 0, 8192),
            Err(Error::BeyondFile { file: 64, .. })
        ));
        assert!(matches!(
            LogArea::map(fd.as_fd(), 4096, 64),
            Err(Error::BeyondFile { .. })
        ));
    }
}
