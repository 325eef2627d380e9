//! `manifest.json` as `vmm restore` reads it: parsed and checked
//! (`vmm::snapshot::parse_manifest`), then checked with a real `state.json`
//! against its extents (`Snapshot::from_files`, every check of
//! `Snapshot::open` but the memory file's length). The seeds are real
//! manifests; `touch-manifest.json` describes the embedded state, so the
//! fuzzer reaches the extent checks by keeping its length and CRC32.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::{parse_manifest, Snapshot};
use vmm_core::MemoryConfig;

/// The state `corpus/snapshot_manifest/touch-manifest.json` belongs to.
static STATE: &[u8] = include_bytes!("../corpus/snapshot_state/touch-state.json");

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = parse_manifest(data, Path::new("manifest.json")) else {
        return;
    };
    // What parses is written back (`write_manifest`) as the same manifest.
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
    let again = parse_manifest(&text, Path::new("manifest.json")).expect("an encoded manifest parses");
    assert_eq!(again, manifest);
    if let Ok(snap) = Snapshot::from_files(Path::new("snap"), manifest, STATE) {
        let _ = snap.config(MemoryConfig::default());
    }
});
