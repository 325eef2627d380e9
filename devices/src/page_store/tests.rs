use super::*;
use persist::Persist;

/// Where the tests put the completion area.
const AREA: u64 = 0x1000;
/// Long enough for anything the tests wait for, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

type Events = Arc<Mutex<Vec<DeviceEvent>>>;

fn ram() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
}

fn sink() -> (DeviceEventSink, Events) {
    let seen = Events::default();
    let s = seen.clone();
    (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
}

fn device(mem: &GuestRam) -> (PageStore, Events) {
    let (sink, seen) = sink();
    (
        PageStore::new(mem.clone(), sink, Arc::default(), SeccompMode::process_default()).unwrap(),
        seen,
    )
}

fn send(dev: &mut PageStore, mem: &GuestRam, kind: u32, args: [u64; 6]) -> u32 {
    mem.write_obj(
        PvRequest {
            kind,
            status: 0,
            args,
        },
        GuestAddress(0x100),
    )
    .unwrap();
    dev.pio_write(
        PioAddress(abi::ports::PAGE_STORE_PORT),
        0,
        &0x100u32.to_le_bytes(),
    );
    mem.read_obj::<PvRequest>(GuestAddress(0x100)).unwrap().status
}

fn slot_in(mem: &GuestRam, area: u64, slot: u64) -> u64 {
    mem.read_obj::<u64>(GuestAddress(area + slot * 8)).unwrap()
}

fn slot(mem: &GuestRam, slot: u64) -> u64 {
    slot_in(mem, AREA, slot)
}

fn wait_for_id_in(mem: &GuestRam, area: u64, slot: u64, id: u64) {
    let start = Instant::now();
    while slot_in(mem, area, slot) != id {
        assert!(start.elapsed() < PATIENCE, "slot {slot} never got id {id}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_for_id(mem: &GuestRam, slot: u64, id: u64) {
    wait_for_id_in(mem, AREA, slot, id);
}

/// Whether the frame at `dest` holds store page `index`.
fn holds_page(mem: &GuestRam, dest: u64, index: u64) -> bool {
    (0..512).all(|k| mem.read_obj::<u64>(GuestAddress(dest + 8 * k)).unwrap() == store::word(index, k))
}

fn args(mem: &GuestRam, start_paused: bool) -> (PageStoreArgs, Events, GuestStatsCell) {
    let (sink, seen) = sink();
    let stats = GuestStatsCell::default();
    let args = PageStoreArgs {
        mem: mem.clone(),
        sink,
        stats: stats.clone(),
        start_paused,
        seccomp: SeccompMode::process_default(),
    };
    (args, seen, stats)
}

#[test]
fn read_is_answered_later_with_the_page_and_the_id() {
    let mem = ram();
    let stats: GuestStatsCell = Arc::default();
    let mut dev = PageStore::new(
        mem.clone(),
        Arc::new(|_| {}),
        stats.clone(),
        SeccompMode::process_default(),
    )
    .unwrap();
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    assert_eq!(
        send(&mut dev, &mem, store::READ, [7, 0x3000, 5, 42, 20_000, 0]),
        status::OK
    );
    assert_eq!(slot(&mem, 5), 0, "not answered yet");
    let start = Instant::now();
    wait_for_id(&mem, 5, 42);
    assert!(start.elapsed() >= Duration::from_millis(10));
    assert!(holds_page(&mem, 0x3000, 7));
    // Hostile: bad slot, unaligned frame.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [7, 0x3001, 99, 1, 0, 0]),
        status::REJECTED
    );
    mem.write_obj(
        GuestStats {
            faults: 3,
            ..Default::default()
        },
        GuestAddress(0x5000),
    )
    .unwrap();
    assert_eq!(
        send(&mut dev, &mem, store::STATS, [0x5000, 0, 0, 0, 0, 0]),
        status::OK
    );
    assert_eq!(stats.lock().unwrap().unwrap().faults, 3);
}

#[test]
fn held_reads_wait_for_the_release_and_others_do_not() {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let (mut dev, _) = device(&mem);
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [0x1000, 0, 0, 0, 0, 0]),
        status::OK
    );
    assert_eq!(send(&mut dev, &mem, store::HOLD, [9, 0, 0, 0, 0, 0]), status::OK);
    assert_eq!(
        send(&mut dev, &mem, store::READ, [9, 0x3000, 1, 7, 0, 0]),
        status::OK
    );
    // Another page is not held: answered after its (zero) delay.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [4, 0x4000, 2, 8, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 2, 8);
    // The worker served page 4 after the held read was queued: had page 9
    // gone to the worker, it would be answered by now (same zero delay,
    // sent first). Check once more after the worker had every chance.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000 + 8)).unwrap(), 0, "held");
    assert_eq!(
        send(&mut dev, &mem, store::RELEASE, [9, 0, 0, 0, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 1, 7);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x3000 + 8 * 511)).unwrap(),
        store::word(9, 511)
    );
    // Released: later reads of it are answered again.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [9, 0x5000, 3, 9, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 3, 9);
    // Hostile: out-of-range page, too many held pages.
    assert_eq!(
        send(&mut dev, &mem, store::HOLD, [store::PAGES, 0, 0, 0, 0, 0]),
        status::REJECTED
    );
    for p in 0..store::MAX_HELD_PAGES as u64 {
        assert_eq!(send(&mut dev, &mem, store::HOLD, [p, 0, 0, 0, 0, 0]), status::OK);
    }
    assert_eq!(
        send(&mut dev, &mem, store::HOLD, [100, 0, 0, 0, 0, 0]),
        status::REJECTED
    );
    assert_eq!(
        send(&mut dev, &mem, store::HOLD, [0, 0, 0, 0, 0, 0]),
        status::OK,
        "already held"
    );
}

