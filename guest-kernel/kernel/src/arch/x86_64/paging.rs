//! x86_64 4-level page tables. Page-table frames are reached through the
//! kernel's identity map (physical == virtual for all RAM, PML4 slot 0).

use crate::mm::frame;
use crate::mm::{NoMemory, Perms};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const ENTRIES: usize = 512;
const LARGE_PAGE: u64 = crate::abi::layout::LARGE_PAGE_SIZE;

/// Intermediate entries allow everything; the leaf decides.
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED;

type Table = [u64; ENTRIES];

/// The table in frame `pa`.
///
/// # Safety
/// `pa` must be a page-table frame owned by the caller's address space (or the
/// kernel's), identity-mapped, with no other live reference to it.
unsafe fn table<'a>(pa: u64) -> &'a mut Table {
    // SAFETY: per the caller's contract.
    unsafe { &mut *(pa as *mut Table) }
}

fn new_table() -> Result<u64, NoMemory> {
    frame::alloc_zeroed().ok_or(NoMemory)
}

/// The next-level table of `entry`, created if absent.
fn next_level(entry: &mut u64, flags: u64) -> Result<u64, NoMemory> {
    if *entry & PRESENT == 0 {
        *entry = new_table()? | flags;
    }
    Ok(*entry & ADDR_MASK)
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * level)) & 0x1FF) as usize
}

/// Builds the kernel's tables: an identity map, 2 MiB supervisor pages, of
/// every `(start, len)` range, all below 512 GiB (PML4 slot 0). Returns the PML4.
pub fn build_kernel_tables(ranges: impl Iterator<Item = (u64, u64)>) -> Result<u64, NoMemory> {
    let pml4 = new_table()?;
    // SAFETY: the frames are fresh and owned here; nobody else uses them yet.
    let pml4_t = unsafe { table(pml4) };
    let pdpt = next_level(&mut pml4_t[0], PRESENT | WRITABLE | ACCESSED)?;
    // SAFETY: as above.
    let pdpt_t = unsafe { table(pdpt) };
    for (start, len) in ranges {
        let mut addr = start & !(LARGE_PAGE - 1);
        let end = start.saturating_add(len).min(1 << 39);
        // One page directory (1 GiB) at a time: the inner loop is a plain store,
        // which matters when every instruction is emulated.
        while addr < end {
            let pd = next_level(&mut pdpt_t[index(addr, 2)], PRESENT | WRITABLE | ACCESSED)?;
            // SAFETY: as above.
            let pd_t = unsafe { table(pd) };
            let chunk_end = end.min((addr | ((1 << 30) - 1)) + 1);
            while addr < chunk_end {
                pd_t[index(addr, 1)] = addr | PRESENT | WRITABLE | HUGE | ACCESSED | DIRTY;
                addr += LARGE_PAGE;
            }
        }
    }
    Ok(pml4)
}

/// Maps the 2 MiB block at `pa` (MMIO, e.g. the xAPIC page) uncached,
/// supervisor only, in the kernel tables `root` (shared by every space).
pub fn map_mmio_2m(root: u64, pa: u64) -> Result<(), NoMemory> {
    const PWT: u64 = 1 << 3;
    const PCD: u64 = 1 << 4;
    let pa = pa & !(LARGE_PAGE - 1);
    let mut t = root;
    for level in [3, 2] {
        // SAFETY: the kernel's own tables, built at boot; no other CPU runs yet.
        let entry = unsafe { &mut table(t)[index(pa, level)] };
        t = next_level(entry, PRESENT | WRITABLE | ACCESSED)?;
    }
    // SAFETY: as above.
    unsafe { table(t)[index(pa, 1)] = pa | PRESENT | WRITABLE | HUGE | ACCESSED | DIRTY | PWT | PCD };
    Ok(())
}

/// A new top-level table for a user address space, sharing the kernel's slot 0
/// (the supervisor-only identity map) with every other space.
pub fn new_user_root(kernel_root: u64) -> Result<u64, NoMemory> {
    let root = new_table()?;
    // SAFETY: `root` is fresh; the kernel PML4 is only read.
    unsafe { table(root)[0] = table(kernel_root)[0] };
    Ok(root)
}

/// The leaf table (level 1) covering `va` in `root`, created if absent.
fn leaf_table(root: u64, va: u64) -> Result<u64, NoMemory> {
    let mut t = root;
    for level in (1..=3).rev() {
        // SAFETY: `root` and the tables below it belong to the caller's space.
        let entry = unsafe { &mut table(t)[index(va, level)] };
        t = next_level(entry, TABLE_FLAGS)?;
    }
    Ok(t)
}

fn leaf_flags(perms: Perms) -> u64 {
    // A and D preset: the CPU need not set them on first access.
    let mut leaf = PRESENT | ACCESSED;
    if perms.write {
        leaf |= WRITABLE | DIRTY;
    }
    if perms.user {
        leaf |= USER;
    }
    // No NX: EFER.NXE is left alone in this version, so `perms.exec` is not enforced.
    leaf
}

/// A cache of the leaf table of the last 2 MiB block a space faulted in: the
/// next demand-zero fault in the same block writes its entry directly instead
/// of walking four levels (every instruction and memory operand is emulated).
#[derive(Debug, Clone, Copy, Default)]
pub struct LeafCache {
    block: u64,
    table: u64,
}

