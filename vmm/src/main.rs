//! `vmm`: the command line. Thin: it turns flags into a [`VmConfig`], runs the VM
//! and prints what happened.

use abi::exit::ExitCode;
use clap::{Parser, Subcommand};
use sandbox::{SeccompMode, ThreadClass};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode as ProcessExit;
use std::time::Duration;
use vmm::config_file::ConfigFile;
use vmm::controller::verify_reports;
use vmm::{GuestEnd, VmConfig, VmOptions};
use vmm::{EXIT_BAD_RESULT, EXIT_VMM_ERROR};

#[derive(Parser, Debug)]
#[command(name = "vmm", version, about = "A minimal KVM VMM for lazily backed microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a microVM (the bundled guest kernel unless --kernel is given).
    Run(RunArgs),
    /// Send a request to the control socket of a `vmm run --control PATH`.
    Ctl(CtlArgs),
    /// Restore a microVM from a snapshot directory; the guest continues where it was.
    Restore(RestoreArgs),
    /// Receive a VM by live migration (`vmm ctl SRC migrate --to ...`)
    /// and run it until its guest exits.
    Receive(ReceiveArgs),
    /// Benchmarks, each with its baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Seeded fault stress: VMs over lazily backed memory under kick, pause and
    /// hold storms, every page verified; non-zero exit on any error or stall.
    Stress(StressArgs),
}

#[derive(clap::Args, Debug)]
struct StressArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seed: the same seed gives the same runs and event schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// vCPUs per VM (1 to 8).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Guest memory per VM.
    #[arg(long, default_value = "512M")]
    mem: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Options shared by the benchmarks.
#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Pages each guest run touches.
    #[arg(long, default_value_t = 20000)]
    pages: u64,
    /// Runs of each case (median and spread are reported).
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Boot time to the guest's first line and whole runs by vCPU count, next
    /// to the cost of the KVM objects alone.
    Boot(BenchArgs),
    /// Stage-2 fault cost through the retry core vs the raw userfaultfd round
    /// trip, and fault-around on sequential restore from a file.
    Fault(BenchArgs),
    /// The guest kernel's demand-zero fault against its empty system-call
    /// round trip, measured in the same guest run.
    GuestFault(BenchArgs),
    /// Snapshot restore to running vCPUs for 64 MiB, 1 GiB and 4 GiB guests,
    /// lazily (memory through the retry core) and eagerly.
    Restore(BenchArgs),
    /// Live migration of a running 1 GiB guest over loopback, post-copy only
    /// and after 3 pre-copy rounds: downtime, total time, page-request
    /// latency p50/p99 during the push.
    Migrate(BenchArgs),
    /// Everything, plus throughput by vCPU count and the fault latency
    /// histogram; `--plot DIR` writes SVG charts.
    All {
        #[command(flatten)]
        args: BenchArgs,
        /// Folder for the charts.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest kernel ELF (x86_64, loaded at its physical addresses).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Number of vCPUs (1 to 8).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory size, e.g. 256M or 4G.
    #[arg(long)]
    mem: Option<String>,
    /// Guest kernel command line, e.g. "workload=touch pages=1000 pattern=rand".
    #[arg(long)]
    cmdline: Option<String>,
    /// What backs guest RAM: `anon` (plain memory, default), `zero` (demand-zero
    /// pages served through userfaultfd) or `file:PATH[,offset=N]` (pages read
    /// on first touch from a memory file indexed by guest-physical address).
    #[arg(long, value_name = "BACKEND")]
    mem_backend: Option<String>,
    /// Fault-around window in pages for a lazy backend: 0 (off) or a power of
    /// two up to 512. Default: 16 (one fill of 16 pages costs about one page).
    #[arg(long, value_name = "PAGES")]
    fault_around: Option<u32>,
    /// Write run statistics (vCPUs, retry core, fault latency) as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// TOML file with any of: kernel, vcpus, mem, cmdline, mem_backend, fault_around, seccomp (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up after this many seconds (exit code 11).
    #[arg(long)]
    timeout: Option<f64>,
    /// Serve a Unix control socket at PATH (`vmm ctl PATH ...`; JSON lines, see docs/snapshot.md).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    seccomp: Option<SeccompMode>,
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The control socket of the running VMM.
    socket: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand, Debug)]
