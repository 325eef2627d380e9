//! Unit tests of [`super`] (handler.rs), kept out of it so the module reads as one walk.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;
use crate::core::{AfterRemove, CoreConfig, PageState};
use crate::source::{FileSource, PageSource, Rule, TestSource, ZeroSource};
use crate::testutil::*;

fn file_source(pages: u64) -> (PatternFile, Arc<TestSource>) {
    let f = PatternFile::new(pages);
    let inner = Arc::new(FileSource::open(&f.0, 0).expect("open pattern file"));
    (f, Arc::new(TestSource::new(inner).expect("test source")))
}

const NO_AROUND: CoreConfig = CoreConfig {
    fault_around: 0,
    after_remove: AfterRemove::Zero,
    page_size: 0,
};

#[test]
fn zero_source_sequential_and_random() {
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    let fx = Fixture::start(64, src.clone(), NO_AROUND);
    for p in 0..32 {
        assert_eq!(fx.read(p, 5), 0);
    }
    // A fixed shuffle of the upper half, touched from two threads.
    let order: Vec<u64> = (0..32).map(|i| 32 + (i * 13) % 32).collect();
    let ts: Vec<_> = order.iter().map(|&p| fx.touch(p, 1)).collect();
    for t in ts {
        assert_eq!(join_within(t, "random toucher"), 0);
    }
    wait_for("64 faults recorded", || fx.core.stats().faults == 64);
    let s = fx.core.stats();
    assert_eq!(s.pages_zeroed, 64);
    assert_eq!(s.pages_copied, 0);
    assert_eq!(s.faults, 64);
    assert_eq!(src.max_fetches_per_page(), 1);
    assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 64);
}

#[test]
fn file_source_concurrent_touchers_fetch_each_page_once() {
    let (_f, src) = file_source(32);
    // Slow pages make the threads pile up on the same fault.
    for p in (0..32).step_by(4) {
        src.set_rule(p * ps(), Rule::Delay(Duration::from_millis(5)));
    }
    let fx = Fixture::start(32, src.clone(), NO_AROUND);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let map = fx.map.clone();
            std::thread::spawn(move || {
                for i in 0..32u64 {
                    let p = if t % 2 == 0 { i } else { (i * 7 + t) % 32 };
                    let off = (t * 97 + i) % ps();
                    // SAFETY: `map` is alive for the whole thread.
                    let v = unsafe { std::ptr::read_volatile(map.ptr().add((p * ps() + off) as usize)) };
                    assert_eq!(v, pattern(p, off), "page {p} offset {off}");
                }
            })
        })
        .collect();
    for t in threads {
        join_within(t, "concurrent toucher");
    }
    assert_eq!(src.max_fetches_per_page(), 1, "a page was fetched twice");
    wait_for("32 pages copied", || fx.core.stats().pages_copied == 32);
    assert!(fx.control.failures().is_empty());
}

#[test]
fn retry_then_serve_counts_retries() {
    let (_f, src) = file_source(8);
    src.set_rule(5 * ps(), Rule::RetryTimes(3));
    let fx = Fixture::start(8, src.clone(), NO_AROUND);
    assert_eq!(join_within(fx.touch(5, 9), "retried page"), pattern(5, 9));
    wait_for("the fault to be recorded", || fx.core.stats().faults == 1);
    let s = fx.core.stats();
    assert_eq!(s.retries_max, 3);
    assert_eq!(s.retries_total, 3);
    assert_eq!(s.faults, 1);
    assert_eq!(src.fetches_of(5 * ps()), 4);
}

#[test]
fn held_page_blocks_only_its_toucher_until_release() {
    let (_f, src) = file_source(8);
    src.set_rule(2 * ps(), Rule::Hold);
    let fx = Fixture::start(8, src.clone(), NO_AROUND);
    let done = Arc::new(AtomicBool::new(false));
    let held = {
        let (map, done) = (fx.map.clone(), done.clone());
        std::thread::spawn(move || {
            // SAFETY: `map` is alive for the whole thread.
            let v = unsafe { std::ptr::read_volatile(map.ptr().add(2 * ps() as usize + 3)) };
            done.store(true, Ordering::Release);
            v
        })
    };
    wait_for("the held fault to be parked", || fx.control.pending() == 1);
    // Other faults keep flowing while one is held.
    assert_eq!(join_within(fx.touch(3, 0), "neighbour"), pattern(3, 0));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::Acquire), "held page was served");
    let calls = src.fetch_calls();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        src.fetch_calls(),
        calls,
        "a held page must be waited for, not polled"
    );
    src.release(2 * ps());
    assert_eq!(join_within(held, "released page"), pattern(2, 3));
    wait_for("no parked fault", || fx.control.pending() == 0);
}

