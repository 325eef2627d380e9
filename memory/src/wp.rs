//! Write-protect mode: the retry core's seam for **WP faults** (a write to a
//! page protected with `UFFDIO_WRITEPROTECT`), used by live snapshots, and the
//! kernel interfaces they and async dirty tracking need: `UFFDIO_WRITEPROTECT`
//! and `PAGEMAP_SCAN`.
//!
//! The walk of one WP fault, top to bottom:
//!
//! 1. **event**: a write to a protected page blocks the writer (a vCPU in
//!    `KVM_RUN`, a device thread) and queues `Event::PageFault` with
//!    `flags.wp` ([`crate::uffd`]);
//! 2. **loop**: [`WpHandler::run_until_stopped`] reads it, parks what cannot be
//!    resolved now, retries parked faults when the saver notifies;
//! 3. **core**: [`WpCore::resolve_wp`] answers a [`FaultOutcome`]: the page is
//!    copied into a bounded RAM buffer (its content at the snapshot instant),
//!    then unprotected, which wakes the writer (`Resolved { by:
//!    ResolvedBy::WriteUnprotected }`); `Retry(NotReady)` while the buffer is
//!    full or the saver copies that page itself; `Failed` when the
//!    protection cannot be removed or the session has failed (the write is
//!    never let through unsaved);
//! 4. **saver**: [`WpCore::save_range`], on the saver's own thread, takes each
//!    page of a range from the buffer or from guest memory (still protected,
//!    so unchanged), removes the protection of the range and notifies. Disk
//!    writes are the saver's, never on the fault path.
//!
//! Page states (one `AtomicU8` per page, CAS):
//!
//! ```text
//! Untracked (not saved: zero at the instant)
//! Pending --fault, buffer has room--> Buffering --> Buffered --saver--> Done
//!    +--------saver claims----------> Copying ---------------------> Done
//! ```

use crate::core::{FaultError, FaultOutcome, Region, ResolvedBy};
use crate::handler::{BlockedFault, EventHook, HandlerEvent};
use crate::source::{Notifier, RetryReason, Subscription};
use crate::uffd::{Event, Features, RegisterMode, Uffd, UffdError};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
/// `UFFD_FEATURE_WP_UNPOPULATED`: protecting a range also protects its
/// unpopulated pages (pte markers), Linux 6.4.
pub const WP_UNPOPULATED: Features = Features(1 << 13);
/// `UFFD_FEATURE_WP_ASYNC`: WP faults are resolved by the kernel (the page is
/// unprotected and counts as written), Linux 6.7.
pub const WP_ASYNC: Features = Features(1 << 15);
/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_WP: RegisterMode = RegisterMode(1 << 1);

const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

