//! The working-set file, `DIR/working-set`: the guest pages a lazy restore
//! of snapshot DIR made present during its recording window, in first-touch
//! order with their times, fault-around neighbours marked, and (a
//! snapshot's recording) a copy of their contents, hashed in chunks, so that
//! the next lazy restore with `--prefetch working-set` fills them in one
//! sequential read before (or while) the guest runs, as REAP does
//! (`docs/working-set.md`).
//!
//! Binary, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `vmm-wset` |
//! | 4 | version ([`WS_VERSION`]) |
//! | 4 | flags: bit 0 keyed (the snapshot's key), bit 1 unbound (no snapshot: `vmm run`), bit 2 contents |
//! | 32 | the snapshot's manifest digest (its identity and everything it covers) |
//! | 4 | page size |
//! | 4 | pages per contents chunk ([`WS_CHUNK_PAGES`]; zero without contents) |
//! | 8 | count of entries |
//! | 8 | recording window, microseconds |
//! | 16 x count | entries: guest-physical address with bit 0 set for a fault-around neighbour; microseconds since the restore began |
//! | 32 x chunks | with contents: the hash of each chunk of contents (keyed like the checksum) |
//! | 32 | BLAKE3 of everything before (keyed with the snapshot key if the snapshot is keyed) |
//! | 4096 x count | with contents: each entry's page as the snapshot holds it, in entry order |
//!
//! It is written like a snapshot file: into a new owner-only temporary file
//! beside it, synced, renamed into place; one recorder at a time holds the
//! directory's `.working-set.lock`, so restores of one snapshot never race
//! to write it. A file that is not this format, is corrupted, belongs to
//! another snapshot (another digest: the snapshot was taken again) or to
//! another key is refused with a [`WorkingSetError`] that says so; a chunk
//! of contents that fails its hash is not used (its pages are read from the
//! snapshot, checked against the snapshot's hashes).

use super::format::Hasher;
use abi::layout::PAGE_SIZE;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The working-set file's name in a snapshot directory.
pub const WORKING_SET: &str = "working-set";
/// The lock a recorder holds in the snapshot directory.
pub const WORKING_SET_LOCK: &str = ".working-set.lock";
/// The format version this VMM writes and reads.
pub const WS_VERSION: u32 = 2;
/// Pages per chunk of contents (256 KiB: one read and one hash each; small,
/// so that a prefetch while the guest runs starts copying at once).
pub const WS_CHUNK_PAGES: u32 = 64;
const MAGIC: &[u8; 8] = b"vmm-wset";
const HEADER: usize = 72;
const ENTRY: usize = 16;
const HASH: usize = 32;
const TRAILER: usize = 32;
/// Most entries a file may hold (64 GiB of 4 KiB pages).
pub const WS_MAX_PAGES: u64 = 1 << 24;
const FLAG_KEYED: u32 = 1;
const FLAG_UNBOUND: u32 = 2;
const FLAG_CONTENTS: u32 = 4;
/// [`PAGE_SIZE`] as a `usize` (4096 fits every target).
#[allow(clippy::cast_possible_truncation)]
const PS: usize = PAGE_SIZE as usize;

