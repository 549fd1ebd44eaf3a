//! Real handshakes over loopback TCP with tokio-rustls, certificates from `LocalCa`.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::{CipherSuite, ClientConfig, NamedGroup, ProtocolVersion, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::LocalCa;

pub(super) const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa)
}

pub(super) fn client_id() -> SpiffeId {
    id(TD, "a", "x")
}

pub(super) fn server_id() -> SpiffeId {
    id(TD, "b", "y")
}

/// A certificate source whose certificate the test swaps.
#[derive(Debug, Default)]
pub(super) struct Swappable(Mutex<Option<Arc<WorkloadCert>>>);

impl Swappable {
    pub(super) fn with(cert: WorkloadCert) -> Arc<Self> {
        let source = Arc::new(Self::default());
        source.set(cert);
        source
    }

    pub(super) fn set(&self, cert: WorkloadCert) {
        *self.0.lock().unwrap() = Some(Arc::new(cert));
    }
}

impl CertSource for Swappable {
    fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.0.lock().unwrap().clone()
    }
}

pub(super) fn client_cfg(
    source: Arc<dyn CertSource>,
    ca: &LocalCa,
    expected: SpiffeId,
) -> Arc<ClientConfig> {
    client_config(source, ca.roots(), vec![expected], None).unwrap()
}

pub(super) fn server_cfg(source: Arc<dyn CertSource>, ca: &LocalCa) -> Arc<ServerConfig> {
    server_config(Arc::new(SourceResolver::new(source)), ca.roots(), TD, None).unwrap()
}

pub(super) type Client = io::Result<client::TlsStream<TcpStream>>;
pub(super) type Server = io::Result<server::TlsStream<TcpStream>>;

/// One connection: handshake, then "ping" from the client and "pong" back, so that a refusal of
/// the client's certificate (which a TLS 1.3 client learns only after its handshake) surfaces.
pub(super) async fn connect(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (Client, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok(tls)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        // An IP server name: nothing may depend on it.
        let name = ServerName::from(addr.ip());
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(tls)
    };
    let both = async { (client.await, server.await.unwrap()) };
    tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("handshake timed out")
}

pub(super) fn err_text<T>(r: io::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected a failure"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn mutual_tls_success() {
    let ca = LocalCa::generate(TD).unwrap();
    let c = Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let s = Swappable::with(ca.issue(&server_id(), HOUR).unwrap());
    let (client, server) = connect(client_cfg(c, &ca, server_id()), server_cfg(s, &ca)).await;
    let client = client.unwrap();
    let server = server.unwrap();

    let conn = client.get_ref().1;
    assert_eq!(peer_identity(conn).unwrap(), server_id());
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    let suite = conn.negotiated_cipher_suite().unwrap().suite();
    assert!(
        matches!(
            suite,
            CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_AES_256_GCM_SHA384
        ),
        "{suite:?}"
    );
    let group = conn.negotiated_key_exchange_group().unwrap().name();
    assert_eq!(group, provider().kx_groups[0].name());

    let conn = server.get_ref().1;
    assert_eq!(peer_identity(conn).unwrap(), client_id());
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
}

#[tokio::test]
async fn intermediate_ca_chain_is_sent_and_verified() {
    let (_, ca, _) = root_and_intermediate();
    let server_cert = ca.issue(&server_id(), HOUR).unwrap();
    assert_eq!(server_cert.chain.len(), 2);
    let c = Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let s = Swappable::with(server_cert);
    let (client, server) = connect(client_cfg(c, &ca, server_id()), server_cfg(s, &ca)).await;
    assert_eq!(
        peer_identity(client.unwrap().get_ref().1).unwrap(),
        server_id()
    );
    assert_eq!(
        peer_identity(server.unwrap().get_ref().1).unwrap(),
        client_id()
    );
}

