//! Where a migration goes and how: `unix:PATH` or `tcp:ADDR:PORT`
//! endpoints, connections of either kind with timeouts, listeners.

use super::tls::{self, Tls, TlsError, TlsFiles};
use super::wire::{check_header, decode, write_header, Message};
use super::{io, MigrationError};
use sandbox::{SeccompMode, ThreadClass};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a peer may take to connect, authenticate and exchange the
/// stream headers (and, on a destination, send its first message), and
/// any later step of the protocol that must come at once.
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// A peer that takes nothing for this long is gone (a write fails).
pub const WRITE_WAIT: Duration = Duration::from_secs(30);
/// Connections a destination authenticates at once; more are closed at
/// once (a peer that stalls its handshake holds up no other).
pub const MAX_PENDING: usize = 8;

/// How migration connections are authenticated and protected.
///
/// With [`tls`](Self::tls) every connection, Unix or TCP, is TLS and the
/// peer must authenticate. Without it, Unix sockets are plain (the peer
/// must run as this process's user or root: `SO_PEERCRED`), and TCP is
/// refused unless [`insecure_plain_tcp`](Self::insecure_plain_tcp).
#[derive(Debug, Clone)]
pub struct Security {
    /// TLS settings.
    pub tls: Option<Arc<Tls>>,
    /// Allow plain TCP (anyone who reaches the port can then feed a
    /// destination pages and state, and read them on the way).
    pub insecure_plain_tcp: bool,
    /// How long a peer may take for its side of the handshake.
    pub handshake_timeout: Duration,
}

impl Default for Security {
    fn default() -> Security {
        Security {
            tls: None,
            insecure_plain_tcp: false,
            handshake_timeout: HANDSHAKE_WAIT,
        }
    }
}

impl Security {
    /// Loads `files` (TLS unless empty); `insecure_plain_tcp` as given.
    pub fn from_files(files: &TlsFiles, insecure_plain_tcp: bool) -> Result<Security, TlsError> {
        Ok(Security {
            tls: if files.is_empty() {
                None
            } else {
                Some(Arc::new(Tls::load(files)?))
            },
            insecure_plain_tcp,
            handshake_timeout: HANDSHAKE_WAIT,
        })
    }

    /// Refuses plain TCP without the opt-in.
    pub fn check(&self, e: &Endpoint) -> Result<(), MigrationError> {
        match e {
            Endpoint::Tcp(_) if self.tls.is_none() && !self.insecure_plain_tcp => {
                Err(MigrationError::PlainTcp(e.clone()))
            }
            _ => Ok(()),
        }
    }

    /// How connections to or from `e` are protected, for messages.
    pub fn describe(&self, e: &Endpoint) -> &'static str {
        match (&self.tls, e) {
            (Some(t), _) => t.describe(),
            (None, Endpoint::Unix(_)) => "plain Unix socket, same user or root only",
            (None, Endpoint::Tcp(_)) => "plain TCP, NOT authenticated nor encrypted",
        }
    }
}

/// The end of a handshake.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    /// When.
    pub(super) at: Instant,
    /// The whole wait (for messages).
    pub(super) of: Duration,
}

impl Deadline {
    pub(super) fn after(of: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + of,
            of,
        }
    }

    /// What is left, or a time-out error.
    pub(super) fn left(&self) -> std::io::Result<Duration> {
        self.at
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::ErrorKind::TimedOut.into())
    }
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

/// A connection: a Unix or TCP socket, or TLS over one.
#[derive(Debug)]
pub enum Conn {
    /// Unix.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
    /// TLS over a Unix or TCP socket; clones share the TLS connection (one
    /// thread may read while another writes: [`tls::TlsStream`]).
    Tls(Arc<tls::TlsStream>),
}

impl Conn {
    /// The socket below TLS, or this one.
    fn socket(&self) -> &Conn {
        match self {
            Conn::Tls(t) => t.socket(),
            c => c,
        }
    }

