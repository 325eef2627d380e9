//! Where a migration goes and how: `unix:PATH` or `tcp:ADDR:PORT`
//! endpoints, connections of either kind with timeouts, listeners.

use super::{io, MigrationError};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// How long a connect (and the peer's stream header) may take.
pub const HEADER_WAIT: Duration = Duration::from_secs(10);
/// A peer that takes nothing for this long is gone (a write fails).
pub const WRITE_WAIT: Duration = Duration::from_secs(30);

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

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
        .map_err(io("setting a write timeout"))
    }

    pub(super) fn try_clone(&self) -> Result<Conn, MigrationError> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone().map_err(io("cloning the socket"))?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone().map_err(io("cloning the socket"))?),
        })
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), MigrationError> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
        .map_err(io("setting a read timeout"))
    }

    pub(super) fn shutdown(&self) {
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

    pub(super) fn set_nonblocking(&self) -> Result<(), MigrationError> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(io("setting non-blocking mode"))
    }

    /// A connection if one is waiting (after [`set_nonblocking`](Self::set_nonblocking)).
    pub(super) fn try_accept(&self) -> Result<Option<Conn>, MigrationError> {
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

    pub(super) fn accept(&self) -> Result<Conn, MigrationError> {
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
