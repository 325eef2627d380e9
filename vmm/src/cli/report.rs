//! How a run is reported: the workload results, the end, the host's check,
//! memory statistics, and the JSON statistics file.

use abi::exit::ExitCode;
use std::path::Path;
use vmm::controller::verify_reports;
use vmm::{GuestEnd, VmConfig, EXIT_BAD_RESULT, EXIT_VMM_ERROR};

/// Prints how the run went and checks the workload; returns the exit code.
pub fn report(config: &VmConfig, outcome: &vmm::RunOutcome, stats: Option<&Path>) -> i32 {
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
    let first = outcome
        .first_output
        .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
    println!(
        "vmm: first guest output after {first}, total {:.1} ms",
        outcome.elapsed.as_secs_f64() * 1e3
    );
    // Last, so that with `--stats -` the JSON is the tail of stdout.
    if let Some(path) = stats {
        if let Err(e) = write_stats(path, outcome) {
            eprintln!("vmm: error: cannot write statistics to {}: {e}", path.display());
            if code == 0 {
                code = EXIT_VMM_ERROR;
            }
        }
    }
    code
}

/// Writes the run's statistics as JSON to `path` (`-` = stdout).
pub fn write_stats(path: &std::path::Path, outcome: &vmm::RunOutcome) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(&outcome.stats_json()).map_err(std::io::Error::other)?;
    if path.as_os_str() == "-" {
        println!("{json}");
        Ok(())
    } else {
        std::fs::write(path, json + "\n")
    }
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
