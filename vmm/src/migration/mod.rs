//! Post-copy live migration (`docs/migration.md`).
//!
//! The source pauses, sends the VM state (the content of a snapshot's
//! `state.json`) and the guest-physical extents that hold data, then serves
//! page requests and pushes the remaining data pages in the background,
//! requests first. The destination builds the VM from that state with its
//! memory served lazily by a [`RemoteSource`] through the retry core and
//! resumes at once. A page it does not have is never zero-filled: if the
//! connection dies, faults on missing data pages stay parked (`Retry(Held)`)
//! and the VM is paused.

use crate::controller::{ControlError, VmHandle};
use crate::lazy::Materializer;
use crate::memory::DirtyTracker;
use crate::snapshot::{Extent, Snapshot, SnapshotError, VmState};
use crate::vm::{RunOutcome, Vm, VmError, VmOptions};
use ::memory::{FetchOutcome, Notifier, PageSource, RetryReason, SourceError};
use devices::GuestRam;
use kvm_ioctls::VmFd;
use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Stream magic, sent by both ends first.
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// Protocol version.
pub const VERSION: u32 = 2;
/// Guest page size.
pub const PAGE: usize = 4096;
/// [`PAGE`] as a `u64`.
const PAGE64: u64 = 4096;
/// Length of a page message: address and data.
const PAGE_MSG: u32 = 8 + 4096;
/// Largest state message.
pub const MAX_STATE: u32 = 64 << 20;
/// How long the source waits for the destination's header.
const HEADER_WAIT: Duration = Duration::from_secs(10);
/// A peer that takes nothing for this long is gone (a write fails).
const WRITE_WAIT: Duration = Duration::from_secs(30);
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

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The address does not parse.
    #[error("bad migration address `{0}`: use unix:PATH or tcp:ADDR:PORT")]
    BadEndpoint(String),
    /// Socket IO.
    #[error("migration connection: {what} failed: {source}; check the address and the peer (`vmm receive --listen` on a destination, `vmm ctl DEST recover` before `migrate --resume`)")]
    Io {
        /// What was done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The peer sent something that is not this protocol.
    #[error("the migration stream is malformed: {0}; run the same vmm on both ends (a corrupted or hostile stream is refused)")]
    Protocol(String),
    /// Another protocol version.
    #[error("the peer speaks migration protocol version {0}; this vmm speaks version {VERSION}: run the same vmm on both ends")]
    Version(u32),
    /// The received state does not fit.
    #[error("the migrated VM state cannot be used: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The destination VM cannot be built.
    #[error("the destination VM cannot be built: {0}")]
    Vm(#[from] VmError),
    /// The VM cannot migrate now.
    #[error("cannot migrate: {0}")]
    Control(String),
    /// `recover` on a destination whose migration is not interrupted (it may
    /// have every page already).
    #[error("the migration is not interrupted: there is nothing to recover")]
    NotInterrupted,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { what, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a migration goes: `unix:PATH` or `tcp:ADDR:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = MigrationError;
    fn from_str(s: &str) -> Result<Endpoint, MigrationError> {
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Endpoint::Unix(p.into())),
            Some(("tcp", a))
                if a.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Endpoint::Tcp(a.into()))
            }
            _ => Err(MigrationError::BadEndpoint(s.into())),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connection of either kind.
#[derive(Debug)]
pub enum Conn {
    /// Unix.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Conn {
    /// Connects to `to`.
    pub fn connect(to: &Endpoint) -> Result<Conn, MigrationError> {
        let c = match to {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(io("connect"))?),
            Endpoint::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let addr = a
                    .to_socket_addrs()
                    .map_err(io("resolving the address"))?
                    .next()
                    .ok_or_else(|| MigrationError::BadEndpoint(format!("tcp:{a}")))?;
                // The source's controller may wait here: never for long.
                let s = TcpStream::connect_timeout(&addr, HEADER_WAIT).map_err(io("connect"))?;
                // Page requests are small and latency bound.
                s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
                Conn::Tcp(s)
            }
        };
        c.set_write_timeout(Some(WRITE_WAIT))?;
        Ok(c)
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
        .map_err(io("setting a write timeout"))
    }

    fn try_clone(&self) -> Result<Conn, MigrationError> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone().map_err(io("cloning the socket"))?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone().map_err(io("cloning the socket"))?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
        .map_err(io("setting a read timeout"))
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A listening destination socket.
#[derive(Debug)]
pub enum Listener {
    /// Unix (the socket file is removed on drop).
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `at` (a stale Unix socket file is replaced).
    pub fn bind(at: &Endpoint) -> Result<Listener, MigrationError> {
        Ok(match at {
            Endpoint::Unix(p) => {
                if UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                Listener::Unix(UnixListener::bind(p).map_err(io("bind"))?, p.clone())
            }
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(io("bind"))?),
        })
    }

    /// The address to give the source (the real port for `tcp:...:0`).
    pub fn endpoint(&self) -> Result<Endpoint, MigrationError> {
        Ok(match self {
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr().map_err(io("local address"))?.to_string()),
        })
    }

    fn set_nonblocking(&self) -> Result<(), MigrationError> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(io("setting non-blocking mode"))
    }

    /// A connection if one is waiting (after [`set_nonblocking`](Self::set_nonblocking)).
    fn try_accept(&self) -> Result<Option<Conn>, MigrationError> {
        let r = match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }),
        };
        match r {
            Ok(c) => {
                // The accepted socket may inherit non-blocking mode.
                match &c {
                    Conn::Unix(s) => s.set_nonblocking(false),
                    Conn::Tcp(s) => s.set_nonblocking(false),
                }
                .map_err(io("setting blocking mode"))?;
                c.set_write_timeout(Some(WRITE_WAIT))?;
                Ok(Some(c))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io("accept")(e)),
        }
    }

    fn accept(&self) -> Result<Conn, MigrationError> {
        let c = match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept().map_err(io("accept"))?.0),
            Listener::Tcp(l) => {
                let s = l.accept().map_err(io("accept"))?.0;
                s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
                Conn::Tcp(s)
            }
        };
        c.set_write_timeout(Some(WRITE_WAIT))?;
        Ok(c)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------- wire format

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

/// Writes the stream header.
pub fn write_header(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())
}

/// Reads and checks the stream header.
pub fn read_header(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut h = [0u8; 12];
    r.read_exact(&mut h).map_err(io("reading the stream header"))?;
    if h[..8] != MAGIC {
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
    let len = u32::try_from(len).map_err(std::io::Error::other)?;
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

// ---------------------------------------------------------------- source side

/// How to migrate (`vmm ctl SRC migrate`).
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Hold the background push back this long (pages move on demand only
    /// until then; an experiment knob, zero normally).
    pub push_delay: Duration,
    /// Pre-copy rounds before the switchover (0: pure post-copy). The first
    /// round copies every data page while the VM runs; each later one copies
    /// again the pages the guest wrote meanwhile (KVM dirty log).
    pub precopy_rounds: u32,
    /// Resume an interrupted post-copy with a destination that waits for it
    /// (`vmm ctl DEST recover --from ADDR`, then this with `--to ADDR`).
    pub resume: bool,
}

/// What the source sent, printed by `vmm run` and returned to `vmm ctl migrate`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceSummary {
    /// Pause to the destination's `Resumed` (includes one network trip).
    pub downtime_ms: f64,
    /// Pause to the destination's `Complete`.
    pub total_ms: f64,
    /// Data pages left for post-copy (all of them without pre-copy; the
    /// pages still missing at the destination when resuming).
    pub data_pages: u64,
    /// Pages sent in the background.
    pub pages_pushed: u64,
    /// Pages sent as answers to requests.
    pub pages_requested: u64,
    /// Requests for pages already sent (not sent again).
    pub requests_already_sent: u64,
    /// Pages sent again on the destination's `Resend`.
    pub pages_resent: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Pre-copy rounds done.
    pub precopy_rounds: u32,
    /// Pages sent while the VM ran (every round).
    pub precopy_pages: u64,
    /// Pages found written after each round (the last one at the switchover:
    /// the post-copy set).
    pub precopy_dirty: Vec<u64>,
    /// Start of the migration to the switchover.
    pub precopy_ms: f64,
    /// This run resumed an interrupted post-copy.
    pub resumed: bool,
}

/// Why a migration failed, and whether it can be resumed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What happened.
    pub message: String,
    /// Set once the destination may have resumed the VM: a destination that
    /// waits for it (`recover`) can get the rest with `migrate --resume`.
    pub resumable: Option<Resumable>,
}

/// What a source keeps to resume an interrupted post-copy.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// The post-copy data extents sent to the destination.
    pub extents: Vec<Extent>,
    /// When the VM was paused for the switchover.
    pub paused_at: Instant,
    /// When the destination said it runs the VM, if it did.
    pub resumed_at: Option<Instant>,
}

/// A `recover` request, from the controller to [`receive`].
#[derive(Debug)]
pub struct RecoverRequest {
    /// Where to wait for the source.
    pub from: Endpoint,
    /// The address once listening, or why not.
    pub reply: Sender<Result<Endpoint, MigrationError>>,
}

/// Connects to `to` and exchanges the stream headers.
fn handshake(to: &Endpoint) -> Result<Conn, MigrationError> {
    let mut conn = Conn::connect(to)?;
    write_header(&mut conn).map_err(io("sending the header"))?;
    // The source may wait here with the VM paused: a peer that never
    // answers must not hold it forever.
    conn.set_read_timeout(Some(HEADER_WAIT))?;
    read_header(&mut conn)?;
    conn.set_read_timeout(None)?;
    Ok(conn)
}

/// Opens the answer channel: answers to page requests go on their own
/// connection, so they never queue behind pushed pages already in the main
/// connection's buffers (QEMU's postcopy-preempt).
fn open_answers(to: &Endpoint) -> Result<Conn, MigrationError> {
    let mut c = handshake(to)?;
    encode(&mut c, &Message::Preempt).map_err(io("opening the answer channel"))?;
    Ok(c)
}

/// The guest-physical pages of `extents`, in order.
fn extent_pages(extents: &[Extent]) -> impl Iterator<Item = u64> + '_ {
    extents.iter().flat_map(|e| (e.gpa..e.end()).step_by(PAGE))
}

/// Extents (within one [`EXTENT_MAX`](crate::snapshot::EXTENT_MAX) block
/// each) covering the ascending page addresses `pages`.
fn extents_of(pages: &[u64]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &gpa in pages {
        match out.last_mut() {
            Some(e) if e.end() == gpa && !gpa.is_multiple_of(crate::snapshot::EXTENT_MAX) => e.len += PAGE64,
            _ => out.push(Extent {
                gpa,
                len: PAGE64,
                crc32: 0,
            }),
        }
    }
    out
}

/// A source connected to its destination, the state already sent.
#[derive(Debug)]
pub struct Outgoing {
    conn: Conn,
    /// The answer channel.
    answers: Conn,
    mem: GuestRam,
    extents: Vec<Extent>,
    paused_at: Instant,
    /// The destination's `Resumed` arrived.
    resumed_at: Option<Instant>,
    push_delay: Duration,
    bytes: u64,
    /// Pages to push, in order.
    order: Vec<u64>,
    /// Per guest page: 0 no data, 1 data not sent, 2 sent.
    sent: Vec<u8>,
    summary: SourceSummary,
}

impl Outgoing {
    /// Connects to `to` and sends the header, the state and the extents.
    pub fn connect(
        to: &Endpoint,
        state: &VmState,
        extents: Vec<Extent>,
        mem: GuestRam,
        paused_at: Instant,
        push_delay: Duration,
    ) -> Result<Outgoing, MigrationError> {
        let conn = handshake(to)?;
        Outgoing::postcopy(
            to,
            conn,
            12,
            state,
            extents,
            mem,
            paused_at,
            push_delay,
            SourceSummary::default(),
        )
    }

    /// Sends the state and the extents on a connection whose headers (and
    /// pre-copy: `bytes` so far) went already.
    #[allow(clippy::too_many_arguments)]
    fn postcopy(
        to: &Endpoint,
        conn: Conn,
        bytes: u64,
        state: &VmState,
        extents: Vec<Extent>,
        mem: GuestRam,
        paused_at: Instant,
        push_delay: Duration,
        summary: SourceSummary,
    ) -> Result<Outgoing, MigrationError> {
        let json = serde_json::to_vec(state).map_err(|e| MigrationError::Control(e.to_string()))?;
        let mut w = BufWriter::new(conn.try_clone()?);
        encode(&mut w, &Message::State(json.clone())).map_err(io("sending the state"))?;
        let pairs = extents.iter().map(|e| (e.gpa, e.len)).collect();
        encode(&mut w, &Message::Extents(pairs)).map_err(io("sending the extents"))?;
        w.flush().map_err(io("sending the state"))?;
        let answers = open_answers(to)?;
        let ram_end = crate::snapshot::ram_end(state.config.mem_size);
        let mut out = Outgoing::new(
            conn, answers, mem, extents, ram_end, paused_at, push_delay, summary,
        );
        out.bytes += bytes + 5 + json.len() as u64 + 5 + 16 * out.extents.len() as u64 + 12 + 5;
        let order: Vec<u64> = extent_pages(&out.extents).collect();
        for &g in &order {
            out.mark(g, 1);
        }
        out.summary.data_pages = order.len() as u64;
        out.order = order;
        Ok(out)
    }

    /// Reconnects to a destination that waits for the rest of an interrupted
    /// post-copy (`vmm ctl DEST recover --from to`) and learns which pages
    /// it still misses. The VM must still be paused as it was.
    pub fn resume(
        to: &Endpoint,
        from: &Resumable,
        mem: GuestRam,
        mem_size: u64,
        push_delay: Duration,
    ) -> Result<Outgoing, MigrationError> {
        let mut conn = handshake(to)?;
        encode(&mut conn, &Message::Resume).map_err(io("asking to resume"))?;
        conn.set_read_timeout(Some(HEADER_WAIT))?;
        let Message::Need(bits) = decode(&mut conn)? else {
            return Err(MigrationError::Protocol(
                "the destination did not say which pages it misses (is it waiting with `vmm ctl DEST recover`?)"
                    .into(),
            ));
        };
        conn.set_read_timeout(None)?;
        let pages: Vec<u64> = extent_pages(&from.extents).collect();
        if bits.len() != pages.len().div_ceil(8) {
            return Err(MigrationError::Protocol(format!(
                "the destination's list of missing pages has {} bytes for {} data pages: it is not the destination of this migration",
                bits.len(),
                pages.len()
            )));
        }
        let answers = open_answers(to)?;
        let ram_end = crate::snapshot::ram_end(mem_size);
        let summary = SourceSummary {
            resumed: true,
            ..Default::default()
        };
        let mut out = Outgoing::new(
            conn,
            answers,
            mem,
            from.extents.clone(),
            ram_end,
            from.paused_at,
            push_delay,
            summary,
        );
        out.resumed_at = from.resumed_at;
        out.bytes = 12 + 5 + 5 + bits.len() as u64 + 12 + 5;
        let mut order = Vec::new();
        for (i, &g) in pages.iter().enumerate() {
            // The pages the destination has count as sent: a request for one
            // (a fill that failed) comes as `Resend`.
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                out.mark(g, 1);
                order.push(g);
            } else {
                out.mark(g, 2);
            }
        }
        out.summary.data_pages = order.len() as u64;
        out.order = order;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: Conn,
        answers: Conn,
        mem: GuestRam,
        extents: Vec<Extent>,
        ram_end: u64,
        paused_at: Instant,
        push_delay: Duration,
        summary: SourceSummary,
    ) -> Outgoing {
        Outgoing {
            conn,
            answers,
            mem,
            extents,
            paused_at,
            resumed_at: None,
            push_delay,
            bytes: 0,
            order: Vec::new(),
            sent: vec![0u8; usize::try_from(ram_end / PAGE64).unwrap_or(0)],
            summary,
        }
    }

    fn mark(&mut self, gpa: u64, v: u8) {
        if let Some(s) = usize::try_from(gpa / PAGE64)
            .ok()
            .and_then(|i| self.sent.get_mut(i))
        {
            *s = v;
        }
    }

    /// Serves requests and pushes every data page on a new thread; calls
    /// `on_end` and sends the result to `reply` at the end.
    pub fn spawn(
        self,
        on_end: impl FnOnce(Result<SourceSummary, Failure>) + Send + 'static,
        reply: Sender<Result<SourceSummary, MigrationError>>,
    ) -> Result<(), MigrationError> {
        spawn_out(move || self.serve(), on_end, reply)
    }

    /// Serves requests and pushes every data page; on failure says whether
    /// the destination may resume it.
    pub fn serve(mut self) -> Result<SourceSummary, Box<Stopped>> {
        self.run().map_err(|error| {
            Box::new(Stopped {
                error,
                resumable: Some(Resumable {
                    extents: self.extents.clone(),
                    paused_at: self.paused_at,
                    resumed_at: self.resumed_at,
                }),
            })
        })
    }

    fn run(&mut self) -> Result<SourceSummary, MigrationError> {
        let mut reader = self.conn.try_clone()?;
        let (tx, rx) = mpsc::channel();
        // Requests are read on their own thread so that the push loop can
        // check them between every page without blocking.
        std::thread::Builder::new()
            .name("migration-requests".into())
            .spawn(move || loop {
                let m = decode(&mut reader);
                let stop = m.is_err();
                if tx.send(m).is_err() || stop {
                    break;
                }
            })
            .map_err(io("starting the request reader"))?;
        let order = std::mem::take(&mut self.order);
        let conn = self.conn.try_clone()?;
        let mut w = BufWriter::with_capacity(64 << 10, conn);
        let mut answers = BufWriter::with_capacity(8 << 10, self.answers.try_clone()?);
        let mut next = 0;
        let mut done_sent = false;
        let mut buf = vec![0u8; PAGE];
        let push_from = Instant::now() + self.push_delay;
        loop {
            let pushing = Instant::now() >= push_from;
            // `Done` carries the downtime: it waits for `Resumed` (which a
            // resumed post-copy's destination does not send again).
            let may_end = self.resumed_at.is_some() || self.summary.resumed;
            let work = next < order.len() || (!done_sent && may_end);
            let msg = if pushing && work {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        return Err(MigrationError::Protocol("the request reader ended".into()))
                    }
                }
            } else {
                // Only requests to serve: sleep until one comes or the push may start.
                let wait = if pushing {
                    Duration::from_millis(100)
                } else {
                    push_from
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(1), Duration::from_millis(100))
                };
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(MigrationError::Protocol("the request reader ended".into()))
                    }
                }
            };
            if let Some(m) = msg {
                match m? {
                    Message::Request(gpa) | Message::Resend(gpa) if self.slot(gpa) == 0 => {
                        return Err(MigrationError::Protocol(format!(
                            "the destination asked for page {gpa:#x}, which holds no data or is outside guest RAM"
                        )))
                    }
                    Message::Request(gpa) if self.slot(gpa) == 2 => self.summary.requests_already_sent += 1,
                    m @ (Message::Request(_) | Message::Resend(_)) => {
                        let (Message::Request(gpa) | Message::Resend(gpa)) = m else { continue };
                        if matches!(m, Message::Resend(_)) {
                            self.summary.pages_resent += 1;
                        } else {
                            self.summary.pages_requested += 1;
                        }
                        // On the answer channel, flushed at once: it never
                        // waits behind pushes.
                        self.send_page(&mut answers, &mut buf, gpa, true)?;
                        answers.flush().map_err(io("sending a page"))?;
                    }
                    Message::Resumed => self.resumed_at = Some(Instant::now()),
                    Message::Complete => {
                        w.flush().map_err(io("flushing"))?;
                        let mut s = std::mem::take(&mut self.summary);
                        s.downtime_ms = self
                            .resumed_at
                            .map_or(0.0, |r| (r - self.paused_at).as_secs_f64() * 1e3);
                        s.total_ms = self.paused_at.elapsed().as_secs_f64() * 1e3;
                        s.bytes_sent = self.bytes;
                        return Ok(s);
                    }
                    other => {
                        return Err(MigrationError::Protocol(format!(
                            "unexpected message from the destination: {other:?}"
                        )))
                    }
                }
                continue;
            }
            if !pushing {
                continue;
            }
            if next < order.len() {
                let gpa = order[next];
                next += 1;
                if self.slot(gpa) == 1 {
                    self.summary.pages_pushed += 1;
                    self.send_page(&mut w, &mut buf, gpa, false)?;
                }
            } else if !done_sent && may_end {
                let downtime_us = self.resumed_at.map_or(0, |r| {
                    u64::try_from((r - self.paused_at).as_micros()).unwrap_or(u64::MAX)
                });
                let done = Message::Done {
                    pushed: self.summary.pages_pushed,
                    requested: self.summary.pages_requested,
                    downtime_us,
                };
                encode(&mut w, &done).map_err(io("sending Done"))?;
                w.flush().map_err(io("sending Done"))?;
                self.bytes += 29;
                done_sent = true;
            }
        }
    }

    fn slot(&self, gpa: u64) -> u8 {
        usize::try_from(gpa / PAGE64)
            .ok()
            .and_then(|i| self.sent.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn send_page(
        &mut self,
        w: &mut impl Write,
        buf: &mut [u8],
        gpa: u64,
        requested: bool,
    ) -> Result<(), MigrationError> {
        // The VM is paused here: its memory does not change.
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MigrationError::Control(format!("reading guest page {gpa:#x}: {e}")))?;
        let m = Message::Page {
            gpa,
            requested,
            data: buf.to_vec(),
        };
        encode(w, &m).map_err(io("sending a page"))?;
        self.bytes += 5 + 8 + PAGE64;
        self.mark(gpa, 2);
        Ok(())
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // Ends the request reader too.
        self.conn.shutdown();
        self.answers.shutdown();
    }
}

/// A migration that stopped before the end.
#[derive(Debug)]
pub struct Stopped {
    /// Why.
    pub error: MigrationError,
    /// Whether (and how) the destination may resume it.
    pub resumable: Option<Resumable>,
}

/// Reports a migration's end to the controller (`on_end`) and the requester.
fn finish(
    r: Result<SourceSummary, Box<Stopped>>,
    on_end: impl FnOnce(Result<SourceSummary, Failure>),
    reply: &Sender<Result<SourceSummary, MigrationError>>,
) {
    match r {
        Ok(s) => {
            on_end(Ok(s.clone()));
            let _ = reply.send(Ok(s));
        }
        Err(stopped) => {
            let Stopped { error, resumable } = *stopped;
            on_end(Err(Failure {
                message: error.to_string(),
                resumable,
            }));
            let _ = reply.send(Err(error));
        }
    }
}

/// What a pre-copy migration needs from the source VM.
pub struct PrecopyCtx {
    /// The VM (its memory slots get dirty logging).
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM.
    pub mem: GuestRam,
    /// The guest's RAM size.
    pub mem_size: u64,
    /// Fetches lazily backed memory in full first (pages the guest never
    /// wrote would otherwise be missing from the copy).
    pub materializer: Option<Materializer>,
    /// Set when the VM's own (incoming) migration source is lost: its
    /// memory cannot be fetched in full then.
    pub stop: Arc<AtomicBool>,
    /// Pauses the VM and captures its state (on the controller).
    pub switchover: Box<dyn FnOnce() -> Result<(VmState, Instant), String> + Send>,
}

impl std::fmt::Debug for PrecopyCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopyCtx")
            .field("mem_size", &self.mem_size)
            .finish_non_exhaustive()
    }
}

/// Pre-copy rounds, switchover, then post-copy, on a new thread (the VM runs
/// meanwhile); `on_end` and `reply` as for [`Outgoing::spawn`].
pub fn spawn_precopy(
    to: Endpoint,
    options: MigrateOptions,
    ctx: PrecopyCtx,
    on_end: impl FnOnce(Result<SourceSummary, Failure>) + Send + 'static,
    reply: Sender<Result<SourceSummary, MigrationError>>,
) -> Result<(), MigrationError> {
    spawn_out(
        move || precopy(&to, &options, ctx).and_then(Outgoing::serve),
        on_end,
        reply,
    )
}

/// Runs an outgoing migration on the `migration-out` thread and reports its
/// end ([`finish`]).
fn spawn_out(
    work: impl FnOnce() -> Result<SourceSummary, Box<Stopped>> + Send + 'static,
    on_end: impl FnOnce(Result<SourceSummary, Failure>) + Send + 'static,
    reply: Sender<Result<SourceSummary, MigrationError>>,
) -> Result<(), MigrationError> {
    std::thread::Builder::new()
        .name("migration-out".into())
        .spawn(move || finish(work(), on_end, &reply))
        .map_err(io("starting the migration thread"))?;
    Ok(())
}

fn precopy(to: &Endpoint, options: &MigrateOptions, ctx: PrecopyCtx) -> Result<Outgoing, Box<Stopped>> {
    let start = Instant::now();
    let early = |error: MigrationError| {
        Box::new(Stopped {
            error,
            resumable: None,
        })
    };
    if let Some(m) = &ctx.materializer {
        m.run(&ctx.stop, &AtomicU64::new(0)).map_err(|e| {
            early(MigrationError::Control(format!(
                "guest memory cannot be fetched in full: {e}"
            )))
        })?;
        if ctx.stop.load(Ordering::Acquire) {
            return Err(early(MigrationError::Control(
                crate::ControlError::SourceLost.to_string(),
            )));
        }
    }
    let conn = handshake(to).map_err(early)?;
    let mut w = BufWriter::with_capacity(64 << 10, conn.try_clone().map_err(early)?);
    let mut summary = SourceSummary::default();
    let mut bytes = 12 + 13;
    encode(
        &mut w,
        &Message::PrecopyBegin {
            mem_size: ctx.mem_size,
        },
    )
    .map_err(|e| early(io("starting pre-copy")(e)))?;
    // Logging starts before the first copy: a page written while (or after)
    // it is copied is copied again.
    let tracker = DirtyTracker::start(ctx.vm_fd.clone(), ctx.mem.clone())
        .map_err(|e| early(MigrationError::Control(e.to_string())))?;
    let mut buf = vec![0u8; PAGE];
    // Volatile copies: the guest may be writing the page (it is then in the
    // next round's log). A rewritten page goes even if now zero: the
    // destination may hold an older copy.
    let mut send = |w: &mut BufWriter<Conn>, gpa: u64, summary: &mut SourceSummary, skip_zero: bool| {
        ctx.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| MigrationError::Control(format!("reading guest page {gpa:#x}: {e}")))?;
        if skip_zero && buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        encode(
            w,
            &Message::PrecopyPage {
                gpa,
                data: buf.clone(),
            },
        )
        .map_err(io("sending a page"))?;
        summary.precopy_pages += 1;
        Ok::<_, MigrationError>(())
    };
    // Round 1: every page that exists and holds data.
    for gpa in crate::snapshot::existing_guest_pages(&ctx.mem).map_err(|e| early(e.into()))? {
        send(&mut w, gpa, &mut summary, true).map_err(early)?;
    }
    summary.precopy_rounds = 1;
    // Later rounds: what the guest wrote meanwhile.
    while summary.precopy_rounds < options.precopy_rounds {
        let dirty = tracker
            .take()
            .map_err(|e| early(MigrationError::Control(e.to_string())))?;
        summary.precopy_dirty.push(dirty.len() as u64);
        summary.precopy_rounds += 1;
        for &gpa in &dirty {
            send(&mut w, gpa, &mut summary, false).map_err(early)?;
        }
        if dirty.is_empty() {
            break;
        }
    }
    w.flush().map_err(|e| early(io("sending pages")(e)))?;
    drop(w);
    bytes += summary.precopy_pages * (5 + 8 + PAGE64);
    summary.precopy_ms = start.elapsed().as_secs_f64() * 1e3;
    let (state, paused_at) = (ctx.switchover)().map_err(|e| early(MigrationError::Control(e)))?;
    // The VM is paused: what it wrote since the last round is the post-copy set.
    let mut tracker = tracker;
    let dirty = tracker
        .take()
        .map_err(|e| early(MigrationError::Control(e.to_string())))?;
    if let Err(e) = tracker.stop() {
        tracing::warn!("{e}");
    }
    summary.precopy_dirty.push(dirty.len() as u64);
    let extents = extents_of(&dirty);
    let resumable = Resumable {
        extents: extents.clone(),
        paused_at,
        resumed_at: None,
    };
    Outgoing::postcopy(
        to,
        conn,
        bytes,
        &state,
        extents,
        ctx.mem,
        paused_at,
        options.push_delay,
        summary,
    )
    .map_err(|error| {
        Box::new(Stopped {
            error,
            resumable: Some(resumable),
        })
    })
}

// ---------------------------------------------------------------- destination side

enum Slot {
    Requested(Instant),
    Arrived(Vec<u8>),
    Taken,
}

#[derive(Default)]
struct Counters {
    requested: u64,
    resends: u64,
    pushed: u64,
    answered: u64,
    requests_met_by_push: u64,
    duplicates: u64,
    bytes: u64,
    held_after_loss: u64,
    latency_us_log2: Vec<u64>,
}

/// Where an incoming migration stands, for a progress display; updated
/// while [`receive`] runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Pages received during pre-copy (a page sent in several rounds counts
    /// each time).
    pub precopy_pages: AtomicU64,
    /// Data pages left for post-copy (0 until the state arrived).
    pub data_pages: AtomicU64,
    /// Post-copy pages received so far (pushed or answered).
    pub received: AtomicU64,
    /// The VM runs here.
    pub running: AtomicBool,
    /// Every page arrived.
    pub complete: AtomicBool,
    /// The source is lost (the VM is paused until `recover`); shared with
    /// the VM's controller, which refuses to resume, snapshot or migrate it
    /// meanwhile.
    pub lost: Arc<AtomicBool>,
}

/// The destination's page source: post-copy data pages come from the source
/// over the connection, pages copied in pre-copy (and not written since)
/// from memory, the rest are zero. See the module documentation.
pub struct RemoteSource {
    name: String,
    notifier: Notifier,
    extents: Vec<(u64, u64)>,
    writer: Mutex<Conn>,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Pre-copied pages not placed yet.
    precopied: Mutex<HashMap<u64, Vec<u8>>>,
    counters: Mutex<Counters>,
    lost: Mutex<Option<String>>,
    complete: AtomicBool,
    progress: Arc<Progress>,
    /// Post-copy data pages announced, and how many arrived.
    data_pages: u64,
    arrived: AtomicU64,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RemoteSource {
    fn new(
        name: String,
        extents: Vec<(u64, u64)>,
        writer: Conn,
        precopied: HashMap<u64, Vec<u8>>,
        progress: Arc<Progress>,
    ) -> Result<RemoteSource, MigrationError> {
        let data_pages = extents.iter().map(|&(_, l)| l / PAGE64).sum();
        Ok(RemoteSource {
            name,
            notifier: Notifier::new().map_err(io("creating an eventfd"))?,
            extents,
            writer: Mutex::new(writer),
            slots: Mutex::new(HashMap::new()),
            precopied: Mutex::new(precopied),
            counters: Mutex::new(Counters::default()),
            lost: Mutex::new(None),
            complete: AtomicBool::new(false),
            progress,
            data_pages,
            arrived: AtomicU64::new(0),
        })
    }

    fn is_data(&self, gpa: u64) -> bool {
        let i = self.extents.partition_point(|&(g, _)| g <= gpa);
        i > 0 && self.extents.get(i - 1).is_some_and(|&(g, l)| gpa < g + l)
    }

    fn send(&self, m: &Message) -> bool {
        let mut w = lock(&self.writer);
        let ok = encode(&mut *w, m).and_then(|()| w.flush()).is_ok();
        if !ok {
            self.set_lost("sending a page request failed".into());
        }
        ok
    }

    fn set_lost(&self, why: String) {
        if self.complete.load(Ordering::Acquire) {
            return;
        }
        lock(&self.lost).get_or_insert(why);
        self.progress.lost.store(true, Ordering::Release);
        // Parked faults are retried and now answer Held until a recovery.
        self.notifier.notify();
    }

    /// Why the connection to the source was lost before every page arrived.
    pub fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    /// Page `gpa` is mapped: its data can go.
    fn placed(&self, gpa: u64) {
        if let Some(slot @ Slot::Arrived(_)) = lock(&self.slots).get_mut(&gpa) {
            *slot = Slot::Taken;
        }
    }

    /// Every post-copy data page has arrived.
    fn all_arrived(&self) -> bool {
        self.arrived.load(Ordering::Acquire) >= self.data_pages
    }

    /// Bit `i` set: the `i`-th data page (extent order) has not arrived.
    fn need(&self) -> Vec<u8> {
        let slots = lock(&self.slots);
        let pages = self.extents.iter().flat_map(|&(g, l)| (g..g + l).step_by(PAGE));
        let mut bits = Vec::new();
        for (i, gpa) in pages.enumerate() {
            if i % 8 == 0 {
                bits.push(0u8);
            }
            if !matches!(slots.get(&gpa), Some(Slot::Arrived(_) | Slot::Taken)) {
                if let Some(b) = bits.last_mut() {
                    *b |= 1 << (i % 8);
                }
            }
        }
        bits
    }

    /// Goes on with a source that came back on `conn` (after [`need`](Self::need)
    /// went to it): the pages faults asked for before are asked again.
    fn reconnect(&self, conn: Conn) {
        *lock(&self.writer) = conn;
        *lock(&self.lost) = None;
        self.progress.lost.store(false, Ordering::Release);
        let asked: Vec<u64> = lock(&self.slots)
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Requested(_)))
            .map(|(&g, _)| g)
            .collect();
        for gpa in asked {
            if !self.send(&Message::Request(gpa)) {
                break;
            }
        }
        // Faults parked as Held ask again.
        self.notifier.notify();
    }

    /// Stores an arriving page: `None` for a duplicate, else whether a fault
    /// had asked for it; `Err` for a page the source may not send.
    fn arrive(&self, gpa: u64, requested: bool, data: Vec<u8>) -> Result<Option<bool>, MigrationError> {
        if !self.is_data(gpa) {
            return Err(MigrationError::Protocol(format!(
                "the source sent page {gpa:#x}, outside the data it announced"
            )));
        }
        let mut c = lock(&self.counters);
        c.bytes += 5 + 8 + PAGE64;
        if requested {
            c.answered += 1;
        } else {
            c.pushed += 1;
        }
        let mut slots = lock(&self.slots);
        let mut asked = false;
        match slots.get(&gpa) {
            Some(Slot::Arrived(_) | Slot::Taken) => {
                c.duplicates += 1;
                return Ok(None);
            }
            Some(Slot::Requested(t)) => {
                asked = true;
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                let b = (63 - us.leading_zeros()) as usize;
                if c.latency_us_log2.len() <= b {
                    c.latency_us_log2.resize(b + 1, 0);
                }
                c.latency_us_log2[b] += 1;
                if !requested {
                    c.requests_met_by_push += 1;
                }
            }
            None => {}
        }
        slots.insert(gpa, Slot::Arrived(data));
        self.arrived.fetch_add(1, Ordering::AcqRel);
        self.progress.received.fetch_add(1, Ordering::Relaxed);
        Ok(Some(asked))
    }
}

impl PageSource for RemoteSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        if buf.len() != PAGE {
            // bulk_cheap() is false: the core asks one page at a time.
            return FetchOutcome::Failed(SourceError::BadRequest {
                offset,
                len: buf.len(),
            });
        }
        if !self.is_data(offset) {
            // Kept until placed: a fill that fails (EAGAIN) fetches again.
            return match lock(&self.precopied).get(&offset) {
                Some(d) => {
                    buf.copy_from_slice(d);
                    FetchOutcome::Ready
                }
                None => FetchOutcome::Zero,
            };
        }
        let lost = lock(&self.lost).is_some();
        let mut slots = lock(&self.slots);
        let ask = match slots.get_mut(&offset) {
            // Kept until mapped (`placed`): a fill that fails fetches again,
            // even after the source has gone.
            Some(Slot::Arrived(d)) => {
                buf.copy_from_slice(d);
                return FetchOutcome::Ready;
            }
            Some(Slot::Requested(_)) => None,
            Some(Slot::Taken) => Some(Message::Resend(offset)),
            None => Some(Message::Request(offset)),
        };
        if lost {
            // Lock order: counters before slots (as in `arrive`).
            drop(slots);
            lock(&self.counters).held_after_loss += 1;
            // Never a zero page for a page not received: the fault stays parked.
            return FetchOutcome::Retry(RetryReason::Held);
        }
        if let Some(m) = ask {
            slots.insert(offset, Slot::Requested(Instant::now()));
            drop(slots);
            let mut c = lock(&self.counters);
            if matches!(m, Message::Resend(_)) {
                c.resends += 1;
            } else {
                c.requested += 1;
            }
            drop(c);
            if !self.send(&m) {
                return FetchOutcome::Retry(RetryReason::Held);
            }
        }
        FetchOutcome::Retry(RetryReason::NotReady)
    }

    fn bulk_cheap(&self) -> bool {
        false
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

/// The destination's figures (`vmm receive --stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestStats {
    /// Source pause to the destination's `Resumed` as the source measured it
    /// (0 when the migration did not complete).
    pub downtime_ms: f64,
    /// State received to vCPUs started, here.
    pub resume_ms: f64,
    /// Connection accepted to the last page.
    pub total_ms: f64,
    /// Pages received during pre-copy (each round's copy counts).
    pub precopy_pages: u64,
    /// Distinct pre-copied pages kept (not written again before the switchover).
    pub precopy_kept: u64,
    /// Data pages announced for post-copy.
    pub data_pages: u64,
    /// Pages this side requested.
    pub pages_requested: u64,
    /// Pages received as answers.
    pub pages_answered: u64,
    /// Pages received from the background push.
    pub pages_pushed: u64,
    /// Requested pages that arrived by the push first.
    pub requests_met_by_push: u64,
    /// Pages asked again after a failed fill.
    pub resends: u64,
    /// Pages received twice (dropped).
    pub duplicates: u64,
    /// Bytes of page messages received.
    pub bytes: u64,
    /// Request to arrival, bucket `i` = `[2^i, 2^(i+1))` us.
    pub latency_us_log2: Vec<u64>,
    /// Upper bound of the bucket holding the median / 99th percentile, us.
    pub latency_p50_us: u64,
    /// See `latency_p50_us`.
    pub latency_p99_us: u64,
    /// vCPU time blocked in stage-2 faults, all vCPUs.
    pub vcpu_blocked_us: u64,
    /// Faults answered Held while the source was lost.
    pub held_after_loss: u64,
    /// Times the source was lost and came back (`recover`).
    pub recoveries: u32,
}

/// The percentile `p` (0..1) of a log2 histogram, as its bucket's upper bound in us.
pub fn percentile_us(hist: &[u64], p: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen as f64 >= p * total as f64 {
            return 1u64 << (i + 1).min(63);
        }
    }
    0
}

/// Options of [`receive`].
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The VM's run-time options (the memory-fault policy is forced to `Pause`).
    pub vm: VmOptions,
    /// After the source is lost: how long the paused VM waits for a
    /// `recover` (and, after one, for the source to come back) before the
    /// run ends.
    pub lost_wait: Duration,
    /// Updated as pages arrive.
    pub progress: Arc<Progress>,
}

/// The end of a received VM.
#[derive(Debug)]
pub struct ReceiveOutcome {
    /// The run.
    pub run: RunOutcome,
    /// The VM's configuration (for `verify_reports`).
    pub config: crate::VmConfig,
    /// Figures.
    pub stats: DestStats,
    /// The source was lost before every page arrived (the VM was paused).
    pub lost: Option<String>,
    /// The VM was paused because of it.
    pub paused_on_loss: bool,
}

/// What arrives before post-copy.
struct Prelude {
    /// `state.json`.
    state: Vec<u8>,
    /// The RAM size announced for pre-copy.
    mem_size: Option<u64>,
    /// The pre-copied pages (the last copy of each).
    pages: HashMap<u64, Vec<u8>>,
}

/// Reads the pre-copy pages (if the source sends any) up to the state.
fn receive_precopy(conn: &mut Conn, progress: &Progress) -> Result<Prelude, MigrationError> {
    let mut precopied = HashMap::new();
    let mem_size = match decode(conn)? {
        Message::State(state) => {
            return Ok(Prelude {
                state,
                mem_size: None,
                pages: precopied,
            })
        }
        Message::PrecopyBegin { mem_size } if mem_size <= abi::layout::MAX_MEM_SIZE => mem_size,
        Message::PrecopyBegin { mem_size } => {
            return Err(MigrationError::Protocol(format!(
                "the source announced {mem_size} bytes of guest RAM, more than the largest guest"
            )))
        }
        _ => {
            return Err(MigrationError::Protocol(
                "the first message is neither the VM state nor the start of pre-copy".into(),
            ))
        }
    };
    let ranges = abi::layout::ram_ranges(mem_size);
    loop {
        match decode(conn)? {
            Message::PrecopyPage { gpa, data } => {
                if !ranges.iter().any(|&(s, l)| gpa >= s && gpa - s < l) {
                    return Err(MigrationError::Protocol(format!(
                        "the source sent page {gpa:#x}, outside guest RAM"
                    )));
                }
                precopied.insert(gpa, data);
                progress.precopy_pages.fetch_add(1, Ordering::Relaxed);
            }
            Message::State(state) => {
                return Ok(Prelude {
                    state,
                    mem_size: Some(mem_size),
                    pages: precopied,
                })
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected message during pre-copy: {other:?}"
                )))
            }
        }
    }
}

