//! The scheduler: per-CPU round robin of the tasks pinned to the CPU, the
//! timer tick, and the way back to user mode after every trap.
//!
//! Nothing blocks in the kernel: a task that must wait is marked sleeping
//! (`wait.rs`) and [`return_to_user`] switches to another task by popping that
//! task's saved user frame ([`switch_away`] abandons the kernel stack). A woken
//! task resumes in user mode, at the faulting instruction (it re-faults: the
//! retry) or at its restarted system call. Signals are delivered on the way
//! (`signal.rs`). The arch trap code (`arch/x86_64/trap.rs`) calls in here and
//! this calls back into arch (`enter_frame`, `idle_wait`).
//!
//! In the page-fault walk: after `mm/fault.rs` got `Retry` from `mm/core.rs`
//! with the task queued (`wait.rs`), its [`return_to_user`] lands here and
//! runs something else until a wake-up makes the task runnable again.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::signal::{self, deliver_signals};
use super::stats;
use super::{task_mut, this_cpu, State, CPUS, CURRENT, NONE, SCHED};
use crate::arch;
use crate::arch::entry::TrapFrame;

/// The CPU must look at its run queue on the way back to user mode.
pub(super) static RESCHED: [AtomicBool; CPUS] = [const { AtomicBool::new(false) }; CPUS];

/// Ticks of CPU 0 since boot.
pub(super) static JIFFIES: AtomicU64 = AtomicU64::new(0);

/// Starts this CPU's scheduling (after boot): runs its tasks, or idles. Never
/// returns.
pub fn start_cpu(cpu: u32) -> ! {
    switch_away(cpu as usize, NONE)
}

/// The way back to user mode after any trap: a cheap check, then signals and
/// scheduling if something happened.
pub fn return_to_user(frame: &mut TrapFrame) {
    let cpu = this_cpu();
    let tid = CURRENT[cpu].load(Ordering::Relaxed);
    if !RESCHED[cpu].load(Ordering::Relaxed) && !signal::ATTN[tid].load(Ordering::Acquire) {
        return;
    }
    slow_return(cpu, tid, frame, false);
}

#[inline(never)]
fn slow_return(cpu: usize, tid: usize, frame: &mut TrapFrame, preempt: bool) {
    RESCHED[cpu].store(false, Ordering::Relaxed);
    deliver_signals(tid, frame);
    if runnable(tid) && !preempt {
        return;
    }
    match pick(cpu, tid) {
        Some(next) if next == tid => return,
        _ => {}
    }
    task_mut(tid).ctx = *frame;
    switch_away(cpu, tid)
}

/// Runs the next runnable task of this CPU (after `prev`), idling until there
/// is one. Abandons the kernel stack. Never returns.
pub(super) fn switch_away(cpu: usize, prev: usize) -> ! {
    let mut after = prev;
    loop {
        if let Some(next) = pick(cpu, after) {
            CURRENT[cpu].store(next, Ordering::Relaxed);
            stats::SWITCHES.fetch_add(1, Ordering::Relaxed);
            let t = task_mut(next);
            // SAFETY: the root comes from new_user_root, which shares the kernel map.
            unsafe { arch::paging::switch_to(t.space.root) };
            let mut ctx = t.ctx;
            deliver_signals(next, &mut ctx);
            if runnable(next) {
                let t = task_mut(next);
                t.ctx = ctx;
                // SAFETY: a user frame of this task (built by `create` or saved
                // at a trap, signal changes sanitized), its space is loaded; the
                // Box outlives the iretq.
                unsafe { arch::entry::enter_frame(&t.ctx) }
            }
            task_mut(next).ctx = ctx;
            after = next;
            continue;
        }
        CURRENT[cpu].store(NONE, Ordering::Relaxed);
        after = NONE;
        arch::idle_wait();
        crate::mm::store::poll();
    }
}

fn runnable(tid: usize) -> bool {
    let s = SCHED.lock();
    s.t[tid].state == State::Runnable && !s.t[tid].stopped
}

/// The next runnable task of `cpu` after `after` (round robin), if any.
fn pick(cpu: usize, after: usize) -> Option<usize> {
    let s = SCHED.lock();
    let n = s.count;
    let start = if after == NONE { 0 } else { after + 1 };
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| s.t[i].cpu as usize == cpu && s.t[i].state == State::Runnable && !s.t[i].stopped)
}

/// The timer tick (any mode): store completions, timed sleepers, preemption.
pub fn tick(frame: &mut TrapFrame) {
    let cpu = this_cpu();
    stats::TICKS.fetch_add(1, Ordering::Relaxed);
    let now = if cpu == 0 {
        JIFFIES.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        JIFFIES.load(Ordering::Relaxed)
    };
    crate::mm::store::poll();
    let cur = CURRENT[cpu].load(Ordering::Relaxed);
    let others = {
        let mut s = SCHED.lock();
        let n = s.count;
        let mut others = false;
        for (i, t) in s.t[..n].iter_mut().enumerate() {
            if t.cpu as usize != cpu {
                continue;
            }
            if t.state == State::Sleeping && t.wake_at != 0 && t.wake_at <= now {
                t.state = State::Runnable;
                t.wake_at = 0;
            }
            others |= i != cur && t.state == State::Runnable && !t.stopped;
        }
        others
    };
    if !frame.is_user_mode() || cur == NONE {
        return; // the idle loop picks
    }
    if others {
        slow_return(cpu, cur, frame, true);
    } else {
        return_to_user(frame);
    }
}
