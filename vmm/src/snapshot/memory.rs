//! Guest memory in a snapshot: which pages hold data (they exist in this
//! process and are not all zero), as extents with their CRC32, and the sparse
//! memory file, laid out as its [`MemoryLayout`] says (recorded in the
//! manifest): RAM regions packed back to back (what this VMM writes, and
//! what Firecracker's page-fault handlers expect), or indexed by
//! guest-physical address (format 2).

use super::Extent;
use super::{io_err, MemoryEntry, SnapshotError, EXTENT_MAX, MEMORY};
use abi::layout::{ram_ranges, PAGE_LEN as PAGE, PAGE_SIZE};
use devices::GuestRam;
use serde::{Deserialize, Serialize};
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

/// How the memory file places guest RAM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// File offset = guest-physical address: the MMIO hole below 4 GiB is a
    /// hole in the file too (format 2, and `--mem-backend file:PATH`).
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
/// `memory.layout`). Extents stay keyed by guest-physical address whatever
/// the layout; [`MemoryLayout::file_offset`] places them.
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

/// Writes guest memory as a sparse file laid out as `kind` says; returns
/// the manifest entry. Only [`data_extents`] are written; the rest are holes.
pub fn write_memory(
    path: &Path,
    mem: &GuestRam,
    mem_size: u64,
    kind: LayoutKind,
) -> Result<MemoryEntry, SnapshotError> {
    let file = File::create(path).map_err(io_err(path, "creating the memory file"))?;
    let layout = MemoryLayout::new(kind, mem_size);
    let len = layout.file_len();
    file.set_len(len)
        .map_err(io_err(path, "sizing the memory file"))?;
    let extents = data_extents(mem)?;
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for e in &extents {
        let data = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
        mem.read_slice(data, vm_memory::GuestAddress(e.gpa))
            .map_err(|source| SnapshotError::ReadMemory { gpa: e.gpa, source })?;
        let at = layout.file_offset(e.gpa, e.len).ok_or_else(|| {
            io_err(path, "placing an extent in the memory file")(std::io::Error::other(format!(
                "extent {:#x}+{:#x} lies outside guest RAM",
                e.gpa, e.len
            )))
        })?;
        file.write_all_at(data, at)
            .map_err(io_err(path, "writing the memory file"))?;
    }
    file.sync_all().map_err(io_err(path, "syncing the memory file"))?;
    Ok(MemoryEntry {
        name: MEMORY.into(),
        len,
        mem_size,
        layout: Some(layout),
        extents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    impl MemoryLayout {
        fn with_kind(mut self, kind: LayoutKind) -> MemoryLayout {
            self.kind = kind;
            self
        }
    }
}
