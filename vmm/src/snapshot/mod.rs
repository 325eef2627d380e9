//! Snapshots: the on-disk format (`docs/snapshot.md`), writing one from a
//! captured state and guest memory, and opening and checking one before a
//! restore. The state itself is composed by the components (`vmm_core::state`,
//! [`crate::state`]); this module only stores it.
//!
//! A snapshot is a directory with three files:
//! - `manifest.json`: magic, format version, and for each other file its
//!   length and CRC32; written last (by rename), so a snapshot without it is
//!   incomplete;
//! - `state.json`: a [`SavedVm`]: configuration, memory layout, per-vCPU KVM
//!   state, irqchip and PIT, devices (the page store's reads in flight
//!   included), controller state;
//! - `memory.bin`: guest RAM as a sparse file indexed by guest-physical address;
//!   only pages that exist and are not all zero are written, in extents of at
//!   most [`EXTENT_MAX`] bytes, each with its own CRC32 in the manifest, so a
//!   lazy restore can check an extent when it is first used.
//!
//! Versioning ([`FORMAT_VERSION`]): any change to what a file holds or means
//! (a field of `state.json` or of a component's state, the memory file's
//! layout, the manifest) bumps the version. This VMM reads only its own
//! version and refuses any other with a message naming both.

pub mod memory;
pub mod source;

pub use memory::{data_extents, ram_end, write_memory};

use crate::state::SavedVm;
use abi::layout::{ram_ranges, PAGE_SIZE};
use devices::GuestRam;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_core::config::{ConfigError, MemoryConfig, VmConfig};

/// The format version this VMM writes and reads. Version 2: `state.json` is
/// composed from the components' own states (the page store included).
pub const FORMAT_VERSION: u32 = 2;
/// The manifest's magic string.
pub const MAGIC: &str = "vmm-snapshot";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// State file name.
pub const STATE: &str = "state.json";
/// Memory file name.
pub const MEMORY: &str = "memory.bin";
/// Largest memory extent; extents never cross a multiple of it.
pub const EXTENT_MAX: u64 = 1 << 20;
/// Largest state file accepted (a guard against reading a huge wrong file).
const STATE_MAX: u64 = 64 << 20;

/// Errors saving or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot is missing.
    #[error("snapshot {dir}: {file} is missing; this is not a (complete) snapshot directory: take the snapshot again")]
    Missing {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: &'static str,
    },
    /// An IO error.
    #[error("snapshot {path}: {what} failed: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file does not have the length the manifest gives.
    #[error("snapshot {path} is truncated or was changed: {found} bytes, the manifest says {expected}; take the snapshot again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes found.
        found: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A checksum does not match.
    #[error("snapshot {path}: checksum mismatch{at} (CRC32 {found:#010x}, the manifest says {expected:#010x}); the file is corrupted, take the snapshot again")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Where in it (empty for the whole file).
        at: String,
        /// CRC found.
        found: u32,
        /// CRC expected.
        expected: u32,
    },
    /// The manifest or state does not parse.
    #[error("snapshot {path} is not valid: {reason}; it is corrupted or not a snapshot of this VMM")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another format version.
    #[error("snapshot {path} has format version {found}; this vmm reads version {FORMAT_VERSION} only: restore it with the vmm that wrote it")]
    WrongVersion {
        /// The manifest.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The files do not belong together or do not fit the VM they describe.
    #[error(
        "snapshot {dir} is inconsistent: {reason}; its files do not belong together, take the snapshot again"
    )]
    Mismatch {
        /// The directory.
        dir: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {gpa:#x} for the snapshot: {source}")]
    ReadMemory {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The state cannot be encoded.
    #[error("cannot encode the VM state: {0}")]
    Encode(#[source] serde_json::Error),
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The vmm version that wrote it (informative).
    pub writer: String,
    /// `state.json`.
    pub state: FileEntry,
    /// `memory.bin`.
    pub memory: MemoryEntry,
}

/// A file and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// The memory file: its logical length and the extents that hold data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Logical length (end of the highest RAM range); the rest is holes.
    pub len: u64,
    /// Guest RAM size the file belongs to.
    pub mem_size: u64,
    /// Data extents, sorted, page aligned, within one [`EXTENT_MAX`] block each.
    pub extents: Vec<Extent>,
}

/// A run of saved pages: file offset = guest-physical address.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    /// Guest-physical address (and file offset).
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// CRC32 of the bytes.
    pub crc32: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes of guest memory saved (the rest is holes).
    pub memory_bytes: u64,
    /// Memory extents.
    pub extents: usize,
    /// Time the VM was paused for the snapshot, in milliseconds.
    pub took_ms: f64,
}

/// What to do once the snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Resume if the VM was running, stay paused if it was paused.
    #[default]
    Restore,
    /// Resume.
    Resume,
    /// Stay paused.
    Pause,
    /// End the run (`GuestEnd::Stopped`).
    Stop,
}

