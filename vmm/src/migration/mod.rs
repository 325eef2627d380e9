//! Live migration (`docs/migration.md`), split by concern:
//! - [`transport`]: endpoints, connections, listeners;
//! - [`wire`]: the stream's messages and their encoding;
//! - [`outgoing`]: the source after the switchover (state, page requests,
//!   the background push), and its resumption after a cut;
//! - [`precopy`]: pre-copy rounds with dirty logging, then the switchover;
//! - [`remote`]: the destination's page source, fed by the connection;
//! - [`incoming`]: the destination's session: the prelude, receivers, the
//!   placer, loss of the source and recovery, reported as [`incoming::MigrationEvent`]s.
//!
//! The source pauses, sends the VM state (a snapshot's `state.json`) and the
//! guest-physical extents that hold data, then serves page requests and
//! pushes the remaining data pages in the background, requests first. The
//! destination builds the VM from that state with its memory served lazily
//! by a [`remote::RemoteSource`] through the retry core and resumes at once.
//! A page it does not have is never zero-filled: if the connection dies,
//! faults on missing data pages stay parked (`Retry(Held)`) and the VM is
//! paused. Nothing here knows the controller: the source is driven by its
//! caller (who captures the state), and the destination reports events.

pub mod incoming;
pub mod outgoing;
pub mod precopy;
pub mod push_order;
pub mod remote;
pub mod status;
pub mod tls;
pub mod transport;
pub mod wire;

pub use incoming::{DestStats, Incoming, IncomingSession, MigrationEvent, RecoverRequest};
pub use outgoing::{DirtyTracking, Downtime, MigrateOptions, Outgoing, Resumable, SourceSummary, Stopped};
pub use precopy::{spawn_precopy, Paused, PrecopyCtx};
pub use push_order::{push_order, PageHistory, PushOrder};
pub use remote::{Progress, RemoteSource};
pub use status::{Percentiles, Phase, SourceReport, SourceStatus};
pub use tls::{Tls, TlsError, TlsFiles};
pub use transport::{Conn, Endpoint, Listener, ListenerStop, Security};
pub use wire::{Message, VERSION};

