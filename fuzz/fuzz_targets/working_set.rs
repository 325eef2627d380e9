//! A working-set file (`DIR/working-set`) as `vmm restore --prefetch
//! working-set` reads it: `WorkingSet::decode` with the digest of the
//! snapshot it must belong to, unkeyed and keyed, for a 64 MiB and a 4 GiB
//! guest. The file may come from anyone who can write the directory.
//!
//! Input: the file's bytes. A file that fails only its checksum is sealed
//! with the right one and decoded again, so the checks behind the checksum
//! are fuzzed too. Seeds: files written by `WorkingSet::write`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::working_set::{digest_bytes, WorkingSet};
use vmm::snapshot::{Hasher, SnapshotKey};

const DIGEST: &str = "abababababababababababababababababababababababababababababababab";

fuzz_target!(|data: &[u8]| {
    let keyed = Hasher::new(Some(&SnapshotKey::new([7; 32])));
    for h in [Hasher::new(None), keyed] {
        for mem in [64u64 << 20, 4 << 30] {
            let mut input = data.to_vec();
            let mut ws = WorkingSet::decode(&input, Path::new("ws"), &h, Some(DIGEST), mem);
            if ws.is_err() && input.len() >= 104 {
                // Reseal: what lies behind the checksum.
                let n = input.len() - 32;
                let sum = h.hash(&input[..n]);
                input[n..].copy_from_slice(&sum);
                ws = WorkingSet::decode(&input, Path::new("ws"), &h, Some(DIGEST), mem);
            }
            if let Ok(ws) = ws {
                assert_eq!(ws.digest, digest_bytes(DIGEST), "bound to its snapshot");
                // What decodes encodes back to exactly the same bytes.
                assert_eq!(
                    ws.encode(&h),
                    input,
                    "a decoded working set re-encodes to its bytes"
                );
            }
        }
    }
});
