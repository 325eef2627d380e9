//! Lazily backed guest RAM.
//!
//! The path of a guest page fault, one file per step:
//! - [`uffd`]: the typed userfaultfd layer (events in, COPY/ZEROPAGE out);
//! - [`handler`]: the event loop that reads userfaultfd events and never waits for a vCPU;
//! - [`core`]: the retry core: per-page state, dedup, fault-around, outcomes;
//! - [`source`]: the page-source seam (zero, memory file, test wrapper) and its notifier.
//!
//! [`affinity`] places threads (the handler's CPU decides the round-trip cost).
//!
//! See `docs/retry-core.md` for the design.

pub mod affinity;
pub mod bench;
pub mod core;
pub mod handler;
pub mod histogram;
pub mod mmap;
pub mod source;
pub mod uffd;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod testutil;

pub use crate::affinity::{colocation_cpu, current_cpu, pin_current_thread};
pub use crate::core::{
    AfterRemove, CoreConfig, CoreError, FaultError, FaultOutcome, FaultReport, PageState, Region, ResolvedBy,
    RetryCore, Stats,
};
pub use crate::handler::{
    BlockedFault, EventHook, FaultHandler, HandlerControl, HandlerError, HandlerEvent, HandlerGroup,
    ThreadStats,
};
pub use crate::histogram::{AtomicLog2Histogram, Log2Histogram};
pub use crate::mmap::AnonMapping;
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
