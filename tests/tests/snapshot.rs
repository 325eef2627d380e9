//! Snapshot and restore on real KVM: a guest workload is snapshotted mid-run,
//! restored eagerly and lazily (and in a chain), and completes with the right
//! checksums; bad snapshot files are refused before the guest runs.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::controller::verify_reports;
use vmm::snapshot::{self, AfterSnapshot, SnapshotError};
use vmm::RestoreOptions;
use vmm::{GuestEnd, RunningVm, Vm, VmConfig, VmError};
use vmm_tests::{capture_options, config};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-snap-{}-{name}", std::process::id()));
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

fn touch_cfg(mem: &str, pages: u64) -> VmConfig {
    config(2, mem, &format!("workload=touch pages={pages} pattern=rand"))
}

fn console_text(c: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&c.lock().unwrap()).into_owned()
}

fn wait_for(console: &Mutex<Vec<u8>>, what: &str) {
    let start = Instant::now();
    while !console_text(console).contains(what) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no `{what}` in:\n{}",
            console_text(console)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Boots `cfg`, waits until the workload runs, snapshots it to `dir` and stops.
fn snapshot_mid_run(cfg: &VmConfig, dir: &Path) -> vmm::snapshot::SnapshotInfo {
    let (options, console) = capture_options();
    let vm = Vm::new(cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    std::thread::sleep(Duration::from_millis(50));
    let info = vm.snapshot(dir, AfterSnapshot::Stop).unwrap();
    let outcome = vm.wait().unwrap();
    assert_eq!(outcome.end, GuestEnd::Stopped);
    assert!(info.memory_bytes > 0 && info.extents > 0, "{info:?}");
    info
}

fn restore(dir: &Path, how: &RestoreOptions) -> (RunningVm, VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (options, console) = capture_options();
    let vm = Vm::restore(dir, how, options).unwrap_or_else(|e| panic!("restore failed: {e}"));
    let cfg = vm.config().clone();
    (vm.start().unwrap(), cfg, console)
}

fn finish(vm: RunningVm, cfg: &VmConfig, console: &Mutex<Vec<u8>>) -> vmm::RunOutcome {
    let outcome = vm.wait().unwrap();
    let text = console_text(console);
    assert_eq!(outcome.end, GuestEnd::Exited(0), "console:\n{text}");
    let sum = verify_reports(cfg, &outcome);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}, console:\n{text}");
    outcome
}

fn lazy(prefetch: bool) -> RestoreOptions {
    RestoreOptions {
        lazy: true,
        prefetch,
        ..Default::default()
    }
}

#[test]
fn restore_eagerly_and_lazily_and_finish_the_workload() {
    let cfg = touch_cfg("512M", 20000);
    let dir = TempDir::new("basic");
    snapshot_mid_run(&cfg, &dir.0);

    let (vm, rcfg, console) = restore(&dir.0, &RestoreOptions::default());
    assert_eq!(rcfg.cmdline, cfg.cmdline);
    let out = finish(vm, &rcfg, &console);
    assert!(out.memory.is_none(), "eager restore uses plain memory");
    // The restored guest resumes: it does not boot again.
    assert!(
        !console_text(&console).contains("booting"),
        "{}",
        console_text(&console)
    );

    let (vm, rcfg, console) = restore(&dir.0, &lazy(false));
    let out = finish(vm, &rcfg, &console);
    let m = out.memory.unwrap();
    assert!(m.backend.starts_with("snapshot:"), "{}", m.backend);
    assert!(m.total.pages_copied > 0 && m.failures.is_empty(), "{m:?}");

    let (vm, rcfg, console) = restore(&dir.0, &lazy(true));
    finish(vm, &rcfg, &console);
}

#[test]
fn a_chain_of_snapshots_and_restores() {
    let cfg = touch_cfg("512M", 20000);
    let a = TempDir::new("chain-a");
    let b = TempDir::new("chain-b");
    let c = TempDir::new("chain-c");
    snapshot_mid_run(&cfg, &a.0);
    // Lazy restore, run a while, snapshot again: pages not fetched yet must
    // still be in the new snapshot.
    let (vm, _, _console) = restore(&a.0, &lazy(false));
    std::thread::sleep(Duration::from_millis(300));
    vm.snapshot(&b.0, AfterSnapshot::Stop).unwrap();
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    // Eager restore, snapshot again and keep running (resume).
    let (vm, rcfg, console) = restore(&b.0, &RestoreOptions::default());
    std::thread::sleep(Duration::from_millis(200));
    let _ = vm.snapshot(&c.0, AfterSnapshot::Restore);
    finish(vm, &rcfg, &console);
    // The last snapshot finishes too, lazily with prefetch.
    if c.0.join("manifest.json").exists() {
        let (vm, rcfg, console) = restore(&c.0, &lazy(true));
        finish(vm, &rcfg, &console);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn restore_err(dir: &Path, how: &RestoreOptions) -> SnapshotError {
    match Vm::restore(dir, how, capture_options().0) {
        Ok(_) => panic!("restore of a bad snapshot succeeded"),
        Err(VmError::Snapshot(e)) => e,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn bad_snapshots_are_refused_before_the_guest_runs() {
    let cfg = touch_cfg("256M", 3000);
    let good = TempDir::new("bad-good");
    snapshot_mid_run(&cfg, &good.0);
    let eager = RestoreOptions::default();
    let case = |name: &str, damage: &dyn Fn(&Path)| {
        let d = TempDir::new(name);
        copy_dir(&good.0, &d.0);
        damage(&d.0);
        d
    };

    let e = restore_err(Path::new("/nonexistent/vmm-snapshot"), &eager);
    assert!(matches!(e, SnapshotError::Missing { .. }), "{e}");

    for file in ["manifest.json", "state.json", "memory.bin", "memory.hashes"] {
        let d = case("missing", &|p: &Path| std::fs::remove_file(p.join(file)).unwrap());
        let e = restore_err(&d.0, &eager);
        assert!(matches!(e, SnapshotError::Missing { .. }), "{file}: {e}");
        assert!(e.to_string().contains(file), "{e}");
    }

    let d = case("trunc-mem", &|p: &Path| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("memory.bin"))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len / 2).unwrap();
    });
    let e = restore_err(&d.0, &lazy(false));
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");

    let d = case("trunc-state", &|p: &Path| {
        let s = std::fs::read(p.join("state.json")).unwrap();
        std::fs::write(p.join("state.json"), &s[..s.len() - 10]).unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");

    let d = case("corrupt-state", &|p: &Path| {
        let mut s = std::fs::read(p.join("state.json")).unwrap();
        let i = s.len() / 2;
        s[i] ^= 0x01;
        std::fs::write(p.join("state.json"), &s).unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("corrupted"), "{e}");

    let d = case("version", &|p: &Path| {
        let m = std::fs::read_to_string(p.join("manifest.json")).unwrap();
        std::fs::write(
            p.join("manifest.json"),
            m.replace(
                &format!("\"version\": {}", snapshot::FORMAT_VERSION),
                "\"version\": 99",
            ),
        )
        .unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::WrongVersion { found: 99, .. }), "{e}");

    let d = case("garbage-manifest", &|p: &Path| {
        std::fs::write(p.join("manifest.json"), b"\x7fELF not json").unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Malformed { .. }), "{e}");

    // A memory file from a VM with another RAM size.
    let other = TempDir::new("bad-other");
    snapshot_mid_run(&touch_cfg("128M", 1000), &other.0);
    let d = case("mismatch", &|p: &Path| {
        std::fs::copy(other.0.join("memory.bin"), p.join("memory.bin")).unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
    // A state file from it, with a manifest naming its checksum: the state
    // does not fit the memory file.
    let d = case("mismatch-state", &|p: &Path| {
        std::fs::copy(other.0.join("state.json"), p.join("state.json")).unwrap();
        let mine = snapshot::read_manifest(p).unwrap();
        let mut theirs = snapshot::read_manifest(&other.0).unwrap();
        theirs.memory = mine.memory;
        snapshot::write_manifest(p, &theirs, None).unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Mismatch { .. }), "{e}");
    // The memory of another snapshot of the same guest: its pages do not
    // match this manifest's page hashes (the hashes file's own hash).
    let twin = TempDir::new("bad-twin");
    snapshot_mid_run(&cfg, &twin.0);
    let d = case("paired", &|p: &Path| {
        std::fs::copy(twin.0.join("memory.bin"), p.join("memory.bin")).unwrap();
        std::fs::copy(twin.0.join("memory.hashes"), p.join("memory.hashes")).unwrap();
    });
    let e = restore_err(&d.0, &eager);
    assert!(
        matches!(
            e,
            SnapshotError::Checksum { .. } | SnapshotError::Truncated { .. }
        ),
        "{e}"
    );
    // An extent entry deleted from the manifest (its data would read as
    // zero): the manifest's digest no longer matches.
    let d = case("extent-deleted", &|p: &Path| {
        let text = std::fs::read_to_string(p.join("manifest.json")).unwrap();
        let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
        m["memory"]["extents"].as_array_mut().unwrap().remove(0);
        std::fs::write(p.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    });
    let e = restore_err(&d.0, &lazy(false));
    assert!(matches!(e, SnapshotError::Digest { .. }), "{e}");

    // A corrupted memory extent: eager restore refuses it up front; a lazy one
    // refuses the page when the guest needs it, pausing and ending the run
    // instead of mapping bad data.
    let d = case("corrupt-mem", &|p: &Path| {
        let m = snapshot::read_manifest(p).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("memory.bin"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        // Every extent, so that whatever the guest touches next is bad.
        for e in &m.memory.extents {
            f.write_all_at(b"\xde\xad\xbe\xef", e.gpa + 8).unwrap();
        }
    });
    let e = restore_err(&d.0, &eager);
    assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
    let (vm, _, _) = restore(&d.0, &lazy(false));
    let out = vm.wait().unwrap();
    match &out.end {
        GuestEnd::MemoryFault(m) => assert!(m.contains("do not match their hash"), "{m}"),
        other => panic!("a corrupted lazy snapshot ran to {other:?}"),
    }
}

/// Rewrites a snapshot's memory file indexed by guest-physical address
/// (the hole below 4 GiB a hole in the file too), its layout recorded so.
fn to_gpa_layout(dir: &Path) {
    use snapshot::{LayoutKind, MemoryLayout};
    use std::os::unix::fs::FileExt;
    let mut m = snapshot::read_manifest(dir).unwrap();
    let packed = m.memory.layout.clone();
    assert_eq!(packed.kind, LayoutKind::Packed);
    let gpa = MemoryLayout::new(LayoutKind::Gpa, m.memory.mem_size);
    let from = std::fs::File::open(dir.join("memory.bin")).unwrap();
    let tmp = dir.join("memory.bin.gpa");
    let to = std::fs::File::create(&tmp).unwrap();
    to.set_len(gpa.file_len()).unwrap();
    for e in &m.memory.extents {
        let mut buf = vec![0u8; usize::try_from(e.len).unwrap()];
        from.read_exact_at(&mut buf, packed.file_offset(e.gpa, e.len).unwrap())
            .unwrap();
        to.write_all_at(&buf, e.gpa).unwrap();
    }
    std::fs::rename(&tmp, dir.join("memory.bin")).unwrap();
    m.memory.layout = gpa.clone();
    m.memory.len = gpa.file_len();
    snapshot::write_manifest(dir, &m, None).unwrap();
}

/// Snapshots are written with packed regions (the memory file is as long
/// as RAM, the layout is in the manifest); a memory file indexed by
/// guest-physical address restores too, eagerly and lazily, for a guest
/// with RAM on both sides of the MMIO hole, and a layout that does not fit
/// the RAM is refused before anything runs.
#[test]
fn packed_and_gpa_indexed_snapshots_of_a_guest_above_3_gib_restore() {
    let cfg = touch_cfg("3584M", 3000);
    let dir = TempDir::new("packed");
    snapshot_mid_run(&cfg, &dir.0);
    let m = snapshot::read_manifest(&dir.0).unwrap();
    assert_eq!(m.version, snapshot::FORMAT_VERSION);
    assert_eq!(m.memory.len, 3584 << 20, "packed: no hole for the MMIO gap");
    assert_eq!(m.memory.layout.regions.len(), 2);
    assert_eq!(m.memory.layout.regions[1].offset, 3 << 30);
    let old = TempDir::new("gpa-layout");
    copy_dir(&dir.0, &old.0);
    to_gpa_layout(&old.0);
    assert_eq!(
        std::fs::metadata(old.0.join("memory.bin")).unwrap().len(),
        (4 << 30) + (512 << 20)
    );
    for d in [&dir.0, &old.0] {
        for how in [RestoreOptions::default(), lazy(true)] {
            let (vm, cfg, console) = restore(d, &how);
            finish(vm, &cfg, &console);
        }
    }
    // A layout for another RAM size.
    let bad = TempDir::new("badlayout");
    copy_dir(&dir.0, &bad.0);
    let mut m = snapshot::read_manifest(&bad.0).unwrap();
    m.memory.layout = snapshot::MemoryLayout::new(snapshot::LayoutKind::Packed, 2 << 30);
    snapshot::write_manifest(&bad.0, &m, None).unwrap();
    let e = restore_err(&bad.0, &RestoreOptions::default());
    assert!(e.to_string().contains("memory layout"), "{e}");
}

/// A lazy restore does no work proportional to memory size: a 4 GiB guest
/// restored lazily brings in only the pages its workload touches (the time
/// figures are `vmm bench restore`'s).
#[test]
fn lazy_restore_of_a_large_guest_serves_only_touched_pages() {
    let dir = TempDir::new("size-4G");
    let cfg = touch_cfg("4G", 4000);
    snapshot_mid_run(&cfg, &dir.0);
    let (vm, cfg, console) = restore(&dir.0, &lazy(false));
    let outcome = finish(vm, &cfg, &console);
    let m = outcome.memory.expect("memory statistics");
    let served = m.total.pages_copied + m.total.pages_zeroed;
    assert!(served > 0, "{:?}", m.total);
    // 4000 pages touched (plus fault-around neighbours and the guest kernel's
    // own): far below the guest's 1M pages.
    assert!(
        served < 40_000,
        "a lazy restore brought in {served} pages: {:?}",
        m.total
    );
}

/// Page-store reads in flight at a snapshot: the guest's `store` test reads
/// four store pages that each take 1.2 s to arrive; a snapshot taken while
/// one is in flight (its state lists it) restores lazily, the read completes
/// after its remaining delay, and the test passes on the restored VM.
#[test]
fn page_store_reads_in_flight_complete_after_a_lazy_restore() {
    let cfg = config(1, "256M", "test=store store_delay_us=1200000");
    let dir = TempDir::new("store-in-flight");
    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "guest-kernel: booting");
    let start = Instant::now();
    let in_flight = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never a read in flight"
        );
        std::thread::sleep(Duration::from_millis(150));
        vm.snapshot(&dir.0, AfterSnapshot::Pause).unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.0.join("state.json")).unwrap()).unwrap();
        let n = state["vm"]["devices"]["page_store"]["in_flight"]
            .as_array()
            .map_or(0, Vec::len);
        if n > 0 {
            break n;
        }
        vm.resume().unwrap();
    };
    assert_eq!(in_flight, 1, "the test reads one page at a time");
    vm.stop();
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    let (vm, _, console) = restore(&dir.0, &lazy(false));
    let out = vm.wait().unwrap();
    let text = console_text(&console);
    assert_eq!(out.end, GuestEnd::Exited(0), "console:\n{text}");
    assert!(text.contains("guest-test: store ... ok"), "{text}");
}

/// Snapshot files are owner-only and written safely: a new snapshot into a
/// directory that holds an older one replaces it whole; a symlink or a
/// directory of other files is refused; a keyed snapshot needs its key.
#[test]
fn snapshots_are_private_replaced_whole_and_authenticated_with_a_key() {
    use std::os::unix::fs::PermissionsExt;
    let cfg = touch_cfg("256M", 3000);
    let dir = TempDir::new("safe");
    let target = dir.0.join("snap");
    snapshot_mid_run(&cfg, &target);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&target), 0o700);
    for f in ["manifest.json", "state.json", "memory.bin", "memory.hashes"] {
        assert_eq!(mode(&target.join(f)), 0o600, "{f}");
    }
    let first = snapshot::read_manifest(&target).unwrap().id;
    // Again into the same directory: replaced whole, nothing left beside it.
    snapshot_mid_run(&cfg, &target);
    assert_ne!(snapshot::read_manifest(&target).unwrap().id, first);
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["snap".to_string()],
        "temporary directories left behind"
    );

    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    // A planted symlink is never followed.
    let link = dir.0.join("link");
    let elsewhere = dir.0.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let e = vm.snapshot(&link, AfterSnapshot::Restore).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // A directory of other files is not a snapshot to replace.
    let busy = dir.0.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let e = vm.snapshot(&busy, AfterSnapshot::Restore).unwrap_err();
    assert!(e.to_string().contains("holds other files"), "{e}");
    assert_eq!(std::fs::read(busy.join("notes.txt")).unwrap(), b"mine");
    vm.stop();
    let _ = vm.wait();

    // A keyed snapshot: refused without its key or with another one.
    let key_file = dir.0.join("key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    // Readable by others (the umask's 0644): anyone could forge snapshots.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = snapshot::SnapshotKey::load(&key_file).unwrap_err();
    assert!(
        e.to_string().contains("other users (mode 640)") && e.to_string().contains("chmod 600"),
        "{e}"
    );
    let e = snapshot::SnapshotKey::load(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(
        e.to_string().contains("a device") && !e.to_string().contains("chmod"),
        "{e}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = snapshot::SnapshotKey::load(&key_file).unwrap();
    let keyed = dir.0.join("keyed");
    let (mut options, console) = capture_options();
    options.snapshot_key = Some(key.clone());
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    vm.snapshot(&keyed, AfterSnapshot::Stop).unwrap();
    let _ = vm.wait();
    let e = restore_err(&keyed, &RestoreOptions::default());
    assert!(matches!(e, SnapshotError::KeyNeeded { .. }), "{e}");
    let (mut options, _) = capture_options();
    options.snapshot_key = Some(snapshot::SnapshotKey::new([8u8; 32]));
    match Vm::restore(&keyed, &RestoreOptions::default(), options) {
        Err(VmError::Snapshot(SnapshotError::Digest { keyed: true, .. })) => {}
        other => panic!("a wrong key was accepted: {:?}", other.map(|_| ())),
    }
    let (mut options, console) = capture_options();
    options.snapshot_key = Some(key);
    let vm = Vm::restore(&keyed, &lazy(false), options).unwrap();
    let rcfg = vm.config().clone();
    finish(vm.start().unwrap(), &rcfg, &console);
}
