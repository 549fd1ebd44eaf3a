//! `l4mesh redirect install|remove`: the capture rules of a pod's network namespace in dedicated
//! mode, with an iptables or an nftables backend.
//!
//! - outbound TCP → `REDIRECT` to 15001 (the outbound listener reads `SO_ORIGINAL_DST`);
//! - inbound TCP to the pod → `REDIRECT` to 15006, except the HBONE port 15008;
//! - with `--dns-capture`, DNS (UDP and TCP port 53, not to loopback) → `REDIRECT` to 15053;
//! - packets carrying the packet mark (l4mesh's own sockets, `SO_MARK`; matched under istio-cni's
//!   mask, `0x539/0xfff`, see [`mark_mask`]), loopback traffic
//!   (`-o lo` / `-i lo`, which includes the pod talking to its own IP) and excluded ports are
//!   left alone.
//!
//! - for `ENABLE_ORIG_SRC` (l4mesh connects to the pod's app from the *client's* IP with
//!   `IP_TRANSPARENT`), the app's replies must come back to l4mesh instead of leaving the pod:
//!   connections opened by l4mesh's marked sockets get the conntrack mark 0x111/0xfff, the app's
//!   packets of those connections are given that mark, and `ip rule fwmark 0x111/0xfff lookup 100`
//!   with `local 0.0.0.0/0 dev lo` in table 100 delivers them locally — what istio-cni installs
//!   in a pod for ztunnel; IPv4 and IPv6, tagged as l4mesh's (`routing`).
//! - IPv6: the nftables table is `inet` (both families); the iptables backend writes the same
//!   chains with `ip6tables` when it is installed.
//! - `remove` removes both backends' rules (and `install` runs it first), so switching backend
//!   leaves no stale capture behind.
//!
//! Rule generation is pure ([`install_plan`], [`remove_plan`]) and unit-tested; [`run`] is the thin
//! layer that executes the commands. All of l4mesh's `std::process::Command` use is in this module.

use std::fmt;

/// Where outbound TCP is redirected (the outbound capture listener).
pub const OUTBOUND_PORT: u16 = 15001;
/// Where inbound TCP is redirected (the inbound plaintext capture listener).
pub const INBOUND_PORT: u16 = 15006;
/// Where captured DNS is redirected (the DNS proxy).
pub const DNS_PORT: u16 = 15053;
/// The HBONE port: inbound tunnels reach l4mesh directly, never redirected.
pub const HBONE_PORT: u16 = 15008;
/// iptables chains (nat table) owned by l4mesh.
pub const IPT_OUTPUT_CHAIN: &str = "L4MESH_OUTPUT";
pub const IPT_PREROUTING_CHAIN: &str = "L4MESH_PREROUTING";
/// iptables chains (mangle table) owned by l4mesh, for the replies of orig-source connections.
pub const IPT_MANGLE_OUTPUT_CHAIN: &str = "L4MESH_MANGLE_OUTPUT";
pub const IPT_MANGLE_PREROUTING_CHAIN: &str = "L4MESH_MANGLE_PREROUTING";
/// nftables table (family inet: IPv4 and IPv6) owned by l4mesh.
pub const NFT_TABLE: &str = "l4mesh";

/// Which firewall tool writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables` and `ip6tables` (when installed): chains L4MESH_OUTPUT / L4MESH_PREROUTING (nat)
    /// and L4MESH_MANGLE_* (mangle).
    Iptables,
    /// `nft`: table `inet l4mesh` (IPv4 and IPv6) with nat chains on the output and prerouting hooks.
    Nftables,
}

/// `l4mesh redirect …`
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum RedirectCommand {
    /// Installs the capture rules (removing any previous ones first).
    Install(RedirectArgs),
    /// Removes every rule `install` created, whichever backend did (`--backend` is ignored);
    /// succeeds when none is installed.
    Remove(RedirectArgs),
}

/// Options of `l4mesh redirect install|remove`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RedirectArgs {
    /// iptables or nftables; default nftables when `nft` is on PATH, else iptables.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Packets with this mark (l4mesh's own sockets) are never redirected; must match l4mesh's.
    #[arg(long, env = "PACKET_MARK", default_value_t = 1337, value_parser = clap::value_parser!(u32).range(1..))]
    pub packet_mark: u32,
    /// Inbound destination ports left alone (comma list). The default keeps kubelet's probes of
    /// the readiness (15021) and metrics (15020) ports off the proxy path, as istio-cni does;
    /// HBONE (15008) is always left alone.
    #[arg(long, value_delimiter = ',', default_values_t = [15020u16, 15021])]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma list).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Also redirect the pod's DNS (UDP and TCP port 53, not to loopback) to l4mesh's DNS proxy
    /// on 15053 (DNS capture); l4mesh's own queries carry the mark. Also read from
    /// `AMBIENT_DNS_CAPTURE`, istio-cni's variable for the same rules.
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::parse_bool, action = clap::ArgAction::Set)]
    pub dns_capture: bool,
}

