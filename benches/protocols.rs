//! Real application protocols through each proxy, side by side in one run: PostgreSQL measured by
//! its own `pgbench` and Redis by its own `redis-benchmark` (Debian's packages), direct and
//! through l4mesh, Istio's ztunnel and Envoy.
//!
//! The path is `side_by_side`'s (`benches/capture`): a network namespace whose outgoing TCP to
//! 10.77.0.0/24 is captured by an iptables REDIRECT into port 15001, each proxy started in turn
//! there with the same environment and pinned to core 1 (2 worker threads); the servers and the
//! benchmark clients on core 0. One PostgreSQL and one Redis server listen on every address of
//! the namespace, so each path reaches the same servers:
//! - **direct**: 10.77.1.1, not captured;
//! - **TCP**: 10.77.0.2, a workload without HBONE: captured → plain TCP;
//! - **HBONE**: 10.77.0.3, an HBONE workload on this node: captured → mTLS HTTP/2 CONNECT to the
//!   proxy's own 15008 → delivered (both ends of the tunnel in one process).
//!
//! Figures (medians of `BENCH_RUNS`, default 3, runs of `BENCH_SECS`, default 3):
//! - `pgbench -S` (select only, 8 clients, scale 10): transactions per second, latency p50/p99 from
//!   its per-transaction log, and the proxy's CPU µs per transaction;
//! - `pgbench -S -C` (a new connection per transaction, 4 clients): transactions per second;
//! - `redis-benchmark -t set,get` (50 clients): requests per second, GET p50/p99, the proxy's CPU
//!   µs per request; and GET pipelined 16 deep: requests per second.
//!
//! Run (root: it builds a network namespace): `cargo bench --bench protocols`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/integration/app_servers.rs"]
mod app_servers;
mod capture;
mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
mod pod_paths;

use std::path::Path;

use capture::{paths, Capture, Proxy, DIRECT, TCP_DST};
use common::{cpu_secs, median, print_table, Figure};

/// PostgreSQL clients in the select-only run.
const PG_CLIENTS: &str = "8";
/// PostgreSQL clients in the connection-per-transaction run.
const PG_CONNECT_CLIENTS: &str = "4";
/// Redis clients.
const REDIS_CLIENTS: &str = "50";
/// Redis requests per second of `BENCH_SECS`, per test: about the direct rate, so that a run
/// lasts about `BENCH_SECS` at the slowest.
const REDIS_PER_SEC: f64 = 30_000.0;

/// One path's figures for one proxy (or none).
#[derive(Default, Clone)]
struct Figures {
    pg_tps: f64,
    pg_p50_ms: f64,
    pg_p99_ms: f64,
    pg_cpu_us: Option<f64>,
    pg_connect_tps: f64,
    set_rps: f64,
    get_rps: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
    redis_cpu_us: Option<f64>,
    pipelined_rps: f64,
}

const ROWS: [(&str, Figure<Figures>); 11] = [
    ("pgbench -S, transactions/s", |f| Some(f.pg_tps)),
    ("pgbench -S, latency p50 (ms)", |f| Some(f.pg_p50_ms)),
    ("pgbench -S, latency p99 (ms)", |f| Some(f.pg_p99_ms)),
    ("pgbench -S, proxy CPU µs per transaction", |f| f.pg_cpu_us),
    ("pgbench -S -C (connect each), transactions/s", |f| {
        Some(f.pg_connect_tps)
    }),
    ("redis SET, requests/s", |f| Some(f.set_rps)),
    ("redis GET, requests/s", |f| Some(f.get_rps)),
    ("redis GET, latency p50 (ms)", |f| Some(f.get_p50_ms)),
    ("redis GET, latency p99 (ms)", |f| Some(f.get_p99_ms)),
    ("redis SET+GET, proxy CPU µs per request", |f| {
        f.redis_cpu_us
    }),
    ("redis GET pipelined ×16, requests/s", |f| {
        Some(f.pipelined_rps)
    }),
];

struct World {
    cap: Capture,
    /// Where pgbench writes its per-transaction logs.
    logs: tempfile::TempDir,
    secs: f64,
    runs: usize,
}

