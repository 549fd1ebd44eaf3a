//! The defaults l4mesh takes from where it runs, as ztunnel takes them: inside Kubernetes
//! (`KUBERNETES_SERVICE_HOST` set) shared mode, istiod's address, the mounted root certificate
//! and dual-stack listeners; anywhere, the mesh config file (`./etc/istio/config/mesh`, its
//! `defaultConfig`) and `PROXY_CONFIG` (which wins over the file) for `discoveryAddress`,
//! `proxyAdminPort`, `statusPort`, `concurrency` and `proxyMetadata`.
//!
//! These are *defaults*: a flag or an environment variable still wins. Outside Kubernetes and
//! without those files nothing changes (the embedded default mesh state still starts).
//!
//! Pure: the environment and the file system come in as closures, the defaults go out as
//! (argument id, value) pairs that [`super::Args::parse_in_environment`] installs.

use std::collections::BTreeMap;
use std::path::Path;

/// Istio's control plane inside the cluster.
pub const ISTIOD: &str = "https://istiod.istio-system.svc:15012";
/// Where Istio's ztunnel chart mounts the mesh root certificate and the token.
pub const ROOT_CERT: &str = "./var/run/secrets/istio/root-cert.pem";
/// The mesh config file of Istio's ztunnel chart.
pub const MESH_CONFIG: &str = "./etc/istio/config/mesh";

/// The parts of Istio's `ProxyConfig` a node proxy reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub discovery_address: Option<String>,
    pub proxy_admin_port: Option<u16>,
    pub status_port: Option<u16>,
    pub concurrency: Option<u16>,
    #[serde(default)]
    pub proxy_metadata: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    default_config: Option<ProxyConfig>,
}

impl ProxyConfig {
    /// `other` over `self`: its fields where set, its metadata added.
    fn merge(mut self, other: ProxyConfig) -> ProxyConfig {
        self.discovery_address = other.discovery_address.or(self.discovery_address);
        self.proxy_admin_port = other.proxy_admin_port.or(self.proxy_admin_port);
        self.status_port = other.status_port.or(self.status_port);
        self.concurrency = other.concurrency.or(self.concurrency);
        self.proxy_metadata.extend(other.proxy_metadata);
        self
    }
}

/// Why the mesh config or `PROXY_CONFIG` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyConfigError {
    #[error("the mesh config file {path} is not valid YAML with an optional defaultConfig (ProxyConfig): {reason}")]
    MeshConfig { path: String, reason: String },
    #[error("PROXY_CONFIG is not a ProxyConfig in YAML or JSON: {0}")]
    Env(String),
}

/// The effective `ProxyConfig`: the mesh config file's `defaultConfig` (`mesh`, its text when
/// the file exists), then `PROXY_CONFIG` over it.
pub fn proxy_config(
    mesh: Option<&str>,
    env: Option<&str>,
) -> Result<ProxyConfig, ProxyConfigError> {
    let from_file = match mesh {
        Some(text) => serde_yaml::from_str::<Option<MeshConfig>>(text)
            .map_err(|e| ProxyConfigError::MeshConfig {
                path: MESH_CONFIG.into(),
                reason: e.to_string(),
            })?
            .and_then(|m| m.default_config)
            .unwrap_or_default(),
        None => ProxyConfig::default(),
    };
    let from_env = match env.map(str::trim).filter(|s| !s.is_empty()) {
        Some(text) => serde_yaml::from_str::<ProxyConfig>(text)
            .map_err(|e| ProxyConfigError::Env(e.to_string()))?,
        None => ProxyConfig::default(),
    };
    Ok(from_file.merge(from_env))
}

