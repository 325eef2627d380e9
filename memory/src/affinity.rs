//! Thread placement. Most of a userfault round trip here is the cross-CPU
//! wake-up (docs/platform.md: ~48 us cross-CPU vs ~7 us same-CPU), so where the
//! handler thread runs relative to the vCPUs is a design choice the VMM makes.

use std::io;

/// Pins the calling thread to CPU `cpu` (sched_setaffinity on this thread only).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // CPU_SETSIZE is 1024: larger indices do not fit the fixed-size mask.
    let setsize = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    if cpu >= setsize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot pin a thread to CPU {cpu}: CPU numbers must be below {setsize}"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid mask of the size
    // given and is only read by the kernel.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot pin a thread to CPU {cpu}: {e}; pick a CPU that is online and allowed \
                 for this process (see /sys/devices/system/cpu/online and `taskset -p {}`)",
                std::process::id()
            ),
        ));
    }
    Ok(())
}

/// Puts the calling thread under `SCHED_BATCH`: the same CPU share as any
/// normal thread, but its wake-ups do not preempt the running thread (a
/// handler woken on a CPU where a vCPU runs waits for the vCPU to block or
/// for the tick instead of taking the CPU from it).
pub fn set_batch_policy() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // read by the kernel only.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU the calling thread is running on right now, if the kernel says.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// Where to put a lone vCPU thread and the fault handler together: the CPU
/// the calling thread runs on now if its affinity allows it (so concurrent
/// VMMs spread over the host), else the first allowed CPU; `None` if the
/// kernel does not say. On a 1-CPU host this is that CPU, where both threads
/// run anyway.
pub fn colocation_cpu() -> Option<usize> {
    let allowed = allowed_cpus().ok()?;
    match current_cpu() {
        Some(c) if allowed.contains(&c) => Some(c),
        _ => allowed.first().copied(),
    }
}

/// The CPUs the calling thread may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most
    // size_of::<cpu_set_t>() bytes into `set`.
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let setsize = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    // SAFETY: every index is below CPU_SETSIZE, inside `set`.
    Ok((0..setsize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_the_calling_thread_only() {
        let allowed = allowed_cpus().expect("affinity mask");
        assert!(!allowed.is_empty());
        let last = *allowed.last().expect("one CPU");
        std::thread::spawn(move || {
            pin_current_thread(last).expect("pin to the last CPU");
            for _ in 0..10 {
                assert_eq!(current_cpu(), Some(last));
                std::thread::yield_now();
            }
        })
        .join()
        .expect("pinned thread");
        let err = pin_current_thread(100_000).expect_err("out of range");
        assert!(err.to_string().contains("must be below"), "{err}");
    }
}
