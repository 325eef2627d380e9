//! What memory guest RAM lives in ([`MemBacking`]): private anonymous
//! memory, a shared mapping of a memfd (shmem: guest RAM is the memfd's page
//! cache, so faults can be served in MINOR mode), or hugetlbfs huge pages
//! (an `MFD_HUGETLB` memfd). See `docs/memory-backings.md`.
//!
//! A memfd is laid out by guest-physical address: RAM at guest address `a`
//! is file offset `a` (the MMIO gap is a hole that costs nothing). Its size
//! is sealed (`F_SEAL_GROW | F_SEAL_SHRINK`), so nothing can truncate guest
//! RAM under the VM (a truncated shmem mapping raises SIGBUS).

use crate::config::{HugePageSize, MemBacking};
use abi::layout::ram_ranges;
use devices::GuestRam;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

/// Errors creating the backing of guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// memfd_create failed.
    #[error("cannot create the memfd for guest RAM (--mem-backing {backing}): {source}")]
    Create {
        /// The backing.
        backing: MemBacking,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memfd cannot get its size, or cannot be sealed.
    #[error("cannot size the memfd of guest RAM to {size} bytes (--mem-backing {backing}): {source}; the memfd may be sealed already or the size exceeds the tmpfs limit")]
    Size {
        /// The backing.
        backing: MemBacking,
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory size is not a multiple of the huge page size.
    #[error("guest memory of {mem_size} bytes is not a multiple of the {page} MiB huge page: use a --mem that is a multiple of {page} MiB with --mem-backing {backing}", page = page_size >> 20)]
    HugeAlignment {
        /// The backing.
        backing: MemBacking,
        /// Guest RAM bytes.
        mem_size: u64,
        /// Huge page bytes.
        page_size: u64,
    },
    /// Not enough huge pages are reserved.
    #[error("{needed} free huge pages of {page} kB are needed for {mem_size} bytes of guest RAM but only {free} are free: reserve them as root with `echo {want} > /sys/kernel/mm/hugepages/hugepages-{page}kB/nr_hugepages` (or use --mem-backing memfd)", page = page_size >> 10, want = total + needed - free)]
    NoHugePages {
        /// Guest RAM bytes.
        mem_size: u64,
        /// Huge page bytes.
        page_size: u64,
        /// Pages needed.
        needed: u64,
        /// Pages free now.
        free: u64,
        /// Pages reserved in all.
        total: u64,
    },
    /// mmap failed.
    #[error(
        "cannot map {size} bytes of guest RAM at guest address {gpa:#x} (--mem-backing {backing}): {reason}"
    )]
    Map {
        /// The backing.
        backing: MemBacking,
        /// Guest-physical base.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Guest RAM and the file behind it (memfd and hugetlb backings).
#[derive(Debug)]
pub struct BackedRam {
    /// The mappings.
    pub ram: GuestRam,
    /// The memfd, laid out by guest-physical address.
    pub file: Option<Arc<File>>,
}

/// The huge-page pool's counters for `size`: (total, free), if it exists.
pub fn huge_pool(size: HugePageSize) -> Option<(u64, u64)> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", size.bytes() >> 10);
    let read = |f: &str| {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    Some((read("nr_hugepages")?, read("free_hugepages")?))
}

/// A new memfd for `backing`, sized to `size` and size-sealed.
fn memfd(backing: MemBacking, size: u64) -> Result<File, BackingError> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if let MemBacking::Hugetlb(h) = backing {
        flags |= libc::MFD_HUGETLB
            | match h {
                HugePageSize::Size2M => libc::MFD_HUGE_2MB,
                HugePageSize::Size1G => libc::MFD_HUGE_1GB,
            };
    }
    let name = c"vmm-guest-ram";
    // SAFETY: `name` is a valid C string; memfd_create returns a new descriptor.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(BackingError::Create {
            backing,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let size_err = |source| BackingError::Size {
        backing,
        size,
        source,
    };
    file.set_len(size).map_err(size_err)?;
    // SAFETY: F_ADD_SEALS on our own memfd takes an integer argument.
    let ret = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if ret < 0 {
        return Err(size_err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Maps `mem_size` bytes of guest RAM laid out by [`ram_ranges`] in `backing`.
/// Anonymous RAM is left to [`super::ram::create_guest_memory`].
pub fn create(mem_size: u64, backing: MemBacking) -> Result<BackedRam, BackingError> {
    if let MemBacking::Hugetlb(h) = backing {
        let page_size = h.bytes();
        if mem_size % page_size != 0 {
            return Err(BackingError::HugeAlignment {
                backing,
                mem_size,
                page_size,
            });
        }
        let needed = mem_size / page_size;
        let (total, free) = huge_pool(h).unwrap_or((0, 0));
        if free < needed {
            return Err(BackingError::NoHugePages {
                mem_size,
                page_size,
                needed,
                free,
                total,
            });
        }
    }
    let file = Arc::new(memfd(backing, file_len(mem_size))?);
    let ram = map_file(&file, mem_size, true, backing)?;
    Ok(BackedRam {
        ram,
        file: Some(file),
    })
}

/// The length of a file holding `mem_size` bytes of RAM by guest-physical
/// address (the end of the last region).
pub fn file_len(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .into_iter()
        .rfind(|&(_, l)| l > 0)
        .map_or(0, |(a, l)| a + l)
}

/// Maps the RAM regions of `mem_size` bytes from `file` (guest address `a`
/// at file offset `a`), `shared` (writes reach the file) or private
/// (copy-on-write over its page cache: a clone).
pub fn map_file(
    file: &Arc<File>,
    mem_size: u64,
    shared: bool,
    backing: MemBacking,
) -> Result<GuestRam, BackingError> {
    let ranges: Vec<(u64, u64)> = ram_ranges(mem_size).into_iter().filter(|&(_, l)| l > 0).collect();
    let mut regions = Vec::new();
    for (gpa, len) in ranges {
        let map_err = |reason: String| BackingError::Map {
            backing,
            gpa,
            size: len,
            reason,
        };
        let size = usize::try_from(len).map_err(|e| map_err(e.to_string()))?;
        // A hugetlbfs memfd maps huge pages by itself.
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } | libc::MAP_NORESERVE;
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), gpa)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or_else(|| map_err("overflows".into()))?,
        );
    }
    GuestRam::from_regions(regions).map_err(|e| BackingError::Map {
        backing,
        gpa: 0,
        size: mem_size,
        reason: e.to_string(),
    })
}

