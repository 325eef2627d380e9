//! The VMM's side of one attachment to a page-fault handler: the connection
//! holder process ([`super::peer`]) it starts, the handover of the
//! userfaultfd through it, and a watcher thread that reports, once, when
//! the handler is gone: its connection closed (the holder says so), its
//! process ended (a pidfd), or the holder ended (killed by the handler,
//! as Firecracker's handlers do when they panic). The watcher waits in
//! `poll` without a timeout: nothing here polls periodically.

use super::launcher::{self, Launcher};
use super::peer::{read_line, PeerEvent, SUBCOMMAND};
use super::UffdHandlerError;
use sandbox::{SeccompMode, ThreadClass};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long the holder may take to connect and hand over.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Called once when the handler of link `id` is gone, with what was seen.
/// Runs on the watcher thread; must not block.
pub type LostHook = Arc<dyn Fn(u64, String) + Send + Sync>;

/// One attached handler. Dropping it ends the attachment: the holder
/// closes the connection (the handler learns that the VM is gone).
#[derive(Debug)]
pub struct HandlerLink {
    id: u64,
    socket: PathBuf,
    pid: i32,
    comm: String,
    /// The connection holder: a child of this process (started here, or
    /// forked by the launcher and adopted).
    holder: u32,
    /// Our end of the socket pair; its close ends the holder.
    vmm_end: Option<UnixStream>,
    stop: Arc<EventFd>,
    watcher: Option<JoinHandle<()>>,
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor; we own it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The short name of process `pid` (`/proc/PID/comm`).
pub fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// What process `pid` is doing: the CPU time its threads have used (clock
/// ticks) and whether any of them is running or runnable. A handler that
/// works (even slowly, or starved of CPU) shows one or the other.
pub fn activity(pid: i32) -> Option<(u64, bool)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ticks = 0u64;
    let mut runnable = false;
    for t in dir.filter_map(Result::ok) {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then fields 4.. (utime is 14, stime 15).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        runnable |= f.first() == Some(&"R");
        let field = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(14) + field(15);
    }
    Some((ticks, runnable))
}

/// How process `pid` (a child) ended, without reaping it.
fn exit_of(pid: u32) -> Option<String> {
    let pid = libc::id_t::from(pid);
    // SAFETY: an all-zero siginfo_t is valid; waitid writes it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid for writes; WNOWAIT leaves the child to be
    // reaped by its owner.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` for a child that changed state (si_pid != 0).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above; si_status is valid for SIGCHLD-type siginfo.
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_KILLED | libc::CLD_DUMPED => format!("killed by signal {status}"),
        _ => format!("exited with code {status}"),
    })
}

