//! The page source of a lazy restore: the snapshot's memory file (placed by
//! its layout: packed regions, or indexed by guest-physical address), served
//! only where the manifest lists data (holes are zero pages, whatever the file
//! holds there), each extent checked against its CRC32 the first time one of
//! its pages is fetched. A corrupted extent fails the fetch: the retry core
//! never maps it, and the VMM pauses the VM with the error.

use super::{Extent, MemoryLayout, Snapshot};
use ::memory::{FetchOutcome, Notifier, PageSource, SourceError};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};

const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// See the module documentation.
#[derive(Debug)]
pub struct SnapshotSource {
    file: File,
    path: PathBuf,
    name: String,
    // Keyed by guest-physical address; the values: the extent, its index
    // in `checked`, its offset in the file.
    extents: BTreeMap<u64, (Extent, usize, u64)>,
    checked: Vec<AtomicU8>,
    notifier: Notifier,
}

impl SnapshotSource {
    /// Opens the memory file of `snap`.
    pub fn open(snap: &Snapshot) -> Result<SnapshotSource, SourceError> {
        Self::with_extents(snap.memory_path(), &snap.manifest.memory.extents, &snap.layout())
    }

    /// Opens memory file `path` laid out as `layout`, holding data at
    /// `extents` (checked, sorted, non-overlapping, inside RAM: see
    /// `Snapshot::open`).
    pub fn with_extents(
        path: PathBuf,
        extents: &[Extent],
        layout: &MemoryLayout,
    ) -> Result<SnapshotSource, SourceError> {
        let open_err = |e: std::io::Error| SourceError::Open {
            path: path.clone(),
            message: e.to_string(),
        };
        let file = File::open(&path).map_err(open_err)?;
        let notifier = Notifier::new().map_err(open_err)?;
        let mut placed = BTreeMap::new();
        for (i, e) in extents.iter().enumerate() {
            let at = layout
                .file_offset(e.gpa, e.len)
                .ok_or_else(|| SourceError::Open {
                    path: path.clone(),
                    message: format!("extent {:#x}+{:#x} lies outside guest RAM", e.gpa, e.len),
                })?;
            placed.insert(e.gpa, (*e, i, at));
        }
        let extents = placed;
        let checked = (0..extents.len()).map(|_| AtomicU8::new(UNCHECKED)).collect();
        Ok(SnapshotSource {
            file,
            name: format!("snapshot:{}", path.display()),
            path: path.clone(),
            extents,
            checked,
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

    /// Checks extent `i` once; a bad extent stays bad.
    fn check(&self, e: &Extent, i: usize, at: u64) -> Result<(), SourceError> {
        let state = &self.checked[i];
        match state.load(Ordering::Acquire) {
            GOOD => return Ok(()),
            BAD => return Err(self.corrupt(e)),
            _ => {}
        }
        let len = usize::try_from(e.len).unwrap_or(0);
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|err| self.io_err(at, len, &err))?;
        if crc32fast::hash(&buf) == e.crc32 {
            state.store(GOOD, Ordering::Release);
            Ok(())
        } else {
            state.store(BAD, Ordering::Release);
            Err(self.corrupt(e))
        }
    }

    fn corrupt(&self, e: &Extent) -> SourceError {
        SourceError::Io {
            path: self.path.clone(),
            offset: e.gpa,
            len: usize::try_from(e.len).unwrap_or(0),
            errno: None,
            message: format!(
                "checksum mismatch in extent {:#x}+{:#x}: the snapshot's memory file is corrupted",
                e.gpa, e.len
            ),
        }
    }

    /// The data ranges `(gpa, len)`, for prefetch and materialization.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.extents.values().map(|(e, _, _)| (e.gpa, e.len)).collect()
    }
}

impl PageSource for SnapshotSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        let end = offset.saturating_add(buf.len() as u64);
        // Extents do not overlap and are sorted, so walking down from `end`
        // meets exactly the overlapping ones first.
        let overlapping: Vec<(Extent, usize, u64)> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(_, (e, _, _))| e.end() > offset)
            .map(|(_, v)| *v)
            .collect();
        if overlapping.is_empty() {
            return FetchOutcome::Zero;
        }
        buf.fill(0);
        for (e, i, at) in overlapping {
            if let Err(err) = self.check(&e, i, at) {
                return FetchOutcome::Failed(err);
            }
            let lo = e.gpa.max(offset);
            let hi = e.end().min(end);
            let (Ok(a), Ok(b)) = (usize::try_from(lo - offset), usize::try_from(hi - offset)) else {
                continue;
            };
            let file_at = at + (lo - e.gpa);
            if let Err(err) = self.file.read_exact_at(&mut buf[a..b], file_at) {
                return FetchOutcome::Failed(self.io_err(file_at, b - a, &err));
            }
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
    use super::*;

    #[test]
    fn holes_are_zero_extents_are_checked_once_and_corruption_fails() {
        let path = std::env::temp_dir().join(format!("vmm-snapsrc-{}", std::process::id()));
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        let f = File::create(&path).unwrap();
        f.set_len(64 << 10).unwrap();
        f.write_all_at(&data, 0x4000).unwrap();
        // Garbage in a hole must never be served.
        f.write_all_at(&[0xee; 4096], 0x8000).unwrap();
        let good = Extent {
            gpa: 0x4000,
            len: 0x1000,
            crc32: crc32fast::hash(&data[..4096]),
        };
        let bad = Extent {
            gpa: 0x5000,
            len: 0x1000,
            crc32: crc32fast::hash(&data[4096..]) ^ 1,
        };
        let layout = MemoryLayout::new(crate::snapshot::LayoutKind::Packed, 64 << 20);
        let src = SnapshotSource::with_extents(path.clone(), &[good, bad], &layout).unwrap();
        let mut buf = vec![0xffu8; 4 * 4096];
        assert!(matches!(src.fetch(0x8000, &mut buf), FetchOutcome::Zero));
        assert!(matches!(src.fetch(0, &mut buf), FetchOutcome::Zero));
        // A run over a hole and the good extent: zero, then the data.
        let mut two = vec![0xffu8; 2 * 4096];
        assert!(matches!(src.fetch(0x3000, &mut two), FetchOutcome::Ready));
        assert!(two[..4096].iter().all(|&b| b == 0));
        assert_eq!(&two[4096..], &data[..4096]);
        // The bad extent fails, alone or in a run, every time.
        for (off, len) in [(0x5000, 4096), (0x4000, 8192)] {
            let mut b = vec![0u8; len];
            match src.fetch(off, &mut b) {
                FetchOutcome::Failed(e) => assert!(e.to_string().contains("checksum mismatch"), "{e}"),
                other => panic!("corrupted extent served: {other:?}"),
            }
        }
        assert_eq!(src.data_ranges(), vec![(0x4000, 0x1000), (0x5000, 0x1000)]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_layout_places_high_ram_after_low_ram_in_a_packed_file() {
        use crate::snapshot::LayoutKind;
        let path = std::env::temp_dir().join(format!("vmm-snapsrc-packed-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let mem = 6u64 << 30;
        f.set_len(mem).unwrap();
        let data = vec![0x5au8; 4096];
        // Guest page 4 GiB + 8 KiB lies 3 GiB + 8 KiB into a packed file.
        f.write_all_at(&data, (3 << 30) + 0x2000).unwrap();
        let e = Extent {
            gpa: (4 << 30) + 0x2000,
            len: 0x1000,
            crc32: crc32fast::hash(&data),
        };
        let packed = MemoryLayout::new(LayoutKind::Packed, mem);
        let src = SnapshotSource::with_extents(path.clone(), &[e], &packed).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(src.fetch(e.gpa, &mut buf), FetchOutcome::Ready));
        assert_eq!(buf, data);
        // The same file read as indexed by guest-physical address finds a hole.
        let gpa = MemoryLayout::new(LayoutKind::Gpa, mem);
        let src = SnapshotSource::with_extents(path.clone(), &[e], &gpa).unwrap();
        assert!(
            matches!(src.fetch(e.gpa, &mut buf), FetchOutcome::Failed(_)),
            "a bad CRC, not the data"
        );
        // An extent in the MMIO hole has no place in the file.
        let hole = Extent { gpa: 3 << 30, ..e };
        assert!(SnapshotSource::with_extents(path.clone(), &[hole], &packed).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
