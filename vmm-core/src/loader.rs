//! Loading the guest: the kernel ELF (with linux-loader), the user program as a
//! boot module, and the [`BootInfo`] with the memory map (see `abi::boot`).

use abi::boot::{BootInfo, MemKind, Module};
use abi::layout::{
    ram_ranges, BOOT_INFO_START, FREE_RAM_START, KERNEL_START, LOW_RESERVED_END, MODULE_MAX_SIZE,
    MODULE_START,
};
use devices::GuestRam;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::{Elf, KernelLoader};
use std::io::Cursor;
use vm_memory::{ByteValued, Bytes, GuestAddress};

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Not an ELF file at all.
    #[error("{what} is not an ELF file (no ELF magic); pass an x86_64 ELF kernel built for this VMM")]
    NotElf {
        /// "the kernel" or "the user program".
        what: &'static str,
    },
    /// An ELF for another machine or class.
    #[error("{what} is not a 64-bit little-endian x86_64 executable ELF (class {class}, data {data}, machine {machine}, type {etype})")]
    WrongArch {
        /// Which image.
        what: &'static str,
        /// EI_CLASS.
        class: u8,
        /// EI_DATA.
        data: u8,
        /// e_machine.
        machine: u16,
        /// e_type.
        etype: u16,
    },
    /// Program headers that point outside the file.
    #[error("{what} is a truncated or malformed ELF: {detail}")]
    Malformed {
        /// Which image.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A kernel segment outside the kernel area or guest memory.
    #[error(
        "the kernel segment at {start:#x}..{end:#x} does not fit: kernel segments must lie in {KERNEL_START:#x}..{MODULE_START:#x} and in guest memory ({mem_size} bytes)"
    )]
    KernelDoesNotFit {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Guest memory size.
        mem_size: u64,
    },
    /// No loadable segment or an entry point outside them.
    #[error("the kernel's entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    /// The boot module is too large.
    #[error("the user program is {0} bytes; at most {MODULE_MAX_SIZE} fit in the module area")]
    ModuleTooLarge(usize),
    /// linux-loader failed.
    #[error("cannot load the kernel into guest memory: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// Writing guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Write {
        /// What.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The memory map or command line does not fit the boot information.
    #[error("boot information overflow: {0}")]
    BootInfo(&'static str),
}

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

/// The checked ELF header and program headers of an image.
#[derive(Debug)]
pub struct ElfInfo {
    /// Entry point.
    pub entry: u64,
    /// `(paddr, memsz)` of each loadable segment.
    pub segments: Vec<(u64, u64)>,
}

/// Copies a plain-data header out of `image` at `off` (the image need not be aligned).
fn read_pod<T: ByteValued + Default>(image: &[u8], off: usize) -> Option<T> {
    let bytes = image.get(off..off.checked_add(std::mem::size_of::<T>())?)?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(bytes);
    Some(v)
}

/// Checks that `image` is a well-formed x86_64 ELF executable and lists its segments.
pub fn inspect_elf(image: &[u8], what: &'static str) -> Result<ElfInfo, LoaderError> {
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf { what });
    }
    let malformed = |detail: String| LoaderError::Malformed { what, detail };
    let ehdr: Elf64_Ehdr = read_pod(image, 0).ok_or_else(|| {
        malformed(format!(
            "file is {} bytes, shorter than an ELF header",
            image.len()
        ))
    })?;
    let (class, data) = (ehdr.e_ident[4], ehdr.e_ident[5]);
    if class != 2 || data != 1 || ehdr.e_machine != EM_X86_64 || ehdr.e_type != ET_EXEC {
        return Err(LoaderError::WrongArch {
            what,
            class,
            data,
            machine: ehdr.e_machine,
            etype: ehdr.e_type,
        });
    }
    let phsz = std::mem::size_of::<Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != phsz {
        return Err(malformed(format!(
            "program header size {} (expected {phsz})",
            ehdr.e_phentsize
        )));
    }
    let mut segments = Vec::new();
    for i in 0..usize::from(ehdr.e_phnum) {
        let off = usize::try_from(ehdr.e_phoff)
            .ok()
            .and_then(|o| o.checked_add(i * phsz))
            .ok_or_else(|| malformed("program header offset overflows".into()))?;
        let ph: Elf64_Phdr = read_pod(image, off)
            .ok_or_else(|| malformed(format!("program header {i} lies past the end of the file")))?;
        if ph.p_type != PT_LOAD {
            continue;
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz);
        if file_end.is_none_or(|e| e > image.len() as u64) || ph.p_filesz > ph.p_memsz {
            return Err(malformed(format!("segment {i} lies past the end of the file")));
        }
        segments.push((ph.p_paddr, ph.p_memsz));
    }
    if segments.is_empty() {
        return Err(malformed("no loadable segment".into()));
    }
    Ok(ElfInfo {
        entry: ehdr.e_entry,
        segments,
    })
}

