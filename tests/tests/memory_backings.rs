//! Guest RAM in every backing (docs/memory-backings.md) on real KVM: the
//! touch workload and the guest suite on a memfd with every lazy source in
//! MISSING and MINOR mode; snapshots taken from a memfd VM restored eagerly
//! and lazily onto every backing; post-copy and pre-copy migration onto a
//! memfd. Checksums prove no page read as zero where data was expected.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm::config::{FaultMode, MemBacking};
use vmm::controller::verify_reports;
use vmm::migration::{Endpoint, Listener, MigrateOptions};
use vmm::receive::{self as migration, ReceiveOptions};
use vmm::snapshot::AfterSnapshot;
use vmm::{GuestEnd, MemBackend, MemoryConfig, RestoreOptions, RunningVm, Vm, VmConfig, VmOptions};
use vmm_tests::{boot, capture_options, config, TempFile};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-backing-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MODES: [FaultMode; 2] = [FaultMode::Missing, FaultMode::Minor];

fn memfd(backend: MemBackend, mode: FaultMode) -> MemoryConfig {
    MemoryConfig {
        backend,
        backing: MemBacking::Memfd,
        fault_mode: mode,
        ..MemoryConfig::default()
    }
}

fn console_text(c: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&c.lock().unwrap()).into_owned()
}

