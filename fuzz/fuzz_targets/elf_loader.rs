//! A kernel file as `vmm run --kernel PATH` loads it
//! (`vmm_core::loader::load_kernel`: `inspect_elf`'s checks, then
//! linux-loader writing the segments into guest memory) and a user program
//! as the boot module (`load_module`), into 64 MiB of guest RAM (the
//! smallest VM). A kernel that loads has its entry point and image end
//! inside the kernel area.
//!
//! Seeds (`docs/fuzzing.md`): the bundled guest kernel, stripped and cut to
//! its headers, text and rodata (its 750 KiB data segment's file size set to
//! 0); its first 4 KiB; the bundled user program, stripped; the loader
//! tests' minimal one-segment ELF.
#![no_main]

use abi::layout::{KERNEL_START, MIN_MEM_SIZE, MODULE_START};
use devices::GuestRam;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vmm_core::loader::{inspect_elf, load_kernel, load_module};
use vmm_fuzz::vm_ram;

/// One guest memory for every input: loading only writes it.
fn mem() -> &'static GuestRam {
    static MEM: OnceLock<GuestRam> = OnceLock::new();
    MEM.get_or_init(|| vm_ram(MIN_MEM_SIZE))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = inspect_elf(data, "the kernel") {
        assert!(!info.segments.is_empty());
    }
    if let Ok((entry, end)) = load_kernel(mem(), MIN_MEM_SIZE, data) {
        assert!((KERNEL_START..MODULE_START).contains(&entry), "entry {entry:#x}");
        assert!(end > entry && end <= MODULE_START, "end {end:#x}");
    }
    let _ = load_module(mem(), data);
});
