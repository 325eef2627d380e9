//! The control socket of `vmm run --control PATH`: a Unix stream socket served
//! by a thread that forwards requests to the running VM's controller.
//!
//! Protocol (`docs/snapshot.md`): one JSON object per line in each direction.
//! Requests: `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"stats"}`,
//! `{"cmd":"migration"}`,
//! `{"cmd":"snapshot","to":"DIR","then":"restore|resume|pause|stop"}`,
//! `{"cmd":"migrate","to":"ADDR",...}`, `{"cmd":"recover","from":"ADDR"}`
//! (both with optional `tls_cert`, `tls_key`, `tls_peer`, `tls_psk`: absolute
//! paths, and `insecure_plain_tcp`), `{"cmd":"attach_handler","path":"SOCKET"}`.
//! Responses: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
//! Any input, however malformed, gets an error response (a line longer than
//! [`MAX_LINE`] closes the connection after it); nothing crashes the VMM.

use crate::controller::VmHandle;
use crate::migration::{Endpoint, MigrateOptions, Security, TlsFiles};
use crate::snapshot::AfterSnapshot;
use sandbox::ThreadClass;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest push delay a migration request may ask for (an hour).
pub const MAX_PUSH_DELAY_MS: u64 = 3_600_000;
/// Clients served at once; more wait in the listen queue (each holds a
/// thread and two file descriptors).
pub const MAX_CLIENTS: usize = 16;
/// A client that sends no request for this long is disconnected (a
/// request being carried out, e.g. a migration, is not idle time).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// The path is taken by something that is not a stale socket.
    #[error("cannot create control socket {0}: the path exists and is not a socket; choose another --control path")]
    PathTaken(PathBuf),
    /// Another VMM listens there.
    #[error(
        "cannot create control socket {0}: another process is listening on it; choose another --control path"
    )]
    InUse(PathBuf),
    /// Socket IO.
    #[error("control socket {path}: {what} failed: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("control socket {path}: no answer within {waited:?}; the VMM may be busy (a long snapshot or migration: raise `vmm ctl --timeout`) or not a vmm")]
    NoAnswer {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The VMM answered with an error.
    #[error("the VMM refused the request: {0}")]
    Refused(String),
    /// The answer was not valid.
    #[error("the VMM's answer is not valid: {0}")]
    BadAnswer(String),
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty struct variants, not unit ones: serde ignores unknown fields of
    // unit variants even with `deny_unknown_fields`.
    /// Pause every vCPU.
    Pause {},
    /// Resume.
    Resume {},
    /// Live statistics.
    Stats {},
    /// Where the migration stands, live and after it ended (docs/migration.md, "Statistics").
    Migration {},
    /// Snapshot to a directory.
    Snapshot {
        /// The directory.
        to: PathBuf,
        /// What to do after it (default: back to how the VM was).
        #[serde(default)]
        then: AfterSnapshot,
        /// Live: pause only to capture the state and write-protect memory,
        /// save memory while the guest runs (docs/live-snapshot.md).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
        /// Live: how memory is write-protected (`present`, `unpopulated`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wp_mode: Option<vmm_core::memory::WpMode>,
        /// Live, consistency check: also write a stop-the-world snapshot
        /// of the same instant here (absolute path).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<PathBuf>,
    },
    /// Post-copy live migration to `unix:PATH` or `tcp:ADDR:PORT`
    /// (answered when every page is sent; docs/migration.md).
    Migrate {
        /// The destination (`vmm receive --listen ...`).
        to: String,
        /// TLS: this side's certificate, key, the destination's pinned
        /// certificate, a pre-shared key file (absolute paths, read by the VMM).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_key: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_peer: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_psk: Option<PathBuf>,
        /// Allow plain TCP (no authentication, no encryption).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        insecure_plain_tcp: bool,
        /// Milliseconds before the background push starts (0: at once).
        #[serde(default)]
        push_delay_ms: u64,
        /// Pre-copy rounds with KVM dirty logging before the switchover.
        #[serde(default)]
        precopy_rounds: u32,
        /// Resume an interrupted post-copy with a destination that waits
        /// for it (`recover`).
        #[serde(default)]
        resume: bool,
        /// Dirty tracking of the pre-copy rounds: `kvm` (default) or
        /// `uffd-wp` (async userfaultfd write protection).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dirty_tracking: Option<crate::migration::DirtyTracking>,
        /// The background push's order: `address` (default) or `recency`.
        #[serde(default)]
        push_order: crate::migration::PushOrder,
    },
    /// Destination whose source was lost mid post-copy: listen at `from`
    /// for the source to resume the migration (answered once listening).
    Recover {
        /// `unix:PATH` or `tcp:ADDR:PORT`.
        from: String,
        /// TLS for the source's new connections (absolute paths; none: the
        /// settings `vmm receive` was started with).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_key: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_peer: Option<PathBuf>,
        /// See `tls_cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_psk: Option<PathBuf>,
        /// Allow plain TCP (no authentication, no encryption).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        insecure_plain_tcp: bool,
    },
    /// A VM whose external page-fault handler is gone: connect to the
    /// handler listening at `path` and resume (docs/external-handler.md).
    #[serde(alias = "attach-handler")]
    AttachHandler {
        /// The new handler's socket.
        path: PathBuf,
    },
    /// End the working-set recording window and write the file.
    #[serde(alias = "working-set-end")]
    WorkingSetEnd {},
}

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// A request line that is not a request (its message is sent back).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_LINE`].
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("request is not UTF-8")]
    NotUtf8,
    /// Not a request of this protocol.
    #[error("bad request: {0}; send one JSON object per line, e.g. {{\"cmd\":\"pause\"}} (cmd: pause, resume, stats, snapshot, migrate, recover, attach_handler, working_set_end)")]
    Json(#[source] serde_json::Error),
}

