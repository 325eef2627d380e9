//! Step 4 of a fault's walk, the **page source**: userfault event
//! ([`crate::uffd`]) -> handler loop ([`crate::handler`]) -> retry core
//! ([`crate::core`]) -> **page source** -> fill ([`crate::uffd`]).
//!
//! The seam where the contents of guest pages come from. A [`PageSource`]
//! answers one question per run of pages with a [`FetchOutcome`]:
//! - `Ready`: the data is in the buffer (the core fills with UFFDIO_COPY);
//! - `Zero`: it is all zero (UFFDIO_ZEROPAGE, nothing copied);
//! - `Cached`: the page cache of the shmem file behind the mapping holds it
//!   (UFFDIO_CONTINUE, nothing copied; [`crate::page_cache`]);
//! - `Retry(reason)` ([`RetryReason`]: `NotReady`, `Held`): not yet; the
//!   source calls its [`Notifier`] when that may have changed, and the core
//!   or handler sleeps until then (no polling);
//! - `Failed(error)` ([`SourceError`]): never; the core does not zero-fill the
//!   page and reports `FaultOutcome::Failed`.
//!
//! Sources here: [`ZeroSource`] (fresh VM), [`FileSource`] (a memory file),
//! [`TestSource`] (per-page rules and a gate around another source, for tests).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a fault could not be resolved yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryReason {
    /// The source does not have the page yet (e.g. still downloading).
    NotReady,
    /// The page is held back on purpose (tests, migration ordering).
    Held,
    /// UFFDIO_COPY returned EAGAIN: the address space is changing; read pending
    /// events, then retry.
    MappingChanged,
    /// A bounded wait for the source ended before it notified.
    TimedOut,
}

/// Errors of page sources.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The memory file could not be opened or inspected.
    #[error("cannot open memory file {path}: {message}; check the path and its permissions")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error text.
        message: String,
    },
    /// Reading from the memory file failed.
    #[error("reading {len} bytes at offset {offset:#x} of memory file {path} failed: {message} (errno {errno:?}); the snapshot file may be truncated or on failing storage")]
    Io {
        /// The file.
        path: PathBuf,
        /// File offset of the read.
        offset: u64,
        /// Bytes requested.
        len: usize,
        /// errno, if the OS gave one.
        errno: Option<i32>,
        /// The OS error text.
        message: String,
    },
    /// A failure injected by [`TestSource`].
    #[error("injected failure at guest offset {offset:#x}: {message}")]
    Injected {
        /// Guest offset of the failing page.
        offset: u64,
        /// The configured message.
        message: String,
    },
    /// A source answered `Split` for one page.
    #[error("the page source answered Split for the single page at guest offset {offset:#x}; this is a page-source bug")]
    Unsplittable {
        /// Guest offset.
        offset: u64,
    },
    /// The buffer given to `fetch` is not page sized or aligned.
    #[error("fetch buffer of {len} bytes at guest offset {offset:#x} is not a page multiple; this is a retry-core bug")]
    BadRequest {
        /// Guest offset.
        offset: u64,
        /// Buffer length.
        len: usize,
    },
}

/// The answer of a source for one run of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// `buf` holds the pages.
    Ready,
    /// The pages are all zero: the core maps zero pages and copies nothing.
    Zero,
    /// The pages are in the page cache of the shmem file behind the guest
    /// mapping already (the source wrote them there, or they were there): the
    /// core maps them with UFFDIO_CONTINUE and copies nothing into the
    /// faulting mapping (MINOR mode, see [`crate::page_cache`]). `buf` is
    /// not read.
    Cached,
    /// The run mixes kinds of pages (e.g. cached and holes): ask again for
    /// the faulting page alone. Not an answer for a single page.
    Split,
    /// Not available yet; the source will [`Notifier::notify`] when it may be.
    Retry(RetryReason),
    /// The pages cannot be provided. Never zero-filled by the core.
    Failed(SourceError),
}

