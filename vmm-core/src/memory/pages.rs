//! Which pages of guest RAM exist in this process (touched at least once),
//! from `/proc/self/pagemap`. Reads page tables only, never guest memory, so
//! it is safe while the VM runs and never faults into a userfault handler.

use abi::layout::PAGE_SIZE;
use devices::GuestRam;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// `/proc/self/pagemap`, open.
#[derive(Debug)]
pub struct Pagemap(File);

impl Pagemap {
    /// Opens this process's page map.
    pub fn open() -> io::Result<Pagemap> {
        File::open("/proc/self/pagemap").map(Pagemap)
    }

    /// For each page of `len` bytes at host address `host`: whether it exists
    /// (present or swapped).
    pub fn existing(&self, host: u64, len: u64) -> io::Result<Vec<bool>> {
        let pages = usize::try_from(len / PAGE_SIZE).map_err(io::Error::other)?;
        let mut out = Vec::with_capacity(pages);
        let mut buf = vec![0u8; 8 * 8192];
        let first = host / PAGE_SIZE;
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(8192);
            let bytes = &mut buf[..n * 8];
            self.0.read_exact_at(bytes, (first + done as u64) * 8)?;
            for e in bytes.chunks_exact(8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                // Bit 63 present, bit 62 swapped.
                out.push(u64::from_le_bytes(w) & (3 << 62) != 0);
            }
            done += n;
        }
        Ok(out)
    }
}

/// The guest-physical addresses of the pages of `mem` that exist, ascending.
pub fn existing_guest_pages(mem: &GuestRam) -> io::Result<Vec<u64>> {
    existing_guest_pages_in(&Pagemap::open()?, mem)
}

/// [`existing_guest_pages`] from an open page map (a sandboxed thread that
/// opens no file gets it from the thread that starts it).
pub fn existing_guest_pages_in(pagemap: &Pagemap, mem: &GuestRam) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let gpa0 = r.start_addr().raw_value();
        let exists = pagemap.existing(r.as_ptr() as u64, r.len())?;
        out.extend(
            exists
                .iter()
                .enumerate()
                .filter(|(_, e)| **e)
                .map(|(i, _)| gpa0 + i as u64 * PAGE_SIZE),
        );
    }
    Ok(out)
}
