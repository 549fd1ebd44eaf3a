//! `l4mesh node-agent`: the istio-cni side of ZDS, for meshes without Kubernetes. It serves the
//! ZDS socket, announces the pods of a file it watches (each a network namespace), and installs
//! each pod's in-pod capture rules in its namespace (the rules of `l4mesh redirect install`,
//! what istio-cni installs for ztunnel).
//!
//! What it does, in istio-cni's order:
//! - a pod that appears in the file: its capture rules, then `add` (with its namespace as
//!   `SCM_RIGHTS`) to the connected proxy, waiting for the ack;
//! - a pod that leaves the file: `del`, then its rules are removed once `removal_delay` has
//!   passed (its connections are drained meanwhile; new ones are refused, not let out uncaptured);
//! - a proxy that connects (a new one replaces the old): after its hello, `add` for every pod,
//!   then `snapshot_sent`.
//!
//! A bad pods file (at start: an error; later: logged, the last good one stays) never reaches
//! the proxy. An error ack is logged with the pod it names; the agent goes on.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;

use super::netns::PodNetns;
use super::transport::{Conn, Server};
use crate::proto::istio::workload::zds as pb;
use crate::redirect::{RedirectArgs, RedirectCommand};

/// How long the agent waits for an ack before it gives up on the proxy.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One pod of the pods file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's network namespace: `/var/run/netns/<name>` (from `ip netns add`) or
    /// `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsFile {
    #[serde(default)]
    pods: Vec<AgentPod>,
}

/// Why the agent cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading the pods file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pods file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("serving the ZDS socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the pods file: {0}")]
    Watch(#[from] crate::localconfig::LocalConfigError),
}

/// Parses a pods file: `pods:` a list of `{uid, name, namespace, serviceAccount, netns}`, every
/// field non-empty, uids unique, `netns` an absolute path.
pub fn parse_pods(path: &Path, text: &str) -> Result<BTreeMap<String, AgentPod>, AgentError> {
    let invalid = |reason: String| AgentError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let file: PodsFile = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut pods = BTreeMap::new();
    for (i, p) in file.pods.into_iter().enumerate() {
        for (field, v) in [
            ("uid", &p.uid),
            ("name", &p.name),
            ("namespace", &p.namespace),
            ("serviceAccount", &p.service_account),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(format!(
                    "pods[{i}].{field} is empty; expected a value"
                )));
            }
        }
        if !p.netns.is_absolute() {
            return Err(invalid(format!(
                "pods[{i}].netns is {:?}; expected an absolute path (/var/run/netns/<name> or /proc/<pid>/ns/net)",
                p.netns
            )));
        }
        if let Some(prev) = pods.insert(p.uid.clone(), p) {
            return Err(invalid(format!(
                "pods[{i}] repeats the uid {} of {}/{}; expected each uid once",
                prev.uid, prev.namespace, prev.name
            )));
        }
    }
    Ok(pods)
}

fn read_pods(path: &Path) -> Result<BTreeMap<String, AgentPod>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_pods(path, &text)
}

/// What `l4mesh node-agent` is told.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// The ZDS socket served (the proxies' `INPOD_UDS`).
    pub socket: PathBuf,
    pub pods: PathBuf,
    /// The capture rules installed in each pod; `None`: none (the pods' rules are someone
    /// else's, as in tests of the protocol alone).
    pub capture: Option<RedirectArgs>,
    /// How long a removed pod keeps its capture rules after its `del`: removing the NAT rules
    /// ends the address translation of its live connections, so they could no longer be
    /// drained; the proxy's drain deadline (`CONNECTION_TERMINATION_DEADLINE`) should fit in it.
    pub removal_delay: Duration,
}

