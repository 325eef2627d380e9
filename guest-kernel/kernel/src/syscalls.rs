//! System-call implementations (abi::syscall). The entry mechanism is arch's
//! business (arch/x86_64/syscall.rs); this is the generic part.

use crate::abi::pv::{status, PvMessage, WorkloadReport};
use crate::abi::syscall::{UserReport, EFAULT, EINVAL, SYS_EXIT, SYS_REPORT, SYS_WRITE};
use crate::task;

/// Longest SYS_WRITE, to bound time spent in the (emulated) kernel.
const MAX_WRITE: u64 = 4096;

/// Runs call `nr`; the result goes to the task's RAX.
pub fn dispatch(nr: u64, args: [u64; 3]) -> i64 {
    match nr {
        SYS_EXIT => task::exit(args[0]),
        SYS_WRITE => write(args[0], args[1]),
        SYS_REPORT => report(args[0]),
        _ => EINVAL,
    }
}

fn write(ptr: u64, len: u64) -> i64 {
    let len = len.min(MAX_WRITE);
    if !task::prepare_user_range(ptr, len, false) {
        return EFAULT;
    }
    // SAFETY: the range is mapped user memory of the current task (checked above),
    // visible in the current address space; user code is not running meanwhile.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) };
    crate::print::bytes(bytes);
    len as i64
}

fn report(ptr: u64) -> i64 {
    let size = core::mem::size_of::<UserReport>() as u64;
    if !task::prepare_user_range(ptr, size, false) {
        return EFAULT;
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
    // The plan in the args is task_plan's, so this is expected_task_checksum.
    let expected = a.plan().checksum(a.pattern(), a.write != 0, a.seed);
    let ok = user.checksum == expected && user.pages == a.pages;
    t.checksum_ok = Some(ok);
    if ok {
        kprintln!("guest-kernel: cpu {} checksum OK {:#x}", a.cpu, user.checksum);
    } else {
        kprintln!(
            "guest-kernel: cpu {} checksum MISMATCH got {:#x} expected {:#x} (pages {} of {})",
            a.cpu, user.checksum, expected, user.pages, a.pages
        );
    }
    0
}
