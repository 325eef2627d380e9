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
    /// vCPU runs), by several threads in coalesced runs; otherwise a thread
    /// fills them while the vCPUs run, batch by batch in first-touch order.
    pub before_resume: bool,
    /// A checked copy of the pages' contents (a working-set file's): the
    /// prefetch copies from it instead of reading and checking the page
    /// source page by page; `None` fetches every page from the source.
    pub contents: Option<Arc<dyn PrefetchContents>>,
}

/// The contents of a [`PagePrefetch`]'s pages, in its order, in chunks that
/// their owner reads and checks (a working-set file: a hash per chunk,
/// `docs/working-set.md`). A chunk that fails its check is not used: the
/// prefetch fills its pages from the page source instead.
pub trait PrefetchContents: Send + Sync + std::fmt::Debug {
    /// Pages per chunk (the last one may be shorter).
    fn chunk_pages(&self) -> usize;
    /// Reads chunk `chunk` (pages `chunk * chunk_pages()..` of the plan)
    /// into `buf` (exactly that chunk's pages) and checks it; an error says
    /// why it cannot be used.
    fn read_chunk(&self, chunk: usize, buf: &mut [u8]) -> Result<(), String>;
}

/// What a working-set prefetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchReport {
    /// Pages it filled (the others were present already or faulted first).
    pub pages: u64,
    /// Of those, pages copied from the prefetch's own contents (the rest
    /// were read from the page source).
    pub from_contents: u64,
    /// Runs (one COPY or ZEROPAGE each, and one source read for those not
    /// filled from the contents).
    pub runs: u64,
    /// Chunks of the contents that failed their check (their pages came
    /// from the page source).
    pub bad_chunks: u64,
    /// Threads that filled (before resume: one per CPU, at most
    /// [`PREFETCH_WORKERS_MAX`]).
    pub threads: u32,
    /// Time it took, microseconds.
    pub micros: u64,
}

