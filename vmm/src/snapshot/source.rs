//! The page source of a lazy restore: the snapshot's memory file, served only
//! where the manifest lists data (holes are zero pages, whatever the file
//! holds there), every page checked against its hash each time it is read.
//! A corrupted page fails the fetch: the retry core never maps it, and the
//! VMM pauses the VM with the error.

use super::memory::{PageHashes, HASH_BLOCK, HASH_BLOCK_LEN};
use super::Snapshot;
use ::memory::{FetchOutcome, Notifier, PageSource, SourceError};
use std::fs::File;

use std::path::PathBuf;
use std::sync::Arc;

/// See the module documentation.
#[derive(Debug)]
pub struct SnapshotSource {
    file: File,
    path: PathBuf,
    name: String,
    pages: Arc<PageHashes>,
    notifier: Notifier,
}

impl SnapshotSource {
    /// Opens the memory file of `snap`.
    pub fn open(snap: &Snapshot) -> Result<SnapshotSource, SourceError> {
        Self::with_pages(snap.memory_path(), snap.pages.clone())
    }

    /// Opens memory file `path` whose data pages `pages` describes.
    pub fn with_pages(path: PathBuf, pages: Arc<PageHashes>) -> Result<SnapshotSource, SourceError> {
        let open_err = |e: std::io::Error| SourceError::Open {
            path: path.clone(),
            message: e.to_string(),
        };
        let file = vmm_core::files::open_regular(&path).map_err(open_err)?;
        let notifier = Notifier::new().map_err(open_err)?;
        Ok(SnapshotSource {
            file,
            name: format!("snapshot:{}", path.display()),
            path,
            pages,
            notifier,
        })
    }

