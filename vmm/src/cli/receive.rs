//! `vmm receive`: a migration destination, with a progress bar on a terminal.

use super::args::ReceiveArgs;
use super::report::report;
use super::{parse_timeout, sandbox_main, seccomp_mode, StatsOut};
use sandbox::{SeccompMode, ThreadClass};
use std::io::IsTerminal;
use std::time::Duration;
use vmm::{VmOptions, EXIT_VMM_ERROR};

/// `vmm receive`.
pub fn receive(args: ReceiveArgs) -> i32 {
    use vmm::migration::{Endpoint, Listener};
    use vmm::receive::ReceiveOptions;
    let timeout = match parse_timeout(args.timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let lost_wait = match super::seconds("--lost-wait", args.lost_wait, true) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let seccomp = match seccomp_mode(args.seccomp) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut stats = match StatsOut::open(args.stats.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let security =
        match vmm::migration::Security::from_files(&args.tls.files(false), args.tls.insecure_plain_tcp) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("vmm: error: {e}");
                return EXIT_VMM_ERROR;
            }
        };
    let listener = match args
        .listen
        .parse::<Endpoint>()
        .and_then(|e| Listener::bind_with(&e, security))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    if let Ok(at) = listener.endpoint() {
        eprintln!(
            "vmm: waiting for a migration on {at} ({})",
            listener.security().describe(&at)
        );
    }
    // A signal while waiting ends the process: its socket goes too.
    let _socket = match listener.endpoint() {
        Ok(vmm::migration::Endpoint::Unix(p)) => Some(vmm::signals::remove_on_exit(&p)),
        _ => None,
    };
    let options = ReceiveOptions {
        vm: VmOptions {
            stdin: true,
            timeout,
            shutdown_signals: true,
            seccomp,
            snapshot_key: match super::snapshot_key(args.snapshot_key.as_deref()) {
                Ok(k) => k,
                Err(code) => return code,
            },
            ..Default::default()
        },
        lost_wait,
        progress: Default::default(),
        wait: timeout,
    };
    let bar = if std::io::stderr().is_terminal() {
        progress_bar(options.progress.clone(), seccomp)
    } else {
        None
    };
    let mut server = None;
    let mut unsandboxed = None;
    let out = vmm::receive::receive(&listener, options, |h| {
        eprintln!("vmm: the migrated VM runs here");
        if let Some(path) = &args.control {
            match vmm::control::ControlServer::start(path, h.clone()) {
                Ok(s) => server = Some(s),
                Err(e) => eprintln!("vmm: warning: {e}"),
            }
        }
        if let Err(e) = sandbox_main(seccomp) {
            h.stop();
            unsandboxed = Some(e);
        }
    });
    drop(server);
    if let Some((stop, t)) = bar {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = t.join();
    }
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return match e {
                vmm::receive::ReceiveError::Migration(
                    vmm::migration::MigrationError::NoPeer { .. }
                    | vmm::migration::MigrationError::TimedOut { .. },
                ) => vmm::EXIT_TIMED_OUT,
                _ => EXIT_VMM_ERROR,
            };
        }
    };
    if let Some(e) = unsandboxed {
        eprintln!("vmm: error: {e}");
        return EXIT_VMM_ERROR;
    }
    let st = &out.stats;
    println!(
        "vmm: migration: downtime {:.1} ms, total {:.1} ms, {} pre-copy pages ({} kept), {} post-copy pages: {} requested ({} answered), {} pushed, {} bytes; page-request latency p50 <{} us p99 <{} us; vCPUs blocked {} us; {} recoveries",
        st.downtime_ms, st.total_ms, st.precopy_pages, st.precopy_kept, st.data_pages, st.pages_requested, st.pages_answered, st.pages_pushed,
        st.bytes, st.latency_p50_us, st.latency_p99_us, st.vcpu_blocked_us, st.recoveries
    );
    let mut code = report(&out.config, &out.run, None);
    if let Some(lost) = &out.lost {
        eprintln!(
            "vmm: error: the migration source was lost before every page arrived: {lost}; the VM was paused \
             (no missing page was zero-filled); the source still holds the whole VM: resume it there with `vmm ctl SOCKET resume`, or, while this VM waits, \
             resume the migration (`vmm ctl DEST recover --from ADDR`, then `vmm ctl SRC migrate --to ADDR --resume`)"
        );
        code = vmm::EXIT_MEMORY_FAULT;
    }
    if let Some(stats) = &mut stats {
        let mut json = out.run.stats_json();
        json["migration"] = serde_json::to_value(st).unwrap_or_default();
        json["migration"]["lost"] = serde_json::json!(out.lost);
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        if let Err(e) = stats.write(&text) {
            eprintln!("vmm: error: {e}");
        }
    }
    code
}

/// Draws the incoming migration's progress on the terminal until `stop`
/// (a thread sandboxed like the main thread).
fn progress_bar(
    p: std::sync::Arc<vmm::migration::Progress>,
    seccomp: SeccompMode,
) -> Option<(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
)> {
    use std::sync::atomic::Ordering::Relaxed;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let spawned = sandbox::spawn(
        std::thread::Builder::new().name("progress".into()),
        ThreadClass::Main,
        seccomp,
        move || {
            let bar = indicatif::ProgressBar::new_spinner();
            let spinner = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            let pages = indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} pages ({percent}%), {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(spinner);
            bar.set_message("waiting for the source");
            let mut counting = false;
            while !s.load(Relaxed) {
                if p.complete.load(Relaxed) {
                    bar.finish_with_message(format!(
                        "migration complete: {} pre-copy and {} post-copy pages",
                        p.precopy_pages.load(Relaxed),
                        p.data_pages.load(Relaxed)
                    ));
                    return;
                }
                if p.running.load(Relaxed) && !counting {
                    counting = true;
                    bar.set_style(pages.clone());
                    bar.set_length(p.data_pages.load(Relaxed));
                }
                bar.set_position(p.received.load(Relaxed));
                let precopy = p.precopy_pages.load(Relaxed);
                bar.set_message(if p.lost.load(Relaxed) {
                    "source lost, VM paused: `vmm ctl DEST recover --from ADDR`".to_string()
                } else if counting {
                    "post-copy".to_string()
                } else if precopy > 0 {
                    format!("pre-copy: {precopy} pages received")
                } else {
                    "waiting for the source".to_string()
                });
                bar.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        },
    );
    match spawned {
        Ok(t) => Some((stop, t)),
        Err(e) => {
            eprintln!("vmm: warning: no progress bar: {e}");
            None
        }
    }
}
