//! `manifest.json` as `vmm restore` reads it (`Manifest::parse`: magic and
//! version first, the fields, the file names), then `Snapshot::from_contents`
//! (every check of `Snapshot::open` but the memory file's length) with the
//! real `state.json` and `memory.hashes` of `fixtures/snapshot/`: the digest,
//! then the state's length and hash, the state against the memory layout
//! (`MemoryLayout::fits`: the one layout of its kind for the RAM size, each
//! `FileRegion`) and every extent (aligned, sorted, inside RAM, inside one
//! `EXTENT_MAX` block), the page hashes' length and hash.
//!
//! The digest stops nearly every mutation, as it must. To reach the checks
//! behind it too, a manifest whose digest is wrong is then sealed with the
//! right digest (what an attacker who knows there is no key can do) and
//! checked again: a manifest accepted then places every extent in the
//! memory file. Seeds: the manifests of the fixtures and of two larger real
//! snapshots.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::{Hasher, Manifest, Snapshot};
use vmm_core::MemoryConfig;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("snap/manifest.json");
    let Ok(manifest) = Manifest::parse(data, path) else {
        return;
    };
    // What parses is written back (`write_manifest`'s encoding) as the same manifest.
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
    let again = Manifest::parse(&text, path).expect("an encoded manifest parses");
    assert_eq!(again, manifest);

    let fx = vmm_fuzz::plain_snapshot();
    let dir = Path::new("snap");
    let mut sealed = manifest.clone();
    if let Ok(snap) = Snapshot::from_contents(dir, None, data, fx.state, fx.hashes) {
        let _ = snap.config(MemoryConfig::default());
        return;
    }
    let h = Hasher::new(None);
    if sealed.seal(&h).is_err() {
        return;
    }
    let text = serde_json::to_vec(&sealed).expect("a manifest encodes");
    let Ok(snap) = Snapshot::from_contents(dir, None, &text, fx.state, fx.hashes) else {
        return;
    };
    let m = &snap.manifest.memory;
    assert_eq!(m.layout.file_len(), m.len);
    for e in &m.extents {
        match m.layout.file_offset(e.gpa, e.len) {
            Some(off) => assert!(off + e.len <= m.len, "extent {e:?} ends past the file: {m:?}"),
            None => panic!("an accepted extent {e:?} has no place in the memory file: {m:?}"),
        }
    }
    let _ = snap.config(MemoryConfig::default());
});