// ---------------------------------------------------------------- saving

/// Writes a snapshot directory from a state and the guest memory. The
/// manifest goes last (by rename): a directory without it is incomplete.
pub fn write_snapshot(dir: &Path, state: &SavedVm, mem: &GuestRam) -> Result<Manifest, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "creating the snapshot directory"))?;
    let manifest_path = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&manifest_path, "removing the old manifest")(e)),
    }
    let state_json = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
    let state_path = dir.join(STATE);
    std::fs::write(&state_path, &state_json).map_err(io_err(&state_path, "writing"))?;
    let memory = write_memory(&dir.join(MEMORY), mem, state.vm.config.mem_size)?;
    let manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        writer: format!("vmm {}", env!("CARGO_PKG_VERSION")),
        state: FileEntry {
            name: STATE.into(),
            len: state_json.len() as u64,
            crc32: crc32fast::hash(&state_json),
        },
        memory,
    };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// Writes `manifest.json` atomically (a temporary file renamed into place).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let manifest_path = dir.join(MANIFEST);
    let tmp = dir.join("manifest.json.tmp");
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Malformed {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
    f.write_all(&text).map_err(io_err(&tmp, "writing"))?;
    f.sync_all().map_err(io_err(&tmp, "syncing"))?;
    std::fs::rename(&tmp, &manifest_path).map_err(io_err(&manifest_path, "renaming the manifest into place"))
}

/// Reads `manifest.json` without any check beyond parsing (tools, tests).
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let text = read_limited(&path, STATE_MAX, dir, MANIFEST)?;
    serde_json::from_slice(&text).map_err(|e| SnapshotError::Malformed {
        path,
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------- loading

/// Parses and checks `manifest.json`'s content as [`Snapshot::open`] does:
/// the magic and the version first (so that another version is named as
/// such), then the fields and the file names. `path` only names the file in
/// errors. A pure function of its input, fuzzed by `fuzz/`'s
/// `snapshot_manifest` target.
pub fn parse_manifest(text: &[u8], path: &Path) -> Result<Manifest, SnapshotError> {
    let malformed = |reason: String| SnapshotError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let head: serde_json::Value = serde_json::from_slice(text).map_err(|e| malformed(e.to_string()))?;
    if head.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
        return Err(malformed(format!("no `magic: \"{MAGIC}\"`")));
    }
    let version = head.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(FORMAT_VERSION)) {
        return Err(SnapshotError::WrongVersion {
            path: path.to_owned(),
            found: version.and_then(|v| u32::try_from(v).ok()).unwrap_or(u32::MAX),
        });
    }
    let manifest: Manifest = serde_json::from_value(head).map_err(|e| malformed(e.to_string()))?;
    if manifest.state.name != STATE || manifest.memory.name != MEMORY {
        return Err(malformed("unexpected file names".into()));
    }
    Ok(manifest)
}

/// A snapshot whose manifest and state were read and checked.
#[derive(Debug)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The state.
    pub state: SavedVm,
}

