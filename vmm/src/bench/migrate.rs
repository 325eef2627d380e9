//! `vmm bench migrate`: live migration of a running 1 GiB guest over a
//! loopback Unix socket (or, `--tls`, TCP with TLS and pinned
//! certificates), post-copy only and after pre-copy rounds.

use super::{start_touch, BenchError};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::{verify_reports, GuestEnd};
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One run of `vmm bench migrate`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRun {
    /// Pre-copy rounds asked for (0: pure post-copy).
    pub precopy_rounds: u32,
    /// Pages sent while the VM ran, all rounds.
    pub precopy_pages: u64,
    /// Start of the migration to the switchover.
    pub precopy_ms: f64,
    /// Opening both connections, TLS handshakes included (before the pause).
    pub connect_ms: f64,
    /// Data pages sent after the switchover.
    pub data_pages: u64,
    /// Source pause to the destination running (source's clock, one trip included).
    pub downtime_ms: f64,
    /// Source pause to the last page acknowledged.
    pub total_ms: f64,
    /// Pages the destination requested / pages pushed in the background.
    pub pages_requested: u64,
    /// See `pages_requested`.
    pub pages_pushed: u64,
    /// Page-request latency (request to arrival, while the push runs), bucket upper bounds.
    pub request_p50_us: u64,
    /// See `request_p50_us`.
    pub request_p99_us: u64,
    /// vCPU time blocked in stage-2 faults on the destination.
    pub vcpu_blocked_ms: f64,
    /// The background push's order.
    pub push_order: crate::migration::PushOrder,
}

/// `vmm bench migrate`: post-copy migration of a running 1 GiB guest over a
/// loopback Unix socket.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateBench {
    /// Guest RAM.
    pub mem_mib: u64,
    /// "unix" or "tls" (TCP loopback, pinned certificates).
    pub transport: String,
    /// Each run.
    pub runs: Vec<MigrateRun>,
}

/// Pre-copy rounds of the `vmm bench migrate` runs: pure post-copy, then
/// three pre-copy rounds first.
const MIGRATE_ROUNDS: [u32; 2] = [0, 3];

/// Runs `vmm bench migrate`: a 1 GiB guest touching pages is migrated
/// mid-run over loopback, `repeats` times without and with pre-copy
/// (interleaved); the workload must finish on the destination with the right
/// checksums.
pub fn migrate(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<MigrateBench, BenchError> {
    migrate_with(repeats, false, progress)
}

/// [`migrate`], over TCP loopback with TLS and pinned certificates if `tls`.
pub fn migrate_with(
    repeats: u32,
    tls: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrateBench, BenchError> {
    migrate_runs(
        repeats,
        tls,
        &[crate::migration::PushOrder::Address],
        "workload=touch pages=120000 pattern=rand",
        progress,
    )
}

/// `vmm bench migrate --push-orders`: the same migrations of a guest
/// touching a hot set (10% of 40000 pages take 90% of 400000 accesses),
/// the push in address order and in recency order (interleaved): faults
/// after the switchover (pages requested) and vCPU time blocked.
pub fn migrate_push_orders(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<MigrateBench, BenchError> {
    use crate::migration::PushOrder;
    migrate_runs(
        repeats,
        false,
        &[PushOrder::Address, PushOrder::Recency],
        "workload=touch pages=40000 pattern=hot:10:90 accesses=400000",
        progress,
    )
}

fn migrate_runs(
    repeats: u32,
    tls: bool,
    orders: &[crate::migration::PushOrder],
    cmdline: &str,
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
    let mem_mib = 1024;
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus: 2,
        mem_size: mem_mib << 20,
        cmdline: cmdline.into(),
        memory: MemoryConfig::default(),
    };
    let mut runs = Vec::new();
    let cases: Vec<(u32, u32, crate::migration::PushOrder)> = (0..repeats.max(1))
        .flat_map(|i| {
            MIGRATE_ROUNDS
                .into_iter()
                .flat_map(move |r| orders.iter().map(move |&o| (i, r, o)))
        })
        .collect();
    for (i, precopy_rounds, push_order) in cases {
        progress(&format!(
            "migration {} of a {mem_mib} MiB guest, {precopy_rounds} pre-copy rounds, push order {push_order:?}",
            i + 1
        ));
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
                wait: None,
                vm: VmOptions {
                    serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
                    timeout: Some(Duration::from_secs(300)),
                    ..VmOptions::default()
                },
                lost_wait: Duration::from_secs(1),
                progress: Default::default(),
            };
            crate::receive::receive(&listener, opts, |_| {})
        });
        let (vm, _console) = start_touch(&cfg, Duration::from_secs(300))?;
        // Let the guest fill a good part of its memory first.
        std::thread::sleep(Duration::from_millis(4000));
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
            precopy_rounds,
            precopy_pages: summary.precopy_pages,
            precopy_ms: summary.precopy_ms,
            connect_ms: summary.connect_ms,
            data_pages: summary.data_pages,
            downtime_ms: summary.downtime_ms,
            total_ms: summary.total_ms,
            pages_requested: summary.pages_requested,
            pages_pushed: summary.pages_pushed,
            request_p50_us: s.latency_p50_us,
            request_p99_us: s.latency_p99_us,
            vcpu_blocked_ms: s.vcpu_blocked_us as f64 / 1e3,
            push_order,
        });
    }
    if tls {
        let _ = std::fs::remove_dir_all(&keys);
    }
    Ok(MigrateBench {
        mem_mib,
        transport: if tls { "tls" } else { "unix" }.into(),
        runs,
    })
}

impl std::fmt::Display for MigrateBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "migrate benchmark: live migration of a running {} MiB guest over {}",
            self.mem_mib,
            if self.transport == "tls" {
                "loopback TCP with TLS (pinned certificates)"
            } else {
                "a loopback Unix socket"
            }
        )?;
        for r in &self.runs {
            if r.precopy_rounds == 0 {
                write!(f, "  post-copy only:                              ")?;
            } else {
                write!(
                    f,
                    "  {} pre-copy rounds: {:>7} pages in {:>6.1} ms, then",
                    r.precopy_rounds, r.precopy_pages, r.precopy_ms
                )?;
            }
            writeln!(
                f,
                " {:>7} post-copy pages ({:?} order): connect {:>5.1} ms, downtime {:>6.1} ms, total {:>7.1} ms, {} requested / {} pushed, request latency p50 <{} us p99 <{} us, vCPUs blocked {:.1} ms",
                r.data_pages,
                r.push_order,
                r.connect_ms,
                r.downtime_ms,
                r.total_ms,
                r.pages_requested,
                r.pages_pushed,
                r.request_p50_us,
                r.request_p99_us,
                r.vcpu_blocked_ms
            )?;
        }
        Ok(())
    }
}
