//! The page store's saved state ([`PageStoreState`]), its save and restore
//! ([`Persist`]), and the checks a restore makes of a state ([`StateError`]).

use super::{
    check_completion_area, check_read, Clock, GuestStatsCell, Held, PageStore, PageStoreError, Queue, Queued,
    Read, RequestError, MAX_DELAY,
};
use crate::{DeviceEventSink, GuestRam};
use abi::pv::store::{self, GuestStats};
use persist::Persist;
use serde::{Deserialize, Serialize};
use std::sync::PoisonError;
use std::time::Duration;

/// Why a saved state does not fit the VM it is restored on (the reason of a
/// [`PageStoreError::InvalidState`]).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The completion area is unaligned or not in the new VM's RAM.
    #[error("{source}")]
    CompletionArea {
        /// What is wrong with it.
        #[source]
        source: RequestError,
    },
    /// Reads are saved, but no completion area to answer them in.
    #[error("it has reads but no completion area")]
    ReadsWithoutArea,
    /// More pages are held than the guest can hold.
    #[error("{count} held pages, at most {max} can be")]
    TooManyHeldPages {
        /// How many pages the state holds.
        count: usize,
        /// The most pages held at once.
        max: usize,
    },
    /// A held page beyond the store.
    #[error("held store page {page} does not exist (0..{pages})")]
    NoSuchHeldPage {
        /// The held page.
        page: u64,
        /// How many pages the store has.
        pages: u64,
    },
    /// A page held twice.
    #[error("store page {page} is held twice")]
    HeldTwice {
        /// The page.
        page: u64,
    },
    /// A read in flight with more of its delay left than any read waits.
    #[error("read of store page {index} has {remaining_us} us left, more than the longest delay ({max:?})")]
    DelayTooLong {
        /// The page the read is of.
        index: u64,
        /// Microseconds left, as saved.
        remaining_us: u64,
        /// The longest delay ([`MAX_DELAY`]).
        max: Duration,
    },
    /// A held read of a page that is not held.
    #[error("a read waits for store page {index}, which is not held")]
    NotHeld {
        /// The page the read waits for.
        index: u64,
    },
    /// A saved read that the guest could not have sent to the new VM.
    #[error("a saved read is invalid: {source}")]
    InvalidRead {
        /// What is wrong with it.
        #[source]
        source: RequestError,
    },
    /// Two saved reads answer into the same completion slot.
    #[error("completion slot {slot} has two reads")]
    SharedSlot {
        /// The slot.
        slot: u64,
    },
}

/// A read the worker answers after its delay, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlightRead {
    /// Store page.
    pub index: u64,
    /// Guest frame the page goes to.
    pub dest: u64,
    /// Completion slot the id goes to.
    pub slot: u64,
    /// Request id (never 0).
    pub id: u64,
    /// Microseconds of the delay that were left at the save (device time:
    /// the time the device was paused does not count), rounded up.
    pub remaining_us: u64,
}

/// A read of a held page, waiting for the page's `RELEASE`, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldRead {
    /// Store page (one of [`PageStoreState::held_pages`]).
    pub index: u64,
    /// Guest frame the page goes to.
    pub dest: u64,
    /// Completion slot the id goes to.
    pub slot: u64,
    /// Request id (never 0).
    pub id: u64,
}

/// The saved state of a [`PageStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageStoreState {
    /// Guest-physical address of the completion area (`INIT`), if the guest
    /// sent one.
    pub completion_area: Option<u64>,
    /// Reads accepted and not answered yet, earliest due first.
    pub in_flight: Vec<InFlightRead>,
    /// Pages the guest holds, in the order it held them.
    pub held_pages: Vec<u64>,
    /// Reads waiting for a held page's release, in the order they came.
    pub held_reads: Vec<HeldRead>,
    /// The statistics the guest sent last (`STATS`), restored into the new
    /// VM's [`GuestStatsCell`].
    pub stats: Option<GuestStats>,
}

/// What a restored [`PageStore`] needs besides its state: the new VM's
/// resources.
pub struct PageStoreArgs {
    /// The new VM's guest memory.
    pub mem: GuestRam,
    /// Where rejected requests are reported.
    pub sink: DeviceEventSink,
    /// Where the guest's statistics land.
    pub stats: GuestStatsCell,
    /// Start paused (one pause held, which
    /// [`PageStoreHandle::resume`](super::PageStoreHandle::resume) ends): the
    /// reads' remaining delays then count from the resume, and nothing is
    /// written into guest memory before it (restore devices, then memory and
    /// vCPUs, then resume). `false` starts the delays at the restore.
    pub start_paused: bool,
    /// How the worker thread is sandboxed.
    pub seccomp: sandbox::SeccompMode,
}

impl std::fmt::Debug for PageStoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStoreArgs")
            .field("start_paused", &self.start_paused)
            .finish_non_exhaustive()
    }
}

/// Microseconds in `d`, rounded up.
fn micros_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX)
}

