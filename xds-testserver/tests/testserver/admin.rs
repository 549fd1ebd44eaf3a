//! The admin API and the state file watch, each seen by a connected delta ADS client.

use std::path::Path;

use super::common::*;
use xds_testserver::{Config, Handle, Kind, StateSource};

#[tokio::test]
async fn admin_api_changes_the_state_and_pushes() {
    bounded(async {
        let server = start().await;
        let admin = server.admin_addr().unwrap();
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Address).await;
        c.ack(&r).await;

        let (status, body) = http_text(admin, "GET", "/state", "").await;
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let version = r.resources[0].version.as_str();
        assert_eq!(json["address"]["resources"][CLIENT], version);
        assert_eq!(json["authorization"]["resources"][POLICY].as_str().unwrap().len(), 16);
        assert_eq!(json["address"]["system_version"], r.system_version_info.as_str());

        // POST /resources upserts.
        let (status, body) = http_text(
            admin,
            "POST",
            "/resources",
            "workloads:\n- {uid: extra, name: extra, namespace: default, workloadIps: [127.0.3.1]}\n",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let push = c.recv().await;
        assert_eq!(names(&push), ["extra"]);
        c.ack(&push).await;

        // DELETE with a uid that contains `//`.
        let (status, body) = http_text(admin, "DELETE", &format!("/resources/address/{CLIENT}"), "").await;
        assert_eq!(status, 200, "{body}");
        let push = c.recv().await;
        assert_eq!(push.removed_resources, [CLIENT]);
        c.ack(&push).await;
        let (status, body) = http_text(admin, "DELETE", &format!("/resources/address/{CLIENT}"), "").await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = http_text(admin, "DELETE", "/resources/cluster/x", "").await;
        assert_eq!(status, 400);
        assert!(body.contains("unknown resource kind"), "{body}");

        // Invalid YAML is refused with the reason, and changes nothing.
        let (status, body) = http_text(admin, "PUT", "/state", "workloads:\n- {uid: a, protocl: TCP}\n").await;
        assert_eq!(status, 400);
        assert!(body.contains("protocl"), "{body}");
        let (status, body) = http_text(admin, "POST", "/resources", "policies: [{name: p}]\n").await;
        assert_eq!(status, 400, "{body}");
        c.expect_quiet().await;

        // PUT /state replaces everything.
        let (status, body) = http_text(
            admin,
            "PUT",
            "/state",
            "workloads:\n- {uid: only, name: only, namespace: default}\n",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let push = c.recv().await;
        assert_eq!(names(&push), ["only"]);
        let mut removed = push.removed_resources.clone();
        removed.sort();
        assert_eq!(removed, [ECHO, SVC, "extra"]);
        let summary = server.state();
        assert_eq!(summary.address.resources.len(), 1);
        assert!(summary.authorization.resources.is_empty());

        let (status, body) = http_text(admin, "GET", "/", "").await;
        assert_eq!(status, 200);
        assert!(body.contains("/clients"));
        server.shutdown().await;
    })
    .await;
}

/// Replaces `path` the way editors do: write a sibling file, rename it over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn file_edits_are_pushed_and_invalid_ones_ignored() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, YAML).unwrap();
        let server = Handle::start(Config::new(StateSource::File(path.clone())))
            .await
            .unwrap();
        let mut c = Client::connect(server.addr()).await;
        let r = c.wildcard(Kind::Address).await;
        assert_eq!(names(&r), [CLIENT, ECHO, SVC]);
        c.ack(&r).await;

        // Rename-replace.
        replace_file(&path, &YAML.replace("127.0.2.1", "127.0.2.9"));
        let push = c.recv().await;
        assert_eq!(names(&push), [ECHO]);
        assert!(push.removed_resources.is_empty());
        c.ack(&push).await;

        // An invalid edit keeps the previous state.
        let before = server.state();
        std::fs::write(&path, "workloads: [{uid: x, bogus: 1}]\n").unwrap();
        c.expect_quiet().await;
        // So does a blank file (a write in progress).
        std::fs::write(&path, "").unwrap();
        c.expect_quiet().await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(server.state(), before);

        // An in-place write.
        std::fs::write(&path, YAML.replace("deny-9999", "deny-8888")).unwrap();
        let push = c.recv().await;
        assert_eq!(names(&push), [ECHO]); // back to 127.0.2.1
        let policies = c.wildcard(Kind::Authorization).await;
        assert_eq!(names(&policies), ["default/deny-8888"]);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn start_fails_on_an_invalid_state() {
    let err = Handle::start(Config::new(StateSource::Yaml("nope: 1".into())))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    let err = Handle::start(Config::new(StateSource::File(
        "/nonexistent/state.yaml".into(),
    )))
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("/nonexistent/state.yaml"), "{err}");
}
