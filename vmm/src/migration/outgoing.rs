//! The source after the switchover: the state and the extents go, then page
//! requests are answered (on their own connection, QEMU's postcopy-preempt)
//! ahead of the background push of every remaining data page; and the
//! resumption of an interrupted post-copy with a destination that waits for
//! it (`recover`).

use super::status::{Phase, SourceStatus};
use super::transport::{Conn, Endpoint, Security, HANDSHAKE_WAIT};
use super::wire::page_bitmap_of_runs;
use super::wire::{decode, encode, is_zero, Message, PAGE, PAGE64};
use super::{io, MigrationError};
use crate::snapshot::{Extent, EXTENT_MAX};
use crate::state::SavedVm;
use devices::GuestRam;
use sandbox::ThreadClass;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// How to migrate (`vmm ctl SRC migrate`).
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Hold the background push back this long (pages move on demand only
    /// until then; an experiment knob, zero normally).
    pub push_delay: Duration,
    /// Pre-copy rounds before the switchover (0: pure post-copy). The first
    /// round copies every data page while the VM runs; each later one copies
    /// again the pages the guest wrote meanwhile (KVM dirty log).
    pub precopy_rounds: u32,
    /// Resume an interrupted post-copy with a destination that waits for it
    /// (`vmm ctl DEST recover --from ADDR`, then this with `--to ADDR`).
    pub resume: bool,
    /// How the connections are authenticated and protected.
    pub security: Security,
    /// The order of the background push after the switchover.
    pub push_order: super::push_order::PushOrder,
    /// Dirty tracking of the pre-copy rounds.
    pub dirty_tracking: DirtyTracking,
}

/// How pre-copy rounds find the pages written meanwhile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// KVM's dirty log plus vm-memory's bitmaps of the VMM's writes.
    #[default]
    Kvm,
    /// Async userfaultfd write protection and PAGEMAP_SCAN
    /// (`vmm_core::memory::dirty_wp`).
    UffdWp,
}

/// What the source sent, printed by `vmm run` and returned to `vmm ctl migrate`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceSummary {
    /// Pause to the destination's `Resumed` (includes one network trip).
    pub downtime_ms: f64,
    /// Pause to the destination's `Complete`.
    pub total_ms: f64,
    /// Data pages left for post-copy (all of them without pre-copy; the
    /// pages still missing at the destination when resuming).
    pub data_pages: u64,
    /// Pages sent in the background.
    pub pages_pushed: u64,
    /// Pages sent as answers to requests.
    pub pages_requested: u64,
    /// Requests for pages already sent (not sent again).
    pub requests_already_sent: u64,
    /// Pages sent again on the destination's `Resend`.
    pub pages_resent: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Pre-copy rounds done.
    pub precopy_rounds: u32,
    /// Pages sent while the VM ran (every round).
    pub precopy_pages: u64,
    /// Pages found written after each round (the last one at the switchover:
    /// the post-copy set).
    pub precopy_dirty: Vec<u64>,
    /// Start of the migration to the switchover.
    pub precopy_ms: f64,
    /// Opening the main connection and the answer channel, authentication
    /// (TLS handshakes) included; before the pause, so not in the downtime.
    pub connect_ms: f64,
    /// How long the source, ready to pause, waited for the destination's
    /// `Ready` (its VM built); 0 when it had come already.
    pub ready_wait_ms: f64,
    /// This run resumed an interrupted post-copy.
    pub resumed: bool,
    /// Pages sent in each pre-copy round (round 1: every data page).
    pub precopy_round_pages: Vec<u64>,
    /// Post-copy pages that went as zero pages (their address only: the
    /// zero check is made at the push, not inside the pause).
    pub zero_pages: u64,
    /// The downtime, part by part, on this side's clock.
    pub downtime: Downtime,
}

