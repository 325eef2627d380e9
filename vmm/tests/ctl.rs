//! `vmm run --control`, `vmm ctl` and `vmm restore` as processes: pause,
//! resume, stats, a hostile client, a snapshot that stops the run, and a lazy
//! restore that finishes the workload with the right checksum; a migration
//! with pre-copy rounds between two processes; restores served by external
//! page-fault handlers, one of which dies (the VM pauses, `vmm ctl
//! attach-handler` gives it a new one; without one the grace ends the run
//! with exit code 13).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn ctl(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vmm run` of a 2-vCPU touch workload with a control socket at `sock`,
/// once its workload runs: the child, its stdout and the line it stopped at.
fn touch_source(sock: &Path, stderr: Stdio) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new(VMM)
        .args(["run", "--vcpus", "2", "--mem", "256M", "--timeout", "120"])
        .arg("--cmdline")
        .arg("workload=touch pages=20000 pattern=rand")
        .arg("--control")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("touch: cpu 0 start") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "vmm ended early");
    }
    wait_for_file(sock);
    (child, out, line)
}

/// `vmm restore --from snap` with `extra` flags finishes the workload with
/// the checksums verified on the host.
fn restore_verified(snap: &Path, extra: &[&str]) {
    let out = Command::new(VMM)
        .args(["restore", "--timeout", "120", "--from"])
        .arg(snap)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified on the host"), "{stdout}");
}

