//! The `vmm` command line: the default run, and every error case giving its
//! message and a non-zero exit code.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().expect("run vmm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn default_run_boots_the_bundled_guest() {
    let o = vmm(&["run"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.starts_with("guest-kernel: booting on 1 vCPUs"), "{out}");
    assert!(out.contains("vmm: cpu0 workload result: pages 0..256"), "{out}");
    assert!(out.contains("verified on the host"), "{out}");
}

fn assert_error(args: &[&str], code: i32, message: &str) {
    let o = vmm(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "args {args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(message),
        "args {args:?}: expected `{message}` in:\n{}",
        stderr(&o)
    );
}

#[test]
fn bad_memory_sizes() {
    assert_error(&["run", "--mem", "0"], 64, "memory size must not be zero");
    assert_error(
        &["run", "--mem", "100000"],
        64,
        "not a multiple of the 4 KiB page size",
    );
    assert_error(&["run", "--mem", "1M"], 64, "too small");
    assert_error(&["run", "--mem", "128G"], 64, "too large: at most 64 GiB");
    assert_error(&["run", "--mem", "plenty"], 64, "invalid memory size `plenty`");
}

#[test]
fn bad_vcpu_counts() {
    assert_error(
        &["run", "--vcpus", "0"],
        64,
        "vCPU count 0 is out of range: use 1 to 8",
    );
    assert_error(&["run", "--vcpus", "9"], 64, "vCPU count 9 is out of range");
}

#[test]
fn bad_handler_flags_are_refused_by_run_restore_and_receive() {
    let range = "fault-handler threads is out of range: use 1 to 16";
    assert_error(
        &["run", "--mem-backend", "zero", "--fault-handlers", "0"],
        64,
        &format!("0 {range}"),
    );
    assert_error(
        &["run", "--handler-pinning", "tight"],
        64,
        "invalid handler pinning `tight`",
    );
    // Checked before the snapshot is opened or the socket bound.
    assert_error(
        &[
            "restore",
            "--from",
            "/nonexistent",
            "--lazy",
            "--fault-handlers",
            "17",
        ],
        64,
        &format!("17 {range}"),
    );
    assert_error(
        &["restore", "--from", "/nonexistent", "--lazy", "--cpus", "0,x"],
        64,
        "invalid CPU list `0,x`",
    );
    assert_error(
        &[
            "receive",
            "--listen",
            "unix:/nonexistent/sock",
            "--handler-pinning",
            "tight",
        ],
        64,
        "invalid handler pinning `tight`",
    );
}

#[test]
fn bad_command_line_is_caught_before_boot() {
    assert_error(
        &["run", "--cmdline", "workload=dance"],
        64,
        "bad value `dance` for `workload`",
    );
}

#[test]
fn bad_kernel_files() {
    assert_error(
        &["run", "--kernel", "/nonexistent/kernel"],
        64,
        "cannot read kernel file /nonexistent/kernel",
    );
    let text = temp("text", b"this is not a kernel\n");
    assert_error(
        &["run", "--kernel", text.to_str().unwrap()],
        64,
        "is not an ELF file",
    );
    // A real x86_64 ELF, but position-independent (ET_DYN): not loadable here.
    assert_error(
        &["run", "--kernel", "/bin/true"],
        64,
        "not a 64-bit little-endian x86_64 executable ELF",
    );
    let truncated = temp("trunc", &vmm::guest::KERNEL[..200]);
    assert_error(
        &["run", "--kernel", truncated.to_str().unwrap()],
        64,
        "truncated or malformed ELF",
    );
    // The user program is linked at 512 GiB: far outside the kernel area.
    let user = temp("user", vmm::guest::USER);
    assert_error(&["run", "--kernel", user.to_str().unwrap()], 64, "does not fit");
    for p in [text, truncated, user] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn triple_fault_reports_rip_and_reason() {
    assert_error(
        &["run", "--cmdline", "workload=triple-fault"],
        10,
        "triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x",
    );
}

#[test]
fn guest_out_of_memory_is_its_exit_code() {
    // 100000 pages (390 MiB) cannot fit in 64 MiB of guest RAM.
    let o = vmm(&["run", "--mem", "64M", "--cmdline", "workload=touch pages=100000"]);
    assert_eq!(o.status.code(), Some(32 + 4), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("guest ran out of memory"), "{}", stdout(&o));
}

/// Runs `vmm run` inside a private mount namespace after `setup` (shell) changed /dev.
fn in_mount_namespace(setup: &str) -> Output {
    let script = format!("{setup} && exec {VMM} run");
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn missing_kvm_device() {
    assert!(
        is_root(),
        "this test hides /dev/kvm in a mount namespace and needs root (CI runs as root)"
    );
    let o = in_mount_namespace("mount -t tmpfs none /dev");
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/dev/kvm: it does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn kvm_api_not_usable() {
    assert!(is_root(), "needs root (CI runs as root)");
    // /dev/null in place of /dev/kvm: the API version ioctl fails.
    let o = in_mount_namespace("mount --bind /dev/null /dev/kvm");
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("KVM API version"), "{}", stderr(&o));
}

#[test]
fn kvm_permission_denied() {
    assert!(
        is_root(),
        "needs root to switch to an unprivileged user (CI runs as root)"
    );
    // A copy in the temp dir: the build tree may be under a directory the
    // unprivileged user cannot enter.
    let copy = std::env::temp_dir().join(format!("vmm-cli-{}-copy", std::process::id()));
    std::fs::copy(VMM, &copy).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .arg("run")
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_file(&copy);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("permission denied; run as root or add your user to the `kvm` group"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_fault_reports_every_figure() {
    // A smoke run: the figures exist and are positive (their values belong to the
    // benchmark, not to a test).
    let o = vmm(&["bench", "fault", "--pages", "300", "--repeats", "1", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in [
        "raw_uffd",
        "minimal_vm_rand",
        "anon_rand",
        "zero_rand",
        "zero_seq",
        "file_seq_no_fault_around",
    ] {
        let median = v[key]["median_us"].as_f64().unwrap_or(-1.0);
        assert!(median > 0.0, "{key}: {}", v[key]);
    }
    assert!(v["ratio_rand"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(v["ratio_to_minimal_vm"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(v["file_seq_fault_around"].as_array().map(Vec::len), Some(2));
}

#[test]
fn bench_all_writes_charts() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}-plots", std::process::id()));
    let o = vmm(&[
        "bench",
        "all",
        "--pages",
        "200",
        "--repeats",
        "1",
        "--json",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["boot"]["first_output_ms"]["median_us"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(v["scaling"].as_array().map(Vec::len), Some(3));
    for chart in [
        "fault_cost.svg",
        "fault_latency_histogram.svg",
        "throughput_vs_vcpus.svg",
        "boot_time.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{chart}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_guest_fault_reports_both_figures() {
    let o = vmm(&["bench", "guest-fault", "--repeats", "1", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["syscall", "demand_zero_fault"] {
        assert!(v[key]["median_us"].as_f64().unwrap_or(0.0) > 0.0, "{key}: {v}");
    }
    assert!(v["ratio"].as_f64().unwrap_or(0.0) > 0.0);
}
