//! The message of Firecracker's UFFD handshake, exactly as Firecracker sends
//! it: one `sendmsg` on a Unix stream socket that the VMM connected to the
//! handler's listening socket, carrying a JSON array of
//! `GuestRegionUffdMapping`s as its bytes and the userfaultfd as
//! SCM_RIGHTS. Field order and units are Firecracker's
//! (`src/vmm/src/persist.rs`, [`FIRECRACKER_VERSIONS`]):
//!
//! ```json
//! [{"base_host_virt_addr":140045425995776,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! `page_size_kib` carries the page size **in bytes** despite its name:
//! Firecracker has always sent bytes in that field (v1.7 to v1.11 only that
//! field; from v1.12 `page_size` too, with the same value), and its handlers
//! of every version take the field they know as the page size. `offset` is
//! the region's offset in the snapshot's memory file (regions packed back
//! to back in this VMM's format 3, as in Firecracker's memory files).

use crate::snapshot::MemoryLayout;
use serde::{Deserialize, Serialize};
use vmm_core::memory::ExternalMemory;

/// The Firecracker versions whose handshake this one is: the message of
/// v1.12.0 up to main (1.17.0-dev, commit 81b38b9d, August 2026), which is
/// also what the handlers of v1.7 to v1.11 read (they know only
/// `page_size_kib`, and ignore `page_size`).
pub const FIRECRACKER_VERSIONS: &str =
    "v1.12.0 to 1.17.0-dev (main at 81b38b9d); read by the example handlers of v1.7.0 and later";

/// The largest message Firecracker's example handlers receive (they read
/// into a 1024-byte buffer); ours is about 130 bytes per region.
pub const MAX_MESSAGE: usize = 1024;

/// One guest memory region, as Firecracker's `GuestRegionUffdMapping`
/// (fields in its order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Host virtual address of the region in the VMM.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the region's contents in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Page size in bytes too (the field's name is Firecracker's, kept for
    /// the handlers of v1.7 to v1.11, which read only this one).
    pub page_size_kib: u64,
}

/// Why the mappings cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A RAM region has no place in the memory file's layout.
    #[error("guest RAM region at {gpa:#x} has no place in the snapshot's memory layout ({layout:x?}); the snapshot does not fit this VM")]
    NoRegion {
        /// The region's guest-physical start.
        gpa: u64,
        /// The layout's regions.
        layout: Vec<crate::snapshot::FileRegion>,
    },
    /// The message does not fit the handlers' receive buffer.
    #[error(
        "the handshake message is {0} bytes, more than the {MAX_MESSAGE} Firecracker's handlers receive"
    )]
    TooLong(usize),
    /// JSON encoding.
    #[error("cannot encode the handshake message: {0}")]
    Encode(#[source] serde_json::Error),
    /// JSON decoding.
    #[error("the handshake message is not a JSON array of Firecracker's GuestRegionUffdMapping: {0}")]
    Decode(#[source] serde_json::Error),
}

/// The mappings of externally served memory whose contents are in a memory
/// file laid out as `layout`.
pub fn mappings(mem: &ExternalMemory, layout: &MemoryLayout) -> Result<Vec<Mapping>, HandshakeError> {
    mem.mappings()
        .iter()
        .map(|m| {
            let offset = layout
                .region_offset(m.gpa)
                .ok_or_else(|| HandshakeError::NoRegion {
                    gpa: m.gpa,
                    layout: layout.regions.clone(),
                })?;
            Ok(Mapping {
                base_host_virt_addr: m.host_addr,
                size: m.size,
                offset,
                page_size: abi::layout::PAGE_SIZE,
                page_size_kib: abi::layout::PAGE_SIZE,
            })
        })
        .collect()
}

/// The handshake message's bytes (JSON, no trailing newline, as Firecracker).
pub fn message(mappings: &[Mapping]) -> Result<Vec<u8>, HandshakeError> {
    let body = serde_json::to_vec(mappings).map_err(HandshakeError::Encode)?;
    if body.len() > MAX_MESSAGE {
        return Err(HandshakeError::TooLong(body.len()));
    }
    Ok(body)
}

/// Decodes a handshake message as a Firecracker handler of v1.12 or later
/// reads it (`serde_json::from_slice::<Vec<GuestRegionUffdMapping>>`, every
/// field required, none unknown), with the length limit of its receive
/// buffer. What [`message`] writes decodes back to the same mappings;
/// `fuzz/`'s `uffd_handshake` target checks that for any bytes.
pub fn parse_message(bytes: &[u8]) -> Result<Vec<Mapping>, HandshakeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(HandshakeError::TooLong(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(HandshakeError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_firecrackers_json_with_the_page_size_in_bytes_twice() {
        let maps = vec![
            Mapping {
                base_host_virt_addr: 0x7f00_0000_0000,
                size: 3 << 30,
                offset: 0,
                page_size: 4096,
                page_size_kib: 4096,
            },
            Mapping {
                base_host_virt_addr: 0x7f00_c000_0000,
                size: 3 << 30,
                offset: 3 << 30,
                page_size: 4096,
                page_size_kib: 4096,
            },
        ];
        let text = String::from_utf8(message(&maps).unwrap()).unwrap();
        assert_eq!(parse_message(text.as_bytes()).unwrap(), maps);
        assert!(
            parse_message(b"[{\"size\":1}]").is_err(),
            "every field is required"
        );
        assert_eq!(
            text,
            "[{\"base_host_virt_addr\":139637976727552,\"size\":3221225472,\"offset\":0,\"page_size\":4096,\"page_size_kib\":4096},\
             {\"base_host_virt_addr\":139641197953024,\"size\":3221225472,\"offset\":3221225472,\"page_size\":4096,\"page_size_kib\":4096}]"
        );
        // Firecracker's handlers check that the sizes add up to the memory
        // file (packed) and take the page size from the message.
        let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v.iter().map(|m| m["size"].as_u64().unwrap()).sum::<u64>(),
            6 << 30
        );
        assert!(v
            .iter()
            .all(|m| m["page_size_kib"] == 4096 && m["page_size"] == 4096));
    }
}