#[test]
fn failed_page_is_reported_and_never_zero_filled() {
    let (_f, src) = file_source(8);
    src.set_rule(3 * ps(), Rule::Fail("sector unreadable".into()));
    let fx = Fixture::start(8, src.clone(), NO_AROUND);
    let t = fx.touch(3, 7);
    wait_for("the failure to be reported", || !fx.control.failures().is_empty());
    let failures = fx.control.failures();
    let msg = failures[0].to_string();
    assert!(
        msg.starts_with(&format!("guest page {:#x} (host {:#x})", 3 * ps(), fx.addr(3))),
        "{msg}"
    );
    assert!(
        msg.contains("sector unreadable") && msg.contains("not zero-filled"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_millis(30));
    assert!(!t.is_finished(), "the toucher must stay blocked");
    assert_eq!(fx.core.page_state(fx.addr(3)), Some(PageState::Missing));
    // Fix the source: the parked fault is retried and served with real data.
    src.clear_rule(3 * ps());
    assert_eq!(join_within(t, "repaired page"), pattern(3, 7));
    assert_eq!(fx.control.failures().len(), 1);
}

#[test]
fn fault_around_needs_fewer_events_than_pages() {
    let (_f, src) = file_source(64);
    let config = CoreConfig {
        fault_around: 16,
        after_remove: AfterRemove::Zero,
        page_size: 0,
    };
    let fx = Fixture::start(64, src.clone(), config);
    for p in 0..64 {
        assert_eq!(fx.read(p, p), pattern(p, p));
    }
    // Counters are updated after the fill wakes the toucher: wait for them.
    wait_for("64 pages copied", || fx.core.stats().pages_copied == 64);
    let (events, _) = fx.control.events();
    assert_eq!(events, 4, "one event per 16-page window");
    let s = fx.core.stats();
    assert_eq!(s.fault_around_pages, 60);
    assert_eq!(src.max_fetches_per_page(), 1);
}

#[test]
fn fault_around_skips_present_and_bad_neighbours() {
    let (_f, src) = file_source(32);
    src.set_rule(25 * ps(), Rule::Fail("bad neighbour".into()));
    let config = CoreConfig {
        fault_around: 16,
        after_remove: AfterRemove::Zero,
        page_size: 0,
    };
    let fx = Fixture::start(32, src.clone(), config);
    // Page 4 mapped behind the core's back: the run copy stops there (EAGAIN
    // with a partial count), EEXIST on it, and the rest is copied.
    fx.uffd
        .copy(fx.addr(4), &vec![0xEE; ps() as usize], false)
        .expect("populate");
    assert_eq!(fx.read(2, 1), pattern(2, 1));
    assert_eq!(fx.read(4, 1), 0xEE, "an existing page must not be overwritten");
    assert_eq!(fx.read(6, 1), pattern(6, 1));
    wait_for("15 pages copied", || fx.core.stats().pages_copied == 15);
    let s = fx.core.stats();
    assert_eq!((s.eagain, s.eexist), (1, 1), "{s:?}");
    assert_eq!(fx.control.events().0, 1);
    // A failing neighbour in the window: the faulting page alone is served.
    assert_eq!(fx.read(20, 1), pattern(20, 1));
    assert!(
        fx.control.failures().is_empty(),
        "a bad neighbour must not fail the fault"
    );
    assert_eq!(fx.core.page_state(fx.addr(21)), Some(PageState::Missing));
}

#[test]
fn removed_pages_fault_again() {
    let (_f, src) = file_source(8);
    let fx = Fixture::start(8, src.clone(), NO_AROUND);
    assert_eq!(fx.read(1, 0), pattern(1, 0));
    fx.map.discard(ps() as usize, ps() as usize).expect("madvise");
    // madvise returns once the event is read, maybe before it is applied.
    wait_for("the REMOVE to apply", || {
        fx.core.page_state(fx.addr(1)) == Some(PageState::Removed)
    });
    assert_eq!(fx.read(1, 0), 0, "DONTNEED memory reads zero");
    assert_eq!(src.fetches_of(ps()), 1);

    let (_f2, src2) = file_source(8);
    let refetch = CoreConfig {
        fault_around: 0,
        after_remove: AfterRemove::Refetch,
        page_size: 0,
    };
    let fx2 = Fixture::start(8, src2.clone(), refetch);
    assert_eq!(fx2.read(1, 0), pattern(1, 0));
    fx2.map.discard(ps() as usize, ps() as usize).expect("madvise");
    assert_eq!(fx2.read(1, 0), pattern(1, 0));
    assert_eq!(src2.fetches_of(ps()), 2);
    wait_for("the REMOVE to be counted", || fx2.core.stats().removes == 1);
}

#[test]
fn overlapping_regions_are_refused() {
    let src: Arc<dyn crate::source::PageSource> = Arc::new(ZeroSource::new().expect("eventfd"));
    let r = crate::core::Region {
        host_base: 0x10_0000,
        size: 0x4000,
        guest_offset: 0,
    };
    let a = Arc::new(RetryCore::new(r, src.clone(), NO_AROUND).expect("core"));
    let r2 = crate::core::Region {
        host_base: 0x10_2000,
        ..r
    };
    let b = Arc::new(RetryCore::new(r2, src, NO_AROUND).expect("core"));
    let uffd = Arc::new(Uffd::for_guest_memory().expect("uffd"));
    let err = FaultHandler::new(uffd, vec![a, b]).expect_err("overlap");
    assert!(err.to_string().contains("overlap"), "{err}");
}

/// Touches byte `off` of `page` on a new thread that first sends its tid.
fn touch_with_tid(fx: &Fixture, page: u64, off: u64) -> (u32, std::thread::JoinHandle<u8>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = fx.addr(page) + off;
    let map = fx.map.clone();
    let t = std::thread::spawn(move || {
        let _keep = map;
        tx.send(gettid()).expect("send tid");
        // SAFETY: `_keep` holds the mapping alive while we read it.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    });
    (rx.recv().expect("toucher tid"), t)
}

#[test]
fn closed_gate_blocks_and_lists_threads_until_opened() {
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    src.close_gate();
    let guest_base = 0x10_0000;
    let around = CoreConfig {
        fault_around: 4,
        after_remove: AfterRemove::Zero,
        page_size: 0,
    };
    let fx = Fixture::start_at(8, src.clone(), around, guest_base);
    let (tid_a, a) = touch_with_tid(&fx, 3, 5);
    wait_for("the gated fault to be parked", || {
        fx.control
            .blocked()
            .first()
            .is_some_and(|b| b.reason == Some(RetryReason::Held))
    });
    let (tid_b, b) = touch_with_tid(&fx, 3, 9);
    wait_for("the second thread to be listed", || {
        fx.control.blocked().len() == 2
    });
    let blocked = fx.control.blocked();
    assert_eq!(
        blocked.iter().map(|b| b.tid).collect::<Vec<_>>(),
        vec![Some(tid_a), Some(tid_b)],
        "oldest first"
    );
    for f in &blocked {
        assert_eq!((f.addr, f.guest_offset), (fx.addr(3), guest_base + 3 * ps()));
        assert_eq!(f.failure, None);
    }
    assert_eq!(
        src.held_pages(),
        vec![guest_base + 3 * ps()],
        "the faulting page only"
    );
    let calls = src.fetch_calls();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !a.is_finished() && !b.is_finished(),
        "a closed gate served a page"
    );
    assert_eq!(
        src.fetch_calls(),
        calls,
        "a closed gate must be waited for, not polled"
    );
    assert!(fx.control.per_thread().is_empty());

    src.open_gate();
    assert_eq!(join_within(a, "first toucher"), 0);
    assert_eq!(join_within(b, "second toucher"), 0);
    wait_for("nothing blocked", || fx.control.blocked().is_empty());
    let per = fx.control.per_thread();
    for tid in [tid_a, tid_b] {
        let s = per.get(&tid).copied().unwrap_or_default();
        assert_eq!((s.faults, s.retries), (1, 1), "thread {tid}: {s:?}");
        assert!(s.blocked_ns >= 50_000_000, "thread {tid} waited >= 50 ms: {s:?}");
    }
    assert!(src.held_pages().is_empty());
    assert_eq!(fx.control.events(), (2, 1));
    let json = serde_json::to_string(&per[&tid_a]).expect("serialize");
    assert!(
        json.starts_with("{\"faults\":1,\"retries\":1,\"blocked_ns\":"),
        "{json}"
    );
}

#[test]
fn blocked_shows_in_progress_and_failed_faults() {
    let (_f, src) = file_source(8);
    src.set_rule(ps(), Rule::Delay(Duration::from_millis(300)));
    src.set_rule(2 * ps(), Rule::Fail("bad sector".into()));
    let fx = Fixture::start(8, src.clone(), NO_AROUND);
    let (tid, slow) = touch_with_tid(&fx, 1, 0);
    wait_for("the slow fault to be listed", || !fx.control.blocked().is_empty());
    let b = &fx.control.blocked()[0];
    assert_eq!(
        (b.tid, b.addr, b.reason.clone()),
        (Some(tid), fx.addr(1), None),
        "in progress"
    );
    assert_eq!(join_within(slow, "slow page"), pattern(1, 0));
    wait_for("the slow fault to be accounted", || {
        fx.control.per_thread().contains_key(&tid)
    });
    let s = fx.control.per_thread()[&tid];
    assert_eq!((s.faults, s.retries), (1, 0));
    assert!(s.blocked_ns >= 300_000_000, "{s:?}");

    let (tid, bad) = touch_with_tid(&fx, 2, 0);
    wait_for("the failure to be listed", || {
        fx.control.blocked().first().is_some_and(|b| b.failure.is_some())
    });
    let b = &fx.control.blocked()[0];
    assert_eq!((b.tid, b.guest_offset), (Some(tid), 2 * ps()));
    assert!(b
        .failure
        .as_ref()
        .is_some_and(|e| e.to_string().contains("bad sector")));
    src.clear_rule(2 * ps());
    assert_eq!(join_within(bad, "repaired page"), pattern(2, 0));
    wait_for("nothing blocked", || fx.control.blocked().is_empty());
    assert_eq!(fx.control.per_thread()[&tid].faults, 1);
}

/// An event hook that sends every event, with the name of the thread it ran
/// on, into a channel.
fn channel_hook() -> (EventHook, mpsc::Receiver<(HandlerEvent, Option<String>)>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let hook: EventHook = Arc::new(move |ev| {
        let name = std::thread::current().name().map(str::to_owned);
        let _ = tx.lock().expect("hook channel").send((ev, name));
    });
    (hook, rx)
}

/// The next hook event, waited for (5 s at most) without polling the handler.
fn next_event(rx: &mpsc::Receiver<(HandlerEvent, Option<String>)>) -> HandlerEvent {
    let (ev, thread) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("no handler event within 5 s");
    assert_eq!(
        thread.as_deref(),
        Some(HANDLER_THREAD),
        "the hook runs on the handler thread"
    );
    ev
}

#[test]
fn event_hook_reports_each_failure_at_once_and_the_stop() {
    let (_f, src) = file_source(8);
    src.set_rule(3 * ps(), Rule::Fail("sector unreadable".into()));
    let (hook, rx) = channel_hook();
    let mut fx = Fixture::start_with(8, src.clone(), NO_AROUND, 0, Some(hook));
    let t = fx.touch(3, 7);
    let HandlerEvent::Failed(e) = next_event(&rx) else {
        panic!("expected a failure event")
    };
    assert!(
        e.to_string()
            .starts_with(&format!("guest page {:#x} (host {:#x})", 3 * ps(), fx.addr(3))),
        "{e}"
    );
    assert!(e.to_string().contains("sector unreadable"), "{e}");
    // The list holds the failure before the hook runs.
    assert_eq!(fx.control.failures(), vec![e.clone()]);

    // A retry that fails again is the same failure: no second event.
    src.notifier().notify();
    wait_for("the failed fault to be retried", || fx.core.stats().failures == 2);
    // A new failure is a new event.
    src.set_rule(5 * ps(), Rule::Fail("bad block".into()));
    let t5 = fx.touch(5, 0);
    let HandlerEvent::Failed(e5) = next_event(&rx) else {
        panic!("expected the second failure event")
    };
    assert!(e5.to_string().contains("bad block"), "{e5}");
    assert_eq!(fx.control.failures(), vec![e, e5]);

    // Repaired: served, and nothing to report.
    src.clear_rule(3 * ps());
    src.clear_rule(5 * ps());
    assert_eq!(join_within(t, "repaired page 3"), pattern(3, 7));
    assert_eq!(join_within(t5, "repaired page 5"), pattern(5, 0));
    assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)));

    fx.control.stop();
    assert_eq!(next_event(&rx), HandlerEvent::Stopped(None));
    fx.handler_result().expect("a requested stop is no error");
    assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Disconnected)));
}

