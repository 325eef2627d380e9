//! Post-copy live migration on real KVM, loopback only: a running workload
//! migrates over a Unix socket and over TCP and finishes on the destination
//! with the right checksums, every data page sent once; a connection cut mid
//! post-copy pauses the destination with an error and the source resumes.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm::migration::{self, Endpoint, Listener, ReceiveOptions};
use vmm::vm::verify_reports;
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
    std::thread::spawn(move || {
        let (vm, _console) = capture_options();
        let opts = ReceiveOptions {
            vm: vmm::VmOptions {
                timeout: Some(Duration::from_secs(120)),
                ..vm
            },
            lost_wait,
        };
        migration::receive(&listener, opts, |_| {}).unwrap()
    })
}

fn migrate_and_finish(listen: Endpoint) {
    let cfg = touch_cfg();
    let listener = Listener::bind(&listen).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, Duration::from_secs(1));
    // Long enough for thousands of data pages, so that the guest faults on
    // some before the push reaches them.
    let src = source(&cfg, Duration::from_millis(400));
    // The push waits 300 ms, so that the guest's first touches of migrated
    // pages are served by requests.
    let summary = src.migrate(&to, Duration::from_millis(300)).unwrap();
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
    migrate_and_finish(Endpoint::Unix(p));
}

#[test]
fn migrate_a_running_workload_over_tcp() {
    migrate_and_finish(Endpoint::Tcp("127.0.0.1:0".into()));
}

/// Forwards between one client of `front` and `back`, and cuts both ways
/// once `limit` bytes went from the client to `back`.
fn cutting_proxy(front: PathBuf, back: Endpoint, limit: usize) {
    let l = UnixListener::bind(&front).unwrap();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let Endpoint::Unix(b) = back else { panic!() };
        let mut b = UnixStream::connect(b).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back_to_front = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = vec![0u8; 4096];
        let mut sent = 0;
        while sent < limit {
            let n = a.read(&mut buf).unwrap_or(0);
            if n == 0 || b.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = back_to_front.join();
        let _ = std::fs::remove_file(&front);
    });
}

#[test]
fn losing_the_source_pauses_the_destination_and_the_source_resumes() {
    let cfg = touch_cfg();
    let back = sock("cut-back");
    let front = sock("cut-front");
    let listener = Listener::bind(&Endpoint::Unix(back.clone())).unwrap();
    let dest = destination(listener, Duration::from_millis(500));
    // The state and about a hundred pages, then the connection dies.
    cutting_proxy(front.clone(), Endpoint::Unix(back), 400 << 10);
    let src = source(&cfg, Duration::from_millis(50));
    let err = src.migrate(&Endpoint::Unix(front), Duration::ZERO).unwrap_err();
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
