//! Guest RAM served by a page-fault handler outside this process: the
//! regions are registered with a userfaultfd that the owner hands over (with
//! Firecracker's UFFD handshake, in the orchestration layer). From then on
//! the external handler alone resolves faults.
//!
//! What this process can know about faults without stealing the handler's
//! events (reading the userfaultfd takes an event away from whoever else
//! reads it):
//!
//! - how many faults wait, from the userfaultfd's `fdinfo`: `pending` counts
//!   events nobody has read yet, `total` those plus the ones read and not yet
//!   woken ([`ExternalMemory::waiting`]);
//! - which of its threads are blocked in a userfault: their
//!   `/proc/self/task/TID/wchan` is `handle_userfault`
//!   ([`ExternalMemory::blocked`], so a pause reports such a vCPU as blocked
//!   instead of waiting for it);
//! - while no handler is attached (after one died, before another is
//!   attached), the events themselves: the owner then *parks* them
//!   ([`ExternalMemory::park`]: read and recorded, never served), which names
//!   each waiting page and its thread.
//!
//! [`ExternalMemory::wake_all`] wakes every registered range (UFFDIO_WAKE):
//! each blocked fault faults again and raises a new event. That is how the
//! faults a dead handler had read (and will never serve) reach the next
//! handler; events are not replayed otherwise.

use ::memory::{BlockedFault, Event, RegisterMode, Uffd, UffdError};
use devices::GuestRam;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// One region of guest RAM as an external handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionMapping {
    /// Host virtual address of the region in this process.
    pub host_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Guest-physical address of the region's start.
    pub gpa: u64,
}

/// Faults waiting on the userfaultfd, from its `fdinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct WaitingFaults {
    /// Events queued that nobody has read yet.
    pub unread: u64,
    /// Events read (by a handler, or parked here) whose faults were not woken yet.
    pub read: u64,
}

impl WaitingFaults {
    /// Parses `/proc/PID/fdinfo/FD` of a userfaultfd (`pending:` and `total:`).
    pub fn parse(fdinfo: &str) -> Option<WaitingFaults> {
        let field = |name: &str| {
            fdinfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let pending = field("pending:")?;
        let total = field("total:")?;
        Some(WaitingFaults {
            unread: pending,
            read: total.saturating_sub(pending),
        })
    }

    /// All waiting faults.
    pub fn total(&self) -> u64 {
        self.unread + self.read
    }
}

/// A fault read by this process while no handler serves (see [`ExternalMemory::park`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkedFault {
    /// The faulting thread.
    pub tid: Option<u32>,
    /// Host address of the page.
    pub host_addr: u64,
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// When it was read.
    pub since: Instant,
}

/// Guest RAM registered with a userfaultfd for an external handler.
#[derive(Debug)]
pub struct ExternalMemory {
    uffd: Uffd,
    mappings: Vec<RegionMapping>,
    parked: Mutex<Vec<ParkedFault>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `wchan` of a thread blocked in a userfault.
const USERFAULT_WCHAN: &str = "handle_userfault";

impl ExternalMemory {
    /// Registers every region of `mem` (MISSING mode) with a new userfaultfd:
    /// `O_CLOEXEC | O_NONBLOCK`, not user-mode only (KVM touches guest memory
    /// from the kernel), `UFFD_FEATURE_EVENT_REMOVE` (as Firecracker's) and,
    /// when offered, `THREAD_ID` (faults name their thread; handlers that do
    /// not read it see no difference).
    pub fn register(mem: &GuestRam) -> Result<ExternalMemory, UffdError> {
        let uffd = Uffd::for_guest_memory()?;
        let mappings: Vec<RegionMapping> = mem
            .iter()
            .map(|r| RegionMapping {
                host_addr: r.as_ptr() as u64,
                size: r.len(),
                gpa: r.start_addr().raw_value(),
            })
            .collect();
        for m in &mappings {
            uffd.register(m.host_addr, m.size, RegisterMode::MISSING)?;
        }
        Ok(ExternalMemory {
            uffd,
            mappings,
            parked: Mutex::new(Vec::new()),
        })
    }

    /// The userfaultfd to hand to the handler (it stays open here too, for as
    /// long as guest memory lives).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The regions, in guest-physical order.
    pub fn mappings(&self) -> &[RegionMapping] {
        &self.mappings
    }

