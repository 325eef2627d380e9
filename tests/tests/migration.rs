//! Live migration on real KVM, loopback only: a running workload migrates
//! over a Unix socket and over TCP with TLS (pinned certificates, a
//! pre-shared key), with and without pre-copy rounds, and finishes on the
//! destination with the right checksums, every page sent once or accounted;
//! a connection cut mid post-copy pauses the destination with an error, and
//! either the source resumes the VM or the destination recovers (over TLS
//! too) and the migration completes; a destination with another certificate
//! or plain TCP is refused before the source pauses, and its VM runs on.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm::controller::verify_reports;
use vmm::migration::{tls, Endpoint, Listener, MigrateOptions, Security, TlsFiles};
use vmm::receive::{self as migration, ReceiveOptions};
use vmm::{GuestEnd, RunningVm, Vm, VmConfig};
use vmm_tests::{capture_options, config};

fn touch_cfg() -> VmConfig {
    config(2, "512M", "workload=touch pages=20000 pattern=rand")
}

fn sock(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-mig-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn wait_for(console: &Mutex<Vec<u8>>, what: &str) {
    let start = Instant::now();
    while !String::from_utf8_lossy(&console.lock().unwrap()).contains(what) {
        assert!(start.elapsed() < Duration::from_secs(60), "no `{what}`");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Boots the source and waits until its workload runs.
fn source(cfg: &VmConfig, after: Duration) -> RunningVm {
    let (options, console) = capture_options();
    let vm = Vm::new(cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    std::thread::sleep(after);
    vm
}

fn destination(
    listener: Listener,
    lost_wait: Duration,
) -> std::thread::JoinHandle<migration::ReceiveOutcome> {
    destination_with_handle(listener, lost_wait, mpsc::channel().0)
}

/// The destination; its VM handle goes to `handle` once the VM runs.
fn destination_with_handle(
    listener: Listener,
    lost_wait: Duration,
    handle: mpsc::Sender<vmm::VmHandle>,
) -> std::thread::JoinHandle<migration::ReceiveOutcome> {
    std::thread::spawn(move || {
        let (vm, console) = capture_options();
        let opts = ReceiveOptions {
            handlers: Default::default(),
            vm: vmm::VmOptions {
                timeout: Some(Duration::from_secs(120)),
                ..vm
            },
            lost_wait,
            progress: Default::default(),
            wait: None,
        };
        let out = migration::receive(&listener, opts, |h| {
            let _ = handle.send(h.clone());
        })
        .unwrap();
        // The guest's own account of a failure is on its console.
        if !matches!(out.run.end, GuestEnd::Exited(0) | GuestEnd::Migrated(_)) {
            eprintln!(
                "destination console:\n{}",
                String::from_utf8_lossy(&console.lock().unwrap())
            );
        }
        out
    })
}

/// Keys for a source and a destination (and a third party) under a fresh
/// directory: `(dir, source's security, destination's security)`.
fn pinned_pair(test: &str) -> (PathBuf, Security, Security) {
    let dir = std::env::temp_dir().join(format!("vmm-mig-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for side in ["src", "dst", "other"] {
        tls::keygen(&dir.join(side), false).unwrap();
    }
    let (src, dst) = (pinned(&dir, "src", "dst"), pinned(&dir, "dst", "src"));
    (dir, src, dst)
}

/// `me`'s certificate and key, `peer`'s certificate pinned.
fn pinned(dir: &std::path::Path, me: &str, peer: &str) -> Security {
    let files = TlsFiles {
        cert: Some(dir.join(me).join("cert.pem")),
        key: Some(dir.join(me).join("key.pem")),
        peer: Some(dir.join(peer).join("cert.pem")),
        psk: None,
    };
    Security::from_files(&files, false).unwrap()
}

fn migrate_and_finish(listen: Endpoint, dst: Security, src_security: Security) {
    let cfg = touch_cfg();
    let listener = Listener::bind_with(&listen, dst).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, Duration::from_secs(1));
    // Long enough for thousands of data pages, so that the guest faults on
    // some before the push reaches them.
    let src = source(&cfg, Duration::from_millis(400));
    // The push waits 300 ms, so that the guest's first touches of migrated
    // pages are served by requests.
    let options = MigrateOptions {
        push_delay: Duration::from_millis(300),
        security: src_security,
        ..Default::default()
    };
    let summary = src.migrate(&to, &options).unwrap();
    let end = src.wait().unwrap().end;
    assert!(matches!(end, GuestEnd::Migrated(_)), "{end:?}");
    let out = dest.join().unwrap();
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    let s = &out.stats;
    // Every data page sent once: pushed or answered, never both.
    assert_eq!(
        summary.pages_pushed + summary.pages_requested,
        summary.data_pages + summary.pages_resent,
        "{summary:?}"
    );
    assert_eq!(s.duplicates, 0, "{s:?}");
    assert_eq!(s.data_pages, summary.data_pages);
    assert_eq!(
        s.pages_pushed + s.pages_answered,
        s.data_pages + s.resends,
        "{s:?}"
    );
    assert!(s.pages_requested > 0 && s.latency_p50_us > 0, "{s:?}");
    eprintln!("{summary:?}\n{s:?}");
    assert!(out.lost.is_none());
    assert!(summary.downtime_ms > 0.0 && summary.total_ms >= summary.downtime_ms);
}

#[test]
fn migrate_a_running_workload_over_unix() {
    let p = sock("unix");
    migrate_and_finish(Endpoint::Unix(p), Security::default(), Security::default());
}

#[test]
fn migrate_a_running_workload_over_tcp_with_tls_and_pinned_certificates() {
    let (dir, src, dst) = pinned_pair("tls");
    migrate_and_finish(Endpoint::Tcp("127.0.0.1:0".into()), dst, src);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn migrate_with_precopy_over_tls_with_a_pre_shared_key() {
    let dir = std::env::temp_dir().join(format!("vmm-mig-{}-psk", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    tls::keygen_psk(&key, false).unwrap();
    let files = TlsFiles {
        psk: Some(key),
        ..Default::default()
    };
    let sec = || Security::from_files(&files, false).unwrap();
    let cfg = touch_cfg();
    let listener = Listener::bind_with(&Endpoint::Tcp("127.0.0.1:0".into()), sec()).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, Duration::from_secs(1));
    let src = source(&cfg, Duration::from_millis(300));
    let options = MigrateOptions {
        precopy_rounds: 2,
        security: sec(),
        ..Default::default()
    };
    let summary = src.migrate(&to, &options).unwrap();
    assert!(matches!(src.wait().unwrap().end, GuestEnd::Migrated(_)));
    let out = dest.join().unwrap();
    eprintln!("{summary:?}\n{:?}", out.stats);
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    assert!(summary.precopy_pages > 0 && out.stats.precopy_pages == summary.precopy_pages);
    let _ = std::fs::remove_dir_all(dir);
}

/// Plain TCP without the opt-in, then a destination whose certificate is
/// not the pinned one: both refused before the source pauses (its VM never
/// stops running and finishes there), the destination refuses the source
/// too and says why when it gives up waiting.
#[test]
fn refused_destinations_leave_the_source_running() {
    let (dir, src_sec, _) = pinned_pair("refused");
    let cfg = touch_cfg();
    // The destination presents `other`'s certificate, not the `dst` one the
    // source pins: the source refuses it, and the destination hears why.
    let dst_sec = pinned(&dir, "other", "other");
    let listener = Listener::bind_with(&Endpoint::Tcp("127.0.0.1:0".into()), dst_sec).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            handlers: Default::default(),
            vm: capture_options().0,
            lost_wait: Duration::from_secs(1),
            progress: Default::default(),
            wait: Some(Duration::from_secs(4)),
        };
        migration::receive(&listener, opts, |_| {})
            .map(|_| ())
            .unwrap_err()
    });
    let src = source(&cfg, Duration::from_millis(50));
    let plain = src
        .migrate(&to, &MigrateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        plain.contains("must be TLS") && plain.contains("--insecure-plain-tcp"),
        "{plain}"
    );
    let options = MigrateOptions {
        security: src_sec,
        ..Default::default()
    };
    let e = src.migrate(&to, &options).unwrap_err().to_string();
    assert!(
        e.contains("presented certificate sha256:") && e.contains("--tls-peer"),
        "{e}"
    );
    // Never paused: it runs on and can migrate later.
    let stats = src.stats().unwrap();
    assert!(!stats.paused, "{stats:?}");
    let d = dest.join().unwrap().to_string();
    assert!(
        d.contains("no migration source connected and authenticated within 4 s")
            && d.contains("refused this side's certificate"),
        "{d}"
    );
    let run = src.wait().unwrap();
    assert_eq!(run.end, GuestEnd::Exited(0));
    assert!(matches!(verify_reports(&cfg, &run), Ok(Some(_))));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn losing_the_source_pauses_the_destination_and_the_source_resumes() {
    let cfg = touch_cfg();
    let back = sock("cut-back");
    let front = sock("cut-front");
    let listener = Listener::bind(&Endpoint::Unix(back.clone())).unwrap();
    let dest = destination(listener, Duration::from_millis(500));
    // The state and about a hundred pages, then the connection dies.
    vmm::stress::cutting_proxy(&front, &back, 400 << 10).unwrap();
    let src = source(&cfg, Duration::from_millis(50));
    let err = src
        .migrate(&Endpoint::Unix(front), &MigrateOptions::default())
        .unwrap_err();
    let out = dest.join().unwrap();
    let lost = out.lost.clone().unwrap_or_default();
    assert!(
        !lost.is_empty(),
        "the destination did not notice: {:?}",
        out.run.end
    );
    assert!(out.paused_on_loss, "{lost}");
    assert_ne!(out.run.end, GuestEnd::Exited(0));
    assert!(out.stats.pages_pushed + out.stats.pages_answered < out.stats.data_pages);
    // The source still has the whole VM: it resumes and finishes there.
    src.resume().unwrap_or_else(|e| panic!("{e} after {err}"));
    let run = src.wait().unwrap();
    assert_eq!(run.end, GuestEnd::Exited(0));
    assert!(matches!(verify_reports(&cfg, &run), Ok(Some(_))));
}

#[test]
fn migrate_with_precopy_rounds_sends_only_the_last_writes_after_the_switchover() {
    let cfg = touch_cfg();
    let listener = Listener::bind(&Endpoint::Unix(sock("pre"))).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, Duration::from_secs(1));
    let src = source(&cfg, Duration::from_millis(400));
    let options = MigrateOptions {
        precopy_rounds: 3,
        ..Default::default()
    };
    let summary = src.migrate(&to, &options).unwrap();
    let end = src.wait().unwrap().end;
    assert!(matches!(end, GuestEnd::Migrated(_)), "{end:?}");
    let out = dest.join().unwrap();
    eprintln!("{summary:?}\n{:?}", out.stats);
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    // The checksums prove every page the workload wrote arrived intact,
    // whichever round carried it.
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    let s = &out.stats;
    assert!(
        summary.precopy_rounds >= 1 && summary.precopy_rounds <= 3,
        "{summary:?}"
    );
    assert!(summary.precopy_pages > 0, "{summary:?}");
    // The workload writes throughout: the dirty log saw some of it.
    assert!(summary.precopy_dirty.iter().sum::<u64>() > 0, "{summary:?}");
    assert_eq!(s.precopy_pages, summary.precopy_pages);
    assert!(s.precopy_kept > 0 && s.precopy_kept <= s.precopy_pages, "{s:?}");
    // One dirty count per later round and one at the switchover, which is
    // the post-copy set.
    assert_eq!(
        u32::try_from(summary.precopy_dirty.len()).unwrap(),
        summary.precopy_rounds
    );
    assert_eq!(summary.precopy_dirty.last().copied(), Some(summary.data_pages));
    assert_eq!(s.data_pages, summary.data_pages);
    assert_eq!(
        summary.pages_pushed + summary.pages_requested,
        summary.data_pages + summary.pages_resent,
        "{summary:?}"
    );
    assert_eq!(s.duplicates, 0, "{s:?}");
    assert!(out.lost.is_none());
}

#[test]
fn recover_after_a_lost_connection_completes_the_migration() {
    let again = Endpoint::Unix(sock("rec-again"));
    recover_after_a_cut("rec", Security::default(), Security::default(), again);
}

/// TLS over the Unix sockets of the cut connection, then over TCP for the
/// source's return (the destination's own TLS settings by default).
#[test]
fn recover_over_tls_after_a_lost_connection() {
    let (dir, src, dst) = pinned_pair("rec-tls");
    recover_after_a_cut("rec-tls", src, dst, Endpoint::Tcp("127.0.0.1:0".into()));
    let _ = std::fs::remove_dir_all(dir);
}

fn recover_after_a_cut(name: &str, src_sec: Security, dst_sec: Security, again: Endpoint) {
    let cfg = touch_cfg();
    let back = sock(&format!("{name}-back"));
    let front = sock(&format!("{name}-front"));
    let listener = Listener::bind_with(&Endpoint::Unix(back.clone()), dst_sec).unwrap();
    let (htx, hrx) = mpsc::channel();
    let dest = destination_with_handle(listener, Duration::from_secs(30), htx);
    // The state and about a hundred pages, then the connection dies.
    vmm::stress::cutting_proxy(&front, &back, 400 << 10).unwrap();
    let src = source(&cfg, Duration::from_millis(50));
    let first = MigrateOptions {
        security: src_sec.clone(),
        ..Default::default()
    };
    let err = src.migrate(&Endpoint::Unix(front), &first).unwrap_err();
    // The source keeps its VM, paused, and says why.
    let v = src.handle().migration().unwrap();
    assert_eq!(v["status"], "paused", "{v}");
    assert!(v["error"].is_string(), "{v}");
    let dh = hrx.recv_timeout(Duration::from_secs(60)).unwrap();
    // Recover is refused until the destination has seen the loss.
    let start = Instant::now();
    let at = loop {
        match dh.recover(&again) {
            Ok(at) => break at,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "{e} (source: {err})");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(
        dh.stats().unwrap().paused,
        "the destination runs without its source"
    );
    // Listening for the source's return.
    let v = dh.migration().unwrap();
    assert_eq!(v["status"], "recovering", "{v}");
    // It may not run, nor be copied, while pages are missing.
    let e = dh.resume().unwrap_err().to_string();
    assert!(e.contains("source is lost"), "{e}");
    let e = dh
        .snapshot(
            &std::env::temp_dir().join("vmm-mig-never"),
            vmm::snapshot::AfterSnapshot::Pause,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("source is lost"), "{e}");
    let options = MigrateOptions {
        resume: true,
        security: src_sec,
        ..Default::default()
    };
    let summary = src.migrate(&at, &options).unwrap();
    assert!(summary.resumed && summary.data_pages > 0, "{summary:?}");
    // The source's run has ended (migrated): the summary is its report.
    let v = dh.migration().unwrap();
    assert_eq!(
        (v["status"].as_str(), v["recoveries"].as_u64()),
        (Some("complete"), Some(1)),
        "{v}"
    );
    let end = src.wait().unwrap().end;
    assert!(matches!(end, GuestEnd::Migrated(_)), "{end:?}");
    let out = dest.join().unwrap();
    eprintln!("{summary:?}\n{:?}", out.stats);
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    assert!(out.lost.is_none());
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    let s = &out.stats;
    assert_eq!(s.recoveries, 1);
    // Every data page arrived once, over one connection or the other.
    assert_eq!(s.duplicates, 0, "{s:?}");
    assert_eq!(
        s.pages_pushed + s.pages_answered,
        s.data_pages + s.resends,
        "{s:?}"
    );
    assert!(s.pages_pushed + s.pages_answered > summary.data_pages, "{s:?}");
}

#[test]
fn a_vm_received_with_precopy_migrates_again_at_once() {
    let cfg = touch_cfg();
    let lb = Listener::bind(&Endpoint::Unix(sock("chain-b"))).unwrap();
    let lc = Listener::bind(&Endpoint::Unix(sock("chain-c"))).unwrap();
    let (to_b, to_c) = (lb.endpoint().unwrap(), lc.endpoint().unwrap());
    let (htx, hrx) = mpsc::channel();
    let b = destination_with_handle(lb, Duration::from_secs(1), htx);
    let c = destination(lc, Duration::from_secs(1));
    let a = source(&cfg, Duration::from_millis(300));
    let options = MigrateOptions {
        precopy_rounds: 2,
        ..Default::default()
    };
    let first = a.migrate(&to_b, &options).unwrap();
    assert!(matches!(a.wait().unwrap().end, GuestEnd::Migrated(_)));
    // B moves on while it may still be placing what A pre-copied.
    let bh = hrx.recv_timeout(Duration::from_secs(60)).unwrap();
    let second = bh.migrate(&to_c, &options);
    let out_b = b.join().unwrap();
    let second = second.unwrap_or_else(|e| panic!("{e}: B ended with {:?}", out_b.run.end));
    assert!(
        matches!(out_b.run.end, GuestEnd::Migrated(_)),
        "{:?}",
        out_b.run.end
    );
    let out_c = c.join().unwrap();
    eprintln!("{first:?}\n{second:?}\n{:?}", out_c.stats);
    assert_eq!(out_c.run.end, GuestEnd::Exited(0), "{:?}", out_c.lost);
    let sum = verify_reports(&out_c.config, &out_c.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    assert!(second.precopy_pages > 0, "{second:?}");
}

/// Page-store reads in flight at the switchover complete on the destination:
/// the guest's `store` test (four reads of 1.2 s each) migrates mid-read by
/// post-copy and passes there.
#[test]
fn page_store_reads_in_flight_complete_after_a_migration() {
    let cfg = config(1, "256M", "test=store store_delay_us=1200000");
    let listener = Listener::bind(&Endpoint::Unix(sock("store"))).unwrap();
    let to = listener.endpoint().unwrap();
    let (handle_tx, _handle_rx) = mpsc::channel();
    let dest = destination_with_handle(listener, Duration::from_secs(1), handle_tx);
    let (options, console) = capture_options();
    let src = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "guest-kernel: booting");
    // Into the second of the four reads.
    std::thread::sleep(Duration::from_millis(1800));
    src.migrate(&to, &MigrateOptions::default()).unwrap();
    assert!(matches!(src.wait().unwrap().end, GuestEnd::Migrated(_)));
    let out = dest.join().unwrap();
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    assert_eq!(out.stats.page_store_reads_carried, 1, "{:?}", out.stats);
    let guest = out.run.guest_stats.unwrap();
    assert!(guest.store_reads >= 4, "{guest:?}");
}

/// Polls `h.migration()` until `until` says stop, collecting each status
/// when it changes.
fn statuses(
    h: &vmm::VmHandle,
    until: impl Fn(&serde_json::Value) -> bool,
) -> (Vec<String>, serde_json::Value) {
    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    loop {
        let v = match h.migration() {
            Ok(v) => v,
            // The `migrate` request may not have reached the VM yet.
            Err(e) if seen.is_empty() && start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => panic!("{e} after {seen:?}"),
        };
        let s = v["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        if until(&v) {
            return (seen, v);
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{seen:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `vmm ctl SOCK migration` on both sides through a whole migration:
/// setup (held: the destination does not accept yet), pre-copy rounds,
/// post-copy (held by the push delay), complete; then the final report's
/// fields.
#[test]
fn migration_status_in_every_phase() {
    let cfg = touch_cfg();
    let listener = Listener::bind(&Endpoint::Unix(sock("status"))).unwrap();
    let to = listener.endpoint().unwrap();
    let src = source(&cfg, Duration::from_millis(200));
    let sh = src.handle();
    // Before any migration there is nothing to report.
    let e = sh.migration().unwrap_err().to_string();
    assert!(e.contains("has not migrated"), "{e}");
    let mig = {
        let sh = sh.clone();
        std::thread::spawn(move || {
            let options = MigrateOptions {
                precopy_rounds: 2,
                push_delay: Duration::from_millis(500),
                ..Default::default()
            };
            sh.migrate(&to, &options)
        })
    };
    // Nobody accepts yet: the source stays in setup, its VM running.
    let (seen, _) = statuses(&sh, |v| v["status"] == "setup");
    assert_eq!(seen.last().map(String::as_str), Some("setup"));
    assert!(!sh.stats().unwrap().paused);
    let (htx, hrx) = mpsc::channel();
    let dest = destination_with_handle(listener, Duration::from_secs(5), htx);
    let dh = {
        let (seen, v) = statuses(&sh, |v| v["status"] == "post-copy");
        assert!(seen.iter().any(|s| s == "pre-copy"), "{seen:?}");
        assert!(v["precopy_pages"].as_u64().unwrap() > 0, "{v}");
        let dh = hrx.recv_timeout(Duration::from_secs(60)).unwrap();
        // The push waits: both sides are in post-copy.
        let d = dh.migration().unwrap();
        assert_eq!(
            (d["role"].as_str(), d["status"].as_str()),
            (Some("destination"), Some("post-copy")),
            "{d}"
        );
        assert_eq!(d["blocktime"]["per_vcpu_us"].as_array().unwrap().len(), 2, "{d}");
        dh
    };
    // The source's run ends with the migration: its summary is the final report.
    let summary = mig.join().unwrap().unwrap();
    let v = serde_json::to_value(&summary).unwrap();
    assert_eq!(v["precopy_round_pages"].as_array().unwrap().len(), 2, "{v}");
    let d = &v["downtime"];
    let parts: f64 = [
        "pause_ms",
        "capture_ms",
        "handoff_ms",
        "page_list_ms",
        "send_state_ms",
        "destination_ms",
    ]
    .iter()
    .map(|k| d[k].as_f64().unwrap())
    .sum();
    let total = d["total_ms"].as_f64().unwrap();
    // The parts follow each other: only the statements between two
    // measurements (a preemption on a loaded host) are not in one.
    assert!(
        total > 0.0 && parts <= total + 0.01 && parts > total * 0.95 - 0.5,
        "{d}"
    );
    let d = dh.migration().unwrap();
    assert_eq!(d["status"], "complete", "{d}");
    assert!(d["downtime_parts"]["apply_ms"].as_f64().unwrap() > 0.0, "{d}");
    assert!(d["build_ms"].as_f64().unwrap() > 0.0, "{d}");
    assert!(
        d["latency_us_log2"].is_array() && d["requests"]["count"].is_u64(),
        "{d}"
    );
    assert!(d["fault_latency"]["vcpu"]["faults"].as_u64().unwrap() > 0, "{d}");
    assert!(matches!(src.wait().unwrap().end, GuestEnd::Migrated(_)));
    let out = dest.join().unwrap();
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
}

/// Pre-copy rounds tracked with async userfaultfd write protection
/// (`--dirty-tracking uffd-wp`) instead of KVM's log: every page the
/// workload wrote arrives, the checksums are right.
#[test]
fn migrate_with_precopy_rounds_tracked_with_async_uffd_wp() {
    let cfg = touch_cfg();
    let listener = Listener::bind(&Endpoint::Unix(sock("pre-wp"))).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, Duration::from_secs(1));
    let src = source(&cfg, Duration::from_millis(400));
    let options = MigrateOptions {
        precopy_rounds: 3,
        dirty_tracking: vmm::migration::DirtyTracking::UffdWp,
        ..Default::default()
    };
    let summary = src.migrate(&to, &options).unwrap();
    let end = src.wait().unwrap().end;
    assert!(matches!(end, GuestEnd::Migrated(_)), "{end:?}");
    let out = dest.join().unwrap();
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}");
    assert!(summary.precopy_pages > 0, "{summary:?}");
    assert!(summary.precopy_dirty.iter().sum::<u64>() > 0, "{summary:?}");
    assert_eq!(summary.precopy_dirty.last().copied(), Some(summary.data_pages));
}

#[test]
fn recency_push_order_delivers_every_page_once_with_and_without_precopy() {
    for rounds in [0, 2] {
        let cfg = touch_cfg();
        let listener = Listener::bind(&Endpoint::Unix(sock(&format!("recency{rounds}")))).unwrap();
        let to = listener.endpoint().unwrap();
        let dest = destination(listener, Duration::from_secs(1));
        let src = source(&cfg, Duration::from_millis(300));
        let options = MigrateOptions {
            precopy_rounds: rounds,
            push_order: vmm::migration::PushOrder::Recency,
            ..Default::default()
        };
        let summary = src.migrate(&to, &options).unwrap();
        assert!(matches!(src.wait().unwrap().end, GuestEnd::Migrated(_)));
        let out = dest.join().unwrap();
        assert_eq!(out.run.end, GuestEnd::Exited(0), "{:?}", out.lost);
        let sum = verify_reports(&out.config, &out.run);
        assert!(matches!(sum, Ok(Some(_))), "rounds {rounds}: {sum:?}");
        let s = &out.stats;
        assert_eq!(
            summary.pages_pushed + summary.pages_requested,
            summary.data_pages + summary.pages_resent,
            "rounds {rounds}: {summary:?}"
        );
        assert_eq!(s.duplicates, 0, "rounds {rounds}: {s:?}");
        assert_eq!(s.data_pages, summary.data_pages);
        assert_eq!(
            s.pages_pushed + s.pages_answered,
            s.data_pages + s.resends,
            "{s:?}"
        );
    }
}