/// Pages of one batch of a prefetch: while the vCPUs run the first batches
/// are what the guest needs first; each batch is sorted and coalesced.
const PREFETCH_BATCH: usize = 2048;
/// Most threads a before-resume prefetch uses.
pub const PREFETCH_WORKERS_MAX: usize = 4;
/// [`PAGE_SIZE`] as a `usize` (4096 fits every target).
#[allow(clippy::cast_possible_truncation)]
const PS: usize = PAGE_SIZE as usize;
/// Most pages one COPY of a prefetch from contents maps.
const CONTENTS_RUN_MAX: u64 = 256;

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
        let Some(core) = core_of(cores, first) else {
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

fn core_of(cores: &[Arc<RetryCore>], gpa: u64) -> Option<&Arc<RetryCore>> {
    cores.iter().find(|c| {
        let r = c.region();
        gpa >= r.guest_offset && gpa - r.guest_offset < r.size
    })
}

/// What a prefetch works with.
#[derive(Debug, Clone)]
struct PrefetchJob {
    uffd: Arc<Uffd>,
    cores: Arc<[Arc<RetryCore>]>,
    pages: Arc<[u64]>,
    contents: Option<Arc<dyn PrefetchContents>>,
    stop: Arc<AtomicBool>,
    /// The next batch to take (workers share it).
    next: Arc<std::sync::atomic::AtomicUsize>,
    /// Pages per batch (a multiple of the contents' chunk).
    batch: usize,
}

impl PrefetchJob {
    fn new(
        uffd: Arc<Uffd>,
        cores: &[Arc<RetryCore>],
        plan: &PagePrefetch,
        stop: Arc<AtomicBool>,
        copy: bool,
    ) -> PrefetchJob {
        // Copying given contents suits MISSING registrations only (MINOR
        // pages come from a page cache the source fills).
        // Nor huge pages (filled whole, from the source): the contents would
        // be read and checked for nothing.
        let host_pages = cores.iter().all(|c| c.page_size() == PAGE_SIZE);
        let contents = plan.contents.clone().filter(|_| copy && host_pages);
        // With contents, before the vCPUs resume a batch is one chunk: its
        // buffer, reused, stays small (a fresh page is a host fault). While
        // they run, a batch of first-touch order is filled in address
        // order, so that the prefetch works ahead of the guest rather than
        // racing it on the pages it touches next.
        let batch = match &contents {
            Some(c) => {
                let cp = c.chunk_pages().max(1);
                let pages = if plan.before_resume { cp } else { PREFETCH_BATCH };
                pages.div_ceil(cp) * cp
            }
            None => PREFETCH_BATCH,
        };
        PrefetchJob {
            uffd,
            cores: cores.into(),
            pages: plan.pages.clone().into(),
            contents,
            stop,
            next: Arc::default(),
            batch,
        }
    }

    /// Takes batches until there are none left (or the prefetch stops).
    fn work(&self) -> Result<PrefetchReport, FaultError> {
        let mut total = PrefetchReport {
            threads: 1,
            ..PrefetchReport::default()
        };
        // Zeroed by the allocator (fresh pages), not written: cheap in a
        // debug build too.
        let mut buf = if self.contents.is_some() {
            vec![0u8; self.batch * PS]
        } else {
            Vec::new()
        };
        let mut stage = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let b = self.next.fetch_add(1, Ordering::Relaxed);
            let lo = b.saturating_mul(self.batch);
            if lo >= self.pages.len() {
                break;
            }
            let hi = (lo + self.batch).min(self.pages.len());
            let mut fallback = match &self.contents {
                Some(c) => self.copy_batch(c.as_ref(), lo, hi, &mut buf, &mut stage, &mut total)?,
                None => self.pages[lo..hi].to_vec(),
            };
            let (p, r) = prefill_pages(&self.uffd, &self.cores, &mut fallback, &self.stop)?;
            total.pages += p;
            total.runs += r;
        }
        Ok(total)
    }

    /// Fills pages `lo..hi` of the plan from the contents, in address order,
    /// each chunk read and checked when its first page comes (so the first
    /// COPY follows the first read, however large the batch); returns the
    /// pages to fetch from the source instead (those of chunks that failed
    /// their check, and those a core cannot fill from contents).
    fn copy_batch(
        &self,
        contents: &dyn PrefetchContents,
        lo: usize,
        hi: usize,
        buf: &mut [u8],
        stage: &mut Vec<u8>,
        total: &mut PrefetchReport,
    ) -> Result<Vec<u64>, FaultError> {
        let ps = PS;
        let cp = contents.chunk_pages().max(1);
        let pages = &self.pages[lo..hi];
        // The batch starts on a chunk boundary (its size is a multiple of one).
        let first_chunk = lo / cp;
        let mut loaded: Vec<Option<bool>> = vec![None; (hi - lo).div_ceil(cp)];
        let mut load = |i: usize, buf: &mut [u8], total: &mut PrefetchReport| -> bool {
            let k = i / cp;
            if let Some(ok) = loaded[k] {
                return ok;
            }
            let (a, e) = (k * cp, ((k + 1) * cp).min(hi - lo));
            let ok = match contents.read_chunk(first_chunk + k, &mut buf[a * ps..e * ps]) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(
                        "working-set prefetch: chunk {} of the recorded contents is not used ({why}); its pages are read from the snapshot",
                        first_chunk + k
                    );
                    total.bad_chunks += 1;
                    false
                }
            };
            loaded[k] = Some(ok);
            ok
        };
        let mut order: Vec<usize> = (0..hi - lo).collect();
        order.sort_unstable_by_key(|&i| pages[i]);
        order.dedup_by_key(|i| pages[*i]);
        let mut fallback = Vec::new();
        let mut k = 0;
        while k < order.len() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let first = pages[order[k]];
            if !load(order[k], buf, total) {
                fallback.push(first);
                k += 1;
                continue;
            }
            let Some(core) = core_of(&self.cores, first) else {
                k += 1;
                continue;
            };
            let r = core.region();
            let room = (r.guest_offset + r.size - first) / PAGE_SIZE;
            let mut n = 1;
            while k + n < order.len()
                && (n as u64) < CONTENTS_RUN_MAX.min(room)
                && pages[order[k + n]] == first + n as u64 * PAGE_SIZE
                && load(order[k + n], buf, total)
            {
                n += 1;
            }
            let run = &order[k..k + n];
            let data: &[u8] = if n == 1 {
                &buf[run[0] * ps..(run[0] + 1) * ps]
            } else {
                stage.clear();
                for &i in run {
                    stage.extend_from_slice(&buf[i * ps..(i + 1) * ps]);
                }
                stage
            };
            let host = r.host_base + (first - r.guest_offset);
            match core.prefill_from(&self.uffd, host, data)? {
                Some(f) => {
                    total.pages += f as u64;
                    total.from_contents += f as u64;
                    // A run the guest filled first is no run of ours.
                    total.runs += u64::from(f > 0);
                }
                None => fallback.extend(run.iter().map(|&i| pages[i])),
            }
            k += n;
        }
        Ok(fallback)
    }
}

