//! Lazily backed guest RAM: the guest memory regions registered with
//! userfaultfd (MISSING mode), one retry core per region, and the
//! "uffd-handler" thread that serves their faults from the configured page
//! source (crate `vmm-memory`, see `docs/retry-core.md`).
//!
//! Registration happens after the loader has written the kernel, module and
//! boot tables: those pages are then present and never fault, so the VMM's own
//! writes cannot block on a handler that does not run yet, and with a memory
//! file they keep the loaded contents rather than the file's.

use crate::config::MemBackend;
use ::memory::{
    CoreConfig, FaultError, FaultHandler, FaultOutcome, FileSource, HandlerControl, HandlerError, PageSource,
    PageState, Region, RegisterMode, RetryCore, RetryReason, Stats, Uffd, ZeroSource,
};
use abi::layout::{ram_ranges, PAGE_SIZE};
use devices::GuestRam;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors setting up lazily backed memory.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// userfaultfd is unavailable.
    #[error("cannot use userfaultfd for --mem-backend {backend}: {source}; run as root, set vm.unprivileged_userfaultfd=1, or use --mem-backend anon")]
    Uffd {
        /// The backend asked for.
        backend: String,
        /// Why.
        source: ::memory::UffdError,
    },
    /// The page source cannot be opened.
    #[error("cannot open the memory backend (--mem-backend file:PATH): {0}")]
    Source(#[from] ::memory::SourceError),
    /// An eventfd for the source could not be created.
    #[error("cannot create the page source's eventfd: {0}; raise the process's file descriptor limit")]
    Notifier(std::io::Error),
    /// A retry core refused a region.
    #[error("guest memory region cannot be served lazily: {0}")]
    Core(#[from] ::memory::CoreError),
    /// The handler could not be built.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The handler thread could not be started.
    #[error("cannot start the uffd-handler thread: {0}")]
    Thread(std::io::Error),
}

pub use ::memory::BlockedFault;

/// Statistics of lazily backed memory, for `--stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// The backend (`zero`, `file:PATH`).
    pub backend: String,
    /// Fault-around window in pages (0 = off).
    pub fault_around: u32,
    /// PAGEFAULT events read by the handler.
    pub events: u64,
    /// Events merged into an already parked fault of the same page.
    pub merged_events: u64,
    /// Failures reported by the handler (display form).
    pub failures: Vec<String>,
    /// All regions together.
    pub total: Stats,
    /// One entry per guest memory region, in guest-physical order.
    pub regions: Vec<Stats>,
}

/// Guest RAM served through userfaultfd while the VM lives.
#[derive(Debug)]
pub struct LazyMemory {
    backend: String,
    fault_around: u32,
    uffd: Arc<Uffd>,
    control: HandlerControl,
    regions: Vec<Region>,
    thread: Option<JoinHandle<Result<(), HandlerError>>>,
    /// Guest-physical ranges `(gpa, len)` the source holds data for.
    data_ranges: Arc<Vec<(u64, u64)>>,
    prefetch: Option<Prefetch>,
}

/// A running background prefetch.
#[derive(Debug)]
struct Prefetch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    pages: Arc<AtomicU64>,
}

/// Fetches every missing page of the source's data ranges through the retry
/// cores, as a fault would (so it races safely with the handler: the cores'
/// page claims decide who fills a page). Used by the background prefetch of a
/// lazy restore and before a snapshot or migration of lazily backed memory,
/// whose pages not yet fetched (or still being filled) would otherwise be
/// missing from it.
#[derive(Debug, Clone)]
pub struct Materializer {
    uffd: Arc<Uffd>,
    cores: Vec<Arc<RetryCore>>,
    ranges: Arc<Vec<(u64, u64)>>,
}