/// Where the contents of guest pages come from.
pub trait PageSource: Send + Sync + std::fmt::Debug {
    /// A short name for statistics and errors.
    fn name(&self) -> &str;
    /// Fills `buf` (a multiple of the page size) with guest memory starting at
    /// guest offset `offset` (page aligned).
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome;
    /// Whether reading several consecutive pages costs about as much as one
    /// (enables fault-around).
    fn bulk_cheap(&self) -> bool;
    /// Notified whenever a page that returned `Retry` may have become available.
    fn notifier(&self) -> &Notifier;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these counters inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes whoever waits for a source to make progress.
///
/// Three ways to wait, all real sleeps: a blocking [`Notifier::wait_past`] on
/// a generation counter (condvar, any number of waiters); polling
/// [`Notifier::as_raw_fd`] (an eventfd, so an event loop can wait for the uffd,
/// a stop signal and sources at once; one consumer only, since clearing it
/// consumes the wake-up); or polling a [`Subscription`] of one's own, which is
/// how several event loops (handler threads) wait on one source: each
/// `notify` makes every subscription readable.
#[derive(Debug)]
pub struct Notifier {
    generation: Mutex<u64>,
    cond: Condvar,
    event: EventFd,
    subscribers: Mutex<Vec<Weak<EventFd>>>,
}

/// An eventfd of its own that every [`Notifier::notify`] makes readable,
/// cleared by its owner only: one per event loop waiting on a source.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    event: Arc<EventFd>,
}

impl Subscription {
    /// Clears the eventfd after it polled readable (call before retrying, so a
    /// notify that races with the retry keeps it readable).
    pub fn clear(&self) {
        let _ = self.event.read();
    }
}

impl AsRawFd for Subscription {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

impl Notifier {
    /// Creates a notifier.
    pub fn new() -> io::Result<Notifier> {
        Ok(Notifier {
            generation: Mutex::new(0),
            cond: Condvar::new(),
            event: EventFd::new(EFD_NONBLOCK)?,
            subscribers: Mutex::new(Vec::new()),
        })
    }

    /// A new [`Subscription`]: an eventfd that every later `notify` makes
    /// readable, independent of the other subscribers and of `as_raw_fd`.
    pub fn subscribe(&self) -> io::Result<Subscription> {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&event));
        Ok(Subscription { event })
    }

    /// The current generation; read it before a fetch, wait past it after a Retry.
    pub fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    /// Signals that something may have become available.
    pub fn notify(&self) {
        let mut g = lock(&self.generation);
        *g += 1;
        self.cond.notify_all();
        // Only fails if the counter would overflow, i.e. it is already readable.
        let _ = self.event.write(1);
        for sub in lock(&self.subscribers).iter().filter_map(Weak::upgrade) {
            let _ = sub.write(1);
        }
    }

    /// Waits until the generation moves past `seen` or `timeout` elapses.
    /// Returns whether it moved.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.generation);
        while *g == seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Clears the eventfd after it polled readable (call before retrying, so a
    /// notify that races with the retry keeps it readable).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

fn check_buf(offset: u64, buf: &[u8]) -> Option<FetchOutcome> {
    let ps = crate::page_size();
    if buf.is_empty() || buf.len() % ps != 0 || offset % ps as u64 != 0 {
        return Some(FetchOutcome::Failed(SourceError::BadRequest {
            offset,
            len: buf.len(),
        }));
    }
    None
}

/// Every page is zero (fresh VM).
#[derive(Debug)]
pub struct ZeroSource {
    notifier: Notifier,
}

impl ZeroSource {
    /// Creates a zero source.
    pub fn new() -> io::Result<ZeroSource> {
        Ok(ZeroSource {
            notifier: Notifier::new()?,
        })
    }
}

impl PageSource for ZeroSource {
    fn name(&self) -> &str {
        "zero"
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        check_buf(offset, buf).unwrap_or(FetchOutcome::Zero)
    }
    fn bulk_cheap(&self) -> bool {
        true
    }
    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

/// Pages read from a memory file (snapshot restore): guest offset `o` is file
/// offset `base + o`; pages beyond the end of the file are zero.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    base: u64,
    file_len: u64,
    name: String,
    notifier: Notifier,
}

impl FileSource {
    /// Opens `path`; guest offset 0 is at file offset `base`.
    pub fn open(path: &Path, base: u64) -> Result<FileSource, SourceError> {
        let open_err = |e: io::Error| SourceError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        };
        // A FIFO or a device would block or never end: regular files only.
        let file = crate::files::open_regular(path).map_err(open_err)?;
        let file_len = file.metadata().map_err(open_err)?.len();
        Ok(FileSource {
            file,
            path: path.to_owned(),
            base,
            file_len,
            name: format!("file:{}", path.display()),
            notifier: Notifier::new().map_err(open_err)?,
        })
    }
}

