//! Clean shutdown on SIGINT, SIGTERM and SIGHUP, in every subcommand and at
//! any point: the signals are blocked in every thread (call
//! [`block_shutdown_signals`] first thing in `main`, before any thread
//! starts, so all inherit the mask) and waited for (`sigwaitinfo`) by one watcher
//! thread ([`start_watcher`]). On a signal the watcher runs the registered
//! hooks ([`on_shutdown`]): each running VM's controller ends its run
//! (stopping the vCPUs and the fault handler and reporting the run), and a
//! long loop (stress, bench) stops after its current step. With no hook
//! registered (setup, a client waiting on a socket, a destination waiting
//! for its source) the process exits at once with 128 + the signal, after
//! removing the files registered with [`remove_on_exit`] (sockets it
//! listens on). SIGSTOP/SIGCONT need nothing: a stopped VMM resumes where it
//! was, and a vCPU interrupted in `KVM_RUN` re-enters it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The signals that end a run.
pub const SHUTDOWN_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn shutdown_set() -> io::Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(&SHUTDOWN_SIGNALS)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Blocks the shutdown signals in the calling thread (and the threads it starts).
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_set()?;
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits for the next shutdown signal (all threads block them, so one
/// pending for the process waits here). `sigwaitinfo` rather than a
/// signalfd: the kernel wakes every reader of a signalfd on *any* signal
/// to the process, so each vCPU kick (a real-time signal to one thread)
/// woke this thread too, a context switch on the kicker's CPU just when the
/// kicked vCPU should get it (seen in a trace of a migration's pause).
fn next_shutdown_signal(set: &libc::sigset_t) -> Option<libc::c_int> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value to be overwritten.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid signal set and `info` a writable siginfo_t.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if sig > 0 {
            return Some(sig);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// A shutdown hook: told the signal; must not block.
type Hook = Box<dyn Fn(libc::c_int) + Send + Sync>;

/// The watcher's registries.
struct Registry {
    hooks: Mutex<Vec<(u64, Hook)>>,
    paths: Mutex<Vec<(u64, PathBuf)>>,
    next: AtomicU64,
    received: AtomicI32,
}

static REGISTRY: Registry = Registry {
    hooks: Mutex::new(Vec::new()),
    paths: Mutex::new(Vec::new()),
    next: AtomicU64::new(1),
    received: AtomicI32::new(0),
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The registries stay usable: a panicking hook leaves them as they were.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Unregisters its hook (or path) when dropped.
#[derive(Debug)]
#[must_use = "the hook is unregistered when the guard is dropped"]
pub struct Registration {
    id: u64,
    path: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.path {
            lock(&REGISTRY.paths).retain(|(i, _)| *i != self.id);
        } else {
            lock(&REGISTRY.hooks).retain(|(i, _)| *i != self.id);
        }
    }
}

/// Runs `hook` when a shutdown signal arrives, while the returned guard lives.
/// The hook runs on the watcher thread and must not block.
pub fn on_shutdown(hook: impl Fn(libc::c_int) + Send + Sync + 'static) -> Registration {
    let id = REGISTRY.next.fetch_add(1, Ordering::Relaxed);
    lock(&REGISTRY.hooks).push((id, Box::new(hook)));
    // A signal that came just before the registration is not missed.
    if let Some(sig) = received() {
        if let Some((_, h)) = lock(&REGISTRY.hooks).iter().find(|(i, _)| *i == id) {
            h(sig);
        }
    }
    Registration { id, path: false }
}

/// Removes `path` if the process exits on a signal, while the guard lives.
pub fn remove_on_exit(path: &Path) -> Registration {
    let id = REGISTRY.next.fetch_add(1, Ordering::Relaxed);
    lock(&REGISTRY.paths).push((id, path.to_owned()));
    Registration { id, path: true }
}

/// The first shutdown signal received, if any.
pub fn received() -> Option<libc::c_int> {
    match REGISTRY.received.load(Ordering::Acquire) {
        0 => None,
        sig => Some(sig),
    }
}

/// Starts the thread that reads the shutdown signals (see the module
/// documentation), sandboxed in `seccomp` mode (class `signals`). Call
/// once, after [`block_shutdown_signals`]; signals that arrive before are
/// kept pending and read then.
pub fn start_watcher(seccomp: sandbox::SeccompMode) -> io::Result<()> {
    let set = shutdown_set()?;
    sandbox::spawn(
        std::thread::Builder::new().name("vmm-signals".into()),
        sandbox::ThreadClass::Signals,
        seccomp,
        move || watch(&set),
    )?;
    Ok(())
}

fn watch(set: &libc::sigset_t) {
    while let Some(sig) = next_shutdown_signal(set) {
        let _ = REGISTRY
            .received
            .compare_exchange(0, sig, Ordering::AcqRel, Ordering::Acquire);
        let hooks = lock(&REGISTRY.hooks);
        if hooks.is_empty() {
            drop(hooks);
            for (_, p) in lock(&REGISTRY.paths).iter() {
                let _ = std::fs::remove_file(p);
            }
            eprintln!("vmm: ended by signal {sig}");
            std::process::exit(128 + sig);
        }
        for (_, h) in hooks.iter() {
            h(sig);
        }
    }
}