/// The defaults to install, as (argument id of [`super::Args`], value). `env` reads the
/// environment, `exists` the file system.
pub fn defaults(
    env: &dyn Fn(&str) -> Option<String>,
    exists: &dyn Fn(&Path) -> bool,
    pc: &ProxyConfig,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let kubernetes = env("KUBERNETES_SERVICE_HOST").is_some();
    let istiod = pc
        .discovery_address
        .clone()
        .or_else(|| kubernetes.then(|| ISTIOD.to_owned()));
    if let Some(a) = istiod {
        out.push(("xds_address", a.clone()));
        if kubernetes {
            out.push(("ca_address", ISTIOD.to_owned()));
        }
    }
    if let Some(p) = pc.proxy_admin_port {
        out.push(("admin_addr", format!("127.0.0.1:{p}")));
    }
    if let Some(c) = pc.concurrency.filter(|c| *c > 0) {
        out.push(("worker_threads", c.to_string()));
    }
    let ipv6 = kubernetes && env("IPV6_ENABLED").is_none_or(|v| !v.eq_ignore_ascii_case("false"));
    let any = if ipv6 { "[::]" } else { "0.0.0.0" };
    if let Some(p) = pc.status_port {
        out.push(("metrics_addr", format!("{any}:{p}")));
    } else if ipv6 {
        out.push(("metrics_addr", format!("{any}:15020")));
    }
    if kubernetes {
        out.push(("proxy_mode", "shared".to_owned()));
        if exists(Path::new(ROOT_CERT)) {
            out.push(("xds_root_ca", ROOT_CERT.to_owned()));
            out.push(("ca_root_ca", ROOT_CERT.to_owned()));
        }
        if ipv6 {
            out.extend([
                ("outbound_addr", "[::]:15001".to_owned()),
                ("inbound_plaintext_addr", "[::]:15006".to_owned()),
                ("hbone_addr", "[::]:15008".to_owned()),
                ("readiness_addr", "[::]:15021".to_owned()),
            ]);
        }
    }
    out
}

/// An address without a scheme, as ztunnel reads it: `https://` is meant.
pub fn with_scheme(address: &str) -> String {
    if address.is_empty() || address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn get<'a>(d: &'a [(&'static str, String)], id: &str) -> Option<&'a str> {
        d.iter().find(|(k, _)| *k == id).map(|(_, v)| v.as_str())
    }

    #[test]
    fn outside_kubernetes_nothing_changes() {
        let d = defaults(&env_of(&[]), &|_| true, &ProxyConfig::default());
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn inside_kubernetes_shared_istiod_root_and_dual_stack() {
        let env = env_of(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")]);
        let d = defaults(
            &env,
            &|p| p == Path::new(ROOT_CERT),
            &ProxyConfig::default(),
        );
        assert_eq!(get(&d, "proxy_mode"), Some("shared"));
        assert_eq!(get(&d, "xds_address"), Some(ISTIOD));
        assert_eq!(get(&d, "ca_address"), Some(ISTIOD));
        assert_eq!(get(&d, "xds_root_ca"), Some(ROOT_CERT));
        assert_eq!(get(&d, "outbound_addr"), Some("[::]:15001"));
        assert_eq!(get(&d, "readiness_addr"), Some("[::]:15021"));
        // No mounted root: none is assumed.
        let d = defaults(&env, &|_| false, &ProxyConfig::default());
        assert_eq!(get(&d, "xds_root_ca"), None);
        // IPv6 off: the IPv4 defaults stay.
        let env = env_of(&[("KUBERNETES_SERVICE_HOST", "x"), ("IPV6_ENABLED", "false")]);
        let d = defaults(&env, &|_| false, &ProxyConfig::default());
        assert_eq!(get(&d, "outbound_addr"), None);
    }

    #[test]
    fn proxy_config_env_wins_over_the_mesh_file() {
        let mesh = "defaultConfig:\n  discoveryAddress: istiod.mesh:15012\n  concurrency: 4\n  proxyMetadata: { A: file, B: file }\n";
        let pc = proxy_config(
            Some(mesh),
            Some(r#"{"concurrency": 3, "statusPort": 15090, "proxyMetadata": {"B": "env"}}"#),
        )
        .unwrap();
        assert_eq!(pc.discovery_address.as_deref(), Some("istiod.mesh:15012"));
        assert_eq!(pc.concurrency, Some(3));
        assert_eq!(pc.proxy_metadata["A"], "file");
        assert_eq!(pc.proxy_metadata["B"], "env");
        let d = defaults(&env_of(&[]), &|_| false, &pc);
        assert_eq!(get(&d, "xds_address"), Some("istiod.mesh:15012"));
        assert_eq!(get(&d, "worker_threads"), Some("3"));
        assert_eq!(get(&d, "metrics_addr"), Some("0.0.0.0:15090"));
        assert_eq!(
            with_scheme("istiod.mesh:15012"),
            "https://istiod.mesh:15012"
        );
        assert_eq!(with_scheme("http://x:1"), "http://x:1");
    }

    #[test]
    fn a_bad_proxy_config_is_named() {
        let e = proxy_config(None, Some("concurrency: [1")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PROXY_CONFIG is not a ProxyConfig"),
            "{e}"
        );
        let e = proxy_config(Some("defaultConfig: 7"), None).unwrap_err();
        assert!(e.to_string().contains(MESH_CONFIG), "{e}");
        // An empty file and an empty variable are no configuration.
        assert_eq!(
            proxy_config(Some(""), Some("")).unwrap(),
            ProxyConfig::default()
        );
    }
}
