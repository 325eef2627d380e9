//! The command line's flags (clap derive): one struct per subcommand.

use clap::{Parser, Subcommand};
use sandbox::SeccompMode;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "vmm", version, about = "A minimal KVM VMM for lazily backed microVMs")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Boot a microVM (the bundled guest kernel unless --kernel is given).
    Run(RunArgs),
    /// Send a request to the control socket of a `vmm run --control PATH`.
    Ctl(CtlArgs),
    /// Restore a microVM from a snapshot directory; the guest continues where it was.
    Restore(RestoreArgs),
    /// Receive a VM by live migration (`vmm ctl SRC migrate --to ...`)
    /// and run it until its guest exits.
    Receive(ReceiveArgs),
    /// Create the TLS material of one migration end: a private key and a
    /// self-signed certificate (--out DIR), or a pre-shared key (--psk FILE).
    Keygen(KeygenArgs),
    /// Benchmarks, each with its baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Seeded fault stress: VMs over lazily backed memory under kick, pause and
    /// hold storms, every page verified; non-zero exit on any error or stall.
    Stress(StressArgs),
    /// The connection holder between the VMM and an external page-fault
    /// handler (started by `vmm restore --mem-backend uffd:SOCKET`; not for
    /// direct use).
    #[command(name = "__uffd-peer", hide = true)]
    UffdPeer {
        /// The handler's socket.
        socket: PathBuf,
    },
    /// Forks connection holders for a sandboxed VMM, which starts no
    /// program once it runs (started by `vmm restore --mem-backend
    /// uffd:SOCKET`; not for direct use).
    #[command(name = "__uffd-launcher", hide = true)]
    UffdLauncher,
}

