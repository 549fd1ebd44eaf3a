#![allow(clippy::unwrap_used)]
use std::fmt::Write as _;
use std::time::Instant;

use l4mesh::proto::envoy::discovery::DeltaDiscoveryRequest;

use crate::protocol::StreamState;
use crate::state::{Resources, State};
use crate::Kind;

fn yaml(workloads: u32, services: u32) -> String {
    let mut y = String::new();
    y.push_str("workloads:\n");
    for i in 0..workloads {
        let ns = i % 100;
        let svc = i % services;
        let ip = 0x0a00_0000u32 + i;
        let _ = write!(
            y,
            "- uid: cluster1//v1/Pod/ns{ns}/pod-{i}\n  name: pod-{i}\n  namespace: ns{ns}\n  serviceAccount: sa{ns}\n  workloadIps: [\"{}.{}.{}.{}\"]\n  protocol: HBONE\n  node: node-{}\n  services:\n    \"ns{}/svc{svc}.ns{}.svc.cluster.local\": {{ 80: 8080 }}\n",
            ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255, i % 50, svc % 100, svc % 100
        );
    }
    y.push_str("services:\n");
    for s in 0..services {
        let ip = 0xac10_0000u32 + s;
        let _ = write!(
            y,
            "- name: svc{s}\n  namespace: ns{}\n  hostname: svc{s}.ns{}.svc.cluster.local\n  vips: [\"/{}.{}.{}.{}\"]\n  ports: {{ 80: 8080 }}\n",
            s % 100, s % 100, ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255
        );
    }
    y
}

#[test]
#[ignore]
fn scratch_phases() {
    let n: u32 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let t = Instant::now();
    let mut state = State::new(Resources::from_yaml(&yaml(n, n / 10)).unwrap());
    println!("build: {:?}", t.elapsed());
    let mut st = StreamState::new("x");
    let req = DeltaDiscoveryRequest {
        type_url: Kind::Address.type_url().to_owned(),
        ..Default::default()
    };
    let t = Instant::now();
    let out = st.on_request(&req, &state, 1);
    println!("initial delta: {:?}", t.elapsed());
    let nonce = out.responses[0].nonce.clone();
    let t = Instant::now();
    let ackreq = DeltaDiscoveryRequest { response_nonce: nonce, ..req.clone() };
    st.on_request(&ackreq, &state, 2);
    println!("ack: {:?}", t.elapsed());
    for i in 0..3u32 {
        let y = format!(
            "workloads:\n- uid: cluster1//v1/Pod/ns0/pod-0\n  name: pod-0\n  namespace: ns0\n  serviceAccount: sa0\n  workloadIps: [\"10.250.0.{i}\"]\n  protocol: HBONE\n"
        );
        let t = Instant::now();
        let r = Resources::from_yaml(&y).unwrap();
        let parse = t.elapsed();
        let t = Instant::now();
        let mut next = state.clone();
        let clone = t.elapsed();
        let t = Instant::now();
        next.upsert(r);
        let upsert = t.elapsed();
        state = next;
        let t = Instant::now();
        let rs = st.on_state(&state);
        let delta = t.elapsed();
        let t = Instant::now();
        let _ = st.info();
        let info = t.elapsed();
        let t = Instant::now();
        let ackreq = DeltaDiscoveryRequest { response_nonce: rs[0].nonce.clone(), ..req.clone() };
        st.on_request(&ackreq, &state, 3);
        let ack = t.elapsed();
        println!("change {i}: parse {parse:?} clone {clone:?} upsert {upsert:?} on_state {delta:?} ({} res) info {info:?} ack {ack:?}", rs[0].resources.len());
    }
}
