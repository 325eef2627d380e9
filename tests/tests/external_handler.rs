//! Restores served by an external page-fault handler that behaves as
//! Firecracker's do (`src/bin/fc_like_handler.rs`), on real KVM, the VMM
//! in this process and its connection holder in `uffd_peer`: 1- and
//! 2-vCPU restores of small and 6 GiB guests with the page size read from
//! either field; a malicious handler (the VM pauses with a clear error and
//! the run ends with exit code 13 after the grace, without the host
//! spinning); a handler killed mid-restore is replaced (by `attach_handler`,
//! or by a new socket at its path), as is one that stops reading the
//! userfaultfd, and the guest finishes with verified checksums.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::controller::{verify_reports, RunState};
use vmm::snapshot::{AfterSnapshot, LayoutKind};
use vmm::{ControlError, GuestEnd, RestoreOptions, RunningVm, Vm, VmConfig};
use vmm_tests::{capture_options, config};

const HANDLER: &str = env!("CARGO_BIN_EXE_fc_like_handler");
const PEER: &str = env!("CARGO_BIN_EXE_uffd_peer");

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-ext-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A handler process, killed on drop.
struct Handler(Child);

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console_text(c: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&c.lock().unwrap()).into_owned()
}

/// Boots `cfg`, snapshots it once its workload runs, stops.
fn snapshot_mid_run(cfg: &VmConfig, dir: &Path) {
    let (options, console) = capture_options();
    let vm = Vm::new(cfg, options).unwrap().start().unwrap();
    let start = Instant::now();
    while !console_text(&console).contains("touch: cpu 0 start") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            console_text(&console)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(30));
    vm.snapshot(dir, AfterSnapshot::Stop).unwrap();
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    let m = vmm::snapshot::read_manifest(dir).unwrap();
    assert_eq!(m.memory.layout.kind, LayoutKind::Packed);
    assert_eq!(m.memory.len, cfg.mem_size, "packed: the file is as long as RAM");
}

/// Starts the handler at `sock` serving `dir`'s memory file and waits for
/// its socket.
fn start_handler(sock: &Path, dir: &Path, mode: &str, field: &str) -> Handler {
    let child = Command::new(HANDLER)
        .arg(sock)
        .arg(dir.join("memory.bin"))
        .args(["--mode", mode, "--field", field])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the handler did not bind"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Handler(child)
}

fn restore(dir: &Path, sock: &Path, grace: Duration) -> (RunningVm, VmConfig, Arc<Mutex<Vec<u8>>>) {
    restore_with(dir, sock, grace, None)
}

fn restore_with(
    dir: &Path,
    sock: &Path,
    grace: Duration,
    stall: Option<Duration>,
) -> (RunningVm, VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (options, console) = capture_options();
    let how = RestoreOptions {
        uffd_socket: Some(sock.to_owned()),
        peer_program: Some(PEER.into()),
        handler_grace: Some(grace),
        handler_stall: stall,
        ..Default::default()
    };
    let vm = Vm::restore(dir, &how, options).unwrap_or_else(|e| panic!("restore failed: {e}"));
    let cfg = vm.config().clone();
    (vm.start().unwrap(), cfg, console)
}

fn finish_verified(vm: RunningVm, cfg: &VmConfig, console: &Mutex<Vec<u8>>) {
    let outcome = vm.wait().unwrap();
    let text = console_text(console);
    assert_eq!(outcome.end, GuestEnd::Exited(0), "console:\n{text}");
    let sum = verify_reports(cfg, &outcome);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}, console:\n{text}");
}

