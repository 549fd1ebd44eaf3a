//! W3C `traceparent` and `tracestate` from a CONNECT (first line, the rest): a caller's span
//! context is taken only when valid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (parent, state) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut h = http::HeaderMap::new();
    for (name, value) in [("traceparent", parent), ("tracestate", state)] {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            h.insert(name, v);
        }
    }
    let _ = l4mesh::otel::remote_parent(&h);
});