/// What the rules do, independent of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub packet_mark: u32,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Port 53 → [`DNS_PORT`].
    pub dns_capture: bool,
}

impl From<&RedirectArgs> for Rules {
    fn from(a: &RedirectArgs) -> Self {
        let dedup = |v: &[u16]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        Self {
            packet_mark: a.packet_mark,
            exclude_inbound_ports: dedup(&a.exclude_inbound_ports),
            exclude_outbound_ports: dedup(&a.exclude_outbound_ports),
            dns_capture: a.dns_capture,
        }
    }
}

/// One command to run: program, arguments, optional standard input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    /// An "already exists" failure means someone else's identical entry is there (istio-cni's
    /// route): not an error, and not ours to roll back.
    pub exists_is_foreign: bool,
}

impl Cmd {
    fn new(program: &str, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            stdin: None,
            exists_is_foreign: false,
        }
    }

    /// An `iptables` or `ip6tables` (`program`) command from a whitespace-separated line.
    fn ipt(program: &str, args: &str) -> Self {
        Self {
            program: program.into(),
            args: args.split_whitespace().map(str::to_owned).collect(),
            stdin: None,
            exists_is_foreign: false,
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        if self.stdin.is_some() {
            write!(f, " (script on stdin)")?;
        }
        Ok(())
    }
}

/// The iptables backend writes its rules with both of these (IPv4, and IPv6 when `ip6tables` is
/// installed), the same chains in each: without the IPv6 ones, IPv6 TCP would bypass the capture.
pub const IPTABLES_PROGRAMS: [&str; 2] = ["iptables", "ip6tables"];

/// The commands that list what is installed, one per table (iptables: nat then mangle); their
/// outputs, each after a `*<table>` line, feed [`remove_plan`].
pub fn list_cmds(backend: Backend) -> Vec<(&'static str, Cmd)> {
    match backend {
        Backend::Iptables => iptables_list_cmds("iptables"),
        Backend::Nftables => vec![("", Cmd::new("nft", &["list", "tables"]))],
    }
}

/// [`list_cmds`] of the iptables backend for `program` (`iptables` or `ip6tables`).
pub fn iptables_list_cmds(program: &str) -> Vec<(&'static str, Cmd)> {
    vec![
        ("nat", Cmd::ipt(program, "-t nat -S")),
        ("mangle", Cmd::ipt(program, "-t mangle -S")),
    ]
}

/// The commands that remove l4mesh's rules, given the output of [`list_cmds`] (for iptables, each
/// table's `-S` listing after a `*nat` / `*mangle` line; nat when there is none): only what
/// l4mesh created (its chains / table and the jumps into them), nothing when nothing is installed.
pub fn remove_plan(backend: Backend, listing: &str) -> Vec<Cmd> {
    match backend {
        Backend::Iptables => iptables_remove_plan("iptables", listing),
        Backend::Nftables => {
            let present = listing
                .lines()
                .any(|l| l.split_whitespace().eq(["table", "inet", NFT_TABLE]));
            if present {
                vec![Cmd::new("nft", &["delete", "table", "inet", NFT_TABLE])]
            } else {
                Vec::new()
            }
        }
    }
}

/// [`remove_plan`] of the iptables backend for `program` (`iptables` or `ip6tables`).
pub fn iptables_remove_plan(program: &str, listing: &str) -> Vec<Cmd> {
    {
        {
            let mut cmds = Vec::new();
            let mut sections: Vec<(&str, Vec<&str>)> = vec![("nat", Vec::new())];
            for line in listing.lines() {
                if let Some(t) = line.trim().strip_prefix('*') {
                    let table = if t == "mangle" { "mangle" } else { "nat" };
                    sections.push((table, Vec::new()));
                } else if let Some((_, lines)) = sections.last_mut() {
                    lines.push(line);
                }
            }
            for (table, lines) in &sections {
                let ours = match *table {
                    "mangle" => [IPT_MANGLE_OUTPUT_CHAIN, IPT_MANGLE_PREROUTING_CHAIN],
                    _ => [IPT_OUTPUT_CHAIN, IPT_PREROUTING_CHAIN],
                };
                iptables_remove_table(program, table, &ours, lines, &mut cmds);
            }
            cmds
        }
    }
}