/// Loads the kernel; returns its entry point and the end of its image.
pub fn load_kernel(mem: &GuestRam, mem_size: u64, image: &[u8]) -> Result<(u64, u64), LoaderError> {
    let info = inspect_elf(image, "the kernel")?;
    let ram_end = ram_ranges(mem_size)[0].1;
    let mut end = 0;
    for &(start, len) in &info.segments {
        let seg_end = start.saturating_add(len);
        if start < KERNEL_START || seg_end > MODULE_START || seg_end > ram_end {
            return Err(LoaderError::KernelDoesNotFit {
                start,
                end: seg_end,
                mem_size,
            });
        }
        end = end.max(seg_end);
    }
    if !info
        .segments
        .iter()
        .any(|&(s, l)| (s..s + l).contains(&info.entry))
    {
        return Err(LoaderError::BadEntry(info.entry));
    }
    // Each segment's memory is zeroed first, so its bss is zero whatever
    // backs guest RAM (a memory file's pages would otherwise show through).
    let zeros = vec![0u8; 64 << 10];
    for &(start, len) in &info.segments {
        let mut at = start;
        while at < start + len {
            let n = usize::try_from((start + len - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
            mem.write_slice(&zeros[..n], GuestAddress(at))
                .map_err(|source| LoaderError::Write {
                    what: "the kernel's zeroed memory (bss)",
                    source,
                })?;
            at += n as u64;
        }
    }
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(KERNEL_START)),
    )?;
    Ok((result.kernel_load.0, end))
}

/// Copies the user program into the module area.
pub fn load_module(mem: &GuestRam, image: &[u8]) -> Result<Module, LoaderError> {
    inspect_elf(image, "the user program")?;
    if image.len() as u64 > MODULE_MAX_SIZE {
        return Err(LoaderError::ModuleTooLarge(image.len()));
    }
    mem.write_slice(image, GuestAddress(MODULE_START))
        .map_err(|source| LoaderError::Write {
            what: "the user program",
            source,
        })?;
    Ok(Module {
        start: MODULE_START,
        len: image.len() as u64,
    })
}

/// Builds the boot information: memory map, command line, vCPU count, module.
pub fn boot_info(
    mem_size: u64,
    cpu_count: u32,
    cmdline: &str,
    module: Module,
) -> Result<BootInfo, LoaderError> {
    let mut info = BootInfo {
        cpu_count,
        user_image: module,
        ..Default::default()
    };
    if !info.set_cmdline(cmdline) {
        return Err(LoaderError::BootInfo("command line too long"));
    }
    let [(low_start, low_len), (high_start, high_len)] = ram_ranges(mem_size);
    let ok = info.push_region(low_start, LOW_RESERVED_END, MemKind::Reserved)
        && info.push_region(
            LOW_RESERVED_END,
            FREE_RAM_START - LOW_RESERVED_END,
            MemKind::Reserved,
        )
        && info.push_region(FREE_RAM_START, low_len - FREE_RAM_START, MemKind::Usable)
        && (high_len == 0 || info.push_region(high_start, high_len, MemKind::Usable));
    if !ok {
        return Err(LoaderError::BootInfo("memory map"));
    }
    Ok(info)
}

