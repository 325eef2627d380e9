//! Guest memory in a snapshot: which pages hold data (they exist in this
//! process and are not all zero), as extents keyed by guest-physical
//! address, the sparse memory file laid out as its [`MemoryLayout`] says
//! (recorded in the manifest; this VMM writes the RAM regions packed back to
//! back, what Firecracker's page-fault handlers expect), and the hash of each
//! data block.

use super::format::{Extent, Hasher};
use super::{io_err, SnapshotError, EXTENT_MAX};
use abi::layout::{ram_ranges, PAGE_LEN as PAGE, PAGE_SIZE};
use devices::GuestRam;
use serde::{Deserialize, Serialize};
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

/// How the memory file places guest RAM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// File offset = guest-physical address: the MMIO hole below 4 GiB is a
    /// hole in the file too (the layout of `--mem-backend file:PATH`).
    Gpa,
    /// The RAM regions back to back in guest-physical order, the first at
    /// offset 0: the file is exactly as long as RAM. This is Firecracker's
    /// memory file layout, which its page-fault handlers check (the sum of
    /// the regions' sizes must be the file's length).
    Packed,
}

/// One RAM region and where it lies in the memory file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileRegion {
    /// Guest-physical address of the region's start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of the region's first byte in the memory file.
    pub offset: u64,
}

/// Where each RAM region lies in the memory file (the manifest's
/// `memory.layout`). Extents and hashes stay keyed by guest-physical address
/// whatever the layout; [`MemoryLayout::file_offset`] places them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    /// The rule the offsets follow.
    pub kind: LayoutKind,
    /// The RAM regions, in guest-physical order.
    pub regions: Vec<FileRegion>,
}

impl MemoryLayout {
    /// The layout of `kind` for `mem_size` bytes of RAM.
    pub fn new(kind: LayoutKind, mem_size: u64) -> MemoryLayout {
        let mut next = 0;
        let regions = ram_ranges(mem_size)
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(gpa, len)| {
                let offset = match kind {
                    LayoutKind::Gpa => gpa,
                    LayoutKind::Packed => next,
                };
                next = offset + len;
                FileRegion { gpa, len, offset }
            })
            .collect();
        MemoryLayout { kind, regions }
    }

    /// The memory file's length: one past the last region's last byte.
    pub fn file_len(&self) -> u64 {
        self.regions.iter().map(|r| r.offset + r.len).max().unwrap_or(0)
    }

    /// The file offset of `[gpa, gpa + len)`, which must lie inside one region.
    pub fn file_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)?;
        let end = gpa.checked_add(len)?;
        (end <= r.gpa + r.len).then(|| r.offset + (gpa - r.gpa))
    }

    /// The file offset of the region starting at `gpa`.
    pub fn region_offset(&self, gpa: u64) -> Option<u64> {
        self.regions.iter().find(|r| r.gpa == gpa).map(|r| r.offset)
    }

    /// Whether this layout is the one of its kind for `mem_size` bytes of RAM
    /// (a manifest's layout is checked against it before anything is read).
    pub fn fits(&self, mem_size: u64) -> bool {
        *self == MemoryLayout::new(self.kind, mem_size)
    }
}

/// The guest-physical extents of `mem` that hold data: pages that exist in
/// the host mapping and are not all zero (everything else reads as zero).
/// Pages not yet fetched by a lazy source do not exist: fetch them first.
/// The vCPUs (and devices) must be paused.
pub fn data_extents(mem: &GuestRam) -> Result<Vec<Extent>, SnapshotError> {
    let pagemap = Pagemap::open().map_err(io_err(Path::new("/proc/self/pagemap"), "opening"))?;
    data_extents_in(&pagemap, mem)
}

