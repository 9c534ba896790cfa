//! A split virtqueue accessed through host pointers.
//!
//! The transport configures queues as `virtio_queue::Queue` objects; on activation
//! each one becomes a [`SplitRing`] whose descriptor table, available ring and used
//! ring are translated to host pointers once. After that, popping a buffer or
//! publishing a used element touches guest memory directly, with the barriers the
//! virtio memory model needs and nothing else. `virtio_queue::QueueState` remains
//! the state format: [`SplitRing::state`] produces one for snapshots.
//!
//! Every ring field the driver writes (indices, entries, descriptors, suppression
//! fields) is read once, with a volatile or atomic load, into a local before it is
//! checked and used: the guest may change it at any moment, and a hostile value can
//! only ever produce a defined outcome (a malformed chain, or an [`Error`] that makes
//! the device need a reset). Packet data is copied with plain copies, as `vm-memory`
//! does: the guest racing its own buffers only garbles its own frames.

use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryBackend;

use crate::memory::GuestRam;

pub use virtio_device::ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};

/// Errors setting up or running a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The driver did not set the queue ready.
    #[error("the queue is not ready")]
    NotReady,
    /// Split queue sizes are powers of two up to 32768.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    InvalidSize(u16),
    /// A ring area is not aligned as the specification requires.
    #[error("the {area} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which area.
        area: &'static str,
        /// Its guest physical address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A ring area is not inside one region of guest memory.
    #[error("the {area} at {addr:#x} ({len} bytes) is not inside one guest memory region")]
    OutsideMemory {
        /// Which area.
        area: &'static str,
        /// Its guest physical address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The driver moved the available index further than the queue size allows
    /// (counting the buffers the device holds): the ring state is corrupt and
    /// the device needs a reset.
    #[error(
        "the driver made {pending} buffers available while the device holds {held} \
         on a queue of {size}"
    )]
    AvailIndexRunaway {
        /// How many buffers the index claims beyond those the device took.
        pending: u16,
        /// Buffers the device took and has not used yet.
        held: u16,
        /// The queue size.
        size: u16,
    },
    /// The available ring names a descriptor the table does not have: no used
    /// element could return it, so (as QEMU does) the device needs a reset.
    #[error("the available ring names descriptor {head} of a {size}-entry table")]
    InvalidHead {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
}

/// The ring features a driver negotiated (not what the transport's queue object
/// says: the device knows what was acknowledged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// `VIRTIO_F_IN_ORDER`: buffers must be used in the order they were made
    /// available.
    pub in_order: bool,
}

impl RingFeatures {
    /// The ring features in a negotiated set.
    pub fn from_features(f: crate::features::Features) -> Self {
        RingFeatures {
            indirect: f.has(crate::features::F_RING_INDIRECT_DESC),
            event_idx: f.has(crate::features::F_RING_EVENT_IDX),
            in_order: f.has(crate::features::F_IN_ORDER),
        }
    }
}

/// Result of ring operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One descriptor, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// Decodes the 16-byte descriptor at `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading 16 bytes and 8-byte aligned.
    #[inline]
    pub(crate) unsafe fn read(p: *const u8) -> Descriptor {
        // SAFETY: the caller guarantees 16 readable, 8-aligned bytes. Volatile: the
        // guest may write the descriptor concurrently.
        let (lo, hi) = unsafe {
            (
                ptr::read_volatile(p as *const u64),
                ptr::read_volatile(p.add(8) as *const u64),
            )
        };
        let hi = u64::from_le(hi);
        Descriptor {
            addr: u64::from_le(lo),
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        }
    }
}

/// A split virtqueue whose areas have been translated to host pointers.
///
/// The pointers stay valid as long as the [`GuestRam`] the ring was built with (or
/// rebuilt with, see [`SplitRing::retranslate`]) is alive; the queue-pair and
/// control-queue owners keep both together.
pub struct SplitRing {
    size: u16,
    max_size: u16,
    desc_gpa: u64,
    avail_gpa: u64,
    used_gpa: u64,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    used_region: u32,
    // The free-running u16 indices live in 32-bit fields: with two adjacent u16
    // fields, the hot loop's 2-byte store of one followed by a wider load of the
    // other defeats store-to-load forwarding (measured: ~10 ns per packet).
    next_avail: u32,
    next_used: u32,
    event_idx: bool,
    /// A polling device keeps the driver's kicks off between passes.
    hold_kicks: bool,
    indirect: bool,
    in_order: bool,
    /// The used ring's `flags` as this ring last wrote them (`None`: not
    /// written yet). The driver reads that cache line on every kick decision,
    /// so an unchanged value is not written again.
    used_flags: Option<u16>,
}

