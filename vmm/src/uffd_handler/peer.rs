//! The connection holder: a small process (the `vmm` binary re-executed as
//! its hidden `__uffd-peer` subcommand) that makes and holds the connection
//! to the page-fault handler on the VMM's behalf.
//!
//! Why a process: Firecracker's handlers read the pid at the other end of
//! their socket (`SO_PEERCRED`, the process that called `connect`) and
//! SIGKILL it when they panic (on a failed copy, a message they cannot
//! parse, or the connection's end). With this holder at the other end, a
//! panicking handler kills the holder, never the VMM, which sees the holder
//! go and pauses the VM instead of dying.
//!
//! Protocol with the VMM, over the Unix socket pair that is the holder's
//! standard input:
//! 1. the VMM sends the handshake message with the userfaultfd (SCM_RIGHTS);
//! 2. the holder connects to the handler's socket, forwards both in one
//!    `sendmsg` exactly as received, closes its copy of the userfaultfd and
//!    answers one JSON line: `{"event":"connected","pid":N}` (the handler's
//!    pid from `SO_PEERCRED`) or `{"event":"failed","error":"..."}`;
//! 3. it then holds the connection open (Firecracker keeps it for its whole
//!    life; handlers that read EOF give up on the VMM) and waits in `poll`,
//!    without a timeout, for one of: the handler's end closing or failing
//!    (it answers `{"event":"closed","reason":"..."}` and exits), or the
//!    VMM's end closing (the VM ended, or the VMM died: it exits, closing
//!    the connection, which is how the handler learns that the VM ended).
//!
//! Data the handler sends (Firecracker's send none) is read and dropped.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The hidden subcommand that runs [`main`].
pub const SUBCOMMAND: &str = "__uffd-peer";

/// What the holder tells the VMM (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PeerEvent {
    /// Connected and handed over; the handler's process id.
    Connected {
        /// From `SO_PEERCRED` of the connection.
        pid: i32,
    },
    /// The connection or the handover failed.
    Failed {
        /// Why, in words.
        error: String,
    },
    /// The handler's end closed or failed.
    Closed {
        /// What was seen.
        reason: String,
    },
}

