//! Writing a snapshot safely: into a new, owner-only temporary directory
//! beside the target (files created new, never through an existing path or
//! symlink), every file and the directory synced, then renamed into place
//! (exchanged atomically with an older snapshot there, which is removed only
//! afterwards). A failure leaves the target as it was.

use super::format::{new_id, Extent, FileEntry, Hasher, Manifest, MemoryEntry, SnapshotKey};
use super::memory::{create_file, data_extents, write_hashes, write_memory, LayoutKind, MemoryLayout};
use super::{io_err, SnapshotError, FORMAT_VERSION, HASHES, MAGIC, MANIFEST, MEMORY, STATE, STATE_MAX};
use crate::state::SavedVm;
use devices::GuestRam;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

fn target_err(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Target {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Checks that `dir` may receive a snapshot: it does not exist, or it is a
/// real directory (not a symlink) that is empty or holds a snapshot.
fn check_target(dir: &Path) -> Result<bool, SnapshotError> {
    if dir.as_os_str().is_empty() {
        return Err(target_err(dir, "the path is empty"));
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(dir, "inspecting the snapshot directory")(e)),
        Ok(m) if m.file_type().is_symlink() => Err(target_err(
            dir,
            "it is a symbolic link; give the real directory (a snapshot is never written through a link)",
        )),
        Ok(m) if !m.is_dir() => Err(target_err(dir, "it exists and is not a directory")),
        // Replacing a directory removes the old one: never another user's
        // (root included: a snapshot over someone's directory destroys it).
        Ok(m) if m.uid() != crate::peercred::our_uid() => Err(target_err(
            dir,
            format!(
                "it belongs to another user (uid {}); give a new directory or one of your own",
                m.uid()
            ),
        )),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dir).map_err(io_err(dir, "listing the snapshot directory"))?;
            if entries.next().is_some() && !dir.join(MANIFEST).exists() {
                return Err(target_err(
                    dir,
                    "it is a directory that holds other files and no snapshot; give an empty or new directory",
                ));
            }
            Ok(true)
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "syncing the directory"))
}

/// Exchanges two paths atomically (both must exist).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: renameat2 reads two NUL-terminated paths; AT_FDCWD resolves
    // them like rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes the memory file at the path given, laid out as the layout given,
/// and returns its data extents and block hashes (ascending).
pub(super) type MemoryWriter<'a> =
    dyn FnOnce(&Path, &MemoryLayout, &Hasher) -> Result<(Vec<Extent>, Vec<u8>), SnapshotError> + 'a;

/// Writes the files into `tmp` and returns the manifest.
fn write_files(
    tmp: &Path,
    state: &SavedVm,
    memory: Box<MemoryWriter<'_>>,
    h: &Hasher,
) -> Result<Manifest, SnapshotError> {
    let state_json = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
    if state_json.len() as u64 > STATE_MAX {
        return Err(SnapshotError::TooLarge {
            len: state_json.len() as u64,
        });
    }
    let state_path = tmp.join(STATE);
    let mut f = create_file(&state_path)?;
    f.write_all(&state_json).map_err(io_err(&state_path, "writing"))?;
    f.sync_all().map_err(io_err(&state_path, "syncing"))?;
    let mem_size = state.vm.config.mem_size;
    let layout = MemoryLayout::new(LayoutKind::Packed, mem_size);
    let (extents, hashes) = memory(&tmp.join(MEMORY), &layout, h)?;
    write_hashes(&tmp.join(HASHES), &hashes)?;
    let mut manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        writer: format!("vmm {}", env!("CARGO_PKG_VERSION")),
        id: new_id(),
        keyed: h.keyed(),
        state: FileEntry {
            name: STATE.into(),
            len: state_json.len() as u64,
            hash: h.hex(&state_json),
        },
        memory: MemoryEntry {
            name: MEMORY.into(),
            len: layout.file_len(),
            mem_size,
            layout,
            extents,
            hashes: FileEntry {
                name: HASHES.into(),
                len: hashes.len() as u64,
                hash: h.hex(&hashes),
            },
        },
        digest: String::new(),
    };
    manifest.seal(h)?;
    write_manifest_file(&tmp.join(MANIFEST), &manifest)?;
    sync_dir(tmp)?;
    Ok(manifest)
}

