//! How a run ends: [`GuestEnd`], the process exit codes, the [`RunOutcome`]
//! with every statistic, and the host's check of a workload's results.

use abi::pv::WorkloadReport;
use abi::workload;
use std::time::Duration;
use vmm_core::config::{KernelSource, VmConfig};
use vmm_core::memory::MemoryStats;
use vmm_core::vcpu::VcpuStatsSnapshot;
use vmm_core::vcpu::VcpuStopped;

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote this code to the debug-exit port.
    Exited(u32),
    /// A vCPU stopped on an exit the guest cannot recover from.
    Crashed(VcpuStopped),
    /// `VmOptions::timeout` passed first.
    TimedOut(Duration),
    /// A guest page could not be served by the memory backend (the page was not
    /// zero-filled; the VM was stopped). The message names the page and the cause.
    MemoryFault(String),
    /// A control request stopped the run.
    Stopped,
    /// The VM migrated to another VMM (`vmm ctl PATH migrate`); the summary.
    Migrated(String),
    /// A shutdown signal (SIGINT, SIGTERM, SIGHUP) ended the run.
    Signal(i32),
}

impl std::fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestEnd::Exited(code) => write!(f, "exited with code {code}"),
            GuestEnd::Crashed(s) => write!(f, "crashed on vCPU {}: {}", s.cpu, s.reason),
            GuestEnd::TimedOut(t) => write!(f, "timed out after {t:?}"),
            GuestEnd::MemoryFault(m) => write!(f, "memory fault: {m}"),
            GuestEnd::Stopped => write!(f, "stopped on request"),
            GuestEnd::Migrated(s) => write!(f, "migrated: {s}"),
            GuestEnd::Signal(sig) => write!(f, "ended by signal {sig}"),
        }
    }
}

/// Process exit code when a vCPU crashed (triple fault, emulator error...).
pub const EXIT_CRASHED: i32 = 10;
/// Process exit code when the run timed out.
pub const EXIT_TIMED_OUT: i32 = 11;
/// Process exit code when the host-side check of a workload result failed.
pub const EXIT_BAD_RESULT: i32 = 12;
/// Process exit code when guest memory could not be served (memory backend failure).
pub const EXIT_MEMORY_FAULT: i32 = 13;
/// Process exit code when a control request stopped the run.
pub const EXIT_STOPPED: i32 = 14;
/// A guest's exit code `c` other than 0 becomes the process exit code
/// `EXIT_GUEST_BASE + c` (`c` up to 31; larger codes give 63), so a guest's
/// code is never mistaken for one of the VMM's own (10-14, 64, 128 + signal).
pub const EXIT_GUEST_BASE: i32 = 32;

/// The process exit code of a guest exit code (see [`EXIT_GUEST_BASE`]).
pub fn guest_exit_code(code: u32) -> i32 {
    match code {
        0 => 0,
        c @ 1..=31 => EXIT_GUEST_BASE + i32::try_from(c).unwrap_or(31),
        _ => EXIT_GUEST_BASE + 31,
    }
}

/// Process exit code for VMM errors (configuration, KVM, loading).
pub const EXIT_VMM_ERROR: i32 = 64;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub end: GuestEnd,
    /// Workload reports received from the guest, by vCPU.
    pub reports: Vec<WorkloadReport>,
    /// Time from the start of VM creation to the guest's first console byte.
    pub first_output: Option<Duration>,
    /// Time from the start of VM creation to the end of the run.
    pub elapsed: Duration,
    /// Per-vCPU counters.
    pub vcpu_stats: Vec<VcpuStatsSnapshot>,
    /// Requests the guest sent that the VMM rejected.
    pub bad_requests: Vec<String>,
    /// Retry-core statistics, when guest RAM is lazily backed.
    pub memory: Option<MemoryStats>,
    /// The guest's TSC frequency in kHz (converts reported cycles to time).
    pub tsc_khz: Option<u32>,
    /// Guest kernel fault statistics (page-store device, `abi::pv::store::STATS`).
    pub guest_stats: Option<abi::pv::store::GuestStats>,
    /// The working-set recording: what was written, or why it was not.
    pub working_set: Option<Result<crate::snapshot::working_set::RecordSummary, String>>,
    /// The snapshot taken at the guest's checkpoint (or why it failed).
    pub checkpoint: Option<Result<crate::snapshot::SnapshotInfo, String>>,
    /// Time from the start of VM creation to the last workload report.
    pub last_report: Option<Duration>,
}

impl RunOutcome {
    /// The combined checksum of all reports.
    pub fn checksum(&self) -> u64 {
        self.reports
            .iter()
            .fold(0, |t, r| workload::combine(t, r.checksum))
    }

