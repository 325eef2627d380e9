//! Unit tests of [`super`] (core.rs), kept out of it so the module reads as one walk.

use super::*;
use crate::mmap::AnonMapping;
use crate::source::{FileSource, Notifier, Rule, TestSource, ZeroSource};
use crate::testutil::{pattern, ps, PatternFile};
use crate::uffd::{Features, RegisterMode};

/// A registered mapping driven directly (no handler thread, no faults): the
/// core can fill pages nobody waits on, which is enough to test its logic.
struct Direct {
    map: Arc<AnonMapping>,
    uffd: Uffd,
    core: RetryCore,
    src: Arc<TestSource>,
    _file: PatternFile,
}

fn direct(pages: u64, config: CoreConfig) -> Direct {
    direct_with(pages, config, Features::NONE)
}

fn direct_with(pages: u64, config: CoreConfig, features: Features) -> Direct {
    let file = PatternFile::new(pages);
    let inner = Arc::new(FileSource::open(&file.0, 0).expect("pattern file"));
    let src = Arc::new(TestSource::new(inner).expect("eventfd"));
    let map = Arc::new(AnonMapping::new((pages * ps()) as usize).expect("mmap"));
    // Without EVENT_REMOVE madvise does not wait for an event reader.
    let uffd = Uffd::new(features, Features::NONE).expect("uffd");
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .expect("register");
    let region = Region {
        host_base: map.addr(),
        size: map.len() as u64,
        guest_offset: 0,
    };
    let core = RetryCore::new(region, src.clone(), config).expect("core");
    Direct {
        map,
        uffd,
        core,
        src,
        _file: file,
    }
}

impl Direct {
    fn addr(&self, page: u64) -> u64 {
        self.map.addr() + page * ps()
    }
    fn byte(&self, page: u64, off: u64) -> u8 {
        // SAFETY: only called on pages the test has filled.
        unsafe { std::ptr::read_volatile((self.addr(page) + off) as *const u8) }
    }
}

const OFF: CoreConfig = CoreConfig {
    fault_around: 0,
    after_remove: AfterRemove::Zero,
    page_size: 0,
};

#[test]
fn resolve_copies_then_dedups_duplicates() {
    let d = direct(4, OFF);
    let out = d.core.resolve(&d.uffd, d.addr(1) + 17);
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 1,
            by: ResolvedBy::Copy
        }
    );
    assert_eq!(d.byte(1, 17), pattern(1, 17));
    assert_eq!(d.core.page_state(d.addr(1)), Some(PageState::Present));
    // A second vCPU's event for the same page: no second fetch.
    let out = d.core.resolve(&d.uffd, d.addr(1));
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 0,
            by: ResolvedBy::AlreadyPresent
        }
    );
    assert_eq!(d.src.fetches_of(ps()), 1);
}

#[test]
fn eexist_counts_as_resolved() {
    let d = direct(4, OFF);
    d.uffd
        .copy(d.addr(2), &vec![0x11; ps() as usize], false)
        .expect("populate");
    let out = d.core.resolve(&d.uffd, d.addr(2));
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 0,
            by: ResolvedBy::AlreadyPresent
        }
    );
    assert_eq!(d.byte(2, 0), 0x11);
    assert_eq!(d.core.stats().eexist, 1);
    assert_eq!(d.core.page_state(d.addr(2)), Some(PageState::Present));
}

#[test]
fn stale_present_state_is_healed() {
    let d = direct(2, OFF);
    d.core.resolve(&d.uffd, d.addr(0));
    // Dropped without a REMOVE event (feature not negotiated): state is stale.
    d.map.discard(0, ps() as usize).expect("madvise");
    assert_eq!(d.core.page_state(d.addr(0)), Some(PageState::Present));
    let out = d.core.resolve(&d.uffd, d.addr(0));
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 1,
            by: ResolvedBy::Copy
        }
    );
    assert_eq!(d.byte(0, 3), pattern(0, 3));
    assert_eq!(d.core.stats().stale_present, 1);
}

