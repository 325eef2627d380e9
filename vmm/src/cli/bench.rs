//! `vmm bench` and `vmm stress`.

use super::args::{BenchCommand, StressArgs};
use super::report::print_result;
use vmm::EXIT_VMM_ERROR;

/// The `--mem-backing` list of a benchmark, or the exit code of a bad one.
fn parse_backings(list: &[String]) -> Result<Vec<vmm_core::MemBacking>, i32> {
    list.iter()
        .map(|b| {
            b.parse::<vmm_core::MemBacking>().map_err(|e| {
                eprintln!("vmm: error: --mem-backing {b}: {e}");
                EXIT_VMM_ERROR
            })
        })
        .collect()
}

/// `vmm bench`.
pub fn bench(cmd: BenchCommand) -> i32 {
    let args = match &cmd {
        BenchCommand::Boot(a)
        | BenchCommand::Fault { args: a, .. }
        | BenchCommand::GuestFault(a)
        | BenchCommand::Restore { args: a, .. }
        | BenchCommand::Clones(a)
        | BenchCommand::Snapshot { args: a, .. }
        | BenchCommand::WorkingSet(a)
        | BenchCommand::Migrate { args: a, .. }
        | BenchCommand::All { args: a, .. } => a,
    };
    if args.pages == 0 || args.repeats == 0 {
        eprintln!("vmm: error: --pages and --repeats must be at least 1");
        return EXIT_VMM_ERROR;
    }
    let fault_opts = vmm::bench::FaultBenchOptions {
        pages: args.pages,
        repeats: args.repeats,
    };
    let mut progress = |what: &str| eprintln!("vmm bench: {what}...");
    let result = match &cmd {
        BenchCommand::Boot(a) => {
            vmm::bench::boot(vmm::bench::BootBenchOptions { repeats: a.repeats }, &mut progress)
                .map(|r| print_result(&r, a.json))
        }
        BenchCommand::Restore {
            args: a,
            mem_mib,
            mem_backing,
        } => match parse_backings(mem_backing) {
            Ok(b) => vmm::bench::restore_with(a.repeats, mem_mib, &b, &mut progress)
                .map(|r| print_result(&r, a.json)),
            Err(code) => return code,
        },
        BenchCommand::Clones(a) => vmm::bench::clones(&mut progress).map(|r| print_result(&r, a.json)),
        BenchCommand::Snapshot {
            args: a,
            mem_mib,
            dirty_only,
        } => {
            let sizes: &[u64] = if *dirty_only { &[] } else { mem_mib };
            vmm::bench::snapshot_with(a.repeats, sizes, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::WorkingSet(a) => {
            vmm::bench::working_set(a.repeats, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::Migrate {
            args: a,
            push_orders: true,
            ..
        } => vmm::bench::migrate_push_orders(a.repeats, &mut progress).map(|r| print_result(&r, a.json)),
        BenchCommand::Migrate {
            args: a,
            tls,
            mem_mib,
            plot,
            from,
            push_orders: false,
            mem_backing,
        } => match from {
            Some(file) => std::fs::read(file)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<vmm::bench::MigrateBench>(&b).map_err(|e| e.to_string())
                })
                .map_err(|e| vmm::bench::BenchError::BadRun {
                    end: format!("cannot read the runs in {}: {e}", file.display()),
                    console: String::new(),
                }),
            None => match parse_backings(mem_backing) {
                Ok(b) => vmm::bench::migrate_with(a.repeats, *tls, mem_mib, &b, &mut progress),
                Err(code) => return code,
            },
        }
        .map(|r| {
            if let Some(dir) = plot {
                match vmm::bench::plot::write_migrate(&r, dir) {
                    Ok(files) => {
                        for f in files {
                            eprintln!("vmm bench: wrote {}", f.display());
                        }
                    }
                    Err(e) => {
                        eprintln!("vmm: error: {e}");
                        return EXIT_VMM_ERROR;
                    }
                }
            }
            print_result(&r, a.json)
        }),
        BenchCommand::GuestFault(a) => {
            vmm::bench::guest_fault(a.repeats, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::Fault {
            args: a, vcpus: None, ..
        } => vmm::bench::fault(fault_opts, &mut progress).map(|r| print_result(&r, a.json)),
        BenchCommand::Fault {
            args: a,
            vcpus: Some(list),
            layouts,
        } => {
            let vcpus: Result<Vec<u32>, _> = list.split(',').map(|v| v.trim().parse::<u32>()).collect();
            let layouts: Result<Vec<vmm::bench::scaling::LayoutSpec>, String> =
                layouts.split(',').map(str::parse).collect();
            let (vcpus, layouts) = match (vcpus, layouts) {
                (Ok(v), Ok(l)) if !v.is_empty() && v.iter().all(|&n| (1..=8).contains(&n)) => (v, l),
                (_, Err(e)) => {
                    eprintln!("vmm: error: {e}");
                    return EXIT_VMM_ERROR;
                }
                _ => {
                    eprintln!(
                        "vmm: error: --vcpus takes vCPU counts from 1 to 8 separated by commas, e.g. 1,2,4"
                    );
                    return EXIT_VMM_ERROR;
                }
            };
            let opts = vmm::bench::scaling::ScalingOptions {
                vcpus,
                pages: a.pages,
                repeats: a.repeats,
                layouts,
            };
            vmm::bench::scaling::scaling_bench(&opts, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::All { args: a, plot } => vmm::bench::all(fault_opts, &mut progress).map(|r| {
            if let Some(dir) = plot {
                match vmm::bench::plot::write_all(&r, dir) {
                    Ok(files) => {
                        for f in files {
                            eprintln!("vmm bench: wrote {}", f.display());
                        }
                    }
                    Err(e) => {
                        eprintln!("vmm: error: {e}");
                        return EXIT_VMM_ERROR;
                    }
                }
            }
            print_result(&r, a.json)
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("vmm: error: {e}");
        EXIT_VMM_ERROR
    })
}

/// `vmm stress`.
pub fn stress(a: StressArgs) -> i32 {
    let mem_size = match vmm::config::parse_size(&a.mem) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let positive = a.seconds.is_finite() && a.seconds > 0.0;
    if !positive || !(1..=abi::boot::MAX_VCPUS).contains(&a.vcpus) {
        eprintln!(
            "vmm: error: --seconds must be positive and --vcpus 1 to {}",
            abi::boot::MAX_VCPUS
        );
        return EXIT_VMM_ERROR;
    }
    let opts = vmm::stress::StressOptions {
        seconds: a.seconds,
        seed: a.seed,
        vcpus: a.vcpus,
        mem_size,
        ..Default::default()
    };
    let report = match vmm::stress::run(opts, &mut |line| eprintln!("vmm stress: {line}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmm: error: cannot encode the report: {e}"),
        }
    } else {
        print!("{report}");
    }
    match (report.ok(), report.interrupted_by) {
        (false, _) => 1,
        (true, Some(sig)) => 128 + sig,
        (true, None) => 0,
    }
}