/// Runs a working-set prefetch: all at once before the vCPUs run (on
/// `workers` threads, this one included), or batch by batch in first-touch
/// order on this thread.
fn run_page_prefetch(
    job: &PrefetchJob,
    workers: usize,
    seccomp: SeccompMode,
) -> Result<PrefetchReport, FaultError> {
    let start = std::time::Instant::now();
    let mut helpers = Vec::new();
    for w in 1..workers {
        let j = job.clone();
        match sandbox::spawn(
            std::thread::Builder::new().name(format!("prefetch-{w}")),
            ThreadClass::FaultHandler,
            seccomp,
            move || j.work(),
        ) {
            Ok(t) => helpers.push(t),
            // Fewer threads: slower, not wrong.
            Err(e) => tracing::warn!("the working-set prefetch runs on fewer threads: {e}"),
        }
    }
    let mut total = job.work();
    for t in helpers {
        let Ok(r) = t.join() else {
            // Its pages not filled yet fault as usual.
            tracing::warn!("a working-set prefetch thread panicked");
            continue;
        };
        total = match (total, r) {
            (Ok(a), Ok(b)) => Ok(PrefetchReport {
                pages: a.pages + b.pages,
                from_contents: a.from_contents + b.from_contents,
                runs: a.runs + b.runs,
                bad_chunks: a.bad_chunks + b.bad_chunks,
                threads: a.threads + b.threads,
                micros: 0,
            }),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    }
    let mut total = total?;
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
    /// Registered MISSING only: a prefetch may copy given contents.
    copy_prefill: bool,
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
            copy_prefill: mode == RegisterMode::MISSING,
        };
        let mut working_set = plan.working_set;
        if let Some(ws) = working_set.take_if(|w| w.before_resume) {
            // The handler serves the VMM's own faults meanwhile; no vCPU runs
            // yet, so every CPU may fill.
            let job = PrefetchJob::new(
                lazy.uffd.clone(),
                lazy.control.cores(),
                &ws,
                Arc::default(),
                lazy.copy_prefill,
            );
            let workers = std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(PREFETCH_WORKERS_MAX);
            match run_page_prefetch(&job, workers, seccomp) {
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
        let (copy, seccomp) = (self.copy_prefill, self.seccomp);
        let thread = sandbox::spawn(
            std::thread::Builder::new().name("prefetch".into()),
            ThreadClass::FaultHandler,
            self.seccomp,
            move || {
                if let Some(ws) = pages {
                    let job = PrefetchJob::new(m.uffd.clone(), &m.cores, &ws, s.clone(), copy);
                    match run_page_prefetch(&job, 1, seccomp) {
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