#[test]
fn event_hook_reports_a_broken_uffd() {
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    let (hook, rx) = channel_hook();
    let mut fx = Fixture::start_with(4, src.clone(), NO_AROUND, 0, Some(hook));
    // A userfaultfd without O_NONBLOCK polls as an error (fs/userfaultfd.c):
    // the loop must give up on it and say so. No fault before this: the loop
    // must not be reading events (a read would now block) but in poll, or
    // about to be.
    let fd = fx.uffd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and change the file status flags of
    // our own open descriptor; no memory is involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert!(flags >= 0);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK), 0);
    }
    // Wake the loop (it sleeps in poll): it then sees the uffd's state.
    src.notifier().notify();
    let HandlerEvent::Stopped(Some(msg)) = next_event(&rx) else {
        panic!("expected a stop with an error")
    };
    assert!(
        msg.starts_with("the userfaultfd is broken (poll revents 0x")
            && msg.ends_with("can no longer be served"),
        "{msg}"
    );
    let err = fx
        .handler_result()
        .expect_err("a broken uffd ends the loop with an error");
    assert_eq!(err.to_string(), msg);
    assert!(matches!(err, HandlerError::Broken { revents } if revents & libc::POLLERR != 0));
}

#[test]
fn a_panicking_hook_loses_its_event_not_the_handler() {
    let (_f, src) = file_source(4);
    src.set_rule(ps(), Rule::Fail("gone".into()));
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let hook: EventHook = Arc::new(move |ev| {
        if let HandlerEvent::Failed(_) = ev {
            panic!("a buggy hook");
        }
        let _ = tx.lock().expect("hook channel").send(ev);
    });
    let mut fx = Fixture::start_with(4, src.clone(), NO_AROUND, 0, Some(hook));
    let t = fx.touch(1, 0);
    wait_for("the failure to be listed", || !fx.control.failures().is_empty());
    assert_eq!(fx.read(2, 3), pattern(2, 3), "the handler goes on");
    src.clear_rule(ps());
    assert_eq!(join_within(t, "repaired page"), pattern(1, 0));
    fx.control.stop();
    fx.handler_result().expect("stopped");
    assert_eq!(rx.try_recv().ok(), Some(HandlerEvent::Stopped(None)));
}