    fn io_err(&self, offset: u64, len: usize, e: &std::io::Error) -> SourceError {
        SourceError::Io {
            path: self.path.clone(),
            offset,
            len,
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    fn corrupt(&self, gpa: u64) -> SourceError {
        SourceError::Io {
            path: self.path.clone(),
            offset: gpa,
            len: HASH_BLOCK_LEN,
            errno: None,
            message: format!(
                "guest pages {gpa:#x}..{:#x} do not match their hash: the snapshot's memory file is corrupted or was changed",
                gpa + HASH_BLOCK
            ),
        }
    }

    /// The data ranges `(gpa, len)`, for prefetch and materialization.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.pages.data_ranges()
    }
}

impl PageSource for SnapshotSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        let end = offset.saturating_add(buf.len() as u64);
        if self.pages.overlapping(offset, end).is_empty() {
            return FetchOutcome::Zero;
        }
        buf.fill(0);
        let mut block = vec![0u8; HASH_BLOCK_LEN];
        let mut b = offset & !(HASH_BLOCK - 1);
        while b < end {
            // Every block, every time: the file may have changed since it was opened.
            if !self.pages.overlapping(b, b + HASH_BLOCK).is_empty() {
                match self.pages.read_checked(&self.file, b, &mut block) {
                    Ok(true) => {}
                    Ok(false) => return FetchOutcome::Failed(self.corrupt(b)),
                    Err(e) => return FetchOutcome::Failed(self.io_err(b, HASH_BLOCK_LEN, &e)),
                }
                let lo = b.max(offset);
                let hi = (b + HASH_BLOCK).min(end);
                let (Ok(dst), Ok(src), Ok(len)) = (
                    usize::try_from(lo - offset),
                    usize::try_from(lo - b),
                    usize::try_from(hi - lo),
                ) else {
                    return FetchOutcome::Failed(self.corrupt(b));
                };
                buf[dst..dst + len].copy_from_slice(&block[src..src + len]);
            }
            b += HASH_BLOCK;
        }
        FetchOutcome::Ready
    }

    fn bulk_cheap(&self) -> bool {
        true
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{Extent, Hasher};
    use super::super::memory::{LayoutKind, MemoryLayout};
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_zero_pages_are_checked_every_time_and_corruption_fails() {
        let path = std::env::temp_dir().join(format!("vmm-snapsrc-{}", std::process::id()));
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 10).unwrap();
        f.write_all_at(&data, 0x4000).unwrap();
        // Garbage in a hole must never be served.
        f.write_all_at(&[0xee; 4096], 0x8000).unwrap();
        let h = Hasher::new(None);
        let extents = [Extent {
            gpa: 0x4000,
            len: 0x2000,
        }];
        // The data block 0x4000..0x8000: two data pages, two zero pages.
        let mut block = vec![0u8; HASH_BLOCK_LEN];
        block[..8192].copy_from_slice(&data);
        let layout = MemoryLayout::new(LayoutKind::Packed, 64 << 20);
        let pages = Arc::new(PageHashes::new(&extents, h.hash(&block).to_vec(), h, layout));
        let src = SnapshotSource::with_pages(path.clone(), pages).unwrap();
        let mut buf = vec![0xffu8; 4 * 4096];
        assert!(matches!(src.fetch(0x8000, &mut buf), FetchOutcome::Zero));
        assert!(matches!(src.fetch(0, &mut buf), FetchOutcome::Zero));
        // A run over a hole and the data: zero, then the data.
        let mut two = vec![0xffu8; 2 * 4096];
        assert!(matches!(src.fetch(0x3000, &mut two), FetchOutcome::Ready));
        assert!(two[..4096].iter().all(|&b| b == 0));
        assert_eq!(&two[4096..], &data[..4096]);
        // The file changes after the first read: the next read fails.
        let mut one = vec![0u8; 4096];
        assert!(matches!(src.fetch(0x5000, &mut one), FetchOutcome::Ready));
        f.write_all_at(&[1], 0x5000 + 77).unwrap();
        for (off, len) in [(0x5000, 4096), (0x4000, 8192)] {
            let mut b = vec![0u8; len];
            match src.fetch(off, &mut b) {
                FetchOutcome::Failed(e) => assert!(e.to_string().contains("do not match their hash"), "{e}"),
                other => panic!("a corrupted page was served: {other:?}"),
            }
        }
        assert_eq!(src.data_ranges(), vec![(0x4000, 0x2000)]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_layout_places_high_ram_after_low_ram_in_a_packed_file() {
        let path = std::env::temp_dir().join(format!("vmm-snapsrc-packed-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let mem = 6u64 << 30;
        f.set_len(mem).unwrap();
        let data = vec![0x5au8; 4096];
        // Guest page 4 GiB + 16 KiB lies 3 GiB + 16 KiB into a packed file.
        let gpa = (4u64 << 30) + 0x4000;
        f.write_all_at(&data, (3 << 30) + 0x4000).unwrap();
        let h = Hasher::new(None);
        let extents = [Extent { gpa, len: 0x1000 }];
        let mut block = vec![0u8; HASH_BLOCK_LEN];
        block[..4096].copy_from_slice(&data);
        let hash = h.hash(&block).to_vec();
        let packed = MemoryLayout::new(LayoutKind::Packed, mem);
        let pages = Arc::new(PageHashes::new(&extents, hash.clone(), h.clone(), packed));
        let src = SnapshotSource::with_pages(path.clone(), pages).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(src.fetch(gpa, &mut buf), FetchOutcome::Ready));
        assert_eq!(buf, data);
        // The same file read as indexed by guest-physical address finds a
        // hole there: the hash says so.
        let by_gpa = MemoryLayout::new(LayoutKind::Gpa, mem);
        let pages = Arc::new(PageHashes::new(&extents, hash, h, by_gpa));
        let src = SnapshotSource::with_pages(path.clone(), pages).unwrap();
        assert!(
            matches!(src.fetch(gpa, &mut buf), FetchOutcome::Failed(_)),
            "a bad hash, not the data"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
