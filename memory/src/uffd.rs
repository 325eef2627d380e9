//! Steps 1 and 5 of a fault's walk, the two ends: the **userfault event** and
//! the **fill**. userfault event -> handler loop ([`crate::handler`]) -> retry
//! core ([`crate::core`]) -> page source ([`crate::source`]) -> fill.
//!
//! A small typed layer over userfaultfd(2). In: [`Uffd::read_event`] (never
//! blocks) gives an [`Event`]: `PageFault { addr, flags, thread_id }` (a thread
//! is blocked on `addr`), `Remove { start, end }` (madvise dropped pages) or
//! `Unknown(code)`. Out: [`Uffd::copy`] (UFFDIO_COPY) and [`Uffd::zeropage`]
//! (UFFDIO_ZEROPAGE) fill missing pages and wake every thread blocked on
//! them, answering a [`CopyError`] the retry core acts on: `Exists` (already
//! mapped: resolved), `Again { copied }` (partial, or a REMOVE is pending:
//! retry as `MappingChanged`), `NoMapping` / `ProcessGone` / `Os` (failed);
//! [`Uffd::wake`] wakes without filling.
//!
//! The `userfaultfd` crate needs libclang at build time, so the kernel ABI
//! (`include/uapi/linux/userfaultfd.h`) is mirrored here by hand, with a
//! compile-time size check for every struct and ioctl number.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Errors of userfaultfd setup and control operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the syscall nor /dev/userfaultfd gave a descriptor.
    #[error(
        "cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {dev}); \
         run as root, or set vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd"
    )]
    Create {
        /// Why the syscall failed.
        syscall: io::Error,
        /// Why the device path failed.
        dev: io::Error,
    },
    /// The UFFDIO_API handshake failed.
    #[error("userfaultfd API handshake failed: {0}; the kernel may be too old (need Linux >= 4.11)")]
    Api(io::Error),
    /// A feature the caller requires is not offered by this kernel.
    #[error(
        "userfaultfd features {missing:#x} are required but this kernel only offers {available:#x}; \
         use a newer kernel or do not require them"
    )]
    FeatureUnavailable {
        /// Required features that are missing.
        missing: u64,
        /// Features the kernel offers.
        available: u64,
    },
    /// An ioctl on a range failed.
    #[error("{op} of [{start:#x}, +{len:#x}) failed: {source}; check that the range is page aligned and mapped (anonymous or shmem)")]
    Range {
        /// The operation (register, unregister, wake).
        op: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
        /// The errno.
        source: io::Error,
    },
    /// Reading an event from the descriptor failed.
    #[error("reading a userfaultfd event failed: {0}")]
    Read(io::Error),
    /// The kernel returned a message of an unexpected size.
    #[error("short userfaultfd read: {0} bytes instead of a multiple of 32; this is a kernel ABI mismatch")]
    ShortRead(usize),
}

/// Errors of UFFDIO_COPY / UFFDIO_ZEROPAGE: the outcomes the retry core acts on.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// EEXIST: the first page is already mapped (someone else resolved it).
    #[error("the page is already mapped")]
    Exists,
    /// EAGAIN: the address space is changing (a REMOVE/UNMAP event is pending: read
    /// events, then retry) or only `copied` bytes were filled (a later page exists).
    #[error("the mapping changed during the copy after {copied} bytes; read pending events and retry")]
    Again {
        /// Bytes filled before the copy stopped (may be 0).
        copied: usize,
    },
    /// ENOENT: the destination is no longer a registered mapping.
    #[error("the destination is not registered with this userfaultfd any more (unmapped or remapped)")]
    NoMapping,
    /// ESRCH: the process owning the memory is exiting.
    #[error("the address space owning the memory is gone")]
    ProcessGone,
    /// Any other errno.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The errno.
        source: io::Error,
    },
}

// ---- kernel ABI -------------------------------------------------------------

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)` from include/uapi/asm-generic/ioctl.h.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed): event byte, 7 reserved bytes, 24 bytes of union.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(size_of::<UffdMsg>() == 32);

// _IOWR(UFFDIO, 0x3F, struct uffdio_api) etc.; the kernel's _UFFDIO_* numbers.
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, size_of::<UffdioRegister>());
// The kernel declares UNREGISTER and WAKE as _IOR though userspace writes the range.
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, size_of::<UffdioZeropage>());
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd (Linux 6.1+).
const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, UFFDIO, 0x00, 0);

const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;

const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

/// userfaultfd feature bits (`UFFD_FEATURE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(pub u64);