impl PageSource for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        if let Some(bad) = check_buf(offset, buf) {
            return bad;
        }
        let start = self.base.saturating_add(offset);
        let in_file = self.file_len.saturating_sub(start);
        let n = usize::try_from(in_file).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return FetchOutcome::Zero;
        }
        let (head, tail) = buf.split_at_mut(n);
        if let Err(e) = self.file.read_exact_at(head, start) {
            return FetchOutcome::Failed(SourceError::Io {
                path: self.path.clone(),
                offset: start,
                len: n,
                errno: e.raw_os_error(),
                message: e.to_string(),
            });
        }
        tail.fill(0);
        FetchOutcome::Ready
    }

    fn bulk_cheap(&self) -> bool {
        true
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

/// A per-page behaviour of [`TestSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Sleep this long, then serve from the inner source.
    Delay(Duration),
    /// Fail with this message.
    Fail(String),
    /// Answer `Retry(NotReady)` this many more times (notifying each time), then serve.
    RetryTimes(u32),
    /// Answer `Retry(Held)` until [`TestSource::release`].
    Hold,
}

/// Wraps a source with per-page rules and counters, for tests.
///
/// A gate ([`TestSource::close_gate`]) holds every page without an explicit
/// rule, so a test can stop all guest memory at once and open it later.
#[derive(Debug)]
pub struct TestSource {
    inner: Arc<dyn PageSource>,
    rules: Mutex<HashMap<u64, Rule>>,
    fetches: Mutex<HashMap<u64, u32>>,
    fetch_calls: AtomicU64,
    gate_closed: AtomicBool,
    /// Pages whose last single-page fetch answered `Retry(Held)`.
    held: Mutex<BTreeSet<u64>>,
    held_fetches: AtomicU64,
    notifier: Notifier,
}

impl TestSource {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn PageSource>) -> io::Result<TestSource> {
        Ok(TestSource {
            inner,
            rules: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
            fetch_calls: AtomicU64::new(0),
            gate_closed: AtomicBool::new(false),
            held: Mutex::new(BTreeSet::new()),
            held_fetches: AtomicU64::new(0),
            notifier: Notifier::new()?,
        })
    }

    /// Closes the gate: from now on every fetch touching a page without an
    /// explicit rule answers `Retry(Held)` (the core parks the fault and sleeps,
    /// no polling) until [`TestSource::open_gate`].
    pub fn close_gate(&self) {
        self.gate_closed.store(true, Ordering::SeqCst);
    }

    /// Opens the gate and notifies, so parked faults are retried and served.
    pub fn open_gate(&self) {
        // Open before notifying: a retry woken by this notify must see it open.
        self.gate_closed.store(false, Ordering::SeqCst);
        self.notifier.notify();
    }

    /// Whether the gate is closed.
    pub fn gate_closed(&self) -> bool {
        self.gate_closed.load(Ordering::SeqCst)
    }

    /// Guest offsets (sorted) of pages currently refused with `Retry(Held)`
    /// (by a `Hold` rule or the closed gate), i.e. the faults the core parked.
    /// Only single-page fetches count: a refused fault-around run is followed
    /// by a fetch of the faulting page alone, so its neighbours (which nobody
    /// waits for) are not listed. A page leaves the list when a later fetch of
    /// it is answered otherwise.
    pub fn held_pages(&self) -> Vec<u64> {
        lock(&self.held).iter().copied().collect()
    }

    /// Number of `fetch` calls answered `Retry(Held)` so far (runs included).
    pub fn held_fetches(&self) -> u64 {
        self.held_fetches.load(Ordering::Relaxed)
    }

    /// Sets the rule of the page at guest offset `page` (page aligned).
    pub fn set_rule(&self, page: u64, rule: Rule) {
        lock(&self.rules).insert(page, rule);
    }

    /// Removes the rule of `page` and notifies waiters.
    pub fn clear_rule(&self, page: u64) {
        lock(&self.rules).remove(&page);
        self.notifier.notify();
    }

    /// Releases a held page (same as [`TestSource::clear_rule`]).
    pub fn release(&self, page: u64) {
        self.clear_rule(page);
    }

    /// How many times the page at guest offset `page` was part of a fetch.
    pub fn fetches_of(&self, page: u64) -> u32 {
        lock(&self.fetches).get(&page).copied().unwrap_or(0)
    }

    /// Number of `fetch` calls (a fault-around run counts once).
    pub fn fetch_calls(&self) -> u64 {
        self.fetch_calls.load(Ordering::Relaxed)
    }

    /// The largest per-page fetch count (1 means no page was fetched twice).
    pub fn max_fetches_per_page(&self) -> u32 {
        lock(&self.fetches).values().copied().max().unwrap_or(0)
    }
}

