//! The minimal VM of the `vmm bench fault` baseline: no kernel, no devices,
//! no controller. One vCPU entered directly in 64-bit user mode runs a loop
//! that writes one byte to each of N pages of a userfaultfd-registered memory
//! slot in a scattered order, served by the raw round trip's minimal handler
//! on the vCPU's CPU (the placement the VMM uses for one vCPU). It is what a
//! stage-2 userfault costs on this KVM with nothing of this VMM around it.

use ::memory::bench::{BenchError, MinimalHandler};
use ::memory::{AnonMapping, Features, RegisterMode, Uffd};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Page tables, GDT, TSS and code (guest-physical 0, its own memory slot).
const LOW_SIZE: usize = 2 << 20;
/// The touched pages (their own, userfaultfd-registered slot).
const TEST_GPA: u64 = 1 << 30;
/// Unbacked: the loop's final write here is the MMIO exit that ends the run.
const DONE_GPA: u64 = 3 << 30;
const CODE_GPA: u64 = 0x1_0000;
const PML4: usize = 0x1000;
/// Present, writable, user.
const TABLE: u64 = 0x7;
/// Present, writable, user, 2 MiB page.
const BIG_PAGE: u64 = 0x87;

/// The loop, with `rdi` = first page, `rsi` = page count:
/// `for i in 0..n { base[(i * 7919 % n) * 4096] = 1 }`, then `[DONE_GPA] = cl`.
/// 7919 is prime, so every page is written once when it does not divide `n`.
const LOOP: [u8; 44] = [
    0x31, 0xc9, // xor ecx, ecx
    0x48, 0x69, 0xc1, 0xef, 0x1e, 0x00, 0x00, // loop: imul rax, rcx, 7919
    0x31, 0xd2, // xor edx, edx
    0x48, 0xf7, 0xf6, // div rsi (rdx = remainder)
    0x48, 0xc1, 0xe2, 0x0c, // shl rdx, 12
    0xc6, 0x04, 0x17, 0x01, // mov byte [rdi + rdx], 1
    0x48, 0xff, 0xc1, // inc rcx
    0x48, 0x39, 0xf1, // cmp rcx, rsi
    0x75, 0xe4, // jne loop (-28)
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x00, 0x00, // mov rax, DONE_GPA
    0x88, 0x08, // mov [rax], cl
    0xeb, 0xfe, // jmp $
];

