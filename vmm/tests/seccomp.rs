//! The sandbox end to end (`docs/seccomp.md`): a vCPU thread that makes a
//! forbidden system call stops the VMM with a message naming the thread,
//! its class and the call (`--seccomp kill`), or goes on (`log`); every
//! thread of a running `vmm` has its filter, the main thread included;
//! `--seccomp` and the config file's `seccomp` choose the mode.
//!
//! The forbidden call is made through the library's `RunningVm::run_on_vcpu`
//! in a child process (this test binary run again), since `kill` ends the
//! whole process.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{KernelSource, MemoryConfig, SeccompMode, VmConfig, VmOptions};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

/// Runs this test binary again as the child of `vcpu_child`, in `mode`.
fn run_child(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "vcpu_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env_remove("VMM_SECCOMP")
        .output()
        .unwrap()
}

/// Not a test by itself: in the child process, boots a VM sandboxed in the
/// mode asked for and makes vCPU 0 open an IPv4 socket, which no vCPU may.
#[test]
fn vcpu_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus: 1,
        mem_size: 256 << 20,
        cmdline: "workload=touch pages=50000 pattern=rand".into(),
        memory: MemoryConfig::default(),
    };
    let options = VmOptions {
        serial: devices::serial::SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
        timeout: Some(Duration::from_secs(60)),
        seccomp: mode.parse().unwrap(),
        ..VmOptions::default()
    };
    let vm = vmm::Vm::new(&cfg, options).unwrap().start().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    vm.run_on_vcpu(
        0,
        Box::new(move |_| {
            // SAFETY: socket takes no pointer.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let _ = tx.send(fd);
        }),
    )
    .unwrap();
    let fd = rx.recv().unwrap();
    println!("the vCPU's socket call returned {fd}");
    vm.stop();
    let _ = vm.wait();
    println!("child done");
}

#[test]
fn a_vcpu_thread_making_a_forbidden_call_stops_the_vmm_naming_it() {
    let out = run_child("kill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(vmm::EXIT_SECCOMP), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "vmm: error: seccomp: thread `vcpu0` (class vcpu) made the forbidden system call socket (41); the VMM stops (exit code 159)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("--seccomp log"), "{stderr}");
    // The call was never made, and nothing ran after it.
    assert!(
        !stdout.contains("returned") && !stdout.contains("child done"),
        "{stdout}"
    );
}

#[test]
fn in_log_mode_the_forbidden_call_goes_through() {
    let out = run_child("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fd: i32 = stdout
        .lines()
        .find_map(|l| l.split_once("the vCPU's socket call returned ").map(|(_, fd)| fd))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(fd >= 0, "{stdout}");
    assert!(stdout.contains("child done"), "{stdout}");
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-seccomp-{}-{name}", std::process::id()))
}

/// `vmm run` with lazily served memory, a control socket and `extra` flags,
/// once its workload runs (the VMM's every kind of thread exists then).
fn start(sock: &Path, extra: &[&str]) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(VMM)
        .args([
            "run",
            "--vcpus",
            "2",
            "--mem",
            "512M",
            "--mem-backend",
            "zero",
            "--timeout",
            "60",
        ])
        .args(["--cmdline", "workload=touch pages=60000 pattern=rand"])
        .arg("--control")
        .arg(sock)
        .args(extra)
        .env_remove("VMM_SECCOMP")
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
    // Keep draining the console so the VMM never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Each thread of process `pid`: its name and `Seccomp:` field (0 none, 2 filters).
fn threads(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("status")),
        ) else {
            continue; // ended meanwhile
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        out.push((comm.trim().to_string(), mode));
    }
    out
}

/// The threads of a running `vmm run` with a control client connected
/// (once the main thread has its filter, if `sandboxed`).
fn threads_of_a_run(name: &str, extra: &[&str], sandboxed: bool) -> Vec<(String, u32)> {
    let sock = temp(name);
    let mut child = start(&sock, extra);
    // A client connection gets its thread. The socket file exists from the
    // VMM's bind, a moment before its listen (refused meanwhile).
    let start_connect = Instant::now();
    let mut client = loop {
        match UnixStream::connect(&sock) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start_connect.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => break r.unwrap(),
        }
    };
    client.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
    let mut answer = String::new();
    BufReader::new(client.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.contains("\"ok\":true"), "{answer}");
    // The main thread sandboxes itself once the VM runs: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = threads(child.id());
    while sandboxed && seen.iter().any(|(n, m)| n == "vmm" && *m == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        seen = threads(child.id());
    }
    client.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
    drop(client);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    seen
}

#[test]
fn every_thread_of_a_running_vmm_is_sandboxed() {
    // Two fault-handler threads (a pool), whatever the host's CPU count.
    let seen = threads_of_a_run("all", &["--fault-handlers", "2"], true);
    for kind in [
        "vmm",
        "vcpu0",
        "vcpu1",
        "uffd-handler",
        "uffd-handler-1",
        "page-store",
        "vmm-controller",
        "vmm-control",
        "vmm-control-cli",
        "vmm-signals",
    ] {
        assert!(
            seen.iter().any(|(n, _)| n == kind),
            "no {kind} thread in {seen:?}"
        );
    }
    for (name, mode) in &seen {
        assert_eq!(*mode, 2, "thread {name} has no seccomp filter: {seen:?}");
    }
}

#[test]
fn the_flag_and_the_config_file_choose_the_mode() {
    let off = temp("off.toml");
    std::fs::write(&off, "seccomp = \"off\"\n").unwrap();
    let cfg = off.to_str().unwrap();
    let seen = threads_of_a_run("file-off", &["--config", cfg], false);
    assert!(seen.iter().all(|(_, m)| *m == 0), "{seen:?}");
    // The flag wins over the file.
    let seen = threads_of_a_run("flag-log", &["--config", cfg, "--seccomp", "log"], true);
    assert!(seen.iter().all(|(_, m)| *m == 2), "{seen:?}");
    let _ = std::fs::remove_file(&off);
}

#[test]
fn bad_modes_are_refused_with_the_choices() {
    let out = Command::new(VMM)
        .args(["run", "--seccomp", "strict"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A bad command line is the VMM's configuration error (64).
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid seccomp mode `strict`: use `kill`"),
        "{stderr}"
    );
    let out = Command::new(VMM)
        .arg("run")
        .env("VMM_SECCOMP", "strict")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(vmm::EXIT_VMM_ERROR), "{stderr}");
    assert!(
        stderr.contains("VMM_SECCOMP: invalid seccomp mode `strict`"),
        "{stderr}"
    );
    let bad = temp("bad.toml");
    std::fs::write(&bad, "seccomp = \"strict\"\n").unwrap();
    let out = Command::new(VMM)
        .arg("run")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(vmm::EXIT_VMM_ERROR), "{stderr}");
    assert!(stderr.contains("unknown variant `strict`"), "{stderr}");
    let _ = std::fs::remove_file(&bad);
    // The default is kill.
    assert_eq!(SeccompMode::default(), SeccompMode::Kill);
}
