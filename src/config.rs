//! One typed [`Config`], from command-line flags and the environment variables ztunnel uses
//! (so that l4mesh is a drop-in), validated before anything starts. Tests build `Config` directly.
//! It is serialisable so that it can be dumped at startup (and later by `/config_dump`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub mod kubernetes;

use crate::telemetry::LogFormat;
pub use crate::xds::{RootCa, XdsSettings};

/// How l4mesh serves workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// One l4mesh per workload, inside its network namespace.
    Dedicated,
    /// One l4mesh per node for every pod, with namespaces from istio-cni over ZDS.
    Shared,
}

/// Where the mesh state comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The local config file shipped inside the binary (`examples/local-default.yaml`).
    EmbeddedDefault,
    /// A local config file, watched and re-applied on change.
    File(PathBuf),
    /// A delta-xDS control plane (istiod or xds-testserver).
    Xds(XdsSettings),
}

/// Where workload certificates come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaSource {
    /// A self-signed CA inside l4mesh (`FAKE_CA=true`, the default without a control plane).
    Local {
        #[serde(serialize_with = "crate::model::serialize_duration")]
        ttl: Duration,
    },
    /// Istio's CA (istiod or xds-testserver).
    Istio(crate::identity::IstioCaSettings),
}

pub use crate::model::WorkloadInfo;