#[test]
fn failure_names_the_page_and_maps_nothing() {
    let d = direct(4, OFF);
    d.src.set_rule(3 * ps(), Rule::Fail("checksum mismatch".into()));
    let FaultOutcome::Failed(e) = d.core.resolve(&d.uffd, d.addr(3)) else {
        panic!("expected failure")
    };
    assert_eq!(
        e.to_string(),
        format!(
            "guest page {:#x} (host {:#x}) cannot be provided by page source test: injected failure at guest offset {:#x}: checksum mismatch; the page was not zero-filled, pause the VM and fix or replace the source",
            3 * ps(),
            d.addr(3),
            3 * ps()
        )
    );
    assert_eq!(d.core.page_state(d.addr(3)), Some(PageState::Missing));
    assert!(!d.core.kernel_has_page(3), "a failed page must stay unmapped");
    assert_eq!(d.core.stats().failures, 1);
    let out = d.core.resolve(&d.uffd, d.map.addr() + d.map.len() as u64);
    assert!(matches!(
        out,
        FaultOutcome::Failed(FaultError::OutOfRegion { .. })
    ));
}

#[test]
fn resolve_waiting_times_out_then_wakes_on_release() {
    let d = direct(4, OFF);
    d.src.set_rule(0, Rule::Hold);
    let soon = Instant::now() + Duration::from_millis(20);
    let r = d.core.resolve_waiting(&d.uffd, d.addr(0), soon);
    assert_eq!(r.outcome, FaultOutcome::Retry(RetryReason::TimedOut));
    assert_eq!(d.src.fetches_of(0), 1, "waiting must not poll the source");
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            d.src.release(0);
        });
        let r = d
            .core
            .resolve_waiting(&d.uffd, d.addr(0), Instant::now() + Duration::from_secs(5));
        assert_eq!(
            r.outcome,
            FaultOutcome::Resolved {
                pages: 1,
                by: ResolvedBy::Copy
            }
        );
        assert_eq!(r.retries, 1);
    });
    d.src.set_rule(ps(), Rule::RetryTimes(5));
    let r = d
        .core
        .resolve_waiting(&d.uffd, d.addr(1), Instant::now() + Duration::from_secs(5));
    assert_eq!(r.retries, 5);
    let s = d.core.stats();
    assert_eq!((s.retries_max, s.retries_total, s.faults), (5, 6, 2));
}

#[test]
fn removed_pages_are_zero_or_refetched() {
    let d = direct(4, OFF);
    d.core.resolve(&d.uffd, d.addr(1));
    d.map.discard(ps() as usize, ps() as usize).expect("madvise");
    d.core.handle_remove(d.addr(1), d.addr(2));
    let out = d.core.resolve(&d.uffd, d.addr(1));
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 1,
            by: ResolvedBy::ZeroPage
        }
    );
    assert_eq!(d.byte(1, 0), 0);
    // Out-of-region removes are ignored.
    d.core.handle_remove(0, 4096);
    assert_eq!(d.core.stats().removes, 1);
}

#[test]
fn copy_during_remove_is_retried_as_mapping_changed() {
    let d = direct_with(4, OFF, Features::EVENT_REMOVE);
    d.core.resolve(&d.uffd, d.addr(0));
    let m = d.map.clone();
    let t = std::thread::spawn(move || m.discard(0, crate::page_size()));
    // The REMOVE is queued (and the mm marked changing) before it is readable.
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&d.uffd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no REMOVE event");
    let out = d.core.resolve(&d.uffd, d.addr(2));
    assert_eq!(out, FaultOutcome::Retry(RetryReason::MappingChanged));
    assert_eq!(d.core.page_state(d.addr(2)), Some(PageState::Missing));
    let ev = d.uffd.read_event().expect("read");
    assert_eq!(
        ev,
        Some(crate::uffd::Event::Remove {
            start: d.addr(0),
            end: d.addr(1)
        })
    );
    t.join().expect("madvise thread").expect("madvise");
    let out = d.core.resolve(&d.uffd, d.addr(2));
    assert_eq!(
        out,
        FaultOutcome::Resolved {
            pages: 1,
            by: ResolvedBy::Copy
        }
    );
    assert_eq!(d.byte(2, 5), pattern(2, 5));
    assert_eq!(d.core.stats().eagain, 1);
}

