//! The working-set file, `DIR/working-set`: the guest pages a lazy restore
//! of snapshot DIR made present during its recording window, in first-touch
//! order with their times, fault-around neighbours marked. The next lazy
//! restore with `--prefetch working-set` fills them before (or while) the
//! guest runs, in coalesced reads and `UFFDIO_COPY` runs (`docs/working-set.md`).
//!
//! Binary, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `vmm-wset` |
//! | 4 | version ([`WS_VERSION`]) |
//! | 4 | flags: bit 0 keyed (the snapshot's key), bit 1 unbound (no snapshot: `vmm run`) |
//! | 32 | the snapshot's manifest digest (its identity and everything it covers) |
//! | 4 | page size |
//! | 4 | zero |
//! | 8 | count of entries |
//! | 8 | recording window, microseconds |
//! | 16 x count | entries: guest-physical address with bit 0 set for a fault-around neighbour; microseconds since the restore began |
//! | 32 | BLAKE3 of everything before (keyed with the snapshot key if the snapshot is keyed) |
//!
//! It is written like a snapshot file: into a new owner-only temporary file
//! beside it, synced, renamed into place; one recorder at a time holds the
//! directory's `.working-set.lock`, so restores of one snapshot never race
//! to write it. A file that is not this format, is corrupted, belongs to
//! another snapshot (another digest: the snapshot was taken again) or to
//! another key is refused with a [`WorkingSetError`] that says so.

use super::format::Hasher;
use abi::layout::PAGE_SIZE;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The working-set file's name in a snapshot directory.
pub const WORKING_SET: &str = "working-set";
/// The lock a recorder holds in the snapshot directory.
pub const WORKING_SET_LOCK: &str = ".working-set.lock";
/// The format version this VMM writes and reads.
pub const WS_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"vmm-wset";
const HEADER: usize = 72;
const ENTRY: usize = 16;
const TRAILER: usize = 32;
/// Most entries a file may hold (64 GiB of 4 KiB pages).
pub const WS_MAX_PAGES: u64 = 1 << 24;
const FLAG_KEYED: u32 = 1;
const FLAG_UNBOUND: u32 = 2;

/// Errors reading or writing a working-set file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// No file.
    #[error("working set {0}: there is none; record one first (vmm restore --from DIR --lazy --record-working-set)")]
    Missing(PathBuf),
    /// An IO error.
    #[error("working set {path}: {what} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a working-set file of this format.
    #[error("working set {path} is not valid: {reason}; record it again (vmm restore --from DIR --lazy --record-working-set)")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Its checksum does not match.
    #[error("working set {path}: checksum mismatch{}; the file is corrupted, was edited{}; record it again", if *keyed { " or was written with another snapshot key" } else { "" }, "")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Whether the snapshot is keyed.
        keyed: bool,
    },
    /// It belongs to another snapshot.
    #[error("working set {path} belongs to another snapshot (recorded for digest {found}, this snapshot's is {expected}); the snapshot was taken again since: record the working set again")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Digest in the file.
        found: String,
        /// The snapshot's digest.
        expected: String,
    },
    /// Another recorder holds the directory.
    #[error("working set {0}: another restore of this snapshot is recording its working set; only one may (restore without --record-working-set)")]
    Busy(PathBuf),
}

/// A recorded working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// The snapshot's manifest digest (zero: not bound to a snapshot).
    pub digest: [u8; 32],
    /// How long the recording window was open, microseconds.
    pub window_us: u64,
    /// The pages, in first-touch order.
    pub pages: Vec<WsPage>,
}

/// One page of a working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsPage {
    /// Guest-physical address (page aligned).
    pub gpa: u64,
    /// Microseconds since the restore began.
    pub t_us: u64,
    /// Filled as a fault-around neighbour of a faulting page.
    pub around: bool,
}

