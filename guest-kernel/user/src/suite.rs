//! The in-guest test suite (`test=all` / `test=NAME`): the runner (role
//! ROLE_TEST, on vCPU 0) runs each test and prints `guest-test: NAME ... ok` or
//! `FAILED`; its exit code (0 = all passed) becomes the VM's verdict. Tests
//! spawn child tasks (roles below) running this same program.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use vmm_abi::layout::{PAGE_SIZE, USER_ANON_BASE, USER_STORE_BASE};
use vmm_abi::pv::store::{word, GuestStats};
use vmm_abi::syscall::*;
use vmm_abi::workload::{mix64, TESTS};

use crate::{push_decimal, rdtsc, syscall, syscall3, write};

const R_SPIN: u64 = ROLE_USER;
/// Reads store page `arg`; with a SIGUSR1 handler installed. Exit: handler
/// runs (capped at 99) if the data is right, 100 if not.
const R_SIG_FAULT: u64 = ROLE_USER + 1;
/// Reads store page `arg`, no handler. Exit 0 if the data is right.
const R_PLAIN_FAULT: u64 = ROLE_USER + 2;
/// SYS_SUM over store page `arg` (a kernel-mode fault) with a SIGUSR1 handler.
/// Exit 0 if the sum is right and the handler ran once, before the sum.
const R_KSUM: u64 = ROLE_USER + 3;
/// Registers a userfaultfd range and spawns its handler (`arg`: 0 = normal,
/// 1 = the handler dies without answering, 2 = handler on another vCPU).
const R_UFFD_OWNER: u64 = ROLE_USER + 4;
/// Serves userfaultfd `arg & 0xffff` (`arg >> 16` = mode).
const R_UFFD_HANDLER: u64 = ROLE_USER + 5;
/// Touches anonymous pages and reads two store pages (`arg`); exit 0 if right.
const R_TOUCH: u64 = ROLE_USER + 6;

static HANDLED: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    ".global sig_restorer",
    "sig_restorer:",
    "mov eax, {nr}",
    "int3",
    "ud2",
    nr = const SYS_SIGRETURN,
);

extern "C" {
    fn sig_restorer();
}

extern "C" fn on_signal(_sig: u64) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

fn install(sig: u64) {
    syscall3(
        SYS_SIGACTION,
        sig,
        on_signal as *const () as u64,
        sig_restorer as *const () as u64,
    );
}

fn sleep(ms: u64) {
    syscall(SYS_SLEEP, ms, 0);
}

fn spawn(role: u64, arg: u64, cpu: u64) -> i64 {
    syscall3(SYS_SPAWN, role, arg, cpu)
}

fn wait(tid: i64) -> i64 {
    syscall(SYS_WAIT, tid as u64, 0)
}

fn kill(tid: i64, sig: u64) -> i64 {
    syscall(SYS_KILL, tid as u64, sig)
}

/// Holds (`on`) or releases store page `page` in the VMM's device.
fn hold(page: u64, on: bool) -> bool {
    let op = if on { store_ctl::HOLD } else { store_ctl::RELEASE };
    syscall(SYS_STORE_CTL, op, page) == 0
}

/// Whether task `t` sleeps in a page-fault wait on the store.
fn store_waiting(t: i64) -> bool {
    t >= 0 && syscall(SYS_STORE_CTL, store_ctl::WAITING, t as u64) == 1
}

/// Polls `cond` a tick at a time until it holds. Every state waited for here
/// comes from an event (a task reaching a wait, a release), never from time;
/// the bound only turns a broken kernel into a failure instead of a hang.
fn until(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..20_000 {
        if cond() {
            return true;
        }
        sleep(1);
    }
    false
}

/// Holds store page `page`, spawns `role` reading it and waits until the task
/// sleeps in the store wait: the wait lasts until `hold(page, false)`, however
/// fast or loaded the host. None (page released, task gone) if it never does.
fn held_fault(role: u64, page: u64) -> Option<i64> {
    if !hold(page, true) {
        return None;
    }
    let t = spawn(role, page, u64::MAX);
    if t >= 0 && until(|| store_waiting(t)) {
        return Some(t);
    }
    hold(page, false);
    if t >= 0 {
        kill(t, sig::SIGKILL);
        wait(t);
    }
    None
}

/// Sends `n` signals `s` to task `t`, which waits on a held store page: each
/// must end the wait (the handler runs, the fault is retried and waits again).
fn interrupt_store_wait(t: i64, s: u64, n: u64) -> bool {
    let before = stats().signal_interruptions;
    for i in 1..=n {
        // The signal interrupts the wait (counted when the task, possibly on
        // another vCPU, wakes); waiting again means it ran the handler and
        // retried the fault.
        if kill(t, s) != 0
            || !until(|| stats().signal_interruptions >= before + i)
            || !until(|| store_waiting(t))
        {
            return false;
        }
    }
    stats().signal_interruptions == before + n
}