/// The page frame number mapped at `addr` (0 when unknown, e.g. unprivileged).
fn pfn(addr: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    f.read_exact_at(&mut b, addr / ps() * 8).expect("pagemap entry");
    u64::from_ne_bytes(b) & ((1 << 55) - 1)
}

#[test]
fn write_fault_on_a_zero_page_gets_its_own_page() {
    let src: Arc<dyn PageSource> = Arc::new(ZeroSource::new().expect("eventfd"));
    let map = AnonMapping::new((8 * ps()) as usize).expect("mmap");
    let uffd = Uffd::new(Features::NONE, Features::NONE).expect("uffd");
    uffd.register(map.addr(), map.len() as u64, RegisterMode::MISSING)
        .expect("register");
    let region = Region {
        host_base: map.addr(),
        size: map.len() as u64,
        guest_offset: 0,
    };
    let around = CoreConfig {
        fault_around: 4,
        ..OFF
    };
    let core = RetryCore::new(region, src, around).expect("core");
    let at = |p: u64| map.addr() + p * ps();
    assert!(matches!(
        core.resolve_access(&uffd, at(5), true),
        FaultOutcome::Resolved {
            pages: 4,
            by: ResolvedBy::ZeroPage
        }
    ));
    assert!(matches!(
        core.resolve_access(&uffd, at(1), false),
        FaultOutcome::Resolved { pages: 4, .. }
    ));
    for p in 0..8 {
        assert_eq!(core.page_state(at(p)), Some(PageState::Present), "page {p}");
        // SAFETY: every page of `map` is mapped now.
        assert_eq!(unsafe { std::ptr::read_volatile(at(p) as *const u8) }, 0);
    }
    let s = core.stats();
    assert_eq!((s.pages_zeroed, s.pages_copied, s.fault_around_pages), (8, 0, 6));
    let zero = pfn(at(0));
    if zero != 0 {
        // Neighbours and read faults share the zero page; the written page does not.
        for p in [0, 1, 2, 3, 4, 6, 7] {
            assert_eq!(pfn(at(p)), zero, "page {p}");
        }
        assert_ne!(pfn(at(5)), zero, "the write fault's page must be writable");
    }
}

#[test]
fn config_and_region_errors() {
    let src: Arc<dyn PageSource> = Arc::new(ZeroSource::new().expect("eventfd"));
    let r = Region {
        host_base: 0x1000,
        size: 0x3000,
        guest_offset: 0,
    };
    let err = RetryCore::new(Region { size: 0x1001, ..r }, src.clone(), OFF).expect_err("unaligned");
    assert_eq!(err.to_string(), "region host [0x1000, +0x1001) guest offset 0x0 is invalid: not page aligned; give a non-empty, page-aligned region");
    let bad = CoreConfig {
        fault_around: 12,
        ..OFF
    };
    let err = RetryCore::new(r, src, bad).expect_err("window");
    assert!(err
        .to_string()
        .starts_with("fault_around = 12 pages is not a power of two"));
}

