//! The memory manager: guest RAM and how it is backed.
//!
//! It owns the RAM mappings and their KVM memory slots ([`ram`]), and one
//! backing: plain anonymous memory (the kernel zero-fills), lazily served
//! memory ([`lazy`]: userfaultfd, the retry core, a page source), or memory
//! served by an external handler ([`external`]). It also offers what the
//! layers above need from memory without knowing their formats: which pages
//! exist ([`pages`]), dirty tracking ([`dirty`]), and fetching lazily served
//! memory in full ([`materialize`]). Its own state (the layout) persists
//! through [`Persist`]; the contents are saved by whoever saves memory.
//!
//! Phases: [`MemoryManager::new`] maps and registers RAM (anonymous, so the
//! loader or an eager fill can write it); then at most once
//! [`MemoryManager::serve_lazily`] or [`MemoryManager::serve_externally`]
//! hands it to userfaultfd, after which the VMM never writes a missing page
//! from a thread the handler would need.

pub mod backing;
pub mod dirty;
pub mod dirty_wp;
pub mod external;
pub mod lazy;
pub mod live;
pub mod materialize;
pub mod pages;
pub mod ram;

pub use backing::{BackingError, PageSharing};
pub use dirty::{DirtyError, DirtyTracker};
pub use external::{ExternalMemory, ParkedFault, RegionMapping, WaitingFaults};
pub use lazy::{
    BlockedFault, LazyError, LazyMemory, LazyPlan, MemoryStats, PagePrefetch, PrefetchContents,
    PrefetchReport, PREFETCH_WORKERS_MAX,
};
pub use live::{LiveError, WpMode, WpSession, WpUffds, WpUse};
pub use materialize::{MaterializeError, Materializer};
pub use ram::MemoryError;

