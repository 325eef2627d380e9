//! `vmm ctl`: one request to a running VMM's control socket.

use super::args::{CtlArgs, CtlRequest};

/// `vmm ctl`.
pub fn ctl(args: CtlArgs) -> i32 {
    use vmm::control::Request;
    use vmm::snapshot::AfterSnapshot;
    let req = match args.request {
        CtlRequest::Pause => Request::Pause {},
        CtlRequest::Resume => Request::Resume {},
        CtlRequest::Stats => Request::Stats {},
        CtlRequest::Migration => Request::Migration {},
        CtlRequest::WorkingSetEnd => Request::WorkingSetEnd {},
        CtlRequest::Migrate {
            to,
            push_delay_ms,
            precopy_rounds,
            resume,
            tls,
            dirty_tracking,
            push_order,
        } => {
            let f = tls.files(true);
            Request::Migrate {
                dirty_tracking: dirty_tracking.map(|d| {
                    if d == "uffd-wp" {
                        vmm::migration::DirtyTracking::UffdWp
                    } else {
                        vmm::migration::DirtyTracking::Kvm
                    }
                }),
                to: absolute_endpoint(to),
                push_delay_ms,
                precopy_rounds,
                resume,
                push_order,
                tls_cert: f.cert,
                tls_key: f.key,
                tls_peer: f.peer,
                tls_psk: f.psk,
                insecure_plain_tcp: tls.insecure_plain_tcp,
            }
        }
        CtlRequest::Recover { from, tls } => {
            let f = tls.files(true);
            Request::Recover {
                from: absolute_endpoint(from),
                tls_cert: f.cert,
                tls_key: f.key,
                tls_peer: f.peer,
                tls_psk: f.psk,
                insecure_plain_tcp: tls.insecure_plain_tcp,
            }
        }
        CtlRequest::AttachHandler { path } => Request::AttachHandler {
            path: std::path::absolute(&path).unwrap_or(path),
        },
        CtlRequest::Snapshot {
            to,
            resume,
            stop,
            pause,
            live,
            wp_mode,
        } => Request::Snapshot {
            live,
            wp_mode: wp_mode.map(|m| {
                if m == "unpopulated" {
                    vmm_core::memory::WpMode::Unpopulated
                } else {
                    vmm_core::memory::WpMode::Present
                }
            }),
            reference: None,
            // Relative to the caller, not to the VMM's working directory.
            to: std::path::absolute(&to).unwrap_or(to),
            then: match (resume, stop, pause) {
                (true, _, _) => AfterSnapshot::Resume,
                (_, true, _) => AfterSnapshot::Stop,
                (_, _, true) => AfterSnapshot::Pause,
                _ => AfterSnapshot::Restore,
            },
        },
    };
    let timeout = match super::seconds("--timeout", args.timeout, false) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return vmm::EXIT_VMM_ERROR;
        }
    };
    match vmm::control::request(&args.socket, &req, timeout) {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
            );
            0
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    }
}

/// `unix:PATH` with PATH made absolute (relative to the caller, not to the
/// VMM's working directory, which the VMM refuses); other addresses as given.
fn absolute_endpoint(addr: String) -> String {
    match addr.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => match std::path::absolute(p) {
            Ok(abs) => format!("unix:{}", abs.display()),
            Err(_) => addr,
        },
        _ => addr,
    }
}
