//! Opening a snapshot and checking everything before the guest runs: the
//! manifest (magic, version, digest, key), the state file (length, hash,
//! parse, consistency with the manifest), the page hashes file (length,
//! hash), the memory file (a regular file of the right length). Pages are
//! checked against their hashes whenever they are read (eager fill, lazy
//! source).

use super::format::{Extent, Hasher, Manifest, SnapshotKey};
use super::memory::{data_blocks, LayoutKind, MemoryLayout, PageHashes, HASH_BLOCK, HASH_BLOCK_LEN};
use super::{io_err, SnapshotError, EXTENT_MAX, HASHES, MANIFEST, MEMORY, STATE, STATE_MAX};
use crate::state::SavedVm;
use abi::layout::{ram_ranges, PAGE_SIZE};
use devices::GuestRam;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_core::config::{ConfigError, MemoryConfig, VmConfig};

/// A snapshot whose manifest, state and page hashes were read and checked.
#[derive(Debug)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The state.
    pub state: SavedVm,
    /// The hash of every data page.
    pub pages: std::sync::Arc<PageHashes>,
}

/// Reads a whole regular file of at most `limit` bytes; a missing file is
/// named as such.
fn read_file(path: &Path, limit: u64, dir: &Path, file: &'static str) -> Result<Vec<u8>, SnapshotError> {
    let f = vmm_core::files::open_regular(path).map_err(|e| match e.kind() {
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

/// Reads `manifest.json` without any check beyond parsing (tools, tests).
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let text = read_file(&path, STATE_MAX, dir, MANIFEST)?;
    Manifest::parse(&text, &path)
}

/// Checks the state against the memory file's layout and the extents:
/// counts, sizes, the layout the one of its kind for this RAM, and every
/// extent aligned, sorted, inside RAM, within one [`EXTENT_MAX`] block.
fn check_layout(
    state: &SavedVm,
    mem_size: u64,
    len: u64,
    layout: &MemoryLayout,
    extents: &[Extent],
) -> Result<(), String> {
    let s = &state.vm;
    s.check().map_err(|e| e.0)?;
    if mem_size != s.config.mem_size {
        return Err(format!(
            "the memory file is for {mem_size} bytes of RAM, the state for {}",
            s.config.mem_size
        ));
    }
    if !layout.fits(s.config.mem_size) {
        return Err(format!(
            "the memory layout {:x?} is not the {:?} layout of {} bytes of RAM",
            layout.regions, layout.kind, s.config.mem_size
        ));
    }
    let end = layout.file_len();
    if len != end {
        return Err(format!(
            "memory file length {len} does not match {} bytes of RAM (expected {end})",
            s.config.mem_size
        ));
    }
    let ranges = ram_ranges(s.config.mem_size);
    let mut prev_end = 0;
    for e in extents {
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
            return Err(format!(
                "memory extent {:#x}+{:#x} is out of order, unaligned or outside RAM",
                e.gpa, e.len
            ));
        }
        prev_end = e.end();
    }
    Ok(())
}

/// A VM state received over a migration stream, with the data extents: the
/// same checks as a snapshot's (there are no files).
pub fn check_received(state_json: &[u8], extents: &[Extent]) -> Result<SavedVm, SnapshotError> {
    let path = PathBuf::from("<migration stream>");
    let state: SavedVm = serde_json::from_slice(state_json).map_err(|e| SnapshotError::Malformed {
        path: path.join(STATE),
        reason: e.to_string(),
    })?;
    let mem_size = state.vm.config.mem_size;
    let layout = MemoryLayout::new(LayoutKind::Packed, mem_size);
    check_layout(&state, mem_size, layout.file_len(), &layout, extents)
        .map_err(|reason| SnapshotError::Mismatch { dir: path, reason })?;
    Ok(state)
}

/// Checks `state.json`'s content against a verified manifest: its length,
/// its hash, its parse, and the state against the memory layout and extents.
fn check_state_file(
    dir: &Path,
    manifest: &Manifest,
    h: &Hasher,
    state_bytes: &[u8],
) -> Result<SavedVm, SnapshotError> {
    let spath = dir.join(STATE);
    if state_bytes.len() as u64 != manifest.state.len {
        return Err(SnapshotError::Truncated {
            path: spath,
            found: state_bytes.len() as u64,
            expected: manifest.state.len,
        });
    }
    if h.hex(state_bytes) != manifest.state.hash {
        return Err(SnapshotError::Checksum {
            path: spath,
            at: String::new(),
        });
    }
    let state: SavedVm = serde_json::from_slice(state_bytes).map_err(|e| SnapshotError::Malformed {
        path: spath,
        reason: e.to_string(),
    })?;
    let m = &manifest.memory;
    check_layout(&state, m.mem_size, m.len, &m.layout, &m.extents).map_err(|reason| {
        SnapshotError::Mismatch {
            dir: dir.to_owned(),
            reason,
        }
    })?;
    Ok(state)
}

/// The length the page hashes file must have: 32 bytes per data block, as
/// the manifest must say too.
fn hashes_len(dir: &Path, manifest: &Manifest) -> Result<u64, SnapshotError> {
    let m = &manifest.memory;
    let blocks = data_blocks(&m.extents).len() as u64;
    let want = blocks.saturating_mul(32);
    if m.hashes.len != want {
        return Err(SnapshotError::Mismatch {
            dir: dir.to_owned(),
            reason: format!("{} bytes of page hashes for {blocks} data blocks", m.hashes.len),
        });
    }
    Ok(want)
}

/// Checks the page hashes file's content against the manifest's hash of it.
fn check_hashes_file(
    dir: &Path,
    manifest: &Manifest,
    h: &Hasher,
    hashes: &[u8],
) -> Result<(), SnapshotError> {
    if h.hex(hashes) != manifest.memory.hashes.hash {
        return Err(SnapshotError::Checksum {
            path: dir.join(HASHES),
            at: String::new(),
        });
    }
    Ok(())
}

impl Snapshot {
    /// Reads `dir` and checks everything but the memory pages (see the
    /// module documentation); `key` is the snapshot key it was written with.
    pub fn open(dir: &Path, key: Option<&SnapshotKey>) -> Result<Snapshot, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Missing {
                dir: dir.to_owned(),
                file: "the snapshot directory",
            });
        }
        let h = Hasher::new(key);
        let mpath = dir.join(MANIFEST);
        let manifest = read_manifest(dir)?;
        manifest.verify(&h, &mpath)?;

        let spath = dir.join(STATE);
        let state_bytes = read_file(&spath, STATE_MAX, dir, STATE)?;
        let state = check_state_file(dir, &manifest, &h, &state_bytes)?;

        let want = hashes_len(dir, &manifest)?;
        let hpath = dir.join(HASHES);
        let found = std::fs::metadata(&hpath).map(|md| md.len()).unwrap_or(0);
        if found != want && hpath.exists() {
            return Err(SnapshotError::Truncated {
                path: hpath,
                found,
                expected: want,
            });
        }
        let hashes = read_file(&hpath, want, dir, HASHES)?;
        check_hashes_file(dir, &manifest, &h, &hashes)?;

        let m = &manifest.memory;
        let mem_path = dir.join(MEMORY);
        let found = vmm_core::files::open_regular(&mem_path)
            .and_then(|f| f.metadata())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SnapshotError::Missing {
                    dir: dir.to_owned(),
                    file: MEMORY,
                },
                _ => io_err(&mem_path, "inspecting")(e),
            })?
            .len();
        if found != m.len {
            return Err(SnapshotError::Truncated {
                path: mem_path,
                found,
                expected: m.len,
            });
        }
        Ok(Snapshot::assemble(dir, manifest, state, hashes, h))
    }

    /// [`Snapshot::open`] over the contents of `manifest.json`, `state.json`
    /// and `memory.hashes`, with the same checks in the same order (the
    /// digest and key, the state's length, hash, parse and layout, the page
    /// hashes' length and hash); not the memory file, whose pages
    /// [`PageHashes::check_block`] checks on each read. `dir` only names the
    /// files in errors. A pure function of its inputs: `fuzz/`'s
    /// `snapshot_manifest`, `snapshot_state` and `snapshot_integrity`
    /// targets call it.
    pub fn from_contents(
        dir: &Path,
        key: Option<&SnapshotKey>,
        manifest_text: &[u8],
        state_bytes: &[u8],
        hashes: &[u8],
    ) -> Result<Snapshot, SnapshotError> {
        let h = Hasher::new(key);
        let mpath = dir.join(MANIFEST);
        let manifest = Manifest::parse(manifest_text, &mpath)?;
        manifest.verify(&h, &mpath)?;
        let state = check_state_file(dir, &manifest, &h, state_bytes)?;
        let want = hashes_len(dir, &manifest)?;
        if hashes.len() as u64 != want {
            return Err(SnapshotError::Truncated {
                path: dir.join(HASHES),
                found: hashes.len() as u64,
                expected: want,
            });
        }
        check_hashes_file(dir, &manifest, &h, hashes)?;
        Ok(Snapshot::assemble(dir, manifest, state, hashes.to_vec(), h))
    }

    fn assemble(dir: &Path, manifest: Manifest, state: SavedVm, hashes: Vec<u8>, h: Hasher) -> Snapshot {
        let m = &manifest.memory;
        let pages = std::sync::Arc::new(PageHashes::new(&m.extents, hashes, h, m.layout.clone()));
        Snapshot {
            dir: dir.to_owned(),
            manifest,
            state,
            pages,
        }
    }

    /// The memory file's layout.
    pub fn layout(&self) -> MemoryLayout {
        self.manifest.memory.layout.clone()
    }

    /// The memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// The VM configuration, with guest RAM backed as `memory` says.
    pub fn config(&self, memory: MemoryConfig) -> Result<VmConfig, ConfigError> {
        self.state.vm.config.config(memory)
    }

    /// Reads every data block of the memory file, checked against its hash,
    /// and gives it to `each` (its address and content).
    fn for_each_block(
        &self,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let f = vmm_core::files::open_regular(&path).map_err(io_err(&path, "opening"))?;
        let mut block = vec![0u8; HASH_BLOCK_LEN];
        for b in data_blocks(&self.manifest.memory.extents) {
            let ok = self
                .pages
                .read_checked(&f, b, &mut block)
                .map_err(io_err(&path, "reading"))?;
            if !ok {
                return Err(SnapshotError::Checksum {
                    path: path.clone(),
                    at: format!(" in guest pages {b:#x}..{:#x}", b + HASH_BLOCK),
                });
            }
            each(b, &block)?;
        }
        Ok(())
    }

    /// Checks every data block against its hash (reads all saved memory).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        self.for_each_block(|_, _| Ok(()))
    }

    /// Copies the saved memory into `mem` (eager restore), checking each block.
    pub fn fill_memory(&self, mem: &GuestRam) -> Result<(), SnapshotError> {
        self.for_each_block(|b, block| {
            // Only the data pages: the others stay untouched (and zero).
            for e in self.pages.overlapping(b, b + HASH_BLOCK) {
                let lo = e.gpa.max(b);
                let hi = e.end().min(b + HASH_BLOCK);
                let r = mem
                    .iter()
                    .find(|r| {
                        let a = r.start_addr().raw_value();
                        lo >= a && hi <= a + r.len()
                    })
                    .ok_or_else(|| SnapshotError::Mismatch {
                        dir: self.dir.clone(),
                        reason: format!("extent {:#x} is outside guest RAM", e.gpa),
                    })?;
                let off = lo - r.start_addr().raw_value();
                let len = usize::try_from(hi - lo).unwrap_or(0);
                let src = usize::try_from(lo - b).unwrap_or(0);
                // SAFETY: `lo..hi` lies inside this region's live mapping (checked
                // above); no vCPU runs yet and no userfaultfd is registered, so the
                // write cannot race with or block on anything.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((r.as_ptr() as u64 + off) as *mut u8, len) };
                dst.copy_from_slice(&block[src..src + len]);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_rejects_missing_dir_and_manifest() {
        let e = Snapshot::open(Path::new("/nonexistent/snap"), None).unwrap_err();
        assert!(matches!(e, SnapshotError::Missing { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("vmm-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Snapshot::open(&dir, None).unwrap_err();
        assert!(e.to_string().contains("manifest.json is missing"), "{e}");
        std::fs::write(dir.join(MANIFEST), b"{\"magic\":\"vmm-snapshot\",\"version\":99}").unwrap();
        let e = Snapshot::open(&dir, None).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongVersion { found: 99, .. }), "{e}");
        std::fs::write(dir.join(MANIFEST), b"\x00garbage").unwrap();
        assert!(matches!(
            Snapshot::open(&dir, None),
            Err(SnapshotError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