#[derive(clap::Args, Debug)]
pub(crate) struct StressArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) seconds: f64,
    /// Seed: the same seed gives the same runs and event schedule.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// vCPUs per VM (1 to 8).
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Guest memory per VM.
    #[arg(long, default_value = "512M")]
    pub(crate) mem: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Options shared by the benchmarks.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Pages each guest run touches.
    #[arg(long, default_value_t = 20000)]
    pub(crate) pages: u64,
    /// Runs of each case (median and spread are reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) repeats: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// Boot time to the guest's first line and whole runs by vCPU count, next
    /// to the cost of the KVM objects alone.
    Boot(BenchArgs),
    /// Stage-2 fault cost through the retry core vs the raw userfaultfd round
    /// trip, and fault-around on sequential restore from a file; with
    /// `--vcpus`, fault throughput by vCPU count instead.
    Fault {
        #[command(flatten)]
        args: BenchArgs,
        /// Measure throughput with these vCPU counts (e.g. `1,2,4`), next to
        /// its ceiling (two 1-vCPU VMs at once), instead of the fault cost.
        #[arg(long, value_name = "LIST")]
        vcpus: Option<String>,
        /// With --vcpus: handler layouts to compare for each count above 1:
        /// `default`, or THREADS:PINNING[:SPIN_US] (e.g. `1:none,2:cpu,2:vcpu:20`).
        #[arg(long, value_name = "LIST", default_value = "default", requires = "vcpus")]
        layouts: String,
    },
    /// The guest kernel's demand-zero fault against its empty system-call
    /// round trip, measured in the same guest run.
    GuestFault(BenchArgs),
    /// Snapshot restore to running vCPUs for 64 MiB, 1 GiB and 4 GiB guests,
    /// lazily (memory through the retry core) and eagerly.
    Restore {
        #[command(flatten)]
        args: BenchArgs,
        /// Guest sizes in MiB, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vmm::bench::RESTORE_MEM_MIB)]
        mem_mib: Vec<u64>,
        /// What the restored RAM lives in, comma separated (`anon`, `memfd`,
        /// `hugetlb:2M`, `hugetlb:1G`), interleaved; huge pages must be
        /// reserved first.
        #[arg(long, value_delimiter = ',', default_value = "anon", value_name = "BACKINGS")]
        mem_backing: Vec<String>,
    },
    /// Memory of N = 1, 2, 4, 8 clones of one 1 GiB snapshot (restore
    /// --lazy --clone; the guest rewrites 16 MiB, reads back 256 MiB)
    /// against the ideal measured in the same run, and /proc/meminfo deltas.
    Clones(BenchArgs),
    /// Live against stop-the-world snapshots of 64 MiB, 1 GiB and 4 GiB
    /// guests that wrote 24 MiB and keep writing: downtime (pause, capture,
    /// protect) and total time; then dirty tracking, one pre-copy round
    /// over 1 GiB, KVM log against uffd-WP, interleaved.
    Snapshot {
        #[command(flatten)]
        args: BenchArgs,
        /// Guest sizes in MiB, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vmm::bench::snapshot::SNAPSHOT_MEM_MIB)]
        mem_mib: Vec<u64>,
        /// Only the dirty-tracking rounds (no guests).
        #[arg(long)]
        dirty_only: bool,
    },
    /// A FaaS-like cold start (1 GiB guest, 64k state pages, one invocation
    /// touching W = 5/25/50% of them, rand and zipf): eager, lazy on demand
    /// (fault-around 16 and 0), working-set prefetch before and while
    /// running, and the warm baseline, interleaved.
    WorkingSet(BenchArgs),
    /// Live migration of running 1 GiB and 4 GiB guests over loopback,
    /// post-copy only and after 3 pre-copy rounds: downtime by part, total
    /// time; and post-copy of a guest rewriting its pages: exact page-request
    /// latency p50/p99 while the push runs.
    Migrate {
        #[command(flatten)]
        args: BenchArgs,
        /// Over loopback TCP with TLS and pinned certificates instead of a
        /// Unix socket (the cost of TLS).
        #[arg(long, conflicts_with = "push_orders")]
        tls: bool,
        /// Guest sizes in MiB, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vmm::bench::migrate::MIGRATE_MEM_MIB)]
        mem_mib: Vec<u64>,
        /// Folder for the charts (SVG and PNG): downtime parts by size,
        /// request latency.
        #[arg(long, conflicts_with = "push_orders")]
        plot: Option<PathBuf>,
        /// Do not migrate: chart (and print) the runs of an earlier
        /// `vmm bench migrate --json` saved in this file.
        #[arg(long, value_name = "JSON", requires = "plot")]
        from: Option<PathBuf>,
        /// Compare the push orders instead (a guest touching a hot set; the
        /// push in address and in recency order, interleaved): faults after
        /// the switchover and vCPU time blocked.
        #[arg(long, conflicts_with = "mem_mib")]
        push_orders: bool,
        /// The destination's RAM, comma separated (`anon`, `memfd`,
        /// `hugetlb:2M`, `hugetlb:1G`), interleaved run by run; huge pages
        /// must be reserved first.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "anon",
            value_name = "BACKINGS",
            conflicts_with = "push_orders"
        )]
        mem_backing: Vec<String>,
    },
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

/// What memory guest RAM lives in and how its lazily served pages are resolved.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct BackingArgs {
    /// What memory guest RAM lives in: `anon` (private anonymous memory,
    /// default), `memfd` (a shared mapping of a memfd: shmem page cache) or
    /// `hugetlb[:2M|1G]` (huge pages; reserve them first). Orthogonal to
    /// --mem-backend (where the contents come from); see docs/memory-backings.md.
    #[arg(long, value_name = "BACKING")]
    pub(crate) mem_backing: Option<String>,
    /// How lazily served pages are resolved: `missing` (copied into guest
    /// RAM with UFFDIO_COPY, default) or `minor` (written into the memfd's
    /// page cache, mapped with UFFDIO_CONTINUE; needs --mem-backing memfd).
    #[arg(long, value_name = "MODE")]
    pub(crate) fault_mode: Option<String>,
}