fn main() {
    let Some(secs) = common::bench_secs(3.0) else {
        return;
    };
    if !netns::privileged(
        "protocols bench",
        &[
            "taskset",
            "pgbench",
            "redis-server",
            "redis-benchmark",
            "runuser",
            "setpriv",
        ],
    ) {
        return;
    }
    let Some(pg) = app_servers::pg_bin() else {
        println!("SKIPPED protocols bench: no PostgreSQL server under /usr/lib/postgresql");
        return;
    };
    let runs = common::bench_runs(3);
    // The servers and clients inherit this core; each proxy is moved to the other.
    common::pin_self(0);
    let mut cap = Capture::new("proto");
    let data = tempfile::tempdir().unwrap();
    // Traversable by postgres, which owns its own directory below.
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pg_dir = data.path().join("pg");
    std::fs::create_dir(&pg_dir).unwrap();
    app_servers::postgres(&mut cap.ns, &pg, &pg_dir);
    app_servers::redis(&mut cap.ns, data.path());
    let world = World {
        cap,
        logs: tempfile::tempdir().unwrap(),
        secs,
        runs,
    };
    world.client(&[
        "pgbench", "-i", "-q", "-s", "10", "-h", DIRECT, "-U", "postgres", "postgres",
    ]);

    println!(
        "pgbench and redis-benchmark through iptables capture, proxy on core 1 (2 worker threads), servers and clients on core 0; median of {runs} × {secs} s"
    );
    let mut tcp = vec![("direct".to_owned(), world.figures(None, DIRECT))];
    let mut hbone = vec![];
    for p in capture::proxies() {
        let running = world.cap.start(p, &[], &[]);
        for dst in paths(p) {
            let f = world.figures(Some(running.pid), dst);
            if *dst == TCP_DST {
                tcp.push((p.name().to_owned(), f));
            } else {
                hbone.push((p.name().to_owned(), f));
            }
        }
        if p == Proxy::Envoy {
            println!("(Envoy takes the TCP path only: it has no HBONE capture of its own)");
        }
    }
    print_table("TCP path (captured → plain TCP)", &tcp, &ROWS);
    print_table(
        "HBONE path (captured → mTLS HTTP/2 CONNECT → same proxy's 15008 → delivered)",
        &hbone,
        &ROWS,
    );
}

impl World {
    fn figures(&self, pid: Option<u32>, dst: &str) -> Figures {
        let pg: Vec<Pgbench> = (0..self.runs).map(|_| self.pgbench(pid, dst)).collect();
        let connect: Vec<f64> = (0..self.runs).map(|_| self.pgbench_connect(dst)).collect();
        let redis: Vec<Redis> = (0..self.runs).map(|_| self.redis(pid, dst)).collect();
        let cpu = |v: Vec<Option<f64>>| pid.map(|_| median(v.into_iter().flatten().collect()));
        Figures {
            pg_tps: median(pg.iter().map(|r| r.tps).collect()),
            pg_p50_ms: median(pg.iter().map(|r| r.p50_ms).collect()),
            pg_p99_ms: median(pg.iter().map(|r| r.p99_ms).collect()),
            pg_cpu_us: cpu(pg.iter().map(|r| r.cpu_us).collect()),
            pg_connect_tps: median(connect),
            set_rps: median(redis.iter().map(|r| r.set_rps).collect()),
            get_rps: median(redis.iter().map(|r| r.get_rps).collect()),
            get_p50_ms: median(redis.iter().map(|r| r.get_p50_ms).collect()),
            get_p99_ms: median(redis.iter().map(|r| r.get_p99_ms).collect()),
            redis_cpu_us: cpu(redis.iter().map(|r| r.cpu_us).collect()),
            pipelined_rps: median(redis.iter().map(|r| r.pipelined_rps).collect()),
        }
    }

    /// Runs a client in the namespace; its stdout, or a panic with what it said.
    fn client(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cap.ns.output(args);
        assert!(ok, "{args:?}\nstdout: {out}\nstderr: {err}");
        out
    }

