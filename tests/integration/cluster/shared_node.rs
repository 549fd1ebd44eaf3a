//! A node of the simulated cluster in shared mode: one l4mesh (`PROXY_MODE=shared`) in the node's
//! namespace serving the node's mesh pods, handed over by one `l4mesh node-agent` (which also
//! installs their capture rules), both real processes. The agent's pods file lists the node's
//! members; tests change it to add and remove pods.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Child;

use super::netns::Output;
use super::topology::{Cluster, READY_PY};

/// One shared node: its processes and files.
pub struct SharedNode {
    l4mesh: Option<(Child, Output)>,
    /// The l4mesh replaced by an upgrade, while it drains.
    pub predecessor: Option<(Child, Output)>,
    agent: Option<(Child, Output)>,
    /// Logs of processes stopped earlier (a restart keeps them for failure messages).
    earlier: Vec<String>,
    pub pods_file: PathBuf,
    pub socket: PathBuf,
    /// The pods the agent announces.
    pub members: BTreeSet<&'static str>,
}

impl Drop for SharedNode {
    fn drop(&mut self) {
        kill(&mut self.predecessor, &mut self.earlier);
        self.stop_l4mesh();
        self.stop_agent();
    }
}

fn kill(p: &mut Option<(Child, Output)>, earlier: &mut Vec<String>) {
    if let Some((mut c, out)) = p.take() {
        let _ = c.kill();
        let _ = c.wait();
        earlier.push(out.all());
    }
}

impl SharedNode {
    /// Writes the pods file of node `i` with `members`, starts its agent and its l4mesh, and
    /// waits until l4mesh is ready (the agent's first snapshot acked).
    pub fn start(c: &Cluster, i: u8, members: BTreeSet<&'static str>) -> SharedNode {
        let mut n = SharedNode {
            l4mesh: None,
            predecessor: None,
            agent: None,
            earlier: Vec::new(),
            pods_file: c.dir().join(format!("node-{i}-pods.yaml")),
            socket: c.dir().join(format!("node-{i}-zds.sock")),
            members,
        };
        n.write_pods(c);
        n.start_agent(c, i);
        n.start_l4mesh(c, i);
        n
    }

    /// The pods file for the current members: uid `uid-<name>`, the namespace `ip netns` made.
    pub fn write_pods(&self, c: &Cluster) {
        let mut s = String::from("pods:\n");
        for name in &self.members {
            let p = c.pod(name);
            s += &format!(
                "- uid: uid-{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {}\n  netns: /var/run/netns/{}\n",
                p.spec.service_account, p.ns.name
            );
        }
        // Written whole and renamed: the agent never reads half a file.
        let tmp = self.pods_file.with_extension("tmp");
        std::fs::write(&tmp, s).unwrap();
        std::fs::rename(&tmp, &self.pods_file).unwrap();
    }

