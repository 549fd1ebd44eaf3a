//! The local config file (`LOCAL_XDS_PATH`, ztunnel's YAML): any text must parse into a batch or
//! fail with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(batch) = l4mesh::localconfig::parse(text) {
            l4mesh::store::Store::new().apply(batch);
        }
    }
});
