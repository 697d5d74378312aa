//! The selector's `CONTROL` array, mapped so the generation flip is one atomic
//! 8-byte store.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// The selector's `CONTROL` words, mapped into our memory.
///
/// The map is created with `BPF_F_MMAPABLE`, so its 8-byte values live in a page
/// the kernel lets us map shared. A store here is one aligned 8-byte atomic
/// store: the selector, which loads the word with one 8-byte load, sees the old
/// value or the new one, never a mix. (A `bpf_map_update_elem` copies the value
/// with memcpy, which promises no such thing.)
pub struct ControlWord {
    ptr: NonNull<AtomicU64>,
    len: usize,
    entries: usize,
}

// SAFETY: the mapping is process-wide shared memory accessed only atomically.
unsafe impl Send for ControlWord {}
// SAFETY: as for Send: every access is an atomic load or store of an AtomicU64.
unsafe impl Sync for ControlWord {}

impl ControlWord {
    /// Maps an mmapable array map of `entries` `u64` values (at most a page).
    pub fn map(map_fd: BorrowedFd<'_>, entries: usize) -> io::Result<ControlWord> {
        // SAFETY: sysconf has no memory effects.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert!(entries * 8 <= len, "control array larger than a page");
        // SAFETY: a fresh shared mapping of an fd we borrow; the kernel keeps the
        // map alive while the mapping exists, independent of the fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map_fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Element i of an array map with 8-byte values is at offset 8 * i of the
        // page-aligned mapping, so every AtomicU64 is aligned.
        let ptr =
            NonNull::new(ptr.cast::<AtomicU64>()).expect("mmap returned NULL without failing");
        Ok(ControlWord { ptr, len, entries })
    }

    fn word(&self, index: u32) -> &AtomicU64 {
        let index = index as usize;
        assert!(index < self.entries, "control index {index} out of range");
        // SAFETY: index < entries and entries * 8 <= len: inside the mapping, which
        // lives as long as self (see map()); aligned as explained there.
        unsafe { &*self.ptr.as_ptr().add(index) }
    }

    pub fn load(&self, index: u32) -> u64 {
        self.word(index).load(Ordering::SeqCst)
    }

    pub fn store(&self, index: u32, word: u64) {
        self.word(index).store(word, Ordering::SeqCst)
    }
}

impl Drop for ControlWord {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in map().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
