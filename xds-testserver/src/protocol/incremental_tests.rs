//! The incremental sync (from the state's change log and the touched names) must answer exactly as
//! a full diff would: random changes, subscriptions, lagging streams and ACKs, run on two streams
//! of which one is forced to diff everything every time.

use std::collections::BTreeSet;

use super::*;
use crate::state::Resources;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

const IPS: [&str; 4] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "::ffff:10.0.0.4"];
const NETWORKS: [&str; 2] = ["", "net2"];
const WORKLOADS: [&str; 4] = ["w1", "w2", "w3", "w4"];
const SERVICES: [&str; 3] = ["s1", "s2", "s3"];
/// Subscribable names: aliases (some spelled oddly), canonical names, unknown names.
const NAMES: [&str; 12] = [
    "/10.0.0.1",
    "/10.0.0.2",
    "net2/10.0.0.2",
    "/10.0.0.3",
    "/::ffff:10.0.0.4",
    "/10.0.0.4",
    "net2/10.0.0.1",
    "w1",
    "w3",
    "n/s2.n.svc.cluster.local",
    "n/p1",
    "nope",
];

fn ips(rng: &mut Rng) -> String {
    let n = rng.below(3);
    let ips: Vec<String> = (0..n).map(|_| format!("\"{}\"", rng.pick(&IPS))).collect();
    ips.join(", ")
}

fn random_change(rng: &mut Rng, s: &mut State) {
    match rng.below(10) {
        0..=3 => {
            let uid = rng.pick(&WORKLOADS);
            let (network, sa) = (rng.pick(&NETWORKS), rng.below(2));
            let ips = ips(rng);
            let y = format!(
                "workloads:\n- {{uid: {uid}, name: {uid}, namespace: n, serviceAccount: sa{sa}, \
                 network: \"{network}\", workloadIps: [{ips}]}}\n"
            );
            s.upsert(Resources::from_yaml(&y).unwrap());
        }
        4..=5 => {
            let name = rng.pick(&SERVICES);
            let vips: Vec<String> = (0..rng.below(3))
                .map(|_| format!("\"{}/{}\"", rng.pick(&NETWORKS), rng.pick(&IPS)))
                .collect();
            let y = format!(
                "services:\n- {{name: {name}, namespace: n, hostname: {name}.n.svc.cluster.local, \
                 vips: [{}]}}\n",
                vips.join(", ")
            );
            s.upsert(Resources::from_yaml(&y).unwrap());
        }
        6 => {
            let y = format!(
                "policies:\n- {{name: p1, namespace: n, scope: Global, action: {}}}\n",
                rng.pick(&["Allow", "Deny"])
            );
            s.upsert(Resources::from_yaml(&y).unwrap());
        }
        7 => {
            // Raw resources, some named like an address alias.
            let name = rng.pick(&["/10.0.0.1", "w2", "n/p1", "raw"]);
            let kind = if rng.below(4) == 0 {
                Kind::Authorization
            } else {
                Kind::Address
            };
            s.put_raw(kind, name, vec![rng.below(3) as u8]);
        }
        _ => {
            let kind = if rng.below(5) == 0 {
                Kind::Authorization
            } else {
                Kind::Address
            };
            let names: Vec<&str> = [&WORKLOADS[..], &["/10.0.0.1", "raw", "n/p1"]].concat();
            let name = if rng.below(3) == 0 {
                format!("n/{}.n.svc.cluster.local", rng.pick(&SERVICES))
            } else {
                rng.pick(&names).to_owned()
            };
            s.remove(kind, &name);
        }
    }
}

fn random_request(rng: &mut Rng, kind: Kind, last_nonce: Option<&str>) -> DeltaDiscoveryRequest {
    let mut req = DeltaDiscoveryRequest {
        type_url: kind.type_url().to_owned(),
        ..Default::default()
    };
    for _ in 0..rng.below(3) {
        req.resource_names_subscribe
            .push(rng.pick(&NAMES).to_owned());
    }
    for _ in 0..rng.below(2) {
        req.resource_names_unsubscribe
            .push(rng.pick(&NAMES).to_owned());
    }
    if rng.below(8) == 0 {
        req.resource_names_subscribe.push("*".into());
    }
    if rng.below(8) == 0 {
        req.resource_names_unsubscribe.push("*".into());
    }
    if let Some(nonce) = last_nonce.filter(|_| rng.below(2) == 0) {
        req.response_nonce = nonce.to_owned();
    }
    req
}