impl PeerEvent {
    /// Decodes one line of the holder's (the VMM reads them from the
    /// holder's socket; `fuzz/`'s `uffd_handshake` target feeds any).
    pub fn decode(line: &str) -> Result<PeerEvent, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// Reads one `\n`-terminated line (short: the holder's events), byte by
/// byte so that nothing after it is consumed; at most 64 KiB.
pub fn read_line(s: &mut impl Read) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) if b[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            Ok(_) if line.len() < 64 * 1024 => line.push(b[0]),
            Ok(_) => {
                return Err(std::io::Error::other(
                    "the connection holder sent a line too long",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn say(vmm: &mut UnixStream, ev: &PeerEvent) -> bool {
    let mut line =
        serde_json::to_string(ev).unwrap_or_else(|_| "{\"event\":\"failed\",\"error\":\"encoding\"}".into());
    line.push('\n');
    vmm.write_all(line.as_bytes()).is_ok()
}

/// The pid of the process that connected `stream`'s other end.
pub fn peer_pid(stream: &UnixStream) -> std::io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: `cred` and `len` are valid for writes and describe a `ucred`;
    // SO_PEERCRED writes at most `len` bytes into it.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// The holder's main: `vmm` stdin is the socket pair to the VMM. Returns
/// the process exit code. The process sandboxes itself first (class
/// `uffd-peer`, in the mode `VMM_SECCOMP` says: the VMM sets it to its own).
pub fn main(socket: &Path) -> i32 {
    if let Err(e) = sandbox::apply(
        sandbox::ThreadClass::UffdPeer,
        sandbox::SeccompMode::process_default(),
    ) {
        eprintln!("vmm {SUBCOMMAND}: {e}");
        return 1;
    }
    serve(socket)
}

/// [`main`] once sandboxed (the launcher's holders narrow its filter).
pub(crate) fn serve(socket: &Path) -> i32 {
    // SAFETY: the VMM starts this process with its end of a Unix socket pair
    // as standard input; nothing else in this process uses fd 0.
    let vmm_end = unsafe { OwnedFd::from_raw_fd(0) };
    let mut vmm = UnixStream::from(vmm_end);
    let mut buf = vec![0u8; 64 * 1024];
    let (n, uffd) = match vmm.recv_with_fd(&mut buf) {
        Ok((n, Some(fd))) => (n, fd),
        Ok((_, None)) => {
            say(
                &mut vmm,
                &PeerEvent::Failed {
                    error: "the VMM sent no userfaultfd".into(),
                },
            );
            return 1;
        }
        Err(e) => {
            say(
                &mut vmm,
                &PeerEvent::Failed {
                    error: format!("cannot receive the handshake from the VMM: {e}"),
                },
            );
            return 1;
        }
    };
    let message = &buf[..n];
    let handler = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            say(
                &mut vmm,
                &PeerEvent::Failed {
                    error: format!("connect: {e}"),
                },
            );
            return 1;
        }
    };
    // The userfaultfd lets its holder write into this VMM's memory (and
    // register more of it): it goes only to a handler of this user or root,
    // never to whoever bound the socket path first.
    let pid = match crate::peercred::check_peer(&handler) {
        Ok(cred) => cred.pid,
        Err(e) => {
            say(
                &mut vmm,
                &PeerEvent::Failed {
                    error: format!("refused the handler at {}: {e}", socket.display()),
                },
            );
            return 1;
        }
    };
    if let Err(e) = handler.send_with_fd(message, uffd.as_raw_fd()) {
        say(
            &mut vmm,
            &PeerEvent::Failed {
                error: format!("sending the mappings and the userfaultfd: {e}"),
            },
        );
        return 1;
    }
    // The VMM and the handler hold the userfaultfd; this process needs none.
    drop(uffd);
    if !say(&mut vmm, &PeerEvent::Connected { pid }) {
        return 0;
    }
    hold(&handler, &mut vmm)
}

/// Holds the connection until one end closes.
fn hold(handler: &UnixStream, vmm: &mut UnixStream) -> i32 {
    let mut scratch = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: handler.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: vmm.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the whole call.
        // No timeout: one of the two ends closing is what this waits for.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            say(
                vmm,
                &PeerEvent::Closed {
                    reason: format!("the connection holder cannot wait: {e}"),
                },
            );
            return 1;
        }
        if fds[1].revents != 0 {
            // The VMM ended the link (or died): closing the handler's
            // connection tells it the VM is gone. Anything the VMM sends
            // before that has no meaning.
            match vmm.read(&mut scratch) {
                Ok(n) if n > 0 && fds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) == 0 => {
                }
                _ => return 0,
            }
        }
        if fds[0].revents != 0 {
            let mut h = handler;
            let reason = match h.read(&mut scratch) {
                Ok(0) => "the handler closed its connection".to_string(),
                Ok(_) if fds[0].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) == 0 => continue,
                Ok(_) => "the handler's connection hung up".to_string(),
                Err(e) => format!("the handler's connection failed: {e}"),
            };
            say(vmm, &PeerEvent::Closed { reason });
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_the_vmm_decodes() {
        for ev in [
            PeerEvent::Connected { pid: 42 },
            PeerEvent::Failed {
                error: "connect: refused".into(),
            },
            PeerEvent::Closed { reason: "eof".into() },
        ] {
            let text = serde_json::to_string(&ev).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<PeerEvent>(&text).unwrap(), ev);
        }
        assert_eq!(
            serde_json::to_string(&PeerEvent::Connected { pid: 7 }).unwrap(),
            "{\"event\":\"connected\",\"pid\":7}"
        );
    }
}