    pub fn start_agent(&mut self, c: &Cluster, i: u8) {
        kill(&mut self.agent, &mut self.earlier);
        let bin = env!("CARGO_BIN_EXE_l4mesh");
        let (sock, pods) = (
            self.socket.to_str().unwrap(),
            self.pods_file.to_str().unwrap(),
        );
        let args = [
            bin,
            "node-agent",
            "--socket",
            sock,
            "--pods",
            pods,
            "--backend",
            "iptables",
        ];
        // The cluster's extra environment reaches the agent too (AMBIENT_DNS_CAPTURE).
        let mut envs = vec![("RUST_LOG", "info")];
        envs.extend(c.extra_env().iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.agent = Some(c.node(i).spawn_owned(&args, &envs, "serving ZDS"));
    }

    pub fn stop_agent(&mut self) {
        kill(&mut self.agent, &mut self.earlier);
    }

    /// Starts (or restarts) the node's l4mesh and waits until it is ready.
    pub fn start_l4mesh(&mut self, c: &Cluster, i: u8) {
        kill(&mut self.l4mesh, &mut self.earlier);
        let ip = format!("10.240.0.{}", 10 + i);
        self.l4mesh = Some(self.spawn_l4mesh(c, i));
        let (ok, _, err) =
            c.node(i)
                .output(&["python3", "-c", READY_PY, &format!("{ip}:15021"), "20"]);
        assert!(
            ok,
            "shared l4mesh of node-{i} not ready within 20 s: {err}\n{}",
            self.logs(i)
        );
    }

    /// Upgrades the node's l4mesh: a new one started with the same configuration takes the
    /// running one's sockets through the hand-off socket; returns once the old one let go (it
    /// then drains, as [`SharedNode::predecessor`]).
    pub fn upgrade_l4mesh(&mut self, c: &Cluster, i: u8) {
        kill(&mut self.predecessor, &mut self.earlier);
        let new = self.spawn_l4mesh(c, i);
        self.predecessor = self.l4mesh.replace(new);
        let old = &self.predecessor.as_ref().expect("a running l4mesh").1;
        let took = super::topology::within(std::time::Duration::from_secs(30), || {
            old.wait_for(&["the successor is ready"])
        });
        assert!(took.is_some(), "node-{i}: no hand-off\n{}", self.logs(i));
    }

    fn spawn_l4mesh(&self, c: &Cluster, i: u8) -> (Child, Output) {
        let ip = format!("10.240.0.{}", 10 + i);
        let mut envs = c.l4mesh_env(i, &ip);
        envs.extend([
            ("PROXY_MODE".to_owned(), "shared".to_owned()),
            (
                "INPOD_UDS".to_owned(),
                self.socket.to_str().unwrap().to_owned(),
            ),
            ("POD_NAME".to_owned(), format!("l4mesh-node-{i}")),
            // Upgrades hand the listeners over (as a node would be deployed).
            (
                "L4MESH_HANDOFF_SOCKET".to_owned(),
                c.dir()
                    .join(format!("node-{i}-handoff.sock"))
                    .display()
                    .to_string(),
            ),
        ]);
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let bin = env!("CARGO_BIN_EXE_l4mesh");
        c.node(i).spawn_owned(&[bin], &envs, "listening")
    }

    pub fn stop_l4mesh(&mut self) {
        kill(&mut self.l4mesh, &mut self.earlier);
    }

    /// Waits (bounded) for a line of the running l4mesh's log containing every needle.
    pub fn wait_log(&self, needles: &[&str]) -> Option<String> {
        self.l4mesh.as_ref()?.1.wait_for(needles)
    }

    /// The running l4mesh's log so far.
    pub fn l4mesh_log(&self) -> String {
        self.l4mesh
            .as_ref()
            .map(|(_, o)| o.all())
            .unwrap_or_default()
    }

    /// Waits (bounded) for a line of the running agent's log containing every needle.
    pub fn wait_agent_log(&self, needles: &[&str]) -> Option<String> {
        self.agent.as_ref()?.1.wait_for(needles)
    }

    /// The running l4mesh's process id (benches measure and pin it).
    #[allow(dead_code)]
    pub fn l4mesh_pid(&self) -> Option<u32> {
        self.l4mesh.as_ref().map(|(c, _)| c.id())
    }

    /// The running agent's log so far.
    #[allow(dead_code)]
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|(_, o)| o.all())
            .unwrap_or_default()
    }

    pub fn logs(&self, i: u8) -> String {
        let now =
            |p: &Option<(Child, Output)>| p.as_ref().map(|(_, o)| o.all()).unwrap_or_default();
        format!(
            "---- earlier processes of node-{i}:\n{}\n---- node agent of node-{i}:\n{}\n---- predecessor l4mesh of node-{i}:\n{}\n---- shared l4mesh of node-{i}:\n{}",
            self.earlier.join("\n"),
            now(&self.agent),
            now(&self.predecessor),
            now(&self.l4mesh)
        )
    }
}
