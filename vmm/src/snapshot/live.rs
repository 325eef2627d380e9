//! Live snapshots: the saver. The controller pauses the VM, captures its
//! state and starts write-protecting guest RAM ([`vmm_core::memory::WpSession`]),
//! resumes it, and this module writes the memory file in the background in
//! one pass, in guest-physical order, one 1 MiB window at a time: each
//! window's content at the snapshot instant comes from the WP seam
//! ([`WpSession::save_range`]: pages a guest write already saved into the
//! fault buffer, the others read from still-protected memory, zero for pages
//! not present at the pause), then its protection is removed. Extents,
//! layout and block hashes are computed exactly as a stop-the-world snapshot
//! computes them, so the two are identical in content (same format 4).
//!
//! Before the first live snapshot the KVM probe ([`check_kvm`]) checks
//! that guest writes through KVM's mapping honour userfaultfd write
//! protection on this host; if they do not, `--live` is refused.

use super::format::{Extent, Hasher, Manifest, SnapshotKey};
use super::memory::{create_file, MemoryLayout, HASH_BLOCK_LEN};
use super::write::write_snapshot_with;
use super::{io_err, SnapshotError, EXTENT_MAX};
use crate::state::SavedVm;
use abi::layout::{PAGE_LEN as PAGE, PAGE_SIZE};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use vmm_core::memory::WpSession;

/// Pages of the fault buffer: guest writes to unsaved pages ahead of the
/// saver (16 MiB; a fault finding it full waits for the saver).
pub const BUFFER_PAGES: usize = 4096;

/// Why this host cannot take live snapshots.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LiveUnsupported {
    /// The probe failed to run.
    #[error("cannot check whether this KVM honours userfaultfd write protection ({0}); live snapshots are refused: take a stop-the-world snapshot (without --live)")]
    Probe(String),
    /// KVM let guest writes through.
    #[error("this KVM does not honour userfaultfd write protection for guest writes ({0}); a live snapshot could be inconsistent and is refused: take a stop-the-world snapshot (without --live)")]
    Bypassed(String),
}

/// The probe's answer, once it ran.
static PROBE: OnceLock<Result<(), LiveUnsupported>> = OnceLock::new();
/// A probe was started (here or on its own thread).
static PROBE_STARTED: AtomicBool = AtomicBool::new(false);

/// Whether the probe ran or runs already.
pub fn probe_started() -> bool {
    PROBE_STARTED.load(Ordering::Acquire)
}

/// Starts the probe on a thread of its own (unsandboxed: call it from an
/// unsandboxed thread), so that a migration destination does not wait ~40
/// ms for it while the source heads for its pause; a later
/// [`check_kvm`] waits for its answer.
pub fn check_kvm_in_background() {
    if PROBE_STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new().name("kvm-probe".into()).spawn(|| {
        let _ = check_kvm();
    });
    if let Err(e) = spawned {
        // Then the first live snapshot runs it (or, sandboxed, is refused).
        tracing::debug!("cannot start the write-protect probe's thread: {e}");
    }
}

/// Runs the KVM write-protect probe once per process (256 guest writes on
/// the minimal VM, ~40 ms of emulated guest code on PVM) and answers from
/// then on.
pub fn check_kvm() -> Result<(), LiveUnsupported> {
    PROBE_STARTED.store(true, Ordering::Release);
    PROBE
        .get_or_init(|| match vmm_core::arch::x86_64::minimal_vm::wp_probe(256) {
            Ok(p) if p.honoured() => Ok(()),
            Ok(p) => Err(LiveUnsupported::Bypassed(format!(
                "{} of {} protected guest writes raised a WP fault, {} went through first, {} lost",
                p.wp_faults, p.pages, p.bypassed, p.lost
            ))),
            Err(e) => Err(LiveUnsupported::Probe(e.to_string())),
        })
        .clone()
}

