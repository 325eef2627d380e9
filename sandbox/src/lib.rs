//! The VMM's sandbox: one seccomp filter per thread class, built in Rust
//! with rust-vmm's `seccompiler` and installed by each thread for itself
//! before it does its work (a vCPU thread before its first `KVM_RUN`).
//! See `docs/seccomp.md`.
//!
//! - [`ThreadClass`]: what a thread does, and so which system calls (and
//!   which ioctls, socket families, mmap protections, futex operations...)
//!   it may make; the lists live in `rules.rs`, [`rules`] gives them.
//! - [`SeccompMode`]: `kill` (the default: a denied call stops the VMM with
//!   a message naming the thread and the call, exit code [`EXIT_SECCOMP`]),
//!   `log` (denied calls go through and the kernel logs them) or `off`.
//! - [`spawn`]: starts a thread of a class; it returns once the thread's
//!   filter is installed (or reports why it could not be), so nothing of
//!   the thread's own work runs unfiltered. [`apply`] filters the calling
//!   thread (the main thread once its setup is done).
//!
//! Seccomp filters belong to a thread and are inherited by the threads it
//! starts, on top of their own: a thread that starts others must allow what
//! they do. [`ThreadClass::spawns`] lists who may start whom; the rules of a
//! class include those of the classes it starts, and [`spawn`] refuses a
//! start the list does not allow instead of letting the child die later.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod names;

mod ioctls;
mod rules;
mod sigsys;

pub use rules::{Allowed, Rules};
pub use sigsys::EXIT_SECCOMP;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::cell::Cell;
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// The environment variable that sets the default [`SeccompMode`] (of the
/// CLI when `--seccomp` is not given, and of `VmOptions::default()`, so
/// `VMM_SECCOMP=log cargo test` runs the whole suite in log mode).
pub const MODE_ENV: &str = "VMM_SECCOMP";

/// The nice value the migration's bulk threads (the push, placing pushed
/// pages, the main connection's receiver) give themselves: the one
/// `setpriority` the migration classes may make, on the calling thread only
/// (`PRIO_PROCESS`, `who` 0: on Linux the nice value is per thread).
pub const BULK_NICE: i32 = 10;

/// How the filters treat a system call their class does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// No filter at all.
    Off,
    /// The call goes through and the kernel logs it (`SECCOMP_RET_LOG`:
    /// `dmesg | grep type=1326` shows the thread's name and the call's number).
    Log,
    /// The call is not made: `SECCOMP_RET_TRAP` raises SIGSYS, whose handler
    /// prints the thread, its class and the call, and ends the process with
    /// [`EXIT_SECCOMP`].
    #[default]
    Kill,
}

/// A mode name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid seccomp mode `{0}`: use `kill` (the default: a forbidden system call stops the VMM), `log` (allowed but logged by the kernel, for debugging) or `off`")]
pub struct ModeError(pub String);

impl std::str::FromStr for SeccompMode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<SeccompMode, ModeError> {
        match s.trim() {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "kill" => Ok(SeccompMode::Kill),
            other => Err(ModeError(other.to_string())),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Kill => "kill",
        })
    }
}

impl SeccompMode {
    /// The mode [`MODE_ENV`] asks for, if it is set.
    pub fn from_env() -> Result<Option<SeccompMode>, ModeError> {
        match std::env::var(MODE_ENV) {
            Ok(v) => v.parse().map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => Err(ModeError(v.to_string_lossy().into_owned())),
        }
    }

    /// The default mode: [`MODE_ENV`]'s if it is set and valid, else
    /// [`SeccompMode::Kill`] (an invalid value never weakens the sandbox).
    pub fn process_default() -> SeccompMode {
        SeccompMode::from_env().ok().flatten().unwrap_or_default()
    }
}