/// A source with a bug: its fetch panics.
#[derive(Debug)]
struct PanickingSource(crate::source::Notifier);

impl PageSource for PanickingSource {
    fn name(&self) -> &str {
        "panicking"
    }
    fn fetch(&self, _offset: u64, _buf: &mut [u8]) -> crate::source::FetchOutcome {
        panic!("a buggy page source");
    }
    fn bulk_cheap(&self) -> bool {
        false
    }
    fn notifier(&self) -> &crate::source::Notifier {
        &self.0
    }
}

#[test]
fn a_panic_in_the_loop_is_reported_as_a_stop() {
    let src = Arc::new(PanickingSource(crate::source::Notifier::new().expect("eventfd")));
    let (hook, rx) = channel_hook();
    let mut fx = Fixture::start_with(2, src, NO_AROUND, 0, Some(hook));
    let t = fx.touch(1, 0);
    let HandlerEvent::Stopped(Some(msg)) = next_event(&rx) else {
        panic!("expected a stop with an error")
    };
    assert!(msg.contains("loop panicked"), "{msg}");
    assert!(fx.handler_join().is_err(), "the handler thread panicked");
    // Nobody serves the page now: unregistering wakes the toucher, which then
    // faults as plain anonymous memory.
    fx.uffd
        .unregister(fx.map.addr(), fx.map.len() as u64)
        .expect("unregister");
    assert_eq!(join_within(t, "released toucher"), 0);
}

