//! Live snapshots on real KVM: a guest writing on two vCPUs is snapshotted
//! while it runs; the snapshot equals a stop-the-world snapshot of the same
//! instant (written inside the live pause), restores eagerly and lazily and
//! finishes with the right checksums, while the source ran on and finished
//! right too. Kicks, pause, resume and stop arrive while the saver runs, with
//! a vCPU held in a WP fault (a one-page fault buffer).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::controller::live::{LiveInfo, LiveOptions};
use vmm::controller::verify_reports;
use vmm::snapshot::{read_manifest, AfterSnapshot};
use vmm::{GuestEnd, RestoreOptions, RunningVm, Vm, VmConfig};
use vmm_tests::{capture_options, config};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-live-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

fn finish(vm: RunningVm, cfg: &VmConfig, console: &Mutex<Vec<u8>>) {
    let outcome = vm.wait().unwrap();
    let text = console_text(console);
    assert_eq!(outcome.end, GuestEnd::Exited(0), "console:\n{text}");
    let sum = verify_reports(cfg, &outcome);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}, console:\n{text}");
}

fn restore_and_finish(dir: &Path, how: &RestoreOptions) {
    let (options, console) = capture_options();
    let vm = Vm::restore(dir, how, options).unwrap_or_else(|e| panic!("restore failed: {e}"));
    let cfg = vm.config().clone();
    finish(vm.start().unwrap(), &cfg, &console);
}

/// The memory of two snapshots is the same: extents, block hashes and the
/// memory file's bytes.
fn same_memory(a: &Path, b: &Path) {
    let (ma, mb) = (read_manifest(a).unwrap(), read_manifest(b).unwrap());
    assert_eq!(ma.memory.extents, mb.memory.extents, "extents differ");
    assert_eq!(ma.memory.layout, mb.memory.layout);
    let h = |d: &Path| std::fs::read(d.join("memory.hashes")).unwrap();
    assert!(h(a) == h(b), "block hashes differ");
    let (fa, fb) = (
        std::fs::File::open(a.join("memory.bin")).unwrap(),
        std::fs::File::open(b.join("memory.bin")).unwrap(),
    );
    use std::os::unix::fs::FileExt;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for e in &ma.memory.extents {
        let at = ma.memory.layout.file_offset(e.gpa, e.len).unwrap();
        let n = usize::try_from(e.len).unwrap();
        fa.read_exact_at(&mut ba[..n], at).unwrap();
        fb.read_exact_at(&mut bb[..n], at).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "memory differs in extent {:#x}+{:#x}",
            e.gpa,
            e.len
        );
    }
}

fn touch_vm(pages: u64) -> (RunningVm, VmConfig, Arc<Mutex<Vec<u8>>>) {
    let cfg = config(2, "256M", &format!("workload=touch pages={pages} pattern=rand"));
    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 1 start");
    std::thread::sleep(Duration::from_millis(30));
    (vm, cfg, console)
}