/// The 32 bytes of a hex digest (zero for anything else).
pub fn digest_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if hex.len() == 64 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).unwrap_or(0);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl WorkingSet {
    /// The encoded file.
    pub fn encode(&self, h: &Hasher) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.pages.len() * ENTRY + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&WS_VERSION.to_le_bytes());
        let mut flags = if h.keyed() { FLAG_KEYED } else { 0 };
        if self.digest == [0; 32] {
            flags |= FLAG_UNBOUND;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&u32::try_from(PAGE_SIZE).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.window_us.to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&(p.gpa | u64::from(p.around)).to_le_bytes());
            out.extend_from_slice(&p.t_us.to_le_bytes());
        }
        let sum = h.hash(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks a file's bytes: format, checksum (with `h`), and
    /// that it belongs to the snapshot of digest `expected` (hex; `None`
    /// accepts an unbound file) and to RAM of `mem_size` bytes.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<WorkingSet, WorkingSetError> {
        let bad = |reason: String| WorkingSetError::Malformed {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < HEADER + TRAILER {
            return Err(bad(format!(
                "{} bytes, shorter than any working-set file",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("no `vmm-wset` magic".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != WS_VERSION {
            return Err(bad(format!(
                "format version {version}; this vmm reads version {WS_VERSION} only"
            )));
        }
        let flags = u32_at(12);
        if flags & !(FLAG_KEYED | FLAG_UNBOUND) != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let keyed = flags & FLAG_KEYED != 0;
        let (body, sum) = bytes.split_at(bytes.len() - TRAILER);
        if keyed != h.keyed() || h.hash(body) != sum {
            return Err(WorkingSetError::Checksum {
                path: path.to_owned(),
                keyed: keyed || h.keyed(),
            });
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[16..48]);
        match expected {
            Some(e) if digest != digest_bytes(e) || flags & FLAG_UNBOUND != 0 => {
                return Err(WorkingSetError::Foreign {
                    path: path.to_owned(),
                    found: if flags & FLAG_UNBOUND != 0 {
                        "none: a `vmm run` recording".into()
                    } else {
                        hex(&digest)
                    },
                    expected: e.to_owned(),
                })
            }
            _ => {}
        }
        if u32_at(52) != 0 {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        if u64::from(u32_at(48)) != PAGE_SIZE {
            return Err(bad(format!(
                "page size {}, this vmm uses {PAGE_SIZE}",
                u32_at(48)
            )));
        }
        let count = u64_at(56);
        let want = usize::try_from(count.min(WS_MAX_PAGES + 1)).unwrap_or(usize::MAX / ENTRY) * ENTRY;
        if count > WS_MAX_PAGES || body.len() - HEADER != want {
            return Err(bad(format!(
                "{count} entries in {} bytes of entries",
                body.len() - HEADER
            )));
        }
        let mut pages = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for e in body[HEADER..].chunks_exact(ENTRY) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[..8]);
            let raw = u64::from_le_bytes(a);
            let mut t = [0u8; 8];
            t.copy_from_slice(&e[8..]);
            let gpa = raw & !(PAGE_SIZE - 1);
            if raw & (PAGE_SIZE - 1) & !1 != 0
                || !abi::layout::ram_ranges(mem_size)
                    .iter()
                    .any(|&(s, l)| gpa >= s && gpa - s < l)
            {
                return Err(bad(format!("entry {raw:#x} is not a page of this VM's RAM")));
            }
            pages.push(WsPage {
                gpa,
                t_us: u64::from_le_bytes(t),
                around: raw & 1 != 0,
            });
        }
        Ok(WorkingSet {
            digest,
            window_us: u64_at(64),
            pages,
        })
    }

    /// Reads and checks `path` (see [`WorkingSet::decode`]).
    pub fn load(
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<WorkingSet, WorkingSetError> {
        let limit = (HEADER + TRAILER) as u64 + WS_MAX_PAGES * ENTRY as u64;
        let bytes = vmm_core::files::read_regular(path, limit).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => WorkingSetError::Missing(path.to_owned()),
            _ => WorkingSetError::Io {
                path: path.to_owned(),
                what: "reading",
                source: e,
            },
        })?;
        Self::decode(&bytes, path, h, expected, mem_size)
    }

    /// Writes the file to `path` atomically: a new owner-only temporary file
    /// beside it, synced, renamed over `path`, the directory synced.
    pub fn write(&self, path: &Path, h: &Hasher) -> Result<(), WorkingSetError> {
        let io = |what| {
            move |source| WorkingSetError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            super::format::new_id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("creating the temporary file"))?;
        let result = f
            .write_all(&self.encode(h))
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| File::open(dir).and_then(|d| d.sync_all()));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io("writing"))
    }
}

/// The lock of the one recorder of a snapshot directory's working set
/// (released when dropped).
#[derive(Debug)]
pub struct RecorderLock(#[allow(dead_code)] File);

impl RecorderLock {
    /// Takes `dir`'s recorder lock, or says another restore holds it.
    pub fn take(dir: &Path) -> Result<RecorderLock, WorkingSetError> {
        let path = dir.join(WORKING_SET_LOCK);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| WorkingSetError::Io {
                path: path.clone(),
                what: "opening the recorder lock",
                source,
            })?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(WorkingSetError::Busy(dir.join(WORKING_SET)));
        }
        Ok(RecorderLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            digest: digest_bytes(&"ab".repeat(32)),
            window_us: 1234,
            pages: vec![
                WsPage {
                    gpa: 0x5000,
                    t_us: 3,
                    around: false,
                },
                WsPage {
                    gpa: 0x6000,
                    t_us: 3,
                    around: true,
                },
                WsPage {
                    gpa: 0x1000,
                    t_us: 9,
                    around: false,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_corrupt_foreign_and_keyed() {
        let h = Hasher::new(None);
        let p = Path::new("ws");
        let d = "ab".repeat(32);
        let bytes = sample().encode(&h);
        assert_eq!(
            WorkingSet::decode(&bytes, p, &h, Some(&d), 64 << 20).unwrap(),
            sample()
        );
        // One flipped bit anywhere.
        for at in [0, 20, 80, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            assert!(
                WorkingSet::decode(&b, p, &h, Some(&d), 64 << 20).is_err(),
                "flip at {at}"
            );
        }
        let e = WorkingSet::decode(&bytes, p, &h, Some(&"cd".repeat(32)), 64 << 20).unwrap_err();
        assert!(matches!(e, WorkingSetError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains("belongs to another snapshot"), "{e}");
        let k = Hasher::new(Some(&super::super::SnapshotKey::new([7; 32])));
        let e = WorkingSet::decode(&bytes, p, &k, Some(&d), 64 << 20).unwrap_err();
        assert!(matches!(e, WorkingSetError::Checksum { .. }), "{e}");
        // Truncated, and pages outside RAM.
        assert!(WorkingSet::decode(&bytes[..50], p, &h, Some(&d), 64 << 20).is_err());
        let mut far = sample();
        far.pages[0].gpa = 1 << 40;
        let e = WorkingSet::decode(&far.encode(&h), p, &h, Some(&d), 64 << 20).unwrap_err();
        assert!(e.to_string().contains("not a page of this VM's RAM"), "{e}");
    }

    /// With `VMM_WRITE_FUZZ_SEEDS=DIR`: writes the seeds of the
    /// `working_set` fuzz target (plain and keyed) into DIR.
    #[test]
    fn fuzz_seeds() {
        let Ok(dir) = std::env::var("VMM_WRITE_FUZZ_SEEDS") else {
            return;
        };
        let keyed = Hasher::new(Some(&super::super::SnapshotKey::new([7; 32])));
        for (name, h) in [("plain", Hasher::new(None)), ("keyed", keyed)] {
            std::fs::write(Path::new(&dir).join(name), sample().encode(&h)).unwrap();
        }
    }

    #[test]
    fn writes_atomically_and_one_recorder_holds_the_lock() {
        let dir = std::env::temp_dir().join(format!("vmm-ws-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let h = Hasher::new(None);
        let path = dir.join(WORKING_SET);
        sample().write(&path, &h).unwrap();
        let back = WorkingSet::load(&path, &h, Some(&"ab".repeat(32)), 64 << 20).unwrap();
        assert_eq!(back, sample());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        let lock = RecorderLock::take(&dir).unwrap();
        assert!(matches!(RecorderLock::take(&dir), Err(WorkingSetError::Busy(_))));
        drop(lock);
        RecorderLock::take(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// What a finished recording wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecordSummary {
    /// The file written.
    pub path: PathBuf,
    /// Pages in it.
    pub pages: u64,
    /// Of those, fault-around neighbours.
    pub around: u64,
    /// How long the window was open, milliseconds.
    pub window_ms: u64,
}

/// A working-set recording in progress: the recorder the retry cores feed,
/// where its file goes and what it is bound to. [`Recording::finish`]
/// closes the window and writes the file (once; later calls answer the
/// same).
#[derive(Debug)]
pub struct Recording {
    recorder: std::sync::Arc<::memory::FillRecorder>,
    path: PathBuf,
    digest: [u8; 32],
    hasher: Hasher,
    _lock: Option<RecorderLock>,
    done: std::sync::Mutex<Option<Result<RecordSummary, String>>>,
}

impl Recording {
    /// A recording for a restore of `snap` (bound to its digest and key),
    /// written to `DIR/working-set`; takes the directory's recorder lock.
    pub fn for_snapshot(
        snap: &super::Snapshot,
        key: Option<&super::SnapshotKey>,
    ) -> Result<Recording, WorkingSetError> {
        let lock = RecorderLock::take(&snap.dir)?;
        Ok(Self::new(
            snap.dir.join(WORKING_SET),
            digest_bytes(&snap.manifest.digest),
            Hasher::new(key),
            Some(lock),
            snap.state.vm.config.mem_size,
        ))
    }

    /// A recording of a plain run, written to `path`, bound to no snapshot
    /// (a restore refuses it as foreign).
    pub fn to_file(path: &Path, mem_size: u64) -> Recording {
        Self::new(path.to_owned(), [0; 32], Hasher::new(None), None, mem_size)
    }

    fn new(
        path: PathBuf,
        digest: [u8; 32],
        hasher: Hasher,
        lock: Option<RecorderLock>,
        mem_size: u64,
    ) -> Recording {
        let limit = usize::try_from(mem_size / PAGE_SIZE).unwrap_or(usize::MAX);
        Recording {
            recorder: std::sync::Arc::new(::memory::FillRecorder::new(limit)),
            path,
            digest,
            hasher,
            _lock: lock,
            done: std::sync::Mutex::new(None),
        }
    }

    /// What the retry cores report their fills to.
    pub fn observer(&self) -> std::sync::Arc<dyn ::memory::FillObserver> {
        self.recorder.clone()
    }

    /// Where the file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the window and writes the file (the first call; later calls
    /// give the first one's answer).
    pub fn finish(&self) -> Result<RecordSummary, String> {
        let mut done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = done.as_ref() {
            return d.clone();
        }
        let (pages, window) = self.recorder.end();
        let ws = WorkingSet {
            digest: self.digest,
            window_us: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            pages: pages
                .iter()
                .map(|p| WsPage {
                    gpa: p.gpa,
                    t_us: p.t_us,
                    around: p.around,
                })
                .collect(),
        };
        let result = ws
            .write(&self.path, &self.hasher)
            .map(|()| RecordSummary {
                path: self.path.clone(),
                pages: ws.pages.len() as u64,
                around: ws.pages.iter().filter(|p| p.around).count() as u64,
                window_ms: ws.window_us / 1000,
            })
            .map_err(|e| e.to_string());
        *done = Some(result.clone());
        result
    }
}
