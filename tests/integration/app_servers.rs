//! Debian's PostgreSQL and Redis servers started in a network namespace, throwaway and trusting
//! every client: the application-protocol tests (`cluster::protocols`) and the per-protocol
//! benchmark (`benches/protocols.rs`) run the same servers.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::netns::Netns;

/// Debian's PostgreSQL binaries (`/usr/lib/postgresql/<version>/bin`), the newest installed.
pub fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("postgres").exists())
        .collect();
    found.sort();
    found.pop()
}

fn uid_of(user: &str) -> (u32, u32) {
    let out = |flag: &str| {
        let o = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    (out("-u"), out("-g"))
}

/// A PostgreSQL cluster in `dir` (made `postgres`'s: the server refuses root), trusting every
/// client, served from `ns` on port 5432 of every address, without fsync. `dir`'s parents must
/// be traversable by `postgres`.
pub fn postgres(ns: &mut Netns, bin: &Path, dir: &Path) {
    let (uid, gid) = uid_of("postgres");
    chown(dir, Some(uid), Some(gid)).unwrap();
    let data = dir.join("data");
    let ok = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "initdb: {ok:?}");
    let hba = data.join("pg_hba.conf");
    let mut conf = std::fs::read_to_string(&hba).unwrap();
    conf.push_str("host all all 0.0.0.0/0 trust\n");
    std::fs::write(&hba, conf).unwrap();
    let postgres = bin.join("postgres");
    ns.spawn(
        &[
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            postgres.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-p",
            "5432",
            "-k",
            dir.to_str().unwrap(),
            "-c",
            "listen_addresses=*",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        &[],
        "ready to accept connections",
    );
}

/// A Redis server on port 6379 of every address in `ns`, persisting nothing (its working
/// directory is `dir`).
pub fn redis(ns: &mut Netns, dir: &Path) {
    ns.spawn(
        &[
            "redis-server",
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
        "Ready to accept connections",
    );
}
