//! The source after the switchover: the state and the extents go, then page
//! requests are answered (on their own connection, QEMU's postcopy-preempt)
//! ahead of the background push of every remaining data page; and the
//! resumption of an interrupted post-copy with a destination that waits for
//! it (`recover`).

use super::transport::{Conn, Endpoint, Security, HANDSHAKE_WAIT};
use super::wire::{decode, encode, Message, PAGE, PAGE64};
use super::{io, MigrationError};
use crate::snapshot::{Extent, EXTENT_MAX};
use crate::state::SavedVm;
use devices::GuestRam;
use sandbox::ThreadClass;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, TryRecvError};
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
    /// This run resumed an interrupted post-copy.
    pub resumed: bool,
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
    sent: Vec<u8>,
    summary: SourceSummary,
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
        paused_at: Instant,
        push_delay: Duration,
        summary: SourceSummary,
    ) -> Result<Outgoing, MigrationError> {
        let json = serde_json::to_vec(state).map_err(MigrationError::Encode)?;
        let mut w = BufWriter::new(conn.try_clone()?);
        encode(&mut w, &Message::State(json.clone())).map_err(io("sending the state"))?;
        let pairs = extents.iter().map(|e| (e.gpa, e.len)).collect();
        encode(&mut w, &Message::Extents(pairs)).map_err(io("sending the extents"))?;
        w.flush().map_err(io("sending the state"))?;
        let ram_end = crate::snapshot::ram_end(state.vm.config.mem_size);
        let mut out = Outgoing::new(
            conn, answers, mem, extents, ram_end, paused_at, push_delay, summary,
        );
        out.bytes += bytes + 5 + json.len() as u64 + 5 + 16 * out.extents.len() as u64 + 12 + 5;
        let order: Vec<u64> = extent_pages(&out.extents).collect();
        for &g in &order {
            out.mark(g, 1);
        }
        out.summary.data_pages = order.len() as u64;
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
    ) -> Result<Outgoing, MigrationError> {
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
    ) -> Outgoing {
        Outgoing {
            conn,
            answers,
            mem,
            extents,
            paused_at,
            resumed_at: None,
            push_delay,
            bytes: 0,
            order: Vec::new(),
            sent: vec![0u8; usize::try_from(ram_end / PAGE64).unwrap_or(0)],
            summary,
        }
    }

    /// Reorders the pages still to push (before the push starts): `f`
    /// gets them in address order and must return a permutation.
    pub(super) fn reorder(&mut self, f: impl FnOnce(Vec<u64>) -> Vec<u64>) {
        let pages = std::mem::take(&mut self.order);
        self.order = f(pages);
    }

    fn mark(&mut self, gpa: u64, v: u8) {
        if let Some(s) = usize::try_from(gpa / PAGE64)
            .ok()
            .and_then(|i| self.sent.get_mut(i))
        {
            *s = v;
        }
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
        // Requests are read on their own thread so that the push loop can
        // check them between every page without blocking.
        sandbox::spawn(
            std::thread::Builder::new().name("migration-requests".into()),
            ThreadClass::MigrationSource,
            sandbox::inherited_mode(),
            move || loop {
                let m = decode(&mut reader);
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
        let mut answers = BufWriter::with_capacity(8 << 10, self.answers.try_clone()?);
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
                // Only requests to serve: sleep until one comes or the push may start.
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
                match m? {
                    Message::Request(gpa) | Message::Resend(gpa) if self.slot(gpa) == 0 => {
                        return Err(MigrationError::Protocol(format!(
                            "the destination asked for page {gpa:#x}, which holds no data or is outside guest RAM"
                        )))
                    }
                    Message::Request(gpa) if self.slot(gpa) == 2 => self.summary.requests_already_sent += 1,
                    m @ (Message::Request(_) | Message::Resend(_)) => {
                        let (Message::Request(gpa) | Message::Resend(gpa)) = m else { continue };
                        if matches!(m, Message::Resend(_)) {
                            self.summary.pages_resent += 1;
                        } else {
                            self.summary.pages_requested += 1;
                        }
                        // On the answer channel, flushed at once: it never
                        // waits behind pushes.
                        self.send_page(&mut answers, &mut buf, gpa, true)?;
                        answers.flush().map_err(io("sending a page"))?;
                    }
                    Message::Resumed => self.resumed_at = Some(Instant::now()),
                    Message::Complete => {
                        w.flush().map_err(io("flushing"))?;
                        let mut s = std::mem::take(&mut self.summary);
                        s.downtime_ms = self
                            .resumed_at
                            .map_or(0.0, |r| (r - self.paused_at).as_secs_f64() * 1e3);
                        s.total_ms = self.paused_at.elapsed().as_secs_f64() * 1e3;
                        s.bytes_sent = self.bytes;
                        return Ok(s);
                    }
                    other => {
                        return Err(MigrationError::Protocol(format!(
                            "unexpected message from the destination: {}", other.summary()
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
                if self.slot(gpa) == 1 {
                    self.summary.pages_pushed += 1;
                    self.send_page(&mut w, &mut buf, gpa, false)?;
                }
            } else if !done_sent && may_end {
                let downtime_us = self.resumed_at.map_or(0, |r| {
                    u64::try_from((r - self.paused_at).as_micros()).unwrap_or(u64::MAX)
                });
                let done = Message::Done {
                    pushed: self.summary.pages_pushed,
                    requested: self.summary.pages_requested,
                    downtime_us,
                };
                encode(&mut w, &done).map_err(io("sending Done"))?;
                w.flush().map_err(io("sending Done"))?;
                self.bytes += 29;
                done_sent = true;
            }
        }
    }

    fn slot(&self, gpa: u64) -> u8 {
        usize::try_from(gpa / PAGE64)
            .ok()
            .and_then(|i| self.sent.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn send_page(
        &mut self,
        w: &mut impl Write,
        buf: &mut [u8],
        gpa: u64,
        requested: bool,
    ) -> Result<(), MigrationError> {
        // The VM is paused here: its memory does not change.
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| MigrationError::ReadMemory { gpa, source })?;
        let m = Message::Page {
            gpa,
            requested,
            data: buf.to_vec(),
        };
        encode(w, &m).map_err(io("sending a page"))?;
        self.bytes += 5 + 8 + PAGE64;
        self.mark(gpa, 2);
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
    on_end: impl FnOnce(Result<SourceSummary, Box<Stopped>>) + Send + 'static,
) -> Result<(), MigrationError> {
    spawn_out(
        move || {
            Outgoing::resume(&to, &from, mem, mem_size, &options)
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
