//! Where the fault-handler threads and the vCPU threads run.
//!
//! A stage-2 userfault blocks the vCPU thread until a handler thread fills
//! the page; on this platform a wake-up across CPUs costs about four times a
//! same-CPU one (docs/platform.md), so placement decides the fault cost.
//! Every handler thread of a VM reads the same userfaultfd and every
//! waiting handler is woken by each fault, so the one on the faulting vCPU's
//! CPU (just freed by the blocked vCPU) reads the event first and serves it
//! locally. The measured choice (docs/retry-core.md, "Several handler
//! threads: placement, measured"): one handler thread per CPU used, pinned,
//! the vCPUs pinned round-robin to the same CPUs ([`HandlerPinning::Vcpu`]),
//! and with several vCPUs the handlers under `SCHED_BATCH`.

/// How handler and vCPU threads are pinned (`--handler-pinning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandlerPinning {
    /// The measured default: [`HandlerPinning::Vcpu`], and with several
    /// vCPUs the handler threads under `SCHED_BATCH`.
    #[default]
    Auto,
    /// Nothing pinned: the scheduler places every thread.
    None,
    /// Handler thread `i` pinned to CPU `i` of the set; vCPUs unpinned.
    Cpu,
    /// Handler thread `i` and vCPU `i` pinned to CPU `i` of the set (round robin).
    Vcpu,
}

impl HandlerPinning {
    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            HandlerPinning::Auto => "auto",
            HandlerPinning::None => "none",
            HandlerPinning::Cpu => "cpu",
            HandlerPinning::Vcpu => "vcpu",
        }
    }
}

/// Errors of the placement options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// A pinning name that does not parse.
    #[error("invalid handler pinning `{0}`: use auto, none, cpu (handlers pinned one per CPU) or vcpu (handlers and vCPUs pinned together)")]
    BadPinning(String),
    /// A handler thread count out of range.
    #[error("{0} fault-handler threads is out of range: use 1 to {MAX_HANDLER_THREADS} (or leave it unset for one per CPU used)")]
    BadThreads(u32),
    /// A CPU list that does not parse.
    #[error("invalid CPU list `{0}`: use CPU numbers separated by commas, e.g. 0,1")]
    BadCpus(String),
}

impl std::str::FromStr for HandlerPinning {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<HandlerPinning, PlacementError> {
        match s.trim() {
            "auto" => Ok(HandlerPinning::Auto),
            "none" => Ok(HandlerPinning::None),
            "cpu" => Ok(HandlerPinning::Cpu),
            "vcpu" => Ok(HandlerPinning::Vcpu),
            other => Err(PlacementError::BadPinning(other.to_string())),
        }
    }
}

/// Most fault-handler threads per VM.
pub const MAX_HANDLER_THREADS: u32 = 16;

/// Parses a CPU list `0,1,3`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, PlacementError> {
    let v: Result<Vec<usize>, _> = s.split(',').map(|c| c.trim().parse::<usize>()).collect();
    match v {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(PlacementError::BadCpus(s.to_string())),
    }
}

/// The handler-thread options of a VM (`--fault-handlers`, `--handler-pinning`,
/// `--handler-spin-us`, `--cpus`; the same keys in a config file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandlerConfig {
    /// Handler threads; `None` = one per CPU used (one with a single vCPU).
    pub threads: Option<u32>,
    /// How threads are pinned.
    pub pinning: HandlerPinning,
    /// Short poll of the uffd after serving a fault, before sleeping, in
    /// microseconds (0 = sleep at once, the measured default).
    pub spin_us: u32,
    /// The CPUs to place threads on; `None` = every CPU this process may use
    /// (starting at the one it runs on when there is one vCPU).
    pub cpus: Option<Vec<usize>>,
    /// Run handler threads under `SCHED_BATCH` (their wake-ups do not
    /// preempt a running vCPU); `Auto` pinning does with several vCPUs.
    pub batch: bool,
}

impl HandlerConfig {
    /// Checks the thread count.
    pub fn validate(&self) -> Result<(), PlacementError> {
        match self.threads {
            Some(n) if n == 0 || n > MAX_HANDLER_THREADS => Err(PlacementError::BadThreads(n)),
            _ => Ok(()),
        }
    }
}

/// Where each thread goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    /// One entry per handler thread: the CPU it is pinned to, if any.
    pub handler_cpus: Vec<Option<usize>>,
    /// One entry per vCPU: the CPU it is pinned to, if any.
    pub vcpu_cpus: Vec<Option<usize>>,
    /// Short poll before sleeping, microseconds.
    pub spin_us: u32,
    /// Handler threads under `SCHED_BATCH`.
    pub batch: bool,
}