#[test]
fn a_read_in_flight_at_the_save_completes_on_the_restored_vm_only() {
    let mem = ram();
    let (mut dev, _) = device(&mem);
    let pause = dev.handle();
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    // Served before the pause: must not be saved.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [8, 0x4000, 6, 43, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 6, 43);
    // Due long after the save.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [7, 0x3000, 5, 42, 1_500_000, 0]),
        status::OK
    );
    pause.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    let state = dev.save().unwrap();
    assert_eq!(state.completion_area, Some(AREA));
    assert_eq!(state.in_flight.len(), 1, "only the read not served: {state:?}");
    let r = state.in_flight[0];
    assert_eq!((r.index, r.dest, r.slot, r.id), (7, 0x3000, 5, 42));
    assert!(r.remaining_us > 0 && r.remaining_us <= 1_500_000, "{r:?}");
    let json = serde_json::to_string(&state).unwrap();
    let back: PageStoreState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let mem2 = ram();
    let (args, events, _) = args(&mem2, false);
    let restored_at = Instant::now();
    let new = PageStore::restore(args, &back).unwrap();
    assert_eq!(slot(&mem2, 5), 0, "answered before its remaining delay");
    wait_for_id(&mem2, 5, 42);
    assert!(
        restored_at.elapsed() >= Duration::from_micros(r.remaining_us),
        "answered after {:?}, {} us were left",
        restored_at.elapsed(),
        r.remaining_us
    );
    assert!(holds_page(&mem2, 0x3000, 7));
    // The old VM's read was due before the new one's: paused since the
    // save, the old device did not serve it.
    assert_eq!(slot(&mem, 5), 0, "served on the old VM after the save");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
    assert!(events.lock().unwrap().is_empty());
    // Served once: nothing is left in flight on the new device.
    let h = new.handle();
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    assert!(new.save().unwrap().in_flight.is_empty());
    h.resume();
}

#[test]
fn held_pages_and_reads_survive_a_restore_and_are_answered_at_the_release() {
    let mem = ram();
    let (mut dev, _) = device(&mem);
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    assert_eq!(send(&mut dev, &mem, store::HOLD, [9, 0, 0, 0, 0, 0]), status::OK);
    assert_eq!(send(&mut dev, &mem, store::HOLD, [10, 0, 0, 0, 0, 0]), status::OK);
    assert_eq!(
        send(&mut dev, &mem, store::READ, [9, 0x3000, 1, 7, 0, 0]),
        status::OK
    );
    let guest_stats = GuestStats {
        faults: 11,
        store_reads: 1,
        ..Default::default()
    };
    mem.write_obj(guest_stats, GuestAddress(0x5000)).unwrap();
    assert_eq!(
        send(&mut dev, &mem, store::STATS, [0x5000, 0, 0, 0, 0, 0]),
        status::OK
    );
    dev.handle().pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    let state = dev.save().unwrap();
    assert_eq!(state.held_pages, [9, 10]);
    assert_eq!(
        state.held_reads,
        [HeldRead {
            index: 9,
            dest: 0x3000,
            slot: 1,
            id: 7
        }]
    );
    assert!(state.in_flight.is_empty());
    assert_eq!(state.stats, Some(guest_stats));
    let back: PageStoreState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

    let mem2 = ram();
    let (args, _, stats2) = args(&mem2, false);
    let mut new = PageStore::restore(args, &back).unwrap();
    assert_eq!(*stats2.lock().unwrap(), Some(guest_stats));
    // Still held: a zero-delay read would be answered within this.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(slot(&mem2, 1), 0, "a held read was answered without its release");
    assert_eq!(
        send(&mut new, &mem2, store::RELEASE, [9, 0, 0, 0, 0, 0]),
        status::OK
    );
    wait_for_id(&mem2, 1, 7);
    assert!(holds_page(&mem2, 0x3000, 9));
    assert_eq!(slot(&mem, 1), 0, "answered on the old VM");
    // Page 10 is still held on the new device.
    assert_eq!(
        send(&mut new, &mem2, store::READ, [10, 0x4000, 2, 8, 0, 0]),
        status::OK
    );
    let h = new.handle();
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    let state = new.save().unwrap();
    assert_eq!(state.held_pages, [10]);
    assert_eq!(state.held_reads.len(), 1);
    assert!(state.in_flight.is_empty());
    h.resume();
}

