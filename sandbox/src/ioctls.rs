//! The ioctl request numbers the filters allow, computed as the kernel's
//! `_IO/_IOR/_IOW/_IOWR` macros do, from the sizes of the structures they
//! carry (kvm-bindings for KVM; the userfaultfd structures' fixed sizes).
//! Each is checked against the number the kernel headers give.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use std::mem::size_of;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` from include/uapi/asm-generic/ioctl.h.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    // The size field has 14 bits: every structure here is far smaller.
    assert!(size < (1 << 14));
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}
const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}
const fn iow<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_WRITE, ty, nr, size_of::<T>())
}
const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

const KVMIO: u32 = 0xAE;

// vCPU ioctls (include/uapi/linux/kvm.h).
pub const KVM_RUN: u32 = io(KVMIO, 0x80);
pub const KVM_GET_REGS: u32 = ior::<kvm_regs>(KVMIO, 0x81);
pub const KVM_GET_SREGS: u32 = ior::<kvm_sregs>(KVMIO, 0x83);
pub const KVM_GET_MSRS: u32 = iowr::<kvm_msrs>(KVMIO, 0x88);
pub const KVM_GET_FPU: u32 = ior::<kvm_fpu>(KVMIO, 0x8c);
pub const KVM_GET_LAPIC: u32 = ior::<kvm_lapic_state>(KVMIO, 0x8e);
pub const KVM_GET_MP_STATE: u32 = ior::<kvm_mp_state>(KVMIO, 0x98);
pub const KVM_GET_VCPU_EVENTS: u32 = ior::<kvm_vcpu_events>(KVMIO, 0x9f);
pub const KVM_GET_DEBUGREGS: u32 = ior::<kvm_debugregs>(KVMIO, 0xa1);
pub const KVM_GET_XSAVE: u32 = ior::<kvm_xsave>(KVMIO, 0xa4);
pub const KVM_GET_XCRS: u32 = ior::<kvm_xcrs>(KVMIO, 0xa6);

// VM ioctls.
pub const KVM_SET_USER_MEMORY_REGION: u32 = iow::<kvm_userspace_memory_region>(KVMIO, 0x46);
pub const KVM_GET_DIRTY_LOG: u32 = iow::<kvm_dirty_log>(KVMIO, 0x42);
pub const KVM_GET_IRQCHIP: u32 = iowr::<kvm_irqchip>(KVMIO, 0x62);
pub const KVM_GET_CLOCK: u32 = ior::<kvm_clock_data>(KVMIO, 0x7c);
pub const KVM_GET_PIT2: u32 = ior::<kvm_pit_state2>(KVMIO, 0x9f);

// userfaultfd (include/uapi/linux/userfaultfd.h): struct uffdio_range is 16
// bytes, uffdio_register 32, uffdio_copy 40, uffdio_zeropage 32,
// uffdio_continue 32.
const UFFDIO: u32 = 0xAA;
pub const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, UFFDIO, 0x01, 16);
pub const UFFDIO_WAKE: u32 = ioc(IOC_READ, UFFDIO, 0x02, 16);
pub const UFFDIO_COPY: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, 40);
pub const UFFDIO_ZEROPAGE: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, 32);
pub const UFFDIO_CONTINUE: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x07, 32);
// Write protection (live snapshots, uffd-WP dirty tracking): struct
// uffdio_register is 32 bytes, uffdio_writeprotect 24.
pub const UFFDIO_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, 32);
pub const UFFDIO_WRITEPROTECT: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, 24);
// /proc/PID/pagemap's PAGEMAP_SCAN (include/uapi/linux/fs.h: _IOWR('f', 16,
// struct pm_scan_arg), 96 bytes).
pub const PAGEMAP_SCAN: u32 = ioc(IOC_READ | IOC_WRITE, b'f' as u32, 16, 96);

// Sockets and terminals (include/uapi/asm-generic/ioctls.h).
pub const FIONBIO: u32 = 0x5421;
pub const TIOCGWINSZ: u32 = 0x5413;
pub const TCGETS: u32 = 0x5401;

// The numbers the kernel headers give (x86_64).
const _: () = assert!(KVM_RUN == 0xAE80);
const _: () = assert!(KVM_GET_REGS == 0x8090_AE81);
const _: () = assert!(KVM_GET_SREGS == 0x8138_AE83);
const _: () = assert!(KVM_GET_MSRS == 0xC008_AE88);
const _: () = assert!(KVM_GET_FPU == 0x81A0_AE8C);
const _: () = assert!(KVM_GET_LAPIC == 0x8400_AE8E);
const _: () = assert!(KVM_GET_MP_STATE == 0x8004_AE98);
const _: () = assert!(KVM_GET_VCPU_EVENTS == 0x8040_AE9F);
const _: () = assert!(KVM_GET_DEBUGREGS == 0x8080_AEA1);
const _: () = assert!(KVM_GET_XSAVE == 0x9000_AEA4);
const _: () = assert!(KVM_GET_XCRS == 0x8188_AEA6);
const _: () = assert!(KVM_SET_USER_MEMORY_REGION == 0x4020_AE46);
const _: () = assert!(KVM_GET_DIRTY_LOG == 0x4010_AE42);
const _: () = assert!(KVM_GET_IRQCHIP == 0xC208_AE62);
const _: () = assert!(KVM_GET_CLOCK == 0x8030_AE7C);
const _: () = assert!(KVM_GET_PIT2 == 0x8070_AE9F);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
const _: () = assert!(UFFDIO_CONTINUE == 0xC020_AA07);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);
