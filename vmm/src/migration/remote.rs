//! The destination's page source: post-copy data pages come from the source
//! over the connection, pages copied in pre-copy (and not written since)
//! from memory, the rest are zero. A fault on a page not here yet becomes a
//! request to the source and a `Retry(NotReady)`; the page's arrival notifies
//! the retry core. After the source is lost, such faults answer
//! `Retry(Held)`: never a zero page for a page not received.
//!
//! The userfault handler thread calls [`RemoteSource::fetch`]: it never
//! touches a socket. Requests go to a writer thread through a channel; a
//! write that fails marks the source lost.

use super::status::Phase;
use super::transport::Conn;
use super::wire::{encode, Message, PAGE, PAGE64};
use super::{io, lock, MigrationError};
use ::memory::{FetchOutcome, Log2Histogram, Notifier, PageSource, RetryReason, SourceError};
use sandbox::{SeccompMode, ThreadClass};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

/// Where a data page stands.
enum Slot {
    Requested(Instant),
    Arrived(Vec<u8>),
    Taken,
}

/// What the destination counted.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) requested: u64,
    pub(super) resends: u64,
    pub(super) pushed: u64,
    pub(super) answered: u64,
    pub(super) requests_met_by_push: u64,
    pub(super) duplicates: u64,
    pub(super) bytes: u64,
    pub(super) held_after_loss: u64,
    pub(super) latency: Log2Histogram,
    /// Every request's latency (ns), for exact percentiles (at most
    /// [`MAX_SAMPLES`]).
    pub(super) samples: Vec<u64>,
    pub(super) zero_pages: u64,
    pub(super) recoveries: u32,
}

/// Latency samples kept (8 MiB).
const MAX_SAMPLES: usize = 1 << 20;

/// Where an incoming migration stands, for a progress display; updated
/// while the incoming session runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Pages received during pre-copy (a page sent in several rounds counts
    /// each time).
    pub precopy_pages: AtomicU64,
    /// Data pages left for post-copy (0 until the state arrived).
    pub data_pages: AtomicU64,
    /// Post-copy pages received so far (pushed or answered).
    pub received: AtomicU64,
    /// The VM runs here.
    pub running: AtomicBool,
    /// Every page arrived.
    pub complete: AtomicBool,
    /// The source is lost (the VM is paused until `recover`); shared with
    /// the VM's controller, which refuses to resume, snapshot or migrate it
    /// meanwhile.
    pub lost: Arc<AtomicBool>,
    phase: Mutex<Option<Phase>>,
}

impl Progress {
    /// Enters `p`.
    pub fn set_phase(&self, p: Phase) {
        *lock(&self.phase) = Some(p);
    }

    /// Where the migration stands.
    pub fn phase(&self) -> Phase {
        lock(&self.phase).unwrap_or(Phase::Setup)
    }
}

/// What the writer thread does.
enum WriterCmd {
    /// Write this message on the current connection.
    Send(Message),
    /// From now on write on this connection (a recovery).
    Connect(Conn),
}