fn stats() -> GuestStats {
    let mut s = GuestStats::default();
    syscall(SYS_STATS, &mut s as *mut GuestStats as u64, 0);
    s
}

/// Whether store page `i`, read from user mode, holds the store's data.
fn store_page_ok(i: u64) -> bool {
    let base = USER_STORE_BASE + i * PAGE_SIZE;
    [0u64, 1, 300, 511].iter().all(|&k| {
        // SAFETY: the store region is mapped (on demand) read-only in every task.
        let v = unsafe { read_volatile((base + k * 8) as *const u64) };
        v == word(i, k)
    })
}

fn uffd_word(addr: u64, k: u64) -> u64 {
    mix64(addr ^ (k << 3)) | 1
}

struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
    fn s(&mut self, t: &str) -> &mut Line {
        for &b in t.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    fn n(&mut self, v: u64) -> &mut Line {
        push_decimal(&mut self.buf, &mut self.len, v);
        self
    }
    fn print(&mut self) {
        self.s("\n");
        write(&self.buf[..self.len]);
    }
}

/// The runner: every selected test, then the verdict.
pub fn run(args: &TaskArgs) -> u64 {
    let mut failed = 0;
    for (i, name) in TESTS.iter().enumerate() {
        if args.test != u64::MAX && args.test != i as u64 {
            continue;
        }
        let ok = match *name {
            "demand-zero" => demand_zero(),
            "preempt" => preempt(),
            "store" => store(),
            "store-retries" => store_retries(),
            "signal-handler" => signal_handler(),
            "signal-in-fault" => signal_in_fault(),
            "fatal-in-fault" => fatal_in_fault(),
            "stop-cont-in-fault" => stop_cont_in_fault(),
            "kernel-fault-signal" => kernel_fault_signal(),
            "uffd" => owner_ok("uffd", wait(spawn(R_UFFD_OWNER, 0, u64::MAX))),
            "uffd-handler-death" => {
                wait(spawn(R_UFFD_OWNER, 1, u64::MAX)) == status::KILLED | sig::SIGBUS as i64
            }
            "uffd-signal" => uffd_signal(),
            "smp" => smp(),
            "bench-fault" => bench_fault(),
            _ => false,
        };
        Line::new()
            .s("guest-test: ")
            .s(name)
            .s(" ... ")
            .s(if ok { "ok" } else { "FAILED" })
            .print();
        failed += u64::from(!ok);
    }
    let s = stats();
    Line::new()
        .s("guest-test: stats faults ")
        .n(s.faults)
        .s(" retries ")
        .n(s.retries)
        .s(" max-retries ")
        .n(s.max_retries)
        .s(" signal-interruptions ")
        .n(s.signal_interruptions)
        .s(" userfaults ")
        .n(s.userfaults)
        .print();
    Line::new()
        .s("guest-test: ")
        .s(if failed == 0 { "all passed" } else { "FAILURES" })
        .print();
    u64::from(failed != 0)
}

fn demand_zero() -> bool {
    let before = stats().faults;
    let base = USER_ANON_BASE;
    for i in 0..64 {
        // SAFETY: the scratch region is demand-zero memory of this task.
        unsafe {
            if read_volatile((base + i * PAGE_SIZE + 8) as *const u64) != 0 {
                return false;
            }
            write_volatile((base + i * PAGE_SIZE) as *mut u64, i + 1);
        }
    }
    // SAFETY: as above, now mapped.
    let ok = (0..64).all(|i| unsafe { read_volatile((base + i * PAGE_SIZE) as *const u64) } == i + 1);
    ok && stats().faults >= before + 64
}

fn preempt() -> bool {
    // The spinner never enters the kernel: only the timer gets us back.
    let t = spawn(R_SPIN, 0, u64::MAX);
    sleep(30);
    syscall(SYS_YIELD, 0, 0);
    t >= 0 && kill(t, sig::SIGKILL) == 0 && wait(t) == status::KILLED | sig::SIGKILL as i64
}

fn store() -> bool {
    (0..4).all(store_page_ok) && stats().store_reads >= 4
}

fn store_retries() -> bool {
    // Signals interrupt the wait again and again (each one is a Retry) until
    // the page arrives and the task exits.
    const PAGE: u64 = 100;
    const SIGNALS: u64 = 4;
    let before = stats().retries;
    let Some(t) = held_fault(R_SIG_FAULT, PAGE) else {
        return false;
    };
    let interrupted = interrupt_store_wait(t, sig::SIGUSR1, SIGNALS);
    hold(PAGE, false);
    // The handler ran once per signal, the data is right, and the fault was
    // retried after each signal and after the completion. Counted as total
    // retries: a handler that itself faults on a fresh page starts a new
    // per-fault count, so the per-fault maximum depends on the handler's stack.
    let code = wait(t);
    interrupted && code == SIGNALS as i64 && stats().retries - before > SIGNALS
}

