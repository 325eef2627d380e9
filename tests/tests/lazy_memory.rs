//! Guest RAM served through userfaultfd by the retry core: the bundled guest
//! boots, touches pages and reports checksums the host verifies, and every
//! touched page went through the handler.
#![allow(clippy::unwrap_used)]

use vmm::config::MemoryConfig;
use vmm::controller::verify_reports;
use vmm::{MemBackend, VmConfig};
use vmm_tests::{boot, capture_options, config, run, Run, TempFile};

const PAGES: u64 = 2000;

fn touch_config(vcpus: u32, mem: &str, memory: MemoryConfig) -> VmConfig {
    let mut cfg = config(vcpus, mem, &format!("workload=touch pages={PAGES} pattern=rand"));
    cfg.memory = memory;
    cfg
}

fn check_verified(config: &VmConfig, run: &Run) {
    assert_eq!(
        run.outcome.exit_code(),
        0,
        "end {:?}, console:\n{}",
        run.outcome.end,
        run.console
    );
    assert!(
        matches!(verify_reports(config, &run.outcome), Ok(Some(_))),
        "console:\n{}",
        run.console
    );
}

fn zero_backend(vcpus: u32) {
    // No fault-around: one userfault per touched page, so the count is exact.
    let cfg = touch_config(
        vcpus,
        "256M",
        MemoryConfig {
            backend: MemBackend::Zero,
            fault_around: Some(0),
            ..MemoryConfig::default()
        },
    );
    let run = boot(&cfg);
    check_verified(&cfg, &run);
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    assert_eq!(m.backend, "zero");
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    assert!(
        m.total.faults >= PAGES,
        "only {} faults for {PAGES} touched pages",
        m.total.faults
    );
    assert!(m.total.pages_zeroed >= PAGES, "{:?}", m.total);
    assert_eq!(m.total.pages_copied, 0);
    assert_eq!(m.total.latency_us_log2.iter().sum::<u64>(), m.total.faults);
    let json = run.outcome.stats_json();
    assert_eq!(json["memory"]["total"]["faults"], m.total.faults);
    assert_eq!(json["vcpus"].as_array().map(Vec::len), Some(vcpus as usize));
    // Every vCPU's own userfaults are charged to it (thread ids from the uffd).
    for v in &run.outcome.vcpu_stats {
        let share = PAGES / u64::from(vcpus);
        assert!(
            v.stage2_faults >= share,
            "vCPU {} took {} stage-2 faults",
            v.cpu,
            v.stage2_faults
        );
        assert!(v.stage2_blocked_us > 0);
    }
}

#[test]
fn zero_backend_one_vcpu() {
    zero_backend(1);
}

#[test]
fn zero_backend_two_vcpus() {
    zero_backend(2);
}

#[test]
fn anon_backend_has_no_memory_stats() {
    let cfg = touch_config(1, "128M", MemoryConfig::default());
    let run = boot(&cfg);
    check_verified(&cfg, &run);
    assert!(run.outcome.memory.is_none());
}

#[test]
fn file_backend_serves_pages_from_the_file() {
    // A sparse file of zeros: the guest expects fresh RAM to be zero.
    let file = TempFile::zeros("file-backend.img", 128 << 20);
    let cfg = touch_config(
        2,
        "128M",
        MemoryConfig::lazy(MemBackend::File {
            path: file.0.clone(),
            offset: 0,
        }),
    );
    let run = boot(&cfg);
    check_verified(&cfg, &run);
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    assert!(m.backend.starts_with("file:"), "{}", m.backend);
    assert_eq!(m.fault_around, vmm::config::DEFAULT_FAULT_AROUND);
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    // Every touched page came from the file, most of them by fault-around.
    assert!(m.total.pages_copied >= PAGES, "{:?}", m.total);
    assert!(m.total.fault_around_pages > 0, "{:?}", m.total);
    assert!(m.total.fetches < m.total.pages_copied, "{:?}", m.total);
}

#[test]
fn source_failure_stops_the_vm_with_a_clear_error() {
    let file = TempFile::zeros("failing-source.img", 128 << 20);
    let cfg = touch_config(
        1,
        "128M",
        MemoryConfig {
            backend: MemBackend::File {
                path: file.0.clone(),
                offset: 0,
            },
            fault_around: Some(0),
            ..MemoryConfig::default()
        },
    );
    let (options, console) = capture_options();
    let vm = vmm::Vm::new(&cfg, options).unwrap();
    // Cut the file under the VM: reads of pages the guest has not touched yet
    // fail (unexpected EOF) and must never become zero pages.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(0)
        .unwrap();
    let run = run(vm, &console);
    let vmm::GuestEnd::MemoryFault(msg) = &run.outcome.end else {
        panic!("expected a memory fault, got {:?}", run.outcome.end)
    };
    assert_eq!(run.outcome.exit_code(), vmm::EXIT_MEMORY_FAULT);
    assert!(
        msg.contains("guest page 0x") && msg.contains("file:") && msg.contains("not zero-filled"),
        "{msg}"
    );
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    assert!(!m.failures.is_empty());
    assert_eq!(
        m.total.pages_copied + m.total.pages_zeroed,
        m.total.faults,
        "the failed page was not filled"
    );
}

#[test]
fn vcpus_faulting_the_same_pages_get_each_page_filled_once() {
    // shared=1: the four tasks touch the same guest-physical frames, each in its
    // own order; populate=1: the first touch of each frame is a stage-2 fault.
    let shared = 1500;
    let mut cfg = config(
        4,
        "256M",
        &format!("workload=touch pages={shared} pattern=rand shared=1 populate=1"),
    );
    cfg.memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
        ..MemoryConfig::default()
    };
    let run = boot(&cfg);
    check_verified(&cfg, &run);
    assert!(
        run.outcome.reports.iter().all(|r| r.pages == shared),
        "every task touched every page"
    );
    let m = run.outcome.memory.as_ref().expect("memory statistics");
    // 4 x 1500 touches, but only the distinct pages (plus the guest kernel's own,
    // a few hundred) are filled: concurrent faults on a page are served once.
    let filled = m.total.pages_zeroed + m.total.pages_copied;
    assert!(filled >= shared, "{:?}", m.total);
    assert!(
        filled < shared + 1000,
        "pages filled more than once? {:?}",
        m.total
    );
    let charged: u64 = run.outcome.vcpu_stats.iter().map(|v| v.stage2_faults).sum();
    assert!(charged >= shared, "per-vCPU stage-2 faults: {charged}");
}
