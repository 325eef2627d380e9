//! One line of the control socket (`vmm::control::decode`), as the server
//! reads it from any local client; a request's endpoint as `execute` parses
//! it. A request that decodes encodes (as `vmm ctl` sends it) and decodes
//! back to itself. Seeds: the requests of `docs/snapshot.md`'s table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::control::{decode, Request};
use vmm::migration::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode(data) else {
        return;
    };
    let line = serde_json::to_string(&req).expect("a request encodes");
    match decode(line.as_bytes()) {
        Ok(again) => assert_eq!(again, req, "{line}"),
        Err(e) => panic!("`{line}` does not decode: {e}"),
    }
    let endpoint = match &req {
        Request::Migrate { to, .. } => to,
        Request::Recover { from } => from,
        _ => return,
    };
    if let Ok(e) = endpoint.parse::<Endpoint>() {
        let shown = e.to_string();
        assert_eq!(shown.parse::<Endpoint>().ok(), Some(e), "{shown}");
    }
});
