//! The source up to post-copy, on the `migration-out` thread while the VM
//! runs: both connections open (authenticated), then optional pre-copy
//! rounds of copying pages with dirty logging (KVM's log of guest writes
//! plus vm-memory's bitmaps of the VMM's own, devices included), then the
//! switchover (the caller pauses the VM and captures its state), after which
//! only the pages written since the last round (or, without pre-copy, every
//! data page) go by post-copy.

use super::outgoing::DirtyTracking;
use super::outgoing::{
    extents_of, open_both, spawn_out, MigrateOptions, Outgoing, Resumable, SourceSummary, Stopped,
};
use super::push_order::{push_order, PageHistory, PushOrder, RECENCY_SAMPLE};
use super::transport::{Conn, Endpoint};
use super::wire::{encode, Message, PAGE, PAGE64};
use super::{io, MigrationError};
use crate::state::SavedVm;
use devices::GuestRam;
use kvm_ioctls::VmFd;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::memory::dirty_wp::{AnyDirtyTracker, WpDirtyError, WpDirtyTracker};
use vmm_core::memory::pages::Pagemap;
use vmm_core::memory::{DirtyError, DirtyTracker, Materializer};

/// Pauses the VM and captures its state, on the controller, at the switchover.
pub type Switchover = Box<dyn FnOnce() -> Result<(SavedVm, Instant), MigrationError> + Send>;

/// What an outgoing migration needs from the source VM.
pub struct PrecopyCtx {
    /// The VM (its memory slots get dirty logging).
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM.
    pub mem: GuestRam,
    /// The guest's RAM size.
    pub mem_size: u64,
    /// Fetches lazily backed memory in full first (pages the guest never
    /// wrote would otherwise be missing from the copy).
    pub materializer: Option<Materializer>,
    /// Set when the VM's own (incoming) migration source is lost: its
    /// memory cannot be fetched in full then.
    pub stop: Arc<AtomicBool>,
    /// Pauses the VM and captures its state (on the controller).
    pub switchover: Switchover,
    /// This process's page map, opened by the caller: the pre-copy thread's
    /// sandbox opens no file.
    pub pagemap: Pagemap,
    /// The uffd-WP dirty tracker (`--dirty-tracking uffd-wp` with pre-copy
    /// rounds, plain anonymous RAM), started by the caller: the pre-copy
    /// thread's sandbox may not register memory with a userfaultfd.
    pub wp_tracker: Option<Result<WpDirtyTracker, DirtyError>>,
}

impl std::fmt::Debug for PrecopyCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopyCtx")
            .field("mem_size", &self.mem_size)
            .finish_non_exhaustive()
    }
}

/// Connections, pre-copy rounds (if `options` asks for some), switchover,
/// then post-copy, on a new thread (the VM runs until the switchover);
/// `on_end` as for [`Outgoing::spawn`]. A failure before the switchover
/// leaves the VM as it was.
pub fn spawn_precopy(
    to: Endpoint,
    options: MigrateOptions,
    ctx: PrecopyCtx,
    on_end: impl FnOnce(Result<SourceSummary, Box<Stopped>>) + Send + 'static,
) -> Result<(), MigrationError> {
    spawn_out(
        move || precopy(&to, &options, ctx).and_then(Outgoing::serve),
        on_end,
    )
}