enum CtlRequest {
    /// Pause every vCPU.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Print live statistics (JSON).
    Stats,
    /// Pause, save a snapshot to DIR, then go back to how the VM was
    /// (or --resume / --stop / --pause).
    Snapshot {
        /// The snapshot directory (created; an older snapshot there is replaced).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Resume the VM afterwards, even if it was paused.
        #[arg(long, conflicts_with_all = ["stop", "pause"])]
        resume: bool,
        /// End the run once the snapshot is written.
        #[arg(long, conflicts_with = "pause")]
        stop: bool,
        /// Stay paused afterwards.
        #[arg(long)]
        pause: bool,
    },
    /// Live migration: optional pre-copy rounds while the VM runs, then
    /// pause, send the state to the destination (`vmm receive --listen
    /// ...`), which resumes at once, then send the remaining pages
    /// (post-copy); this VMM's run then ends with exit code 0.
    Migrate {
        /// unix:PATH or tcp:ADDR:PORT.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// Hold the background push back this many milliseconds (pages move
        /// on demand only until then; for experiments).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        push_delay_ms: u64,
        /// Copy pages while the VM runs first, in N rounds (KVM dirty log):
        /// the first copies every data page, each later one the pages
        /// written meanwhile; post-copy then sends only the last round's.
        #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "resume")]
        precopy_rounds: u32,
        /// Resume an interrupted post-copy: the destination waits for it
        /// (`vmm ctl DEST recover --from ADDR`), ADDR is the same.
        #[arg(long)]
        resume: bool,
    },
    /// On the destination of a post-copy whose source or connection was
    /// lost (the VM is paused there): listen at ADDR for the source, which
    /// resumes the migration with `vmm ctl SRC migrate --to ADDR --resume`.
    Recover {
        /// unix:PATH or tcp:ADDR:PORT.
        #[arg(long, value_name = "ADDR")]
        from: String,
    },
}

#[derive(clap::Args, Debug)]
struct ReceiveArgs {
    /// Where to listen: unix:PATH or tcp:ADDR:PORT.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Write run and migration statistics as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Give up after this many seconds (exit code 11).
    #[arg(long)]
    timeout: Option<f64>,
    /// If the source is lost mid-migration: seconds the paused VM waits for
    /// `vmm ctl DEST recover` (and, after one, for the source to come back)
    /// before the run ends with exit code 13.
    #[arg(long, default_value_t = 60.0)]
    lost_wait: f64,
    /// Serve a Unix control socket at PATH once the VM runs.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    seccomp: Option<SeccompMode>,
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// The snapshot directory (written by `vmm ctl PATH snapshot --to DIR`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Serve guest memory lazily from the snapshot through the retry core
    /// (start at once; pages are read on first touch, with fault-around).
    #[arg(long)]
    lazy: bool,
    /// With --lazy: fetch the remaining pages in a background thread.
    #[arg(long, requires = "lazy")]
    prefetch: bool,
    /// With --lazy: fault-around window in pages (0 = off, power of two up to 512).
    #[arg(long, value_name = "PAGES", requires = "lazy")]
    fault_around: Option<u32>,
    /// `uffd:SOCKET`: hand guest memory to an external page-fault handler
    /// (Firecracker's UFFD handshake: JSON mappings + the userfaultfd over SOCKET);
    /// region offsets are guest-physical addresses in DIR/memory.bin.
    #[arg(long, value_name = "uffd:SOCKET", conflicts_with = "lazy")]
    mem_backend: Option<String>,
    /// Write run statistics as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Give up after this many seconds (exit code 11).
    #[arg(long)]
    timeout: Option<f64>,
    /// Serve a Unix control socket at PATH.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    seccomp: Option<SeccompMode>,
}

