//! Who is at the other end of a Unix socket: the peer's credentials
//! (SO_PEERCRED), and the rule every local socket of the VMM applies (the
//! control socket, plain Unix migration sockets): only the VMM's own user or
//! root may talk to it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// A peer that may not talk to this VMM.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The credentials could not be read.
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(#[source] std::io::Error),
    /// Another user.
    #[error("refused a connection from uid {uid} (pid {pid}): only uid {ours} or root may use this socket")]
    OtherUser {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// Ours.
        ours: u32,
    },
}

/// The peer's process id, user id and group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Process id (as seen by this process).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads the peer's credentials.
pub fn credentials(stream: &UnixStream) -> Result<Credentials, PeerError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred we
    // own; the fd is a live Unix socket.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PeerError::Credentials(std::io::Error::last_os_error()));
    }
    Ok(Credentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Refuses a peer that is neither this process's user nor root.
pub fn check_same_user(stream: &UnixStream) -> Result<Credentials, PeerError> {
    let c = credentials(stream)?;
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if c.uid == ours || c.uid == 0 {
        Ok(c)
    } else {
        Err(PeerError::OtherUser {
            uid: c.uid,
            pid: c.pid,
            ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = check_same_user(&a).unwrap();
        assert_eq!(c.pid, i32::try_from(std::process::id()).unwrap());
    }
}