    /// The exit code the `vmm` process uses.
    pub fn exit_code(&self) -> i32 {
        match &self.end {
            GuestEnd::Exited(code) => guest_exit_code(*code),
            GuestEnd::Crashed(_) => EXIT_CRASHED,
            GuestEnd::TimedOut(_) => EXIT_TIMED_OUT,
            GuestEnd::MemoryFault(_) => EXIT_MEMORY_FAULT,
            GuestEnd::Stopped => EXIT_STOPPED,
            GuestEnd::Migrated(_) => 0,
            GuestEnd::Signal(sig) => 128 + sig,
        }
    }

    /// The run's statistics as JSON (`vmm run --stats`).
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "end": self.end.to_string(),
            "exit_code": self.exit_code(),
            "elapsed_ms": self.elapsed.as_secs_f64() * 1e3,
            "first_output_ms": self.first_output.map(|d| d.as_secs_f64() * 1e3),
            "checksum": format!("{:#018x}", self.checksum()),
            "vcpus": self.vcpu_stats,
            "memory": self.memory,
            // Guest kernel's own (stage-1) fault figures, next to the host's.
            "guest": self.guest_stats,
            "working_set": self.working_set.as_ref().map(|w| match w {
                Ok(s) => serde_json::json!(s),
                Err(e) => serde_json::json!({ "error": e }),
            }),
            "last_report_ms": self.last_report.map(|d| d.as_secs_f64() * 1e3),
        })
    }
}

/// Why the host's check of a workload's results failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The command line does not parse (a config that skipped validation).
    #[error("the command line does not parse: {0}")]
    Cmdline(String),
    /// A vCPU sent no report.
    #[error("vCPU {0} sent no workload report")]
    Missing(u32),
    /// A report names a vCPU the VM does not have.
    #[error("a workload report names vCPU {0}, which this VM does not have")]
    NoSuchVcpu(u32),
    /// A vCPU reported twice.
    #[error("vCPU {0} sent more than one workload report")]
    Twice(u32),
    /// A vCPU touched other pages than its share.
    #[error("vCPU {cpu} touched pages {got_first}..{got_end} instead of {first}..{end}")]
    WrongPages {
        /// vCPU.
        cpu: u32,
        /// Reported first page.
        got_first: u64,
        /// Reported end.
        got_end: u64,
        /// Expected first page.
        first: u64,
        /// Expected end.
        end: u64,
    },
    /// The checksum is wrong.
    #[error("vCPU {cpu} checksum {got:#018x}, expected {expected:#018x}")]
    Checksum {
        /// vCPU.
        cpu: u32,
        /// Reported.
        got: u64,
        /// Computed.
        expected: u64,
    },
}

/// The host's check of the workload results against the command line, for
/// the bundled kernel: `Ok(None)` when there is nothing to check. Reports
/// count only from vCPUs that exist, once each.
pub fn verify_reports(config: &VmConfig, outcome: &RunOutcome) -> Result<Option<u64>, VerifyError> {
    if config.kernel != KernelSource::Bundled {
        return Ok(None);
    }
    let wl = workload::parse_cmdline(&config.cmdline).map_err(|e| VerifyError::Cmdline(e.to_string()))?;
    if !wl.kind.touches_pages() {
        return Ok(None);
    }
    let mut seen = vec![false; config.vcpus as usize];
    for r in &outcome.reports {
        match seen.get_mut(r.cpu as usize) {
            None => return Err(VerifyError::NoSuchVcpu(r.cpu)),
            Some(true) => return Err(VerifyError::Twice(r.cpu)),
            Some(s) => *s = true,
        }
    }
    let mut total = 0;
    for cpu in 0..config.vcpus {
        let plan = workload::task_plan(&wl, config.vcpus, cpu);
        let (first, pages) = (plan.first_page, plan.pages);
        let expected = workload::task_checksum(wl.kind, &plan, wl.pattern, wl.write, wl.seed);
        let r = outcome
            .reports
            .iter()
            .find(|r| r.cpu == cpu)
            .ok_or(VerifyError::Missing(cpu))?;
        if (r.first_page, r.pages) != (first, pages) {
            return Err(VerifyError::WrongPages {
                cpu,
                got_first: r.first_page,
                got_end: r.first_page.saturating_add(r.pages),
                first,
                end: first + pages,
            });
        }
        if r.checksum != expected {
            return Err(VerifyError::Checksum {
                cpu,
                got: r.checksum,
                expected,
            });
        }
        total = workload::combine(total, expected);
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_codes_have_their_own_range() {
        assert_eq!(guest_exit_code(0), 0);
        assert_eq!(guest_exit_code(1), 33);
        assert_eq!(guest_exit_code(4), 36);
        assert_eq!(guest_exit_code(31), 63);
        assert_eq!(guest_exit_code(u32::MAX), 63);
        for c in 1..=1000 {
            let p = guest_exit_code(c);
            assert!((33..=63).contains(&p), "{c} -> {p}");
            for own in [
                EXIT_CRASHED,
                EXIT_TIMED_OUT,
                EXIT_BAD_RESULT,
                EXIT_MEMORY_FAULT,
                EXIT_STOPPED,
                EXIT_VMM_ERROR,
            ] {
                assert_ne!(p, own);
            }
        }
    }
}
