//! Step 3 of a fault's walk, the **retry core**: userfault event
//! ([`crate::uffd`]) -> handler loop ([`crate::handler`]) -> **retry core** ->
//! page source ([`crate::source`]) -> fill ([`crate::uffd`]). It turns one
//! attempt at one userfault into one [`FaultOutcome`]:
//! - `Resolved { pages, by }`: the faulting page is mapped ([`ResolvedBy`]:
//!   `Copy`, `ZeroPage`, `AlreadyPresent`, `InFlightElsewhere`);
//! - `Retry(reason)` ([`RetryReason`]): not now; wait for the source's
//!   notifier (`NotReady`, `Held`), read pending events (`MappingChanged`), or
//!   a bounded wait ended (`TimedOut`, from [`RetryCore::resolve_waiting`]);
//! - `Failed(error)` ([`FaultError`]): the page cannot be provided; it was
//!   not zero-filled and the faulting thread stays blocked.
//!
//! The entry point is [`RetryCore::resolve_access`] (what the handler calls,
//! with the event's write flag; [`RetryCore::resolve`] is the read-access
//! shorthand). Per guest page the core keeps a state byte (`Missing ->
//! InFlight -> Present`, and `Removed` after a REMOVE event). A fault claims
//! its page (and, for cheap bulk sources, a run of Missing neighbours) by
//! compare-and-swap, asks the [`PageSource`] for a [`FetchOutcome`]
//! (`Ready`, `Zero`, `Retry(reason)`, `Failed(error)`), and fills with
//! UFFDIO_COPY or UFFDIO_ZEROPAGE, which wake every thread blocked on the
//! filled range. The core never zero-fills a page whose source failed, and
//! never spins: a `Retry` is waited for on the source's
//! [`Notifier`](crate::source::Notifier).
//!
//! A core holds no uffd: every call is given the one its region is registered
//! on, so cores can be shared by several handler threads (the CAS claim lets
//! one fetch; the others answer `InFlightElsewhere`). Its unit tests are in
//! `core/tests.rs`.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::histogram::{AtomicLog2Histogram, Log2Histogram};
use crate::source::{FetchOutcome, PageSource, RetryReason, SourceError};
use crate::uffd::{CopyError, Uffd};

/// Errors of building a core.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    /// The region is empty, unaligned or overflows.
    #[error("region host [{host_base:#x}, +{size:#x}) guest offset {guest_offset:#x} is invalid: {why}; give a non-empty, page-aligned region")]
    BadRegion {
        /// Host start address.
        host_base: u64,
        /// Size in bytes.
        size: u64,
        /// Guest offset of the start.
        guest_offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The page size is not a power-of-two multiple of the host page.
    #[error("page size {0} bytes is not a power-of-two multiple of the host page size; use 0 (host pages), 2 MiB or 1 GiB")]
    BadPageSize(usize),
    /// The fault-around window is not a power of two.
    #[error("fault_around = {0} pages is not a power of two; use 0 (off), 1, 2, 4, ... 512")]
    BadFaultAround(usize),
}

/// Why a fault failed. The faulting thread stays blocked; the VMM must pause
/// the VM and report this error (the page was NOT zero-filled).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    /// The source cannot provide the page.
    #[error("guest page {guest_addr:#x} (host {host_addr:#x}) cannot be provided by page source {source_name}: {source}; the page was not zero-filled, pause the VM and fix or replace the source")]
    Source {
        /// Guest offset of the page.
        guest_addr: u64,
        /// Host address of the page.
        host_addr: u64,
        /// Name of the source.
        source_name: String,
        /// The source's error.
        source: SourceError,
    },
    /// The fault address is outside the region of this core.
    #[error("fault at host address {addr:#x} is outside every registered guest memory region; the VMM registered memory it does not track")]
    OutOfRegion {
        /// The faulting host address.
        addr: u64,
    },
    /// UFFDIO_COPY/ZEROPAGE failed for a reason that retrying does not fix.
    #[error("filling guest page {guest_addr:#x} (host {host_addr:#x}) failed: {message}; the guest memory mapping was probably unmapped or the VMM is exiting")]
    Fill {
        /// Guest offset of the page.
        guest_addr: u64,
        /// Host address of the page.
        host_addr: u64,
        /// The userfaultfd error text.
        message: String,
    },
}

/// State of one guest page, as the core last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Never provided: fetch it from the source.
    Missing = 0,
    /// A fetch and fill are in progress.
    InFlight = 1,
    /// Mapped.
    Present = 2,
    /// Dropped by madvise(DONTNEED): the next fault maps a zero page (anonymous
    /// memory semantics) unless [`AfterRemove::Refetch`].
    Removed = 3,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            1 => PageState::InFlight,
            2 => PageState::Present,
            3 => PageState::Removed,
            _ => PageState::Missing,
        }
    }
}