#[test]
fn a_live_snapshot_of_a_writing_guest_equals_stop_the_world_and_restores() {
    let dir = TempDir::new("basic");
    let (vm, cfg, console) = touch_vm(12000);
    for (i, mode) in [
        vmm_core::memory::WpMode::Present,
        vmm_core::memory::WpMode::Unpopulated,
    ]
    .into_iter()
    .enumerate()
    {
        let (live, reference) = (dir.join(&format!("live{i}")), dir.join(&format!("ref{i}")));
        let info: LiveInfo = vm
            .snapshot_live(
                &live,
                &LiveOptions {
                    mode,
                    reference: Some(reference.clone()),
                    // The guest writes while the saver runs.
                    pace: Some(Duration::from_millis(2)),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(info.memory_bytes > 0 && info.wp.protected > 0, "{info:?}");
        assert!(
            info.wp.faults_saved + info.wp.faults_other > 0,
            "the guest wrote protected pages while memory was saved: {info:?}"
        );
        same_memory(&live, &reference);
    }
    // The source ran on through both and finishes right.
    finish(vm, &cfg, &console);
    restore_and_finish(&dir.join("live0"), &RestoreOptions::default());
    restore_and_finish(
        &dir.join("live1"),
        &RestoreOptions {
            lazy: true,
            ..Default::default()
        },
    );
}

#[test]
fn requests_during_a_live_snapshot_and_a_vcpu_held_in_a_wp_fault() {
    let dir = TempDir::new("requests");
    // A guest that keeps writing for 10 s: the live snapshot (slowed on
    // purpose below) ends well before it, however loaded the host (a touch
    // workload could finish first and end the VM under the requests).
    let cfg = config(
        2,
        "256M",
        "workload=dirty pages=12000 rate=100000 duration_ms=10000",
    );
    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "dirty: cpu 1 start");
    let handle = vm.handle();
    let snap = dir.join("snap");
    let t = {
        let snap = snap.clone();
        std::thread::spawn(move || {
            handle.snapshot_live(
                &snap,
                &LiveOptions {
                    // One page of buffer: a second write to an unsaved page waits
                    // in its WP fault for the (slow) saver.
                    buffer_pages: Some(1),
                    pace: Some(Duration::from_millis(15)),
                    ..Default::default()
                },
            )
        })
    };
    let start = Instant::now();
    while !vm.stats().unwrap().live_snapshot && !t.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut seen_blocked = false;
    while !t.is_finished() && start.elapsed() < Duration::from_secs(60) {
        vm.kick(None).unwrap();
        let s = vm.stats().unwrap();
        seen_blocked |= s.blocked_faults > 0;
        let p = vm.pause().unwrap();
        seen_blocked |= p
            .vcpus
            .iter()
            .any(|v| format!("{v:?}").contains("BlockedInFault"));
        // A second snapshot is refused while this one runs.
        if let Err(e) = vm.snapshot(&dir.join("other"), AfterSnapshot::Restore) {
            assert!(e.to_string().contains("live snapshot is being written"), "{e}");
        } else {
            assert!(t.is_finished(), "a snapshot was taken during the live one");
        }
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = t.join().unwrap().unwrap();
    assert!(
        info.wp.retries > 0 || seen_blocked,
        "no write waited for the saver: {info:?}"
    );
    finish(vm, &cfg, &console);
    restore_and_finish(&snap, &RestoreOptions::default());

    // Stop during a live snapshot: abandoned, nothing written, the run ends.
    let (vm, _cfg, _console) = touch_vm(12000);
    let handle = vm.handle();
    let snap2 = dir.join("snap2");
    let t = {
        let snap2 = snap2.clone();
        std::thread::spawn(move || {
            handle.snapshot_live(
                &snap2,
                &LiveOptions {
                    pace: Some(Duration::from_millis(50)),
                    ..Default::default()
                },
            )
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    vm.stop();
    let e = t.join().unwrap().unwrap_err();
    assert!(
        e.to_string().contains("abandoned") || e.to_string().contains("ended"),
        "{e}"
    );
    assert_eq!(vm.wait().unwrap().end, GuestEnd::Stopped);
    assert!(!snap2.exists(), "an abandoned live snapshot leaves nothing");
}

/// Takes a live snapshot of `vm` with a reference written inside its pause,
/// and checks that the two hold the same memory.
fn live_with_reference(vm: &RunningVm, live: &Path, reference: &Path) -> LiveInfo {
    let info: LiveInfo = vm
        .snapshot_live(
            live,
            &LiveOptions {
                reference: Some(reference.to_owned()),
                pace: Some(Duration::from_millis(2)),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(info.memory_bytes > 0 && info.wp.protected > 0, "{info:?}");
    same_memory(live, reference);
    info
}

#[test]
fn live_snapshots_of_lazily_served_memory_fetch_it_first_and_restore() {
    let dir = TempDir::new("lazy");
    // 1. Demand-zero memory through the retry core (--mem-backend zero).
    let mut cfg = config(2, "256M", "workload=touch pages=12000 pattern=rand");
    cfg.memory = vmm::config::MemoryConfig::lazy(vmm::config::MemBackend::Zero);
    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 1 start");
    std::thread::sleep(Duration::from_millis(30));
    // A stop-the-world snapshot first (restored lazily below).
    vm.snapshot(&dir.join("stw"), AfterSnapshot::Restore).unwrap();
    let info = live_with_reference(&vm, &dir.join("live0"), &dir.join("ref0"));
    assert!(
        info.released.is_some(),
        "lazily served memory was not released: {info:?}"
    );
    // The memory is plain anonymous now: a second live snapshot needs no
    // release. It replaces a snapshot (its saver checks the directory's owner).
    vm.snapshot(&dir.join("live1"), AfterSnapshot::Restore).unwrap();
    let again = live_with_reference(&vm, &dir.join("live1"), &dir.join("ref1"));
    assert!(again.released.is_none(), "{again:?}");
    finish(vm, &cfg, &console);

    // 2. A lazy restore (a file source with data ranges), nothing prefetched:
    // the pages the guest did not touch yet are fetched before the pause.
    let (options, console) = capture_options();
    let restored = Vm::restore(
        &dir.join("stw"),
        &RestoreOptions {
            lazy: true,
            ..Default::default()
        },
        options,
    )
    .unwrap();
    let rcfg = restored.config().clone();
    let restored = restored.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let info = live_with_reference(&restored, &dir.join("live2"), &dir.join("ref2"));
    let released = info.released.unwrap();
    assert!(released.fetched > 0, "no page was left to fetch: {info:?}");
    finish(restored, &rcfg, &console);

    // Both kinds of live snapshot restore and finish right.
    restore_and_finish(&dir.join("live2"), &RestoreOptions::default());
    restore_and_finish(
        &dir.join("live0"),
        &RestoreOptions {
            lazy: true,
            ..Default::default()
        },
    );
}

#[test]
fn live_snapshots_refuse_lazy_memory_they_cannot_protect_and_leave_it_served() {
    let dir = TempDir::new("refuse");
    let mut cfg = config(1, "64M", "workload=touch pages=3000 pattern=rand");
    cfg.memory = vmm::config::MemoryConfig {
        backing: vmm::config::MemBacking::Memfd,
        ..vmm::config::MemoryConfig::lazy(vmm::config::MemBackend::Zero)
    };
    let (options, console) = capture_options();
    let vm = Vm::new(&cfg, options).unwrap().start().unwrap();
    wait_for(&console, "touch: cpu 0 start");
    let e = vm
        .snapshot_live(&dir.join("snap"), &LiveOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("memfd"), "{e}");
    assert!(!dir.join("snap").exists());
    // Refused before anything changed: it runs on and finishes right.
    finish(vm, &cfg, &console);
}