use crate::snapshot::SnapshotError;
use std::sync::{Mutex, MutexGuard, PoisonError};

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
        #[source]
        source: std::io::Error,
    },
    /// `vmm receive --timeout` ran out while an authenticated source was
    /// still sending what comes before the VM starts (pre-copy, state).
    #[error("the migration did not start within {secs} s (--timeout): the source connected and then sent {what} too slowly or stopped; its VM is still whole there (`vmm ctl SRC resume`)")]
    TimedOut {
        /// The --timeout.
        secs: f64,
        /// What the source was sending.
        what: &'static str,
    },
    /// Plain TCP without the opt-in.
    #[error("{0} is TCP: a migration over TCP must be TLS (--tls-cert, --tls-key and --tls-peer, or --tls-psk; see `vmm keygen`), or give --insecure-plain-tcp to send the VM in clear text to anyone who reaches the port")]
    PlainTcp(Endpoint),
    /// Someone listens at the address already.
    #[error("address in use: another process listens on {0}; stop it or choose another address")]
    AddressInUse(Endpoint),
    /// A Unix socket path that is not a socket.
    #[error("cannot listen on {}: the path exists and is not a socket; choose another path", .0.display())]
    PathTaken(std::path::PathBuf),
    /// The peer did not complete its side of the handshake in time.
    #[error("the peer at {peer} did not complete the migration handshake within {secs} s: it is not a vmm of this version at the other end (`vmm receive --listen` on a destination), or it is busy")]
    HandshakeTimeout {
        /// Who.
        peer: String,
        /// The wait.
        secs: f64,
    },
    /// A peer connected to a destination and did not complete its side of
    /// the handshake in time (dropped).
    #[error("the peer at {peer} connected but did not complete the migration handshake within {secs} s: dropped (not a vmm migration source, or a stalled one)")]
    SilentPeer {
        /// Who.
        peer: String,
        /// The wait.
        secs: f64,
    },
    /// The peer closed the connection during the handshake.
    #[error("the peer at {peer} closed the connection during the migration handshake: it refused this side (its log says why: a certificate, a key, a user), or it is not a vmm receive")]
    Closed {
        /// Who.
        peer: String,
    },
    /// TLS failed: a certificate not pinned, a peer without TLS, ...
    #[error("TLS with {peer} failed: {}", tls::explain(.source))]
    Tls {
        /// Who.
        peer: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The pre-shared key check failed.
    #[error("{peer} is refused: {why}")]
    Auth {
        /// Who.
        peer: String,
        /// Why.
        why: String,
    },
    /// A Unix socket peer of another user.
    #[error("the migration peer {peer} is refused: {source}")]
    PeerCred {
        /// Who.
        peer: String,
        /// Why.
        #[source]
        source: crate::peercred::PeerCredError,
    },
    /// Nobody connected and authenticated in time.
    #[error("no migration source connected and authenticated within {secs} s{}", refused.as_ref().map(|r| format!(" (the last peer refused: {r})")).unwrap_or_default())]
    NoPeer {
        /// The wait.
        secs: f64,
        /// Why the last peer that tried was refused.
        refused: Option<String>,
    },
    /// The wait for a source was ended (`ListenerStop::stop`).
    #[error("the wait for a migration source was stopped before one connected")]
    Stopped,
    /// The TLS files cannot be used.
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The peer sent something that is not this protocol.
    #[error("the migration stream is malformed: {0}; run the same vmm on both ends (a corrupted or hostile stream is refused)")]
    Protocol(String),
    /// Another protocol version.
    #[error("the peer speaks migration protocol version {0}; this vmm speaks version {VERSION}: run the same vmm on both ends")]
    Version(u32),
    /// The received state does not fit.
    #[error("the migrated VM state cannot be used: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The VM state cannot be encoded.
    #[error("cannot encode the VM state: {0}")]
    Encode(#[source] serde_json::Error),
    /// Guest memory cannot be read.
    #[error("cannot read guest page {gpa:#x}: {source}")]
    ReadMemory {
        /// The page.
        gpa: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] vmm_core::memory::DirtyError),
    /// Lazily served memory could not be fetched in full.
    #[error("guest memory cannot be fetched in full: {0}")]
    Materialize(#[from] vmm_core::memory::MaterializeError),
    /// The VM's own incoming migration source is lost: some of its memory
    /// is not here.
    #[error(
        "this VM's own migration source is lost and holds pages it never sent: resume that migration first"
    )]
    SourceLost,
    /// The VM could not be paused for the switchover, or its state captured.
    #[error("the switchover failed: {0}")]
    Switchover(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `recover` on a destination whose migration is not interrupted (it may
    /// have every page already).
    #[error("the migration is not interrupted: there is nothing to recover")]
    NotInterrupted,
    /// `recover` on a VM that is not a migration destination.
    #[error("this VM is not the destination of a migration: `recover` is for a `vmm receive` whose source was lost")]
    NotDestination,
    /// The migration on this side has already ended.
    #[error("the migration has already ended here")]
    Ended,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { what, source }
}

/// Lowers the calling thread's scheduling priority (nice 10): bulk work
/// (the push, placing pushed pages) yields the CPU to the page-request path
/// and the vCPUs. Best effort: nothing changes if the kernel refuses.
fn lower_priority() {
    // SAFETY: setpriority only reads its arguments; a thread may lower its
    // own priority. On Linux the nice value is per thread and `who` 0 is the
    // calling thread (the one form the seccomp rules allow, with this value).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, sandbox::BULK_NICE) } != 0 {
        tracing::debug!(
            "cannot lower the priority of a migration thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The wall clock now, microseconds since the Unix epoch (0 before it):
/// both ends of a migration on one host (or with synchronized clocks) can
/// compare such times.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
