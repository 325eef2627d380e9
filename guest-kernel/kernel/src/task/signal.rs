//! Signals: sending, masks, delivery to user handlers, sigreturn, and the
//! stop/continue/kill semantics (SIGKILL and SIGSTOP cannot be caught or
//! blocked; SIGCONT is ignored by default; everything else ends the task by
//! default).
//!
//! Sending sets the signal pending and, if the target sleeps in a wait the
//! signal may end (`wait.rs`: SIGKILL always, any unblocked signal if the wait
//! is interruptible), makes it runnable. Delivery happens on every way back to
//! user mode (`sched.rs`): a handler gets a [`SigFrame`] on the user stack.
//!
//! In the page-fault walk: `mm/fault.rs` asks [`fault_signal_pending`] whether
//! a signal ends a fault wait (for `mm/core.rs`), sends SIGBUS when a page can
//! never come, and a signal that interrupts a fault wait is delivered here
//! before the task re-executes the faulting instruction (the retry).

use core::sync::atomic::{AtomicBool, Ordering};

use super::stats;
use super::{current_tid, exit_task, task_mut, State, Task, MAX_TASKS, SCHED};
use crate::abi::layout::{USER_SPACE_END, USER_SPACE_START};
use crate::abi::syscall::{sig, status};
use crate::arch::entry::TrapFrame;
use crate::mm::core::flags;
use crate::mm::fault::prepare_user_range;

/// The task has a signal or state change to look at.
pub(super) static ATTN: [AtomicBool; MAX_TASKS] = [const { AtomicBool::new(false) }; MAX_TASKS];

pub(super) fn bit(s: u64) -> u64 {
    1 << (s & 63)
}

pub(super) const UNBLOCKABLE: u64 = (1 << sig::SIGKILL) | (1 << sig::SIGSTOP);

/// Sends signal `s` to task `tid`.
pub fn send_signal(tid: usize, s: u64) -> bool {
    if s == 0 || s > sig::MAX {
        return false;
    }
    let mut table = SCHED.lock();
    let Some(t) = table.t.get_mut(tid) else {
        return false;
    };
    if matches!(t.state, State::Free | State::Dead) {
        return false;
    }
    match s {
        sig::SIGCONT => {
            t.stopped = false;
            t.pending &= !bit(sig::SIGSTOP);
        }
        sig::SIGSTOP => t.stopped = true,
        _ => {
            t.pending |= bit(s);
            let fatal = s == sig::SIGKILL;
            if fatal {
                t.stopped = false;
            }
            if t.state == State::Sleeping && (fatal || (t.interruptible && t.blocked & bit(s) == 0)) {
                t.state = State::Runnable;
                if t.fault_wait {
                    stats::SIGNAL_INTERRUPTIONS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    ATTN[tid].store(true, Ordering::Release);
    true
}

/// Sets the current task's blocked mask; returns the old one.
pub fn set_blocked(mask: u64) -> u64 {
    let tid = current_tid();
    let mut s = SCHED.lock();
    let old = s.t[tid].blocked;
    s.t[tid].blocked = mask & !UNBLOCKABLE;
    ATTN[tid].store(true, Ordering::Relaxed);
    old
}

/// Whether task `tid` has a signal pending that ends a fault wait under fault
/// flags `f` (Linux's `fault_signal_pending`): SIGKILL always, any unblocked
/// one with INTERRUPTIBLE (a user-mode fault). The fault core then returns
/// `Retry` without waiting.
pub(crate) fn fault_signal_pending(tid: usize, f: u32) -> bool {
    let s = SCHED.lock();
    let t = &s.t[tid];
    let fatal = t.pending & bit(sig::SIGKILL) != 0;
    fatal || (f & flags::INTERRUPTIBLE != 0 && t.pending & !t.blocked != 0)
}

/// Delivers the current task's deliverable signals onto `frame` (its user
/// state): handlers get a signal frame, default actions kill or stop.
pub(super) fn deliver_signals(tid: usize, frame: &mut TrapFrame) {
    ATTN[tid].store(false, Ordering::Relaxed);
    loop {
        let s = {
            let mut table = SCHED.lock();
            let t = &mut table.t[tid];
            if t.state != State::Runnable || t.stopped {
                return;
            }
            let ready = t.pending & (!t.blocked | UNBLOCKABLE);
            if ready == 0 {
                return;
            }
            let s = u64::from(ready.trailing_zeros());
            t.pending &= !bit(s);
            s
        };
        let task = task_mut(tid);
        let handler = task.handlers[s as usize];
        match (s, handler) {
            (sig::SIGKILL, _) | (_, 0) if s != sig::SIGCONT => exit_task(status::KILLED | s as i64),
            (_, 1) | (sig::SIGCONT, _) => {}
            _ => {
                if !push_signal_frame(task, s, handler, frame) {
                    exit_task(status::KILLED | sig::SIGSEGV as i64)
                }
                // One handler at a time: it runs with `s` blocked.
                return;
            }
        }
    }
}

/// Saved by a signal delivery on the user stack, restored by sigreturn.
#[repr(C)]
#[derive(Clone, Copy)]
struct SigFrame {
    restorer: u64,
    regs: TrapFrame,
    blocked: u64,
}

fn push_signal_frame(task: &mut Task, s: u64, handler: u64, frame: &mut TrapFrame) -> bool {
    let size = core::mem::size_of::<SigFrame>() as u64;
    // Below the red zone, 16-aligned, then -8 as if the restorer was `call`ed.
    let Some(sp) = frame.rsp.checked_sub(128 + size).map(|a| (a & !15) - 8) else {
        return false;
    };
    if prepare_user_range(sp, size, true).is_err() {
        return false;
    }
    let blocked = {
        let mut table = SCHED.lock();
        let old = table.t[task.tid].blocked;
        table.t[task.tid].blocked |= bit(s);
        old
    };
    let sf = SigFrame {
        restorer: task.restorers[s as usize],
        regs: *frame,
        blocked,
    };
    // SAFETY: the range is mapped user memory of the current task, writable
    // (checked above), in the loaded address space.
    unsafe { core::ptr::write_unaligned(sp as *mut SigFrame, sf) };
    frame.rip = handler;
    frame.rsp = sp;
    frame.rdi = s;
    true
}

/// SYS_SIGRETURN: restores the state saved by the signal delivery.
pub fn sigreturn(frame: &mut TrapFrame) -> bool {
    // The handler's `ret` popped the restorer's address.
    let sp = frame.rsp.wrapping_sub(8);
    let size = core::mem::size_of::<SigFrame>() as u64;
    if prepare_user_range(sp, size, false).is_err() {
        return false;
    }
    // SAFETY: mapped user memory of the current task (checked above).
    let sf = unsafe { core::ptr::read_unaligned(sp as *const SigFrame) };
    let user = |a: u64| (USER_SPACE_START..USER_SPACE_END).contains(&a);
    if !user(sf.regs.rip) || !user(sf.regs.rsp) {
        return false;
    }
    *frame = sf.regs;
    frame.sanitize_user();
    let tid = current_tid();
    SCHED.lock().t[tid].blocked = sf.blocked & !UNBLOCKABLE;
    ATTN[tid].store(true, Ordering::Relaxed);
    true
}
