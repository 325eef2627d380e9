//! An anonymous private mapping owned by Rust, for tests and benchmarks (the
//! VMM maps guest RAM itself and only hands addresses to the retry core).

use std::io;

/// An anonymous `MAP_PRIVATE | MAP_NORESERVE` mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain process memory; the pointer is only an address
// and access is done through raw pointers whose users uphold their own rules.
unsafe impl Send for AnonMapping {}
// SAFETY: as above; `&AnonMapping` exposes only the address and length.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to pages) of lazily allocated memory.
    pub fn new(len: usize) -> io::Result<AnonMapping> {
        let ps = crate::page_size();
        let len = len.div_ceil(ps).max(1) * ps;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMapping { addr, len })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Start pointer.
    pub fn ptr(&self) -> *mut u8 {
        self.addr.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: at least one page is mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the pages of `[offset, offset+len)` (MADV_DONTNEED); with
    /// userfaultfd EVENT_REMOVE this blocks until the handler reads the event.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside our own mapping; DONTNEED only drops pages.
        let ret = unsafe {
            libc::madvise(
                self.addr.cast::<u8>().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing uses it after drop.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