/// Runs the agent until the task is dropped.
pub async fn run(settings: AgentSettings) -> Result<(), AgentError> {
    let mut desired = read_pods(&settings.pods)?;
    let server = Server::bind(&settings.socket).map_err(|source| AgentError::Socket {
        path: settings.socket.clone(),
        source,
    })?;
    let mut watch = crate::localconfig::FileWatch::new(&settings.pods)?;
    tracing::info!(socket = %settings.socket.display(), pods = desired.len(), file = %settings.pods.display(), "node agent: serving ZDS");
    for pod in desired.values() {
        capture(&settings, pod, true).await;
    }
    let mut proxy: Option<Conn> = None;
    // Removed pods whose rules go at the instant given (a pod added again leaves this).
    let mut removals: BTreeMap<String, (tokio::time::Instant, AgentPod)> = BTreeMap::new();
    loop {
        let next_removal = removals.values().map(|(at, _)| *at).min();
        tokio::select! {
            () = async {
                match next_removal {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = tokio::time::Instant::now();
                let due: Vec<String> = removals
                    .iter()
                    .filter(|(_, (at, _))| *at <= now)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in due {
                    if let Some((_, pod)) = removals.remove(&uid) {
                        capture(&settings, &pod, false).await;
                    }
                }
            }
            accepted = server.accept() => match accepted {
                Ok(conn) => {
                    if proxy.is_some() {
                        tracing::info!("node agent: a new proxy connected; it replaces the previous one");
                    }
                    proxy = match replay(&conn, &desired).await {
                        Ok(()) => Some(conn),
                        Err(e) => {
                            tracing::warn!(error = %e, "node agent: the proxy's replay failed; waiting for it to reconnect");
                            None
                        }
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node agent: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // The proxy sends nothing between acks: a readable socket means it closed (or broke).
            r = async {
                match &proxy {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match r {
                    Ok(Some(p)) => tracing::warn!(bytes = p.bytes.len(), "node agent: unexpected packet from the proxy outside a request; dropping the connection"),
                    Ok(None) => tracing::info!("node agent: the proxy disconnected"),
                    Err(e) => tracing::warn!(error = %e, "node agent: the proxy connection failed"),
                }
                proxy = None;
            }
            changed = watch.changed() => {
                if changed.is_none() {
                    tracing::warn!("node agent: the pods file watch ended");
                    return Ok(());
                }
                let next = match read_pods(&settings.pods) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "node agent: keeping the last good pods file");
                        continue;
                    }
                };
                let old = std::mem::replace(&mut desired, next);
                for (uid, pod) in &old {
                    if desired.get(uid) != Some(pod) {
                        if let Some(c) = &proxy {
                            if let Err(e) = request(c, del(uid), None).await {
                                tracing::warn!(%uid, error = %e, "node agent: del failed; dropping the proxy connection");
                                proxy = None;
                            }
                        }
                        removals.insert(
                            uid.clone(),
                            (tokio::time::Instant::now() + settings.removal_delay, pod.clone()),
                        );
                    }
                }
                for (uid, pod) in &desired {
                    if old.get(uid) != Some(pod) {
                        removals.remove(uid);
                        capture(&settings, pod, true).await;
                        if let Some(c) = &proxy {
                            if let Err(e) = announce(c, pod).await {
                                tracing::warn!(%uid, error = %e, "node agent: add failed; dropping the proxy connection");
                                proxy = None;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// After a proxy's hello: every pod, then `snapshot_sent`.
async fn replay(conn: &Conn, pods: &BTreeMap<String, AgentPod>) -> std::io::Result<()> {
    let hello = tokio::time::timeout(ACK_TIMEOUT, conn.recv())
        .await
        .map_err(|_| std::io::Error::other("no ZdsHello from the proxy"))??
        .ok_or_else(|| std::io::Error::other("the proxy closed before its hello"))?;
    let h = pb::ZdsHello::decode(hello.bytes.as_slice())
        .map_err(|e| std::io::Error::other(format!("expected a ZdsHello: {e}")))?;
    if h.version != pb::Version::V1 as i32 {
        return Err(std::io::Error::other(format!(
            "the proxy speaks ZDS version {}; expected 1",
            h.version
        )));
    }
    for pod in pods.values() {
        announce(conn, pod).await?;
    }
    let snapshot = pb::WorkloadRequest {
        payload: Some(pb::workload_request::Payload::SnapshotSent(
            pb::SnapshotSent {},
        )),
    };
    request(conn, snapshot, None).await?;
    tracing::info!(
        pods = pods.len(),
        "node agent: replay to the proxy complete"
    );
    Ok(())
}

/// `add` of `pod` with its namespace; a pod whose namespace cannot be opened is skipped (logged).
async fn announce(conn: &Conn, pod: &AgentPod) -> std::io::Result<()> {
    let netns = match open_netns(&pod.netns) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(pod = %pod.name, netns = %pod.netns.display(), error = %e, "node agent: cannot open the pod's network namespace; not announced");
            return Ok(());
        }
    };
    let add = pb::WorkloadRequest {
        payload: Some(pb::workload_request::Payload::Add(pb::AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(pb::WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
        })),
    };
    let sent = std::time::Instant::now();
    request(conn, add, Some(netns)).await?;
    // How long the proxy took to start serving it (its ack comes once the listeners are bound).
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), ack_us = sent.elapsed().as_micros() as u64, "node agent: pod announced");
    Ok(())
}

fn del(uid: &str) -> pb::WorkloadRequest {
    pb::WorkloadRequest {
        payload: Some(pb::workload_request::Payload::Del(pb::DelWorkload {
            uid: uid.to_owned(),
        })),
    }
}

/// Sends one request and waits for its ack; an error ack is logged, not fatal.
async fn request(
    conn: &Conn,
    req: pb::WorkloadRequest,
    fd: Option<OwnedFd>,
) -> std::io::Result<()> {
    let fds: Vec<_> = fd.iter().map(AsFd::as_fd).collect();
    conn.send(&req.encode_to_vec(), &fds).await?;
    drop(fd);
    let p = tokio::time::timeout(ACK_TIMEOUT, conn.recv())
        .await
        .map_err(|_| std::io::Error::other(format!("no ack within {ACK_TIMEOUT:?}")))??
        .ok_or_else(|| std::io::Error::other("the proxy closed before acking"))?;
    let resp = pb::WorkloadResponse::decode(p.bytes.as_slice())
        .map_err(|e| std::io::Error::other(format!("expected a WorkloadResponse: {e}")))?;
    match resp.payload {
        Some(pb::workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(pb::workload_response::Payload::Ack(a)) => {
            tracing::warn!(request = ?req.payload, error = %a.error, "node agent: the proxy refused a request");
            Ok(())
        }
        None => Err(std::io::Error::other("a WorkloadResponse without an ack")),
    }
}

fn open_netns(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(path)?.into())
}

/// Installs (`on`) or removes the pod's capture rules inside its namespace: the commands run
/// from a thread that entered it, so they act on the pod's tables. Failures are logged.
async fn capture(settings: &AgentSettings, pod: &AgentPod, on: bool) {
    let Some(args) = settings.capture.clone() else {
        return;
    };
    let name = format!("{}/{}", pod.namespace, pod.name);
    let result = async {
        let ns = PodNetns::enter(open_netns(&pod.netns)?, &name).map_err(std::io::Error::other)?;
        let cmd = if on {
            RedirectCommand::Install(args)
        } else {
            RedirectCommand::Remove(args)
        };
        ns.run(move || crate::redirect::run(&cmd).map_err(std::io::Error::other))
            .await
            .map_err(std::io::Error::other)
    }
    .await;
    match result {
        Ok(()) => tracing::info!(pod = %name, installed = on, "node agent: capture rules updated"),
        Err(e) => {
            tracing::warn!(pod = %name, installing = on, error = %e, "node agent: capture rules could not be changed")
        }
    }
}