/// The effective configuration of a running l4mesh.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub source: Source,
    pub ca: CaSource,
    pub proxy_mode: ProxyMode,
    pub workload_info: Option<WorkloadInfo>,
    pub node_name: String,
    pub network: String,
    pub cluster_id: String,
    pub trust_domain: String,
    pub outbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    /// `None` disables the SOCKS5 listener.
    pub socks5_addr: Option<SocketAddr>,
    /// Inbound HBONE listener (mutual TLS + HTTP/2 CONNECT from other mesh proxies).
    pub hbone_addr: SocketAddr,
    /// `GET /healthz/ready`; `None` disables the readiness server.
    pub readiness_addr: Option<SocketAddr>,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`); `None` disables the metrics server.
    pub metrics_addr: Option<SocketAddr>,
    pub packet_mark: u32,
    /// `ENABLE_ORIG_SRC`: connect to local workloads from the client's IP (`IP_TRANSPARENT`).
    /// `None` (ztunnel's default) = on when the kernel allows it (CAP_NET_ADMIN or CAP_NET_RAW).
    pub enable_orig_src: Option<bool>,
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub connect_timeout: Duration,
    pub worker_threads: usize,
    pub log_format: LogFormat,
    /// HTTP/2 windows, frame size and HBONE pool limits.
    pub h2: crate::proxy::H2Tuning,
    /// OpenTelemetry traces and access-log records over OTLP gRPC; `None` = off.
    pub otel: Option<crate::otel::OtelSettings>,
    /// Admin server (`/config_dump`, `/logging`, `/quitquitquit`), loopback only; `None` disables it.
    pub admin_addr: Option<SocketAddr>,
    /// How long a drain (SIGTERM, `/quitquitquit`) lets connections finish before closing them.
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub connection_termination_deadline: Duration,
    /// Caps of each data-path listener (15001, 15006, 15008, 15080); `None` for the connection cap
    /// = a quarter of the open-file limit.
    pub max_connections: Option<usize>,
    pub max_connections_per_source: usize,
    /// Limits of the operators' HTTP servers (15000, 15020, 15021).
    pub http: HttpLimits,
    /// TCP keepalive of accepted and upstream sockets.
    pub keepalive: crate::socket::Keepalive,
    /// A file holding the token the admin server's mutating endpoints (`POST /logging`,
    /// `POST /quitquitquit`) require; `None`: loopback alone guards them, as in ztunnel.
    pub admin_token_file: Option<PathBuf>,
    /// Shared mode: how the pods arrive (`None` in dedicated mode).
    pub inpod: Option<InpodSettings>,
    /// The DNS proxy (`None`: DNS capture off).
    pub dns: Option<DnsSettings>,
    /// The upstream resolvers (`/etc/resolv.conf`): where the DNS proxy forwards, and what
    /// on-demand DNS asks for destinations known by hostname only.
    pub resolv_conf: PathBuf,
    /// `LOCALHOST_APP_TUNNEL`: PROXY-protocol application tunnels are delivered on loopback.
    pub localhost_app_tunnel: bool,
    /// `L4MESH_ENFORCE_WAYPOINT`: workloads with a waypoint take traffic only through it.
    pub enforce_waypoint: bool,
    /// `L4MESH_SPLICE_AFTER`: TCP↔TCP copies splice after this many bytes per direction.
    pub splice_after: Option<u64>,
    /// `L4MESH_HANDOFF_SOCKET`: where a running l4mesh hands its listening sockets to a
    /// successor (upgrades without refused connections); `None`: no hand-off.
    pub handoff_socket: Option<PathBuf>,
    /// `UPGRADE_DRAIN_DEADLINE`: how long an l4mesh replaced by a successor keeps serving the
    /// connections it holds.
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub upgrade_drain_deadline: Duration,
    /// `CRL_PATH`: certificate revocation lists that HBONE peers are checked against (watched);
    /// `None`: no revocation checking, as ztunnel without it.
    pub crl_path: Option<PathBuf>,
}

/// The DNS proxy's settings, ztunnel's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DnsSettings {
    /// `DNS_PROXY_ADDR`: UDP and TCP on each.
    pub addrs: Vec<SocketAddr>,
    /// How names are matched (`CLUSTER_DOMAIN`, `PREFERED_SERVICE_NAMESPACE`,
    /// `L4MESH_DNS_RESPECT_VISIBILITY`).
    pub rules: crate::dns::answer::NameRules,
}

/// Shared (in-pod) mode's settings, ztunnel's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InpodSettings {
    /// `INPOD_UDS`: the CNI node agent's ZDS socket.
    pub uds: PathBuf,
    /// `INPOD_PORT_REUSE`: `SO_REUSEPORT` on the pod listeners, so that a second l4mesh can bind
    /// beside a draining one.
    pub port_reuse: bool,
}

pub use crate::http_server::HttpLimits;

impl Config {
    /// A configuration for running on loopback: every listener on an ephemeral port of `ip`, the
    /// embedded default as the source. Tests and examples start from it.
    pub fn local(ip: std::net::IpAddr) -> Self {
        Self {
            source: Source::EmbeddedDefault,
            ca: CaSource::Local {
                ttl: Duration::from_secs(86400),
            },
            proxy_mode: ProxyMode::Dedicated,
            workload_info: None,
            node_name: String::new(),
            network: String::new(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            outbound_addr: SocketAddr::new(ip, 0),
            inbound_plaintext_addr: SocketAddr::new(ip, 0),
            socks5_addr: Some(SocketAddr::new(ip, 0)),
            hbone_addr: SocketAddr::new(ip, 0),
            readiness_addr: Some(SocketAddr::new(ip, 0)),
            metrics_addr: Some(SocketAddr::new(ip, 0)),
            packet_mark: 1337,
            enable_orig_src: Some(false),
            connect_timeout: Duration::from_secs(10),
            worker_threads: 2,
            log_format: LogFormat::Plain,
            h2: crate::proxy::H2Tuning::default(),
            otel: None,
            admin_addr: Some(SocketAddr::new(ip, 0)),
            connection_termination_deadline: DEFAULT_TERMINATION_DEADLINE,
            max_connections: None,
            max_connections_per_source: 0,
            http: HttpLimits::default(),
            keepalive: crate::socket::Keepalive::default(),
            admin_token_file: None,
            inpod: None,
            dns: None,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            localhost_app_tunnel: true,
            enforce_waypoint: false,
            splice_after: None,
            handoff_socket: None,
            upgrade_drain_deadline: DEFAULT_UPGRADE_DRAIN_DEADLINE,
            crl_path: None,
        }
    }
}

/// How long a replaced l4mesh serves its connections by default: long-lived connections
/// (databases, brokers, streams) end on their own schedule, not the upgrade's.
pub const DEFAULT_UPGRADE_DRAIN_DEADLINE: Duration = Duration::from_secs(3600);

/// ztunnel's default drain deadline.
pub const DEFAULT_TERMINATION_DEADLINE: Duration = Duration::from_secs(5);

/// The drain deadline: `CONNECTION_TERMINATION_DEADLINE` if set; else, as ztunnel does, a little
/// less than Kubernetes' `TERMINATION_GRACE_PERIOD_SECONDS` (5 s less above 10 s, else 1 s less,
/// at least 1 s) so that l4mesh closes connections itself before the SIGKILL; else 5 s.
pub fn termination_deadline(
    explicit: Option<Duration>,
    grace_period_secs: Option<u64>,
) -> Duration {
    match (explicit, grace_period_secs) {
        (Some(d), _) => d,
        (None, Some(secs)) => {
            let margin = if secs > 10 { 5 } else { 1 };
            Duration::from_secs(secs.saturating_sub(margin).max(1))
        }
        (None, None) => DEFAULT_TERMINATION_DEADLINE,
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("both XDS_ADDRESS ({0:?}) and LOCAL_XDS_PATH ({1:?}) are set; expected one source of mesh state")]
    TwoSources(String, PathBuf),
    #[error("XDS_ADDRESS must start with http:// or https://, found {0:?}")]
    XdsScheme(String),
    #[error("{0}")]
    ProxyConfig(String),
    #[error("`proxy {0}`: expected `proxy ztunnel` (the arguments of Istio's ztunnel chart)")]
    ProxyKind(String),
    #[error("PROXY_WORKLOAD_INFO={0} names the one workload of a dedicated l4mesh, but PROXY_MODE=shared serves the pods the CNI node agent hands over; unset one of them")]
    SharedWithWorkload(String),
    #[error("FAKE_CA=false but no CA_ADDRESS or XDS_ADDRESS is set; expected a CA to ask for certificates")]
    NoCa,
    #[error("CA_ADDRESS must start with http:// or https://, found {0:?}")]
    CaScheme(String),
    #[error("ZTUNNEL_WORKER_THREADS must be at least 1, found 0")]
    NoWorkers,
    #[error("POOL_MAX_STREAMS_PER_CONNECTION must be at least 1, found 0")]
    NoStreams,
    #[error("HTTP2_FRAME_SIZE must be between {MIN_FRAME} and {MAX_FRAME} bytes (HTTP/2's limits, RFC 9113 §4.2), found {0}")]
    FrameSize(u32),
    #[error(
        "{name} must be between 1 and {MAX_WINDOW} bytes (HTTP/2's largest window), found {value}"
    )]
    Window { name: &'static str, value: u32 },
    #[error(transparent)]
    Otel(#[from] crate::otel::SettingsError),
    #[error("L4MESH_METRICS_ADDR and L4MESH_READINESS_ADDR are both {0}; expected two different addresses (default ports 15020 and 15021)")]
    MetricsOnReadiness(SocketAddr),
    #[error("L4MESH_SOCKS5_ADDR must be a loopback address (SOCKS5 has no authentication: whoever reaches it sends traffic with this node's identities), found {0}; set L4MESH_SOCKS5_ALLOW_REMOTE=true to allow it")]
    Socks5NotLoopback(SocketAddr),
    #[error("{name} is {address}: plaintext to a host that is not loopback sends the AUTH_TOKEN in clear and lets anyone on the path answer (for the CA: choose the mesh root). Use https:// (istiod serves TLS on 15012), or set L4MESH_ALLOW_PLAINTEXT_CONTROL_PLANE=true for a test network")]
    PlaintextControlPlane { name: &'static str, address: String },
    #[error("{name} is {value}; expected {expected} (what the kernel accepts for TCP keepalive)")]
    KeepaliveRange {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0} is 0; expected a duration above zero (e.g. 10s)")]
    ZeroDuration(&'static str),
    #[error("L4MESH_HTTP_MAX_CONNECTIONS is 0; expected at least 1 (the admin, metrics and readiness servers would refuse every connection)")]
    NoHttpConnections,
    #[error("L4MESH_ADMIN_ADDR must be a loopback address (the admin API can stop l4mesh and shows its whole state), found {0}")]
    AdminNotLoopback(SocketAddr),
}

/// HTTP/2's bounds on SETTINGS_MAX_FRAME_SIZE and on flow-control windows.
const MIN_FRAME: u32 = 16 * 1024;
const MAX_FRAME: u32 = 16 * 1024 * 1024 - 1;
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Checks the HTTP/2 tuning against the protocol's limits: h2 would panic or the peer would
/// reset the connection on values outside them, so they fail at startup instead.
pub fn validate_h2(t: &crate::proxy::H2Tuning) -> Result<(), ConfigError> {
    if t.max_streams_per_connection == 0 {
        return Err(ConfigError::NoStreams);
    }
    for (name, d) in [
        ("L4MESH_HBONE_PING_INTERVAL", t.ping_interval),
        ("L4MESH_HBONE_IDLE_TIMEOUT", t.server_idle_timeout),
        ("POOL_UNUSED_RELEASE_TIMEOUT", t.unused_release_timeout),
    ] {
        if d.is_zero() {
            return Err(ConfigError::ZeroDuration(name));
        }
    }
    if !(MIN_FRAME..=MAX_FRAME).contains(&t.frame_size) {
        return Err(ConfigError::FrameSize(t.frame_size));
    }
    for (name, value) in [
        ("HTTP2_STREAM_WINDOW_SIZE", t.stream_window),
        ("HTTP2_CONNECTION_WINDOW_SIZE", t.connection_window),
    ] {
        if value == 0 || value > MAX_WINDOW {
            return Err(ConfigError::Window { name, value });
        }
    }
    Ok(())
}

/// Whether `address` is `http://` to a host that is not loopback (`localhost`, 127/8, `::1`).
fn is_remote_plaintext(address: &str) -> bool {
    let Some(rest) = address.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    !loopback
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 500ms, 10s or 5m, found {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "expected a unit of ms, s, m or h in {s:?}, found {unit:?}"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("expected a non-negative duration, found {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("expected true or false, found {s:?}")),
    }
}

/// l4mesh: an L4 node proxy for Istio's ambient mesh.
///
/// With no options it runs on its embedded default mesh (no control plane): try
/// `curl --socks5-hostname 127.0.0.1:15080 http://echo.default.svc.cluster.local/`
/// after starting a backend with `python3 -m http.server 8080 --bind 127.0.0.2`.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub struct Args {
    /// Without a subcommand l4mesh runs the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `proxyMetadata` of the mesh config and `PROXY_CONFIG`: xDS node metadata, under the
    /// `ISTIO_META_*` variables (which win).
    #[arg(skip)]
    pub proxy_metadata: std::collections::BTreeMap<String, String>,
    /// Why the mesh config or `PROXY_CONFIG` could not be read (reported by `into_config`).
    #[arg(skip)]
    pub proxy_config_error: Option<String>,
    /// Local config file (ztunnel's LOCAL_XDS_PATH YAML format), watched and re-applied on change.
    /// Without it (and without XDS_ADDRESS) the embedded default mesh is used.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,
    /// Control-plane address: https://istiod.istio-system.svc:15012, or http://127.0.0.1:15010 for a
    /// local xds-testserver. Empty: no control plane.
    #[arg(long, env = "XDS_ADDRESS", default_value = "")]
    pub xds_address: String,
    /// Trust root of the control plane's certificate: a PEM file, inline PEM, or SYSTEM.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_ca: Option<String>,
    /// Token file sent to the control plane as `authorization: Bearer` (re-read on each connect).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,
    /// Pod name, namespace and IP of this l4mesh (they make up the xDS node id).
    #[arg(long, env = "POD_NAME", default_value = "l4mesh")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: String,
    /// Subscribe to addresses on demand (the first connection to an unknown IP asks for it).
    #[arg(long, env = "XDS_ON_DEMAND", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub xds_on_demand: bool,
    /// How long a connection to an unknown IP waits for the on-demand answer.
    #[arg(long, env = "XDS_ON_DEMAND_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub xds_on_demand_timeout: Duration,
    /// `dedicated` (one l4mesh per workload) or `shared` (one per node, pods from istio-cni).
    #[arg(long, env = "PROXY_MODE", value_enum, default_value = "dedicated")]
    pub proxy_mode: ProxyMode,
    /// Shared mode: the CNI node agent's ZDS socket (SOCK_SEQPACKET).
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub inpod_uds: PathBuf,
    /// Shared mode: SO_REUSEPORT on the pod listeners (a second l4mesh may bind beside).
    #[arg(long, env = "INPOD_PORT_REUSE", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub inpod_port_reuse: bool,
    /// DNS capture: the DNS proxy answers mesh names and forwards the rest (ztunnel's switch,
    /// also read from `proxyMetadata.DNS_CAPTURE`).
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub dns_capture: Option<bool>,
    /// The DNS proxy's address (UDP and TCP); default 127.0.0.1:15053 and [::1]:15053.
    #[arg(long, env = "DNS_PROXY_ADDR")]
    pub dns_proxy_addr: Option<SocketAddr>,
    /// The upstream resolvers of the DNS proxy and of on-demand DNS.
    #[arg(
        long,
        env = "L4MESH_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub dns_resolv_conf: PathBuf,
    /// The cluster's DNS domain (search domains `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// A workload with a waypoint takes HBONE only from its waypoint and refuses plaintext, so that
    /// nothing bypasses the waypoint; off by default, as ztunnel (an AuthorizationPolicy does it).
    #[arg(long, env = "L4MESH_ENFORCE_WAYPOINT", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub enforce_waypoint: bool,
    /// Bytes a direction of a plain TCP↔TCP connection moves before it switches from the buffered
    /// copy to `splice(2)` (a third less CPU per GB for bulk transfers, but a lower single-stream
    /// throughput and slower round trips on loopback); unset: never, as ztunnel.
    #[arg(long, env = "L4MESH_SPLICE_AFTER")]
    pub splice_after: Option<u64>,
    /// A unix socket through which this l4mesh hands its listening sockets to a new l4mesh
    /// started with the same path (an upgrade that refuses no connection); the new one takes
    /// them, becomes ready, and the old one stops accepting and drains (shared mode: with every
    /// pod's listeners, and the CNI agent's connection once the old one lets go of it).
    #[arg(long, env = "L4MESH_HANDOFF_SOCKET")]
    pub handoff_socket: Option<PathBuf>,
    /// How long an l4mesh replaced through the hand-off socket keeps serving the connections it
    /// holds before closing the rest (e.g. 1h, 30m).
    #[arg(long, env = "UPGRADE_DRAIN_DEADLINE", value_parser = parse_duration, default_value = "1h")]
    pub upgrade_drain_deadline: Duration,
    /// Certificate revocation lists (PEM or DER) that HBONE peers are checked against, watched
    /// for changes; unset or empty: no revocation checking. Istio's chart mounts them at
    /// /var/run/secrets/istio/crl/ca-crl.pem.
    #[arg(long, env = "CRL_PATH")]
    pub crl_path: Option<PathBuf>,
    /// A workload whose application tunnel speaks PROXY protocol gets its inbound streams on its
    /// loopback address (so that only the proxy can reach its PROXY port), as ztunnel.
    #[arg(long, env = "LOCALHOST_APP_TUNNEL", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub localhost_app_tunnel: bool,
    /// Among services sharing a hostname (none in the client's namespace, none canonical), the
    /// DNS proxy answers the one in this namespace (ztunnel's variable, spelled as ztunnel does).
    #[arg(long, env = "PREFERED_SERVICE_NAMESPACE")]
    pub prefered_service_namespace: Option<String>,
    /// The DNS proxy does not answer a namespace-private service (visibility NAMESPACE, Kubernetes
    /// `exportTo: ["."]`) to clients of other namespaces; off by default, as ztunnel.
    #[arg(long, env = "L4MESH_DNS_RESPECT_VISIBILITY", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub dns_respect_visibility: bool,
    /// The DNS proxy answers a headless service's pods by name (`<pod>.<service>.<ns>.svc.<domain>`)
    /// from the mesh state instead of forwarding them; off by default, as ztunnel's release.
    #[arg(long, env = "L4MESH_DNS_HEADLESS_PODS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub dns_headless_pods: bool,
    /// In dedicated mode, the served workload as <namespace>/<name>/<service account>.
    #[arg(long, env = "PROXY_WORKLOAD_INFO")]
    pub proxy_workload_info: Option<WorkloadInfo>,
    /// This node's name; inbound traffic is accepted only for workloads whose `node` equals it.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// The network of this node's workloads (Istio multi-network); empty is the default network.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Cluster id sent to the control plane.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Trust domain of SPIFFE identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Outbound capture listener (where redirected outbound traffic arrives).
    #[arg(long, env = "L4MESH_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Inbound plaintext capture listener.
    #[arg(
        long,
        env = "L4MESH_INBOUND_PLAINTEXT_ADDR",
        default_value = "0.0.0.0:15006"
    )]
    pub inbound_plaintext_addr: SocketAddr,
    /// Inbound HBONE listener (tunnels from other mesh proxies; peers dial port 15008).
    #[arg(long, env = "L4MESH_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Enables the SOCKS5 listener.
    #[arg(long, env = "UNSTABLE_ENABLE_SOCKS5", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub enable_socks5: bool,
    /// SOCKS5 listener address; a loopback address unless L4MESH_SOCKS5_ALLOW_REMOTE is true.
    #[arg(long, env = "L4MESH_SOCKS5_ADDR", default_value = "127.0.0.1:15080")]
    pub socks5_addr: SocketAddr,
    /// Lets L4MESH_SOCKS5_ADDR be a non-loopback address. SOCKS5 has no authentication: anyone
    /// who reaches it sends traffic with this node's identities.
    #[arg(long, env = "L4MESH_SOCKS5_ALLOW_REMOTE", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub socks5_allow_remote: bool,
    /// Istio CA address for workload certificates; defaults to XDS_ADDRESS when a control plane is set.
    #[arg(long, env = "CA_ADDRESS", default_value = "")]
    pub ca_address: String,
    /// Trust root of the CA server (and the mesh root): PEM file, inline PEM, or SYSTEM; defaults to XDS_ROOT_CA.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<String>,
    /// Use a self-signed CA inside l4mesh instead of a CA server (default: true without a control plane).
    #[arg(long, env = "FAKE_CA", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub fake_ca: Option<bool>,
    /// Requested certificate validity (e.g. 24h); renewal happens at half of it.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub secret_ttl: Duration,
    /// Readiness server (`GET /healthz/ready`).
    #[arg(long, env = "L4MESH_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Prometheus metrics server (`GET /metrics`, `GET /stats/prometheus`). ztunnel takes this port
    /// from the mesh config's `statusPort` and has no variable of its own.
    #[arg(long, env = "L4MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// SO_MARK set on every socket l4mesh opens, so that redirection rules skip them (0 = none).
    #[arg(long, env = "PACKET_MARK", default_value_t = 1337)]
    pub packet_mark: u32,
    /// Inbound connections reach the local workload from the client's own IP (IP_TRANSPARENT;
    /// needs CAP_NET_ADMIN or CAP_NET_RAW, and the routing `l4mesh redirect install` sets up). Unset: on when the
    /// kernel allows it, as ztunnel does; a refused bind falls back to l4mesh's own address.
    #[arg(long, env = "ENABLE_ORIG_SRC", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub enable_orig_src: Option<bool>,
    /// How long to wait for an upstream TCP connection (e.g. 500ms, 10s).
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Threads of the data-plane runtime.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Log format: plain or json. The level comes from RUST_LOG (default info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// HBONE tunnels one pooled outbound connection carries at once (at least 1).
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub pool_max_streams_per_connection: u32,
    /// A pooled HBONE connection that carried no tunnel this long is closed (e.g. 30s, 5m).
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pool_unused_release_timeout: Duration,
    /// HTTP/2 per-stream flow-control window in bytes (1..=2^31-1; default 4 MiB).
    #[arg(long, env = "HTTP2_STREAM_WINDOW_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub http2_stream_window_size: u32,
    /// HTTP/2 per-connection flow-control window in bytes (1..=2^31-1; default 16 MiB).
    #[arg(long, env = "HTTP2_CONNECTION_WINDOW_SIZE", default_value_t = 16 * 1024 * 1024)]
    pub http2_connection_window_size: u32,
    /// Largest HTTP/2 frame accepted, in bytes (16384..=16777215; default 1 MiB).
    #[arg(long, env = "HTTP2_FRAME_SIZE", default_value_t = 1024 * 1024)]
    pub http2_frame_size: u32,
    /// OTLP gRPC collector for traces and access-log records (http://host:4317); empty: off.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", default_value = "")]
    pub otel_exporter_otlp_endpoint: String,
    /// Share of new traces sampled (0..=1); connections arriving with a traceparent follow it.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0)]
    pub otel_traces_sampler_arg: f64,
    /// `service.name` of the exported resource.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "l4mesh")]
    pub otel_service_name: String,
    /// Milliseconds finished spans and records wait to be exported in one batch.
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", default_value_t = 5000)]
    pub otel_bsp_schedule_delay: u64,
    /// PEM roots that verify an https OTLP collector (default: the system's).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otel_exporter_otlp_certificate: Option<PathBuf>,
    /// Admin server (`/config_dump`, `/logging`, `/quitquitquit`); must be a loopback address.
    #[arg(long, env = "L4MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Allows http:// XDS_ADDRESS and CA_ADDRESS on hosts that are not loopback (test networks
    /// only: the token goes in clear and the CA's answer is not authenticated).
    #[arg(long, env = "L4MESH_ALLOW_PLAINTEXT_CONTROL_PLANE", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub allow_plaintext_control_plane: bool,
    /// A file holding a token that `POST /logging` and `POST /quitquitquit` require as
    /// `Authorization: Bearer <token>`, so that a workload sharing the loopback cannot change
    /// log levels or stop l4mesh. Unset: loopback alone guards them (ztunnel's behaviour).
    #[arg(long, env = "L4MESH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Disables the admin server.
    #[arg(long, env = "L4MESH_DISABLE_ADMIN", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub disable_admin: bool,
    /// How long a drain (SIGTERM/SIGINT, POST /quitquitquit) lets connections finish before
    /// closing the rest (e.g. 5s). Default: from TERMINATION_GRACE_PERIOD_SECONDS, else 5s.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_parser = parse_duration)]
    pub connection_termination_deadline: Option<Duration>,
    /// Kubernetes' terminationGracePeriodSeconds; the drain deadline is set a little below it.
    #[arg(long, env = "TERMINATION_GRACE_PERIOD_SECONDS")]
    pub termination_grace_period_seconds: Option<u64>,
    /// Connections each data-path listener holds at once; over it, new ones are closed at once
    /// and counted. Default: a quarter of the open-file limit (raised to its hard limit at start).
    #[arg(long, env = "L4MESH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections one source address may hold on each data-path listener (0 = no cap, as
    /// ztunnel). Mind sources that stand for many clients (a node's HBONE, a NAT).
    #[arg(long, env = "L4MESH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 0)]
    pub max_connections_per_source: usize,
    /// The operators' HTTP servers (admin, metrics, readiness) close a connection that has not
    /// sent a whole request head this long after connecting or after its last answer (ztunnel: 2s).
    #[arg(long, env = "L4MESH_HTTP_HEADER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// Connections each operators' HTTP server holds at once.
    #[arg(long, env = "L4MESH_HTTP_MAX_CONNECTIONS", default_value_t = 128)]
    pub http_max_connections: usize,
    /// Both HBONE ends PING the peer this often and drop a connection whose PING is still
    /// unanswered at the next one (ztunnel: 10s).
    #[arg(long, env = "L4MESH_HBONE_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub hbone_ping_interval: Duration,
    /// An inbound HBONE connection with no tunnel for this long gets a GOAWAY (longer than the
    /// clients' POOL_UNUSED_RELEASE_TIMEOUT, so that they normally close first).
    #[arg(long, env = "L4MESH_HBONE_IDLE_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,
    /// Pool double HBONE's inner connections (to workloads on other networks, through a network
    /// gateway) instead of one per connection as ztunnel: new connections cost a stream instead
    /// of a TLS and an HTTP/2 handshake, but each inner connection reaches one remote endpoint.
    #[arg(long, env = "L4MESH_POOL_INNER_TUNNELS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub pool_inner_tunnels: bool,
    /// TCP keepalive on accepted and upstream sockets (ztunnel's setting).
    #[arg(long, env = "KEEPALIVE_ENABLED", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub keepalive_enabled: bool,
    /// Idle time before the first keepalive probe.
    #[arg(long, env = "KEEPALIVE_TIME", default_value = "180s", value_parser = parse_duration)]
    pub keepalive_time: Duration,
    /// Time between keepalive probes.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is dropped.
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = 9)]
    pub keepalive_retries: u32,
    /// Also set TCP_USER_TIMEOUT = KEEPALIVE_TIME + KEEPALIVE_RETRIES × KEEPALIVE_INTERVAL, so that
    /// unacknowledged data to a dead peer ends the connection too (off, as in ztunnel).
    #[arg(long, env = "USER_TIMEOUT_ENABLED", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub user_timeout_enabled: bool,
}