/// What a thread does; each class has its own filter (`rules.rs` says
/// which calls and why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadClass {
    /// A vCPU: `KVM_RUN` and its exits (the devices' port I/O runs here:
    /// serial, debug exit, paravirtual channel, page-store requests), and
    /// its state's save (the `KVM_GET_*` ioctls of the vCPU).
    Vcpu,
    /// The userfault handler (`uffd-handler`) and the background prefetch:
    /// they fill guest memory through the retry core from a page source.
    FaultHandler,
    /// The slow paravirtual page store's worker (the only device with a
    /// thread of its own; the other devices run on the vCPU threads, and
    /// the console's input on the controller).
    PageStore,
    /// The controller of a running VM: its event loop, pause/resume,
    /// snapshots (files), state capture, outgoing migration start.
    Controller,
    /// The control socket's accept loop.
    ControlServer,
    /// One control-socket client: JSON lines, requests to the controller.
    ControlClient,
    /// An outgoing migration: pre-copy, post-copy push, request reader.
    MigrationSource,
    /// An incoming migration: receivers, page placer, request writer,
    /// watcher (and its recovery listener).
    MigrationDest,
    /// The CLI's main thread once the VM runs (it waits and reports), and
    /// its progress bar.
    Main,
    /// The process's signal watcher (`vmm-signals`): waits for SIGINT, SIGTERM
    /// and SIGHUP (`sigwaitinfo`), tells the running VMs, or removes the
    /// sockets it was given and exits.
    Signals,
    /// The watcher of an external page-fault handler (`uffd-handler-watch`):
    /// waits for the handler, its connection or its connection holder to go.
    HandlerWatch,
    /// The connection holder process (`vmm __uffd-peer`): connects to the
    /// external handler, hands it the userfaultfd, holds the connection.
    UffdPeer,
    /// The holder launcher process (`vmm __uffd-launcher`): forks the
    /// connection holders of handlers attached once the VMM is sandboxed
    /// (a sandboxed VMM starts no program).
    UffdLauncher,
    /// A live snapshot's write-protect handler (`wp-handler`): saves a page
    /// a guest write is about to change into the bounded buffer, then
    /// removes its protection.
    WpHandler,
    /// A live snapshot's saver (`live-snapshot`): writes the snapshot files
    /// while the VM runs, removing the protection window by window.
    LiveSaver,
}

impl ThreadClass {
    /// Every class.
    pub const ALL: [ThreadClass; 15] = [
        ThreadClass::Vcpu,
        ThreadClass::FaultHandler,
        ThreadClass::PageStore,
        ThreadClass::Controller,
        ThreadClass::ControlServer,
        ThreadClass::ControlClient,
        ThreadClass::MigrationSource,
        ThreadClass::MigrationDest,
        ThreadClass::Main,
        ThreadClass::Signals,
        ThreadClass::HandlerWatch,
        ThreadClass::UffdPeer,
        ThreadClass::UffdLauncher,
        ThreadClass::WpHandler,
        ThreadClass::LiveSaver,
    ];