/// Protects (`protect`) or unprotects `[start, start + len)` (page aligned,
/// registered with [`REGISTER_WP`]). Unprotecting wakes the threads blocked
/// on the range unless `dontwake`.
pub fn write_protect(
    uffd: &Uffd,
    start: u64,
    len: u64,
    protect: bool,
    dontwake: bool,
) -> Result<(), UffdError> {
    let mut mode = 0;
    if protect {
        mode |= UFFDIO_WRITEPROTECT_MODE_WP;
    }
    if dontwake {
        mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    }
    let mut wp = UffdioWriteprotect { start, len, mode };
    // SAFETY: `wp` is a valid uffdio_writeprotect that lives across the call;
    // the ioctl changes page protections only, no memory we reference.
    let ret = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_WRITEPROTECT as libc::c_ulong, &mut wp) };
    if ret < 0 {
        return Err(UffdError::Range {
            op: "UFFDIO_WRITEPROTECT",
            start,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `PAGEMAP_SCAN` page categories (`PAGE_IS_*`).
pub mod category {
    /// The page is registered for async WP (can be tracked).
    pub const WPALLOWED: u64 = 1 << 0;
    /// Written since it was last protected (not write-protected now).
    pub const WRITTEN: u64 = 1 << 1;
    /// File-backed.
    pub const FILE: u64 = 1 << 2;
    /// Present.
    pub const PRESENT: u64 = 1 << 3;
    /// Swapped out.
    pub const SWAPPED: u64 = 1 << 4;
    /// Mapped to the shared zero page.
    pub const PFNZERO: u64 = 1 << 5;
}

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported (async WP only).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range is async-WP registered.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = 0xC060_6610;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// One run of pages of the same categories (`struct page_region`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// The categories of `return_mask` the pages have.
    pub categories: u64,
}
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// What to ask `PAGEMAP_SCAN` for.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories that must all be set (after `inverted`).
    pub required: u64,
    /// At least one of these must be set (0: no condition).
    pub anyof: u64,
    /// Categories whose meaning is inverted.
    pub inverted: u64,
    /// Categories reported in [`PageRegion::categories`].
    pub report: u64,
}

/// `/proc/self/pagemap`, open for `PAGEMAP_SCAN` (Linux 6.7).
#[derive(Debug)]
pub struct PagemapScan(File);

impl PagemapScan {
    /// Opens this process's page map.
    pub fn open() -> io::Result<PagemapScan> {
        File::open("/proc/self/pagemap").map(PagemapScan)
    }

    /// The regions of `[start, end)` that match `q`, appended to `out`.
    pub fn scan(&self, start: u64, end: u64, q: ScanQuery, out: &mut Vec<PageRegion>) -> io::Result<()> {
        let mut buf = vec![PageRegion::default(); 1024];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: q.flags,
                start: at,
                end,
                walk_end: 0,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                max_pages: 0,
                category_inverted: q.inverted,
                category_mask: q.required,
                category_anyof_mask: q.anyof,
                return_mask: q.report,
            };
            // SAFETY: `arg` is a valid pm_scan_arg; `vec` points to `buf`,
            // writable for `vec_len` page_regions for the whole call.
            let n = unsafe { ioctl_with_mut_ref(&self.0, PAGEMAP_SCAN as libc::c_ulong, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = usize::try_from(n).unwrap_or(0).min(buf.len());
            out.extend_from_slice(&buf[..n]);
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// Whether this kernel has `PAGEMAP_SCAN` (an empty scan of nothing).
pub fn pagemap_scan_available() -> bool {
    let Ok(p) = PagemapScan::open() else {
        return false;
    };
    let page = crate::page_size() as u64;
    let mut out = Vec::new();
    let probe = vec![0u8; 2 * crate::page_size()];
    let start = (probe.as_ptr() as u64).next_multiple_of(page);
    p.scan(start, start + page, ScanQuery::default(), &mut out)
        .is_ok()
}

const UNTRACKED: u8 = 0;
const PENDING: u8 = 1;
const BUFFERING: u8 = 2;
const BUFFERED: u8 = 3;
const COPYING: u8 = 4;
const DONE: u8 = 5;

/// Counters of a [`WpCore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WpStats {
    /// Pages protected at the start.
    pub protected: u64,
    /// WP faults resolved by copying the page into the buffer.
    pub faults_saved: u64,
    /// WP faults on pages already saved (or untracked): only unprotected.
    pub faults_other: u64,
    /// Attempts that answered Retry (buffer full, saver busy on the page).
    pub retries: u64,
    /// The most pages the buffer held at once.
    pub buffer_peak: u64,
    /// Pages the saver took from guest memory.
    pub saved_by_saver: u64,
}

/// The page states of a live snapshot and its bounded fault buffer. See the
/// module documentation.
#[derive(Debug)]
pub struct WpCore {
    regions: Vec<Region>,
    /// First page index of each region.
    first: Vec<usize>,
    states: Vec<AtomicU8>,
    page: usize,
    buffer: Mutex<HashMap<usize, Box<[u8]>>>,
    buffer_max: usize,
    notifier: Notifier,
    failed: Mutex<Option<String>>,
    protected: AtomicU64,
    faults_saved: AtomicU64,
    faults_other: AtomicU64,
    retries: AtomicU64,
    buffer_peak: AtomicU64,
    saved_by_saver: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WpCore {
    /// A core over `regions` (every page untracked) whose fault buffer holds
    /// at most `buffer_pages` pages.
    pub fn new(regions: Vec<Region>, buffer_pages: usize) -> io::Result<WpCore> {
        let page = crate::page_size();
        let mut first = Vec::with_capacity(regions.len());
        let mut total = 0usize;
        for r in &regions {
            first.push(total);
            total += usize::try_from(r.size).map_err(io::Error::other)? / page;
        }
        // Zeroed memory from the allocator (UNTRACKED is 0): no per-page
        // loop inside the live pause (1M pages for 4 GiB).
        let states: Vec<AtomicU8> = {
            const _: () = assert!(UNTRACKED == 0);
            let mut v = std::mem::ManuallyDrop::new(vec![0u8; total]);
            let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
            // SAFETY: AtomicU8 has the size, alignment and bit validity of
            // u8 (its documentation guarantees it), so the allocation of a
            // Vec<u8> is a valid Vec<AtomicU8> of the same length and
            // capacity; `v` is never dropped, so it is owned once.
            unsafe { Vec::from_raw_parts(ptr.cast::<AtomicU8>(), len, cap) }
        };
        Ok(WpCore {
            regions,
            first,
            states,
            page,
            buffer: Mutex::new(HashMap::new()),
            buffer_max: buffer_pages.max(1),
            notifier: Notifier::new()?,
            failed: Mutex::new(None),
            protected: AtomicU64::new(0),
            faults_saved: AtomicU64::new(0),
            faults_other: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            buffer_peak: AtomicU64::new(0),
            saved_by_saver: AtomicU64::new(0),
        })
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Notified whenever the saver made progress (parked faults may resolve).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    fn locate_host(&self, addr: u64) -> Option<(usize, u64, u64)> {
        let page = self.page as u64;
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.host_base && addr - r.host_base < r.size).then(|| {
                let off = (addr - r.host_base) / page;
                let idx = self.first[i] + usize::try_from(off).unwrap_or(0);
                (idx, r.host_base + off * page, r.guest_offset + off * page)
            })
        })
    }

    fn locate_guest(&self, gpa: u64) -> Option<(usize, u64)> {
        let page = self.page as u64;
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.guest_offset && gpa - r.guest_offset < r.size).then(|| {
                let off = (gpa - r.guest_offset) / page;
                (
                    self.first[i] + usize::try_from(off).unwrap_or(0),
                    r.host_base + off * page,
                )
            })
        })
    }

    /// Marks the pages of host range `[start, end)` as pending (to be saved;
    /// the caller protects them). Returns the pages marked.
    pub fn track(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        let mut a = start;
        while a < end {
            if let Some((idx, _, _)) = self.locate_host(a) {
                self.states[idx].store(PENDING, Ordering::Release);
                n += 1;
            }
            a += self.page as u64;
        }
        self.protected.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Whether the guest page at `gpa` was tracked (present at the pause).
    pub fn tracked(&self, gpa: u64) -> bool {
        self.locate_guest(gpa)
            .is_some_and(|(i, _)| self.states[i].load(Ordering::Acquire) != UNTRACKED)
    }

    /// Marks the session failed: every later WP fault answers `Failed` and
    /// stays blocked (the write is never let through unsaved).
    pub fn fail(&self, why: String) {
        lock(&self.failed).get_or_insert(why);
        self.notifier.notify();
    }

    /// Why the session failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// One attempt at the WP fault on host address `addr` (see the module
    /// documentation).
    pub fn resolve_wp(&self, uffd: &Uffd, addr: u64) -> FaultOutcome {
        let Some((idx, host, gpa)) = self.locate_host(addr) else {
            return FaultOutcome::Failed(FaultError::OutOfRegion { addr });
        };
        if let Some(why) = self.failure() {
            return FaultOutcome::Failed(FaultError::Fill {
                guest_addr: gpa,
                host_addr: host,
                message: format!("the live snapshot failed ({why}); the write stays blocked until the snapshot is abandoned"),
            });
        }
        let unprotect =
            |by: ResolvedBy, pages: usize| match write_protect(uffd, host, self.page as u64, false, false) {
                Ok(()) => FaultOutcome::Resolved { pages, by },
                Err(e) => FaultOutcome::Failed(FaultError::Fill {
                    guest_addr: gpa,
                    host_addr: host,
                    message: e.to_string(),
                }),
            };
        match self.states[idx].load(Ordering::Acquire) {
            PENDING => {
                let mut buf = lock(&self.buffer);
                if buf.len() >= self.buffer_max {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    return FaultOutcome::Retry(RetryReason::NotReady);
                }
                if self.states[idx]
                    .compare_exchange(PENDING, BUFFERING, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // The saver claimed it meanwhile: it unprotects and notifies.
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    return FaultOutcome::Retry(RetryReason::NotReady);
                }
                // SAFETY: `host` is a page of a live region (the caller keeps the
                // mapping); it is write-protected and present, so nothing writes
                // it while we read and the read does not fault.
                let data = unsafe { std::slice::from_raw_parts(host as *const u8, self.page) };
                buf.insert(idx, data.into());
                self.buffer_peak.fetch_max(buf.len() as u64, Ordering::Relaxed);
                self.states[idx].store(BUFFERED, Ordering::Release);
                drop(buf);
                self.faults_saved.fetch_add(1, Ordering::Relaxed);
                unprotect(ResolvedBy::WriteUnprotected, 1)
            }
            BUFFERING | COPYING => {
                self.retries.fetch_add(1, Ordering::Relaxed);
                FaultOutcome::Retry(RetryReason::NotReady)
            }
            _ => {
                self.faults_other.fetch_add(1, Ordering::Relaxed);
                unprotect(ResolvedBy::AlreadyPresent, 0)
            }
        }
    }

    /// The saver's step: fills `out` with the content at the snapshot instant
    /// of the guest pages at `gpa..gpa + out.len()` (inside one region; zero
    /// for untracked pages), then unprotects the range (waking its writers)
    /// and notifies.
    pub fn save_range(&self, uffd: &Uffd, gpa: u64, out: &mut [u8]) -> Result<(), UffdError> {
        let page = self.page;
        let n = out.len() / page;
        let Some((first, host0)) = self.locate_guest(gpa) else {
            return Err(UffdError::Range {
                op: "live snapshot save",
                start: gpa,
                len: out.len() as u64,
                source: io::Error::other("outside guest memory"),
            });
        };
        let mut claimed = Vec::with_capacity(n);
        for i in 0..n {
            let idx = first + i;
            let dst = &mut out[i * page..(i + 1) * page];
            let Some(state) = self.states.get(idx) else {
                dst.fill(0);
                continue;
            };
            loop {
                match state.load(Ordering::Acquire) {
                    PENDING => {
                        if state
                            .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                            .is_err()
                        {
                            continue;
                        }
                        let host = host0 + (i * page) as u64;
                        // SAFETY: `host` is a present, write-protected page of a
                        // live region, claimed by us: nothing writes it.
                        let src = unsafe { std::slice::from_raw_parts(host as *const u8, page) };
                        dst.copy_from_slice(src);
                        claimed.push(idx);
                        self.saved_by_saver.fetch_add(1, Ordering::Relaxed);
                    }
                    BUFFERING | BUFFERED => {
                        // The fault path holds the buffer lock while buffering.
                        let taken = lock(&self.buffer).remove(&idx);
                        match taken {
                            Some(data) => {
                                dst.copy_from_slice(&data);
                                state.store(DONE, Ordering::Release);
                            }
                            None => continue,
                        }
                    }
                    UNTRACKED => dst.fill(0),
                    _ => {
                        // Saved twice: a range given again (not done by the saver).
                        dst.fill(0);
                    }
                }
                break;
            }
        }
        for idx in claimed {
            self.states[idx].store(DONE, Ordering::Release);
        }
        let r = write_protect(uffd, host0, out.len() as u64, false, false);
        self.notifier.notify();
        r
    }

    /// The counters.
    pub fn stats(&self) -> WpStats {
        WpStats {
            protected: self.protected.load(Ordering::Relaxed),
            faults_saved: self.faults_saved.load(Ordering::Relaxed),
            faults_other: self.faults_other.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            buffer_peak: self.buffer_peak.load(Ordering::Relaxed),
            saved_by_saver: self.saved_by_saver.load(Ordering::Relaxed),
        }
    }
}