/// Reads one byte at each address in turn on a new thread that first sends its tid.
fn touch_in_turn(addrs: Vec<u64>, keep: Vec<Arc<crate::mmap::AnonMapping>>) -> (u32, JoinHandle<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _keep = keep;
        tx.send(gettid()).expect("send tid");
        addrs
            .iter()
            // SAFETY: `_keep` holds every mapping alive while we read them.
            .map(|&a| unsafe { std::ptr::read_volatile(a as *const u8) })
            .collect()
    });
    (rx.recv().expect("toucher tid"), t)
}

/// Faults of the group parked as held (not merely listed: a first attempt
/// in progress is listed too).
fn held(group: &HandlerGroup) -> usize {
    group
        .blocked()
        .iter()
        .filter(|f| f.reason == Some(RetryReason::Held))
        .count()
}

#[test]
fn two_uffds_with_a_handler_each_merge_in_a_group() {
    // One source for both (one VM), a uffd and handler per region.
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    src.close_gate();
    let a = Fixture::start_at(4, src.clone(), NO_AROUND, 0);
    let b = Fixture::start_at(4, src.clone(), NO_AROUND, 4 * ps());
    let group = HandlerGroup::new(vec![a.control.clone(), b.control.clone()]);
    let maps = vec![a.map.clone(), b.map.clone()];
    let (tid_a, ta) = touch_in_turn(vec![a.addr(1)], maps.clone());
    wait_for("the first fault to be parked", || held(&group) == 1);
    let (tid_b, tb) = touch_in_turn(vec![b.addr(2)], maps.clone());
    wait_for("the second fault to be parked", || held(&group) == 2);
    // This thread faults in both regions, one after the other.
    let (tid_c, tc) = touch_in_turn(vec![a.addr(3), b.addr(3)], maps);
    wait_for("the third fault to be parked", || held(&group) == 3);
    let blocked = group.blocked();
    assert_eq!(
        blocked
            .iter()
            .map(|f| (f.tid, f.guest_offset))
            .collect::<Vec<_>>(),
        vec![
            (Some(tid_a), ps()),
            (Some(tid_b), 6 * ps()),
            (Some(tid_c), 3 * ps())
        ],
        "oldest first across handlers"
    );
    assert!(blocked.iter().all(|f| f.reason == Some(RetryReason::Held)));
    assert_eq!((a.control.blocked().len(), b.control.blocked().len()), (2, 1));
    assert_eq!(group.pending(), 3);
    assert_eq!(group.cores().len(), 2);

    // One notify must wake both loops (each has its own subscription).
    src.open_gate();
    assert_eq!(join_within(ta, "toucher a"), vec![0]);
    assert_eq!(join_within(tb, "toucher b"), vec![0]);
    assert_eq!(join_within(tc, "toucher c"), vec![0, 0]);
    wait_for("nothing blocked", || group.blocked().is_empty());
    wait_for("every fault accounted", || {
        group.per_thread().get(&tid_c).is_some_and(|s| s.faults == 2)
    });
    let per = group.per_thread();
    assert_eq!((per[&tid_a].faults, per[&tid_b].faults), (1, 1));
    let (ca, cb) = (a.control.per_thread()[&tid_c], b.control.per_thread()[&tid_c]);
    assert_eq!((ca.faults, cb.faults), (1, 1), "one fault in each region");
    assert_eq!(per[&tid_c].blocked_ns, ca.blocked_ns + cb.blocked_ns);
    assert_eq!(group.events(), (4, 0));
    assert!(group.failures().is_empty());
}

