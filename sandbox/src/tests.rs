use super::*;
use std::process::Command;

#[test]
fn every_filter_compiles_for_x86_64_in_both_modes() {
    for class in ThreadClass::ALL {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let prog = filter(class, mode).unwrap_or_else(|e| panic!("{class} {mode}: {e}"));
            // The kernel's limit (BPF_MAXINSNS).
            assert!(prog.len() < 4096, "{class}: {} instructions", prog.len());
            assert!(!rules(class).is_empty());
        }
        let opens_files = matches!(
            class,
            ThreadClass::Controller
                | ThreadClass::ControlClient
                | ThreadClass::ControlServer
                | ThreadClass::LiveSaver
        );
        assert!(opens_files || !rules(class).refusal_filters().unwrap().is_empty());
    }
}

#[test]
fn refused_calls_fail_with_an_errno_instead_of_stopping_the_vmm() {
    for class in ThreadClass::ALL {
        let r = rules(class);
        // Only the controller and the live-snapshot saver open files
        // (snapshots: read-only, or new files never through a link), and a
        // control client (TLS files, read-only; its server allows what it
        // does).
        let writes_snapshots = matches!(class, ThreadClass::Controller | ThreadClass::LiveSaver);
        if writes_snapshots || matches!(class, ThreadClass::ControlClient | ThreadClass::ControlServer) {
            let Some(Allowed::When(alts)) = r.get(libc::SYS_openat) else {
                panic!("{class}: openat must be checked");
            };
            let writes = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
            let new = (libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW) as u64;
            for alt in alts {
                let flags = alt.iter().find(|c| c.index == 2).unwrap();
                let read_only = flags.mask & writes == writes && flags.value & writes == 0;
                let new_file = flags.mask & new == new
                    && flags.value & new == new
                    && flags.value & libc::O_TRUNC as u64 == 0
                    && flags.mask & libc::O_TRUNC as u64 != 0;
                assert!(read_only || new_file, "{class}: {alt:?}");
            }
            assert!(writes_snapshots || alts.len() == 1, "{class}");
            assert_eq!(r.refusal(libc::SYS_openat), None);
        } else {
            assert_eq!(r.refusal(libc::SYS_openat), Some(libc::EACCES), "{class}");
        }
        assert_eq!(
            r.refusal(libc::SYS_clone3),
            class.starts_threads().then_some(libc::ENOSYS),
            "{class}"
        );
    }
}

#[test]
fn a_class_that_starts_threads_allows_what_they_do() {
    for parent in ThreadClass::ALL {
        for &child in parent.spawns() {
            if let Err((nr, alt)) = rules(parent).covers(&rules(child)) {
                panic!(
                    "{parent} starts {child} threads but does not allow {} ({nr}) {alt:?}",
                    names::name(nr).unwrap_or("?")
                );
            }
            // The launcher's children are processes (forks).
            assert!(
                parent.starts_threads() || parent == ThreadClass::UffdLauncher,
                "{parent}"
            );
        }
    }
}

#[test]
fn no_class_may_exec_fork_trace_or_map_executable_memory() {
    let never = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_writev,
        libc::SYS_init_module,
        libc::SYS_kexec_load,
        libc::SYS_mount,
        libc::SYS_bpf,
        libc::SYS_io_uring_setup,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
    ];
    for class in ThreadClass::ALL {
        let r = rules(class);
        for nr in never {
            assert!(
                r.get(nr).is_none(),
                "{class} allows {}",
                names::name(nr).unwrap_or("?")
            );
        }
        for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
            let Some(Allowed::When(alts)) = r.get(nr) else {
                panic!("{class}: {nr} must be checked");
            };
            for alt in alts {
                assert!(
                    alt.iter()
                        .any(|c| c.index == 2 && c.mask & 4 != 0 && c.value & 4 == 0),
                    "{class}: {nr} without the PROT_EXEC check: {alt:?}"
                );
            }
        }
        // Signals only to this process, and only SIGABRT (a panic's abort)
        // or, from the controller, SIGRTMIN (kicks).
        let Some(Allowed::When(alts)) = r.get(libc::SYS_tgkill) else {
            panic!("{class}: tgkill must be checked");
        };
        for alt in alts {
            assert!(
                alt.contains(&rules::eq(0, u64::from(std::process::id()))),
                "{class}: {alt:?}"
            );
            let sig = alt.iter().find(|c| c.index == 2).unwrap().value;
            assert!(
                sig == 6
                    || (class == ThreadClass::Controller
                        && sig == u64::from(libc::SIGRTMIN().unsigned_abs())),
                "{class}: {sig}"
            );
        }
        // Only threads, never a process (but the launcher's fork, which
        // shares nothing): clone's flags are checked.
        if let Some(a) = r.get(libc::SYS_clone) {
            let Allowed::When(alts) = a else {
                panic!("{class}: clone must be checked");
            };
            for alt in alts {
                let flags = alt.iter().find(|c| c.index == 0).unwrap().value;
                let thread = flags & libc::CLONE_THREAD as u64 != 0;
                let fork = flags & (libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS) as u64 == 0;
                assert!(
                    thread || (fork && class == ThreadClass::UffdLauncher),
                    "{class}: {alt:?}"
                );
            }
        }
        // No class signals another process, or a process group: the
        // controller kills a connection holder through its pidfd only.
        assert!(r.get(libc::SYS_kill).is_none(), "{class}");
        // A socket is only ever of the migration's families, and only where
        // a migration connects.
        if let Some(Allowed::When(alts)) = r.get(libc::SYS_socket) {
            assert!(matches!(
                class,
                ThreadClass::Controller
                    | ThreadClass::MigrationSource
                    | ThreadClass::MigrationDest
                    | ThreadClass::UffdPeer
                    | ThreadClass::UffdLauncher
            ));
            assert!(alts.iter().all(|a| a.iter().any(|c| c.index == 0)));
        } else {
            assert!(r.get(libc::SYS_socket).is_none(), "{class}");
        }
    }
}

