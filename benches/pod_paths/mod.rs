//! What the cluster benches (pod_to_pod, shared_mode) do in pods: run code inside a pod's
//! network namespace, serve a counting sink and an echo server there, and measure one stream's
//! throughput and the round trips of 1 KiB ping-pongs from a client pod. Included by each bench
//! next to `control_plane` (for `enter_netns`) and `common`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use super::common;
use super::control_plane::enter_netns;

pub const SINK_PORT: u16 = 19000;
pub const ECHO_PORT: u16 = 19001;
pub const CHUNK: usize = 256 * 1024;

/// Runs `f` on a thread inside the network namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// A sink (counting bytes) and an echo server on the server pod's address, in its namespace.
pub fn servers(ns: &str, ip: &str) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let (c, ip) = (count.clone(), ip.to_owned());
    let (sink, echo) = in_ns(ns, move || {
        (
            TcpListener::bind(format!("{ip}:{SINK_PORT}")).unwrap(),
            TcpListener::bind(format!("{ip}:{ECHO_PORT}")).unwrap(),
        )
    });
    common::serve_sink(sink, c, CHUNK);
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    count
}

/// A connection from the client pod `ns` to `ip:port` (its socket lives in that namespace).
pub fn connect(ns: &str, ip: &str, port: u16) -> TcpStream {
    let addr = format!("{ip}:{port}");
    let s = in_ns(ns, move || TcpStream::connect(addr).unwrap());
    s.set_nodelay(true).unwrap();
    s
}

pub fn throughput(ns: &str, ip: &str, secs: f64, count: &AtomicU64) -> f64 {
    common::push(vec![connect(ns, ip, SINK_PORT)], CHUNK, secs, count, None).gbps
}

pub fn latency(ns: &str, ip: &str) -> (Duration, Duration) {
    common::ping_pong(&mut connect(ns, ip, ECHO_PORT))
}

pub fn pin(pid: u32, core: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", core, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}