/// Accepts one migration on `listener`, runs the VM until it ends.
/// `on_resumed` is called with a handle once the vCPUs run.
pub fn receive(
    listener: &Listener,
    options: ReceiveOptions,
    on_resumed: impl FnOnce(&VmHandle),
) -> Result<ReceiveOutcome, MigrationError> {
    let mut conn = listener.accept()?;
    let accepted = Instant::now();
    read_header(&mut conn)?;
    write_header(&mut conn).map_err(io("sending the header"))?;
    let progress = options.progress.clone();
    let Prelude {
        state,
        mem_size: precopy_mem,
        pages: mut precopied,
    } = receive_precopy(&mut conn, &progress)?;
    let Message::Extents(pairs) = decode(&mut conn)? else {
        return Err(MigrationError::Protocol(
            "the message after the state is not the extent list".into(),
        ));
    };
    let got_state = Instant::now();
    let answers = accept_answers(listener)?;
    let extents: Vec<Extent> = pairs
        .iter()
        .map(|&(gpa, len)| Extent { gpa, len, crc32: 0 })
        .collect();
    // Checks every extent: aligned, sorted, inside RAM, at most EXTENT_MAX.
    let snap = Snapshot::from_parts(&state, extents)?;
    if precopy_mem.is_some_and(|m| m != snap.state.config.mem_size) {
        return Err(MigrationError::Protocol(
            "the VM state's RAM size differs from the one announced for pre-copy".into(),
        ));
    }
    let data_pages: u64 = pairs.iter().map(|&(_, l)| l / PAGE64).sum();
    let precopy_pages = progress.precopy_pages.load(Ordering::Relaxed);
    // Pages written after their last pre-copy come again in post-copy.
    for &(g, l) in &pairs {
        for gpa in (g..g + l).step_by(PAGE) {
            precopied.remove(&gpa);
        }
    }
    let precopy_kept = precopied.len() as u64;
    let mut to_place: Vec<u64> = precopied.keys().copied().collect();
    to_place.sort_unstable();
    // The VM's data ranges cover the kept pre-copied pages too, so that
    // fetching its memory in full (a snapshot, a further migration) gets
    // the ones not placed yet.
    let snap = if to_place.is_empty() {
        snap
    } else {
        let mut all: Vec<u64> = pairs
            .iter()
            .flat_map(|&(g, l)| (g..g + l).step_by(PAGE))
            .chain(to_place.iter().copied())
            .collect();
        all.sort_unstable();
        Snapshot::from_parts(&state, extents_of(&all))?
    };
    progress.data_pages.store(data_pages, Ordering::Relaxed);
    let src = Arc::new(RemoteSource::new(
        "migration".into(),
        pairs,
        conn.try_clone()?,
        precopied,
        progress.clone(),
    )?);
    let mut vm_options = options.vm.clone();
    vm_options.on_memory_fault = crate::vm::MemoryFaultPolicy::Pause;
    let vm = Vm::from_migration(&snap, src.clone(), vm_options)?;
    let config = vm.config().clone();
    let materializer = vm
        .materializer()
        .ok_or_else(|| MigrationError::Control("the destination memory is not lazily backed".into()))?;
    let running = vm.start()?;
    let resume_ms = got_state.elapsed().as_secs_f64() * 1e3;
    src.send(&Message::Resumed);
    progress.running.store(true, Ordering::Release);
    let (recover_tx, recover_rx) = mpsc::channel();
    running.set_recover_hook(recover_tx, progress.lost.clone());
    on_resumed(&running.handle());

    // Pre-copied pages are placed in the background (a fault on one is
    // served from memory at once meanwhile).
    // Cleared when the VM ends: its memory is no longer to be filled.
    let placing = Arc::new(AtomicBool::new(true));
    let placer = {
        let (src, m, placing) = (src.clone(), materializer.clone(), placing.clone());
        std::thread::Builder::new()
            .name("migration-place".into())
            .spawn(move || {
                for gpa in to_place {
                    if !placing.load(Ordering::Acquire) {
                        break;
                    }
                    if let Err(e) = m.resolve_page(gpa) {
                        if placing.load(Ordering::Acquire) {
                            tracing::warn!("placing pre-copied page {gpa:#x}: {e}");
                        }
                    }
                    // Dropped only once mapped: a fault's fill that is still
                    // in flight may not have fetched it yet (the copy then
                    // stays until the VM ends).
                    if m.is_present(gpa) {
                        lock(&src.precopied).remove(&gpa);
                    }
                }
            })
            .map_err(io("starting the placer thread"))?
    };
    let done_at = Arc::new(Mutex::new(None::<(Instant, u64)>));
    let spawn_receiver = |conn: &Conn| {
        let (src, done_at, m) = (src.clone(), done_at.clone(), materializer.clone());
        let mut reader = conn.try_clone()?;
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                if let Err(e) = receive_pages(&src, &mut reader, &m, &done_at) {
                    src.set_lost(e.to_string());
                }
            })
            .map_err(io("starting the receiver thread"))
    };
    // One receiver per connection.
    let mut receivers = vec![spawn_receiver(&conn)?, spawn_receiver(&answers)?];
    let mut answers = answers;

    let mut lost_deadline = None;
    let mut paused_on_loss = false;
    let mut recoveries = 0;
    let mut waiting: Option<Listener> = None;
    while !running.is_finished() {
        if let (None, Some(_)) = (lost_deadline, src.lost()) {
            // Both connections go: the source must see the failure too (and
            // keep its VM resumable) even if only one of them broke.
            conn.shutdown();
            answers.shutdown();
            paused_on_loss = match running.pause() {
                Ok(_) => true,
                Err(ControlError::AlreadyPaused) => paused_on_loss,
                Err(e) => {
                    tracing::warn!("cannot pause after losing the source: {e}");
                    false
                }
            };
            lost_deadline = Some(Instant::now() + options.lost_wait);
        }
        while let Ok(req) = recover_rx.try_recv() {
            let r = match src.lost() {
                None => Err(MigrationError::NotInterrupted),
                Some(_) => Listener::bind(&req.from).and_then(|l| {
                    l.set_nonblocking()?;
                    let at = l.endpoint()?;
                    waiting = Some(l);
                    // The operator now starts the source's side.
                    lost_deadline = Some(Instant::now() + options.lost_wait);
                    Ok(at)
                }),
            };
            let _ = req.reply.send(r);
        }
        let back = waiting.as_ref().map(|l| l.try_accept());
        match back {
            Some(Ok(Some(new))) => {
                match waiting
                    .as_ref()
                    .map_or(Err(MigrationError::Control("no listener".into())), |l| {
                        // Nothing may arrive on the old connections once `Need`
                        // is computed (a page would come twice).
                        conn.shutdown();
                        answers.shutdown();
                        for r in receivers.drain(..) {
                            let _ = r.join();
                        }
                        resume_with(&src, new, l)
                    }) {
                    Ok((new, new_answers)) => {
                        conn = new;
                        answers = new_answers;
                        // Requests and `Complete` go to the new connection before
                        // anything can arrive on it (a `Done` is answered at once).
                        src.reconnect(conn.try_clone()?);
                        receivers = vec![spawn_receiver(&conn)?, spawn_receiver(&answers)?];
                        waiting = None;
                        lost_deadline = None;
                        recoveries += 1;
                        if paused_on_loss {
                            match running.resume() {
                                Ok(()) => paused_on_loss = false,
                                Err(e) => tracing::warn!("cannot resume after the source came back: {e}"),
                            }
                        }
                        tracing::info!("the migration source is back");
                    }
                    Err(e) => tracing::warn!("a peer connected to resume the migration but failed: {e}"),
                }
            }
            Some(Err(e)) => tracing::warn!("waiting for the source to come back: {e}"),
            _ => {}
        }
        if lost_deadline.is_some_and(|d| Instant::now() >= d) {
            running.stop();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    placing.store(false, Ordering::Release);
    let run = running.wait()?;
    conn.shutdown();
    answers.shutdown();
    for r in receivers {
        let _ = r.join();
    }
    let _ = placer.join();
    progress
        .complete
        .store(src.complete.load(Ordering::Acquire), Ordering::Release);
    let c = lock(&src.counters);
    let done = *lock(&done_at);
    let stats = DestStats {
        downtime_ms: done.map_or(0.0, |(_, us)| us as f64 / 1e3),
        resume_ms,
        total_ms: done.map_or(0.0, |(t, _)| (t - accepted).as_secs_f64() * 1e3),
        precopy_pages,
        precopy_kept,
        data_pages,
        pages_requested: c.requested,
        pages_answered: c.answered,
        pages_pushed: c.pushed,
        requests_met_by_push: c.requests_met_by_push,
        resends: c.resends,
        duplicates: c.duplicates,
        bytes: c.bytes,
        latency_p50_us: percentile_us(&c.latency_us_log2, 0.5),
        latency_p99_us: percentile_us(&c.latency_us_log2, 0.99),
        latency_us_log2: c.latency_us_log2.clone(),
        vcpu_blocked_us: run.vcpu_stats.iter().map(|v| v.stage2_blocked_us).sum(),
        held_after_loss: c.held_after_loss,
        recoveries,
    };
    drop(c);
    Ok(ReceiveOutcome {
        run,
        config,
        stats,
        lost: src.lost(),
        paused_on_loss,
    })
}

/// Accepts the source's answer channel on `listener` (its second
/// connection, opened right after the extents or the `Need` list); a
/// connection that is not one is dropped.
fn accept_answers(listener: &Listener) -> Result<Conn, MigrationError> {
    listener.set_nonblocking()?;
    let deadline = Instant::now() + HEADER_WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        match listener.try_accept()? {
            Some(mut c) => match greet(&mut c, &Message::Preempt, "its answer channel") {
                Ok(()) => return Ok(c),
                Err(e) => last = Some(e),
            },
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    Err(last.unwrap_or_else(|| MigrationError::Protocol("the source did not open its answer channel".into())))
}

/// Exchanges headers on a new connection and checks that its first message
/// is `expect` (the source opening `what`).
fn greet(conn: &mut Conn, expect: &Message, what: &str) -> Result<(), MigrationError> {
    conn.set_read_timeout(Some(HEADER_WAIT))?;
    read_header(conn)?;
    write_header(conn).map_err(io("sending the header"))?;
    let m = decode(conn)?;
    if &m != expect {
        return Err(MigrationError::Protocol(format!(
            "expected the source to open {what}, got {m:?}"
        )));
    }
    conn.set_read_timeout(None)
}

/// The handshake with a source that comes back: headers, its `Resume`, the
/// list of pages still missing here, and its new answer channel.
fn resume_with(
    src: &RemoteSource,
    mut conn: Conn,
    listener: &Listener,
) -> Result<(Conn, Conn), MigrationError> {
    greet(&mut conn, &Message::Resume, "the resumption of the migration")?;
    encode(&mut conn, &Message::Need(src.need())).map_err(io("sending the missing pages"))?;
    let answers = accept_answers(listener)?;
    Ok((conn, answers))
}

fn receive_pages(
    src: &RemoteSource,
    r: &mut Conn,
    m: &Materializer,
    done_at: &Mutex<Option<(Instant, u64)>>,
) -> Result<(), MigrationError> {
    loop {
        match decode(r)? {
            Message::Page { gpa, requested, data } => {
                if let Some(asked) = src.arrive(gpa, requested, data)? {
                    // Placed now: the retry core claims the page and copies it.
                    if let Err(e) = m.resolve_page(gpa) {
                        tracing::warn!("placing migrated page {gpa:#x}: {e}");
                    }
                    if m.is_present(gpa) {
                        src.placed(gpa);
                    }
                    // A fault parked on it is retried (the copy may have lost
                    // the claim to the handler's own attempt, which then saw
                    // no data yet).
                    if asked {
                        src.notifier.notify();
                    }
                }
            }
            Message::Done { downtime_us, .. } => {
                // Answers still on the answer channel arrive first: the
                // source may end only once every page is here.
                let deadline = Instant::now() + HEADER_WAIT;
                while !src.all_arrived() {
                    if let Some(why) = src.lost() {
                        return Err(MigrationError::Protocol(format!(
                            "pages were missing at the end of the migration: {why}"
                        )));
                    }
                    if Instant::now() >= deadline {
                        return Err(MigrationError::Protocol(
                            "the source said every page was sent, but some never arrived".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                src.complete.store(true, Ordering::Release);
                src.progress.complete.store(true, Ordering::Release);
                *lock(done_at) = Some((Instant::now(), downtime_us));
                src.send(&Message::Complete);
                return Ok(());
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected message from the source: {other:?}"
                )))
            }
        }
    }
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

    #[test]
    fn remote_source_requests_once_serves_arrivals_and_holds_after_loss() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let src = RemoteSource::new(
            "t".into(),
            vec![(0x1000, 0x2000)],
            Conn::Unix(ours),
            HashMap::new(),
            Arc::default(),
        )
        .unwrap();
        let mut buf = vec![0xffu8; PAGE];
        // Outside the data: a zero page, nothing asked.
        assert_eq!(src.fetch(0x8000, &mut buf), FetchOutcome::Zero);
        // A data page: one request, however often the core retries.
        for _ in 0..3 {
            assert_eq!(
                src.fetch(0x1000, &mut buf),
                FetchOutcome::Retry(RetryReason::NotReady)
            );
        }
        assert_eq!(decode(&mut peer).unwrap(), Message::Request(0x1000));
        assert_eq!(src.arrive(0x1000, true, vec![5; PAGE]).unwrap(), Some(true));
        assert_eq!(src.fetch(0x1000, &mut buf), FetchOutcome::Ready);
        assert!(buf.iter().all(|&b| b == 5));
        // A duplicate is dropped; a page outside the data is refused.
        assert_eq!(src.arrive(0x1000, false, vec![6; PAGE]).unwrap(), None);
        assert!(src.arrive(0x9000, false, vec![6; PAGE]).is_err());
        // After a loss, a page not received is held, never zero.
        src.set_lost("cut".into());
        assert_eq!(
            src.fetch(0x2000, &mut buf),
            FetchOutcome::Retry(RetryReason::Held)
        );
        assert_eq!(src.lost().as_deref(), Some("cut"));
    }

    #[test]
    fn precopied_pages_need_list_and_reconnect() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let pre = HashMap::from([(0x8000, vec![7u8; PAGE])]);
        let progress = Arc::new(Progress::default());
        // Post-copy data: pages 0x1000..0x4000 (three); 0x8000 was pre-copied.
        let src = RemoteSource::new(
            "t".into(),
            vec![(0x1000, 0x3000)],
            Conn::Unix(ours),
            pre,
            progress.clone(),
        )
        .unwrap();
        let mut buf = vec![0u8; PAGE];
        // A pre-copied page is served from memory, and again (a fill may fail)
        // until it is placed; other pages outside the post-copy data are zero.
        for _ in 0..2 {
            assert_eq!(src.fetch(0x8000, &mut buf), FetchOutcome::Ready);
            assert!(buf.iter().all(|&b| b == 7));
        }
        assert_eq!(src.fetch(0x9000, &mut buf), FetchOutcome::Zero);
        // The first page arrives, the second is asked for, then the source is lost.
        assert_eq!(src.arrive(0x1000, false, vec![1; PAGE]).unwrap(), Some(false));
        assert_eq!(
            src.fetch(0x2000, &mut buf),
            FetchOutcome::Retry(RetryReason::NotReady)
        );
        assert_eq!(decode(&mut peer).unwrap(), Message::Request(0x2000));
        assert!(!src.all_arrived());
        src.set_lost("cut".into());
        assert!(progress.lost.load(Ordering::Acquire));
        // Missing: the second and third pages (bits 1 and 2).
        assert_eq!(src.need(), vec![0b110]);
        // A new connection: the waiting fault's page is asked for again.
        let (ours2, mut peer2) = UnixStream::pair().unwrap();
        src.reconnect(Conn::Unix(ours2));
        assert!(src.lost().is_none() && !progress.lost.load(Ordering::Acquire));
        assert_eq!(decode(&mut peer2).unwrap(), Message::Request(0x2000));
        assert_eq!(src.arrive(0x2000, true, vec![2; PAGE]).unwrap(), Some(true));
        assert_eq!(src.arrive(0x3000, false, vec![3; PAGE]).unwrap(), Some(false));
        assert!(src.all_arrived());
        assert_eq!(src.need(), vec![0]);
    }

    #[test]
    fn extents_cover_pages_within_one_block_each() {
        let e = extents_of(&[0x1000, 0x2000, 0x4000, 0xf_f000, 0x10_0000, 0x10_1000]);
        let pairs: Vec<_> = e.iter().map(|e| (e.gpa, e.len)).collect();
        // Contiguous runs merge, but never across a 1 MiB block boundary.
        assert_eq!(
            pairs,
            vec![
                (0x1000, 0x2000),
                (0x4000, 0x1000),
                (0xf_f000, 0x1000),
                (0x10_0000, 0x2000)
            ]
        );
        assert_eq!(extent_pages(&e).count(), 6);
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/a/b".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/a/b".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:80".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:80".into())
        );
        for bad in ["", "unix:", "tcp:1.2.3.4", "tcp::5", "udp:x:1", "tcp:h:99999"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_of_a_log2_histogram() {
        assert_eq!(percentile_us(&[], 0.5), 0);
        assert_eq!(percentile_us(&[0, 10, 0, 1], 0.5), 4);
        assert_eq!(percentile_us(&[0, 10, 0, 1], 0.99), 16);
    }
}