/// Errors of the minimal VM.
#[derive(Debug, thiserror::Error)]
pub enum MinimalVmError {
    /// A KVM call failed.
    #[error("minimal VM baseline: {what} failed: {source}; check /dev/kvm")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Memory or the userfault handler could not be set up.
    #[error("minimal VM baseline: {0}")]
    Setup(#[from] BenchError),
    /// The guest loop did not end with its MMIO write.
    #[error("minimal VM baseline: the guest stopped with {0} instead of its final MMIO write")]
    Exit(String),
    /// The vCPU thread could not be started or panicked.
    #[error("minimal VM baseline: the vCPU thread failed: {0}")]
    Thread(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MinimalVmError {
    move |source| MinimalVmError::Kvm { what, source }
}

fn put(low: &mut [u8], at: usize, v: u64) {
    low[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Mean time per page of the guest loop over `pages` missing pages, each a
/// stage-2 userfault served by the minimal handler.
pub fn stage2_touch(pages: u64) -> Result<Duration, MinimalVmError> {
    // At most the mapped GiB; not a multiple of 7919, so every page is written.
    let pages = pages.clamp(1, 512 * 512);
    let pages = if pages % 7919 == 0 { pages + 1 } else { pages };
    let cpu = ::memory::colocation_cpu();
    std::thread::Builder::new()
        .name("minimal-vcpu".into())
        .spawn(move || {
            if let Some(c) = cpu {
                ::memory::pin_current_thread(c).map_err(|e| MinimalVmError::Setup(BenchError::Pin(e)))?;
            }
            run(pages, cpu)
        })
        .map_err(|e| MinimalVmError::Thread(e.to_string()))?
        .join()
        .map_err(|_| MinimalVmError::Thread("panicked".into()))?
}

/// The VM and its vCPU over `low` (tables, code) and `test` (the touched
/// pages), ready to run the loop over `pages` pages. The caller keeps the
/// mappings alive longer than both.
fn build(low: &AnonMapping, test: &AnonMapping, pages: u64) -> Result<(VmFd, VcpuFd), MinimalVmError> {
    let kvm_fd = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    for (slot, gpa, m) in [(0, 0, low), (1, TEST_GPA, test)] {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: m.len() as u64,
            userspace_addr: m.addr(),
            flags: 0,
        };
        // SAFETY: the caller keeps the mapping alive longer than the VM and
        // its vCPU (its documented contract).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    {
        // SAFETY: `low` is a private mapping of LOW_SIZE bytes, registered as
        // slot 0 but not yet used by anyone: no vCPU exists. The slice ends
        // with this block, before the vCPU (which sets accessed/dirty bits in
        // these tables) is created.
        let l = unsafe { std::slice::from_raw_parts_mut(low.ptr(), LOW_SIZE) };
        // Identity-mapped 2 MiB user pages: 0 (tables and code), the test
        // region's first GiB, and the MMIO page at 3 GiB.
        put(l, PML4, 0x2000 | TABLE);
        put(l, 0x2000, 0x3000 | TABLE);
        put(l, 0x2008, 0x4000 | TABLE);
        put(l, 0x2018, 0x5000 | TABLE);
        put(l, 0x3000, BIG_PAGE);
        for (i, at) in (0x4000..0x5000).step_by(8).enumerate() {
            put(l, at, (TEST_GPA + ((i as u64) << 21)) | BIG_PAGE);
        }
        put(l, 0x5000, DONE_GPA | BIG_PAGE);
        let code = usize::try_from(CODE_GPA).unwrap_or(0);
        l[code..code + LOOP.len()].copy_from_slice(&LOOP);
    }

    let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let mut s = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    s.cr3 = PML4 as u64;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
    s.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    s.efer = 0x500; // LME, LMA
    let seg = |selector, type_, l, db| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    s.cs = seg(0x33, 11, 1, 0);
    let data = seg(0x2b, 3, 0, 1);
    (s.ds, s.es, s.ss, s.fs, s.gs) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: 0x6000,
        limit: 0x67,
        selector: 0x40,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = 0x7000;
    s.gdt.limit = 0x7f;
    vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rdi: TEST_GPA,
        rsi: pages,
        rsp: 0x1f_0000,
        // IF clear, as the VMM's own touch tasks (a stage-2 miss is then a
        // userfault on this thread, not an asynchronous page fault).
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    Ok((vm, vcpu))
}

fn run(pages: u64, cpu: Option<usize>) -> Result<Duration, MinimalVmError> {
    // Mappings first: they are dropped after the VM and its vCPU.
    let map = |len: usize| AnonMapping::new(len).map_err(|e| BenchError::Map(len / 4096, e));
    let low = map(LOW_SIZE)?;
    let test_len = (pages * 4096).next_multiple_of(2 << 20);
    let test = map(usize::try_from(test_len).unwrap_or(usize::MAX))?;
    let (_vm, vcpu) = build(&low, &test, pages)?;
    let uffd = Arc::new(Uffd::new(Features::NONE, Features::NONE).map_err(BenchError::from)?);
    uffd.register(test.addr(), test.len() as u64, RegisterMode::MISSING)
        .map_err(BenchError::from)?;
    let mut handler = MinimalHandler::start(uffd, test.addr(), test.len() as u64, cpu)?;
    let mut vcpu = vcpu;
    let start = Instant::now();
    let exit = vcpu.run().map(|e| match e {
        VcpuExit::MmioWrite(addr, _) if addr == DONE_GPA => None,
        other => Some(format!("{other:?}")),
    });
    let took = start.elapsed();
    handler.stop()?;
    match exit.map_err(kvm("KVM_RUN"))? {
        None => Ok(took / u32::try_from(pages).unwrap_or(u32::MAX)),
        Some(other) => Err(MinimalVmError::Exit(other)),
    }
}

/// What the write-protect probe saw: the minimal VM's guest loop writing
/// pages that are present and userfaultfd-write-protected.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WpProbe {
    /// Pages the guest wrote.
    pub pages: u64,
    /// WP faults the handler saw (one per page when KVM honours the protection).
    pub wp_faults: u64,
    /// Guest writes that went through without a WP fault first: the page
    /// held the guest's value when its fault was read, or it had none.
    pub bypassed: u64,
    /// Pages without the guest's value at the end.
    pub lost: u64,
    /// Mean guest time per written page (a WP fault round trip each).
    pub mean_us: f64,
}

impl WpProbe {
    /// Whether every guest write raised a WP fault and blocked until the
    /// protection was removed.
    pub fn honoured(&self) -> bool {
        self.wp_faults == self.pages && self.bypassed == 0 && self.lost == 0
    }
}

/// Whether this KVM honours userfaultfd write protection for guest writes
/// through its own mapping: `pages` present, write-protected pages are
/// written by the guest loop; a handler on another thread checks that each
/// page still holds its old content when its WP fault arrives, then
/// unprotects it.
pub fn wp_probe(pages: u64) -> Result<WpProbe, MinimalVmError> {
    let pages = pages.clamp(1, 4096);
    let pages = if pages % 7919 == 0 { pages + 1 } else { pages };
    std::thread::Builder::new()
        .name("wp-probe".into())
        .spawn(move || run_wp_probe(pages))
        .map_err(|e| MinimalVmError::Thread(e.to_string()))?
        .join()
        .map_err(|_| MinimalVmError::Thread("panicked".into()))?
}

const OLD: u8 = 0xAA;

fn run_wp_probe(pages: u64) -> Result<WpProbe, MinimalVmError> {
    use ::memory::wp;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let map = |len: usize| AnonMapping::new(len).map_err(|e| BenchError::Map(len / 4096, e));
    let low = map(LOW_SIZE)?;
    let test_len = (pages * 4096).next_multiple_of(2 << 20);
    let test = map(usize::try_from(test_len).unwrap_or(usize::MAX))?;
    let n = usize::try_from(pages).unwrap_or(0);
    for p in 0..n {
        // SAFETY: page `p` of our own test mapping, not yet seen by any VM.
        unsafe { std::ptr::write_volatile(test.ptr().add(p * 4096), OLD) };
    }
    let (_vm, mut vcpu) = build(&low, &test, pages)?;
    let uffd = Arc::new(Uffd::new(wp::PAGEFAULT_FLAG_WP, Features::NONE).map_err(BenchError::from)?);
    uffd.register(test.addr(), test.len() as u64, wp::REGISTER_WP)
        .map_err(BenchError::from)?;
    wp::write_protect(&uffd, test.addr(), pages * 4096, true, false).map_err(BenchError::from)?;
    let done = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let bypassed = Arc::new(AtomicU64::new(0));
    let handler = {
        let (uffd, done, faults, bypassed) = (uffd.clone(), done.clone(), faults.clone(), bypassed.clone());
        std::thread::Builder::new()
            .name("wp-probe-handler".into())
            .spawn(move || -> Result<(), ::memory::UffdError> {
                loop {
                    let mut fd = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the call.
                    let r = unsafe { libc::poll(&mut fd, 1, 5) };
                    if r == 0 && done.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    while let Some(ev) = uffd.read_event()? {
                        if let ::memory::Event::PageFault { addr, flags, .. } = ev {
                            let page = addr & !4095;
                            // SAFETY: a present page of the test mapping (it
                            // faulted on write protection); reading it does not fault.
                            let now = unsafe { std::ptr::read_volatile(page as *const u8) };
                            if !flags.wp || now != OLD {
                                bypassed.fetch_add(1, Ordering::Relaxed);
                            }
                            faults.fetch_add(1, Ordering::Relaxed);
                            wp::write_protect(&uffd, page, 4096, false, false)?;
                        }
                    }
                }
            })
            .map_err(|e| MinimalVmError::Thread(e.to_string()))?
    };
    let start = Instant::now();
    let exit = vcpu.run().map(|e| match e {
        VcpuExit::MmioWrite(addr, _) if addr == DONE_GPA => None,
        other => Some(format!("{other:?}")),
    });
    let took = start.elapsed();
    done.store(true, Ordering::Release);
    handler
        .join()
        .map_err(|_| MinimalVmError::Thread("the probe's handler panicked".into()))?
        .map_err(BenchError::from)?;
    if let Some(other) = exit.map_err(kvm("KVM_RUN"))? {
        return Err(MinimalVmError::Exit(other));
    }
    let mut lost = 0;
    for p in 0..n {
        // SAFETY: page `p` of the test mapping; the vCPU has stopped.
        if unsafe { std::ptr::read_volatile(test.ptr().add(p * 4096)) } != 1 {
            lost += 1;
        }
    }
    let wp_faults = faults.load(Ordering::Relaxed);
    Ok(WpProbe {
        pages,
        wp_faults,
        bypassed: bypassed.load(Ordering::Relaxed) + pages.saturating_sub(wp_faults),
        lost,
        mean_us: took.as_secs_f64() * 1e6 / pages as f64,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// This host's KVM honours userfaultfd write protection for guest
    /// writes (a host that does not makes `--live` refuse; this test then
    /// documents it by failing with the figures).
    #[test]
    fn kvm_honours_write_protection_for_guest_writes() {
        let p = super::wp_probe(256).unwrap();
        assert!(p.honoured(), "{p:?}");
    }
}