/// What a REMOVE event means for the next fault on a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterRemove {
    /// Map a zero page, as anonymous memory reads zero after MADV_DONTNEED.
    #[default]
    Zero,
    /// Fetch the page from the source again.
    Refetch,
}

/// Tuning of a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreConfig {
    /// Fault-around window in pages (power of two; 0 or 1 = off). Used only
    /// when the source is `bulk_cheap()`.
    pub fault_around: usize,
    /// What a REMOVE event means.
    pub after_remove: AfterRemove,
    /// The unit the core tracks, fetches and fills, in bytes: 0 = the host
    /// page size; a huge page size for hugetlbfs memory, which is filled
    /// by whole huge pages and has no UFFDIO_ZEROPAGE (zero pages are then
    /// copies of a zeroed huge page).
    pub page_size: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            fault_around: 16,
            after_remove: AfterRemove::Zero,
            page_size: 0,
        }
    }
}

/// A registered region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Host virtual address of the start.
    pub host_base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Guest offset (in the source's address space) of the start.
    pub guest_offset: u64,
}

/// How a fault was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedBy {
    /// UFFDIO_COPY of source data.
    Copy,
    /// UFFDIO_ZEROPAGE.
    ZeroPage,
    /// UFFDIO_CONTINUE of pages the page cache holds (MINOR mode).
    Continue,
    /// The page was already mapped (duplicate event or EEXIST); a WAKE was sent.
    AlreadyPresent,
    /// Another handler thread is filling it; its fill wakes this fault.
    InFlightElsewhere,
    /// A write-protect fault: the page was saved, then unprotected (`wp`).
    WriteUnprotected,
}

/// Who asks for a page: a fault (the guest, or the VMM touching guest
/// memory) or a prefetch or materialization that fills ahead of the guest.
/// Only faults are reported to a [`FillObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A userfault (or a caller standing in for one).
    Fault,
    /// A prefetch or a fetch-in-full: not a page the guest touched.
    Prefetch,
}

/// Told of every page a fault made present, from the core's resolution path
/// (the recording of a working set): `pages` host (4 KiB) pages from guest
/// offset `gpa` were filled by one COPY, ZEROPAGE or CONTINUE (a huge page
/// counts as its 4 KiB pages), `fault` is the faulting page (the start of the
/// faulting core page) if it is among them (the others are fault-around
/// neighbours). Called on the
/// handler's thread: keep it short.
pub trait FillObserver: Send + Sync + std::fmt::Debug {
    /// See the trait documentation.
    fn filled(&self, gpa: u64, pages: u64, fault: Option<u64>);
}

/// The result of one attempt at a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The faulting page is mapped (`pages` filled by this attempt, neighbours included).
    Resolved {
        /// Pages filled.
        pages: usize,
        /// How.
        by: ResolvedBy,
    },
    /// Not now: wait for the source's notifier (or, for `MappingChanged`, read
    /// pending events) and try again.
    Retry(RetryReason),
    /// Cannot be resolved; see [`FaultError`].
    Failed(FaultError),
}

/// A finished fault as seen by a blocking caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultReport {
    /// The last outcome.
    pub outcome: FaultOutcome,
    /// Attempts after the first.
    pub retries: u32,
    /// Time from the first attempt to the last.
    pub latency: Duration,
}

/// Buckets of the fault latency histogram: the last, `[2^23, ...)` us, counts
/// every fault of 8.4 s or more.
pub const LATENCY_BUCKETS: usize = 24;

/// A snapshot of a core's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Name of the page source.
    pub source: String,
    /// Faults completed (resolved), retries included once.
    pub faults: u64,
    /// Resolution attempts (first tries and retries).
    pub attempts: u64,
    /// Retry attempts.
    pub retries_total: u64,
    /// Most retries a single fault needed.
    pub retries_max: u64,
    /// Attempts that ended in `Failed`.
    pub failures: u64,
    /// Pages filled with UFFDIO_COPY.
    pub pages_copied: u64,
    /// Pages filled with zeros: UFFDIO_ZEROPAGE, or for the page of a write
    /// fault a UFFDIO_COPY of a zeroed page (see [`RetryCore::resolve_access`]).
    pub pages_zeroed: u64,
    /// Pages mapped from the page cache with UFFDIO_CONTINUE (MINOR mode).
    pub pages_continued: u64,
    /// Of the filled pages, neighbours filled by fault-around.
    pub fault_around_pages: u64,
    /// Pages filled ahead of any fault by [`RetryCore::prefill`] (a
    /// working-set prefetch), in `prefill_runs` runs (one fetch and one fill each).
    pub prefilled_pages: u64,
    /// Runs of [`RetryCore::prefill`].
    pub prefill_runs: u64,
    /// `fetch` calls made to the source.
    pub fetches: u64,
    /// Faults on pages already mapped (duplicate events), answered with WAKE.
    pub already_present: u64,
    /// EEXIST answers from the kernel.
    pub eexist: u64,
    /// EAGAIN answers from the kernel.
    pub eagain: u64,
    /// Pages the core thought present but the kernel did not (healed by re-fetch).
    pub stale_present: u64,
    /// REMOVE events applied.
    pub removes: u64,
    /// Pages marked removed.
    pub pages_removed: u64,
    /// Fault latency histogram: bucket `i` counts faults of `[2^i, 2^(i+1))` us
    /// (bucket 0 includes < 1 us, the last bucket everything longer),
    /// [`LATENCY_BUCKETS`] long from [`RetryCore::stats`]; see [`Stats::latency`].
    pub latency_us_log2: Vec<u64>,
}