fn read_limited(path: &Path, limit: u64, dir: &Path, file: &'static str) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            dir: dir.to_owned(),
            file,
        },
        _ => io_err(path, "opening")(e),
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "reading"))?;
    if buf.len() as u64 > limit {
        return Err(SnapshotError::Malformed {
            path: path.to_owned(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(buf)
}

impl Snapshot {
    /// Reads `dir`, checks the manifest (magic, version), the state file
    /// (length, CRC32, parse) and that the memory file and the state fit
    /// together. The memory's extents are checked by [`Snapshot::verify_memory`]
    /// or, for a lazy restore, on first use.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Missing {
                dir: dir.to_owned(),
                file: "the snapshot directory",
            });
        }
        let mpath = dir.join(MANIFEST);
        let text = read_limited(&mpath, STATE_MAX, dir, MANIFEST)?;
        let manifest = parse_manifest(&text, &mpath)?;
        let spath = dir.join(STATE);
        let state_bytes = read_limited(&spath, STATE_MAX, dir, STATE)?;
        let snap = Snapshot::from_files(dir, manifest, &state_bytes)?;
        snap.check_consistency()?;
        Ok(snap)
    }

    /// [`Snapshot::open`] without the reading: checks `state.json`'s content
    /// against a manifest from [`parse_manifest`] (length, CRC32), parses it
    /// and checks it against the manifest's memory extents; not the memory
    /// file. `dir` only names the files in errors. A pure function of its
    /// inputs, fuzzed by `fuzz/`'s `snapshot_manifest` target.
    pub fn from_files(dir: &Path, manifest: Manifest, state_bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let spath = dir.join(STATE);
        if state_bytes.len() as u64 != manifest.state.len {
            return Err(SnapshotError::Truncated {
                path: spath,
                found: state_bytes.len() as u64,
                expected: manifest.state.len,
            });
        }
        let crc = crc32fast::hash(state_bytes);
        if crc != manifest.state.crc32 {
            return Err(SnapshotError::Checksum {
                path: spath,
                at: String::new(),
                found: crc,
                expected: manifest.state.crc32,
            });
        }
        let state: SavedVm = serde_json::from_slice(state_bytes).map_err(|e| SnapshotError::Malformed {
            path: spath,
            reason: e.to_string(),
        })?;
        let snap = Snapshot {
            dir: dir.to_owned(),
            manifest,
            state,
        };
        snap.check_state()?;
        Ok(snap)
    }

    fn mismatch(&self, reason: String) -> SnapshotError {
        SnapshotError::Mismatch {
            dir: self.dir.clone(),
            reason,
        }
    }

    /// Checks the state and the extents against each other (not the files).
    fn check_state(&self) -> Result<(), SnapshotError> {
        let s = &self.state.vm;
        let m = &self.manifest.memory;
        s.check().map_err(|e| self.mismatch(e.0))?;
        if m.mem_size != s.config.mem_size {
            return Err(self.mismatch(format!(
                "the memory file is for {} bytes of RAM, the state for {}",
                m.mem_size, s.config.mem_size
            )));
        }
        let ranges = ram_ranges(s.config.mem_size);
        let end = ram_end(s.config.mem_size);
        if m.len != end {
            return Err(self.mismatch(format!(
                "memory file length {} does not match {} bytes of RAM (expected {end})",
                m.len, s.config.mem_size
            )));
        }
        let mut prev_end = 0;
        for e in &m.extents {
            let in_ram = ranges
                .iter()
                .any(|&(a, l)| e.gpa >= a && e.gpa.checked_add(e.len).is_some_and(|end| end <= a + l));
            // `in_ram` first: it proves gpa + len does not overflow.
            let ok = in_ram
                && e.len > 0
                && e.gpa % PAGE_SIZE == 0
                && e.len % PAGE_SIZE == 0
                && e.len <= EXTENT_MAX
                && e.gpa / EXTENT_MAX == (e.gpa + e.len - 1) / EXTENT_MAX
                && e.gpa >= prev_end;
            if !ok {
                return Err(self.mismatch(format!(
                    "memory extent {:#x}+{:#x} is out of order, unaligned or outside RAM",
                    e.gpa, e.len
                )));
            }
            prev_end = e.end();
        }
        Ok(())
    }

    /// A snapshot received over a migration stream: `state.json`'s content
    /// and the data extents, checked as [`Snapshot::open`] checks a
    /// directory (but there is no memory file). The peer's data, fuzzed by
    /// `fuzz/`'s `snapshot_state` and `migration_wire` targets.
    pub fn from_parts(state_json: &[u8], extents: Vec<Extent>) -> Result<Snapshot, SnapshotError> {
        let path = PathBuf::from("<migration stream>");
        let state: SavedVm = serde_json::from_slice(state_json).map_err(|e| SnapshotError::Malformed {
            path: path.join(STATE),
            reason: e.to_string(),
        })?;
        let mem_size = state.vm.config.mem_size;
        let snap = Snapshot {
            dir: path,
            manifest: Manifest {
                magic: MAGIC.into(),
                version: FORMAT_VERSION,
                writer: String::new(),
                state: FileEntry {
                    name: STATE.into(),
                    len: state_json.len() as u64,
                    crc32: crc32fast::hash(state_json),
                },
                memory: MemoryEntry {
                    name: MEMORY.into(),
                    len: ram_end(mem_size),
                    mem_size,
                    extents,
                },
            },
            state,
        };
        snap.check_state()?;
        Ok(snap)
    }

    /// Checks the memory file against the manifest (its length; the extents'
    /// checksums are checked on use).
    fn check_consistency(&self) -> Result<(), SnapshotError> {
        let m = &self.manifest.memory;
        let mpath = self.memory_path();
        let found = std::fs::metadata(&mpath)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SnapshotError::Missing {
                    dir: self.dir.clone(),
                    file: MEMORY,
                },
                _ => io_err(&mpath, "inspecting")(e),
            })?
            .len();
        if found != m.len {
            return Err(SnapshotError::Truncated {
                path: mpath,
                found,
                expected: m.len,
            });
        }
        Ok(())
    }

    /// The memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// The VM configuration, with guest RAM backed as `memory` says.
    pub fn config(&self, memory: MemoryConfig) -> Result<VmConfig, ConfigError> {
        self.state.vm.config.config(memory)
    }

    /// Checks every extent's CRC32 (reads all saved memory).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let f = File::open(&path).map_err(io_err(&path, "opening"))?;
        let mut buf = vec![0u8; 1 << 20];
        for e in &self.manifest.memory.extents {
            let b = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
            f.read_exact_at(b, e.gpa).map_err(io_err(&path, "reading"))?;
            check_extent(&path, e, b)?;
        }
        Ok(())
    }

    /// Copies the saved memory into `mem` (eager restore), checking each extent.
    pub fn fill_memory(&self, mem: &GuestRam) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let f = File::open(&path).map_err(io_err(&path, "opening"))?;
        for e in &self.manifest.memory.extents {
            let r = mem
                .iter()
                .find(|r| {
                    let a = r.start_addr().raw_value();
                    e.gpa >= a && e.end() <= a + r.len()
                })
                .ok_or_else(|| self.mismatch(format!("extent {:#x} is outside guest RAM", e.gpa)))?;
            let off = e.gpa - r.start_addr().raw_value();
            // SAFETY: the extent lies inside this region's live mapping (checked
            // above); no vCPU runs yet and no userfaultfd is registered, so the
            // write cannot race with or block on anything.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (r.as_ptr() as u64 + off) as *mut u8,
                    usize::try_from(e.len).unwrap_or(0),
                )
            };
            f.read_exact_at(dst, e.gpa).map_err(io_err(&path, "reading"))?;
            check_extent(&path, e, dst)?;
        }
        Ok(())
    }
}

fn check_extent(path: &Path, e: &Extent, data: &[u8]) -> Result<(), SnapshotError> {
    let crc = crc32fast::hash(data);
    if crc != e.crc32 {
        return Err(SnapshotError::Checksum {
            path: path.to_owned(),
            at: format!(" in extent {:#x}+{:#x}", e.gpa, e.len),
            found: crc,
            expected: e.crc32,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_rejects_missing_dir_and_manifest() {
        let e = Snapshot::open(Path::new("/nonexistent/snap")).unwrap_err();
        assert!(matches!(e, SnapshotError::Missing { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("vmm-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Snapshot::open(&dir).unwrap_err();
        assert!(e.to_string().contains("manifest.json is missing"), "{e}");
        std::fs::write(dir.join(MANIFEST), b"{\"magic\":\"vmm-snapshot\",\"version\":99}").unwrap();
        let e = Snapshot::open(&dir).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongVersion { found: 99, .. }), "{e}");
        std::fs::write(dir.join(MANIFEST), b"\x00garbage").unwrap();
        assert!(matches!(
            Snapshot::open(&dir),
            Err(SnapshotError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