impl Layout {
    /// One line for people: `2 handler threads on CPUs 0,1; vCPUs on CPUs 0,1`.
    pub fn describe(&self) -> String {
        let list = |v: &[Option<usize>]| -> String {
            v.iter()
                .map(|c| c.map_or("-".to_string(), |c| c.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let spin = if self.spin_us > 0 {
            format!(", {} us poll before sleeping", self.spin_us)
        } else {
            String::new()
        };
        let batch = if self.batch { ", SCHED_BATCH" } else { "" };
        format!(
            "{} handler thread{} on CPUs {}; vCPUs on CPUs {}{spin}{batch}",
            self.handler_cpus.len(),
            if self.handler_cpus.len() == 1 { "" } else { "s" },
            list(&self.handler_cpus),
            list(&self.vcpu_cpus)
        )
    }
}

/// The layout for `vcpus` vCPUs. `allowed` are the CPUs this process may use
/// (ascending), `here` the CPU the caller runs on (a lone vCPU and its handler
/// go there, so concurrent VMMs spread over the host).
///
/// Defaults, measured (docs/retry-core.md): one vCPU: one handler, both on
/// `here`; several: one handler per CPU used (at most one per vCPU), handlers
/// and vCPUs pinned round-robin over the CPUs.
pub fn layout(cfg: &HandlerConfig, vcpus: u32, allowed: &[usize], here: Option<usize>) -> Layout {
    let vcpus = vcpus.max(1) as usize;
    let mut cpus: Vec<usize> = match &cfg.cpus {
        Some(c) => c.clone(),
        None => allowed.to_vec(),
    };
    if cfg.cpus.is_none() && vcpus == 1 {
        if let Some(h) = here.filter(|h| cpus.contains(h)) {
            cpus = vec![h];
        }
    }
    let used = cpus.len().min(vcpus).max(1);
    let threads = cfg.threads.map_or(used, |n| n as usize).max(1);
    let cpu_of = |i: usize| (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
    let (handlers, vcpu_pins) = match cfg.pinning {
        HandlerPinning::None => (false, false),
        HandlerPinning::Cpu => (true, false),
        HandlerPinning::Auto | HandlerPinning::Vcpu => (true, true),
    };
    Layout {
        handler_cpus: (0..threads).map(|i| cpu_of(i).filter(|_| handlers)).collect(),
        vcpu_cpus: (0..vcpus).map(|i| cpu_of(i).filter(|_| vcpu_pins)).collect(),
        spin_us: cfg.spin_us,
        // Measured: with several vCPUs a handler woken by another CPU's
        // fault no longer takes the CPU from its running vCPU (0.76-0.80x
        // -> 0.81-0.85x of the ceiling at 2 vCPUs, docs/retry-core.md).
        batch: cfg.batch || (cfg.pinning == HandlerPinning::Auto && vcpus > 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pin_one_handler_per_cpu_next_to_the_vcpus() {
        let cfg = HandlerConfig::default();
        let one = layout(&cfg, 1, &[0, 1], Some(1));
        assert_eq!(one.handler_cpus, vec![Some(1)]);
        assert_eq!(one.vcpu_cpus, vec![Some(1)]);
        let two = layout(&cfg, 2, &[0, 1], Some(1));
        assert_eq!(two.handler_cpus, vec![Some(0), Some(1)]);
        assert_eq!(two.vcpu_cpus, vec![Some(0), Some(1)]);
        assert!(two.batch && !one.batch, "SCHED_BATCH with several vCPUs only");
        let four = layout(&cfg, 4, &[0, 1], None);
        assert_eq!(four.handler_cpus, vec![Some(0), Some(1)]);
        assert_eq!(four.vcpu_cpus, vec![Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(
            four.describe(),
            "2 handler threads on CPUs 0,1; vCPUs on CPUs 0,1,0,1, SCHED_BATCH"
        );
    }

    #[test]
    fn options_change_the_layout() {
        let cfg = HandlerConfig {
            threads: Some(3),
            pinning: HandlerPinning::Cpu,
            spin_us: 0,
            cpus: Some(vec![1]),
            batch: false,
        };
        let l = layout(&cfg, 2, &[0, 1], Some(0));
        assert_eq!(l.handler_cpus, vec![Some(1); 3]);
        assert_eq!(l.vcpu_cpus, vec![None, None]);
        let none = HandlerConfig {
            pinning: HandlerPinning::None,
            ..HandlerConfig::default()
        };
        let l = layout(&none, 2, &[0, 1], Some(0));
        assert_eq!(
            (l.handler_cpus, l.vcpu_cpus),
            (vec![None, None], vec![None, None])
        );
        assert_eq!("vcpu".parse(), Ok(HandlerPinning::Vcpu));
        assert!("both"
            .parse::<HandlerPinning>()
            .unwrap_err()
            .to_string()
            .contains("use auto"));
        assert_eq!(parse_cpus("0, 1"), Ok(vec![0, 1]));
        assert!(parse_cpus("x").is_err());
        assert!(HandlerConfig {
            threads: Some(0),
            ..HandlerConfig::default()
        }
        .validate()
        .is_err());
    }
}
