//! Working sets on real KVM: a `faas` guest is snapshotted at its
//! checkpoint, a lazy restore records the pages its invocation makes
//! present, and the next restores prefetch them (before the vCPUs resume and
//! while they run) and then fault (almost) nothing, with the right
//! checksums; corrupted, foreign and unbound working-set files are refused.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use vmm::controller::verify_reports;
use vmm::snapshot::working_set::{WorkingSet, WorkingSetError, WsPage, WORKING_SET};
use vmm::snapshot::Hasher;
use vmm::{GuestEnd, RestoreOptions, RunOutcome, Vm, VmConfig, VmError};
use vmm_tests::{capture_options, config};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmm-ws-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CMDLINE: &str = "workload=faas pages=2048 pattern=zipf:990 invoke=300 seed=5 populate=1";

/// Boots the faas guest and snapshots it at its checkpoint into `dir`.
fn snapshot_at_checkpoint(dir: &Path) -> VmConfig {
    let cfg = config(1, "64M", CMDLINE);
    let (mut options, _console) = capture_options();
    options.snapshot_at_checkpoint = Some(dir.to_owned());
    let out = Vm::new(&cfg, options).unwrap().run().unwrap();
    assert_eq!(out.end, GuestEnd::Stopped, "{:?}", out.checkpoint);
    assert!(matches!(out.checkpoint, Some(Ok(_))), "{:?}", out.checkpoint);
    assert!(out.reports.is_empty(), "the invocation must not have run yet");
    cfg
}

fn restore(dir: &Path, how: &RestoreOptions) -> Result<RunOutcome, VmError> {
    let (options, console) = capture_options();
    let vm = Vm::restore(dir, how, options)?;
    let cfg = vm.config().clone();
    let out = vm.run()?;
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert_eq!(out.end, GuestEnd::Exited(0), "console:\n{text}");
    let sum = verify_reports(&cfg, &out);
    assert!(matches!(sum, Ok(Some(_))), "{sum:?}, console:\n{text}");
    Ok(out)
}

fn lazy(prefetch: Option<bool>, record: bool) -> RestoreOptions {
    RestoreOptions {
        lazy: true,
        prefetch_working_set: prefetch,
        record_working_set: record,
        ..RestoreOptions::default()
    }
}

#[test]
fn a_recorded_working_set_is_prefetched_and_the_restore_then_barely_faults() {
    let dir = TempDir::new("record");
    snapshot_at_checkpoint(&dir.0);
    let on_demand = restore(&dir.0, &lazy(None, true)).unwrap();
    let faults = on_demand.memory.as_ref().unwrap().total.faults;
    let summary = on_demand.working_set.clone().unwrap().unwrap();
    assert_eq!(summary.path, dir.0.join(WORKING_SET));
    let ws = WorkingSet::load(
        &summary.path,
        &Hasher::new(None),
        Some(&vmm::snapshot::read_manifest(&dir.0).unwrap().digest),
        64 << 20,
    )
    .unwrap();
    // Every page made present is in it, neighbours marked, each once.
    let filled = on_demand.memory.as_ref().unwrap().total.clone();
    assert_eq!(ws.pages.len() as u64, filled.pages_copied + filled.pages_zeroed);
    assert_eq!(
        ws.pages.iter().filter(|p| p.around).count() as u64,
        filled.fault_around_pages
    );
    assert!(
        ws.pages.windows(2).all(|w| w[0].t_us <= w[1].t_us),
        "first-touch order"
    );
    assert!(faults > 20, "the on-demand restore must fault ({faults})");
    assert!(
        ws.chunk_hashes.is_some(),
        "a snapshot's recording holds the pages' contents"
    );

    // Recorded again without fault-around, the exact set the invocation
    // touches (as `vmm bench working-set` records it): a recording with
    // fault-around holds every neighbour of every fault (here 7x the
    // pages touched), which a prefetch while the guest runs fills in vain.
    let exact = RestoreOptions {
        fault_around: Some(0),
        ..lazy(None, true)
    };
    let on_demand = restore(&dir.0, &exact).unwrap();
    let faults = on_demand.memory.as_ref().unwrap().total.faults;
    let recorded = on_demand.working_set.clone().unwrap().unwrap();
    assert_eq!((recorded.around, recorded.pages), (0, faults), "{recorded:?}");

    for before in [true, false] {
        let out = restore(&dir.0, &lazy(Some(before), false)).unwrap();
        let m = out.memory.unwrap();
        let pre = m.working_set_prefetch.unwrap();
        // The same invocation touches the same pages: (almost) everything
        // was there before it asked. While running, the guest may overtake
        // the prefetch on a few pages.
        // Each run fills at least one page (of an exact recording, runs
        // are short: the guest's pages are scattered).
        assert!(pre.pages > 0 && pre.runs > 0 && pre.runs <= pre.pages, "{pre:?}");
        // From the recorded contents, none from the snapshot.
        assert_eq!((pre.from_contents, pre.bad_chunks), (pre.pages, 0), "{pre:?}");
        let limit = if before { 2 } else { faults / 2 };
        assert!(
            m.total.faults <= limit,
            "before={before}: {} faults after prefetching {} pages (on demand: {faults}): {pre:?}",
            m.total.faults,
            pre.pages
        );
    }
}

