//! The migration stream's messages. Both ends first send [`MAGIC`] and
//! [`VERSION`]; then each message is a type byte, a little-endian `u32`
//! length and that many bytes. Lengths are checked against the type before
//! anything is allocated.
//!
//! Versioning: any change to a message, its meaning or the order of the
//! protocol bumps [`VERSION`]; a peer with another version is refused at the
//! header with a message naming both (the state inside `State` is a
//! snapshot's `state.json` and follows the snapshot format's version).

use super::{io, MigrationError};
use std::io::{Read, Write};

/// Stream magic, sent by both ends first.
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// Protocol version. 3: the state is a version-2 snapshot state. 4: the
/// answer channel opens right after the main connection's headers (before
/// pre-copy and the pause), and both may be TLS. 5: `Setup` (the VM's
/// configuration) opens the main connection so that the destination builds
/// its VM before the pause; the post-copy page list is a bitmap over guest
/// RAM (`PageMap`, replacing `Extents`); an all-zero page goes as its
/// address alone (`ZeroRequested`, `ZeroPushed`); `Resumed` carries the
/// destination's part of the downtime.
pub const VERSION: u32 = 6;
pub use abi::layout::{PAGE_LEN as PAGE, PAGE_SIZE as PAGE64};
/// Length of a page message: address and data.
pub const PAGE_MSG: u32 = 8 + 4096;
/// Largest state message.
pub const MAX_STATE: u32 = 64 << 20;
/// Largest `Setup` message.
pub const MAX_SETUP: u32 = 64 << 10;

const T_STATE: u8 = 1;
const T_PAGE_MAP: u8 = 2;
const T_PAGE_REQUESTED: u8 = 3;
const T_PAGE_PUSHED: u8 = 4;
const T_DONE: u8 = 5;
const T_PRECOPY_BEGIN: u8 = 6;
const T_PRECOPY_PAGE: u8 = 7;
const T_RESUME: u8 = 8;
const T_PREEMPT: u8 = 9;
const T_SETUP: u8 = 10;
const T_ZERO_REQUESTED: u8 = 11;
const T_ZERO_PUSHED: u8 = 12;
const T_REQUEST: u8 = 16;
const T_RESEND: u8 = 17;
const T_RESUMED: u8 = 18;
const T_COMPLETE: u8 = 19;
const T_NEED: u8 = 20;
const T_READY: u8 = 21;

/// Largest `Need` bitmap: one bit per page of the largest guest (64 GiB).
pub const MAX_NEED: u32 = 1 << 21;

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source: `state.json`'s content.
    State(Vec<u8>),
    /// Source, first on the main connection: the VM's configuration (a
    /// `ConfigState` as JSON), so that the destination builds its VM while
    /// the source still runs.
    Setup(Vec<u8>),
    /// Source, after `State`: the post-copy pages, bit `i` (LSB first) for
    /// the `i`-th page of guest RAM in guest-physical order (see
    /// [`page_bitmap`]).
    PageMap(Vec<u8>),
    /// Source: an all-zero page, as its address only (the source checks
    /// for zeros as it sends a page, not inside the pause).
    ZeroPage {
        /// Guest-physical address.
        gpa: u64,
        /// An answer to a request rather than a push.
        requested: bool,
    },
    /// Source: one page, answering a request (`requested`) or pushed.
    Page {
        /// Guest-physical address.
        gpa: u64,
        /// An answer to a request rather than a push.
        requested: bool,
        /// [`PAGE`] bytes.
        data: Vec<u8>,
    },
    /// Source: every data page was sent.
    Done {
        /// Pages pushed.
        pushed: u64,
        /// Pages sent as answers.
        requested: u64,
        /// Pause to the destination's `Resumed`, as the source measured it.
        downtime_us: u64,
    },
    /// Source: pre-copy begins; the guest has `mem_size` bytes of RAM.
    PrecopyBegin {
        /// The guest's RAM size (the later state must agree).
        mem_size: u64,
    },
    /// Source: a page copied while the VM runs; sent again in a later round
    /// if the guest writes it meanwhile.
    PrecopyPage {
        /// Guest-physical address.
        gpa: u64,
        /// [`PAGE`] bytes.
        data: Vec<u8>,
    },
    /// Source: the first message of a connection that resumes an interrupted
    /// post-copy (`vmm ctl DEST recover`).
    Resume,
    /// Source: the first message of the answer channel, a second connection
    /// that carries only answers to page requests (QEMU's postcopy-preempt).
    Preempt,
    /// Destination: the answer to `Resume`: bit `i` (LSB first) is set when
    /// the `i`-th data page, in the order of the announced extents, is still
    /// missing here.
    Need(Vec<u8>),
    /// Destination: send this page (ignored if already sent).
    Request(u64),
    /// Destination: send this page again (a fill failed after the data was taken).
    Resend(u64),
    /// Destination: the VM runs here; `took_us` from the state's arrival
    /// to the vCPUs started (the destination's part of the downtime).
    Resumed {
        /// Microseconds.
        took_us: u64,
    },
    /// Destination: every page arrived.
    Complete,
    /// Destination, on the main connection once its VM is built (memory
    /// registered, devices, vCPU threads started): the source pauses only
    /// after it, so that no part of the build lands in the downtime.
    Ready,
}