#[test]
fn two_handlers_on_one_uffd_share_its_cores() {
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    src.close_gate();
    let pages = 8;
    let map = Arc::new(crate::mmap::AnonMapping::new((pages * ps()) as usize).expect("mmap"));
    let uffd = Arc::new(Uffd::for_guest_memory().expect("userfaultfd"));
    uffd.register(map.addr(), map.len() as u64, crate::uffd::RegisterMode::MISSING)
        .expect("register");
    let region = crate::core::Region {
        host_base: map.addr(),
        size: map.len() as u64,
        guest_offset: 0,
    };
    let core = Arc::new(RetryCore::new(region, src.clone(), NO_AROUND).expect("core"));
    let mut group = HandlerGroup::default();
    let mut threads = Vec::new();
    for i in 0..2 {
        let mut h = FaultHandler::new(uffd.clone(), vec![core.clone()]).expect("handler");
        group.push(h.control());
        threads.push(
            std::thread::Builder::new()
                .name(format!("uffd-handler-{i}"))
                .spawn(move || h.run_until_stopped())
                .expect("spawn handler"),
        );
    }
    let touchers: Vec<_> = (0..pages)
        .map(|p| touch_in_turn(vec![map.addr() + p * ps() + 1], vec![map.clone()]))
        .collect();
    wait_for("every fault parked by one of the handlers", || {
        held(&group) == pages as usize
    });
    assert_eq!(group.cores().len(), 1, "a shared core is listed once");
    src.open_gate();
    for (tid, t) in touchers {
        assert_eq!(join_within(t, "toucher"), vec![0], "thread {tid}");
    }
    wait_for("nothing blocked", || group.blocked().is_empty());
    let per = group.per_thread();
    assert_eq!(per.values().map(|s| s.faults).sum::<u64>(), pages);
    assert_eq!(core.stats().pages_zeroed, pages);
    group.stop();
    for t in threads {
        join_within(t, "handler").expect("handler loop");
    }
}

/// A pool of `threads` handler threads over one uffd and one core of `pages`
/// pages served from `src`, each thread with `hook` if given.
struct Pool {
    map: Arc<crate::mmap::AnonMapping>,
    core: Arc<RetryCore>,
    uffd: Arc<Uffd>,
    control: HandlerControl,
    threads: Vec<JoinHandle<Result<(), HandlerError>>>,
}

impl Pool {
    fn start(pages: u64, src: Arc<TestSource>, threads: usize, hook: Option<EventHook>) -> Pool {
        let map = Arc::new(crate::mmap::AnonMapping::new((pages * ps()) as usize).expect("mmap"));
        let uffd = Arc::new(Uffd::for_guest_memory().expect("userfaultfd"));
        uffd.register(map.addr(), map.len() as u64, crate::uffd::RegisterMode::MISSING)
            .expect("register");
        let region = crate::core::Region {
            host_base: map.addr(),
            size: map.len() as u64,
            guest_offset: 0,
        };
        let core = Arc::new(RetryCore::new(region, src, NO_AROUND).expect("core"));
        let handlers = FaultHandler::pool(uffd.clone(), vec![core.clone()], threads).expect("pool");
        let control = handlers[0].control();
        let threads = handlers
            .into_iter()
            .map(|mut h| {
                if let Some(hook) = &hook {
                    h.set_event_hook(hook.clone());
                }
                std::thread::Builder::new()
                    .name(format!("uffd-pool-{}", h.index()))
                    .spawn(move || h.run_until_stopped())
                    .expect("spawn handler")
            })
            .collect();
        Pool {
            map,
            core,
            uffd,
            control,
            threads,
        }
    }

