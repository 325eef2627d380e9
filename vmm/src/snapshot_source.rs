//! The page source of a lazy restore: the snapshot's memory file, served only
//! where the manifest lists data (holes are zero pages, whatever the file
//! holds there), each extent checked against its CRC32 the first time one of
//! its pages is fetched. A corrupted extent fails the fetch: the retry core
//! never maps it, and the VMM pauses the VM with the error.

use crate::snapshot::{Extent, Snapshot};
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
    // Keyed by guest-physical address; the value indexes `checked`.
    extents: BTreeMap<u64, (Extent, usize)>,
    checked: Vec<AtomicU8>,
    notifier: Notifier,
}

impl SnapshotSource {
    /// Opens the memory file of `snap`.
    pub fn open(snap: &Snapshot) -> Result<SnapshotSource, SourceError> {
        let path = snap.memory_path();
        let open_err = |e: std::io::Error| SourceError::Open {
            path: path.clone(),
            message: e.to_string(),
        };
        let file = File::open(&path).map_err(open_err)?;
        let notifier = Notifier::new().map_err(open_err)?;
        let extents: BTreeMap<u64, (Extent, usize)> = snap
            .manifest
            .memory
            .extents
            .iter()
            .enumerate()
            .map(|(i, e)| (e.gpa, (*e, i)))
            .collect();
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
    fn check(&self, e: &Extent, i: usize) -> Result<(), SourceError> {
        let state = &self.checked[i];
        match state.load(Ordering::Acquire) {
            GOOD => return Ok(()),
            BAD => return Err(self.corrupt(e)),
            _ => {}
        }
        let len = usize::try_from(e.len).unwrap_or(0);
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, e.gpa)
            .map_err(|err| self.io_err(e.gpa, len, &err))?;
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
        self.extents.values().map(|(e, _)| (e.gpa, e.len)).collect()
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
        let overlapping: Vec<(Extent, usize)> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| e.end() > offset)
            .map(|(_, v)| *v)
            .collect();
        if overlapping.is_empty() {
            return FetchOutcome::Zero;
        }
        buf.fill(0);
        for (e, i) in overlapping {
            if let Err(err) = self.check(&e, i) {
                return FetchOutcome::Failed(err);
            }
            let lo = e.gpa.max(offset);
            let hi = e.end().min(end);
            let (Ok(a), Ok(b)) = (usize::try_from(lo - offset), usize::try_from(hi - offset)) else {
                continue;
            };
            if let Err(err) = self.file.read_exact_at(&mut buf[a..b], lo) {
                return FetchOutcome::Failed(self.io_err(lo, b - a, &err));
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