#[test]
fn vcpu_threads_may_only_use_vcpu_ioctls() {
    let r = rules(ThreadClass::Vcpu);
    let Some(Allowed::When(alts)) = r.get(libc::SYS_ioctl) else {
        panic!("ioctl must be checked");
    };
    // KVM_RUN is checked first.
    assert_eq!(alts[0], vec![rules::eq(1, u64::from(crate::ioctls::KVM_RUN))]);
    for alt in alts {
        let req = alt[0].value;
        // KVMIO type byte; no VM-wide or system ioctl (KVM_CREATE_*, memory slots).
        assert_eq!((req >> 8) & 0xff, 0xAE, "{req:#x}");
        assert!(req & 0xff >= 0x80, "{req:#x} is not a vCPU ioctl");
    }
    for nr in [
        libc::SYS_openat,
        libc::SYS_socket,
        libc::SYS_clone,
        libc::SYS_connect,
    ] {
        assert!(r.get(nr).is_none());
    }
}

#[test]
fn modes_parse_and_print() {
    for m in [SeccompMode::Off, SeccompMode::Log, SeccompMode::Kill] {
        assert_eq!(m.to_string().parse::<SeccompMode>().unwrap(), m);
    }
    let e = "strict".parse::<SeccompMode>().unwrap_err();
    assert!(e.to_string().contains("use `kill`"), "{e}");
    assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    assert_eq!(serde_json::to_string(&SeccompMode::Log).unwrap(), "\"log\"");
}

/// Runs this test binary again as a child doing `what` (see `child`).
fn run_child(what: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::child", "--nocapture", "--test-threads=1"])
        .env("SANDBOX_TEST_CHILD", what)
        .output()
        .unwrap()
}