// SAFETY: the pointers refer to guest memory kept mapped by the `GuestRam` that the
// owner of the ring moves along with it; the ring is not `Sync`.
unsafe impl Send for SplitRing {}

impl std::fmt::Debug for SplitRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitRing")
            .field("size", &self.size)
            .field("desc", &format_args!("{:#x}", self.desc_gpa))
            .field("avail", &format_args!("{:#x}", self.avail_gpa))
            .field("used", &format_args!("{:#x}", self.used_gpa))
            .field("next_avail", &self.next_avail())
            .field("next_used", &self.next_used())
            .field("event_idx", &self.event_idx)
            .finish()
    }
}

struct Areas {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    used_region: u32,
}

fn translate_areas<M: GuestMemoryBackend>(
    ram: &GuestRam<M>,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Result<Areas> {
    let n = usize::from(size);
    let check = |area: &'static str, addr: u64, align: u64, len: usize| {
        if addr % align != 0 {
            return Err(Error::Misaligned { area, addr, align });
        }
        ram.translate(addr, len)
            .ok_or(Error::OutsideMemory { area, addr, len })
    };
    // With or without EVENT_IDX the trailing event fields are included: the
    // driver lays the rings out with room for them either way.
    let d = check("descriptor table", desc, 16, 16 * n)?;
    let a = check("available ring", avail, 2, 6 + 2 * n)?;
    let u = check("used ring", used, 4, 6 + 8 * n)?;
    Ok(Areas {
        desc: d.ptr,
        avail: a.ptr,
        used: u.ptr,
        used_region: u.region,
    })
}

impl SplitRing {
    /// Builds a ring from a queue the transport configured, with the ring
    /// features the driver negotiated.
    pub fn new<M: GuestMemoryBackend>(
        queue: &Queue,
        ram: &GuestRam<M>,
        features: RingFeatures,
    ) -> Result<Self> {
        Self::from_state(&queue.state(), ram, features)
    }

