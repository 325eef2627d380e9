//! `vmm`: the command line. Thin: it turns flags into a [`VmConfig`], runs the VM
//! and prints what happened. The subcommands live in [`cli`].

mod cli;

use clap::Parser;
use cli::args::{Cli, Command};
use std::process::ExitCode as ProcessExit;

fn main() -> ProcessExit {
    // Before any thread starts, so that every thread inherits the mask and the
    // signal watcher alone receives these signals (`vmm::signals`).
    if let Err(e) = vmm::signals::block_shutdown_signals() {
        eprintln!("vmm: error: cannot set up SIGINT/SIGTERM/SIGHUP for a clean shutdown: {e}");
        return ProcessExit::from(64);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version are no errors; a bad command line is the VMM's
        // configuration error (64), not clap's 2.
        Err(e) => {
            let _ = e.print();
            return ProcessExit::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    // The connection holder and its launcher are processes of their own,
    // single-threaded (the launcher forks), sandboxed by themselves.
    match &cli.command {
        Command::UffdPeer { socket } => return exit(vmm::uffd_handler::peer::main(socket)),
        Command::UffdLauncher => return exit(vmm::uffd_handler::launcher::main()),
        _ => {}
    }
    // Sandboxed like the subcommand's own threads (signals that came
    // meanwhile are pending, read once it runs).
    if let Err(e) = vmm::signals::start_watcher(cli::watcher_seccomp(&cli.command)) {
        eprintln!("vmm: error: cannot set up SIGINT/SIGTERM/SIGHUP for a clean shutdown: {e}");
        return ProcessExit::from(64);
    }
    let code = match cli.command {
        Command::UffdPeer { .. } | Command::UffdLauncher => 0,
        Command::Run(args) => cli::run::run(args),
        Command::Ctl(args) => cli::ctl::ctl(args),
        Command::Restore(args) => cli::run::restore(args),
        Command::Receive(args) => cli::receive::receive(args),
        Command::Keygen(args) => cli::keygen::keygen(&args),
        Command::Bench(b) => cli::bench::bench(b),
        Command::Stress(a) => cli::bench::stress(a),
    };
    exit(code)
}

fn exit(code: i32) -> ProcessExit {
    ProcessExit::from(u8::try_from(code).unwrap_or(1))
}
