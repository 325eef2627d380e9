//! System-call implementations (abi::syscall). The entry mechanism is arch's
//! business (arch/x86_64/syscall.rs); this is the generic part.
//!
//! A call that must wait queues the task and asks for a restart: the task's
//! RIP goes back to its `int3`, and the call runs again from the start when the
//! task is woken (after any signal handler: like SA_RESTART).

use crate::abi::layout::PAGE_SIZE;
use crate::abi::pv::{status, PvMessage, WorkloadReport};
use crate::abi::syscall::*;
use crate::arch;
use crate::arch::entry::TrapFrame;
use crate::arch::syscall as entry;
use crate::mm::fault::{self, UserAccess};
use crate::mm::USER_RW;
use crate::task::{self, MM_LOCKS};

/// Longest SYS_WRITE, to bound time spent in the (emulated) kernel.
const MAX_WRITE: u64 = 4096;
/// Longest SYS_SUM.
const MAX_SUM: u64 = 16 * PAGE_SIZE;

enum Ret {
    Value(i64),
    /// Run the call again when the task next runs.
    Restart,
    /// The frame was set by the call (sigreturn).
    Frame,
}

impl From<UserAccess> for Ret {
    fn from(e: UserAccess) -> Ret {
        match e {
            UserAccess::Fault => Ret::Value(EFAULT),
            UserAccess::Restart => Ret::Restart,
        }
    }
}

/// Runs the call in `frame` and stores its result (or restarts it).
pub fn dispatch(frame: &mut TrapFrame) {
    let call = entry::args(frame);
    let [a0, a1, a2] = call.args;
    let ret = match call.nr {
        SYS_EXIT => task::exit(a0),
        SYS_WRITE => write(a0, a1),
        SYS_REPORT => report(a0),
        SYS_YIELD => Ret::Value(0),
        SYS_GETPID => Ret::Value(task::current_tid() as i64),
        SYS_SLEEP => {
            // The result is set now: a woken sleep returns to after the call.
            entry::set_result(frame, 0);
            task::wait::sleep_current(task::wait::SLEEP_KEY, a0.max(1));
            Ret::Frame
        }
        SYS_SPAWN => spawn(a0, a1, a2),
        SYS_WAIT => match task::wait::wait_child(a0 as usize) {
            Some(Ok(st)) => Ret::Value(st),
            Some(Err(())) => Ret::Value(ESRCH),
            None => Ret::Restart,
        },
        SYS_KILL => Ret::Value(if task::signal::send_signal(a0 as usize, a1) {
            0
        } else {
            ESRCH
        }),
        SYS_SIGACTION => {
            let t = task::current();
            match t.handlers.get_mut(a0 as usize) {
                Some(h) if a0 != sig::SIGKILL && a0 != sig::SIGSTOP && a0 != 0 => {
                    *h = a1;
                    t.restorers[a0 as usize] = a2;
                    Ret::Value(0)
                }
                _ => Ret::Value(EINVAL),
            }
        }
        SYS_SIGMASK => Ret::Value(task::signal::set_blocked(a0) as i64),
        SYS_SIGRETURN => {
            if !task::signal::sigreturn(frame) {
                task::kill(format_args!("bad signal frame"));
            }
            Ret::Frame
        }
        SYS_UFFD_REGISTER => uffd_register(a0, a1),
        SYS_UFFD_READ => uffd_read(a0, a1),
        SYS_UFFD_COPY => match uffd_copy(a0 as u32, a1, a2) {
            Ok(()) => Ret::Value(0),
            Err(e) => e.into(),
        },
        SYS_STATS => stats(a0),
        SYS_SUM => sum(a0, a1),
        SYS_CHECKPOINT => Ret::Value(match crate::pv::send(&PvMessage::Checkpoint) {
            status::OK => 0,
            _ => 1,
        }),
        SYS_STORE_CTL => Ret::Value(match a0 {
            store_ctl::HOLD => crate::mm::store::hold(a1, true),
            store_ctl::RELEASE => crate::mm::store::hold(a1, false),
            store_ctl::WAITING => i64::from(task::wait::in_store_wait(a1 as usize)),
            _ => EINVAL,
        }),
        _ => Ret::Value(EINVAL),
    };
    match ret {
        Ret::Value(v) => entry::set_result(frame, v),
        Ret::Restart => entry::restart(frame),
        Ret::Frame => {}
    }
}

fn write(ptr: u64, len: u64) -> Ret {
    let len = len.min(MAX_WRITE);
    if let Err(e) = fault::prepare_user_range(ptr, len, false) {
        return e.into();
    }
    // SAFETY: the range is mapped user memory of the current task (checked above),
    // visible in the current address space; user code is not running meanwhile.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) };
    crate::print::bytes(bytes);
    Ret::Value(len as i64)
}

fn sum(ptr: u64, len: u64) -> Ret {
    let len = len.min(MAX_SUM) & !7;
    if let Err(e) = fault::prepare_user_range(ptr, len, false) {
        return e.into();
    }
    let mut total = 0u64;
    for i in 0..len / 8 {
        // SAFETY: as in `write`; read_unaligned copes with any user alignment.
        total = total.wrapping_add(unsafe { core::ptr::read_unaligned((ptr + i * 8) as *const u64) });
    }
    Ret::Value(total as i64)
}