impl Features {
    /// No feature.
    pub const NONE: Features = Features(0);
    /// `UFFD_FEATURE_EVENT_REMOVE`: madvise(DONTNEED/REMOVE) produces REMOVE events.
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    /// `UFFD_FEATURE_MISSING_SHMEM`: MISSING mode on shmem/memfd.
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    /// `UFFD_FEATURE_THREAD_ID`: page faults carry the faulting thread id.
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_EXACT_ADDRESS`: the fault address is not page-masked.
    pub const EXACT_ADDRESS: Features = Features(1 << 11);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Features {
    type Output = Features;
    fn bitand(self, rhs: Features) -> Features {
        Features(self.0 & rhs.0)
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    /// Faults on pages that are not present.
    pub const MISSING: RegisterMode = RegisterMode(1 << 0);
}

/// Bitmask of the ioctls valid on a registered range (`1 << _UFFDIO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeIoctls(pub u64);

impl RangeIoctls {
    /// Whether UFFDIO_COPY is supported on the range.
    pub fn copy(self) -> bool {
        self.0 & (1 << 0x03) != 0
    }
    /// Whether UFFDIO_ZEROPAGE is supported on the range.
    pub fn zeropage(self) -> bool {
        self.0 & (1 << 0x04) != 0
    }
    /// Whether UFFDIO_WAKE is supported on the range.
    pub fn wake(self) -> bool {
        self.0 & (1 << 0x02) != 0
    }
}

/// How the descriptor was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMethod {
    /// The userfaultfd(2) syscall.
    Syscall,
    /// `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`.
    Device,
}

/// Flags of a page-fault event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags {
    /// The access was a write.
    pub write: bool,
    /// Write-protect fault.
    pub wp: bool,
    /// Minor fault.
    pub minor: bool,
}

/// A userfaultfd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread (or KVM on behalf of a vCPU) is blocked on `addr`.
    PageFault {
        /// Faulting address (page aligned unless EXACT_ADDRESS was negotiated).
        addr: u64,
        /// Access flags.
        flags: FaultFlags,
        /// Faulting thread id, if THREAD_ID was negotiated.
        thread_id: Option<u32>,
    },
    /// `[start, end)` was dropped by madvise(DONTNEED/REMOVE); the next touch faults again.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// An event this layer does not decode (only arrives if its feature was requested).
    Unknown(u8),
}

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    available: Features,
    opened_via: OpenMethod,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn open_syscall() -> io::Result<OwnedFd> {
    // No UFFD_USER_MODE_ONLY: KVM touches guest memory from kernel mode.
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes an int flag argument and touches no user memory.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(errno());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new descriptor; we own it exclusively.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_device() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
    let ret = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW as libc::c_ulong, flags as libc::c_ulong) };
    if ret < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it exclusively.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

fn open_with(method: OpenMethod) -> io::Result<OwnedFd> {
    match method {
        OpenMethod::Syscall => open_syscall(),
        OpenMethod::Device => open_device(),
    }
}

/// UFFDIO_API on a fresh descriptor. The kernel refuses a second handshake, so
/// probing what is available needs its own throwaway descriptor.
fn handshake(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid, writable uffdio_api that lives across the call.
    let ret = unsafe { ioctl_with_mut_ref(fd, UFFDIO_API as libc::c_ulong, &mut api) };
    if ret < 0 {
        return Err(errno());
    }
    Ok(api)
}

