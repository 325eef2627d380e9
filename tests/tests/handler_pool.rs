//! Several fault-handler threads per VM (`--fault-handlers`, a pool over one
//! userfaultfd sharing one table of unresolved faults): vCPUs sharing pages
//! get every page once and the right checksums, a pause with faults held
//! next to every handler thread completes and the faults are retried, and a
//! failed source pauses the VM once and a repair lets it finish.
#![allow(clippy::unwrap_used)]

use memory::{TestSource, ZeroSource};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::config::{HandlerConfig, HandlerPinning, MemoryConfig};
use vmm::controller::verify_reports;
use vmm::CustomSource;
use vmm::{GuestEnd, MemBackend, RunningVm, VcpuPause, VmConfig};
use vmm_tests::{capture_options, config};

fn pooled(vcpus: u32, threads: u32, pinning: HandlerPinning, cmdline: &str) -> VmConfig {
    let mut cfg = config(vcpus, "256M", cmdline);
    cfg.memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
        handlers: HandlerConfig {
            threads: Some(threads),
            pinning,
            ..HandlerConfig::default()
        },
        ..MemoryConfig::default()
    };
    cfg
}

/// Polls `cond` (a guard of 60 s against hangs, not a timing goal).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn console_text(c: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&c.lock().unwrap()).into_owned()
}

fn finish_ok(cfg: &VmConfig, vm: RunningVm, console: &Mutex<Vec<u8>>) -> vmm::RunOutcome {
    let outcome = vm.wait().unwrap();
    assert_eq!(
        outcome.end,
        GuestEnd::Exited(0),
        "console:\n{}",
        console_text(console)
    );
    assert!(matches!(verify_reports(cfg, &outcome), Ok(Some(_))));
    outcome
}

#[test]
fn vcpus_sharing_pages_over_three_handler_threads_keep_their_checksums() {
    // Every task writes and reads back all pages: four vCPUs fault on the
    // same pages, their events read by any of the three handler threads.
    let cfg = pooled(
        4,
        3,
        HandlerPinning::Cpu,
        "workload=touch pages=1500 pattern=rand populate=1 write=1 shared=1",
    );
    let source = Arc::new(TestSource::new(Arc::new(ZeroSource::new().unwrap())).unwrap());
    let (mut options, console) = capture_options();
    options.page_source = Some(CustomSource(source.clone()));
    let vm = vmm::Vm::new(&cfg, options).unwrap().start().unwrap();
    let outcome = finish_ok(&cfg, vm, &console);
    let m = outcome.memory.unwrap();
    assert_eq!(m.handler_threads.len(), 3, "{:?}", m.handler_threads);
    assert_eq!(
        m.handler_threads.iter().map(|t| t.events).sum::<u64>(),
        m.events,
        "every event read by one thread of the pool"
    );
    assert_eq!(source.max_fetches_per_page(), 1, "a page was fetched twice");
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    // The shared pages were faulted by several vCPUs, each charged.
    let charged: u64 = outcome.vcpu_stats.iter().map(|s| s.stage2_faults).sum();
    assert!(charged >= 1500, "{charged} stage-2 faults charged to the vCPUs");
}

#[test]
fn pause_with_faults_held_next_to_every_handler_thread() {
    // populate=1: each vCPU's first touch of a page is a stage-2 fault from
    // guest user mode; each vCPU is pinned next to a handler thread of its own.
    let cfg = pooled(
        2,
        2,
        HandlerPinning::Vcpu,
        "workload=touch pages=20000 pattern=rand populate=1 write=1",
    );
    let source = Arc::new(TestSource::new(Arc::new(ZeroSource::new().unwrap())).unwrap());
    let (mut options, console) = capture_options();
    options.page_source = Some(CustomSource(source.clone()));
    let vm = vmm::Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_until("both user loops to start", || {
        let t = console_text(&console);
        t.contains("touch: cpu 0 start") && t.contains("touch: cpu 1 start")
    });
    source.close_gate();
    wait_until("both vCPUs held in a fault", || {
        source.held_pages().len() >= 2 && vm.stats().unwrap().blocked_faults >= 2
    });
    for _ in 0..3 {
        let report = vm.pause().unwrap();
        assert!(
            report.vcpus.iter().all(|v| *v == VcpuPause::Paused),
            "CPL3 fault waits are interruptible: {report:?}"
        );
        vm.resume().unwrap();
    }
    source.open_gate();
    let outcome = finish_ok(&cfg, vm, &console);
    let m = outcome.memory.unwrap();
    assert!(
        m.total.retries_total > 0,
        "the held faults were retried: {:?}",
        m.total
    );
    assert_eq!(m.handler_threads.len(), 2);
    assert!(
        m.handler_threads.iter().all(|t| t.events > 0),
        "each handler thread served faults: {:?}",
        m.handler_threads
    );
}

#[test]
fn failed_source_with_two_handler_threads_pauses_once_and_a_repair_lets_it_finish() {
    let cfg = pooled(
        2,
        2,
        HandlerPinning::Vcpu,
        "workload=touch pages=20000 pattern=rand populate=1",
    );
    let file = vmm_tests::TempFile::zeros("pool-repairable.img", cfg.mem_size);
    let source = Arc::new(memory::FileSource::open(&file.0, 0).unwrap());
    let (mut options, console) = capture_options();
    options.page_source = Some(CustomSource(source.clone()));
    options.on_memory_fault = vmm::MemoryFaultPolicy::Pause;
    let vm = vmm::Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_until("both user loops to start", || {
        let t = console_text(&console);
        t.contains("touch: cpu 0 start") && t.contains("touch: cpu 1 start")
    });
    // Break the source under both running vCPUs: reads now fail (EOF).
    let f = std::fs::OpenOptions::new().write(true).open(&file.0).unwrap();
    f.set_len(0).unwrap();
    wait_until("the failure to pause the VM", || {
        vm.stats().unwrap().memory_fault.is_some()
    });
    let stats = vm.stats().unwrap();
    assert!(stats.paused);
    let msg = stats.memory_fault.unwrap();
    assert!(
        msg.contains("guest page 0x") && msg.contains("not zero-filled"),
        "{msg}"
    );
    f.set_len(cfg.mem_size).unwrap();
    memory::PageSource::notifier(&*source).notify();
    vm.resume().unwrap();
    let outcome = finish_ok(&cfg, vm, &console);
    let m = outcome.memory.unwrap();
    assert!(m.total.pages_copied >= 20000);
    assert_eq!(m.handler_threads.len(), 2);
}