/// Not a test by itself: the child process of the tests below.
#[test]
fn child() {
    let Ok(what) = std::env::var("SANDBOX_TEST_CHILD") else {
        return;
    };
    let socket = || {
        // SAFETY: socket has no memory preconditions.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closing the descriptor just made.
            unsafe { libc::close(fd) };
        }
        fd
    };
    let builder = || std::thread::Builder::new().name("victim".into());
    match what.as_str() {
        "kill" => {
            let t = spawn(builder(), ThreadClass::Vcpu, SeccompMode::Kill, socket).unwrap();
            let _ = t.join();
            println!("the forbidden call went through");
        }
        "open" => {
            let t = spawn(builder(), ThreadClass::Vcpu, SeccompMode::Kill, || {
                std::fs::File::open("/proc/self/status").map_err(|e| e.raw_os_error())
            })
            .unwrap();
            assert_eq!(t.join().unwrap().err(), Some(Some(libc::EACCES)));
            println!("child ok");
        }
        "log" => {
            let t = spawn(builder(), ThreadClass::Vcpu, SeccompMode::Log, move || {
                // SAFETY: PR_GET_SECCOMP takes no pointer.
                let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP) };
                (socket(), mode, current())
            })
            .unwrap();
            let (fd, mode, me) = t.join().unwrap();
            assert!(fd >= 0);
            // 2: SECCOMP_MODE_FILTER.
            assert_eq!(mode, 2);
            assert_eq!(me, Some((ThreadClass::Vcpu, SeccompMode::Log)));
            println!("child ok");
        }
        "spawn" => {
            // A controller starts a migration thread, which starts another:
            // clone3 is refused with ENOSYS, clone passes, every filter installs.
            let t = spawn(builder(), ThreadClass::Controller, SeccompMode::Kill, move || {
                let inner = spawn(
                    std::thread::Builder::new().name("out".into()),
                    ThreadClass::MigrationSource,
                    SeccompMode::Off,
                    || {
                        let reader = spawn(
                            std::thread::Builder::new().name("reader".into()),
                            ThreadClass::MigrationSource,
                            SeccompMode::Off,
                            current,
                        )
                        .unwrap();
                        reader.join().unwrap()
                    },
                )
                .unwrap();
                let refused = spawn(builder(), ThreadClass::Vcpu, SeccompMode::Kill, || ()).unwrap_err();
                (inner.join().unwrap(), refused.to_string())
            })
            .unwrap();
            let (inner, refused) = t.join().unwrap();
            // The children took the parent's mode.
            assert_eq!(inner, Some((ThreadClass::MigrationSource, SeccompMode::Kill)));
            assert!(refused.contains("may not start a vcpu thread"), "{refused}");
            println!("child ok");
        }
        "nice" => {
            // The bulk migration threads' own priority: allowed.
            let t = spawn(builder(), ThreadClass::MigrationDest, SeccompMode::Kill, || {
                // SAFETY: setpriority only reads its arguments.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BULK_NICE) }
            })
            .unwrap();
            assert_eq!(t.join().unwrap(), 0);
            println!("child ok");
        }
        "renice" => {
            // Any other value (or thread) is not.
            let t = spawn(builder(), ThreadClass::MigrationSource, SeccompMode::Kill, || {
                // SAFETY: setpriority only reads its arguments.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BULK_NICE + 1) }
            })
            .unwrap();
            let _ = t.join();
            println!("the forbidden call went through");
        }
        "batch" => {
            // A pool's handler thread: SCHED_BATCH and a pin on itself, its CPU.
            let t = spawn(builder(), ThreadClass::FaultHandler, SeccompMode::Kill, || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is this thread; `param` is only read.
                let batch = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
                // SAFETY: no arguments.
                let cpu = unsafe { libc::sched_getcpu() };
                // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes.
                let got = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
                // SAFETY: `set` is a valid mask of the size given, only read.
                let pinned = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
                (batch, cpu, got, pinned)
            })
            .unwrap();
            let (batch, cpu, got, pinned) = t.join().unwrap();
            assert_eq!((batch, got, pinned), (0, 0, 0));
            assert!(cpu >= 0);
            println!("child ok");
        }
        "idle" => {
            // Any other policy (SCHED_IDLE needs no privilege) stops the VMM.
            let t = spawn(builder(), ThreadClass::FaultHandler, SeccompMode::Kill, || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is this thread; `param` is only read.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }
            })
            .unwrap();
            let _ = t.join();
            println!("the forbidden call went through");
        }
        other => panic!("unknown child {other}"),
    }
}

#[test]
fn a_forbidden_call_stops_the_process_naming_thread_class_and_call() {
    let out = run_child("kill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("thread `victim` (class vcpu) made the forbidden system call socket (41)"),
        "{stderr}"
    );
    assert!(!stdout.contains("went through"), "{stdout}");
}

#[test]
fn a_fault_handler_may_batch_and_pin_itself_and_nothing_else() {
    let out = run_child("batch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child ok"), "{stdout}");
    let out = run_child("idle");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(class fault-handler) made the forbidden system call sched_setscheduler"),
        "{stderr}"
    );
}

#[test]
fn opening_a_file_where_none_is_opened_fails_with_eacces() {
    let out = run_child("open");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child ok"), "{stdout}");
}

#[test]
fn log_mode_lets_the_call_through_with_the_filter_installed() {
    let out = run_child("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child ok"), "{stdout}");
}

#[test]
fn sandboxed_threads_start_threads_of_the_classes_they_may_start() {
    let out = run_child("spawn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child ok"), "{stdout}");
}

#[test]
fn a_check_that_does_not_build_fails_the_filter_instead_of_allowing_the_call() {
    let mut r = Rules::default();
    // Argument 7 does not exist: dropping the check would allow the call.
    r.allow_if(
        libc::SYS_socket,
        &[rules::ArgCheck {
            index: 7,
            dword: true,
            mask: u64::MAX,
            value: 0,
        }],
    );
    assert!(r.to_seccompiler().is_err());
}

#[test]
fn migration_threads_may_lower_their_own_priority_to_the_bulk_value_only() {
    let want = vec![vec![
        rules::eq(0, 0),
        rules::eq(1, 0),
        rules::eq(2, u64::from(BULK_NICE.unsigned_abs())),
    ]];
    for class in ThreadClass::ALL {
        let r = rules(class);
        // The controller starts the source's threads: their rules are its.
        if matches!(
            class,
            ThreadClass::MigrationSource | ThreadClass::MigrationDest | ThreadClass::Controller
        ) {
            assert_eq!(
                r.get(libc::SYS_setpriority),
                Some(&Allowed::When(want.clone())),
                "{class}"
            );
        } else {
            assert!(r.get(libc::SYS_setpriority).is_none(), "{class}");
        }
    }
    let out = run_child("nice");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child ok"), "{stdout}");
    let out = run_child("renice");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("made the forbidden system call setpriority"),
        "{stderr}"
    );
}
