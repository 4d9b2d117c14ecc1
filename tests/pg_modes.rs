//! Every way of reaching PostgreSQL runs the module's PostgreSQL paths: credits (GRANT, a
//! duplicate purchase, GET, LIST, REVOKE), named policies, an admission that waits for a user's
//! credits, the usage ledger's flush and `QUOTA.HISTORY`, and a change made in SQL reaching the
//! cache by NOTIFY:
//!
//! - directly (the suite's PostgreSQL);
//! - over TLS with `sslmode=verify-full` (pool and listener), on a server that refuses plain
//!   connections; also in the key=value form with a client certificate (pg_hba `cert`), and
//!   with SCRAM bound to the TLS channel (`channel_binding=require`);
//! - through PgBouncer in transaction mode (its defaults otherwise, SCRAM login with a password
//!   that has a `/`), the listener on `listen-url` straight to PostgreSQL; a read stuck behind a
//!   lock is cancelled at `quota.pg-timeout-ms` there too.
//!
//! And the TLS failures an operator meets (an unknown CA, a host name the certificate does not
//! name, a server without TLS, an unreadable or too open client key, no client certificate
//! where one is required) each give a clear error that holds no password.
//!
//! The servers: `make test` starts them once (`QUOTA_TEST_TLS_PG_URL`, `QUOTA_TEST_TLS_DIR`,
//! `QUOTA_TEST_BOUNCER_URL`); run alone, each test process starts its own.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

/// Where the pool and the listener connect, and where the test's own SQL goes.
struct Mode {
    pool_url: String,
    listen_url: Option<String>,
    sql_url: String,
}

fn start(mode: &Mode, schema: &str, timeout_ms: &str) -> RedisServer {
    let mut builder = RedisServer::builder()
        .pg(&mode.pool_url, schema, timeout_ms)
        // Flush the ledger every second; keep cache entries (and "no credits" entries) long
        // enough that only NOTIFY can explain a change seen.
        .module_args(&[
            ("flush-interval", "1"),
            ("cache-ttl-ms", "600000"),
            ("negative-ttl-ms", "600000"),
        ]);
    if let Some(listen) = &mode.listen_url {
        builder = builder.module_arg("listen-url", listen);
    }
    let server = builder.start();
    server.wait_notify_state("listening", Duration::from_secs(30));
    server
}

