//! Migration security as processes: `vmm keygen` and a TLS migration
//! between `vmm run` and `vmm receive` as the README tells it; plain TCP
//! refused without the opt-in; a taken port; `vmm receive --timeout` while
//! no source comes; Unix peers of another user refused on both ends.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn base(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-mcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `vmm run` of a 2-vCPU touch workload with a control socket, once it runs.
fn touch_source(sock: &Path) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(VMM)
        .args(["run", "--vcpus", "2", "--mem", "256M", "--timeout", "120"])
        .args(["--cmdline", "workload=touch pages=20000 pattern=rand"])
        .arg("--control")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("touch: cpu 0 start") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "vmm ended early");
    }
    wait_for(|| sock.exists(), "the control socket");
    (child, out)
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "no {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A TCP port nobody listens on (for a moment).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `vmm receive` with `args`, once it listens (its first stderr line).
fn receiver(args: &[&str]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(VMM)
        .arg("receive")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    assert!(err.read_line(&mut line).unwrap() > 0, "vmm receive ended early");
    assert!(line.contains("waiting for a migration on"), "{line}");
    (child, err)
}

/// The rest of a child's stderr after `err`, and its exit code.
fn finish(child: Child, mut err: BufReader<std::process::ChildStderr>) -> (Option<i32>, String, String) {
    let mut e = String::new();
    err.read_to_string(&mut e).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), text(&out.stdout), e)
}

#[test]
fn keygen_then_a_tls_migration_between_processes() {
    let dir = base("tls");
    for side in ["src", "dst"] {
        let o = vmm(&["keygen", "--out", dir.join(side).to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("fingerprint sha256:"),
            "{}",
            text(&o.stdout)
        );
        let mode = std::fs::metadata(dir.join(side).join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Again: refused, nothing replaced.
    let o = vmm(&["keygen", "--out", dir.join("src").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    assert!(text(&o.stderr).contains("exists"), "{}", text(&o.stderr));

    let port = free_port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let (dst, dst_err) = receiver(&[
        "--listen",
        &addr,
        "--timeout",
        "120",
        "--tls-cert",
        &d("dst/cert.pem"),
        "--tls-key",
        &d("dst/key.pem"),
        "--tls-peer",
        &d("src/cert.pem"),
    ]);
    let src_sock = dir.join("src.sock");
    let (src, mut src_out) = touch_source(&src_sock);
    // Relative paths: `vmm ctl` makes them absolute for the VMM.
    let o = Command::new(VMM)
        .current_dir(&dir)
        .arg("ctl")
        .arg(&src_sock)
        .args(["migrate", "--to", &addr, "--precopy-rounds", "2"])
        .args(["--tls-cert", "src/cert.pem", "--tls-key", "src/key.pem"])
        .args(["--tls-peer", "dst/cert.pem"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{} {}", text(&o.stdout), text(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["precopy_pages"].as_u64().unwrap() > 0, "{summary}");
    let mut s = String::new();
    src_out.read_to_string(&mut s).unwrap();
    assert_eq!(src.wait_with_output().unwrap().status.code(), Some(0), "{s}");
    assert!(s.contains("the VM migrated"), "{s}");
    let (code, out, err) = finish(dst, dst_err);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("verified on the host"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn receive_refuses_plain_tcp_a_taken_port_and_gives_up_at_its_timeout() {
    let o = vmm(&["receive", "--listen", "tcp:127.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(64));
    let e = text(&o.stderr);
    assert!(
        e.contains("must be TLS") && e.contains("--insecure-plain-tcp"),
        "{e}"
    );

    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = format!("tcp:{}", squatter.local_addr().unwrap());
    let o = vmm(&["receive", "--listen", &at, "--insecure-plain-tcp"]);
    assert_eq!(o.status.code(), Some(64));
    let e = text(&o.stderr);
    assert!(
        e.contains(&format!("address in use: another process listens on {at}")),
        "{e}"
    );
    drop(squatter);

    // Nobody comes: exit 11 at the timeout, not a wait forever.
    let dir = base("timeout");
    let listen = format!("unix:{}", dir.join("m.sock").display());
    let start = Instant::now();
    let o = vmm(&["receive", "--listen", &listen, "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o.stderr));
    assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
    let e = text(&o.stderr);
    assert!(
        e.contains("no migration source connected and authenticated within 2 s"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A copy of the binary that another user can run.
fn binary_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("vmm");
    std::fs::copy(VMM, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

fn as_nobody(bin: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin);
    c
}

#[test]
fn unix_peers_of_another_user_are_refused_on_both_ends() {
    assert!(
        is_root(),
        "runs a peer as another user (uid 65534): needs root (CI runs as root)"
    );
    let dir = base("uid");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let copy = binary_copy(&dir);

    // A destination (this user) and a client of uid 65534 on its socket.
    let sock = dir.join("dst.sock");
    let listen = format!("unix:{}", sock.display());
    let (dst, dst_err) = receiver(&["--listen", &listen, "--timeout", "3"]);
    // Writable by all: only the credential check stands in the way.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = as_nobody(&copy)
        .arg("ctl")
        .arg(&sock)
        .arg("stats")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let (code, _, err) = finish(dst, dst_err);
    assert_eq!(code, Some(11), "{err}");
    assert!(
        err.contains("runs as uid 65534") && err.contains("refused"),
        "{err}"
    );

    // A destination of uid 65534, and a source of this user migrating to it.
    let theirs = dir.join("nobody.sock");
    let mut nobody = as_nobody(&copy)
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", theirs.display()))
        .args(["--timeout", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| theirs.exists(), "the other user's socket");
    let src_sock = dir.join("src.sock");
    let (src, mut src_out) = touch_source(&src_sock);
    let o = Command::new(VMM)
        .arg("ctl")
        .arg(&src_sock)
        .args(["migrate", "--to", &format!("unix:{}", theirs.display())])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("runs as uid 65534") && e.contains("same user"), "{e}");
    // The source never paused: its workload finishes there.
    let mut s = String::new();
    src_out.read_to_string(&mut s).unwrap();
    assert_eq!(src.wait_with_output().unwrap().status.code(), Some(0), "{s}");
    assert!(s.contains("verified on the host"), "{s}");
    let _ = nobody.kill();
    let _ = nobody.wait();
    let _ = std::fs::remove_dir_all(dir);
}
