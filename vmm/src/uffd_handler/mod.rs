//! An external page-fault handler serves guest memory, with the handshake of
//! Firecracker's UFFD memory backend, so that Firecracker's own handlers
//! serve our restored VMs unmodified (`docs/external-handler.md`):
//!
//! - [`handshake`]: the message, exactly as Firecracker sends it;
//! - [`peer`]: the connection holder process, which connects, hands the
//!   userfaultfd over and holds the connection open for the VM's life (a
//!   panicking Firecracker handler SIGKILLs it, not the VMM);
//! - [`link`]: the VMM's side of one attachment: starting the holder, and a
//!   watcher that reports the handler's death once;
//! - [`launcher`]: the process that forks the holders of handlers attached
//!   while the VM runs (a sandboxed VMM starts no program).
//!
//! The memory manager registers guest RAM with the userfaultfd
//! (`vmm_core::memory::ExternalMemory`); from the handover on, the handler
//! alone resolves faults. What the VMM does when a handler dies (pause,
//! grace, re-attach) is the controller's (`controller::external`).

pub mod handshake;
pub mod launcher;
pub mod link;
pub mod peer;

pub use handshake::{mappings, message, parse_message, HandshakeError, Mapping, FIRECRACKER_VERSIONS};
pub use launcher::Launcher;
pub use link::{HandlerLink, LostHook};

use std::path::PathBuf;

/// Errors handing guest memory to an external handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdHandlerError {
    /// The handler's socket.
    #[error("cannot hand guest memory to the page-fault handler at {path}: {what}: {source}; start the handler first and check the socket path")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection holder reported a failure.
    #[error("cannot hand guest memory to the page-fault handler at {path}: {error}; start the handler first and check the socket path")]
    Handover {
        /// The socket.
        path: PathBuf,
        /// What the holder reported.
        error: String,
    },
    /// The connection holder cannot be started.
    #[error("cannot start the page-fault handler's connection holder `{} {}`: {source}; it is the vmm binary itself (a library user names it in RestoreOptions::peer_program)", program.display(), peer::SUBCOMMAND)]
    Holder {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake message.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// The program run as the connection holder by default: this executable
/// (the `vmm` binary, which has the hidden `__uffd-peer` subcommand).
pub fn default_peer_program() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}
