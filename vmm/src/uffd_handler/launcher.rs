//! The holder launcher: a small process (the `vmm` binary re-executed as its
//! hidden `__uffd-launcher` subcommand) that forks connection holders
//! ([`super::peer`]) for a sandboxed VMM.
//!
//! Why: once a VM runs, its threads are sandboxed (`docs/seccomp.md`) and
//! none may start a program (no `execve`, no `fork`), but a handler that
//! died is replaced while the VM runs (`attach-handler`), and each handler
//! needs a holder process. So a VMM restored with an external handler
//! starts this launcher first, while it still may, and the launcher,
//! sandboxed too (class `uffd-launcher`: no `execve`, `fork` only), forks a
//! holder per request.
//!
//! Protocol, over the Unix socket pair that is the launcher's standard
//! input: the VMM sends the handler's socket path with the holder's end of
//! a new socket pair (SCM_RIGHTS); the launcher forks a child that forks
//! the holder and exits at once, so that the holder is adopted by the VMM
//! (a child subreaper, `PR_SET_CHILD_SUBREAPER`) and the VMM watches, kills
//! and reaps it as a child of its own; the launcher answers one JSON line,
//! `{"pid":N}` (the holder's) or `{"error":"..."}`. The holder then speaks
//! the holder protocol with the VMM on its socket, as one the VMM started.
//! The launcher exits when the VMM's end closes.

use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The hidden subcommand that runs [`main`].
pub const SUBCOMMAND: &str = "__uffd-launcher";

/// How long the launcher may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The launcher's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    /// The holder's process id.
    Pid(u32),
    /// Why no holder was started.
    Error(String),
}

/// The VMM's side of a running launcher. Dropping it ends the launcher.
#[derive(Debug)]
pub struct Launcher {
    chan: Mutex<UnixStream>,
    pid: u32,
}

/// Makes this process adopt its orphaned descendants (the holders the
/// launcher's children leave behind).
fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn reap(pid: u32, hang: bool) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    let mut status = 0;
    // SAFETY: `status` is valid for writes; waitpid on one child.
    let r = unsafe { libc::waitpid(pid, &mut status, if hang { 0 } else { libc::WNOHANG }) };
    r != 0
}

