//! The destination side of a migration, without the VM: accepting the
//! source, reading what comes before post-copy (pre-copied pages, the state,
//! the data extents), then, once the caller runs the VM, the session that
//! receives pages on both connections, places pre-copied pages, notices a
//! lost source and waits for its recovery. The session reports what its
//! owner must do with the VM as [`MigrationEvent`]s: it never touches the VM
//! itself.

use super::outgoing::{extent_pages, extents_of, extents_of_runs};
use super::remote::{Progress, RemoteSource};
use super::status::{Percentiles, Phase};
use super::transport::{
    accept_authenticated, Admissions, Conn, Deadline, Endpoint, Listener, Security, HANDSHAKE_WAIT,
};
use super::wire::{bitmap_runs, decode, encode, Message, PAGE, PAGE64};
use super::{io, lock, MigrationError};
use crate::snapshot::check_received;
use crate::state::SavedVm;
use sandbox::{SeccompMode, ThreadClass};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_core::memory::Materializer;
use vmm_core::state::ConfigState;

/// What the destination's VM must do, from the session's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEvent {
    /// The source (or one of its connections) is lost before every page
    /// arrived: pause the VM (no missing page is ever zero-filled; its
    /// faults stay parked) and keep it paused until [`Recovered`](Self::Recovered).
    SourceLost(String),
    /// The source came back (`recover`): the VM may run again.
    Recovered,
    /// The lost source did not come back in time: end the run.
    GaveUp,
    /// Every page arrived.
    Complete,
}

/// A `recover` request, from the controller to the incoming session.
#[derive(Debug)]
pub struct RecoverRequest {
    /// Where to wait for the source.
    pub from: Endpoint,
    /// How the source must authenticate there (`None`: as for the first
    /// connection, the listener `vmm receive` was started with).
    pub security: Option<Security>,
    /// The address once listening, or why not.
    pub reply: Sender<Result<Endpoint, MigrationError>>,
}

/// The destination's figures (`vmm receive --stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestStats {
    /// Source pause to the destination's `Resumed` as the source measured it
    /// (0 when the migration did not complete).
    pub downtime_ms: f64,
    /// State received to vCPUs started, here.
    pub resume_ms: f64,
    /// Connection accepted to the last page.
    pub total_ms: f64,
    /// Pages received during pre-copy (each round's copy counts).
    pub precopy_pages: u64,
    /// Distinct pre-copied pages kept (not written again before the switchover).
    pub precopy_kept: u64,
    /// Data pages announced for post-copy.
    pub data_pages: u64,
    /// Pages this side requested.
    pub pages_requested: u64,
    /// Pages received as answers.
    pub pages_answered: u64,
    /// Pages received from the background push.
    pub pages_pushed: u64,
    /// Requested pages that arrived by the push first.
    pub requests_met_by_push: u64,
    /// Pages asked again after a failed fill.
    pub resends: u64,
    /// Pages received twice (dropped).
    pub duplicates: u64,
    /// Bytes of page messages received.
    pub bytes: u64,
    /// Request to arrival, bucket `i` = `[2^i, 2^(i+1))` us.
    pub latency_us_log2: Vec<u64>,
    /// Upper bound of the bucket holding the median / 99th percentile, us.
    pub latency_p50_us: u64,
    /// See `latency_p50_us`.
    pub latency_p99_us: u64,
    /// vCPU time blocked in stage-2 faults, all vCPUs.
    pub vcpu_blocked_us: u64,
    /// Faults answered Held while the source was lost.
    pub held_after_loss: u64,
    /// Times the source was lost and came back (`recover`).
    pub recoveries: u32,
    /// Page-store reads (in flight or held) carried over in the VM state:
    /// they complete here.
    pub page_store_reads_carried: u64,
    /// Where the migration stands (see [`Phase::name`]).
    pub status: &'static str,
    /// Building the VM (KVM objects, memory registered, devices) when the
    /// connection opened, before the source paused: not in the downtime.
    pub build_ms: f64,
    /// The downtime's parts on this side.
    pub downtime_parts: DestDowntime,
    /// Exact page-request latency (request to arrival), from every sample.
    pub requests: Percentiles,
    /// Pages received as zero pages (address only).
    pub zero_pages: u64,
    /// Bytes received during pre-copy.
    pub precopy_bytes: u64,
    /// When the vCPUs started here, on the wall clock (microseconds since
    /// the Unix epoch; see the source's `downtime.paused_unix_us`).
    pub vcpus_started_unix_us: u64,
}

/// The destination's part of the downtime (ms), from the state's arrival.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct DestDowntime {
    /// Decoding and checking the state and the page list.
    pub check_ms: f64,
    /// Applying the state to the VM built before (KVM, vCPU, device state).
    pub apply_ms: f64,
    /// Starting the vCPUs and the controller and sending `Resumed`.
    pub start_ms: f64,
    /// The part of `start_ms` spent starting the vCPU threads (each installs
    /// its seccomp filter before its first `KVM_RUN`).
    #[serde(default)]
    pub vcpus_ms: f64,
}

