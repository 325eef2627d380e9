//! Write protection of guest RAM for a live snapshot (mechanism; the
//! snapshot format and the saver are the `vmm` crate's).
//!
//! [`WpSession::prepare`], called while the guest runs, registers every
//! RAM region with a userfaultfd of its own in WP mode and starts the
//! `wp-handler` thread; [`WpSession::protect`], called while the vCPUs and
//! devices are paused, finds the pages present at that instant (`PAGEMAP_SCAN`), marks them
//! pending in a [`WpCore`] and write-protects them ([`WpMode::Present`]), or
//! write-protects the whole of RAM including unpopulated pages
//! ([`WpMode::Unpopulated`], `UFFD_FEATURE_WP_UNPOPULATED`). Pages not present at the pause were zero then: they
//! are not saved and never block. From then on any write to a pending page,
//! by a vCPU through KVM or by a VMM thread (the page store, a device), blocks
//! in a WP fault until the retry core's WP seam saved the page into its
//! bounded buffer; [`WpSession::save_range`] is the saver's step. A failure
//! reaches the VM's event sink as `MemoryEvent::SourceFailed` (the controller
//! pauses the VM); [`WpSession::end`] unregisters everything, which also
//! releases writes left blocked by a failed session.
//!
//! Only plain anonymous RAM: a range belongs to one userfaultfd, and lazily
//! served RAM's is the retry core's (its materializer fetches it instead).

