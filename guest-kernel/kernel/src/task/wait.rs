//! Wait queues: sleep and wake-up.
//!
//! A wait queue is a key (the store's `mm::store::WAIT_KEY`, [`SLEEP_KEY`],
//! uffd fault/read queues, child exit). [`sleep_on`] marks the current task
//! sleeping on a key; nothing blocks in the kernel: the way back to user mode
//! (`sched.rs`) then switches to another task. [`wake_all`] makes every sleeper
//! on a key runnable again (any CPU).
//!
//! In the page-fault walk this is the wait: `mm/fault.rs` -> `mm/core.rs`
//! (`handle_mm_fault`) asks its env for a page that is not there yet, and the
//! env queues the task here (under the lock of the thing waited for, so a
//! completion cannot be lost) before the core returns `Retry`. Next: the store
//! poll or a uffd copy calls [`wake_all`]; the task runs again in user mode,
//! re-executes the faulting instruction and re-faults into `mm/fault.rs`,
//! which passes TRIED: the retry.

use core::sync::atomic::Ordering;

use super::sched::{JIFFIES, RESCHED};
use super::signal::{bit, UNBLOCKABLE};
use super::{current_tid, State, SCHED};
use crate::abi::syscall::sig;
use crate::arch;

/// Wait key of a timed sleep.
pub const SLEEP_KEY: u64 = 2;

/// Wait key of `wait(tid)`.
pub(super) const fn child_key(tid: usize) -> u64 {
    0x1000 + tid as u64
}

/// Queues `tid` (the current task of this CPU) on wait queue `key`, unless a
/// signal that would end the wait is already pending. `wake_at` (ticks, 0 =
/// none) bounds the sleep.
pub(crate) fn sleep_on(tid: usize, key: u64, interruptible: bool, fault: bool, wake_at: u64) {
    let mut s = SCHED.lock();
    let t = &mut s.t[tid];
    let deliverable = t.pending & (!t.blocked | UNBLOCKABLE);
    if t.pending & bit(sig::SIGKILL) != 0 || (interruptible && deliverable != 0) {
        return;
    }
    t.state = State::Sleeping;
    t.key = key;
    t.interruptible = interruptible;
    t.fault_wait = fault;
    t.wake_at = wake_at;
    RESCHED[t.cpu as usize].store(true, Ordering::Relaxed);
}

/// Wakes every task waiting on `key` (any CPU; they run at their CPU's next
/// tick or idle-loop pass).
pub fn wake_all(key: u64) {
    let mut s = SCHED.lock();
    let n = s.count;
    for t in &mut s.t[..n] {
        if t.state == State::Sleeping && t.key == key {
            t.state = State::Runnable;
        }
    }
}

/// Sleeps the current task interruptibly on `key` (system calls; the caller
/// restarts or completes the call).
pub fn sleep_current(key: u64, ms: u64) {
    // +1: the next tick may be just about to come; sleep at least `ms`.
    let wake_at = if ms > 0 {
        JIFFIES.load(Ordering::Relaxed) + ms.div_ceil(arch::apic::TICK_MS) + 1
    } else {
        0
    };
    sleep_on(current_tid(), key, true, false, wake_at);
}

/// Sleeps until `tid` (a child of the current task) ends; its status if it has.
pub fn wait_child(tid: usize) -> Option<Result<i64, ()>> {
    let me = current_tid();
    {
        let s = SCHED.lock();
        let Some(t) = s.t.get(tid) else {
            return Some(Err(()));
        };
        if t.parent != me {
            return Some(Err(()));
        }
        if t.state == State::Dead {
            return Some(Ok(t.exit));
        }
    }
    sleep_on(me, child_key(tid), true, false, 0);
    None
}

/// Whether task `tid` sleeps in a page-fault wait on the page store.
pub fn in_store_wait(tid: usize) -> bool {
    let s = SCHED.lock();
    s.t.get(tid)
        .is_some_and(|t| t.state == State::Sleeping && t.fault_wait && t.key == crate::mm::store::WAIT_KEY)
}