/// What [`WorkingSet::write_with`] asks for the pages' contents: fill
/// chunk `chunk`'s pages (in entry order) into the buffer.
pub type ContentsFill<'a> = &'a mut dyn FnMut(usize, &mut [u8]) -> Result<(), String>;

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
    /// The pages' contents could not be read for the file.
    #[error("working set {path}: the recorded pages could not be read from the snapshot: {reason}")]
    Contents {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
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
    /// With a copy of the pages' contents: the hash of each chunk of
    /// [`WS_CHUNK_PAGES`] pages of it (in entry order).
    pub chunk_hashes: Option<Vec<[u8; 32]>>,
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
    /// The file's bytes up to its checksum (the contents, if any, follow).
    pub fn encode(&self, h: &Hasher) -> Vec<u8> {
        let hashes = self.chunk_hashes.as_deref().unwrap_or(&[]);
        let mut out = Vec::with_capacity(HEADER + self.pages.len() * ENTRY + hashes.len() * HASH + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&WS_VERSION.to_le_bytes());
        let mut flags = if h.keyed() { FLAG_KEYED } else { 0 };
        if self.digest == [0; 32] {
            flags |= FLAG_UNBOUND;
        }
        if self.chunk_hashes.is_some() {
            flags |= FLAG_CONTENTS;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&u32::try_from(PAGE_SIZE).unwrap_or(u32::MAX).to_le_bytes());
        let chunk = if self.chunk_hashes.is_some() {
            WS_CHUNK_PAGES
        } else {
            0
        };
        out.extend_from_slice(&chunk.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.window_us.to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&(p.gpa | u64::from(p.around)).to_le_bytes());
            out.extend_from_slice(&p.t_us.to_le_bytes());
        }
        for c in hashes {
            out.extend_from_slice(c);
        }
        let sum = h.hash(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Chunks of contents a file of `count` entries holds.
    fn chunks(count: u64) -> u64 {
        count.div_ceil(u64::from(WS_CHUNK_PAGES))
    }

    /// Length of the part [`WorkingSet::encode`] writes, from the header's
    /// first [`HEADER`] bytes; `None` if they are too short.
    fn meta_len(header: &[u8]) -> Option<u64> {
        let flags = u32::from_le_bytes(header.get(12..16)?.try_into().ok()?);
        let count = u64::from_le_bytes(header.get(56..64)?.try_into().ok()?).min(WS_MAX_PAGES + 1);
        let hashes = if flags & FLAG_CONTENTS != 0 {
            Self::chunks(count) * HASH as u64
        } else {
            0
        };
        Some((HEADER + TRAILER) as u64 + count * ENTRY as u64 + hashes)
    }

    /// Decodes and checks a whole file's bytes (see [`WorkingSet::decode`]);
    /// also returns where its contents start.
    pub fn decode_file(
        bytes: &[u8],
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<(WorkingSet, usize), WorkingSetError> {
        let meta = Self::meta_len(bytes)
            .and_then(|m| usize::try_from(m).ok())
            .filter(|&m| m <= bytes.len())
            .unwrap_or(bytes.len());
        let ws = Self::decode(
            &bytes[..meta],
            (bytes.len() - meta) as u64,
            path,
            h,
            expected,
            mem_size,
        )?;
        Ok((ws, meta))
    }

    /// Decodes and checks the part of a file up to its checksum, `meta`:
    /// format, checksum (with `h`), that it belongs to the snapshot of
    /// digest `expected` (hex; `None` accepts an unbound file) and to RAM of
    /// `mem_size` bytes, and that `contents_len` bytes of contents follow it.
    pub fn decode(
        meta: &[u8],
        contents_len: u64,
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<WorkingSet, WorkingSetError> {
        let bytes = meta;
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
        if flags & !(FLAG_KEYED | FLAG_UNBOUND | FLAG_CONTENTS) != 0 {
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
        let with_contents = flags & FLAG_CONTENTS != 0;
        let chunk = u32_at(52);
        if chunk != if with_contents { WS_CHUNK_PAGES } else { 0 } {
            return Err(bad(format!(
                "{chunk} pages per contents chunk; this vmm writes {WS_CHUNK_PAGES} with contents, 0 without"
            )));
        }
        if u64::from(u32_at(48)) != PAGE_SIZE {
            return Err(bad(format!(
                "page size {}, this vmm uses {PAGE_SIZE}",
                u32_at(48)
            )));
        }
        let count = u64_at(56);
        let n_hashes = if with_contents {
            Self::chunks(count.min(WS_MAX_PAGES))
        } else {
            0
        };
        let want = count.min(WS_MAX_PAGES + 1) * ENTRY as u64 + n_hashes * HASH as u64;
        if count > WS_MAX_PAGES || (body.len() - HEADER) as u64 != want {
            return Err(bad(format!(
                "{count} entries in {} bytes of entries and hashes",
                body.len() - HEADER
            )));
        }
        let want_contents = if with_contents { count * PAGE_SIZE } else { 0 };
        if contents_len != want_contents {
            return Err(bad(format!(
                "{contents_len} bytes of page contents after the checksum, {count} entries want {want_contents}"
            )));
        }
        let entries_end = HEADER + usize::try_from(count).unwrap_or(0) * ENTRY;
        let mut pages = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for e in body[HEADER..entries_end].chunks_exact(ENTRY) {
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
        let chunk_hashes = with_contents.then(|| {
            body[entries_end..]
                .chunks_exact(HASH)
                .map(|c| {
                    let mut x = [0u8; 32];
                    x.copy_from_slice(c);
                    x
                })
                .collect()
        });
        Ok(WorkingSet {
            digest,
            window_us: u64_at(64),
            pages,
            chunk_hashes,
        })
    }

    /// Whether `data` is chunk `chunk` of this working set's contents (its
    /// pages, exactly).
    pub fn check_chunk(&self, h: &Hasher, chunk: usize, data: &[u8]) -> bool {
        let hashes = self.chunk_hashes.as_deref().unwrap_or(&[]);
        chunk_matches(h, hashes, self.pages.len(), chunk, data)
    }

    /// Reads and checks `path` (see [`WorkingSet::decode`]): its entries and
    /// chunk hashes, not its contents.
    pub fn load(
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<WorkingSet, WorkingSetError> {
        Self::open(path, h, expected, mem_size).map(|(ws, _)| ws)
    }

    /// [`WorkingSet::load`], keeping the file open for its contents.
    pub fn open(
        path: &Path,
        h: &Hasher,
        expected: Option<&str>,
        mem_size: u64,
    ) -> Result<(WorkingSet, File), WorkingSetError> {
        let io = |what| {
            move |source: std::io::Error| match source.kind() {
                std::io::ErrorKind::NotFound => WorkingSetError::Missing(path.to_owned()),
                _ => WorkingSetError::Io {
                    path: path.to_owned(),
                    what,
                    source,
                },
            }
        };
        let file = ::memory::files::open_regular(path).map_err(io("opening"))?;
        let len = file.metadata().map_err(io("reading"))?.len();
        let mut header = [0u8; HEADER];
        let got = usize::try_from(len).unwrap_or(HEADER).min(HEADER);
        file.read_exact_at(&mut header[..got], 0).map_err(io("reading"))?;
        let meta = Self::meta_len(&header[..got]).unwrap_or(len).min(len);
        let mut bytes = vec![0u8; usize::try_from(meta).unwrap_or(0)];
        file.read_exact_at(&mut bytes, 0).map_err(io("reading"))?;
        let ws = Self::decode(&bytes, len - meta, path, h, expected, mem_size)?;
        Ok((ws, file))
    }

    /// Writes the file to `path` atomically, without contents (see
    /// [`WorkingSet::write_with`]).
    pub fn write(&self, path: &Path, h: &Hasher) -> Result<(), WorkingSetError> {
        let mut ws = self.clone();
        ws.chunk_hashes = None;
        ws.write_with(path, h, None)
    }

    /// Writes the file to `path` atomically: a new owner-only temporary file
    /// beside it, synced, renamed over `path`, the directory synced. With
    /// `contents`, it is asked for each chunk of pages (`chunk`, a buffer of
    /// its pages in entry order to fill) and the file holds them, hashed;
    /// the chunk hashes of `self` are ignored.
    pub fn write_with(
        &self,
        path: &Path,
        h: &Hasher,
        contents: Option<ContentsFill<'_>>,
    ) -> Result<(), WorkingSetError> {
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
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("creating the temporary file"))?;
        let result = (|| {
            let mut ws = self.clone();
            ws.chunk_hashes = None;
            if let Some(fill) = contents {
                let cp = WS_CHUNK_PAGES as usize;
                let mut hashes = Vec::new();
                let mut buf = vec![0u8; cp * PS];
                hashes.resize(self.pages.len().div_ceil(cp), [0u8; 32]);
                // The contents start after the metadata, whose length the
                // entry count fixes.
                ws.chunk_hashes = Some(hashes.clone());
                let at = ws.encode(h).len() as u64;
                for (c, hash) in hashes.iter_mut().enumerate() {
                    let n = (self.pages.len() - c * cp).min(cp);
                    let data = &mut buf[..n * PS];
                    fill(c, data).map_err(|e| WorkingSetError::Contents {
                        path: path.to_owned(),
                        reason: e,
                    })?;
                    *hash = h.hash(data);
                    f.write_all_at(data, at + (c * cp) as u64 * PAGE_SIZE)
                        .map_err(io("writing"))?;
                }
                ws.chunk_hashes = Some(hashes);
            }
            f.write_all_at(&ws.encode(h), 0).map_err(io("writing"))?;
            f.sync_all()
                .and_then(|()| std::fs::rename(&tmp, path))
                .and_then(|()| File::open(dir).and_then(|d| d.sync_all()))
                .map_err(io("writing"))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Whether `data` is chunk `chunk` of the contents of `count` pages hashed
/// as `hashes`.
fn chunk_matches(h: &Hasher, hashes: &[[u8; 32]], count: usize, chunk: usize, data: &[u8]) -> bool {
    let cp = WS_CHUNK_PAGES as usize;
    let pages = count.saturating_sub(chunk.saturating_mul(cp)).min(cp);
    hashes
        .get(chunk)
        .is_some_and(|want| pages > 0 && data.len() == pages * PS && h.hash(data) == *want)
}

/// A working-set file's contents, read chunk by chunk and checked against
/// its chunk hashes, for the prefetch (`vmm_core::memory::PrefetchContents`).
#[derive(Debug)]
pub struct WsContents {
    file: File,
    path: PathBuf,
    hasher: Hasher,
    hashes: Vec<[u8; 32]>,
    count: usize,
    at: u64,
}

impl WsContents {
    /// The contents of `ws`, read from `file` (opened by
    /// [`WorkingSet::open`]), checked with `h`; `None` if it holds none.
    pub fn new(ws: WorkingSet, file: File, path: &Path, h: &Hasher) -> Option<WsContents> {
        let at = ws.encode(h).len() as u64;
        Some(WsContents {
            file,
            path: path.to_owned(),
            hasher: h.clone(),
            count: ws.pages.len(),
            hashes: ws.chunk_hashes?,
            at,
        })
    }
}

impl vmm_core::memory::PrefetchContents for WsContents {
    fn chunk_pages(&self) -> usize {
        WS_CHUNK_PAGES as usize
    }

    fn read_chunk(&self, chunk: usize, buf: &mut [u8]) -> Result<(), String> {
        let off = (chunk * WS_CHUNK_PAGES as usize) as u64 * PAGE_SIZE;
        self.file
            .read_exact_at(buf, self.at + off)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        // Checked after the read, in our own buffer: the file may change.
        if chunk_matches(&self.hasher, &self.hashes, self.count, chunk, buf) {
            Ok(())
        } else {
            Err(format!(
                "{}: chunk {chunk} does not match its hash (corrupted or changed)",
                self.path.display()
            ))
        }
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
            chunk_hashes: None,
        }
    }

    /// Page `i`'s contents in the tests: its index everywhere.
    fn fill(_chunk: usize, buf: &mut [u8]) -> Result<(), String> {
        for (i, p) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
            p.fill((i as u8).wrapping_add(1));
        }
        Ok(())
    }

    #[test]
    fn round_trips_and_refuses_corrupt_foreign_and_keyed() {
        let h = Hasher::new(None);
        let p = Path::new("ws");
        let d = "ab".repeat(32);
        let bytes = sample().encode(&h);
        assert_eq!(
            WorkingSet::decode(&bytes, 0, p, &h, Some(&d), 64 << 20).unwrap(),
            sample()
        );
        // Contents announced by the header must follow, and only those.
        assert!(WorkingSet::decode(&bytes, 4096, p, &h, Some(&d), 64 << 20).is_err());
        // One flipped bit anywhere.
        for at in [0, 20, 80, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            assert!(
                WorkingSet::decode(&b, 0, p, &h, Some(&d), 64 << 20).is_err(),
                "flip at {at}"
            );
        }
        let e = WorkingSet::decode(&bytes, 0, p, &h, Some(&"cd".repeat(32)), 64 << 20).unwrap_err();
        assert!(matches!(e, WorkingSetError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains("belongs to another snapshot"), "{e}");
        let k = Hasher::new(Some(&super::super::SnapshotKey::new([7; 32])));
        let e = WorkingSet::decode(&bytes, 0, p, &k, Some(&d), 64 << 20).unwrap_err();
        assert!(matches!(e, WorkingSetError::Checksum { .. }), "{e}");
        // Truncated, and pages outside RAM.
        assert!(WorkingSet::decode(&bytes[..50], 0, p, &h, Some(&d), 64 << 20).is_err());
        let mut far = sample();
        far.pages[0].gpa = 1 << 40;
        let e = WorkingSet::decode(&far.encode(&h), 0, p, &h, Some(&d), 64 << 20).unwrap_err();
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
            let with = Path::new(&dir).join(format!("{name}-contents"));
            let _ = std::fs::remove_file(&with);
            sample().write_with(&with, &h, Some(&mut fill)).unwrap();
        }
    }

    #[test]
    fn contents_round_trip_and_a_bad_chunk_is_refused() {
        use vmm_core::memory::PrefetchContents;
        let dir = std::env::temp_dir().join(format!("vmm-ws-contents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let h = Hasher::new(None);
        let d = "ab".repeat(32);
        let path = dir.join(WORKING_SET);
        // Three chunks, the last one short.
        let cp = WS_CHUNK_PAGES as usize;
        let n = 2 * cp + 44;
        let mut ws = sample();
        ws.pages = (0..n as u64)
            .map(|i| WsPage {
                gpa: 0x10_0000 + i * PAGE_SIZE,
                t_us: i,
                around: i % 3 == 0,
            })
            .collect();
        ws.write_with(&path, &h, Some(&mut fill)).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, ws.encode(&h).len() as u64 + 3 * 32 + n as u64 * PAGE_SIZE);
        let (back, file) = WorkingSet::open(&path, &h, Some(&d), 64 << 20).unwrap();
        assert_eq!(back.pages, ws.pages);
        assert_eq!(back.chunk_hashes.as_ref().map(Vec::len), Some(3));
        let bytes = std::fs::read(&path).unwrap();
        let (again, at) = WorkingSet::decode_file(&bytes, &path, &h, Some(&d), 64 << 20).unwrap();
        assert_eq!(again, back);
        assert!(again.check_chunk(&h, 2, &bytes[at + 2 * cp * 4096..]));
        let c = WsContents::new(back, file, &path, &h).expect("contents");
        let mut first = vec![0u8; cp * PAGE_SIZE as usize];
        c.read_chunk(0, &mut first).unwrap();
        // Page i of a chunk holds i + 1.
        assert!(first[..4096].iter().all(|&b| b == 1));
        assert!(first[(cp - 1) * 4096..].iter().all(|&b| b == cp as u8));
        let mut last = vec![0u8; 44 * PAGE_SIZE as usize];
        c.read_chunk(2, &mut last).unwrap();
        // The wrong length, and a flipped bit in the contents: refused.
        assert!(c.read_chunk(2, &mut first).is_err());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], len - 5).unwrap();
        let e = c.read_chunk(2, &mut last).unwrap_err();
        assert!(e.contains("does not match its hash"), "{e}");
        c.read_chunk(0, &mut first).unwrap();
        // Contents cut short: the file is refused as a whole.
        f.set_len(len - 4096).unwrap();
        let e = WorkingSet::load(&path, &h, Some(&d), 64 << 20).unwrap_err();
        assert!(e.to_string().contains("bytes of page contents"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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

/// Reads the pages `pages` (guest-physical, in any order) from `source`
/// into `buf`, page `i` at `i * PAGE_SIZE`: sorted and coalesced into runs,
/// each read and checked once.
fn read_pages(source: &super::source::SnapshotSource, pages: &[u64], buf: &mut [u8]) -> Result<(), String> {
    use ::memory::{FetchOutcome, PageSource};
    let ps = PS;
    let mut order: Vec<usize> = (0..pages.len()).collect();
    order.sort_unstable_by_key(|&i| pages[i]);
    let mut run = Vec::new();
    let mut k = 0;
    while k < order.len() {
        let first = pages[order[k]];
        let mut n = 1;
        while k + n < order.len() && pages[order[k + n]] == first + n as u64 * PAGE_SIZE {
            n += 1;
        }
        run.resize(n * ps, 0);
        match source.fetch(first, &mut run) {
            FetchOutcome::Ready => {}
            FetchOutcome::Zero => run.fill(0),
            FetchOutcome::Failed(e) => return Err(e.to_string()),
            other => return Err(format!("the snapshot answered {other:?} for page {first:#x}")),
        }
        for (j, &i) in order[k..k + n].iter().enumerate() {
            buf[i * ps..(i + 1) * ps].copy_from_slice(&run[j * ps..(j + 1) * ps]);
        }
        // Duplicates (never recorded twice, but a run must not skip them).
        k += n;
        while k < order.len() && pages[order[k]] < first + n as u64 * PAGE_SIZE {
            let i = order[k];
            let j = usize::try_from((pages[i] - first) / PAGE_SIZE).unwrap_or(0);
            buf[i * ps..(i + 1) * ps].copy_from_slice(&run[j * ps..(j + 1) * ps]);
            k += 1;
        }
    }
    Ok(())
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
    /// Where the recorded pages' contents are read from (a snapshot's
    /// recording; a plain run's has none).
    source: Option<super::source::SnapshotSource>,
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
        let path = snap.dir.join(WORKING_SET);
        let source = super::source::SnapshotSource::open(snap).map_err(|e| WorkingSetError::Contents {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut r = Self::new(
            path,
            digest_bytes(&snap.manifest.digest),
            Hasher::new(key),
            Some(lock),
            snap.state.vm.config.mem_size,
        );
        r.source = Some(source);
        Ok(r)
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
            source: None,
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
            chunk_hashes: None,
        };
        let mut fill = |c: usize, buf: &mut [u8]| {
            let cp = WS_CHUNK_PAGES as usize;
            let pages: Vec<u64> = ws.pages.iter().skip(c * cp).take(cp).map(|p| p.gpa).collect();
            self.source
                .as_ref()
                .map_or(Ok(()), |s| read_pages(s, &pages, buf))
        };
        let contents = self
            .source
            .is_some()
            .then_some(&mut fill as &mut dyn FnMut(usize, &mut [u8]) -> Result<(), String>);
        let result = ws
            .write_with(&self.path, &self.hasher, contents)
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