use crate::event::{EventSink, MemoryEvent, VmEvent};
use ::memory::wp::{self, category, PagemapScan, ScanQuery, WpCore, WpHandler, WpHandlerControl, WpStats};
use ::memory::{BlockedFault, Features, HandlerEvent, Region, Uffd, UffdError};
use devices::GuestRam;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors of setting up write protection.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// userfaultfd could not be set up for write protection.
    #[error("cannot write-protect guest memory with userfaultfd: {0}; a live snapshot needs Linux >= 5.7 (WP) and root or vm.unprivileged_userfaultfd=1; take a stop-the-world snapshot instead")]
    Uffd(#[from] UffdError),
    /// PAGEMAP_SCAN failed.
    #[error("cannot scan guest memory for present pages (PAGEMAP_SCAN, Linux >= 6.7): {0}; take a stop-the-world snapshot instead")]
    Scan(#[source] std::io::Error),
    /// The page states or the handler could not be created.
    #[error("cannot start the write-protect handler: {0}")]
    Setup(#[source] std::io::Error),
    /// The handler thread could not be started.
    #[error("cannot start the write-protect handler: {0}")]
    Handler(#[from] wp::WpHandlerError),
    /// The handler thread could not be started or sandboxed.
    #[error("cannot start the write-protect handler thread: {0}")]
    Spawn(#[source] sandbox::SpawnError),
    /// No userfaultfd was made for this before the VMM's threads were
    /// sandboxed, or making it failed then.
    #[error("cannot write-protect guest memory with userfaultfd: {0}; a live snapshot needs Linux >= 5.7 (WP) and root or vm.unprivileged_userfaultfd=1; take a stop-the-world snapshot instead")]
    Unavailable(String),
    /// Guest RAM is not private anonymous memory (`--mem-backing`).
    #[error("a live snapshot write-protects private anonymous guest RAM only, and this VM's RAM is {0} (--mem-backing): take a stop-the-world snapshot (without --live), or run the VM with --mem-backing anon")]
    Backing(String),
}

/// What a reserved userfaultfd is for (each negotiates its own features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WpUse {
    /// A live snapshot protecting the present pages (synchronous WP faults).
    Present,
    /// A live snapshot protecting all of RAM (`WP_UNPOPULATED`).
    Unpopulated,
    /// Async dirty tracking (`WP_ASYNC | WP_UNPOPULATED`).
    AsyncDirty,
}

impl WpUse {
    fn features(self) -> (Features, Features) {
        match self {
            WpUse::Present => (wp::PAGEFAULT_FLAG_WP, Features::THREAD_ID),
            WpUse::Unpopulated => (wp::PAGEFAULT_FLAG_WP | wp::WP_UNPOPULATED, Features::THREAD_ID),
            WpUse::AsyncDirty => (
                wp::PAGEFAULT_FLAG_WP | wp::WP_ASYNC | wp::WP_UNPOPULATED,
                Features::NONE,
            ),
        }
    }
}

/// The userfaultfds of write protection, made before the VMM's threads are
/// sandboxed (no sandboxed thread may create a userfaultfd): one per
/// [`WpUse`], reused by each session (one at a time per VM: the
/// controller refuses a live snapshot during another or during a pre-copy),
/// which registers guest RAM and unregisters it all when it ends.
#[derive(Debug, Default)]
pub struct WpUffds {
    slots: Mutex<[Slot; 3]>,
}

/// A reserved userfaultfd: not made yet, made, or why making it failed.
type Slot = Option<Result<Arc<Uffd>, String>>;

impl WpUffds {
    /// Makes every one of them now (a failure is kept and reported on use).
    pub fn prepare(&self) {
        for u in [WpUse::Present, WpUse::Unpopulated, WpUse::AsyncDirty] {
            let _ = self.get(u);
        }
    }

    /// The userfaultfd for `u`: made now if this thread is not sandboxed.
    pub fn get(&self, u: WpUse) -> Result<Arc<Uffd>, LiveError> {
        let mut slots = lock(&self.slots);
        let slot = &mut slots[u as usize];
        if slot.is_none() {
            if sandbox::current().is_some() {
                return Err(LiveError::Unavailable(
                    "none was made before this thread was sandboxed".into(),
                ));
            }
            let (required, optional) = u.features();
            *slot = Some(
                Uffd::new(required, optional)
                    .map(Arc::new)
                    .map_err(|e| e.to_string()),
            );
        }
        match slot {
            Some(Ok(uffd)) => Ok(uffd.clone()),
            Some(Err(e)) => Err(LiveError::Unavailable(e.clone())),
            None => Err(LiveError::Unavailable("not made".into())),
        }
    }
}

/// How guest RAM is protected at the pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WpMode {
    /// Protect only the pages present at the pause (found with PAGEMAP_SCAN):
    /// cost in proportion to the memory in use.
    #[default]
    Present,
    /// Protect all of RAM with `UFFD_FEATURE_WP_UNPOPULATED` (pte markers on
    /// unpopulated pages too): cost in proportion to RAM size.
    Unpopulated,
}

/// What starting a session cost: `scan_us` and `protect_us` inside the
/// pause, the rest before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProtectTimes {
    /// Registering the regions (before the pause), us.
    pub register_us: f64,
    /// All of [`WpSession::prepare`] (before the pause: registering, the
    /// page-state table, the handler thread), us.
    pub prepare_us: f64,
    /// Finding the present pages, us.
    pub scan_us: f64,
    /// Write-protecting, us.
    pub protect_us: f64,
}

/// Ranges closer than this are protected with one `UFFDIO_WRITEPROTECT`.
const COALESCE_GAP: u64 = 64 << 20;

/// `found` (ascending) as spans, merging neighbours less than `gap` apart.
fn coalesce(found: &[wp::PageRegion], gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for f in found {
        match out.last_mut() {
            Some(last) if f.start >= last.1 && f.start - last.1 < gap => last.1 = f.end,
            _ => out.push((f.start, f.end)),
        }
    }
    out
}

/// Write protection of guest RAM for one live snapshot.
#[derive(Debug)]
pub struct WpSession {
    uffd: Arc<Uffd>,
    core: Arc<WpCore>,
    control: WpHandlerControl,
    thread: Mutex<Option<JoinHandle<Result<(), wp::WpHandlerError>>>>,
    regions: Vec<Region>,
    mode: WpMode,
    scan: PagemapScan,
    present: std::sync::OnceLock<Vec<(u64, u64)>>,
    times: Mutex<ProtectTimes>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WpSession {
    /// [`WpSession::prepare`] then [`WpSession::protect`]: call with the
    /// vCPUs and devices paused.
    pub fn start(
        ram: &GuestRam,
        uffds: &WpUffds,
        mode: WpMode,
        buffer_pages: usize,
        sink: EventSink,
    ) -> Result<WpSession, LiveError> {
        let s = Self::prepare(ram, uffds, mode, buffer_pages, sink)?;
        s.protect()?;
        Ok(s)
    }

    /// What can be done before the pause, while the guest runs (none of it
    /// protects anything, so no write blocks yet): registers RAM in WP mode,
    /// allocates the page-state table, opens the page map and starts the
    /// `wp-handler` thread (waiting for its sandbox: under load that alone
    /// took milliseconds inside the pause). The userfaultfd comes from
    /// `uffds` (made before the sandbox).
    pub fn prepare(
        ram: &GuestRam,
        uffds: &WpUffds,
        mode: WpMode,
        buffer_pages: usize,
        sink: EventSink,
    ) -> Result<WpSession, LiveError> {
        let t0 = Instant::now();
        let uffd = uffds.get(match mode {
            WpMode::Present => WpUse::Present,
            WpMode::Unpopulated => WpUse::Unpopulated,
        })?;
        let regions: Vec<Region> = ram
            .iter()
            .map(|r| Region {
                host_base: r.as_ptr() as u64,
                size: r.len(),
                guest_offset: r.start_addr().raw_value(),
            })
            .collect();
        for r in &regions {
            uffd.register(r.host_base, r.size, wp::REGISTER_WP)?;
        }
        let t1 = Instant::now();
        let unregister = |uffd: &Uffd| {
            for r in &regions {
                let _ = uffd.unregister(r.host_base, r.size);
            }
        };
        let core = match WpCore::new(regions.clone(), buffer_pages) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                unregister(&uffd);
                return Err(LiveError::Setup(e));
            }
        };
        let scan = match PagemapScan::open() {
            Ok(s) => s,
            Err(e) => {
                unregister(&uffd);
                return Err(LiveError::Scan(e));
            }
        };
        let mut handler = match WpHandler::new(uffd.clone(), core.clone()) {
            Ok(h) => h,
            Err(e) => {
                unregister(&uffd);
                return Err(e.into());
            }
        };
        handler.set_event_hook(Arc::new(move |ev| {
            if let HandlerEvent::Failed(e) = ev {
                sink(VmEvent::Memory(MemoryEvent::SourceFailed(format!(
                    "live snapshot: {e}"
                ))));
            }
        }));
        let control = handler.control();
        // A thread started by a sandboxed one takes its parent's mode.
        let seccomp = sandbox::current().map_or(sandbox::SeccompMode::Off, |(_, m)| m);
        let thread = sandbox::spawn(
            std::thread::Builder::new().name("wp-handler".into()),
            sandbox::ThreadClass::WpHandler,
            seccomp,
            move || {
                let r = handler.run_until_stopped();
                if let Err(e) = &r {
                    tracing::error!("the write-protect handler stopped: {e}");
                }
                r
            },
        );
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                unregister(&uffd);
                return Err(LiveError::Spawn(e));
            }
        };
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        Ok(WpSession {
            uffd,
            core,
            control,
            thread: Mutex::new(Some(thread)),
            regions,
            mode,
            scan,
            present: std::sync::OnceLock::new(),
            times: Mutex::new(ProtectTimes {
                register_us: us(t0, t1),
                prepare_us: us(t0, Instant::now()),
                ..ProtectTimes::default()
            }),
        })
    }

    /// Protects guest RAM as the session's mode says (see the module
    /// documentation). Call once, with the vCPUs and devices paused.
    pub fn protect(&self) -> Result<(), LiveError> {
        let t1 = Instant::now();
        let mut found = Vec::new();
        let q = ScanQuery {
            anyof: category::PRESENT | category::SWAPPED,
            // The shared zero page reads zero: nothing to save.
            inverted: category::PFNZERO,
            required: category::PFNZERO,
            report: category::PRESENT | category::SWAPPED,
            ..Default::default()
        };
        for r in &self.regions {
            self.scan
                .scan(r.host_base, r.host_base + r.size, q, &mut found)
                .map_err(LiveError::Scan)?;
        }
        let mut present = Vec::with_capacity(found.len());
        for f in &found {
            self.core.track(f.start, f.end);
            if let Some(r) = self
                .regions
                .iter()
                .find(|r| f.start >= r.host_base && f.start < r.host_base + r.size)
            {
                present.push((r.guest_offset + (f.start - r.host_base), f.end - f.start));
            }
        }
        present.sort_unstable();
        let t2 = Instant::now();
        match self.mode {
            WpMode::Present => {
                // Each UFFDIO_WRITEPROTECT costs an MMU-notifier round in KVM
                // (measured: scattered ranges of a 4 GiB guest took 33 ms one
                // by one), so nearby ranges are protected with one call: the
                // pages between them are not present, and protecting a range
                // leaves its empty ptes alone (no WP_UNPOPULATED here).
                for (start, end) in coalesce(&found, COALESCE_GAP) {
                    wp::write_protect(&self.uffd, start, end - start, true, false)?;
                }
            }
            WpMode::Unpopulated => {
                for r in &self.regions {
                    wp::write_protect(&self.uffd, r.host_base, r.size, true, false)?;
                }
            }
        }
        let t3 = Instant::now();
        let _ = self.present.set(present);
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        let mut t = lock(&self.times);
        t.scan_us = us(t1, t2);
        t.protect_us = us(t2, t3);
        Ok(())
    }

    /// The guest-physical ranges present at the pause `(gpa, len)`, ascending
    /// (empty before [`protect`](Self::protect)).
    pub fn present(&self) -> &[(u64, u64)] {
        self.present.get().map_or(&[], Vec::as_slice)
    }

    /// What protecting cost.
    pub fn times(&self) -> ProtectTimes {
        *lock(&self.times)
    }

    /// The saver's step: the content at the snapshot instant of the guest
    /// pages at `gpa..gpa + out.len()` (inside one region), then their
    /// protection is removed.
    pub fn save_range(&self, gpa: u64, out: &mut [u8]) -> Result<(), UffdError> {
        self.core.save_range(&self.uffd, gpa, out)
    }

    /// The session failed: writes to unsaved pages stay blocked until
    /// [`end`](Self::end).
    pub fn fail(&self, why: String) {
        self.core.fail(why);
    }

    /// Threads blocked in a WP fault (parked or failed).
    pub fn blocked(&self) -> Vec<BlockedFault> {
        self.control.blocked()
    }

    /// The counters.
    pub fn stats(&self) -> WpStats {
        self.core.stats()
    }

    /// Removes every protection and registration (waking any blocked
    /// writer) and stops the handler. Idempotent.
    pub fn end(&self) {
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        // The handler stops first: unregistering under it made a WP fault it
        // was resolving fail (UFFDIO_WRITEPROTECT of an unregistered range is
        // ENOENT), which it reported as the session's failure and the VM
        // paused on an error after a successful snapshot (seen once in CI).
        // A write that faults between the two is woken below.
        self.control.stop();
        if thread.join().is_err() {
            tracing::error!("the write-protect handler panicked");
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host_base, r.size) {
                tracing::warn!("cannot unregister guest memory from write protection: {e}");
            }
            // Unregistering a WP-only range wakes nobody (the kernel wakes
            // only for MISSING mode): wake the writers a failed session left
            // blocked; they retry without protection.
            if let Err(e) = self.uffd.wake(r.host_base, r.size) {
                tracing::warn!("cannot wake writers blocked on write protection: {e}");
            }
        }
    }
}

impl Drop for WpSession {
    fn drop(&mut self) {
        self.end();
    }
}