/// Errors of the WP handler loop.
#[derive(Debug, thiserror::Error)]
pub enum WpHandlerError {
    /// An eventfd or subscription could not be made.
    #[error("cannot create the write-protect handler's eventfd: {0}; raise the file descriptor limit")]
    Setup(#[source] io::Error),
    /// Reading or polling the uffd failed.
    #[error("the write-protect handler's userfaultfd failed: {0}")]
    Uffd(#[from] UffdError),
    /// poll failed.
    #[error("the write-protect handler's poll failed: {0}")]
    Poll(#[source] io::Error),
}

/// A fault waiting on the saver (or failed), per thread.
#[derive(Debug, Clone)]
struct Waiting {
    tid: Option<u32>,
    since: Instant,
    retries: u64,
    reason: Option<RetryReason>,
    failure: Option<FaultError>,
}

/// The WP fault loop of one uffd (see the module documentation).
pub struct WpHandler {
    uffd: Arc<Uffd>,
    core: Arc<WpCore>,
    stop: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    parked: Arc<Mutex<HashMap<u64, Vec<Waiting>>>>,
    hook: Option<EventHook>,
    /// The saver's notifications, subscribed here so that the loop's thread
    /// (sandboxed: `wp-handler`) creates no eventfd.
    sub: Subscription,
}

/// Controls a [`WpHandler`] from other threads.
#[derive(Debug, Clone)]
pub struct WpHandlerControl {
    stop: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    parked: Arc<Mutex<HashMap<u64, Vec<Waiting>>>>,
    core: Arc<WpCore>,
}

impl WpHandlerControl {
    /// Asks the loop to return.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop.write(1);
    }

    /// The threads blocked in a WP fault the loop holds (parked or failed),
    /// oldest first.
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let parked = lock(&self.parked);
        let mut out: Vec<BlockedFault> = parked
            .iter()
            .flat_map(|(&addr, ws)| {
                let guest = self.core.locate_host(addr).map(|(_, _, g)| g).unwrap_or(addr);
                ws.iter().map(move |w| BlockedFault {
                    tid: w.tid,
                    addr,
                    guest_offset: guest,
                    since: w.since,
                    retries: w.retries,
                    reason: w.reason.clone(),
                    failure: w.failure.clone(),
                })
            })
            .collect();
        out.sort_by_key(|b| b.since);
        out
    }
}

impl std::fmt::Debug for WpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WpHandler")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl WpHandler {
    /// A loop over `uffd` (registered with [`REGISTER_WP`] on `core`'s regions).
    pub fn new(uffd: Arc<Uffd>, core: Arc<WpCore>) -> Result<WpHandler, WpHandlerError> {
        Ok(WpHandler {
            uffd,
            stop: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WpHandlerError::Setup)?),
            stopped: Arc::new(AtomicBool::new(false)),
            parked: Arc::new(Mutex::new(HashMap::new())),
            hook: None,
            sub: core.notifier().subscribe().map_err(WpHandlerError::Setup)?,
            core,
        })
    }

    /// Failures (a page that cannot be saved or unprotected) reach `hook` at
    /// once, from this loop's thread; the hook must not block.
    pub fn set_event_hook(&mut self, hook: EventHook) {
        self.hook = Some(hook);
    }

    /// The control handle.
    pub fn control(&self) -> WpHandlerControl {
        WpHandlerControl {
            stop: self.stop.clone(),
            stopped: self.stopped.clone(),
            parked: self.parked.clone(),
            core: self.core.clone(),
        }
    }

    fn attempt(&self, addr: u64, mut waiting: Vec<Waiting>) {
        let outcome = self.core.resolve_wp(&self.uffd, addr);
        match outcome {
            FaultOutcome::Resolved { .. } => {}
            FaultOutcome::Retry(reason) => {
                for w in &mut waiting {
                    w.retries += 1;
                    w.reason = Some(reason.clone());
                }
                lock(&self.parked).entry(addr).or_default().extend(waiting);
            }
            FaultOutcome::Failed(e) => {
                let new = waiting.iter().any(|w| w.failure.is_none());
                for w in &mut waiting {
                    w.failure = Some(e.clone());
                    w.reason = None;
                }
                lock(&self.parked).entry(addr).or_default().extend(waiting);
                if new {
                    if let Some(h) = &self.hook {
                        let h = h.clone();
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            h(HandlerEvent::Failed(e))
                        }));
                    }
                }
            }
        }
    }

    /// Serves WP faults until [`WpHandlerControl::stop`].
    pub fn run_until_stopped(&mut self) -> Result<(), WpHandlerError> {
        let page_mask = !(crate::page_size() as u64 - 1);
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sub.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Parked faults wake on the saver's notify; a 10 ms timeout bounds
            // a missed one (failed faults are retried too: a failure ends the
            // session, whose end unregisters and wakes everything).
            // SAFETY: `fds` is a valid array of three pollfds for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, 10) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(WpHandlerError::Poll(e));
            }
            if fds[2].revents != 0 || n == 0 {
                self.sub.clear();
                let parked = std::mem::take(&mut *lock(&self.parked));
                for (addr, ws) in parked {
                    self.attempt(addr, ws);
                }
            }
            while let Some(ev) = self.uffd.read_event()? {
                if let Event::PageFault { addr, thread_id, .. } = ev {
                    let addr = addr & page_mask;
                    let w = Waiting {
                        tid: thread_id,
                        since: Instant::now(),
                        retries: 0,
                        reason: None,
                        failure: None,
                    };
                    let merged = {
                        let mut parked = lock(&self.parked);
                        match parked.get_mut(&addr) {
                            Some(ws) => {
                                if !ws.iter().any(|x| x.tid == w.tid && w.tid.is_some()) {
                                    ws.push(w.clone());
                                }
                                true
                            }
                            None => false,
                        }
                    };
                    if !merged {
                        self.attempt(addr, vec![w]);
                    }
                }
            }
        }
    }
}

/// What this host's kernel offers for write protection (no KVM involved; see
/// the VMM's KVM probe for guest writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WpSupport {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub wp: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED`.
    pub wp_unpopulated: bool,
    /// `UFFD_FEATURE_WP_ASYNC`.
    pub wp_async: bool,
    /// `PAGEMAP_SCAN`.
    pub pagemap_scan: bool,
}

/// Probes [`WpSupport`].
pub fn wp_support() -> WpSupport {
    let avail = Uffd::new(Features::NONE, Features::NONE)
        .map(|u| u.available_features())
        .unwrap_or_default();
    WpSupport {
        wp: avail.contains(PAGEFAULT_FLAG_WP),
        wp_unpopulated: avail.contains(WP_UNPOPULATED),
        wp_async: avail.contains(WP_ASYNC),
        pagemap_scan: pagemap_scan_available(),
    }
}

#[cfg(test)]
mod tests;
