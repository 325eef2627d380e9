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
}

/// Touches `pages` fresh pages of a uffd-registered region from the calling
/// thread while a minimal handler thread serves each with one UFFDIO_COPY;
/// returns the mean time per fault.
pub fn raw_uffd_round_trip(pages: usize) -> Result<Duration, BenchError> {
    let pages = pages.max(1);
    let ps = crate::page_size();
    let map = AnonMapping::new(pages * ps).map_err(|e| BenchError::Map(pages, e))?;
    let uffd = Arc::new(Uffd::new(Features::NONE, Features::NONE)?);
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)?;
    let done = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, done) = (uffd.clone(), done.clone());
        std::thread::Builder::new()
            .name("uffd-bench".into())
            .spawn(move || -> Result<(), UffdError> {
                let page = vec![0x5Au8; ps];
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*uffd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !done.load(Ordering::Acquire) {
                    // 10 ms timeout: the only reason to wake without an event is `done`.
                    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                    while let Some(ev) = uffd.read_event()? {
                        if let Event::PageFault { addr, .. } = ev {
                            let _ = uffd.copy(addr & !(ps as u64 - 1), &page, false);
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| BenchError::Thread(e.to_string()))?
    };
    let start = Instant::now();
    for i in 0..pages {
        // SAFETY: the address is inside `map`, which lives until the end of this
        // function; the read blocks until the handler fills the page.
        unsafe { std::ptr::read_volatile(map.ptr().add(i * ps)) };
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Release);
    handler
        .join()
        .map_err(|_| BenchError::Thread("panicked".into()))??;
    Ok(elapsed / u32::try_from(pages).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn raw_round_trip_measures_something() {
        let d = super::raw_uffd_round_trip(64).expect("benchmark runs");
        assert!(
            d > std::time::Duration::ZERO && d < std::time::Duration::from_millis(50),
            "{d:?}"
        );
        eprintln!("raw userfault round trip: {d:?} per fault");
    }
}