impl Stats {
    /// `latency_us_log2` as a histogram (percentiles, merging several cores).
    pub fn latency(&self) -> Log2Histogram {
        Log2Histogram::from_buckets(self.latency_us_log2.clone())
    }
}

#[derive(Debug)]
struct Counters {
    faults: AtomicU64,
    attempts: AtomicU64,
    retries_total: AtomicU64,
    retries_max: AtomicU64,
    failures: AtomicU64,
    pages_copied: AtomicU64,
    pages_zeroed: AtomicU64,
    pages_continued: AtomicU64,
    fault_around_pages: AtomicU64,
    prefilled_pages: AtomicU64,
    prefill_runs: AtomicU64,
    fetches: AtomicU64,
    already_present: AtomicU64,
    eexist: AtomicU64,
    eagain: AtomicU64,
    stale_present: AtomicU64,
    removes: AtomicU64,
    pages_removed: AtomicU64,
    latency: AtomicLog2Histogram,
}

impl Default for Counters {
    fn default() -> Counters {
        let z = || AtomicU64::new(0);
        Counters {
            faults: z(),
            attempts: z(),
            retries_total: z(),
            retries_max: z(),
            failures: z(),
            pages_copied: z(),
            pages_zeroed: z(),
            pages_continued: z(),
            fault_around_pages: z(),
            prefilled_pages: z(),
            prefill_runs: z(),
            fetches: z(),
            already_present: z(),
            eexist: z(),
            eagain: z(),
            stale_present: z(),
            removes: z(),
            pages_removed: z(),
            latency: AtomicLog2Histogram::new(LATENCY_BUCKETS),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The retry core of one region.
#[derive(Debug)]
pub struct RetryCore {
    region: Region,
    page_size: u64,
    ps: usize,
    config: CoreConfig,
    states: Box<[AtomicU8]>,
    source: Arc<dyn PageSource>,
    counters: Counters,
    /// One zeroed page: the UFFDIO_COPY source of a write fault on a zero page.
    zero_page: Box<[u8]>,
    /// Huge pages: no UFFDIO_ZEROPAGE, zeros are copied.
    copy_zeros: bool,
    /// Told of every page a fault fills (set once).
    observer: OnceLock<Arc<dyn FillObserver>>,
}

impl RetryCore {
    /// A core for `region`, every page Missing.
    pub fn new(
        region: Region,
        source: Arc<dyn PageSource>,
        config: CoreConfig,
    ) -> Result<RetryCore, CoreError> {
        let host = crate::page_size();
        let ps_usize = match config.page_size {
            0 => host,
            p if p.is_power_of_two() && p >= host => p,
            p => return Err(CoreError::BadPageSize(p)),
        };
        let ps = ps_usize as u64;
        let bad = |why| CoreError::BadRegion {
            host_base: region.host_base,
            size: region.size,
            guest_offset: region.guest_offset,
            why,
        };
        if region.size == 0 {
            return Err(bad("empty"));
        }
        if region.host_base % ps != 0 || region.size % ps != 0 || region.guest_offset % ps != 0 {
            return Err(bad("not page aligned"));
        }
        if region.host_base.checked_add(region.size).is_none()
            || region.guest_offset.checked_add(region.size).is_none()
        {
            return Err(bad("overflows the address space"));
        }
        let pages = usize::try_from(region.size / ps).map_err(|_| bad("too large"))?;
        if config.fault_around > 1 && !config.fault_around.is_power_of_two() || config.fault_around > 512 {
            return Err(CoreError::BadFaultAround(config.fault_around));
        }
        // One byte per page: 16 MiB of state for 64 GiB of 4 KiB pages.
        let states = (0..pages)
            .map(|_| AtomicU8::new(PageState::Missing as u8))
            .collect();
        Ok(RetryCore {
            region,
            page_size: ps,
            ps: ps_usize,
            config,
            states,
            source,
            counters: Counters::default(),
            zero_page: vec![0u8; ps_usize].into_boxed_slice(),
            copy_zeros: ps_usize != host,
            observer: OnceLock::new(),
        })
    }

    /// The region.
    pub fn region(&self) -> Region {
        self.region
    }

    /// The size of the pages the core tracks and fills (host pages, or huge
    /// pages, see [`CoreConfig::page_size`]).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Tells `observer` of every page a fault fills from now on (not the
    /// pages of a prefetch or a materialization, [`Origin::Prefetch`]).
    /// `false` if an observer was set already (there is one per core).
    pub fn observe(&self, observer: Arc<dyn FillObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// The page source.
    pub fn source(&self) -> &Arc<dyn PageSource> {
        &self.source
    }

    /// Whether `addr` is inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.region.host_base && addr - self.region.host_base < self.region.size
    }

    /// The core's view of the page holding host address `addr`.
    pub fn page_state(&self, addr: u64) -> Option<PageState> {
        let idx = self.index(addr)?;
        Some(PageState::from_u8(self.states[idx].load(Ordering::Acquire)))
    }

    fn index(&self, addr: u64) -> Option<usize> {
        if !self.contains(addr) {
            return None;
        }
        usize::try_from((addr - self.region.host_base) / self.page_size).ok()
    }

    fn host(&self, idx: usize) -> u64 {
        self.region.host_base + idx as u64 * self.page_size
    }

    fn guest(&self, idx: usize) -> u64 {
        self.region.guest_offset + idx as u64 * self.page_size
    }

    fn claim(&self, idx: usize, from: PageState) -> bool {
        self.states[idx]
            .compare_exchange(
                from as u8,
                PageState::InFlight as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn set(&self, range: std::ops::Range<usize>, to: PageState) {
        for s in &self.states[range] {
            s.store(to as u8, Ordering::Release);
        }
    }

    /// Whether the kernel has the page mapped (mincore), used only to tell a
    /// duplicate event from a stale Present state (REMOVE races).
    fn kernel_has_page(&self, idx: usize) -> bool {
        let mut vec = [0u8; 1];
        let addr = self.host(idx) as *mut libc::c_void;
        // The length is one byte: mincore writes one byte per 4 KiB page of
        // the range, so asking for a whole huge page (512 bytes) would
        // overrun `vec` (it did: the stack of a hugetlb migration
        // destination's handler was smashed). The first 4 KiB of a huge page
        // is mapped exactly when the huge page is.
        // SAFETY: mincore only reads page tables for this page-aligned address
        // of our registered region and writes one byte (length 1 is one
        // page) into `vec`.
        let ret = unsafe { libc::mincore(addr, 1, vec.as_mut_ptr()) };
        ret == 0 && vec[0] & 1 != 0
    }

    /// One attempt at the fault on host address `addr`. Never blocks on the
    /// source beyond its own `fetch` call.
    pub fn resolve(&self, uffd: &Uffd, addr: u64) -> FaultOutcome {
        self.resolve_access(uffd, addr, false)
    }

    /// [`RetryCore::resolve`] for a fault whose access is a `write` (the
    /// event's write flag). A page that reads as zero is then filled with a
    /// UFFDIO_COPY of a zeroed page rather than UFFDIO_ZEROPAGE: the shared
    /// zero page is read-only, so the write would take a second, copy-on-write
    /// fault, whose MMU-notifier invalidation also makes KVM retry its stage-2
    /// fault (about 25 us per fault on this platform, see docs/retry-core.md).
    /// Fault-around neighbours are still mapped to the zero page.
    pub fn resolve_access(&self, uffd: &Uffd, addr: u64, write: bool) -> FaultOutcome {
        self.resolve_from(uffd, addr, write, Origin::Fault)
    }

    /// [`RetryCore::resolve_access`] on behalf of `origin`: the fills of an
    /// [`Origin::Prefetch`] are not reported to the observer.
    pub fn resolve_from(&self, uffd: &Uffd, addr: u64, write: bool, origin: Origin) -> FaultOutcome {
        bump(&self.counters.attempts, 1);
        let out = self.resolve_inner(uffd, addr, write, origin);
        if matches!(out, FaultOutcome::Failed(_)) {
            bump(&self.counters.failures, 1);
        }
        out
    }

    fn resolve_inner(&self, uffd: &Uffd, addr: u64, write: bool, origin: Origin) -> FaultOutcome {
        let Some(idx) = self.index(addr) else {
            return FaultOutcome::Failed(FaultError::OutOfRegion { addr });
        };
        loop {
            match PageState::from_u8(self.states[idx].load(Ordering::Acquire)) {
                PageState::InFlight => {
                    return FaultOutcome::Resolved {
                        pages: 0,
                        by: ResolvedBy::InFlightElsewhere,
                    }
                }
                PageState::Present => {
                    if self.kernel_has_page(idx) {
                        // A second vCPU's event for a page already filled: the fill
                        // woke it, a WAKE covers the case it queued just after.
                        bump(&self.counters.already_present, 1);
                        let _ = uffd.wake(self.host(idx), self.page_size);
                        return FaultOutcome::Resolved {
                            pages: 0,
                            by: ResolvedBy::AlreadyPresent,
                        };
                    }
                    bump(&self.counters.stale_present, 1);
                    let _ = self.states[idx].compare_exchange(
                        PageState::Present as u8,
                        PageState::Missing as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                PageState::Removed if self.config.after_remove == AfterRemove::Zero => {
                    if self.claim(idx, PageState::Removed) {
                        return self.fill_zero(uffd, idx, idx, idx + 1, write, origin);
                    }
                }
                PageState::Removed => {
                    let _ = self.states[idx].compare_exchange(
                        PageState::Removed as u8,
                        PageState::Missing as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                PageState::Missing => {
                    if self.claim(idx, PageState::Missing) {
                        return self.fetch_and_fill(uffd, idx, self.source.bulk_cheap(), write, origin);
                    }
                }
            }
        }
    }

    /// Claims the run of Missing neighbours of `idx` (already claimed) inside
    /// the aligned fault-around window.
    fn claim_run(&self, idx: usize) -> (usize, usize) {
        let w = self.config.fault_around;
        if w <= 1 {
            return (idx, idx + 1);
        }
        let start = idx & !(w - 1);
        let end = (start + w).min(self.states.len());
        let mut lo = idx;
        while lo > start && self.claim(lo - 1, PageState::Missing) {
            lo -= 1;
        }
        let mut hi = idx + 1;
        while hi < end && self.claim(hi, PageState::Missing) {
            hi += 1;
        }
        (lo, hi)
    }

    fn fetch_and_fill(
        &self,
        uffd: &Uffd,
        idx: usize,
        around: bool,
        write: bool,
        origin: Origin,
    ) -> FaultOutcome {
        let (lo, hi) = if around {
            self.claim_run(idx)
        } else {
            (idx, idx + 1)
        };
        let ps = self.ps;
        let mut buf = vec![0u8; (hi - lo) * ps];
        bump(&self.counters.fetches, 1);
        match self.source.fetch(self.guest(lo), &mut buf) {
            FetchOutcome::Ready => self.fill_copy(uffd, idx, lo, hi, &buf, Fill::Fault(origin)),
            FetchOutcome::Zero => self.fill_zero(uffd, idx, lo, hi, write, origin),
            FetchOutcome::Cached => self.fill_continue(uffd, idx, lo, hi, Fill::Fault(origin)),
            FetchOutcome::Split => {
                self.set(lo..hi, PageState::Missing);
                if hi - lo > 1 {
                    if self.claim(idx, PageState::Missing) {
                        return self.fetch_and_fill(uffd, idx, false, write, origin);
                    }
                    // Claimed by another attempt since: its fill wakes this fault.
                    return FaultOutcome::Resolved {
                        pages: 0,
                        by: ResolvedBy::InFlightElsewhere,
                    };
                }
                FaultOutcome::Failed(FaultError::Source {
                    guest_addr: self.guest(idx),
                    host_addr: self.host(idx),
                    source_name: self.source.name().to_owned(),
                    source: SourceError::Unsplittable {
                        offset: self.guest(idx),
                    },
                })
            }
            FetchOutcome::Retry(reason) => {
                self.set(lo..hi, PageState::Missing);
                if hi - lo > 1 && self.claim(idx, PageState::Missing) {
                    // A neighbour may be the one not ready: the faulting page alone.
                    return self.fetch_and_fill(uffd, idx, false, write, origin);
                }
                FaultOutcome::Retry(reason)
            }
            FetchOutcome::Failed(e) => {
                self.set(lo..hi, PageState::Missing);
                if hi - lo > 1 && self.claim(idx, PageState::Missing) {
                    // A neighbour may be the bad one: the faulting page alone.
                    return self.fetch_and_fill(uffd, idx, false, write, origin);
                }
                FaultOutcome::Failed(FaultError::Source {
                    guest_addr: self.guest(idx),
                    host_addr: self.host(idx),
                    source_name: self.source.name().to_owned(),
                    source: e,
                })
            }
        }
    }

    fn fill_copy(
        &self,
        uffd: &Uffd,
        idx: usize,
        lo: usize,
        hi: usize,
        buf: &[u8],
        kind: Fill,
    ) -> FaultOutcome {
        let ps = self.ps;
        self.fill(
            idx,
            lo,
            hi,
            ResolvedBy::Copy,
            kind,
            |i| uffd.copy(self.host(i), &buf[(i - lo) * ps..], false),
            uffd,
        )
    }

    /// Maps `[lo, hi)` from the page cache (UFFDIO_CONTINUE): the source
    /// answered `Cached`, the data is in the shmem file already.
    fn fill_continue(&self, uffd: &Uffd, idx: usize, lo: usize, hi: usize, kind: Fill) -> FaultOutcome {
        self.fill(
            idx,
            lo,
            hi,
            ResolvedBy::Continue,
            kind,
            |i| uffd.continue_range(self.host(i), (hi - i) as u64 * self.page_size, false),
            uffd,
        )
    }

    /// Zero-fills `[lo, hi)`; with `write`, page `idx` by a copy of a zeroed
    /// page (see [`RetryCore::resolve_access`]) and its neighbours by ZEROPAGE.
    fn fill_zero(
        &self,
        uffd: &Uffd,
        idx: usize,
        lo: usize,
        hi: usize,
        write: bool,
        origin: Origin,
    ) -> FaultOutcome {
        self.fill_zero_as(uffd, idx, lo, hi, write, Fill::Fault(origin))
    }

    fn fill_zero_as(
        &self,
        uffd: &Uffd,
        idx: usize,
        lo: usize,
        hi: usize,
        write: bool,
        kind: Fill,
    ) -> FaultOutcome {
        self.fill(
            idx,
            lo,
            hi,
            ResolvedBy::ZeroPage,
            kind,
            |i| {
                if self.copy_zeros || write && i == idx {
                    return uffd.copy(self.host(i), &self.zero_page, false);
                }
                let end = if write && i < idx { idx } else { hi };
                uffd.zeropage(self.host(i), (end - i) as u64 * self.page_size, false)
            },
            uffd,
        )
    }

    /// Fills the claimed run `[lo, hi)` (which contains `idx`) from page `i` on
    /// with `op(i)` (which returns the bytes it filled from page `i`, at least
    /// one page), skipping pages the kernel already has. Every filled or found
    /// page becomes Present; the rest go back to Missing.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        idx: usize,
        lo: usize,
        hi: usize,
        by: ResolvedBy,
        kind: Fill,
        op: impl Fn(usize) -> Result<usize, CopyError>,
        uffd: &Uffd,
    ) -> FaultOutcome {
        let observer = match kind {
            Fill::Fault(Origin::Fault) => self.observer.get(),
            _ => None,
        };
        // Observers count 4 KiB (host) pages, whatever the core's page size.
        let per_page = (self.ps / crate::page_size()).max(1) as u64;
        let note = |i: usize, k: usize| {
            if let Some(o) = observer {
                let fault = (i..i + k).contains(&idx).then(|| self.guest(idx));
                o.filled(self.guest(i), k as u64 * per_page, fault);
            }
        };
        let ps = self.ps;
        let mut i = lo;
        let mut filled = 0usize;
        // Whether the faulting page is mapped now, and whether we mapped it.
        let mut fault_done = false;
        let mut own = false;
        let mut result = None;
        while i < hi {
            match op(i) {
                Ok(n) => {
                    let k = (n / ps).clamp(1, hi - i);
                    self.set(i..i + k, PageState::Present);
                    note(i, k);
                    filled += k;
                    if (i..i + k).contains(&idx) {
                        fault_done = true;
                        own = true;
                    }
                    i += k;
                }
                Err(CopyError::Again { copied }) if copied >= ps => {
                    // Partial: the kernel stopped at a page that exists; go on after it.
                    bump(&self.counters.eagain, 1);
                    let k = (copied / ps).min(hi - i);
                    self.set(i..i + k, PageState::Present);
                    note(i, k);
                    filled += k;
                    if (i..i + k).contains(&idx) {
                        fault_done = true;
                        own = true;
                    }
                    i += k;
                }
                Err(CopyError::Exists) => {
                    bump(&self.counters.eexist, 1);
                    self.set(i..i + 1, PageState::Present);
                    if i == idx {
                        // Someone else mapped it; make sure our faulter is awake.
                        let _ = uffd.wake(self.host(i), self.page_size);
                        fault_done = true;
                    }
                    i += 1;
                }
                Err(CopyError::Again { .. }) => {
                    // mm changing (a REMOVE is pending): events must be read first.
                    bump(&self.counters.eagain, 1);
                    result = Some(FaultOutcome::Retry(RetryReason::MappingChanged));
                    break;
                }
                Err(e) => {
                    result = Some(FaultOutcome::Failed(FaultError::Fill {
                        guest_addr: self.guest(idx),
                        host_addr: self.host(idx),
                        message: e.to_string(),
                    }));
                    break;
                }
            }
        }
        if i < hi {
            self.set(i..hi, PageState::Missing);
        }
        let counter = match by {
            ResolvedBy::Copy => &self.counters.pages_copied,
            ResolvedBy::Continue => &self.counters.pages_continued,
            _ => &self.counters.pages_zeroed,
        };
        // pages_* last: tests wait on them to know the attempt is fully counted.
        if matches!(kind, Fill::Prefill) {
            bump(&self.counters.prefilled_pages, filled as u64);
        } else {
            bump(
                &self.counters.fault_around_pages,
                (filled - usize::from(own)) as u64,
            );
        }
        bump(counter, filled as u64);
        match result {
            Some(r) if !fault_done => r,
            _ if own => FaultOutcome::Resolved { pages: filled, by },
            _ => FaultOutcome::Resolved {
                pages: filled,
                by: ResolvedBy::AlreadyPresent,
            },
        }
    }

    /// Resolves `addr`, waiting on the source's notifier between attempts, until
    /// resolved, failed, or `deadline` (then `Retry(TimedOut)`; call again to
    /// keep waiting, e.g. after checking a stop flag). `MappingChanged` is
    /// retried after 1 ms: someone else must be reading the uffd events.
    pub fn resolve_waiting(&self, uffd: &Uffd, addr: u64, deadline: Instant) -> FaultReport {
        self.resolve_waiting_from(uffd, addr, deadline, Origin::Fault)
    }

    /// [`RetryCore::resolve_waiting`] on behalf of `origin` (see [`Origin`]).
    pub fn resolve_waiting_from(
        &self,
        uffd: &Uffd,
        addr: u64,
        deadline: Instant,
        origin: Origin,
    ) -> FaultReport {
        let start = Instant::now();
        let mut retries = 0u32;
        loop {
            let seen = self.source.notifier().generation();
            let outcome = self.resolve_from(uffd, addr, false, origin);
            let reason = match outcome {
                FaultOutcome::Retry(r) => r,
                FaultOutcome::Resolved { .. } => {
                    self.record_fault(retries, start.elapsed());
                    return FaultReport {
                        outcome,
                        retries,
                        latency: start.elapsed(),
                    };
                }
                FaultOutcome::Failed(_) => {
                    return FaultReport {
                        outcome,
                        retries,
                        latency: start.elapsed(),
                    }
                }
            };
            let now = Instant::now();
            let woke = if now >= deadline {
                false
            } else if reason == RetryReason::MappingChanged {
                std::thread::sleep(Duration::from_millis(1).min(deadline - now));
                true
            } else {
                self.source.notifier().wait_past(seen, deadline - now)
            };
            if !woke {
                return FaultReport {
                    outcome: FaultOutcome::Retry(RetryReason::TimedOut),
                    retries,
                    latency: start.elapsed(),
                };
            }
            retries += 1;
            self.note_retry();
        }
    }

    /// Counts one retry attempt (the next `resolve` of a pending fault).
    pub fn note_retry(&self) {
        bump(&self.counters.retries_total, 1);
    }

    /// Records a completed fault: its retries and latency.
    pub fn record_fault(&self, retries: u32, latency: Duration) {
        bump(&self.counters.faults, 1);
        self.counters
            .retries_max
            .fetch_max(u64::from(retries), Ordering::Relaxed);
        self.counters.latency.record_duration(latency);
    }

    /// Fills the Missing pages of the `pages` pages (of the core's page size)
    /// from host address `host`
    /// ahead of any fault (a working-set prefetch): each run of pages it can
    /// claim is fetched with one `fetch` and mapped with one COPY (or
    /// ZEROPAGE), at most [`PREFILL_RUN_MAX`] pages a run. Pages present, in
    /// flight or removed are skipped; a run the source cannot give now
    /// (`Retry`) is left to the faults. Returns the pages filled; a source
    /// failure ends it (nothing was zero-filled). Not reported to the
    /// observer: these are not pages the guest touched.
    pub fn prefill(&self, uffd: &Uffd, host: u64, pages: usize) -> Result<usize, FaultError> {
        let Some(first) = self.index(host) else {
            return Err(FaultError::OutOfRegion { addr: host });
        };
        let end = first.saturating_add(pages).min(self.states.len());
        let mut filled = 0;
        let mut i = first;
        // At most PREFILL_RUN_MAX 4 KiB pages (1 MiB) a run, at least one page
        // (huge pages: one a run).
        let run_max = (PREFILL_RUN_MAX * crate::page_size() / self.ps).max(1);
        // Pages before this one are fetched one a run: the source split a run.
        let mut single_until = first;
        while i < end {
            if !self.claim(i, PageState::Missing) {
                i += 1;
                continue;
            }
            let max = if i < single_until { 1 } else { run_max };
            let mut j = i + 1;
            while j < end && j - i < max && self.claim(j, PageState::Missing) {
                j += 1;
            }
            let mut buf = vec![0u8; (j - i) * self.ps];
            bump(&self.counters.fetches, 1);
            bump(&self.counters.prefill_runs, 1);
            let out = match self.source.fetch(self.guest(i), &mut buf) {
                FetchOutcome::Ready => self.fill_copy(uffd, i, i, j, &buf, Fill::Prefill),
                FetchOutcome::Zero => self.fill_zero_as(uffd, i, i, j, false, Fill::Prefill),
                FetchOutcome::Cached => self.fill_continue(uffd, i, i, j, Fill::Prefill),
                FetchOutcome::Split if j - i > 1 => {
                    // Fetch these pages again one by one.
                    self.set(i..j, PageState::Missing);
                    single_until = j;
                    continue;
                }
                FetchOutcome::Split => {
                    self.set(i..j, PageState::Missing);
                    return Err(FaultError::Source {
                        guest_addr: self.guest(i),
                        host_addr: self.host(i),
                        source_name: self.source.name().to_owned(),
                        source: SourceError::Unsplittable {
                            offset: self.guest(i),
                        },
                    });
                }
                FetchOutcome::Retry(_) => {
                    self.set(i..j, PageState::Missing);
                    i = j;
                    continue;
                }
                FetchOutcome::Failed(e) => {
                    self.set(i..j, PageState::Missing);
                    return Err(FaultError::Source {
                        guest_addr: self.guest(i),
                        host_addr: self.host(i),
                        source_name: self.source.name().to_owned(),
                        source: e,
                    });
                }
            };
            match out {
                FaultOutcome::Resolved { pages, .. } => filled += pages,
                FaultOutcome::Failed(e) => return Err(e),
                // A REMOVE is being delivered: leave the rest to the faults.
                FaultOutcome::Retry(_) => {}
            }
            i = j;
        }
        Ok(filled)
    }

    /// [`RetryCore::prefill`] with the contents given instead of fetched:
    /// fills the Missing pages of `[host, host + data.len())` from `data`
    /// (the caller checked it: a working set's verified copy of the pages),
    /// one COPY per run of pages it can claim. The source is not asked, so it
    /// suits copy-filled memory only (MISSING registration: the caller does
    /// not use it where pages come from a page cache, MINOR); a core of huge
    /// pages answers `Ok(None)` and the caller prefills from the source
    /// instead. Pages present, in flight or removed are skipped, as by
    /// `prefill`; a `data` of a partial page ignores that page.
    pub fn prefill_from(&self, uffd: &Uffd, host: u64, data: &[u8]) -> Result<Option<usize>, FaultError> {
        if self.ps != crate::page_size() {
            return Ok(None);
        }
        let ps = self.ps;
        let Some(first) = self.index(host) else {
            return Err(FaultError::OutOfRegion { addr: host });
        };
        let end = first.saturating_add(data.len() / ps).min(self.states.len());
        let mut filled = 0;
        let mut i = first;
        while i < end {
            if !self.claim(i, PageState::Missing) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < end && self.claim(j, PageState::Missing) {
                j += 1;
            }
            bump(&self.counters.prefill_runs, 1);
            let at = (i - first) * ps;
            let run = &data[at..at + (j - i) * ps];
            match self.fill_copy(uffd, i, i, j, run, Fill::Prefill) {
                FaultOutcome::Resolved { pages, .. } => filled += pages,
                FaultOutcome::Failed(e) => return Err(e),
                FaultOutcome::Retry(_) => {}
            }
            i = j;
        }
        Ok(Some(filled))
    }

    /// Applies a REMOVE event: pages of `[start, end)` in this region are gone.
    pub fn handle_remove(&self, start: u64, end: u64) {
        let lo = start.max(self.region.host_base);
        let hi = end.min(self.region.host_base + self.region.size);
        if lo >= hi {
            return;
        }
        bump(&self.counters.removes, 1);
        let page = |a: u64| usize::try_from(a).unwrap_or(usize::MAX);
        let first = page((lo - self.region.host_base) / self.page_size);
        let last = page((hi - self.region.host_base).div_ceil(self.page_size)).min(self.states.len());
        let to = match self.config.after_remove {
            AfterRemove::Zero => PageState::Removed,
            AfterRemove::Refetch => PageState::Missing,
        };
        // An in-flight fill racing with this may still mark a page Present; the
        // next fault on it finds it unmapped (mincore) and heals the state.
        self.set(first..last, to);
        bump(&self.counters.pages_removed, (last - first) as u64);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            source: self.source.name().to_owned(),
            faults: g(&c.faults),
            attempts: g(&c.attempts),
            retries_total: g(&c.retries_total),
            retries_max: g(&c.retries_max),
            failures: g(&c.failures),
            pages_copied: g(&c.pages_copied),
            pages_zeroed: g(&c.pages_zeroed),
            pages_continued: g(&c.pages_continued),
            fault_around_pages: g(&c.fault_around_pages),
            prefilled_pages: g(&c.prefilled_pages),
            prefill_runs: g(&c.prefill_runs),
            fetches: g(&c.fetches),
            already_present: g(&c.already_present),
            eexist: g(&c.eexist),
            eagain: g(&c.eagain),
            stale_present: g(&c.stale_present),
            removes: g(&c.removes),
            pages_removed: g(&c.pages_removed),
            latency_us_log2: c.latency.buckets(),
        }
    }
}

/// Most 4 KiB pages [`RetryCore::prefill`] fetches and fills at once (1 MiB;
/// with huge pages, one huge page a run).
pub const PREFILL_RUN_MAX: usize = 256;

/// What a fill is for: a fault (counted as such, its fault-around
/// neighbours included) or a prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Fault(Origin),
    Prefill,
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests;
