//! An external page-fault handler serves guest memory, with the handshake of
//! Firecracker's UFFD memory backend, so handlers written for Firecracker can
//! serve our restored VMs: the memory manager registers guest RAM with a
//! userfaultfd (MISSING mode); this module connects to the handler's Unix
//! stream socket and sends, in one message, a JSON array of mappings
//! `{base_host_virt_addr, size, offset, page_size}` with the userfaultfd as
//! SCM_RIGHTS. `offset` is the region's offset in the snapshot's memory file,
//! which is indexed by guest-physical address here. `page_size_kib` is sent
//! too, for handlers of older Firecracker versions. From then on the handler
//! alone resolves faults.

use serde::Serialize;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use vmm_core::memory::ExternalMemory;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

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
}

/// One guest memory region, as Firecracker's `GuestRegionUffdMapping`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mapping {
    /// Host virtual address of the region.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the region in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Page size in KiB (older Firecracker handlers).
    pub page_size_kib: u64,
}

/// The mappings of externally served memory (memory file indexed by
/// guest-physical address).
pub fn mappings(mem: &ExternalMemory) -> Vec<Mapping> {
    mem.mappings()
        .iter()
        .map(|m| Mapping {
            base_host_virt_addr: m.host_addr,
            size: m.size,
            offset: m.gpa,
            page_size: abi::layout::PAGE_SIZE,
            page_size_kib: abi::layout::PAGE_SIZE / 1024,
        })
        .collect()
}

/// Sends the mappings and the userfaultfd to the handler at `socket`.
pub fn hand_over(mem: &ExternalMemory, socket: &Path) -> Result<(), UffdHandlerError> {
    let sock_err = |what| {
        move |source| UffdHandlerError::Socket {
            path: socket.to_owned(),
            what,
            source,
        }
    };
    let body = serde_json::to_vec(&mappings(mem))
        .map_err(|e| sock_err("encoding the mappings")(std::io::Error::other(e)))?;
    let stream = UnixStream::connect(socket).map_err(sock_err("connect"))?;
    stream
        .send_with_fd(&body[..], mem.uffd().as_raw_fd())
        .map_err(|e| {
            sock_err("sending the mappings and the userfaultfd")(std::io::Error::from_raw_os_error(e.errno()))
        })?;
    Ok(())
}