#[test]
fn corrupted_foreign_unbound_and_missing_working_sets_are_refused() {
    let dir = TempDir::new("refuse");
    snapshot_at_checkpoint(&dir.0);
    let path = dir.0.join(WORKING_SET);
    let e = restore(&dir.0, &lazy(Some(true), false)).unwrap_err();
    assert!(
        matches!(e, VmError::WorkingSet(WorkingSetError::Missing(_))),
        "{e}"
    );
    restore(&dir.0, &lazy(None, true)).unwrap();
    let good = std::fs::read(&path).unwrap();

    // A flipped bit in an entry: the whole file is refused.
    let mut bad = good.clone();
    bad[100] ^= 0x10;
    std::fs::write(&path, &bad).unwrap();
    let e = restore(&dir.0, &lazy(Some(true), false)).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");

    // A flipped bit in the recorded contents: that chunk is not used, its
    // pages come from the snapshot (checked there), the checksums hold.
    let mut bad = good.clone();
    let last = bad.len() - 100;
    bad[last] ^= 0x10;
    std::fs::write(&path, &bad).unwrap();
    let out = restore(&dir.0, &lazy(Some(true), false)).unwrap();
    let pre = out.memory.unwrap().working_set_prefetch.unwrap();
    assert_eq!(pre.bad_chunks, 1, "{pre:?}");
    assert!(pre.from_contents > 0 && pre.from_contents < pre.pages, "{pre:?}");

    // Another snapshot's recording (the digest it is bound to differs).
    let foreign = WorkingSet {
        digest: [0x5a; 32],
        window_us: 1,
        pages: vec![WsPage {
            gpa: 0x100000,
            t_us: 0,
            around: false,
        }],
        chunk_hashes: None,
    };
    foreign.write(&path, &Hasher::new(None)).unwrap();
    let e = restore(&dir.0, &lazy(Some(false), false)).unwrap_err();
    assert!(e.to_string().contains("belongs to another snapshot"), "{e}");

    // A plain run's recording is bound to no snapshot.
    WorkingSet {
        digest: [0; 32],
        ..foreign
    }
    .write(&path, &Hasher::new(None))
    .unwrap();
    let e = restore(&dir.0, &lazy(Some(true), false)).unwrap_err();
    assert!(e.to_string().contains("a `vmm run` recording"), "{e}");

    // Put back, it works again.
    std::fs::write(&path, &good).unwrap();
    restore(&dir.0, &lazy(Some(true), false)).unwrap();
}

#[test]
fn a_plain_run_records_where_told_and_the_window_can_end_early() {
    let dir = TempDir::new("run");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("ws");
    let mut cfg = config(1, "64M", "workload=touch pages=500 pattern=rand");
    cfg.memory.backend = vmm::config::MemBackend::Zero;
    let (mut options, _c) = capture_options();
    options.record_working_set = Some(file.clone());
    let out = Vm::new(&cfg, options).unwrap().run().unwrap();
    assert_eq!(out.end, GuestEnd::Exited(0));
    let s = out.working_set.unwrap().unwrap();
    let ws = WorkingSet::load(&file, &Hasher::new(None), None, 64 << 20).unwrap();
    assert_eq!(ws.pages.len() as u64, s.pages);
    assert!(s.pages >= 500, "{s:?}");

    // Recording a restore: one recorder at a time; the window ends on request.
    let snap = TempDir::new("run-snap");
    snapshot_at_checkpoint(&snap.0);
    let (options, _c) = capture_options();
    let vm = Vm::restore(&snap.0, &lazy(None, true), options).unwrap();
    let (options2, _c2) = capture_options();
    let e = Vm::restore(&snap.0, &lazy(None, true), options2).unwrap_err();
    assert!(
        e.to_string()
            .contains("another restore of this snapshot is recording"),
        "{e}"
    );
    let running = vm.start().unwrap();
    let early = running.working_set_end().unwrap();
    let out = running.wait().unwrap();
    assert_eq!(
        out.working_set.unwrap().unwrap(),
        early,
        "the file is written once"
    );
    let all = out.memory.unwrap().total;
    assert!(
        early.pages < all.pages_copied + all.pages_zeroed,
        "{early:?} {all:?}"
    );
}
