//! The subcommands of the `vmm` binary, one file each, over the `vmm`
//! library: [`args`] (the flags), [`run`] (`run`, `restore`), [`receive`],
//! [`ctl`], [`bench`] (`bench`, `stress`), [`report`] (how a run is
//! reported).

pub mod args;
pub mod bench;
pub mod ctl;
pub mod keygen;
pub mod receive;
pub mod report;
pub mod run;

use sandbox::{SeccompMode, ThreadClass};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::EXIT_VMM_ERROR;

/// Longest duration a flag accepts (about 31 years): beyond, a deadline
/// could not be represented.
const MAX_SECONDS: f64 = 1e9;

/// A number of seconds from a flag: finite, positive (or zero when
/// `zero_ok`), at most [`MAX_SECONDS`].
pub fn seconds(flag: &str, s: f64, zero_ok: bool) -> Result<Duration, String> {
    let ok = s.is_finite() && (s > 0.0 || (zero_ok && s == 0.0)) && s <= MAX_SECONDS;
    if !ok {
        let least = if zero_ok { "0" } else { "a positive number" };
        return Err(format!(
            "{flag} must be {least} to {MAX_SECONDS:e} seconds, not {s}"
        ));
    }
    let d = Duration::try_from_secs_f64(s).map_err(|e| format!("{flag} {s}: {e}"))?;
    // A positive number below a nanosecond would be a zero duration, which
    // means "no wait" to some callers and is refused by socket timeouts.
    if d.is_zero() && s > 0.0 {
        return Err(format!(
            "{flag} {s} is less than a nanosecond; give at least 1e-9 seconds"
        ));
    }
    Ok(d)
}

/// `--snapshot-key FILE`: prints the error and gives the exit code.
pub fn snapshot_key(path: Option<&std::path::Path>) -> Result<Option<vmm::snapshot::SnapshotKey>, i32> {
    path.map(vmm::snapshot::SnapshotKey::load)
        .transpose()
        .map_err(|e| {
            eprintln!("vmm: error: {e}");
            EXIT_VMM_ERROR
        })
}

/// The sandbox mode: the one asked for (flag or config file), else
/// `VMM_SECCOMP`'s, else kill; prints the error and gives the exit code.
pub fn seccomp_mode(asked: Option<SeccompMode>) -> Result<SeccompMode, i32> {
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

/// The sandbox mode of the signal watcher, started before the subcommand
/// runs: the subcommand's (`--seccomp`, `run`'s configuration file), else
/// `VMM_SECCOMP`'s, else kill (an invalid value is reported by the
/// subcommand, and never weakens the sandbox).
pub fn watcher_seccomp(command: &args::Command) -> SeccompMode {
    let asked = match command {
        args::Command::Run(a) => a.seccomp.or_else(|| {
            a.config
                .as_deref()
                .and_then(|p| vmm::config_file::ConfigFile::load(p).ok())
                .and_then(|f| f.seccomp())
        }),
        args::Command::Restore(a) => a.seccomp,
        args::Command::Receive(a) => a.seccomp,
        _ => None,
    };
    asked.unwrap_or_else(SeccompMode::process_default)
}

/// Sandboxes the main thread once the VM runs (it only waits and reports
/// from here on).
pub fn sandbox_main(mode: SeccompMode) -> Result<(), sandbox::SandboxError> {
    sandbox::apply(ThreadClass::Main, mode)
}

/// Where `--stats` goes. A file is opened before the run: once the VM runs,
/// the main thread's sandbox opens no file.
pub enum StatsOut {
    /// `-`.
    Stdout,
    /// A file, created before the run.
    File(PathBuf, std::fs::File),
}

impl StatsOut {
    /// Opens `--stats` (prints the error and gives the exit code).
    pub fn open(path: Option<&Path>) -> Result<Option<StatsOut>, i32> {
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

    /// Writes `text` and a newline.
    pub fn write(&mut self, text: &str) -> Result<(), String> {
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

/// `--timeout`: positive seconds; prints the error and gives the exit code.
pub fn parse_timeout(t: Option<f64>) -> Result<Option<Duration>, i32> {
    match t {
        None => Ok(None),
        Some(s) => seconds("--timeout", s, false).map(Some).map_err(|e| {
            eprintln!("vmm: error: {e}");
            EXIT_VMM_ERROR
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_and_odd_durations_are_errors_not_panics() {
        for bad in [1e30, 1e19, f64::INFINITY, f64::NAN, -1.0, 0.0, 1e-300, 5e-324] {
            assert!(seconds("--timeout", bad, false).is_err(), "{bad}");
        }
        assert!(seconds("--lost-wait", 0.0, true).is_ok());
        assert!(seconds("--lost-wait", 1e-300, true).is_err());
        assert_eq!(seconds("--timeout", 1e-9, false), Ok(Duration::from_nanos(1)));
        assert_eq!(seconds("--timeout", 2.5, false), Ok(Duration::from_millis(2500)));
    }
}