impl Uffd {
    /// Opens a userfaultfd (syscall first, then /dev/userfaultfd) and negotiates
    /// `required` plus whatever of `optional` the kernel offers.
    pub fn new(required: Features, optional: Features) -> Result<Uffd, UffdError> {
        match Self::open(OpenMethod::Syscall, required, optional) {
            Err(UffdError::Create { syscall, .. }) => {
                match Self::open(OpenMethod::Device, required, optional) {
                    Err(UffdError::Create { dev, .. }) => Err(UffdError::Create { syscall, dev }),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// The usual VMM setup: REMOVE events required, thread ids if available.
    pub fn for_guest_memory() -> Result<Uffd, UffdError> {
        Self::new(
            Features::EVENT_REMOVE,
            Features::THREAD_ID | Features::MISSING_SHMEM,
        )
    }

    /// Opens through one specific `method` (tests, or to force the device path).
    pub fn open(method: OpenMethod, required: Features, optional: Features) -> Result<Uffd, UffdError> {
        let create_err = |e: io::Error| {
            let other = || io::Error::other("not tried");
            match method {
                OpenMethod::Syscall => UffdError::Create {
                    syscall: e,
                    dev: other(),
                },
                OpenMethod::Device => UffdError::Create {
                    syscall: other(),
                    dev: e,
                },
            }
        };
        let probe = open_with(method).map_err(create_err)?;
        let available = Features(handshake(&probe, 0).map_err(UffdError::Api)?.features);
        drop(probe);
        if !available.contains(required) {
            return Err(UffdError::FeatureUnavailable {
                missing: required.0 & !available.0,
                available: available.0,
            });
        }
        let wanted = required | (optional & available);
        let fd = open_with(method).map_err(create_err)?;
        handshake(&fd, wanted.0).map_err(UffdError::Api)?;
        Ok(Uffd {
            fd,
            features: wanted,
            available,
            opened_via: method,
        })
    }

    /// Features negotiated on this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Features this kernel offers.
    pub fn available_features(&self) -> Features {
        self.available
    }

    /// How the descriptor was obtained.
    pub fn opened_via(&self) -> OpenMethod {
        self.opened_via
    }

    fn range_ioctl(&self, op: &'static str, req: u64, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: `range` is a valid uffdio_range that lives across the call; the
        // kernel only reads it. The ioctl changes no memory we reference.
        let ret = unsafe { ioctl_with_ref(&self.fd, req as libc::c_ulong, &range) };
        if ret < 0 {
            return Err(UffdError::Range {
                op,
                start,
                len,
                source: errno(),
            });
        }
        Ok(())
    }

    /// Registers `[start, start+len)` (page aligned) and returns the ioctls valid on it.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<RangeIoctls, UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: mode.0,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid, writable uffdio_register that lives across the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER as libc::c_ulong, &mut reg) };
        if ret < 0 {
            return Err(UffdError::Range {
                op: "UFFDIO_REGISTER",
                start,
                len,
                source: errno(),
            });
        }
        Ok(RangeIoctls(reg.ioctls))
    }

    /// Unregisters a range; blocked faulters in it are woken (and fault normally).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, start, len)
    }

    /// Wakes threads blocked on `[start, start+len)` (after a DONTWAKE fill).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl("UFFDIO_WAKE", UFFDIO_WAKE, start, len)
    }

    /// Atomically fills missing pages at `dst` with `src` (`src.len()` bytes,
    /// page multiple) and, unless `dontwake`, wakes the threads blocked there.
    /// Returns the bytes copied (all of them on success).
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool) -> Result<usize, CopyError> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if dontwake { UFFDIO_COPY_MODE_DONTWAKE } else { 0 },
            copy: 0,
        };
        // SAFETY: `c` is a valid uffdio_copy; `src` is readable for `len` bytes for
        // the whole call. The kernel only fills pages that are not mapped (EEXIST
        // otherwise), so no memory any Rust reference can observe is overwritten.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY as libc::c_ulong, &mut c) };
        fill_result("UFFDIO_COPY", ret, c.copy, src.len())
    }

    /// Maps zero pages on the missing pages of `[start, start+len)`.
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> Result<usize, CopyError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if dontwake {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: `z` is a valid uffdio_zeropage that lives across the call; the
        // kernel only maps pages that are missing.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE as libc::c_ulong, &mut z) };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        fill_result("UFFDIO_ZEROPAGE", ret, z.zeropage, len)
    }

    /// Reads one event without blocking; `Ok(None)` when none is queued.
    pub fn read_event(&self) -> Result<Option<Event>, UffdError> {
        let mut msg = [0u8; size_of::<UffdMsg>()];
        loop {
            // SAFETY: `msg` is writable for its full length for the whole call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if n < 0 {
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => return Err(UffdError::Read(e)),
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            let thread_id = self.features.contains(Features::THREAD_ID);
            return decode_event(&msg[..n.min(msg.len())], thread_id).map(Some);
        }
    }
}

