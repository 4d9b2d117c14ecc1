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
//! * [`RedisCluster`] -> N masters with `cluster-enabled yes`, slots spread evenly.
//! * [`to_map`], [`field_i64`], [`field_str`], ... -> read map replies (RESP2 or RESP3).
//!
//! All servers live in directories under `QUOTA_TEST_TMPDIR` (default
//! `$TMPDIR/redis-quota-tests`); a failing test keeps its Redis directory and prints the
//! tail of the server log.
#![allow(dead_code)]

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

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

fn pg_script() -> PathBuf {
    repo_root().join("scripts").join("pg.sh")
}

fn run_pg_script(cmd: &str, dir: &Path) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(pg_script())
        .arg(cmd)
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scripts/pg.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "scripts/pg.sh {cmd} {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn psql_binary() -> PathBuf {
    // Newest /usr/lib/postgresql/<v>/bin/psql, else psql on PATH.
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let v: u32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
            let p = e.path().join("bin").join("psql");
            if p.exists() && best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                best = Some((v, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("psql"))
}

/// Runs SQL with `psql -X -At -v ON_ERROR_STOP=1` against `url`; stdout (trimmed) or the error text.
pub fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(psql_binary())
        .args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(format!(
            "psql failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Like [`try_psql`], panicking with psql's error.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
}

/// A throwaway PostgreSQL server (via `scripts/pg.sh`), destroyed on drop.
pub struct PgServer {
    dir: PathBuf,
    url: String,
}

static SHARED_PG: OnceLock<PgServer> = OnceLock::new();

extern "C" {
    fn atexit(cb: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn destroy_shared_pg() {
    if let Some(pg) = SHARED_PG.get() {
        pg.resume();
        let _ = run_pg_script("destroy", &pg.dir);
    }
}

impl PgServer {
    /// URL of the PostgreSQL shared by all tests of this run: `QUOTA_TEST_PG_URL` when set,
    /// else one private server started on first use, kept for the whole test process and
    /// destroyed at process exit (best effort).
    pub fn shared() -> String {
        if let Ok(url) = std::env::var("QUOTA_TEST_PG_URL") {
            if !url.trim().is_empty() {
                return url.trim().to_string();
            }
        }
        SHARED_PG
            .get_or_init(|| {
                let pg = PgServer::start_private();
                // SAFETY: registering a plain extern "C" fn with libc's atexit.
                unsafe {
                    atexit(destroy_shared_pg);
                }
                pg
            })
            .url
            .clone()
    }

    /// Starts a new server of its own (for tests that stop, restart or pause it).
    pub fn start_private() -> PgServer {
        let dir = unique_dir("pg");
        match run_pg_script("start", &dir) {
            Ok(url) => PgServer { dir, url },
            Err(e) => {
                let _ = run_pg_script("destroy", &dir);
                panic!("{e}");
            }
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|s| s.split('/').next())
            .and_then(|s| s.parse().ok())
            .expect("port in url")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn home(&self) -> PathBuf {
        fs::read_to_string(self.dir.join("home"))
            .map(|s| PathBuf::from(s.trim()))
            .unwrap_or_else(|_| self.dir.clone())
    }

    /// The server log.
    pub fn log(&self) -> String {
        read_to_string_lossy(&self.home().join("log"))
    }

    /// Fast shutdown; data and port are kept for [`PgServer::start`].
    pub fn stop(&self) {
        self.resume();
        run_pg_script("stop", &self.dir).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts it again on the same port with the same data.
    pub fn start(&self) {
        let url = run_pg_script("start", &self.dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url, self.url,
            "PostgreSQL restarted on another port (the old one was taken)"
        );
    }

    pub fn is_running(&self) -> bool {
        run_pg_script("status", &self.dir).is_ok()
    }

    /// The postmaster pid (None when not running).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let s = fs::read_to_string(self.home().join("data").join("postmaster.pid")).ok()?;
        let pid: u32 = s.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The postmaster and all its children.
    pub fn pids(&self) -> Vec<u32> {
        self.postmaster_pid().map(process_tree).unwrap_or_default()
    }

    /// SIGSTOP the postmaster and all its children: connections hang, nothing answers.
    pub fn pause(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "PostgreSQL is not running");
        // Stop the postmaster first so it cannot fork new children meanwhile.
        send_signal("STOP", &pids[..1]);
        let pids = self.pids();
        send_signal("STOP", &pids);
    }

    /// SIGCONT everything paused by [`PgServer::pause`].
    pub fn resume(&self) {
        let pids = self.pids();
        send_signal("CONT", &pids);
    }

    /// Runs SQL against this server (see [`psql`]).
    pub fn psql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }

    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        try_psql(&self.url, sql)
    }

    /// Creates a login role that must prove its password (scram-sha-256 over TCP from
    /// 127.0.0.1; everyone else keeps trust) and may create schemas. Returns its URL without a
    /// password.
    pub fn password_role(&self, role: &str, password: &str) -> String {
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
             GRANT CREATE ON DATABASE postgres TO {role}"
        ));
        let hba = [
            "local all all trust".to_string(),
            format!("host all {role} 127.0.0.1/32 scram-sha-256"),
            "host all all 127.0.0.1/32 trust".to_string(),
            "host all all ::1/128 trust".to_string(),
        ];
        let rows: Vec<String> = hba.iter().map(|l| format!("('{l}')")).collect();
        self.psql(&format!(
            "CREATE TEMP TABLE hba(line text); INSERT INTO hba VALUES {}; \
             COPY hba TO '{}'; SELECT pg_reload_conf()",
            rows.join(","),
            self.psql("SHOW hba_file")
        ));
        let rule =
            format!("SELECT auth_method FROM pg_hba_file_rules WHERE '{role}' = ANY(user_name)");
        assert!(
            wait_until(Duration::from_secs(5), || self.psql(&rule)
                == "scram-sha-256"),
            "pg_hba.conf was not reloaded"
        );
        format!("postgresql://{role}@127.0.0.1:{}/postgres", self.port())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.resume();
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log ({}) ---\n{}",
                self.home().join("log").display(),
                tail(&self.log(), 40)
            );
        }
        if let Err(e) = run_pg_script("destroy", &self.dir) {
            eprintln!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// The redis-server binary under test: `QUOTA_TEST_REDIS`, else `redis-server` on PATH.
pub fn redis_binary() -> PathBuf {
    match std::env::var_os("QUOTA_TEST_REDIS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("redis-server"),
    }
}

/// `(major, minor, patch)` from `<binary> --version` ("Redis server v=7.0.15 ...").
pub fn binary_version(binary: &Path) -> (u32, u32, u32) {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", binary.display()));
    let s = String::from_utf8_lossy(&out.stdout);
    let v = s
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or_else(|| panic!("no version in {s:?}"));
    parse_version(v)
}

fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut it = v.trim().split('.').map(|p| {
        p.chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// The module under test: `QUOTA_TEST_MODULE`, else `<target dir>/release/libredis_quota.so`.
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("QUOTA_TEST_MODULE") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if !t.is_empty() => {
            let t = PathBuf::from(t);
            if t.is_absolute() {
                t
            } else {
                repo_root().join(t)
            }
        }
        _ => repo_root().join("target"),
    };
    target.join("release").join("libredis_quota.so")
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut best: Option<SystemTime> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().ok().and_then(|m| m.modified().ok())
        };
        if let Some(t) = t {
            if best.is_none_or(|b| t > b) {
                best = Some(t);
            }
        }
    }
    best
}

