//! Revocation lists read from a file, refusals at real handshakes (loopback TCP, tokio-rustls),
//! and live connections closed by a reload.

use std::sync::Arc;
use std::time::Duration;

use super::super::tests::{
    client_id, connect, err_text, root_and_intermediate, server_id, Swappable, TD,
};
use super::*;
use crate::identity::{LocalCa, WorkloadCert};
use crate::tls::{client_config, server_config, SourceResolver};

const HOUR: Duration = Duration::from_secs(3600);

fn serial(cert: &WorkloadCert) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    x.raw_serial().to_vec()
}

/// A CRL file in a temporary directory, with the `Revocation` that reads it.
struct CrlFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    rev: Arc<Revocation>,
}

impl CrlFile {
    fn new(content: &str) -> CrlFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-crl.pem");
        std::fs::write(&path, content).unwrap();
        let rev = Revocation::load(path.clone());
        CrlFile {
            _dir: dir,
            path,
            rev,
        }
    }

    fn write(&self, content: &str) {
        std::fs::write(&self.path, content).unwrap();
        self.rev.reload();
    }
}

fn client_with(ca: &LocalCa, cert: WorkloadCert, rev: &CrlFile) -> Arc<rustls::ClientConfig> {
    client_config(
        Swappable::with(cert),
        ca.roots(),
        vec![server_id()],
        Some(rev.rev.clone()),
    )
    .unwrap()
}

fn server_with(ca: &LocalCa, cert: WorkloadCert, rev: &CrlFile) -> Arc<rustls::ServerConfig> {
    server_config(
        Arc::new(SourceResolver::new(Swappable::with(cert))),
        ca.roots(),
        TD,
        Some(rev.rev.clone()),
    )
    .unwrap()
}