/// Removes the jumps into `ours` and the chains themselves from one table's `-S` listing.
fn iptables_remove_table(
    program: &str,
    table: &str,
    ours: &[&str; 2],
    lines: &[&str],
    cmds: &mut Vec<Cmd>,
) {
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["-A", chain @ ("OUTPUT" | "PREROUTING"), rest @ ..] = words.as_slice() {
            if rest
                .windows(2)
                .any(|w| w[0] == "-j" && ours.contains(&w[1]))
            {
                let mut args = vec!["-t", table, "-D", chain];
                args.extend_from_slice(rest);
                cmds.push(Cmd::new(program, &args));
            }
        }
    }
    for chain in ours {
        if lines
            .iter()
            .any(|l| l.split_whitespace().eq(["-N", *chain]))
        {
            cmds.push(Cmd::new(program, &["-t", table, "-F", chain]));
            cmds.push(Cmd::new(program, &["-t", table, "-X", chain]));
        }
    }
}

/// The commands that install the rules (run after [`remove_plan`], which makes `install`
/// idempotent). nftables is one atomic script; iptables is a sequence of commands.
pub fn install_plan(backend: Backend, rules: &Rules) -> Vec<Cmd> {
    match backend {
        Backend::Iptables => iptables_install("iptables", rules),
        Backend::Nftables => {
            let mut cmd = Cmd::new("nft", &["-f", "-"]);
            cmd.stdin = Some(nft_script(rules));
            vec![cmd]
        }
    }
}

/// The mask under which the packet mark is matched: istio-cni's `0xfff` (so other bits set by
/// someone else do not defeat the match: `0x539/0xfff`), or every bit for a mark that does not
/// fit in it.
pub fn mark_mask(mark: u32) -> u32 {
    if mark & !0xfff == 0 {
        0xfff
    } else {
        u32::MAX
    }
}

/// The install commands of the iptables backend for `program` (`iptables` or `ip6tables`).
pub fn iptables_install(program: &str, r: &Rules) -> Vec<Cmd> {
    let (out, pre) = (IPT_OUTPUT_CHAIN, IPT_PREROUTING_CHAIN);
    let mark = format!("{:#x}/{:#x}", r.packet_mark, mark_mask(r.packet_mark));
    let ipt = |args: &str| Cmd::ipt(program, args);
    let mut v = vec![
        ipt(&format!("-t nat -N {out}")),
        ipt(&format!("-t nat -A {out} -m mark --mark {mark} -j RETURN")),
        ipt(&format!(
            "-t nat -A {out} -m mark --mark {ROUTE_MARK:#x}/{ROUTE_MASK:#x} -j RETURN"
        )),
        ipt(&format!("-t nat -A {out} -o lo -j RETURN")),
    ];
    if r.dns_capture {
        for proto in ["udp", "tcp"] {
            v.push(ipt(&format!(
                "-t nat -A {out} -p {proto} --dport 53 -j REDIRECT --to-ports {DNS_PORT}"
            )));
        }
    }
    for p in &r.exclude_outbound_ports {
        v.push(ipt(&format!(
            "-t nat -A {out} -p tcp --dport {p} -j RETURN"
        )));
    }
    v.push(ipt(&format!(
        "-t nat -A {out} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"
    )));
    v.extend([
        ipt(&format!("-t nat -N {pre}")),
        ipt(&format!("-t nat -A {pre} -m mark --mark {mark} -j RETURN")),
        ipt(&format!("-t nat -A {pre} -i lo -j RETURN")),
        ipt(&format!(
            "-t nat -A {pre} -p tcp --dport {HBONE_PORT} -j RETURN"
        )),
    ]);
    for p in &r.exclude_inbound_ports {
        v.push(ipt(&format!(
            "-t nat -A {pre} -p tcp --dport {p} -j RETURN"
        )));
    }
    v.extend([
        ipt(&format!(
            "-t nat -A {pre} -p tcp -j REDIRECT --to-ports {INBOUND_PORT}"
        )),
        ipt(&format!("-t nat -A OUTPUT -p tcp -j {out}")),
        ipt(&format!("-t nat -A PREROUTING -p tcp -j {pre}")),
    ]);
    if r.dns_capture {
        v.push(ipt(&format!("-t nat -A OUTPUT -p udp --dport 53 -j {out}")));
    }
    let (mout, mpre) = (IPT_MANGLE_OUTPUT_CHAIN, IPT_MANGLE_PREROUTING_CHAIN);
    let (rm, rk) = (ROUTE_MARK, ROUTE_MASK);
    v.extend([
        ipt(&format!("-t mangle -N {mpre}")),
        ipt(&format!(
            "-t mangle -A {mpre} -m mark --mark {mark} -j CONNMARK --set-xmark {rm:#x}/{rk:#x}"
        )),
        ipt(&format!("-t mangle -N {mout}")),
        ipt(&format!(
            "-t mangle -A {mout} -m connmark --mark {rm:#x}/{rk:#x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
        )),
        ipt(&format!("-t mangle -A PREROUTING -j {mpre}")),
        ipt(&format!("-t mangle -A OUTPUT -j {mout}")),
    ]);
    v
}

