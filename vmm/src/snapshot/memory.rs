//! Guest memory in a snapshot: which pages hold data (they exist in this
//! process and are not all zero), as extents with their CRC32, and the sparse
//! memory file indexed by guest-physical address.

use super::Extent;
use super::{io_err, MemoryEntry, SnapshotError, EXTENT_MAX, MEMORY};
use abi::layout::{ram_ranges, PAGE_LEN as PAGE, PAGE_SIZE};
use devices::GuestRam;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_core::memory::pages::Pagemap;

/// One past the last byte of guest RAM (the memory file's length).
pub fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .iter()
        .filter(|&&(_, l)| l > 0)
        .map(|&(s, l)| s + l)
        .max()
        .unwrap_or(0)
}

/// The guest-physical extents of `mem` that hold data, each with its CRC32:
/// pages that exist in the host mapping and are not all zero (everything
/// else reads as zero). Pages not yet fetched by a lazy source do not exist:
/// call `LazyMemory`'s materializer first. The vCPUs must be paused.
pub fn data_extents(mem: &GuestRam) -> Result<Vec<Extent>, SnapshotError> {
    let pagemap_path = Path::new("/proc/self/pagemap");
    let pagemap = Pagemap::open().map_err(io_err(pagemap_path, "opening"))?;
    let mut extents: Vec<Extent> = Vec::new();
    for r in mem.iter() {
        let host = r.as_ptr() as u64;
        let gpa0 = r.start_addr().raw_value();
        let size = r.len();
        let exists = pagemap
            .existing(host, size)
            .map_err(io_err(pagemap_path, "reading"))?;
        // SAFETY: `host..host + size` is the region's live mapping (kept by `mem`);
        // the vCPUs are paused, so nothing writes it while we read; only pages that
        // exist are read, so no read faults into a userfault handler.
        let bytes =
            unsafe { std::slice::from_raw_parts(host as *const u8, usize::try_from(size).unwrap_or(0)) };
        let first = extents.len();
        for (i, _) in exists.iter().enumerate().filter(|(_, e)| **e) {
            let off = i * PAGE;
            let page = &bytes[off..off + PAGE];
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let gpa = gpa0 + off as u64;
            match extents.last_mut() {
                Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += PAGE_SIZE,
                _ => extents.push(Extent {
                    gpa,
                    len: PAGE_SIZE,
                    crc32: 0,
                }),
            }
        }
        for e in &mut extents[first..] {
            let off = usize::try_from(e.gpa - gpa0).unwrap_or(0);
            e.crc32 = crc32fast::hash(&bytes[off..off + usize::try_from(e.len).unwrap_or(0)]);
        }
    }
    Ok(extents)
}

/// Writes guest memory as a sparse file; returns the manifest entry.
/// Only [`data_extents`] are written; the rest are holes.
pub fn write_memory(path: &Path, mem: &GuestRam, mem_size: u64) -> Result<MemoryEntry, SnapshotError> {
    let file = File::create(path).map_err(io_err(path, "creating the memory file"))?;
    let len = ram_end(mem_size);
    file.set_len(len)
        .map_err(io_err(path, "sizing the memory file"))?;
    let extents = data_extents(mem)?;
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for e in &extents {
        let data = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
        mem.read_slice(data, vm_memory::GuestAddress(e.gpa))
            .map_err(|source| SnapshotError::ReadMemory { gpa: e.gpa, source })?;
        file.write_all_at(data, e.gpa)
            .map_err(io_err(path, "writing the memory file"))?;
    }
    file.sync_all().map_err(io_err(path, "syncing the memory file"))?;
    Ok(MemoryEntry {
        name: MEMORY.into(),
        len,
        mem_size,
        extents,
    })
}