fn check_module(path: &Path) {
    static WARNED: OnceLock<()> = OnceLock::new();
    let meta = fs::metadata(path).unwrap_or_else(|_| {
        panic!(
            "module {} not found: build it first with `cargo build --release` (or set QUOTA_TEST_MODULE)",
            path.display()
        )
    });
    WARNED.get_or_init(|| {
        if std::env::var_os("QUOTA_TEST_MODULE").is_none() {
            let built = meta.modified().ok();
            let src = newest_mtime(&repo_root().join("src"));
            if let (Some(b), Some(s)) = (built, src) {
                if s > b {
                    eprintln!(
                        "warning: {} is older than src/: run `cargo build --release` first",
                        path.display()
                    );
                }
            }
        }
    });
}

fn quote_conf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Builder for [`RedisServer`]: module arguments, extra redis.conf lines, binary, cluster mode.
#[derive(Clone, Debug)]
pub struct RedisBuilder {
    module_args: Vec<(String, String)>,
    conf: Vec<String>,
    binary: PathBuf,
    module: Option<PathBuf>,
    cluster: bool,
    port: Option<u16>,
}

impl Default for RedisBuilder {
    fn default() -> Self {
        RedisBuilder {
            module_args: Vec::new(),
            conf: Vec::new(),
            binary: redis_binary(),
            module: Some(module_path()),
            cluster: false,
            port: None,
        }
    }
}