fn spawn(role: u64, arg: u64, cpu: u64) -> Ret {
    let Some(shared) = crate::SHARED.get() else {
        return Ret::Value(EINVAL);
    };
    let me = task::current();
    let cpu = if cpu == u64::MAX { me.cpu } else { cpu as u32 };
    if cpu >= shared.cpu_count || role < ROLE_USER {
        return Ret::Value(EINVAL);
    }
    let spec = task::Spec {
        cpu,
        slot: 0,
        slots: 1,
        role,
        arg,
        parent: me.tid,
        top_level: false,
    };
    match task::create(spec, shared) {
        Ok(tid) => Ret::Value(tid as i64),
        Err(_) => Ret::Value(EAGAIN),
    }
}

fn uffd_register(start: u64, len: u64) -> Ret {
    let t = task::current();
    let Some(end) = start.checked_add(len) else {
        return Ret::Value(EINVAL);
    };
    let Some(id) = crate::uffd::create(t.tid, t.space.root, start, end) else {
        return Ret::Value(EAGAIN);
    };
    match t.space.register_uffd(start, end, id) {
        Ok(()) => {
            fault::forget_fast_region(t);
            Ret::Value(i64::from(id))
        }
        Err(_) => Ret::Value(EINVAL),
    }
}

fn uffd_read(id: u64, ptr: u64) -> Ret {
    let size = core::mem::size_of::<UffdMsg>() as u64;
    if let Err(e) = fault::prepare_user_range(ptr, size, true) {
        return e.into();
    }
    let tid = task::current_tid();
    let id = id as u32;
    match crate::uffd::read(id, tid, || {
        task::wait::sleep_current(crate::uffd::read_key(id), 0)
    }) {
        crate::uffd::Read::Msg(m) => {
            // SAFETY: mapped, writable user memory of the current task (checked above).
            unsafe { core::ptr::write_unaligned(ptr as *mut UffdMsg, m) };
            Ret::Value(0)
        }
        crate::uffd::Read::Empty => Ret::Restart,
        crate::uffd::Read::Invalid => Ret::Value(EINVAL),
    }
}

/// Resolves page `addr` of uffd `id` with a copy of the current task's page
/// at `src` (0 = zero page).
fn uffd_copy(id: u32, addr: u64, src: u64) -> Result<(), UserAccess> {
    let Some((owner, root, page)) = crate::uffd::target(id, addr) else {
        return Err(UserAccess::Fault);
    };
    if src != 0 {
        fault::prepare_user_range(src, PAGE_SIZE, false)?;
    }
    let pa = crate::mm::frame::alloc_zeroed().ok_or(UserAccess::Fault)?;
    if src != 0 {
        // SAFETY: `src` is a mapped page of the current task (checked above) and
        // `pa` a fresh identity-mapped frame we own.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, pa as *mut u8, PAGE_SIZE as usize) };
    }
    {
        let _mm = MM_LOCKS[owner].lock();
        if !arch::paging::is_user_mapped(root, page, false) {
            arch::paging::map_4k(root, page, pa, USER_RW).map_err(|_| UserAccess::Fault)?;
        }
    }
    crate::uffd::resolved(id, page);
    Ok(())
}

fn stats(ptr: u64) -> Ret {
    let s = task::stats::guest_stats();
    let size = core::mem::size_of_val(&s) as u64;
    if let Err(e) = fault::prepare_user_range(ptr, size, true) {
        return e.into();
    }
    // SAFETY: mapped, writable user memory of the current task (checked above).
    unsafe { core::ptr::write_unaligned(ptr as *mut crate::abi::pv::store::GuestStats, s) };
    Ret::Value(0)
}

fn report(ptr: u64) -> Ret {
    let size = core::mem::size_of::<UserReport>() as u64;
    if let Err(e) = fault::prepare_user_range(ptr, size, false) {
        return e.into();
    }
    // SAFETY: as in `write`; read_unaligned copes with any user alignment.
    let user = unsafe { core::ptr::read_unaligned(ptr as *const UserReport) };
    let t = task::current();
    let a = t.args;
    let report = WorkloadReport {
        cpu: a.cpu,
        workload: a.workload,
        first_page: a.first_page,
        pages: user.pages,
        checksum: user.checksum,
        faults: t.faults,
        cycles: user.cycles,
    };
    if crate::pv::send(&PvMessage::Report(report)) != status::OK {
        kprintln!("guest-kernel: cpu {} the VMM rejected the report", a.cpu);
    }
    if a.workload == crate::abi::workload::WorkloadKind::Faas as u32 {
        // Its checksum needs the set of pages seen: the host checks it.
        t.checksum_ok = Some(user.pages == a.pages);
        kprintln!(
            "guest-kernel: cpu {} invocation done, checksum {:#x} (checked by the host)",
            a.cpu,
            user.checksum
        );
        return Ret::Value(0);
    }
    // The plan in the args is task_plan's, so this is expected_task_checksum.
    let expected = a.expected_checksum().unwrap_or(!user.checksum);
    let ok = user.checksum == expected && user.pages == a.pages;
    t.checksum_ok = Some(ok);
    if ok {
        kprintln!("guest-kernel: cpu {} checksum OK {:#x}", a.cpu, user.checksum);
    } else {
        kprintln!(
            "guest-kernel: cpu {} checksum MISMATCH got {:#x} expected {:#x} (pages {} of {})",
            a.cpu,
            user.checksum,
            expected,
            user.pages,
            a.pages
        );
    }
    Ret::Value(0)
}