/// What arrives before post-copy.
struct Prelude {
    /// `state.json`.
    state: Vec<u8>,
    /// The RAM size announced for pre-copy.
    mem_size: Option<u64>,
    /// The pre-copied pages (the last copy of each).
    pages: HashMap<u64, Vec<u8>>,
}

/// Reads the pre-copy pages (if the source sends any) up to the state.
/// Only the last copy of each page is kept, and only pages inside the RAM
/// announced by `PrecopyBegin` (itself at most the largest guest): what is
/// buffered is bounded by that size, whatever the source sends.
fn receive_precopy(
    conn: &mut Conn,
    head: Message,
    progress: &Progress,
    left: &dyn Fn() -> Option<Duration>,
) -> Result<Prelude, MigrationError> {
    let mut precopied = HashMap::new();
    let mem_size = match head {
        Message::State(state) => {
            return Ok(Prelude {
                state,
                mem_size: None,
                pages: precopied,
            })
        }
        Message::PrecopyBegin { mem_size } if mem_size <= abi::layout::MAX_MEM_SIZE => mem_size,
        Message::PrecopyBegin { mem_size } => {
            return Err(MigrationError::Protocol(format!(
                "the source announced {mem_size} bytes of guest RAM, more than the largest guest"
            )))
        }
        _ => {
            return Err(MigrationError::Protocol(
                "the first message is neither the VM state nor the start of pre-copy".into(),
            ))
        }
    };
    let ranges = abi::layout::ram_ranges(mem_size);
    loop {
        // The time left until `--timeout` (if any) bounds each read.
        conn.set_read_timeout(left())?;
        match decode(conn)? {
            Message::PrecopyPage { gpa, data } => {
                if !ranges.iter().any(|&(s, l)| gpa >= s && gpa - s < l) {
                    return Err(MigrationError::Protocol(format!(
                        "the source sent page {gpa:#x}, outside guest RAM"
                    )));
                }
                precopied.insert(gpa, data);
                progress.precopy_pages.fetch_add(1, Ordering::Relaxed);
            }
            Message::State(state) => {
                return Ok(Prelude {
                    state,
                    mem_size: Some(mem_size),
                    pages: precopied,
                })
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected message during pre-copy: {}",
                    other.summary()
                )))
            }
        }
    }
}

/// An accepted migration whose configuration (`Setup`) has arrived: the VM
/// can be built while the source still runs; then
/// [`switchover`](Self::switchover) waits for its state.
#[derive(Debug)]
pub struct Incoming {
    conn: Conn,
    answers: Conn,
    security: Security,
    accepted: Instant,
    config: ConfigState,
    src: Arc<RemoteSource>,
    progress: Arc<Progress>,
    /// `--timeout`: the deadline of every read before post-copy.
    end: Option<Deadline>,
    wait: Option<Duration>,
    /// How the session's threads are sandboxed.
    seccomp: SeccompMode,
}

/// A migration whose state has arrived (after [`Incoming::switchover`]).
#[derive(Debug)]
pub struct Switched {
    conn: Conn,
    answers: Conn,
    security: Security,
    accepted: Instant,
    got_state: Instant,
    state: SavedVm,
    data_ranges: Vec<(u64, u64)>,
    src: Arc<RemoteSource>,
    to_place: Vec<u64>,
    precopy_pages: u64,
    precopy_kept: u64,
    data_pages: u64,
    reads_carried: u64,
    check_ms: f64,
    seccomp: SeccompMode,
}

