//! A simulated cluster in network namespaces: a "fabric" namespace holding a bridge that joins the
//! nodes, the control plane and an outside host; each node a namespace that routes between its
//! pods' bridge and the fabric; each pod a namespace with one veth to its node. Mesh pods run the
//! real `l4mesh` binary in dedicated mode, with their capture rules installed by
//! `l4mesh redirect install`, following an xds-testserver (xDS + CA) in the control-plane namespace.
//!
//! Addresses (10.240.0.0/16): fabric 10.240.0.0/24 (control plane .2, outside host .3, node i
//! .10+i); node i's pods 10.240.i.0/24 with the node's gateway at .1. Everything the cluster
//! makes lives inside namespaces it created; dropping it (also on panic) kills every process and
//! deletes every namespace, which removes their links, rules and routes with them.

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use super::control_plane::ControlPlane;
use super::netns::{Netns, Output, ECHO_PY};

/// Where pods reach the control plane.
pub const CONTROL_PLANE_IP: &str = "10.240.0.2";
pub const CONTROL_PLANE_PORT: u16 = 15010;
/// A host outside the mesh, on the fabric.
pub const OUTSIDE_IP: &str = "10.240.0.3";

/// Polls `http://<argv[1]>/healthz/ready` until it answers 200; exits 1 after argv[2] seconds.
pub const READY_PY: &str = r#"
import sys, time, urllib.request
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        if urllib.request.urlopen('http://' + sys.argv[1] + '/healthz/ready', timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(1)
"#;

/// One pod of the cluster.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    /// Index of the node (1-based).
    pub node: u8,
    /// Last octet of the pod's IP on its node's subnet.
    pub host: u8,
    /// Further addresses of the pod (last octets on the same subnet).
    pub extra_hosts: Vec<u8>,
    /// Runs l4mesh with capture rules; false: a plain pod outside the mesh.
    pub mesh: bool,
    /// The service account (the workload's identity) in namespace `default`.
    pub service_account: &'static str,
    /// `iptables` or `nftables`: which backend `l4mesh redirect install` uses.
    pub backend: &'static str,
    /// The pod's l4mesh's `NETWORK` (empty: none, the default network).
    pub network: &'static str,
}

impl PodSpec {
    /// A pod of `node` at host `host` with the service account `sa`, in the mesh (`mesh`) with
    /// the iptables backend, and no further addresses.
    pub fn new(name: &'static str, node: u8, host: u8, sa: &'static str, mesh: bool) -> PodSpec {
        PodSpec {
            name,
            node,
            host,
            extra_hosts: Vec::new(),
            mesh,
            service_account: sa,
            backend: "iptables",
            network: "",
        }
    }

    pub fn ip(&self) -> String {
        format!("10.240.{}.{}", self.node, self.host)
    }
}

/// A pod: its namespace, its l4mesh (when in the mesh) and its collected log.
pub struct Pod {
    pub spec: PodSpec,
    /// How long its (dedicated) l4mesh took from start to ready, the last time it started.
    pub ready_after: Option<Duration>,
    l4mesh: Option<(Child, Output)>,
    pub ns: Netns,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop_l4mesh();
    }
}

impl Pod {
    /// Kills this pod's l4mesh (its capture rules stay, as when the proxy crashes).
    pub fn stop_l4mesh(&mut self) {
        if let Some((mut c, _)) = self.l4mesh.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id of the running l4mesh.
    pub fn l4mesh_pid(&self) -> Option<u32> {
        self.l4mesh.as_ref().map(|(c, _)| c.id())
    }

    /// The l4mesh log so far (empty when it is not running).
    pub fn log(&self) -> String {
        self.l4mesh
            .as_ref()
            .map(|(_, o)| o.all())
            .unwrap_or_default()
    }

    /// Waits (bounded) for a line of this pod's l4mesh log containing every needle.
    pub fn wait_log(&self, needles: &[&str]) -> Option<String> {
        self.l4mesh.as_ref()?.1.wait_for(needles)
    }

    /// Runs a command in the pod; (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        self.ns.output(args)
    }
}

/// The whole topology. Fields drop in order: processes first, then namespaces.
pub struct Cluster {
    pub control: ControlPlane,
    pub pods: BTreeMap<&'static str, Pod>,
    pub outside: Netns,
    nodes: Vec<Netns>,
    _cp: Netns,
    _fabric: Netns,
    /// Nodes in shared mode (by index): one l4mesh and one node agent each, serving their pods.
    pub shared: BTreeMap<u8, super::shared_node::SharedNode>,
    dir: tempfile::TempDir,
    prefix: String,
    l4mesh_env: Vec<(String, String)>,
}

impl Cluster {
    /// Builds `nodes` nodes and the pods, starts the control plane on `state` (local-config YAML)
    /// and every mesh pod's l4mesh, and waits until each is ready. `prefix` starts every namespace
    /// name, so that clusters of concurrent tests never share one; `l4mesh_env` is added to (and
    /// overrides) the environment every l4mesh gets.
    pub fn start(
        prefix: &str,
        nodes: u8,
        pods: &[PodSpec],
        state: &str,
        l4mesh_env: &[(&str, &str)],
    ) -> Cluster {
        Self::start_mixed(prefix, nodes, pods, state, l4mesh_env, &[])
    }