#[test]
fn files_parse_as_pem_der_or_nothing() {
    let ca = LocalCa::generate(TD).unwrap();
    let a = ca.revocation_list(&[vec![1, 2, 3]]).unwrap();
    let b = ca.revocation_list(&[]).unwrap();
    let p = Path::new("crl.pem");
    assert_eq!(parse(p, b"").unwrap().len(), 0);
    assert_eq!(parse(p, b" \n").unwrap().len(), 0);
    assert_eq!(parse(p, format!("{a}\n{b}").as_bytes()).unwrap().len(), 2);
    let der = rustls_pemfile::crls(&mut a.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(parse(p, &der).unwrap().len(), 1);

    let err = parse(p, b"not a list").unwrap_err().to_string();
    assert!(
        err.contains("crl.pem: revocation list #1 is not a usable X.509 CRL"),
        "{err}"
    );
    let err = parse(p, format!("{a}\n{}", ca.root_pem()).as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected PEM blocks of type X509 CRL") && err.contains("CERTIFICATE"),
        "{err}"
    );
}

#[test]
fn a_missing_or_malformed_file_revokes_nothing_and_a_bad_reload_keeps_the_lists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca-crl.pem");
    let rev = Revocation::load(path.clone());
    assert_eq!(rev.lists(), 0);
    let ca = LocalCa::generate(TD).unwrap();
    std::fs::write(&path, ca.revocation_list(&[vec![7]]).unwrap()).unwrap();
    rev.reload();
    assert_eq!(rev.lists(), 1);
    let generation = rev.generation();
    std::fs::write(
        &path,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    rev.reload();
    assert_eq!(
        rev.lists(),
        1,
        "a malformed reload keeps the previous lists"
    );
    assert_eq!(rev.generation(), generation);
}

#[tokio::test]
async fn a_revoked_server_is_refused_by_the_client() {
    let ca = LocalCa::generate(TD).unwrap();
    let server_cert = ca.issue(&server_id(), HOUR).unwrap();
    let crl = CrlFile::new(&ca.revocation_list(&[serial(&server_cert)]).unwrap());
    let other = CrlFile::new("");
    let client = client_with(&ca, ca.issue(&client_id(), HOUR).unwrap(), &crl);
    let server = server_with(&ca, server_cert, &other);
    let (c, _s) = connect(client, server).await;
    let text = err_text(c);
    assert!(text.contains("Revoked"), "{text}");
    assert_eq!(crl.rev.counts.rejections(Checker::Client), 1);
    assert_eq!(crl.rev.counts.rejections(Checker::Server), 0);
}

#[tokio::test]
async fn a_revoked_client_is_refused_by_the_server_and_others_pass() {
    let ca = LocalCa::generate(TD).unwrap();
    let revoked = ca.issue(&client_id(), HOUR).unwrap();
    let fine = ca.issue(&client_id(), HOUR).unwrap();
    let crl = CrlFile::new(&ca.revocation_list(&[serial(&revoked)]).unwrap());
    let none = CrlFile::new("");
    let server = server_with(&ca, ca.issue(&server_id(), HOUR).unwrap(), &crl);

    let (c, s) = connect(client_with(&ca, revoked, &none), server.clone()).await;
    assert!(c.is_err());
    let text = err_text(s);
    assert!(text.contains("Revoked"), "{text}");
    assert_eq!(crl.rev.counts.rejections(Checker::Server), 1);

    // Another certificate of the same identity is not on the list.
    let (c, s) = connect(client_with(&ca, fine, &none), server).await;
    c.unwrap();
    s.unwrap();
    assert_eq!(crl.rev.counts.rejections(Checker::Server), 1);
}

#[tokio::test]
async fn a_revoked_intermediate_revokes_every_certificate_under_it() {
    let (root, inter, inter_serial) = root_and_intermediate();
    let crl = CrlFile::new(&root.revocation_list(&[inter_serial]).unwrap());
    let none = CrlFile::new("");
    let client = client_with(&inter, inter.issue(&client_id(), HOUR).unwrap(), &crl);
    let server = server_with(&inter, inter.issue(&server_id(), HOUR).unwrap(), &none);
    let (c, _s) = connect(client, server).await;
    let text = err_text(c);
    assert!(text.contains("Revoked"), "{text}");
}

#[tokio::test]
async fn a_reload_closes_live_connections_whose_peer_is_now_revoked() {
    let ca = LocalCa::generate(TD).unwrap();
    let server_cert = ca.issue(&server_id(), HOUR).unwrap();
    let server_serial = serial(&server_cert);
    let crl = CrlFile::new("");
    let none = CrlFile::new("");
    let since = crl.rev.generation();
    let client = client_with(&ca, ca.issue(&client_id(), HOUR).unwrap(), &crl);
    let server = server_with(&ca, server_cert, &none);
    let (c, _s) = connect(client, server).await;
    let c = c.unwrap();
    let mut tracking = crl
        .rev
        .track(c.get_ref().1, Arc::new(ca.roots()), Checker::Client, since);
    assert_eq!(crl.rev.tracked(), 1);

    // A list that revokes someone else leaves it alone.
    crl.write(&ca.revocation_list(&[vec![0x42]]).unwrap());
    assert!(!*tracking.revoked.borrow());
    // One that revokes its server closes it, counted once however often it is reloaded.
    crl.write(
        &ca.revocation_list(std::slice::from_ref(&server_serial))
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), tracking.revoked())
        .await
        .expect("the connection is signalled");
    crl.write(&ca.revocation_list(&[server_serial]).unwrap());
    assert_eq!(crl.rev.counts.rejections(Checker::Client), 1);
    drop(tracking);
    assert_eq!(crl.rev.tracked(), 0);
}

#[tokio::test]
async fn a_connection_registered_after_a_reload_it_missed_is_checked() {
    let ca = LocalCa::generate(TD).unwrap();
    let server_cert = ca.issue(&server_id(), HOUR).unwrap();
    let list = ca.revocation_list(&[serial(&server_cert)]).unwrap();
    let crl = CrlFile::new("");
    let none = CrlFile::new("");
    let since = crl.rev.generation();
    let (c, _s) = connect(
        client_with(&ca, ca.issue(&client_id(), HOUR).unwrap(), &crl),
        server_with(&ca, server_cert, &none),
    )
    .await;
    // The list arrives between the handshake and the registration.
    crl.write(&list);
    let tracking = crl.rev.track(
        c.unwrap().get_ref().1,
        Arc::new(ca.roots()),
        Checker::Client,
        since,
    );
    assert!(*tracking.revoked.borrow());
    assert_eq!(crl.rev.counts.rejections(Checker::Client), 1);
}

#[tokio::test]
async fn follow_applies_a_file_written_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca-crl.pem");
    let rev = Revocation::load(path.clone());
    let task = tokio::spawn(rev.clone().follow());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ca = LocalCa::generate(TD).unwrap();
    std::fs::write(&path, ca.revocation_list(&[vec![9]]).unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rev.lists() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new file was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
}
