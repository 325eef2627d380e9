//! `--seccomp kill`: a denied call raises SIGSYS (`SECCOMP_RET_TRAP`; the
//! call is not made) and this handler says which thread of which class made
//! which call, then ends the process with [`EXIT_SECCOMP`]. Firecracker does
//! the same (trap, report, exit) rather than `SECCOMP_RET_KILL_PROCESS`,
//! which would leave only "Bad system call" and no thread name.
//!
//! The handler runs in a signal context: it only reads thread-local cells
//! set when the thread was sandboxed, formats into a stack buffer, and calls
//! `write` and `_exit` (both allowed in every class).

use crate::{names, ThreadClass};
use std::cell::Cell;
use std::sync::Once;

/// The exit code of a VMM stopped by a forbidden system call: 128 + SIGSYS,
/// what a shell shows for a process killed by that signal.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: i32 = 1;

/// The head of `siginfo_t` for SIGSYS on x86_64 (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

const _: () = assert!(std::mem::offset_of!(SigsysInfo, syscall) == 24);
const _: () = assert!(std::mem::offset_of!(SigsysInfo, arch) == 28);
const _: () = assert!(size_of::<SigsysInfo>() <= size_of::<libc::siginfo_t>());

thread_local! {
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Remembers the calling thread's name and class for the handler.
pub(crate) fn remember_thread(class: ThreadClass) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n.as_bytes()[..len]);
    }
    NAME.with(|c| c.set(name));
    CLASS.with(|c| c.set(Some(class)));
}

/// Installs the handler (once per process).
pub(crate) fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act.sa_mask` is a valid sigset_t to fill.
        unsafe { libc::sigfillset(&mut act.sa_mask) };
        // SAFETY: a valid sigaction whose handler is async-signal-safe (see
        // `on_sigsys`); the old action is not needed.
        if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// A fixed buffer a signal handler can format into.
struct Line {
    buf: [u8; 640],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            // `v % 10` is a single digit.
            digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for a denied call `nr` made by thread `name` of `class`.
fn message(line: &mut Line, name: &[u8], class: Option<ThreadClass>, nr: Option<i64>) {
    line.push(b"vmm: error: seccomp: ");
    match class {
        Some(class) => {
            line.push(b"thread `");
            line.push(name);
            line.push(b"` (class ");
            line.push(class.name().as_bytes());
            line.push(b")");
        }
        // A thread being started runs under the filter of the one starting it.
        None => line.push(b"a thread being started (under the filter of the thread that starts it)"),
    }
    match nr {
        Some(nr) => {
            line.push(b" made the forbidden system call ");
            line.push(names::name(nr).unwrap_or("?").as_bytes());
            line.push(b" (");
            line.push_num(u64::try_from(nr).unwrap_or(0));
            line.push(b")");
        }
        None => line.push(b" received SIGSYS"),
    }
    line.push(b"; the VMM stops (exit code ");
    line.push_num(u64::try_from(EXIT_SECCOMP).unwrap_or(0));
    line.push(
        b"). If the call is legitimate, allow it in the class's rules (sandbox/src/rules.rs); \
          `--seccomp log` lets forbidden calls through and the kernel log lists them \
          (`dmesg | grep type=1326`): see docs/seccomp.md\n",
    );
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        None
    } else {
        // SAFETY: the kernel passes a valid siginfo_t, whose head is `SigsysInfo`.
        let si = unsafe { &*info.cast::<SigsysInfo>() };
        (si.code == SYS_SECCOMP).then_some(i64::from(si.syscall))
    };
    let name = NAME.with(Cell::get);
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut line = Line {
        buf: [0; 640],
        len: 0,
    };
    message(&mut line, &name[..len], CLASS.with(Cell::get), nr);
    // SAFETY: writing an initialized buffer to stderr, then ending the
    // process without running anything else: both async-signal-safe.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_thread_class_and_call() {
        let mut line = Line {
            buf: [0; 640],
            len: 0,
        };
        message(&mut line, b"vcpu0", Some(ThreadClass::Vcpu), Some(41));
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(
            text.starts_with(
                "vmm: error: seccomp: thread `vcpu0` (class vcpu) made the forbidden system call socket (41); the VMM stops (exit code 159)."
            ),
            "{text}"
        );
        assert!(
            text.contains("--seccomp log") && text.ends_with("docs/seccomp.md\n"),
            "{text}"
        );
    }
}