    /// [`Cluster::start`] with the nodes of `shared` in shared mode: one l4mesh per node
    /// (`PROXY_MODE=shared`, in the node's namespace) and one `l4mesh node-agent` that hands it
    /// the node's mesh pods and installs their capture rules; the other nodes as before.
    pub fn start_mixed(
        prefix: &str,
        nodes: u8,
        pods: &[PodSpec],
        state: &str,
        l4mesh_env: &[(&str, &str)],
        shared: &[u8],
    ) -> Cluster {
        let t0 = Instant::now();
        let fabric = Netns::new(&format!("{prefix}fab"));
        fabric.exec(&["ip", "link", "add", "name", "br0", "type", "bridge"]);
        fabric.exec(&["ip", "link", "set", "br0", "up"]);
        // Hosts on the fabric: the control plane, the outside host, the nodes.
        let attach = |ns: &Netns, port: &str, cidr: &str| {
            fabric.exec(&[
                "ip", "link", "add", "name", port, "type", "veth", "peer", "name", "fab", "netns",
                &ns.name,
            ]);
            fabric.exec(&["ip", "link", "set", port, "master", "br0", "up"]);
            ns.exec(&["ip", "addr", "add", cidr, "dev", "fab"]);
            ns.exec(&["ip", "link", "set", "fab", "up"]);
        };
        let node_routes = |ns: &Netns, except: Option<u8>| {
            for k in 1..=nodes {
                if Some(k) != except {
                    ns.exec(&[
                        "ip",
                        "route",
                        "add",
                        &format!("10.240.{k}.0/24"),
                        "via",
                        &format!("10.240.0.{}", 10 + k),
                    ]);
                }
            }
        };
        let cp = Netns::new(&format!("{prefix}cp"));
        attach(&cp, "cp", &format!("{CONTROL_PLANE_IP}/24"));
        node_routes(&cp, None);
        let outside = Netns::new(&format!("{prefix}out"));
        attach(&outside, "out", &format!("{OUTSIDE_IP}/24"));
        node_routes(&outside, None);
        let mut node_ns = Vec::new();
        for i in 1..=nodes {
            let n = Netns::new(&format!("{prefix}n{i}"));
            attach(&n, &format!("n{i}"), &format!("10.240.0.{}/24", 10 + i));
            // /proc/sys/net is per namespace (no dependency on procps's sysctl).
            n.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
            n.exec(&["ip", "link", "add", "name", "pods", "type", "bridge"]);
            n.exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.240.{i}.1/24"),
                "dev",
                "pods",
            ]);
            n.exec(&["ip", "link", "set", "pods", "up"]);
            node_routes(&n, Some(i));
            node_ns.push(n);
        }

        let dir = tempfile::tempdir().unwrap();
        let control = ControlPlane::start(
            &cp.name,
            format!("{CONTROL_PLANE_IP}:{CONTROL_PLANE_PORT}")
                .parse()
                .unwrap(),
            state,
        );
        let root = dir.path().join("root-cert.pem");
        std::fs::write(&root, control.handle.root_cert_pem().unwrap()).unwrap();

        let mut cluster = Cluster {
            control,
            pods: BTreeMap::new(),
            outside,
            nodes: node_ns,
            _cp: cp,
            _fabric: fabric,
            shared: BTreeMap::new(),
            dir,
            prefix: prefix.to_owned(),
            l4mesh_env: l4mesh_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for spec in pods {
            let pod = cluster.add_pod(spec.clone(), shared.contains(&spec.node));
            cluster.pods.insert(spec.name, pod);
        }
        for &i in shared {
            let members = pods
                .iter()
                .filter(|p| p.mesh && p.node == i)
                .map(|p| p.name)
                .collect();
            let node = super::shared_node::SharedNode::start(&cluster, i, members);
            cluster.shared.insert(i, node);
        }
        for spec in pods.iter().filter(|p| p.mesh && !shared.contains(&p.node)) {
            cluster.start_l4mesh(spec.name);
        }
        eprintln!(
            "cluster: {nodes} nodes, {} pods up in {:?}",
            pods.len(),
            t0.elapsed()
        );
        cluster
    }

    /// A pod's namespace and address; a mesh pod of a dedicated node gets its capture rules
    /// here (on a shared node, the node agent installs them).
    fn add_pod(&self, spec: PodSpec, shared: bool) -> Pod {
        let node = &self.nodes[usize::from(spec.node - 1)];
        let ns = Netns::new(&format!("{}{}", self.prefix, spec.name));
        let port = format!("p-{}", spec.name);
        node.exec(&[
            "ip", "link", "add", "name", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ]);
        node.exec(&["ip", "link", "set", &port, "master", "pods", "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", spec.ip()),
            "dev",
            "eth0",
        ]);
        for h in &spec.extra_hosts {
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.240.{}.{h}/24", spec.node),
                "dev",
                "eth0",
            ]);
        }
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.240.{}.1", spec.node),
        ]);
        if spec.mesh && !shared {
            let bin = env!("CARGO_BIN_EXE_l4mesh");
            let (ok, out, err) =
                ns.output(&[bin, "redirect", "install", "--backend", spec.backend]);
            assert!(ok, "l4mesh redirect install in {}: {out} {err}", spec.name);
        }
        Pod {
            spec,
            ready_after: None,
            l4mesh: None,
            ns,
        }
    }

    /// Starts (or restarts) the pod's l4mesh and waits until it reports ready.
    pub fn start_l4mesh(&mut self, pod: &str) {
        let root = self.dir.path().join("root-cert.pem");
        let p = self.pods.get_mut(pod).expect("no such pod");
        p.stop_l4mesh();
        let (ip, node, name) = (p.spec.ip(), format!("node-{}", p.spec.node), p.spec.name);
        let info = format!("default/{name}/{}", p.spec.service_account);
        let bin = env!("CARGO_BIN_EXE_l4mesh");
        let mut envs = base_env(&root, &node, &ip, &self.l4mesh_env);
        envs.extend([
            ("PROXY_WORKLOAD_INFO".to_owned(), info),
            ("POD_NAME".to_owned(), name.to_owned()),
        ]);
        if !p.spec.network.is_empty() {
            envs.push(("NETWORK".to_owned(), p.spec.network.to_owned()));
        }
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let started = Instant::now();
        let (child, out) = p.ns.spawn_owned(&[bin], &envs, "listening");
        p.l4mesh = Some((child, out));
        let (ok, _, err) = p.run(&["python3", "-c", READY_PY, &format!("{ip}:15021"), "20"]);
        p.ready_after = Some(started.elapsed());
        assert!(
            ok,
            "l4mesh in {pod} not ready within 20 s: {err}\nlog:\n{}",
            p.log()
        );
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.get(name).expect("no such pod")
    }

    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods.get_mut(name).expect("no such pod")
    }

    /// Starts an [`ECHO_PY`] server named `name` on `ip:port` inside `pod`.
    pub fn echo(&mut self, pod: &str, ip: &str, port: u16, name: &str) -> Output {
        let p = self.pods.get_mut(pod).expect("no such pod");
        p.ns.spawn(
            &["python3", "-c", ECHO_PY, ip, &port.to_string(), name],
            &[],
            "ready",
        )
    }

    /// The names of every namespace of the cluster (to check that they are gone after drop).
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pods.values().map(|p| p.ns.name.clone()).collect();
        v.extend(self.nodes.iter().map(|n| n.name.clone()));
        v.extend([
            self.outside.name.clone(),
            self._cp.name.clone(),
            self._fabric.name.clone(),
        ]);
        v
    }

    /// Every l4mesh log, for failure messages.
    pub fn logs(&self) -> String {
        self.pods
            .values()
            .filter(|p| p.spec.mesh && !self.shared.contains_key(&p.spec.node))
            .map(|p| format!("---- l4mesh in {}:\n{}", p.spec.name, p.log()))
            .chain(self.shared.iter().map(|(i, n)| n.logs(*i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The namespace of node `i` (1-based).
    pub fn node(&self, i: u8) -> &Netns {
        &self.nodes[usize::from(i - 1)]
    }

    /// Node `i`, to start a process of its own (killed with the cluster).
    #[allow(dead_code)]
    pub fn node_mut(&mut self, i: u8) -> &mut Netns {
        &mut self.nodes[usize::from(i - 1)]
    }

    /// The directory of the cluster's files (root certificate, pods files, sockets).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The environment added to every l4mesh (and node agent) of this cluster.
    pub fn extra_env(&self) -> &[(String, String)] {
        &self.l4mesh_env
    }

    /// The environment every l4mesh gets, in either mode.
    pub fn l4mesh_env(&self, node: u8, ip: &str) -> Vec<(String, String)> {
        let root = self.dir.path().join("root-cert.pem");
        base_env(&root, &format!("node-{node}"), ip, &self.l4mesh_env)
    }
}

/// The environment of an l4mesh of `node` at `ip`, following the cluster's control plane;
/// `extra` is added last (and overrides).
fn base_env(
    root: &std::path::Path,
    node: &str,
    ip: &str,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let xds = format!("http://{CONTROL_PLANE_IP}:{CONTROL_PLANE_PORT}");
    let mut envs: Vec<(String, String)> = [
        ("XDS_ADDRESS", xds.as_str()),
        // The test control plane serves plaintext on the fabric.
        ("L4MESH_ALLOW_PLAINTEXT_CONTROL_PLANE", "true"),
        ("CA_ROOT_CA", root.to_str().unwrap()),
        ("AUTH_TOKEN", "/nonexistent/l4mesh-test-token"),
        ("NODE_NAME", node),
        ("POD_NAMESPACE", "default"),
        ("INSTANCE_IP", ip),
        ("UNSTABLE_ENABLE_SOCKS5", "false"),
        ("CONNECT_TIMEOUT", "3s"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    envs.extend(extra.iter().cloned());
    envs
}

/// Retries `f` every 100 ms until it returns `Some` or `limit` passes.
pub fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