    fn addr(&self, page: u64) -> u64 {
        self.map.addr() + page * ps()
    }

    fn stop(self) {
        self.control.stop();
        for t in self.threads {
            join_within(t, "pool handler").expect("handler loop");
        }
    }
}

#[test]
fn a_pool_fetches_each_shared_page_once_and_serves_real_data() {
    let (_f, src) = file_source(64);
    // Slow pages make touchers pile up on one fault while other threads of
    // the pool read their events.
    for p in (0..64).step_by(3) {
        src.set_rule(p * ps(), Rule::Delay(Duration::from_millis(3)));
    }
    let pool = Pool::start(64, src.clone(), 3, None);
    let touchers: Vec<_> = (0..6u64)
        .map(|t| {
            let map = pool.map.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let p = (i * (2 * t + 1) + t) % 64;
                    let off = (t * 131 + i * 7) % ps();
                    // SAFETY: `map` is alive for the whole thread.
                    let v = unsafe { std::ptr::read_volatile(map.ptr().add((p * ps() + off) as usize)) };
                    assert_eq!(v, pattern(p, off), "page {p} offset {off}");
                }
            })
        })
        .collect();
    for t in touchers {
        join_within(t, "toucher");
    }
    assert_eq!(src.max_fetches_per_page(), 1, "a page was fetched twice");
    wait_for("64 pages copied", || pool.core.stats().pages_copied == 64);
    wait_for("nothing blocked", || pool.control.blocked().is_empty());
    assert!(pool.control.failures().is_empty());
    let stats = pool.control.thread_stats();
    assert_eq!(stats.len(), 3);
    let (events, _) = pool.control.events();
    assert_eq!(stats.iter().map(|s| s.events).sum::<u64>(), events);
    let by_thread: u64 = stats.iter().flat_map(|s| s.by_thread.values()).sum();
    assert_eq!(by_thread, events, "every event is charged to a faulting thread");
    // Each resolved fault charged once per waiting thread, whichever
    // handler thread read its events.
    let charged: u64 = pool.control.per_thread().values().map(|s| s.faults).sum();
    assert!(
        charged >= 64 && charged <= events,
        "{charged} charged for {events} events"
    );
    pool.stop();
}

#[test]
fn a_pool_lists_each_held_page_once_with_every_waiter() {
    let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
    src.close_gate();
    let pool = Pool::start(4, src.clone(), 3, None);
    // Three threads on page 0, one each on pages 1..4, read by any handler thread.
    let mut touchers: Vec<(u32, JoinHandle<Vec<u8>>)> = (0..3)
        .map(|_| touch_in_turn(vec![pool.addr(0) + 5], vec![pool.map.clone()]))
        .collect();
    touchers.extend((1..4).map(|p| touch_in_turn(vec![pool.addr(p) + 1], vec![pool.map.clone()])));
    wait_for("six threads listed as held", || {
        let b = pool.control.blocked();
        b.len() == 6 && b.iter().all(|f| f.reason == Some(RetryReason::Held))
    });
    let blocked = pool.control.blocked();
    let mut pages: Vec<u64> = blocked.iter().map(|b| b.addr).collect();
    pages.dedup();
    pages.sort_unstable();
    pages.dedup();
    assert_eq!(pages.len(), 4, "one fault per page across the pool: {blocked:?}");
    assert_eq!(
        blocked.iter().filter(|b| b.addr == pool.addr(0)).count(),
        3,
        "the shared page lists its three waiters"
    );
    assert_eq!(pool.control.pending(), 4);
    let tids: Vec<Option<u32>> = touchers.iter().map(|(t, _)| Some(*t)).collect();
    assert!(blocked.iter().all(|b| tids.contains(&b.tid)));
    // One notify: whichever thread wakes first retries each fault once.
    src.open_gate();
    for (tid, t) in touchers {
        let v = join_within(t, "toucher");
        assert_eq!(v, vec![0], "thread {tid}");
    }
    wait_for("nothing blocked", || pool.control.blocked().is_empty());
    assert_eq!(pool.control.pending(), 0);
    assert_eq!(pool.core.stats().pages_zeroed, 4);
    let per = pool.control.per_thread();
    assert_eq!(per.values().map(|s| s.faults).sum::<u64>(), 6);
    pool.stop();
}

