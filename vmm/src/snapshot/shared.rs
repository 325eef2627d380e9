//! Shared snapshot memory for clones (`vmm restore --lazy --clone`).
//!
//! Many VMs start from one snapshot; its memory lives once, in a file on
//! tmpfs (shmem) laid out by guest-physical address, and every clone maps
//! that file privately: a read maps the shared page-cache page (a MINOR
//! fault resolved with UFFDIO_CONTINUE), a write copies the page into the
//! clone alone. See `docs/memory-backings.md`.
//!
//! Ownership across separate `vmm restore` processes:
//! - the file is `DIR/<digest>.mem`, `DIR` an owner-only directory
//!   (default `/dev/shm/vmm-clones-<uid>`, `--clone-dir`), `<digest>` the
//!   snapshot manifest's digest, so a snapshot taken again (new digest)
//!   gets a new file;
//! - the first clone loads it: into an unnamed `O_TMPFILE` in `DIR`, every
//!   extent checked against its hash (as an eager restore does), then made
//!   read-only and linked into place, so no clone ever sees a half-loaded
//!   file; a clone that loses the race to link uses the winner's file;
//! - every clone holds a shared `flock` on its open file while it runs;
//!   when a clone ends it tries an exclusive lock without waiting, and the
//!   last one (the lock is free) unlinks the file; the memory is freed when
//!   the last mapping goes. A clone that opened the file just before the
//!   unlink keeps a valid (unlinked) file; the next one loads a new one.
//! - A later write to the snapshot's `memory.bin` never shows in a running
//!   clone: the clones map the copy, never the snapshot file.

use super::{Snapshot, SnapshotError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of shared clone memory.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The clone directory is unusable.
    #[error("clone directory {dir}: {reason}; give --clone-dir an owner-only directory on tmpfs (e.g. /dev/shm/vmm-clones-$UID)")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An IO error on the shared file.
    #[error("shared clone memory {path}: {what} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Loading the snapshot into the file failed.
    #[error("cannot load the snapshot into shared clone memory: {0}")]
    Load(#[from] SnapshotError),
    /// Mapping the file to load it failed.
    #[error("cannot map shared clone memory: {0}")]
    Map(#[from] vmm_core::memory::BackingError),
}

/// One clone's hold on the shared memory of a snapshot. Dropping the last
/// one (in any process) unlinks the file.
#[derive(Debug)]
pub struct SharedMemory {
    file: Arc<File>,
    path: PathBuf,
    /// Whether this process loaded the file.
    pub loaded_here: bool,
}

/// The default clone directory of this user.
pub fn default_dir() -> PathBuf {
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/dev/shm/vmm-clones-{uid}"))
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SharedError {
    let path = path.to_owned();
    move |source| SharedError::Io { path, what, source }
}

/// Creates `dir` (0700) if needed and checks it is ours and owner-only.
fn check_dir(dir: &Path) -> Result<(), SharedError> {
    let bad = |reason: String| SharedError::Dir {
        dir: dir.to_owned(),
        reason,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(bad(format!("cannot create it: {e}"))),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !m.is_dir() {
        return Err(bad("it is not a directory (or a symlink)".into()));
    }
    if m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "it is owned by uid {} with mode {:o}; it must be yours and owner-only",
            m.uid(),
            m.mode() & 0o777
        )));
    }
    Ok(())
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on our own descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl SharedMemory {
    /// Opens the shared memory of `snap` in `dir`, loading it if no clone
    /// has yet, and holds it.
    pub fn open_or_load(snap: &Snapshot, dir: &Path) -> Result<SharedMemory, SharedError> {
        check_dir(dir)?;
        let digest: String = snap
            .manifest
            .digest
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        let path = dir.join(format!("{digest}.mem"));
        let mem_size = snap.state.vm.config.mem_size;
        let len = vmm_core::memory::backing::file_len(mem_size);
        for _ in 0..3 {
            if let Some(file) = Self::open_existing(&path, len)? {
                return Ok(SharedMemory {
                    file: Arc::new(file),
                    path,
                    loaded_here: false,
                });
            }
            if let Some(file) = Self::load(snap, dir, &path, len)? {
                return Ok(SharedMemory {
                    file,
                    path,
                    loaded_here: true,
                });
            }
        }
        Err(SharedError::Dir {
            dir: dir.to_owned(),
            reason: format!("{} keeps appearing and vanishing", path.display()),
        })
    }

    fn open_existing(path: &Path, len: u64) -> Result<Option<File>, SharedError> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path, "opening")(e)),
        };
        flock(&file, libc::LOCK_SH).map_err(io(path, "locking"))?;
        let m = file.metadata().map_err(io(path, "inspecting"))?;
        if !m.is_file() || m.len() != len {
            return Err(SharedError::Dir {
                dir: path.parent().unwrap_or(path).to_owned(),
                reason: format!(
                    "{} is {} bytes, not the {len} of this snapshot's RAM; remove it",
                    path.display(),
                    m.len()
                ),
            });
        }
        Ok(Some(file))
    }

    /// Loads the snapshot into a new file and links it at `path`; `None` if
    /// another clone linked one first.
    fn load(snap: &Snapshot, dir: &Path, path: &Path, len: u64) -> Result<Option<Arc<File>>, SharedError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io(dir, "creating a temporary file (O_TMPFILE, tmpfs)"))?;
        file.set_len(len).map_err(io(path, "sizing"))?;
        let file = Arc::new(file);
        {
            let ram = vmm_core::memory::backing::map_file(
                &file,
                snap.state.vm.config.mem_size,
                true,
                vmm_core::MemBacking::Memfd,
            )?;
            snap.fill_memory(&ram)?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o400))
            .map_err(io(path, "making read-only"))?;
        flock(&file, libc::LOCK_SH).map_err(io(path, "locking"))?;
        let proc = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| io(path, "naming")(std::io::Error::other(e)))?;
        let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io(path, "naming")(std::io::Error::other(e)))?;
        // SAFETY: both are valid C strings; linkat only creates a directory entry.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(None);
            }
            return Err(io(path, "linking")(e));
        }
        Ok(Some(file))
    }

    /// The file (read-only; map it privately).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // The last holder (no other shared lock) unlinks, if the name is
        // still this file.
        if flock(&self.file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return;
        }
        let same = match (std::fs::symlink_metadata(&self.path), self.file.metadata()) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