#[test]
fn nothing_is_served_while_paused_and_paused_time_does_not_count() {
    let mem = ram();
    let (mut dev, _) = device(&mem);
    let h = dev.handle();
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    // Sent before the pause, 300 ms.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [5, 0x5000, 3, 13, 300_000, 0]),
        status::OK
    );
    assert!(!h.is_paused());
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    assert!(h.is_paused());
    // Sent while paused: due at once, and in 200 ms.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [3, 0x3000, 1, 11, 0, 0]),
        status::OK
    );
    assert_eq!(
        send(&mut dev, &mem, store::READ, [4, 0x4000, 2, 12, 200_000, 0]),
        status::OK
    );
    std::thread::sleep(Duration::from_millis(400));
    for s in 1..=3 {
        assert_eq!(slot(&mem, s), 0, "slot {s} answered while paused");
    }
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
    // The clock stands still: two saves agree to the microsecond.
    let first = dev.save().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.save().unwrap(), first);
    let left: Vec<(u64, u64)> = first.in_flight.iter().map(|r| (r.id, r.remaining_us)).collect();
    assert_eq!(left.len(), 3, "{left:?}");
    assert_eq!(left[0], (11, 0));
    assert_eq!(left[1], (12, 200_000), "full delay for a read sent while paused");
    assert_eq!(left[2].0, 13);
    let before_pause = left[2].1;
    assert!(before_pause > 0 && before_pause <= 300_000, "{left:?}");

    let resumed = Instant::now();
    h.resume();
    assert!(!h.is_paused());
    wait_for_id(&mem, 1, 11);
    wait_for_id(&mem, 2, 12);
    assert!(resumed.elapsed() >= Duration::from_millis(200));
    wait_for_id(&mem, 3, 13);
    assert!(resumed.elapsed() >= Duration::from_micros(before_pause));
    assert!(holds_page(&mem, 0x3000, 3) && holds_page(&mem, 0x4000, 4) && holds_page(&mem, 0x5000, 5));
    // Resumed: a save is refused again.
    assert!(matches!(dev.save(), Err(PageStoreError::NotPaused)));
}

#[test]
fn a_save_needs_a_pause_and_pauses_nest() {
    let mem = ram();
    let (dev, _) = device(&mem);
    let h = dev.handle();
    let err = dev.save().unwrap_err();
    assert!(matches!(err, PageStoreError::NotPaused));
    assert!(err.to_string().contains("pause it first"), "{err}");
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    h.pause(Duration::MAX).unwrap(); // no deadline: no overflow either
    h.resume();
    assert!(h.is_paused(), "one pause is still in force");
    assert!(dev.save().is_ok());
    h.resume();
    assert!(!h.is_paused());
    h.resume(); // without a pause: nothing happens
    assert!(!h.is_paused());
    assert!(dev.save().is_err());
}

