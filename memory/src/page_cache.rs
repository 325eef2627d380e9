//! MINOR-mode serving: a page source whose pages go into the page cache of
//! the shmem file (memfd) behind guest RAM instead of into the faulting
//! mapping.
//!
//! [`PageCacheSource`] wraps any other [`PageSource`]. For each run the core
//! asks for, it fetches from the inner source, writes the data into the
//! shmem file at the same offset with `pwrite` (zeros: `fallocate`, which
//! allocates zeroed page-cache pages) and answers
//! [`FetchOutcome::Cached`]; the core then maps the run with
//! UFFDIO_CONTINUE ([`crate::Uffd::continue_range`]). A run that is in the
//! page cache already (a prefetch, another process, a clone's shared file)
//! is answered `Cached` without a fetch when the source knows it
//! ([`PageCacheSource::with_resident`]).
//!
//! The file offset of guest offset `g` is `g` (the memory manager lays its
//! memfd out by guest-physical address).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::source::{FetchOutcome, Notifier, PageSource, SourceError};

/// Which pages of the shmem file hold data already: `Cached` at once.
pub type Resident = Arc<dyn Fn(u64, usize) -> bool + Send + Sync>;

/// See the module documentation.
pub struct PageCacheSource {
    inner: Arc<dyn PageSource>,
    file: Arc<File>,
    name: String,
    resident: Option<Resident>,
}

impl std::fmt::Debug for PageCacheSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCacheSource")
            .field("inner", &self.inner)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PageCacheSource {
    /// Serves `inner`'s pages through the page cache of `file` (the shmem
    /// file whose shared mapping is guest RAM, registered MISSING|MINOR).
    pub fn new(inner: Arc<dyn PageSource>, file: Arc<File>) -> PageCacheSource {
        PageCacheSource {
            name: inner.name().to_owned(),
            inner,
            file,
            resident: None,
        }
    }

    /// Answers `Cached` without fetching for runs `resident(offset, len)`
    /// says the file holds already.
    pub fn with_resident(mut self, resident: Resident) -> PageCacheSource {
        self.resident = Some(resident);
        self
    }

    fn io_error(&self, offset: u64, len: usize, e: &std::io::Error) -> FetchOutcome {
        FetchOutcome::Failed(SourceError::Io {
            path: PathBuf::from("memfd:guest-ram"),
            offset,
            len,
            errno: e.raw_os_error(),
            message: format!("writing the page cache of guest RAM: {e}"),
        })
    }
}

impl PageSource for PageCacheSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        if self.resident.as_ref().is_some_and(|r| r(offset, buf.len())) {
            return FetchOutcome::Cached;
        }
        match self.inner.fetch(offset, buf) {
            FetchOutcome::Ready => match self.file.write_all_at(buf, offset) {
                Ok(()) => FetchOutcome::Cached,
                Err(e) => self.io_error(offset, buf.len(), &e),
            },
            FetchOutcome::Zero => {
                let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(buf.len())) else {
                    return self.io_error(
                        offset,
                        buf.len(),
                        &std::io::Error::from_raw_os_error(libc::EINVAL),
                    );
                };
                // SAFETY: fallocate only allocates (zeroed) blocks of our own file.
                let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, len) };
                if ret < 0 {
                    return self.io_error(offset, buf.len(), &std::io::Error::last_os_error());
                }
                FetchOutcome::Cached
            }
            other => other,
        }
    }

    fn bulk_cheap(&self) -> bool {
        self.inner.bulk_cheap()
    }

    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
}

/// The pages of a shmem file that holds guest RAM already (a clone's
/// shared snapshot memory, mapped privately): data pages are `Cached`
/// (UFFDIO_CONTINUE maps the shared page-cache page; a write then copies
/// it), holes are `Zero`, a run with both is `Split`. Never writes the file.
#[derive(Debug)]
pub struct SharedFileSource {
    file: Arc<File>,
    name: String,
    notifier: Notifier,
}

impl SharedFileSource {
    /// Serves from `file` (laid out by guest-physical address), named `name`.
    pub fn new(file: Arc<File>, name: String) -> std::io::Result<SharedFileSource> {
        Ok(SharedFileSource {
            file,
            name,
            notifier: Notifier::new()?,
        })
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = i64::try_from(offset).ok()?;
        // SAFETY: lseek on our own descriptor only moves its file offset.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(r).ok()
    }
}