/// Sends SIGKILL to process `pid` through a pidfd (a filter that allows it
/// allows no process group and no other process than the one named).
pub(crate) fn kill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a pidfd, a signal number, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Waits up to a second for child `pid` to end, then kills it; reaps it.
pub(crate) fn end_child(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if reap(pid, false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(pid);
    reap(pid, true);
}

impl Launcher {
    /// Starts `program __uffd-launcher`, sandboxed in `seccomp` mode, and
    /// makes this process adopt the holders it forks.
    pub fn start(program: &Path, seccomp: sandbox::SeccompMode) -> std::io::Result<Launcher> {
        become_subreaper()?;
        let (chan, theirs) = UnixStream::pair()?;
        let child = Command::new(program)
            .arg(SUBCOMMAND)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env(sandbox::MODE_ENV, seccomp.to_string())
            // As the holders: a terminal's ^C goes to the VMM only.
            .process_group(0)
            .spawn()?;
        Ok(Launcher {
            chan: Mutex::new(chan),
            pid: child.id(),
        })
    }

    /// Forks a connection holder for the handler at `socket` whose end of
    /// its socket pair with the VMM is `holder_end`; its process id (a
    /// child of this process).
    pub fn launch(&self, socket: &Path, holder_end: OwnedFd) -> std::io::Result<u32> {
        let mut chan = self.chan.lock().unwrap_or_else(PoisonError::into_inner);
        chan.send_with_fd(socket.as_os_str().as_bytes(), holder_end.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        drop(holder_end);
        chan.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match chan.read(&mut b) {
                Ok(0) => {
                    return Err(std::io::Error::other(format!(
                        "the connection holder launcher (pid {}) ended",
                        self.pid
                    )))
                }
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) if line.len() < 4096 => line.push(b[0]),
                Ok(_) => return Err(std::io::Error::other("the launcher's answer is too long")),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match serde_json::from_slice::<Answer>(&line) {
            Ok(Answer::Pid(pid)) => Ok(pid),
            Ok(Answer::Error(e)) => Err(std::io::Error::other(format!(
                "the connection holder launcher cannot start a holder: {e}"
            ))),
            Err(e) => Err(std::io::Error::other(format!(
                "the connection holder launcher's answer is not valid: {e}"
            ))),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let chan = self.chan.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = chan.shutdown(std::net::Shutdown::Both);
        end_child(self.pid);
    }
}

/// The launcher's main: standard input is the socket pair to the VMM.
/// Returns the process exit code.
pub fn main() -> i32 {
    let mode = sandbox::SeccompMode::process_default();
    if let Err(e) = sandbox::apply(sandbox::ThreadClass::UffdLauncher, mode) {
        eprintln!("vmm __uffd-launcher: {e}");
        return 1;
    }
    // SAFETY: the VMM starts this process with its end of a Unix socket pair
    // as standard input; nothing else in this process uses fd 0.
    let mut chan = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    let mut buf = vec![0u8; 4096];
    loop {
        let answer = match chan.recv_with_fd(&mut buf) {
            Ok((0, _)) => return 0,
            Ok((n, Some(fd))) => {
                match fork_holder(Path::new(OsStr::from_bytes(&buf[..n])), OwnedFd::from(fd), mode) {
                    Ok(pid) => Answer::Pid(pid),
                    Err(e) => Answer::Error(e.to_string()),
                }
            }
            Ok((_, None)) => Answer::Error("the request carried no socket".into()),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(_) => return 1,
        };
        let mut line = serde_json::to_vec(&answer).unwrap_or_else(|_| b"{\"error\":\"encoding\"}".to_vec());
        line.push(b'\n');
        if chan.write_all(&line).is_err() {
            return 0;
        }
    }
}

/// Forks a child that forks the holder (serving `socket`, `holder_end` as
/// its standard input) and exits; the holder's pid.
fn fork_holder(socket: &Path, holder_end: OwnedFd, mode: sandbox::SeccompMode) -> std::io::Result<u32> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors; we own them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: this process is single-threaded (the subcommand runs before
    // any thread starts), so the child may go on running Rust code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: as above; the intermediate child is single-threaded too.
        let holder = unsafe { libc::fork() };
        if holder == 0 {
            // SAFETY: moves the socket to fd 0 (the holder's standard input).
            if unsafe { libc::dup2(holder_end.as_raw_fd(), 0) } != 0 {
                // SAFETY: ends this child at once.
                unsafe { libc::_exit(1) };
            }
            drop(holder_end);
            drop((r, w));
            let code = match sandbox::narrow(sandbox::ThreadClass::UffdPeer, mode) {
                Ok(()) => super::peer::serve(socket),
                Err(e) => {
                    eprintln!("vmm __uffd-peer: {e}");
                    1
                }
            };
            // SAFETY: ends the holder without running the launcher's exit path.
            unsafe { libc::_exit(code) };
        }
        let bytes = holder.to_ne_bytes();
        // SAFETY: `w` is the pipe's write end; `bytes` is valid for reads.
        unsafe { libc::write(w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: ends the intermediate child; the holder is orphaned and
        // adopted by the VMM.
        unsafe { libc::_exit(0) };
    }
    drop(w);
    drop(holder_end);
    let mut bytes = [0u8; 4];
    let mut pipe = std::fs::File::from(r);
    let read = pipe.read_exact(&mut bytes);
    // The holder is the VMM's child once the intermediate one has ended.
    reap(u32::try_from(child).unwrap_or(0), true);
    read?;
    let holder = libc::pid_t::from_ne_bytes(bytes);
    u32::try_from(holder)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::other("cannot fork the connection holder"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_json_lines() {
        assert_eq!(serde_json::to_string(&Answer::Pid(7)).unwrap(), "{\"pid\":7}");
        assert_eq!(
            serde_json::from_str::<Answer>("{\"error\":\"x\"}").unwrap(),
            Answer::Error("x".into())
        );
    }
}