fn wait_for(console: &Mutex<Vec<u8>>, what: &str) {
    let start = Instant::now();
    while !console_text(console).contains(what) {
        assert!(start.elapsed() < Duration::from_secs(60), "no `{what}`");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn check_mode(out: &vmm::RunOutcome, mode: FaultMode, what: &str) {
    let m = out
        .memory
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no lazy memory"));
    assert!(m.failures.is_empty(), "{what}: {m:?}");
    let t = &m.total;
    match mode {
        FaultMode::Minor => assert!(
            t.pages_continued > 0 && t.pages_copied == 0 && t.pages_zeroed == 0,
            "{what}: MINOR mode maps from the page cache only: {t:?}"
        ),
        FaultMode::Missing => assert_eq!(t.pages_continued, 0, "{what}: {t:?}"),
    }
}

#[test]
fn touch_workload_on_a_memfd_with_every_source_and_mode() {
    let pages = 3000u64;
    // A memory file of zeros: the guest writes every page it checks.
    let file = TempFile::zeros("memfd-src", 128 << 20);
    for mode in MODES {
        for backend in [
            MemBackend::Anon,
            MemBackend::Zero,
            MemBackend::File {
                path: file.0.clone(),
                offset: 0,
            },
        ] {
            let what = format!("memfd, {mode}, {backend}");
            let mut cfg = config(2, "128M", &format!("workload=touch pages={pages} pattern=rand"));
            cfg.memory = memfd(backend.clone(), mode);
            let run = boot(&cfg);
            assert_eq!(run.outcome.end, GuestEnd::Exited(0), "{what}: {}", run.console);
            let sum = verify_reports(&cfg, &run.outcome);
            assert!(matches!(sum, Ok(Some(_))), "{what}: {sum:?}");
            if backend.is_lazy() {
                check_mode(&run.outcome, mode, &what);
            }
        }
    }
}

#[test]
fn guest_suite_on_a_memfd_in_minor_mode() {
    let mut cfg = config(2, "256M", "test=all");
    cfg.memory = memfd(MemBackend::Zero, FaultMode::Minor);
    let run = boot(&cfg);
    assert!(run.console.contains("guest-test: all passed"), "{}", run.console);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "{}", run.console);
    check_mode(&run.outcome, FaultMode::Minor, "suite");
}

fn snapshot_mid_run(cfg: &VmConfig, dir: &Path) {
    let (options, console) = capture_options();
    let vm = Vm::new(cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    std::thread::sleep(Duration::from_millis(100));
    let info = vm.snapshot(dir, AfterSnapshot::Stop).unwrap();
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    assert!(info.memory_bytes > 0, "{info:?}");
}

fn restore_and_finish(
    dir: &Path,
    how: &RestoreOptions,
    backing: MemBacking,
    mode: FaultMode,
) -> vmm::RunOutcome {
    let (options, console) = capture_options();
    let options = VmOptions {
        backing,
        fault_mode: mode,
        ..options
    };
    let vm = Vm::restore(dir, how, options).unwrap_or_else(|e| panic!("restore failed: {e}"));
    let cfg = vm.config().clone();
    assert_eq!((cfg.memory.backing, cfg.memory.fault_mode), (backing, mode));
    let out = vm.run().unwrap();
    let text = console_text(&console);
    assert_eq!(out.end, GuestEnd::Exited(0), "{backing} {mode}: {text}");
    let sum = verify_reports(&cfg, &out);
    assert!(matches!(sum, Ok(Some(_))), "{backing} {mode}: {sum:?}\n{text}");
    out
}

#[test]
fn snapshots_of_a_memfd_vm_restore_onto_every_backing() {
    let mut cfg = config(2, "256M", "workload=touch pages=6000 pattern=rand");
    cfg.memory = memfd(MemBackend::Zero, FaultMode::Minor);
    let dir = TempDir::new("snap");
    snapshot_mid_run(&cfg, &dir.0);
    let lazy = |prefetch| RestoreOptions {
        lazy: true,
        prefetch,
        ..Default::default()
    };
    // Eager onto a memfd (onto anonymous memory: the chain below).
    let out = restore_and_finish(
        &dir.0,
        &RestoreOptions::default(),
        MemBacking::Memfd,
        FaultMode::Missing,
    );
    assert!(out.memory.is_none());
    // Lazy, each mode, with and without prefetch.
    for (mode, prefetch) in [
        (FaultMode::Missing, false),
        (FaultMode::Minor, false),
        (FaultMode::Minor, true),
    ] {
        let out = restore_and_finish(&dir.0, &lazy(prefetch), MemBacking::Memfd, mode);
        check_mode(&out, mode, &format!("lazy restore, {mode}, prefetch {prefetch}"));
    }
    // A lazily restored memfd VM (pages not fetched yet) snapshots again
    // and that snapshot restores onto anonymous memory.
    let again = TempDir::new("snap-again");
    let (options, _console) = capture_options();
    let options = VmOptions {
        backing: MemBacking::Memfd,
        fault_mode: FaultMode::Minor,
        ..options
    };
    let vm = Vm::restore(&dir.0, &lazy(false), options)
        .unwrap()
        .start()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.snapshot(&again.0, AfterSnapshot::Stop).unwrap();
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    restore_and_finish(
        &again.0,
        &RestoreOptions::default(),
        MemBacking::Anon,
        FaultMode::Missing,
    );
}

fn sock(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-backing-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn destination(
    listener: Listener,
    backing: MemBacking,
    mode: FaultMode,
) -> std::thread::JoinHandle<migration::ReceiveOutcome> {
    std::thread::spawn(move || {
        let (vm, _console) = capture_options();
        let opts = ReceiveOptions {
            vm: VmOptions {
                backing,
                fault_mode: mode,
                ..vm
            },
            lost_wait: Duration::from_secs(1),
            progress: Default::default(),
            wait: None,
            handlers: Default::default(),
        };
        migration::receive(&listener, opts, |_| {}).unwrap()
    })
}

fn source(cfg: &VmConfig) -> RunningVm {
    let (options, console) = capture_options();
    let vm = Vm::new(cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    std::thread::sleep(Duration::from_millis(300));
    vm
}

/// Migrates a guest started from `cfg` to a destination on `backing` in
/// `mode` (`rounds` pre-copy rounds first) and checks what every
/// migration must: the source ends migrated, the destination's guest
/// exits 0 with the right checksums, no page is placed twice, pre-copy
/// sent pages.
fn migrate_and_check(
    cfg: &VmConfig,
    name: &str,
    backing: MemBacking,
    mode: FaultMode,
    rounds: u32,
    what: &str,
) -> migration::ReceiveOutcome {
    let listener = Listener::bind(&Endpoint::Unix(sock(name))).unwrap();
    let to = listener.endpoint().unwrap();
    let dest = destination(listener, backing, mode);
    let src = source(cfg);
    let options = MigrateOptions {
        precopy_rounds: rounds,
        push_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let summary = src.migrate(&to, &options).unwrap();
    assert!(matches!(src.wait().unwrap().end, GuestEnd::Migrated(_)), "{what}");
    let out = dest.join().unwrap();
    assert_eq!(out.run.end, GuestEnd::Exited(0), "{what}: {:?}", out.lost);
    assert_eq!(out.config.memory.backing, backing, "{what}");
    let sum = verify_reports(&out.config, &out.run);
    assert!(matches!(sum, Ok(Some(_))), "{what}: {sum:?}");
    assert_eq!(out.stats.duplicates, 0, "{what}: {:?}", out.stats);
    if rounds > 0 {
        assert!(summary.precopy_pages > 0, "{what}: {summary:?}");
    }
    out
}

#[test]
fn post_copy_and_pre_copy_migrate_onto_and_from_a_memfd() {
    // (source memory, destination backing and mode, pre-copy rounds)
    let cases = [
        (MemoryConfig::default(), MemBacking::Memfd, FaultMode::Missing, 0),
        (MemoryConfig::default(), MemBacking::Memfd, FaultMode::Minor, 0),
        (
            memfd(MemBackend::Zero, FaultMode::Minor),
            MemBacking::Memfd,
            FaultMode::Minor,
            2,
        ),
        (
            memfd(MemBackend::Anon, FaultMode::Missing),
            MemBacking::Anon,
            FaultMode::Missing,
            2,
        ),
    ];
    for (i, (src_mem, backing, mode, rounds)) in cases.into_iter().enumerate() {
        let what = format!(
            "case {i}: source {}, destination {backing} {mode}, {rounds} rounds",
            src_mem.backing
        );
        let mut cfg = config(2, "256M", "workload=touch pages=8000 pattern=rand");
        cfg.memory = src_mem;
        let out = migrate_and_check(&cfg, &format!("mig{i}"), backing, mode, rounds, &what);
        assert_eq!(out.config.memory.fault_mode, mode, "{what}");
        // A migration destination serves every page lazily.
        check_mode(&out.run, mode, &what);
    }
}

#[test]
fn eight_clones_share_one_snapshot_and_copy_only_what_they_write() {
    let mut cfg = config(1, "64M", "workload=touch pages=2500 pattern=rand");
    cfg.memory = memfd(MemBackend::Anon, FaultMode::Missing);
    let dir = TempDir::new("clones");
    snapshot_mid_run(&cfg, &dir.0);
    let clone_dir = PathBuf::from(format!("/dev/shm/vmm-test-clones-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&clone_dir);
    // The test holds the shared memory too: its contents after the clones ran
    // prove no clone's write reached it (the only path to another clone).
    let snap = vmm::snapshot::Snapshot::open(&dir.0, None).unwrap();
    let held = vmm::snapshot::shared::SharedMemory::open_or_load(&snap, &clone_dir).unwrap();
    assert!(held.loaded_here);
    let before = std::fs::read(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&**held.file())
    ))
    .unwrap();
    let how = RestoreOptions {
        lazy: true,
        clone_dir: Some(clone_dir.clone()),
        ..Default::default()
    };
    let clones: Vec<_> = (0..8)
        .map(|i| {
            let (options, console) = capture_options();
            let vm = Vm::restore(&dir.0, &how, options).unwrap_or_else(|e| panic!("clone {i}: {e}"));
            let cfg = vm.config().clone();
            (vm.start().unwrap(), cfg, console)
        })
        .collect();
    for (i, (vm, cfg, console)) in clones.into_iter().enumerate() {
        let out = vm.wait().unwrap();
        assert_eq!(
            out.end,
            GuestEnd::Exited(0),
            "clone {i}: {}",
            console_text(&console)
        );
        let sum = verify_reports(&cfg, &out);
        assert!(matches!(sum, Ok(Some(_))), "clone {i}: {sum:?}");
        let m = out.memory.unwrap();
        let s = m.sharing.unwrap();
        eprintln!("clone {i}: {s:?}, {} pages continued", m.total.pages_continued);
        assert!(
            m.total.pages_continued > 0 && m.total.pages_copied == 0,
            "clone {i}: {:?}",
            m.total
        );
        assert!(s.shared_pages > 0 && s.private_pages > 0, "clone {i}: {s:?}");
    }
    let after = std::fs::read(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&**held.file())
    ))
    .unwrap();
    assert!(
        before == after,
        "a clone's write reached the shared snapshot memory"
    );
    let path = held.path().to_owned();
    assert!(path.exists());
    drop(held);
    assert!(!path.exists(), "the last holder did not free the shared memory");
    let _ = std::fs::remove_dir_all(&clone_dir);
}

/// Huge pages this test added to the 2 MiB pool (as root), given back on drop.
struct HugePages(u64);

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

impl HugePages {
    fn reserve(n: u64) -> HugePages {
        let cur: u64 = std::fs::read_to_string(POOL).unwrap().trim().parse().unwrap();
        std::fs::write(POOL, format!("{}", cur + n)).expect("reserving huge pages needs root");
        HugePages(n)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Ok(cur) = std::fs::read_to_string(POOL).map(|s| s.trim().parse::<u64>().unwrap_or(0)) {
            let _ = std::fs::write(POOL, format!("{}", cur.saturating_sub(self.0)));
        }
    }
}

#[test]
fn hugetlb_2m_boots_and_takes_a_4k_snapshot_eagerly_and_back() {
    let huge = MemBacking::Hugetlb(vmm::config::HugePageSize::Size2M);
    // Two VMs of 64 MiB at most at once.
    let _pages = HugePages::reserve(64);
    let mut cfg = config(1, "64M", "workload=touch pages=3000 pattern=rand");
    cfg.memory = MemoryConfig {
        backing: huge,
        ..MemoryConfig::default()
    };
    let run = boot(&cfg);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "{}", run.console);
    assert!(matches!(verify_reports(&cfg, &run.outcome), Ok(Some(_))));
    // A snapshot of 4 KiB pages (from anonymous memory) onto huge pages,
    // and one taken on huge pages back onto anonymous memory.
    let mut anon = cfg.clone();
    anon.memory = MemoryConfig::default();
    let a = TempDir::new("huge-a");
    snapshot_mid_run(&anon, &a.0);
    restore_and_finish(&a.0, &RestoreOptions::default(), huge, FaultMode::Missing);
    let b = TempDir::new("huge-b");
    snapshot_mid_run(&cfg, &b.0);
    restore_and_finish(
        &b.0,
        &RestoreOptions::default(),
        MemBacking::Anon,
        FaultMode::Missing,
    );
    // An external handler (Firecracker's handshake: 4 KiB pages) cannot
    // fill huge pages: refused before anything is built.
    let (vm, _) = capture_options();
    let how = RestoreOptions {
        uffd_socket: Some(b.0.join("no-handler.sock")),
        ..Default::default()
    };
    let e = Vm::restore(&b.0, &how, VmOptions { backing: huge, ..vm })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("serves 4 KiB pages") && e.contains("--mem-backing anon or memfd"),
        "{e}"
    );
    // Lazily served on huge pages: demand-zero boot (zeros are copied
    // zeroed huge pages), a lazy restore of the 4 KiB snapshot, both at
    // huge-page granularity.
    let mut lazy_cfg = cfg.clone();
    lazy_cfg.memory.backend = MemBackend::Zero;
    let run = boot(&lazy_cfg);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "{}", run.console);
    assert!(matches!(verify_reports(&lazy_cfg, &run.outcome), Ok(Some(_))));
    let t = run.outcome.memory.unwrap().total;
    assert!(
        t.pages_zeroed > 0 && t.pages_zeroed <= 32 && t.fault_around_pages == 0,
        "{t:?}"
    );
    let how = RestoreOptions {
        lazy: true,
        ..Default::default()
    };
    let out = restore_and_finish(&a.0, &how, huge, FaultMode::Missing);
    let t = out.memory.unwrap().total;
    assert!(t.pages_copied > 0 && t.pages_copied <= 32, "2 MiB units: {t:?}");
}