/// The PostgreSQL paths, end to end; returns the server for mode-specific checks.
fn exercise(mode: &Mode) -> (RedisServer, String) {
    let schema = unique_schema();
    let server = start(mode, &schema, "2000");
    let mut con = server.client();
    let sql = |q: &str| psql(&mode.sql_url, &q.replace("{s}", &schema));
    let alice = ["acme", "chat", "alice", "*"];

    // Credits: a grant, the same purchase again, read back three ways.
    let granted = con.grant(alice, "REQUESTS_PER_DAY 5 PURCHASE pi_1");
    assert_eq!(field_i64(&granted, "requests_per_day"), 5);
    assert_eq!(field_i64(&granted, "duplicate"), 0);
    let again = con.grant(alice, "REQUESTS_PER_DAY 9 PURCHASE pi_1");
    assert_eq!(field_i64(&again, "duplicate"), 1);
    assert_eq!(field_i64(&again, "requests_per_day"), 5);
    let got = con
        .get(["acme", "chat", "alice", "web"])
        .expect("alice's credit");
    assert_eq!(field_i64(&got, "requests_per_day"), 5);
    let listed = con.list(["acme", "chat", "alice"], false);
    assert!(listed.contains_key("*"), "{listed:?}");

    // A named policy, with the credit on top: 2 + 5 admitted, the 8th denied.
    con.policy_set(["acme", "chat"], "pro", "REQUESTS_PER_DAY 2");
    assert!(con.policy_get(["acme", "chat"], "pro").is_some());
    let web = ["acme", "chat", "alice", "web"];
    for i in 0..7 {
        assert!(con.admit(web, "POLICY pro").allowed, "admission {i}");
    }
    let denied = con.admit(web, "POLICY pro");
    assert!(
        !denied.allowed && denied.reason.contains("requests_per_day"),
        "{denied:?}"
    );

    // Admission with a credit miss: bob's credit was written in SQL and never cached here, so
    // the admission waits for the load and counts the credit.
    sql("INSERT INTO {s}.user_quota_replenishment \
         (tenant, project, user_id, bundle_id, additional_requests_per_day, active) \
         VALUES ('acme', 'chat', 'bob', '*', 3, true)");
    let bob = con.admit(["acme", "chat", "bob", "web"], "REQUESTS_PER_DAY 0");
    assert!(bob.allowed, "{bob:?}");
    assert_eq!(bob.credit, "global");
    assert!(bob.used_credit());

    // NOTIFY: carol is cached as having no credit for ten minutes; a row added in SQL shows
    // at once, and so does alice's row changed in SQL.
    assert!(con.get(["acme", "chat", "carol", "web"]).is_none());
    sql("INSERT INTO {s}.user_quota_replenishment \
         (tenant, project, user_id, bundle_id, additional_requests_per_day, active) \
         VALUES ('acme', 'chat', 'carol', '*', 4, true)");
    sql(
        "UPDATE {s}.user_quota_replenishment SET additional_requests_per_day = 6 \
         WHERE user_id = 'alice'",
    );
    let seen = wait_until(Duration::from_secs(10), || {
        con.get(["acme", "chat", "carol", "web"]).is_some()
            && con
                .get(web)
                .is_some_and(|m| field_i64(&m, "requests_per_day") == 6)
    });
    assert!(seen, "changes made in SQL did not reach the cache");

    // The ledger: flushed within a second or two, read back by QUOTA.HISTORY and in SQL.
    wait_ledger_flushed(&server, Duration::from_secs(20));
    let rows = to_array(query(&mut con, &with_account("QUOTA.HISTORY", web, &[])).unwrap());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(field_i64(&to_map(rows[0].clone()), "requests"), 7);
    assert_eq!(
        sql("SELECT sum(requests) FROM {s}.quota_usage_hourly WHERE user_id = 'alice'"),
        "7"
    );

    assert_eq!(con.revoke(alice), 1);
    assert!(con.get(web).is_none());
    assert_eq!(con.policy_del(["acme", "chat"], "pro"), 1);
    let info = server.info("quota");
    assert_eq!(
        info.get("quota_notify_state").map(String::as_str),
        Some("listening")
    );
    (server, schema)
}

#[test]
fn plain_postgresql() {
    let url = PgServer::shared();
    exercise(&Mode {
        pool_url: url.clone(),
        listen_url: None,
        sql_url: url,
    });
}

#[test]
fn tls_verify_full_for_the_pool_and_the_listener() {
    let pg = TlsPg::shared();
    let (_server, _) = exercise(&Mode {
        pool_url: pg.url.clone(),
        listen_url: None,
        sql_url: pg.url.clone(),
    });
    // Every connection of the module is encrypted (the server refuses plain ones anyway).
    let rows = psql(
        &pg.url,
        "SELECT application_name, ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name LIKE 'redis-quota%' ORDER BY 1",
    );
    assert!(rows.contains("redis-quota|t"), "{rows}");
    assert!(rows.contains("redis-quota-listener|t"), "{rows}");
    assert!(!rows.contains("|f"), "{rows}");
}