impl Materializer {
    /// Fetches the missing pages, counting the faults it resolved in `done`
    /// (a fault-around run is one). Stops early (`Ok`) when `stop` is set;
    /// fails on a page the source cannot give.
    pub fn run(&self, stop: &AtomicBool, done: &AtomicU64) -> Result<(), String> {
        for &(gpa, len) in self.ranges.iter() {
            let mut a = gpa;
            while a < gpa + len {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let Some((core, host)) = self.cores.iter().find_map(|c| {
                    let r = c.region();
                    (a >= r.guest_offset && a - r.guest_offset < r.size)
                        .then(|| (c, r.host_base + (a - r.guest_offset)))
                }) else {
                    a += PAGE_SIZE;
                    continue;
                };
                loop {
                    match core.page_state(host) {
                        Some(PageState::Missing) => {
                            let report = core.resolve_waiting(
                                &self.uffd,
                                host,
                                Instant::now() + Duration::from_millis(100),
                            );
                            match report.outcome {
                                FaultOutcome::Resolved { .. } => done.fetch_add(1, Ordering::Relaxed),
                                FaultOutcome::Failed(e) => return Err(e.to_string()),
                                FaultOutcome::Retry(RetryReason::TimedOut)
                                    if stop.load(Ordering::Relaxed) =>
                                {
                                    return Ok(())
                                }
                                FaultOutcome::Retry(_) => 0,
                            };
                        }
                        // Another thread is filling it: its data is not in
                        // memory yet, and whoever reads memory next (a
                        // snapshot, a migration) must see it. Fills never wait
                        // for a vCPU, so this is short.
                        Some(PageState::InFlight) if !stop.load(Ordering::Relaxed) => {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        _ => break,
                    }
                }
                a += PAGE_SIZE;
            }
        }
        Ok(())
    }
}

impl Materializer {
    /// Whether guest page `gpa` is mapped (not missing, not being filled).
    pub fn is_present(&self, gpa: u64) -> bool {
        self.cores.iter().any(|c| {
            let r = c.region();
            gpa >= r.guest_offset
                && gpa - r.guest_offset < r.size
                && c.page_state(r.host_base + (gpa - r.guest_offset)) == Some(PageState::Present)
        })
    }