/// How the pages of guest RAM are shared, from `/proc/self/pagemap`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PageSharing {
    /// Pages mapped from a page cache (a clone's shared snapshot pages, or
    /// a memfd's pages).
    pub shared_pages: u64,
    /// Anonymous pages this mapping alone holds (a clone's copies of the
    /// pages it wrote; all touched pages of anonymous RAM).
    pub private_pages: u64,
    /// Pages mapped to the kernel's zero page (cost nothing).
    pub zero_pages: u64,
}

/// Counts [`PageSharing`] over `ram`.
pub fn page_sharing(ram: &GuestRam) -> std::io::Result<PageSharing> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut out = PageSharing::default();
    let mut buf = vec![0u8; 8 * 8192];
    for r in ram.iter() {
        let first = r.as_ptr() as u64 / 4096;
        let pages = r.len() / 4096;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(8192);
            let bytes = &mut buf[..usize::try_from(n * 8).unwrap_or(0)];
            pagemap.read_exact_at(bytes, (first + done) * 8)?;
            for e in bytes.chunks_exact(8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let v = u64::from_le_bytes(w);
                // Bit 63 present, 61 file page or shared anonymous, 56 mapped once.
                if v & (1 << 63) == 0 {
                    continue;
                }
                if v & (1 << 61) != 0 {
                    out.shared_pages += 1;
                } else if v & (1 << 56) != 0 {
                    out.private_pages += 1;
                } else {
                    out.zero_pages += 1;
                }
            }
            done += n;
        }
    }
    Ok(out)
}
