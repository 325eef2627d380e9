//! The `vmm` process and signals: SIGTERM/SIGINT shut the VM down cleanly while
//! guest pages are being faulted in; SIGSTOP/SIGCONT of the whole process loses
//! nothing.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Starts a long lazily backed workload and waits until the guest has booted.
fn start(pages: u32) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(VMM)
        .args([
            "run",
            "--vcpus",
            "2",
            "--mem",
            "512M",
            "--mem-backend",
            "zero",
            "--fault-around",
            "0",
        ])
        .arg("--cmdline")
        .arg(format!("workload=touch pages={pages} pattern=rand"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.is_empty() || !line.contains("free frames") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "vmm ended before the guest booted"
        );
    }
    (child, out)
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn rest(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(out, &mut s).unwrap();
    s
}

#[test]
fn sigterm_shuts_down_cleanly_while_faults_are_pending() {
    let (mut child, _out) = start(60000);
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("shut down cleanly on signal 15"), "{err}");
}

#[test]
fn sigint_shuts_down_cleanly() {
    let (mut child, _out) = start(60000);
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
}

#[test]
fn sigstop_and_sigcont_lose_nothing() {
    let (mut child, mut out) = start(6000);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(40));
        signal(&child, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(40));
        signal(&child, libc::SIGCONT);
    }
    let text = rest(&mut out);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("verified on the host"), "{text}");
}

/// Waits for `child` at most `limit`; kills it and fails if it takes longer.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not end within {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signal_ends_a_destination_waiting_for_its_source_and_removes_its_socket() {
    let sock = std::env::temp_dir().join(format!("vmm-sig-recv-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(VMM)
        .args(["receive", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&child, libc::SIGTERM);
    let status = wait_within(&mut child, Duration::from_secs(10), "vmm receive");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!sock.exists(), "the socket file was left behind");
}

#[test]
fn a_signal_ends_a_client_waiting_for_an_answer() {
    // A "VMM" that accepts and never answers.
    let sock = std::env::temp_dir().join(format!("vmm-sig-ctl-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut child = Command::new(VMM)
        .arg("ctl")
        .arg(&sock)
        .arg("stats")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_conn, _) = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, libc::SIGINT);
    let status = wait_within(&mut child, Duration::from_secs(10), "vmm ctl");
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_silent_control_socket_times_out_with_a_clear_error() {
    let sock = std::env::temp_dir().join(format!("vmm-ctl-silent-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut child = Command::new(VMM)
        .arg("ctl")
        .arg(&sock)
        .args(["--timeout", "0.5", "stats"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_conn, _) = listener.accept().unwrap();
    let status = wait_within(&mut child, Duration::from_secs(10), "vmm ctl --timeout 0.5");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no answer within"), "{err}");
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_signal_ends_a_stress_session_with_its_report() {
    let mut child = Command::new(VMM)
        .args(["stress", "--seconds", "300", "--seed", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Into the first runs.
    std::thread::sleep(Duration::from_millis(3000));
    signal(&child, libc::SIGTERM);
    let status = wait_within(&mut child, Duration::from_secs(30), "vmm stress");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{out}");
    assert!(out.contains("interrupted by signal 15"), "{out}");
    assert!(out.contains("integrity errors: 0"), "{out}");
}
