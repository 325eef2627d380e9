//! Who is at the other end of a Unix stream socket (`SO_PEERCRED`), and the
//! rule the VMM's Unix sockets apply to it: the peer runs as this process's
//! user or as root. Any other local user is refused, even if the socket
//! file's permissions let it connect (a socket in `/tmp`, a directory
//! shared by mistake).
//!
//! The kernel records the credentials when the peer called `connect(2)` (or
//! `listen(2)`, seen from the connecting side): they cannot be forged by the
//! peer afterwards. Used by the migration's Unix sockets on both ends; any
//! other Unix socket of the VMM can call [`check_peer`] the same way.

use std::os::fd::{AsFd, AsRawFd};

/// The credentials of a Unix socket's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's process id (as seen in this PID namespace; 0 if unknown).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// Why a Unix socket's peer is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerCredError {
    /// The kernel did not tell who the peer is.
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Unknown(#[source] std::io::Error),
    /// Another user.
    #[error("the peer (pid {pid}) runs as uid {uid}, neither as this process's user (uid {ours}) nor as root; run both ends as the same user")]
    OtherUser {
        /// The peer's pid.
        pid: i32,
        /// The peer's uid.
        uid: u32,
        /// This process's effective uid.
        ours: u32,
    },
}

/// The credentials of `sock`'s peer.
pub fn peer_cred(sock: &impl AsFd) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    // 12 bytes: fits.
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a live
    // ucred of exactly that size, and updates `len`; the fd is borrowed.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective user id.
pub fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The rule: the peer is this process's user, or root.
pub fn allowed(peer_uid: u32, our_uid: u32) -> bool {
    peer_uid == our_uid || peer_uid == 0
}

/// Checks that `sock`'s peer runs as this process's user or as root, and
/// returns its credentials.
pub fn check_peer(sock: &impl AsFd) -> Result<PeerCred, PeerCredError> {
    let cred = peer_cred(sock).map_err(PeerCredError::Unknown)?;
    let ours = our_uid();
    if allowed(cred.uid, ours) {
        Ok(cred)
    } else {
        Err(PeerCredError::OtherUser {
            pid: cred.pid,
            uid: cred.uid,
            ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn same_user_or_root_only() {
        assert!(allowed(1000, 1000));
        assert!(allowed(0, 1000));
        assert!(allowed(0, 0));
        assert!(!allowed(1001, 1000));
        assert!(!allowed(65534, 0));
    }

    #[test]
    fn a_socket_pair_in_this_process_is_our_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = check_peer(&a).unwrap();
        assert_eq!(cred.uid, our_uid());
        assert_eq!(i64::from(cred.pid), i64::from(std::process::id()));
        // Not a socket: the kernel cannot tell.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(matches!(check_peer(&f), Err(PeerCredError::Unknown(_))));
    }

    #[test]
    fn the_refusal_says_who_and_what_to_do() {
        let e = PeerCredError::OtherUser {
            pid: 42,
            uid: 65534,
            ours: 0,
        };
        let m = e.to_string();
        assert!(
            m.contains("uid 65534") && m.contains("pid 42") && m.contains("same user"),
            "{m}"
        );
    }
}
