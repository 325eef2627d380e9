//! The migration stream as either end reads it from its peer
//! (`vmm::migration::wire`): the header, then messages until the input ends
//! or one is refused. Each message decoded encodes back to the bytes it came
//! from. A state and a page map, as a destination receives them, go
//! through `wire::bitmap_runs` (which must give `wire::bitmap_pages`'s
//! pages, and refuse what it refuses) and `snapshot::check_received` as in
//! `Incoming::switchover`.
//!
//! Seeds: captured streams of a real wire-version-5 migration over plain
//! TCP (the framing TLS carries: the same bytes inside the records): the
//! source's post-copy and pre-copy streams with three pages of each kind
//! kept, the destination's messages, both directions of the answer
//! channel (`docs/fuzzing.md`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use vmm::migration::wire::{bitmap_pages, bitmap_runs, decode, encode, read_header, Message};
use vmm::snapshot::{check_received, Extent};

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    if read_header(&mut r).is_err() {
        return;
    }
    let (mut state, mut map) = (None, None);
    loop {
        let start = r.position() as usize;
        let Ok(m) = decode(&mut r) else {
            break;
        };
        let end = r.position() as usize;
        let mut b = Vec::new();
        encode(&mut b, &m).expect("encoding into a Vec");
        assert_eq!(b, data[start..end], "{m:?} does not encode as it was read");
        // What errors print of a peer's message stays short.
        assert!(m.summary().len() < 64, "{}", m.summary());
        match m {
            Message::State(s) => state = Some(s),
            Message::PageMap(b) => map = Some(b),
            _ => {}
        }
    }
    if let (Some(state), Some(bits)) = (state, map) {
        // The destination knows the RAM size from `Setup`; here, from the
        // state if it parses (else a small guest).
        let mem_size = serde_json::from_slice::<serde_json::Value>(&state)
            .ok()
            .and_then(|v| v["vm"]["config"]["mem_size"].as_u64())
            .filter(|&m| m <= 64 << 30)
            .unwrap_or(64 << 20);
        // The destination decodes the map as runs: the same pages, refused alike.
        let runs = bitmap_runs(&bits, mem_size);
        match (&runs, bitmap_pages(&bits, mem_size)) {
            (Ok(runs), Ok(pages)) => {
                let flat: Vec<u64> = runs.iter().flat_map(|&(g, l)| (g..g + l).step_by(4096)).collect();
                assert_eq!(flat, pages, "bitmap_runs and bitmap_pages disagree");
            }
            (Err(_), Err(_)) => {}
            (r, p) => panic!("bitmap_runs {:?} but bitmap_pages {:?}", r.is_ok(), p.is_ok()),
        }
        if let Ok(pages) = bitmap_pages(&bits, mem_size) {
            let ext: Vec<Extent> = pages.iter().map(|&gpa| Extent { gpa, len: 4096 }).collect();
            let _ = check_received(&state, &ext);
        }
    }
});