impl Message {
    /// What the message is, in a few words (its payload's size, not its
    /// bytes): for errors and logs, which a peer's multi-megabyte state or
    /// bitmap must not flood.
    pub fn summary(&self) -> String {
        match self {
            Message::State(s) => format!("State ({} bytes)", s.len()),
            Message::Setup(s) => format!("Setup ({} bytes)", s.len()),
            Message::PageMap(b) => format!("PageMap ({} bytes)", b.len()),
            Message::ZeroPage { gpa, requested } => {
                format!(
                    "ZeroPage {gpa:#x} ({})",
                    if *requested { "requested" } else { "pushed" }
                )
            }
            Message::Page { gpa, requested, .. } => {
                format!(
                    "Page {gpa:#x} ({})",
                    if *requested { "requested" } else { "pushed" }
                )
            }
            Message::Done { .. } => "Done".into(),
            Message::PrecopyBegin { mem_size } => format!("PrecopyBegin ({mem_size} bytes of RAM)"),
            Message::PrecopyPage { gpa, .. } => format!("PrecopyPage {gpa:#x}"),
            Message::Resume => "Resume".into(),
            Message::Preempt => "Preempt".into(),
            Message::Need(b) => format!("Need ({} bytes)", b.len()),
            Message::Request(g) => format!("Request {g:#x}"),
            Message::Resend(g) => format!("Resend {g:#x}"),
            Message::Resumed { took_us } => format!("Resumed ({took_us} us)"),
            Message::Complete => "Complete".into(),
            Message::Ready => "Ready".into(),
        }
    }
}

/// Writes the stream header.
pub fn write_header(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Reads and checks the stream header.
pub fn read_header(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut h = [0u8; 12];
    r.read_exact(&mut h).map_err(io("reading the stream header"))?;
    check_header(&h)
}

/// Checks a stream header.
pub fn check_header(h: &[u8; 12]) -> Result<(), MigrationError> {
    if h[..8] != MAGIC {
        // A TLS record (a handshake or an alert, version 3.x) where plain
        // migration was expected.
        if matches!(h[..2], [0x15 | 0x16, 0x03]) {
            return Err(MigrationError::Protocol(
                "the peer speaks TLS and this side does not: give this side TLS options too (--tls-cert, --tls-key and --tls-peer, or --tls-psk)".into(),
            ));
        }
        return Err(MigrationError::Protocol("no migration stream magic".into()));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..]);
    match u32::from_le_bytes(v) {
        VERSION => Ok(()),
        other => Err(MigrationError::Version(other)),
    }
}

