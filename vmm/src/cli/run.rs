//! `vmm run` and `vmm restore`: build, run with the control socket, report.

use super::args::{RestoreArgs, RunArgs};
use super::report::report;
use super::{parse_timeout, sandbox_main, seccomp_mode, StatsOut};
use sandbox::SeccompMode;
use std::path::{Path, PathBuf};
use vmm::config_file::ConfigFile;
use vmm::{VmConfig, VmOptions, EXIT_VMM_ERROR};

/// The configuration and the sandbox mode the file or flags ask for.
fn config_from(args: &RunArgs) -> Result<(VmConfig, Option<SeccompMode>), vmm::config_file::ConfigFileError> {
    let mut file = ConfigFile::defaults();
    if let Some(path) = &args.config {
        file = file.overridden_by(ConfigFile::load(path)?);
    }
    let flags = ConfigFile {
        kernel: args.kernel.clone(),
        vcpus: args.vcpus,
        mem: args.mem.clone(),
        cmdline: args.cmdline.clone(),
        mem_backend: args.mem_backend.clone(),
        fault_around: args.fault_around,
        seccomp: args.seccomp,
    };
    let merged = file.overridden_by(flags);
    let seccomp = merged.seccomp();
    Ok((merged.into_config()?, seccomp))
}

/// `vmm run`.
pub fn run(args: RunArgs) -> i32 {
    let (config, asked) = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let timeout = match parse_timeout(args.timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let seccomp = match seccomp_mode(asked) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut stats = match StatsOut::open(args.stats.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = VmOptions {
        stdin: true,
        timeout,
        shutdown_signals: true,
        seccomp,
        snapshot_key: match super::snapshot_key(args.snapshot_key.as_deref()) {
            Ok(k) => k,
            Err(code) => return code,
        },
        record_working_set: args.record_working_set.clone(),
        snapshot_at_checkpoint: args
            .snapshot_at_checkpoint
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        ..Default::default()
    };
    let outcome = match run_with_control(vmm::Vm::new(&config, options), args.control.as_deref(), seccomp) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    report(&config, &outcome, stats.as_mut())
}

/// Why a run could not go ahead.
type RunError = Box<dyn std::error::Error + Send + Sync>;

/// Starts a built VM, serves the control socket while it runs, sandboxes
/// the main thread, waits for the end.
fn run_with_control(
    vm: Result<vmm::Vm, vmm::VmError>,
    control: Option<&Path>,
    seccomp: SeccompMode,
) -> Result<vmm::RunOutcome, RunError> {
    let running = vm?.start()?;
    let server = match control {
        Some(path) => match vmm::control::ControlServer::start(path, running.handle()) {
            Ok(s) => Some(s),
            Err(e) => {
                running.stop();
                let _ = running.wait();
                return Err(e.into());
            }
        },
        None => None,
    };
    if let Err(e) = sandbox_main(seccomp) {
        running.stop();
        let _ = running.wait();
        return Err(e.into());
    }
    let outcome = running.wait();
    drop(server);
    Ok(outcome?)
}

/// `vmm restore`.
pub fn restore(args: RestoreArgs) -> i32 {
    let timeout = match parse_timeout(args.timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let seccomp = match seccomp_mode(args.seccomp) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut stats = match StatsOut::open(args.stats.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = VmOptions {
        stdin: true,
        timeout,
        shutdown_signals: true,
        seccomp,
        snapshot_key: match super::snapshot_key(args.snapshot_key.as_deref()) {
            Ok(k) => k,
            Err(code) => return code,
        },
        ..Default::default()
    };
    let grace = super::seconds("--handler-grace", args.handler_grace, true);
    let stall = super::seconds("--handler-stall", args.handler_stall, true);
    let (handler_grace, handler_stall) = match (grace, stall) {
        (Ok(g), Ok(s)) => (g, s),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let (prefetch, prefetch_working_set) = match args.prefetch.as_deref() {
        None => (false, None),
        Some("all") => (true, None),
        Some("working-set") => (false, Some(!args.prefetch_while_running)),
        Some("working-set,all" | "all,working-set") => (true, Some(!args.prefetch_while_running)),
        Some(other) => {
            eprintln!("vmm: error: --prefetch {other}: expected all, working-set or working-set,all");
            return EXIT_VMM_ERROR;
        }
    };
    if args.prefetch_while_running && prefetch_working_set.is_none() {
        eprintln!("vmm: error: --prefetch-while-running goes with --prefetch working-set[,all]");
        return EXIT_VMM_ERROR;
    }
    let how = vmm::RestoreOptions {
        peer_program: None,
        prefetch_working_set,
        record_working_set: args.record_working_set,
        handler_grace: Some(handler_grace),
        handler_stall: Some(handler_stall),
        lazy: args.lazy,
        prefetch,
        fault_around: args.fault_around,
        uffd_socket: match args.mem_backend.as_deref().map(|b| b.strip_prefix("uffd:")) {
            None => None,
            Some(Some(path)) if !path.is_empty() => Some(PathBuf::from(path)),
            Some(_) => {
                eprintln!("vmm: error: vmm restore --mem-backend takes uffd:SOCKET (or use --lazy)");
                return EXIT_VMM_ERROR;
            }
        },
    };
    let start = std::time::Instant::now();
    let vm = match vmm::Vm::restore(&args.from, &how, options) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let config = vm.config().clone();
    let memory = match &how.uffd_socket {
        Some(sock) => format!(
            "memory served by the external page-fault handler at {}",
            sock.display()
        ),
        None if args.lazy => "lazy memory".into(),
        None => "eager memory".into(),
    };
    eprintln!(
        "vmm: restored from {} in {:.1} ms ({memory})",
        args.from.display(),
        start.elapsed().as_secs_f64() * 1e3,
    );
    match run_with_control(Ok(vm), args.control.as_deref(), seccomp) {
        Ok(outcome) => report(&config, &outcome, stats.as_mut()),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}