impl RedisBuilder {
    /// Adds one module argument pair (`name value` after the module path).
    pub fn module_arg(mut self, name: &str, value: &str) -> Self {
        self.module_args.push((name.to_string(), value.to_string()));
        self
    }

    pub fn module_args(mut self, args: &[(&str, &str)]) -> Self {
        for (k, v) in args {
            self.module_args.push((k.to_string(), v.to_string()));
        }
        self
    }

    /// Adds a redis.conf line, e.g. `"appendonly yes"`, `"save 60 1"`, `"maxmemory 10mb"`.
    pub fn conf(mut self, line: &str) -> Self {
        self.conf.push(line.to_string());
        self
    }

    /// `replicaof 127.0.0.1 <master port>`.
    pub fn replica_of(self, master: &RedisServer) -> Self {
        let line = format!("replicaof 127.0.0.1 {}", master.port());
        self.conf(&line)
    }

    /// `cluster-enabled yes` (port chosen so that port+10000 is free too).
    pub fn cluster(mut self) -> Self {
        self.cluster = true;
        self
    }

    /// A specific redis-server binary instead of `QUOTA_TEST_REDIS`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = path.into();
        self
    }

    /// Another module file instead of the default one.
    pub fn module_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.module = Some(path.into());
        self
    }

    /// A plain redis-server without the module.
    pub fn without_module(mut self) -> Self {
        self.module = None;
        self
    }

    /// A fixed port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn start(self) -> RedisServer {
        if let Some(m) = &self.module {
            check_module(m);
        }
        let dir = unique_dir("redis");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = self.port.unwrap_or_else(|| {
                if self.cluster {
                    free_cluster_port()
                } else {
                    free_port()
                }
            });
            let mut server = RedisServer {
                dir: dir.clone(),
                port,
                binary: self.binary.clone(),
                conf_path: dir.join("redis.conf"),
                child: None,
                version: (0, 0, 0),
                keep_dir: false,
                exited_at_start: None,
            };
            fs::write(&server.conf_path, self.conf_text(&dir, port))
                .unwrap_or_else(|e| panic!("cannot write redis.conf: {e}"));
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => {
                    let in_use = server.log().contains("Address already in use");
                    server.kill9();
                    if in_use && self.port.is_none() {
                        last_err = e;
                        let _ = fs::remove_file(dir.join("redis.log"));
                        continue;
                    }
                    server.keep_dir = true;
                    drop(server);
                    panic!("{e}");
                }
            }
        }
        panic!("redis-server could not get a free port: {last_err}");
    }

    fn conf_text(&self, dir: &Path, port: u16) -> String {
        let mut c = String::new();
        let d = dir.to_string_lossy();
        c.push_str("# written by tests/common/mod.rs\n");
        c.push_str(&format!("port {port}\n"));
        c.push_str("bind 127.0.0.1\n");
        c.push_str("protected-mode no\n");
        c.push_str("daemonize no\n");
        c.push_str(&format!("dir {}\n", quote_conf(&d)));
        c.push_str(&format!(
            "logfile {}\n",
            quote_conf(&format!("{d}/redis.log"))
        ));
        c.push_str(&format!(
            "pidfile {}\n",
            quote_conf(&format!("{d}/redis.pid"))
        ));
        c.push_str("loglevel notice\n");
        c.push_str("enable-debug-command yes\n");
        c.push_str("enable-module-command yes\n");
        // Replicas sync at once instead of after the default 5 s wait.
        c.push_str("repl-diskless-sync-delay 0\n");
        if !self.conf.iter().any(|l| l.trim_start().starts_with("save")) {
            c.push_str("save \"\"\n");
        }
        if self.cluster {
            c.push_str("cluster-enabled yes\n");
            c.push_str("cluster-config-file nodes.conf\n");
            c.push_str("cluster-node-timeout 5000\n");
        }
        if let Some(m) = &self.module {
            let mut line = format!("loadmodule {}", quote_conf(&m.to_string_lossy()));
            for (k, v) in &self.module_args {
                line.push(' ');
                line.push_str(&quote_conf(k));
                line.push(' ');
                line.push_str(&quote_conf(v));
            }
            c.push_str(&line);
            c.push('\n');
        }
        for l in &self.conf {
            c.push_str(l);
            c.push('\n');
        }
        c
    }
}

