//! `vmm bench boot`: VM creation to the guest's first console line, and
//! whole `hello` runs by vCPU count, next to the cost of the KVM objects alone.

use super::{repeat, BenchError, Figure};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::GuestEnd;
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options of `vmm bench boot`.
#[derive(Debug, Clone, Copy)]
pub struct BootBenchOptions {
    /// Boots per case.
    pub repeats: u32,
}

/// Results of `vmm bench boot`, in milliseconds (the `median_us` field of each
/// figure holds milliseconds here).
#[derive(Debug, Clone, Serialize)]
pub struct BootBench {
    /// Boots per case.
    pub repeats: u32,
    /// Baseline: open /dev/kvm, create a VM with irqchip and one vCPU.
    pub kvm_setup_ms: Figure,
    /// VM creation to the guest's first console byte (1 vCPU, 256 MiB, `hello`).
    pub first_output_ms: Figure,
    /// VM creation to the guest's exit.
    pub total_ms: Figure,
    /// Whole run of `hello` by vCPU count.
    pub total_by_vcpus: Vec<(u32, Figure)>,
}

/// The baseline of a boot: the KVM objects alone.
fn kvm_setup_ms() -> Result<f64, BenchError> {
    use vmm_core::kvm::kvm_err;
    let start = std::time::Instant::now();
    let kvm = vmm_core::kvm::open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("VM creation"))?;
    vm.create_irq_chip().map_err(kvm_err("irqchip creation"))?;
    let _vcpu = vm.create_vcpu(0).map_err(kvm_err("vCPU creation"))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn hello(vcpus: u32) -> Result<crate::RunOutcome, BenchError> {
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus,
        mem_size: 256 << 20,
        cmdline: "workload=hello".into(),
        memory: MemoryConfig::default(),
    };
    let options = VmOptions {
        serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
        timeout: Some(Duration::from_secs(60)),
        ..VmOptions::default()
    };
    let outcome = crate::run_vm(&cfg, options)?;
    if outcome.end != GuestEnd::Exited(0) {
        return Err(BenchError::BadRun {
            end: outcome.end.to_string(),
            console: String::new(),
        });
    }
    Ok(outcome)
}

/// Runs `vmm bench boot`.
pub fn boot(opts: BootBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BootBench, BenchError> {
    let n = opts.repeats.max(1);
    progress("KVM setup baseline");
    let kvm_setup_ms = repeat(n, kvm_setup_ms)?;
    progress("boots of the bundled guest");
    let mut first = Vec::new();
    let mut total = Vec::new();
    for _ in 0..n {
        let o = hello(1)?;
        first.push(o.first_output.unwrap_or_default().as_secs_f64() * 1e3);
        total.push(o.elapsed.as_secs_f64() * 1e3);
    }
    let mut total_by_vcpus = Vec::new();
    for vcpus in [1, 2, 4, 8] {
        progress(&format!("boots with {vcpus} vCPUs"));
        total_by_vcpus.push((
            vcpus,
            repeat(n, || Ok(hello(vcpus)?.elapsed.as_secs_f64() * 1e3))?,
        ));
    }
    Ok(BootBench {
        repeats: n,
        kvm_setup_ms,
        first_output_ms: Figure::of(first),
        total_ms: Figure::of(total),
        total_by_vcpus,
    })
}

impl std::fmt::Display for BootBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, x: &Figure| {
            writeln!(
                f,
                "  {name:<52} {:>8.2} ms ({:.2}-{:.2})",
                x.median_us, x.min_us, x.max_us
            )
        };
        writeln!(f, "boot benchmark: median of {} boots (min-max)", self.repeats)?;
        row(f, "baseline: /dev/kvm, VM, irqchip, one vCPU", &self.kvm_setup_ms)?;
        row(
            f,
            "VM creation to the guest's first console line",
            &self.first_output_ms,
        )?;
        row(
            f,
            "VM creation to the guest's exit (hello, 1 vCPU)",
            &self.total_ms,
        )?;
        for (v, x) in &self.total_by_vcpus {
            row(f, &format!("hello on {v} vCPUs, whole run"), x)?;
        }
        Ok(())
    }
}