impl Incoming {
    /// Accepts one migration on `listener`: waits (up to `wait`, forever if
    /// `None`) for a source that authenticates, accepts its answer channel,
    /// then reads the VM's configuration (`Setup`). Peers that fail to
    /// authenticate are refused and logged; the wait goes on. Nothing of a
    /// peer's is buffered before it has authenticated. The session's
    /// threads are sandboxed in `seccomp` mode.
    pub fn accept(
        listener: &Listener,
        progress: Arc<Progress>,
        wait: Option<Duration>,
        seccomp: SeccompMode,
    ) -> Result<Incoming, MigrationError> {
        progress.set_phase(Phase::Setup);
        // One set of admissions for both connections: the source opens the
        // main one first, but their admissions may end in either order.
        let end = wait.map(Deadline::after);
        let admissions = Admissions::new(None).sandboxed(seccomp);
        let first = admissions.next(listener, end)?;
        let accepted = Instant::now();
        let handshake = listener.security().handshake_timeout;
        let second = admissions
            .next(listener, Some(Deadline::after(handshake)))
            .map_err(no_answer_channel)?;
        // Every read below has a deadline: a source that opens both
        // connections and then says nothing on one of them, or stalls its
        // pre-copy, does not hold the destination past `--timeout` (nor its
        // first messages past the handshake timeout), whatever it is.
        // `second` is the answer channel (the main connection finishes its
        // admission before the source opens the other), whose first message
        // (`Preempt`) is sent as it opens: the handshake timeout bounds it.
        // The main connection's first message may come late (a lazily
        // restored source fetches its memory in full first): only
        // `--timeout` bounds it.
        let first_by = end.map_or(handshake, |e| e.left().unwrap_or(Duration::ZERO).min(handshake));
        second.set_read_timeout(Some(first_by.max(Duration::from_millis(1))))?;
        first.set_read_timeout(
            end.map(|e| e.left().unwrap_or(Duration::ZERO).max(Duration::from_millis(1))),
        )?;
        let late = |what: &'static str| {
            move || MigrationError::TimedOut {
                secs: wait.unwrap_or_default().as_secs_f64(),
                what,
            }
        };
        let reading = Instant::now();
        let (conn, answers, head) = main_and_answers(first, second).map_err(|e| {
            timed_out(e, || {
                if reading.elapsed() > first_by + Duration::from_millis(500) {
                    // The main connection, silent until `--timeout`.
                    return late("its first message")();
                }
                MigrationError::Protocol(format!(
                    "the source opened its connections and sent nothing on one of them within {} s",
                    (first_by.as_secs_f64() * 10.0).round() / 10.0
                ))
            })
        })?;
        answers.set_read_timeout(None)?;
        conn.set_read_timeout(None)?;
        let Message::Setup(json) = head else {
            return Err(MigrationError::Protocol(
                "the first message is not the VM's configuration (Setup)".into(),
            ));
        };
        let config: ConfigState = serde_json::from_slice(&json)
            .map_err(|e| MigrationError::Protocol(format!("the VM's configuration is malformed: {e}")))?;
        if config.mem_size > abi::layout::MAX_MEM_SIZE {
            return Err(MigrationError::Protocol(format!(
                "the source announced {} bytes of guest RAM, more than the largest guest",
                config.mem_size
            )));
        }
        let src = RemoteSource::new("migration".into(), conn.try_clone()?, progress.clone(), seccomp)?;
        Ok(Incoming {
            conn,
            answers,
            security: listener.security().clone(),
            accepted,
            config,
            src,
            progress,
            end,
            wait,
            seccomp,
        })
    }

    /// Tells the source the VM is built: it pauses only after this.
    pub fn ready(&mut self) -> Result<(), MigrationError> {
        encode(&mut self.conn, &Message::Ready).map_err(io("telling the source the VM is built"))?;
        std::io::Write::flush(&mut self.conn).map_err(io("telling the source the VM is built"))
    }

    /// The VM's configuration, as the source sent it.
    pub fn config(&self) -> &ConfigState {
        &self.config
    }

    /// The page source the VM's memory is served from (it answers nothing
    /// before the switchover: no vCPU runs then).
    pub fn source(&self) -> Arc<RemoteSource> {
        self.src.clone()
    }

    /// Reads what comes up to post-copy: pre-copied pages (if the source
    /// sends any), the state, the page map; checks them (the state against
    /// the configuration received first); the source is paused from the
    /// state on. Every read has the deadline of `--timeout` (if any).
    pub fn switchover(self) -> Result<Switched, MigrationError> {
        let Incoming {
            mut conn,
            answers,
            security,
            accepted,
            config,
            src,
            progress,
            end,
            wait,
            seccomp,
        } = self;
        let late = |what: &'static str| {
            move || MigrationError::TimedOut {
                secs: wait.unwrap_or_default().as_secs_f64(),
                what,
            }
        };
        let left = || end.map(|e| e.left().unwrap_or(Duration::ZERO).max(Duration::from_millis(1)));
        conn.set_read_timeout(left())?;
        let head = decode(&mut conn).map_err(|e| timed_out(e, late("its pre-copy or state")))?;
        if matches!(head, Message::PrecopyBegin { .. }) {
            progress.set_phase(Phase::Precopy(1));
        }
        let Prelude {
            state,
            mem_size: precopy_mem,
            pages: mut precopied,
        } = receive_precopy(&mut conn, head, &progress, &left)
            .map_err(|e| timed_out(e, late("its pre-copy pages or state")))?;
        progress.set_phase(Phase::Switchover);
        conn.set_read_timeout(left())?;
        let Message::PageMap(bits) = decode(&mut conn).map_err(|e| timed_out(e, late("its page map")))?
        else {
            return Err(MigrationError::Protocol(
                "the message after the state is not the page map".into(),
            ));
        };
        conn.set_read_timeout(None)?;
        let got_state = Instant::now();
        // Runs, not a list of every page (1M of them for 4 GiB guest).
        let extents = extents_of_runs(&bitmap_runs(&bits, config.mem_size)?);
        // Checks every extent: aligned, sorted, inside RAM, at most EXTENT_MAX.
        let saved = check_received(&state, &extents)?;
        if saved.vm.config != config {
            return Err(MigrationError::Protocol(
                "the VM state's configuration differs from the one announced at setup".into(),
            ));
        }
        if precopy_mem.is_some_and(|m| m != saved.vm.config.mem_size) {
            return Err(MigrationError::Protocol(
                "the VM state's RAM size differs from the one announced for pre-copy".into(),
            ));
        }
        let pairs: Vec<(u64, u64)> = extents.iter().map(|e| (e.gpa, e.len)).collect();
        let data_pages = extents.iter().map(|e| e.len / PAGE64).sum();
        let precopy_pages = progress.precopy_pages.load(Ordering::Relaxed);
        // Pages written after their last pre-copy come again in post-copy.
        if !precopied.is_empty() {
            for gpa in extent_pages(&extents) {
                precopied.remove(&gpa);
            }
        }
        let precopy_kept = precopied.len() as u64;
        let mut to_place: Vec<u64> = precopied.keys().copied().collect();
        to_place.sort_unstable();
        // The VM's data ranges cover the kept pre-copied pages too, so that
        // fetching its memory in full (a snapshot, a further migration) gets
        // the ones not placed yet.
        let data_ranges = if to_place.is_empty() {
            pairs.clone()
        } else {
            let mut all: Vec<u64> = extent_pages(&extents).collect();
            all.extend_from_slice(&to_place);
            all.sort_unstable();
            extents_of(&all).iter().map(|e| (e.gpa, e.len)).collect()
        };
        progress.data_pages.store(data_pages, Ordering::Relaxed);
        src.switch(pairs, precopied);
        let store = &saved.vm.devices.page_store;
        let reads_carried = (store.in_flight.len() + store.held_reads.len()) as u64;
        Ok(Switched {
            conn,
            answers,
            security,
            accepted,
            got_state,
            check_ms: got_state.elapsed().as_secs_f64() * 1e3,
            state: saved,
            data_ranges,
            src,
            to_place,
            precopy_pages,
            precopy_kept,
            data_pages,
            reads_carried,
            seccomp,
        })
    }
}

