//! What each thread class may do: the system calls, and for the dangerous
//! ones the arguments (ioctl requests, socket families, mmap/mprotect
//! protections, futex operations, clone flags, prctl options).
//!
//! The lists were found by running the test suite and `vmm stress` with
//! the filters in log mode and under strace (`docs/seccomp.md`), and are
//! kept current by every change that makes a thread do something new: a
//! test that runs the new path with the filters on (the default) fails with
//! the thread, its class and the call until the call is allowed here.

use crate::ioctls::*;
use crate::ThreadClass;
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// One argument check: `(arg[index] & mask) == value`, on the low 32 bits
/// (`dword`, for `int` arguments and ioctl requests) or all 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArgCheck {
    /// The argument (0-5).
    pub index: u8,
    /// Compare the low 32 bits only.
    pub dword: bool,
    /// The bits compared.
    pub mask: u64,
    /// Their value.
    pub value: u64,
}

/// `arg[index] == value` (32 bits).
pub(crate) const fn eq(index: u8, value: u64) -> ArgCheck {
    ArgCheck {
        index,
        dword: true,
        mask: 0xffff_ffff,
        value,
    }
}

/// `arg[index] == value` (64 bits).
const fn eq64(index: u8, value: u64) -> ArgCheck {
    ArgCheck {
        index,
        dword: false,
        mask: u64::MAX,
        value,
    }
}

/// `(arg[index] & mask) == 0` (32 bits): none of `mask`'s bits set.
const fn none_of(index: u8, mask: u64) -> ArgCheck {
    ArgCheck {
        index,
        dword: true,
        mask,
        value: 0,
    }
}

/// How a system call is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Whatever its arguments.
    Always,
    /// When all the checks of one of these alternatives hold.
    When(Vec<Vec<ArgCheck>>),
}

/// A class's allowed system calls, by number, and the calls it answers
/// with an error instead of stopping the thread (`refused`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    allowed: BTreeMap<i64, Allowed>,
    refused: BTreeMap<i64, i32>,
}

impl Rules {
    /// Allows `nrs` whatever their arguments.
    fn allow(&mut self, nrs: &[libc::c_long]) -> &mut Self {
        for &nr in nrs {
            self.allowed.insert(nr, Allowed::Always);
            self.refused.remove(&nr);
        }
        self
    }

    /// Answers `nr` with `errno` (the call is not made) unless it is allowed.
    fn refuse(&mut self, nr: libc::c_long, errno: i32) -> &mut Self {
        if !self.allowed.contains_key(&nr) {
            self.refused.insert(nr, errno);
        }
        self
    }

    /// Allows `nr` when all of `checks` hold (one more alternative).
    pub(crate) fn allow_if(&mut self, nr: libc::c_long, checks: &[ArgCheck]) -> &mut Self {
        self.refused.remove(&nr);
        match self
            .allowed
            .entry(nr)
            .or_insert_with(|| Allowed::When(Vec::new()))
        {
            Allowed::Always => {}
            Allowed::When(alts) => {
                if !alts.iter().any(|a| a == checks) {
                    alts.push(checks.to_vec());
                }
            }
        }
        self
    }

    /// Allows `ioctl` with these requests (in this order: the first is
    /// checked first, so the hot ones go first).
    fn ioctls(&mut self, requests: &[u32]) -> &mut Self {
        for &r in requests {
            self.allow_if(libc::SYS_ioctl, &[eq(1, u64::from(r))]);
        }
        self
    }

    /// Adds everything `other` allows (a call one refuses and the other
    /// allows is allowed).
    pub fn union(&mut self, other: &Rules) {
        for (&nr, a) in &other.allowed {
            match a {
                Allowed::Always => {
                    self.allow(&[nr]);
                }
                Allowed::When(alts) => {
                    for alt in alts {
                        self.allow_if(nr, alt);
                    }
                }
            }
        }
        for (&nr, &errno) in &other.refused {
            self.refuse(nr, errno);
        }
    }