fn nft_ports(ports: &[u16]) -> String {
    match ports {
        [p] => p.to_string(),
        _ => format!(
            "{{ {} }}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The nftables script: (re)creates `table inet l4mesh` in one transaction (the `add`/`delete`
/// pair makes it idempotent).
pub fn nft_script(r: &Rules) -> String {
    let mark = format!(
        "meta mark & {:#x} == {:#x}",
        mark_mask(r.packet_mark),
        r.packet_mark
    );
    let mut s = format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
    s.push_str(&format!("table inet {NFT_TABLE} {{\n"));
    s.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
    s.push_str(&format!("    {mark} return\n"));
    s.push_str(&format!(
        "    meta mark & {ROUTE_MASK:#x} == {ROUTE_MARK:#x} return\n"
    ));
    s.push_str("    oifname \"lo\" return\n");
    if r.dns_capture {
        s.push_str(&format!(
            "    udp dport 53 redirect to :{DNS_PORT}\n    tcp dport 53 redirect to :{DNS_PORT}\n"
        ));
    }
    if !r.exclude_outbound_ports.is_empty() {
        s.push_str(&format!(
            "    tcp dport {} return\n",
            nft_ports(&r.exclude_outbound_ports)
        ));
    }
    s.push_str(&format!(
        "    meta l4proto tcp redirect to :{OUTBOUND_PORT}\n  }}\n"
    ));
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n",
    );
    s.push_str(&format!("    {mark} return\n"));
    s.push_str("    iifname \"lo\" return\n");
    s.push_str(&format!("    tcp dport {HBONE_PORT} return\n"));
    if !r.exclude_inbound_ports.is_empty() {
        s.push_str(&format!(
            "    tcp dport {} return\n",
            nft_ports(&r.exclude_inbound_ports)
        ));
    }
    s.push_str(&format!(
        "    meta l4proto tcp redirect to :{INBOUND_PORT}\n  }}\n"
    ));
    // Connections l4mesh opens from a client's address: mark them, and route their replies
    // locally (a `route` chain re-routes when the mark changes, as iptables' mangle OUTPUT does).
    let keep = !ROUTE_MASK;
    s.push_str(&format!(
        "  chain mangle_prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    {mark} ct mark set ct mark & {keep:#x} | {ROUTE_MARK:#x}\n  }}\n"
    ));
    s.push_str(&format!(
        "  chain mangle_output {{\n    type route hook output priority mangle; policy accept;\n    ct mark & {ROUTE_MASK:#x} == {ROUTE_MARK:#x} meta mark set ct mark\n  }}\n}}\n"
    ));
    s
}

/// The default backend: nftables when `nft` is on PATH, else iptables.
pub fn default_backend() -> Backend {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("nft").is_file()));
    if found {
        Backend::Nftables
    } else {
        Backend::Iptables
    }
}

/// A command that could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("could not run `{cmd}`: {error} (hint: {hint})")]
    Spawn {
        cmd: String,
        error: std::io::Error,
        hint: String,
    },
    #[error("`{cmd}` failed with {status}: {stderr} (hint: {hint})")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
        hint: String,
    },
}

fn hint(cmd: &Cmd, stderr: &str, spawn: Option<&std::io::Error>) -> String {
    let other = if cmd.program == "nft" {
        "--backend iptables"
    } else {
        "--backend nftables"
    };
    if spawn.is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return format!("is {} installed and on PATH? or try {other}", cmd.program);
    }
    let s = stderr.to_ascii_lowercase();
    if s.contains("permission denied") || s.contains("operation not permitted") {
        return "not root? run as root (CAP_NET_ADMIN) inside the pod's network namespace, e.g. `ip netns exec <ns> l4mesh redirect install`".into();
    }
    if s.contains("no such file") || s.contains("not supported") || s.contains("protocol") {
        return format!("the kernel may lack the nat/redirect modules; or try {other}");
    }
    format!("run `{cmd}` by hand to see more; or try {other}")
}

