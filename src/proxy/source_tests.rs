//! Outbound identity (issue 14, item 3): the workload at a connection's source address gives
//! its identity only when it is the served workload or the address is this namespace's own; an
//! address an app bound with `IP_FREEBIND` names nobody.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{source_decision, ProxyError};
use crate::model::{Workload, WorkloadInfo};
use crate::proto::istio::workload as pw;

fn workload(name: &str) -> Arc<Workload> {
    let p = pw::Workload {
        uid: format!("cluster1//v1/Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    };
    Arc::new(Workload::try_from(p).unwrap())
}

fn served(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        namespace: "default".into(),
        name: name.into(),
        service_account: "sa".into(),
    }
}

const SRC: &str = "10.0.0.1:40000";

#[test]
fn the_served_workload_needs_no_address_check() {
    let (wl, own) = (workload("client"), served("client"));
    let got = source_decision(Some(&own), Some(&wl), SRC.parse().unwrap(), || {
        panic!("the namespace must not be asked for the served workload")
    });
    assert_eq!(got.unwrap().unwrap().name, "client");
}

#[test]
fn another_workloads_address_counts_only_when_it_is_this_namespaces() {
    let (wl, own) = (workload("server"), served("client"));
    let src: SocketAddr = SRC.parse().unwrap();
    // A pod that carries the address (several workloads in one pod): its workload.
    let got = source_decision(Some(&own), Some(&wl), src, || true);
    assert_eq!(got.unwrap().unwrap().name, "server");
    // A foreign address the app bound: refused, naming both workloads.
    let e = source_decision(Some(&own), Some(&wl), src, || false).unwrap_err();
    assert!(matches!(e, ProxyError::ForeignSource { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("default/server") && msg.contains("it serves default/client"),
        "{msg}"
    );
    assert_eq!(e.classify().0, "NR");
    // Without PROXY_WORKLOAD_INFO only the namespace's own addresses name a workload.
    assert!(source_decision(None, Some(&wl), src, || false).is_err());
    assert!(source_decision(None, Some(&wl), src, || true).is_ok());
}

#[test]
fn an_unknown_source_has_no_workload() {
    let own = served("client");
    let got = source_decision(Some(&own), None, SRC.parse().unwrap(), || false);
    assert!(got.unwrap().is_none());
}