impl BackingArgs {
    /// The typed values (defaults where not given), checked together.
    pub(crate) fn parse(&self) -> Result<(vmm_core::MemBacking, vmm_core::FaultMode), vmm_core::ConfigError> {
        let backing = self
            .mem_backing
            .as_deref()
            .map_or(Ok(vmm_core::MemBacking::Anon), str::parse)?;
        let mode = self
            .fault_mode
            .as_deref()
            .map_or(Ok(vmm_core::FaultMode::Missing), str::parse)?;
        let memory = vmm_core::MemoryConfig {
            backing,
            fault_mode: mode,
            ..vmm_core::MemoryConfig::default()
        };
        memory.validate()?;
        Ok((backing, mode))
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Guest kernel ELF (x86_64, loaded at its physical addresses).
    #[arg(long)]
    pub(crate) kernel: Option<PathBuf>,
    /// Number of vCPUs (1 to 8).
    #[arg(long)]
    pub(crate) vcpus: Option<u32>,
    /// Guest memory size, e.g. 256M or 4G.
    #[arg(long)]
    pub(crate) mem: Option<String>,
    /// Guest kernel command line, e.g. "workload=touch pages=1000 pattern=rand".
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// What backs guest RAM: `anon` (plain memory, default), `zero` (demand-zero
    /// pages served through userfaultfd) or `file:PATH[,offset=N]` (pages read
    /// on first touch from a memory file indexed by guest-physical address).
    #[arg(long, value_name = "BACKEND")]
    pub(crate) mem_backend: Option<String>,
    /// Fault-around window in pages for a lazy backend: 0 (off) or a power of
    /// two up to 512. Default: 16 (one fill of 16 pages costs about one page).
    #[arg(long, value_name = "PAGES")]
    pub(crate) fault_around: Option<u32>,
    /// The fault-handler threads and their placement.
    #[command(flatten)]
    pub(crate) handlers: HandlerArgs,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    /// Write run statistics (vCPUs, retry core, fault latency) as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats: Option<PathBuf>,
    /// TOML file with any of: kernel, vcpus, mem, cmdline, mem_backend, fault_around,
    /// fault_handlers, handler_pinning, handler_spin_us, cpus, mem_backing, fault_mode,
    /// seccomp (flags override it).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Give up after this many seconds (exit code 11).
    #[arg(long)]
    pub(crate) timeout: Option<f64>,
    /// Serve a Unix control socket at PATH (`vmm ctl PATH ...`; JSON lines, see docs/snapshot.md).
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    /// Snapshot key (32 raw bytes or 64 hex digits): snapshots are
    /// authenticated with it (keyed BLAKE3) and restores check it.
    #[arg(long, value_name = "FILE")]
    pub(crate) snapshot_key: Option<PathBuf>,
    /// With a lazy --mem-backend (zero, file:PATH): record the pages the
    /// guest touches into FILE (docs/working-set.md), until `vmm ctl PATH
    /// working-set-end` or the end of the run.
    #[arg(long, value_name = "FILE")]
    pub(crate) record_working_set: Option<PathBuf>,
    /// When the guest reaches its checkpoint (`workload=faas`): snapshot
    /// to DIR and end the run (exit code 14).
    #[arg(long, value_name = "DIR")]
    pub(crate) snapshot_at_checkpoint: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    pub(crate) seccomp: Option<SeccompMode>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct CtlArgs {
    /// The control socket of the running VMM.
    pub(crate) socket: PathBuf,
    /// Give up waiting for the answer after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub(crate) timeout: f64,
    #[command(subcommand)]
    pub(crate) request: CtlRequest,
}

#[derive(Subcommand, Debug)]
pub(crate) enum CtlRequest {
    /// Pause every vCPU.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Print live statistics (JSON).
    Stats,
    /// Print where the migration stands (JSON; live during a migration, and
    /// after it): status, pages and bytes per phase, downtime parts,
    /// requests, blocktime (docs/migration.md, "Statistics").
    Migration,
    /// End the working-set recording window (--record-working-set) and
    /// write the file now; the VM runs on.
    WorkingSetEnd,
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
        /// Live: pause only to capture the state and write-protect guest
        /// memory, then save memory while the guest runs.
        #[arg(long)]
        live: bool,
        /// Live: write-protect only the pages present at the pause
        /// (`present`, default) or all of RAM (`unpopulated`).
        #[arg(long, value_name = "MODE", requires = "live", value_parser = ["present", "unpopulated"])]
        wp_mode: Option<String>,
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
        /// Dirty tracking of the pre-copy rounds: `kvm` (KVM's dirty log)
        /// or `uffd-wp` (async userfaultfd write protection + PAGEMAP_SCAN;
        /// plain anonymous memory only).
        #[arg(long, value_name = "HOW", value_parser = ["kvm", "uffd-wp"])]
        dirty_tracking: Option<String>,
        /// Resume an interrupted post-copy: the destination waits for it
        /// (`vmm ctl DEST recover --from ADDR`), ADDR is the same.
        #[arg(long)]
        resume: bool,
        /// Order of the background push after the switchover: `address`,
        /// or `recency` (the pages written in the latest pre-copy rounds
        /// first; without pre-copy, those of a 100 ms dirty-log sample).
        #[arg(long, value_name = "ORDER", default_value = "address")]
        push_order: vmm::migration::PushOrder,
        /// TLS (paths are read by the VMM, made absolute here).
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// On the destination of a post-copy whose source or connection was
    /// lost (the VM is paused there): listen at ADDR for the source, which
    /// resumes the migration with `vmm ctl SRC migrate --to ADDR --resume`.
    Recover {
        /// unix:PATH or tcp:ADDR:PORT.
        #[arg(long, value_name = "ADDR")]
        from: String,
        /// TLS for the source's new connections (default: the options
        /// `vmm receive` was started with).
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// For a VM restored with --mem-backend uffd:SOCKET whose page-fault
    /// handler is gone (the VM is paused): connect to the new handler
    /// listening at PATH, hand it the same userfaultfd and mappings, and
    /// resume; every waiting fault reaches it.
    AttachHandler {
        /// The new handler's Unix socket.
        path: PathBuf,
    },
}

/// How a migration's connections are authenticated and encrypted
/// (docs/migration.md, "Authentication and encryption").
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct TlsArgs {
    /// TLS: this side's certificate (PEM; `vmm keygen --out DIR` writes DIR/cert.pem).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_peer"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// TLS: this side's private key (PEM, mode 0600; DIR/key.pem).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_peer"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// TLS: the peer's certificate (its cert.pem); only a peer that presents
    /// exactly this certificate, and holds its key, is accepted.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_peer: Option<PathBuf>,
    /// TLS: a pre-shared key file, the same on both ends (`vmm keygen --psk
    /// FILE`, mode 0600), proved inside TLS; alone or with the certificates.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_psk: Option<PathBuf>,
    /// Allow a migration over plain TCP: NOT authenticated nor encrypted
    /// (anyone who reaches the port can feed or read the VM). For a trusted
    /// network only; Unix sockets are plain and need no flag.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_peer", "tls_psk"])]
    pub(crate) insecure_plain_tcp: bool,
}

impl TlsArgs {
    /// The files, made absolute when `absolute` (for a request that
    /// another process reads).
    pub(crate) fn files(&self, absolute: bool) -> vmm::migration::TlsFiles {
        let fix = |p: &Option<PathBuf>| {
            p.clone().map(|p| {
                if absolute {
                    std::path::absolute(&p).unwrap_or(p)
                } else {
                    p
                }
            })
        };
        vmm::migration::TlsFiles {
            cert: fix(&self.tls_cert),
            key: fix(&self.tls_key),
            peer: fix(&self.tls_peer),
            psk: fix(&self.tls_psk),
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Write DIR/key.pem (mode 0600, stays on this machine) and DIR/cert.pem
    /// (give it to the other end, which passes it as --tls-peer).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "psk",
        conflicts_with = "psk"
    )]
    pub(crate) out: Option<PathBuf>,
    /// Write a random pre-shared key to FILE (mode 0600); copy it to the
    /// other end over a channel you trust; both pass it as --tls-psk.
    #[arg(long, value_name = "FILE")]
    pub(crate) psk: Option<PathBuf>,
    /// Replace files that exist.
    #[arg(long)]
    pub(crate) force: bool,
}

/// `--fault-handlers`, `--handler-pinning`, `--handler-spin-us`, `--cpus`
/// (`vmm run`, `restore --lazy`, `receive`).
#[derive(clap::Args, Debug, Default)]
pub(crate) struct HandlerArgs {
    /// Fault-handler threads for a lazy backend (1 to 16). Default: one per
    /// CPU used (one with a single vCPU).
    #[arg(long, value_name = "N")]
    pub(crate) fault_handlers: Option<u32>,
    /// Where handler and vCPU threads run: `auto` (default: `vcpu`), `none`
    /// (the scheduler places them), `cpu` (handler i pinned to CPU i, vCPUs
    /// free), `vcpu` (handler i and vCPU i pinned to CPU i, round robin).
    #[arg(long, value_name = "MODE")]
    pub(crate) handler_pinning: Option<String>,
    /// Microseconds a handler thread keeps reading the userfaultfd after a
    /// fault before it sleeps (0, default: sleep at once).
    #[arg(long, value_name = "US")]
    pub(crate) handler_spin_us: Option<u32>,
    /// CPUs to pin handler and vCPU threads to, e.g. `0,1` (default: every
    /// CPU this process may use).
    #[arg(long, value_name = "LIST")]
    pub(crate) cpus: Option<String>,
}

impl HandlerArgs {
    /// The checked configuration (the defaults for flags not given).
    pub(crate) fn config(&self) -> Result<vmm::config::HandlerConfig, vmm::config::ConfigError> {
        self.as_file().handlers()
    }

    /// The flags as a configuration file's fields.
    pub(crate) fn as_file(&self) -> vmm::config_file::ConfigFile {
        vmm::config_file::ConfigFile {
            fault_handlers: self.fault_handlers,
            handler_pinning: self.handler_pinning.clone(),
            handler_spin_us: self.handler_spin_us,
            cpus: self.cpus.clone(),
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct ReceiveArgs {
    /// Where to listen: unix:PATH or tcp:ADDR:PORT.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: String,
    /// Write run and migration statistics as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats: Option<PathBuf>,
    /// Give up after this many seconds, the wait for the source included
    /// (exit code 11).
    #[arg(long)]
    pub(crate) timeout: Option<f64>,
    /// How the source must authenticate (TCP needs TLS or --insecure-plain-tcp).
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// The fault-handler threads serving the received memory, and their placement.
    #[command(flatten)]
    pub(crate) handlers: HandlerArgs,
    /// If the source is lost mid-migration: seconds the paused VM waits for
    /// `vmm ctl DEST recover` (and, after one, for the source to come back)
    /// before the run ends with exit code 13.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) lost_wait: f64,
    /// Serve a Unix control socket at PATH once the VM runs.
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    /// Snapshot key (32 raw bytes or 64 hex digits): snapshots are
    /// authenticated with it (keyed BLAKE3) and restores check it.
    #[arg(long, value_name = "FILE")]
    pub(crate) snapshot_key: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    pub(crate) seccomp: Option<SeccompMode>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct RestoreArgs {
    /// The snapshot directory (written by `vmm ctl PATH snapshot --to DIR`).
    #[arg(long, value_name = "DIR")]
    pub(crate) from: PathBuf,
    /// Serve guest memory lazily from the snapshot through the retry core
    /// (start at once; pages are read on first touch, with fault-around).
    #[arg(long)]
    pub(crate) lazy: bool,
    /// With --lazy: `all` (the default when no value is given) fetches the
    /// remaining pages in a background thread; `working-set` first fills
    /// the pages of DIR/working-set (in coalesced reads and UFFDIO_COPY
    /// runs), then serves the rest on demand; `working-set,all` adds the
    /// background fill after it.
    #[arg(long, requires = "lazy", num_args = 0..=1, default_missing_value = "all", value_name = "WHAT")]
    pub(crate) prefetch: Option<String>,
    /// With --prefetch working-set: fill the working set while the vCPUs
    /// run (in first-touch order) instead of before they resume.
    #[arg(long, requires = "prefetch")]
    pub(crate) prefetch_while_running: bool,
    /// With --lazy: record the pages the guest touches into
    /// DIR/working-set (docs/working-set.md), until `vmm ctl PATH
    /// working-set-end` or the end of the run.
    #[arg(long, requires = "lazy")]
    pub(crate) record_working_set: bool,
    /// With --lazy: fault-around window in pages (0 = off, power of two up to 512).
    #[arg(long, value_name = "PAGES", requires = "lazy")]
    pub(crate) fault_around: Option<u32>,
    /// With --lazy: the fault-handler threads and their placement.
    #[command(flatten)]
    pub(crate) handlers: HandlerArgs,
    /// With --lazy: start a clone. The snapshot's memory is loaded once into
    /// a shared file on tmpfs (by the first clone; freed by the last) and
    /// every clone maps it privately: reads share its pages (MINOR faults),
    /// writes copy them. `--stats` shows shared and private pages.
    #[arg(long, requires = "lazy", conflicts_with_all = ["prefetch", "mem_backing", "fault_mode"])]
    pub(crate) clone: bool,
    /// With --clone: the owner-only directory of the shared files (default
    /// /dev/shm/vmm-clones-UID).
    #[arg(long, value_name = "DIR", requires = "clone")]
    pub(crate) clone_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) backing: BackingArgs,
    /// `uffd:SOCKET`: hand guest memory to an external page-fault handler
    /// (Firecracker's UFFD handshake: JSON mappings + the userfaultfd over
    /// SOCKET, the connection held open for the VM's life); region offsets
    /// are those of DIR/memory.bin (packed regions, as Firecracker's).
    #[arg(long, value_name = "uffd:SOCKET", conflicts_with = "lazy")]
    pub(crate) mem_backend: Option<String>,
    /// With --mem-backend uffd:SOCKET: if the handler dies, seconds the
    /// paused VM waits for a new one (`vmm ctl CTL attach-handler PATH`, or
    /// a new socket at SOCKET) before the run ends with exit code 13.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, requires = "mem_backend")]
    pub(crate) handler_grace: f64,
    /// With --mem-backend uffd:SOCKET: seconds faults may wait unread, with
    /// nothing changing, before a handler that lives but no longer reads the
    /// userfaultfd is taken as gone (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, requires = "mem_backend")]
    pub(crate) handler_stall: f64,
    /// Write run statistics as JSON to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats: Option<PathBuf>,
    /// Give up after this many seconds (exit code 11).
    #[arg(long)]
    pub(crate) timeout: Option<f64>,
    /// Serve a Unix control socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    /// Snapshot key (32 raw bytes or 64 hex digits): snapshots are
    /// authenticated with it (keyed BLAKE3) and restores check it.
    #[arg(long, value_name = "FILE")]
    pub(crate) snapshot_key: Option<PathBuf>,
    /// Sandbox the VMM's threads with seccomp filters: `kill` (a forbidden
    /// system call stops the VMM, exit code 159, naming the thread and the
    /// call), `log` (allowed, and logged by the kernel: `dmesg | grep
    /// type=1326`) or `off`. Default: $VMM_SECCOMP, else kill.
    #[arg(long, value_name = "MODE")]
    pub(crate) seccomp: Option<SeccompMode>,
}
