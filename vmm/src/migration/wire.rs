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
/// pre-copy and the pause), and both may be TLS.
pub const VERSION: u32 = 4;
pub use abi::layout::{PAGE_LEN as PAGE, PAGE_SIZE as PAGE64};
/// Length of a page message: address and data.
pub const PAGE_MSG: u32 = 8 + 4096;
/// Largest state message.
pub const MAX_STATE: u32 = 64 << 20;
/// Largest number of extents in one message.
pub const MAX_EXTENTS: u32 = 1 << 20;

const T_STATE: u8 = 1;
const T_EXTENTS: u8 = 2;
const T_PAGE_REQUESTED: u8 = 3;
const T_PAGE_PUSHED: u8 = 4;
const T_DONE: u8 = 5;
const T_PRECOPY_BEGIN: u8 = 6;
const T_PRECOPY_PAGE: u8 = 7;
const T_RESUME: u8 = 8;
const T_PREEMPT: u8 = 9;
const T_REQUEST: u8 = 16;
const T_RESEND: u8 = 17;
const T_RESUMED: u8 = 18;
const T_COMPLETE: u8 = 19;
const T_NEED: u8 = 20;

/// Largest `Need` bitmap: one bit per page of the largest guest (64 GiB).
pub const MAX_NEED: u32 = 1 << 21;

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source: `state.json`'s content.
    State(Vec<u8>),
    /// Source: the guest-physical extents that hold data `(gpa, len)`.
    Extents(Vec<(u64, u64)>),
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
    /// Destination: the VM runs here.
    Resumed,
    /// Destination: every page arrived.
    Complete,
}

impl Message {
    /// What the message is, in a few words (its payload's size, not its
    /// bytes): for errors and logs, which a peer's multi-megabyte state or
    /// bitmap must not flood.
    pub fn summary(&self) -> String {
        match self {
            Message::State(s) => format!("State ({} bytes)", s.len()),
            Message::Extents(e) => format!("Extents ({} extents)", e.len()),
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
            Message::Resumed => "Resumed".into(),
            Message::Complete => "Complete".into(),
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
        Message::Extents(e) => {
            let b: Vec<u8> = e
                .iter()
                .flat_map(|(g, l)| g.to_le_bytes().into_iter().chain(l.to_le_bytes()))
                .collect();
            frame(w, T_EXTENTS, &[&b])
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
        Message::Resumed => frame(w, T_RESUMED, &[]),
        Message::Complete => frame(w, T_COMPLETE, &[]),
    }
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
        T_EXTENTS => len % 16 == 0 && len / 16 <= MAX_EXTENTS,
        T_PAGE_REQUESTED | T_PAGE_PUSHED | T_PRECOPY_PAGE => len == PAGE_MSG,
        T_DONE => len == 24,
        T_REQUEST | T_RESEND | T_PRECOPY_BEGIN => len == 8,
        T_RESUMED | T_COMPLETE | T_RESUME | T_PREEMPT => len == 0,
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
        T_EXTENTS => Message::Extents(
            (0..b.len() / 16)
                .map(|i| (u64_at(&b, 2 * i), u64_at(&b, 2 * i + 1)))
                .collect(),
        ),
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
        T_RESUMED => Message::Resumed,
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
            Message::Extents(vec![(0, 4096), (0x10000, 8192)]),
            Message::Page {
                gpa: 0x1000,
                requested: true,
                data: vec![7; PAGE],
            },
            Message::Request(0x2000),
            Message::Resend(0x3000),
            Message::Resumed,
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
            Message::Extents(vec![(0, 4096); 1 << 20]),
        ] {
            assert!(m.summary().len() < 40, "{}", m.summary());
        }
    }

    #[test]
    fn round_trip() {
        let m = decode_all(&sample()).unwrap();
        assert_eq!(m.len(), 13);
        assert_eq!(m[12], Message::Preempt);
        assert_eq!(m[3], Message::Request(0x2000));
        assert_eq!(m[11], Message::Need(vec![0b1010, 1]));
        assert!(matches!(&m[9], Message::PrecopyPage { gpa: 0x5000, data } if data[0] == 9));
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