    /// The guest-physical address of host address `host`.
    pub fn gpa_of(&self, host: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|m| host >= m.host_addr && host - m.host_addr < m.size)
            .map(|m| m.gpa + (host - m.host_addr))
    }

    /// How many faults wait now (the userfaultfd's `fdinfo`).
    pub fn waiting(&self) -> std::io::Result<WaitingFaults> {
        let path = format!("/proc/self/fdinfo/{}", self.uffd.as_raw_fd());
        let text = std::fs::read_to_string(&path)?;
        WaitingFaults::parse(&text).ok_or_else(|| {
            std::io::Error::other(format!(
                "{path} has no `pending:`/`total:` lines: not a userfaultfd?"
            ))
        })
    }

    /// Reads every queued event without serving it, and records the page
    /// faults (the latest per thread). Only while no handler is attached: a
    /// live handler would lose these events. Returns how many were read.
    pub fn park(&self) -> Result<usize, UffdError> {
        let mut n = 0;
        while let Some(ev) = self.uffd.read_event()? {
            n += 1;
            if let Event::PageFault {
                addr,
                flags,
                thread_id,
            } = ev
            {
                let host_addr = addr & !(abi::layout::PAGE_SIZE - 1);
                let fault = ParkedFault {
                    tid: thread_id,
                    host_addr,
                    gpa: self.gpa_of(host_addr).unwrap_or(u64::MAX),
                    write: flags.write,
                    since: Instant::now(),
                };
                let mut parked = lock(&self.parked);
                parked.retain(|p| match (p.tid, fault.tid) {
                    (Some(a), Some(b)) => a != b,
                    _ => p.host_addr != fault.host_addr,
                });
                parked.push(fault);
            }
        }
        Ok(n)
    }

    /// The faults parked so far (oldest first).
    pub fn parked(&self) -> Vec<ParkedFault> {
        lock(&self.parked).clone()
    }

    /// Wakes every registered range: each blocked fault faults again and
    /// raises a new event (for a new handler, or to be parked). Forgets the
    /// parked faults, which are raised again.
    pub fn wake_all(&self) -> Result<(), UffdError> {
        lock(&self.parked).clear();
        for m in &self.mappings {
            self.uffd.wake(m.host_addr, m.size)?;
        }
        Ok(())
    }

    /// The threads of this process blocked in a userfault now.
    pub fn blocked_threads() -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|tid| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
                    .is_ok_and(|w| w.trim() == USERFAULT_WCHAN)
            })
            .collect()
    }

    /// The faults this process knows to be blocked: the parked ones (page
    /// known), then any other thread blocked in a userfault (page unknown:
    /// `guest_offset` is `u64::MAX`, its event is the handler's).
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let parked = self.parked();
        let mut out: Vec<BlockedFault> = parked
            .iter()
            .map(|p| BlockedFault {
                tid: p.tid,
                addr: p.host_addr,
                guest_offset: p.gpa,
                since: p.since,
                retries: 0,
                reason: None,
                failure: None,
            })
            .collect();
        let now = Instant::now();
        for tid in Self::blocked_threads() {
            if !parked.iter().any(|p| p.tid == Some(tid)) {
                out.push(BlockedFault {
                    tid: Some(tid),
                    addr: 0,
                    guest_offset: u64::MAX,
                    since: now,
                    retries: 0,
                    reason: None,
                    failure: None,
                });
            }
        }
        out
    }

    /// Unregisters guest RAM from the userfaultfd: blocked faults wake and
    /// their pages read as zero from then on. Only to tear down a VM whose
    /// run is over (nothing may run on those pages).
    pub fn release(&self) {
        for m in &self.mappings {
            if let Err(e) = self.uffd.unregister(m.host_addr, m.size) {
                tracing::warn!("cannot unregister guest memory from userfaultfd: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_counts_unread_and_read_faults() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\npending:\t2\ntotal:\t5\nAPI:\taa:1ffff:1e0000000000003b\n";
        assert_eq!(
            WaitingFaults::parse(text),
            Some(WaitingFaults { unread: 2, read: 3 })
        );
        assert_eq!(WaitingFaults::parse("pos:\t0\n"), None);
    }
}