impl PageSource for SharedFileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        let end = offset + buf.len() as u64;
        // ENXIO (None): no data at or after `offset`.
        match self.seek(offset, libc::SEEK_DATA) {
            None => FetchOutcome::Zero,
            Some(d) if d >= end => FetchOutcome::Zero,
            Some(d) if d > offset => FetchOutcome::Split,
            Some(_) => match self.seek(offset, libc::SEEK_HOLE) {
                Some(h) if h >= end => FetchOutcome::Cached,
                _ => FetchOutcome::Split,
            },
        }
    }

    fn bulk_cheap(&self) -> bool {
        true
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests {
    use super::*;
    use crate::core::{CoreConfig, FaultOutcome, Region, ResolvedBy, RetryCore};
    use crate::handler::FaultHandler;
    use crate::mmap::MemfdMapping;
    use crate::source::FileSource;
    use crate::testutil::{join_within, pattern, ps, PatternFile};
    use crate::uffd::{RegisterMode, Uffd};

    fn read_at(addr: u64) -> u8 {
        // SAFETY: callers keep the mapping alive.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    /// Guest pages of a shared memfd mapping registered MISSING|MINOR are
    /// served from the page cache: every fault resolves by CONTINUE, the
    /// data lands in the memfd (visible through pread), zero pages are
    /// allocated zeroed.
    #[test]
    fn minor_mode_serves_from_the_page_cache() {
        let pages = 8u64;
        let file = PatternFile::new(4); // pages 4.. are beyond EOF: zero
        let inner: Arc<dyn PageSource> = Arc::new(FileSource::open(&file.0, 0).expect("pattern"));
        let map = Arc::new(MemfdMapping::new((pages * ps()) as usize).expect("memfd"));
        let src = Arc::new(PageCacheSource::new(inner, map.file().clone()));
        let uffd = Arc::new(Uffd::for_guest_memory().expect("uffd"));
        uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING_MINOR)
            .expect("register MISSING|MINOR on a memfd");
        let region = Region {
            host_base: map.addr(),
            size: map.len() as u64,
            guest_offset: 0,
        };
        let config = CoreConfig {
            fault_around: 0,
            ..CoreConfig::default()
        };
        let core = Arc::new(RetryCore::new(region, src, config).expect("core"));
        let mut handler = FaultHandler::new(uffd.clone(), vec![core.clone()]).expect("handler");
        let control = handler.control();
        let t = std::thread::spawn(move || handler.run_until_stopped());
        for p in 0..pages {
            let m = map.clone();
            let addr = map.addr() + p * ps() + 5;
            let h = std::thread::spawn(move || {
                let _keep = m;
                read_at(addr)
            });
            let want = if p < 4 { pattern(p, 5) } else { 0 };
            assert_eq!(join_within(h, "a MINOR-served read"), want, "page {p}");
        }
        let s = core.stats();
        assert_eq!((s.pages_continued, s.pages_copied, s.pages_zeroed), (pages, 0, 0));
        // The data is in the page cache, not only in this mapping.
        let mut b = [0u8; 1];
        map.file().read_exact_at(&mut b, 2 * ps() + 5).expect("pread");
        assert_eq!(b[0], pattern(2, 5));
        // A second attempt on a mapped page is a duplicate, not a second fill.
        assert!(matches!(
            core.resolve(&uffd, map.addr()),
            FaultOutcome::Resolved {
                by: ResolvedBy::AlreadyPresent,
                ..
            }
        ));
        control.stop();
        t.join().expect("handler thread").expect("handler");
    }

    /// A private mapping of a shmem file that holds the data: MINOR faults
    /// map the shared page-cache page; a write copies it (the file and
    /// another private mapping keep the old data).
    #[test]
    fn private_mapping_shares_until_written() {
        let shared = MemfdMapping::new(2 * ps() as usize).expect("memfd");
        shared.file().write_all_at(&[7u8; 4096], 0).expect("pwrite");
        let clone =
            Arc::new(MemfdMapping::map(shared.file().clone(), shared.len(), false).expect("map private"));
        // Page 0 holds data, page 1 is a hole: a run of both is split.
        let src = Arc::new(SharedFileSource::new(shared.file().clone(), "shared".into()).expect("source"));
        let uffd = Arc::new(Uffd::for_guest_memory().expect("uffd"));
        uffd.register(clone.addr(), clone.len() as u64, RegisterMode::MISSING_MINOR)
            .expect("register");
        let region = Region {
            host_base: clone.addr(),
            size: clone.len() as u64,
            guest_offset: 0,
        };
        let config = CoreConfig {
            fault_around: 2,
            ..CoreConfig::default()
        };
        let core = Arc::new(RetryCore::new(region, src, config).expect("core"));
        let mut handler = FaultHandler::new(uffd.clone(), vec![core.clone()]).expect("handler");
        let control = handler.control();
        let t = std::thread::spawn(move || handler.run_until_stopped());
        let c = clone.clone();
        let h = std::thread::spawn(move || read_at(c.addr() + ps()));
        assert_eq!(join_within(h, "a read of a hole"), 0);
        assert_eq!(core.stats().pages_zeroed, 1, "{:?}", core.stats());
        let c = clone.clone();
        let h = std::thread::spawn(move || {
            let v = read_at(c.addr());
            // SAFETY: the mapping is alive; a write to a private mapping.
            unsafe { std::ptr::write_volatile(c.addr() as *mut u8, 9) };
            (v, read_at(c.addr()))
        });
        assert_eq!(join_within(h, "a clone's read and write"), (7, 9));
        assert_eq!(core.stats().pages_continued, 1);
        assert_eq!(
            read_at(shared.addr()),
            7,
            "a private write reached the shared file"
        );
        control.stop();
        t.join().expect("handler thread").expect("handler");
    }
}
