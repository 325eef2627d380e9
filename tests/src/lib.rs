//! Helpers for the integration tests: boot the bundled guest in-process on real
//! KVM with the console captured, and compute what the guest must report.
#![allow(clippy::unwrap_used)]

use abi::workload::{self, Pattern};
use devices::serial::SerialOutput;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::{KernelSource, RunOutcome, VmConfig, VmOptions};

/// A finished run and its console output.
#[derive(Debug)]
pub struct Run {
    /// What the VMM returned.
    pub outcome: RunOutcome,
    /// Everything the guest printed.
    pub console: String,
}

/// A configuration for the bundled kernel.
pub fn config(vcpus: u32, mem: &str, cmdline: &str) -> VmConfig {
    VmConfig {
        kernel: KernelSource::Bundled,
        vcpus,
        mem_size: vmm::config::parse_size(mem).unwrap(),
        cmdline: cmdline.into(),
    }
}

/// Boots `config` and waits for the end (at most 120 s: a guard against hangs).
pub fn boot(config: &VmConfig) -> Run {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(buf.clone()),
        stdin: false,
        timeout: Some(Duration::from_secs(120)),
    };
    let outcome = vmm::run_vm(config, options).unwrap_or_else(|e| panic!("VM failed: {e}"));
    let console = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    Run { outcome, console }
}

/// The checksum each vCPU must report for a touch workload, computed here
/// without touching memory: `(cpu, first_page, pages, checksum)`.
pub fn expected_touch(vcpus: u32, pages: u64, pattern: Pattern, write: bool, seed: u64) -> Vec<(u32, u64, u64, u64)> {
    (0..vcpus)
        .map(|cpu| {
            let (first, n) = workload::share(pages, vcpus, cpu);
            (cpu, first, n, workload::expected_checksum(first, n, pattern, write, seed))
        })
        .collect()
}