#[test]
fn hugetlb_errors_say_what_to_do() {
    let mut cfg = config(1, "66M", "workload=hello");
    cfg.memory = MemoryConfig {
        backing: MemBacking::Hugetlb(vmm::config::HugePageSize::Size1G),
        ..MemoryConfig::default()
    };
    let (options, _) = capture_options();
    let e = Vm::new(&cfg, options).unwrap_err().to_string();
    assert!(e.contains("not a multiple of the 1024 MiB huge page"), "{e}");
    // 1 GiB pages are rarely reserved: the error says how many and how.
    let free1g = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
        .map(|s| s.trim().parse::<u64>().unwrap_or(0))
        .unwrap_or(0);
    if free1g == 0 {
        cfg.mem_size = 1 << 30;
        let (options, _) = capture_options();
        let e = Vm::new(&cfg, options).unwrap_err().to_string();
        assert!(
            e.contains("1 free huge pages of 1048576 kB are needed") && e.contains("nr_hugepages"),
            "{e}"
        );
    } else {
        eprintln!("1 GiB huge pages are free here: the no-pages error is not checked");
    }
}

#[test]
fn a_working_set_is_prefetched_onto_a_memfd_in_minor_mode_huge_pages_and_a_clone() {
    // A faas guest snapshotted at its checkpoint; a lazy restore on
    // anonymous memory records the pages its invocation makes present.
    let cfg = config(
        1,
        "64M",
        "workload=faas pages=2048 pattern=zipf:990 invoke=300 seed=5 populate=1",
    );
    let dir = TempDir::new("ws");
    let snap = dir.0.join("snap");
    let (mut options, _console) = capture_options();
    options.snapshot_at_checkpoint = Some(snap.clone());
    let out = Vm::new(&cfg, options).unwrap().run().unwrap();
    assert!(matches!(out.checkpoint, Some(Ok(_))), "{:?}", out.checkpoint);
    let record = RestoreOptions {
        lazy: true,
        record_working_set: true,
        ..Default::default()
    };
    let on_demand = restore_and_finish(&snap, &record, MemBacking::Anon, FaultMode::Missing);
    let faults = on_demand.memory.unwrap().total.faults;
    assert!(faults > 20, "the on-demand restore must fault ({faults})");
    let prefetch = RestoreOptions {
        lazy: true,
        prefetch_working_set: Some(true),
        ..Default::default()
    };
    let check = |out: vmm::RunOutcome, what: &str| {
        let m = out.memory.unwrap();
        let pre = m.working_set_prefetch.unwrap();
        assert!(pre.pages > 0 && pre.runs > 0, "{what}: {pre:?}");
        // The working set's copy of the pages suits copy-filled 4 KiB pages
        // only: here every page comes from the snapshot.
        assert_eq!(pre.from_contents, 0, "{what}: {pre:?}");
        assert!(
            m.total.faults <= 2,
            "{what}: {} faults after prefetching {pre:?} (on demand: {faults})",
            m.total.faults
        );
        m.total
    };
    // MINOR: the prefetch writes the pages into the memfd and maps them.
    let out = restore_and_finish(&snap, &prefetch, MemBacking::Memfd, FaultMode::Minor);
    let t = check(out, "memfd minor");
    assert!(t.pages_continued > 0 && t.pages_copied == 0, "{t:?}");
    // Huge pages: whole huge pages, counted as their 4 KiB pages.
    let huge = MemBacking::Hugetlb(vmm::config::HugePageSize::Size2M);
    let _pages = HugePages::reserve(32);
    let out = restore_and_finish(&snap, &prefetch, huge, FaultMode::Missing);
    let pre = out.memory.as_ref().unwrap().working_set_prefetch.unwrap();
    assert_eq!(pre.pages % 512, 0, "{pre:?}");
    check(out, "hugetlb 2M");
    // A clone: the pages are mapped from the shared snapshot memory.
    let clone_dir = PathBuf::from(format!("/dev/shm/vmm-test-ws-clone-{}", std::process::id()));
    let clone = RestoreOptions {
        clone_dir: Some(clone_dir.clone()),
        ..prefetch
    };
    let out = restore_and_finish(&snap, &clone, MemBacking::Memfd, FaultMode::Minor);
    let t = check(out, "clone");
    assert!(t.pages_continued > 0 && t.pages_copied == 0, "{t:?}");
    let _ = std::fs::remove_dir_all(&clone_dir);
}

