//! The connection holder between the VMM and an external page-fault handler,
//! and its launcher, for tests that run the VMM in-process (the `vmm` binary
//! has them as its hidden `__uffd-peer` and `__uffd-launcher` subcommands):
//! `uffd_peer __uffd-peer SOCKET`, `uffd_peer __uffd-launcher`.

use std::path::Path;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let code = match (args.get(1), args.get(2)) {
        (Some(sub), Some(socket)) if sub == vmm::uffd_handler::peer::SUBCOMMAND => {
            vmm::uffd_handler::peer::main(Path::new(socket))
        }
        (Some(sub), None) if sub == vmm::uffd_handler::launcher::SUBCOMMAND => {
            vmm::uffd_handler::launcher::main()
        }
        _ => {
            eprintln!(
                "usage: uffd_peer {} SOCKET | {}",
                vmm::uffd_handler::peer::SUBCOMMAND,
                vmm::uffd_handler::launcher::SUBCOMMAND
            );
            2
        }
    };
    std::process::exit(code);
}
