//! A message read from a userfaultfd (`memory::uffd::decode_event`, which
//! `Uffd::read_event` uses), with and without thread ids. The kernel writes
//! these, but the decoder must not trust their layout beyond the size.
//! Seeds: a page fault (write, with a thread id), a REMOVE, an unknown event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory::uffd::{decode_event, Event};

fuzz_target!(|data: &[u8]| {
    for thread_id in [false, true] {
        match decode_event(data, thread_id) {
            Ok(Event::PageFault { thread_id: t, .. }) => assert_eq!(t.is_some(), thread_id),
            Ok(Event::Remove { .. }) => {}
            Ok(Event::Unknown(code)) => assert_eq!(data.first(), Some(&code)),
            Err(_) => assert_ne!(data.len(), 32),
        }
    }
});
