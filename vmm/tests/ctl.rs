//! `vmm run --control`, `vmm ctl` and `vmm restore` as processes: pause,
//! resume, stats, a hostile client, a snapshot that stops the run, and a lazy
//! restore that finishes the workload with the right checksum.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn ctl(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(VMM).arg("ctl").arg(sock).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn control_socket_snapshot_and_restore() {
    let base = std::env::temp_dir().join(format!("vmm-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("ctl.sock");
    let snap = base.join("snap");
    let mut child = Command::new(VMM)
        .args(["run", "--vcpus", "2", "--mem", "256M", "--timeout", "120"])
        .arg("--cmdline")
        .arg("workload=touch pages=20000 pattern=rand")
        .arg("--control")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("touch: cpu 0 start") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "vmm ended early");
    }
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }

    let (ok, stdout, err) = ctl(&sock, &["stats"]);
    assert!(ok && stdout.contains("\"paused\": false"), "{stdout} {err}");
    let (ok, stdout, err) = ctl(&sock, &["pause"]);
    assert!(ok && stdout.contains("Paused"), "{stdout} {err}");
    let (ok, _, err) = ctl(&sock, &["pause"]);
    assert!(!ok && err.contains("already paused"), "{err}");

    // A hostile client gets errors, and the VMM keeps serving.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"cmd\":\"reboot\"}\n\xff\xfe\nnull\n{\"cmd\":\"stats\"}\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut answers = Vec::new();
    for _ in 0..4 {
        let mut a = String::new();
        r.read_line(&mut a).unwrap();
        answers.push(a);
    }
    assert!(answers[..3].iter().all(|a| a.starts_with("{\"ok\":false,\"error\":")), "{answers:?}");
    assert!(answers[3].starts_with("{\"ok\":true"), "{answers:?}");
    s.write_all(&vec![b'x'; 70 * 1024]).unwrap();
    s.write_all(b"\n").unwrap();
    let mut a = String::new();
    r.read_line(&mut a).unwrap();
    assert!(a.contains("longer than"), "{a}");
    drop(s);

    let (ok, _, err) = ctl(&sock, &["resume"]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = ctl(&sock, &["snapshot", "--to", snap.to_str().unwrap(), "--stop"]);
    assert!(ok && stdout.contains("memory_bytes"), "{stdout} {err}");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(14), "a snapshot with --stop ends the run");
    assert!(!sock.exists(), "the socket is removed at the end");

    let out = Command::new(VMM)
        .args(["restore", "--lazy", "--prefetch", "--timeout", "120", "--from"])
        .arg(&snap)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verified on the host"), "{stdout}");

    let out = Command::new(VMM)
        .args(["restore", "--from"])
        .arg(base.join("nothing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a (complete) snapshot"));
    let _ = std::fs::remove_dir_all(&base);
}
