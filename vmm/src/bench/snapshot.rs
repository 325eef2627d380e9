//! `vmm bench snapshot`: live against stop-the-world snapshots of 64 MiB,
//! 1 GiB and 4 GiB guests that each wrote the same 24 MiB (the `dirty`
//! workload, 6144 pages on 2 vCPUs; 48 MiB does not fit a 64 MiB guest here,
//! whose kernel leaves 32 MiB of free frames) and keep rewriting it (2000
//! pages/s):
//! downtime (vCPUs paused) and total time, both write-protect modes, cases
//! interleaved in one run so host load hits them alike.

use super::{BenchError, Figure, TempDir};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::live::LiveOptions;
use crate::snapshot::AfterSnapshot;
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_core::memory::WpMode;

/// One memory size.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotFigure {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Bytes saved (of the last live snapshot).
    pub memory_bytes: u64,
    /// Live, pages present at the pause protected: downtime in ms (`*_us` hold ms).
    pub live_downtime_ms: Figure,
    /// Of it: write-protecting (scan + protect), ms.
    pub live_protect_ms: Figure,
    /// Of it: pausing the vCPUs, ms.
    pub live_pause_ms: Figure,
    /// Of it: capturing vCPU, KVM and device state, ms.
    pub live_capture_ms: Figure,
    /// Of it: write-protecting in all, ms.
    pub live_start_ms: Figure,
    /// Of it: resuming, ms.
    pub live_resume_ms: Figure,
    /// Live: request to snapshot in place, ms.
    pub live_total_ms: Figure,
    /// Live, all of RAM protected with WP_UNPOPULATED: downtime, ms.
    pub unpopulated_downtime_ms: Figure,
    /// Of it: write-protecting, ms.
    pub unpopulated_protect_ms: Figure,
    /// Stop the world: the VM paused for the whole snapshot, ms.
    pub stw_ms: Figure,
    /// Guest writes that waited in a WP fault (median per live snapshot).
    pub wp_faults: u64,
    /// Of the live protect time (last run): register, scan, protect, and
    /// all of preparing (register included; before the pause), us.
    pub live_protect_parts_us: [f64; 4],
    /// The same in unpopulated mode.
    pub unpopulated_protect_parts_us: [f64; 4],
}

/// Results of `vmm bench snapshot`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBench {
    /// Snapshots per case.
    pub repeats: u32,
    /// By memory size.
    pub sizes: Vec<SnapshotFigure>,
    /// Live downtime, 4 GiB against 64 MiB (medians; target <= 1.2).
    pub downtime_ratio_largest_to_smallest: f64,
    /// A note on the downtime figures.
    pub note: String,
    /// Dirty tracking, one pre-copy round of a 1 GiB guest memory with 2048
    /// pages written since the last: KVM log (`take`), us (`*_us`).
    pub dirty_round_kvm_us: Figure,
    /// The same with async uffd-WP (`PAGEMAP_SCAN` with WP matching), us.
    pub dirty_round_uffd_wp_us: Figure,
}

