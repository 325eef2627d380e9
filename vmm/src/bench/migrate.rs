//! `vmm bench migrate`: live migration of a running 1 GiB guest over a
//! loopback Unix socket (or, `--tls`, TCP with TLS and pinned
//! certificates), post-copy only and after pre-copy rounds; and
//! (`--push-orders`) the background push in address and in recency order.

use super::{start_touch, start_until, BenchError};
use crate::config::{KernelSource, MemBacking, MemoryConfig, VmConfig};
use crate::controller::{verify_reports, GuestEnd};
use crate::migration::PushOrder;
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One run of `vmm bench migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRun {
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// `touch` (downtime runs), `dirty` (request-latency runs: the guest
    /// rewrites its pages on the destination while the push runs) or `hot`
    /// (push-order runs: the guest touches a hot set).
    pub workload: String,
    /// Pre-copy rounds asked for (0: pure post-copy).
    pub precopy_rounds: u32,
    /// Pages sent while the VM ran, all rounds.
    pub precopy_pages: u64,
    /// Start of the migration to the switchover.
    pub precopy_ms: f64,
    /// Opening both connections, TLS handshakes included (before the pause).
    pub connect_ms: f64,
    /// The source, ready to pause, waiting for the destination's `Ready`.
    #[serde(default)]
    pub ready_wait_ms: f64,
    /// Building the destination VM (before the pause).
    pub build_ms: f64,
    /// Data pages sent after the switchover.
    pub data_pages: u64,
    /// Of those, zero pages (sent as addresses).
    pub zero_pages: u64,
    /// Source pause to the destination's `Resumed` (source's clock, both trips included).
    pub downtime_ms: f64,
    /// Source pause to the destination's vCPUs started (one host, one wall
    /// clock): the downtime without `Resumed`'s trip back.
    #[serde(default)]
    pub downtime_to_vcpus_ms: f64,
    /// The source's downtime parts.
    pub downtime: crate::migration::Downtime,
    /// The destination's part, by part.
    pub destination: crate::migration::incoming::DestDowntime,
    /// Source pause to the last page acknowledged.
    pub total_ms: f64,
    /// Pages the destination requested / pages pushed in the background.
    pub pages_requested: u64,
    /// See `pages_requested`.
    pub pages_pushed: u64,
    /// Page-request latency (request to arrival), exact, from every sample.
    pub requests: crate::migration::Percentiles,
    /// vCPU time blocked in stage-2 faults on the destination.
    pub vcpu_blocked_ms: f64,
    /// The background push's order.
    #[serde(default)]
    pub push_order: PushOrder,
    /// The destination's `--mem-backing` (`anon`, `memfd`, `hugetlb:2M`..).
    #[serde(default)]
    pub backing: String,
}

/// `vmm bench migrate`: live migrations of running guests over loopback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateBench {
    /// Guest RAM sizes, MiB.
    pub mem_mib: Vec<u64>,
    /// "unix" or "tls" (TCP loopback, pinned certificates).
    pub transport: String,
    /// Each run.
    pub runs: Vec<MigrateRun>,
}

/// Pre-copy rounds of the `vmm bench migrate` runs: pure post-copy, then
/// three pre-copy rounds first.
const MIGRATE_ROUNDS: [u32; 2] = [0, 3];

/// Guest sizes of `vmm bench migrate`, MiB.
pub const MIGRATE_MEM_MIB: [u64; 2] = [1024, 4096];

/// Runs `vmm bench migrate` at 1 GiB only (as part of `vmm bench all`).
pub fn migrate(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<MigrateBench, BenchError> {
    migrate_with(repeats, false, &[1024], &[MemBacking::Anon], progress)
}

/// What the migrated guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Touches pages at random (downtime runs).
    Touch,
    /// Rewrites its pages as fast as it can (request-latency runs).
    Dirty,
    /// Touches a hot set: 10% of 40000 pages take 90% of 400000 accesses
    /// (push-order runs).
    Hot,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Touch => "touch",
            Workload::Dirty => "dirty",
            Workload::Hot => "hot",
        }
    }

    fn cmdline(self) -> &'static str {
        match self {
            // Each vCPU writes 20000 pages, then rewrites them in turn as
            // fast as it can: on the destination, every page not pushed
            // yet is a request.
            Workload::Dirty => "workload=dirty pages=40000 rate=10000000 duration_ms=3000",
            Workload::Touch => "workload=touch pages=120000 pattern=rand",
            Workload::Hot => "workload=touch pages=40000 pattern=hot:10:90 accesses=400000",
        }
    }
}

/// One migration to run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    mem_mib: u64,
    backing: MemBacking,
    precopy_rounds: u32,
    workload: Workload,
    push_order: PushOrder,
}

/// `vmm bench migrate --push-orders`: migrations of a 1 GiB guest touching
/// a hot set, without and with pre-copy, the push in address order and in
/// recency order (all interleaved): faults after the switchover (pages
/// requested) and vCPU time blocked.
pub fn migrate_push_orders(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<MigrateBench, BenchError> {
    let mut plans = Vec::new();
    for _ in 0..repeats.max(1) {
        for precopy_rounds in MIGRATE_ROUNDS {
            for push_order in [PushOrder::Address, PushOrder::Recency] {
                plans.push(Plan {
                    mem_mib: 1024,
                    backing: MemBacking::Anon,
                    precopy_rounds,
                    workload: Workload::Hot,
                    push_order,
                });
            }
        }
    }
    migrate_plans(plans, false, &[1024], progress)
}

/// Runs `vmm bench migrate`: for each size in `mems` (MiB), a guest
/// touching pages is migrated mid-run over loopback, `repeats` times
/// without and with pre-copy (all interleaved), and once per repeat a guest
/// that rewrites its pages is migrated by post-copy (its requests while the
/// push runs); every workload must finish on the destination with the right
/// checksums. `tls`: over TCP with TLS and pinned certificates. Each run
/// is made once per destination backing in `backings`, interleaved (on
/// huge pages the destination assembles the 4 KiB pages it receives into
/// whole huge pages; reserve them first).
pub fn migrate_with(
    repeats: u32,
    tls: bool,
    mems: &[u64],
    backings: &[MemBacking],
    progress: &mut dyn FnMut(&str),
) -> Result<MigrateBench, BenchError> {
    let mut plans = Vec::new();
    for _ in 0..repeats.max(1) {
        for &mem_mib in mems {
            for precopy_rounds in MIGRATE_ROUNDS {
                for &backing in backings {
                    plans.push(Plan {
                        mem_mib,
                        backing,
                        precopy_rounds,
                        workload: Workload::Touch,
                        push_order: PushOrder::Address,
                    });
                }
            }
        }
        for &mem_mib in mems {
            for &backing in backings {
                plans.push(Plan {
                    mem_mib,
                    backing,
                    precopy_rounds: 0,
                    workload: Workload::Dirty,
                    push_order: PushOrder::Address,
                });
            }
        }
    }
    migrate_plans(plans, tls, mems, progress)
}

/// Runs `plans` in order (every workload must finish on the destination
/// with the right checksums).
fn migrate_plans(
    plans: Vec<Plan>,
    tls: bool,
    mems: &[u64],
    progress: &mut dyn FnMut(&str),
) -> Result<MigrateBench, BenchError> {
    use crate::migration::{Endpoint, Listener, Security, TlsFiles};
    use crate::receive::ReceiveOptions;
    let bad = |end: String| BenchError::BadRun {
        end,
        console: String::new(),
    };
    // Keys for both ends, made here and removed at the end.
    let keys = std::env::temp_dir().join(format!("vmm-bench-mig-{}-keys", std::process::id()));
    let security = |me: &str, peer: &str| -> Result<Security, BenchError> {
        if !tls {
            return Ok(Security::default());
        }
        let files = TlsFiles {
            cert: Some(keys.join(me).join("cert.pem")),
            key: Some(keys.join(me).join("key.pem")),
            peer: Some(keys.join(peer).join("cert.pem")),
            psk: None,
        };
        Security::from_files(&files, false).map_err(|e| bad(e.to_string()))
    };
    if tls {
        let _ = std::fs::remove_dir_all(&keys);
        for side in ["src", "dst"] {
            crate::migration::tls::keygen(&keys.join(side), false).map_err(|e| bad(e.to_string()))?;
        }
    }
    let mut runs = Vec::new();
    for plan in plans {
        let Plan {
            mem_mib,
            backing,
            precopy_rounds,
            workload,
            push_order,
        } = plan;
        let dirty = workload == Workload::Dirty;
        progress(&format!(
            "migration of a {mem_mib} MiB guest onto {backing}, {}",
            match workload {
                Workload::Dirty => "post-copy while the guest rewrites its pages (requests)".to_string(),
                Workload::Touch => format!("{precopy_rounds} pre-copy rounds"),
                Workload::Hot =>
                    format!("hot set, {precopy_rounds} pre-copy rounds, push order {push_order:?}"),
            }
        ));
        let cfg = VmConfig {
            kernel: KernelSource::Bundled,
            vcpus: 2,
            mem_size: mem_mib << 20,
            cmdline: workload.cmdline().into(),
            memory: MemoryConfig::default(),
        };
        let sock = std::env::temp_dir().join(format!("vmm-bench-mig-{}.sock", std::process::id()));
        let at = if tls {
            Endpoint::Tcp("127.0.0.1:0".into())
        } else {
            Endpoint::Unix(sock)
        };
        let listener = Listener::bind_with(&at, security("dst", "src")?).map_err(|e| bad(e.to_string()))?;
        let to = listener.endpoint().map_err(|e| bad(e.to_string()))?;
        let dest = std::thread::spawn(move || {
            let opts = ReceiveOptions {
                handlers: Default::default(),
                wait: None,
                vm: VmOptions {
                    serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
                    timeout: Some(Duration::from_secs(300)),
                    backing,
                    ..VmOptions::default()
                },
                lost_wait: Duration::from_secs(1),
                progress: Default::default(),
            };
            crate::receive::receive(&listener, opts, |_| {})
        });
        let (vm, _console) = if dirty {
            start_until(&cfg, Duration::from_secs(300), "dirty: cpu 1 start")?
        } else {
            let r = start_touch(&cfg, Duration::from_secs(300))?;
            // Let the guest fill a good part of its memory first.
            std::thread::sleep(Duration::from_millis(4000));
            r
        };
        let summary = vm
            .migrate(
                &to,
                &crate::migration::MigrateOptions {
                    precopy_rounds,
                    security: security("src", "dst")?,
                    push_order,
                    ..Default::default()
                },
            )
            .map_err(|e| bad(e.to_string()))?;
        let _ = vm.wait()?;
        let out = dest
            .join()
            .map_err(|_| bad("the destination thread panicked".into()))?
            .map_err(|e| bad(e.to_string()))?;
        if out.run.end != GuestEnd::Exited(0) || !matches!(verify_reports(&out.config, &out.run), Ok(Some(_)))
        {
            return Err(bad(format!("destination: {} ({:?})", out.run.end, out.lost)));
        }
        let s = &out.stats;
        runs.push(MigrateRun {
            mem_mib,
            workload: workload.name().into(),
            precopy_rounds,
            precopy_pages: summary.precopy_pages,
            precopy_ms: summary.precopy_ms,
            connect_ms: summary.connect_ms,
            ready_wait_ms: summary.ready_wait_ms,
            build_ms: s.build_ms,
            data_pages: summary.data_pages,
            zero_pages: summary.zero_pages,
            downtime_ms: summary.downtime_ms,
            downtime_to_vcpus_ms: s
                .vcpus_started_unix_us
                .saturating_sub(summary.downtime.paused_unix_us) as f64
                / 1e3,
            downtime: summary.downtime.clone(),
            destination: s.downtime_parts,
            total_ms: summary.total_ms,
            pages_requested: summary.pages_requested,
            pages_pushed: summary.pages_pushed,
            requests: s.requests,
            vcpu_blocked_ms: s.vcpu_blocked_us as f64 / 1e3,
            push_order,
            backing: backing.to_string(),
        });
    }
    if tls {
        let _ = std::fs::remove_dir_all(&keys);
    }
    Ok(MigrateBench {
        mem_mib: mems.to_vec(),
        transport: if tls { "tls" } else { "unix" }.into(),
        runs,
    })
}

/// Median, min and max of `v` (`(0, 0, 0)` if empty).
pub(crate) fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

impl MigrateBench {
    /// The runs of one size and mode.
    pub fn runs_of(&self, mem_mib: u64, workload: &str, precopy_rounds: u32) -> Vec<&MigrateRun> {
        self.runs
            .iter()
            .filter(|r| r.mem_mib == mem_mib && r.workload == workload && r.precopy_rounds == precopy_rounds)
            .collect()
    }
}

impl std::fmt::Display for MigrateBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "migrate benchmark: live migration of running guests ({} MiB) over {}",
            self.mem_mib
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if self.transport == "tls" {
                "loopback TCP with TLS (pinned certificates)"
            } else {
                "a loopback Unix socket"
            }
        )?;
        for r in &self.runs {
            let mode = match (r.workload.as_str(), r.precopy_rounds) {
                ("dirty", _) => "post-copy, guest rewriting".to_string(),
                ("hot", n) => format!("hot set, {n} rounds, {:?} push", r.push_order),
                (_, 0) => "post-copy".to_string(),
                (_, n) => format!("{n} rounds ({} pages)", r.precopy_pages),
            };
            let d = &r.downtime;
            let t = &r.destination;
            writeln!(
                f,
                "  {:>5} MiB {:<10} {:<28} {:>6} post-copy pages ({} zero): downtime {:>6.2} ms = pause {:.2} + capture {:.2} + page list {:.2} + state out {:.2} + destination {:.2} (check {:.2}, apply {:.2}, start {:.2} of which vCPUs {:.2}); built before: {:.1} ms (waited for {:.1}); total {:>7.1} ms; {} requested / {} pushed; request latency p50 {:.0} us p99 {:.0} us ({} samples); vCPUs blocked {:.1} ms",
                r.mem_mib,
                if r.backing.is_empty() { "anon" } else { &r.backing },
                mode,
                r.data_pages,
                r.zero_pages,
                r.downtime_ms,
                d.pause_ms,
                d.capture_ms,
                d.page_list_ms,
                d.send_state_ms,
                d.destination_ms,
                t.check_ms,
                t.apply_ms,
                t.start_ms,
                t.vcpus_ms,
                r.build_ms,
                r.ready_wait_ms,
                r.total_ms,
                r.pages_requested,
                r.pages_pushed,
                r.requests.p50_us,
                r.requests.p99_us,
                r.requests.count,
                r.vcpu_blocked_ms
            )?;
        }
        writeln!(f, "  summary (median, min-max):")?;
        for &m in &self.mem_mib {
            for (workload, rounds, label) in [
                ("touch", 0, "post-copy"),
                ("touch", 3, "3 rounds"),
                ("dirty", 0, "requests"),
            ] {
                let rs = self.runs_of(m, workload, rounds);
                if rs.is_empty() {
                    continue;
                }
                let (md, lo, hi) = median_min_max(&rs.iter().map(|r| r.downtime_ms).collect::<Vec<_>>());
                write!(
                    f,
                    "    {m:>5} MiB {label:<10} downtime {md:.2} ms ({lo:.2}-{hi:.2})"
                )?;
                if rs.iter().all(|r| r.downtime_to_vcpus_ms > 0.0) {
                    let (vm, vl, vh) =
                        median_min_max(&rs.iter().map(|r| r.downtime_to_vcpus_ms).collect::<Vec<_>>());
                    write!(
                        f,
                        ", to the destination's vCPUs running {vm:.2} ms ({vl:.2}-{vh:.2})"
                    )?;
                }
                let own: Vec<f64> = rs
                    .iter()
                    .map(|r| {
                        let d = &r.downtime;
                        d.page_list_ms + d.send_state_ms + d.destination_part_ms
                    })
                    .collect();
                let (om, ol, oh) = median_min_max(&own);
                write!(
                    f,
                    ", page list + state out + destination's part {om:.2} ms ({ol:.2}-{oh:.2})"
                )?;
                if workload == "dirty" {
                    let (p50, _, _) =
                        median_min_max(&rs.iter().map(|r| r.requests.p50_us).collect::<Vec<_>>());
                    let (p99, l99, h99) =
                        median_min_max(&rs.iter().map(|r| r.requests.p99_us).collect::<Vec<_>>());
                    let n: u64 = rs.iter().map(|r| r.requests.count).min().unwrap_or(0);
                    write!(f, ", requests p50 {p50:.0} us, p99 {p99:.0} us ({l99:.0}-{h99:.0}), at least {n} per run")?;
                }
                writeln!(f)?;
            }
            for rounds in MIGRATE_ROUNDS {
                for order in [PushOrder::Address, PushOrder::Recency] {
                    let rs: Vec<&MigrateRun> = self
                        .runs_of(m, "hot", rounds)
                        .into_iter()
                        .filter(|r| r.push_order == order)
                        .collect();
                    if rs.is_empty() {
                        continue;
                    }
                    let (rq, rl, rh) =
                        median_min_max(&rs.iter().map(|r| r.pages_requested as f64).collect::<Vec<_>>());
                    let (bm, bl, bh) =
                        median_min_max(&rs.iter().map(|r| r.vcpu_blocked_ms).collect::<Vec<_>>());
                    writeln!(
                        f,
                        "    {m:>5} MiB hot set, {rounds} rounds, {order:?} push: {rq:.0} pages requested ({rl:.0}-{rh:.0}), vCPUs blocked {bm:.1} ms ({bl:.1}-{bh:.1})"
                    )?;
                }
            }
        }
        Ok(())
    }
}
