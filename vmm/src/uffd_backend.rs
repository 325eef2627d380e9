//! An external page-fault handler serves guest memory, with the handshake of
//! Firecracker's UFFD memory backend, so handlers written for Firecracker can
//! serve our restored VMs: the VMM registers guest RAM with a userfaultfd
//! (MISSING mode), connects to the handler's Unix stream socket and sends, in
//! one message, a JSON array of mappings `{base_host_virt_addr, size, offset,
//! page_size}` with the userfaultfd as SCM_RIGHTS. `offset` is the region's
//! offset in the snapshot's memory file, which is indexed by guest-physical
//! address here. `page_size_kib` is sent too, for handlers of older
//! Firecracker versions. From then on the handler alone resolves faults.

use ::memory::{RegisterMode, Uffd};
use devices::GuestRam;
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Errors handing guest memory to an external handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdBackendError {
    /// userfaultfd is unavailable or refused a region.
    #[error("cannot set up userfaultfd for the external page-fault handler: {0}; run as root or set vm.unprivileged_userfaultfd=1")]
    Uffd(#[from] ::memory::UffdError),
    /// The handler's socket.
    #[error("cannot hand guest memory to the page-fault handler at {path}: {what}: {source}; start the handler first and check the socket path")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
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

/// The mappings of `mem` (memory file indexed by guest-physical address).
pub fn mappings(mem: &GuestRam) -> Vec<Mapping> {
    mem.iter()
        .map(|r| Mapping {
            base_host_virt_addr: r.as_ptr() as u64,
            size: r.len(),
            offset: r.start_addr().raw_value(),
            page_size: abi::layout::PAGE_SIZE,
            page_size_kib: abi::layout::PAGE_SIZE / 1024,
        })
        .collect()
}

/// Registers guest RAM and sends it to the handler at `socket`. The returned
/// userfaultfd must live as long as the guest memory.
pub fn hand_over(mem: &GuestRam, socket: &Path) -> Result<Uffd, UffdBackendError> {
    let sock_err = |what| {
        move |source| UffdBackendError::Socket {
            path: socket.to_owned(),
            what,
            source,
        }
    };
    let uffd = Uffd::for_guest_memory()?;
    let maps = mappings(mem);
    for m in &maps {
        uffd.register(m.base_host_virt_addr, m.size, RegisterMode::MISSING)?;
    }
    let body =
        serde_json::to_vec(&maps).map_err(|e| sock_err("encoding the mappings")(std::io::Error::other(e)))?;
    let stream = UnixStream::connect(socket).map_err(sock_err("connect"))?;
    stream.send_with_fd(&body[..], uffd.as_raw_fd()).map_err(|e| {
        sock_err("sending the mappings and the userfaultfd")(std::io::Error::from_raw_os_error(e.errno()))
    })?;
    Ok(uffd)
}
