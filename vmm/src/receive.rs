//! `vmm receive`: a migration destination, wiring the incoming session
//! (`migration::incoming`) to a VM built from the state it received and to
//! that VM's controller: the session's events pause the VM when its source
//! is lost, resume it when the source is back, and end it when the source
//! does not come back in time.

use crate::controller::{ControllerPanicked, RunOutcome, VmHandle};
use crate::migration::{DestStats, Incoming, Listener, MigrationError, MigrationEvent, Progress};
use crate::vm::{Vm, VmError, VmOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_core::config::{HandlerConfig, VmConfig};

/// Errors of receiving a VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The migration failed before the VM ran.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// The destination VM cannot be built or started.
    #[error("the destination VM cannot be built: {0}")]
    Vm(#[from] VmError),
    /// The destination VM's memory is not served lazily (a bug).
    #[error("the destination VM's memory is not served lazily")]
    NotLazy,
    /// The controller thread panicked.
    #[error(transparent)]
    Panicked(#[from] ControllerPanicked),
}

/// Options of [`receive`].
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The VM's run-time options (the memory-fault policy is forced to `Pause`).
    pub vm: VmOptions,
    /// The fault-handler threads serving the received memory and where
    /// they run (the default: one per CPU used).
    pub handlers: HandlerConfig,
    /// After the source is lost: how long the paused VM waits for a
    /// `recover` (and, after one, for the source to come back) before the
    /// run ends.
    pub lost_wait: Duration,
    /// Updated as pages arrive.
    pub progress: Arc<Progress>,
    /// How long to wait for a source that authenticates (`None`: until one
    /// comes). The time waited is taken off the VM's own timeout, if any:
    /// `vmm receive --timeout S` bounds the whole receive.
    pub wait: Option<Duration>,
}

/// The end of a received VM.
#[derive(Debug)]
pub struct ReceiveOutcome {
    /// The run.
    pub run: RunOutcome,
    /// The VM's configuration (for `verify_reports`).
    pub config: VmConfig,
    /// Figures.
    pub stats: DestStats,
    /// The source was lost before every page arrived (the VM was paused).
    pub lost: Option<String>,
    /// The VM was paused because of it.
    pub paused_on_loss: bool,
}

/// Accepts one migration on `listener`, runs the VM until it ends.
/// `on_resumed` is called with a handle once the vCPUs run.
pub fn receive(
    listener: &Listener,
    options: ReceiveOptions,
    on_resumed: impl FnOnce(&VmHandle),
) -> Result<ReceiveOutcome, ReceiveError> {
    let start = std::time::Instant::now();
    let mut incoming = Incoming::accept(
        listener,
        options.progress.clone(),
        options.wait,
        options.vm.seccomp,
    )?;
    let mut vm_options = options.vm.clone();
    if options.wait.is_some() {
        vm_options.timeout = vm_options
            .timeout
            .map(|t| t.saturating_sub(start.elapsed()).max(Duration::from_millis(1)));
    }
    // Built while the source still runs: none of it is in the downtime.
    let built = Instant::now();
    let mut vm = Vm::incoming(
        incoming.config(),
        incoming.source(),
        options.handlers.clone(),
        vm_options,
    )?;
    // On huge pages the 4 KiB pages received are assembled into whole huge
    // pages before they are placed.
    if let Some(m) = vm.materializer() {
        incoming.source().set_unit(m.page_size());
    }
    let build_ms = built.elapsed().as_secs_f64() * 1e3;
    // The source pauses once it has this.
    incoming.ready()?;
    let switched = incoming.switchover()?;
    let applied = Instant::now();
    vm.apply_incoming(switched.state(), switched.data_ranges())?;
    let applied_ms = applied.elapsed().as_secs_f64() * 1e3;
    let config = vm.config().clone();
    let materializer = vm.materializer().ok_or(ReceiveError::NotLazy)?;
    let running = vm.start()?;
    let handle = running.handle();
    let paused_on_loss = Arc::new(AtomicBool::new(false));
    let events = {
        let (h, paused) = (handle.clone(), paused_on_loss.clone());
        move |ev| match ev {
            MigrationEvent::SourceLost(why) => {
                tracing::warn!("the migration source is lost: {why}; the VM pauses until it is back");
                match h.source_lost(true) {
                    Ok(()) => paused.store(true, Ordering::Release),
                    Err(e) => tracing::warn!("cannot pause after losing the source: {e}"),
                }
            }
            MigrationEvent::Recovered => {
                if let Err(e) = h.source_lost(false) {
                    tracing::warn!("cannot resume after the source came back: {e}");
                }
            }
            MigrationEvent::GaveUp => h.stop(),
            MigrationEvent::Complete => {}
        }
    };
    let session = switched.start(
        materializer,
        options.lost_wait,
        applied_ms,
        running.vcpus_ms(),
        build_ms,
        events,
    )?;
    handle.set_recover_hook(session.recover_requests(), session.lost_flag());
    handle.set_migration_report(session.report_fn());
    on_resumed(&handle);
    let run = running.wait()?;
    let lost = session.lost();
    let stats = session.finish(run.vcpu_stats.iter().map(|v| v.stage2_blocked_us).sum());
    Ok(ReceiveOutcome {
        run,
        config,
        stats,
        lost,
        paused_on_loss: paused_on_loss.load(Ordering::Acquire),
    })
}