impl Switched {
    /// The VM's state.
    pub fn state(&self) -> &SavedVm {
        &self.state
    }

    /// The guest-physical ranges that hold data (the rest is zero).
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.data_ranges.clone()
    }

    /// The VM runs here (its memory served from [`source`](Self::source)
    /// through `materializer`'s retry cores): tells the source and starts
    /// the session. `events` is called from the session's threads.
    pub fn start(
        self,
        materializer: Materializer,
        lost_wait: Duration,
        applied_ms: f64,
        vcpus_ms: f64,
        build_ms: f64,
        events: impl Fn(MigrationEvent) + Send + Sync + 'static,
    ) -> Result<IncomingSession, MigrationError> {
        let src = self.src;
        let vcpus_started_unix_us = super::unix_us();
        let took = self.got_state.elapsed();
        src.send(Message::Resumed {
            took_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        });
        let resume_ms = took.as_secs_f64() * 1e3;
        src.progress.running.store(true, Ordering::Release);
        src.progress.set_phase(Phase::Postcopy);
        let parts = DestDowntime {
            check_ms: self.check_ms,
            apply_ms: applied_ms,
            start_ms: (resume_ms - self.check_ms - applied_ms).max(0.0),
            vcpus_ms,
        };
        let events: Arc<dyn Fn(MigrationEvent) + Send + Sync> = Arc::new(events);
        // Cleared when the session ends: the VM's memory is no longer to be filled.
        let placing = Arc::new(AtomicBool::new(true));
        let placer = {
            let (src, m, placing, to_place) =
                (src.clone(), materializer.clone(), placing.clone(), self.to_place);
            sandbox::spawn(
                std::thread::Builder::new().name("migration-place".into()),
                ThreadClass::MigrationDest,
                self.seccomp,
                move || place_precopied(&src, &m, &placing, to_place),
            )
            .map_err(|e| io("starting the placer thread")(e.into()))?
        };
        let done_at = Arc::new(Mutex::new(None::<(Instant, u64)>));
        let receivers = Receivers {
            src: src.clone(),
            done_at: done_at.clone(),
            materializer,
            events: events.clone(),
            seccomp: self.seccomp,
        };
        let handles = vec![
            receivers.spawn(&self.conn, true)?,
            receivers.spawn(&self.answers, false)?,
        ];
        let (recover_tx, recover_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut watch = Watch {
            src: src.clone(),
            conn: self.conn,
            answers: self.answers,
            security: self.security,
            admissions: Admissions::new(Some(Message::Resume)).sandboxed(self.seccomp),
            receivers,
            handles,
            recover_rx,
            stop: stop.clone(),
            lost_wait,
            events,
        };
        let watcher = sandbox::spawn(
            std::thread::Builder::new().name("migration-watch".into()),
            ThreadClass::MigrationDest,
            self.seccomp,
            move || watch.run(),
        )
        .map_err(|e| io("starting the migration watcher")(e.into()))?;
        Ok(IncomingSession {
            src,
            recover_tx,
            stop,
            placing,
            placer: Some(placer),
            watcher: Some(watcher),
            done_at,
            fixed: Fixed {
                accepted: self.accepted,
                resume_ms,
                build_ms,
                parts,
                vcpus_started_unix_us,
                precopy_pages: self.precopy_pages,
                precopy_kept: self.precopy_kept,
                data_pages: self.data_pages,
                reads_carried: self.reads_carried,
            },
        })
    }
}

