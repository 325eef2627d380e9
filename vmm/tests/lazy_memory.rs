//! Guest RAM served through userfaultfd by the retry core: the bundled guest
//! boots, touches pages and reports checksums the host verifies, and every
//! touched page went through the handler.
#![allow(clippy::unwrap_used)]

use devices::serial::SerialOutput;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::vm::verify_reports;
use vmm::{KernelSource, MemBackend, MemoryConfig, RunOutcome, VmConfig, VmOptions};

const PAGES: u64 = 2000;

fn config(vcpus: u32, mem: &str) -> VmConfig {
    VmConfig {
        kernel: KernelSource::Bundled,
        vcpus,
        mem_size: vmm::config::parse_size(mem).unwrap(),
        cmdline: format!("workload=touch pages={PAGES} pattern=rand"),
    }
}

fn boot(config: &VmConfig, memory: &MemoryConfig) -> (RunOutcome, String) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(buf.clone()),
        stdin: false,
        timeout: Some(Duration::from_secs(120)),
    };
    let outcome = vmm::run_vm_with_memory(config, memory, options).unwrap_or_else(|e| panic!("VM failed: {e}"));
    let console = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    (outcome, console)
}

fn check_verified(config: &VmConfig, outcome: &RunOutcome, console: &str) {
    assert_eq!(outcome.exit_code(), 0, "end {:?}, console:\n{console}", outcome.end);
    assert!(matches!(verify_reports(config, outcome), Ok(Some(_))), "console:\n{console}");
}

fn zero_backend(vcpus: u32) {
    let cfg = config(vcpus, "256M");
    // No fault-around: one userfault per touched page, so the count is exact.
    let mem = MemoryConfig { backend: MemBackend::Zero, fault_around: Some(0) };
    let (outcome, console) = boot(&cfg, &mem);
    check_verified(&cfg, &outcome, &console);
    let m = outcome.memory.as_ref().expect("memory statistics");
    assert_eq!(m.backend, "zero");
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    assert!(m.total.faults >= PAGES, "only {} faults for {PAGES} touched pages", m.total.faults);
    assert!(m.total.pages_zeroed >= PAGES, "{:?}", m.total);
    assert_eq!(m.total.pages_copied, 0);
    assert_eq!(m.total.latency_us_log2.iter().sum::<u64>(), m.total.faults);
    let json = outcome.stats_json();
    assert_eq!(json["memory"]["total"]["faults"], m.total.faults);
    assert_eq!(json["vcpus"].as_array().map(Vec::len), Some(vcpus as usize));
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
    let cfg = config(1, "128M");
    let (outcome, console) = boot(&cfg, &MemoryConfig::default());
    check_verified(&cfg, &outcome, &console);
    assert!(outcome.memory.is_none());
}

/// Removes the file on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn file_backend_serves_pages_from_the_file() {
    let cfg = config(2, "128M");
    let path = std::env::temp_dir().join(format!("vmm-lazy-mem-{}.img", std::process::id()));
    let file = TempFile(path);
    // A sparse file of zeros: the guest expects fresh RAM to be zero.
    std::fs::File::create(&file.0).unwrap().set_len(cfg.mem_size).unwrap();
    let mem = MemoryConfig::lazy(MemBackend::File { path: file.0.clone(), offset: 0 });
    let (outcome, console) = boot(&cfg, &mem);
    check_verified(&cfg, &outcome, &console);
    let m = outcome.memory.as_ref().expect("memory statistics");
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
    let cfg = config(1, "128M");
    let path = std::env::temp_dir().join(format!("vmm-lazy-bad-{}.img", std::process::id()));
    let file = TempFile(path);
    let f = std::fs::File::create(&file.0).unwrap();
    f.set_len(cfg.mem_size).unwrap();
    let mem = MemoryConfig { backend: MemBackend::File { path: file.0.clone(), offset: 0 }, fault_around: Some(0) };
    let buf = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(buf.clone()),
        stdin: false,
        timeout: Some(Duration::from_secs(120)),
    };
    let vm = vmm::Vm::with_memory(&cfg, &mem, options).unwrap();
    // The source opened a file of the memory's size; cut it under the VM, so
    // reads of pages the guest has not touched yet fail (unexpected EOF).
    f.set_len(0).unwrap();
    let outcome = vm.run().unwrap();
    let msg = match &outcome.end {
        vmm::GuestEnd::MemoryFault(msg) => msg.clone(),
        other => panic!("expected a memory fault, got {other:?}"),
    };
    eprintln!("memory fault: {msg}");
    assert_eq!(outcome.exit_code(), vmm::vm::EXIT_MEMORY_FAULT);
    assert!(msg.contains("guest page 0x") && msg.contains("file:") && msg.contains("not zero-filled"), "{msg}");
    let m = outcome.memory.as_ref().expect("memory statistics");
    assert!(!m.failures.is_empty());
    assert_eq!(m.total.pages_copied + m.total.pages_zeroed, m.total.faults, "the failed page was not filled");
}
