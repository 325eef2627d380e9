//! Boot the bundled guest kernel on real KVM and check what it reports.
#![allow(clippy::unwrap_used)]

use abi::workload::Pattern;
use vmm::GuestEnd;
use vmm_tests::{boot, config, expected_touch};

fn assert_touch(vcpus: u32, mem: &str, pages: u64, pattern: Pattern, write: bool, seed: u64) {
    let pat = match pattern {
        Pattern::Seq => "seq",
        Pattern::Rand => "rand",
        other => panic!("{other:?}: this test checks the once-each patterns"),
    };
    let cmdline = format!(
        "workload=touch pages={pages} pattern={pat} write={} seed={seed}",
        u8::from(write)
    );
    let run = boot(&config(vcpus, mem, &cmdline));
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "console:\n{}", run.console);
    assert!(
        run.console.starts_with("guest-kernel: booting on"),
        "banner missing:\n{}",
        run.console
    );

    let expected = expected_touch(vcpus, pages, pattern, write, seed);
    assert_eq!(run.outcome.reports.len(), vcpus as usize, "one report per vCPU");
    for (r, (cpu, first, n, sum)) in run.outcome.reports.iter().zip(expected) {
        assert_eq!((r.cpu, r.first_page, r.pages), (cpu, first, n));
        assert_eq!(r.checksum, sum, "vCPU {cpu} checksum");
        // Every page of the share was demand-faulted once; the stack adds one.
        assert!(
            r.faults >= n && r.faults <= n + 2,
            "vCPU {cpu}: {} faults for {n} pages",
            r.faults
        );
    }
}

#[test]
fn one_vcpu_sequential_writes() {
    assert_touch(1, "128M", 500, Pattern::Seq, true, 1);
}

#[test]
fn four_vcpus_random_writes() {
    assert_touch(4, "512M", 4000, Pattern::Rand, true, 7);
}

#[test]
fn two_vcpus_random_reads_of_fresh_memory() {
    assert_touch(2, "256M", 1000, Pattern::Rand, false, 3);
}

#[test]
fn eight_vcpus_with_memory_above_4g() {
    assert_touch(8, "5G", 800, Pattern::Rand, true, 11);
}

#[test]
fn hello_runs_in_user_mode_on_every_vcpu() {
    let run = boot(&config(3, "128M", "workload=hello"));
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "console:\n{}", run.console);
    for cpu in 0..3 {
        assert!(
            run.console
                .contains(&format!("hello from user mode on cpu {cpu}")),
            "{}",
            run.console
        );
    }
}

#[test]
fn triple_fault_is_reported_with_rip() {
    let run = boot(&config(1, "128M", "workload=triple-fault"));
    let GuestEnd::Crashed(stop) = &run.outcome.end else {
        panic!("expected a crash, got {:?}\n{}", run.outcome.end, run.console)
    };
    assert_eq!(stop.reason, vmm_core::vcpu::exit::StopReason::TripleFault);
    let rip = stop.rip.expect("RIP read after the shutdown exit");
    assert!(
        (abi::layout::KERNEL_START..abi::layout::MODULE_START).contains(&rip),
        "RIP {rip:#x}"
    );
    assert_eq!(run.outcome.exit_code(), vmm::EXIT_CRASHED);
}

#[test]
fn guest_rejects_a_bad_command_line_itself() {
    // A kernel file bypasses the host-side command-line check, so the guest's
    // own parser has to catch it.
    let path = std::env::temp_dir().join(format!("vmm-test-kernel-{}", std::process::id()));
    std::fs::write(&path, vmm::guest::KERNEL).unwrap();
    let mut cfg = config(1, "128M", "workload=touch pages=lots");
    cfg.kernel = vmm::KernelSource::File(path.clone());
    let run = boot(&cfg);
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        run.outcome.end,
        GuestEnd::Exited(abi::exit::ExitCode::BadCmdline as u32)
    );
    assert!(
        run.console.contains("bad value `lots` for `pages`"),
        "{}",
        run.console
    );
}