/// Places the kept pre-copied pages in the background (a fault on one is
/// served from memory at once meanwhile).
fn place_precopied(src: &RemoteSource, m: &Materializer, placing: &AtomicBool, to_place: Vec<u64>) {
    // Bulk work: faults and answers go first.
    super::lower_priority();
    let unit = src.unit();
    let mut last_unit = u64::MAX;
    for gpa in to_place {
        if !placing.load(Ordering::Acquire) {
            break;
        }
        // Huge pages: a unit once (its pages come sorted), and only when
        // complete; else its last post-copied page places it on arrival.
        let base = gpa - gpa % unit;
        if unit > PAGE64 && (base == last_unit || !src.unit_ready(base)) {
            last_unit = base;
            continue;
        }
        last_unit = base;
        if let Err(e) = m.resolve_page(gpa) {
            if placing.load(Ordering::Acquire) {
                tracing::warn!("placing pre-copied page {gpa:#x}: {e}");
            }
        }
        // Dropped only once mapped: a fault's fill that is still in flight
        // may not have fetched it yet (the copy then stays until the VM ends).
        if m.is_present(gpa) {
            let mut kept = lock(&src.precopied);
            for g in (base..base + unit).step_by(PAGE) {
                kept.remove(&g);
            }
        }
    }
}

/// What a receiver thread needs.
#[derive(Clone)]
struct Receivers {
    src: Arc<RemoteSource>,
    done_at: Arc<Mutex<Option<(Instant, u64)>>>,
    materializer: Materializer,
    events: Arc<dyn Fn(MigrationEvent) + Send + Sync>,
    seccomp: SeccompMode,
}

impl Receivers {
    /// One receiver per connection.
    /// `bulk`: the main connection (pushed pages), whose thread yields
    /// the CPU to the answer channel's.
    fn spawn(&self, conn: &Conn, bulk: bool) -> Result<JoinHandle<()>, MigrationError> {
        let r = self.clone();
        let mut reader = conn.try_clone()?;
        sandbox::spawn(
            std::thread::Builder::new().name("migration-in".into()),
            ThreadClass::MigrationDest,
            self.seccomp,
            move || {
                if bulk {
                    super::lower_priority();
                }
                match receive_pages(&r.src, &mut reader, &r.materializer, &r.done_at) {
                    Ok(true) => (r.events)(MigrationEvent::Complete),
                    Ok(false) => {}
                    Err(e) => r.src.set_lost(e.to_string()),
                }
            },
        )
        .map_err(|e| io("starting the receiver thread")(e.into()))
    }
}

/// The session's watcher: notices a lost source, serves `recover`
/// requests, takes the source back, gives up after the lost wait.
struct Watch {
    src: Arc<RemoteSource>,
    conn: Conn,
    answers: Conn,
    /// How a source that comes back must authenticate, unless the
    /// `recover` request says otherwise.
    security: Security,
    /// Sources connecting to resume, authenticating.
    admissions: Admissions,
    receivers: Receivers,
    handles: Vec<JoinHandle<()>>,
    recover_rx: Receiver<RecoverRequest>,
    stop: Arc<AtomicBool>,
    lost_wait: Duration,
    events: Arc<dyn Fn(MigrationEvent) + Send + Sync>,
}