fn signal_handler() -> bool {
    install(sig::SIGUSR2);
    let before = HANDLED.load(Ordering::Relaxed);
    let me = syscall(SYS_GETPID, 0, 0);
    // Blocked: stays pending; unblocked: runs on the way back from sigmask.
    syscall(SYS_SIGMASK, 1 << sig::SIGUSR2, 0);
    kill(me, sig::SIGUSR2);
    let blocked_ok = HANDLED.load(Ordering::Relaxed) == before;
    syscall(SYS_SIGMASK, 0, 0);
    blocked_ok && HANDLED.load(Ordering::Relaxed) == before + 1
}

fn signal_in_fault() -> bool {
    const PAGE: u64 = 101;
    let Some(t) = held_fault(R_SIG_FAULT, PAGE) else {
        return false;
    };
    let interrupted = interrupt_store_wait(t, sig::SIGUSR1, 1);
    hold(PAGE, false);
    // Handler ran once, then the retried fault got the right data.
    let code = wait(t);
    interrupted && code == 1
}

fn fatal_in_fault() -> bool {
    const PAGE: u64 = 102;
    let Some(t) = held_fault(R_PLAIN_FAULT, PAGE) else {
        return false;
    };
    // The page is still held: only the signal can end the wait, and it must
    // kill the task (no handler), not hand it a page.
    let killed = kill(t, sig::SIGTERM) == 0 && wait(t) == status::KILLED | sig::SIGTERM as i64;
    hold(PAGE, false);
    // The read the dead task started still fills the cache with the data
    // (no zero page in its place).
    killed && store_page_ok(PAGE)
}

fn stop_cont_in_fault() -> bool {
    const PAGE: u64 = 103;
    let Some(t) = held_fault(R_PLAIN_FAULT, PAGE) else {
        return false;
    };
    // A stop does not end the wait.
    let stopped = kill(t, sig::SIGSTOP) == 0 && store_waiting(t);
    hold(PAGE, false);
    // The page arrives while the task is stopped: the completion wakes it,
    // it stays stopped until the SIGCONT, then finishes with the right data.
    let woke = until(|| !store_waiting(t));
    kill(t, sig::SIGCONT);
    wait(t) == 0 && stopped && woke
}

fn kernel_fault_signal() -> bool {
    const PAGE: u64 = 104;
    let Some(t) = held_fault(R_KSUM, PAGE) else {
        return false;
    };
    // A kernel-mode access waits uninterruptibly (only a fatal signal ends
    // it): the signal stays pending and the task keeps waiting.
    let before = stats().signal_interruptions;
    let kept = kill(t, sig::SIGUSR1) == 0 && store_waiting(t) && stats().signal_interruptions == before;
    hold(PAGE, false);
    // Then the handler runs before the restarted call, whose sum is right.
    wait(t) == 0 && kept
}

fn uffd_signal() -> bool {
    // The handler answers slowly; a signal arrives while the owner waits.
    let before = stats().userfaults;
    let t = spawn(R_UFFD_OWNER, 3, u64::MAX);
    // Only once the owner waits on its first userfault (its handler is
    // installed by then): a fixed delay lost the race to a host pause or hold
    // in `vmm stress` (the signal killed the owner before it installed it).
    for _ in 0..500 {
        if stats().userfaults > before {
            break;
        }
        sleep(10);
    }
    kill(t, sig::SIGUSR1);
    owner_ok("uffd-signal", wait(t))
}

/// Whether a userfaultfd owner task ended well; says how it ended if not
/// (see `uffd_owner` for its codes).
fn owner_ok(test: &str, status: i64) -> bool {
    if status != 0 {
        Line::new()
            .s("guest-test: ")
            .s(test)
            .s(": owner task ended with status ")
            .n(status as u64)
            .print();
    }
    status == 0
}

fn smp() -> bool {
    let mut tids = [-1i64; 8];
    for (cpu, t) in tids.iter_mut().enumerate() {
        *t = spawn(R_TOUCH, 200 + 2 * cpu as u64, cpu as u64);
        if *t < 0 {
            break;
        }
    }
    let uffd = wait(spawn(R_UFFD_OWNER, 2, u64::MAX)) == 0;
    tids.iter().filter(|t| **t >= 0).all(|t| wait(*t) == 0) && uffd
}