/// Subcommands besides running the proxy.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Installs or removes the traffic-capture rules of a pod's network namespace (dedicated mode;
    /// run as root inside the namespace).
    Redirect {
        #[command(subcommand)]
        action: crate::redirect::RedirectCommand,
    },
    /// Runs the proxy, as Istio's ztunnel chart starts its container (`proxy ztunnel`).
    Proxy {
        /// Only `ztunnel`.
        kind: String,
    },
    /// The CNI side of shared mode without Kubernetes: serves the ZDS socket, hands the pods of
    /// a watched file (each a network namespace) to the l4mesh of this node, and installs each
    /// pod's capture rules in its namespace.
    NodeAgent(NodeAgentArgs),
}

/// Options of `l4mesh node-agent`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct NodeAgentArgs {
    /// The ZDS socket to serve: the `INPOD_UDS` of the node's l4mesh.
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub socket: PathBuf,
    /// The pods: YAML `pods: [{uid, name, namespace, serviceAccount, netns}]`, watched.
    #[arg(long)]
    pub pods: PathBuf,
    /// Leave the pods' capture rules alone (someone else installs them).
    #[arg(long)]
    pub no_capture: bool,
    /// How long a removed pod keeps its capture rules, so that the proxy can drain its
    /// connections (removing NAT rules ends their translation); at least the proxy's
    /// CONNECTION_TERMINATION_DEADLINE.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub removal_delay: Duration,
    /// The capture rules installed in each pod (as `l4mesh redirect install`).
    #[command(flatten)]
    pub capture: crate::redirect::RedirectArgs,
}