#[test]
fn control_socket_snapshot_and_restore() {
    let base = std::env::temp_dir().join(format!("vmm-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("ctl.sock");
    let snap = base.join("snap");
    let (mut child, _out, _) = touch_source(&sock, Stdio::piped());

    let (ok, stdout, err) = ctl(&sock, &["stats"]);
    assert!(ok && stdout.contains("\"paused\": false"), "{stdout} {err}");
    let (ok, stdout, err) = ctl(&sock, &["pause"]);
    assert!(ok && stdout.contains("Paused"), "{stdout} {err}");
    let (ok, _, err) = ctl(&sock, &["pause"]);
    assert!(!ok && err.contains("already paused"), "{err}");

    // A hostile client gets errors, and the VMM keeps serving.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"cmd\":\"reboot\"}\n\xff\xfe\nnull\n{\"cmd\":\"stats\"}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut answers = Vec::new();
    for _ in 0..4 {
        let mut a = String::new();
        r.read_line(&mut a).unwrap();
        answers.push(a);
    }
    assert!(
        answers[..3]
            .iter()
            .all(|a| a.starts_with("{\"ok\":false,\"error\":")),
        "{answers:?}"
    );
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

    restore_verified(&snap, &["--lazy", "--prefetch"]);

    let out = Command::new(VMM)
        .args(["restore", "--from"])
        .arg(base.join("nothing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a (complete) snapshot"));
    let _ = std::fs::remove_dir_all(&base);
}

/// A minimal external page-fault handler written against Firecracker's
/// handshake: receive the JSON mappings and the userfaultfd, then answer each
/// PAGEFAULT with UFFDIO_COPY from the memory file at `offset + (addr - base)`.
fn firecracker_style_handler(listener: std::os::unix::net::UnixListener, memfile: std::path::PathBuf) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (stream, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, uffd) = stream.recv_with_fd(&mut buf).unwrap();
    let uffd = uffd.expect("the userfaultfd comes with the mappings");
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&buf[..n]).unwrap();
    let maps: Vec<(u64, u64, u64)> = maps
        .iter()
        .map(|m| {
            assert_eq!(m["page_size"].as_u64(), Some(4096));
            (
                m["base_host_virt_addr"].as_u64().unwrap(),
                m["size"].as_u64().unwrap(),
                m["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    let mem = std::fs::File::open(memfile).unwrap();
    let mut page = vec![0u8; 4096];
    let mut served = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 2000) };
        if r == 0 {
            return served; // the VM ended (or is idle): done
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
        if n != 32 || msg[0] != 0x12 {
            continue;
        }
        let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap()) & !4095;
        let &(base, _, offset) = maps.iter().find(|&&(b, s, _)| addr >= b && addr < b + s).unwrap();
        page.fill(0);
        let _ = mem.read_at(&mut page, offset + (addr - base));
        #[repr(C)]
        struct UffdioCopy {
            dst: u64,
            src: u64,
            len: u64,
            mode: u64,
            copy: i64,
        }
        let mut copy = UffdioCopy {
            dst: addr,
            src: page.as_ptr() as u64,
            len: 4096,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY with a valid struct; `page` outlives the call.
        unsafe { libc::ioctl(uffd.as_raw_fd(), 0xC028_AA03, &mut copy) };
        served += 1;
    }
}

#[test]
fn external_firecracker_style_handler_serves_a_restore() {
    let base = std::env::temp_dir().join(format!("vmm-uffd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let sock = base.join("ctl.sock");
    let snap = base.join("snap");
    let mut child = Command::new(VMM)
        .args(["run", "--vcpus", "2", "--mem", "256M", "--timeout", "120"])
        .arg("--cmdline")
        .arg("workload=touch pages=6000 pattern=rand")
        .arg("--control")
        .arg(&sock)
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
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, _, err) = ctl(&sock, &["snapshot", "--to", snap.to_str().unwrap(), "--stop"]);
    assert!(ok, "{err}");
    assert_eq!(child.wait().unwrap().code(), Some(14));

    let handler_sock = base.join("uffd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&handler_sock).unwrap();
    let memfile = snap.join("memory.bin");
    let handler = std::thread::spawn(move || firecracker_style_handler(listener, memfile));
    let backend = format!("uffd:{}", handler_sock.display());
    restore_verified(&snap, &["--mem-backend", &backend]);
    let served = handler.join().unwrap();
    assert!(served > 100, "the external handler served {served} faults");

    let out = Command::new(VMM)
        .args(["restore", "--from"])
        .arg(&snap)
        .args(["--mem-backend", "uffd:/nonexistent/sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("start the handler first"));
    let _ = std::fs::remove_dir_all(&base);
}

/// A page-fault handler on a thread of the test: accepts one connection,
/// serves faults from the memory file (packed regions) until the VMM closes
/// the connection, or, with `limit`, dies (drops the connection and the
/// userfaultfd) after that many faults. Returns the faults served.
fn thread_handler(
    listener: std::os::unix::net::UnixListener,
    memfile: std::path::PathBuf,
    limit: Option<u64>,
) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (stream, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 1024];
    let (n, uffd) = stream.recv_with_fd(&mut buf).unwrap();
    let uffd = uffd.expect("the userfaultfd comes with the mappings");
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&buf[..n]).unwrap();
    let maps: Vec<(u64, u64, u64)> = maps
        .iter()
        .map(|m| {
            assert_eq!(m["page_size_kib"].as_u64(), Some(4096), "the page size in bytes");
            (
                m["base_host_virt_addr"].as_u64().unwrap(),
                m["size"].as_u64().unwrap(),
                m["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    let mem = std::fs::File::open(memfile).unwrap();
    assert_eq!(
        maps.iter().map(|m| m.1).sum::<u64>(),
        mem.metadata().unwrap().len()
    );
    let mut page = vec![0u8; 4096];
    let mut served = 0;
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(pfd.as_mut_ptr(), 2, 60_000) };
        if pfd[1].revents != 0 {
            return served; // the VM ended: the connection closed
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
        if n != 32 || msg[0] != 0x12 {
            continue;
        }
        let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap()) & !4095;
        let &(base, _, offset) = maps.iter().find(|&&(b, s, _)| addr >= b && addr < b + s).unwrap();
        let _ = mem.read_at(&mut page, offset + (addr - base));
        #[repr(C)]
        struct UffdioCopy {
            dst: u64,
            src: u64,
            len: u64,
            mode: u64,
            copy: i64,
        }
        let mut copy = UffdioCopy {
            dst: addr,
            src: page.as_ptr() as u64,
            len: 4096,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY with a valid struct; `page` outlives the call.
        unsafe { libc::ioctl(uffd.as_raw_fd(), 0xC028_AA03, &mut copy) };
        served += 1;
        if limit.is_some_and(|l| served >= l) {
            return served; // dies: the connection and the userfaultfd close
        }
    }
}

/// Polls `vmm ctl sock stats` until the run state is `state`.
fn wait_for_state(sock: &Path, state: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (ok, stdout, err) = ctl(sock, &["stats"]);
        if ok {
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            if v["state"] == state {
                return v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never {state}: {stdout} {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_handler_pauses_the_vm_attach_handler_resumes_it_and_the_grace_ends_it() {
    let base = std::env::temp_dir().join(format!("vmm-uffd-dead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let src_sock = base.join("src.sock");
    let snap = base.join("snap");
    let (mut child, _out, _) = touch_source(&src_sock, Stdio::null());
    let (ok, _, err) = ctl(&src_sock, &["snapshot", "--to", snap.to_str().unwrap(), "--stop"]);
    assert!(ok, "{err}");
    assert_eq!(child.wait().unwrap().code(), Some(14));
    let memfile = snap.join("memory.bin");
    let restore = |handler: &Path, ctl_sock: &Path, grace: &str| {
        Command::new(VMM)
            .args(["restore", "--timeout", "120", "--from"])
            .arg(&snap)
            .arg("--mem-backend")
            .arg(format!("uffd:{}", handler.display()))
            .args(["--handler-grace", grace, "--control"])
            .arg(ctl_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // The handler dies after 200 faults: the VM pauses, says why, answers at once.
    let (first, ctl_sock) = (base.join("first.sock"), base.join("ctl.sock"));
    let l = std::os::unix::net::UnixListener::bind(&first).unwrap();
    let m = memfile.clone();
    let dying = std::thread::spawn(move || thread_handler(l, m, Some(200)));
    let vm = restore(&first, &ctl_sock, "60");
    wait_for_file(&ctl_sock);
    let stats = wait_for_state(&ctl_sock, "handler_lost");
    assert_eq!(dying.join().unwrap(), 200);
    let msg = stats["memory_fault"].as_str().unwrap().to_string();
    assert!(msg.contains("is gone") && msg.contains("attach-handler"), "{msg}");
    assert!(stats["handler"]["lost"].is_string(), "{stats}");
    let t = Instant::now();
    let (ok, _, err) = ctl(&ctl_sock, &["pause"]);
    assert!(!ok && err.contains("already paused"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "pause took {:?}",
        t.elapsed()
    );

    // A new handler: attach it; the guest finishes with verified checksums.
    let second = base.join("second.sock");
    let l = std::os::unix::net::UnixListener::bind(&second).unwrap();
    let m = memfile.clone();
    let serving = std::thread::spawn(move || thread_handler(l, m, None));
    let (ok, stdout, err) = ctl(&ctl_sock, &["attach-handler", second.to_str().unwrap()]);
    assert!(ok && stdout.contains("\"resumed\": true"), "{stdout} {err}");
    let out = vm.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    assert!(stdout.contains("verified on the host"), "{stdout}");
    assert!(
        stderr.contains("memory served by the external page-fault handler"),
        "{stderr}"
    );
    assert!(!stderr.contains("eager memory"), "{stderr}");
    assert!(serving.join().unwrap() > 0);

    // Nobody attaches: the run ends after the grace with exit code 13.
    let (third, ctl_sock) = (base.join("third.sock"), base.join("ctl2.sock"));
    let l = std::os::unix::net::UnixListener::bind(&third).unwrap();
    let m = memfile.clone();
    let dying = std::thread::spawn(move || thread_handler(l, m, Some(100)));
    let t = Instant::now();
    let out = restore(&third, &ctl_sock, "1").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "{stderr}");
    assert!(
        stderr.contains("is gone") && stderr.contains("no page-fault handler was attached within"),
        "{stderr}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(dying.join().unwrap(), 100);
    let _ = std::fs::remove_dir_all(&base);
}

/// Waits until `path` exists.
fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no {}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ctl_migrate_with_precopy_rounds_between_two_processes() {
    let base = std::env::temp_dir().join(format!("vmm-ctl-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (src_sock, dst, dst_sock) = (
        base.join("src.sock"),
        base.join("dst.sock"),
        base.join("dst-ctl.sock"),
    );
    let dst_addr = format!("unix:{}", dst.display());
    let receiver = Command::new(VMM)
        .args(["receive", "--timeout", "120", "--listen", &dst_addr, "--control"])
        .arg(&dst_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (source, mut out, line) = touch_source(&src_sock, Stdio::piped());
    wait_for_file(&dst);

    // Requests that do not fit this VM are errors that say why.
    let (ok, _, err) = ctl(&src_sock, &["recover", "--from", "unix:/nonexistent/x.sock"]);
    assert!(!ok && err.contains("not the destination of a migration"), "{err}");
    let (ok, _, err) = ctl(&src_sock, &["migrate", "--to", &dst_addr, "--resume"]);
    assert!(!ok && err.contains("no interrupted post-copy"), "{err}");

    let (ok, stdout, err) = ctl(
        &src_sock,
        &["migrate", "--to", &dst_addr, "--precopy-rounds", "2"],
    );
    assert!(ok, "{stdout} {err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(summary["precopy_pages"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["precopy_rounds"].as_u64().unwrap() >= 1, "{summary}");
    let src_out = source.wait_with_output().unwrap();
    let mut src_stdout = line;
    out.read_to_string(&mut src_stdout).unwrap();
    assert_eq!(src_out.status.code(), Some(0), "{src_stdout}");
    assert!(src_stdout.contains("the VM migrated"), "{src_stdout}");

    let dst_out = receiver.wait_with_output().unwrap();
    let dst_stdout = String::from_utf8_lossy(&dst_out.stdout);
    assert_eq!(
        dst_out.status.code(),
        Some(0),
        "{dst_stdout} {}",
        String::from_utf8_lossy(&dst_out.stderr)
    );
    assert!(dst_stdout.contains("verified on the host"), "{dst_stdout}");
    assert!(dst_stdout.contains("pre-copy pages"), "{dst_stdout}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_killed_source_leaves_the_destination_paused_and_it_ends_with_13() {
    let base = std::env::temp_dir().join(format!("vmm-ctl-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (src_sock, dst) = (base.join("src.sock"), base.join("dst.sock"));
    let dst_addr = format!("unix:{}", dst.display());
    let receiver = Command::new(VMM)
        .args([
            "receive",
            "--timeout",
            "120",
            "--lost-wait",
            "1",
            "--listen",
            &dst_addr,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut source, _out, _) = touch_source(&src_sock, Stdio::null());
    wait_for_file(&dst);
    // The push waits 10 s: the destination runs on demand paging when the
    // source dies.
    let migrate = Command::new(VMM)
        .arg("ctl")
        .arg(&src_sock)
        .args(["migrate", "--to", &dst_addr, "--push-delay-ms", "10000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    source.kill().unwrap();
    let _ = source.wait();
    let _ = migrate.wait_with_output();
    let dst_out = receiver.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&dst_out.stderr);
    assert_eq!(dst_out.status.code(), Some(13), "{stderr}");
    assert!(
        stderr.contains("source was lost") && stderr.contains("no missing page was zero-filled"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&base);
}