/// The source's downtime, part by part (ms): the sum of the parts is
/// `total_ms`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Downtime {
    /// Asking the vCPUs to stop until all had stopped.
    pub pause_ms: f64,
    /// Capturing the state (devices paused, KVM, vCPU and device state saved).
    pub capture_ms: f64,
    /// The controller handing the captured state back to the migration
    /// thread (a thread wake-up).
    #[serde(default)]
    pub handoff_ms: f64,
    /// The page list: the dirty log since the scan (or the last round),
    /// merged into the scanned pages.
    pub page_list_ms: f64,
    /// Encoding and writing the state and the page map.
    pub send_state_ms: f64,
    /// State sent to the destination's `Resumed` received: the destination
    /// applies the state to its VM (built already) and starts the vCPUs
    /// (`destination_part_ms`), plus the trips both ways (`trips_ms`).
    pub destination_ms: f64,
    /// The destination's own part, as it reported it in `Resumed`: the
    /// state's arrival to its vCPUs started.
    pub destination_part_ms: f64,
    /// `destination_ms` less the destination's part: the state's trip there
    /// and `Resumed`'s trip back, scheduling included (only the first is
    /// downtime, but the two cannot be told apart without a shared clock).
    pub trips_ms: f64,
    /// Pause to `Resumed` (the downtime).
    pub total_ms: f64,
    /// When the pause began, on the wall clock (microseconds since the
    /// Unix epoch): with the destination's `vcpus_started_unix_us`, the
    /// downtime without the trip back, on one host or synchronized clocks.
    #[serde(default)]
    pub paused_unix_us: u64,
}

/// What a source keeps to resume an interrupted post-copy.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// The post-copy data extents sent to the destination.
    pub extents: Vec<Extent>,
    /// When the VM was paused for the switchover.
    pub paused_at: Instant,
    /// When the destination said it runs the VM, if it did.
    pub resumed_at: Option<Instant>,
}

/// Opens the answer channel: answers to page requests go on their own
/// connection, so they never queue behind pushed pages already in the main
/// connection's buffers (QEMU's postcopy-preempt).
fn open_answers(to: &Endpoint, sec: &Security) -> Result<Conn, MigrationError> {
    let mut c = Conn::open(to, sec)?;
    encode(&mut c, &Message::Preempt).map_err(io("opening the answer channel"))?;
    Ok(c)
}

/// Opens the main connection and the answer channel (authenticated, the
/// headers exchanged): before the VM pauses, so that no handshake lands in
/// the downtime.
pub(super) fn open_both(to: &Endpoint, sec: &Security) -> Result<(Conn, Conn), MigrationError> {
    let conn = Conn::open(to, sec)?;
    let answers = open_answers(to, sec)?;
    Ok((conn, answers))
}

/// The guest-physical pages of `extents`, in order.
pub(super) fn extent_pages(extents: &[Extent]) -> impl Iterator<Item = u64> + '_ {
    extents.iter().flat_map(|e| (e.gpa..e.end()).step_by(PAGE))
}

/// Extents (within one [`EXTENT_MAX`] block each) covering the ascending
/// page addresses `pages`.
pub fn extents_of(pages: &[u64]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &gpa in pages {
        match out.last_mut() {
            Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += PAGE64,
            _ => out.push(Extent { gpa, len: PAGE64 }),
        }
    }
    out
}

/// Appends the pages `[gpa, end)` to `out`, ascending, as [`extents_of`]
/// would (an extent grows while contiguous, within its [`EXTENT_MAX`] block).
fn push_range(out: &mut Vec<Extent>, mut gpa: u64, end: u64) {
    while gpa < end {
        let stop = end.min((gpa / EXTENT_MAX + 1) * EXTENT_MAX);
        match out.last_mut() {
            Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += stop - gpa,
            _ => out.push(Extent { gpa, len: stop - gpa }),
        }
        gpa = stop;
    }
}

/// Extents (as [`extents_of`] makes them) of the ascending,
/// non-overlapping runs `(gpa, len)` of whole pages.
pub fn extents_of_runs(runs: &[(u64, u64)]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(runs.len());
    for &(gpa, len) in runs {
        push_range(&mut out, gpa, gpa.saturating_add(len));
    }
    out
}