impl Args {
    /// Parses the command line and environment over the defaults of where l4mesh runs
    /// ([`kubernetes`]: inside Kubernetes, the mesh config file, `PROXY_CONFIG`); exits with
    /// clap's message on bad flags, as [`Parser::parse`].
    pub fn parse_in_environment() -> Args {
        use clap::FromArgMatches;
        let mesh = std::fs::read_to_string(kubernetes::MESH_CONFIG).ok();
        let pc_env = std::env::var("PROXY_CONFIG").ok();
        let (pc, pc_error) = match kubernetes::proxy_config(mesh.as_deref(), pc_env.as_deref()) {
            Ok(pc) => (pc, None),
            Err(e) => (Default::default(), Some(e.to_string())),
        };
        let env = |k: &str| std::env::var(k).ok();
        let cmd = Args::command_with(kubernetes::defaults(&env, &|p| p.exists(), &pc));
        let mut args = Args::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
        args.proxy_metadata = pc.proxy_metadata;
        args.proxy_config_error = pc_error;
        args
    }

    /// The command line parser with `defaults` (argument id, value) in place of the built-in ones.
    pub fn command_with(defaults: Vec<(&'static str, String)>) -> clap::Command {
        use clap::CommandFactory;
        let mut cmd = Args::command();
        for (id, value) in defaults {
            cmd = cmd.mut_arg(id, |a| a.default_value(value));
        }
        cmd
    }

    /// Validates the flags into a [`Config`].
    pub fn into_config(mut self) -> Result<Config, ConfigError> {
        // As ztunnel: the cluster id Istio injects as node metadata wins.
        if let Some(id) = std::env::var("ISTIO_META_CLUSTER_ID")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            self.cluster_id = id;
        }
        if let Some(e) = self.proxy_config_error.take() {
            return Err(ConfigError::ProxyConfig(e));
        }
        if let Some(Command::Proxy { kind }) = &self.command {
            if kind != "ztunnel" {
                return Err(ConfigError::ProxyKind(kind.clone()));
            }
        }
        let xds = kubernetes::with_scheme(self.xds_address.trim());
        let source = match (xds.is_empty(), self.local_xds_path) {
            (true, None) => Source::EmbeddedDefault,
            (true, Some(p)) => Source::File(p),
            (false, Some(p)) => return Err(ConfigError::TwoSources(xds, p)),
            (false, None) => {
                if !xds.starts_with("http://") && !xds.starts_with("https://") {
                    return Err(ConfigError::XdsScheme(xds));
                }
                let mut meta: std::collections::BTreeMap<String, String> =
                    self.proxy_metadata.clone();
                meta.extend(
                    std::env::vars()
                        .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_owned(), v))),
                );

