//! x86_64: long-mode entry state, boot page tables and GDT, CPUID; the
//! hand-assembled minimal VM (`minimal_vm`: the fault benchmark's baseline
//! and the KVM write-protect probe).

pub mod cpu;
pub mod minimal_vm;
pub mod paging;