#[tokio::test]
async fn wrong_server_identity_is_refused() {
    let ca = LocalCa::generate(TD).unwrap();
    let c = Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let s = Swappable::with(ca.issue(&server_id(), HOUR).unwrap());
    let wanted = id(TD, "b", "other");
    let (client, server) = connect(client_cfg(c, &ca, wanted), server_cfg(s, &ca)).await;
    let client = client.map(drop).unwrap_err();
    assert!(
        matches!(refusal(&client), Some(TlsError::UnexpectedServer { found, .. }) if *found == server_id()),
        "{client}"
    );
    let err = client.to_string();
    assert!(
        err.contains(
            "server identity spiffe://cluster.local/ns/b/sa/y is not the expected \
             spiffe://cluster.local/ns/b/sa/other"
        ),
        "{err}"
    );
    assert!(server.is_err());
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let ca = LocalCa::generate(TD).unwrap();
    let foreign = id("other.local", "a", "x");
    let c = Swappable::with(ca.issue(&foreign, HOUR).unwrap());
    let s = Swappable::with(ca.issue(&server_id(), HOUR).unwrap());
    let (client, server) = connect(client_cfg(c, &ca, server_id()), server_cfg(s, &ca)).await;
    let err = err_text(server);
    assert!(
        err.contains(
            "client identity spiffe://other.local/ns/a/sa/x is in trust domain other.local, \
             expected trust domain cluster.local"
        ),
        "{err}"
    );
    assert!(
        client.is_err(),
        "the client learns of the refusal when it reads"
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = LocalCa::generate(TD).unwrap();
    let now = SystemTime::now();
    let expired = ca
        .issue_with_validity(&server_id(), now - 2 * HOUR, now - HOUR)
        .unwrap();
    let c = Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let s = Swappable::with(expired);
    let (client, _) = connect(client_cfg(c, &ca, server_id()), server_cfg(s, &ca)).await;
    let err = err_text(client);
    assert!(err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn certificates_from_another_root_are_refused() {
    let ca = LocalCa::generate(TD).unwrap();
    // Same trust domain and same CA name, different key: only the signatures tell them apart.
    let other = LocalCa::generate(TD).unwrap();
    let good_client = || Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let good_server = || Swappable::with(ca.issue(&server_id(), HOUR).unwrap());

    let s = Swappable::with(other.issue(&server_id(), HOUR).unwrap());
    let (client, _) = connect(
        client_cfg(good_client(), &ca, server_id()),
        server_cfg(s, &ca),
    )
    .await;
    let err = err_text(client);
    assert!(
        err.contains("server certificate is not issued by the mesh root"),
        "{err}"
    );

    let c = Swappable::with(other.issue(&client_id(), HOUR).unwrap());
    let (_, server) = connect(
        client_cfg(c, &ca, server_id()),
        server_cfg(good_server(), &ca),
    )
    .await;
    let err = err_text(server);
    assert!(
        err.contains("client certificate is not issued by the mesh root"),
        "{err}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = LocalCa::generate(TD).unwrap();
    let c: Arc<Swappable> = Arc::default();
    let s = Swappable::with(ca.issue(&server_id(), HOUR).unwrap());
    let (client, server) = connect(client_cfg(c, &ca, server_id()), server_cfg(s, &ca)).await;
    let err = err_text(server);
    assert!(err.contains("no certificates"), "{err}");
    assert!(client.is_err());
}

#[tokio::test]
async fn rotation_applies_to_the_next_handshake() {
    let ca = LocalCa::generate(TD).unwrap();
    let c = Swappable::with(ca.issue(&client_id(), HOUR).unwrap());
    let s = Swappable::with(ca.issue(&server_id(), HOUR).unwrap());
    let client = client_cfg(c.clone(), &ca, server_id());
    let server = server_cfg(s.clone(), &ca);
    let leaf = |source: &Swappable| -> CertificateDer<'static> {
        source.current().unwrap().chain[0].clone()
    };
    let seen = |conn: &rustls::CommonState| conn.peer_certificates().unwrap()[0].clone();

    let (cl, sv) = connect(client.clone(), server.clone()).await;
    let (old_server, old_client) = (leaf(&s), leaf(&c));
    assert_eq!(seen(cl.unwrap().get_ref().1), old_server);
    assert_eq!(seen(sv.unwrap().get_ref().1), old_client);

    s.set(ca.issue(&server_id(), HOUR).unwrap());
    c.set(ca.issue(&client_id(), HOUR).unwrap());
    let (cl, sv) = connect(client, server).await;
    let (new_server, new_client) = (leaf(&s), leaf(&c));
    assert_ne!(new_server, old_server);
    assert_eq!(seen(cl.unwrap().get_ref().1), new_server);
    assert_eq!(seen(sv.unwrap().get_ref().1), new_client);
}

#[test]
fn certified_key_is_cached_per_certificate() {
    let ca = LocalCa::generate(TD).unwrap();
    let cache = CertifiedKeyCache::new();
    let first = Arc::new(ca.issue(&client_id(), HOUR).unwrap());
    let a = cache.get(&first).unwrap();
    let b = cache.get(&first).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same certificate, same CertifiedKey");
    let second = Arc::new(ca.issue(&client_id(), HOUR).unwrap());
    let c = cache.get(&second).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(c.cert[0], second.chain[0]);

    // A key that is not the leaf's is refused with the identity named.
    let mut broken = ca.issue(&client_id(), HOUR).unwrap();
    broken.key = ca.issue(&client_id(), HOUR).unwrap().key;
    let err = cache.get(&Arc::new(broken)).unwrap_err().to_string();
    assert!(err.contains("spiffe://cluster.local/ns/a/sa/x"), "{err}");
}

#[test]
fn provider_follows_the_wire_facts() {
    let p = provider();
    let suites: Vec<CipherSuite> = p.cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
    );
    let groups: Vec<NamedGroup> = p.kx_groups.iter().map(|g| g.name()).collect();
    let classic = [NamedGroup::X25519, NamedGroup::secp256r1];
    assert!(
        groups == classic || groups == [NamedGroup::X25519MLKEM768, classic[0], classic[1]],
        "{groups:?}"
    );
}

#[test]
fn config_errors() {
    let ca = LocalCa::generate(TD).unwrap();
    let s: Arc<Swappable> = Arc::default();
    let err = client_config(s.clone(), vec![], vec![server_id()], None).unwrap_err();
    assert!(matches!(err, TlsError::NoRoots), "{err}");
    let err = client_config(s.clone(), ca.roots(), vec![], None).unwrap_err();
    assert!(matches!(err, TlsError::NoExpectedIdentity), "{err}");
    let resolver = Arc::new(SourceResolver::new(s));
    let err = server_config(
        resolver,
        vec![CertificateDer::from(vec![1, 2, 3])],
        TD,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::BadRoot { index: 0, .. }), "{err}");
}

/// A root CA and an intermediate CA under it (both with their keys), and the intermediate's serial.
pub(super) fn root_and_intermediate() -> (LocalCa, LocalCa, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_owned());
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = ca_params("test root");
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_pem = root.pem();
    let root_key_pem = root_key.serialize_pem();
    let inter = ca_params("test intermediate")
        .signed_by(&inter_key, &Issuer::new(root_params, root_key))
        .unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(inter.der()).unwrap();
    let serial = x.raw_serial().to_vec();
    (
        LocalCa::from_pem(&root_pem, &root_key_pem, "", TD).unwrap(),
        LocalCa::from_pem(&inter.pem(), &inter_key.serialize_pem(), &root_pem, TD).unwrap(),
        serial,
    )
}
