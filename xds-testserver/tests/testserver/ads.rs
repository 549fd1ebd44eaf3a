//! Delta ADS over real sockets (plaintext), with l4mesh's generated tonic client against an
//! in-process server: initial sync, ACK, pushes, NACK, reconnect, on-demand names, raw resources.

use std::collections::HashMap;

use super::common::*;
use l4mesh::proto::envoy::discovery::DeltaDiscoveryRequest;
use l4mesh::proto::istio::workload as pw;
use prost::Message;
use xds_testserver::{Config, Handle, Kind, StateSource};

#[tokio::test]
async fn wildcard_sync_ack_and_pushes() {
    bounded(async {
        let server = start().await;
        let mut c = Client::connect(server.addr()).await;

        let addresses = c.wildcard(Kind::Address).await;
        assert_eq!(names(&addresses), [CLIENT, ECHO, SVC]);
        assert!(!addresses.nonce.is_empty());
        assert!(!addresses.system_version_info.is_empty());
        let workload = pw::Address::decode(
            addresses.resources[0]
                .resource
                .as_ref()
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        let Some(pw::address::Type::Workload(w)) = workload.r#type else {
            panic!("not a workload: {workload:?}");
        };
        assert_eq!(w.uid, CLIENT);
        assert_eq!(w.addresses, [vec![127, 0, 1, 1]]);

        let policies = c.wildcard(Kind::Authorization).await;
        assert_eq!(names(&policies), [POLICY]);
        assert_ne!(policies.nonce, addresses.nonce);

        c.ack(&addresses).await;
        c.ack(&policies).await;
        c.expect_quiet().await;

        // One workload changes, the service goes away, policies stay.
        let edited = YAML
            .replace("serviceAccount: echo", "serviceAccount: echo-v2")
            .replace(
                "services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  vips: [\"/127.10.0.1\"]\n  ports: { 80: 8080 }\n",
                "",
            );
        assert!(edited.contains("echo-v2") && !edited.contains("vips"));
        server.set_state_yaml(&edited).unwrap();
        let address_push = c.recv().await;
        assert_eq!(address_push.type_url, Kind::Address.type_url());
        assert_eq!(names(&address_push), [ECHO]);
        assert_eq!(address_push.removed_resources, [SVC]);
        assert_ne!(address_push.system_version_info, addresses.system_version_info);
        c.ack(&address_push).await;
        c.expect_quiet().await;

        // Removing a policy through the API pushes its removal.
        assert!(server.remove(Kind::Authorization, POLICY));
        assert!(!server.remove(Kind::Authorization, POLICY));
        let push = c.recv().await;
        assert_eq!(push.type_url, Kind::Authorization.type_url());
        assert!(push.resources.is_empty());
        assert_eq!(push.removed_resources, [POLICY]);
        c.ack(&push).await;

        // The registry shows the stream, once the last ACK is in.
        eventually(|| server.clients()[0].types[&Kind::Authorization].acks == 2).await;
        let clients = server.clients();
        assert_eq!(clients.len(), 1);
        let info = &clients[0];
        assert!(info.connected);
        assert_eq!(info.node_id, "ztunnel~127.0.1.1~client.default~default.svc.cluster.local");
        assert!(info.peer.is_some());
        let a = &info.types[&Kind::Address];
        assert!(a.wildcard);
        assert_eq!((a.held, a.acked), (2, 2));
        assert_eq!(a.last_acked_nonce.as_ref(), Some(&address_push.nonce));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn nacks_are_recorded_and_visible() {
    bounded(async {
        let server = start().await;
        let admin = server.admin_addr().unwrap();
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Address).await;
        c.nack(&r, "workload \"x\": field `addresses[0]`: bad IP").await;
        c.expect_quiet().await; // NACKed versions are not resent

        eventually(|| !server.nacks().is_empty()).await;
        let nacks = server.nacks();
        assert_eq!(nacks.len(), 1);
        assert_eq!(nacks[0].kind, Kind::Address);
        assert_eq!(nacks[0].nack.nonce, r.nonce);
        assert_eq!(nacks[0].nack.message, "workload \"x\": field `addresses[0]`: bad IP");
        assert_eq!(nacks[0].nack.resources, [CLIENT, ECHO, SVC]);
        let clients = server.clients();
        let t = &clients[0].types[&Kind::Address];
        assert_eq!(t.nacks.len(), 1);
        assert_eq!(t.acked, 0);

        let (status, body) = http_text(admin, "GET", "/clients", "").await;
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let nack = &json[0]["types"]["address"]["nacks"][0];
        assert_eq!(nack["message"], "workload \"x\": field `addresses[0]`: bad IP");
        assert_eq!(nack["nonce"], r.nonce.as_str());
        assert!(nack["time_unix_ms"].as_u64().unwrap() > 0);
        assert_eq!(json[0]["connected"], true);
        assert_eq!(json[0]["types"]["address"]["wildcard"], true);

        let (status, body) = http_text(admin, "GET", "/nacks", "").await;
        assert_eq!(status, 200);
        assert!(body.contains("bad IP"), "{body}");

        // A new version of a NACKed resource is sent.
        server
            .upsert_yaml("workloads:\n- {uid: cluster1//v1/Pod/default/echo, name: echo, namespace: default, workloadIps: [127.0.2.2]}\n")
            .unwrap();
        let push = c.recv().await;
        assert_eq!(names(&push), [ECHO]);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_differences() {
    bounded(async {
        let server = start().await;
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Address).await;
        c.ack(&r).await;
        let held: HashMap<String, String> = r
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        drop(c);

        // While the client is away: echo changes, the service goes away, a workload appears.
        server.remove(Kind::Address, SVC);
        server
            .upsert_yaml(
                "workloads:\n- {uid: cluster1//v1/Pod/default/echo, name: echo, namespace: default, workloadIps: [127.0.2.2]}\n- {uid: new, name: new, namespace: default}\n",
            )
            .unwrap();

        let mut c = Client::connect(server.addr()).await;
        let mut req = first(Kind::Address);
        req.initial_resource_versions = held.clone();
        c.send(req).await;
        let r = c.recv().await;
        assert_eq!(names(&r), [ECHO, "new"]);
        assert_eq!(r.removed_resources, [SVC]);
        c.ack(&r).await;
        c.expect_quiet().await;

        // The disconnected stream is still listed, as disconnected.
        eventually(|| server.clients().iter().any(|c| !c.connected)).await;
        let clients = server.clients();
        assert_eq!(clients.len(), 2);
        assert!(!clients[0].connected && clients[0].disconnected_at_unix_ms.is_some());
        assert!(clients[1].connected);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_restarted_server_with_the_same_state_resends_nothing() {
    bounded(async {
        let server = start().await;
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Address).await;
        let held: HashMap<String, String> = r
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        server.shutdown().await;
        // The stream ends (UNAVAILABLE) when the server shuts down.
        assert!(!matches!(c.next().await, Ok(Some(_))));

        let server = Handle::start(Config::new(StateSource::Yaml(YAML.to_owned())))
            .await
            .unwrap();
        let mut c = Client::connect(server.addr()).await;
        let mut req = first(Kind::Address);
        req.initial_resource_versions = held;
        c.send(req).await;
        let r = c.recv().await;
        assert!(r.resources.is_empty(), "{:?}", names(&r));
        assert!(r.removed_resources.is_empty());
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn on_demand_addresses_resolve_with_aliases() {
    bounded(async {
        let server = start().await;
        let mut c = Client::connect(server.addr()).await;
        let mut req = first(Kind::Address);
        req.resource_names_subscribe = vec!["*".into()];
        req.resource_names_unsubscribe = vec!["*".into()];
        c.send(req).await;
        let r = c.recv().await;
        assert!(r.resources.is_empty());
        c.ack(&r).await;

        c.send(DeltaDiscoveryRequest {
            type_url: Kind::Address.type_url().into(),
            resource_names_subscribe: vec!["/127.0.2.1".into(), "/127.99.0.1".into()],
            ..Default::default()
        })
        .await;
        let r = c.recv().await;
        assert_eq!(names(&r), [ECHO]);
        assert_eq!(r.resources[0].aliases, ["/127.0.2.1"]);
        c.ack(&r).await;

        // The VIP resolves to the service.
        c.send(DeltaDiscoveryRequest {
            type_url: Kind::Address.type_url().into(),
            resource_names_subscribe: vec!["/127.10.0.1".into()],
            ..Default::default()
        })
        .await;
        let r = c.recv().await;
        assert_eq!(names(&r), [SVC]);
        assert_eq!(r.resources[0].aliases, ["/127.10.0.1"]);
        c.ack(&r).await;

        // The unknown address appears: it is pushed then.
        server
            .upsert_yaml("workloads:\n- {uid: late, name: late, namespace: default, workloadIps: [127.99.0.1]}\n")
            .unwrap();
        let r = c.recv().await;
        assert_eq!(names(&r), ["late"]);
        assert_eq!(r.resources[0].aliases, ["/127.99.0.1"]);
        let clients = server.clients();
        let t = &clients[0].types[&Kind::Address];
        assert!(!t.wildcard);
        assert_eq!(t.subscribed, ["/127.0.2.1", "/127.10.0.1", "/127.99.0.1"]);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn raw_resources_are_served_as_given() {
    bounded(async {
        let server = start().await;
        let admin = server.admin_addr().unwrap();
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Authorization).await;
        c.ack(&r).await;

        let junk = [0x0a, 0xff, 0xff, 0x00, 0x13];
        let (status, body) = http(
            admin,
            "POST",
            "/raw?type=authorization&name=default/junk",
            &junk,
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let r = c.recv().await;
        assert_eq!(names(&r), ["default/junk"]);
        let any = r.resources[0].resource.as_ref().unwrap();
        assert_eq!(any.value, junk);
        assert_eq!(any.type_url, Kind::Authorization.type_url());

        // Bad parameters name what is wrong.
        let (status, body) = http_text(admin, "POST", "/raw?type=cluster&name=x", "").await;
        assert_eq!(status, 400);
        assert!(
            body.contains("`type`") && body.contains("cluster"),
            "{body}"
        );
        let (status, body) = http_text(admin, "POST", "/raw?type=address", "").await;
        assert_eq!(status, 400);
        assert!(body.contains("`name`"), "{body}");

        // Library form.
        server.push_raw(Kind::Authorization, "default/junk", vec![1, 2, 3]);
        let r = c.recv().await;
        assert_eq!(r.resources[0].resource.as_ref().unwrap().value, [1, 2, 3]);
        server.shutdown().await;
    })
    .await;
}