/// See the module documentation.
pub struct RemoteSource {
    name: String,
    pub(super) notifier: Notifier,
    /// The post-copy data extents, known at the switchover (no vCPU runs before).
    extents: OnceLock<Vec<(u64, u64)>>,
    writer: Mutex<Sender<WriterCmd>>,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Pre-copied pages not placed yet.
    pub(super) precopied: Mutex<HashMap<u64, Vec<u8>>>,
    pub(super) counters: Mutex<Counters>,
    lost: Mutex<Option<String>>,
    pub(super) complete: AtomicBool,
    pub(super) progress: Arc<Progress>,
    /// Post-copy data pages announced, and how many arrived.
    data_pages: AtomicU64,
    arrived: AtomicU64,
    /// The destination RAM's page size (4 KiB, or a huge page): the unit
    /// the retry cores fill, so a fault asks for all its 4 KiB pages and a
    /// unit is placed only once every one of them is here.
    unit: AtomicU64,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RemoteSource {
    /// A source asking for pages on `writer` (from a thread sandboxed in
    /// `seccomp` mode); its data extents come at the switchover
    /// ([`switch`](Self::switch)).
    pub fn new(
        name: String,
        writer: Conn,
        progress: Arc<Progress>,
        seccomp: SeccompMode,
    ) -> Result<Arc<RemoteSource>, MigrationError> {
        let (tx, rx) = mpsc::channel();
        let src = Arc::new(RemoteSource {
            name,
            notifier: Notifier::new().map_err(io("creating an eventfd"))?,
            extents: OnceLock::new(),
            writer: Mutex::new(tx),
            slots: Mutex::new(HashMap::new()),
            precopied: Mutex::new(HashMap::new()),
            counters: Mutex::new(Counters::default()),
            lost: Mutex::new(None),
            complete: AtomicBool::new(false),
            progress,
            data_pages: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            unit: AtomicU64::new(PAGE64),
        });
        let weak = Arc::downgrade(&src);
        sandbox::spawn(
            std::thread::Builder::new().name("migration-requests-out".into()),
            ThreadClass::MigrationDest,
            seccomp,
            move || write_requests(writer, &rx, &weak),
        )
        .map_err(|e| io("starting the request writer")(e.into()))?;
        Ok(src)
    }

    /// The switchover: the post-copy data `extents` (sorted `(gpa, len)`)
    /// and the pre-copied pages kept in memory. Only the first call counts.
    pub fn switch(&self, extents: Vec<(u64, u64)>, precopied: HashMap<u64, Vec<u8>>) {
        let n = extents.iter().map(|&(_, l)| l / PAGE64).sum();
        if self.extents.set(extents).is_ok() {
            self.data_pages.store(n, Ordering::Release);
            *lock(&self.precopied) = precopied;
        }
    }

    /// Sets the destination RAM's page size (before the switchover): on
    /// huge pages the received 4 KiB pages are assembled into whole huge
    /// pages before one UFFDIO_COPY places them.
    pub fn set_unit(&self, unit: u64) {
        self.unit.store(unit.max(PAGE64), Ordering::Release);
    }

    /// The unit pages are placed in ([`set_unit`](Self::set_unit)).
    pub(super) fn unit(&self) -> u64 {
        self.unit.load(Ordering::Acquire)
    }

    /// The unit holding `gpa` is complete: each of its pages is a non-data
    /// page or has arrived (always true for 4 KiB units: the caller asks
    /// right after an arrival or for a pre-copied page).
    pub(super) fn unit_ready(&self, gpa: u64) -> bool {
        let unit = self.unit();
        if unit == PAGE64 {
            return true;
        }
        let base = gpa - gpa % unit;
        let slots = lock(&self.slots);
        (base..base + unit)
            .step_by(PAGE)
            .all(|g| !self.is_data(g) || matches!(slots.get(&g), Some(Slot::Arrived(_) | Slot::Taken)))
    }

    /// Marks every page of the unit holding `gpa` as mapped.
    pub(super) fn placed_unit(&self, gpa: u64) {
        let unit = self.unit();
        let base = gpa - gpa % unit;
        let mut slots = lock(&self.slots);
        for g in (base..base + unit).step_by(PAGE) {
            if let Some(slot @ Slot::Arrived(_)) = slots.get_mut(&g) {
                *slot = Slot::Taken;
            }
        }
    }

    /// One 4 KiB page of a fetch into `buf`: `Ready` (data copied),
    /// `Zero` (`buf` untouched), or `Retry`, after asking the source for
    /// it when it was not asked yet.
    fn fetch_page(&self, offset: u64, buf: &mut [u8], lost: bool) -> FetchOutcome {
        if !self.is_data(offset) {
            // Kept until placed: a fill that fails (EAGAIN) fetches again.
            return match lock(&self.precopied).get(&offset) {
                Some(d) => {
                    buf.copy_from_slice(d);
                    FetchOutcome::Ready
                }
                None => FetchOutcome::Zero,
            };
        }
        let mut slots = lock(&self.slots);
        let ask = match slots.get_mut(&offset) {
            // Kept until mapped (`placed`): a fill that fails fetches again,
            // even after the source has gone.
            Some(Slot::Arrived(d)) => {
                buf.copy_from_slice(d);
                return FetchOutcome::Ready;
            }
            Some(Slot::Requested(_)) => None,
            Some(Slot::Taken) => Some(Message::Resend(offset)),
            None => Some(Message::Request(offset)),
        };
        if lost {
            // Lock order: counters before slots (as in `arrive`).
            drop(slots);
            lock(&self.counters).held_after_loss += 1;
            // Never a zero page for a page not received: the fault stays parked.
            return FetchOutcome::Retry(RetryReason::Held);
        }
        if let Some(m) = ask {
            slots.insert(offset, Slot::Requested(Instant::now()));
            drop(slots);
            let mut c = lock(&self.counters);
            if matches!(m, Message::Resend(_)) {
                c.resends += 1;
            } else {
                c.requested += 1;
            }
            drop(c);
            self.send(m);
        }
        FetchOutcome::Retry(RetryReason::NotReady)
    }

    fn extents(&self) -> &[(u64, u64)] {
        self.extents.get().map_or(&[], Vec::as_slice)
    }

    pub(super) fn is_data(&self, gpa: u64) -> bool {
        let e = self.extents();
        let i = e.partition_point(|&(g, _)| g <= gpa);
        i > 0 && e.get(i - 1).is_some_and(|&(g, l)| gpa < g + l)
    }

    /// Queues a message to the source (never blocks).
    pub(super) fn send(&self, m: Message) {
        if lock(&self.writer).send(WriterCmd::Send(m)).is_err() {
            self.set_lost("the request writer ended".into());
        }
    }

    /// The source is gone: parked faults now answer Held until a recovery.
    pub(super) fn set_lost(&self, why: String) {
        if self.complete.load(Ordering::Acquire) {
            return;
        }
        lock(&self.lost).get_or_insert(why);
        self.progress.lost.store(true, Ordering::Release);
        // Parked faults are retried and now answer Held until a recovery.
        self.notifier.notify();
    }

    /// Why the connection to the source was lost before every page arrived.
    pub fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    /// Every post-copy data page has arrived.
    pub(super) fn all_arrived(&self) -> bool {
        self.extents.get().is_some()
            && self.arrived.load(Ordering::Acquire) >= self.data_pages.load(Ordering::Acquire)
    }

    /// Bit `i` set: the `i`-th data page (extent order) has not arrived.
    pub(super) fn need(&self) -> Vec<u8> {
        let slots = lock(&self.slots);
        let pages = self.extents().iter().flat_map(|&(g, l)| (g..g + l).step_by(PAGE));
        let mut bits = Vec::new();
        for (i, gpa) in pages.enumerate() {
            if i % 8 == 0 {
                bits.push(0u8);
            }
            if !matches!(slots.get(&gpa), Some(Slot::Arrived(_) | Slot::Taken)) {
                if let Some(b) = bits.last_mut() {
                    *b |= 1 << (i % 8);
                }
            }
        }
        bits
    }

    /// Goes on with a source that came back on `conn` (after [`need`](Self::need)
    /// went to it): the pages faults asked for before are asked again.
    pub(super) fn reconnect(&self, conn: Conn) {
        if lock(&self.writer).send(WriterCmd::Connect(conn)).is_err() {
            return;
        }
        *lock(&self.lost) = None;
        self.progress.lost.store(false, Ordering::Release);
        let asked: Vec<u64> = lock(&self.slots)
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Requested(_)))
            .map(|(&g, _)| g)
            .collect();
        for gpa in asked {
            self.send(Message::Request(gpa));
        }
        // Faults parked as Held ask again.
        self.notifier.notify();
    }

    /// Stores an arriving page: `None` for a duplicate, else whether a fault
    /// had asked for it; `Err` for a page the source may not send.
    pub(super) fn arrive(
        &self,
        gpa: u64,
        requested: bool,
        data: Vec<u8>,
    ) -> Result<Option<bool>, MigrationError> {
        if !self.is_data(gpa) {
            return Err(MigrationError::Protocol(format!(
                "the source sent page {gpa:#x}, outside the data it announced"
            )));
        }
        let mut c = lock(&self.counters);
        if super::wire::is_zero(&data) {
            c.zero_pages += 1;
            c.bytes += 5 + 8;
        } else {
            c.bytes += 5 + 8 + PAGE64;
        }
        if requested {
            c.answered += 1;
        } else {
            c.pushed += 1;
        }
        let mut slots = lock(&self.slots);
        let mut asked = false;
        match slots.get(&gpa) {
            Some(Slot::Arrived(_) | Slot::Taken) => {
                c.duplicates += 1;
                return Ok(None);
            }
            Some(Slot::Requested(t)) => {
                asked = true;
                let d = t.elapsed();
                c.latency.record_duration(d);
                if c.samples.len() < MAX_SAMPLES {
                    c.samples.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                }
                if !requested {
                    c.requests_met_by_push += 1;
                }
            }
            None => {}
        }
        slots.insert(gpa, Slot::Arrived(data));
        self.arrived.fetch_add(1, Ordering::AcqRel);
        self.progress.received.fetch_add(1, Ordering::Relaxed);
        Ok(Some(asked))
    }
}

