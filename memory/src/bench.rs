//! The raw baseline: the cost of a userfault round trip with a minimal handler
//! (no retry core, no source), to compare the full path against.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mmap::AnonMapping;
use crate::uffd::{Event, Features, RegisterMode, Uffd, UffdError};

/// Errors of the benchmark helper.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up memory failed.
    #[error("cannot map {0} benchmark pages: {1}")]
    Map(usize, io::Error),
    /// userfaultfd setup failed.
    #[error("userfaultfd setup for the benchmark failed: {0}")]
    Uffd(#[from] UffdError),
    /// The handler thread could not be spawned or panicked.
    #[error("the benchmark handler thread failed: {0}")]
    Thread(String),
    /// A cross-CPU measurement needs two CPUs.
    #[error("a cross-CPU round trip needs 2 CPUs but this process may only run on {0:?}; measure same-CPU only, or allow more CPUs (taskset)")]
    NotEnoughCpus(Vec<usize>),
    /// Pinning a benchmark thread failed.
    #[error("cannot place the benchmark threads: {0}")]
    Pin(io::Error),
}

/// Touches `pages` fresh pages of a uffd-registered region from the calling
/// thread while a minimal handler thread serves each with one UFFDIO_COPY;
/// returns the mean time per fault. The scheduler places both threads.
pub fn raw_uffd_round_trip(pages: usize) -> Result<Duration, BenchError> {
    round_trip(pages, None)
}

/// [`raw_uffd_round_trip`] with both threads pinned: to the same CPU (the
/// first allowed one, normally 0) when `same_cpu`, else the toucher to the
/// first and the handler to the second allowed CPU (normally 0 and 1). The
/// toucher is a new thread, so the caller's affinity is left alone.
pub fn raw_uffd_round_trip_pinned(pages: usize, same_cpu: bool) -> Result<Duration, BenchError> {
    let cpus = crate::affinity::allowed_cpus().map_err(BenchError::Pin)?;
    let (toucher, handler) = match (cpus.first(), cpus.get(1)) {
        (Some(&a), _) if same_cpu => (a, a),
        (Some(&a), Some(&b)) => (a, b),
        _ => return Err(BenchError::NotEnoughCpus(cpus)),
    };
    std::thread::Builder::new()
        .name("uffd-bench-touch".into())
        .spawn(move || round_trip(pages, Some((toucher, handler))))
        .map_err(|e| BenchError::Thread(e.to_string()))?
        .join()
        .map_err(|_| BenchError::Thread("the toucher panicked".into()))?
}

/// The minimal handler of the baselines: one thread that polls the
/// userfaultfd and answers every page fault with one UFFDIO_COPY of a page of
/// 0x5A bytes; nothing else (no tracking, no source, no statistics).
#[derive(Debug)]
pub struct MinimalHandler {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), BenchError>>>,
}

impl MinimalHandler {
    /// Starts serving `[base, base + len)` of `uffd` (registered by the
    /// caller), pinned to `cpu` if given; returns once the thread is placed.
    pub fn start(
        uffd: Arc<Uffd>,
        base: u64,
        len: u64,
        cpu: Option<usize>,
    ) -> Result<MinimalHandler, BenchError> {
        let done = Arc::new(AtomicBool::new(false));
        let (placed_tx, placed_rx) = std::sync::mpsc::channel();
        let thread = {
            let done = done.clone();
            std::thread::Builder::new()
                .name("uffd-bench".into())
                .spawn(move || -> Result<(), BenchError> {
                    let placed = cpu.map_or(Ok(()), crate::affinity::pin_current_thread);
                    let failed = placed.is_err();
                    let _ = placed_tx.send(placed);
                    if failed {
                        return Ok(());
                    }
                    serve(&uffd, base, len, &done)
                })
                .map_err(|e| BenchError::Thread(e.to_string()))?
        };
        let mut h = MinimalHandler {
            done,
            thread: Some(thread),
        };
        // Touch only once the handler is where it was asked to be.
        let placed = placed_rx
            .recv()
            .map_err(|_| BenchError::Thread("the handler ended before starting".into()));
        if let Err(e) = placed.and_then(|r| r.map_err(BenchError::Pin)) {
            let _ = h.stop();
            return Err(e);
        }
        Ok(h)
    }

    /// Stops the thread; its error if it failed.
    pub fn stop(&mut self) -> Result<(), BenchError> {
        self.done.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| BenchError::Thread("panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for MinimalHandler {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn serve(uffd: &Uffd, base: u64, len: u64, done: &AtomicBool) -> Result<(), BenchError> {
    let ps = crate::page_size();
    let page = vec![0x5Au8; ps];
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(uffd),
        events: libc::POLLIN,
        revents: 0,
    };
    while !done.load(Ordering::Acquire) {
        // 10 ms timeout: the only reason to wake without an event is `done`.
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        loop {
            match uffd.read_event() {
                Ok(Some(Event::PageFault { addr, .. })) => {
                    let _ = uffd.copy(addr & !(ps as u64 - 1), &page, false);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    // Unregistering wakes the toucher, which must not hang on us.
                    let _ = uffd.unregister(base, len);
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

/// `cpus`: (toucher = calling thread, handler) to pin to.
fn round_trip(pages: usize, cpus: Option<(usize, usize)>) -> Result<Duration, BenchError> {
    if let Some((toucher, _)) = cpus {
        crate::affinity::pin_current_thread(toucher).map_err(BenchError::Pin)?;
    }
    let pages = pages.max(1);
    let ps = crate::page_size();
    let map = AnonMapping::new(pages * ps).map_err(|e| BenchError::Map(pages, e))?;
    let uffd = Arc::new(Uffd::new(Features::NONE, Features::NONE)?);
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)?;
    let mut handler = MinimalHandler::start(uffd, map.addr(), map.len() as u64, cpus.map(|(_, h)| h))?;
    let start = Instant::now();
    for i in 0..pages {
        // SAFETY: the address is inside `map`, which lives until the end of this
        // function; the read blocks until the handler fills the page.
        unsafe { std::ptr::read_volatile(map.ptr().add(i * ps)) };
    }
    let elapsed = start.elapsed();
    handler.stop()?;
    Ok(elapsed / u32::try_from(pages).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sane(d: Duration) {
        assert!(d > Duration::ZERO && d < Duration::from_millis(50), "{d:?}");
    }

    #[test]
    fn raw_round_trip_measures_something() {
        let d = raw_uffd_round_trip(64).expect("benchmark runs");
        sane(d);
        eprintln!("raw userfault round trip: {d:?} per fault");
    }

    #[test]
    fn pinned_round_trips() {
        let same = raw_uffd_round_trip_pinned(256, true).expect("same-CPU benchmark runs");
        sane(same);
        eprintln!("raw userfault round trip, same CPU: {same:?} per fault");
        match raw_uffd_round_trip_pinned(256, false) {
            Ok(cross) => {
                sane(cross);
                eprintln!("raw userfault round trip, cross CPU: {cross:?} per fault");
            }
            Err(BenchError::NotEnoughCpus(cpus)) => eprintln!("one CPU only ({cpus:?}): cross-CPU skipped"),
            Err(e) => panic!("cross-CPU benchmark: {e}"),
        }
    }
}