#[test]
fn post_copy_and_pre_copy_migrate_onto_2m_huge_pages() {
    let huge = MemBacking::Hugetlb(vmm::config::HugePageSize::Size2M);
    // One destination of 64 MiB at once.
    let _pages = HugePages::reserve(32);
    for rounds in [0u32, 2] {
        let what = format!("destination on 2 MiB pages, {rounds} pre-copy rounds");
        let cfg = config(2, "64M", "workload=touch pages=6000 pattern=rand");
        let name = format!("huge{rounds}");
        let out = migrate_and_check(&cfg, &name, huge, FaultMode::Missing, rounds, &what);
        // Placed in whole huge pages: at most 32 fills of 2 MiB for 64 MiB.
        let t = out.run.memory.unwrap().total;
        assert!(
            t.pages_copied + t.pages_zeroed <= 32,
            "{what}: 2 MiB units: {t:?}"
        );
    }
}

const POOL_1G: &str = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages";

#[test]
fn one_gib_huge_pages_where_the_pool_allows() {
    // Reserving a 1 GiB page needs 1 GiB of contiguous free memory: often
    // impossible on a busy machine. Say so plainly rather than fail.
    let Ok(cur) = std::fs::read_to_string(POOL_1G).map(|s| s.trim().parse::<u64>().unwrap_or(0)) else {
        eprintln!("SKIPPED: no 1 GiB huge-page pool here ({POOL_1G})");
        return;
    };
    let _ = std::fs::write(POOL_1G, format!("{}", cur + 1));
    struct Release(u64);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = std::fs::write(POOL_1G, format!("{}", self.0));
        }
    }
    let _release = Release(cur);
    let free: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
        .map(|s| s.trim().parse().unwrap_or(0))
        .unwrap_or(0);
    if free == 0 {
        eprintln!("SKIPPED: a 1 GiB huge page could not be reserved here (no 1 GiB of contiguous free memory); 2 MiB tests ran");
        return;
    }
    let huge = MemBacking::Hugetlb(vmm::config::HugePageSize::Size1G);
    let mut cfg = config(1, "1G", "workload=touch pages=3000 pattern=rand");
    cfg.memory = MemoryConfig {
        backing: huge,
        backend: MemBackend::Zero,
        ..MemoryConfig::default()
    };
    // Demand-zero on one 1 GiB page: one zeroed 1 GiB copy.
    let run = boot(&cfg);
    assert_eq!(run.outcome.end, GuestEnd::Exited(0), "{}", run.console);
    assert!(matches!(verify_reports(&cfg, &run.outcome), Ok(Some(_))));
    let t = run.outcome.memory.unwrap().total;
    assert!(t.pages_zeroed + t.pages_copied <= 1, "1 GiB units: {t:?}");
}
