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
        memory: Default::default(),
    }
}

/// Options capturing the console into the returned buffer, with a 120 s guard
/// against hangs (not a performance goal).
pub fn capture_options() -> (VmOptions, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(buf.clone()),
        stdin: false,
        timeout: Some(Duration::from_secs(120)),
        ..VmOptions::default()
    };
    (options, buf)
}

/// Runs a built VM to its end.
pub fn run(vm: vmm::Vm, console: &Mutex<Vec<u8>>) -> Run {
    let outcome = vm.run().unwrap_or_else(|e| panic!("VM failed: {e}"));
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    Run { outcome, console }
}

/// Boots `config` and waits for the end.
pub fn boot(config: &VmConfig) -> Run {
    let (options, buf) = capture_options();
    let vm = vmm::Vm::new(config, options).unwrap_or_else(|e| panic!("VM setup failed: {e}"));
    run(vm, &buf)
}

/// Removes the file on drop.
#[derive(Debug)]
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    /// A sparse file of `len` zero bytes in the temp directory.
    pub fn zeros(name: &str, len: u64) -> TempFile {
        let path = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The checksum each vCPU must report for a touch workload with the default
/// options (`populate` does not change it; for `shared=1` use
/// `abi::workload::task_plan` directly), computed here without touching memory:
/// `(cpu, first_page, pages, checksum)`.
pub fn expected_touch(
    vcpus: u32,
    pages: u64,
    pattern: Pattern,
    write: bool,
    seed: u64,
) -> Vec<(u32, u64, u64, u64)> {
    let cfg = workload::WorkloadConfig {
        kind: workload::WorkloadKind::Touch,
        pages,
        pattern,
        write,
        seed,
        ..Default::default()
    };
    (0..vcpus)
        .map(|cpu| {
            let plan = workload::task_plan(&cfg, vcpus, cpu);
            let sum = plan.checksum(pattern, write, seed);
            (cpu, plan.first_page, plan.pages, sum)
        })
        .collect()
}
