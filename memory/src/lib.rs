//! Lazily backed guest RAM.
//!
//! A guest page fault walks five steps, top to bottom, one file each:
//!
//! 1. **userfault event** ([`uffd`]): the first touch of a page of a
//!    registered region blocks the toucher (a vCPU in `KVM_RUN`, or any
//!    thread) in the host kernel and queues `Event::PageFault`, read by
//!    [`Uffd::read_event`];
//! 2. **handler loop** ([`handler`]): [`FaultHandler::run_until_stopped`]
//!    polls the uffd, a stop eventfd and the sources' notifiers, and hands
//!    each fault to the core of its region; it parks what cannot be resolved
//!    now and never waits for a vCPU; new failures and its own end reach the
//!    owner at once through an event hook ([`HandlerEvent`]);
//! 3. **retry core** ([`core`]): [`RetryCore::resolve_access`] claims the page
//!    (and fault-around neighbours) by CAS, asks the source, fills, and answers
//!    a [`FaultOutcome`]: `Resolved { pages, by }`, `Retry(reason)` or
//!    `Failed(error)`;
//! 4. **page source** ([`source`]): [`PageSource::fetch`] answers a
//!    [`FetchOutcome`]: `Ready` (data in the buffer), `Zero`, `Retry(reason)`
//!    (its [`Notifier`] fires when that may change) or `Failed(error)` (never
//!    zero-filled);
//! 5. **fill** ([`uffd`]): [`Uffd::copy`] / [`Uffd::zeropage`] map the pages
//!    and wake every thread blocked on them; the vCPU's access is retried by
//!    the kernel and succeeds.
//!
//! Beside the walk: [`histogram`] (the log2 latency histogram of the core's
//! statistics and the VMM's reports), [`affinity`] (thread placement: the
//! handler's CPU decides the round-trip cost), [`bench`](mod@bench) (the raw round trip
//! to compare against), [`mmap`] (an anonymous mapping for tests and benches).
//!
//! See `docs/retry-core.md` for the design.

pub mod affinity;
pub mod bench;
pub mod core;
pub mod files;
pub mod handler;
pub mod histogram;
pub mod mmap;
pub mod page_cache;
pub mod record;
pub mod source;
pub mod uffd;
pub mod wp;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod testutil;

pub use crate::affinity::{colocation_cpu, current_cpu, pin_current_thread};
pub use crate::core::{
    AfterRemove, CoreConfig, CoreError, FaultError, FaultOutcome, FaultReport, FillObserver, Origin,
    PageState, Region, ResolvedBy, RetryCore, Stats, PREFILL_RUN_MAX,
};
pub use crate::handler::{
    BlockedFault, EventHook, FaultHandler, HandlerControl, HandlerError, HandlerEvent, HandlerGroup,
    HandlerThreadStats, ThreadStats,
};
pub use crate::histogram::{AtomicLog2Histogram, Log2Histogram};
pub use crate::mmap::{memfd, AnonMapping, MemfdMapping};
pub use crate::page_cache::{PageCacheSource, Resident, SharedFileSource};
pub use crate::record::{FillRecorder, RecordedPage};
pub use crate::source::{
    FetchOutcome, FileSource, Notifier, PageSource, RetryReason, Rule, SourceError, Subscription, TestSource,
    ZeroSource,
};
pub use crate::uffd::{CopyError, Event, FaultFlags, Features, OpenMethod, RegisterMode, Uffd, UffdError};

/// The host page size (the unit of userfaultfd resolution).
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a configuration value and touches no memory.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).ok().filter(|&p| p > 0).unwrap_or(4096)
}