    /// Whether a thread under these rules can start one under `other`: every
    /// call `other` allows is allowed here too, and every call it refuses is
    /// allowed (with some arguments at least) or refused here; else the
    /// first call (and alternative) that is not.
    pub fn covers(&self, other: &Rules) -> Result<(), (i64, Option<Vec<ArgCheck>>)> {
        // A call the child refuses that this class allows only with some
        // arguments is refused (or trapped, for the others) in the child.
        for &nr in other.refused.keys() {
            if !self.allowed.contains_key(&nr) && !self.refused.contains_key(&nr) {
                return Err((nr, None));
            }
        }
        for (&nr, a) in &other.allowed {
            match (self.allowed.get(&nr), a) {
                (Some(Allowed::Always), _) => {}
                (None, Allowed::Always) | (Some(Allowed::When(_)), Allowed::Always) => {
                    return Err((nr, None))
                }
                (mine, Allowed::When(alts)) => {
                    for alt in alts {
                        let ok = matches!(mine, Some(Allowed::When(m)) if m.contains(alt));
                        if !ok {
                            return Err((nr, Some(alt.clone())));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The allowed system calls: number and how.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &Allowed)> {
        self.allowed.iter().map(|(&nr, a)| (nr, a))
    }

    /// The refused system calls and their errno.
    pub fn refused(&self) -> impl Iterator<Item = (i64, i32)> + '_ {
        self.refused.iter().map(|(&nr, &e)| (nr, e))
    }

    /// Number of allowed system calls.
    pub fn len(&self) -> usize {
        self.allowed.len()
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// How `nr` is allowed, if it is.
    pub fn get(&self, nr: i64) -> Option<&Allowed> {
        self.allowed.get(&nr)
    }

    /// The errno `nr` is answered with, if it is refused.
    pub fn refusal(&self, nr: i64) -> Option<i32> {
        self.refused.get(&nr).copied()
    }

    /// The class filter in seccompiler's form: the allowed calls, and the
    /// refused ones too (the refusal filters answer them; this one must not
    /// trap them, since the strictest action of all filters wins).
    /// A check that does not build is an error: dropping it would allow
    /// the call whatever its arguments.
    pub(crate) fn to_seccompiler(&self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        let mut map = BTreeMap::new();
        for (&nr, a) in &self.allowed {
            let rules = match a {
                Allowed::Always => Vec::new(),
                Allowed::When(alts) => alts.iter().map(|alt| to_rule(alt)).collect::<Result<_, _>>()?,
            };
            map.insert(nr, rules);
        }
        for &nr in self.refused.keys() {
            map.insert(nr, Vec::new());
        }
        Ok(map)
    }

    /// One filter per errno that answers the refused calls with it and
    /// allows everything else (stacked on the class filter).
    pub(crate) fn refusal_filters(&self) -> Result<Vec<BpfProgram>, BackendError> {
        let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for (&nr, &errno) in &self.refused {
            by_errno.entry(errno).or_default().insert(nr, Vec::new());
        }
        by_errno
            .into_iter()
            .map(|(errno, rules)| {
                let f = SeccompFilter::new(
                    rules,
                    SeccompAction::Allow,
                    SeccompAction::Errno(errno.unsigned_abs()),
                    TargetArch::x86_64,
                )?;
                BpfProgram::try_from(f)
            })
            .collect()
    }
}

fn to_rule(checks: &[ArgCheck]) -> Result<SeccompRule, BackendError> {
    let conds = checks
        .iter()
        .map(|c| {
            let len = if c.dword {
                SeccompCmpArgLen::Dword
            } else {
                SeccompCmpArgLen::Qword
            };
            let full = if c.dword { 0xffff_ffff } else { u64::MAX };
            let op = if c.mask == full {
                SeccompCmpOp::Eq
            } else {
                SeccompCmpOp::MaskedEq(c.mask)
            };
            SeccompCondition::new(c.index, len, op, c.value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conds)
}

// ---- argument values --------------------------------------------------------

const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_PRIVATE: u64 = 128;
const FUTEX_CLOCK_REALTIME: u64 = 256;

/// The flags glibc's pthread_create passes to `clone` (when `clone3` says
/// ENOSYS): a thread in this process, never a new process.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
/// The sharing and backing bits of mmap's flags, and their one allowed
/// value: private anonymous memory.
const MAP_KIND: u64 = (libc::MAP_SHARED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
const MAP_PRIVATE_ANONYMOUS: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;

/// `openat` flags that write, create or truncate.
const OPEN_WRITES: u64 =
    (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
/// `openat` flags of a new file that no existing path or link is taken for.
const OPEN_NEW: u64 = (libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW) as u64;

/// Glibc's `fork`: a new process that shares nothing (`SIGCHLD` to the
/// parent when it ends; the thread id written and cleared in the child).
const FORK_CLONE_FLAGS: u64 = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;

fn c(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// `tgkill(this process, any of its threads, sig)`: the filters are built
/// at run time, in the process they guard.
fn tgkill_self(sig: libc::c_int) -> [ArgCheck; 2] {
    [eq(0, u64::from(std::process::id())), eq(2, c(sig))]
}

// ---- groups -------------------------------------------------------------------

/// What every thread needs: ending, synchronizing, allocating memory
/// (private, anonymous, never executable), returning from a signal handler,
/// logging to stderr, and what a panic's abort does.
fn base() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Memory: glibc's malloc (brk, arenas, large blocks) and Rust's
        // sigaltstack and thread stacks.
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        // Returning from the kick handler (vCPUs) or any handler; the thread
        // end's signal mask and alternate stack teardown.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        // A wait interrupted by a signal (a kick, SIGSTOP/SIGCONT) goes on.
        libc::SYS_restart_syscall,
        // glibc counts CPUs with it (malloc's arena limit) when it cannot
        // read /sys (see openat below): a read of the thread's own mask.
        libc::SYS_sched_getaffinity,
        // Logging (stderr), eventfd notifications, the console (stdout).
        libc::SYS_write,
        libc::SYS_close,
        // std's channels back off with it.
        libc::SYS_sched_yield,
        // std's hash maps seed themselves once per thread.
        libc::SYS_getrandom,
        // vDSO fallbacks.
        libc::SYS_clock_gettime,
        libc::SYS_gettid,
        libc::SYS_getpid,
    ]);
    // W^X: nothing made executable at run time (no JIT, no dlopen); and only
    // private anonymous memory is mapped, no file, no shared memory: guest
    // RAM and the vCPUs' kvm_run are mapped before any thread starts.
    r.allow_if(
        libc::SYS_mmap,
        &[
            none_of(2, PROT_EXEC),
            ArgCheck {
                index: 3,
                dword: true,
                mask: MAP_KIND,
                value: MAP_PRIVATE_ANONYMOUS,
            },
        ],
    );
    r.allow_if(libc::SYS_mprotect, &[none_of(2, PROT_EXEC)]);
    // glibc gives back freed memory and thread stacks.
    r.allow_if(libc::SYS_madvise, &[eq(2, c(libc::MADV_DONTNEED))]);
    // std's Mutex, Condvar, thread parking and once (private bitset waits,
    // private wakes); glibc's locks (private waits and wakes) and its
    // pthread_join (a shared bitset wait on the thread id, on
    // CLOCK_REALTIME). No requeue, wake-op or priority-inheritance operation.
    for op in [
        FUTEX_WAIT_BITSET | FUTEX_PRIVATE,
        FUTEX_WAKE | FUTEX_PRIVATE,
        FUTEX_WAIT | FUTEX_PRIVATE,
        FUTEX_WAIT_BITSET | FUTEX_CLOCK_REALTIME,
        FUTEX_WAIT,
        FUTEX_WAKE,
    ] {
        r.allow_if(libc::SYS_futex, &[eq(1, op)]);
    }
    // Debug builds check that a descriptor is open before closing it.
    r.allow_if(libc::SYS_fcntl, &[eq(1, c(libc::F_GETFD))]);
    // abort() after a panic while panicking: SIGABRT only.
    r.allow_if(libc::SYS_rt_sigaction, &[eq(0, c(libc::SIGABRT))]);
    r.allow_if(libc::SYS_tgkill, &tgkill_self(libc::SIGABRT));
    // Opening a file fails with EACCES rather than stopping the VMM: glibc
    // opens /sys and /proc files once per process, in whichever thread gets
    // there first (malloc: /sys/devices/system/cpu/online for its arena
    // limit, /proc/sys/vm/overcommit_memory on a heap trim), and copes with
    // the failure, as does a panic's backtrace. The class that opens files
    // (the controller's snapshots) allows it instead.
    r.refuse(libc::SYS_openat, libc::EACCES);
    r
}

/// What starting a thread takes, in the parent (`clone`) and in the child
/// before its own filter is installed (it runs under the parent's): thread
/// setup, its name, and installing its filters (which only ever narrow).
fn starts_threads() -> Rules {
    let mut r = Rules::default();
    // clone3 passes its flags in memory a filter cannot read: it is answered
    // ENOSYS, and glibc falls back to `clone`, whose flags are checked.
    r.refuse(libc::SYS_clone3, libc::ENOSYS);
    r.allow_if(libc::SYS_clone, &[eq64(0, THREAD_CLONE_FLAGS)]);
    r.allow(&[libc::SYS_set_robust_list, libc::SYS_rseq]);
    r.allow_if(libc::SYS_prctl, &[eq(0, c(libc::PR_SET_NAME))]);
    r.allow_if(
        libc::SYS_prctl,
        &[eq(0, c(libc::PR_SET_NO_NEW_PRIVS)), eq64(1, 1)],
    );
    r.allow_if(
        libc::SYS_seccomp,
        &[eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER)), eq(1, 0)],
    );
    r
}

/// Sleeping (`std::thread::sleep`).
fn sleeps() -> Rules {
    let mut r = Rules::default();
    r.allow(&[libc::SYS_clock_nanosleep, libc::SYS_nanosleep]);
    r
}

/// Pinning the calling thread (`pid == 0`) to a CPU.
fn pins_itself() -> Rules {
    let mut r = Rules::default();
    r.allow_if(libc::SYS_sched_setaffinity, &[eq(0, 0)]);
    r
}

/// Lowering the calling thread's own scheduling priority to
/// [`crate::BULK_NICE`]: `setpriority(PRIO_PROCESS, 0, BULK_NICE)` only (`who`
/// 0 is the calling thread; no other thread, process group or user, no other
/// value, so never a raise).
fn lowers_own_priority() -> Rules {
    let mut r = Rules::default();
    r.allow_if(
        libc::SYS_setpriority,
        &[
            eq(0, c(libc::PRIO_PROCESS as libc::c_int)),
            eq(1, 0),
            eq(2, u64::from(crate::BULK_NICE.unsigned_abs())),
        ],
    );
    r
}

/// Putting the calling thread (`pid == 0`) under `SCHED_BATCH` (a pool of
/// fault handlers whose wake-ups do not preempt a running vCPU), no other
/// policy; and reading which CPU it runs on (`sched_getcpu`: the vDSO or
/// rseq, `getcpu` the fallback).
fn batch_itself() -> Rules {
    let mut r = Rules::default();
    r.allow_if(
        libc::SYS_sched_setscheduler,
        &[eq(0, 0), eq(1, c(libc::SCHED_BATCH))],
    );
    r.allow(&[libc::SYS_getcpu]);
    r
}

/// Filling guest memory through the retry core: userfaultfd fills and
/// wakes, `mincore` to see what is present, the page source's reads
/// (memory file, snapshot), eventfd reads of its notifier; and guest RAM
/// on a memfd in MINOR mode (`docs/memory-backings.md`): a fetched page
/// written into the memfd (`pwrite64`; zeros: `fallocate` mode 0, which
/// only allocates), a clone's shared file searched for data
/// (`lseek` `SEEK_DATA`/`SEEK_HOLE` only), the page-cache page mapped
/// (`UFFDIO_CONTINUE`).
fn fills_memory() -> Rules {
    let mut r = Rules::default();
    r.ioctls(&[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_CONTINUE, UFFDIO_WAKE]);
    r.allow(&[
        libc::SYS_mincore,
        libc::SYS_pread64,
        libc::SYS_read,
        libc::SYS_pwrite64,
    ]);
    r.allow_if(libc::SYS_fallocate, &[eq(1, 0)]);
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        r.allow_if(libc::SYS_lseek, &[eq(2, c(whence))]);
    }
    r
}

/// A connected stream socket (Unix or TCP; std reads and writes a Unix one
/// with read/write, a TCP one with recvfrom/sendto): timeouts, TCP's
/// no-delay, shutdown, blocking mode, cloning the descriptor.
fn uses_streams() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
    ]);
    for (level, option) in [
        (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
        (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    ] {
        r.allow_if(libc::SYS_setsockopt, &[eq(1, c(level)), eq(2, c(option))]);
    }
    // A failed connect's error.
    r.allow_if(
        libc::SYS_getsockopt,
        &[eq(1, c(libc::SOL_SOCKET)), eq(2, c(libc::SO_ERROR))],
    );
    r.ioctls(&[FIONBIO]);
    r.allow_if(libc::SYS_fcntl, &[eq(1, c(libc::F_DUPFD_CLOEXEC))]);
    r
}

/// Opening stream sockets of the migration's families (Unix, TCP over IPv4
/// or IPv6) and connecting them (a TCP connect with a timeout polls).
fn connects() -> Rules {
    let mut r = Rules::default();
    for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        r.allow_if(
            libc::SYS_socket,
            &[eq(0, c(family)), eq(1, c(libc::SOCK_STREAM | libc::SOCK_CLOEXEC))],
        );
    }
    r.allow(&[libc::SYS_connect, libc::SYS_poll]);
    r
}

/// `openat` that only reads (never writes, creates or truncates): the
/// snapshots read, /proc files, directories to sync or list, TLS files.
fn opens_to_read() -> Rules {
    let mut r = Rules::default();
    r.allow_if(libc::SYS_openat, &[none_of(2, OPEN_WRITES)]);
    r.allow(&[
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
    ]);
    // A user's file is opened non-blocking (a FIFO cannot block the open),
    // then made blocking once it is known to be a regular file.
    r.allow_if(libc::SYS_fcntl, &[eq(1, c(libc::F_GETFL))]);
    r.allow_if(libc::SYS_fcntl, &[eq(1, c(libc::F_SETFL))]);
    r
}

/// `openat` that creates a new file, never through an existing path or a
/// symbolic link (`O_CREAT | O_EXCL | O_NOFOLLOW`, write-only): snapshot
/// files.
fn creates_files() -> Rules {
    let mut r = Rules::default();
    r.allow_if(
        libc::SYS_openat,
        &[ArgCheck {
            index: 2,
            dword: true,
            mask: OPEN_WRITES | OPEN_NEW,
            value: c(libc::O_WRONLY) | OPEN_NEW,
        }],
    );
    r
}

/// Writing a snapshot atomically: a new owner-only temporary directory,
/// new files in it never opened through a link, synced, then renamed into
/// place or exchanged with an older snapshot, which is then removed.
fn writes_snapshots() -> Rules {
    let mut r = opens_to_read();
    r.union(&creates_files());
    // Removing a directory tree (the old snapshot): glibc's fdopendir makes
    // the descriptor close-on-exec.
    r.allow_if(
        libc::SYS_fcntl,
        &[eq(1, c(libc::F_SETFD)), eq(2, c(libc::FD_CLOEXEC))],
    );
    r.allow_if(libc::SYS_mkdir, &[eq(1, 0o700)]);
    r.allow_if(libc::SYS_mkdirat, &[eq(2, 0o700)]);
    r.allow_if(libc::SYS_renameat2, &[eq(4, u64::from(libc::RENAME_EXCHANGE))]);
    // An existing target directory must be this user's (`geteuid`).
    r.allow(&[
        libc::SYS_geteuid,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        libc::SYS_getdents64,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_pwrite64,
    ]);
    r
}

/// Receiving and sending descriptors over Unix sockets (SCM_RIGHTS: the
/// userfaultfd to an external handler's connection holder).
fn passes_fds() -> Rules {
    let mut r = Rules::default();
    r.allow(&[libc::SYS_sendmsg, libc::SYS_recvmsg]);
    r
}

/// The connection holder: a Unix socket to the handler, its peer's pid.
fn holds_handler_connection() -> Rules {
    let mut r = passes_fds();
    r.allow_if(
        libc::SYS_socket,
        &[
            eq(0, c(libc::AF_UNIX)),
            eq(1, c(libc::SOCK_STREAM | libc::SOCK_CLOEXEC)),
        ],
    );
    // std reads and writes a Unix stream with recvfrom/sendto (no SIGPIPE).
    r.allow(&[
        libc::SYS_connect,
        libc::SYS_poll,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
    ]);
    r.union(&peer_credentials());
    r
}

/// `SO_PEERCRED` of a Unix socket: the process at its other end (and
/// this process's user, which it must match unless it is root).
fn peer_credentials() -> Rules {
    let mut r = Rules::default();
    r.allow(&[libc::SYS_geteuid, libc::SYS_getuid]);
    r.allow_if(
        libc::SYS_getsockopt,
        &[eq(1, c(libc::SOL_SOCKET)), eq(2, c(libc::SO_PEERCRED))],
    );
    r
}

/// Watching a child process: `waitid(P_PID, ...)` (how it ended, without
/// reaping it), `wait4` (reaping it).
fn watches_children() -> Rules {
    let mut r = Rules::default();
    r.allow_if(libc::SYS_waitid, &[eq(0, c(libc::P_PID as libc::c_int))]);
    r.allow(&[libc::SYS_wait4]);
    r
}

// ---- classes ------------------------------------------------------------------

/// The rules of `class` alone (without the classes it starts, which
/// `crate::rules()` adds).
pub(crate) fn own(class: ThreadClass) -> Rules {
    let mut r = base();
    match class {
        ThreadClass::Vcpu => {
            // KVM_RUN first: it is the hot one. The GETs save the vCPU's
            // state (on its own thread, `vcpu::state`); the register read
            // also reports a crash's RIP. Nothing sets state here: a restore
            // writes it before the thread starts.
            r.ioctls(&[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_GET_FPU,
                KVM_GET_MSRS,
                KVM_GET_LAPIC,
                KVM_GET_XSAVE,
                KVM_GET_XCRS,
                KVM_GET_VCPU_EVENTS,
                KVM_GET_MP_STATE,
                KVM_GET_DEBUGREGS,
            ]);
            // A vCPU pins itself next to its fault-handler thread.
            r.union(&pins_itself());
        }
        ThreadClass::FaultHandler => {
            r.union(&fills_memory());
            // The handler waits on the userfaultfd and its sources' eventfds.
            r.allow(&[libc::SYS_poll, libc::SYS_ppoll]);
            // Test and stress page sources delay their answers.
            r.union(&sleeps());
            // A pool's threads pin themselves next to their vCPUs, under
            // SCHED_BATCH (`vmm_core::placement`), and count wake-ups per CPU.
            r.union(&pins_itself());
            r.union(&batch_itself());
        }
        ThreadClass::PageStore => {
            // Guest memory is plain memory to it; it waits on a condvar and
            // posts events (an eventfd write): the base is all it needs.
        }
        ThreadClass::Controller => {
            r.union(&starts_threads());
            // The event loop: eventfds, stdin for the console.
            r.allow(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_read,
            ]);
            // Kicks: SIGRTMIN to a vCPU thread of this process.
            r.allow_if(libc::SYS_tgkill, &tgkill_self(libc::SIGRTMIN()));
            // The VM-wide state of a snapshot or migration.
            r.ioctls(&[KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK]);
            // Lazily served memory fetched in full before a capture; guest
            // RAM released from userfaultfd when a run ends with stuck vCPUs.
            r.union(&fills_memory());
            r.ioctls(&[UFFDIO_UNREGISTER]);
            // Snapshots; /proc/self/pagemap for the pages that exist; /proc
            // of an external handler's process (its name, its threads'
            // activity).
            r.union(&writes_snapshots());
            // The last clone of a snapshot to end removes the shared file
            // of its memory (`snapshot/shared.rs`): an exclusive lock it
            // only tries for (another clone holds it shared).
            r.allow_if(libc::SYS_flock, &[eq(1, c(libc::LOCK_EX | libc::LOCK_NB))]);
            // A live snapshot's write protection (the userfaultfd is made
            // before this thread starts): guest RAM registered in WP mode,
            // protected, the present pages found with PAGEMAP_SCAN; the
            // same for uffd-WP dirty tracking before a pre-copy starts.
            r.ioctls(&[UFFDIO_REGISTER, UFFDIO_WRITEPROTECT, PAGEMAP_SCAN]);
            // An external page-fault handler attached while the VM runs
            // (`attach-handler`): a socket pair to its connection holder,
            // which the holder launcher forks (this thread starts no
            // program), the userfaultfd and the handshake handed over, the
            // holder watched, killed through a pidfd (never a process group),
            // reaped.
            r.allow_if(
                libc::SYS_socketpair,
                &[
                    eq(0, c(libc::AF_UNIX)),
                    eq(1, c(libc::SOCK_STREAM | libc::SOCK_CLOEXEC)),
                ],
            );
            r.union(&passes_fds());
            r.union(&watches_children());
            // The watcher's stop eventfd.
            r.allow_if(libc::SYS_eventfd2, &[eq(1, c(libc::EFD_NONBLOCK))]);
            r.allow_if(libc::SYS_pidfd_open, &[eq(1, 0)]);
            r.allow_if(libc::SYS_pidfd_send_signal, &[eq(1, c(libc::SIGKILL))]);
            // An outgoing migration connects here (then runs on its threads),
            // authenticated before the pause (a Unix peer's credentials).
            r.union(&uses_streams());
            r.union(&peer_credentials());
            r.union(&connects());
            r.union(&sleeps());
        }
        ThreadClass::ControlServer => {
            r.union(&starts_threads());
            // Non-blocking accepts, a short sleep when none is waiting.
            r.allow_if(libc::SYS_accept4, &[eq(3, c(libc::SOCK_CLOEXEC))]);
            // Only the VMM's user (or root) is served: the client's uid.
            r.union(&peer_credentials());
            r.union(&sleeps());
        }
        ThreadClass::ControlClient => {
            // JSON lines on its socket (an idle client times out); requests
            // go to the controller over a channel and an eventfd. A
            // migration or recovery request's TLS files are read here.
            r.union(&uses_streams());
            r.union(&opens_to_read());
        }
        ThreadClass::MigrationSource => {
            r.union(&starts_threads());
            r.union(&uses_streams());
            // A Unix socket's peer is checked (the VMM's user or root).
            r.union(&peer_credentials());
            r.union(&connects());
            // Pre-copy: the dirty log, turned on per memory slot.
            r.ioctls(&[KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION]);
            // A lazily served source VM's memory is fetched in full first.
            r.union(&fills_memory());
            r.union(&sleeps());
            // The push is bulk work: it lowers its own priority.
            r.union(&lowers_own_priority());
            // Pre-copy with --dirty-tracking uffd-wp: the tracker (its
            // userfaultfd registered and protected, /proc/self/pagemap
            // opened, by the controller) reports and re-protects the written
            // pages with PAGEMAP_SCAN; it unregisters when it ends.
            r.ioctls(&[PAGEMAP_SCAN, UFFDIO_UNREGISTER]);
        }
        ThreadClass::MigrationDest => {
            r.union(&starts_threads());
            r.union(&uses_streams());
            // A Unix socket's peer is checked (the VMM's user or root).
            r.union(&peer_credentials());
            // Recovery: a new listener (a stale Unix socket is probed with a
            // connect and removed), its address, the source's connections.
            r.union(&connects());
            r.allow(&[
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_getsockname,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                // Only a socket is removed: its type is checked first.
                libc::SYS_statx,
                libc::SYS_newfstatat,
            ]);
            r.allow_if(
                libc::SYS_setsockopt,
                &[eq(1, c(libc::SOL_SOCKET)), eq(2, c(libc::SO_REUSEADDR))],
            );
            r.allow_if(libc::SYS_accept4, &[eq(3, c(libc::SOCK_CLOEXEC))]);
            // Pages placed through the retry core.
            r.union(&fills_memory());
            r.union(&sleeps());
            // Placing pre-copied pages and receiving pushed ones is bulk
            // work: those threads lower their own priority.
            r.union(&lowers_own_priority());
        }
        ThreadClass::Main => {
            // Waits for the run and reports it (stdout, the statistics file
            // opened before), removes the socket files it created; the
            // progress bar draws on the terminal.
            r.allow(&[libc::SYS_unlink, libc::SYS_unlinkat]);
            r.ioctls(&[TIOCGWINSZ, TCGETS]);
            r.union(&sleeps());
        }
        ThreadClass::Signals => {
            // Waits for the shutdown signals (`sigwaitinfo`); tells the
            // running VMs (an eventfd write), or removes the sockets it was
            // given and exits.
            r.allow(&[libc::SYS_rt_sigtimedwait, libc::SYS_unlink, libc::SYS_unlinkat]);
        }
        ThreadClass::HandlerWatch => {
            // Waits on the handler's pidfd, its holder's pidfd and socket
            // (the holder's events), and its stop eventfd; how the holder
            // ended.
            r.allow(&[libc::SYS_poll, libc::SYS_read, libc::SYS_recvfrom]);
            r.union(&watches_children());
            r.union(&sleeps());
        }
        ThreadClass::UffdPeer => {
            // The handshake and the userfaultfd from the VMM, a connection
            // to the handler, both handed over, then holding it.
            r.union(&holds_handler_connection());
        }
        ThreadClass::UffdLauncher => {
            // Per request (the handler's socket path and the holder's end of
            // its socket pair): a fork, whose child forks the holder (the
            // VMM, a child subreaper, adopts it) and says its pid through a
            // pipe; the holder moves its socket to standard input and
            // narrows this filter to its own.
            r.union(&passes_fds());
            r.allow(&[
                libc::SYS_read,
                libc::SYS_sendto,
                libc::SYS_dup2,
                libc::SYS_dup3,
                libc::SYS_set_robust_list,
            ]);
            r.allow_if(libc::SYS_pipe2, &[eq(1, c(libc::O_CLOEXEC))]);
            r.allow_if(libc::SYS_clone, &[eq64(0, FORK_CLONE_FLAGS)]);
            r.allow(&[libc::SYS_wait4]);
            r.allow_if(
                libc::SYS_prctl,
                &[eq(0, c(libc::PR_SET_NO_NEW_PRIVS)), eq64(1, 1)],
            );
            r.allow_if(
                libc::SYS_seccomp,
                &[eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER)), eq(1, 0)],
            );
        }
        ThreadClass::WpHandler => {
            // Waits on the userfaultfd and its stop and buffer eventfds,
            // reads the WP faults, unprotects a page once saved (or wakes a
            // writer); guest memory is plain memory to it.
            r.allow(&[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read]);
            r.ioctls(&[UFFDIO_WRITEPROTECT]);
        }
        ThreadClass::LiveSaver => {
            // Writes the snapshot as the controller would (the same files,
            // atomically), removing the protection of each window once
            // saved; an optional pace between windows; its end goes to the
            // controller (a channel and an eventfd write).
            r.union(&writes_snapshots());
            // Opening read-only is allowed (snapshot files), so glibc's heap
            // trim opens /proc/sys/vm/overcommit_memory here, once per
            // process if this thread comes first, and reads it (measured:
            // killed for `read` in 1 run of 3 after a lazy restore).
            r.allow(&[libc::SYS_read]);
            r.ioctls(&[UFFDIO_WRITEPROTECT]);
            r.union(&sleeps());
        }
    }
    r
}
