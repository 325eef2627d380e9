//! The integrity of a real snapshot (`fixtures/snapshot/`, and
//! `fixtures/snapshot-keyed/` written with `--snapshot-key`): its files with
//! bytes overwritten, inserted or cut by the input, opened with the right
//! key, no key or another key. `Snapshot::from_contents` runs
//! `Snapshot::open`'s checks (manifest digest and key, the state's hash, the
//! page hashes' hash, layout and extents), then `PageHashes::check_block`,
//! what every eager or lazy read of the memory file runs, reads the data
//! blocks the input changed (and one more) from the changed memory file.
//!
//! The oracle is the point of this target: a snapshot that opens is the
//! fixture (the same manifest, the same state and page-hash bytes, opened
//! with the key it was written with), and a block that passes its check has
//! the fixture's content. Anything else accepted is a forgery.
//!
//! Input: one mode byte (bit 0: keyed fixture; bits 1-2: the key given),
//! then edits, each `[file][offset: u32 LE][op]` and bytes: `file & 3`
//! picks manifest, state, page hashes or the memory data; `file & 0x80`
//! cuts the file at `offset` instead; `op >> 1` bytes follow, inserted at
//! `offset` if `op & 1` (not in memory data), else written over it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use vmm::snapshot::memory::{data_blocks, HASH_BLOCK, HASH_BLOCK_LEN};
use vmm::snapshot::{Manifest, Snapshot, SnapshotKey};
use vmm_fuzz::{keyed_snapshot, plain_snapshot, MemoryFile, SnapFixture};

struct Prepared {
    fx: SnapFixture,
    manifest: Manifest,
    blocks: Vec<u64>,
    /// `(data offset, gpa, len)` of each extent.
    extents: Vec<(usize, u64, u64)>,
}

fn prepare(fx: SnapFixture) -> Prepared {
    let dir = Path::new("snap");
    let snap = Snapshot::from_contents(dir, fx.key.as_ref(), fx.manifest, fx.state, fx.hashes)
        .expect("the fixture opens");
    let manifest = snap.manifest;
    let mut at = 0;
    let extents = manifest
        .memory
        .extents
        .iter()
        .map(|e| {
            let x = (at, e.gpa, e.len);
            at += e.len as usize;
            x
        })
        .collect();
    assert_eq!(at, fx.data.len(), "memory.data holds every extent");
    Prepared {
        blocks: data_blocks(&manifest.memory.extents),
        manifest,
        extents,
        fx,
    }
}

fn fixtures() -> &'static [Prepared; 2] {
    static F: OnceLock<[Prepared; 2]> = OnceLock::new();
    F.get_or_init(|| [prepare(plain_snapshot()), prepare(keyed_snapshot())])
}

fn original(i: usize) -> &'static MemoryFile {
    static M: OnceLock<[MemoryFile; 2]> = OnceLock::new();
    &M.get_or_init(|| {
        let f = fixtures();
        [
            MemoryFile::new(&f[0].manifest, f[0].fx.data),
            MemoryFile::new(&f[1].manifest, f[1].fx.data),
        ]
    })[i]
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let which = usize::from(mode & 1);
    let p = &fixtures()[which];
    let other_key = SnapshotKey::new([0x5a; 32]);
    let (key, key_right) = match ((mode >> 1) & 3, &p.fx.key) {
        (0 | 3, k) => (k.clone(), true),
        (1, k) => (None, k.is_none()),
        (_, _) => (Some(other_key), false),
    };
    let mut files = [
        p.fx.manifest.to_vec(),
        p.fx.state.to_vec(),
        p.fx.hashes.to_vec(),
        // The memory data (half a megabyte) is copied on its first edit.
        Vec::new(),
    ];
    let mut touched: Vec<usize> = Vec::new();
    while rest.len() >= 6 {
        let sel = rest[0];
        let f = usize::from(sel & 3);
        if f == 3 && files[3].is_empty() {
            files[3] = p.fx.data.to_vec();
        }
        let off = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize % (files[f].len() + 1);
        let op = rest[5];
        rest = &rest[6..];
        if sel & 0x80 != 0 {
            if f != 3 {
                files[f].truncate(off);
            }
            continue;
        }
        let n = usize::from(op >> 1).min(rest.len());
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        if op & 1 != 0 && f != 3 {
            files[f].splice(off..off, bytes.iter().copied());
        } else {
            let end = (off + n).min(files[f].len());
            files[f][off..end].copy_from_slice(&bytes[..end - off]);
            if f == 3 {
                touched.extend(off..end);
            }
        }
    }
    let [manifest, state, hashes, mem] = &files;
    let dir = Path::new("snap");
    let Ok(snap) = Snapshot::from_contents(dir, key.as_ref(), manifest, state, hashes) else {
        return;
    };
    assert!(
        key_right,
        "a snapshot opened with the wrong key (or none): mode {mode:#x}"
    );
    assert_eq!(snap.manifest, p.manifest, "a changed manifest was accepted");
    assert_eq!(state.as_slice(), p.fx.state, "a changed state.json was accepted");
    assert_eq!(
        hashes.as_slice(),
        p.fx.hashes,
        "a changed memory.hashes was accepted"
    );

    // The blocks holding changed bytes, and one chosen by the input's length.
    let mut check: Vec<u64> = touched
        .iter()
        .filter_map(|&at| {
            let &(start, gpa, _) = p.extents.iter().take_while(|x| x.0 <= at).last()?;
            Some((gpa + (at - start) as u64) & !(HASH_BLOCK - 1))
        })
        .collect();
    check.push(p.blocks[data.len() % p.blocks.len()]);
    check.sort_unstable();
    check.dedup();
    // A memory file of the changed data only if the input changed it.
    let changed = (!touched.is_empty()).then(|| MemoryFile::new(&p.manifest, mem));
    let changed = changed.as_ref().unwrap_or(original(which));
    let (mut want, mut got) = (vec![0u8; HASH_BLOCK_LEN], vec![0u8; HASH_BLOCK_LEN]);
    for b in check {
        let ok = snap
            .pages
            .check_block(b, &mut want, |buf, off| original(which).read_at(buf, off))
            .expect("reads in memory");
        assert!(ok, "the fixture's block {b:#x} fails its own hash");
        let ok = snap
            .pages
            .check_block(b, &mut got, |buf, off| changed.read_at(buf, off))
            .expect("reads in memory");
        assert_eq!(
            ok,
            got == want,
            "block {b:#x}: a changed block passed its hash, or an unchanged one failed"
        );
    }
});
