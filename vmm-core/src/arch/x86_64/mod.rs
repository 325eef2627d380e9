//! x86_64: long-mode entry state, boot page tables and GDT, CPUID.

pub mod cpu;
pub mod paging;