impl PageSource for TestSource {
    fn name(&self) -> &str {
        "test"
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        if let Some(bad) = check_buf(offset, buf) {
            return bad;
        }
        self.fetch_calls.fetch_add(1, Ordering::Relaxed);
        let ps = crate::page_size() as u64;
        let pages = buf.len() as u64 / ps;
        {
            let mut f = lock(&self.fetches);
            for i in 0..pages {
                *f.entry(offset + i * ps).or_insert(0) += 1;
            }
        }
        let mut delay = Duration::ZERO;
        let held = |refused: bool| {
            let mut h = lock(&self.held);
            if refused {
                self.held_fetches.fetch_add(1, Ordering::Relaxed);
                if pages == 1 {
                    h.insert(offset);
                }
            } else if !h.is_empty() {
                for i in 0..pages {
                    h.remove(&(offset + i * ps));
                }
            }
        };
        {
            let mut rules = lock(&self.rules);
            // Read under the rules lock; open_gate's notify follows its store,
            // so a refusal racing with it is retried, never lost.
            let gate_closed = self.gate_closed.load(Ordering::SeqCst);
            for i in 0..pages {
                let page = offset + i * ps;
                match rules.get_mut(&page) {
                    None if gate_closed => {
                        drop(rules);
                        held(true);
                        return FetchOutcome::Retry(RetryReason::Held);
                    }
                    None => {}
                    Some(Rule::Delay(d)) => delay = delay.max(*d),
                    Some(Rule::Fail(m)) => {
                        let message = m.clone();
                        drop(rules);
                        held(false);
                        return FetchOutcome::Failed(SourceError::Injected {
                            offset: page,
                            message,
                        });
                    }
                    Some(Rule::Hold) => {
                        drop(rules);
                        held(true);
                        return FetchOutcome::Retry(RetryReason::Held);
                    }
                    Some(Rule::RetryTimes(n)) => {
                        if *n == 0 {
                            rules.remove(&page);
                        } else {
                            *n -= 1;
                            drop(rules);
                            held(false);
                            // "Available soon": tell the waiter to come back.
                            self.notifier.notify();
                            return FetchOutcome::Retry(RetryReason::NotReady);
                        }
                    }
                }
            }
        }
        held(false);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.inner.fetch(offset, buf)
    }