/// Waits until the VM's handler is reported gone; returns the stats.
fn wait_lost(vm: &RunningVm) -> vmm::controller::LiveStats {
    let start = Instant::now();
    loop {
        let s = vm.stats().unwrap();
        if s.state == RunState::HandlerLost {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the handler's death went unnoticed: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn firecracker_like_handlers_serve_small_and_large_guests() {
    // (vCPUs, memory, the field the handler takes the page size from)
    let cases = [
        (1, "256M", "page_size"),
        (2, "256M", "page_size_kib"),
        (1, "6G", "page_size_kib"),
        (2, "6G", "page_size"),
    ];
    for (vcpus, mem, field) in cases {
        let dir = TempDir::new(&format!("serve-{vcpus}-{mem}"));
        let cfg = config(vcpus, mem, "workload=touch pages=3000 pattern=rand");
        snapshot_mid_run(&cfg, &dir.0);
        let sock = dir.0.join("uffd.sock");
        let mut handler = start_handler(&sock, &dir.0, "serve", field);
        let (vm, cfg, console) = restore(&dir.0, &sock, Duration::from_secs(5));
        finish_verified(vm, &cfg, &console);
        // The handler served the whole run and was never told to die by an
        // early EOF: it is still there when the VM is over (it panics only
        // once the connection closes, and then kills the holder, not us).
        let _ = handler.0.try_wait();
    }
}

#[test]
fn a_malicious_handler_pauses_the_vm_with_a_clear_error_and_the_run_ends_with_13() {
    let dir = TempDir::new("malicious");
    let cfg = config(2, "256M", "workload=touch pages=3000 pattern=rand");
    snapshot_mid_run(&cfg, &dir.0);
    let sock = dir.0.join("uffd.sock");
    let _handler = start_handler(&sock, &dir.0, "malicious", "page_size");
    let grace = Duration::from_secs(3);
    let restored = Instant::now();
    let (vm, _cfg, _console) = restore(&dir.0, &sock, grace);
    let stats = wait_lost(&vm);
    let msg = stats.memory_fault.clone().unwrap();
    assert!(
        msg.contains("page-fault handler")
            && msg.contains("is gone")
            && msg.contains(&sock.display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("attach-handler") && msg.contains("exit code 13"),
        "{msg}"
    );
    assert!(
        msg.contains("guest page 0x"),
        "the waiting pages are named: {msg}"
    );
    let h = stats.handler.clone().unwrap();
    assert!(h.attached.is_none() && h.lost.is_some(), "{h:?}");
    assert!(h.pages.iter().any(|p| p.cpu.is_some()), "{h:?}");
    assert!(stats.blocked_faults >= 1, "{stats:?}");
    // Requests answer at once, with what to do.
    let t = Instant::now();
    assert!(matches!(vm.pause(), Err(ControlError::AlreadyPaused)));
    let e = vm.resume().unwrap_err();
    assert!(e.to_string().contains("attach-handler"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "requests took {:?}",
        t.elapsed()
    );
    // While no handler serves, the host does not spin on blocked vCPUs.
    let vcpu_cpu = |s: &vmm::controller::LiveStats| s.vcpus.iter().map(|v| v.cpu_time_us).sum::<u64>();
    let (cpu0, wall0) = (vcpu_cpu(&vm.stats().unwrap()), Instant::now());
    std::thread::sleep(Duration::from_millis(1000));
    let busy = Duration::from_micros(vcpu_cpu(&vm.stats().unwrap()) - cpu0);
    assert!(
        busy < wall0.elapsed() / 20,
        "the vCPU threads used {busy:?} of CPU in {:?} while paused",
        wall0.elapsed()
    );
    let outcome = vm.wait().unwrap();
    assert_eq!(outcome.exit_code(), vmm::EXIT_MEMORY_FAULT);
    match &outcome.end {
        GuestEnd::MemoryFault(m) => {
            assert!(m.contains("no page-fault handler was attached within"), "{m}")
        }
        other => panic!("the run ended with {other:?}"),
    }
    assert!(
        restored.elapsed() < grace + Duration::from_secs(15),
        "{:?}",
        restored.elapsed()
    );
}

#[test]
fn a_handler_killed_mid_restore_is_replaced_and_the_guest_finishes() {
    let dir = TempDir::new("replace");
    let cfg = config(2, "256M", "workload=touch pages=8000 pattern=rand");
    snapshot_mid_run(&cfg, &dir.0);

    // 1. It panics after 300 faults (and SIGKILLs the holder, as
    //    Firecracker's do); a new handler at another path is attached.
    let sock = dir.0.join("first.sock");
    let first = start_handler(&sock, &dir.0, "die-after:300", "page_size");
    let (vm, cfg, console) = restore(&dir.0, &sock, Duration::from_secs(60));
    let stats = wait_lost(&vm);
    let msg = stats.memory_fault.unwrap();
    assert!(msg.contains("is gone"), "{msg}");
    drop(first);
    let again = dir.0.join("second.sock");
    let _second = start_handler(&again, &dir.0, "serve", "page_size_kib");
    let info = vm.attach_handler(&again).unwrap();
    assert!(info.resumed, "{info:?}");
    assert!(matches!(
        vm.attach_handler(&again),
        Err(ControlError::HandlerAttached(_))
    ));
    finish_verified(vm, &cfg, &console);

    // 2. Killed from outside mid-run; a new handler appears at the same
    //    path and is attached without being asked.
    let sock = dir.0.join("same.sock");
    let mut victim = start_handler(&sock, &dir.0, "serve", "page_size");
    let (vm, cfg, console) = restore(&dir.0, &sock, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(150));
    victim.0.kill().unwrap();
    let _ = victim.0.wait();
    let stats = wait_lost(&vm);
    assert!(stats.memory_fault.unwrap().contains("is gone"));
    std::fs::remove_file(&sock).unwrap();
    let _replacement = start_handler(&sock, &dir.0, "serve", "page_size");
    finish_verified(vm, &cfg, &console);

    // 3. Alive and connected, but it stops reading the userfaultfd: taken
    //    as gone once faults waited unread for the stall time; replaced.
    let sock = dir.0.join("stall.sock");
    let _stalled = start_handler(&sock, &dir.0, "stall-after:300", "page_size");
    let (vm, cfg, console) = restore_with(
        &dir.0,
        &sock,
        Duration::from_secs(60),
        Some(Duration::from_secs(1)),
    );
    let stats = wait_lost(&vm);
    let msg = stats.memory_fault.unwrap();
    assert!(msg.contains("no longer reads the userfaultfd"), "{msg}");
    let again = dir.0.join("after-stall.sock");
    let _fresh = start_handler(&again, &dir.0, "serve", "page_size");
    assert!(vm.attach_handler(&again).unwrap().resumed);
    finish_verified(vm, &cfg, &console);
}

/// Whether this process runs as root (the test below needs to run a
/// handler as another user).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_handler_of_another_user_never_gets_the_userfaultfd() {
    // Whoever holds the userfaultfd writes into the VMM's memory and can
    // register more of it: a socket bound by another user (a path in a
    // shared directory taken first) must not receive it.
    use std::os::unix::fs::PermissionsExt;
    assert!(
        is_root(),
        "runs a handler as another user (uid 65534): needs root (CI runs as root)"
    );
    let dir = TempDir::new("other-user");
    let cfg = config(1, "256M", "workload=touch pages=3000 pattern=rand");
    snapshot_mid_run(&cfg, &dir.0);
    // A directory every user may write, with the handler and a copy of the
    // memory file it can read.
    let shared = dir.0.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let bin = shared.join("handler");
    std::fs::copy(HANDLER, &bin).unwrap();
    let mem = shared.join("memory.bin");
    std::fs::copy(dir.0.join("memory.bin"), &mem).unwrap();
    std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock = shared.join("uffd.sock");
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg(&sock)
        .arg(&mem)
        .args(["--mode", "serve", "--field", "page_size"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _handler = Handler(child);
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the handler did not bind"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (options, _console) = capture_options();
    let how = RestoreOptions {
        uffd_socket: Some(sock.clone()),
        peer_program: Some(PEER.into()),
        handler_grace: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let e = match Vm::restore(&dir.0, &how, options) {
        Err(e) => e.to_string(),
        Ok(vm) => match vm.start() {
            Err(e) => e.to_string(),
            Ok(vm) => {
                vm.stop();
                panic!("the userfaultfd went to a handler of uid 65534")
            }
        },
    };
    assert!(
        e.contains("runs as uid 65534") && e.contains("refused the handler"),
        "{e}"
    );
}