fn write_manifest_file(path: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let text = serde_json::to_vec_pretty(manifest).map_err(SnapshotError::Encode)?;
    let mut f = create_file(path)?;
    f.write_all(&text).map_err(io_err(path, "writing"))?;
    f.sync_all().map_err(io_err(path, "syncing"))
}

/// Writes a snapshot of `state` and `mem` to `dir` (see the module
/// documentation); `key` authenticates it.
pub fn write_snapshot(
    dir: &Path,
    state: &SavedVm,
    mem: &GuestRam,
    key: Option<&SnapshotKey>,
) -> Result<Manifest, SnapshotError> {
    write_snapshot_with(
        dir,
        state,
        key,
        Box::new(|path, layout, h| {
            let extents = data_extents(mem)?;
            let hashes = write_memory(path, mem, layout, &extents, h)?;
            Ok((extents, hashes))
        }),
    )
}

/// [`write_snapshot`] with the memory file written by `memory`.
pub(super) fn write_snapshot_with(
    dir: &Path,
    state: &SavedVm,
    key: Option<&SnapshotKey>,
    memory: Box<MemoryWriter<'_>>,
) -> Result<Manifest, SnapshotError> {
    let exists = check_target(dir)?;
    let name = dir
        .file_name()
        .ok_or_else(|| target_err(dir, "it has no final component (e.g. `/` or `..`)"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        &new_id()[..8]
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io_err(&tmp, "creating the temporary snapshot directory"))?;
    let h = Hasher::new(key);
    let result = write_files(&tmp, state, memory, &h).and_then(|manifest| {
        if exists {
            // The old snapshot moves to `tmp`, the new one into place.
            exchange(&tmp, dir).map_err(io_err(dir, "replacing the older snapshot"))?;
        } else {
            std::fs::rename(&tmp, dir).map_err(io_err(dir, "renaming the snapshot into place"))?;
        }
        sync_dir(&parent)?;
        Ok(manifest)
    });
    // The temporary directory holds the new files (failure) or the old
    // snapshot (replaced): either way it goes.
    if tmp.exists() {
        if let Err(e) = std::fs::remove_dir_all(&tmp) {
            tracing::warn!("cannot remove {}: {e}", tmp.display());
        }
    }
    result
}

/// Rewrites `manifest.json` of `dir`, sealed again with `key` (tools and
/// tests that edit a snapshot; an unkeyed snapshot's digest is no
/// authentication).
pub fn write_manifest(
    dir: &Path,
    manifest: &Manifest,
    key: Option<&SnapshotKey>,
) -> Result<(), SnapshotError> {
    let mut m = manifest.clone();
    let h = Hasher::new(key);
    m.keyed = h.keyed();
    m.seal(&h)?;
    let path = dir.join(MANIFEST);
    let tmp = dir.join(".manifest.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_manifest_file(&tmp, &m)?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path, "renaming the manifest into place"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_users_directory_is_never_replaced() {
        let base = std::env::temp_dir().join(format!("vmm-target-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let theirs = base.join("theirs");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join(MANIFEST), b"{}").unwrap();
        // Ours, holding a snapshot: may be replaced.
        assert!(check_target(&theirs).unwrap());
        let other = if crate::peercred::our_uid() == 0 { 65534 } else { 0 };
        let c = CString::new(theirs.as_os_str().as_bytes()).unwrap();
        // SAFETY: chown reads a NUL-terminated path; ids by value.
        if unsafe { libc::chown(c.as_ptr(), other, other) } == 0 {
            let e = check_target(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to another user"), "{e}");
        } else {
            assert!(crate::peercred::our_uid() != 0, "root could not chown");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