/// Runs one command, returning its stdout.
fn exec(cmd: &Cmd) -> Result<String, RedirectError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let spawn_err = |e: std::io::Error| RedirectError::Spawn {
        cmd: cmd.to_string(),
        hint: hint(cmd, "", Some(&e)),
        error: e,
    };
    let mut child = Command::new(&cmd.program)
        .args(&cmd.args)
        .stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        return Err(RedirectError::Failed {
            cmd: cmd.to_string(),
            status: out.status,
            hint: hint(cmd, &stderr, None),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// The policy-routing families: IPv4, and IPv6 unless the kernel has it disabled.
fn families() -> Vec<Family> {
    let mut v = vec![Family::V4];
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        v.push(Family::V6);
    }
    v
}

/// The firewall programs that remove or install the rules of `backend` here: `nft`, or
/// `iptables` plus `ip6tables` when it is installed.
fn programs(backend: Backend) -> Vec<&'static str> {
    match backend {
        Backend::Nftables => vec!["nft"],
        Backend::Iptables => IPTABLES_PROGRAMS
            .into_iter()
            .filter(|p| *p == "iptables" || installed(p))
            .collect(),
    }
}

/// Runs `cmds` (each one's listing after its `*<table>` line) and concatenates their outputs.
fn listing(cmds: Vec<(&'static str, Cmd)>) -> Result<String, RedirectError> {
    let mut listing = String::new();
    for (table, cmd) in cmds {
        if !table.is_empty() {
            listing.push_str(&format!("*{table}\n"));
        }
        listing.push_str(&exec(&cmd)?);
    }
    Ok(listing)
}

/// Removes l4mesh's rules of *both* backends (a tool that is not installed has none to remove),
/// so that neither a switch of backend nor a `remove` with the other default leaves captures
/// behind, and l4mesh's tagged policy routing; returns how many commands it ran.
fn remove() -> Result<usize, RedirectError> {
    let mut plan = Vec::new();
    for program in ["iptables", "ip6tables"] {
        if installed(program) {
            plan.extend(iptables_remove_plan(
                program,
                &listing(iptables_list_cmds(program))?,
            ));
        }
    }
    if installed("nft") {
        plan.extend(remove_plan(
            Backend::Nftables,
            &listing(list_cmds(Backend::Nftables))?,
        ));
    }
    for family in families() {
        let [rules, routes] = routing_list_cmds(family);
        // `ip route show table 100` fails when the table was never created: nothing of ours there.
        let routes = exec(&routes).unwrap_or_default();
        plan.extend(routing_remove_plan(family, &exec(&rules)?, &routes));
    }
    for cmd in &plan {
        exec(cmd)?;
    }
    Ok(plan.len())
}

/// Executes `l4mesh redirect install|remove`.
pub fn run(command: &RedirectCommand) -> Result<(), RedirectError> {
    match command {
        RedirectCommand::Install(args) => {
            let backend = args.backend.unwrap_or_else(default_backend);
            remove()?;
            let rules = Rules::from(args);
            let mut plan = Vec::new();
            for program in programs(backend) {
                plan.extend(match program {
                    "nft" => install_plan(Backend::Nftables, &rules),
                    p => iptables_install(p, &rules),
                });
            }
            for family in families() {
                plan.extend(routing_install_plan(family));
            }
            for cmd in plan {
                match exec(&cmd) {
                    Ok(_) => {}
                    Err(RedirectError::Failed { stderr, .. })
                        if cmd.exists_is_foreign && stderr.contains("File exists") =>
                    {
                        tracing::info!(%cmd, "already present, not l4mesh's (istio-cni's?): left as it is");
                    }
                    Err(e) => {
                        // Leave nothing half-installed.
                        let _ = remove();
                        return Err(e);
                    }
                }
            }
            tracing::info!(?backend, programs = ?programs(backend), mark = args.packet_mark, "capture rules installed");
        }
        RedirectCommand::Remove(_) => {
            let n = remove()?;
            tracing::info!(commands = n, "capture rules removed (both backends)");
        }
    }
    Ok(())
}

mod routing;
pub use routing::{
    routing_install_plan, routing_list_cmds, routing_remove_plan, Family, ROUTE_MARK, ROUTE_MASK,
    ROUTE_PROTO, ROUTE_RULE_PREF, ROUTE_TABLE,
};

#[cfg(test)]
mod tests;