impl HandlerLink {
    /// Starts `program __uffd-peer socket` as the connection holder, hands
    /// it the handshake `message` and `uffd`, and waits (at most
    /// [`CONNECT_TIMEOUT`]) until it has connected to the handler at
    /// `socket` and handed both over. `on_lost` is called once if the
    /// handler goes while the link lives. A sandboxed thread (which may not
    /// start a program) has the holder forked by `launcher`; the holder and
    /// the watcher thread are sandboxed in `seccomp` mode.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        id: u64,
        socket: &Path,
        program: &Path,
        message: &[u8],
        uffd: &impl AsRawFd,
        on_lost: LostHook,
        launcher: Option<&Launcher>,
        seccomp: SeccompMode,
    ) -> Result<HandlerLink, UffdHandlerError> {
        let err = |what: &'static str| {
            move |source: std::io::Error| UffdHandlerError::Socket {
                path: socket.to_owned(),
                what,
                source,
            }
        };
        let (mut vmm_end, holder_end) =
            UnixStream::pair().map_err(err("creating the holder's socket pair"))?;
        let holder_err = |source| UffdHandlerError::Holder {
            program: program.to_owned(),
            source,
        };
        let holder = match (launcher, sandbox::current()) {
            (Some(l), Some(_)) => l.launch(socket, OwnedFd::from(holder_end)).map_err(holder_err)?,
            (None, Some((class, _))) => {
                return Err(holder_err(std::io::Error::other(format!(
                    "a sandboxed {class} thread starts no program, and no connection holder launcher runs"
                ))))
            }
            (_, None) => Command::new(program)
                .arg(SUBCOMMAND)
                .arg(socket)
                .stdin(Stdio::from(OwnedFd::from(holder_end)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .env(sandbox::MODE_ENV, seccomp.to_string())
                // Its own process group: a terminal's ^C goes to the VMM, which
                // ends the run cleanly, not to the holder.
                .process_group(0)
                .spawn()
                .map_err(holder_err)?
                .id(),
        };
        let kill = |holder: u32| {
            launcher::kill(holder);
            launcher::end_child(holder);
        };
        if let Err(e) = vmm_end.send_with_fd(message, uffd.as_raw_fd()) {
            kill(holder);
            return Err(err("handing the userfaultfd to the connection holder")(
                std::io::Error::from_raw_os_error(e.errno()),
            ));
        }
        let _ = vmm_end.set_read_timeout(Some(CONNECT_TIMEOUT));
        let answer = read_line(&mut vmm_end);
        let _ = vmm_end.set_read_timeout(None);
        let pid = match answer {
            Ok(Some(line)) => match PeerEvent::decode(&line) {
                Ok(PeerEvent::Connected { pid }) => pid,
                Ok(PeerEvent::Failed { error }) => {
                    kill(holder);
                    return Err(UffdHandlerError::Handover {
                        path: socket.to_owned(),
                        error,
                    });
                }
                Ok(PeerEvent::Closed { reason }) => {
                    kill(holder);
                    return Err(UffdHandlerError::Handover {
                        path: socket.to_owned(),
                        error: reason,
                    });
                }
                Err(e) => {
                    kill(holder);
                    return Err(UffdHandlerError::Handover {
                        path: socket.to_owned(),
                        error: format!("the connection holder's answer `{line}` is not valid: {e}"),
                    });
                }
            },
            Ok(None) => {
                let how = exit_of(holder).unwrap_or_else(|| "ended".into());
                kill(holder);
                return Err(UffdHandlerError::Handover {
                    path: socket.to_owned(),
                    error: format!(
                        "the connection holder ({} {SUBCOMMAND}) {how} before answering",
                        program.display()
                    ),
                });
            }
            Err(e) => {
                kill(holder);
                return Err(err("waiting for the connection holder")(e));
            }
        };
        let comm = process_name(pid);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(err("creating an eventfd"))?);
        let watch = Watch {
            id,
            handler_fd: pidfd_open(pid),
            holder_pid: holder,
            holder_fd: pidfd_open(i32::try_from(holder).unwrap_or(0)),
            vmm_end: vmm_end.try_clone().map_err(err("watching the connection"))?,
            stop: stop.clone(),
            on_lost,
        };
        let watcher = sandbox::spawn(
            std::thread::Builder::new().name("uffd-handler-watch".into()),
            ThreadClass::HandlerWatch,
            seccomp,
            move || watch.run(),
        )
        .map_err(|e| err("starting the watcher thread")(e.into()))?;
        Ok(HandlerLink {
            id,
            socket: socket.to_owned(),
            pid,
            comm,
            holder,
            vmm_end: Some(vmm_end),
            stop,
            watcher: Some(watcher),
        })
    }

    /// The attachment's number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The handler's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The handler's process id (`SO_PEERCRED` of the connection).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How to name the handler to a user.
    pub fn describe(&self) -> String {
        format!("{} (pid {}, {})", self.socket.display(), self.pid, self.comm)
    }

    /// The connection holder's process id.
    pub fn holder_pid(&self) -> u32 {
        self.holder
    }
}

impl Drop for HandlerLink {
    fn drop(&mut self) {
        // First the watcher, so that our own close is not reported as a loss.
        let _ = self.stop.write(1);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if let Some(mut s) = self.vmm_end.take() {
            let _ = s.flush();
        }
        launcher::end_child(self.holder);
    }
}

/// The watcher thread's state.
struct Watch {
    id: u64,
    handler_fd: Option<OwnedFd>,
    holder_pid: u32,
    holder_fd: Option<OwnedFd>,
    vmm_end: UnixStream,
    stop: Arc<EventFd>,
    on_lost: LostHook,
}

impl Watch {
    fn run(mut self) {
        let raw = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.vmm_end.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
                // A negative fd is ignored by poll.
                libc::pollfd {
                    fd: raw(&self.handler_fd),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: raw(&self.holder_fd),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of four pollfds for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 4, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                (self.on_lost)(self.id, format!("the VMM cannot watch the handler: {e}"));
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            let reason = if fds[1].revents != 0 {
                match read_line(&mut self.vmm_end) {
                    Ok(Some(line)) => match PeerEvent::decode(&line) {
                        Ok(PeerEvent::Closed { reason }) => reason,
                        _ => continue,
                    },
                    _ => self.holder_gone(),
                }
            } else if fds[2].revents != 0 {
                "the handler's process ended".to_string()
            } else if fds[3].revents != 0 {
                self.holder_gone()
            } else {
                continue;
            };
            (self.on_lost)(self.id, reason);
            return;
        }
    }

    fn holder_gone(&self) -> String {
        // Give the kernel a moment to report how it ended.
        let mut how = None;
        for _ in 0..20 {
            how = exit_of(self.holder_pid);
            if how.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let how = how.unwrap_or_else(|| "ended".into());
        let hint = if how.contains("signal 9") {
            "; Firecracker's handlers SIGKILL the process at the other end of their socket when they panic"
        } else {
            ""
        };
        format!("its connection holder (pid {}) {how}{hint}", self.holder_pid)
    }
}
