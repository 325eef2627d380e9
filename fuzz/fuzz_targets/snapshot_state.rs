//! A VM state as a migration destination receives it from its peer
//! (`snapshot::check_received(state_json, extents)`) and as `vmm restore`
//! reads `state.json` (`Snapshot::from_contents` with a manifest written for
//! it, as `write_snapshot` writes one: packed layout, page hashes, digest),
//! then the restores of its devices that need no KVM (serial console, page
//! store over the state's guest RAM).
//!
//! Input: `state.json`'s bytes, optionally followed by a NUL byte (never in
//! JSON) and the extents as little-endian `(gpa, len)` `u64` pairs. Seeds:
//! the states of real snapshots, with and without their extents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::memory::data_blocks;
use vmm::snapshot::{
    check_received, Extent, FileEntry, Hasher, LayoutKind, Manifest, MemoryEntry, MemoryLayout, Snapshot,
    FORMAT_VERSION, HASHES, MAGIC, MEMORY, STATE,
};
use vmm_core::MemoryConfig;
use vmm_fuzz::{restore_page_store, restore_serial, vm_ram};

fn extents(b: &[u8]) -> Vec<Extent> {
    b.chunks_exact(16)
        .map(|c| Extent {
            gpa: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (state, ext) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], extents(&data[i + 1..])),
        None => (data, Vec::new()),
    };
    let Ok(saved) = check_received(state, &ext) else {
        return;
    };
    // The same state and extents in a snapshot directory pass the same checks.
    let mem_size = saved.vm.config.mem_size;
    let h = Hasher::new(None);
    let layout = MemoryLayout::new(LayoutKind::Packed, mem_size);
    let hashes = vec![0u8; data_blocks(&ext).len() * 32];
    let mut manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        writer: "fuzz".into(),
        id: "0".repeat(32),
        keyed: false,
        state: FileEntry {
            name: STATE.into(),
            len: state.len() as u64,
            hash: h.hex(state),
        },
        memory: MemoryEntry {
            name: MEMORY.into(),
            len: layout.file_len(),
            mem_size,
            layout,
            extents: ext,
            hashes: FileEntry {
                name: HASHES.into(),
                len: hashes.len() as u64,
                hash: h.hex(&hashes),
            },
        },
        digest: String::new(),
    };
    manifest.seal(&h).expect("a manifest encodes");
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
    let snap = match Snapshot::from_contents(Path::new("snap"), None, &text, state, &hashes) {
        Ok(snap) => snap,
        Err(e) => panic!("check_received accepts what a snapshot's checks refuse: {e}"),
    };
    // A checked state has a valid configuration.
    if let Err(e) = snap.config(MemoryConfig::default()) {
        panic!("a checked state has an invalid configuration: {e}");
    }
    let devices = &saved.vm.devices;
    let _ = restore_serial(&devices.serial);
    let _ = restore_page_store(&vm_ram(mem_size), &devices.page_store, true);
});
