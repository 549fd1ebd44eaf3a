//! The binary with a plug-in intermediate CA from files (`--ca-cert --ca-key --ca-chain`): workload
//! and serving certificates chain through the intermediate to the plug-in root.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use l4mesh::identity::pem_certs;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::ca::{assert_validity, issue};
use super::common::*;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    params
}

/// Starts the binary and returns it with the gRPC address it logged.
fn spawn(args: &[String]) -> (Server, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xds-testserver"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server did not start");
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (server, addr);
        }
    }
}

#[tokio::test]
async fn the_binary_signs_with_a_plug_in_intermediate_ca_from_files() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);

        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca_params("plug-in root");
        let root = root_params.clone().self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let inter = ca_params("plug-in intermediate")
            .signed_by(&inter_key, &root_issuer)
            .unwrap();
        std::fs::write(path("ca-cert.pem"), inter.pem()).unwrap();
        std::fs::write(path("ca-key.pem"), inter_key.serialize_pem()).unwrap();
        std::fs::write(path("cert-chain.pem"), root.pem()).unwrap();
        std::fs::write(path("token"), "file-token\n").unwrap();
        std::fs::write(path("mesh.yaml"), YAML).unwrap();

        let arg = |p: &str| path(p).display().to_string();
        let args: Vec<String> = [
            "--config",
            &arg("mesh.yaml"),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tls",
            "--ca-cert",
            &arg("ca-cert.pem"),
            "--ca-key",
            &arg("ca-key.pem"),
            "--ca-chain",
            &arg("cert-chain.pem"),
            "--root-cert-out",
            &arg("root-out.pem"),
            "--token-file",
            &arg("token"),
            "--max-cert-ttl",
            "3600",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (_server, addr) = spawn(&args);

        // The root written is the plug-in root, not the intermediate.
        let written = std::fs::read_to_string(path("root-out.pem")).unwrap();
        assert_eq!(
            pem_certs(&written).unwrap(),
            pem_certs(&root.pem()).unwrap()
        );

        // The serving certificate verifies against the plug-in root: the intermediate is sent.
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root.pem()))
            .domain_name("localhost");
        let ch = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();

        let id = "spiffe://cluster.local/ns/default/sa/client";
        let (chain, cert) = issue(ch, Some("file-token"), (id, 0, None), &written)
            .await
            .unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(
            pem_certs(&chain[1]).unwrap(),
            pem_certs(&inter.pem()).unwrap()
        );
        assert_validity(&cert, Duration::from_secs(3600));
    })
    .await;
}
