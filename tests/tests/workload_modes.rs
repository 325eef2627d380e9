//! The `touch` workload's `populate=1` (pages mapped by the guest kernel before
//! user mode: no guest page faults in the loop) and `shared=1` (every task
//! touches all pages, backed by the same guest-physical frames) options.
#![allow(clippy::unwrap_used)]

use abi::pv::WorkloadReport;
use abi::workload::{self, Pattern};
use vmm::config::MemoryConfig;
use vmm::controller::verify_reports;
use vmm::{GuestEnd, MemBackend, VmConfig};
use vmm_tests::{boot, config, expected_touch, Run};

/// Boots, checks the verdict, the VMM's own check, one report per vCPU and the
/// start line of every task; returns the reports by cpu.
fn boot_ok(cfg: &VmConfig) -> (Run, Vec<WorkloadReport>) {
    let run = boot(cfg);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "console:\n{}", run.console);
    assert!(
        matches!(verify_reports(cfg, &run.outcome), Ok(Some(_))),
        "{:?}\n{}",
        verify_reports(cfg, &run.outcome),
        run.console
    );
    let mut reports = run.outcome.reports.clone();
    reports.sort_by_key(|r| r.cpu);
    assert_eq!(reports.len(), cfg.vcpus as usize, "one report per vCPU");
    for cpu in 0..cfg.vcpus {
        assert!(
            run.console.contains(&format!("touch: cpu {cpu} start\n")),
            "{}",
            run.console
        );
    }
    (run, reports)
}

/// The stack's first page is the only demand fault left with populate=1.
fn assert_no_work_faults(reports: &[WorkloadReport]) {
    for r in reports {
        assert!(
            r.faults <= 2,
            "vCPU {}: {} faults despite populate=1",
            r.cpu,
            r.faults
        );
    }
}

/// Every task of a shared run touched all pages with its own plan's checksum.
fn assert_shared(cfg: &VmConfig, reports: &[WorkloadReport], pages: u64) {
    let wl = workload::parse_cmdline(&cfg.cmdline).unwrap();
    for r in reports {
        assert_eq!(
            (r.first_page, r.pages),
            (0, pages),
            "vCPU {} touches every page",
            r.cpu
        );
        assert_eq!(
            r.checksum,
            workload::expected_task_checksum(&wl, cfg.vcpus, r.cpu)
        );
    }
}

#[test]
fn populate_two_vcpus_takes_no_guest_faults() {
    let (pages, seed) = (3000, 5);
    let cfg = config(
        2,
        "256M",
        &format!("workload=touch pages={pages} pattern=rand seed={seed} populate=1"),
    );
    let (_, reports) = boot_ok(&cfg);
    let expected = expected_touch(2, pages, Pattern::Rand, true, seed);
    for (r, (cpu, first, n, sum)) in reports.iter().zip(expected) {
        assert_eq!((r.cpu, r.first_page, r.pages, r.checksum), (cpu, first, n, sum));
    }
    assert_no_work_faults(&reports);
}

#[test]
fn populate_on_lazy_memory_leaves_first_touches_to_the_host() {
    let mut cfg = config(2, "256M", "workload=touch pages=2000 pattern=rand populate=1");
    cfg.memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
        ..MemoryConfig::default()
    };
    let (run, reports) = boot_ok(&cfg);
    assert_no_work_faults(&reports);
    // Populating does not touch the frames: the user loop's accesses are what
    // the host serves (plus the kernel's own pages).
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    assert!(m.total.faults >= 2000, "only {} host faults", m.total.faults);
}

#[test]
fn shared_four_vcpus_touch_the_same_frames() {
    let pages = 2000;
    let mut cfg = config(
        4,
        "256M",
        &format!("workload=touch pages={pages} pattern=rand shared=1 seed=3"),
    );
    cfg.memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
        ..MemoryConfig::default()
    };
    let (run, reports) = boot_ok(&cfg);
    assert_shared(&cfg, &reports, pages);
    for r in &reports {
        // Each task maps every page in its own address space once.
        assert!(r.faults >= pages, "vCPU {}: {} faults", r.cpu, r.faults);
    }
    // One host page per shared page, not one per task and page.
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    assert!(
        m.total.pages_zeroed < 2 * pages,
        "{} host pages for {pages} shared pages",
        m.total.pages_zeroed
    );
}

#[test]
fn shared_reads_of_fresh_memory() {
    let cfg = config(2, "128M", "workload=touch pages=700 pattern=seq write=0 shared=1");
    let (_, reports) = boot_ok(&cfg);
    assert_shared(&cfg, &reports, 700);
}

#[test]
fn shared_and_populate() {
    let pages = 1500;
    let cfg = config(
        3,
        "256M",
        &format!("workload=touch pages={pages} pattern=rand shared=1 populate=1"),
    );
    let (_, reports) = boot_ok(&cfg);
    assert_shared(&cfg, &reports, pages);
    assert_no_work_faults(&reports);
}

/// Each access pattern runs on real KVM over lazily served memory and its
/// checksum is verified on the host (the host runs the same integer sampler).
#[test]
fn every_access_pattern_is_verified_by_the_host() {
    for pattern in ["stride:9", "hot:10:90", "zipf:990", "zipf:0"] {
        for shared in [0, 1] {
            let mut cfg = config(
                2,
                "256M",
                &format!("workload=touch pages=3000 pattern={pattern} accesses=12000 shared={shared} seed=5"),
            );
            cfg.memory = MemoryConfig::lazy(MemBackend::Zero);
            let (run, reports) = boot_ok(&cfg);
            let wl = workload::parse_cmdline(&cfg.cmdline).unwrap();
            for r in &reports {
                let plan = workload::task_plan(&wl, 2, r.cpu);
                // A sampling pattern touches fewer distinct pages than it makes accesses.
                let w = plan.distinct_pages(wl.pattern);
                assert!(w > 0 && w <= plan.pages, "{pattern}: {w}");
                if wl.pattern.samples() && pattern != "zipf:0" {
                    assert!(w < plan.pages, "{pattern} shared={shared}: every page touched");
                }
            }
            // The guest faults in only the pages it touches.
            let faults: u64 = reports.iter().map(|r| r.faults).sum();
            assert!(faults > 0, "{}", run.console);
        }
    }
}

/// The `dirty` workload writes every page, rewrites them at its rate for its
/// duration, and reads them back with the checksum of one write each.
#[test]
fn the_dirty_workload_rewrites_for_its_duration_and_checks() {
    let cfg = config(
        2,
        "256M",
        "workload=dirty pages=400 rate=4000 duration_ms=300 seed=3",
    );
    let run = boot(&cfg);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "console:\n{}", run.console);
    assert!(
        matches!(verify_reports(&cfg, &run.outcome), Ok(Some(_))),
        "{}",
        run.console
    );
    assert!(run.console.contains("dirty: cpu 1 start"), "{}", run.console);
    // The rewriting lasted its duration (the guest's own TSC timing).
    let khz = u64::from(run.outcome.tsc_khz.unwrap());
    for r in &run.outcome.reports {
        let ms = r.cycles / khz;
        assert!((300..3000).contains(&ms), "vCPU {} rewrote for {ms} ms", r.cpu);
    }
}