#[test]
fn a_pool_reports_a_failed_page_once_and_serves_it_after_repair() {
    let (_f, src) = file_source(8);
    src.set_rule(2 * ps(), Rule::Fail("chunk lost".into()));
    let (hook, rx) = channel_hook();
    let pool = Pool::start(8, src.clone(), 2, Some(hook));
    let touchers: Vec<_> = (0..3)
        .map(|i| touch_in_turn(vec![pool.addr(2) + i], vec![pool.map.clone()]))
        .collect();
    let (ev, thread) = rx.recv_timeout(Duration::from_secs(5)).expect("a Failed event");
    assert!(matches!(ev, HandlerEvent::Failed(_)), "{ev:?}");
    assert!(
        thread.is_some_and(|t| t.starts_with("uffd-pool-")),
        "the hook runs on a pool thread"
    );
    wait_for("three waiters listed as failed", || {
        let b = pool.control.blocked();
        b.len() == 3 && b.iter().all(|f| f.failure.is_some())
    });
    // Other pages keep flowing while the failed one is parked.
    // SAFETY: the mapping lives as long as `pool`.
    let v = unsafe { std::ptr::read_volatile((pool.addr(5) + 9) as *const u8) };
    assert_eq!(v, pattern(5, 9));
    assert_eq!(
        pool.control.failures().len(),
        1,
        "one failure for the page, not one per event"
    );
    assert!(rx.try_recv().is_err(), "no second Failed event");
    src.clear_rule(2 * ps());
    for (i, (_, t)) in touchers.into_iter().enumerate() {
        assert_eq!(join_within(t, "repaired page"), vec![pattern(2, i as u64)]);
    }
    wait_for("nothing blocked", || pool.control.blocked().is_empty());
    pool.stop();
}

/// Counts each guest page a fault filled, and whether it was the faulting one.
#[derive(Debug, Default)]
struct CountingObserver {
    fills: std::sync::Mutex<std::collections::HashMap<u64, (u32, bool)>>,
}

impl crate::core::FillObserver for CountingObserver {
    fn filled(&self, gpa: u64, pages: u64, fault: Option<u64>) {
        let mut m = self.fills.lock().expect("observer lock");
        for p in 0..pages {
            let page = gpa + p * ps();
            let e = m.entry(page).or_default();
            e.0 += 1;
            e.1 |= fault == Some(page);
        }
    }
}

#[test]
fn a_pool_tells_the_observer_of_each_faulted_page_once_and_never_of_a_prefill() {
    let (_f, src) = file_source(128);
    for p in (0..128).step_by(5) {
        src.set_rule(p * ps(), Rule::Delay(Duration::from_millis(2)));
    }
    let pool = Pool::start(128, src.clone(), 3, None);
    let observer = Arc::new(CountingObserver::default());
    assert!(pool.core.observe(observer.clone()));
    // A working-set prefetch of the upper half races the touchers' faults.
    let prefill = {
        let (core, uffd, host) = (pool.core.clone(), pool.uffd.clone(), pool.addr(64));
        std::thread::spawn(move || core.prefill(&uffd, host, 64).expect("prefill"))
    };
    let touchers: Vec<_> = (0..4u64)
        .map(|t| {
            let map = pool.map.clone();
            std::thread::spawn(move || {
                for i in 0..128u64 {
                    let p = (i * (2 * t + 1) + 3 * t) % 128;
                    let off = (t * 61 + i * 11) % ps();
                    // SAFETY: `map` is alive for the whole thread.
                    let v = unsafe { std::ptr::read_volatile(map.ptr().add((p * ps() + off) as usize)) };
                    assert_eq!(v, pattern(p, off), "page {p} offset {off}");
                }
            })
        })
        .collect();
    for t in touchers {
        join_within(t, "toucher");
    }
    let prefilled = join_within(prefill, "prefill");
    wait_for("128 pages copied", || pool.core.stats().pages_copied == 128);
    assert_eq!(src.max_fetches_per_page(), 1, "a page was fetched twice");
    let s = pool.core.stats();
    assert_eq!(s.prefilled_pages, prefilled as u64);
    let fills = observer.fills.lock().expect("observer lock").clone();
    assert_eq!(fills.len() as u64 + s.prefilled_pages, 128, "{fills:?}");
    for (gpa, (n, own)) in &fills {
        assert_eq!(*n, 1, "page {gpa:#x} observed {n} times");
        // No fault-around: every observed fill is its faulting page.
        assert!(own, "page {gpa:#x} observed as a neighbour");
    }
    assert!(pool.control.failures().is_empty());
    pool.stop();
}
