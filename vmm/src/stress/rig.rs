//! The migration side of the storms: a destination VM received in this
//! process, the endpoints of a run, the resumption of a cut migration, and
//! a proxy that cuts a migration's connections mid-way.

use super::StressError;
use crate::controller::ControlError;
use crate::migration::{Endpoint, Listener, MigrationError};
use crate::receive::{ReceiveError, ReceiveOptions, ReceiveOutcome};
use crate::vm::VmOptions;
use crate::{RunningVm, VmHandle};
use devices::serial::SerialOutput;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The destination of a migration storm: a VM received in this process.
pub(super) struct Destination {
    thread: std::thread::JoinHandle<Result<ReceiveOutcome, ReceiveError>>,
    pub(super) console: Arc<Mutex<Vec<u8>>>,
    stop: crate::migration::ListenerStop,
}

pub(super) fn console_of(c: &Mutex<Vec<u8>>) -> String {
    c.lock()
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .unwrap_or_default()
}

/// What a migration storm needs: where the destination listens, where a
/// cutting proxy and a recovery listen, the destination VM's handle once it
/// runs, and the outcome.
pub(super) struct MigrationRig {
    pub(super) to: Endpoint,
    pub(super) front: Endpoint,
    pub(super) again: Endpoint,
    pub(super) handle: Mutex<Option<std::sync::mpsc::Receiver<VmHandle>>>,
    pub(super) result: Mutex<Option<Result<(), String>>>,
    pub(super) recovered: AtomicBool,
}

/// After a cut: asks the destination to wait for the source at `again`
/// (retrying until it has seen the loss) and resumes the migration there.
/// A destination that got every page before the cut (only the source's
/// `Complete` was lost) runs on: the source's VM is stopped then.
pub(super) fn resume_migration(
    dest: &VmHandle,
    src: &RunningVm,
    again: &Endpoint,
) -> Result<(), ControlError> {
    let start = Instant::now();
    let at = loop {
        match dest.recover(again) {
            Ok(at) => break at,
            Err(ControlError::Migration(MigrationError::NotInterrupted))
                if start.elapsed() >= Duration::from_secs(1) =>
            {
                src.stop();
                return Ok(());
            }
            // The destination may not have seen the loss yet.
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    let options = crate::migration::MigrateOptions {
        resume: true,
        ..Default::default()
    };
    src.migrate(&at, &options).map(|_| ())
}

/// Forwards the connections made to `front` (a migration's main
/// connection, then its answer channel) to `back`, and cuts all of them
/// once `limit` bytes went to `back` on the first: a network failure in the
/// middle of a migration, for tests and storms.
pub fn cutting_proxy(front: &Path, back: &Path, limit: usize) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = std::fs::remove_file(front);
    let l = UnixListener::bind(front)?;
    let back = back.to_owned();
    std::thread::spawn(move || {
        let open: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let cut = |open: &Mutex<Vec<UnixStream>>| {
            for s in open
                .lock()
                .map(|v| v.iter().filter_map(|s| s.try_clone().ok()).collect())
                .unwrap_or_else(|_| Vec::new())
            {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        };
        let mut threads = Vec::new();
        for first in [true, false] {
            let Ok((a, _)) = l.accept() else { break };
            let Ok(b) = UnixStream::connect(&back) else { break };
            let clones = (a.try_clone(), b.try_clone(), a.try_clone(), b.try_clone());
            let (Ok(a2), Ok(b2), Ok(a3), Ok(b3)) = clones else {
                break;
            };
            if let Ok(mut v) = open.lock() {
                v.extend([a3, b3]);
            }
            let (mut from_back, mut to_front) = (b2, a2);
            threads.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_back, &mut to_front);
            }));
            let (mut a, mut b, open) = (a, b, open.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut sent = 0;
                while !first || sent < limit {
                    match a.read(&mut buf) {
                        Ok(n) if n > 0 && b.write_all(&buf[..n]).is_ok() => sent += n,
                        _ => break,
                    }
                }
                if first {
                    cut(&open);
                }
            }));
        }
        for t in threads {
            let _ = t.join();
        }
    });
    Ok(())
}

impl Destination {
    /// Listens on `at` and receives at most one VM on a thread; the VM's
    /// handle comes on the channel once it runs.
    /// Its guest RAM takes the backing, fault mode and handler pool of
    /// `memory` (the source's).
    pub(super) fn listen(
        at: &Endpoint,
        memory: &crate::config::MemoryConfig,
    ) -> Result<(Destination, std::sync::mpsc::Receiver<VmHandle>), StressError> {
        let (handlers, backing, fault_mode) = (memory.handlers.clone(), memory.backing, memory.fault_mode);
        let listener = Listener::bind(at)?;
        let stop = listener.stopper();
        let (tx, rx) = std::sync::mpsc::channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let serial = SerialOutput::Capture(console.clone());
        let thread = std::thread::spawn(move || {
            let opts = ReceiveOptions {
                handlers,
                wait: None,
                vm: VmOptions {
                    serial,
                    timeout: Some(Duration::from_secs(120)),
                    backing,
                    fault_mode,
                    ..VmOptions::default()
                },
                // Time for the storm to resume a cut migration.
                lost_wait: Duration::from_secs(10),
                progress: Default::default(),
            };
            crate::receive::receive(&listener, opts, |h| {
                let _ = tx.send(h.clone());
            })
        });
        Ok((
            Destination {
                thread,
                console,
                stop,
            },
            rx,
        ))
    }

    /// The destination's outcome if the VM moved; otherwise ends the
    /// listener's wait and returns `None`.
    pub(super) fn finish(self, at: &Endpoint, moved: bool) -> Option<Result<ReceiveOutcome, String>> {
        if !moved {
            self.stop.stop();
        }
        let r = self
            .thread
            .join()
            .map_err(|_| "the destination thread panicked".to_string());
        if let Endpoint::Unix(path) = at {
            let _ = std::fs::remove_file(path);
        }
        match r {
            // A panic is an error whether or not the VM moved.
            Err(panic) => Some(Err(panic)),
            Ok(o) => moved.then(|| o.map_err(|e| e.to_string())),
        }
    }
}