/// A `redis-server` in its own directory on a free port; killed (SIGKILL) on drop.
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    binary: PathBuf,
    conf_path: PathBuf,
    child: Option<Child>,
    version: (u32, u32, u32),
    keep_dir: bool,
    /// How the server exited when it stopped during a start.
    exited_at_start: Option<std::process::ExitStatus>,
}

impl RedisServer {
    /// Redis with the module loaded with these `name value` arguments.
    pub fn start(module_args: &[(&str, &str)]) -> RedisServer {
        RedisServer::builder().module_args(module_args).start()
    }

    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .map_err(|e| format!("cannot open stdout.log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.binary)
            .arg(&self.conf_path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.exited_at_start = Some(status);
                return Err(format!(
                    "redis-server ({}) exited at start ({status}); does the module load?\n--- config {} ---\n{}\n--- log ---\n{}",
                    self.binary.display(),
                    self.conf_path.display(),
                    read_to_string_lossy(&self.conf_path),
                    tail(&self.log(), 60)
                ));
            }
            match self.ping() {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "redis-server on port {} not ready after 60 s ({e})\n--- log ---\n{}",
                        self.port,
                        tail(&self.log(), 60)
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
        let info = self.info("server");
        self.version = info
            .get("redis_version")
            .map(|v| parse_version(v))
            .unwrap_or((0, 0, 0));
        Ok(())
    }

    fn ping(&self) -> Result<(), String> {
        let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        con.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let pong: String = redis::cmd("PING")
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(format!("PING answered {pong}"))
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A RESP2 connection (read timeout 60 s).
    pub fn client(&self) -> redis::Connection {
        self.connect(&self.url())
    }

    /// A RESP3 connection (`HELLO 3`).
    pub fn client_resp3(&self) -> redis::Connection {
        self.connect(&format!("{}?protocol=resp3", self.url()))
    }

    fn connect(&self, url: &str) -> redis::Connection {
        let client = redis::Client::open(url).expect("redis url");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to {url}: {e}\n--- log ---\n{}",
                    tail(&self.log(), 40)
                )
            });
        con.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set_read_timeout");
        con.set_write_timeout(Some(Duration::from_secs(60)))
            .expect("set_write_timeout");
        con
    }

    /// The server log (redis.log plus anything printed on stdout/stderr).
    pub fn log(&self) -> String {
        let mut s = read_to_string_lossy(&self.dir.join("stdout.log"));
        s.push_str(&read_to_string_lossy(&self.dir.join("redis.log")));
        s
    }

    /// `INFO <section>` as name -> value.
    pub fn info(&self, section: &str) -> HashMap<String, String> {
        let mut con = self.client();
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query(&mut con)
            .unwrap_or_else(|e| panic!("INFO {section}: {e}"));
        parse_info(&text)
    }

