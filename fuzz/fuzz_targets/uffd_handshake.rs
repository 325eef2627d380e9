//! The external page-fault handler's protocol, Firecracker's: the handshake
//! message (a JSON array of `GuestRegionUffdMapping`) as a Firecracker
//! handler decodes it (`uffd_handler::parse_message`), and the connection
//! holder's event lines as the VMM reads them from the holder's socket
//! (`peer::read_line`, at most 64 KiB a line, then `PeerEvent::decode`).
//!
//! Checked: a message that decodes encodes (`uffd_handler::message`, what
//! the VMM sends) as at most as many bytes, which decode to the same
//! mappings; lines are read one at a time, never longer than 64 KiB, and an
//! event that decodes encodes (as the holder writes it) and decodes back to
//! itself.
//!
//! Input: bytes, read both as a handshake message and as the holder's
//! stream. Seeds: the message of a real restore from
//! `vmm run --mem-backend uffd:...` (one and two regions), the holder's
//! three events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use vmm::uffd_handler::peer::{read_line, PeerEvent};
use vmm::uffd_handler::{message, parse_message};

fuzz_target!(|data: &[u8]| {
    if let Ok(maps) = parse_message(data) {
        let sent = message(&maps).expect("decoded mappings encode within the limit");
        assert!(
            sent.len() <= data.len(),
            "{} bytes encode as {}",
            data.len(),
            sent.len()
        );
        assert_eq!(parse_message(&sent).expect("an encoded message decodes"), maps);
    }
    let mut r = Cursor::new(data);
    let mut lines = 0;
    while let Ok(Some(line)) = read_line(&mut r) {
        assert!(line.len() <= 4 * 64 * 1024, "a line of {} bytes", line.len());
        lines += 1;
        if let Ok(ev) = PeerEvent::decode(&line) {
            let text = serde_json::to_string(&ev).expect("an event encodes");
            assert!(!text.contains('\n'), "{text}");
            assert_eq!(PeerEvent::decode(&text).expect("an encoded event decodes"), ev);
        }
    }
    assert!(lines <= data.len());
});