#[test]
fn tls_key_value_form_with_a_client_certificate() {
    let pg = TlsPg::shared();
    let url = format!(
        "host=127.0.0.1 port={} user=quota_cert dbname=postgres sslmode=verify-full \
         sslrootcert='{}' sslcert='{}' sslkey='{}'",
        pg.port,
        pg.cert("ca.crt"),
        pg.cert("client.crt"),
        pg.cert("client.key"),
    );
    let schema = unique_schema();
    let server = start(
        &Mode {
            pool_url: url.clone(),
            listen_url: None,
            sql_url: pg.url.clone(),
        },
        &schema,
        "2000",
    );
    let mut con = server.client();
    let granted = con.grant(["t", "p", "u", "*"], "REQUESTS_PER_DAY 2");
    assert_eq!(field_i64(&granted, "requests_per_day"), 2);
    assert_eq!(
        psql(&pg.url, &format!("SELECT tableowner FROM pg_tables WHERE schemaname = '{schema}' AND tablename = 'quota_policy'")),
        "quota_cert"
    );
    // The same without the certificate: the server wants one.
    let without = url.replace("sslcert=", "sslcertmode=disable sslcert=");
    query(&mut con, &["CONFIG", "SET", "quota.pg-url", &without]).expect("CONFIG SET");
    let err = query_err(&mut con, &["QUOTA.LIST", "t", "p", "u"]);
    assert!(
        err.starts_with("ERR PostgreSQL unavailable: ") && err.contains("certificate"),
        "{err}"
    );
}

/// SCRAM over TLS binds the authentication to the TLS channel (`tls-server-end-point`):
/// `channel_binding=require` logs in.
#[test]
fn scram_over_tls_with_channel_binding_required() {
    let pg = TlsPg::shared();
    let url = format!(
        "postgresql://quota_scram:scram-pw@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        pg.port,
        pg.cert("ca.crt")
    );
    let schema = unique_schema();
    let server = start(
        &Mode {
            pool_url: url,
            listen_url: None,
            sql_url: pg.url.clone(),
        },
        &schema,
        "2000",
    );
    let granted = server
        .client()
        .grant(["t", "p", "u", "*"], "REQUESTS_PER_DAY 2");
    assert_eq!(field_i64(&granted, "requests_per_day"), 2);
    assert!(!server.log().contains("scram-pw"));
}