    /// Waits until `INFO quota` shows `quota_notify_state:<state>` (the listener's first
    /// connect drops the whole cache: tests that cache something wait for it first).
    pub fn wait_notify_state(&self, state: &str, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.info("quota")
                .get("quota_notify_state")
                .map(String::as_str)
                == Some(state)
        });
        assert!(
            ok,
            "quota_notify_state did not become {state} within {timeout:?}: {:?}",
            self.info("quota").get("quota_notify_state")
        );
    }

    /// The running server's `(major, minor, patch)`.
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, no save.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, `"TERM"`, ...) to the server.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            send_signal(sig, &[pid]);
        }
    }

    /// `SHUTDOWN` (saves per config) and waits for the process to exit; SIGKILL after 30 s
    /// or if SHUTDOWN is refused.
    pub fn shutdown(&mut self) {
        if !self.is_alive() {
            self.child = None;
            return;
        }
        let refused = {
            let client = redis::Client::open(self.url()).expect("redis url");
            match client.get_connection_with_timeout(Duration::from_secs(5)) {
                Ok(mut con) => {
                    let _ = con.set_read_timeout(Some(Duration::from_secs(30)));
                    match redis::cmd("SHUTDOWN").query::<Value>(&mut con) {
                        Ok(_) => false,
                        // The server closing the connection is the normal outcome.
                        Err(e) if e.kind() == redis::ErrorKind::ResponseError => {
                            eprintln!("SHUTDOWN refused on port {}: {e}", self.port);
                            true
                        }
                        Err(_) => false,
                    }
                }
                Err(_) => false,
            }
        };
        if refused {
            self.kill9();
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.is_alive() {
            eprintln!(
                "redis-server on port {} did not exit after SHUTDOWN: killing",
                self.port
            );
        }
        self.kill9();
    }

    /// Graceful `shutdown()` (if running) and start again with the same directory, port
    /// and config, so RDB/AOF files are loaded again. Works after `kill9()` too.
    pub fn restart(&mut self) {
        self.shutdown();
        if let Err(e) = self.spawn_and_wait() {
            self.keep_dir = true;
            panic!("{e}");
        }
    }

    /// Like `restart()`, for a start that must fail (e.g. a bad RDB file): returns how the
    /// server exited; panics if it serves instead.
    pub fn restart_expecting_exit(&mut self) -> std::process::ExitStatus {
        self.shutdown();
        self.exited_at_start = None;
        match self.spawn_and_wait() {
            Ok(()) => panic!(
                "redis-server on port {} started; it should not have",
                self.port
            ),
            Err(e) => self.exited_at_start.unwrap_or_else(|| panic!("{e}")),
        }
    }

    /// Appends lines to this server's redis.conf (effective at the next `restart()`).
    pub fn append_conf(&self, line: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.conf_path)
            .expect("open redis.conf");
        writeln!(f, "{line}").expect("write redis.conf");
    }

    /// Waits until this replica reports `master_link_status:up` and has caught up
    /// with the master's replication offset.
    pub fn wait_replica_synced(&self, master: &RedisServer, timeout: Duration) {
        let ok = wait_until(timeout, || {
            let r = self.info("replication");
            if r.get("master_link_status").map(String::as_str) != Some("up") {
                return false;
            }
            let m = master.info("replication");
            let mo: i64 = m
                .get("master_repl_offset")
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1);
            let ro: i64 = r
                .get("slave_repl_offset")
                .and_then(|v| v.parse().ok())
                .unwrap_or(-2);
            ro >= mo
        });
        assert!(
            ok,
            "replica on port {} did not sync with {} within {timeout:?}\n--- replica log ---\n{}",
            self.port,
            master.port,
            tail(&self.log(), 40)
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() || self.keep_dir {
            eprintln!(
                "--- redis-server log (port {}, dir {} kept) ---\n{}",
                self.port,
                self.dir.display(),
                tail(&self.log(), 60)
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Everything a `MONITOR` client received while `during` ran (Redis's own text, with a `PING`
/// sent at the end as a marker).
pub fn capture_monitor(server: &RedisServer, during: impl FnOnce()) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    stream.write_all(b"MONITOR\r\n").expect("MONITOR");
    let mut seen = Vec::new();
    let mut read_some = |seen: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    };
    read_some(&mut seen);
    during();
    let mut con = server.client();
    let _: Value = redis::cmd("PING")
        .arg("monitor-marker")
        .query(&mut con)
        .expect("PING");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&seen).contains("monitor-marker") && Instant::now() < deadline {
        read_some(&mut seen);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Parses `INFO` text into name -> value.
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Redis with the module on the shared PostgreSQL: `pg-url`, `schema`, `pg-timeout-ms 2000`.
pub fn test_server(schema: &str) -> RedisServer {
    test_server_with(schema, &[])
}

/// [`test_server`] plus more module arguments.
pub fn test_server_with(schema: &str, extra: &[(&str, &str)]) -> RedisServer {
    let url = PgServer::shared();
    RedisServer::builder()
        .module_args(&[
            ("pg-url", &url),
            ("schema", schema),
            ("pg-timeout-ms", "2000"),
        ])
        .module_args(extra)
        .start()
}

/// A master and a synced replica, both with the module on the shared PostgreSQL and `schema`
/// (as [`test_server`]); `replica_extra` are more module arguments for the replica.
pub fn test_master_and_replica(
    schema: &str,
    replica_extra: &[(&str, &str)],
) -> (RedisServer, RedisServer) {
    let url = PgServer::shared();
    let args = [
        ("pg-url", url.as_str()),
        ("schema", schema),
        ("pg-timeout-ms", "2000"),
    ];
    // No 5 s wait for more replicas before the full sync.
    let master = RedisServer::builder()
        .module_args(&args)
        .conf("repl-diskless-sync-delay 0")
        .start();
    let replica = RedisServer::builder()
        .module_args(&args)
        .module_args(replica_extra)
        .replica_of(&master)
        .start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    (master, replica)
}

// ---------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------

/// N masters with `cluster-enabled yes` on loopback, the 16384 slots spread evenly
/// (what `redis-cli --cluster create` does, done with CLUSTER commands).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` nodes, each from `builder` (module args, conf lines), cluster mode on.
    pub fn start(masters: usize, builder: RedisBuilder) -> RedisCluster {
        assert!(masters >= 1);
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| builder.clone().cluster().start())
            .collect();
        let per = 16384 / masters;
        for (i, n) in nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let mut c = n.client();
            let _: Value = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query(&mut c)
                .expect("CLUSTER SET-CONFIG-EPOCH");
            let _: Value = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query(&mut c)
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        {
            let mut c = nodes[0].client();
            for n in &nodes[1..] {
                let _: Value = redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(n.port())
                    .query(&mut c)
                    .expect("CLUSTER MEET");
            }
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(60));
        cluster
    }

    /// Waits until every node says `cluster_state:ok` and knows every other node.
    pub fn wait_ok(&self, timeout: Duration) {
        let n = self.nodes.len().to_string();
        let ok = wait_until(timeout, || {
            self.nodes.iter().all(|node| {
                let mut c = node.client();
                let text: String = match redis::cmd("CLUSTER").arg("INFO").query(&mut c) {
                    Ok(t) => t,
                    Err(_) => return false,
                };
                let info = parse_info(&text);
                info.get("cluster_state").map(String::as_str) == Some("ok")
                    && info.get("cluster_known_nodes") == Some(&n)
                    && info.get("cluster_slots_assigned").map(String::as_str) == Some("16384")
            })
        });
        assert!(ok, "cluster did not reach cluster_state:ok in {timeout:?}");
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// A cluster-aware connection (redis crate's cluster client), read timeout 60 s.
    pub fn cluster_client(&self) -> redis::cluster::ClusterConnection {
        let client = redis::cluster::ClusterClientBuilder::new(self.urls())
            .connection_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client");
        let con = client.get_connection().expect("cluster connection");
        con.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set_read_timeout");
        con
    }

    /// The node that serves `key`'s hash slot.
    pub fn node_for_key(&self, key: &str) -> &RedisServer {
        let mut c = self.nodes[0].client();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT");
        let per = 16384 / self.nodes.len() as i64;
        let idx = ((slot / per) as usize).min(self.nodes.len() - 1);
        &self.nodes[idx]
    }
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// Builds a command from string arguments: `cmd(&["QUOTA.GET", "a", "b", "c", "*"])`.
pub fn cmd(args: &[&str]) -> redis::Cmd {
    assert!(!args.is_empty());
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// Runs a command and returns its raw reply (errors as `Err`).
pub fn query(con: &mut impl redis::ConnectionLike, args: &[&str]) -> redis::RedisResult<Value> {
    cmd(args).query(con)
}

/// Runs a command whose reply is a map; panics on an error reply or a non-map reply.
pub fn query_map(con: &mut impl redis::ConnectionLike, args: &[&str]) -> HashMap<String, Value> {
    let v = query(con, args).unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
    to_map(v)
}

/// Runs a command that must fail; returns the error text (e.g. "ERR bad amount").
pub fn query_err(con: &mut impl redis::ConnectionLike, args: &[&str]) -> String {
    match query(con, args) {
        Ok(v) => panic!("{args:?} should have failed, got {v:?}"),
        Err(e) => error_text(&e),
    }
}

/// The full text of an error reply: code plus detail ("TRYAGAIN ...", "ERR ...").
pub fn error_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

/// A string view of a scalar reply (bulk/simple/verbatim strings, integers, doubles, booleans).
pub fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        Value::Boolean(b) => Some(if *b { "1" } else { "0" }.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::BigNumber(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A map reply (RESP3 map, or RESP2 flat field/value array) as field -> value.
pub fn try_to_map(v: Value) -> Option<HashMap<String, Value>> {
    match v {
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| value_to_string(&k).map(|k| (k, v)))
            .collect(),
        Value::Array(items) if items.len() % 2 == 0 => {
            let mut out = HashMap::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.insert(value_to_string(&k)?, v);
            }
            Some(out)
        }
        Value::Attribute { data, .. } => try_to_map(*data),
        _ => None,
    }
}

/// Like [`try_to_map`], panicking on anything that is not a map.
pub fn to_map(v: Value) -> HashMap<String, Value> {
    let shown = format!("{v:?}");
    try_to_map(v).unwrap_or_else(|| panic!("not a map reply: {shown}"))
}

/// An integer field (an Int, or a string holding an integer); panics when absent or not one.
pub fn field_i64(m: &HashMap<String, Value>, field: &str) -> i64 {
    let v = m
        .get(field)
        .unwrap_or_else(|| panic!("no field {field:?} in {m:?}"));
    value_i64(v).unwrap_or_else(|| panic!("field {field:?} is not an integer: {v:?}"))
}

/// An integer from an Int, Boolean, integral Double or integer string.
pub fn value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Boolean(b) => Some(i64::from(*b)),
        Value::Double(d) if d.fract() == 0.0 => Some(*d as i64),
        other => value_to_string(other)?.trim().parse().ok(),
    }
}

/// A string field; `None` when the field is nil. Panics when the field is absent.
pub fn field_str(m: &HashMap<String, Value>, field: &str) -> Option<String> {
    let v = m
        .get(field)
        .unwrap_or_else(|| panic!("no field {field:?} in {m:?}"));
    match v {
        Value::Nil => None,
        other => Some(
            value_to_string(other)
                .unwrap_or_else(|| panic!("field {field:?} is not a string: {other:?}")),
        ),
    }
}

/// True when the field is present and nil.
pub fn field_is_nil(m: &HashMap<String, Value>, field: &str) -> bool {
    matches!(m.get(field), Some(Value::Nil))
}

/// The elements of an array/set reply (panics otherwise).
pub fn to_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Nil => Vec::new(),
        other => panic!("not an array reply: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Account commands (QUOTA.ADMIT / USAGE / COMMIT) shared by the admission tests
// ---------------------------------------------------------------------------

/// A map reply.
pub type Map = HashMap<String, Value>;

/// The account key name, as README documents it (length-prefixed parts, user hash tag).
pub fn account_key(acc: [&str; 4]) -> String {
    let [t, p, u, b] = acc;
    format!(
        "q:{{{u}}}:{}:{t}{}:{p}{}:{u}{}:{b}",
        t.len(),
        p.len(),
        u.len(),
        b.len()
    )
}

/// `name t p u b opts...`.
pub fn with_account<'a>(name: &'a str, acc: [&'a str; 4], opts: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![name];
    args.extend_from_slice(&acc);
    args.extend_from_slice(opts);
    args
}

/// `QUOTA.ADMIT` as a map.
pub fn admit(con: &mut redis::Connection, acc: [&str; 4], opts: &[&str]) -> Map {
    query_map(con, &with_account("QUOTA.ADMIT", acc, opts))
}

/// `QUOTA.USAGE` as a map.
pub fn usage(con: &mut redis::Connection, acc: [&str; 4]) -> Map {
    query_map(con, &with_account("QUOTA.USAGE", acc, &[]))
}

/// `QUOTA.COMMIT` as a map.
pub fn commit(
    con: &mut redis::Connection,
    acc: [&str; 4],
    tokens: &str,
    lease: Option<&str>,
) -> Map {
    let mut opts = vec![tokens];
    if let Some(l) = lease {
        opts.extend_from_slice(&["LEASE", l]);
    }
    query_map(con, &with_account("QUOTA.COMMIT", acc, &opts))
}