    fn bulk_cheap(&self) -> bool {
        self.inner.bulk_cheap()
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests {
    use super::*;
    use std::io::Write;

    fn ps() -> usize {
        crate::page_size()
    }

    #[test]
    fn zero_source_is_zero_and_checks_buffers() {
        let z = ZeroSource::new().expect("eventfd");
        let mut buf = vec![1u8; ps()];
        assert_eq!(z.fetch(0, &mut buf), FetchOutcome::Zero);
        let mut odd = vec![0u8; 100];
        assert!(matches!(
            z.fetch(0, &mut odd),
            FetchOutcome::Failed(SourceError::BadRequest { .. })
        ));
    }

    #[test]
    fn file_source_reads_base_offset_and_zero_tail() {
        let dir = std::env::temp_dir().join(format!("vmm-memory-fs-{}", std::process::id()));
        let mut f = File::create(&dir).expect("create temp file");
        let ps = ps();
        // One header page, then 1.5 guest pages of data.
        let mut data = vec![0xEEu8; ps];
        data.extend(std::iter::repeat_n(7u8, ps + ps / 2));
        f.write_all(&data).expect("write");
        drop(f);
        let s = FileSource::open(&dir, ps as u64).expect("open");
        let mut buf = vec![0xFFu8; 2 * ps];
        assert_eq!(s.fetch(0, &mut buf), FetchOutcome::Ready);
        assert!(buf[..ps + ps / 2].iter().all(|&b| b == 7));
        assert!(buf[ps + ps / 2..].iter().all(|&b| b == 0));
        let mut buf = vec![0u8; ps];
        assert_eq!(s.fetch(4 * ps as u64, &mut buf), FetchOutcome::Zero);
        std::fs::remove_file(&dir).expect("cleanup");
        let err = FileSource::open(&dir, 0).expect_err("file is gone");
        assert!(err.to_string().contains("cannot open memory file"), "{err}");
    }

    #[test]
    fn test_source_rules() {
        let t = TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd");
        let ps = ps() as u64;
        let mut buf = vec![0u8; crate::page_size()];
        t.set_rule(0, Rule::RetryTimes(2));
        let g = t.notifier().generation();
        assert_eq!(t.fetch(0, &mut buf), FetchOutcome::Retry(RetryReason::NotReady));
        assert!(t.notifier().wait_past(g, Duration::ZERO), "retry notifies");
        assert_eq!(t.fetch(0, &mut buf), FetchOutcome::Retry(RetryReason::NotReady));
        assert_eq!(t.fetch(0, &mut buf), FetchOutcome::Zero);
        assert_eq!(t.fetches_of(0), 3);

        t.set_rule(ps, Rule::Fail("disk on fire".into()));
        let out = t.fetch(ps, &mut buf);
        let FetchOutcome::Failed(e) = out else {
            panic!("expected failure, got {out:?}")
        };
        assert_eq!(
            e.to_string(),
            format!("injected failure at guest offset {ps:#x}: disk on fire")
        );

        t.set_rule(2 * ps, Rule::Hold);
        assert_eq!(t.fetch(2 * ps, &mut buf), FetchOutcome::Retry(RetryReason::Held));
        let g = t.notifier().generation();
        assert!(!t.notifier().wait_past(g, Duration::from_millis(10)));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                t.release(2 * ps);
            });
            assert!(
                t.notifier().wait_past(g, Duration::from_secs(10)),
                "release wakes"
            );
        });
        assert_eq!(t.fetch(2 * ps, &mut buf), FetchOutcome::Zero);
    }

    fn readable(fd: &impl AsRawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the call; timeout 0 never sleeps.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn every_subscription_sees_every_notify() {
        let n = Notifier::new().expect("eventfd");
        let (a, b) = (n.subscribe().expect("a"), n.subscribe().expect("b"));
        assert!(!readable(&a) && !readable(&b) && !readable(&n));
        n.notify();
        assert!(readable(&a) && readable(&b) && readable(&n));
        // One event loop clearing its wake-up must not take the other's.
        a.clear();
        assert!(
            !readable(&a) && readable(&b),
            "a clear consumed another loop's wake-up"
        );
        drop(b);
        n.notify();
        assert!(readable(&a));
        assert_eq!(lock(&n.subscribers).len(), 2, "pruned on the next subscribe only");
        let _c = n.subscribe().expect("c");
        assert_eq!(lock(&n.subscribers).len(), 2);
    }

    #[test]
    fn test_source_gate_holds_pages_without_rules() {
        let t = TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd");
        let ps = ps() as u64;
        let mut one = vec![0u8; crate::page_size()];
        let mut run = vec![0u8; 4 * crate::page_size()];
        t.set_rule(ps, Rule::Fail("explicit".into()));
        t.set_rule(2 * ps, Rule::Delay(Duration::from_millis(1)));
        t.close_gate();
        assert!(t.gate_closed());
        assert_eq!(t.fetch(0, &mut one), FetchOutcome::Retry(RetryReason::Held));
        // Explicit rules still apply behind a closed gate.
        assert!(matches!(t.fetch(ps, &mut one), FetchOutcome::Failed(_)));
        assert_eq!(t.fetch(2 * ps, &mut one), FetchOutcome::Zero);
        // A refused run lists nothing: the core retries the faulting page alone.
        assert_eq!(t.fetch(4 * ps, &mut run), FetchOutcome::Retry(RetryReason::Held));
        assert_eq!(t.held_pages(), vec![0]);
        assert_eq!(t.held_fetches(), 2);
        let g = t.notifier().generation();
        t.open_gate();
        assert!(t.notifier().wait_past(g, Duration::ZERO), "opening notifies");
        assert_eq!(t.fetch(0, &mut one), FetchOutcome::Zero);
        assert!(t.held_pages().is_empty());
        t.set_rule(3 * ps, Rule::Hold);
        assert_eq!(t.fetch(3 * ps, &mut one), FetchOutcome::Retry(RetryReason::Held));
        assert_eq!(t.held_pages(), vec![3 * ps]);
        t.release(3 * ps);
        assert_eq!(t.fetch(3 * ps, &mut one), FetchOutcome::Zero);
        assert!(t.held_pages().is_empty());
    }
}