#[test]
fn stats_serialize() {
    let d = direct(1, OFF);
    d.core.record_fault(0, Duration::from_micros(48));
    let s = d.core.stats();
    assert_eq!(s.latency_us_log2[5], 1, "48 us falls in [32, 64)");
    assert_eq!(s.latency_us_log2.len(), LATENCY_BUCKETS);
    assert_eq!(s.latency().percentile_upper_bound_us(0.5), 64);
    d.core.record_fault(0, Duration::from_secs(3600));
    assert_eq!(
        d.core.stats().latency_us_log2[LATENCY_BUCKETS - 1],
        1,
        "the last bucket counts every longer fault"
    );
    let json = serde_json::to_string(&s).expect("serialize");
    assert!(
        json.contains("\"faults\":1") && json.contains("\"source\":\"test\""),
        "{json}"
    );
}

/// Answers `Split` for any run of more than one page, else as `inner`.
#[derive(Debug)]
struct SplitRuns {
    inner: Arc<TestSource>,
    splits: std::sync::atomic::AtomicU64,
}

impl PageSource for SplitRuns {
    fn name(&self) -> &str {
        "split-runs"
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        if buf.len() as u64 > ps() {
            self.splits.fetch_add(1, Ordering::Relaxed);
            return FetchOutcome::Split;
        }
        self.inner.fetch(offset, buf)
    }
    fn bulk_cheap(&self) -> bool {
        true
    }
    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
}

#[test]
fn prefill_fills_runs_skips_present_pages_and_refetches_split_runs_page_by_page() {
    let d = direct(8, OFF);
    d.core.resolve(&d.uffd, d.addr(2));
    assert_eq!(d.core.prefill(&d.uffd, d.addr(0), 8), Ok(7));
    let s = d.core.stats();
    assert_eq!(
        (s.prefilled_pages, s.prefill_runs),
        (7, 2),
        "runs [0,2) and [3,8)"
    );
    for p in 0..8 {
        assert_eq!(d.byte(p, 5), pattern(p, 5), "page {p}");
    }
    // A source that cannot give runs: the same pages, one fetch each.
    let e = direct(8, OFF);
    let split = Arc::new(SplitRuns {
        inner: e.src.clone(),
        splits: Default::default(),
    });
    let region = e.core.region();
    let core = RetryCore::new(region, split.clone(), OFF).expect("core");
    assert_eq!(core.prefill(&e.uffd, e.addr(0), 8), Ok(8));
    assert_eq!(split.splits.load(Ordering::Relaxed), 1);
    assert_eq!(core.stats().prefilled_pages, 8);
    for p in 0..8 {
        assert_eq!(e.byte(p, 9), pattern(p, 9), "page {p}");
        assert_eq!(core.page_state(e.addr(p)), Some(PageState::Present));
    }
}

#[test]
fn prefill_from_copies_the_given_contents_skips_present_pages_and_asks_no_source() {
    let d = direct(8, OFF);
    d.core.resolve(&d.uffd, d.addr(2));
    let fetches = d.core.stats().fetches;
    let ps = crate::page_size();
    // Contents that differ from the source's: the given ones must be mapped.
    let data: Vec<u8> = (0..8 * ps).map(|i| (i / ps) as u8 ^ 0xa5).collect();
    assert_eq!(d.core.prefill_from(&d.uffd, d.addr(0), &data), Ok(Some(7)));
    let s = d.core.stats();
    assert_eq!(s.fetches, fetches, "no source fetch");
    assert_eq!(
        (s.prefilled_pages, s.prefill_runs),
        (7, 2),
        "runs [0,2) and [3,8)"
    );
    for p in 0..8u64 {
        let want = if p == 2 { pattern(p, 5) } else { p as u8 ^ 0xa5 };
        assert_eq!(d.byte(p, 5), want, "page {p}");
        assert_eq!(d.core.page_state(d.addr(p)), Some(PageState::Present));
    }
    // All present now: nothing to do.
    assert_eq!(d.core.prefill_from(&d.uffd, d.addr(0), &data), Ok(Some(0)));
    // Outside the region: an error, not a fill.
    assert!(d
        .core
        .prefill_from(&d.uffd, d.addr(0) + 64 * ps as u64, &data)
        .is_err());
}
