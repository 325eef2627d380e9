//! A VM state as a migration destination receives it from its peer
//! (`Snapshot::from_parts(state_json, extents)`) and as `vmm restore` reads
//! `state.json` (`Snapshot::from_files` with a manifest that fits it), then
//! the restores of its devices that need no KVM (serial console, page store
//! over the state's guest RAM).
//!
//! Input: `state.json`'s bytes, optionally followed by a NUL byte (never in
//! JSON) and the extents as little-endian `(gpa, len)` `u64` pairs. Seeds:
//! the states of two real snapshots, with and without their extents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::snapshot::{
    Extent, FileEntry, Manifest, MemoryEntry, Snapshot, FORMAT_VERSION, MAGIC, MEMORY, STATE,
};
use vmm_core::MemoryConfig;
use vmm_fuzz::{restore_page_store, restore_serial, vm_ram};

fn extents(b: &[u8]) -> Vec<Extent> {
    b.chunks_exact(16)
        .map(|c| Extent {
            gpa: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
            crc32: 0,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (state, ext) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], extents(&data[i + 1..])),
        None => (data, Vec::new()),
    };
    let Ok(snap) = Snapshot::from_parts(state, ext.clone()) else {
        return;
    };
    // The same state and extents in a snapshot directory pass the same checks.
    let mem_size = snap.state.vm.config.mem_size;
    let manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        writer: "fuzz".into(),
        state: FileEntry {
            name: STATE.into(),
            len: state.len() as u64,
            crc32: snap.manifest.state.crc32,
        },
        memory: MemoryEntry {
            name: MEMORY.into(),
            len: snap.manifest.memory.len,
            mem_size,
            extents: ext,
        },
    };
    if let Err(e) = Snapshot::from_files(Path::new("snap"), manifest, state) {
        panic!("from_parts accepts what from_files refuses: {e}");
    }
    // A checked state has a valid configuration.
    if let Err(e) = snap.config(MemoryConfig::default()) {
        panic!("a checked state has an invalid configuration: {e}");
    }
    let devices = &snap.state.vm.devices;
    let _ = restore_serial(&devices.serial);
    let _ = restore_page_store(&vm_ram(mem_size), &devices.page_store, true);
});
