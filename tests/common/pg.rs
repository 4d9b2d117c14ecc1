//! PostgreSQL: throwaway servers (`scripts/pg.sh`), psql.

use super::*;

fn pg_script() -> PathBuf {
    repo_root().join("scripts").join("pg.sh")
}

/// Runs `command` (stdin closed): its stdout, or `what` failed with its status, stdout (when
/// `with_stdout`) and stderr.
fn run_output(what: &str, command: &mut Command, with_stdout: bool) -> Result<String, String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        return Ok(stdout.into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(if with_stdout {
        format!("{what} failed ({}):\n{stdout}{stderr}", out.status)
    } else {
        format!("{what} failed ({}): {}", out.status, stderr.trim())
    })
}

fn run_pg_script(cmd: &str, dir: &Path) -> Result<String, String> {
    let what = format!("scripts/pg.sh {cmd} {}", dir.display());
    let mut command = Command::new("bash");
    command.arg(pg_script()).arg(cmd).arg(dir);
    run_output(&what, &mut command, true).map(|s| s.trim().to_string())
}

pub fn psql_binary() -> PathBuf {
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
    let mut command = Command::new(psql_binary());
    command
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
        .env("PGCONNECT_TIMEOUT", "10");
    run_output("psql", &mut command, false).map(|s| s.trim_end().to_string())
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
// TLS PostgreSQL and PgBouncer (scripts/pg.sh start-tls, scripts/pgbouncer.sh)
// ---------------------------------------------------------------------------

/// A PostgreSQL that speaks TLS only (`scripts/pg.sh start-tls`): a CA and server certificate
/// for 127.0.0.1 and localhost, a client certificate for the role `quota_cert` (pg_hba
/// `cert`), and another CA that signed nothing of it.
pub struct TlsPg {
    /// `postgresql://postgres@127.0.0.1:PORT/postgres?sslmode=verify-full&sslrootcert=...`
    pub url: String,
    /// `ca.crt`, `other-ca.crt`, `client.crt`, `client.key`.
    pub certs: PathBuf,
    pub port: u16,
}

static TLS_PG: OnceLock<(TlsPg, Option<PathBuf>)> = OnceLock::new();

extern "C" fn destroy_tls_pg() {
    if let Some((_, Some(dir))) = TLS_PG.get() {
        let _ = run_pg_script("destroy", dir);
    }
}

fn port_of(url: &str) -> u16 {
    url.split('@')
        .nth(1)
        .and_then(|rest| rest.split([':', '/']).nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

impl TlsPg {
    /// The TLS PostgreSQL of this run: `QUOTA_TEST_TLS_PG_URL` and `QUOTA_TEST_TLS_DIR` (what
    /// `make test` starts), else one started for this test process.
    pub fn shared() -> &'static TlsPg {
        let (pg, _) = TLS_PG.get_or_init(|| {
            if let (Ok(url), Ok(dir)) = (
                std::env::var("QUOTA_TEST_TLS_PG_URL"),
                std::env::var("QUOTA_TEST_TLS_DIR"),
            ) {
                if !url.is_empty() && !dir.is_empty() {
                    let port = port_of(&url);
                    return (
                        TlsPg {
                            url,
                            certs: PathBuf::from(dir),
                            port,
                        },
                        None,
                    );
                }
            }
            let dir = unique_dir("pg-tls");
            let url = run_pg_script("start-tls", &dir).unwrap_or_else(|e| {
                let _ = run_pg_script("destroy", &dir);
                panic!("{e}")
            });
            // SAFETY: registering a plain extern "C" fn with libc's atexit.
            unsafe {
                atexit(destroy_tls_pg);
            }
            let port = port_of(&url);
            (
                TlsPg {
                    url,
                    certs: dir.join("tls"),
                    port,
                },
                Some(dir),
            )
        });
        pg
    }

    /// A certificate file's path.
    pub fn cert(&self, name: &str) -> String {
        self.certs.join(name).to_string_lossy().into_owned()
    }
}

/// A PgBouncer in transaction mode (`scripts/pgbouncer.sh`) in front of the shared
/// PostgreSQL, logging in with a password.
pub struct Bouncer {
    /// Through PgBouncer, with the password (percent-encoded).
    pub url: String,
    /// The PostgreSQL behind it, directly.
    pub direct: String,
}

static BOUNCER: OnceLock<(Bouncer, Option<PathBuf>)> = OnceLock::new();

extern "C" fn destroy_bouncer() {
    if let Some((_, Some(dir))) = BOUNCER.get() {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts").join("pgbouncer.sh"))
            .arg("destroy")
            .arg(dir)
            .stdin(Stdio::null())
            .output();
    }
}

impl Bouncer {
    /// The PgBouncer of this run: `QUOTA_TEST_BOUNCER_URL` (in front of `QUOTA_TEST_PG_URL`,
    /// what `make test` starts), else one started for this test process in front of
    /// [`PgServer::shared`].
    pub fn shared() -> &'static Bouncer {
        let (bouncer, _) = BOUNCER.get_or_init(|| {
            let direct = PgServer::shared();
            if let Ok(url) = std::env::var("QUOTA_TEST_BOUNCER_URL") {
                if !url.is_empty() {
                    return (Bouncer { url, direct }, None);
                }
            }
            let dir = unique_dir("pgbouncer");
            let mut command = Command::new("bash");
            command
                .arg(repo_root().join("scripts").join("pgbouncer.sh"))
                .arg("start")
                .arg(&dir)
                .arg(port_of(&direct).to_string());
            let url = run_output("scripts/pgbouncer.sh start", &mut command, true)
                .unwrap_or_else(|e| panic!("{e}"))
                .trim()
                .to_string();
            // SAFETY: registering a plain extern "C" fn with libc's atexit.
            unsafe {
                atexit(destroy_bouncer);
            }
            (Bouncer { url, direct }, Some(dir))
        });
        bouncer
    }
}