/// The fast path of [`map_4k_cached`]: maps only if `va` is in the cached
/// block (`false`: nothing done, take the slow path).
#[inline(always)]
pub fn map_4k_if_cached(cache: &LeafCache, va: u64, pa: u64, perms: Perms) -> bool {
    if cache.table == 0 || cache.block != va & !(LARGE_PAGE - 1) {
        return false;
    }
    // SAFETY: a leaf table of the space the cache belongs to (never freed).
    unsafe { table(cache.table)[index(va, 0)] = pa | leaf_flags(perms) };
    true
}

/// Like [`map_4k`], through `cache` (which must only be used with `root`).
pub fn map_4k_cached(
    cache: &mut LeafCache,
    root: u64,
    va: u64,
    pa: u64,
    perms: Perms,
) -> Result<(), NoMemory> {
    let block = va & !(LARGE_PAGE - 1);
    if cache.table == 0 || cache.block != block {
        cache.table = leaf_table(root, va)?;
        cache.block = block;
    }
    // SAFETY: a leaf table of the caller's space (tables are never freed).
    unsafe { table(cache.table)[index(va, 0)] = pa | leaf_flags(perms) };
    Ok(())
}

/// Maps the 4 KiB page at `va` to frame `pa` in `root`, creating tables.
pub fn map_4k(root: u64, va: u64, pa: u64, perms: Perms) -> Result<(), NoMemory> {
    let t = leaf_table(root, va)?;
    // SAFETY: a leaf table of the caller's space.
    unsafe { table(t)[index(va, 0)] = pa | leaf_flags(perms) };
    Ok(())
}

/// The leaf entries of the `n` pages from `va`, which must lie in one 2 MiB
/// block (one leaf table), tables created if absent.
fn block_entries<'a>(root: u64, va: u64, n: u64) -> Result<&'a mut [u64], NoMemory> {
    let t = leaf_table(root, va)?;
    let first = index(va, 0);
    // SAFETY: a leaf table of the caller's space; no other reference to it here.
    let pt = unsafe { table(t) };
    match pt.get_mut(first..first + n as usize) {
        Some(entries) => Ok(entries),
        None => panic!("{n} pages from {va:#x} cross a 2 MiB block"),
    }
}

/// Maps the `n` pages from `va` (in one 2 MiB block) to the frames `frame(i)`.
/// The tables are walked once per block: every instruction here is emulated.
pub fn map_block(
    root: u64,
    va: u64,
    n: u64,
    perms: Perms,
    mut frame: impl FnMut(u64) -> Result<u64, NoMemory>,
) -> Result<(), NoMemory> {
    let flags = leaf_flags(perms);
    for (i, entry) in (0u64..).zip(block_entries(root, va, n)?.iter_mut()) {
        *entry = frame(i)? | flags;
    }
    Ok(())
}

/// Maps the `n` pages from `va` (in one 2 MiB block) to runs of contiguous
/// frames: `run(max)` gives `(first frame, count)` with `1 <= count <= max`.
/// The inner loop is a store and an add per page (every instruction is emulated).
pub fn map_block_runs(
    root: u64,
    va: u64,
    n: u64,
    perms: Perms,
    mut run: impl FnMut(u64) -> Result<(u64, u64), NoMemory>,
) -> Result<(), NoMemory> {
    let flags = leaf_flags(perms);
    let mut entries = block_entries(root, va, n)?;
    while !entries.is_empty() {
        let (pa, count) = run(entries.len() as u64)?;
        let (now, rest) = entries.split_at_mut((count as usize).clamp(1, entries.len()));
        let mut leaf = pa | flags;
        for entry in now {
            *entry = leaf;
            leaf += crate::abi::layout::PAGE_SIZE;
        }
        entries = rest;
    }
    Ok(())
}

/// Whether `va` is mapped present, user-accessible (and writable if `write`).
pub fn is_user_mapped(root: u64, va: u64, write: bool) -> bool {
    let mut t = root;
    for level in (0..=3).rev() {
        // SAFETY: read-only walk of the caller's tables.
        let entry = unsafe { table(t)[index(va, level)] };
        if entry & PRESENT == 0 || entry & USER == 0 || (write && entry & WRITABLE == 0) {
            return false;
        }
        if level == 0 {
            return true;
        }
        t = entry & ADDR_MASK;
    }
    false
}

/// Switches to the address space `root`.
///
/// # Safety
/// `root` must come from [`build_kernel_tables`] or [`new_user_root`].
pub unsafe fn switch_to(root: u64) {
    // SAFETY: every such root maps the kernel (slot 0).
    unsafe { super::cpu::write_cr3(root) };
}

/// The fault-core flags of a #PF error code (present, write, fetch).
pub fn fault_flags(error_code: u64) -> u32 {
    use crate::mm::core::flags;
    let mut f = 0;
    if error_code & (1 << 0) != 0 {
        f |= flags::PRESENT;
    }
    if error_code & (1 << 1) != 0 {
        f |= flags::WRITE;
    }
    if error_code & (1 << 4) != 0 {
        f |= flags::INSTRUCTION;
    }
    f
}
