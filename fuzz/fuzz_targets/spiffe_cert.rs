//! What a TLS peer presents: its leaf certificate's DER, read for the SPIFFE ID and validity,
//! and any text read as a SPIFFE ID (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = l4mesh::identity::leaf_facts(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<l4mesh::model::SpiffeId>() {
            // What parses must print back to a form that parses to the same identity.
            let again: l4mesh::model::SpiffeId = id.to_string().parse().expect("round trip");
            assert_eq!(again, id);
        }
    }
});
