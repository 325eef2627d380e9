//! One line of the control socket (`vmm::control::decode`), as the server
//! reads it from any local client; a request's endpoint as `execute` parses
//! it. A request that decodes encodes (as `vmm ctl` sends it) and decodes
//! back to itself. The same bytes also go to `vmm::control::decode_answer`,
//! the answer line as `vmm ctl` reads it from whatever listens at the
//! socket: a result or a refusal, never a panic. Seeds: the requests of
//! `docs/snapshot.md`'s table and answers of a real control socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::control::{decode, decode_answer, Request};
use vmm::migration::tls::TlsFiles;
use vmm::migration::Endpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode_answer(text);
    }
    let Ok(req) = decode(data) else {
        return;
    };
    let line = serde_json::to_string(&req).expect("a request encodes");
    match decode(line.as_bytes()) {
        Ok(again) => assert_eq!(again, req, "{line}"),
        Err(e) => panic!("`{line}` does not decode: {e}"),
    }
    let (endpoint, cert, key, peer, psk) = match &req {
        Request::Migrate {
            to,
            tls_cert,
            tls_key,
            tls_peer,
            tls_psk,
            ..
        } => (to, tls_cert, tls_key, tls_peer, tls_psk),
        Request::Recover {
            from,
            tls_cert,
            tls_key,
            tls_peer,
            tls_psk,
            ..
        } => (from, tls_cert, tls_key, tls_peer, tls_psk),
        _ => return,
    };
    // The TLS files of a request are read by the VMM: absolute paths only.
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        peer: peer.clone(),
        psk: psk.clone(),
    };
    if files.check_absolute().is_ok() {
        for p in [cert, key, peer, psk].into_iter().flatten() {
            assert!(p.is_absolute(), "{p:?} accepted");
        }
    }
    if let Ok(e) = endpoint.parse::<Endpoint>() {
        let shown = e.to_string();
        assert_eq!(shown.parse::<Endpoint>().ok(), Some(e), "{shown}");
    }
});
