//! The connection holder between the VMM and an external page-fault handler,
//! for tests that run the VMM in-process (the `vmm` binary has it as its
//! hidden `__uffd-peer` subcommand): `uffd_peer __uffd-peer SOCKET`.

use std::path::Path;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let code = match (args.get(1), args.get(2)) {
        (Some(sub), Some(socket)) if sub == vmm::uffd_handler::peer::SUBCOMMAND => {
            vmm::uffd_handler::peer::main(Path::new(socket))
        }
        _ => {
            eprintln!("usage: uffd_peer {} SOCKET", vmm::uffd_handler::peer::SUBCOMMAND);
            2
        }
    };
    std::process::exit(code);
}
