//! The real l4mesh binary as a child process: its listeners on one loopback IP, its stderr
//! collected line by line, signals sent with `kill`, its exit awaited with a bound.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct L4mesh {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pub socks5: SocketAddr,
    pub readiness: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for L4mesh {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl L4mesh {
    /// Starts l4mesh with every listener on `ip` (HBONE too, unless `env` moves it) and `env`.
    pub fn spawn(ip: &str, env: &[(&str, String)]) -> L4mesh {
        let at = |port: u16| SocketAddr::new(ip.parse().unwrap(), port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_l4mesh"));
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .env("L4MESH_OUTBOUND_ADDR", at(15001).to_string())
            .env("L4MESH_INBOUND_PLAINTEXT_ADDR", at(15006).to_string())
            .env("L4MESH_HBONE_ADDR", at(15008).to_string())
            .env("L4MESH_SOCKS5_ADDR", at(15080).to_string())
            .env("L4MESH_READINESS_ADDR", at(15021).to_string())
            // Not the default 0.0.0.0:15020, which two binaries of parallel tests would share.
            .env("L4MESH_METRICS_ADDR", at(15020).to_string())
            .env("L4MESH_ADMIN_ADDR", at(15000).to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("l4mesh binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        L4mesh {
            child,
            lines,
            socks5: at(15080),
            readiness: at(15021),
            admin: at(15000),
        }
    }

    /// Waits (up to 10 s) until readiness answers 200.
    pub async fn ready(&self) {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok((200, _)) = http(self.readiness, "GET", "/healthz/ready").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("l4mesh not ready within 10 s; log:\n{}", self.log());
    }

    /// The process id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Lines containing every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Waits (up to `limit`) for a line containing every one of `parts`.
    pub async fn wait_line(&self, parts: &[&str], limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.count(parts) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Sends `signal` (TERM, INT, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// The exit code, waiting up to `limit`; `None` if still running then.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// One HTTP/1.1 request; the status and the body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("HTTP answer timed out"))??;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((code, body))
}