fn main() -> ProcessExit {
    // Before any thread starts, so that every thread inherits the mask and the
    // controller alone receives these signals (through a signalfd).
    if let Err(e) = vmm::signals::block_shutdown_signals() {
        eprintln!("vmm: error: cannot block SIGINT/SIGTERM for a clean shutdown: {e}");
        return ProcessExit::from(64);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Ctl(args) => ctl(args),
        Command::Restore(args) => restore(args),
        Command::Receive(args) => receive(args),
        Command::Bench(b) => bench(b),
        Command::Stress(a) => stress(a),
    };
    ProcessExit::from(u8::try_from(code).unwrap_or(1))
}

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

/// The sandbox mode: the one asked for (flag or config file), else
/// `VMM_SECCOMP`'s, else kill.
fn seccomp_mode(asked: Option<SeccompMode>) -> Result<SeccompMode, i32> {
    match asked {
        Some(m) => Ok(m),
        None => SeccompMode::from_env()
            .map(Option::unwrap_or_default)
            .map_err(|e| {
                eprintln!("vmm: error: {}: {e}", sandbox::MODE_ENV);
                EXIT_VMM_ERROR
            }),
    }
}

/// Where `--stats` goes. A file is opened before the run: once the VM runs,
/// the main thread's sandbox opens no file.
enum StatsOut {
    Stdout,
    File(PathBuf, std::fs::File),
}

impl StatsOut {
    fn open(path: Option<&Path>) -> Result<Option<StatsOut>, i32> {
        match path {
            None => Ok(None),
            Some(p) if p.as_os_str() == "-" => Ok(Some(StatsOut::Stdout)),
            Some(p) => match std::fs::File::create(p) {
                Ok(f) => Ok(Some(StatsOut::File(p.to_owned(), f))),
                Err(e) => {
                    eprintln!("vmm: error: cannot write statistics to {}: {e}", p.display());
                    Err(EXIT_VMM_ERROR)
                }
            },
        }
    }

    fn write(&mut self, text: &str) -> Result<(), String> {
        use std::io::Write;
        match self {
            StatsOut::Stdout => {
                println!("{text}");
                Ok(())
            }
            StatsOut::File(path, f) => f
                .write_all(format!("{text}\n").as_bytes())
                .map_err(|e| format!("cannot write statistics to {}: {e}", path.display())),
        }
    }
}

/// Sandboxes the main thread once the VM runs (it only waits and reports
/// from here on).
fn sandbox_main(mode: SeccompMode) -> Result<(), sandbox::SandboxError> {
    sandbox::apply(ThreadClass::Main, mode)
}

