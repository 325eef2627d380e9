//! What a filter costs per system call: a fault-handler thread makes the
//! calls of a userfault round trip (`poll`, `read`, `ioctl(UFFDIO_COPY)`,
//! here on a bad descriptor so they return at once) with and without its
//! filter, interleaved.
//!
//! ```sh
//! cargo run --release -p vmm-sandbox --example overhead
//! ```

use std::time::Instant;
use vmm_sandbox::{spawn, SeccompMode, ThreadClass};

const CALLS: u32 = 200_000;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;

/// Nanoseconds per call of each kind, on a new thread in `mode`.
fn measure(mode: SeccompMode) -> [f64; 3] {
    let t = spawn(
        std::thread::Builder::new().name("overhead".into()),
        ThreadClass::FaultHandler,
        mode,
        || {
            let time = |f: &dyn Fn()| {
                let start = Instant::now();
                for _ in 0..CALLS {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS)
            };
            let mut buf = [0u8; 32];
            let buf_ptr = buf.as_mut_ptr() as usize;
            // SAFETY: poll on no descriptor and a zero timeout.
            let poll = time(&|| unsafe {
                libc::poll(std::ptr::null_mut(), 0, 0);
            });
            // SAFETY: a read into a live buffer from a descriptor that is not open.
            let read = time(&|| unsafe {
                libc::read(-1, buf_ptr as *mut libc::c_void, 32);
            });
            // SAFETY: an ioctl on a descriptor that is not open (EBADF at once).
            let ioctl = time(&|| unsafe {
                libc::ioctl(-1, UFFDIO_COPY, 0usize);
            });
            [poll, read, ioctl]
        },
    )
    .expect("thread");
    t.join().expect("join")
}

fn main() {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..10 {
        if i % 2 == 0 {
            on.push(measure(SeccompMode::Kill));
            off.push(measure(SeccompMode::Off));
        } else {
            off.push(measure(SeccompMode::Off));
            on.push(measure(SeccompMode::Kill));
        }
    }
    let median = |v: &[[f64; 3]], k: usize| {
        let mut x: Vec<f64> = v.iter().map(|a| a[k]).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    for (k, name) in ["poll", "read", "ioctl(UFFDIO_COPY)"].iter().enumerate() {
        let (a, b) = (median(&on, k), median(&off, k));
        println!(
            "{name:<20} filtered {a:7.1} ns, unfiltered {b:7.1} ns: +{:.1} ns per call",
            a - b
        );
    }
}
