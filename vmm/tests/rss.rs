//! Guest RAM is mapped lazily (`MAP_NORESERVE`): a 4 GiB guest costs the host only
//! what the guest touches. Alone in its test binary because it reads the peak RSS
//! of all child processes.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn peak_child_rss_mib() -> i64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0);
    ru.ru_maxrss / 1024
}

fn run(args: &[&str]) {
    let o = Command::new(VMM).args(args).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn host_memory_follows_what_the_guest_touches() {
    run(&[
        "run",
        "--vcpus",
        "4",
        "--mem",
        "4G",
        "--cmdline",
        "workload=hello",
    ]);
    let idle = peak_child_rss_mib();
    assert!(
        idle < 48,
        "a 4 GiB guest that touches almost nothing used {idle} MiB"
    );

    // 10000 pages = 39 MiB touched by the guest.
    run(&[
        "run",
        "--vcpus",
        "4",
        "--mem",
        "4G",
        "--cmdline",
        "workload=touch pages=10000 pattern=rand",
    ]);
    let busy = peak_child_rss_mib();
    assert!(
        busy >= 39,
        "peak RSS {busy} MiB is below what the guest touched: is the measurement wrong?"
    );
    assert!(busy < 39 + 48, "peak RSS {busy} MiB for 39 MiB touched");
}
