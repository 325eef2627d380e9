//! Lazily served guest RAM: the regions registered with userfaultfd (MISSING
//! mode), one retry core per region, and the "uffd-handler" thread that
//! serves their faults from a page source (crate `vmm-memory`, see
//! `docs/retry-core.md`).
//!
//! Registration happens after the loader (or an eager fill) has written guest
//! memory: those pages are then present and never fault, so the VMM's own
//! writes cannot block on a handler that does not run yet.

use super::materialize::Materializer;
use crate::event::{EventSink, MemoryEvent, VmEvent};
use ::memory::{
    CoreConfig, FaultError, FaultHandler, FillObserver, HandlerControl, HandlerError, HandlerEvent,
    PageSource, Region, RegisterMode, RetryCore, Stats, Uffd,
};
use abi::layout::PAGE_SIZE;
use devices::GuestRam;
use sandbox::{SeccompMode, ThreadClass};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors setting up lazily served memory.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// userfaultfd is unavailable.
    #[error("cannot use userfaultfd for lazily served guest memory ({backend}): {source}; run as root, set vm.unprivileged_userfaultfd=1, or use --mem-backend anon")]
    Uffd {
        /// The source's name.
        backend: String,
        /// Why.
        #[source]
        source: ::memory::UffdError,
    },
    /// A retry core refused a region.
    #[error("guest memory region cannot be served lazily: {0}")]
    Core(#[from] ::memory::CoreError),
    /// The handler could not be built.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// A thread could not be started (or sandboxed).
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: sandbox::SpawnError,
    },
}

pub use ::memory::BlockedFault;

/// How lazily served memory is set up.
#[derive(Debug, Clone)]
pub struct LazyPlan {
    /// Where page contents come from (indexed by guest-physical address).
    pub source: Arc<dyn PageSource>,
    /// Fault-around window in pages (0 = off).
    pub fault_around: u32,
    /// Guest-physical ranges `(gpa, len)` the source holds data for (prefetch
    /// and fetching in full read those; the rest reads as zero).
    pub data_ranges: Vec<(u64, u64)>,
    /// One entry per fault-handler thread: the CPU it is pinned to, if any
    /// (empty = one unpinned thread; see `crate::placement`).
    pub handler_cpus: Vec<Option<usize>>,
    /// Short poll of the uffd before a handler thread sleeps, microseconds.
    pub spin_us: u32,
    /// Handler threads under `SCHED_BATCH` (see `crate::placement`).
    pub batch: bool,
    /// Fetch the data ranges in the background from the start (after the
    /// working set, if there is one).
    pub prefetch: bool,
    /// Pages to fill first, before the vCPUs resume or while they run
    /// (a recorded working set, [`PagePrefetch`]).
    pub working_set: Option<PagePrefetch>,
    /// Told of every page a fault makes present (a working-set recording).
    pub observer: Option<Arc<dyn FillObserver>>,
}

/// A list of guest pages to fill ahead of the guest's faults.
#[derive(Debug, Clone)]
pub struct PagePrefetch {
    /// Guest-physical page addresses, in the order the guest first touched
    /// them (duplicates and pages outside RAM are skipped).
    pub pages: Vec<u64>,
    /// Fill them all before [`LazyMemory::start`] returns (so before any
    /// vCPU runs), sorted by address in coalesced runs; otherwise a thread
    /// fills them while the vCPUs run, batch by batch in first-touch order.
    pub before_resume: bool,
}

/// What a working-set prefetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchReport {
    /// Pages it filled (the others were present already or faulted first).
    pub pages: u64,
    /// Runs (one source read and one COPY or ZEROPAGE each).
    pub runs: u64,
    /// Time it took, microseconds.
    pub micros: u64,
}

/// Pages of one first-touch batch of a prefetch while the vCPUs run: the
/// first batches are what the guest needs first, each batch is sorted and
/// coalesced.
const PREFETCH_BATCH: usize = 2048;

