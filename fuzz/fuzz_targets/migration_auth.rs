//! The migration's TLS material and its authentication block: what
//! `Tls::load` makes of the files `vmm keygen` writes (`--tls-cert`,
//! `--tls-key`, `--tls-peer`, `--tls-psk`: PEM certificates and a PKCS#8
//! key parsed by rustls, then rustls' configurations built with them; a
//! pre-shared key file's contents), and `Tls::check_auth`, which checks the
//! block a peer sends right after the TLS handshake (magic, flag, HMAC
//! proof over its role and the session's exporter value).
//!
//! Input: a mode byte, then:
//! - modes 0-3: the contents of the cert, key, peer or PSK file, the other
//!   three being `fixtures/tls/` (`vmm keygen --out a`, `--out b`,
//!   `--psk psk`). Checked: a PSK file is accepted exactly when it holds at
//!   least `MIN_PSK` bytes once trimmed;
//! - mode 4: a peer's 41-byte block, checked by a side with the pre-shared
//!   key and by one without. Checked: accepted exactly when it is the block
//!   a genuine peer sends over the same exporter message;
//! - mode 5: which files are given (a bit each): accepted exactly when the
//!   three certificate files come together or not at all, and there is a
//!   certificate or a PSK.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use vmm::migration::tls::{Tls, TlsError, TlsFiles, AUTH_LEN, MIN_PSK};

const CERT: &[u8] = include_bytes!("../fixtures/tls/a/cert.pem");
const KEY: &[u8] = include_bytes!("../fixtures/tls/a/key.pem");
const PEER: &[u8] = include_bytes!("../fixtures/tls/b/cert.pem");
const PSK: &[u8] = include_bytes!("../fixtures/tls/psk");
const NAMES: [&str; 4] = ["/a/cert.pem", "/a/key.pem", "/b/cert.pem", "/psk"];

fn files(which: u8) -> TlsFiles {
    let p = |i: usize| (which & (1 << i) != 0).then(|| PathBuf::from(NAMES[i]));
    TlsFiles {
        cert: p(0),
        key: p(1),
        peer: p(2),
        psk: p(3),
    }
}

fn load(files: &TlsFiles, replaced: Option<(usize, &[u8])>) -> Result<Tls, TlsError> {
    Tls::load_with(files, |path: &Path, _what, _secret| {
        let i = NAMES
            .iter()
            .position(|n| Path::new(n) == path)
            .expect("a fixture path");
        Ok(match replaced {
            Some((r, data)) if r == i => data.to_vec(),
            _ => [CERT, KEY, PEER, PSK][i].to_vec(),
        })
    })
}

/// A side with the pre-shared key (and pinned certificates), and one without.
fn sides() -> &'static (Tls, Tls) {
    static S: OnceLock<(Tls, Tls)> = OnceLock::new();
    S.get_or_init(|| {
        (
            load(&files(0b1111), None).expect("the fixtures load"),
            load(&files(0b0111), None).expect("the fixtures load"),
        )
    })
}

/// An exporter message as `message()` builds one (label, role, 32 bytes).
fn exporter_message() -> Vec<u8> {
    let mut m = b"vmm migration psk v1 c".to_vec();
    m.extend_from_slice(&[0x42; 32]);
    m
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        i @ 0..=3 => {
            let i = usize::from(i);
            let r = load(&files(0b1111), Some((i, rest)));
            if i == 3 {
                let long = rest.trim_ascii().len() >= MIN_PSK;
                assert_eq!(
                    r.is_ok(),
                    long,
                    "a PSK file of {} bytes: {:?}",
                    rest.len(),
                    r.err()
                );
            }
        }
        4 => {
            let mut block = [0u8; AUTH_LEN];
            let n = rest.len().min(AUTH_LEN);
            block[..n].copy_from_slice(&rest[..n]);
            let m = exporter_message();
            let (with_psk, without) = sides();
            for side in [with_psk, without] {
                let genuine = side.auth_block_over(&m);
                let ok = side.check_auth(&block, || Ok(m.clone())).is_ok();
                let expected = if side.describe().contains("pre-shared") {
                    block == genuine
                } else {
                    block[..9] == genuine[..9]
                };
                assert_eq!(ok, expected, "{}: block {block:02x?}", side.describe());
            }
        }
        _ => {
            let which = rest.first().copied().unwrap_or(0) & 0b1111;
            let certs = which & 0b111;
            let r = load(&files(which), None);
            let expected = (certs == 0b111 || certs == 0) && which != 0;
            assert_eq!(r.is_ok(), expected, "files {which:04b}: {:?}", r.err());
        }
    }
});