fn run(args: RunArgs) -> i32 {
    let (config, asked) = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let seccomp = match seccomp_mode(asked) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut stats = match StatsOut::open(args.stats.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let timeout = match args.timeout {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            eprintln!("vmm: error: --timeout must be a positive number of seconds");
            return EXIT_VMM_ERROR;
        }
        s => s.map(Duration::from_secs_f64),
    };
    let options = VmOptions {
        stdin: true,
        timeout,
        shutdown_signals: true,
        seccomp,
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

fn parse_timeout(t: Option<f64>) -> Result<Option<Duration>, i32> {
    match t {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            eprintln!("vmm: error: --timeout must be a positive number of seconds");
            Err(EXIT_VMM_ERROR)
        }
        s => Ok(s.map(Duration::from_secs_f64)),
    }
}

fn restore(args: RestoreArgs) -> i32 {
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
        ..Default::default()
    };
    let how = vmm::RestoreOptions {
        lazy: args.lazy,
        prefetch: args.prefetch,
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
    eprintln!(
        "vmm: restored from {} in {:.1} ms ({} memory)",
        args.from.display(),
        start.elapsed().as_secs_f64() * 1e3,
        if args.lazy { "lazy" } else { "eager" }
    );
    match run_with_control(Ok(vm), args.control.as_deref(), seccomp) {
        Ok(outcome) => report(&config, &outcome, stats.as_mut()),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}

fn receive(args: ReceiveArgs) -> i32 {
    use vmm::migration::{Endpoint, Listener};
    use vmm::receive::ReceiveOptions;
    let timeout = match parse_timeout(args.timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if !(args.lost_wait.is_finite() && args.lost_wait >= 0.0) {
        eprintln!("vmm: error: --lost-wait must be a non-negative number of seconds");
        return EXIT_VMM_ERROR;
    }
    let seccomp = match seccomp_mode(args.seccomp) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut stats = match StatsOut::open(args.stats.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let listener = match args.listen.parse::<Endpoint>().and_then(|e| Listener::bind(&e)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    if let Ok(at) = listener.endpoint() {
        eprintln!("vmm: waiting for a migration on {at}");
    }
    let options = ReceiveOptions {
        vm: VmOptions {
            stdin: true,
            timeout,
            shutdown_signals: true,
            seccomp,
            ..Default::default()
        },
        lost_wait: Duration::from_secs_f64(args.lost_wait),
        progress: Default::default(),
    };
    let bar = if std::io::stderr().is_terminal() {
        progress_bar(options.progress.clone(), seccomp)
    } else {
        None
    };
    let mut server = None;
    let mut unsandboxed = None;
    let out = vmm::receive::receive(&listener, options, |h| {
        eprintln!("vmm: the migrated VM runs here");
        if let Some(path) = &args.control {
            match vmm::control::ControlServer::start(path, h.clone()) {
                Ok(s) => server = Some(s),
                Err(e) => eprintln!("vmm: warning: {e}"),
            }
        }
        if let Err(e) = sandbox_main(seccomp) {
            h.stop();
            unsandboxed = Some(e);
        }
    });
    drop(server);
    if let Some((stop, t)) = bar {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = t.join();
    }
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    if let Some(e) = unsandboxed {
        eprintln!("vmm: error: {e}");
        return EXIT_VMM_ERROR;
    }
    let st = &out.stats;
    println!(
        "vmm: migration: downtime {:.1} ms, total {:.1} ms, {} pre-copy pages ({} kept), {} post-copy pages: {} requested ({} answered), {} pushed, {} bytes; page-request latency p50 <{} us p99 <{} us; vCPUs blocked {} us; {} recoveries",
        st.downtime_ms, st.total_ms, st.precopy_pages, st.precopy_kept, st.data_pages, st.pages_requested, st.pages_answered, st.pages_pushed,
        st.bytes, st.latency_p50_us, st.latency_p99_us, st.vcpu_blocked_us, st.recoveries
    );
    let mut code = report(&out.config, &out.run, None);
    if let Some(lost) = &out.lost {
        eprintln!(
            "vmm: error: the migration source was lost before every page arrived: {lost}; the VM was paused \
             (no missing page was zero-filled); the source still holds the whole VM: resume it there with `vmm ctl SOCKET resume`, or, while this VM waits, \
             resume the migration (`vmm ctl DEST recover --from ADDR`, then `vmm ctl SRC migrate --to ADDR --resume`)"
        );
        code = vmm::EXIT_MEMORY_FAULT;
    }
    if let Some(stats) = &mut stats {
        let mut json = out.run.stats_json();
        json["migration"] = serde_json::to_value(st).unwrap_or_default();
        json["migration"]["lost"] = serde_json::json!(out.lost);
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        if let Err(e) = stats.write(&text) {
            eprintln!("vmm: error: {e}");
        }
    }
    code
}

/// Draws the incoming migration's progress on the terminal until `stop`
/// (a thread sandboxed like the main thread).
fn progress_bar(
    p: std::sync::Arc<vmm::migration::Progress>,
    seccomp: SeccompMode,
) -> Option<(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
)> {
    use std::sync::atomic::Ordering::Relaxed;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let spawned = sandbox::spawn(
        std::thread::Builder::new().name("progress".into()),
        ThreadClass::Main,
        seccomp,
        move || {
            let bar = indicatif::ProgressBar::new_spinner();
            let spinner = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            let pages = indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} pages ({percent}%), {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(spinner);
            bar.set_message("waiting for the source");
            let mut counting = false;
            while !s.load(Relaxed) {
                if p.complete.load(Relaxed) {
                    bar.finish_with_message(format!(
                        "migration complete: {} pre-copy and {} post-copy pages",
                        p.precopy_pages.load(Relaxed),
                        p.data_pages.load(Relaxed)
                    ));
                    return;
                }
                if p.running.load(Relaxed) && !counting {
                    counting = true;
                    bar.set_style(pages.clone());
                    bar.set_length(p.data_pages.load(Relaxed));
                }
                bar.set_position(p.received.load(Relaxed));
                let precopy = p.precopy_pages.load(Relaxed);
                bar.set_message(if p.lost.load(Relaxed) {
                    "source lost, VM paused: `vmm ctl DEST recover --from ADDR`".to_string()
                } else if counting {
                    "post-copy".to_string()
                } else if precopy > 0 {
                    format!("pre-copy: {precopy} pages received")
                } else {
                    "waiting for the source".to_string()
                });
                bar.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        },
    );
    match spawned {
        Ok(t) => Some((stop, t)),
        Err(e) => {
            eprintln!("vmm: warning: no progress bar: {e}");
            None
        }
    }
}

fn ctl(args: CtlArgs) -> i32 {
    use vmm::control::Request;
    use vmm::snapshot::AfterSnapshot;
    let req = match args.request {
        CtlRequest::Pause => Request::Pause {},
        CtlRequest::Resume => Request::Resume {},
        CtlRequest::Stats => Request::Stats {},
        CtlRequest::Migrate {
            to,
            push_delay_ms,
            precopy_rounds,
            resume,
        } => Request::Migrate {
            to,
            push_delay_ms,
            precopy_rounds,
            resume,
        },
        CtlRequest::Recover { from } => Request::Recover { from },
        CtlRequest::Snapshot {
            to,
            resume,
            stop,
            pause,
        } => Request::Snapshot {
            // Relative to the caller, not to the VMM's working directory.
            to: std::path::absolute(&to).unwrap_or(to),
            then: match (resume, stop, pause) {
                (true, _, _) => AfterSnapshot::Resume,
                (_, true, _) => AfterSnapshot::Stop,
                (_, _, true) => AfterSnapshot::Pause,
                _ => AfterSnapshot::Restore,
            },
        },
    };
    match vmm::control::request(&args.socket, &req) {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
            );
            0
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    }
}

/// Prints how the run went and checks the workload; returns the exit code.
fn report(config: &VmConfig, outcome: &vmm::RunOutcome, stats: Option<&mut StatsOut>) -> i32 {
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
            "vmm: memory {}: {} faults served ({} zero pages, {} copied, {} by fault-around), {} retries",
            m.backend, t.faults, t.pages_zeroed, t.pages_copied, t.fault_around_pages, t.retries_total
        );
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

fn print_result<T: serde::Serialize + std::fmt::Display>(r: &T, json: bool) -> i32 {
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

fn bench(cmd: BenchCommand) -> i32 {
    let args = match &cmd {
        BenchCommand::Boot(a)
        | BenchCommand::Fault(a)
        | BenchCommand::GuestFault(a)
        | BenchCommand::Restore(a)
        | BenchCommand::Migrate(a)
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
        BenchCommand::Restore(a) => {
            vmm::bench::restore(a.repeats, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::Migrate(a) => {
            vmm::bench::migrate(a.repeats, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::GuestFault(a) => {
            vmm::bench::guest_fault(a.repeats, &mut progress).map(|r| print_result(&r, a.json))
        }
        BenchCommand::Fault(a) => {
            vmm::bench::fault(fault_opts, &mut progress).map(|r| print_result(&r, a.json))
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

fn stress(a: StressArgs) -> i32 {
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
    if report.ok() {
        0
    } else {
        1
    }
}