/// Fills `pages` (guest-physical) through the cores: sorted, deduplicated,
/// in runs of contiguous pages, each run with one fetch and one fill.
fn prefill_pages(
    uffd: &Uffd,
    cores: &[Arc<RetryCore>],
    pages: &mut [u64],
    stop: &AtomicBool,
) -> Result<(u64, u64), FaultError> {
    pages.sort_unstable();
    let (mut filled, mut runs) = (0u64, 0u64);
    let mut i = 0;
    while i < pages.len() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let first = pages[i];
        let mut n = 1u64;
        let mut j = i + 1;
        while j < pages.len() && pages[j] <= first + n * PAGE_SIZE {
            if pages[j] == first + n * PAGE_SIZE {
                n += 1;
            }
            j += 1;
        }
        i = j;
        let Some(core) = cores.iter().find(|c| {
            let r = c.region();
            first >= r.guest_offset && first - r.guest_offset < r.size
        }) else {
            continue;
        };
        let r = core.region();
        // In the core's pages (huge pages cover many of these 4 KiB pages).
        let cps = core.page_size();
        let lo = (first - r.guest_offset) / cps * cps;
        let hi = (first - r.guest_offset + n * PAGE_SIZE).div_ceil(cps) * cps;
        let n = usize::try_from((hi.min(r.size) - lo) / cps).unwrap_or(0);
        let before = core.stats().prefill_runs;
        let got = core.prefill(uffd, r.host_base + lo, n)? as u64;
        // Counted in 4 KiB pages, as the working set lists them.
        filled += got * (cps / PAGE_SIZE).max(1);
        runs += core.stats().prefill_runs - before;
    }
    Ok((filled, runs))
}

/// Runs a working-set prefetch: all at once (before the vCPUs run) or batch
/// by batch in first-touch order.
fn run_page_prefetch(
    uffd: &Uffd,
    cores: &[Arc<RetryCore>],
    plan: &PagePrefetch,
    stop: &AtomicBool,
) -> Result<PrefetchReport, FaultError> {
    let start = std::time::Instant::now();
    let mut total = PrefetchReport::default();
    let batch = if plan.before_resume {
        plan.pages.len().max(1)
    } else {
        PREFETCH_BATCH
    };
    for chunk in plan.pages.chunks(batch) {
        let mut pages = chunk.to_vec();
        let (p, r) = prefill_pages(uffd, cores, &mut pages, stop)?;
        total.pages += p;
        total.runs += r;
    }
    total.micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(total)
}

/// Statistics of lazily served memory, for `--stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// The page source (`zero`, `file:PATH`, `snapshot:PATH`, `migration`...).
    pub backend: String,
    /// Fault-around window in pages (0 = off).
    pub fault_around: u32,
    /// PAGEFAULT events read by the handler.
    pub events: u64,
    /// Events merged into an already parked fault of the same page.
    pub merged_events: u64,
    /// What each fault-handler thread did (its CPU, wake-ups, events by faulting thread).
    pub handler_threads: Vec<::memory::HandlerThreadStats>,
    /// Failures reported by the handler (display form).
    pub failures: Vec<String>,
    /// All regions together.
    pub total: Stats,
    /// One entry per guest memory region, in guest-physical order.
    pub regions: Vec<Stats>,
    /// What memory guest RAM lives in (`anon`, `memfd`, `hugetlb:2M`).
    pub backing: String,
    /// `missing` or `minor`.
    pub fault_mode: String,
    /// How guest RAM's pages are shared at the time of these statistics
    /// (a clone: shared snapshot pages against its private copies).
    pub sharing: Option<super::PageSharing>,
    /// The working-set prefetch, once it finished.
    pub working_set_prefetch: Option<PrefetchReport>,
}

/// Guest RAM served through userfaultfd while the VM lives.
#[derive(Debug)]
pub struct LazyMemory {
    backend: String,
    fault_around: u32,
    uffd: Arc<Uffd>,
    control: HandlerControl,
    regions: Vec<Region>,
    threads: Vec<JoinHandle<Result<(), HandlerError>>>,
    data_ranges: super::materialize::SharedRanges,
    prefetch: Option<Prefetch>,
    prefetch_report: Arc<std::sync::Mutex<Option<PrefetchReport>>>,
    seccomp: SeccompMode,
}

