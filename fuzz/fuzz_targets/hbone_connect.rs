//! An HBONE CONNECT as a peer sends it: the method, the authority and headers (one per line,
//! `name: value`) go through the server's validation and the `forwarded` header parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or_default();
    let authority = lines.next().unwrap_or_default();
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut b = http::Request::builder().method(method).uri(authority);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            b = b.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    // A hostname authority that passes is a DNS name with a port: nothing else reaches lookups.
    if let Ok(l4mesh::proxy::hbone::Authority::Host { host, port }) =
        l4mesh::proxy::hbone::validate(&req)
    {
        assert!(port != 0 && hickory_proto::rr::Name::from_ascii(&host).is_ok());
    }
    let _ = l4mesh::proxy::hbone::forwarded_for(req.headers());
});
