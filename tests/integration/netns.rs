//! A throwaway network topology for privileged tests: network namespaces joined by veth pairs,
//! processes started inside them, all removed on drop (even when the test fails).
//! Tests using it call [`privileged`] first and skip with a clear message when not root — or fail,
//! when `L4MESH_REQUIRE_PRIVILEGED=1` says they must run (scripts/test.sh sets it as root, so CI
//! cannot pass by skipping them).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether privileged tests can run here: root, and `ip`, `iptables`, `python3` plus the extra
/// `tools` this test needs (nft, setpriv, ip6tables…) on PATH. Prints why not when they cannot —
/// or fails, when `L4MESH_REQUIRE_PRIVILEGED=1` says they must run, so a missing tool cannot turn
/// a CI run into a silent skip.
pub fn privileged(test: &str, tools: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let missing: Vec<&str> = ["ip", "iptables", "python3"]
        .iter()
        .chain(tools)
        .copied()
        .filter(|t| !has_tool(t))
        .collect();
    if !root || !missing.is_empty() {
        let why = format!(
            "{test}: needs root and {missing:?} on PATH (root: {root}; scripts/test.sh installs the tools; run it as root)"
        );
        assert!(
            std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "L4MESH_REQUIRE_PRIVILEGED=1 but {why}"
        );
        eprintln!("SKIPPED {why}");
        return false;
    }
    true
}

/// Whether `tool` is on PATH.
pub fn has_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether `setpriv` (util-linux) is on PATH, asked once.
fn has_setpriv() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| has_tool("setpriv"))
}

/// The longest a one-shot command (`exec`, `output`, `l4mesh redirect`) may run: a hung command
/// fails the test instead of hanging it (coreutils `timeout` kills it).
pub const COMMAND_TIMEOUT_SECS: u32 = 60;

fn run(args: &[&str]) {
    let out = Command::new("timeout")
        .arg(COMMAND_TIMEOUT_SECS.to_string())
        .args(args)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed ({}; 124 = timed out after {COMMAND_TIMEOUT_SECS}s): {}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the `l4m-<tag>-<pid>` namespaces left by test processes that are gone (killed without
/// unwinding, so their `Drop` never ran). Namespaces of live processes are left alone.
fn sweep_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("l4m-")
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A network namespace, deleted on drop (which also removes its veth ends and rules).
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_leftovers);
        let name = format!("l4m-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Runs a command inside the namespace and returns (success, stdout, stderr).
    pub fn output(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("timeout")
            .arg(COMMAND_TIMEOUT_SECS.to_string())
            .args(["ip", "netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("spawn");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a long-running process in the namespace; it is killed on drop. Waits until a line of
    /// its stdout or stderr contains `ready` (or 10 s pass), and keeps collecting its output.
    pub fn spawn(&mut self, args: &[&str], envs: &[(&str, &str)], ready: &str) -> Output {
        let (child, output) = self.spawn_owned(args, envs, ready);
        self.children.push(child);
        output
    }

    /// [`Netns::spawn`], but the caller owns (and must kill) the process.
    pub fn spawn_owned(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
        ready: &str,
    ) -> (Child, Output) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        // Killed with the test process even when it dies without unwinding (SIGPIPE, SIGKILL):
        // an orphan would keep its namespace busy and hold whatever file locks it inherited.
        if has_setpriv() {
            cmd.args(["setpriv", "--pdeathsig", "KILL"]);
        }
        cmd.args(args);
        collect(cmd, args, envs, ready)
    }

    /// Joins this namespace to `other` with a veth pair, addressing both ends on a /24.
    pub fn link(&self, other: &Netns, tag: &str, my_cidr: &str, other_cidr: &str) {
        let a = format!("va-{tag}");
        let b = format!("vb-{tag}");
        run(&[
            "ip",
            "link",
            "add",
            &a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]);
        self.exec(&["ip", "addr", "add", my_cidr, "dev", &a]);
        self.exec(&["ip", "link", "set", &a, "up"]);
        other.exec(&["ip", "addr", "add", other_cidr, "dev", &b]);
        other.exec(&["ip", "link", "set", &b, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Starts `cmd` (its output piped) and waits until a line of it contains `ready` (or 10 s
/// pass; not at all for an empty `ready`), collecting its output.
fn collect(mut cmd: Command, args: &[&str], envs: &[(&str, &str)], ready: &str) -> (Child, Output) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        let tx = tx.clone();
        let ready = ready.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    // An empty `ready`: the process may print nothing; the caller waits its own way.
    if !ready.is_empty() && rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{args:?} did not print {ready:?} within 10s; output: {:#?}",
            lines.lock().unwrap()
        );
    }
    (child, Output { lines })
}

/// A process on the host's own network (tests whose l4mesh runs in-process on loopback), its
/// output collected as [`Netns::spawn_owned`]'s; the caller owns (and must kill) it.
pub fn spawn_on_host(args: &[&str], envs: &[(&str, &str)], ready: &str) -> (Child, Output) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    collect(cmd, args, envs, ready)
}

/// The collected output lines of a spawned process.
pub struct Output {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Output {
    /// Waits up to 5 s for a line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> Option<String> {
        for _ in 0..100 {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// A TCP server (python) that answers each connection, after the client's FIN, with
/// `<name>:<peer ip>:<data>`, and prints `got <peer ip> <data>` for each one (so a test can tell
/// what reached it, and what did not). Prints `ready` once listening. IPv4 or IPv6 by `ip`.
pub const ECHO_PY: &str = r#"
import socket, sys, threading
ip, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port)); s.listen(128)
print('ready', flush=True)
def serve(c, a):
    c.settimeout(10)
    data = b''
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk: break
            data += chunk
        print('got', a[0], data.decode(errors='replace'), flush=True)
        c.sendall(name + b':' + a[0].encode() + b':' + data)
    except OSError:
        pass
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;

/// A TCP client (python): sends argv[3], half-closes, prints the answer; exits 1 on failure.
pub const CLIENT_PY: &str = r#"
import socket, sys
ip, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
try:
    c = socket.create_connection((ip, port), timeout=5)
    c.sendall(msg); c.shutdown(socket.SHUT_WR)
    out = b''
    while True:
        chunk = c.recv(65536)
        if not chunk: break
        out += chunk
    print(out.decode())
    sys.exit(0 if out else 1)
except OSError as e:
    print('error:', e); sys.exit(1)
"#;
