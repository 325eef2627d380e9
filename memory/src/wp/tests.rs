#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
use super::*;
use crate::mmap::AnonMapping;
use std::sync::mpsc;
use std::time::Duration;

/// A thread's write to a protected page blocks in a WP fault, the handler
/// saves the page's old content and unprotects it; the saver then gets the
/// content of the snapshot instant for every page (buffered, read from
/// memory, or zero for a page that was not tracked).
#[test]
fn a_write_to_a_protected_page_is_saved_first_and_the_saver_gets_the_instant() {
    let ps = crate::page_size();
    let map = AnonMapping::new(8 * ps).unwrap();
    // SAFETY: `map` is ours, 8 pages, and nothing else uses it yet.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.ptr(), 8 * ps) };
    for p in 0..6 {
        mem[p * ps..(p + 1) * ps].fill(p as u8 + 1);
    }
    let uffd = Arc::new(Uffd::new(PAGEFAULT_FLAG_WP, Features::THREAD_ID).unwrap());
    uffd.register(map.addr(), (8 * ps) as u64, REGISTER_WP).unwrap();
    let core = Arc::new(
        WpCore::new(
            vec![Region {
                host_base: map.addr(),
                size: (8 * ps) as u64,
                guest_offset: 0x10_0000,
            }],
            16,
        )
        .unwrap(),
    );
    assert_eq!(core.track(map.addr(), map.addr() + (6 * ps) as u64), 6);
    write_protect(&uffd, map.addr(), (6 * ps) as u64, true, false).unwrap();
    let mut handler = WpHandler::new(uffd.clone(), core.clone()).unwrap();
    let control = handler.control();
    let t = std::thread::spawn(move || handler.run_until_stopped());

    let (tx, rx) = mpsc::channel();
    let addr = map.addr() + (2 * ps) as u64;
    let w = std::thread::spawn(move || {
        // SAFETY: page 2 of the live mapping; the write blocks until unprotected.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 0xee) };
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    w.join().unwrap();
    assert_eq!(mem[2 * ps], 0xee, "the write went through after the save");
    assert_eq!(core.stats().faults_saved, 1);

    let mut out = vec![0u8; 8 * ps];
    core.save_range(&uffd, 0x10_0000, &mut out).unwrap();
    for p in 0..8 {
        let want = if p < 6 { p as u8 + 1 } else { 0 };
        assert!(out[p * ps..(p + 1) * ps].iter().all(|&b| b == want), "page {p}");
    }
    assert_eq!(core.stats().saved_by_saver, 5);
    // Saved pages are unprotected: a write does not block any more.
    mem[4 * ps] = 9;
    control.stop();
    t.join().unwrap().unwrap();
    assert!(control.blocked().is_empty());
}

/// A failed session never lets a write through: the writer stays blocked
/// (listed by `blocked()`, the hook told) until the protection is dropped.
#[test]
fn a_failed_session_keeps_the_write_blocked_and_reports_it() {
    let ps = crate::page_size();
    let map = AnonMapping::new(2 * ps).unwrap();
    // SAFETY: `map` is ours; populate page 0.
    unsafe { std::ptr::write_volatile(map.ptr(), 7u8) };
    let uffd = Arc::new(Uffd::new(PAGEFAULT_FLAG_WP, Features::THREAD_ID).unwrap());
    uffd.register(map.addr(), (2 * ps) as u64, REGISTER_WP).unwrap();
    let core = Arc::new(
        WpCore::new(
            vec![Region {
                host_base: map.addr(),
                size: (2 * ps) as u64,
                guest_offset: 0,
            }],
            16,
        )
        .unwrap(),
    );
    core.track(map.addr(), map.addr() + ps as u64);
    write_protect(&uffd, map.addr(), ps as u64, true, false).unwrap();
    core.fail("disk full".into());
    let mut handler = WpHandler::new(uffd.clone(), core.clone()).unwrap();
    let (etx, erx) = mpsc::channel();
    let etx = Mutex::new(etx);
    handler.set_event_hook(Arc::new(move |e| {
        let _ = lock(&etx).send(e);
    }));
    let control = handler.control();
    let t = std::thread::spawn(move || handler.run_until_stopped());
    let addr = map.addr();
    let w = std::thread::spawn(move || {
        // SAFETY: page 0 of the live mapping; blocks until unregistered.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 8) };
    });
    match erx.recv_timeout(Duration::from_secs(10)).unwrap() {
        HandlerEvent::Failed(e) => assert!(e.to_string().contains("disk full"), "{e}"),
        other => panic!("{other:?}"),
    }
    let b = control.blocked();
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].failure.is_some());
    // SAFETY: reading page 0 does not fault (present, only write protected).
    let now = unsafe { std::ptr::read_volatile(map.ptr()) };
    assert_eq!(now, 7, "the write did not go through");
    // Abandoning the session (unregister, then a wake: unregistering a
    // WP-only range wakes nobody) lets the write go on.
    uffd.unregister(map.addr(), (2 * ps) as u64).unwrap();
    uffd.wake(map.addr(), (2 * ps) as u64).unwrap();
    w.join().unwrap();
    control.stop();
    t.join().unwrap().unwrap();
}

#[test]
fn pagemap_scan_finds_present_pages() {
    let ps = crate::page_size();
    let map = AnonMapping::new(16 * ps).unwrap();
    // SAFETY: pages 3 and 4 and 10 of our own mapping.
    unsafe {
        std::ptr::write_volatile(map.ptr().add(3 * ps), 1u8);
        std::ptr::write_volatile(map.ptr().add(4 * ps), 1u8);
        std::ptr::write_volatile(map.ptr().add(10 * ps), 1u8);
    }
    let scan = PagemapScan::open().unwrap();
    let mut out = Vec::new();
    let q = ScanQuery {
        anyof: category::PRESENT | category::SWAPPED,
        report: category::PRESENT | category::SWAPPED,
        ..Default::default()
    };
    scan.scan(map.addr(), map.addr() + (16 * ps) as u64, q, &mut out)
        .unwrap();
    let got: Vec<(u64, u64)> = out
        .iter()
        .map(|r| {
            (
                (r.start - map.addr()) / ps as u64,
                (r.end - map.addr()) / ps as u64,
            )
        })
        .collect();
    assert_eq!(got, vec![(3, 5), (10, 11)]);
}