/// Decodes one `struct uffd_msg` as read from a userfaultfd: exactly 32
/// bytes (anything else is [`UffdError::ShortRead`]), the event byte first,
/// then the union in native byte order. `thread_id` says whether
/// `UFFD_FEATURE_THREAD_ID` was negotiated (then a page fault carries the
/// faulting thread's id). A pure function of the bytes: [`Uffd::read_event`]
/// uses it, and `fuzz/`'s `uffd_event` target feeds it arbitrary bytes.
pub fn decode_event(raw: &[u8], thread_id: bool) -> Result<Event, UffdError> {
    let raw: &[u8; size_of::<UffdMsg>()] = raw.try_into().map_err(|_| UffdError::ShortRead(raw.len()))?;
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[8 + 8 * i..16 + 8 * i]);
        u64::from_ne_bytes(b)
    };
    Ok(match raw[0] {
        UFFD_EVENT_PAGEFAULT => {
            let f = word(0);
            let thread_id = thread_id.then(|| {
                let mut b = [0u8; 4];
                b.copy_from_slice(&raw[24..28]);
                u32::from_ne_bytes(b)
            });
            Event::PageFault {
                addr: word(1),
                flags: FaultFlags {
                    write: f & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: f & UFFD_PAGEFAULT_FLAG_WP != 0,
                    minor: f & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                },
                thread_id,
            }
        }
        UFFD_EVENT_REMOVE => Event::Remove {
            start: word(0),
            end: word(1),
        },
        other => Event::Unknown(other),
    })
}