/// [`data_extents`] from an open page map (a sandboxed migration thread
/// opens no file: its starter opens the map).
pub fn data_extents_in(pagemap: &Pagemap, mem: &GuestRam) -> Result<Vec<Extent>, SnapshotError> {
    let pagemap_path = Path::new("/proc/self/pagemap");
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

/// Writes the data extents of `mem` into the sparse memory file `path`,
/// laid out as `layout`, and returns the block hashes, one per data block in
/// ascending order.
pub(super) fn write_memory(
    path: &Path,
    mem: &GuestRam,
    layout: &MemoryLayout,
    extents: &[Extent],
    h: &Hasher,
) -> Result<Vec<u8>, SnapshotError> {
    let file = create_file(path)?;
    file.set_len(layout.file_len())
        .map_err(io_err(path, "sizing the memory file"))?;
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for e in extents {
        let data = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
        mem.read_slice(data, vm_memory::GuestAddress(e.gpa))
            .map_err(|source| SnapshotError::ReadMemory { gpa: e.gpa, source })?;
        let at = layout
            .file_offset(e.gpa, e.len)
            .ok_or_else(|| outside_ram(path, e.gpa, e.len))?;
        file.write_all_at(data, at)
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

fn outside_ram(path: &Path, gpa: u64, len: u64) -> SnapshotError {
    io_err(path, "placing an extent in the memory file")(std::io::Error::other(format!(
        "extent {gpa:#x}+{len:#x} lies outside guest RAM"
    )))
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
    layout: MemoryLayout,
    extents: Vec<Extent>,
    blocks: Vec<u64>,
    hashes: Vec<u8>,
}

impl PageHashes {
    /// Hashes `hashes` (32 bytes per data block of `extents`, ascending)
    /// checked by `h`, of a memory file laid out as `layout` (every extent
    /// inside one of its regions: checked by `Snapshot::open`).
    pub fn new(extents: &[Extent], hashes: Vec<u8>, h: Hasher, layout: MemoryLayout) -> PageHashes {
        PageHashes {
            hasher: h,
            layout,
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
        self.check_block(gpa, block, |dst, off| file.read_exact_at(dst, off))
    }

    /// [`PageHashes::read_checked`] with the memory file read by
    /// `read_at(buf, offset)` (fills `buf` from the file at `offset`): the
    /// block's data pages placed by the layout, zero elsewhere, and its
    /// hash. `fuzz/`'s `snapshot_integrity` target reads a file in memory.
    pub fn check_block(
        &self,
        gpa: u64,
        block: &mut [u8],
        mut read_at: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        fill_block(&self.extents, gpa, block, |at, dst| {
            let off = self.layout.file_offset(at, dst.len() as u64).ok_or_else(|| {
                std::io::Error::other(format!("guest page {at:#x} has no place in the memory file"))
            })?;
            read_at(dst, off)
        })?;
        let Ok(i) = self.blocks.binary_search(&gpa) else {
            return Ok(false);
        };
        let Some(want) = self.hashes.get(i * 32..i * 32 + 32) else {
            return Ok(false);
        };
        Ok(self.hasher.hash(block) == *want)
    }

    /// The memory file's layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The guest-physical ranges `(gpa, len)` that hold data.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.extents.iter().map(|e| (e.gpa, e.len)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MemoryLayout {
        fn with_kind(mut self, kind: LayoutKind) -> MemoryLayout {
            self.kind = kind;
            self
        }
    }

    #[test]
    fn packed_regions_follow_each_other_and_gpa_regions_keep_the_hole() {
        let small = MemoryLayout::new(LayoutKind::Packed, 256 << 20);
        assert_eq!(
            small,
            MemoryLayout::new(LayoutKind::Gpa, 256 << 20).with_kind(LayoutKind::Packed)
        );
        assert_eq!(small.file_len(), 256 << 20);
        let six = 6u64 << 30;
        let packed = MemoryLayout::new(LayoutKind::Packed, six);
        let gpa = MemoryLayout::new(LayoutKind::Gpa, six);
        assert_eq!(
            packed.regions,
            vec![
                FileRegion {
                    gpa: 0,
                    len: 3 << 30,
                    offset: 0
                },
                FileRegion {
                    gpa: 4 << 30,
                    len: 3 << 30,
                    offset: 3 << 30
                },
            ]
        );
        assert_eq!(
            packed.file_len(),
            six,
            "Firecracker's check: the sizes add up to the file"
        );
        assert_eq!(gpa.file_len(), 7 << 30);
        assert_eq!(
            packed.file_offset((4 << 30) + 0x5000, 0x1000),
            Some((3 << 30) + 0x5000)
        );
        assert_eq!(
            gpa.file_offset((4 << 30) + 0x5000, 0x1000),
            Some((4 << 30) + 0x5000)
        );
        // Inside the hole, or across a region's end: nowhere.
        assert_eq!(packed.file_offset(3 << 30, 0x1000), None);
        assert_eq!(packed.file_offset((3 << 30) - 0x1000, 0x2000), None);
        assert_eq!(packed.file_offset(u64::MAX - 10, 20), None);
        assert!(packed.fits(six) && !packed.fits(5 << 30) && !gpa.with_kind(LayoutKind::Packed).fits(six));
    }
}
