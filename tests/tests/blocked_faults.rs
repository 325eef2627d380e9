//! vCPUs blocked in a stage-2 fault on a page the source holds back honour
//! pause, resume and stop, and the fault is retried afterwards (any number of
//! times) until the page comes: nothing lost, checksums right.
//!
//! Two cases, because this project's KVM treats them differently (PLATFORM
//! notes): a guest user-mode (CPL3) access blocked in the host's userfault wait
//! leaves `KVM_RUN` with EINTR on a kick, and the vCPU pauses for real; a guest
//! kernel-mode access (emulated, read by the host kernel) does not return until
//! the page is served, so the pause completes by reporting that vCPU as blocked
//! in its fault, and it stops on its way out once the page arrives.
#![allow(clippy::unwrap_used)]

use memory::{TestSource, ZeroSource};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::config::MemoryConfig;
use vmm::controller::verify_reports;
use vmm::CustomSource;
use vmm::{GuestEnd, MemBackend, RunningVm, VcpuPause, VmConfig};
use vmm_tests::{capture_options, config};

fn gated_vm(cfg: &VmConfig, gate_closed: bool) -> (RunningVm, Arc<TestSource>, Arc<Mutex<Vec<u8>>>) {
    let source = Arc::new(TestSource::new(Arc::new(ZeroSource::new().unwrap())).unwrap());
    if gate_closed {
        source.close_gate();
    }
    let (mut options, console) = capture_options();
    options.page_source = Some(CustomSource(source.clone()));
    let vm = vmm::Vm::new(cfg, options).unwrap().start().unwrap();
    (vm, source, console)
}

fn lazy_touch(vcpus: u32, cmdline: &str) -> VmConfig {
    let mut cfg = config(vcpus, "256M", cmdline);
    cfg.memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
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

/// Whether /dev/kvm is PVM (shadow paging, guest kernel code emulated).
fn pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
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
fn pause_completes_while_a_kernel_mode_access_is_blocked() {
    let cfg = lazy_touch(1, "workload=touch pages=300 pattern=rand");
    // Closed from the start: the guest kernel's first access to a page the VMM
    // did not write (its stack in .bss) blocks, in kernel mode.
    let (vm, source, console) = gated_vm(&cfg, true);
    wait_until("the boot vCPU to block in a fault", || {
        vm.stats().unwrap().blocked_faults > 0
    });

    let report = vm.pause().unwrap();
    eprintln!("pause with a kernel-mode fault pending took {:?}", report.took);
    match report.vcpus[0] {
        VcpuPause::BlockedInFault { guest_addr } => {
            assert!(guest_addr < cfg.mem_size, "{guest_addr:#x}");
        }
        // On VMX/SVM a guest kernel access faults through KVM's interruptible
        // path and the vCPU pauses for real; under PVM it cannot.
        VcpuPause::Paused if !pvm() => {}
        ref other => panic!("vCPU 0 should be blocked in its fault, not {other:?}: {report:?}"),
    }
    assert!(
        !console_text(&console).contains("task exited"),
        "the guest ran while its page was held"
    );

    // Resume, then let the page through: the vCPU honours the pause on its way
    // out of the fault, then the resume, and the guest completes.
    vm.resume().unwrap();
    source.open_gate();
    let outcome = finish_ok(&cfg, vm, &console);
    let m = outcome.memory.unwrap();
    assert!(
        m.total.retries_total > 0,
        "the held fault was retried: {:?}",
        m.total
    );
}

#[test]
fn user_mode_fault_is_interrupted_by_pause_and_retried() {
    // populate=1: the guest kernel maps the work pages up front, so the user
    // loop's first touch of each page is a stage-2 fault from guest user mode.
    let cfg = lazy_touch(1, "workload=touch pages=20000 pattern=rand populate=1");
    let (vm, source, console) = gated_vm(&cfg, false);
    wait_until("the user loop to start", || {
        console_text(&console).contains("touch: cpu 0 start")
    });
    source.close_gate();
    // Held by the gate, not merely in progress: a fault fetched just before
    // the gate closed completes, and the vCPU goes on to the next page.
    wait_until("a user-mode fault to be held", || {
        !source.held_pages().is_empty() && vm.stats().unwrap().blocked_faults > 0
    });
    let before = vm.stats().unwrap().vcpus[0].interruptions;

    for _ in 0..5 {
        let report = vm.pause().unwrap();
        eprintln!("pause with a user-mode fault pending took {:?}", report.took);
        assert_eq!(
            report.vcpus[0],
            VcpuPause::Paused,
            "a CPL3 fault wait is interruptible: {report:?}"
        );
        vm.resume().unwrap();
        // After the resume the vCPU re-enters KVM_RUN and faults on the same
        // page again, still held. (The handler lists it until the page comes.)
        assert!(vm.stats().unwrap().blocked_faults > 0);
        std::thread::sleep(Duration::from_millis(10));
    }
    // A pause that lands before the vCPU re-enters is taken without an
    // interruption, so not every cycle counts one.
    let after = vm.stats().unwrap().vcpus[0].interruptions;
    assert!(
        after > before,
        "pauses took the vCPU out of KVM_RUN ({before} -> {after})"
    );

    source.open_gate();
    let outcome = finish_ok(&cfg, vm, &console);
    assert!(outcome.memory.unwrap().total.retries_total > 0);
}

#[test]
fn stop_with_a_fault_held_forever() {
    let cfg = lazy_touch(2, "workload=touch pages=300 pattern=rand");
    let (vm, _source, _console) = gated_vm(&cfg, true);
    wait_until("a blocked fault", || vm.stats().unwrap().blocked_faults > 0);
    vm.stop();
    let outcome = vm.wait().unwrap();
    assert_eq!(outcome.end, GuestEnd::Stopped);
}

#[test]
fn failed_source_pauses_the_vm_and_a_repair_lets_it_finish() {
    let cfg = lazy_touch(1, "workload=touch pages=20000 pattern=rand populate=1");
    let file = vmm_tests::TempFile::zeros("repairable.img", cfg.mem_size);
    let source = Arc::new(memory::FileSource::open(&file.0, 0).unwrap());
    let (mut options, console) = capture_options();
    options.page_source = Some(CustomSource(source.clone()));
    options.on_memory_fault = vmm::MemoryFaultPolicy::Pause;
    let vm = vmm::Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_until("the user loop to start", || {
        console_text(&console).contains("touch: cpu 0 start")
    });

    // Break the source under the running guest: reads now fail (EOF).
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
    assert!(matches!(vm.pause(), Err(vmm::ControlError::AlreadyPaused)));

    // Repair it and tell the core: the parked fault is retried and served with
    // the file's data; the guest then finishes with the right checksums.
    f.set_len(cfg.mem_size).unwrap();
    memory::PageSource::notifier(&*source).notify();
    vm.resume().unwrap();
    let outcome = finish_ok(&cfg, vm, &console);
    assert!(outcome.memory.unwrap().total.pages_copied >= 20000);
}