/// Forgets what the stream was synced to: its next delta is a full diff.
fn forget(st: &mut StreamState) {
    for ts in st.types.values_mut() {
        ts.synced = None;
    }
}

/// The full diff as first written (every resource of interest against everything held): for a
/// stream in sync, it finds nothing to send, to remove, or to re-alias.
fn assert_in_sync(ts: &TypeState, kind: Kind, state: &State, what: &str) {
    let mut interest: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if ts.wildcard {
        for e in state.entries(kind) {
            interest.insert(e.name.clone(), BTreeSet::new());
        }
    }
    for name in &ts.names {
        if let Some(e) = state.resolve(kind, name) {
            let aliases = interest.entry(e.name.clone()).or_default();
            if *name != e.name {
                aliases.insert(name.clone());
            }
        }
    }
    let held: BTreeMap<String, String> = interest
        .keys()
        .map(|n| (n.clone(), state.get(kind, n).unwrap().version.clone()))
        .collect();
    assert_eq!(ts.held, held, "{what}: held");
    assert_eq!(ts.sent_aliases, interest, "{what}: aliases");
}

fn check(a: &[DeltaDiscoveryResponse], b: &[DeltaDiscoveryResponse], what: &str) {
    assert_eq!(a, b, "{what}");
}

#[test]
fn incremental_sync_answers_as_a_full_diff() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut state = State::default();
        for _ in 0..rng.below(6) {
            random_change(&mut rng, &mut state);
        }
        let (mut inc, mut full) = (StreamState::new("t"), StreamState::new("t"));
        let mut nonces: BTreeMap<Kind, String> = BTreeMap::new();
        for step in 0..150 {
            let what = format!("seed {seed}, step {step}");
            match rng.below(10) {
                0..=3 => {
                    // The state moves on, sometimes several times before the streams look.
                    for _ in 0..=rng.below(3) {
                        random_change(&mut rng, &mut state);
                    }
                    if rng.below(25) == 0 {
                        let yaml = "workloads:\n- {uid: w1, name: w1, namespace: n}\n";
                        state.replace(Resources::from_yaml(yaml).unwrap());
                    }
                }
                4..=5 => {
                    forget(&mut full);
                    let (a, b) = (inc.on_state(&state), full.on_state(&state));
                    check(&a, &b, &what);
                    for r in a {
                        nonces.insert(Kind::from_type_url(&r.type_url).unwrap(), r.nonce);
                    }
                }
                _ => {
                    let kind = if rng.below(4) == 0 {
                        Kind::Authorization
                    } else {
                        Kind::Address
                    };
                    let req = random_request(&mut rng, kind, nonces.get(&kind).map(String::as_str));
                    forget(&mut full);
                    let a = inc.on_request(&req, &state, 1);
                    let b = full.on_request(&req, &state, 1);
                    check(&a.responses, &b.responses, &what);
                    assert_eq!(a.events, b.events, "{what}");
                    for r in a.responses {
                        nonces.insert(kind, r.nonce);
                    }
                }
            }
            assert_eq!(inc.info(), full.info(), "{what}");
            for (kind, ts) in &inc.types {
                if ts.synced == Some(state.id()) {
                    assert_in_sync(ts, *kind, &state, &what);
                }
            }
        }
    }
}

#[test]
fn acked_count_matches_a_recount() {
    let mut rng = Rng(7);
    let mut state = State::default();
    let mut st = StreamState::new("t");
    let mut nonce = None::<String>;
    for _ in 0..300 {
        random_change(&mut rng, &mut state);
        let req = random_request(&mut rng, Kind::Address, nonce.as_deref());
        let out = st.on_request(&req, &state, 1);
        nonce = out.responses.last().map(|r| r.nonce.clone()).or(nonce);
        let ts = &st.types[&Kind::Address];
        let recount = ts
            .held
            .iter()
            .filter(|(name, version)| ts.acked.get(*name) == Some(*version))
            .count();
        assert_eq!(ts.acked_count, recount);
    }
}