impl Persist for PageStore {
    type State = PageStoreState;
    type ConstructorArgs = PageStoreArgs;
    type Error = PageStoreError;

    /// Requires a pause ([`PageStoreHandle::pause`](super::PageStoreHandle::pause)
    /// returned): the saved reads are then exactly those not written into
    /// guest memory, and none will be until the resume. Keep the device paused
    /// until guest memory is saved.
    fn save(&self) -> Result<PageStoreState, PageStoreError> {
        let q = self.shared.lock();
        if q.pauses == 0 || q.serving.is_some() {
            return Err(PageStoreError::NotPaused);
        }
        let now = q.clock.now();
        let mut queued: Vec<&Queued> = q.reads.iter().collect();
        // Stable: reads due together keep their order.
        queued.sort_by_key(|r| r.due);
        let in_flight = queued
            .into_iter()
            .map(|r| InFlightRead {
                index: r.read.index,
                dest: r.read.dest,
                slot: r.read.slot,
                id: r.read.id,
                remaining_us: micros_ceil(r.due.saturating_sub(now)),
            })
            .collect();
        let held_reads = self
            .held
            .reads
            .iter()
            .map(|r| HeldRead {
                index: r.index,
                dest: r.dest,
                slot: r.slot,
                id: r.id,
            })
            .collect();
        let stats = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(PageStoreState {
            completion_area: q.completion,
            in_flight,
            held_pages: self.held.pages.clone(),
            held_reads,
            stats,
        })
    }

    fn restore(args: PageStoreArgs, state: &PageStoreState) -> Result<Self, PageStoreError> {
        check_state(&args.mem, state).map_err(|reason| PageStoreError::InvalidState { reason })?;
        let clock = Clock::new(args.start_paused);
        let now = clock.now();
        let reads = state
            .in_flight
            .iter()
            .map(|r| Queued {
                due: now + Duration::from_micros(r.remaining_us),
                read: Read {
                    index: r.index,
                    dest: r.dest,
                    slot: r.slot,
                    id: r.id,
                },
            })
            .collect();
        let queue = Queue {
            clock,
            completion: state.completion_area,
            reads,
            serving: None,
            pauses: usize::from(args.start_paused),
            stopped: false,
        };
        let held = Held {
            pages: state.held_pages.clone(),
            reads: state
                .held_reads
                .iter()
                .map(|r| Read {
                    index: r.index,
                    dest: r.dest,
                    slot: r.slot,
                    id: r.id,
                })
                .collect(),
        };
        *args.stats.lock().unwrap_or_else(PoisonError::into_inner) = state.stats;
        PageStore::start(args.mem, args.sink, args.stats, queue, held, args.seccomp)
    }
}

/// Checks a saved state against the new VM's memory, as strictly as the
/// requests that built it were checked.
fn check_state(mem: &GuestRam, state: &PageStoreState) -> Result<(), StateError> {
    if let Some(area) = state.completion_area {
        check_completion_area(mem, area).map_err(|source| StateError::CompletionArea { source })?;
    } else if !state.in_flight.is_empty() || !state.held_reads.is_empty() {
        return Err(StateError::ReadsWithoutArea);
    }
    if state.held_pages.len() > store::MAX_HELD_PAGES {
        return Err(StateError::TooManyHeldPages {
            count: state.held_pages.len(),
            max: store::MAX_HELD_PAGES,
        });
    }
    for (i, &page) in state.held_pages.iter().enumerate() {
        if page >= store::PAGES {
            return Err(StateError::NoSuchHeldPage {
                page,
                pages: store::PAGES,
            });
        }
        if state.held_pages[..i].contains(&page) {
            return Err(StateError::HeldTwice { page });
        }
    }
    let in_flight = state.in_flight.iter().map(|r| {
        let read = Read {
            index: r.index,
            dest: r.dest,
            slot: r.slot,
            id: r.id,
        };
        if Duration::from_micros(r.remaining_us) > MAX_DELAY {
            Err(StateError::DelayTooLong {
                index: r.index,
                remaining_us: r.remaining_us,
                max: MAX_DELAY,
            })
        } else {
            Ok(read)
        }
    });
    let held = state.held_reads.iter().map(|r| {
        if state.held_pages.contains(&r.index) {
            Ok(Read {
                index: r.index,
                dest: r.dest,
                slot: r.slot,
                id: r.id,
            })
        } else {
            Err(StateError::NotHeld { index: r.index })
        }
    });
    let mut slots = [false; store::SLOTS];
    for read in in_flight.chain(held) {
        let read = read?;
        check_read(mem, &read).map_err(|source| StateError::InvalidRead { source })?;
        // In range: `check_read` checked the slot.
        match usize::try_from(read.slot).ok().and_then(|s| slots.get_mut(s)) {
            Some(used) if !*used => *used = true,
            _ => return Err(StateError::SharedSlot { slot: read.slot }),
        }
    }
    Ok(())
}
