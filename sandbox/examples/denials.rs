//! Summarizes the calls a `--seccomp log` run let through: reads the kernel
//! log (`dmesg`) on stdin and prints each (thread, system call) once, with
//! how often it was seen, e.g. after `VMM_SECCOMP=log cargo test`:
//!
//! ```sh
//! dmesg | cargo run -q -p vmm-sandbox --example denials
//! ```
//!
//! Thread names map to classes as `docs/seccomp.md` lists them. The kernel
//! rate-limits these lines: `sysctl kernel.printk_ratelimit=0` while
//! collecting keeps them all.

use std::collections::BTreeMap;
use std::io::BufRead;

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn main() {
    let mut seen: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if !line.contains("type=1326") {
            continue;
        }
        let (Some(comm), Some(nr)) = (field(&line, "comm="), field(&line, "syscall=")) else {
            continue;
        };
        let Ok(nr) = nr.parse::<i64>() else {
            continue;
        };
        // vcpu0, vcpu1... are one thread kind.
        let kind = comm.trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
        *seen.entry((kind, nr)).or_default() += 1;
    }
    if seen.is_empty() {
        println!("no system call was let through by a seccomp filter in log mode");
    }
    for ((thread, nr), n) in seen {
        let name = vmm_sandbox::names::name(nr).unwrap_or("?");
        println!("{thread:<24} {name:<20} ({nr}) x{n}");
    }
}
