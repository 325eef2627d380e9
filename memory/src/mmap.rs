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

/// A memfd (shmem file) of `len` bytes and a mapping of all of it, shared
/// (writes go to the page cache) or private (copy-on-write over the page
/// cache), for tests and benchmarks of shmem-backed memory. Unmapped on drop;
/// the file lives as long as its `Arc`.
#[derive(Debug)]
pub struct MemfdMapping {
    file: std::sync::Arc<std::fs::File>,
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: as for `AnonMapping`: the pointer is only an address.
unsafe impl Send for MemfdMapping {}
// SAFETY: as above.
unsafe impl Sync for MemfdMapping {}

/// Creates a memfd named `name` of `len` bytes (sparse).
pub fn memfd(name: &str, len: u64) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid C string; memfd_create returns a new descriptor.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

impl MemfdMapping {
    /// A new memfd of `len` bytes (rounded up to pages), mapped shared.
    pub fn new(len: usize) -> io::Result<MemfdMapping> {
        let ps = crate::page_size();
        let len = len.div_ceil(ps).max(1) * ps;
        let file = std::sync::Arc::new(memfd("vmm-memory-test", len as u64)?);
        Self::map(file, len, true)
    }

    /// Maps the first `len` bytes of `file`, `shared` or private.
    pub fn map(file: std::sync::Arc<std::fs::File>, len: usize, shared: bool) -> io::Result<MemfdMapping> {
        use std::os::fd::AsRawFd;
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing of ours.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MemfdMapping { file, addr, len })
    }

    /// The memfd.
    pub fn file(&self) -> &std::sync::Arc<std::fs::File> {
        &self.file
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemfdMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing uses it after drop.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