impl PageSource for RemoteSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        let unit = usize::try_from(self.unit()).unwrap_or(PAGE);
        // bulk_cheap() is false: the core asks one unit at a time (a 4 KiB
        // page, or on huge pages a whole huge page).
        if buf.len() != PAGE && buf.len() != unit {
            return FetchOutcome::Failed(SourceError::BadRequest {
                offset,
                len: buf.len(),
            });
        }
        if self.extents.get().is_none() {
            // Before the switchover no vCPU runs; nothing is known yet.
            return FetchOutcome::Retry(RetryReason::Held);
        }
        let lost = lock(&self.lost).is_some();
        if buf.len() == PAGE {
            return self.fetch_page(offset, buf, lost);
        }
        // A huge page: every 4 KiB page of it, each missing one asked for
        // (all at once, so one round trip's worth of waiting per huge page).
        let (mut zeros, mut retry) = (true, None);
        for (i, chunk) in buf.chunks_exact_mut(PAGE).enumerate() {
            let gpa = offset + (i * PAGE) as u64;
            match self.fetch_page(gpa, chunk, lost) {
                FetchOutcome::Ready => zeros = false,
                FetchOutcome::Zero => chunk.fill(0),
                FetchOutcome::Retry(r) => {
                    // Held (source lost) wins over NotReady.
                    if retry != Some(RetryReason::Held) {
                        retry = Some(r);
                    }
                }
                other => return other,
            }
        }
        match retry {
            Some(r) => FetchOutcome::Retry(r),
            None if zeros => FetchOutcome::Zero,
            None => FetchOutcome::Ready,
        }
    }

    fn bulk_cheap(&self) -> bool {
        false
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

/// The writer thread: writes queued messages in order on the current
/// connection; a failed write marks the source lost (until a `Connect`).
fn write_requests(mut conn: Conn, rx: &mpsc::Receiver<WriterCmd>, src: &Weak<RemoteSource>) {
    let mut broken = false;
    while let Ok(cmd) = rx.recv() {
        match cmd {
            WriterCmd::Connect(c) => {
                conn = c;
                broken = false;
            }
            WriterCmd::Send(m) if !broken => {
                if encode(&mut conn, &m).and_then(|()| conn.flush()).is_err() {
                    broken = true;
                    if let Some(s) = src.upgrade() {
                        s.set_lost("sending a page request failed".into());
                    }
                }
            }
            WriterCmd::Send(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::decode;
    use std::os::unix::net::UnixStream;

    #[test]
    fn remote_source_requests_once_serves_arrivals_and_holds_after_loss() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let src = RemoteSource::new(
            "t".into(),
            Conn::Unix(ours),
            Arc::default(),
            SeccompMode::process_default(),
        )
        .unwrap();
        let mut buf = vec![0xffu8; PAGE];
        // Before the switchover nothing is served, not even a zero page.
        assert_eq!(
            src.fetch(0x8000, &mut buf),
            FetchOutcome::Retry(RetryReason::Held)
        );
        src.switch(vec![(0x1000, 0x2000)], HashMap::new());
        // Outside the data: a zero page, nothing asked.
        assert_eq!(src.fetch(0x8000, &mut buf), FetchOutcome::Zero);
        // A data page: one request, however often the core retries.
        for _ in 0..3 {
            assert_eq!(
                src.fetch(0x1000, &mut buf),
                FetchOutcome::Retry(RetryReason::NotReady)
            );
        }
        assert_eq!(decode(&mut peer).unwrap(), Message::Request(0x1000));
        assert_eq!(src.arrive(0x1000, true, vec![5; PAGE]).unwrap(), Some(true));
        assert_eq!(src.fetch(0x1000, &mut buf), FetchOutcome::Ready);
        assert!(buf.iter().all(|&b| b == 5));
        // A duplicate is dropped; a page outside the data is refused.
        assert_eq!(src.arrive(0x1000, false, vec![6; PAGE]).unwrap(), None);
        assert!(src.arrive(0x9000, false, vec![6; PAGE]).is_err());
        // After a loss, a page not received is held, never zero.
        src.set_lost("cut".into());
        assert_eq!(
            src.fetch(0x2000, &mut buf),
            FetchOutcome::Retry(RetryReason::Held)
        );
        assert_eq!(src.lost().as_deref(), Some("cut"));
    }

    #[test]
    fn precopied_pages_need_list_and_reconnect() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let pre = HashMap::from([(0x8000, vec![7u8; PAGE])]);
        let progress = Arc::new(Progress::default());
        // Post-copy data: pages 0x1000..0x4000 (three); 0x8000 was pre-copied.
        let src = RemoteSource::new(
            "t".into(),
            Conn::Unix(ours),
            progress.clone(),
            SeccompMode::process_default(),
        )
        .unwrap();
        src.switch(vec![(0x1000, 0x3000)], pre);
        let mut buf = vec![0u8; PAGE];
        // A pre-copied page is served from memory, and again (a fill may fail)
        // until it is placed; other pages outside the post-copy data are zero.
        for _ in 0..2 {
            assert_eq!(src.fetch(0x8000, &mut buf), FetchOutcome::Ready);
            assert!(buf.iter().all(|&b| b == 7));
        }
        assert_eq!(src.fetch(0x9000, &mut buf), FetchOutcome::Zero);
        // The first page arrives, the second is asked for, then the source is lost.
        assert_eq!(src.arrive(0x1000, false, vec![1; PAGE]).unwrap(), Some(false));
        assert_eq!(
            src.fetch(0x2000, &mut buf),
            FetchOutcome::Retry(RetryReason::NotReady)
        );
        assert_eq!(decode(&mut peer).unwrap(), Message::Request(0x2000));
        assert!(!src.all_arrived());
        src.set_lost("cut".into());
        assert!(progress.lost.load(Ordering::Acquire));
        // Missing: the second and third pages (bits 1 and 2).
        assert_eq!(src.need(), vec![0b110]);
        // A new connection: the waiting fault's page is asked for again.
        let (ours2, mut peer2) = UnixStream::pair().unwrap();
        src.reconnect(Conn::Unix(ours2));
        assert!(src.lost().is_none() && !progress.lost.load(Ordering::Acquire));
        assert_eq!(decode(&mut peer2).unwrap(), Message::Request(0x2000));
        assert_eq!(src.arrive(0x2000, true, vec![2; PAGE]).unwrap(), Some(true));
        assert_eq!(src.arrive(0x3000, false, vec![3; PAGE]).unwrap(), Some(false));
        assert!(src.all_arrived());
        assert_eq!(src.need(), vec![0]);
    }
}
