//! The source up to post-copy, on the `migration-out` thread while the VM
//! runs: both connections open (authenticated), then optional pre-copy
//! rounds of copying pages with dirty logging (KVM's log of guest writes
//! plus vm-memory's bitmaps of the VMM's own, devices included), then the
//! switchover (the caller pauses the VM and captures its state), after which
//! only the pages written since the last round (or, without pre-copy, every
//! data page) go by post-copy.

use super::outgoing::DirtyTracking;
use super::outgoing::{
    extents_of, open_both, spawn_out, union_extents, Downtime, MigrateOptions, Outgoing, Resumable,
    SourceSummary, Stopped,
};
use super::push_order::{push_order, PageHistory, PushOrder, RECENCY_SAMPLE};
use super::status::{Phase, SourceStatus};
use super::transport::{Conn, Endpoint};
use super::wire::{decode, encode, is_zero, Message, PAGE, PAGE64};
use super::{io, MigrationError};
use crate::state::SavedVm;
use devices::GuestRam;
use kvm_ioctls::VmFd;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::memory::dirty_wp::{AnyDirtyTracker, WpDirtyError, WpDirtyTracker};
use vmm_core::memory::pages::Pagemap;
use vmm_core::memory::{DirtyError, DirtyTracker, Materializer};

/// The VM as the switchover left it: paused, its state captured.
#[derive(Debug)]
pub struct Paused {
    /// The captured state.
    pub state: SavedVm,
    /// When the pause began.
    pub paused_at: Instant,
    /// The same on the wall clock ([`super::unix_us`]).
    pub paused_unix_us: u64,
    /// Asking the vCPUs to stop until every one had stopped.
    pub pause_ms: f64,
    /// Capturing the state (devices paused, KVM and device state saved).
    pub capture_ms: f64,
}