    /// `pgbench -S` for `BENCH_SECS` with a per-transaction log.
    fn pgbench(&self, pid: Option<u32>, dst: &str) -> Pgbench {
        for old in std::fs::read_dir(self.logs.path()).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        let prefix = self.logs.path().join("tx");
        let prefix_arg = format!("--log-prefix={}", prefix.display());
        let c0 = pid.map(cpu_secs);
        let out = self.pgbench_run(dst, PG_CLIENTS, &["-l", &prefix_arg]);
        let cpu = pid.map(cpu_secs).zip(c0).map(|(c1, c0)| c1 - c0);
        let mut lat = latencies_us(self.logs.path());
        assert!(!lat.is_empty(), "pgbench logged no transaction: {out}");
        lat.sort_unstable();
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        Pgbench {
            tps: tps(&out),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            cpu_us: cpu.map(|c| c / lat.len() as f64 * 1e6),
        }
    }

    /// `pgbench -S -C`: a new connection (and server backend) for every transaction.
    fn pgbench_connect(&self, dst: &str) -> f64 {
        tps(&self.pgbench_run(dst, PG_CONNECT_CLIENTS, &["-C"]))
    }

    /// `pgbench -S` (select only, no vacuum) at `dst` for `BENCH_SECS` with `clients` clients
    /// on two threads and `args`; its output.
    fn pgbench_run(&self, dst: &str, clients: &str, args: &[&str]) -> String {
        let secs = self.secs.ceil().to_string();
        let mut all = vec!["pgbench", "-n", "-S", "-c", clients, "-j", "2", "-T", &secs];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-h", dst, "-U", "postgres", "postgres"]);
        self.client(&all)
    }

    /// `redis-benchmark` at `dst` with `REDIS_CLIENTS` clients, `n` requests and `args`; its CSV.
    fn redis_benchmark(&self, dst: &str, n: u64, args: &[&str]) -> String {
        let count = n.to_string();
        let mut all = vec![
            "redis-benchmark",
            "-h",
            dst,
            "-p",
            "6379",
            "-c",
            REDIS_CLIENTS,
            "-n",
            &count,
            "--csv",
        ];
        all.extend_from_slice(args);
        self.client(&all)
    }

    /// `redis-benchmark`: SET and GET, then GET pipelined.
    fn redis(&self, pid: Option<u32>, dst: &str) -> Redis {
        let n = (REDIS_PER_SEC * self.secs) as u64;
        let c0 = pid.map(cpu_secs);
        let plain = self.redis_benchmark(dst, n, &["-t", "set,get"]);
        let cpu = pid.map(cpu_secs).zip(c0).map(|(c1, c0)| c1 - c0);
        let pipelined = self.redis_benchmark(dst, n * 4, &["-P", "16", "-t", "get"]);
        let set = csv_row(&plain, "SET");
        let get = csv_row(&plain, "GET");
        Redis {
            set_rps: set.rps,
            get_rps: get.rps,
            get_p50_ms: get.p50_ms,
            get_p99_ms: get.p99_ms,
            cpu_us: cpu.map(|c| c / (2 * n) as f64 * 1e6),
            pipelined_rps: csv_row(&pipelined, "GET").rps,
        }
    }
}

struct Pgbench {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: Option<f64>,
}

struct Redis {
    set_rps: f64,
    get_rps: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
    cpu_us: Option<f64>,
    pipelined_rps: f64,
}

/// pgbench's `tps = 1234.5 (...)` line.
fn tps(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {out}"))
}

/// Every transaction's latency (µs) from pgbench's logs in `dir`: the third column of
/// `client transaction latency script epoch µs`.
fn latencies_us(dir: &Path) -> Vec<u64> {
    let mut all = vec![];
    for f in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        all.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    all
}

struct CsvRow {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// One test's row of `redis-benchmark --csv`:
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`.
fn csv_row(out: &str, test: &str) -> CsvRow {
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("\"{test}\",")))
        .unwrap_or_else(|| panic!("no {test} in redis-benchmark's output: {out}"));
    let cols: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|c| c.trim_matches('"').parse().unwrap())
        .collect();
    CsvRow {
        rps: cols[0],
        p50_ms: cols[3],
        p99_ms: cols[5],
    }
}