impl Watch {
    /// Returns the number of recoveries.
    fn run(&mut self) -> u32 {
        let mut lost_deadline: Option<Instant> = None;
        let mut gave_up = false;
        let mut recoveries = 0;
        let mut waiting: Option<Listener> = None;
        while !self.stop.load(Ordering::Acquire) {
            if let (None, Some(why)) = (lost_deadline, self.src.lost()) {
                // Both connections go: the source must see the failure too
                // (and keep its VM resumable) even if only one of them broke.
                self.conn.shutdown();
                self.answers.shutdown();
                self.src.progress.set_phase(Phase::Paused);
                (self.events)(MigrationEvent::SourceLost(why));
                lost_deadline = Some(Instant::now() + self.lost_wait);
            }
            while let Ok(req) = self.recover_rx.try_recv() {
                let r = match self.src.lost() {
                    None => Err(MigrationError::NotInterrupted),
                    Some(_) => {
                        Listener::bind_with(&req.from, req.security.unwrap_or_else(|| self.security.clone()))
                            .and_then(|l| {
                                let at = l.endpoint()?;
                                waiting = Some(l);
                                self.src.progress.set_phase(Phase::Recovering);
                                // The operator now starts the source's side.
                                lost_deadline = Some(Instant::now() + self.lost_wait);
                                Ok(at)
                            })
                    }
                };
                let _ = req.reply.send(r);
            }
            let mut refused = None;
            let back = waiting
                .as_ref()
                .and_then(|l| self.admissions.poll(l, Duration::ZERO, &mut refused));
            if let Some((new, l)) = back.and_then(|new| waiting.take().map(|l| (new, l))) {
                match self.take_back(new, &l) {
                    Ok(()) => {
                        lost_deadline = None;
                        recoveries += 1;
                        lock(&self.src.counters).recoveries = recoveries;
                        self.src.progress.set_phase(Phase::Postcopy);
                        tracing::info!("the migration source is back");
                        (self.events)(MigrationEvent::Recovered);
                    }
                    Err(e) => {
                        tracing::warn!("a peer connected to resume the migration but failed: {e}");
                        waiting = Some(l);
                    }
                }
            }
            if !gave_up && lost_deadline.is_some_and(|d| Instant::now() >= d) {
                gave_up = true;
                self.src.progress.set_phase(Phase::Failed);
                (self.events)(MigrationEvent::GaveUp);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.conn.shutdown();
        self.answers.shutdown();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        recoveries
    }

    /// Takes back a source that connected to resume the migration.
    fn take_back(&mut self, new: Conn, listener: &Listener) -> Result<(), MigrationError> {
        // Nothing may arrive on the old connections once `Need` is computed
        // (a page would come twice).
        self.conn.shutdown();
        self.answers.shutdown();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        let (conn, answers) = resume_with(&self.src, new, listener)?;
        self.conn = conn;
        self.answers = answers;
        // Requests and `Complete` go to the new connection before anything
        // can arrive on it (a `Done` is answered at once).
        self.src.reconnect(self.conn.try_clone()?);
        self.handles = vec![
            self.receivers.spawn(&self.conn, true)?,
            self.receivers.spawn(&self.answers, false)?,
        ];
        Ok(())
    }
}

/// A running incoming migration.
#[derive(Debug)]
pub struct IncomingSession {
    src: Arc<RemoteSource>,
    recover_tx: Sender<RecoverRequest>,
    stop: Arc<AtomicBool>,
    placing: Arc<AtomicBool>,
    placer: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<u32>>,
    done_at: Arc<Mutex<Option<(Instant, u64)>>>,
    fixed: Fixed,
}

/// The session's figures known at its start.
#[derive(Debug, Clone, Copy)]
struct Fixed {
    accepted: Instant,
    resume_ms: f64,
    build_ms: f64,
    parts: DestDowntime,
    vcpus_started_unix_us: u64,
    precopy_pages: u64,
    precopy_kept: u64,
    data_pages: u64,
    reads_carried: u64,
}

/// The destination's figures now.
fn dest_stats(
    src: &RemoteSource,
    done_at: &Mutex<Option<(Instant, u64)>>,
    f: &Fixed,
    recoveries: u32,
    vcpu_blocked_us: u64,
) -> DestStats {
    let c = lock(&src.counters);
    let done = *lock(done_at);
    DestStats {
        downtime_ms: done.map_or(0.0, |(_, us)| us as f64 / 1e3),
        resume_ms: f.resume_ms,
        total_ms: done.map_or(0.0, |(t, _)| (t - f.accepted).as_secs_f64() * 1e3),
        precopy_pages: f.precopy_pages,
        precopy_kept: f.precopy_kept,
        data_pages: f.data_pages,
        pages_requested: c.requested,
        pages_answered: c.answered,
        pages_pushed: c.pushed,
        requests_met_by_push: c.requests_met_by_push,
        resends: c.resends,
        duplicates: c.duplicates,
        bytes: c.bytes,
        latency_p50_us: c.latency.percentile_upper_bound_us(0.5),
        latency_p99_us: c.latency.percentile_upper_bound_us(0.99),
        latency_us_log2: c.latency.buckets(),
        vcpu_blocked_us,
        held_after_loss: c.held_after_loss,
        recoveries: recoveries.max(c.recoveries),
        page_store_reads_carried: f.reads_carried,
        status: src.progress.phase().name(),
        build_ms: f.build_ms,
        downtime_parts: f.parts,
        requests: Percentiles::of(&c.samples),
        zero_pages: c.zero_pages,
        precopy_bytes: f.precopy_pages * (5 + 8 + PAGE64),
        vcpus_started_unix_us: f.vcpus_started_unix_us,
    }
}

impl IncomingSession {
    /// Where `recover` requests go (the controller's hook).
    pub fn recover_requests(&self) -> Sender<RecoverRequest> {
        self.recover_tx.clone()
    }

    /// Set while the source is lost (the VM's memory cannot be fetched in
    /// full then): a stop flag for whoever fetches it.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.src.progress.lost.clone()
    }

    /// Why the source was lost before every page arrived, if it was.
    pub fn lost(&self) -> Option<String> {
        self.src.lost()
    }

    /// Ends the session (the VM has ended) and returns its figures;
    /// `vcpu_blocked_us` is the VM's stage-2 blocked time.
    pub fn finish(mut self, vcpu_blocked_us: u64) -> DestStats {
        self.placing.store(false, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let recoveries = self.watcher.take().and_then(|w| w.join().ok()).unwrap_or(0);
        if let Some(p) = self.placer.take() {
            let _ = p.join();
        }
        if !self.src.progress.complete.load(Ordering::Acquire) {
            self.src.progress.set_phase(Phase::Failed);
        }
        dest_stats(&self.src, &self.done_at, &self.fixed, recoveries, vcpu_blocked_us)
    }

    /// The figures now, for `vmm ctl DEST migration` (as JSON; the caller
    /// adds the VM's blocktime).
    pub fn report_fn(&self) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
        let (src, done_at, fixed) = (self.src.clone(), self.done_at.clone(), self.fixed);
        Arc::new(move || {
            let mut v = serde_json::to_value(dest_stats(&src, &done_at, &fixed, 0, 0)).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("role".into(), "destination".into());
                o.remove("vcpu_blocked_us");
            }
            v
        })
    }
}