/// Makes the worker look stuck in a write (as in a userfault nobody
/// serves), once it is idle.
fn fake_stuck_write(dev: &PageStore, read: Read) {
    let start = Instant::now();
    loop {
        let mut q = dev.shared.lock();
        if q.serving.is_none() && q.reads.is_empty() {
            q.serving = Some(read);
            return;
        }
        drop(q);
        assert!(start.elapsed() < PATIENCE, "the worker never became idle");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn end_stuck_write(dev: &PageStore) {
    dev.shared.lock().serving = None;
    dev.shared.changed.notify_all();
}

#[test]
fn a_pause_waits_for_the_write_in_progress_within_its_timeout() {
    let mem = ram();
    let (mut dev, _) = device(&mem);
    let h = dev.handle();
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    let stuck = Read {
        index: 9,
        dest: 0x3000,
        slot: 0,
        id: 1,
    };
    fake_stuck_write(&dev, stuck);
    let err = h.pause(Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(
            err,
            PageStoreError::PauseTimeout {
                index: 9,
                dest: 0x3000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("userfault"), "{err}");
    // Withdrawn: the device runs on.
    assert!(!h.is_paused());
    assert!(dev.save().is_err());
    end_stuck_write(&dev);
    assert_eq!(
        send(&mut dev, &mem, store::READ, [2, 0x4000, 3, 5, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 3, 5);

    // A pause with time enough returns once the write is done.
    fake_stuck_write(&dev, stuck);
    let h2 = h.clone();
    let pauser = std::thread::spawn(move || h2.pause(PATIENCE));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!pauser.is_finished(), "the pause returned during a write");
    assert!(dev.save().is_err(), "saved during a write");
    // The vCPUs' requests go on meanwhile; the new read waits for the resume.
    assert_eq!(
        send(&mut dev, &mem, store::READ, [2, 0x5000, 4, 6, 0, 0]),
        status::OK
    );
    end_stuck_write(&dev);
    pauser.join().unwrap().unwrap();
    assert!(h.is_paused());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(slot(&mem, 4), 0, "answered while paused");
    assert_eq!(dev.save().unwrap().in_flight.len(), 1);
    h.resume();
    wait_for_id(&mem, 4, 6);
}

#[test]
fn a_restore_can_start_paused() {
    let state = PageStoreState {
        completion_area: Some(AREA),
        in_flight: vec![InFlightRead {
            index: 1,
            dest: 0x3000,
            slot: 0,
            id: 99,
            remaining_us: 0,
        }],
        ..Default::default()
    };
    let mem = ram();
    let (args, _, _) = args(&mem, true);
    let dev = PageStore::restore(args, &state).unwrap();
    let h = dev.handle();
    assert!(h.is_paused());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(slot(&mem, 0), 0, "answered before the resume");
    assert_eq!(dev.save().unwrap(), state);
    h.resume();
    wait_for_id(&mem, 0, 99);
    assert!(holds_page(&mem, 0x3000, 1));
}

#[test]
fn a_new_read_on_a_slot_replaces_the_unanswered_one() {
    let mem = ram();
    let (mut dev, _) = device(&mem);
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
        status::OK
    );
    assert_eq!(
        send(&mut dev, &mem, store::READ, [1, 0x3000, 1, 5, 10_000_000, 0]),
        status::OK
    );
    assert_eq!(
        send(&mut dev, &mem, store::READ, [2, 0x4000, 1, 6, 0, 0]),
        status::OK
    );
    wait_for_id(&mem, 1, 6);
    let h = dev.handle();
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    assert!(
        dev.save().unwrap().in_flight.is_empty(),
        "the queue holds one read per slot"
    );
}

#[test]
fn hostile_init_and_read_arguments_are_rejected() {
    let mem = ram();
    let (mut dev, events) = device(&mem);
    let rejected = |dev: &mut PageStore, kind, args| send(dev, &mem, kind, args) == status::REJECTED;
    let mut bad = 0;
    // READ before INIT.
    assert!(rejected(&mut dev, store::READ, [7, 0x3000, 1, 1, 0, 0]));
    bad += 1;
    for area in [
        u64::MAX - 7,     // aligned, wraps around (its last word would be at 0x1f0)
        u64::MAX,         // unaligned, wraps
        0x1_0000 - 8,     // crosses the end of RAM
        0x1_0000,         // just past it
        0xfe04,           // unaligned
        u64::MAX - 0x1ff, // ends at 2^64 exactly
        0x8000_0000_0000_0000,
    ] {
        assert!(
            rejected(&mut dev, store::INIT, [area, 0, 0, 0, 0, 0]),
            "area {area:#x}"
        );
        bad += 1;
    }
    // The area that ends exactly at the end of RAM fits.
    let area = 0x1_0000 - 0x200;
    assert_eq!(
        send(&mut dev, &mem, store::INIT, [area, 0, 0, 0, 0, 0]),
        status::OK
    );
    for args in [
        [7, 0x3000, u64::MAX, 1, 0, 0],            // slot far out of range
        [7, 0x3000, store::SLOTS as u64, 1, 0, 0], // slot just out of range
        [7, !0xfff, 1, 1, 0, 0],                   // frame at the top of the address space
        [7, 0x1_0000, 1, 1, 0, 0],                 // frame just past RAM
        [7, 0x3001, 1, 1, 0, 0],                   // unaligned frame
        [store::PAGES, 0x3000, 1, 1, 0, 0],        // no such page
        [u64::MAX, 0x3000, 1, 1, 0, 0],            // no such page
        [7, 0x3000, 1, 0, 0, 0],                   // id 0
    ] {
        assert!(rejected(&mut dev, store::READ, args), "{args:x?}");
        bad += 1;
    }
    assert!(rejected(&mut dev, store::STATS, [u64::MAX - 8, 0, 0, 0, 0, 0]));
    assert!(rejected(&mut dev, 0x1ff, [0; 6]));
    bad += 2;
    {
        let events = events.lock().unwrap();
        assert_eq!(events.len(), bad, "one event per rejected request: {events:?}");
        assert!(events.iter().all(|e| matches!(e, DeviceEvent::BadRequest(_))));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, DeviceEvent::BadRequest(m) if m.contains("slot 64 is out of range"))),
            "{events:?}"
        );
    }
    // Nothing was queued, and the device still works.
    let h = dev.handle();
    h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
    assert!(dev.save().unwrap().in_flight.is_empty());
    h.resume();
    let last = store::SLOTS as u64 - 1;
    assert_eq!(
        send(&mut dev, &mem, store::READ, [7, 0x3000, last, 3, 0, 0]),
        status::OK
    );
    wait_for_id_in(&mem, area, last, 3);
    assert!(holds_page(&mem, 0x3000, 7));
}

#[test]
fn a_corrupted_state_is_rejected_by_the_restore() {
    let valid = PageStoreState {
        completion_area: Some(AREA),
        in_flight: vec![InFlightRead {
            index: 1,
            dest: 0x3000,
            slot: 0,
            id: 5,
            remaining_us: 1000,
        }],
        held_pages: vec![4],
        held_reads: vec![HeldRead {
            index: 4,
            dest: 0x4000,
            slot: 1,
            id: 6,
        }],
        stats: None,
    };
    let mem = ram();
    let (a, _, _) = args(&mem, true);
    assert!(PageStore::restore(a, &valid).is_ok());
    let mut cases: Vec<(PageStoreState, &str)> = Vec::new();
    let mut s = valid.clone();
    s.completion_area = Some(u64::MAX - 7);
    cases.push((s, "completion area"));
    let mut s = valid.clone();
    s.completion_area = None;
    cases.push((s, "no completion area"));
    let mut s = valid.clone();
    s.in_flight[0].dest = 0x2_0000;
    cases.push((s, "not in guest RAM"));
    let mut s = valid.clone();
    s.in_flight[0].slot = store::SLOTS as u64;
    cases.push((s, "out of range"));
    let mut s = valid.clone();
    s.in_flight[0].remaining_us = 10_000_001;
    cases.push((s, "longest delay"));
    let mut s = valid.clone();
    s.held_reads[0].slot = 0;
    cases.push((s, "two reads"));
    let mut s = valid.clone();
    s.held_reads[0].index = 5;
    cases.push((s, "not held"));
    let mut s = valid.clone();
    s.held_pages = (0..=store::MAX_HELD_PAGES as u64).collect();
    cases.push((s, "held pages"));
    let mut s = valid.clone();
    s.held_pages.push(4);
    cases.push((s, "held twice"));
    let mut s = valid.clone();
    s.held_pages.push(store::PAGES);
    cases.push((s, "does not exist"));
    for (state, why) in cases {
        let (a, _, _) = args(&mem, true);
        let err = PageStore::restore(a, &state).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PageStoreError::InvalidState { .. }), "{msg}");
        assert!(
            msg.contains(why) && msg.contains("does not fit this VM"),
            "{why}: {msg}"
        );
    }
}

#[test]
fn a_rejected_restore_names_its_typed_reason_and_source() {
    use std::error::Error as _;
    let state = PageStoreState {
        completion_area: Some(AREA),
        in_flight: vec![InFlightRead {
            index: 1,
            dest: 0x3001,
            slot: 0,
            id: 5,
            remaining_us: 0,
        }],
        ..Default::default()
    };
    let mem = ram();
    let (a, _, _) = args(&mem, true);
    let err = PageStore::restore(a, &state).unwrap_err();
    let PageStoreError::InvalidState { reason } = &err else {
        panic!("{err:?}");
    };
    assert!(
        matches!(
            reason,
            StateError::InvalidRead {
                source: RequestError::UnalignedFrame { dest: 0x3001 }
            }
        ),
        "{reason:?}"
    );
    // The chain: the device's error, the state's reason, the request's.
    let source = err.source().expect("the reason is the source");
    assert_eq!(source.to_string(), reason.to_string());
    let inner = source.source().expect("the invalid read is the reason's source");
    assert_eq!(inner.to_string(), "destination frame 0x3001 is not page aligned");
}
