//! Loads the user program (an ELF64 executable, the boot module) into an
//! address space. Read-only segments map the module's frames directly when
//! their file offset and address agree modulo the page size; writable ones get
//! fresh frames with the file bytes copied in (the rest of the segment is zero).

use crate::abi::layout::{PAGE_SIZE, USER_SPACE_END, USER_SPACE_START};
use crate::arch::paging;
use crate::mm::vma::{AddressSpace, Vma, VmaError, VmaKind};
use crate::mm::{frame, NoMemory, Perms};

/// Why the user program cannot be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// Not a little-endian x86_64 ELF64 executable.
    NotElf,
    /// A header or segment lies outside the file.
    Truncated,
    /// A segment is outside user space or its sizes are inconsistent.
    BadSegment,
    /// Segments overlap each other or the task's other regions.
    Overlap,
    /// The entry point is not in an executable segment.
    BadEntry,
    /// No frame left.
    NoMemory,
}

impl From<NoMemory> for LoadError {
    fn from(_: NoMemory) -> Self {
        LoadError::NoMemory
    }
}

fn read<const N: usize>(b: &[u8], off: u64) -> Result<[u8; N], LoadError> {
    let off = usize::try_from(off).map_err(|_| LoadError::Truncated)?;
    let end = off.checked_add(N).ok_or(LoadError::Truncated)?;
    b.get(off..end)
        .and_then(|s| s.try_into().ok())
        .ok_or(LoadError::Truncated)
}
fn u16_at(b: &[u8], off: u64) -> Result<u16, LoadError> {
    read::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: u64) -> Result<u32, LoadError> {
    read::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: u64) -> Result<u64, LoadError> {
    read::<8>(b, off).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// Maps every PT_LOAD segment of `image` (the module at physical `image_pa`,
/// identity-mapped) into `space`; returns the entry point.
pub fn load(space: &mut AddressSpace, image: &[u8], image_pa: u64) -> Result<u64, LoadError> {
    if read::<4>(image, 0)? != *b"\x7fELF" || read::<2>(image, 4)? != [2, 1] {
        return Err(LoadError::NotElf);
    }
    // ET_EXEC, EM_X86_64.
    if u16_at(image, 16)? != 2 || u16_at(image, 18)? != 62 {
        return Err(LoadError::NotElf);
    }
    let entry = u64_at(image, 24)?;
    let phoff = u64_at(image, 32)?;
    let phentsize = u64::from(u16_at(image, 54)?);
    let phnum = u64::from(u16_at(image, 56)?);
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or(LoadError::Truncated)?;
        if u32_at(image, ph)? != PT_LOAD {
            continue;
        }
        let flags = u32_at(image, ph + 4)?;
        let offset = u64_at(image, ph + 8)?;
        let vaddr = u64_at(image, ph + 16)?;
        let filesz = u64_at(image, ph + 32)?;
        let memsz = u64_at(image, ph + 40)?;
        if memsz == 0 {
            continue;
        }
        let end = vaddr.checked_add(memsz).ok_or(LoadError::BadSegment)?;
        if vaddr < USER_SPACE_START || end > USER_SPACE_END || filesz > memsz {
            return Err(LoadError::BadSegment);
        }
        let file_end = offset.checked_add(filesz).ok_or(LoadError::Truncated)?;
        if file_end > image.len() as u64 {
            return Err(LoadError::Truncated);
        }
        let perms = Perms {
            write: flags & PF_W != 0,
            exec: flags & PF_X != 0,
            user: true,
        };
        let start_page = vaddr & !(PAGE_SIZE - 1);
        let end_page = end.next_multiple_of(PAGE_SIZE);
        space
            .add(Vma::new(start_page, end_page, perms, VmaKind::Image))
            .map_err(|e| match e {
                VmaError::Overlap => LoadError::Overlap,
                VmaError::BadRange | VmaError::NotAnon => LoadError::BadSegment,
            })?;
        entry_ok |= perms.exec && (vaddr..end).contains(&entry);
        let shareable = !perms.write && offset % PAGE_SIZE == vaddr % PAGE_SIZE;
        let data_end = vaddr + filesz;
        let mut page = start_page;
        while page < end_page {
            let page_end = (page + PAGE_SIZE).min(end);
            if shareable && page_end <= data_end {
                // The whole page's share of the segment is file data: use the
                // module's frame. `offset >= vaddr - page` by congruence.
                let file_page = offset - (vaddr - page);
                paging::map_4k(space.root, page, image_pa + file_page, perms)?;
            } else {
                let pa = frame::alloc_zeroed().ok_or(LoadError::NoMemory)?;
                let copy_start = page.max(vaddr);
                let copy_end = page_end.min(data_end);
                if copy_start < copy_end {
                    let src = &image
                        [(offset + (copy_start - vaddr)) as usize..(offset + (copy_end - vaddr)) as usize];
                    // SAFETY: `pa` is a fresh, identity-mapped frame we own; the
                    // copy stays inside it (copy_end - page <= PAGE_SIZE).
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            (pa + (copy_start - page)) as *mut u8,
                            src.len(),
                        )
                    };
                }
                paging::map_4k(space.root, page, pa, perms)?;
            }
            page += PAGE_SIZE;
        }
    }
    if !entry_ok {
        return Err(LoadError::BadEntry);
    }
    Ok(entry)
}
