//! The bundled user program. It runs natively at CPL3 (unlike the kernel, which
//! is emulated), so all workload work happens here; the kernel only serves page
//! faults and a few system calls.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

use core::ptr::{read_volatile, write_volatile};
use vmm_abi::layout::PAGE_SIZE;
use vmm_abi::syscall::{TaskArgs, UserReport, ROLE_TEST, SYS_CHECKPOINT, SYS_EXIT, SYS_REPORT, SYS_WRITE};

mod suite;
use vmm_abi::workload::{faas_order, fold, invoked_value, page_value, value_offset, WorkloadKind};

// Entry: RDI = &TaskArgs, RSP = USER_STACK_TOP (16-byte aligned), so a plain
// `call` gives user_main the SysV-aligned stack it expects.
core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "xor ebp, ebp",
    "call {main}",
    "ud2",
    main = sym user_main,
);

/// One system call. The entry instruction is `int3` (see abi::syscall).
fn syscall(nr: u64, a0: u64, a1: u64) -> i64 {
    syscall3(nr, a0, a1, 0)
}

/// A system call with three arguments.
fn syscall3(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: `int3` enters the kernel's system-call gate, which reads RAX/RDI/RSI,
    // writes RAX and preserves every other register; the arguments it reads
    // through pointers are validated by the kernel.
    unsafe {
        core::arch::asm!("int3", inlateout("rax") nr as i64 => ret, in("rdi") a0, in("rsi") a1, in("rdx") a2);
    }
    ret
}

fn exit(code: u64) -> ! {
    syscall(SYS_EXIT, code, 0);
    // SYS_EXIT does not return; if it ever did, trap rather than run on.
    loop {
        core::hint::spin_loop();
    }
}

fn write(bytes: &[u8]) {
    syscall(SYS_WRITE, bytes.as_ptr() as u64, bytes.len() as u64);
}

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads the time-stamp counter; no memory access.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Appends the decimal digits of `n` to `buf` at `*len`.
fn push_decimal(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        if *len < buf.len() {
            buf[*len] = d;
            *len += 1;
        }
    }
}

/// Prints `<prefix><cpu><suffix>` (at most 64 bytes).
fn write_cpu_line(prefix: &[u8], cpu: u32, suffix: &[u8]) {
    let mut buf = [0u8; 64];
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    push_decimal(&mut buf, &mut len, u64::from(cpu));
    for &b in suffix {
        if len < buf.len() {
            buf[len] = b;
            len += 1;
        }
    }
    write(&buf[..len]);
}

fn hello(args: &TaskArgs) -> UserReport {
    write_cpu_line(b"hello from user mode on cpu ", args.cpu, b"\n");
    UserReport {
        checksum: 0,
        pages: 0,
        cycles: 0,
    }
}

fn touch(args: &TaskArgs) -> UserReport {
    let Some(pattern) = args.pattern() else { exit(1) };
    // The kernel built the args from abi::workload::task_plan.
    let plan = args.plan();
    let (first, seed) = (plan.first_page, args.seed);
    let addr = |page: u64| (args.work_base + page * PAGE_SIZE + value_offset(page)) as *mut u64;
    // Tests wait for this line to know the loop has begun; nothing is printed
    // inside the timed loop.
    write_cpu_line(b"touch: cpu ", args.cpu, b" start\n");
    let start = rdtsc();
    for i in plan.order(pattern) {
        let page = first + i;
        if args.write != 0 {
            // SAFETY: the page lies in the task's work region (work_base +
            // [first, first + pages) pages), which the kernel maps on first
            // touch (or before entry with populate=1). With shared=1 other tasks
            // write the same value at the same offset, so the race is benign.
            unsafe { write_volatile(addr(page), page_value(seed, page)) };
        } else {
            // SAFETY: as above; a read of a fresh page reads zero.
            unsafe { read_volatile(addr(page)) };
        }
    }
    let mut sum = 0;
    for i in plan.order(pattern) {
        let page = first + i;
        // SAFETY: as above; the page is mapped by the first pass.
        let value = unsafe { read_volatile(addr(page)) };
        sum = fold(sum, page, value);
    }
    UserReport {
        checksum: sum,
        pages: plan.pages,
        cycles: rdtsc().wrapping_sub(start),
    }
}