    /// Resolves guest page `gpa` through its retry core if it is still
    /// missing (a migrated page that just arrived). Gives up quietly after a
    /// few seconds: the page then stays with the source and a fault fetches it.
    pub fn resolve_page(&self, gpa: u64) -> Result<(), String> {
        let Some((core, host)) = self.cores.iter().find_map(|c| {
            let r = c.region();
            (gpa >= r.guest_offset && gpa - r.guest_offset < r.size)
                .then(|| (c, r.host_base + (gpa - r.guest_offset)))
        }) else {
            return Err(format!("guest page {gpa:#x} is outside guest RAM"));
        };
        for _ in 0..50 {
            if core.page_state(host) != Some(PageState::Missing) {
                return Ok(());
            }
            let report = core.resolve_waiting(&self.uffd, host, Instant::now() + Duration::from_millis(100));
            match report.outcome {
                FaultOutcome::Resolved { .. } => return Ok(()),
                FaultOutcome::Failed(e) => return Err(e.to_string()),
                FaultOutcome::Retry(_) => {}
            }
        }
        Ok(())
    }
}

/// Opens the page source of `backend` (`None` for plain anonymous memory).
fn open_source(backend: &MemBackend) -> Result<Option<Arc<dyn PageSource>>, LazyError> {
    Ok(match backend {
        MemBackend::Anon => None,
        MemBackend::Zero => Some(Arc::new(ZeroSource::new().map_err(LazyError::Notifier)?)),
        MemBackend::File { path, offset } => Some(Arc::new(FileSource::open(path, *offset)?)),
    })
}

impl LazyMemory {
    /// Registers every region of `mem` and starts the handler thread; `None`
    /// for [`MemBackend::Anon`]. Call after the loader wrote guest memory.
    /// `source` replaces the backend's own page source (tests, custom sources);
    /// the backend must still be lazy. `handler_cpu` pins the handler thread
    /// (the VMM puts it on the CPU of a lone vCPU, see `docs/retry-core.md`).
    pub fn start(
        mem: &GuestRam,
        backend: &MemBackend,
        fault_around: u32,
        source: Option<Arc<dyn PageSource>>,
        handler_cpu: Option<usize>,
    ) -> Result<Option<LazyMemory>, LazyError> {
        let source = match (open_source(backend)?, source) {
            (None, _) => return Ok(None),
            (Some(_), Some(custom)) => custom,
            (Some(own), None) => own,
        };
        let uffd = Arc::new(Uffd::for_guest_memory().map_err(|source| LazyError::Uffd {
            backend: backend.to_string(),
            source,
        })?);
        let config = CoreConfig {
            fault_around: fault_around as usize,
            ..CoreConfig::default()
        };
        let mut cores = Vec::new();
        let mut regions = Vec::new();
        for r in mem.iter() {
            // The source is indexed by guest-physical address.
            let region = Region {
                host_base: r.as_ptr() as u64,
                size: r.len(),
                guest_offset: r.start_addr().raw_value(),
            };
            cores.push(Arc::new(RetryCore::new(region, source.clone(), config)?));
            uffd.register(region.host_base, region.size, RegisterMode::MISSING)
                .map_err(|source| LazyError::Uffd {
                    backend: backend.to_string(),
                    source,
                })?;
            regions.push(region);
        }
        let mut handler = FaultHandler::new(uffd.clone(), cores)?;
        let control = handler.control();
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                if let Some(cpu) = handler_cpu {
                    // Only slower if it fails: the scheduler places the thread.
                    if let Err(e) = ::memory::pin_current_thread(cpu) {
                        tracing::warn!("the userfault handler stays unpinned: {e}");
                    }
                }
                let r = handler.run_until_stopped();
                if let Err(e) = &r {
                    tracing::error!("the userfault handler stopped: {e}");
                }
                r
            })
            .map_err(LazyError::Thread)?;
        // A memory file holds data up to its end; a zero source holds none.
        let data_ranges = match backend {
            MemBackend::File { path, offset } => {
                let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                let data_end = file_len.saturating_sub(*offset);
                ram_ranges(mem.iter().map(GuestMemoryRegion::len).sum())
                    .into_iter()
                    .filter(|&(a, _)| a < data_end)
                    .map(|(a, l)| (a, l.min(data_end - a)))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Some(LazyMemory {
            backend: backend.to_string(),
            fault_around,
            uffd,
            control,
            regions,
            thread: Some(thread),
            data_ranges: Arc::new(data_ranges),
            prefetch: None,
        }))
    }

    /// Sets the guest-physical ranges `(gpa, len)` the source holds data for
    /// (prefetch and snapshots fetch those; the rest reads as zero).
    pub fn set_data_ranges(&mut self, ranges: Vec<(u64, u64)>) {
        self.data_ranges = Arc::new(ranges);
    }

    /// See [`Materializer`].
    pub fn materializer(&self) -> Materializer {
        Materializer {
            uffd: self.uffd.clone(),
            cores: self.control.cores().to_vec(),
            ranges: self.data_ranges.clone(),
        }
    }