                Source::Xds(XdsSettings {
                    address: xds,
                    root_ca: self.xds_root_ca.as_deref().map(RootCa::parse),
                    auth_token: Some(self.auth_token.clone()),
                    pod_name: self.pod_name,
                    pod_namespace: self.pod_namespace,
                    instance_ip: self.instance_ip,
                    meta,
                    on_demand: self.xds_on_demand,
                    on_demand_timeout: self.xds_on_demand_timeout,
                    packet_mark: self.packet_mark,
                })
            }
        };
        let shared = self.proxy_mode == ProxyMode::Shared;
        // ztunnel's switch, then the mesh config's proxyMetadata; unset, on in shared mode (as
        // ztunnel: the pods' listeners are in their own namespaces, and a pod's queries reach
        // them only when its capture rules say so) and off in dedicated mode (several l4mesh
        // processes often share one host's loopback there).
        let dns_on = self.dns_capture.unwrap_or_else(|| {
            self.proxy_metadata
                .get("DNS_CAPTURE")
                .map_or(shared, |v| v.eq_ignore_ascii_case("true"))
        });
        if shared {
            if let Some(w) = &self.proxy_workload_info {
                return Err(ConfigError::SharedWithWorkload(format!(
                    "{}/{}/{}",
                    w.namespace, w.name, w.service_account
                )));
            }
        }
        if self.worker_threads == 0 {
            return Err(ConfigError::NoWorkers);
        }
        if self.http_max_connections == 0 {
            return Err(ConfigError::NoHttpConnections);
        }
        if self.enable_socks5 && !self.socks5_addr.ip().is_loopback() && !self.socks5_allow_remote {
            return Err(ConfigError::Socks5NotLoopback(self.socks5_addr));
        }
        if self.http_header_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("L4MESH_HTTP_HEADER_TIMEOUT"));
        }
        // The kernel takes whole seconds in 1..=32767 and 1..=127 probes; anything else would make
        // every upstream connect fail with EINVAL.
        for (name, d) in [
            ("KEEPALIVE_TIME", self.keepalive_time),
            ("KEEPALIVE_INTERVAL", self.keepalive_interval),
        ] {
            if !(1..=32767).contains(&d.as_secs()) || d.subsec_nanos() != 0 {
                return Err(ConfigError::KeepaliveRange {
                    name,
                    value: format!("{d:?}"),
                    expected: "whole seconds from 1s to 32767s",
                });
            }
        }
        if !(1..=127).contains(&self.keepalive_retries) {
            return Err(ConfigError::KeepaliveRange {
                name: "KEEPALIVE_RETRIES",
                value: self.keepalive_retries.to_string(),
                expected: "1 to 127 probes",
            });
        }
        let h2 = crate::proxy::H2Tuning {
            max_streams_per_connection: self.pool_max_streams_per_connection,
            unused_release_timeout: self.pool_unused_release_timeout,
            stream_window: self.http2_stream_window_size,
            connection_window: self.http2_connection_window_size,
            frame_size: self.http2_frame_size,
            ping_interval: self.hbone_ping_interval,
            server_idle_timeout: self.hbone_idle_timeout,
            pool_inner_tunnels: self.pool_inner_tunnels,
        };
        validate_h2(&h2)?;
        let otel_endpoint = self.otel_exporter_otlp_endpoint.trim();
        let otel = if otel_endpoint.is_empty() {
            None
        } else {
            let s = crate::otel::OtelSettings {
                endpoint: otel_endpoint.to_owned(),
                sampler_ratio: self.otel_traces_sampler_arg,
                service_name: self.otel_service_name.trim().to_owned(),
                schedule_delay: Duration::from_millis(self.otel_bsp_schedule_delay),
                certificate: self.otel_exporter_otlp_certificate,
            };
            s.validate()?;
            Some(s)
        };
        if self.metrics_addr == self.readiness_addr {
            return Err(ConfigError::MetricsOnReadiness(self.metrics_addr));
        }
        if !self.disable_admin && !self.admin_addr.ip().is_loopback() {
            return Err(ConfigError::AdminNotLoopback(self.admin_addr));
        }
        let own_identity = self.proxy_workload_info.as_ref().map(|w| {
            crate::model::SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account)
        });
        let ca_address = if !self.ca_address.trim().is_empty() {
            Some(kubernetes::with_scheme(self.ca_address.trim()))
        } else if let Source::Xds(x) = &source {
            Some(x.address.clone())
        } else {
            None
        };
        // Plaintext sends the bearer token in clear and, for the CA, lets an unauthenticated
        // answer choose the mesh root: only on loopback, or when the operator says so.
        if !self.allow_plaintext_control_plane {
            let xds = match &source {
                Source::Xds(x) => Some(x.address.as_str()),
                _ => None,
            };
            let ca = ca_address.as_deref().filter(|_| self.fake_ca != Some(true));
            for (name, address) in [("XDS_ADDRESS", xds), ("CA_ADDRESS", ca)] {
                if let Some(a) = address.filter(|a| is_remote_plaintext(a)) {
                    return Err(ConfigError::PlaintextControlPlane {
                        name,
                        address: a.to_owned(),
                    });
                }
            }
        }
        let ca = match (self.fake_ca, ca_address) {
            (Some(true), _) | (None, None) => CaSource::Local {
                ttl: self.secret_ttl,
            },
            (Some(false), None) => return Err(ConfigError::NoCa),
            (_, Some(address)) => {
                if !address.starts_with("http://") && !address.starts_with("https://") {
                    return Err(ConfigError::CaScheme(address));
                }
                let root = self
                    .ca_root_ca
                    .as_deref()
                    .or(self.xds_root_ca.as_deref())
                    .map(RootCa::parse);
                CaSource::Istio(crate::identity::IstioCaSettings {
                    address,
                    root_ca: root,
                    auth_token: Some(self.auth_token.clone()),
                    cluster_id: self.cluster_id.clone(),
                    ttl: self.secret_ttl,
                    own_identity,
                    // The CA's sockets carry PACKET_MARK: a captured pod must not redirect them.
                    packet_mark: self.packet_mark,
                    timeout: crate::identity::DEFAULT_CA_TIMEOUT,
                })
            }
        };
        Ok(Config {
            source,
            ca,
            proxy_mode: self.proxy_mode,
            workload_info: self.proxy_workload_info,
            node_name: self.node_name,
            network: self.network,
            cluster_id: self.cluster_id,
            trust_domain: self.trust_domain,
            outbound_addr: self.outbound_addr,
            inbound_plaintext_addr: self.inbound_plaintext_addr,
            // SOCKS5 has no pod to take an identity from in shared mode.
            socks5_addr: (self.enable_socks5 && !shared).then_some(self.socks5_addr),
            hbone_addr: self.hbone_addr,
            readiness_addr: Some(self.readiness_addr),
            metrics_addr: Some(self.metrics_addr),
            packet_mark: self.packet_mark,
            enable_orig_src: self.enable_orig_src,
            connect_timeout: self.connect_timeout,
            worker_threads: self.worker_threads,
            log_format: self.log_format,
            h2,
            otel,
            admin_addr: (!self.disable_admin).then_some(self.admin_addr),
            connection_termination_deadline: termination_deadline(
                self.connection_termination_deadline,
                self.termination_grace_period_seconds,
            ),
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            http: HttpLimits {
                header_timeout: self.http_header_timeout,
                max_connections: self.http_max_connections,
            },
            admin_token_file: self.admin_token_file,
            dns: dns_on.then(|| DnsSettings {
                addrs: match self.dns_proxy_addr {
                    Some(a) => vec![a],
                    None => vec![
                        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 15053),
                        SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 15053),
                    ],
                },
                rules: crate::dns::answer::NameRules {
                    cluster_domain: self.cluster_domain.clone(),
                    preferred_namespace: self.prefered_service_namespace.clone(),
                    respect_visibility: self.dns_respect_visibility,
                    headless_pods: self.dns_headless_pods,
                },
            }),
            resolv_conf: self.dns_resolv_conf.clone(),
            localhost_app_tunnel: self.localhost_app_tunnel,
            enforce_waypoint: self.enforce_waypoint,
            splice_after: self.splice_after,
            handoff_socket: self.handoff_socket.clone(),
            upgrade_drain_deadline: self.upgrade_drain_deadline,
            crl_path: self.crl_path.filter(|p| !p.as_os_str().is_empty()),
            inpod: shared.then_some(InpodSettings {
                uds: self.inpod_uds,
                port_reuse: self.inpod_port_reuse,
            }),
            keepalive: crate::socket::Keepalive {
                enabled: self.keepalive_enabled,
                time: self.keepalive_time,
                interval: self.keepalive_interval,
                retries: self.keepalive_retries,
                user_timeout: self.user_timeout_enabled,
            },
        })
    }
}

#[cfg(test)]
mod tests;
