//! A DNS query from any process of the pod: any bytes get a reply, a forward or nothing from
//! the proxy's answer path (against a store with services, a wildcard and IPv6), never a panic;
//! a reply always parses back as a DNS message.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

fn snapshot() -> &'static Arc<l4mesh::store::Snapshot> {
    static SNAP: OnceLock<Arc<l4mesh::store::Snapshot>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let store = l4mesh::store::Store::new();
        let yaml = r#"
services:
- { name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.9.0.1", "/fd00::1"], ports: { 80: 8080 } }
- { name: wild, namespace: default, hostname: "*.example.com", vips: ["/10.9.0.3"], ports: { 80: 8080 } }
- { name: db, namespace: default, hostname: db.default.svc.cluster.local, ports: { 5432: 5432 } }
workloads:
- { uid: w/db-0, name: db-0, namespace: default, serviceAccount: db, workloadIps: ["10.1.0.10", "fd01::10"], services: { "default/db.default.svc.cluster.local": { 5432: 5432 } } }
"#;
        if let Ok(batch) = l4mesh::localconfig::parse(yaml) {
            store.apply(batch);
        }
        store.load()
    })
}

fuzz_target!(|data: &[u8]| {
    let client = l4mesh::dns::answer::Client {
        namespace: Some("default"),
        network: "",
        search: None,
    };
    let rules = l4mesh::dns::answer::NameRules::new("cluster.local");
    for transport in [l4mesh::dns::Transport::Udp, l4mesh::dns::Transport::Tcp] {
        if let l4mesh::dns::Reply::Send { bytes, .. } =
            l4mesh::dns::respond(data, snapshot(), client, &rules, transport)
        {
            assert!(hickory_proto::op::Message::from_vec(&bytes).is_ok());
            if transport == l4mesh::dns::Transport::Udp {
                // At most what the client announced (512 without EDNS).
                let limit = hickory_proto::op::Message::from_vec(data).map_or(512, |m| m.max_payload());
                assert!(bytes.len() <= usize::from(limit), "{} > {limit}", bytes.len());
            }
        }
    }
});