    /// Starts a background thread that fetches every page of the data ranges
    /// not fetched yet, ahead of the guest's faults.
    pub fn start_prefetch(&mut self) -> Result<(), LazyError> {
        let m = self.materializer();
        let stop = Arc::new(AtomicBool::new(false));
        let pages = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), pages.clone());
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                if let Err(e) = m.run(&s, &p) {
                    // The faulting vCPU reports it too; prefetch just stops.
                    tracing::warn!("prefetch stopped: {e}");
                }
            })
            .map_err(LazyError::Thread)?;
        self.prefetch = Some(Prefetch { stop, thread, pages });
        Ok(())
    }

    /// Pages the background prefetch fetched so far (fault-around included in one).
    pub fn prefetched(&self) -> u64 {
        self.prefetch
            .as_ref()
            .map_or(0, |p| p.pages.load(Ordering::Relaxed))
    }

    /// Stage-2 fault accounting per faulting thread (gettid).
    pub fn per_thread(&self) -> std::collections::HashMap<u32, ::memory::ThreadStats> {
        self.control.per_thread()
    }

    /// A function listing the blocked faults, for the controller thread.
    pub fn blocked_fn(&self) -> crate::controller::BlockedFn {
        let control = self.control.clone();
        Box::new(move || blocked_faults(&control))
    }

    /// Faults that could not be served (the VM must not go on).
    pub fn failures(&self) -> Vec<FaultError> {
        self.control.failures()
    }

    /// Whether the handler thread ended on its own (a broken uffd): faults are
    /// no longer served.
    pub fn handler_died(&self) -> bool {
        self.thread.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Unregisters every region: blocked faulters wake up and fault as plain
    /// anonymous memory. Only for tearing down a VM that already ended (a vCPU
    /// stuck on a page that cannot be served would otherwise never stop).
    pub fn release_blocked(&self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host_base, r.size) {
                tracing::warn!("cannot unregister guest memory at {:#x}: {e}", r.host_base);
            }
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> MemoryStats {
        let regions: Vec<Stats> = self.control.cores().iter().map(|c| c.stats()).collect();
        let (events, merged_events) = self.control.events();
        MemoryStats {
            backend: self.backend.clone(),
            fault_around: self.fault_around,
            events,
            merged_events,
            failures: self.failures().iter().map(ToString::to_string).collect(),
            total: merge(&regions),
            regions,
        }
    }

    /// Stops the handler thread and waits for it.
    pub fn stop(&mut self) {
        // The prefetch fills pages through the handler's cores: it goes first.
        if let Some(p) = self.prefetch.take() {
            p.stop.store(true, Ordering::Relaxed);
            let _ = p.thread.join();
        }
        self.control.stop();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("the userfault handler had stopped: {e}"),
                Err(_) => tracing::error!("the userfault handler thread panicked"),
            }
        }
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        // The handler fills pages of the guest mapping: it must end before the
        // mapping is unmapped (the VM drops this before its memory).
        self.stop();
    }
}

/// Sums the statistics of several cores (the maximum for `retries_max`).
pub fn merge(stats: &[Stats]) -> Stats {
    let mut t = Stats::default();
    for s in stats {
        if t.source.is_empty() {
            t.source.clone_from(&s.source);
        }
        t.faults += s.faults;
        t.attempts += s.attempts;
        t.retries_total += s.retries_total;
        t.retries_max = t.retries_max.max(s.retries_max);
        t.failures += s.failures;
        t.pages_copied += s.pages_copied;
        t.pages_zeroed += s.pages_zeroed;
        t.fault_around_pages += s.fault_around_pages;
        t.fetches += s.fetches;
        t.already_present += s.already_present;
        t.eexist += s.eexist;
        t.eagain += s.eagain;
        t.stale_present += s.stale_present;
        t.removes += s.removes;
        t.pages_removed += s.pages_removed;
        if t.latency_us_log2.len() < s.latency_us_log2.len() {
            t.latency_us_log2.resize(s.latency_us_log2.len(), 0);
        }
        for (a, b) in t.latency_us_log2.iter_mut().zip(&s.latency_us_log2) {
            *a += b;
        }
    }
    t
}

/// The faults `control`'s handler holds.
fn blocked_faults(control: &HandlerControl) -> Vec<BlockedFault> {
    control.blocked()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_and_keeps_the_max() {
        let a = Stats {
            source: "zero".into(),
            faults: 2,
            retries_max: 3,
            latency_us_log2: vec![1, 2],
            ..Stats::default()
        };
        let b = Stats {
            source: "zero".into(),
            faults: 5,
            retries_max: 1,
            latency_us_log2: vec![0, 1, 4],
            ..Stats::default()
        };
        let t = merge(&[a, b]);
        assert_eq!((t.faults, t.retries_max, t.source.as_str()), (7, 3, "zero"));
        assert_eq!(t.latency_us_log2, vec![1, 3, 4]);
    }

    #[test]
    fn anon_needs_no_handler() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        assert!(LazyMemory::start(&mem, &MemBackend::Anon, 0, None, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let b = MemBackend::File {
            path: "/nonexistent/vmm-mem".into(),
            offset: 0,
        };
        let e = LazyMemory::start(&mem, &b, 16, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/vmm-mem") && e.contains("--mem-backend"),
            "{e}"
        );
    }
}
