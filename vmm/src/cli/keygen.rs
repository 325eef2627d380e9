//! `vmm keygen`: the TLS material of one migration end.

use super::args::KeygenArgs;
use vmm::EXIT_VMM_ERROR;

/// `vmm keygen`.
pub fn keygen(args: &KeygenArgs) -> i32 {
    use vmm::migration::tls;
    if let Some(psk) = &args.psk {
        return match tls::keygen_psk(psk, args.force) {
            Ok(()) => {
                println!(
                    "vmm: wrote a pre-shared key to {} (mode 0600): copy it to the other end over a channel you trust; both pass --tls-psk",
                    psk.display()
                );
                0
            }
            Err(e) => {
                eprintln!("vmm: error: {e}");
                EXIT_VMM_ERROR
            }
        };
    }
    let Some(dir) = &args.out else {
        eprintln!("vmm: error: give --out DIR or --psk FILE");
        return EXIT_VMM_ERROR;
    };
    match tls::keygen(dir, args.force) {
        Ok(k) => {
            println!("vmm: wrote {} (mode 0600, keep it here)", k.key.display());
            println!(
                "vmm: wrote {}: give it to the other end as its --tls-peer",
                k.cert.display()
            );
            println!("vmm: certificate fingerprint {}", k.fingerprint);
            0
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}