/// Pauses the VM and captures its state, on the controller, at the switchover.
pub type Switchover = Box<dyn FnOnce() -> Result<Paused, MigrationError> + Send>;

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
    /// The VM's configuration (a `ConfigState` as JSON): `Setup`, sent
    /// first, so that the destination builds its VM before the pause.
    pub setup: Vec<u8>,
    /// Where the migration stands (`vmm ctl SRC migration`).
    pub status: Arc<SourceStatus>,
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
    let status = ctx.status.clone();
    status.set_phase(Phase::Setup);
    let (conn, answers) = open_both(to, &options.security).map_err(early)?;
    let connect_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut w = BufWriter::with_capacity(64 << 10, conn.try_clone().map_err(early)?);
    // First: the destination builds its VM (KVM objects, memory, devices)
    // while this one runs on.
    encode(&mut w, &Message::Setup(ctx.setup.clone())).map_err(|e| early(io("sending the setup")(e)))?;
    w.flush().map_err(|e| early(io("sending the setup")(e)))?;
    let mut bytes = 12 + 5 + ctx.setup.len() as u64;
    // Lazily backed memory is fetched in full while the VM runs: nothing is
    // fetched inside the pause.
    if let Some(m) = &ctx.materializer {
        m.run(&ctx.stop, &AtomicU64::new(0))
            .map_err(|e| early(e.into()))?;
        if ctx.stop.load(Ordering::Acquire) {
            return Err(early(MigrationError::SourceLost));
        }
    }
    let mut summary = SourceSummary {
        connect_ms,
        ..Default::default()
    };
    // Logging starts before the scan: a page written while (or after) it is
    // scanned or copied is in the next log. uffd-WP tracks pre-copy rounds
    // (`--dirty-tracking uffd-wp`); KVM's log otherwise, and for the pages
    // written between the scan and the pause of a migration without rounds.
    let rounds = options.precopy_rounds > 0;
    let tracker = match options.dirty_tracking {
        DirtyTracking::UffdWp if rounds && ctx.materializer.is_some() => {
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
        DirtyTracking::UffdWp if rounds => match ctx.wp_tracker.take() {
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
        _ => AnyDirtyTracker::Kvm(
            DirtyTracker::start(ctx.vm_fd.clone(), ctx.mem.clone()).map_err(|e| early(e.into()))?,
        ),
    };
    // Every page that exists, found while the VM runs; the log keeps the
    // set current until the pause. Zero pages are told apart at the push.
    let scanned = vmm_core::memory::pages::existing_guest_pages_in(&ctx.pagemap, &ctx.mem)
        .map_err(|e| early(io("reading the page map")(e)))?;
    let postcopy_from_scan = options.precopy_rounds == 0;
    // Listed now, while the VM runs: at the pause only the log's pages are
    // added (a merge of every page was 1.5 ms of a 4 GiB guest's downtime).
    let scanned_extents = if postcopy_from_scan {
        extents_of(&scanned)
    } else {
        Vec::new()
    };
    // What the push order by recency goes by: the rounds' dirty logs.
    let mut history = PageHistory::default();
    if postcopy_from_scan && options.push_order == PushOrder::Recency {
        // No pre-copy log: the log since the scan, read at the pause, is
        // the sample; let the guest write for a moment first.
        std::thread::sleep(RECENCY_SAMPLE);
    }
    if !postcopy_from_scan {
        status.set_phase(Phase::Precopy(1));
        encode(
            &mut w,
            &Message::PrecopyBegin {
                mem_size: ctx.mem_size,
            },
        )
        .map_err(|e| early(io("starting pre-copy")(e)))?;
        bytes += 13;
        let mut buf = vec![0u8; PAGE];
        // Volatile copies: the guest may be writing the page (it is then in the
        // next round's log). A rewritten page goes even if now zero: the
        // destination may hold an older copy.
        let mut send = |w: &mut BufWriter<Conn>, gpa: u64, summary: &mut SourceSummary, skip_zero: bool| {
            ctx.mem
                .read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|source| MigrationError::ReadMemory { gpa, source })?;
            if skip_zero && is_zero(&buf) {
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
            status.precopy_sent(1);
            Ok::<_, MigrationError>(())
        };
        // Round 1: every page that exists and holds data.
        let before = summary.precopy_pages;
        for &gpa in &scanned {
            send(&mut w, gpa, &mut summary, true).map_err(early)?;
        }
        summary.precopy_round_pages.push(summary.precopy_pages - before);
        summary.precopy_rounds = 1;
        // Later rounds: what the guest wrote meanwhile.
        while summary.precopy_rounds < options.precopy_rounds {
            let dirty = tracker.take().map_err(|e| early(e.into()))?;
            summary.precopy_dirty.push(dirty.len() as u64);
            summary.precopy_rounds += 1;
            status.set_phase(Phase::Precopy(summary.precopy_rounds));
            history.note(summary.precopy_rounds, &dirty);
            for &gpa in &dirty {
                send(&mut w, gpa, &mut summary, false).map_err(early)?;
            }
            summary.precopy_round_pages.push(dirty.len() as u64);
            if dirty.is_empty() {
                break;
            }
        }
        bytes += summary.precopy_pages * (5 + 8 + PAGE64);
    }
    w.flush().map_err(|e| early(io("sending pages")(e)))?;
    drop(w);
    summary.precopy_ms = start.elapsed().as_secs_f64() * 1e3;
    summary.ready_wait_ms = wait_ready(&conn).map_err(early)?;
    status.set_phase(Phase::Switchover);
    let paused = (ctx.switchover)().map_err(early)?;
    let listed = Instant::now();
    // The VM is paused: what it wrote since the scan (or the last round)
    // completes the post-copy set.
    let dirty = tracker.take().map_err(|e| early(e.into()))?;
    summary.precopy_dirty.push(dirty.len() as u64);
    let extents = if postcopy_from_scan {
        if options.push_order == PushOrder::Recency {
            history.note(1, &dirty);
        }
        union_extents(&scanned_extents, &dirty)
    } else {
        extents_of(&dirty)
    };
    let resumable = Resumable {
        extents: extents.clone(),
        paused_at: paused.paused_at,
        resumed_at: None,
    };
    let since = |t: Instant, u: Instant| u.saturating_duration_since(t).as_secs_f64() * 1e3;
    let downtime = Downtime {
        pause_ms: paused.pause_ms,
        capture_ms: paused.capture_ms,
        handoff_ms: (since(paused.paused_at, listed) - paused.pause_ms - paused.capture_ms).max(0.0),
        page_list_ms: listed.elapsed().as_secs_f64() * 1e3,
        paused_unix_us: paused.paused_unix_us,
        ..Default::default()
    };
    let out = Outgoing::postcopy(
        conn,
        answers,
        bytes,
        &paused.state,
        extents,
        ctx.mem,
        ctx.mem_size,
        paused.paused_at,
        options.push_delay,
        SourceSummary { downtime, ..summary },
        status,
    )
    .map(|mut out| {
        // After the state went: the destination resumes meanwhile.
        out.reorder(|pages| push_order(pages, options.push_order, &history));
        out
    })
    .map_err(|error| {
        Box::new(Stopped {
            error,
            resumable: Some(resumable),
        })
    });
    // After the state went: turning the log off costs nothing to the
    // downtime here.
    let mut tracker = tracker;
    if let Err(e) = tracker.stop() {
        tracing::warn!("{e}");
    }
    out
}

/// How long a source ready to pause waits for the destination's `Ready`
/// before it pauses anyway (a late `Ready` is then ignored).
const READY_WAIT: Duration = Duration::from_secs(10);

/// Waits for the destination's `Ready` (its VM built): a pause before it
/// would put the rest of the destination's build in the downtime (it was
/// most of a 1 GiB guest's, whose pre-pause scan is quicker than the
/// build). Returns the time waited, ms. A destination that ends the
/// connection instead (its build failed) fails the migration before the
/// pause: the VM runs on here.
fn wait_ready(conn: &Conn) -> Result<f64, MigrationError> {
    let t = Instant::now();
    let mut r = conn.try_clone()?;
    r.set_read_timeout(Some(READY_WAIT))?;
    let got = decode(&mut r);
    r.set_read_timeout(None)?;
    let waited = t.elapsed().as_secs_f64() * 1e3;
    match got {
        Ok(Message::Ready) => Ok(waited),
        Ok(other) => Err(MigrationError::Protocol(format!(
            "the destination sent {} where its Ready was expected",
            other.summary()
        ))),
        Err(MigrationError::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            tracing::warn!(
                "the destination did not report its VM built within {READY_WAIT:?}; pausing anyway (its build is then in the downtime)"
            );
            Ok(waited)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_source_pauses_after_ready_and_not_on_an_ended_or_confused_destination() {
        // Ready: the time waited comes back.
        let (a, mut b) = UnixStream::pair().unwrap();
        encode(&mut b, &Message::Ready).unwrap();
        assert!(wait_ready(&Conn::Unix(a)).unwrap() >= 0.0);
        // A destination that ended (its build failed): no pause.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(
            wait_ready(&Conn::Unix(a)),
            Err(MigrationError::Io { .. })
        ));
        // Anything else first: a protocol error, no pause.
        let (a, mut b) = UnixStream::pair().unwrap();
        encode(&mut b, &Message::Complete).unwrap();
        let e = wait_ready(&Conn::Unix(a)).unwrap_err();
        assert!(e.to_string().contains("where its Ready was expected"), "{e}");
    }
}
