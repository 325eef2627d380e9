//! How a run is reported: the workload results, the end, the host's check,
//! memory statistics, and the JSON statistics file.

use super::StatsOut;
use abi::exit::ExitCode;
use vmm::controller::verify_reports;
use vmm::{GuestEnd, VmConfig, EXIT_BAD_RESULT, EXIT_VMM_ERROR};

/// Prints how the run went and checks the workload; returns the exit code.
pub fn report(config: &VmConfig, outcome: &vmm::RunOutcome, stats: Option<&mut StatsOut>) -> i32 {
    for r in &outcome.reports {
        println!(
            "vmm: cpu{} workload result: pages {}..{} checksum {:#018x} guest faults {} ({} Mcycles)",
            r.cpu,
            r.first_page,
            r.first_page + r.pages,
            r.checksum,
            r.faults,
            r.cycles / 1_000_000
        );
    }
    for msg in &outcome.bad_requests {
        eprintln!("vmm: warning: rejected guest request: {msg}");
    }
    let mut code = outcome.exit_code();
    match &outcome.end {
        GuestEnd::Exited(raw) => {
            let what = ExitCode::from_raw(*raw).map_or("unknown exit code", ExitCode::describe);
            println!("vmm: guest exited with code {raw} ({what})");
        }
        GuestEnd::Crashed(s) => {
            let rip = s.rip.map_or("unknown".to_string(), |r| format!("{r:#x}"));
            eprintln!(
                "vmm: error: guest crashed on vCPU {}: {} at RIP {rip}",
                s.cpu, s.reason
            );
        }
        GuestEnd::TimedOut(t) => eprintln!("vmm: error: the guest did not finish within {t:?}"),
        GuestEnd::MemoryFault(msg) => eprintln!("vmm: error: the VM was stopped: {msg}"),
        GuestEnd::Stopped => eprintln!("vmm: the VM was stopped on request"),
        GuestEnd::Migrated(s) => println!("vmm: the VM migrated: {s}"),
        GuestEnd::Signal(sig) => eprintln!("vmm: shut down cleanly on signal {sig}"),
    }
    // A migrated VM's workload finishes on the destination.
    if code == 0 && !matches!(outcome.end, GuestEnd::Migrated(_)) {
        match verify_reports(config, outcome) {
            Ok(Some(sum)) => println!("vmm: workload checksum {sum:#018x} verified on the host"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("vmm: error: workload result is wrong: {e}");
                code = EXIT_BAD_RESULT;
            }
        }
    }
    if let Some(m) = &outcome.memory {
        let t = &m.total;
        println!(
            "vmm: memory {}: {} faults served ({} zero pages, {} copied, {} continued from the page cache, {} by fault-around), {} retries",
            m.backend, t.faults, t.pages_zeroed, t.pages_copied, t.pages_continued, t.fault_around_pages, t.retries_total
        );
        if let Some(s) = &m.sharing {
            println!(
                "vmm: guest RAM ({}, {}): {} shared pages, {} private pages, {} zero pages",
                m.backing, m.fault_mode, s.shared_pages, s.private_pages, s.zero_pages
            );
        }
    }
    if let Some(m) = &outcome.memory {
        if let Some(p) = &m.working_set_prefetch {
            println!(
                "vmm: working-set prefetch: {} pages ({} from the recorded contents) in {} runs on {} thread(s), {:.1} ms",
                p.pages,
                p.from_contents,
                p.runs,
                p.threads,
                p.micros as f64 / 1e3
            );
            if p.bad_chunks > 0 {
                println!(
                    "vmm: working-set prefetch: {} chunk(s) of the recorded contents failed their hash; their pages were read from the snapshot (record the working set again)",
                    p.bad_chunks
                );
            }
        }
    }
    match &outcome.working_set {
        Some(Ok(w)) => println!(
            "vmm: working set of {} pages ({} fault-around neighbours, {} ms window) written to {}",
            w.pages,
            w.around,
            w.window_ms,
            w.path.display()
        ),
        Some(Err(e)) => {
            eprintln!("vmm: error: the working set was not written: {e}");
            if code == 0 {
                code = EXIT_VMM_ERROR;
            }
        }
        None => {}
    }
    match &outcome.checkpoint {
        Some(Ok(info)) => println!(
            "vmm: snapshot at the guest's checkpoint written to {} ({} bytes of memory)",
            info.dir.display(),
            info.memory_bytes
        ),
        Some(Err(e)) => {
            eprintln!("vmm: error: the snapshot at the guest's checkpoint failed: {e}");
            code = EXIT_VMM_ERROR;
        }
        None => {}
    }
    let first = outcome
        .first_output
        .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
    println!(
        "vmm: first guest output after {first}, total {:.1} ms",
        outcome.elapsed.as_secs_f64() * 1e3
    );
    // Last, so that with `--stats -` the JSON is the tail of stdout.
    if let Some(stats) = stats {
        let written = serde_json::to_string_pretty(&outcome.stats_json())
            .map_err(|e| format!("cannot encode the statistics: {e}"))
            .and_then(|json| stats.write(&json));
        if let Err(e) = written {
            eprintln!("vmm: error: {e}");
            if code == 0 {
                code = EXIT_VMM_ERROR;
            }
        }
    }
    code
}

pub fn print_result<T: serde::Serialize + std::fmt::Display>(r: &T, json: bool) -> i32 {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vmm: error: cannot encode the results: {e}");
                return EXIT_VMM_ERROR;
            }
        }
    } else {
        print!("{r}");
    }
    0
}
