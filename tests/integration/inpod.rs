//! Shared mode's namespace handling on real network namespaces: a socket made through a pod's
//! `PodNetns` lives in that pod's namespace (reachable on the pod's own loopback, listed by the
//! pod's `ss`), and a descriptor that is not a network namespace is refused with a clear error.

use std::os::fd::OwnedFd;

use tokio::io::AsyncWriteExt;

use l4mesh::inpod::netns::PodNetns;

use super::netns::{privileged, Netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_made_inside_the_pod_namespace() {
    if !privileged("sockets_are_made_inside_the_pod_namespace", &[]) {
        return;
    }
    let pod = Netns::new("inpod");
    let fd: OwnedFd = std::fs::File::open(format!("/var/run/netns/{}", pod.name))
        .unwrap()
        .into();
    let ns = PodNetns::enter(fd, "default/pod").unwrap();
    let l = ns
        .listen("127.0.0.1:0".parse().unwrap(), true)
        .await
        .unwrap();
    let port = l.local_addr().unwrap().port();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    let served = tokio::spawn(async move {
        let (mut s, peer) = l.accept().await.unwrap();
        s.write_all(b"inside").await.unwrap();
        (peer, l)
    });
    // The pod's own loopback reaches it: the socket is the pod's.
    let (ok, out, err) = pod.output(&[
        "python3",
        "-c",
        "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3); print(s.recv(16).decode())",
        &port.to_string(),
    ]);
    assert!(ok, "connect from inside the pod: {out} {err}");
    assert_eq!(out.trim(), "inside");
    let (peer, _listening) = served.await.unwrap();
    assert!(peer.ip().is_loopback());
    let (_, listing, _) = pod.output(&["ss", "-ltnH"]);
    assert!(
        listing.contains(&format!("127.0.0.1:{port}")),
        "the pod's ss lists the listener: {listing}"
    );
    // The thread keeps serving: more sockets through the same namespace.
    for _ in 0..16 {
        let l = ns.listen("127.0.0.1:0".parse().unwrap(), false).await;
        assert!(l.is_ok(), "{l:?}");
    }
    // Not a network namespace: refused, naming the pod.
    let f: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let e = PodNetns::enter(f, "default/bad").unwrap_err().to_string();
    assert!(
        e.contains("entering the network namespace of default/bad"),
        "{e}"
    );
    assert_eq!(ns.pod(), "default/pod");
}
