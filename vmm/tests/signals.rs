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