use crate::config::{FaultMode, MemBackend, MemBacking};
use crate::event::EventSink;
use ::memory::{FileSource, PageSource, ThreadStats, ZeroSource};
use abi::layout::{ram_ranges, PAGE_SIZE};
use devices::GuestRam;
use kvm_ioctls::VmFd;
use persist::Persist;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors of the memory manager.
#[derive(Debug, thiserror::Error)]
pub enum MemoryManagerError {
    /// RAM could not be mapped or registered.
    #[error(transparent)]
    Ram(#[from] MemoryError),
    /// The memfd or huge pages behind guest RAM.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Lazily served memory could not be set up.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The page source of `--mem-backend` cannot be opened.
    #[error("cannot open the memory backend (--mem-backend file:PATH): {0}")]
    Source(#[from] ::memory::SourceError),
    /// An eventfd for a page source could not be created.
    #[error("cannot create the page source's eventfd: {0}; raise the process's file descriptor limit")]
    Notifier(#[source] std::io::Error),
    /// userfaultfd for an external handler.
    #[error("cannot set up userfaultfd for the external page-fault handler: {0}; run as root or set vm.unprivileged_userfaultfd=1")]
    External(#[from] ::memory::UffdError),
    /// The memory is already handed to userfaultfd.
    #[error("guest memory is already served by {0}; it can be handed to userfaultfd only once")]
    AlreadyServed(&'static str),
    /// A saved layout does not fit this VMM.
    #[error("saved guest memory layout does not fit: {0}")]
    Layout(String),
    /// Lazily served memory could not be fetched in full (to turn it into
    /// plain anonymous memory).
    #[error("cannot fetch the lazily served guest memory in full: {0}; the VM goes on lazily served; repair the page source and try again, or take a stop-the-world snapshot")]
    Fetch(#[source] Box<MaterializeError>),
    /// The page source was lost while its memory was being fetched.
    #[error("the page source was lost while guest memory was being fetched in full; nothing was changed")]
    FetchStopped,
    /// Lazily served memory is a migration destination's in post-copy.
    #[error("guest memory is still served by the migration source (post-copy): wait until the migration has ended")]
    Postcopy,
    /// A page could not be fetched after the handler stopped.
    #[error(
        "cannot fetch a lazily served page after its handler stopped: {0}; the VM cannot go on (stop it)"
    )]
    Stranded(#[source] Box<MaterializeError>),
    /// Guest RAM could not be unregistered from the retry core's userfaultfd.
    #[error("cannot hand lazily served guest memory back to the kernel: {0}; the VM cannot go on (stop it)")]
    Unregister(#[source] ::memory::UffdError),
}

/// What turning lazily served RAM into plain anonymous memory took
/// ([`MemoryManager::release_lazy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ReleaseReport {
    /// Fetching every page of the source's data ranges not fetched yet,
    /// while the guest ran, ms.
    pub fetch_ms: f64,
    /// Faults (or fault-around runs) that fetch resolved.
    pub fetched: u64,
    /// Stopping the handler, the check that nothing is left, and
    /// unregistering RAM, ms (the guest runs; a fault in this window waits
    /// for the unregister).
    pub release_ms: f64,
}

/// How guest RAM is backed now.
#[derive(Debug, Default)]
enum Backing {
    /// Plain anonymous memory.
    #[default]
    Anon,
    /// Served through userfaultfd by the retry core.
    Lazy(LazyMemory),
    /// Registered with a userfaultfd served by another process.
    External(ExternalMemory),
}

impl Backing {
    fn name(&self) -> &'static str {
        match self {
            Backing::Anon => "anonymous memory",
            Backing::Lazy(_) => "the retry core",
            Backing::External(_) => "an external page-fault handler",
        }
    }
}

/// Guest RAM and its backing. See the module documentation.
#[derive(Debug)]
pub struct MemoryManager {
    // Declared before `ram` so it drops first: its handler fills pages of that mapping.
    backing: Backing,
    /// Write protection of a live snapshot in progress (its blocked writers
    /// are reported with the backing's).
    live: Option<Arc<WpSession>>,
    /// The userfaultfds of write protection, made before the sandbox.
    wp_uffds: WpUffds,
    ram: GuestRam,
    mem_size: u64,
    vm_fd: Arc<VmFd>,
    kind: MemBacking,
    fault_mode: FaultMode,
    /// The memfd behind guest RAM (memfd and hugetlb backings).
    file: Option<Arc<std::fs::File>>,
    /// Guest RAM is a private mapping of `file` (a clone): its page cache
    /// is shared and never written.
    clone: bool,
    /// Whoever owns a clone's shared file; dropped after `ram` is unmapped.
    _owner: Option<Arc<dyn std::fmt::Debug + Send + Sync>>,
    /// The last statistics of lazily served memory handed back to the
    /// kernel ([`MemoryManager::release_lazy`]).
    released: Option<MemoryStats>,
}

/// A shmem file holding a snapshot's memory by guest-physical address,
/// shared by clones (see [`MemoryManager::clone_of`]).
#[derive(Debug, Clone)]
pub struct SharedRam {
    /// The file (read-only to clones).
    pub file: Arc<std::fs::File>,
    /// Kept alive as long as guest RAM maps the file (it frees the file
    /// when the last clone is gone).
    pub owner: Arc<dyn std::fmt::Debug + Send + Sync>,
}

/// The memory manager's own state: the layout (the contents are saved
/// separately, by the snapshot or migration layer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryState {
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// The page size the contents are saved in.
    pub page_size: u64,
    /// The RAM regions `(gpa, len)`, in guest-physical order.
    pub regions: Vec<(u64, u64)>,
}

impl MemoryManager {
    /// Maps `mem_size` bytes of guest RAM (laid out by [`ram_ranges`]) and
    /// registers it with the VM as memory slots; plain anonymous memory until
    /// it is handed to userfaultfd.
    pub fn new(vm_fd: Arc<VmFd>, mem_size: u64) -> Result<MemoryManager, MemoryManagerError> {
        Self::with_backing(vm_fd, mem_size, MemBacking::Anon, FaultMode::Missing)
    }

    /// [`MemoryManager::new`] with guest RAM in `kind` of memory, lazily
    /// served pages resolved as `fault_mode` says (see `backing`).
    pub fn with_backing(
        vm_fd: Arc<VmFd>,
        mem_size: u64,
        kind: MemBacking,
        fault_mode: FaultMode,
    ) -> Result<MemoryManager, MemoryManagerError> {
        let (ram, file) = match kind {
            MemBacking::Anon => (ram::create_guest_memory(mem_size)?, None),
            _ => {
                let b = backing::create(mem_size, kind)?;
                (b.ram, b.file)
            }
        };
        ram::register_memslots(&vm_fd, &ram)?;
        Ok(MemoryManager {
            backing: Backing::Anon,
            live: None,
            wp_uffds: WpUffds::default(),
            ram,
            mem_size,
            vm_fd,
            kind,
            fault_mode,
            file,
            clone: false,
            _owner: None,
            released: None,
        })
    }

    /// Guest RAM as a private (copy-on-write) mapping of `file`, a shmem
    /// file that holds a snapshot's memory by guest-physical address and is
    /// shared with other clones; its faults are served in MINOR mode by a
    /// [`::memory::SharedFileSource`] (see `vmm::snapshot::shared`).
    pub fn clone_of(
        vm_fd: Arc<VmFd>,
        state: &MemoryState,
        shared: &SharedRam,
    ) -> Result<MemoryManager, MemoryManagerError> {
        check_layout(state)?;
        let file = shared.file.clone();
        let ram = backing::map_file(&file, state.mem_size, false, MemBacking::Memfd)?;
        ram::register_memslots(&vm_fd, &ram)?;
        Ok(MemoryManager {
            backing: Backing::Anon,
            live: None,
            wp_uffds: WpUffds::default(),
            ram,
            mem_size: state.mem_size,
            vm_fd,
            kind: MemBacking::Memfd,
            fault_mode: FaultMode::Minor,
            file: Some(file),
            clone: true,
            _owner: Some(shared.owner.clone()),
            released: None,
        })
    }

    /// Whether guest RAM is a clone's private mapping of a shared file.
    pub fn is_clone(&self) -> bool {
        self.clone
    }

    /// How guest RAM's pages are shared now (`/proc/self/pagemap`).
    pub fn sharing(&self) -> Option<PageSharing> {
        backing::page_sharing(&self.ram).ok()
    }

    /// What memory guest RAM lives in.
    pub fn kind(&self) -> MemBacking {
        self.kind
    }

    /// How lazily served pages are resolved.
    pub fn fault_mode(&self) -> FaultMode {
        self.fault_mode
    }

    /// The memfd behind guest RAM (laid out by guest-physical address), for
    /// the memfd and hugetlb backings.
    pub fn file(&self) -> Option<&Arc<std::fs::File>> {
        self.file.as_ref()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Serves guest RAM through userfaultfd and the retry core from now on.
    /// In MINOR mode the plan's source is wrapped in a
    /// [`::memory::PageCacheSource`]: its pages go into the memfd and faults
    /// are resolved with UFFDIO_CONTINUE (registered MISSING|MINOR).
    /// Its threads (handler, prefetch) are sandboxed in `seccomp` mode.
    pub fn serve_lazily(
        &mut self,
        mut plan: LazyPlan,
        sink: EventSink,
        seccomp: sandbox::SeccompMode,
    ) -> Result<(), MemoryManagerError> {
        if !matches!(self.backing, Backing::Anon) {
            return Err(MemoryManagerError::AlreadyServed(self.backing.name()));
        }
        // Huge pages: the cores track, fetch and fill whole huge pages (no
        // fault-around: one is 512 small pages already).
        let page_size = match self.kind {
            MemBacking::Hugetlb(h) => {
                plan.fault_around = 0;
                usize::try_from(h.bytes()).unwrap_or(usize::MAX)
            }
            _ => 0,
        };
        let mode = match (self.fault_mode, &self.file) {
            // A clone's source answers from the shared file itself.
            (FaultMode::Minor, Some(_)) if self.clone => ::memory::RegisterMode::MISSING_MINOR,
            (FaultMode::Minor, Some(file)) => {
                plan.source = Arc::new(::memory::PageCacheSource::new(plan.source, file.clone()));
                ::memory::RegisterMode::MISSING_MINOR
            }
            _ => ::memory::RegisterMode::MISSING,
        };
        self.backing = Backing::Lazy(LazyMemory::start_with_mode(
            &self.ram, plan, sink, seccomp, mode, page_size,
        )?);
        Ok(())
    }

    /// Registers guest RAM with a userfaultfd for an external handler.
    pub fn serve_externally(&mut self) -> Result<&ExternalMemory, MemoryManagerError> {
        if !matches!(self.backing, Backing::Anon) {
            return Err(MemoryManagerError::AlreadyServed(self.backing.name()));
        }
        self.backing = Backing::External(ExternalMemory::register(&self.ram)?);
        match &self.backing {
            Backing::External(e) => Ok(e),
            _ => Err(MemoryManagerError::AlreadyServed("nothing")),
        }
    }

    /// The lazily served memory, if that is the backing.
    pub fn lazy(&self) -> Option<&LazyMemory> {
        match &self.backing {
            Backing::Lazy(l) => Some(l),
            _ => None,
        }
    }

    /// The external handler's memory, if that is the backing.
    pub fn external(&self) -> Option<&ExternalMemory> {
        match &self.backing {
            Backing::External(e) => Some(e),
            _ => None,
        }
    }

    /// Whether pages not served yet live outside this process (an external
    /// handler): then this process cannot save or send the whole memory.
    pub fn is_external(&self) -> bool {
        matches!(self.backing, Backing::External(_))
    }

    /// Fetches lazily served pages through the retry cores (none otherwise).
    pub fn materializer(&self) -> Option<Materializer> {
        self.lazy().map(LazyMemory::materializer)
    }

    /// The stage-2 faults the handler holds now (for an external handler:
    /// the threads of this process blocked in a userfault, see
    /// [`ExternalMemory::blocked`]).
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let mut b = match &self.backing {
            Backing::Lazy(l) => l.blocked(),
            Backing::External(e) => e.blocked(),
            Backing::Anon => Vec::new(),
        };
        if let Some(live) = &self.live {
            b.extend(live.blocked());
        }
        b
    }

    /// Turns lazily served RAM into plain anonymous memory, while the guest
    /// runs (a live snapshot's first step, `docs/live-snapshot.md`): fetches
    /// every page of the source's data ranges not fetched yet through the
    /// retry cores (as a fault would), stops the handler, checks (and
    /// fetches) again, then unregisters RAM from the userfaultfd. A page
    /// outside the data ranges and never faulted in is zero to the source,
    /// and an unregistered fault gives exactly that; a vCPU waiting on one
    /// when the handler stops wakes at the unregister. `None`: RAM was not
    /// lazily served. On an error before the handler stops nothing changed.
    /// Refused for a migration destination's memory (its source holds the
    /// pages until the migration ends).
    pub fn release_lazy(&mut self, stop: &AtomicBool) -> Result<Option<ReleaseReport>, MemoryManagerError> {
        let Backing::Lazy(lazy) = &mut self.backing else {
            return Ok(None);
        };
        if lazy.backend() == "migration" {
            return Err(MemoryManagerError::Postcopy);
        }
        let start = Instant::now();
        let m = lazy.materializer();
        let fetched = AtomicU64::new(0);
        m.run(stop, &fetched)
            .map_err(|e| MemoryManagerError::Fetch(Box::new(e)))?;
        if stop.load(Ordering::Acquire) {
            return Err(MemoryManagerError::FetchStopped);
        }
        let fetch_ms = start.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        lazy.stop();
        // A fill the handler had parked when it stopped (none expected: every
        // data page is present), filled from this thread.
        m.run(&AtomicBool::new(false), &fetched)
            .map_err(|e| MemoryManagerError::Stranded(Box::new(e)))?;
        let mut stats = lazy.stats();
        stats.backing = self.kind.to_string();
        stats.fault_mode = self.fault_mode.to_string();
        lazy.unregister().map_err(MemoryManagerError::Unregister)?;
        self.released = Some(stats);
        self.backing = Backing::Anon;
        Ok(Some(ReleaseReport {
            fetch_ms,
            fetched: fetched.load(Ordering::Relaxed),
            release_ms: t.elapsed().as_secs_f64() * 1e3,
        }))
    }

    /// Whether RAM is plain anonymous memory (what a live snapshot can
    /// write-protect).
    pub fn is_anonymous(&self) -> bool {
        matches!(self.backing, Backing::Anon)
    }

    /// Whether RAM's kind of memory can be write-protected for a live
    /// snapshot (private anonymous memory, not a clone).
    pub fn check_live(&self) -> Result<(), LiveError> {
        // Shared memfd and hugetlb mappings would need WP_HUGETLBFS_SHMEM
        // and a write-protect handler that knows their page sizes.
        if self.kind != MemBacking::Anon || self.clone {
            let what = if self.clone {
                "a clone's mapping of a shared file".to_string()
            } else {
                self.kind.to_string()
            };
            return Err(LiveError::Backing(what));
        }
        Ok(())
    }

    /// Prepares write-protecting RAM for a live snapshot (see [`live`]):
    /// registers it and starts the handler while the guest runs; protect
    /// with [`WpSession::protect`] once the vCPUs and devices are paused.
    pub fn prepare_live(
        &mut self,
        mode: WpMode,
        buffer_pages: usize,
        sink: EventSink,
    ) -> Result<Arc<WpSession>, LiveError> {
        self.check_live()?;
        if let Some(old) = self.live.take() {
            old.end();
        }
        let s = Arc::new(WpSession::prepare(
            &self.ram,
            &self.wp_uffds,
            mode,
            buffer_pages,
            sink,
        )?);
        self.live = Some(s.clone());
        Ok(s)
    }

    /// Makes the userfaultfds of live snapshots and uffd-WP dirty tracking
    /// now, before the VMM's threads are sandboxed (a sandboxed thread may
    /// not create one); a failure is reported when one is used.
    pub fn prepare_wp(&self) {
        self.wp_uffds.prepare();
    }

    /// Ends the live snapshot's write protection, if any (every blocked
    /// writer goes on).
    pub fn end_live(&mut self) {
        if let Some(s) = self.live.take() {
            s.end();
        }
    }

    /// Stage-2 fault accounting per faulting thread (gettid).
    pub fn per_thread(&self) -> HashMap<u32, ThreadStats> {
        self.lazy().map(LazyMemory::per_thread).unwrap_or_default()
    }

    /// Every page-source failure so far, and whether the handler itself is
    /// gone (which no repair can fix).
    pub fn failures(&self) -> (Vec<String>, bool) {
        match self.lazy() {
            Some(l) => (
                l.failures().iter().map(ToString::to_string).collect(),
                l.handler_died(),
            ),
            None => (Vec::new(), false),
        }
    }

    /// Statistics of lazily served memory (with how its pages are shared);
    /// their last state once it was handed back to the kernel.
    pub fn stats(&self) -> Option<MemoryStats> {
        if self.lazy().is_none() {
            return self.released.clone();
        }
        self.lazy().map(|l| {
            let mut s = l.stats();
            s.backing = self.kind.to_string();
            s.fault_mode = self.fault_mode.to_string();
            s.sharing = self.sharing();
            s
        })
    }

    /// Wakes vCPUs stuck on pages that cannot be served by unregistering
    /// guest RAM from userfaultfd (their pages then read as zero). Only for
    /// tearing down a VM whose run is already void.
    pub fn release_blocked(&self) {
        match &self.backing {
            Backing::Lazy(l) => l.release_blocked(),
            Backing::External(e) => e.release(),
            Backing::Anon => {}
        }
    }

    /// Stops the userfault handler (the end of a run).
    pub fn stop(&mut self) {
        self.end_live();
        if let Backing::Lazy(l) = &mut self.backing {
            l.stop();
        }
    }

    /// Starts dirty tracking with async uffd-WP (plain anonymous RAM only).
    pub fn wp_dirty_tracker(&self) -> Result<dirty_wp::WpDirtyTracker, DirtyError> {
        if !self.is_anonymous() {
            return Err(dirty_wp::WpDirtyError::Uffd(::memory::UffdError::Range {
                op: "UFFDIO_REGISTER",
                start: 0,
                len: self.mem_size,
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            })
            .into());
        }
        if self.kind != MemBacking::Anon || self.clone {
            return Err(dirty_wp::WpDirtyError::Unavailable(format!(
                "guest RAM is {} (--mem-backing{}): uffd-WP dirty tracking needs private anonymous RAM; use --dirty-tracking kvm",
                self.kind,
                if self.clone { ", a clone" } else { "" }
            ))
            .into());
        }
        let uffd = self
            .wp_uffds
            .get(WpUse::AsyncDirty)
            .map_err(|e| dirty_wp::WpDirtyError::Unavailable(e.to_string()))?;
        Ok(dirty_wp::WpDirtyTracker::start_with(uffd, &self.ram)?)
    }

    /// Starts dirty tracking (KVM's log and the VMM's own writes).
    pub fn dirty_tracker(&self) -> Result<DirtyTracker, DirtyError> {
        DirtyTracker::start(self.vm_fd.clone(), self.ram.clone())
    }
}

/// The lazy plan of a configured backend: zero pages, or a memory file
/// indexed by guest-physical address (`None` for plain anonymous memory).
pub fn plan_for_backend(
    backend: &MemBackend,
    fault_around: u32,
    mem_size: u64,
) -> Result<Option<LazyPlan>, MemoryManagerError> {
    let (source, data_ranges): (Arc<dyn PageSource>, Vec<(u64, u64)>) = match backend {
        MemBackend::Anon => return Ok(None),
        MemBackend::Zero => (
            Arc::new(ZeroSource::new().map_err(MemoryManagerError::Notifier)?),
            Vec::new(),
        ),
        MemBackend::File { path, offset } => {
            let src = FileSource::open(path, *offset)?;
            // A memory file holds data up to its end.
            let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let data_end = file_len.saturating_sub(*offset);
            let ranges = ram_ranges(mem_size)
                .into_iter()
                .filter(|&(a, l)| l > 0 && a < data_end)
                .map(|(a, l)| (a, l.min(data_end - a)))
                .collect();
            (Arc::new(src), ranges)
        }
    };
    Ok(Some(LazyPlan {
        source,
        fault_around,
        data_ranges,
        handler_cpus: Vec::new(),
        spin_us: 0,
        batch: false,
        prefetch: false,
        working_set: None,
        observer: None,
    }))
}

impl Persist for MemoryManager {
    type State = MemoryState;
    /// The VM, and the memory and fault mode guest RAM gets (a snapshot
    /// restores into any backing).
    type ConstructorArgs = (Arc<VmFd>, MemBacking, FaultMode);
    type Error = MemoryManagerError;

    fn save(&self) -> Result<MemoryState, MemoryManagerError> {
        Ok(MemoryState {
            mem_size: self.mem_size,
            page_size: PAGE_SIZE,
            regions: self
                .ram
                .iter()
                .map(|r| (r.start_addr().raw_value(), r.len()))
                .collect(),
        })
    }

    /// Maps RAM with the saved layout (anonymous: the contents come next).
    fn restore(
        (vm_fd, kind, fault_mode): (Arc<VmFd>, MemBacking, FaultMode),
        state: &MemoryState,
    ) -> Result<MemoryManager, MemoryManagerError> {
        check_layout(state)?;
        MemoryManager::with_backing(vm_fd, state.mem_size, kind, fault_mode)
    }
}

/// Checks a saved layout against this VMM's.
fn check_layout(state: &MemoryState) -> Result<(), MemoryManagerError> {
    if state.page_size != PAGE_SIZE {
        return Err(MemoryManagerError::Layout(format!(
            "saved in {}-byte pages, this VMM uses {PAGE_SIZE}",
            state.page_size
        )));
    }
    let expected: Vec<(u64, u64)> = ram_ranges(state.mem_size)
        .into_iter()
        .filter(|&(_, l)| l > 0)
        .collect();
    if state.regions != expected {
        return Err(MemoryManagerError::Layout(format!(
            "regions {:x?} are not the layout of {} bytes of RAM ({expected:x?})",
            state.regions, state.mem_size
        )));
    }
    Ok(())
}
