//! Shared integration-test harness: throwaway PostgreSQL and Redis servers.
//!
//! Every integration test file does `mod common;` and uses what it needs:
//!
//! * [`PgServer::shared()`] -> URL of the PostgreSQL shared by the whole run (env
//!   `QUOTA_TEST_PG_URL`, which `make test` sets), or of one private server started once
//!   for this test process. [`PgServer::start_private()`] starts a server of its own for
//!   fault tests (`stop`/`start`/`pause`/`resume`).
//! * [`unique_schema()`] -> a fresh schema name per test, so tests sharing one PostgreSQL
//!   never see each other's rows.
//! * [`RedisServer::start`] / [`RedisServer::builder`] -> a `redis-server` (env
//!   `QUOTA_TEST_REDIS`, default `redis-server` on PATH) with the module
//!   (env `QUOTA_TEST_MODULE`, default `target/release/libredis_quota.so`) on a free port.
//! * [`test_server`] -> Redis with the module on the shared PostgreSQL and a schema.
//! * [`RedisCluster`] -> N masters with `cluster-enabled yes`, slots spread evenly
//!   ([`RedisCluster::add_replica`] adds a replica to one of them).
//! * [`TestEnv`] -> [`test_server`] on a fresh schema with SQL helpers; [`ledger_sums`],
//!   [`wait_ledger_flushed`], [`LedgerInfo`] -> the usage ledger in PostgreSQL and `INFO`.
//! * [`to_map`], [`field_i64`], [`field_str`], ... -> read map replies (RESP2 or RESP3).
//! * [`Quota`] -> the `QUOTA.*` commands on any connection, with typed replies ([`Admit`],
//!   [`Usage`], [`Commit`]).
//! * [`Raw`] -> a strict RESP client for byte-level tests ([`encode`] writes one command).
//!
//! All servers live in directories under `QUOTA_TEST_TMPDIR` (default
//! `$TMPDIR/redis-quota-tests`); a failing test keeps its Redis directory and prints the
//! tail of the server log.
#![allow(dead_code, unused_imports)]

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use redis::Value;

mod client;
mod cluster;
mod dump;
mod info;
mod ledger;
mod pg;
mod reply;
mod resp;
mod rng;
mod server;

pub use client::*;
pub use cluster::*;
pub use dump::*;
pub use info::*;
pub use ledger::*;
pub use pg::*;
pub use reply::*;
pub use resp::*;
pub use rng::*;
pub use server::*;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A random 64-bit number (std only: a randomly keyed SipHash of time and a counter).
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(next_id());
    h.write_u32(std::process::id());
    h.finish()
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Root of all test server directories: `QUOTA_TEST_TMPDIR` or `$TMPDIR/redis-quota-tests`.
pub fn test_root() -> PathBuf {
    let root = match std::env::var_os("QUOTA_TEST_TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => std::env::temp_dir().join("redis-quota-tests"),
    };
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    root
}

/// A new, empty, uniquely named directory under [`test_root`].
pub fn unique_dir(prefix: &str) -> PathBuf {
    let dir = test_root().join(format!(
        "{prefix}-{}-{}-{:06x}",
        std::process::id(),
        next_id(),
        random_u64() & 0xff_ffff
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A unique lowercase schema name for one test: `t_<pid>_<counter>_<random>`.
pub fn unique_schema() -> String {
    format!(
        "t_{}_{}_{:08x}",
        std::process::id(),
        next_id(),
        random_u64() & 0xffff_ffff
    )
}

/// A port on 127.0.0.1 that was free a moment ago (bind to port 0, take the port).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn port_bindable(port: u32) -> bool {
    port <= 65535 && TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
}

/// A free port whose cluster bus port (+10000) is free too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let p = free_port();
        if u32::from(p) + 10000 <= 65535 && port_bindable(u32::from(p) + 10000) {
            return p;
        }
        let p = 20000 + (random_u64() % 25000) as u32;
        if port_bindable(p) && port_bindable(p + 10000) {
            return p as u16;
        }
    }
    panic!("no free port pair (port, port+10000) found");
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_to_string_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    let start = v.len().saturating_sub(lines);
    v[start..].join("\n")
}

/// Sends a signal (e.g. "STOP", "CONT", "KILL") to processes with `sh`'s builtin kill
/// (works without procps).
pub fn send_signal(sig: &str, pids: &[u32]) -> bool {
    if pids.is_empty() {
        return true;
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("kill -{sig} \"$@\""))
        .arg("sh")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for p in pids {
        cmd.arg(p.to_string());
    }
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Parent pid of a process, from /proc (None when it is gone).
fn ppid_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and all its descendants, from /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(pp) = ppid_of(p) {
                    parents.push((p, pp));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        for (p, pp) in &parents {
            if *pp == cur && !out.contains(p) {
                out.push(*p);
            }
        }
        i += 1;
    }
    out
}