/// `on_timeout()` if `e` is a read that timed out, else `e`.
fn timed_out(e: MigrationError, on_timeout: impl FnOnce() -> MigrationError) -> MigrationError {
    match &e {
        MigrationError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            on_timeout()
        }
        _ => e,
    }
}

/// The answer channel did not come in time.
fn no_answer_channel(e: MigrationError) -> MigrationError {
    match e {
        MigrationError::NoPeer { secs, refused } => MigrationError::Protocol(format!(
            "the source did not open its answer channel within {secs} s{}",
            refused.map(|r| format!(" (refused: {r})")).unwrap_or_default()
        )),
        e => e,
    }
}

/// Tells the main connection from the answer channel by their first
/// messages: `Preempt` on the answer channel (sent as it opens), the
/// migration's first (`PrecopyBegin` or `State`) on the main connection.
/// `second` is nearly always the answer channel; if it is the main
/// connection, its first message comes at the latest at the switchover.
/// Returns the main connection, the answer channel and the main one's
/// first message.
fn main_and_answers(mut first: Conn, mut second: Conn) -> Result<(Conn, Conn, Message), MigrationError> {
    let both_main =
        || MigrationError::Protocol("the source opened two main connections and no answer channel".into());
    match decode(&mut second)? {
        Message::Preempt => match decode(&mut first)? {
            Message::Preempt => Err(MigrationError::Protocol(
                "the source opened two answer channels and no main connection".into(),
            )),
            head => Ok((first, second, head)),
        },
        head => match decode(&mut first)? {
            Message::Preempt => Ok((second, first, head)),
            _ => Err(both_main()),
        },
    }
}

/// Accepts the source's answer channel on `listener` when it resumes: its
/// second connection, opened right after `Need`, whose first message is
/// `Preempt`.
fn accept_answers(listener: &Listener) -> Result<Conn, MigrationError> {
    let wait = Deadline::after(listener.security().handshake_timeout);
    accept_authenticated(listener, Some(Message::Preempt), Some(wait)).map_err(no_answer_channel)
}

/// With a source that came back (authenticated, its `Resume` read): the
/// list of pages still missing here, and its new answer channel.
fn resume_with(
    src: &RemoteSource,
    mut conn: Conn,
    listener: &Listener,
) -> Result<(Conn, Conn), MigrationError> {
    encode(&mut conn, &Message::Need(src.need())).map_err(io("sending the missing pages"))?;
    let answers = accept_answers(listener)?;
    Ok((conn, answers))
}