/// Cost of one dirty-tracking round over 1 GiB of RAM with 2048 pages
/// written (by the VMM: both trackers count its writes), interleaved.
fn dirty_rounds(n: u32) -> Result<(Figure, Figure), BenchError> {
    use vm_memory::{Bytes, GuestAddress};
    let kvm = vmm_core::kvm::open_kvm()?;
    let vm = Arc::new(kvm.create_vm().map_err(|e| BenchError::BadRun {
        end: format!("KVM_CREATE_VM: {e}"),
        console: String::new(),
    })?);
    let bad = |e: String| BenchError::BadRun {
        end: e,
        console: String::new(),
    };
    let mem = vmm_core::memory::ram::create_guest_memory(1 << 30).map_err(|e| bad(e.to_string()))?;
    vmm_core::memory::ram::register_memslots(&vm, &mem).map_err(|e| bad(e.to_string()))?;
    // 24 MiB in use, as the snapshot guests.
    for p in 0..6144u64 {
        mem.write_obj(1u8, GuestAddress(p * 4096))
            .map_err(|e| bad(e.to_string()))?;
    }
    let write = |round: u64| -> Result<(), BenchError> {
        for i in 0..2048u64 {
            let page = (i * 7919 + round) % (1 << 18);
            mem.write_obj(u8::try_from(round % 256).unwrap_or(0), GuestAddress(page * 4096))
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    };
    let (mut k, mut w) = (Vec::new(), Vec::new());
    for round in 0..u64::from(n.max(1)) * 3 {
        let t =
            vmm_core::memory::DirtyTracker::start(vm.clone(), mem.clone()).map_err(|e| bad(e.to_string()))?;
        write(round)?;
        let s = Instant::now();
        let pages = t.take().map_err(|e| bad(e.to_string()))?;
        k.push(s.elapsed().as_secs_f64() * 1e6);
        drop(t);
        let t = vmm_core::memory::dirty_wp::WpDirtyTracker::start(&mem).map_err(|e| bad(e.to_string()))?;
        write(round + 1)?;
        let s = Instant::now();
        let wp_pages = t.take().map_err(|e| bad(e.to_string()))?;
        w.push(s.elapsed().as_secs_f64() * 1e6);
        if pages.len() != wp_pages.len() {
            return Err(bad(format!(
                "the trackers disagree: KVM log {} pages, uffd-WP {}",
                pages.len(),
                wp_pages.len()
            )));
        }
    }
    Ok((Figure::of(k), Figure::of(w)))
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The guest sizes of `vmm bench snapshot`, MiB.
pub const SNAPSHOT_MEM_MIB: [u64; 3] = [64, 1024, 4096];

/// Runs `vmm bench snapshot`.
pub fn snapshot(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<SnapshotBench, BenchError> {
    snapshot_with(repeats, &SNAPSHOT_MEM_MIB, progress)
}

/// `vmm bench snapshot` with guests of `mem_mib` MiB (none: only the
/// dirty-tracking rounds).
pub fn snapshot_with(
    repeats: u32,
    mem_mib: &[u64],
    progress: &mut dyn FnMut(&str),
) -> Result<SnapshotBench, BenchError> {
    let n = repeats.max(1);
    let mut sizes = Vec::new();
    for &mem_mib in mem_mib {
        progress(&format!("a {mem_mib} MiB guest writing 24 MiB"));
        let cfg = VmConfig {
            kernel: KernelSource::Bundled,
            vcpus: 2,
            mem_size: mem_mib << 20,
            cmdline: "workload=dirty pages=6144 rate=2000 duration_ms=3600000".into(),
            memory: MemoryConfig::default(),
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let options = VmOptions {
            serial: SerialOutput::Capture(console.clone()),
            timeout: Some(Duration::from_secs(600)),
            ..VmOptions::default()
        };
        let vm = crate::Vm::new(&cfg, options)?.start()?;
        let text = || {
            console
                .lock()
                .map(|c| String::from_utf8_lossy(&c).into_owned())
                .unwrap_or_default()
        };
        let start = Instant::now();
        while !(text().contains("dirty: cpu 0 start") && text().contains("dirty: cpu 1 start")) {
            if vm.is_finished() || start.elapsed() > Duration::from_secs(120) {
                vm.stop();
                return Err(BenchError::BadRun {
                    end: "the guest did not start its dirty workload".into(),
                    console: text(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let dir =
            TempDir(std::env::temp_dir().join(format!("vmm-bench-live-{}-{mem_mib}", std::process::id())));
        let bad = |e: crate::ControlError| BenchError::BadRun {
            end: e.to_string(),
            console: String::new(),
        };
        let (mut live_d, mut live_p, mut live_t, mut unp_d, mut unp_p, mut stw, mut faults) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut live_pause, mut live_cap, mut live_start, mut live_res) = (vec![], vec![], vec![], vec![]);
        let mut bytes = 0;
        let (mut parts, mut unp_parts) = ([0.0; 4], [0.0; 4]);
        progress(&format!("snapshots of the {mem_mib} MiB guest"));
        for _ in 0..n {
            for mode in [WpMode::Present, WpMode::Unpopulated] {
                let t = Instant::now();
                let info = vm
                    .snapshot_live(
                        &dir.0,
                        &LiveOptions {
                            mode,
                            ..Default::default()
                        },
                    )
                    .map_err(bad)?;
                let total = t.elapsed().as_secs_f64() * 1e3;
                let protect = (info.protect.scan_us + info.protect.protect_us) / 1e3;
                let p = [
                    info.protect.register_us,
                    info.protect.scan_us,
                    info.protect.protect_us,
                    info.protect.prepare_us,
                ];
                if mode == WpMode::Present {
                    parts = p;
                    live_d.push(info.downtime_ms);
                    live_p.push(protect);
                    live_pause.push(info.pause_ms);
                    live_cap.push(info.capture_ms);
                    live_start.push(info.start_live_ms);
                    live_res.push(info.resume_ms);
                    live_t.push(total);
                    faults.push(info.wp.faults_saved);
                    bytes = info.memory_bytes;
                } else {
                    unp_parts = p;
                    unp_d.push(info.downtime_ms);
                    unp_p.push(protect);
                }
            }
            let info = vm.snapshot(&dir.0, AfterSnapshot::Restore).map_err(bad)?;
            stw.push(info.took_ms);
        }
        vm.stop();
        let _ = vm.wait()?;
        sizes.push(SnapshotFigure {
            mem_mib,
            memory_bytes: bytes,
            live_downtime_ms: Figure::of(live_d),
            live_protect_ms: Figure::of(live_p),
            live_pause_ms: Figure::of(live_pause),
            live_capture_ms: Figure::of(live_cap),
            live_start_ms: Figure::of(live_start),
            live_resume_ms: Figure::of(live_res),
            live_total_ms: Figure::of(live_t),
            unpopulated_downtime_ms: Figure::of(unp_d),
            unpopulated_protect_ms: Figure::of(unp_p),
            stw_ms: Figure::of(stw),
            wp_faults: median_u64(faults),
            live_protect_parts_us: parts,
            unpopulated_protect_parts_us: unp_parts,
        });
    }
    progress("dirty tracking rounds over 1 GiB, KVM log and uffd-WP");
    let (dirty_round_kvm_us, dirty_round_uffd_wp_us) = dirty_rounds(n)?;
    let ratio = match (sizes.first(), sizes.last()) {
        (Some(a), Some(b)) => b.live_downtime_ms.median_us / a.live_downtime_ms.median_us,
        _ => f64::NAN,
    };
    Ok(SnapshotBench {
        repeats: n,
        sizes,
        downtime_ratio_largest_to_smallest: ratio,
        note: "downtime is for vCPUs not blocked in a fault; a vCPU blocked in a WP fault at pause time costs the pause grace".into(),
        dirty_round_kvm_us,
        dirty_round_uffd_wp_us,
    })
}

impl std::fmt::Display for SnapshotBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "snapshot benchmark: guests that wrote 24 MiB and keep writing, median of {} (min-max), ms",
            self.repeats
        )?;
        for s in &self.sizes {
            writeln!(
                f,
                "  {:>5} MiB ({:>5.1} MiB saved): live downtime {:.2} ({:.2}-{:.2}) [pause {:.2} ({:.2}-{:.2}), capture {:.2} ({:.2}-{:.2}), protect {:.2} ({:.2}-{:.2}) [scan+protect {:.2} ({:.2}-{:.2}) = scan/protect {:.2}/{:.2}; before the pause: register {:.2}, all of preparing {:.2}], resume {:.2} ({:.2}-{:.2})], total {:.1} ({:.1}-{:.1}), {} WP faults; \
                 unpopulated downtime {:.2} ({:.2}-{:.2}) [protect {:.2}]; stop-the-world {:.1} ({:.1}-{:.1})",
                s.mem_mib,
                s.memory_bytes as f64 / f64::from(1u32 << 20),
                s.live_downtime_ms.median_us,
                s.live_downtime_ms.min_us,
                s.live_downtime_ms.max_us,
                s.live_pause_ms.median_us,
                s.live_pause_ms.min_us,
                s.live_pause_ms.max_us,
                s.live_capture_ms.median_us,
                s.live_capture_ms.min_us,
                s.live_capture_ms.max_us,
                s.live_start_ms.median_us,
                s.live_start_ms.min_us,
                s.live_start_ms.max_us,
                s.live_protect_ms.median_us,
                s.live_protect_ms.min_us,
                s.live_protect_ms.max_us,
                s.live_protect_parts_us[1] / 1e3,
                s.live_protect_parts_us[2] / 1e3,
                s.live_protect_parts_us[0] / 1e3,
                s.live_protect_parts_us[3] / 1e3,
                s.live_resume_ms.median_us,
                s.live_resume_ms.min_us,
                s.live_resume_ms.max_us,
                s.live_total_ms.median_us,
                s.live_total_ms.min_us,
                s.live_total_ms.max_us,
                s.wp_faults,
                s.unpopulated_downtime_ms.median_us,
                s.unpopulated_downtime_ms.min_us,
                s.unpopulated_downtime_ms.max_us,
                s.unpopulated_protect_ms.median_us,
                s.stw_ms.median_us,
                s.stw_ms.min_us,
                s.stw_ms.max_us,
            )?;
        }
        writeln!(
            f,
            "  live downtime 4 GiB / 64 MiB: {:.2} (target <= 1.2); {}",
            self.downtime_ratio_largest_to_smallest, self.note
        )?;
        writeln!(
            f,
            "  dirty tracking, one round over 1 GiB with 2048 pages written: KVM log {:.0} us ({:.0}-{:.0}), uffd-WP {:.0} us ({:.0}-{:.0})",
            self.dirty_round_kvm_us.median_us,
            self.dirty_round_kvm_us.min_us,
            self.dirty_round_kvm_us.max_us,
            self.dirty_round_uffd_wp_us.median_us,
            self.dirty_round_uffd_wp_us.min_us,
            self.dirty_round_uffd_wp_us.max_us
        )
    }
}