/// The 1 MiB windows (start, len) holding the ranges present at the pause,
/// inside the RAM regions of `layout`, ascending.
fn windows(present: &[(u64, u64)], layout: &MemoryLayout) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(gpa, len) in present {
        let mut w = gpa & !(EXTENT_MAX - 1);
        while w < gpa + len {
            if out.last().is_none_or(|&(s, _)| s < w) {
                if let Some(r) = layout.regions.iter().find(|r| w >= r.gpa && w < r.gpa + r.len) {
                    let start = w.max(r.gpa);
                    let end = (w + EXTENT_MAX).min(r.gpa + r.len);
                    out.push((start, end - start));
                }
            }
            w += EXTENT_MAX;
        }
    }
    out
}

/// Writes the memory file of a live snapshot (see the module documentation).
fn write_live_memory(
    path: &Path,
    session: &WpSession,
    layout: &MemoryLayout,
    h: &Hasher,
    abort: &AtomicBool,
    pace: Option<Duration>,
) -> Result<(Vec<Extent>, Vec<u8>), SnapshotError> {
    let file = create_file(path)?;
    file.set_len(layout.file_len())
        .map_err(io_err(path, "sizing the memory file"))?;
    let mut extents: Vec<Extent> = Vec::new();
    let mut hashes = Vec::new();
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for (w, wlen) in windows(session.present(), layout) {
        if abort.load(Ordering::Acquire) {
            return Err(SnapshotError::LiveAborted("the VM stopped".into()));
        }
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
        let n = usize::try_from(wlen).unwrap_or(0);
        let data = &mut buf[..n];
        session.save_range(w, data).map_err(|e| {
            let reason = e.to_string();
            session.fail(reason.clone());
            SnapshotError::LiveSave { gpa: w, reason }
        })?;
        let nonzero: Vec<bool> = data
            .chunks_exact(PAGE)
            .map(|p| p.iter().any(|&b| b != 0))
            .collect();
        let first_extent = extents.len();
        for (i, _) in nonzero.iter().enumerate().filter(|(_, nz)| **nz) {
            let gpa = w + (i * PAGE) as u64;
            match extents.last_mut() {
                Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += PAGE_SIZE,
                _ => extents.push(Extent { gpa, len: PAGE_SIZE }),
            }
        }
        // Windows start at a multiple of EXTENT_MAX: their extents are new.
        for e in &extents[first_extent..] {
            let at = layout.file_offset(e.gpa, e.len).ok_or_else(|| {
                io_err(path, "placing an extent in the memory file")(std::io::Error::other(format!(
                    "extent {:#x}+{:#x} lies outside guest RAM",
                    e.gpa, e.len
                )))
            })?;
            let off = usize::try_from(e.gpa - w).unwrap_or(0);
            let len = usize::try_from(e.len).unwrap_or(0);
            file.write_all_at(&data[off..off + len], at)
                .map_err(io_err(path, "writing the memory file"))?;
        }
        // Hash blocks are 16 KiB aligned; windows start at a 1 MiB boundary
        // (or a region's start, which is one too).
        let per_block = HASH_BLOCK_LEN / PAGE;
        for (b, block) in data.chunks(HASH_BLOCK_LEN).enumerate() {
            if nonzero[b * per_block..((b + 1) * per_block).min(nonzero.len())]
                .iter()
                .any(|&nz| nz)
            {
                if block.len() == HASH_BLOCK_LEN {
                    hashes.extend_from_slice(&h.hash(block));
                } else {
                    let mut full = vec![0u8; HASH_BLOCK_LEN];
                    full[..block.len()].copy_from_slice(block);
                    hashes.extend_from_slice(&h.hash(&full));
                }
            }
        }
    }
    file.sync_all().map_err(io_err(path, "syncing the memory file"))?;
    Ok((extents, hashes))
}

/// Writes a live snapshot of `state` and the memory `session` protects to
/// `dir`, like [`super::write_snapshot`]. `abort` stops it between windows.
pub fn write_live(
    dir: &Path,
    state: &SavedVm,
    session: &WpSession,
    key: Option<&SnapshotKey>,
    abort: &AtomicBool,
    pace: Option<Duration>,
) -> Result<Manifest, SnapshotError> {
    write_snapshot_with(
        dir,
        state,
        key,
        Box::new(|path, layout, h| write_live_memory(path, session, layout, h, abort, pace)),
    )
}
