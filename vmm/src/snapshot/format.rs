//! The manifest: what a snapshot directory holds and the digests that bind
//! its files together. Every file is covered: `state.json` and the page
//! hashes file by their hash in the manifest, each data page of `memory.bin`
//! by its own hash in the page hashes file, and the manifest itself (the
//! extent list included) by its digest. With a snapshot key the hashes and
//! the digest are keyed (BLAKE3's keyed mode, a MAC): a snapshot from
//! elsewhere then cannot have been written by anyone without the key.

use super::memory::MemoryLayout;
use super::{SnapshotError, FORMAT_VERSION, HASHES, MAGIC, MEMORY, STATE};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
    /// This snapshot's identity (128 random bits, hex): files derived from
    /// it (a working set, a packed view) name it.
    pub id: String,
    /// Whether the hashes and the digest are keyed (`--snapshot-key`).
    pub keyed: bool,
    /// `state.json`.
    pub state: FileEntry,
    /// `memory.bin` and its page hashes.
    pub memory: MemoryEntry,
    /// The hash of this manifest with `digest` empty.
    pub digest: String,
}

/// A file and its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// BLAKE3 (keyed if the snapshot is) of the whole file, hex.
    pub hash: String,
}

/// The memory file: its logical length, the extents that hold data, and the
/// file of their page hashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Logical length (the layout's end); what no extent covers is holes.
    pub len: u64,
    /// Guest RAM size the file belongs to.
    pub mem_size: u64,
    /// Where each RAM region lies in the file.
    pub layout: MemoryLayout,
    /// Data extents, sorted, page aligned, within one `EXTENT_MAX` block each.
    pub extents: Vec<Extent>,
    /// One 32-byte hash per data page, in extent order.
    pub hashes: FileEntry,
}

/// A run of saved pages, keyed by guest-physical address (the layout places
/// it in the file).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// A snapshot key: 32 bytes that key the hashes (`--snapshot-key FILE`).
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotKey([u8; 32]);

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotKey(..)")
    }
}

impl SnapshotKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: [u8; 32]) -> SnapshotKey {
        SnapshotKey(bytes)
    }

    /// Reads a key file: 32 raw bytes, or 64 hex digits (a newline allowed).
    pub fn load(path: &Path) -> Result<SnapshotKey, SnapshotError> {
        let bad = |reason: String| SnapshotError::Key {
            path: path.to_owned(),
            reason,
        };
        // Whoever can read the key can forge snapshots this user restores:
        // like a TLS key, it must be this user's alone (checked on the file
        // opened, after it proved to be a regular file).
        let f = vmm_core::files::open_regular(path).map_err(|e| bad(e.to_string()))?;
        let mode = f.metadata().map_err(|e| bad(e.to_string()))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "it can be read or written by other users (mode {mode:o}): run `chmod 600 {}`",
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        f.take(4097)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() > 4096 {
            return Err(bad(
                "more than 4096 bytes; a key is 32 raw bytes or 64 hex digits (e.g. `head -c 32 /dev/urandom > KEY`)".into(),
            ));
        }
        if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(SnapshotKey(raw));
        }
        let text = String::from_utf8_lossy(&bytes);
        let hex = text.trim();
        let mut key = [0u8; 32];
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "{} bytes; a key is 32 raw bytes or 64 hex digits (e.g. `head -c 32 /dev/urandom > KEY`)",
                bytes.len()
            )));
        }
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| bad(e.to_string()))?;
        }
        Ok(SnapshotKey(key))
    }
}

/// Hashes with the snapshot's key, or plainly.
#[derive(Debug, Clone)]
pub struct Hasher(Option<[u8; 32]>);

impl Hasher {
    /// The hasher of a snapshot written or read with `key`.
    pub fn new(key: Option<&SnapshotKey>) -> Hasher {
        Hasher(key.map(|k| k.0))
    }

    /// Whether it is keyed.
    pub fn keyed(&self) -> bool {
        self.0.is_some()
    }

    fn start(&self) -> blake3::Hasher {
        match &self.0 {
            Some(k) => blake3::Hasher::new_keyed(k),
            None => blake3::Hasher::new(),
        }
    }

    /// The 32-byte hash of `data`.
    pub fn hash(&self, data: &[u8]) -> [u8; 32] {
        *self.start().update(data).finalize().as_bytes()
    }

    /// The hash of `data`, hex.
    pub fn hex(&self, data: &[u8]) -> String {
        self.start().update(data).finalize().to_hex().to_string()
    }
}

impl Manifest {
    /// The digest the manifest must carry: its hash with `digest` empty.
    pub fn compute_digest(&self, h: &Hasher) -> Result<String, SnapshotError> {
        let mut unsigned = self.clone();
        unsigned.digest.clear();
        let bytes = serde_json::to_vec(&unsigned).map_err(SnapshotError::Encode)?;
        Ok(h.hex(&bytes))
    }

    /// Sets the digest.
    pub fn seal(&mut self, h: &Hasher) -> Result<(), SnapshotError> {
        self.digest = self.compute_digest(h)?;
        Ok(())
    }

    /// Parses a manifest (magic and version first, so that another version
    /// is named as such) without checking its digest.
    pub fn parse(text: &[u8], path: &Path) -> Result<Manifest, SnapshotError> {
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
        if manifest.state.name != STATE
            || manifest.memory.name != MEMORY
            || manifest.memory.hashes.name != HASHES
        {
            return Err(malformed("unexpected file names".into()));
        }
        Ok(manifest)
    }

    /// Checks the digest with `h` (and that the key situation matches).
    pub fn verify(&self, h: &Hasher, path: &Path) -> Result<(), SnapshotError> {
        match (self.keyed, h.keyed()) {
            (true, false) => {
                return Err(SnapshotError::KeyNeeded {
                    path: path.to_owned(),
                })
            }
            (false, true) => {
                return Err(SnapshotError::NotKeyed {
                    path: path.to_owned(),
                })
            }
            _ => {}
        }
        if self.compute_digest(h)? != self.digest {
            return Err(SnapshotError::Digest {
                path: path.to_owned(),
                keyed: self.keyed,
            });
        }
        Ok(())
    }
}

/// A fresh snapshot identity: 128 random bits, hex.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    // getrandom never fails for 16 bytes once the pool is initialized; a
    // failure leaves zeros and the time below still makes the id unique.
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    blake3::Hasher::new()
        .update(&b)
        .update(&t.to_le_bytes())
        .update(&std::process::id().to_le_bytes())
        .finalize()
        .to_hex()[..32]
        .to_string()
}
