//! Snapshots: the on-disk format (`docs/snapshot.md`), writing one from a
//! captured state and guest memory, and opening and checking one before a
//! restore. The state itself is composed by the components (`vmm_core::state`,
//! [`crate::state`]); this module only stores it.
//!
//! A snapshot is a directory (mode 0700) with four files (mode 0600):
//! - `manifest.json` ([`format`]): magic, format version, identity, the
//!   other files' lengths and hashes, the memory extents, and a digest over
//!   all of it;
//! - `state.json`: a [`SavedVm`]: configuration, memory layout, per-vCPU KVM
//!   state, irqchip and PIT, devices (the page store's reads in flight
//!   included), controller state;
//! - `memory.bin`: guest RAM as a sparse file, its RAM regions packed back
//!   to back (the layout, [`MemoryLayout`], is in the manifest; Firecracker's
//!   page-fault handlers read this layout); only pages that exist and are not
//!   all zero are written, in extents of at most [`EXTENT_MAX`] bytes keyed by
//!   guest-physical address;
//! - `memory.hashes`: one 32-byte BLAKE3 hash per data page, so every page
//!   is checked whenever it is read, eagerly or lazily, at the cost of one
//!   page hash.
//!
//! A snapshot is written into a temporary directory beside its target and
//! renamed into place at the end ([`write`]): an older snapshot there
//! survives a failed new one, and nothing is written through a planted
//! symlink. With a [`SnapshotKey`] the hashes are keyed (a MAC).
//!
//! Versioning ([`FORMAT_VERSION`]): any change to what a file holds or means
//! (a field of `state.json` or of a component's state, the memory file's
//! layout, the manifest) bumps the version. This VMM reads only its own
//! version and refuses any other with a message naming both.

pub mod format;
pub mod live;
pub mod memory;
pub mod open;
pub mod shared;
pub mod source;
pub mod working_set;
pub mod write;

pub use format::{Extent, FileEntry, Hasher, Manifest, MemoryEntry, SnapshotKey};
pub use memory::{data_extents, ram_end, FileRegion, LayoutKind, MemoryLayout, PageHashes};
pub use open::{check_received, read_manifest, Snapshot};
pub use write::{write_manifest, write_snapshot};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The format version this VMM writes and reads. Version 4: the memory
/// file's RAM regions are packed back to back and the manifest records the
/// layout (`memory.layout`). Version 3: BLAKE3 hashes of every page block
/// and file, a digest over the manifest, an identity.
pub const FORMAT_VERSION: u32 = 4;
/// The manifest's magic string.
pub const MAGIC: &str = "vmm-snapshot";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// State file name.
pub const STATE: &str = "state.json";
/// Memory file name.
pub const MEMORY: &str = "memory.bin";
/// Page hashes file name.
pub const HASHES: &str = "memory.hashes";
/// Largest memory extent; extents never cross a multiple of it.
pub const EXTENT_MAX: u64 = 1 << 20;
/// Largest state file, checked when a snapshot is taken and when it is read.
pub const STATE_MAX: u64 = 64 << 20;

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
    /// A hash does not match.
    #[error("snapshot {path}: checksum mismatch{at}; the file is corrupted or belongs to another snapshot, take the snapshot again")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Where in it (empty for the whole file).
        at: String,
    },
    /// The manifest's digest does not match its content.
    #[error("snapshot {path}: the manifest's digest does not match its content{}; it was edited or corrupted, take the snapshot again", if *keyed { " (or the snapshot key is not the one it was written with)" } else { "" })]
    Digest {
        /// The manifest.
        path: PathBuf,
        /// Whether it is keyed.
        keyed: bool,
    },
    /// A keyed snapshot restored without its key.
    #[error("snapshot {path} is authenticated with a key: give it with --snapshot-key FILE")]
    KeyNeeded {
        /// The manifest.
        path: PathBuf,
    },
    /// A key was given for a snapshot that has none.
    #[error("snapshot {path} is not authenticated (it was written without --snapshot-key), but a key was given: it may come from anyone; restore it without the key only if you trust its source")]
    NotKeyed {
        /// The manifest.
        path: PathBuf,
    },
    /// A snapshot key file that is not one.
    #[error("snapshot key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
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
    /// The target cannot safely hold a snapshot.
    #[error("cannot write a snapshot to {path}: {reason}")]
    Target {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The VM's state is larger than any snapshot may be.
    #[error("the VM state is {len} bytes, more than the {STATE_MAX} a snapshot may hold; the snapshot was not written")]
    TooLarge {
        /// Its size.
        len: u64,
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
    /// A live snapshot could not save guest memory.
    #[error("live snapshot: saving guest memory at {gpa:#x} failed: {reason}; the VM was paused and the snapshot was not written: resume it and take the snapshot again (or without --live)")]
    LiveSave {
        /// Where.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// A live snapshot was abandoned before it was written.
    #[error("live snapshot abandoned: {0}; the snapshot was not written")]
    LiveAborted(String),
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

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// The snapshot's identity.
    pub id: String,
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