fn precopy(to: &Endpoint, options: &MigrateOptions, mut ctx: PrecopyCtx) -> Result<Outgoing, Box<Stopped>> {
    let start = Instant::now();
    let early = |error: MigrationError| {
        Box::new(Stopped {
            error,
            resumable: None,
        })
    };
    let (conn, answers) = open_both(to, &options.security).map_err(early)?;
    let connect_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut history = PageHistory::default();
    if options.precopy_rounds == 0 {
        if options.push_order == PushOrder::Recency {
            // No pre-copy log: sample the guest's writes for a moment.
            let mut t =
                DirtyTracker::start(ctx.vm_fd.clone(), ctx.mem.clone()).map_err(|e| early(e.into()))?;
            std::thread::sleep(RECENCY_SAMPLE);
            let dirty = t.take().map_err(|e| early(e.into()))?;
            if let Err(e) = t.stop() {
                tracing::warn!("{e}");
            }
            history.note(1, &dirty);
        }
        // Post-copy only: every data page goes after the switchover.
        let (state, paused_at) = (ctx.switchover)().map_err(early)?;
        let stopped = |error| {
            Box::new(Stopped {
                error,
                resumable: None,
            })
        };
        // The VM is paused: its memory does not change.
        let extents = crate::snapshot::memory::data_extents_in(&ctx.pagemap, &ctx.mem)
            .map_err(|e| stopped(e.into()))?;
        let resumable = Resumable {
            extents: extents.clone(),
            paused_at,
            resumed_at: None,
        };
        return Outgoing::postcopy(
            conn,
            answers,
            12,
            &state,
            extents,
            ctx.mem,
            paused_at,
            options.push_delay,
            SourceSummary {
                connect_ms,
                ..Default::default()
            },
        )
        .map(|mut out| {
            out.reorder(|pages| push_order(pages, options.push_order, &history));
            out
        })
        .map_err(|error| {
            Box::new(Stopped {
                error,
                resumable: Some(resumable),
            })
        });
    }
    if let Some(m) = &ctx.materializer {
        m.run(&ctx.stop, &AtomicU64::new(0))
            .map_err(|e| early(e.into()))?;
        if ctx.stop.load(Ordering::Acquire) {
            return Err(early(MigrationError::SourceLost));
        }
    }
    let mut w = BufWriter::with_capacity(64 << 10, conn.try_clone().map_err(early)?);
    let mut summary = SourceSummary {
        connect_ms,
        ..Default::default()
    };
    let mut bytes = 12 + 13;
    encode(
        &mut w,
        &Message::PrecopyBegin {
            mem_size: ctx.mem_size,
        },
    )
    .map_err(|e| early(io("starting pre-copy")(e)))?;
    // Logging starts before the first copy: a page written while (or after)
    // it is copied is copied again.
    let tracker = match options.dirty_tracking {
        DirtyTracking::Kvm => AnyDirtyTracker::Kvm(
            DirtyTracker::start(ctx.vm_fd.clone(), ctx.mem.clone()).map_err(|e| early(e.into()))?,
        ),
        DirtyTracking::UffdWp if ctx.materializer.is_some() => {
            return Err(early(
                DirtyError::from(WpDirtyError::Uffd(::memory::UffdError::Range {
                    op: "UFFDIO_REGISTER",
                    start: 0,
                    len: ctx.mem_size,
                    source: std::io::Error::from_raw_os_error(libc::EBUSY),
                }))
                .into(),
            ))
        }
        DirtyTracking::UffdWp => match ctx.wp_tracker.take() {
            Some(t) => AnyDirtyTracker::UffdWp(t.map_err(|e| early(e.into()))?),
            None => {
                return Err(early(
                    DirtyError::from(WpDirtyError::Unavailable(
                        "the tracker was not started before the pre-copy".into(),
                    ))
                    .into(),
                ))
            }
        },
    };
    let mut buf = vec![0u8; PAGE];
    // Volatile copies: the guest may be writing the page (it is then in the
    // next round's log). A rewritten page goes even if now zero: the
    // destination may hold an older copy.
    let mut send = |w: &mut BufWriter<Conn>, gpa: u64, summary: &mut SourceSummary, skip_zero: bool| {
        ctx.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|source| MigrationError::ReadMemory { gpa, source })?;
        if skip_zero && buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        encode(
            w,
            &Message::PrecopyPage {
                gpa,
                data: buf.clone(),
            },
        )
        .map_err(io("sending a page"))?;
        summary.precopy_pages += 1;
        Ok::<_, MigrationError>(())
    };
    // Round 1: every page that exists and holds data.
    let existing = vmm_core::memory::pages::existing_guest_pages_in(&ctx.pagemap, &ctx.mem)
        .map_err(|e| early(io("reading the page map")(e)))?;
    for gpa in existing {
        send(&mut w, gpa, &mut summary, true).map_err(early)?;
    }
    summary.precopy_rounds = 1;
    // Later rounds: what the guest wrote meanwhile.
    while summary.precopy_rounds < options.precopy_rounds {
        let dirty = tracker.take().map_err(|e| early(e.into()))?;
        summary.precopy_dirty.push(dirty.len() as u64);
        summary.precopy_rounds += 1;
        history.note(summary.precopy_rounds, &dirty);
        for &gpa in &dirty {
            send(&mut w, gpa, &mut summary, false).map_err(early)?;
        }
        if dirty.is_empty() {
            break;
        }
    }
    w.flush().map_err(|e| early(io("sending pages")(e)))?;
    drop(w);
    bytes += summary.precopy_pages * (5 + 8 + PAGE64);
    summary.precopy_ms = start.elapsed().as_secs_f64() * 1e3;
    let (state, paused_at) = (ctx.switchover)().map_err(early)?;
    // The VM is paused: what it wrote since the last round is the post-copy set.
    let mut tracker = tracker;
    let dirty = tracker.take().map_err(|e| early(e.into()))?;
    if let Err(e) = tracker.stop() {
        tracing::warn!("{e}");
    }
    summary.precopy_dirty.push(dirty.len() as u64);
    let extents = extents_of(&dirty);
    let resumable = Resumable {
        extents: extents.clone(),
        paused_at,
        resumed_at: None,
    };
    Outgoing::postcopy(
        conn,
        answers,
        bytes,
        &state,
        extents,
        ctx.mem,
        paused_at,
        options.push_delay,
        summary,
    )
    .map(|mut out| {
        out.reorder(|pages| push_order(pages, options.push_order, &history));
        out
    })
    .map_err(|error| {
        Box::new(Stopped {
            error,
            resumable: Some(resumable),
        })
    })
}
