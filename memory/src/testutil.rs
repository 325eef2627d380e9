//! Shared fixtures for the unit tests: a uffd-registered mapping, a pattern
//! file, and a handler thread.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::{CoreConfig, Region, RetryCore};
use crate::handler::{EventHook, FaultHandler, HandlerControl, HandlerError};
use crate::mmap::AnonMapping;
use crate::source::PageSource;
use crate::uffd::{Features, RegisterMode, Uffd};

pub fn ps() -> u64 {
    crate::page_size() as u64
}

/// The byte at `off` of guest page `page` in the pattern file (never 0).
pub fn pattern(page: u64, off: u64) -> u8 {
    ((page * 7 + off) % 251 + 1) as u8
}

/// A temporary memory file of `pages` pattern pages, removed on drop.
pub struct PatternFile(pub PathBuf);

static SEQ: AtomicU64 = AtomicU64::new(0);

impl PatternFile {
    pub fn new(pages: u64) -> PatternFile {
        let path = std::env::temp_dir().join(format!(
            "vmm-memory-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&path).expect("create pattern file");
        let mut data = Vec::new();
        for p in 0..pages {
            data.extend((0..ps()).map(|o| pattern(p, o)));
        }
        f.write_all(&data).expect("write pattern file");
        PatternFile(path)
    }
}

impl Drop for PatternFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A registered mapping with a handler thread running one core.
pub struct Fixture {
    pub map: Arc<AnonMapping>,
    pub uffd: Arc<Uffd>,
    pub core: Arc<RetryCore>,
    pub control: HandlerControl,
    thread: Option<JoinHandle<Result<(), HandlerError>>>,
}

/// The name of every fixture's handler thread.
pub const HANDLER_THREAD: &str = "uffd-handler-test";

impl Fixture {
    pub fn start(pages: u64, source: Arc<dyn PageSource>, config: CoreConfig) -> Fixture {
        Self::start_at(pages, source, config, 0)
    }

    /// Like `start`, with the region at `guest_offset` in the source.
    pub fn start_at(
        pages: u64,
        source: Arc<dyn PageSource>,
        config: CoreConfig,
        guest_offset: u64,
    ) -> Fixture {
        Self::start_with(pages, source, config, guest_offset, None)
    }

    /// Like `start_at`, with an event hook on the handler.
    pub fn start_with(
        pages: u64,
        source: Arc<dyn PageSource>,
        config: CoreConfig,
        guest_offset: u64,
        hook: Option<EventHook>,
    ) -> Fixture {
        let map = Arc::new(AnonMapping::new((pages * ps()) as usize).expect("mmap"));
        let uffd = Arc::new(Uffd::for_guest_memory().expect("userfaultfd"));
        uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
            .expect("register");
        assert!(uffd.features().contains(Features::EVENT_REMOVE));
        let region = Region {
            host_base: map.addr(),
            size: map.len() as u64,
            guest_offset,
        };
        let core = Arc::new(RetryCore::new(region, source, config).expect("core"));
        let mut handler = FaultHandler::new(uffd.clone(), vec![core.clone()]).expect("handler");
        if let Some(hook) = hook {
            handler.set_event_hook(hook);
        }
        let control = handler.control();
        let thread = std::thread::Builder::new()
            .name(HANDLER_THREAD.into())
            .spawn(move || handler.run_until_stopped())
            .expect("spawn the handler thread");
        Fixture {
            map,
            uffd,
            core,
            control,
            thread: Some(thread),
        }
    }

    pub fn addr(&self, page: u64) -> u64 {
        self.map.addr() + page * ps()
    }

    /// Reads byte `off` of `page` on a new thread (it blocks until served).
    pub fn touch(&self, page: u64, off: u64) -> JoinHandle<u8> {
        let addr = self.addr(page) + off;
        let map = self.map.clone();
        std::thread::spawn(move || {
            let _keep = map;
            // SAFETY: `_keep` holds the mapping alive while we read it.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        })
    }

    /// Waits (5 s at most) for the handler loop to return on its own, and
    /// gives its result.
    pub fn handler_result(&mut self) -> Result<(), HandlerError> {
        self.handler_join().expect("the handler thread panicked")
    }

    /// Like `handler_result`, also when the handler thread panicked.
    pub fn handler_join(&mut self) -> std::thread::Result<Result<(), HandlerError>> {
        let t = self.thread.take().expect("the handler was not joined yet");
        wait_for("the handler loop to return", || t.is_finished());
        t.join()
    }

    /// Reads a byte on the calling thread.
    pub fn read(&self, page: u64, off: u64) -> u8 {
        // SAFETY: the mapping lives as long as `self`.
        unsafe { std::ptr::read_volatile((self.addr(page) + off) as *const u8) }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calling thread's id, as userfaultfd reports it.
pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).expect("positive tid")
}

/// Waits up to 5 s for `cond`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Joins with a 5 s limit (a test must fail, not hang, if a toucher stays blocked).
pub fn join_within<T>(h: JoinHandle<T>, what: &str) -> T {
    wait_for(what, || h.is_finished());
    h.join().expect("toucher panicked")
}