/// The extents of the union of `extents` (as [`extents_of`] makes them) and
/// the ascending pages `pages`: equal to `extents_of` of the merged page
/// list, in time linear in extents and pages, not in the pages the extents
/// cover (the source lists its pages before the pause and adds only what
/// the dirty log has at the switchover).
pub fn union_extents(extents: &[Extent], pages: &[u64]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len() + pages.len());
    let (mut i, mut j) = (0, 0);
    loop {
        let (start, end) = match (extents.get(i), pages.get(j)) {
            (Some(e), Some(&p)) if e.gpa <= p => {
                i += 1;
                (e.gpa, e.end())
            }
            (_, Some(&p)) => {
                j += 1;
                (p, p + PAGE64)
            }
            (Some(e), None) => {
                i += 1;
                (e.gpa, e.end())
            }
            (None, None) => break,
        };
        let covered = out.last().map_or(0, Extent::end);
        push_range(&mut out, start.max(covered), end);
    }
    out
}

/// A source connected to its destination, the state already sent.
#[derive(Debug)]
pub struct Outgoing {
    conn: Conn,
    /// The answer channel.
    answers: Conn,
    mem: GuestRam,
    extents: Vec<Extent>,
    paused_at: Instant,
    /// The destination's `Resumed` arrived.
    resumed_at: Option<Instant>,
    push_delay: Duration,
    bytes: u64,
    /// Pages to push, in order.
    order: Vec<u64>,
    /// Per guest page: 0 no data, 1 data not sent, 2 sent.
    sent: Arc<Sent>,
    /// The state and page map went (the downtime's destination part starts).
    state_sent_at: Option<Instant>,
    summary: SourceSummary,
    status: Arc<SourceStatus>,
}

/// Per guest page: [`NO_DATA`], [`UNSENT`] or [`SENT`]; shared by the push
/// loop and the answering thread, which claim a page (UNSENT to SENT)
/// before sending it: each page goes once.
#[derive(Debug)]
struct Sent(Vec<AtomicU8>);

const NO_DATA: u8 = 0;
const UNSENT: u8 = 1;
const SENT: u8 = 2;

impl Sent {
    fn slot(&self, gpa: u64) -> Option<&AtomicU8> {
        usize::try_from(gpa / PAGE64).ok().and_then(|i| self.0.get(i))
    }

    fn get(&self, gpa: u64) -> u8 {
        self.slot(gpa).map_or(NO_DATA, |s| s.load(Ordering::Acquire))
    }

    fn set(&self, gpa: u64, v: u8) {
        if let Some(s) = self.slot(gpa) {
            s.store(v, Ordering::Release);
        }
    }