fn fill_result(op: &'static str, ret: i32, reported: i64, want: usize) -> Result<usize, CopyError> {
    if ret >= 0 {
        return Ok(want);
    }
    let e = errno();
    match e.raw_os_error() {
        // The kernel stores bytes done (>0) or -errno in the struct on EAGAIN.
        Some(libc::EAGAIN) => Err(CopyError::Again {
            copied: usize::try_from(reported).unwrap_or(0),
        }),
        Some(libc::EEXIST) => Err(CopyError::Exists),
        Some(libc::ENOENT) => Err(CopyError::NoMapping),
        Some(libc::ESRCH) => Err(CopyError::ProcessGone),
        _ => Err(CopyError::Os { op, source: e }),
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests {
    use super::*;
    use crate::mmap::AnonMapping;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn ps() -> u64 {
        crate::page_size() as u64
    }

    /// Polls for the next event for up to 5 s.
    fn next_event(u: &Uffd) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(ev) = u.read_event().expect("read event") {
                return ev;
            }
            assert!(Instant::now() < deadline, "no userfaultfd event within 5 s");
            let mut pfd = libc::pollfd {
                fd: u.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
    }

    fn read_byte(addr: u64) -> std::thread::JoinHandle<u8> {
        std::thread::spawn(move || {
            // SAFETY: the tests keep the mapping alive until this thread is joined.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        })
    }

    fn setup(pages: u64) -> (AnonMapping, Uffd) {
        let map = AnonMapping::new((pages * ps()) as usize).expect("mmap");
        let u = Uffd::new(Features::EVENT_REMOVE, Features::THREAD_ID).expect("userfaultfd");
        let ioctls = u
            .register(map.addr(), map.len() as u64, RegisterMode::MISSING)
            .expect("register");
        assert!(ioctls.copy() && ioctls.zeropage() && ioctls.wake(), "{ioctls:?}");
        (map, u)
    }

    #[test]
    fn decode_event_reads_the_kernel_layout() {
        let mut raw = [0u8; 32];
        raw[0] = UFFD_EVENT_PAGEFAULT;
        raw[8..16].copy_from_slice(&(UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_MINOR).to_ne_bytes());
        raw[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        raw[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        let fault = |thread_id| Event::PageFault {
            addr: 0x7f00_1000,
            flags: FaultFlags {
                write: true,
                wp: false,
                minor: true,
            },
            thread_id,
        };
        assert_eq!(decode_event(&raw, true).expect("32 bytes"), fault(Some(4242)));
        assert_eq!(decode_event(&raw, false).expect("32 bytes"), fault(None));
        raw[0] = UFFD_EVENT_REMOVE;
        assert_eq!(
            decode_event(&raw, true).expect("32 bytes"),
            Event::Remove {
                start: u64::from_ne_bytes(raw[8..16].try_into().expect("8 bytes")),
                end: 0x7f00_1000
            }
        );
        raw[0] = 0x13;
        assert_eq!(decode_event(&raw, true).expect("32 bytes"), Event::Unknown(0x13));
        for n in [0, 1, 31, 33] {
            let e = decode_event(&[0u8; 40][..n], true).expect_err("not 32 bytes");
            assert!(matches!(e, UffdError::ShortRead(m) if m == n), "{e}");
        }
    }

    #[test]
    fn opens_both_ways_and_negotiates() {
        for m in [OpenMethod::Syscall, OpenMethod::Device] {
            let u = Uffd::open(m, Features::EVENT_REMOVE, Features::THREAD_ID).expect("open");
            assert_eq!(u.opened_via(), m);
            assert!(u.features().contains(Features::EVENT_REMOVE));
            assert!(u.available_features().contains(u.features()));
        }
        let err = Uffd::new(Features(1 << 62), Features::NONE).expect_err("bogus feature");
        assert!(
            err.to_string()
                .contains("are required but this kernel only offers"),
            "{err}"
        );
    }

    #[test]
    fn fault_copy_zeropage_and_eexist() {
        let (map, u) = setup(2);
        let base = map.addr();
        let t = read_byte(base + 100);
        let Event::PageFault {
            addr,
            flags,
            thread_id,
        } = next_event(&u)
        else {
            panic!("not a fault")
        };
        assert_eq!(addr, base);
        assert!(!flags.write);
        assert!(thread_id.is_some_and(|t| t > 0));
        let page = vec![0xABu8; ps() as usize];
        assert_eq!(u.copy(base, &page, false).expect("copy"), page.len());
        assert_eq!(t.join().expect("reader"), 0xAB);
        assert!(matches!(u.copy(base, &page, false), Err(CopyError::Exists)));

        let second = base + ps();
        let w = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the join below.
            unsafe { std::ptr::write_volatile(second as *mut u8, 9) };
        });
        let Event::PageFault { addr, flags, .. } = next_event(&u) else {
            panic!("not a fault")
        };
        assert_eq!(addr, second);
        assert!(flags.write);
        assert_eq!(u.zeropage(second, ps(), false).expect("zeropage"), ps() as usize);
        w.join().expect("writer");
        // SAFETY: the page is mapped now.
        let v = unsafe { std::ptr::read_volatile((second + 1) as *const u8) };
        assert_eq!(v, 0);
        assert!(matches!(u.zeropage(second, ps(), false), Err(CopyError::Exists)));
    }

    #[test]
    fn dontwake_then_wake() {
        let (map, u) = setup(1);
        let base = map.addr();
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: the mapping outlives the join below.
                let v = unsafe { std::ptr::read_volatile(base as *const u8) };
                done.store(true, Ordering::Release);
                v
            })
        };
        assert!(matches!(next_event(&u), Event::PageFault { .. }));
        u.copy(base, &vec![3u8; ps() as usize], true).expect("copy");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::Acquire),
            "DONTWAKE must leave the faulter asleep"
        );
        u.wake(base, ps()).expect("wake");
        assert_eq!(t.join().expect("reader"), 3);
    }

    #[test]
    fn remove_event_on_dontneed() {
        let (map, u) = setup(4);
        let base = map.addr();
        u.copy(base, &vec![1u8; 4 * ps() as usize], false)
            .expect("populate");
        let map = Arc::new(map);
        let m = map.clone();
        // DONTNEED blocks until the REMOVE event is read, so it runs on its own thread.
        let t = std::thread::spawn(move || m.discard(crate::page_size(), 2 * crate::page_size()));
        assert_eq!(
            next_event(&u),
            Event::Remove {
                start: base + ps(),
                end: base + 3 * ps()
            }
        );
        t.join().expect("madvise thread").expect("madvise");
        // The dropped page faults again.
        let r = read_byte(base + ps());
        let ev = next_event(&u);
        assert!(
            matches!(ev, Event::PageFault { addr, .. } if addr == base + ps()),
            "{ev:?}"
        );
        u.zeropage(base + ps(), ps(), false).expect("zeropage");
        assert_eq!(r.join().expect("reader"), 0);
    }

    #[test]
    fn range_errors_name_the_range() {
        let (map, u) = setup(1);
        let err = u
            .register(map.addr() + 1, 10, RegisterMode::MISSING)
            .expect_err("unaligned");
        assert!(err.to_string().starts_with("UFFDIO_REGISTER of ["), "{err}");
        u.unregister(map.addr(), map.len() as u64).expect("unregister");
        assert!(matches!(
            u.copy(map.addr(), &vec![0u8; map.len()], false),
            Err(CopyError::NoMapping)
        ));
    }
}