fn frame(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let n = len;
    let len = u32::try_from(len).map_err(std::io::Error::other)?;
    if n <= 64 {
        // A small message (a request, `Resumed`, `Done`...) in one write:
        // one segment, one TLS record, on an unbuffered connection.
        let mut b = [0u8; 69];
        b[0] = kind;
        b[1..5].copy_from_slice(&len.to_le_bytes());
        let mut at = 5;
        for p in parts {
            b[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return w.write_all(&b[..at]);
    }
    w.write_all(&[kind])?;
    w.write_all(&len.to_le_bytes())?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Writes one message.
pub fn encode(w: &mut impl Write, m: &Message) -> std::io::Result<()> {
    match m {
        Message::State(s) => frame(w, T_STATE, &[s]),
        Message::Setup(s) => frame(w, T_SETUP, &[s]),
        Message::PageMap(b) => frame(w, T_PAGE_MAP, &[b]),
        Message::ZeroPage { gpa, requested } => {
            let kind = if *requested {
                T_ZERO_REQUESTED
            } else {
                T_ZERO_PUSHED
            };
            frame(w, kind, &[&gpa.to_le_bytes()])
        }
        Message::Page { gpa, requested, data } => {
            let kind = if *requested {
                T_PAGE_REQUESTED
            } else {
                T_PAGE_PUSHED
            };
            frame(w, kind, &[&gpa.to_le_bytes(), data])
        }
        Message::Done {
            pushed,
            requested,
            downtime_us,
        } => frame(
            w,
            T_DONE,
            &[
                &pushed.to_le_bytes(),
                &requested.to_le_bytes(),
                &downtime_us.to_le_bytes(),
            ],
        ),
        Message::PrecopyBegin { mem_size } => frame(w, T_PRECOPY_BEGIN, &[&mem_size.to_le_bytes()]),
        Message::PrecopyPage { gpa, data } => frame(w, T_PRECOPY_PAGE, &[&gpa.to_le_bytes(), data]),
        Message::Resume => frame(w, T_RESUME, &[]),
        Message::Preempt => frame(w, T_PREEMPT, &[]),
        Message::Need(bits) => frame(w, T_NEED, &[bits]),
        Message::Request(g) => frame(w, T_REQUEST, &[&g.to_le_bytes()]),
        Message::Resend(g) => frame(w, T_RESEND, &[&g.to_le_bytes()]),
        Message::Resumed { took_us } => frame(w, T_RESUMED, &[&took_us.to_le_bytes()]),
        Message::Complete => frame(w, T_COMPLETE, &[]),
        Message::Ready => frame(w, T_READY, &[]),
    }
}

/// Whether a page holds only zeros (word-wise: this runs once per pushed page).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; `align_to` only hands out
        // the aligned middle part.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The bitmap of a `PageMap`: bit `i` for the `i`-th page of the RAM of a
/// `mem_size` guest (its ranges in guest-physical order); `pages` ascending.
pub fn page_bitmap(pages: impl Iterator<Item = u64>, mem_size: u64) -> Vec<u8> {
    let ranges = abi::layout::ram_ranges(mem_size);
    let total: u64 = ranges.iter().map(|&(_, l)| l / PAGE64).sum();
    let mut bits = vec![0u8; usize::try_from(total.div_ceil(8)).unwrap_or(0)];
    let mut r = 0;
    let mut before = 0u64;
    for gpa in pages {
        while let Some(&(s, l)) = ranges.get(r) {
            if gpa < s + l {
                break;
            }
            before += l / PAGE64;
            r += 1;
        }
        let Some(&(s, _)) = ranges.get(r) else { break };
        if gpa < s {
            continue;
        }
        let i = before + (gpa - s) / PAGE64;
        if let Some(b) = usize::try_from(i / 8).ok().and_then(|i| bits.get_mut(i)) {
            *b |= 1 << (i % 8);
        }
    }
    bits
}

/// [`page_bitmap`] of the pages of the runs `(gpa, len)`, set a byte at a
/// time where a run covers one (the source builds it inside the pause:
/// per page it was about a millisecond for a 4 GiB guest).
pub fn page_bitmap_of_runs(runs: impl Iterator<Item = (u64, u64)>, mem_size: u64) -> Vec<u8> {
    let ranges = abi::layout::ram_ranges(mem_size);
    let total: u64 = ranges.iter().map(|&(_, l)| l / PAGE64).sum();
    let mut bits = vec![0u8; usize::try_from(total.div_ceil(8)).unwrap_or(0)];
    let mut set = |i: u64| {
        if let Some(b) = usize::try_from(i / 8).ok().and_then(|k| bits.get_mut(k)) {
            *b |= 1 << (i % 8);
        }
    };
    let mut whole = Vec::new();
    for (gpa, len) in runs {
        let mut before = 0u64;
        for &(s, l) in &ranges {
            let (lo, hi) = (gpa.max(s), gpa.saturating_add(len).min(s + l));
            if lo < hi {
                let (mut i, end) = (before + (lo - s) / PAGE64, before + (hi - s).div_ceil(PAGE64));
                while i < end && i % 8 != 0 {
                    set(i);
                    i += 1;
                }
                if i + 8 <= end {
                    whole.push((i / 8, (end - i) / 8));
                    i += (end - i) / 8 * 8;
                }
                while i < end {
                    set(i);
                    i += 1;
                }
            }
            before += l / PAGE64;
        }
    }
    for (k, n) in whole {
        let (k, n) = (
            usize::try_from(k).unwrap_or(usize::MAX),
            usize::try_from(n).unwrap_or(0),
        );
        if let Some(b) = bits.get_mut(k..k.saturating_add(n)) {
            b.fill(0xff);
        }
    }
    bits
}

/// RAM's ranges and page count for a `mem_size` guest, if `bits` is a
/// `PageMap` bitmap of it: one bit per page, none past the last.
fn check_bitmap(bits: &[u8], mem_size: u64) -> Result<([(u64, u64); 2], u64), MigrationError> {
    let ranges = abi::layout::ram_ranges(mem_size);
    let total: u64 = ranges.iter().map(|&(_, l)| l / PAGE64).sum();
    if bits.len() as u64 != total.div_ceil(8) {
        return Err(MigrationError::Protocol(format!(
            "the page map has {} bytes for {total} pages of guest RAM",
            bits.len()
        )));
    }
    if !total.is_multiple_of(8) && bits.last().is_some_and(|&b| b >> (total % 8) != 0) {
        return Err(MigrationError::Protocol(
            "the page map has bits past the last page of guest RAM".into(),
        ));
    }
    Ok((ranges, total))
}

/// The pages of a `PageMap` bitmap for a `mem_size` guest, ascending;
/// refuses a bitmap of another length or with bits past the last page.
pub fn bitmap_pages(bits: &[u8], mem_size: u64) -> Result<Vec<u64>, MigrationError> {
    let (ranges, total) = check_bitmap(bits, mem_size)?;
    let low = ranges[0].1 / PAGE64;
    let mut out = Vec::new();
    for (byte, &b) in (0u64..).zip(bits) {
        // Zero bytes (most of a sparse map) cost one test each.
        if b == 0 {
            continue;
        }
        for bit in 0..8 {
            let i = byte * 8 + bit;
            if b & (1 << bit) != 0 && i < total {
                out.push(if i < low {
                    ranges[0].0 + i * PAGE64
                } else {
                    ranges[1].0 + (i - low) * PAGE64
                });
            }
        }
    }
    Ok(out)
}

/// The pages of a `PageMap` bitmap as maximal runs `(gpa, len)` of
/// contiguous guest-physical pages, ascending: [`bitmap_pages`] without a
/// list of every page (a whole byte at a time where it is full; the
/// destination decodes it inside the downtime); refuses the same bitmaps.
pub fn bitmap_runs(bits: &[u8], mem_size: u64) -> Result<Vec<(u64, u64)>, MigrationError> {
    let (ranges, total) = check_bitmap(bits, mem_size)?;
    // Runs of page indices first, then split where RAM's ranges split.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut add = |i: u64, n: u64| match runs.last_mut() {
        Some((a, len)) if *a + *len == i => *len += n,
        _ => runs.push((i, n)),
    };
    for (byte, &b) in (0u64..).zip(bits) {
        match b {
            0 => {}
            0xff => add(byte * 8, 8),
            _ => {
                for bit in (0..8).filter(|bit| b & (1 << bit) != 0) {
                    add(byte * 8 + bit, 1);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(runs.len() + 1);
    for (i, n) in runs {
        let (mut i, end) = (i, (i + n).min(total));
        let mut before = 0u64;
        for &(s, l) in &ranges {
            let pages = l / PAGE64;
            if i < end && i < before + pages {
                let stop = end.min(before + pages);
                out.push((s + (i - before) * PAGE64, (stop - i) * PAGE64));
                i = stop;
            }
            before += pages;
        }
    }
    Ok(out)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

/// Reads one message; lengths are checked against the type before anything
/// is allocated, so a hostile length cannot exhaust memory.
pub fn decode(r: &mut impl Read) -> Result<Message, MigrationError> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h).map_err(io("reading a message"))?;
    let kind = h[0];
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
    let ok = match kind {
        T_STATE => len <= MAX_STATE,
        T_SETUP => len <= MAX_SETUP,
        T_PAGE_MAP => len <= MAX_NEED,
        T_ZERO_REQUESTED | T_ZERO_PUSHED => len == 8,
        T_PAGE_REQUESTED | T_PAGE_PUSHED | T_PRECOPY_PAGE => len == PAGE_MSG,
        T_DONE => len == 24,
        T_REQUEST | T_RESEND | T_PRECOPY_BEGIN | T_RESUMED => len == 8,
        T_COMPLETE | T_RESUME | T_PREEMPT | T_READY => len == 0,
        T_NEED => len <= MAX_NEED,
        other => return Err(MigrationError::Protocol(format!("unknown message type {other}"))),
    };
    if !ok {
        return Err(MigrationError::Protocol(format!(
            "message type {kind} with a bad length of {len} bytes"
        )));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b).map_err(io("reading a message"))?;
    Ok(match kind {
        T_STATE => Message::State(b),
        T_SETUP => Message::Setup(b),
        T_PAGE_MAP => Message::PageMap(b),
        T_ZERO_REQUESTED | T_ZERO_PUSHED => {
            let gpa = u64_at(&b, 0);
            if !gpa.is_multiple_of(PAGE64) {
                return Err(MigrationError::Protocol(format!(
                    "page address {gpa:#x} is not aligned"
                )));
            }
            Message::ZeroPage {
                gpa,
                requested: kind == T_ZERO_REQUESTED,
            }
        }
        T_PAGE_REQUESTED | T_PAGE_PUSHED | T_PRECOPY_PAGE => {
            let gpa = u64_at(&b, 0);
            if !gpa.is_multiple_of(PAGE64) {
                return Err(MigrationError::Protocol(format!(
                    "page address {gpa:#x} is not aligned"
                )));
            }
            let data = b[8..].to_vec();
            if kind == T_PRECOPY_PAGE {
                Message::PrecopyPage { gpa, data }
            } else {
                Message::Page {
                    gpa,
                    requested: kind == T_PAGE_REQUESTED,
                    data,
                }
            }
        }
        T_PRECOPY_BEGIN => Message::PrecopyBegin {
            mem_size: u64_at(&b, 0),
        },
        T_RESUME => Message::Resume,
        T_PREEMPT => Message::Preempt,
        T_NEED => Message::Need(b),
        T_DONE => Message::Done {
            pushed: u64_at(&b, 0),
            requested: u64_at(&b, 1),
            downtime_us: u64_at(&b, 2),
        },
        T_REQUEST | T_RESEND => {
            let gpa = u64_at(&b, 0);
            if !gpa.is_multiple_of(PAGE64) {
                return Err(MigrationError::Protocol(format!(
                    "requested address {gpa:#x} is not aligned"
                )));
            }
            if kind == T_REQUEST {
                Message::Request(gpa)
            } else {
                Message::Resend(gpa)
            }
        }
        T_RESUMED => Message::Resumed {
            took_us: u64_at(&b, 0),
        },
        T_READY => Message::Ready,
        _ => Message::Complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        write_header(&mut b).unwrap();
        for m in [
            Message::State(b"{\"x\":1}".to_vec()),
            Message::PageMap(vec![0b1011, 0]),
            Message::Page {
                gpa: 0x1000,
                requested: true,
                data: vec![7; PAGE],
            },
            Message::Request(0x2000),
            Message::Resend(0x3000),
            Message::Resumed { took_us: 1234 },
            Message::Done {
                pushed: 1,
                requested: 2,
                downtime_us: 3,
            },
            Message::Complete,
            Message::PrecopyBegin { mem_size: 256 << 20 },
            Message::PrecopyPage {
                gpa: 0x5000,
                data: vec![9; PAGE],
            },
            Message::Resume,
            Message::Need(vec![0b1010, 1]),
            Message::Preempt,
            Message::Setup(b"{}".to_vec()),
            Message::ZeroPage {
                gpa: 0x7000,
                requested: false,
            },
            Message::Ready,
        ] {
            encode(&mut b, &m).unwrap();
        }
        b
    }

    fn decode_all(b: &[u8]) -> Result<Vec<Message>, MigrationError> {
        let mut r = std::io::Cursor::new(b);
        read_header(&mut r)?;
        let mut out = Vec::new();
        while (r.position() as usize) < b.len() {
            out.push(decode(&mut r)?);
        }
        Ok(out)
    }

    #[test]
    fn summaries_stay_short_whatever_the_payload() {
        for m in [
            Message::State(vec![b'x'; 64 << 20]),
            Message::Need(vec![0xff; 1 << 21]),
            Message::PageMap(vec![0xff; 1 << 21]),
            Message::Setup(vec![b'x'; 64 << 10]),
        ] {
            assert!(m.summary().len() < 40, "{}", m.summary());
        }
    }

    #[test]
    fn round_trip() {
        let m = decode_all(&sample()).unwrap();
        assert_eq!(m.len(), 16);
        // A zero page goes as its address only.
        assert_eq!(
            m[14],
            Message::ZeroPage {
                gpa: 0x7000,
                requested: false
            }
        );
        assert_eq!(m[12], Message::Preempt);
        assert_eq!(m[15], Message::Ready);
        assert_eq!(m[3], Message::Request(0x2000));
        assert_eq!(m[11], Message::Need(vec![0b1010, 1]));
        assert!(matches!(&m[9], Message::PrecopyPage { gpa: 0x5000, data } if data[0] == 9));
    }

    #[test]
    fn page_map_round_trip_and_bad_lengths() {
        let mem = 256u64 << 20;
        let pages = vec![0, 0x1000, 0x9f000, 0x10_0000, mem - PAGE64];
        let bits = page_bitmap(pages.iter().copied(), mem);
        assert_eq!(bitmap_pages(&bits, mem).unwrap(), pages);
        assert!(bitmap_pages(&bits[1..], mem).is_err());
        assert!(!is_zero(&[0, 0, 1]) && is_zero(&[0; 4096]));
    }

    #[test]
    fn bitmap_runs_are_the_bitmap_pages_in_runs() {
        for mem in [256u64 << 20, 5 << 30] {
            let end = abi::layout::ram_ranges(mem).last().map_or(0, |&(s, l)| s + l);
            let runs = [
                (0, 9 * PAGE64),
                (0x10_0000, 1 << 20),
                (0xbfff_0000, 0x4_0000),
                (end - 3 * PAGE64, 3 * PAGE64),
            ];
            let bits = page_bitmap_of_runs(runs.iter().copied(), mem);
            let got = bitmap_runs(&bits, mem).unwrap();
            let flat: Vec<u64> = got.iter().flat_map(|&(g, l)| (g..g + l).step_by(PAGE)).collect();
            assert_eq!(flat, bitmap_pages(&bits, mem).unwrap(), "{mem}");
            // Maximal runs: none touches the next.
            assert!(got.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "{got:x?}");
            assert!(bitmap_runs(&bits[1..], mem).is_err());
        }
        let mut bits = page_bitmap(std::iter::empty(), 64 << 20);
        assert_eq!(bitmap_runs(&bits, 64 << 20).unwrap(), vec![]);
        bits[0] = 0b1011_0110;
        assert_eq!(
            bitmap_runs(&bits, 64 << 20).unwrap(),
            vec![(0x1000, 0x2000), (0x4000, 0x2000), (0x7000, 0x1000)]
        );
    }

    #[test]
    fn a_page_map_of_runs_equals_the_page_map_of_their_pages() {
        // Sizes with and without the hole below 4 GiB; runs in and across it,
        // byte-aligned or not, and past the end of RAM.
        for mem in [256u64 << 20, 5 << 30] {
            let end = abi::layout::ram_ranges(mem).last().map_or(0, |&(s, l)| s + l);
            let runs = [
                (0, PAGE64),
                (3 * PAGE64, 13 * PAGE64),
                (0x9f000, 0x11000),
                (0x10_0000, 1 << 20),
                (0xbfff_0000, 0x4_0000),
                (end - 5 * PAGE64, 9 * PAGE64),
            ];
            let pages: Vec<u64> = runs
                .iter()
                .flat_map(|&(g, l)| (g..g + l).step_by(PAGE))
                .filter(|&g| g < end)
                .collect();
            assert_eq!(
                page_bitmap_of_runs(runs.iter().copied(), mem),
                page_bitmap(pages.iter().copied(), mem),
                "{mem}"
            );
        }
    }

    #[test]
    fn bad_magic_version_and_lengths_are_errors() {
        let mut b = sample();
        b[0] ^= 1;
        assert!(matches!(decode_all(&b), Err(MigrationError::Protocol(_))));
        let mut b = sample();
        b[8] = 1;
        assert!(matches!(decode_all(&b), Err(MigrationError::Version(1))));
        // A huge state length is refused before any allocation.
        let mut r = std::io::Cursor::new(vec![T_STATE, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(decode(&mut r), Err(MigrationError::Protocol(_))));
        let mut r = std::io::Cursor::new(vec![T_REQUEST, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(
            matches!(decode(&mut r), Err(MigrationError::Protocol(_))),
            "unaligned"
        );
        // A `Need` longer than one bit per page of the largest guest.
        let mut r = std::io::Cursor::new([&[T_NEED][..], &(MAX_NEED + 1).to_le_bytes()].concat());
        assert!(matches!(decode(&mut r), Err(MigrationError::Protocol(_))));
        let mut r = std::io::Cursor::new(vec![99, 0, 0, 0, 0]);
        assert!(matches!(decode(&mut r), Err(MigrationError::Protocol(_))));
    }

    #[test]
    fn truncations_and_random_mutations_never_panic() {
        let good = sample();
        for n in 0..good.len() {
            let _ = decode_all(&good[..n]);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20000 {
            let mut b = good.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() % b.len() as u64) as usize;
                b[i] = rnd() as u8;
            }
            let _ = decode_all(&b);
        }
    }
}