    /// Builds a ring from a queue state (its `event_idx_enabled` is ignored in
    /// favour of `features`).
    pub fn from_state<M: GuestMemoryBackend>(
        state: &QueueState,
        ram: &GuestRam<M>,
        features: RingFeatures,
    ) -> Result<Self> {
        if !state.ready {
            return Err(Error::NotReady);
        }
        let size = state.size;
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(Error::InvalidSize(size));
        }
        let areas = translate_areas(
            ram,
            size,
            state.desc_table,
            state.avail_ring,
            state.used_ring,
        )?;
        Ok(SplitRing {
            size,
            max_size: state.max_size,
            desc_gpa: state.desc_table,
            avail_gpa: state.avail_ring,
            used_gpa: state.used_ring,
            desc: areas.desc,
            avail: areas.avail,
            used: areas.used,
            used_region: areas.used_region,
            next_avail: u32::from(state.next_avail),
            next_used: u32::from(state.next_used),
            event_idx: features.event_idx,
            indirect: features.indirect,
            in_order: features.in_order,
            hold_kicks: false,
            used_flags: None,
        })
    }

    /// Re-translates the ring areas against a new view of guest memory (after the
    /// VMM changed the memory map). Fails if the rings are no longer guest memory.
    pub fn retranslate<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>) -> Result<()> {
        let areas = translate_areas(ram, self.size, self.desc_gpa, self.avail_gpa, self.used_gpa)?;
        self.desc = areas.desc;
        self.avail = areas.avail;
        self.used = areas.used;
        self.used_region = areas.used_region;
        Ok(())
    }

    /// The queue's state, for snapshots. `rewind` buffers that were taken from
    /// the available ring but not used are given back (the restored device will
    /// take them again).
    pub fn state(&self, rewind: u16) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail().wrapping_sub(rewind),
            next_used: self.next_used(),
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: true,
            desc_table: self.desc_gpa,
            avail_ring: self.avail_gpa,
            used_ring: self.used_gpa,
        }
    }

    /// The queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether indirect descriptors were negotiated.
    #[inline]
    pub(crate) fn indirect_enabled(&self) -> bool {
        self.indirect
    }

    /// Whether `VIRTIO_F_IN_ORDER` was negotiated: buffers must then be used in
    /// the order the driver made them available.
    #[inline]
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    /// The next available-ring position the device will read.
    #[inline]
    pub fn next_avail(&self) -> u16 {
        self.next_avail as u16
    }

    /// The next used-ring position the device will write.
    #[inline]
    pub fn next_used(&self) -> u16 {
        self.next_used as u16
    }

    #[inline]
    fn avail_idx(&self) -> u16 {
        // SAFETY: `avail` points to at least 6 + 2*size bytes, 2-aligned; `idx` is
        // at offset 2. The acquire load orders the ring-entry reads after it.
        let idx = unsafe { (*(self.avail.add(2) as *const AtomicU16)).load(Ordering::Acquire) };
        u16::from_le(idx)
    }

    /// How many buffers the driver has made available and the device has not
    /// taken yet.
    ///
    /// Fails with [`Error::AvailIndexRunaway`] if the driver claims more than the
    /// queue holds, counting the buffers the device took and has not used yet:
    /// a driver has one descriptor per entry, so it can never have more
    /// buffers outstanding than the queue size.
    #[inline]
    pub fn available(&self) -> Result<u16> {
        let pending = self.avail_idx().wrapping_sub(self.next_avail());
        let held = self.next_avail().wrapping_sub(self.next_used());
        if u32::from(pending) + u32::from(held) > u32::from(self.size) {
            return Err(Error::AvailIndexRunaway {
                pending,
                held,
                size: self.size,
            });
        }
        Ok(pending)
    }

    /// Takes the next available head index. The caller has checked with
    /// [`available`](Self::available) that one is there. A head outside the
    /// descriptor table is [`Error::InvalidHead`].
    #[inline]
    pub fn pop_head(&mut self) -> Result<u16> {
        let slot = usize::from(self.next_avail() & (self.size - 1));
        // SAFETY: slot < size, and the avail ring holds 2*size bytes of entries at
        // offset 4, 2-aligned.
        let head =
            u16::from_le(unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16) });
        self.next_avail = u32::from(self.next_avail().wrapping_add(1));
        if head >= self.size {
            return Err(Error::InvalidHead {
                head,
                size: self.size,
            });
        }
        Ok(head)
    }

    /// The head `ahead` places after the next available one, without taking it,
    /// for prefetching. The caller has checked with [`available`](Self::available)
    /// that more than `ahead` are there. The value is only a hint: the caller
    /// must not rely on it being in range.
    #[inline]
    pub fn peek_head(&self, ahead: u16) -> u16 {
        let slot = usize::from(self.next_avail().wrapping_add(ahead) & (self.size - 1));
        // SAFETY: slot < size, as in `pop_head`.
        u16::from_le(unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16) })
    }

    /// Gives back the last `n` heads taken and not used (a backend could not
    /// take the frame after all).
    #[inline]
    pub fn unpop(&mut self, n: u16) {
        self.next_avail = u32::from(self.next_avail().wrapping_sub(n));
    }

    /// Reads descriptor `index` of the descriptor table. `index` must be below
    /// the queue size.
    #[inline]
    pub(crate) fn descriptor(&self, index: u16) -> Descriptor {
        let i = usize::from(index & (self.size - 1));
        // SAFETY: i < size; the table holds 16*size bytes and is 16-aligned.
        unsafe { Descriptor::read(self.desc.add(16 * i)) }
    }

    /// Writes a used element without publishing it.
    #[inline]
    pub fn push_used(&mut self, id: u16, len: u32) {
        let slot = usize::from(self.next_used() & (self.size - 1));
        // SAFETY: slot < size; used elements are 8 bytes at offset 4 of an area of
        // 6 + 8*size bytes, 4-aligned, so two aligned u32 stores fit.
        unsafe {
            let p = self.used.add(4 + 8 * slot);
            ptr::write_volatile(p as *mut u32, u32::from(id).to_le());
            ptr::write_volatile(p.add(4) as *mut u32, len.to_le());
        }
        self.next_used = u32::from(self.next_used().wrapping_add(1));
    }

    /// Publishes every pushed used element to the driver (one release store of the
    /// used index) and logs what changed as dirty. `old` is the used index before
    /// the batch (what [`next_used`](Self::next_used) returned when it started).
    #[inline]
    pub fn publish_used<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>, old: u16) {
        // SAFETY: `used` points to 6 + 8*size bytes, 4-aligned; `idx` is at 2.
        unsafe {
            (*(self.used.add(2) as *const AtomicU16))
                .store(self.next_used().to_le(), Ordering::Release);
        }
        let count = usize::from(self.next_used().wrapping_sub(old)).min(usize::from(self.size));
        if count > 0 {
            // Dirty-log the elements written and the index; on wrap-around log the
            // whole ring rather than two pieces.
            let first = usize::from(old & (self.size - 1));
            if first + count <= usize::from(self.size) {
                // SAFETY: within the used area, as above.
                let p = unsafe { self.used.add(4 + 8 * first) };
                ram.mark_dirty(self.used_region, p, 8 * count);
            } else {
                ram.mark_dirty(self.used_region, self.used, 4 + 8 * usize::from(self.size));
            }
            ram.mark_dirty(self.used_region, self.used, 4);
        }
    }

    /// Whether the driver wants an interrupt for the used elements published since
    /// the used index was `old` (EVENT_IDX: `used_event` fell in the window;
    /// otherwise: the driver did not set `VRING_AVAIL_F_NO_INTERRUPT`).
    #[inline]
    pub fn needs_interrupt(&self, old: u16) -> bool {
        // The used-index store must be visible before we read the driver's
        // suppression fields (the driver orders the other way round).
        fence(Ordering::SeqCst);
        let new = self.next_used();
        if self.event_idx {
            // SAFETY: used_event sits right after the 2*size entry bytes of the
            // avail ring, inside the translated area of 6 + 2*size bytes.
            let used_event = u16::from_le(unsafe {
                ptr::read_volatile(self.avail.add(4 + 2 * usize::from(self.size)) as *const u16)
            });
            new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: `flags` is the first field of the avail ring.
            let flags = u16::from_le(unsafe { ptr::read_volatile(self.avail as *const u16) });
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0 && new != old
        }
    }

    /// Asks the driver not to kick while the device is busy with the queue
    /// (without EVENT_IDX; with EVENT_IDX the driver kicks once per crossing of
    /// `avail_event` anyway, so nothing needs writing).
    #[inline]
    pub fn disable_kicks<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>) {
        if !self.event_idx {
            self.write_used_flags(ram, VRING_USED_F_NO_NOTIFY);
        }
    }

    /// While `on`, [`enable_kicks`](Self::enable_kicks) leaves kicks off: for a
    /// device that polls the ring and would only be slowed by the driver's
    /// kicks. Turn it off (and process once more) before going back to sleep.
    #[inline]
    pub fn hold_kicks(&mut self, on: bool) {
        self.hold_kicks = on;
    }

    /// Asks the driver to kick when it makes the next buffer available, then
    /// checks whether one arrived meanwhile. Returns true if buffers are
    /// available (the caller should process again rather than sleep). While
    /// kicks are [held](Self::hold_kicks) it writes nothing and returns false.
    #[inline]
    pub fn enable_kicks<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>) -> Result<bool> {
        if self.hold_kicks {
            return Ok(false);
        }
        if self.event_idx {
            // SAFETY: avail_event sits after the 8*size entry bytes of the used
            // ring, inside the translated area of 6 + 8*size bytes, 2-aligned.
            let p = unsafe { self.used.add(4 + 8 * usize::from(self.size)) };
            // SAFETY: as above.
            unsafe { ptr::write_volatile(p as *mut u16, self.next_avail().to_le()) };
            ram.mark_dirty(self.used_region, p, 2);
        } else {
            self.write_used_flags(ram, 0);
        }
        // Our write must be visible before we re-read the driver's index.
        fence(Ordering::SeqCst);
        Ok(self.available()? > 0)
    }

    #[inline]
    fn write_used_flags<M: GuestMemoryBackend>(&mut self, ram: &GuestRam<M>, flags: u16) {
        if self.used_flags == Some(flags) {
            return;
        }
        self.used_flags = Some(flags);
        // SAFETY: `flags` is the first u16 of the used ring.
        unsafe { ptr::write_volatile(self.used as *mut u16, flags.to_le()) };
        ram.mark_dirty(self.used_region, self.used, 2);
    }

    /// The used index as published in guest memory (for tests and checks).
    pub fn published_used_idx(&self) -> u16 {
        // SAFETY: as in `publish_used`.
        u16::from_le(unsafe { (*(self.used.add(2) as *const AtomicU16)).load(Ordering::Acquire) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DriverQueue, TestMemory};
    use std::sync::Arc;

    fn setup(
        size: u16,
        event_idx: bool,
    ) -> (
        TestMemory,
        DriverQueue,
        SplitRing,
        GuestRam<crate::testing::GuestMem>,
    ) {
        let mem = TestMemory::new(1 << 20);
        let mut dq = DriverQueue::new(&mem, size);
        dq.set_event_idx(event_idx);
        let ram = GuestRam::new(Arc::clone(mem.arc())).unwrap();
        let ring = SplitRing::new(
            &dq.queue(),
            &ram,
            RingFeatures {
                indirect: true,
                event_idx,
                in_order: false,
            },
        )
        .unwrap();
        (mem, dq, ring, ram)
    }

    #[test]
    fn setup_errors() {
        let mem = TestMemory::new(1 << 16);
        let ram = GuestRam::new(Arc::clone(mem.arc())).unwrap();
        let dq = DriverQueue::new(&mem, 8);
        let mut st = dq.queue().state();
        st.ready = false;
        assert_eq!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::NotReady
        );
        st.ready = true;
        st.size = 6;
        assert_eq!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::InvalidSize(6)
        );
        st.size = 8;
        st.desc_table += 8;
        assert!(matches!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::Misaligned {
                area: "descriptor table",
                ..
            }
        ));
        st.desc_table = 1 << 20;
        assert!(matches!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::OutsideMemory {
                area: "descriptor table",
                ..
            }
        ));
        let mut st = dq.queue().state();
        st.used_ring = (1 << 16) - 8;
        assert!(matches!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::OutsideMemory {
                area: "used ring",
                ..
            }
        ));
        let mut st = dq.queue().state();
        st.avail_ring += 1;
        assert!(matches!(
            SplitRing::from_state(&st, &ram, RingFeatures::default()).unwrap_err(),
            Error::Misaligned {
                area: "available ring",
                ..
            }
        ));
    }

    #[test]
    fn pop_push_publish_roundtrip() {
        let (_mem, mut dq, mut ring, ram) = setup(8, false);
        let a = dq.add_readable(&[0x1000], &[16]);
        let b = dq.add_readable(&[0x2000], &[32]);
        dq.publish();
        assert_eq!(ring.available().unwrap(), 2);
        assert_eq!(ring.pop_head().unwrap(), a);
        let d = ring.descriptor(a);
        assert_eq!((d.addr, d.len, d.flags), (0x1000, 16, 0));
        assert_eq!(ring.pop_head().unwrap(), b);
        assert_eq!(ring.available().unwrap(), 0);
        let old = ring.next_used();
        ring.push_used(a, 0);
        ring.push_used(b, 7);
        // Not visible before publication.
        assert_eq!(dq.used_idx(), 0);
        ring.publish_used(&ram, old);
        assert_eq!(dq.pop_used(), Some((a, 0)));
        assert_eq!(dq.pop_used(), Some((b, 7)));
        assert_eq!(dq.pop_used(), None);
        assert!(ring.needs_interrupt(old));
        let st = ring.state(1);
        assert_eq!((st.next_avail, st.next_used), (1, 2));
    }

    #[test]
    fn runaway_avail_index_is_an_error() {
        let (_mem, dq, ring, _ram) = setup(8, false);
        dq.set_avail_idx(9);
        assert_eq!(
            ring.available().unwrap_err(),
            Error::AvailIndexRunaway {
                pending: 9,
                held: 0,
                size: 8
            }
        );
        dq.set_avail_idx(8);
        assert_eq!(ring.available().unwrap(), 8);
    }

    /// The `rx_queue` fuzz finding `rx_queue-in-flight`: on a queue of 1 the
    /// device held the only chain (staged for a frame) when the driver made
    /// the same head available again; the device took it a second time, two
    /// chains in flight on a queue of 1. A driver cannot have more buffers
    /// outstanding than the queue has entries, so that index is a runaway.
    #[test]
    fn buffers_held_by_the_device_count_against_the_queue_size() {
        let (_mem, mut dq, mut ring, ram) = setup(1, false);
        let h = dq.add_writable(&[0x1000], &[1536]);
        dq.publish();
        assert_eq!(ring.available().unwrap(), 1);
        assert_eq!(ring.pop_head().unwrap(), h);
        // The same head again while the device still holds it.
        dq.set_avail_entry(1, h);
        dq.set_avail_idx(2);
        assert_eq!(
            ring.available().unwrap_err(),
            Error::AvailIndexRunaway {
                pending: 1,
                held: 1,
                size: 1
            }
        );
        // Once the device used it, the driver may post it again.
        let old = ring.next_used();
        ring.push_used(h, 0);
        ring.publish_used(&ram, old);
        assert_eq!(ring.available().unwrap(), 1);
        assert_eq!(ring.pop_head().unwrap(), h);

        // A full queue of 8, half held: four more are the most the index may add.
        let (_mem, mut dq, mut ring, _ram) = setup(8, false);
        for i in 0..8 {
            dq.add_readable(&[0x1000 + 0x100 * i], &[16]);
        }
        dq.publish();
        for _ in 0..4 {
            ring.pop_head().unwrap();
        }
        assert_eq!(ring.available().unwrap(), 4);
        dq.set_avail_idx(9);
        assert!(matches!(
            ring.available().unwrap_err(),
            Error::AvailIndexRunaway { held: 4, .. }
        ));
    }

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let (_mem, mut dq, mut ring, ram) = setup(8, false);
        dq.set_no_interrupt(true);
        let h = dq.add_readable(&[0x1000], &[16]);
        dq.publish();
        ring.pop_head().unwrap();
        let old = ring.next_used();
        ring.push_used(h, 0);
        ring.publish_used(&ram, old);
        assert!(!ring.needs_interrupt(old));
        dq.set_no_interrupt(false);
        assert!(ring.needs_interrupt(old));
        // Nothing new published: no interrupt either.
        assert!(!ring.needs_interrupt(ring.next_used()));
    }

    #[test]
    fn event_idx_window() {
        let (_mem, mut dq, mut ring, ram) = setup(8, true);
        for _ in 0..4 {
            dq.add_readable(&[0x1000], &[16]);
        }
        dq.publish();
        // Driver wants an interrupt once used index passes 2 (used_event = 2).
        dq.set_used_event(2);
        let old = ring.next_used();
        for _ in 0..2 {
            let h = ring.pop_head().unwrap();
            ring.push_used(h, 0);
        }
        ring.publish_used(&ram, old);
        // Published 0..2: the entry at index 2 is not there yet.
        assert!(!ring.needs_interrupt(old));
        let old = ring.next_used();
        let h = ring.pop_head().unwrap();
        ring.push_used(h, 0);
        ring.publish_used(&ram, old);
        assert!(ring.needs_interrupt(old));
        // used_event behind the window: no interrupt.
        let old = ring.next_used();
        let h = ring.pop_head().unwrap();
        ring.push_used(h, 0);
        ring.publish_used(&ram, old);
        assert!(!ring.needs_interrupt(old));
    }

    #[test]
    fn kick_suppression() {
        let (_mem, mut dq, mut ring, ram) = setup(8, false);
        ring.disable_kicks(&ram);
        assert_eq!(dq.used_flags(), VRING_USED_F_NO_NOTIFY);
        assert!(!ring.enable_kicks(&ram).unwrap());
        assert_eq!(dq.used_flags(), 0);
        dq.add_readable(&[0x1000], &[16]);
        dq.publish();
        assert!(ring.enable_kicks(&ram).unwrap());

        let (_mem, mut dq, mut ring, ram) = setup(8, true);
        dq.add_readable(&[0x1000], &[16]);
        dq.publish();
        ring.pop_head().unwrap();
        assert!(!ring.enable_kicks(&ram).unwrap());
        assert_eq!(dq.avail_event(), 1);
    }

    #[test]
    fn wraparound_of_indices() {
        let (_mem, mut dq, mut ring, ram) = setup(4, false);
        // Push the free-running indices across the u16 wrap.
        for round in 0..(70_000 / 3) {
            let mut heads = vec![];
            for _ in 0..3 {
                heads.push(dq.add_readable(&[0x1000], &[round as u32 % 100 + 1]));
            }
            dq.publish();
            assert_eq!(ring.available().unwrap(), 3);
            let old = ring.next_used();
            for _ in 0..3 {
                let h = ring.pop_head().unwrap();
                ring.push_used(h, 1);
            }
            ring.publish_used(&ram, old);
            for h in heads {
                assert_eq!(dq.pop_used(), Some((h, 1)));
            }
        }
        // 69,999 buffers went through: both indices wrapped past u16::MAX.
        assert_eq!(ring.next_avail(), (69_999u32 % 65_536) as u16);
        assert_eq!(ring.next_used(), ring.next_avail());
    }
}