    /// Reads from the socket itself (below TLS).
    pub(super) fn read_raw(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.socket() {
            Conn::Unix(s) => (&*s).read(buf),
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Tls(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    /// Writes to the socket itself (below TLS).
    pub(super) fn write_raw(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self.socket() {
            Conn::Unix(s) => (&*s).write(buf),
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Tls(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    pub(super) fn write_all_raw(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.write_raw(buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn set_write_timeout_io(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self.socket() {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Tls(_) => Ok(()),
        }
    }

    pub(super) fn set_read_timeout_io(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self.socket() {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Tls(_) => Ok(()),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        self.set_write_timeout_io(t)
            .map_err(io("setting a write timeout"))
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        self.set_read_timeout_io(t).map_err(io("setting a read timeout"))
    }

    /// Another handle on the same connection (a thread reads on one while
    /// another writes on the other).
    pub(super) fn try_clone(&self) -> Result<Conn, MigrationError> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone().map_err(io("cloning the socket"))?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone().map_err(io("cloning the socket"))?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    /// Ends the connection both ways: a thread blocked on it wakes up with an error.
    pub(super) fn shutdown(&self) {
        let _ = match self.socket() {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Tls(_) => Ok(()),
        };
    }

    /// Closes after a refusal without resetting the connection: the peer
    /// then reads the alert or the end of the stream that tells it why,
    /// not a reset that may destroy it. What the peer still sends is read
    /// and dropped (at most 64 KiB, 200 ms).
    pub(super) fn close_gently(&self) {
        let _ = match self.socket() {
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Tls(_) => Ok(()),
        };
        let until = Instant::now() + Duration::from_millis(200);
        let mut buf = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            let Some(t) = until
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                break;
            };
            if self.set_read_timeout_io(Some(t)).is_err() {
                break;
            }
            match self.read_raw(&mut buf) {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }

    /// Connects to `to` (a plain socket, nothing sent yet).
    fn connect_socket(to: &Endpoint, within: Duration) -> Result<Conn, MigrationError> {
        let c = match to {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(io("connect"))?),
            Endpoint::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let addr = a
                    .to_socket_addrs()
                    .map_err(io("resolving the address"))?
                    .next()
                    .ok_or_else(|| MigrationError::BadEndpoint(format!("tcp:{a}")))?;
                let s = TcpStream::connect_timeout(&addr, within).map_err(io("connect"))?;
                // Page requests are small and latency bound.
                s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
                Conn::Tcp(s)
            }
        };
        c.set_write_timeout(Some(WRITE_WAIT))?;
        Ok(c)
    }

    /// Connects to `to`, authenticates the peer and protects the connection
    /// as `sec` says, and exchanges the stream headers, all within
    /// `sec.handshake_timeout`: a peer that does not answer (a squatter on
    /// the port, a busy destination) is an error that says so.
    pub(super) fn open(to: &Endpoint, sec: &Security) -> Result<Conn, MigrationError> {
        sec.check(to)?;
        let deadline = Deadline::after(sec.handshake_timeout);
        let peer = to.to_string();
        let sock = Conn::connect_socket(to, sec.handshake_timeout)?;
        if let Conn::Unix(s) = &sock {
            crate::peercred::check_peer(s).map_err(|source| MigrationError::PeerCred {
                peer: peer.clone(),
                source,
            })?;
        }
        let mut conn = match &sec.tls {
            Some(t) => tls::connect(sock, t, &peer, deadline)?,
            None => sock,
        };
        let failed = |e| tls::handshake_error(e, &peer, deadline.of);
        write_header(&mut conn).map_err(failed)?;
        let mut h = [0u8; 12];
        if let Err(e) = tls::read_exact_by(&mut conn, &mut h, deadline.at) {
            // A TLS alert is shorter than a header: what came says who the peer is.
            return Err(match check_header(&h) {
                Err(tls_peer) if matches!(h[..2], [0x15 | 0x16, 0x03]) => tls_peer,
                _ => failed(e),
            });
        }
        check_header(&h)?;
        conn.set_read_timeout(None)?;
        conn.set_write_timeout(Some(WRITE_WAIT))?;
        Ok(conn)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
            // Records are on the socket when `write` returns.
            Conn::Tls(_) => Ok(()),
        }
    }
}

/// A listening destination socket, and how the peers that connect to it
/// must authenticate.
#[derive(Debug)]
pub struct Listener {
    sock: ListenSocket,
    security: Security,
    stop: Arc<AtomicBool>,
}

/// Ends a [`Listener`]'s wait for a source from another thread (see
/// [`Listener::stopper`]).
#[derive(Debug, Clone)]
pub struct ListenerStop(Arc<AtomicBool>);

impl ListenerStop {
    /// The wait ends with [`MigrationError::Stopped`]; a migration already
    /// admitted goes on.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

#[derive(Debug)]
enum ListenSocket {
    /// Unix (the socket file is removed on drop).
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `at` with the default [`Security`]: plain Unix sockets (peers
    /// of this user or root only); TCP is refused (it needs TLS or the
    /// opt-in: [`bind_with`](Self::bind_with)).
    pub fn bind(at: &Endpoint) -> Result<Listener, MigrationError> {
        Listener::bind_with(at, Security::default())
    }

    /// Binds `at`; peers must authenticate as `security` says. A stale Unix
    /// socket (nobody listens) is replaced; a live one, a file that is not
    /// a socket, or a TCP address in use is an error that says so.
    pub fn bind_with(at: &Endpoint, security: Security) -> Result<Listener, MigrationError> {
        security.check(at)?;
        let in_use = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::AddrInUse => MigrationError::AddressInUse(at.clone()),
            _ => io("bind")(e),
        };
        let sock = match at {
            Endpoint::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if !meta.file_type().is_socket() {
                        return Err(MigrationError::PathTaken(p.clone()));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(MigrationError::AddressInUse(at.clone()));
                    }
                    let _ = std::fs::remove_file(p);
                }
                ListenSocket::Unix(UnixListener::bind(p).map_err(in_use)?, p.clone())
            }
            Endpoint::Tcp(a) => ListenSocket::Tcp(TcpListener::bind(a).map_err(in_use)?),
        };
        let l = Listener {
            sock,
            security,
            stop: Arc::new(AtomicBool::new(false)),
        };
        // Accepts poll (a deadline, a stop flag): never block.
        match &l.sock {
            ListenSocket::Unix(s, _) => s.set_nonblocking(true),
            ListenSocket::Tcp(s) => s.set_nonblocking(true),
        }
        .map_err(io("setting non-blocking mode"))?;
        Ok(l)
    }

    /// The address to give the source (the real port for `tcp:...:0`).
    pub fn endpoint(&self) -> Result<Endpoint, MigrationError> {
        Ok(match &self.sock {
            ListenSocket::Unix(_, p) => Endpoint::Unix(p.clone()),
            ListenSocket::Tcp(l) => Endpoint::Tcp(l.local_addr().map_err(io("local address"))?.to_string()),
        })
    }

    /// A handle that ends the wait for a source (a destination nobody
    /// will migrate to after all).
    pub fn stopper(&self) -> ListenerStop {
        ListenerStop(self.stop.clone())
    }

    /// How peers must authenticate.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// A connection if one is waiting, not authenticated yet, and who it is.
    pub(super) fn try_accept(&self) -> Result<Option<(Conn, String)>, MigrationError> {
        let r = match &self.sock {
            ListenSocket::Unix(l, p) => l
                .accept()
                .map(|(s, _)| (Conn::Unix(s), format!("unix:{}", p.display()))),
            ListenSocket::Tcp(l) => l.accept().and_then(|(s, addr)| {
                s.set_nodelay(true)?;
                Ok((Conn::Tcp(s), addr.to_string()))
            }),
        };
        match r {
            Ok((c, peer)) => {
                // The accepted socket may inherit non-blocking mode.
                match &c {
                    Conn::Unix(s) => s.set_nonblocking(false),
                    Conn::Tcp(s) => s.set_nonblocking(false),
                    Conn::Tls(_) => Ok(()),
                }
                .map_err(io("setting blocking mode"))?;
                c.set_write_timeout(Some(WRITE_WAIT))?;
                Ok(Some((c, peer)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io("accept")(e)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenSocket::Unix(_, p) = &self.sock {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The destination's side of a new connection: the peer's credentials (a
/// Unix socket) or TLS, the stream headers and, if `expect` is given, the
/// peer's first message, all by `deadline`. Nothing of the peer's is
/// buffered beyond a header and one small message before it has
/// authenticated.
pub(super) fn admit(
    sock: Conn,
    peer: &str,
    sec: &Security,
    expect: Option<&Message>,
    deadline: Deadline,
) -> Result<Conn, MigrationError> {
    let mut peer = peer.to_string();
    if let Conn::Unix(s) = &sock {
        let cred = crate::peercred::check_peer(s).map_err(|source| MigrationError::PeerCred {
            peer: format!("a local process on {peer}"),
            source,
        })?;
        peer = format!("{peer} (pid {}, uid {})", cred.pid, cred.uid);
    }
    let mut conn = match &sec.tls {
        Some(t) => tls::accept(sock, t, &peer, deadline)?,
        None => sock,
    };
    let failed = |e| tls::handshake_error(e, &peer, deadline.of);
    let mut h = [0u8; 12];
    tls::read_exact_by(&mut conn, &mut h, deadline.at).map_err(failed)?;
    check_header(&h)?;
    write_header(&mut conn).map_err(failed)?;
    if let Some(expect) = expect {
        conn.set_read_timeout(Some(deadline.left().map_err(failed)?))?;
        let m = decode(&mut conn).map_err(|e| match e {
            MigrationError::Io { source, .. } => failed(source),
            e => e,
        })?;
        if &m != expect {
            return Err(MigrationError::Protocol(format!(
                "{peer} opened a connection with {} where {} was expected",
                m.summary(),
                expect.summary()
            )));
        }
    }
    conn.set_read_timeout(None)?;
    Ok(conn)
}

/// Connections being admitted, each on its own thread: a peer that stalls
/// its handshake until the deadline holds up nobody else.
#[derive(Debug)]
pub(super) struct Admissions {
    tx: Sender<Result<Conn, MigrationError>>,
    rx: Receiver<Result<Conn, MigrationError>>,
    in_flight: Arc<AtomicUsize>,
    expect: Option<Message>,
    seccomp: SeccompMode,
}

impl Admissions {
    /// Admissions whose first message must be `expect` (if any).
    /// Their threads are sandboxed in the default mode
    /// ([`SeccompMode::process_default`]), or as the calling thread if it
    /// is sandboxed.
    pub(super) fn new(expect: Option<Message>) -> Admissions {
        let (tx, rx) = mpsc::channel();
        Admissions {
            tx,
            rx,
            in_flight: Arc::default(),
            expect,
            seccomp: SeccompMode::process_default(),
        }
    }

    /// The admissions' threads (class `migration-dest`) are sandboxed in
    /// `mode` (unless the thread that starts them is sandboxed: then as it).
    pub(super) fn sandboxed(mut self, mode: SeccompMode) -> Admissions {
        self.seccomp = mode;
        self
    }

    /// Starts admitting a connection that `listener` accepted.
    fn start(&self, conn: Conn, peer: String, listener: &Listener) {
        if self.in_flight.load(Ordering::Acquire) >= MAX_PENDING {
            tracing::warn!(
                "refused a migration connection from {peer}: {MAX_PENDING} others are still authenticating"
            );
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let (tx, in_flight, expect) = (self.tx.clone(), self.in_flight.clone(), self.expect.clone());
        let sec = listener.security.clone();
        let spawned = sandbox::spawn(
            std::thread::Builder::new().name("migration-auth".into()),
            ThreadClass::MigrationDest,
            self.seccomp,
            move || {
                let deadline = Deadline::after(sec.handshake_timeout);
                let r = admit(conn, &peer, &sec, expect.as_ref(), deadline).map_err(|e| match e {
                    MigrationError::HandshakeTimeout { peer, secs } => {
                        MigrationError::SilentPeer { peer, secs }
                    }
                    e => e,
                });
                in_flight.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(r);
            },
        );
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("cannot authenticate a migration connection: {e}");
        }
    }

    /// Accepts what waits on `listener`, and returns the first peer
    /// admitted, waiting up to `wait` for one; peers refused meanwhile are
    /// logged, and the last refusal is kept in `refused`.
    pub(super) fn poll(
        &self,
        listener: &Listener,
        wait: Duration,
        refused: &mut Option<String>,
    ) -> Option<Conn> {
        loop {
            match listener.try_accept() {
                Ok(Some((c, peer))) => self.start(c, peer, listener),
                Ok(None) => break,
                Err(e) => {
                    // EMFILE and the like: try again a little later.
                    tracing::warn!("waiting for a migration source: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        match self.rx.recv_timeout(wait) {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::warn!("refused a migration connection: {e}");
                *refused = Some(e.to_string());
                None
            }
            Err(_) => None,
        }
    }
}

impl Admissions {
    /// Waits for the next peer to connect to `listener` and be admitted,
    /// until `deadline` (forever if `None`).
    pub(super) fn next(
        &self,
        listener: &Listener,
        deadline: Option<Deadline>,
    ) -> Result<Conn, MigrationError> {
        let mut refused = None;
        loop {
            if let Some(c) = self.poll(listener, Duration::from_millis(1), &mut refused) {
                return Ok(c);
            }
            if listener.stop.load(Ordering::Acquire) {
                return Err(MigrationError::Stopped);
            }
            if let Some(d) = deadline {
                if Instant::now() >= d.at {
                    return Err(MigrationError::NoPeer {
                        secs: d.of.as_secs_f64(),
                        refused,
                    });
                }
            }
        }
    }
}

/// Waits for a peer to connect to `listener` and authenticate (its first
/// message `expect`, if given), until `deadline` (forever if `None`).
pub(super) fn accept_authenticated(
    listener: &Listener,
    expect: Option<Message>,
    deadline: Option<Deadline>,
) -> Result<Conn, MigrationError> {
    Admissions::new(expect).next(listener, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
