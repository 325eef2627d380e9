//! The bundled guest kernel.
//!
//! Boots on vCPU 0, sets up memory and descriptor tables, starts the other
//! vCPUs through the paravirtual channel, then every vCPU runs one user task
//! (the boot module) to completion. The last CPU to finish ends the VM with the
//! verdict. Kernel code runs under KVM's instruction emulator on this project's
//! KVM (see docs/guest-kernel.md), so kernel paths are kept short and the
//! workloads run in user mode.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]
// `%` instead of is_multiple_of: keeps the crate buildable with Rust 1.85 (the
// project's minimum).
#![allow(clippy::manual_is_multiple_of)]

extern crate alloc;

#[macro_use]
mod print;
mod arch;
mod loader;
mod mm;
mod pv;
mod sync;
mod syscalls;
mod task;
mod uffd;

use vmm_abi as abi;

use abi::boot::{BootInfo, MemKind};
use abi::exit::ExitCode;
use abi::layout::{FREE_RAM_START, MODULE_MAX_SIZE, MODULE_START, PAGE_SIZE};
use abi::pv::{status, PvMessage};
use abi::workload::{parse_cmdline, WorkloadConfig, WorkloadKind};
use sync::SetOnce;

/// Kernel heap size, taken from the frame allocator at boot.
const HEAP_PAGES: u64 = 256;

/// State the boot CPU sets up for every CPU, before starting them.
#[derive(Debug)]
pub struct Shared {
    pub config: WorkloadConfig,
    pub cpu_count: u32,
    /// Root of the kernel's own page tables (identity map of RAM).
    pub kernel_root: u64,
    /// The user program ELF (boot module) and its physical address.
    pub module: &'static [u8],
    pub module_pa: u64,
    /// The TSC frequency in kHz the VMM measured (0 if unknown).
    pub tsc_khz: u32,
}

pub(crate) static SHARED: SetOnce<Shared> = SetOnce::new();

/// Prints an error and ends the VM with `code`.
fn fail(code: ExitCode, args: core::fmt::Arguments<'_>) -> ! {
    print::line(args);
    arch::exit_vm(code)
}

/// Entered from `_start` on every CPU, on that CPU's boot stack.
pub extern "C" fn kmain(boot_info: u64, cpu: u64) -> ! {
    // `_start` only calls us with cpu < MAX_VCPUS.
    let cpu = cpu as u32;
    if cpu == 0 {
        // SAFETY: the boot protocol puts a BootInfo at RDI (identity-mapped, below
        // 4 GiB); nothing writes it afterwards. It is validated before use.
        let info = unsafe { &*(boot_info as *const BootInfo) };
        boot_cpu(info);
    }
    let Some(shared) = SHARED.get() else {
        fail(
            ExitCode::Panic,
            format_args!("guest-kernel: cpu {cpu} started before cpu 0 finished booting"),
        )
    };
    arch::init_cpu(cpu);
    // SAFETY: the kernel tables identity-map all RAM, including this code, stack
    // and data.
    unsafe { arch::paging::switch_to(shared.kernel_root) };
    // The workload: `tasks` tasks per vCPU; the test suite: one runner on vCPU 0,
    // which spawns the rest (the other vCPUs idle until then).
    let cfg = &shared.config;
    let (roles, tasks) = match cfg.test {
        Some(_) if cpu == 0 => (abi::syscall::ROLE_TEST, 1),
        Some(_) => (0, 0),
        None => (0, cfg.tasks),
    };
    for k in 0..tasks {
        let slots = if cfg.kind.touches_pages() {
            shared.cpu_count
        } else {
            shared.cpu_count * cfg.tasks
        };
        let slot = if cfg.kind.touches_pages() {
            cpu
        } else {
            cpu * cfg.tasks + k
        };
        let spec = task::Spec {
            cpu,
            slot,
            slots,
            role: roles,
            arg: 0,
            parent: usize::MAX,
            top_level: true,
        };
        match task::create(spec, shared) {
            Ok(_) => {}
            Err(task::CreateError::NoMemory) => fail(
                ExitCode::OutOfMemory,
                format_args!("guest-kernel: cpu {cpu} out of memory creating its task"),
            ),
            Err(e) => fail(
                ExitCode::Panic,
                format_args!("guest-kernel: cpu {cpu} cannot create its task: {e:?}"),
            ),
        }
    }
    task::sched::start_cpu(cpu)
}