/// Writes the boot information to its page.
pub fn write_boot_info(mem: &GuestRam, info: &BootInfo) -> Result<(), LoaderError> {
    mem.write_obj(*info, GuestAddress(BOOT_INFO_START))
        .map_err(|source| LoaderError::Write {
            what: "the boot information",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::layout::{HIGH_RAM_START, MMIO_GAP_START};

    /// A minimal x86_64 ELF with one segment at `paddr` of `memsz` bytes.
    pub(crate) fn tiny_elf(paddr: u64, memsz: u64, machine: u16) -> Vec<u8> {
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[4] = 2;
        ehdr.e_ident[5] = 1;
        ehdr.e_ident[6] = 1;
        ehdr.e_type = ET_EXEC;
        ehdr.e_machine = machine;
        ehdr.e_version = 1;
        ehdr.e_entry = paddr;
        ehdr.e_phoff = 64;
        ehdr.e_ehsize = 64;
        ehdr.e_phentsize = 56;
        ehdr.e_phnum = 1;
        let ph = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: 5,
            p_offset: 0x78,
            p_vaddr: paddr,
            p_paddr: paddr,
            p_filesz: 8,
            p_memsz: memsz,
            p_align: 0x1000,
        };
        let mut v = ehdr.as_slice().to_vec();
        v.extend_from_slice(ph.as_slice());
        v.extend_from_slice(&[0xf4; 8]);
        v
    }

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn loads_a_good_kernel() {
        let (entry, end) = load_kernel(&mem(), 64 << 20, &tiny_elf(KERNEL_START, 0x2000, EM_X86_64)).unwrap();
        assert_eq!(entry, KERNEL_START);
        assert_eq!(end, KERNEL_START + 0x2000);
        let b: u8 = mem().read_obj(GuestAddress(0)).unwrap();
        assert_eq!(b, 0);
    }

    /// The bss is zero even where guest RAM held something before (a memory
    /// file's pages).
    #[test]
    fn bss_is_zeroed_whatever_memory_held() {
        let m = mem();
        m.write_slice(&[0xaa; 0x2000], GuestAddress(KERNEL_START))
            .unwrap();
        load_kernel(&m, 64 << 20, &tiny_elf(KERNEL_START, 0x2000, EM_X86_64)).unwrap();
        let mut seg = [0u8; 0x2000];
        m.read_slice(&mut seg, GuestAddress(KERNEL_START)).unwrap();
        assert_eq!(&seg[..8], &[0xf4; 8], "the file part");
        assert!(seg[8..].iter().all(|&b| b == 0), "the bss");
    }

    #[test]
    fn rejects_bad_images() {
        let m = mem();
        assert!(matches!(
            load_kernel(&m, 64 << 20, b"#!/bin/sh\n"),
            Err(LoaderError::NotElf { .. })
        ));
        let arm = tiny_elf(KERNEL_START, 0x1000, 183);
        let e = load_kernel(&m, 64 << 20, &arm).unwrap_err();
        assert!(e.to_string().contains("not a 64-bit little-endian x86_64"), "{e}");
        let truncated = &tiny_elf(KERNEL_START, 0x1000, EM_X86_64)[..100];
        assert!(matches!(
            load_kernel(&m, 64 << 20, truncated),
            Err(LoaderError::Malformed { .. })
        ));
        let huge = tiny_elf(KERNEL_START, MODULE_START, EM_X86_64);
        let e = load_kernel(&m, 64 << 20, &huge).unwrap_err();
        assert!(matches!(e, LoaderError::KernelDoesNotFit { .. }), "{e}");
        let low = tiny_elf(0x1000, 0x1000, EM_X86_64);
        assert!(matches!(
            load_kernel(&m, 64 << 20, &low),
            Err(LoaderError::KernelDoesNotFit { .. })
        ));
    }

    #[test]
    fn boot_info_memory_map() {
        let info = boot_info(
            4 << 30,
            4,
            "workload=hello",
            Module {
                start: MODULE_START,
                len: 10,
            },
        )
        .unwrap();
        assert_eq!(info.validate(), Ok(()));
        let usable: Vec<_> = info
            .regions()
            .iter()
            .filter(|r| r.kind == MemKind::Usable as u32)
            .collect();
        assert_eq!(usable.len(), 2);
        assert_eq!(
            (usable[0].start, usable[0].start + usable[0].len),
            (FREE_RAM_START, MMIO_GAP_START)
        );
        assert_eq!((usable[1].start, usable[1].len), (HIGH_RAM_START, 1 << 30));
        let total: u64 = info.regions().iter().map(|r| r.len).sum();
        assert_eq!(total, 4 << 30);
    }
}
