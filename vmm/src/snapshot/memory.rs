//! Guest memory in a snapshot: which pages hold data (they exist in this
//! process and are not all zero), as extents, the sparse memory file indexed
//! by guest-physical address, and the hash of each data page.

use super::format::{Extent, Hasher};
use super::{io_err, SnapshotError, EXTENT_MAX};
use abi::layout::{ram_ranges, PAGE_LEN as PAGE, PAGE_SIZE};
use devices::GuestRam;
use std::fs::File;
use std::io::Write;
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

/// The guest-physical extents of `mem` that hold data: pages that exist in
/// the host mapping and are not all zero (everything else reads as zero).
/// Pages not yet fetched by a lazy source do not exist: fetch them first.
/// The vCPUs (and devices) must be paused.
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
        for (i, _) in exists.iter().enumerate().filter(|(_, e)| **e) {
            let off = i * PAGE;
            if bytes[off..off + PAGE].iter().all(|&b| b == 0) {
                continue;
            }
            let gpa = gpa0 + off as u64;
            match extents.last_mut() {
                Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += PAGE_SIZE,
                _ => extents.push(Extent { gpa, len: PAGE_SIZE }),
            }
        }
    }
    Ok(extents)
}

/// Creates a snapshot file: new (never through an existing path or link),
/// owner-only.
pub(super) fn create_file(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path, "creating"))
}

/// The unit of page hashing: 16 KiB (four pages), aligned. One hash per
/// block that holds data; a block's content is its pages as the guest sees
/// them (pages outside the data extents are zero). BLAKE3 hashes 16 KiB at
/// about the cost of 4 KiB (measured here: 2.8 us against 2.4 us), so a
/// one-page fault pays about one page's hash and a fault-around window a
/// quarter of a hash per page.
pub const HASH_BLOCK: u64 = 16 << 10;
/// [`HASH_BLOCK`] as a `usize`.
pub const HASH_BLOCK_LEN: usize = 16 << 10;

/// The blocks (their guest-physical addresses) that hold data, ascending.
pub fn data_blocks(extents: &[Extent]) -> Vec<u64> {
    let mut blocks: Vec<u64> = Vec::new();
    for e in extents {
        let mut b = e.gpa & !(HASH_BLOCK - 1);
        while b < e.end() {
            if blocks.last() != Some(&b) {
                blocks.push(b);
            }
            b += HASH_BLOCK;
        }
    }
    blocks
}

/// Fills `block` (one [`HASH_BLOCK`] at `gpa`) with its content: the pages
/// `extents` lists from `read`, zero elsewhere.
fn fill_block<E>(
    extents: &[Extent],
    gpa: u64,
    block: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    block.fill(0);
    let end = gpa + HASH_BLOCK;
    let first = extents.partition_point(|e| e.end() <= gpa);
    for e in extents[first..].iter().take_while(|e| e.gpa < end) {
        let lo = e.gpa.max(gpa);
        let hi = e.end().min(end);
        let (a, b) = (
            usize::try_from(lo - gpa).unwrap_or(0),
            usize::try_from(hi - gpa).unwrap_or(0),
        );
        read(lo, &mut block[a..b])?;
    }
    Ok(())
}

/// Writes the data extents of `mem` into the sparse memory file `path` and
/// returns the block hashes, one per data block in ascending order.
pub(super) fn write_memory(
    path: &Path,
    mem: &GuestRam,
    mem_size: u64,
    extents: &[Extent],
    h: &Hasher,
) -> Result<Vec<u8>, SnapshotError> {
    let file = create_file(path)?;
    file.set_len(ram_end(mem_size))
        .map_err(io_err(path, "sizing the memory file"))?;
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for e in extents {
        let data = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
        mem.read_slice(data, vm_memory::GuestAddress(e.gpa))
            .map_err(|source| SnapshotError::ReadMemory { gpa: e.gpa, source })?;
        file.write_all_at(data, e.gpa)
            .map_err(io_err(path, "writing the memory file"))?;
    }
    let blocks = data_blocks(extents);
    let mut hashes = Vec::with_capacity(blocks.len() * 32);
    let mut block = vec![0u8; HASH_BLOCK_LEN];
    for &b in &blocks {
        fill_block(extents, b, &mut block, |gpa, dst| {
            mem.read_slice(dst, vm_memory::GuestAddress(gpa))
                .map_err(|source| SnapshotError::ReadMemory { gpa, source })
        })?;
        hashes.extend_from_slice(&h.hash(&block));
    }
    file.sync_all().map_err(io_err(path, "syncing the memory file"))?;
    Ok(hashes)
}

/// Writes the block hashes file.
pub(super) fn write_hashes(path: &Path, hashes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = create_file(path)?;
    f.write_all(hashes).map_err(io_err(path, "writing"))?;
    f.sync_all().map_err(io_err(path, "syncing"))
}

/// The hash of every data block of a snapshot, and the check of the blocks
/// read from its memory file.
#[derive(Debug)]
pub struct PageHashes {
    hasher: Hasher,
    extents: Vec<Extent>,
    blocks: Vec<u64>,
    hashes: Vec<u8>,
}

impl PageHashes {
    /// Hashes `hashes` (32 bytes per data block of `extents`, ascending)
    /// checked by `h`.
    pub fn new(extents: &[Extent], hashes: Vec<u8>, h: Hasher) -> PageHashes {
        PageHashes {
            hasher: h,
            extents: extents.to_vec(),
            blocks: data_blocks(extents),
            hashes,
        }
    }

    /// Number of data blocks (hashes expected).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The extents overlapping `[start, end)`, ascending.
    pub fn overlapping(&self, start: u64, end: u64) -> &[Extent] {
        let first = self.extents.partition_point(|e| e.end() <= start);
        let last = self.extents.partition_point(|e| e.gpa < end);
        &self.extents[first..last.max(first)]
    }

    /// Reads the data block at `gpa` (aligned) from `file` into `block` and
    /// checks it; `false` if it does not match (or is not a data block).
    pub fn read_checked(&self, file: &File, gpa: u64, block: &mut [u8]) -> std::io::Result<bool> {
        fill_block(&self.extents, gpa, block, |at, dst| file.read_exact_at(dst, at))?;
        let Ok(i) = self.blocks.binary_search(&gpa) else {
            return Ok(false);
        };
        let Some(want) = self.hashes.get(i * 32..i * 32 + 32) else {
            return Ok(false);
        };
        Ok(self.hasher.hash(block) == *want)
    }

    /// The guest-physical ranges `(gpa, len)` that hold data.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.extents.iter().map(|e| (e.gpa, e.len)).collect()
    }
}
