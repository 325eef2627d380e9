//! Clean shutdown on SIGINT, SIGTERM and SIGHUP: the signals are blocked in every
//! thread (call [`block_shutdown_signals`] first thing in `main`, before any
//! thread starts, so all inherit the mask) and read from a signalfd by the
//! controller's event loop, which then stops the vCPUs and the fault handler and
//! reports the run. SIGSTOP/SIGCONT need nothing: a stopped VMM resumes where it
//! was, and a vCPU interrupted in `KVM_RUN` re-enters it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

/// A signalfd for the shutdown signals.
#[derive(Debug)]
pub struct ShutdownSignals(OwnedFd);

impl ShutdownSignals {
    /// Opens the signalfd (non-blocking).
    pub fn new() -> io::Result<ShutdownSignals> {
        let set = shutdown_set()?;
        // SAFETY: a valid signal set; -1 asks for a new descriptor, which we own.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(ShutdownSignals(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<libc::c_int> {
        // SAFETY: an all-zero signalfd_siginfo is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let n = unsafe { libc::read(self.0.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
        (usize::try_from(n) == Ok(size)).then(|| libc::c_int::try_from(info.ssi_signo).unwrap_or(0))
    }
}

impl AsRawFd for ShutdownSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