/// Receives pages on one connection until `Done` (returns `true` once
/// every page arrived) or the connection ends.
fn receive_pages(
    src: &RemoteSource,
    r: &mut Conn,
    m: &Materializer,
    done_at: &Mutex<Option<(Instant, u64)>>,
) -> Result<bool, MigrationError> {
    loop {
        let msg = match decode(r)? {
            Message::ZeroPage { gpa, requested } => Message::Page {
                gpa,
                requested,
                data: vec![0; PAGE],
            },
            msg => msg,
        };
        match msg {
            Message::Page { gpa, requested, data } => {
                if let Some(asked) = src.arrive(gpa, requested, data)? {
                    // Placed now: the retry core claims the page and copies
                    // it (on huge pages: once the whole huge page is here).
                    if src.unit_ready(gpa) {
                        if let Err(e) = m.resolve_page(gpa) {
                            tracing::warn!("placing migrated page {gpa:#x}: {e}");
                        }
                        if m.is_present(gpa) {
                            src.placed_unit(gpa);
                        }
                    }
                    // A fault parked on it is retried (the copy may have lost
                    // the claim to the handler's own attempt, which then saw
                    // no data yet).
                    if asked {
                        src.notifier.notify();
                    }
                }
            }
            Message::Done { downtime_us, .. } => {
                // Answers still on the answer channel arrive first: the
                // source may end only once every page is here.
                let deadline = Instant::now() + HANDSHAKE_WAIT;
                while !src.all_arrived() {
                    if let Some(why) = src.lost() {
                        return Err(MigrationError::Protocol(format!(
                            "pages were missing at the end of the migration: {why}"
                        )));
                    }
                    if Instant::now() >= deadline {
                        return Err(MigrationError::Protocol(
                            "the source said every page was sent, but some never arrived".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                src.complete.store(true, Ordering::Release);
                src.progress.complete.store(true, Ordering::Release);
                src.progress.set_phase(Phase::Complete);
                *lock(done_at) = Some((Instant::now(), downtime_us));
                src.send(Message::Complete);
                return Ok(true);
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected message from the source: {}",
                    other.summary()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_stopped_listener_ends_a_wait_with_no_deadline() {
        let path = std::env::temp_dir().join(format!("vmm-stop-{}.sock", std::process::id()));
        let listener = Listener::bind(&super::super::Endpoint::Unix(path)).unwrap();
        let stop = listener.stopper();
        let t = std::thread::spawn(move || {
            Incoming::accept(
                &listener,
                Default::default(),
                None,
                SeccompMode::process_default(),
            )
            .map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(50));
        // No source came: the wait goes on until stopped.
        assert!(!t.is_finished());
        stop.stop();
        let r = t.join().unwrap();
        assert!(matches!(r, Err(MigrationError::Stopped)), "{r:?}");
    }
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A source (any peer that passed the admission: same user, or plain
    /// TCP) that opens both connections and goes silent on one, or stalls
    /// its pre-copy, is dropped by the handshake timeout or `--timeout`.
    #[test]
    fn a_source_that_goes_silent_before_the_state_ends_the_wait_by_the_timeout() {
        use super::super::wire::write_header;
        let path = std::env::temp_dir().join(format!("vmm-silent-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = Listener::bind(&super::super::Endpoint::Unix(path.clone())).unwrap();
        let wait = Duration::from_millis(1500);
        for answer_channel in [false, true] {
            let connect = |first: Vec<Message>| {
                let mut s = UnixStream::connect(&path).unwrap();
                write_header(&mut s).unwrap();
                for m in first {
                    encode(&mut s, &m).unwrap();
                }
                s
            };
            let config = ConfigState {
                kernel: None,
                vcpus: 1,
                mem_size: 64 << 20,
                cmdline: String::new(),
            };
            let setup = Message::Setup(serde_json::to_vec(&config).unwrap());
            let begin = Message::PrecopyBegin { mem_size: 64 << 20 };
            let _main = connect(vec![setup, begin]);
            // Without its first message (Preempt), or with it and no pre-copy after.
            let _answers = connect(if answer_channel {
                vec![Message::Preempt]
            } else {
                vec![]
            });
            let t = Instant::now();
            let e = Incoming::accept(
                &listener,
                Default::default(),
                Some(wait),
                SeccompMode::process_default(),
            )
            .and_then(Incoming::switchover)
            .unwrap_err();
            assert!(t.elapsed() < wait + Duration::from_secs(5), "{:?}", t.elapsed());
            if answer_channel {
                assert!(matches!(e, MigrationError::TimedOut { .. }), "{e}");
            } else {
                assert!(e.to_string().contains("sent nothing on one of them"), "{e}");
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// What a pre-copy keeps is bounded by the RAM it announced: one copy per
    /// page, none outside that RAM, whatever the source sends.
    #[test]
    fn precopy_keeps_one_copy_per_page_inside_the_announced_ram() {
        let (ours, peer) = UnixStream::pair().unwrap();
        let mut conn = Conn::Unix(ours);
        let progress = Progress::default();
        let mem_size = 64u64 << 20;
        let writer = std::thread::spawn(move || {
            let mut w = std::io::BufWriter::new(peer);
            encode(&mut w, &Message::PrecopyBegin { mem_size }).unwrap();
            // The same 16 pages, 50 rounds each.
            for round in 0..50u8 {
                for i in 0..16u64 {
                    let data = vec![round; PAGE];
                    encode(
                        &mut w,
                        &Message::PrecopyPage {
                            gpa: i * PAGE64,
                            data,
                        },
                    )
                    .unwrap();
                }
            }
            encode(&mut w, &Message::State(b"{}".to_vec())).unwrap();
            // A second stream: a page just past the announced RAM.
            encode(&mut w, &Message::PrecopyBegin { mem_size }).unwrap();
            let data = vec![1; PAGE];
            encode(&mut w, &Message::PrecopyPage { gpa: mem_size, data }).unwrap();
            w.flush().unwrap();
        });
        let head = decode(&mut conn).unwrap();
        let p = receive_precopy(&mut conn, head, &progress, &|| None).unwrap();
        assert_eq!(p.mem_size, Some(mem_size));
        assert_eq!(p.pages.len(), 16);
        assert!(p.pages.values().all(|d| d.iter().all(|&b| b == 49)));
        assert_eq!(progress.precopy_pages.load(Ordering::Relaxed), 800);
        let head = decode(&mut conn).unwrap();
        let e = receive_precopy(&mut conn, head, &progress, &|| None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("outside guest RAM"), "{e}");
        writer.join().unwrap();
        // A RAM size beyond the largest guest is refused before any page.
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut conn = Conn::Unix(ours);
        let huge = abi::layout::MAX_MEM_SIZE + PAGE64;
        encode(&mut peer, &Message::PrecopyBegin { mem_size: huge }).unwrap();
        let head = decode(&mut conn).unwrap();
        let e = receive_precopy(&mut conn, head, &progress, &|| None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("more than the largest guest"), "{e}");
    }
}
