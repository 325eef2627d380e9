//! Controlling a running VM: pause, resume, kicks, stop and requests run on a
//! vCPU, while the guest's workload runs; the workload must still complete with
//! the right checksums (nothing lost across interruptions).
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;
use vmm::config::MemoryConfig;
use vmm::controller::verify_reports;
use vmm::{GuestEnd, MemBackend, VcpuPause, VmConfig};
use vmm_tests::{capture_options, config};

fn touch(vcpus: u32, pages: u64, memory: MemoryConfig) -> VmConfig {
    let mut cfg = config(
        vcpus,
        "512M",
        &format!("workload=touch pages={pages} pattern=rand"),
    );
    cfg.memory = memory;
    cfg
}

fn start(cfg: &VmConfig) -> (vmm::RunningVm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (options, console) = capture_options();
    let vm = vmm::Vm::new(cfg, options).unwrap().start().unwrap();
    (vm, console)
}

fn finish(cfg: &VmConfig, vm: vmm::RunningVm, console: &std::sync::Mutex<Vec<u8>>) -> vmm::RunOutcome {
    let outcome = vm.wait().unwrap();
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert_eq!(outcome.end, GuestEnd::Exited(0), "console:\n{text}");
    assert!(
        matches!(verify_reports(cfg, &outcome), Ok(Some(_))),
        "console:\n{text}"
    );
    outcome
}

#[test]
fn pause_and_resume_many_times_during_a_workload() {
    let cfg = touch(2, 6000, MemoryConfig::default());
    let (vm, console) = start(&cfg);
    let mut paused_cycles = 0;
    for _ in 0..30 {
        match vm.pause() {
            Ok(report) => {
                paused_cycles += 1;
                for state in &report.vcpus {
                    assert!(
                        matches!(state, VcpuPause::Paused | VcpuPause::NotStarted),
                        "anonymous memory never blocks a vCPU: {report:?}"
                    );
                }
                // While paused the guest makes no progress: stats stay still.
                let a = vm.stats().unwrap();
                std::thread::sleep(Duration::from_millis(5));
                let b = vm.stats().unwrap();
                let exits = |s: &vmm::controller::LiveStats| s.vcpus.iter().map(|v| v.exits).sum::<u64>();
                assert_eq!(exits(&a), exits(&b), "a paused VM ran guest code");
                vm.resume().unwrap();
            }
            Err(vmm::ControlError::Ended) => break,
            Err(e) => panic!("pause failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        paused_cycles > 5,
        "the workload ended before the test could pause it"
    );
    let outcome = finish(&cfg, vm, &console);
    let interruptions: u64 = outcome.vcpu_stats.iter().map(|v| v.interruptions).sum();
    assert!(interruptions > 0, "pauses must take vCPUs out of KVM_RUN");
}

#[test]
fn kick_storm_during_lazily_backed_workload() {
    // Every page the guest touches is a stage-2 userfault; thousands of kicks
    // interrupt vCPUs in and out of those faults.
    let cfg = touch(
        2,
        4000,
        MemoryConfig {
            backend: MemBackend::Zero,
            fault_around: Some(0),
            ..MemoryConfig::default()
        },
    );
    let (vm, console) = start(&cfg);
    let mut kicks = 0;
    while kicks < 5000 && !vm.is_finished() {
        if vm.kick(None).is_err() {
            break;
        }
        kicks += 1;
        if kicks % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(kicks >= 1000, "only {kicks} kicks before the end");
    let outcome = finish(&cfg, vm, &console);
    let m = outcome.memory.as_ref().unwrap();
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    assert!(m.total.faults >= 4000, "{:?}", m.total);
}

#[test]
fn stop_request_ends_the_run() {
    let cfg = touch(1, 50000, MemoryConfig::default());
    let (vm, _console) = start(&cfg);
    std::thread::sleep(Duration::from_millis(50));
    vm.stop();
    let outcome = vm.wait().unwrap();
    assert_eq!(outcome.end, GuestEnd::Stopped);
    assert_eq!(outcome.exit_code(), vmm::EXIT_STOPPED);
}

#[test]
fn run_on_a_paused_vcpu_reads_its_registers() {
    let cfg = touch(1, 20000, MemoryConfig::default());
    let (vm, console) = start(&cfg);
    std::thread::sleep(Duration::from_millis(30));
    vm.pause().unwrap();
    let (tx, rx) = mpsc::channel();
    vm.run_on_vcpu(
        0,
        Box::new(move |fd| {
            let _ = tx.send(fd.get_regs().map(|r| r.rip));
        }),
    )
    .unwrap();
    let rip = rx.recv().unwrap().unwrap();
    assert_ne!(rip, 0);
    assert!(matches!(
        vm.run_on_vcpu(7, Box::new(|_| {})),
        Err(vmm::ControlError::NoSuchVcpu(7))
    ));
    assert!(matches!(vm.pause(), Err(vmm::ControlError::AlreadyPaused)));
    vm.resume().unwrap();
    assert!(matches!(vm.resume(), Err(vmm::ControlError::NotPaused)));
    finish(&cfg, vm, &console);
}