    /// Takes an unsent page for sending: `true` for the one caller that may.
    fn claim(&self, gpa: u64) -> bool {
        self.slot(gpa).is_some_and(|s| {
            s.compare_exchange(UNSENT, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }
}

impl Outgoing {
    /// Sends the state and the extents on a connection whose headers (and
    /// pre-copy: `bytes` so far) went already; `answers` is the answer
    /// channel, open already.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn postcopy(
        conn: Conn,
        answers: Conn,
        bytes: u64,
        state: &SavedVm,
        extents: Vec<Extent>,
        mem: GuestRam,
        mem_size: u64,
        paused_at: Instant,
        push_delay: Duration,
        summary: SourceSummary,
        status: Arc<SourceStatus>,
    ) -> Result<Outgoing, MigrationError> {
        let t = Instant::now();
        let json = serde_json::to_vec(state).map_err(MigrationError::Encode)?;
        let map = page_bitmap_of_runs(extents.iter().map(|e| (e.gpa, e.len)), mem_size);
        let mut w = BufWriter::new(conn.try_clone()?);
        encode(&mut w, &Message::State(json.clone())).map_err(io("sending the state"))?;
        encode(&mut w, &Message::PageMap(map.clone())).map_err(io("sending the page map"))?;
        w.flush().map_err(io("sending the state"))?;
        let ram_end = crate::snapshot::ram_end(mem_size);
        let mut out = Outgoing::new(
            conn, answers, mem, extents, ram_end, paused_at, push_delay, summary, status,
        );
        out.summary.downtime.send_state_ms = t.elapsed().as_secs_f64() * 1e3;
        out.state_sent_at = Some(Instant::now());
        out.bytes += bytes + 5 + json.len() as u64 + 5 + map.len() as u64;
        // Address order; the caller may [`Outgoing::reorder`] it.
        let order: Vec<u64> = extent_pages(&out.extents).collect();
        for &g in &order {
            out.mark(g, 1);
        }
        out.summary.data_pages = order.len() as u64;
        out.status.data_pages.store(order.len() as u64, Ordering::Relaxed);
        out.status.set_phase(Phase::Postcopy);
        out.order = order;
        Ok(out)
    }

    /// Reconnects to a destination that waits for the rest of an interrupted
    /// post-copy (`vmm ctl DEST recover --from to`) and learns which pages
    /// it still misses. The VM must still be paused as it was.
    pub fn resume(
        to: &Endpoint,
        from: &Resumable,
        mem: GuestRam,
        mem_size: u64,
        options: &MigrateOptions,
        status: Arc<SourceStatus>,
    ) -> Result<Outgoing, MigrationError> {
        status.set_phase(Phase::Recovering);
        let push_delay = options.push_delay;
        let start = Instant::now();
        let mut conn = Conn::open(to, &options.security)?;
        encode(&mut conn, &Message::Resume).map_err(io("asking to resume"))?;
        conn.set_read_timeout(Some(HANDSHAKE_WAIT))?;
        let Message::Need(bits) = decode(&mut conn)? else {
            return Err(MigrationError::Protocol(
                "the destination did not say which pages it misses (is it waiting with `vmm ctl DEST recover`?)"
                    .into(),
            ));
        };
        conn.set_read_timeout(None)?;
        let pages: Vec<u64> = extent_pages(&from.extents).collect();
        if bits.len() != pages.len().div_ceil(8) {
            return Err(MigrationError::Protocol(format!(
                "the destination's list of missing pages has {} bytes for {} data pages: it is not the destination of this migration",
                bits.len(),
                pages.len()
            )));
        }
        let answers = open_answers(to, &options.security)?;
        let ram_end = crate::snapshot::ram_end(mem_size);
        let summary = SourceSummary {
            resumed: true,
            connect_ms: start.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        let mut out = Outgoing::new(
            conn,
            answers,
            mem,
            from.extents.clone(),
            ram_end,
            from.paused_at,
            push_delay,
            summary,
            status,
        );
        out.resumed_at = from.resumed_at;
        out.bytes = 12 + 5 + 5 + bits.len() as u64 + 12 + 5;
        let mut order = Vec::new();
        for (i, &g) in pages.iter().enumerate() {
            // The pages the destination has count as sent: a request for one
            // (a fill that failed) comes as `Resend`.
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                out.mark(g, 1);
                order.push(g);
            } else {
                out.mark(g, 2);
            }
        }
        out.summary.data_pages = order.len() as u64;
        out.status.data_pages.store(order.len() as u64, Ordering::Relaxed);
        out.status.set_phase(Phase::Postcopy);
        // Address order: the history of a push order by recency is gone.
        out.order = order;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: Conn,
        answers: Conn,
        mem: GuestRam,
        extents: Vec<Extent>,
        ram_end: u64,
        paused_at: Instant,
        push_delay: Duration,
        summary: SourceSummary,
        status: Arc<SourceStatus>,
    ) -> Outgoing {
        let pages = usize::try_from(ram_end / PAGE64).unwrap_or(0);
        Outgoing {
            conn,
            answers,
            mem,
            extents,
            paused_at,
            resumed_at: None,
            state_sent_at: None,
            push_delay,
            bytes: 0,
            order: Vec::new(),
            sent: Arc::new(Sent((0..pages).map(|_| AtomicU8::new(0)).collect())),
            summary,
            status,
        }
    }

    /// Reorders the pages still to push (before the push starts): `f`
    /// gets them in address order and must return a permutation (the one
    /// ordering function, [`super::push_order::push_order`]).
    pub(super) fn reorder(&mut self, f: impl FnOnce(Vec<u64>) -> Vec<u64>) {
        let pages = std::mem::take(&mut self.order);
        self.order = f(pages);
    }

    fn mark(&mut self, gpa: u64, v: u8) {
        self.sent.set(gpa, v);
    }

    /// Serves requests and pushes every data page on a new thread; calls
    /// `on_end` with the result at the end.
    pub fn spawn(
        self,
        on_end: impl FnOnce(Result<SourceSummary, Box<Stopped>>) + Send + 'static,
    ) -> Result<(), MigrationError> {
        spawn_out(move || self.serve(), on_end)
    }

    /// Serves requests and pushes every data page; on failure says whether
    /// the destination may resume it.
    pub fn serve(mut self) -> Result<SourceSummary, Box<Stopped>> {
        self.run().map_err(|error| {
            Box::new(Stopped {
                error,
                resumable: Some(Resumable {
                    extents: self.extents.clone(),
                    paused_at: self.paused_at,
                    resumed_at: self.resumed_at,
                }),
            })
        })
    }

    fn run(&mut self) -> Result<SourceSummary, MigrationError> {
        let mut reader = self.conn.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let counts = Arc::new(AnswerCounts::default());
        let mut answerer = Answerer {
            sent: self.sent.clone(),
            mem: self.mem.clone(),
            w: BufWriter::with_capacity(8 << 10, self.answers.try_clone()?),
            buf: vec![0u8; PAGE],
            counts: counts.clone(),
            status: self.status.clone(),
        };
        // Requests are read and answered on their own thread, on the answer
        // channel: an answer never waits behind the push (its buffers, or a
        // push write blocked on a full socket). Other messages go to the
        // push loop.
        sandbox::spawn(
            std::thread::Builder::new().name("migration-requests".into()),
            ThreadClass::MigrationSource,
            sandbox::inherited_mode(),
            move || loop {
                let m = match decode(&mut reader) {
                    Ok(m @ (Message::Request(_) | Message::Resend(_))) => match answerer.answer(&m) {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    },
                    // Timed here: the push loop may be busy writing.
                    Ok(m) => Ok((Instant::now(), m)),
                    Err(e) => Err(e),
                };
                let stop = m.is_err();
                if tx.send(m).is_err() || stop {
                    break;
                }
            },
        )
        .map_err(|e| io("starting the request reader")(e.into()))?;
        let order = std::mem::take(&mut self.order);
        let conn = self.conn.try_clone()?;
        let mut w = BufWriter::with_capacity(64 << 10, conn);
        // The push is bulk work: the answering thread (and the vCPUs) go first.
        super::lower_priority();
        let mut next = 0;
        let mut done_sent = false;
        let mut buf = vec![0u8; PAGE];
        let push_from = Instant::now() + self.push_delay;
        loop {
            let pushing = Instant::now() >= push_from;
            // `Done` carries the downtime: it waits for `Resumed` (which a
            // resumed post-copy's destination does not send again).
            let may_end = self.resumed_at.is_some() || self.summary.resumed;
            let work = next < order.len() || (!done_sent && may_end);
            let msg = if pushing && work {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        return Err(MigrationError::Protocol("the request reader ended".into()))
                    }
                }
            } else {
                // Nothing to push: sleep until a message comes or the push may start.
                let wait = if pushing {
                    Duration::from_millis(100)
                } else {
                    push_from
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(1), Duration::from_millis(100))
                };
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(MigrationError::Protocol("the request reader ended".into()))
                    }
                }
            };
            if let Some(m) = msg {
                let (at, m) = m?;
                match m {
                    Message::Resumed { took_us } => {
                        let now = at;
                        self.resumed_at = Some(now);
                        let d = &mut self.summary.downtime;
                        d.total_ms = (now - self.paused_at).as_secs_f64() * 1e3;
                        d.destination_ms = self.state_sent_at.map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
                        d.destination_part_ms = (took_us as f64 / 1e3).min(d.destination_ms);
                        d.trips_ms = d.destination_ms - d.destination_part_ms;
                    }
                    // Late: the source stopped waiting for it (`precopy::wait_ready`).
                    Message::Ready => {}
                    Message::Complete => {
                        w.flush().map_err(io("flushing"))?;
                        let mut s = std::mem::take(&mut self.summary);
                        s.downtime_ms = self
                            .resumed_at
                            .map_or(0.0, |r| (r - self.paused_at).as_secs_f64() * 1e3);
                        s.total_ms = self.paused_at.elapsed().as_secs_f64() * 1e3;
                        s.pages_requested = counts.requested.load(Ordering::Relaxed);
                        s.requests_already_sent = counts.already_sent.load(Ordering::Relaxed);
                        s.pages_resent = counts.resent.load(Ordering::Relaxed);
                        s.zero_pages += counts.zero.load(Ordering::Relaxed);
                        s.bytes_sent = self.bytes + counts.bytes.load(Ordering::Relaxed);
                        return Ok(s);
                    }
                    other => {
                        return Err(MigrationError::Protocol(format!(
                            "unexpected message from the destination: {}",
                            other.summary()
                        )))
                    }
                }
                continue;
            }
            if !pushing {
                continue;
            }
            if next < order.len() {
                let gpa = order[next];
                next += 1;
                if self.sent.claim(gpa) {
                    self.summary.pages_pushed += 1;
                    self.status.pages_pushed.fetch_add(1, Ordering::Relaxed);
                    self.send_page(&mut w, &mut buf, gpa)?;
                }
            } else if !done_sent && may_end {
                let downtime_us = self.resumed_at.map_or(0, |r| {
                    u64::try_from((r - self.paused_at).as_micros()).unwrap_or(u64::MAX)
                });
                let done = Message::Done {
                    pushed: self.summary.pages_pushed,
                    requested: counts.requested.load(Ordering::Relaxed),
                    downtime_us,
                };
                encode(&mut w, &done).map_err(io("sending Done"))?;
                w.flush().map_err(io("sending Done"))?;
                self.bytes += 29;
                done_sent = true;
            }
        }
    }

    /// Pushes page `gpa` (claimed already).
    fn send_page(&mut self, w: &mut impl Write, buf: &mut [u8], gpa: u64) -> Result<(), MigrationError> {
        let n = write_page(&self.mem, w, buf, gpa, false)?;
        if n < PAGE64 {
            self.summary.zero_pages += 1;
            self.status.zero_pages.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes += n;
        self.status.postcopy_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Reads page `gpa` and writes it (a zero page as its address only);
/// returns the bytes written.
fn write_page(
    mem: &GuestRam,
    w: &mut impl Write,
    buf: &mut [u8],
    gpa: u64,
    requested: bool,
) -> Result<u64, MigrationError> {
    // The VM is paused here: its memory does not change.
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|source| MigrationError::ReadMemory { gpa, source })?;
    let zero = is_zero(buf);
    let m = if zero {
        Message::ZeroPage { gpa, requested }
    } else {
        Message::Page {
            gpa,
            requested,
            data: buf.to_vec(),
        }
    };
    encode(w, &m).map_err(io("sending a page"))?;
    Ok(if zero { 5 + 8 } else { 5 + 8 + PAGE64 })
}

/// What the answering thread counted.
#[derive(Debug, Default)]
struct AnswerCounts {
    requested: AtomicU64,
    already_sent: AtomicU64,
    resent: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
}

/// Answers page requests on the answer channel (the `migration-requests`
/// thread).
struct Answerer {
    sent: Arc<Sent>,
    mem: GuestRam,
    w: BufWriter<Conn>,
    buf: Vec<u8>,
    counts: Arc<AnswerCounts>,
    status: Arc<SourceStatus>,
}

impl Answerer {
    fn answer(&mut self, m: &Message) -> Result<(), MigrationError> {
        let (gpa, resend) = match *m {
            Message::Request(g) => (g, false),
            Message::Resend(g) => (g, true),
            _ => return Ok(()),
        };
        if self.sent.get(gpa) == NO_DATA {
            return Err(MigrationError::Protocol(format!(
                "the destination asked for page {gpa:#x}, which holds no data or is outside guest RAM"
            )));
        }
        if resend {
            self.counts.resent.fetch_add(1, Ordering::Relaxed);
            self.sent.set(gpa, SENT);
        } else if self.sent.claim(gpa) {
            self.counts.requested.fetch_add(1, Ordering::Relaxed);
            self.status.pages_requested.fetch_add(1, Ordering::Relaxed);
        } else {
            // Pushed already: on its way.
            self.counts.already_sent.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Flushed at once: it never waits behind pushes.
        let n = write_page(&self.mem, &mut self.w, &mut self.buf, gpa, true)?;
        self.w.flush().map_err(io("sending a page"))?;
        if n < PAGE64 {
            self.counts.zero.fetch_add(1, Ordering::Relaxed);
            self.status.zero_pages.fetch_add(1, Ordering::Relaxed);
        }
        self.counts.bytes.fetch_add(n, Ordering::Relaxed);
        self.status.postcopy_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // Ends the request reader too.
        self.conn.shutdown();
        self.answers.shutdown();
    }
}

/// A migration that stopped before the end.
#[derive(Debug)]
pub struct Stopped {
    /// Why.
    pub error: MigrationError,
    /// Whether (and how) the destination may resume it.
    pub resumable: Option<Resumable>,
}

/// Resumes an interrupted post-copy (see [`Outgoing::resume`]) on the
/// `migration-out` thread; `on_end` as for [`Outgoing::spawn`]. If the
/// destination cannot be reached, the post-copy stays resumable.
pub fn spawn_resume(
    to: Endpoint,
    from: Resumable,
    mem: GuestRam,
    mem_size: u64,
    options: MigrateOptions,
    status: Arc<SourceStatus>,
    on_end: impl FnOnce(Result<SourceSummary, Box<Stopped>>) + Send + 'static,
) -> Result<(), MigrationError> {
    spawn_out(
        move || {
            Outgoing::resume(&to, &from, mem, mem_size, &options, status)
                .map_err(|error| {
                    Box::new(Stopped {
                        error,
                        resumable: Some(from.clone()),
                    })
                })
                .and_then(Outgoing::serve)
        },
        on_end,
    )
}

/// Runs an outgoing migration on the `migration-out` thread and reports its
/// end to `on_end`. The thread is sandboxed like its starter (the VM's
/// controller) and as a `migration-source` thread.
pub(super) fn spawn_out(
    work: impl FnOnce() -> Result<SourceSummary, Box<Stopped>> + Send + 'static,
    on_end: impl FnOnce(Result<SourceSummary, Box<Stopped>>) + Send + 'static,
) -> Result<(), MigrationError> {
    sandbox::spawn(
        std::thread::Builder::new().name("migration-out".into()),
        ThreadClass::MigrationSource,
        sandbox::inherited_mode(),
        move || on_end(work()),
    )
    .map_err(|e| io("starting the migration thread")(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_union_of_extents_and_pages_is_the_extents_of_the_merged_pages() {
        // Seeded pages around 1 MiB block boundaries, runs and gaps.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let span = if round % 2 == 0 { 64 } else { 1024 };
            let mut pick = |n: usize| {
                let mut v: Vec<u64> = (0..n).map(|_| (next() % span) * PAGE64 + 0xf_0000).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            let (a, b) = (pick(round % 300), pick(round % 7));
            let mut merged: Vec<u64> = a.iter().chain(&b).copied().collect();
            merged.sort_unstable();
            merged.dedup();
            let want: Vec<_> = extents_of(&merged).iter().map(|e| (e.gpa, e.len)).collect();
            let got: Vec<_> = union_extents(&extents_of(&a), &b)
                .iter()
                .map(|e| (e.gpa, e.len))
                .collect();
            assert_eq!(got, want, "round {round}");
        }
        // A whole run of blocks at once, and nothing.
        let run: Vec<u64> = (0..1024).map(|i| i * PAGE64).collect();
        let want: Vec<_> = extents_of(&run).iter().map(|e| (e.gpa, e.len)).collect();
        let got: Vec<_> = union_extents(&extents_of(&run), &[0x3000])
            .iter()
            .map(|e| (e.gpa, e.len))
            .collect();
        assert_eq!(got, want);
        assert!(union_extents(&[], &[]).is_empty());
    }

    #[test]
    fn extents_cover_pages_within_one_block_each() {
        let e = extents_of(&[0x1000, 0x2000, 0x4000, 0xf_f000, 0x10_0000, 0x10_1000]);
        let pairs: Vec<_> = e.iter().map(|e| (e.gpa, e.len)).collect();
        // Contiguous runs merge, but never across a 1 MiB block boundary.
        assert_eq!(
            pairs,
            vec![
                (0x1000, 0x2000),
                (0x4000, 0x1000),
                (0xf_f000, 0x1000),
                (0x10_0000, 0x2000)
            ]
        );
        assert_eq!(extent_pages(&e).count(), 6);
    }
}
