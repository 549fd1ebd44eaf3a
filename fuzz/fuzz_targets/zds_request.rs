//! A packet from istio-cni's node agent (ZDS): any bytes, with the truncation flags from the
//! first byte, decode to a request or a refusal naming why; none panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, packet)) = data.split_first() else {
        return;
    };
    let _ = l4mesh::inpod::zds::decode(packet, Vec::new(), flags & 1 != 0, flags & 2 != 0);
});
