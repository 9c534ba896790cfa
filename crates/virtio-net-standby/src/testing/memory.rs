//! Guest memory for tests: [`GuestMem`], the memory type, and [`TestMemory`], one
//! mmap region with a dirty bitmap and a bump allocator.

use std::sync::{Arc, Mutex};

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// The guest memory type of the test helpers: mmap-backed, with a dirty bitmap
/// (as a VMM that migrates uses), so tests also check the dirty log.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest memory for tests: one mmap region at guest address 0 and a bump
/// allocator that hands out the upper half (the lower half is free for tests
/// that place buffers at fixed addresses).
#[derive(Clone)]
pub struct TestMemory {
    mem: Arc<GuestMem>,
    next: Arc<Mutex<u64>>,
    size: u64,
}

impl std::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestMemory({:#x} bytes)", self.size)
    }
}

impl TestMemory {
    /// `size` bytes of guest memory.
    pub fn new(size: u64) -> Self {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), size as usize)]).expect("mmap guest memory");
        TestMemory {
            mem: Arc::new(mem),
            next: Arc::new(Mutex::new(size / 2)),
            size,
        }
    }

    /// The memory map.
    pub fn arc(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// An atomic handle to the memory map, as a device's `activate` wants it.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestMem> {
        GuestMemoryAtomic::from(Arc::clone(&self.mem))
    }

    /// Whether the page holding `gpa` is marked dirty.
    pub fn dirty(&self, gpa: u64) -> bool {
        self.mem
            .iter()
            .next()
            .is_some_and(|r| r.bitmap().dirty_at(gpa as usize))
    }

    /// Clears the dirty log.
    pub fn clear_dirty(&self) {
        for r in self.mem.iter() {
            // The mapping's own bitmap (not the trait's slice view).
            vm_memory::MmapRegion::bitmap(r).reset();
        }
    }

    /// Allocates `len` bytes aligned to `align` from the upper half.
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        let mut next = self.next.lock().expect("allocator lock");
        let at = next.div_ceil(align) * align;
        assert!(at + len <= self.size, "test memory exhausted");
        *next = at + len;
        at
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("write guest memory");
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("read guest memory");
        v
    }

    /// Writes a raw descriptor at `gpa` (for building indirect tables by hand).
    pub fn write_descriptor(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(gpa, &d);
    }

    pub(super) fn u16_at(&self, gpa: u64) -> u16 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read u16")
    }

    pub(super) fn set_u16(&self, gpa: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(gpa)).expect("write u16");
    }

    pub(super) fn u32_at(&self, gpa: u64) -> u32 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read u32")
    }
}
