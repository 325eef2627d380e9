//! The in-guest userfaultfd: a task registers a range of its anonymous memory;
//! a fault there queues a message (once per page) and the faulting task waits
//! (interruptibly from user mode). A handler task reads the messages and
//! resolves them (copy / zero page), which maps the page in the owner's space
//! and wakes the waiters, who retry. If the handler dies, the waiters (and any
//! later fault there) get SIGBUS, never a zero page.

use alloc::vec::Vec;

use crate::abi::layout::PAGE_SIZE;
use crate::abi::syscall::UffdMsg;
use crate::mm::core::PageState;
use crate::sync::SpinLock;

/// Most userfaultfds in the VM.
pub const MAX_UFFDS: usize = 16;
/// Wait key of the tasks faulting on uffd `id` (1-based).
pub const fn fault_key(id: u32) -> u64 {
    0x100 + id as u64
}
/// Wait key of the handlers reading uffd `id`.
pub const fn read_key(id: u32) -> u64 {
    0x200 + id as u64
}

struct Uffd {
    owner: usize,
    root: u64,
    start: u64,
    end: u64,
    /// The task that reads the messages (first reader); `usize::MAX` = none yet.
    handler: usize,
    dead: bool,
    /// Pages with a message (read or not) and no answer yet.
    requested: Vec<u64>,
    /// Messages not read yet.
    queue: Vec<UffdMsg>,
}

static UFFDS: SpinLock<Vec<Uffd>> = SpinLock::new(Vec::new());

/// Creates uffd for `[start, end)` of task `owner` (space root `root`);
/// returns its id (1-based).
pub fn create(owner: usize, root: u64, start: u64, end: u64) -> Option<u32> {
    let mut u = UFFDS.lock();
    if u.len() >= MAX_UFFDS {
        return None;
    }
    u.push(Uffd {
        owner,
        root,
        start,
        end,
        handler: usize::MAX,
        dead: false,
        requested: Vec::new(),
        queue: Vec::new(),
    });
    Some(u.len() as u32)
}

/// A fault of task `tid` at page `va` of uffd `id`: queue a message (once per
/// page) and the task (`sleep`, called under the uffd lock).
pub fn fault(id: u32, va: u64, tid: usize, sleep: impl FnOnce()) -> PageState {
    let mut wake_reader = false;
    let state = {
        let mut all = UFFDS.lock();
        let Some(u) = all.get_mut(id as usize - 1) else {
            return PageState::Gone;
        };
        if u.dead {
            return PageState::Gone;
        }
        if !u.requested.contains(&va) {
            u.requested.push(va);
            u.queue.push(UffdMsg {
                addr: va,
                tid: tid as u64,
            });
            crate::task::stats::USERFAULTS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            wake_reader = true;
        }
        sleep();
        PageState::Wait
    };
    if wake_reader {
        crate::task::wait::wake_all(read_key(id));
    }
    state
}

/// What `read` found.
pub enum Read {
    Msg(UffdMsg),
    /// Nothing yet: `sleep` was called.
    Empty,
    Invalid,
}

/// Takes the next message of uffd `id` for handler `tid`.
pub fn read(id: u32, tid: usize, sleep: impl FnOnce()) -> Read {
    let mut all = UFFDS.lock();
    let Some(u) = id.checked_sub(1).and_then(|i| all.get_mut(i as usize)) else {
        return Read::Invalid;
    };
    if u.handler == usize::MAX {
        u.handler = tid;
    }
    // The owner is gone: nothing more will come.
    if u.dead && u.queue.is_empty() {
        return Read::Invalid;
    }
    if u.queue.is_empty() {
        sleep();
        return Read::Empty;
    }
    Read::Msg(u.queue.remove(0))
}

/// The owner's space root and the page, if `addr` is a page of uffd `id`.
pub fn target(id: u32, addr: u64) -> Option<(usize, u64, u64)> {
    let all = UFFDS.lock();
    let u = all.get((id as usize).checked_sub(1)?)?;
    let page = addr & !(PAGE_SIZE - 1);
    (u.start <= page && page < u.end && !u.dead).then_some((u.owner, u.root, page))
}

/// Page `page` of uffd `id` is mapped now: wake its waiters.
pub fn resolved(id: u32, page: u64) {
    {
        let mut all = UFFDS.lock();
        if let Some(u) = all.get_mut(id as usize - 1) {
            u.requested.retain(|&p| p != page);
        }
    }
    crate::task::wait::wake_all(fault_key(id));
}

/// Task `tid` ended: the uffds it handled are dead; their waiters retry and
/// get SIGBUS.
pub fn task_died(tid: usize) {
    let mut dead = [0u32; MAX_UFFDS];
    let mut n = 0;
    {
        let mut all = UFFDS.lock();
        for (i, u) in all.iter_mut().enumerate() {
            if u.handler == tid || u.owner == tid {
                u.dead = true;
                dead[n] = i as u32 + 1;
                n += 1;
            }
        }
    }
    for id in &dead[..n] {
        crate::task::wait::wake_all(fault_key(*id));
        crate::task::wait::wake_all(read_key(*id));
    }
}