fn bench_fault() -> bool {
    // Interleaved (same host load for both), medians (robust to preemption of
    // the vCPU thread by the host).
    const N: usize = 201;
    let mut sys = [0u64; N];
    let mut fault = [0u64; N];
    let base = USER_ANON_BASE + (32 << 20);
    for i in 0..N {
        let t0 = rdtsc();
        syscall(SYS_YIELD, 0, 0);
        let t1 = rdtsc();
        // SAFETY: a fresh demand-zero page of the scratch region.
        unsafe { write_volatile((base + i as u64 * PAGE_SIZE) as *mut u64, 1) };
        let t2 = rdtsc();
        sys[i] = t1 - t0;
        fault[i] = t2 - t1;
    }
    sys.sort_unstable();
    fault.sort_unstable();
    let (s, f) = (sys[N / 2], fault[N / 2]);
    Line::new()
        .s("guest-bench: empty syscall ")
        .n(s)
        .s(" cycles, demand-zero fault ")
        .n(f)
        .s(" cycles (medians of ")
        .n(N as u64)
        .s("), ratio x100 ")
        .n(f * 100 / s.max(1))
        .print();
    true
}

/// A spawned task.
pub fn child(args: &TaskArgs) -> u64 {
    match args.role {
        R_SPIN => loop {
            core::hint::spin_loop();
        },
        R_SIG_FAULT => {
            install(sig::SIGUSR1);
            let ok = store_page_ok(args.arg);
            if ok {
                HANDLED.load(Ordering::Relaxed).min(99)
            } else {
                100
            }
        }
        R_PLAIN_FAULT => u64::from(!store_page_ok(args.arg)),
        R_KSUM => {
            install(sig::SIGUSR1);
            let i = args.arg;
            let sum = syscall(SYS_SUM, USER_STORE_BASE + i * PAGE_SIZE, PAGE_SIZE) as u64;
            let want = (0..512).fold(0u64, |s, k| s.wrapping_add(word(i, k)));
            // The signal came during the wait: handled before the call restarted.
            u64::from(sum != want || HANDLED.load(Ordering::Relaxed) != 1)
        }
        R_UFFD_OWNER => uffd_owner(args),
        R_UFFD_HANDLER => uffd_handler(args.arg & 0xffff, args.arg >> 16),
        R_TOUCH => {
            let base = USER_ANON_BASE;
            for i in 0..100 {
                // SAFETY: demand-zero scratch memory of this task.
                unsafe { write_volatile((base + i * PAGE_SIZE) as *mut u64, i ^ args.tid) };
            }
            // SAFETY: as above.
            let anon = (0..100)
                .all(|i| unsafe { read_volatile((base + i * PAGE_SIZE) as *const u64) } == i ^ args.tid);
            u64::from(!(anon && store_page_ok(args.arg) && store_page_ok(args.arg + 1)))
        }
        _ => 1,
    }
}

fn uffd_owner(args: &TaskArgs) -> u64 {
    const PAGES: u64 = 4;
    let start = USER_ANON_BASE + (16 << 20);
    let id = syscall(SYS_UFFD_REGISTER, start, PAGES * PAGE_SIZE);
    if id <= 0 {
        return 10;
    }
    let mode = args.arg;
    if mode == 3 {
        install(sig::SIGUSR1);
    }
    let cpu = if mode == 2 {
        u64::from(args.cpu) + 1
    } else {
        u64::MAX
    };
    let mut h = spawn(R_UFFD_HANDLER, id as u64 | (mode << 16), cpu);
    if h < 0 && mode == 2 {
        h = spawn(R_UFFD_HANDLER, id as u64, u64::MAX); // one vCPU only
    }
    if h < 0 {
        return 11;
    }
    for i in 0..PAGES {
        let page = start + i * PAGE_SIZE;
        for k in [0u64, 5, 511] {
            // SAFETY: registered anonymous memory of this task: the handler
            // provides the page (or we get SIGBUS).
            if unsafe { read_volatile((page + k * 8) as *const u64) } != uffd_word(page, k) {
                return 12;
            }
        }
    }
    kill(h, sig::SIGKILL);
    // Mode 3: the signal must have been handled (during a wait, or late).
    for _ in 0..100 {
        if mode != 3 || HANDLED.load(Ordering::Relaxed) != 0 {
            return 0;
        }
        sleep(10);
    }
    13
}

fn uffd_handler(id: u64, mode: u64) -> u64 {
    let mut page = [0u64; 512];
    loop {
        let mut msg = UffdMsg::default();
        if syscall(SYS_UFFD_READ, id, &mut msg as *mut UffdMsg as u64) != 0 {
            return 20;
        }
        if mode == 1 {
            return 0; // dies without answering: the owner must get SIGBUS
        }
        if mode == 3 {
            sleep(100); // a slow handler: the owner's wait gets a signal
        }
        for (k, w) in page.iter_mut().enumerate() {
            *w = uffd_word(msg.addr, k as u64);
        }
        syscall3(SYS_UFFD_COPY, id, msg.addr, page.as_ptr() as u64);
    }
}
