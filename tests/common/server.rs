//! Redis: one `redis-server` with the module, INFO, MONITOR.

use super::*;

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

    /// The module on PostgreSQL `url` with `schema` and `pg-timeout-ms` (the three arguments
    /// every test server needs).
    pub fn pg(self, url: &str, schema: &str, timeout_ms: &str) -> Self {
        self.module_args(&[
            ("pg-url", url),
            ("schema", schema),
            ("pg-timeout-ms", timeout_ms),
        ])
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

/// A fresh schema, [`test_server`] on it and a client of it.
pub fn test_server_con() -> (String, RedisServer, redis::Connection) {
    let schema = unique_schema();
    let server = test_server(&schema);
    let con = server.client();
    (schema, server, con)
}

/// [`test_server`] plus more module arguments.
pub fn test_server_with(schema: &str, extra: &[(&str, &str)]) -> RedisServer {
    RedisServer::builder()
        .pg(&PgServer::shared(), schema, "2000")
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