/// vCPU 0: console, boot information, command line, memory, shared tables.
fn boot_cpu(info: &'static BootInfo) {
    arch::serial::init();
    if let Err(e) = info.validate() {
        fail(
            ExitCode::Panic,
            format_args!("guest-kernel: invalid boot information: {e:?}"),
        );
    }
    let cmdline = info.cmdline().unwrap_or("");
    let mem: u64 = info.regions().iter().map(|r| r.len).sum();
    kprintln!(
        "guest-kernel: booting on {} vCPUs, {} MiB, cmdline `{}`",
        info.cpu_count,
        mem >> 20,
        cmdline
    );
    let config = match parse_cmdline(cmdline) {
        Ok(c) => c,
        Err(e) => fail(
            ExitCode::BadCmdline,
            format_args!("guest-kernel: bad command line: {e}"),
        ),
    };
    if config.kind == WorkloadKind::TripleFault {
        kprintln!("guest-kernel: triple-faulting on purpose");
        arch::triple_fault();
    }

    let module = info.user_image;
    let module_ok = module.start >= MODULE_START
        && module.len > 0
        && module.len <= MODULE_MAX_SIZE
        && module.start % PAGE_SIZE == 0
        && module
            .start
            .checked_add(module.len)
            .is_some_and(|end| end <= FREE_RAM_START);
    if !module_ok {
        fail(
            ExitCode::Panic,
            format_args!("guest-kernel: no valid user program module ({module:?})"),
        );
    }
    // SAFETY: checked above to lie in the module area, which the VMM filled and
    // nothing writes afterwards; identity-mapped by the boot and kernel tables.
    let image = unsafe { core::slice::from_raw_parts(module.start as *const u8, module.len as usize) };

    let free = mm::frame::init(info.regions());
    // Identity-map every RAM region, plus everything below the free area (boot
    // data, kernel, module) whatever the map says about it.
    let ram = info
        .regions()
        .iter()
        .filter(|r| r.kind == MemKind::Usable as u32 || r.kind == MemKind::Reserved as u32)
        .map(|r| (r.start, r.len));
    let kernel_root = match arch::paging::build_kernel_tables(ram.chain([(0, FREE_RAM_START)])) {
        Ok(root) => root,
        Err(_) => fail(
            ExitCode::OutOfMemory,
            format_args!("guest-kernel: out of memory building page tables"),
        ),
    };
    match mm::frame::alloc_contiguous(HEAP_PAGES) {
        Some(start) => mm::heap::init(start, HEAP_PAGES * PAGE_SIZE),
        None => fail(
            ExitCode::OutOfMemory,
            format_args!("guest-kernel: out of memory for the heap"),
        ),
    }
    if config.kind.touches_pages() && config.shared && mm::shared::init(config.pages).is_err() {
        fail(
            ExitCode::OutOfMemory,
            format_args!("guest-kernel: out of memory for the shared page table"),
        );
    }
    if arch::apic::needs_mmio() && arch::paging::map_mmio_2m(kernel_root, abi::layout::LAPIC_START).is_err() {
        fail(
            ExitCode::OutOfMemory,
            format_args!("guest-kernel: out of memory mapping the APIC"),
        );
    }
    if config.kind.touches_pages() && config.tasks != 1 {
        fail(
            ExitCode::BadCmdline,
            format_args!("guest-kernel: bad command line: tasks= is for hello and tests"),
        );
    }
    mm::store::init(config.store_delay_us);
    // The lone benchmark runs one task: keep IF=0 in user mode there too, so it
    // measures the fault path without KVM's async page faults (see apic docs).
    let bench = abi::workload::TESTS
        .iter()
        .position(|t| *t == "bench-fault")
        .map(|i| i as u64);
    let lone_bench = config.test.is_some() && config.test == bench;
    arch::entry::set_user_preemptible((config.test.is_some() && !lone_bench) || config.tasks > 1);
    task::expect_top_level(if config.test.is_some() {
        1
    } else {
        info.cpu_count * config.tasks
    });
    kprintln!("guest-kernel: {} MiB of free frames", free >> 20);
    arch::idt::init();

    let shared = Shared {
        config,
        cpu_count: info.cpu_count,
        kernel_root,
        module: image,
        module_pa: module.start,
        tsc_khz: info.tsc_khz,
    };
    if SHARED.set(shared).is_err() {
        panic!("boot state set twice");
    }
    let st = pv::send(&PvMessage::StartCpus);
    if st != status::OK && info.cpu_count > 1 {
        fail(
            ExitCode::Panic,
            format_args!("guest-kernel: the VMM refused to start the other vCPUs (status {st})"),
        );
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match arch::entry::current_cpu() {
        Some(cpu) => print::line_unlocked(format_args!("guest-kernel: PANIC on cpu {cpu}: {info}")),
        None => print::line_unlocked(format_args!("guest-kernel: PANIC: {info}")),
    }
    arch::exit_vm(ExitCode::Panic)
}