/// Decodes one request line.
pub fn decode(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    serde_json::from_str(text.trim()).map_err(DecodeError::Json)
}

/// The first path of `req` that is not absolute, and what it names.
/// Relative to what? The VMM's working directory is no answer: every path a
/// request names (a snapshot directory, a handler's socket, a Unix
/// migration address) must be absolute (`vmm ctl` resolves relative paths
/// itself).
fn relative_path(req: &Request) -> Option<(&'static str, PathBuf)> {
    let unix = |addr: &str| {
        addr.strip_prefix("unix:")
            .map(PathBuf::from)
            .filter(|p| !p.as_os_str().is_empty())
    };
    let (what, path) = match req {
        Request::Snapshot { to, .. } => ("snapshot directory", Some(to.clone())),
        Request::AttachHandler { path } => ("handler socket", Some(path.clone())),
        Request::Migrate { to, .. } => ("migration socket", unix(to)),
        Request::Recover { from, .. } => ("migration socket", unix(from)),
        Request::Pause {}
        | Request::Resume {}
        | Request::Stats {}
        | Request::Migration {}
        | Request::WorkingSetEnd {} => ("", None),
    };
    path.filter(|p| !p.is_absolute()).map(|p| (what, p))
}

/// Carries out a request on the VM.
pub fn execute(vm: &VmHandle, req: &Request) -> Response {
    if let Some((what, path)) = relative_path(req) {
        return Response::err(format!(
            "{what} `{}` is not an absolute path; give one (vmm ctl resolves relative paths itself)",
            path.display()
        ));
    }
    if let Request::Snapshot {
        reference: Some(r), ..
    } = req
    {
        if !r.is_absolute() {
            return Response::err(format!(
                "reference snapshot directory `{}` is not an absolute path; give one",
                r.display()
            ));
        }
    }
    let json = |v: Result<serde_json::Value, serde_json::Error>| match v {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(format!("cannot encode the result: {e}")),
    };
    match req {
        Request::Pause {} => match vm.pause() {
            Ok(r) => Response::ok(serde_json::json!({
                "took_ms": r.took.as_secs_f64() * 1e3,
                "vcpus": r.vcpus.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>(),
            })),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Resume {} => match vm.resume() {
            Ok(()) => Response::ok(serde_json::Value::Null),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Stats {} => match vm.stats() {
            Ok(s) => json(serde_json::to_value(s)),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Migration {} => match vm.migration() {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Snapshot {
            to,
            then,
            live: true,
            wp_mode,
            reference,
        } => {
            let options = crate::controller::live::LiveOptions {
                then: *then,
                mode: wp_mode.unwrap_or_default(),
                reference: reference.clone(),
                ..Default::default()
            };
            match vm.snapshot_live(to, &options) {
                Ok(info) => json(serde_json::to_value(info)),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Snapshot { wp_mode: Some(_), .. }
        | Request::Snapshot {
            reference: Some(_), ..
        } => Response::err(
            "wp_mode and reference apply to live snapshots only: add \"live\":true (vmm ctl: --live)",
        ),
        Request::Snapshot { to, then, .. } => match vm.snapshot(to, *then) {
            Ok(info) => json(serde_json::to_value(info)),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Migrate {
            to,
            push_delay_ms,
            precopy_rounds,
            resume,
            tls_cert,
            tls_key,
            tls_peer,
            tls_psk,
            insecure_plain_tcp,
            dirty_tracking,
            push_order,
        } => {
            if *push_delay_ms > MAX_PUSH_DELAY_MS {
                return Response::err(format!(
                    "push_delay_ms {push_delay_ms} is more than the {MAX_PUSH_DELAY_MS} ms (an hour) accepted"
                ));
            }
            let files = TlsFiles {
                cert: tls_cert.clone(),
                key: tls_key.clone(),
                peer: tls_peer.clone(),
                psk: tls_psk.clone(),
            };
            let to = match to.parse::<Endpoint>() {
                Ok(to) => to,
                Err(e) => return Response::err(e.to_string()),
            };
            let security = match security(&files, *insecure_plain_tcp) {
                Ok(s) => s,
                Err(e) => return Response::err(e),
            };
            let options = MigrateOptions {
                push_delay: Duration::from_millis(*push_delay_ms),
                precopy_rounds: *precopy_rounds,
                resume: *resume,
                security,
                dirty_tracking: dirty_tracking.unwrap_or_default(),
                push_order: *push_order,
            };
            match vm.migrate(&to, &options) {
                Ok(summary) => json(serde_json::to_value(summary)),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::WorkingSetEnd {} => match vm.working_set_end() {
            Ok(info) => json(serde_json::to_value(info)),
            Err(e) => Response::err(e.to_string()),
        },
        Request::AttachHandler { path } => match vm.attach_handler(path) {
            Ok(info) => json(serde_json::to_value(info)),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Recover {
            from,
            tls_cert,
            tls_key,
            tls_peer,
            tls_psk,
            insecure_plain_tcp,
        } => {
            let files = TlsFiles {
                cert: tls_cert.clone(),
                key: tls_key.clone(),
                peer: tls_peer.clone(),
                psk: tls_psk.clone(),
            };
            let from = match from.parse::<Endpoint>() {
                Ok(from) => from,
                Err(e) => return Response::err(e.to_string()),
            };
            // Nothing given: as `vmm receive` was started.
            let security = if files.is_empty() && !insecure_plain_tcp {
                None
            } else {
                match security(&files, *insecure_plain_tcp) {
                    Ok(s) => Some(s),
                    Err(e) => return Response::err(e),
                }
            };
            match vm.recover_with(&from, security) {
                Ok(at) => Response::ok(serde_json::json!({ "listening": at.to_string() })),
                Err(e) => Response::err(e.to_string()),
            }
        }
    }
}

/// The security of a migration request: its TLS files (absolute paths)
/// loaded, or the opt-in for plain TCP.
fn security(files: &TlsFiles, insecure_plain_tcp: bool) -> Result<Security, String> {
    files.check_absolute().map_err(|e| e.to_string())?;
    Security::from_files(files, insecure_plain_tcp).map_err(|e| e.to_string())
}

/// The socket's server thread; stops (and removes the socket) on drop.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ControlSocketError + 'a {
    move |source| ControlSocketError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket nobody listens on) and serves it.
    pub fn start(path: &Path, vm: VmHandle) -> Result<ControlServer, ControlSocketError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlSocketError::PathTaken(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ControlSocketError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err(path, "removing the stale socket"))?;
        }
        // Owner only, whatever the umask: guest control is for this user.
        // SAFETY: umask has no preconditions; restored right after the bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io_err(path, "bind"))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(io_err(path, "restricting the socket to its owner"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(path, "setting non-blocking mode"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let mode = vm.seccomp();
        let thread = sandbox::spawn(
            std::thread::Builder::new().name("vmm-control".into()),
            ThreadClass::ControlServer,
            mode,
            move || serve(&listener, &vm, &s),
        )
        .map_err(|e| io_err(path, "starting the server thread")(e.into()))?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, vm: &VmHandle, stop: &AtomicBool) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            // Bounded: the next ones wait in the kernel's listen queue.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = crate::peercred::check_peer(&stream) {
                    tracing::warn!("control socket: {e}");
                    let _ = (&stream).write_all(
                        format!("{}\n", serde_json::json!({"ok": false, "error": e.to_string()})).as_bytes(),
                    );
                    continue;
                }
                let vm = vm.clone();
                let count = clients.clone();
                count.fetch_add(1, Ordering::AcqRel);
                // One thread per client (at most MAX_CLIENTS): a slow client
                // does not block others. Sandboxed like this thread, whose
                // filter it inherits.
                let spawned = sandbox::spawn(
                    std::thread::Builder::new().name("vmm-control-client".into()),
                    ThreadClass::ControlClient,
                    sandbox::inherited_mode(),
                    move || {
                        serve_client(stream, &vm);
                        count.fetch_sub(1, Ordering::AcqRel);
                    },
                );
                if let Err(e) = spawned {
                    clients.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("control socket: cannot serve a client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Answers each request line of one client until it hangs up.
pub fn serve_client(stream: UnixStream, vm: &VmHandle) {
    let _ = stream.set_nonblocking(false);
    // A client that connects and sends nothing, or stops reading its
    // answers, does not hold its thread forever (a request in progress,
    // e.g. a migration, is not bounded by this: the timeouts are on IO).
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        // Read one byte past the limit to tell a long line from a full one.
        match reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_LINE;
        let resp = if too_long {
            Response::err(format!("request longer than {MAX_LINE} bytes; connection closed"))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            match decode(&line) {
                Ok(req) => execute(vm, &req),
                Err(e) => Response::err(e.to_string()),
            }
        };
        let mut text = serde_json::to_string(&resp)
            .unwrap_or_else(|_| "{\"ok\":false,\"error\":\"cannot encode the response\"}".into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
        if too_long {
            // Closing with the rest of the line unread would reset the
            // connection and could destroy the answer before the client reads
            // it: end our side, then discard what the client still sends
            // (bounded in size and time).
            let _ = out.shutdown(std::net::Shutdown::Write);
            let _ = reader
                .get_ref()
                .set_read_timeout(Some(std::time::Duration::from_secs(1)));
            let _ = std::io::copy(&mut reader.take(16 << 20), &mut std::io::sink());
            return;
        }
    }
}

/// Sends one request to the socket at `path` and returns the result (`ctl`).
pub fn request(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ControlSocketError> {
    let mut stream = UnixStream::connect(path).map_err(io_err(path, "connect"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io_err(path, "setting a timeout"))?;
    let mut line = serde_json::to_string(req).map_err(|e| ControlSocketError::BadAnswer(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err(path, "send"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(64 << 20)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlSocketError::NoAnswer {
                path: path.to_owned(),
                waited: timeout,
            },
            _ => io_err(path, "receive")(e),
        })?;
    decode_answer(&answer)
}

/// Decodes the server's answer line as `vmm ctl` reads it: the result of a
/// request that succeeded, or why it was refused. Whatever listens at the
/// socket sent it: `fuzz/`'s `control_request` target feeds it any bytes.
pub fn decode_answer(answer: &str) -> Result<serde_json::Value, ControlSocketError> {
    let resp: Response = serde_json::from_str(answer.trim())
        .map_err(|e| ControlSocketError::BadAnswer(format!("{e}: `{answer}`")))?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlSocketError::Refused(
            resp.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_ok(line: &[u8]) -> Request {
        decode(line).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn requests_decode() {
        assert_eq!(decode_ok(br#"{"cmd":"pause"}"#), Request::Pause {});
        assert_eq!(decode_ok(b" {\"cmd\":\"stats\"}\n"), Request::Stats {});
        assert_eq!(decode_ok(b"{\"cmd\":\"migration\"}\n"), Request::Migration {});
        assert_eq!(
            decode_ok(br#"{"cmd":"snapshot","to":"/s","then":"stop"}"#),
            Request::Snapshot {
                to: "/s".into(),
                then: AfterSnapshot::Stop,
                live: false,
                wp_mode: None,
                reference: None,
            }
        );
        assert_eq!(
            decode_ok(br#"{"cmd":"snapshot","to":"/s"}"#),
            Request::Snapshot {
                to: "/s".into(),
                then: AfterSnapshot::Restore,
                live: false,
                wp_mode: None,
                reference: None,
            }
        );
        assert_eq!(
            decode_ok(br#"{"cmd":"snapshot","to":"/s","live":true,"wp_mode":"unpopulated"}"#),
            Request::Snapshot {
                to: "/s".into(),
                then: AfterSnapshot::Restore,
                live: true,
                wp_mode: Some(vmm_core::memory::WpMode::Unpopulated),
                reference: None,
            }
        );
        assert_eq!(
            decode_ok(br#"{"cmd":"attach_handler","path":"/run/h.sock"}"#),
            Request::AttachHandler {
                path: "/run/h.sock".into()
            }
        );
        assert_eq!(
            decode_ok(br#"{"cmd":"attach-handler","path":"/h"}"#),
            Request::AttachHandler { path: "/h".into() }
        );
        assert!(decode(br#"{"cmd":"attach_handler"}"#).is_err());
        let r = Request::Snapshot {
            to: "/x".into(),
            then: AfterSnapshot::Resume,
            live: true,
            wp_mode: None,
            reference: Some("/y".into()),
        };
        assert_eq!(decode_ok(serde_json::to_string(&r).unwrap().as_bytes()), r);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_crash() {
        let long = vec![b'{'; MAX_LINE + 1];
        let deep = "[".repeat(100_000);
        let cases: Vec<&[u8]> = vec![
            b"",
            b"\xff\xfe\x00",
            b"null",
            b"[]",
            b"{}",
            b"{\"cmd\":\"reboot\"}",
            b"{\"cmd\":\"pause\",\"extra\":1}",
            b"{\"cmd\":\"snapshot\"}",
            b"{\"cmd\":\"snapshot\",\"to\":5}",
            b"{\"cmd\":\"snapshot\",\"to\":\"/s\",\"then\":\"explode\"}",
            b"{\"cmd\":",
            b"\"pause\"",
            b"{\"cmd\":\"pause\"}{\"cmd\":\"pause\"}",
            &long,
            deep.as_bytes(),
        ];
        for c in cases {
            let e = decode(c).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
        // Pseudo-random bytes and mutations of a valid request.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let valid = br#"{"cmd":"snapshot","to":"/s","then":"resume"}"#;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = valid.to_vec();
            let pos = (x as usize) % m.len();
            m[pos] = (x >> 32) as u8;
            if x & 1 == 0 {
                m.truncate((x >> 8) as usize % m.len());
            }
            let _ = decode(&m);
        }
    }

    #[test]
    fn every_path_a_request_names_must_be_absolute() {
        let rel = [
            r#"{"cmd":"snapshot","to":"snap"}"#,
            r#"{"cmd":"snapshot","to":""}"#,
            r#"{"cmd":"attach_handler","path":"h.sock"}"#,
            r#"{"cmd":"attach_handler","path":""}"#,
            r#"{"cmd":"migrate","to":"unix:dst.sock"}"#,
            r#"{"cmd":"recover","from":"unix:./src.sock"}"#,
        ];
        for r in rel {
            let (_, p) = relative_path(&decode_ok(r.as_bytes())).unwrap_or_else(|| panic!("{r}"));
            assert!(!p.is_absolute(), "{r}");
        }
        let ok = [
            r#"{"cmd":"snapshot","to":"/s"}"#,
            r#"{"cmd":"attach_handler","path":"/run/h.sock"}"#,
            r#"{"cmd":"migrate","to":"unix:/run/dst.sock"}"#,
            r#"{"cmd":"migrate","to":"tcp:127.0.0.1:4444"}"#,
            r#"{"cmd":"recover","from":"unix:/run/src.sock"}"#,
            r#"{"cmd":"stats"}"#,
        ];
        for r in ok {
            assert!(relative_path(&decode_ok(r.as_bytes())).is_none(), "{r}");
        }
    }

    #[test]
    fn responses_encode_as_documented() {
        let ok = serde_json::to_string(&Response::ok(serde_json::json!({"a": 1}))).unwrap();
        assert_eq!(ok, r#"{"ok":true,"result":{"a":1}}"#);
        let err = serde_json::to_string(&Response::err("no")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"no"}"#);
    }
}