/// A running background prefetch.
#[derive(Debug)]
struct Prefetch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl LazyMemory {
    /// Registers every region of `mem` (MISSING mode) and starts the handler
    /// thread (and the prefetch if planned), sandboxed in `seccomp` mode.
    /// Call after the VMM's own writes to guest memory.
    pub fn start(
        mem: &GuestRam,
        plan: LazyPlan,
        sink: EventSink,
        seccomp: SeccompMode,
    ) -> Result<LazyMemory, LazyError> {
        Self::start_with_mode(mem, plan, sink, seccomp, RegisterMode::MISSING, 0)
    }

    /// [`LazyMemory::start`] registering with `mode` (MISSING|MINOR for a
    /// memfd served from its page cache, see `super::backing`), the cores
    /// tracking pages of `page_size` bytes (0: host pages; huge pages on
    /// hugetlbfs).
    pub fn start_with_mode(
        mem: &GuestRam,
        plan: LazyPlan,
        sink: EventSink,
        seccomp: SeccompMode,
        mode: RegisterMode,
        page_size: usize,
    ) -> Result<LazyMemory, LazyError> {
        let backend = plan.source.name().to_owned();
        let uffd = Arc::new(Uffd::for_guest_memory().map_err(|source| LazyError::Uffd {
            backend: backend.clone(),
            source,
        })?);
        let config = CoreConfig {
            fault_around: plan.fault_around as usize,
            page_size,
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
            let core = Arc::new(RetryCore::new(region, plan.source.clone(), config)?);
            if let Some(o) = &plan.observer {
                core.observe(o.clone());
            }
            cores.push(core);
            uffd.register(region.host_base, region.size, mode)
                .map_err(|source| LazyError::Uffd {
                    backend: backend.clone(),
                    source,
                })?;
            regions.push(region);
        }
        let cpus = if plan.handler_cpus.is_empty() {
            vec![None]
        } else {
            plan.handler_cpus.clone()
        };
        let handlers = FaultHandler::pool(uffd.clone(), cores, cpus.len())?;
        let control = handlers[0].control();
        // Failures reach the owner at once (it pauses the VM), never polled.
        let hook: ::memory::EventHook = Arc::new(move |ev| match ev {
            HandlerEvent::Failed(e) => sink(VmEvent::Memory(MemoryEvent::SourceFailed(e.to_string()))),
            HandlerEvent::Stopped(Some(why)) => sink(VmEvent::Memory(MemoryEvent::HandlerStopped(why))),
            // Stopped on request: the end of the VM.
            HandlerEvent::Stopped(None) => {}
        });
        let mut threads = Vec::with_capacity(cpus.len());
        for (mut handler, cpu) in handlers.into_iter().zip(cpus) {
            handler.set_event_hook(hook.clone());
            handler.set_spin(std::time::Duration::from_micros(u64::from(plan.spin_us)));
            let name = if handler.index() == 0 {
                "uffd-handler".to_string()
            } else {
                format!("uffd-handler-{}", handler.index())
            };
            let batch = plan.batch;
            let spawned = sandbox::spawn(
                std::thread::Builder::new().name(name),
                ThreadClass::FaultHandler,
                seccomp,
                move || {
                    if batch {
                        if let Err(e) = ::memory::affinity::set_batch_policy() {
                            tracing::warn!("the userfault handler stays under the normal policy: {e}");
                        }
                    }
                    if let Some(cpu) = cpu {
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
                },
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    control.stop();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(LazyError::Thread {
                        what: "uffd-handler",
                        source,
                    });
                }
            }
        }
        let mut lazy = LazyMemory {
            backend,
            fault_around: plan.fault_around,
            uffd,
            control,
            regions,
            threads,
            data_ranges: Arc::new(std::sync::RwLock::new(Arc::new(plan.data_ranges))),
            prefetch: None,
            prefetch_report: Arc::default(),
            seccomp,
        };
        let mut working_set = plan.working_set;
        if let Some(ws) = working_set.take_if(|w| w.before_resume) {
            // The handler serves the VMM's own faults meanwhile; no vCPU runs yet.
            match run_page_prefetch(&lazy.uffd, lazy.control.cores(), &ws, &AtomicBool::new(false)) {
                Ok(r) => {
                    *lazy
                        .prefetch_report
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r)
                }
                // The fault on that page reports it (the VM pauses then).
                Err(e) => tracing::warn!("the working-set prefetch stopped: {e}"),
            }
        }
        if plan.prefetch || working_set.is_some() {
            lazy.start_prefetch(working_set, plan.prefetch)?;
        }
        Ok(lazy)
    }

    /// The page source's name (`zero`, `file:PATH`, `migration`...).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Unregisters every region from the userfaultfd for good: RAM becomes
    /// plain anonymous memory (a page not present faults in as zero, and a
    /// vCPU waiting on one wakes up). The handler must be stopped first
    /// ([`LazyMemory::stop`]), or its next fill fails with ENOENT.
    pub fn unregister(&self) -> Result<(), ::memory::UffdError> {
        for r in &self.regions {
            self.uffd.unregister(r.host_base, r.size)?;
        }
        Ok(())
    }

    /// See [`Materializer`].
    pub fn materializer(&self) -> Materializer {
        Materializer {
            uffd: self.uffd.clone(),
            cores: self.control.cores().to_vec(),
            ranges: self.data_ranges.clone(),
        }
    }

    /// Starts a background thread that fills the working set `pages` (if
    /// any), then with `all` every page of the data ranges not fetched yet,
    /// ahead of the guest's faults.
    fn start_prefetch(&mut self, pages: Option<PagePrefetch>, all: bool) -> Result<(), LazyError> {
        let m = self.materializer();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let report = self.prefetch_report.clone();
        let thread = sandbox::spawn(
            std::thread::Builder::new().name("prefetch".into()),
            ThreadClass::FaultHandler,
            self.seccomp,
            move || {
                if let Some(ws) = pages {
                    match run_page_prefetch(&m.uffd, &m.cores, &ws, &s) {
                        Ok(r) => *report.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r),
                        Err(e) => {
                            // The faulting vCPU reports it; the prefetch just stops.
                            tracing::warn!("the working-set prefetch stopped: {e}");
                            return;
                        }
                    }
                }
                if !all {
                    return;
                }
                if let Err(e) = m.run(&s, &AtomicU64::new(0)) {
                    // The faulting vCPU reports it too; prefetch just stops.
                    tracing::warn!("prefetch stopped: {e}");
                }
            },
        )
        .map_err(|source| LazyError::Thread {
            what: "prefetch",
            source,
        })?;
        self.prefetch = Some(Prefetch { stop, thread });
        Ok(())
    }

    /// Stage-2 fault accounting per faulting thread (gettid).
    pub fn per_thread(&self) -> std::collections::HashMap<u32, ::memory::ThreadStats> {
        self.control.per_thread()
    }

    /// The faults the handler holds (not resolved yet).
    pub fn blocked(&self) -> Vec<BlockedFault> {
        self.control.blocked()
    }

    /// A cloneable view of the handler, for other threads.
    pub fn control(&self) -> HandlerControl {
        self.control.clone()
    }

    /// Faults that could not be served (the VM must not go on).
    pub fn failures(&self) -> Vec<FaultError> {
        self.control.failures()
    }

    /// Whether a handler thread ended on its own (a broken uffd).
    pub fn handler_died(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
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
            handler_threads: self.control.thread_stats(),
            failures: self.failures().iter().map(ToString::to_string).collect(),
            total: merge(&regions),
            regions,
            backing: "anon".into(),
            fault_mode: "missing".into(),
            sharing: None,
            working_set_prefetch: *self
                .prefetch_report
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// Stops the handler threads and waits for them.
    pub fn stop(&mut self) {
        // The prefetch fills pages through the handler's cores: it goes first.
        if let Some(p) = self.prefetch.take() {
            p.stop.store(true, Ordering::Relaxed);
            let _ = p.thread.join();
        }
        self.control.stop();
        for t in self.threads.drain(..) {
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
        // mapping is unmapped (the memory manager drops this before its RAM).
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
        t.pages_continued += s.pages_continued;
        t.fault_around_pages += s.fault_around_pages;
        t.prefilled_pages += s.prefilled_pages;
        t.prefill_runs += s.prefill_runs;
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
}
