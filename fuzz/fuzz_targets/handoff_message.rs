//! A packet on the hand-off socket (from the running l4mesh or a successor): any bytes decode to
//! a message or an error naming why; a relayed metrics text, however malformed, merges into an
//! exposition and cuts into pieces that join back; none panics.
#![no_main]

use l4mesh::handoff::{metrics_text, wire};
use libfuzzer_sys::fuzz_target;

const OWN: &str = "# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";

fuzz_target!(|data: &[u8]| {
    let msg = wire::decode(data);
    let _ = wire::describe(msg.as_ref().ok());
    let text = match msg {
        Ok(wire::Message::Metrics { text, .. }) => text,
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    let _ = metrics_text::merge(OWN, &text);
    let _ = metrics_text::merge(&text, OWN);
    let joined: String = wire::metrics_pieces(&text, true)
        .into_iter()
        .map(|p| match p {
            wire::Message::Metrics { text, .. } => text,
            _ => String::new(),
        })
        .collect();
    assert_eq!(joined, text);
});