#[test]
fn through_pgbouncer_in_transaction_mode_with_the_listener_on_listen_url() {
    let bouncer = Bouncer::shared();
    // The listener named after this test (the URL's application_name wins over the module's).
    let name = format!("listener_{}", random_u64() & 0xffff_ffff);
    let listen = format!("{}?application_name={name}", bouncer.direct);
    let (server, schema) = exercise(&Mode {
        pool_url: bouncer.url.clone(),
        listen_url: Some(listen),
        sql_url: bouncer.direct.clone(),
    });
    // The listener holds its session on PostgreSQL itself; the pool went through PgBouncer.
    let listeners = psql(
        &bouncer.direct,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"),
    );
    assert_eq!(listeners, "1");
    assert!(
        server.info("quota")["quota_pg_queries"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    drop(server);

    // A read stuck behind a lock is cancelled at quota.pg-timeout-ms even though no session
    // setting survives PgBouncer; the worker and the connection are free again after.
    let server = start(
        &Mode {
            pool_url: bouncer.url.clone(),
            listen_url: Some(bouncer.direct.clone()),
            sql_url: bouncer.direct.clone(),
        },
        &schema,
        "500",
    );
    let mut con = server.client();
    con.grant(["t", "p", "dave", "*"], "REQUESTS_PER_DAY 1");
    let mut locker = std::process::Command::new(psql_binary())
        .args(["-X", "-q", "-d", &bouncer.direct, "-c"])
        .arg(format!(
            "BEGIN; LOCK TABLE {schema}.user_quota_replenishment IN ACCESS EXCLUSIVE MODE; \
             SELECT pg_sleep(3); COMMIT"
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let locked = wait_until(Duration::from_secs(5), || {
        psql(
            &bouncer.direct,
            "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND granted \
             AND relation IS NOT NULL",
        ) != "0"
    });
    assert!(locked, "the lock was not taken");
    let started = Instant::now();
    let err = query_err(&mut con, &["QUOTA.LIST", "t", "p", "dave"]);
    let took = started.elapsed();
    assert!(err.contains("did not answer within"), "{err}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    let _ = locker.wait();
    let listed = con.list(["t", "p", "dave"], false);
    assert!(listed.contains_key("*"), "{listed:?}");
}

/// The reply of a command that needs PostgreSQL, on a server whose pool URL is `url`.
fn error_with(server: &RedisServer, url: &str) -> String {
    let mut con = server.client();
    query(&mut con, &["CONFIG", "SET", "quota.pg-url", url]).expect("CONFIG SET");
    query_err(&mut con, &["QUOTA.LIST", "t", "p", "u"])
}

#[test]
fn tls_failures_say_why_and_hold_no_password() {
    const SECRET: &str = "Zx/9kQ+Lm=";
    let pg = TlsPg::shared();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[("schema", &schema), ("pg-timeout-ms", "2000")])
        .start();
    let secret = SECRET
        .replace('/', "%2F")
        .replace('+', "%2B")
        .replace('=', "%3D");
    let url = |rest: &str| {
        format!(
            "postgresql://postgres:{secret}@127.0.0.1:{}/postgres?{rest}",
            pg.port
        )
    };
    let ca = pg.cert("ca.crt");
    let cases: Vec<(String, &str)> = vec![
        (
            url(&format!(
                "sslmode=verify-full&sslrootcert={}",
                pg.cert("other-ca.crt")
            )),
            "TLS: the server's certificate is not trusted: unknown CA",
        ),
        (
            url(&format!(
                "sslmode=verify-ca&sslrootcert={}",
                pg.cert("other-ca.crt")
            )),
            "unknown CA",
        ),
        (
            format!(
                "host=wrong.example hostaddr=127.0.0.1 port={} user=postgres password='{SECRET}' \
                 dbname=postgres sslmode=verify-full sslrootcert={ca}",
                pg.port
            ),
            "TLS: the server's certificate does not match the host name 'wrong.example'",
        ),
        (
            format!(
                "postgresql://postgres:{secret}@127.0.0.1:{}/postgres?sslmode=require",
                port_of_url(&PgServer::shared())
            ),
            "TLS: the server does not support TLS",
        ),
        (
            url(&format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey=/nonexistent/client.key",
                pg.cert("client.crt")
            )),
            "cannot read the client key (sslkey) /nonexistent/client.key",
        ),
        (
            url("sslmode=verify-full&sslrootcert=/nonexistent/ca.crt"),
            "cannot read the root certificates (sslrootcert) /nonexistent/ca.crt",
        ),
    ];
    for (bad, wanted) in &cases {
        let err = error_with(&server, bad);
        assert!(err.starts_with("ERR PostgreSQL unavailable: "), "{err}");
        assert!(err.contains(wanted), "{bad}: {err}");
        assert!(!err.contains(SECRET) && !err.contains(&secret), "{err}");
    }
    // A client key others may read is refused, as libpq does.
    let dir = unique_dir("open-key");
    let key = dir.join("client.key");
    std::fs::copy(pg.cert("client.key"), &key).expect("copy key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = error_with(
        &server,
        &url(&format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            pg.cert("client.crt"),
            key.display()
        )),
    );
    assert!(err.contains("has group or world access"), "{err}");
    // And the right CA works, password and all.
    let err_or_ok = {
        let mut con = server.client();
        query(
            &mut con,
            &[
                "CONFIG",
                "SET",
                "quota.pg-url",
                &url(&format!("sslmode=verify-full&sslrootcert={ca}")),
            ],
        )
        .expect("CONFIG SET");
        wait_until(Duration::from_secs(10), || {
            query(&mut con, &["QUOTA.LIST", "t", "p", "u"]).is_ok()
        })
    };
    assert!(err_or_ok, "verify-full with the right CA failed");
    let log = server.log();
    assert!(
        !log.contains(SECRET) && !log.contains(&secret),
        "the log holds the password"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn port_of_url(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .expect("port in url")
}