/// `dirty`: writes every page once, then rewrites them in turn at
/// `args.rate` pages/s (timed with the TSC) for `args.duration_ms`, then
/// reads them back. The values depend only on the page, so the checksum
/// does not depend on how many rounds ran: only the dirty rate does.
fn dirty(args: &TaskArgs) -> UserReport {
    let plan = args.plan();
    let (first, seed) = (plan.first_page, args.seed);
    let addr = |page: u64| (args.work_base + page * PAGE_SIZE + value_offset(page)) as *mut u64;
    let write = |i: u64| {
        let page = first + i;
        // SAFETY: the page lies in the task's work region, mapped on first touch.
        unsafe { write_volatile(addr(page), page_value(seed, page)) };
    };
    for i in 0..plan.pages {
        write(i);
    }
    write_cpu_line(b"dirty: cpu ", args.cpu, b" start\n");
    let start = rdtsc();
    let cycles_per_ms = args.tsc_khz.max(1);
    let end = start.wrapping_add(args.duration_ms.saturating_mul(cycles_per_ms));
    // The interval between writes; 0 (unknown TSC or no rate) writes flat out.
    let interval = match (args.tsc_khz, args.rate) {
        (0, _) | (_, 0) => 0,
        (khz, rate) => khz.saturating_mul(1000) / rate,
    };
    let mut next = start;
    let mut i = 0;
    while plan.pages > 0 && rdtsc() < end {
        if rdtsc() >= next {
            write(i % plan.pages);
            i += 1;
            next = next.wrapping_add(interval);
        } else {
            core::hint::spin_loop();
        }
    }
    let mut sum = 0;
    for i in 0..plan.pages {
        let page = first + i;
        // SAFETY: as above.
        let value = unsafe { read_volatile(addr(page)) };
        sum = fold(sum, page, value);
    }
    UserReport {
        checksum: sum,
        pages: plan.pages,
        cycles: rdtsc().wrapping_sub(start),
    }
}

/// `faas`: builds the state (every page of the share written once), waits
/// at the checkpoint until the VM is a restored copy, then runs one
/// invocation: draws pages in the pattern's order until `plan.accesses`
/// distinct ones were touched (a page not seen yet still holds its state
/// value; the invocation overwrites it with its mark), folding the state
/// values read. The cycles are the invocation's alone.
fn faas(args: &TaskArgs) -> UserReport {
    let Some(pattern) = args.pattern() else { exit(1) };
    let plan = args.plan();
    let (first, seed) = (plan.first_page, args.seed);
    let addr = |page: u64| (args.work_base + page * PAGE_SIZE + value_offset(page)) as *mut u64;
    for i in 0..plan.pages {
        // SAFETY: the page lies in the task's work region, mapped on first touch.
        unsafe { write_volatile(addr(first + i), page_value(seed, first + i)) };
    }
    write_cpu_line(b"faas: cpu ", args.cpu, b" at the checkpoint\n");
    // Ask about once a millisecond (each ask is a trip through the kernel).
    let pause = args.tsc_khz.max(100_000);
    while syscall(SYS_CHECKPOINT, 0, 0) != 0 {
        let t = rdtsc();
        while rdtsc().wrapping_sub(t) < pause {
            core::hint::spin_loop();
        }
    }
    let start = rdtsc();
    let (mut sum, mut n) = (0, 0);
    for i in faas_order(&plan, pattern) {
        if n >= plan.accesses {
            break;
        }
        let page = first + i;
        let mark = invoked_value(seed, page);
        // SAFETY: as above; the page holds its state value (or the mark).
        let v = unsafe { read_volatile(addr(page)) };
        if v != mark {
            sum = fold(sum, page, v);
            // A pattern that visits each page once needs no mark to tell a
            // page seen before: past `writes` pages, only read.
            if n < args.writes || pattern.samples() {
                // SAFETY: as above.
                unsafe { write_volatile(addr(page), mark) };
            }
            n += 1;
        }
    }
    UserReport {
        checksum: sum,
        pages: plan.pages,
        cycles: rdtsc().wrapping_sub(start),
    }
}

extern "C" fn user_main(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel maps a TaskArgs read-only at RDI before entry.
    let args = unsafe { &*args };
    if args.role == ROLE_TEST {
        exit(suite::run(args))
    }
    if args.role != 0 {
        exit(suite::child(args))
    }
    let report = match WorkloadKind::from_raw(args.workload) {
        Some(WorkloadKind::Hello) => hello(args),
        Some(WorkloadKind::Touch) => touch(args),
        Some(WorkloadKind::Dirty) => dirty(args),
        Some(WorkloadKind::Faas) => faas(args),
        _ => exit(1),
    };
    syscall(SYS_REPORT, &report as *const UserReport as u64, 0);
    exit(0)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    exit(1)
}
