//! The migration stream as either end reads it from its peer
//! (`vmm::migration::wire`): the header, then messages until the input ends
//! or one is refused. Each message decoded encodes back to the bytes it came
//! from. A state and an extent list, as a destination receives them, go
//! through `snapshot::check_received` as in `Incoming::accept`.
//!
//! Seeds: captured streams of a real wire-version-4 migration over plain TCP
//! (the framing TLS carries: the same bytes inside the records) (the source's post-copy
//! stream cut after three pages, the head of a pre-copy stream, the
//! destination's answers, the answer channel's first message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use vmm::migration::wire::{decode, encode, read_header, Message};
use vmm::snapshot::{check_received, Extent};

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    if read_header(&mut r).is_err() {
        return;
    }
    let (mut state, mut extents) = (None, None);
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
            Message::Extents(e) => extents = Some(e),
            _ => {}
        }
    }
    if let (Some(state), Some(pairs)) = (state, extents) {
        let ext: Vec<Extent> = pairs.iter().map(|&(gpa, len)| Extent { gpa, len }).collect();
        let _ = check_received(&state, &ext);
    }
});
