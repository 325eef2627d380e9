//! A working-set file (`DIR/working-set`) as `vmm restore --prefetch
//! working-set` reads it: `WorkingSet::decode_file` with the digest of the
//! snapshot it must belong to, unkeyed and keyed, for a 64 MiB and a 4 GiB
//! guest, and every chunk of its contents checked against its hash. The
//! file may come from anyone who can write the directory.
//!
//! Input: the file's bytes. A file that fails only its checksum is sealed
//! with the right one and decoded again, so the checks behind the checksum
//! are fuzzed too. Seeds: files written by `WorkingSet::write` and
//! `WorkingSet::write_with` (with contents).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::working_set::{digest_bytes, WorkingSet, WS_CHUNK_PAGES};
use vmm::snapshot::{Hasher, SnapshotKey};

const DIGEST: &str = "abababababababababababababababababababababababababababababababab";

fuzz_target!(|data: &[u8]| {
    let keyed = Hasher::new(Some(&SnapshotKey::new([7; 32])));
    for h in [Hasher::new(None), keyed] {
        for mem in [64u64 << 20, 4 << 30] {
            let mut input = data.to_vec();
            let mut ws = WorkingSet::decode_file(&input, Path::new("ws"), &h, Some(DIGEST), mem);
            if ws.is_err() && input.len() >= 104 {
                // Reseal: what lies behind the checksum (the checksum ends
                // where the header says, or at the end of the input).
                let meta = ws_meta_end(&input).unwrap_or(input.len());
                let n = meta - 32;
                let sum = h.hash(&input[..n]);
                input[n..meta].copy_from_slice(&sum);
                ws = WorkingSet::decode_file(&input, Path::new("ws"), &h, Some(DIGEST), mem);
            }
            if let Ok((ws, at)) = ws {
                assert_eq!(ws.digest, digest_bytes(DIGEST), "bound to its snapshot");
                // What decodes encodes back to exactly the same bytes.
                assert_eq!(ws.encode(&h), input[..at], "a decoded working set re-encodes to its bytes");
                let contents = &input[at..];
                let chunk = WS_CHUNK_PAGES as usize * 4096;
                if ws.chunk_hashes.is_some() {
                    assert_eq!(contents.len(), ws.pages.len() * 4096, "the contents are exactly the pages");
                    for (c, data) in contents.chunks(chunk).enumerate() {
                        // Checked, never trusted: a mismatch is an answer, not a panic.
                        let _ = ws.check_chunk(&h, c, data);
                    }
                } else {
                    assert!(contents.is_empty(), "no contents without the flag");
                }
            }
        }
    }
});

/// Where the checksum ends by the header's count and flags (the layout in
/// `vmm/src/snapshot/working_set.rs`), if the input holds it.
fn ws_meta_end(b: &[u8]) -> Option<usize> {
    let flags = u32::from_le_bytes(b.get(12..16)?.try_into().ok()?);
    let count = u64::from_le_bytes(b.get(56..64)?.try_into().ok()?);
    let hashes = if flags & 4 != 0 { count.div_ceil(u64::from(WS_CHUNK_PAGES)) } else { 0 };
    let end = 72u64
        .checked_add(count.checked_mul(16)?)?
        .checked_add(hashes.checked_mul(32)?)?
        .checked_add(32)?;
    usize::try_from(end).ok().filter(|&e| e <= b.len())
}