    /// The class's name in messages and docs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::FaultHandler => "fault-handler",
            ThreadClass::PageStore => "page-store",
            ThreadClass::Controller => "controller",
            ThreadClass::ControlServer => "control-server",
            ThreadClass::ControlClient => "control-client",
            ThreadClass::MigrationSource => "migration-source",
            ThreadClass::MigrationDest => "migration-dest",
            ThreadClass::Main => "main",
            ThreadClass::Signals => "signals",
            ThreadClass::HandlerWatch => "handler-watch",
            ThreadClass::UffdPeer => "uffd-peer",
            ThreadClass::UffdLauncher => "uffd-launcher",
            ThreadClass::WpHandler => "wp-handler",
            ThreadClass::LiveSaver => "live-snapshot",
        }
    }

    /// The classes a thread of this class starts threads of (besides its
    /// own). Its filter is stacked on theirs, so its rules include theirs.
    pub fn spawns(self) -> &'static [ThreadClass] {
        match self {
            // An outgoing migration starts on the controller's thread; a
            // re-attached page-fault handler's watcher too, and a live
            // snapshot's handler and saver.
            ThreadClass::Controller => &[
                ThreadClass::MigrationSource,
                ThreadClass::HandlerWatch,
                ThreadClass::WpHandler,
                ThreadClass::LiveSaver,
            ],
            // The launcher's children are connection holders (processes:
            // they keep its filter and narrow it to theirs, `narrow`).
            ThreadClass::UffdLauncher => &[ThreadClass::UffdPeer],
            ThreadClass::ControlServer => &[ThreadClass::ControlClient],
            // The migration classes start threads of their own class only
            // (migration-out its request reader, the destination's watcher
            // new receivers after a recovery): see `starts_threads`.
            _ => &[],
        }
    }

    /// Whether threads of this class start threads at all.
    pub fn starts_threads(self) -> bool {
        matches!(
            self,
            ThreadClass::Controller
                | ThreadClass::ControlServer
                | ThreadClass::MigrationSource
                | ThreadClass::MigrationDest
        )
    }

    /// Whether a thread of this class may start one of `child`.
    pub fn may_spawn(self, child: ThreadClass) -> bool {
        (self == child && self.starts_threads()) || self.spawns().contains(&child)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter does not compile (a bug in `rules.rs`).
    #[error("the seccomp filter of the {class} threads does not compile: {source}; this is a bug in sandbox/src/rules.rs (run with --seccomp off meanwhile)")]
    Compile {
        /// The class.
        class: ThreadClass,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of a {class} thread: {source}; the kernel needs seccomp filters (CONFIG_SECCOMP_FILTER), or run with --seccomp off")]
    Install {
        /// The class.
        class: ThreadClass,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// A sandboxed thread starts a thread its own filter was not built for.
    #[error("a {parent} thread may not start a {child} thread: its own filter, which the child inherits, was not built for the child's system calls; add {child} to ThreadClass::spawns of {parent} (sandbox/src/lib.rs)")]
    NotSpawnable {
        /// The calling thread's class.
        parent: ThreadClass,
        /// The class asked for.
        child: ThreadClass,
    },
    /// The calling thread is already sandboxed as another class.
    #[error("this thread is already sandboxed as a {current} thread and cannot become a {class} thread")]
    AlreadySandboxed {
        /// Its class.
        current: ThreadClass,
        /// The class asked for.
        class: ThreadClass,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler that reports forbidden system calls: {0}")]
    Handler(#[source] std::io::Error),
}

/// Errors of [`spawn`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The thread could not be started.
    #[error("{0}; raise the process's thread or memory limits")]
    Thread(#[source] std::io::Error),
    /// The thread could not be sandboxed (it ended without doing its work).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

impl From<SpawnError> for std::io::Error {
    fn from(e: SpawnError) -> std::io::Error {
        match e {
            SpawnError::Thread(e) => e,
            e => std::io::Error::other(e),
        }
    }
}

thread_local! {
    /// The calling thread's class and mode, once sandboxed.
    static CURRENT: Cell<Option<(ThreadClass, SeccompMode)>> = const { Cell::new(None) };
}

/// The calling thread's class and mode, if it is sandboxed.
pub fn current() -> Option<(ThreadClass, SeccompMode)> {
    CURRENT.with(Cell::get)
}

/// The mode for a helper thread the calling thread starts for its own work:
/// the calling thread's (its filter applies to the helper anyway), or `Off`
/// if it is not sandboxed.
pub fn inherited_mode() -> SeccompMode {
    current().map_or(SeccompMode::Off, |(_, m)| m)
}

/// The class's rules: its own, and those of every class it starts.
pub fn rules(class: ThreadClass) -> Rules {
    let mut r = rules::own(class);
    for &child in class.spawns() {
        r.union(&rules(child));
    }
    r
}

fn actions(mode: SeccompMode) -> (SeccompAction, SeccompAction) {
    match mode {
        SeccompMode::Kill => (SeccompAction::Trap, SeccompAction::Allow),
        // `Off` never installs a filter; its program is log-only for inspection.
        SeccompMode::Log | SeccompMode::Off => (SeccompAction::Log, SeccompAction::Allow),
    }
}

/// The BPF program of `class` in `mode` (x86_64).
pub fn filter(class: ThreadClass, mode: SeccompMode) -> Result<BpfProgram, SandboxError> {
    let (mismatch, matched) = actions(mode);
    let compile = |source| SandboxError::Compile { class, source };
    let rules = rules(class).to_seccompiler().map_err(compile)?;
    let f = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(compile)?;
    BpfProgram::try_from(f).map_err(compile)
}

/// The programs a thread of `class` installs: its class's filter, and one
/// per errno that answers the calls the class refuses (`openat` with
/// EACCES where no file is opened; `clone3` with ENOSYS where threads are
/// started, so that glibc falls back to `clone`, whose flags the class
/// filter checks).
fn programs(class: ThreadClass, mode: SeccompMode) -> Result<&'static [BpfProgram], SandboxError> {
    static CACHE: [[OnceLock<Vec<BpfProgram>>; 2]; ThreadClass::ALL.len()] =
        [const { [const { OnceLock::new() }; 2] }; ThreadClass::ALL.len()];
    let slot = &CACHE[class.index()][usize::from(mode == SeccompMode::Kill)];
    if let Some(p) = slot.get() {
        return Ok(p);
    }
    // The class filter goes last: installing a filter takes prctl and
    // seccomp, which it may not allow; the refusal filters allow them.
    let mut progs = rules(class)
        .refusal_filters()
        .map_err(|source| SandboxError::Compile { class, source })?;
    progs.push(filter(class, mode)?);
    Ok(slot.get_or_init(|| progs))
}

/// Compiles the programs of `class` in `mode` now (they are compiled once
/// per process, at the first thread of the class otherwise): for a thread
/// whose start must be quick, such as a migration destination's controller,
/// started inside the switchover's downtime.
pub fn precompile(class: ThreadClass, mode: SeccompMode) -> Result<(), SandboxError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    programs(class, mode).map(|_| ())
}

fn check_parent(class: ThreadClass, requested: SeccompMode) -> Result<SeccompMode, SandboxError> {
    match current() {
        // The parent's filter applies to the child anyway: the child takes its mode.
        Some((parent, mode)) if parent.may_spawn(class) => Ok(mode),
        Some((parent, _)) => Err(SandboxError::NotSpawnable { parent, child: class }),
        None => Ok(requested),
    }
}

fn install(class: ThreadClass, mode: SeccompMode, progs: &[BpfProgram]) -> Result<(), SandboxError> {
    for p in progs {
        seccompiler::apply_filter(p).map_err(|source| SandboxError::Install { class, source })?;
    }
    CURRENT.with(|c| c.set(Some((class, mode))));
    Ok(())
}

/// Sandboxes the calling thread as `class` (for a thread that was not
/// started with [`spawn`], such as the main thread once its setup is done).
/// `mode` is ignored if the thread is sandboxed already (it then stays as
/// it is if `class` is its class).
pub fn apply(class: ThreadClass, mode: SeccompMode) -> Result<(), SandboxError> {
    if let Some((current, _)) = current() {
        return if current == class {
            Ok(())
        } else {
            Err(SandboxError::AlreadySandboxed { current, class })
        };
    }
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let progs = programs(class, mode)?;
    if mode == SeccompMode::Kill {
        sigsys::install().map_err(SandboxError::Handler)?;
    }
    sigsys::remember_thread(class);
    install(class, mode, progs)
}

/// Narrows the calling thread, sandboxed or not, to `class`'s filter on
/// top of what it has: a forked child (the launcher's connection holders)
/// that inherited its parent's filter and thread-local class. The parent's
/// class must start `class` (its filter allows installing one).
pub fn narrow(class: ThreadClass, mode: SeccompMode) -> Result<(), SandboxError> {
    let mode = match current() {
        Some((parent, m)) if parent.spawns().contains(&class) => m,
        Some((parent, _)) => return Err(SandboxError::NotSpawnable { parent, child: class }),
        None => mode,
    };
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let progs = programs(class, mode)?;
    if mode == SeccompMode::Kill {
        sigsys::install().map_err(SandboxError::Handler)?;
    }
    sigsys::remember_thread(class);
    install(class, mode, progs)
}

/// Starts a thread of `class` with `builder` (its name) that installs its
/// filter before it runs `f`; returns once the filter is in place. A thread
/// started by a sandboxed thread takes that thread's mode (its filter
/// applies to the child anyway), and must be of a class it may start.
pub fn spawn<F, T>(
    builder: std::thread::Builder,
    class: ThreadClass,
    mode: SeccompMode,
    f: F,
) -> Result<JoinHandle<T>, SpawnError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mode = check_parent(class, mode)?;
    if mode == SeccompMode::Off {
        return builder.spawn(f).map_err(SpawnError::Thread);
    }
    let progs = programs(class, mode)?;
    if mode == SeccompMode::Kill {
        sigsys::install().map_err(SandboxError::Handler)?;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = builder
        .spawn(move || {
            sigsys::remember_thread(class);
            let r = install(class, mode, progs);
            let failed = r.is_err();
            let _ = tx.send(r);
            if failed {
                // Never run the thread's work unfiltered; no panic message
                // (the spawner reports the error).
                std::panic::resume_unwind(Box::new("the thread could not be sandboxed"));
            }
            f()
        })
        .map_err(SpawnError::Thread)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e.into()),
        // The thread ended before it reported: it cannot have run `f`.
        Err(_) => Err(SpawnError::Thread(std::io::Error::other(
            "the thread ended before its seccomp filter was installed",
        ))),
    }
}

#[cfg(test)]
mod tests;
