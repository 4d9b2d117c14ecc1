//! The module's load arguments: an unknown one fails the load with a warning that names it
//! (never its value), as Redis does for its own config; and what `CONFIG REWRITE` writes back
//! (the `loadmodule` line, unquoted) loads the same, even from a key=value `pg-url`.
mod common;

use std::time::Duration;

use common::*;

/// Starts redis-server on a config whose `loadmodule` line carries `args` (written as given);
/// it must exit. Returns its output (the log).
fn refused(args: &str) -> String {
    let dir = unique_dir("bad-args");
    let conf = dir.join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "port {}\nbind 127.0.0.1\ndir \"{}\"\nsave \"\"\nloadmodule \"{}\" {args}\n",
            free_port(),
            dir.display(),
            module_path().display()
        ),
    )
    .expect("conf");
    // `timeout`: a server that loaded the module would not exit by itself.
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(redis_binary())
        .arg(&conf)
        .output()
        .expect("redis-server");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "loaded with {args}: {text}");
    let _ = std::fs::remove_dir_all(&dir);
    text
}

#[test]
fn unknown_arguments_are_refused_by_name_without_their_value() {
    let log = refused("pool_size 8");
    assert!(
        log.contains("quota: unknown module argument 'pool_size' (the arguments are: pool-size,"),
        "{log}"
    );
    let log = refused("pg-ulr postgresql://u:Hunter-2x@127.0.0.1/db");
    assert!(log.contains("unknown module argument 'pg-ulr'"), "{log}");
    assert!(!log.contains("Hunter-2x"), "{log}");
    let log = refused("schema a schema b");
    assert!(
        log.contains("the module argument schema is given twice"),
        "{log}"
    );
    let log = refused("schema a pool-size");
    assert!(
        log.contains("the module argument pool-size has no value"),
        "{log}"
    );
    let log = refused("pg-passfile \"/etc/redis/my pgpass\"");
    assert!(log.contains("give it as a quota.pg-passfile line"), "{log}");
}

/// A key=value `pg-url` module argument becomes the same settings as a URL, which CONFIG
/// REWRITE writes unquoted and the next start reads back as they were: it logs in, twice.
/// (`listen-url` too, with a URL longer than the text it replaces.)
#[test]
fn a_key_value_pg_url_argument_survives_config_rewrite_and_restarts() {
    let pg = PgServer::shared();
    let port: u16 = pg
        .rsplit(':')
        .next()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .expect("port");
    let schema = unique_schema();
    let kv = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres application_name='quota node 1'"
    );
    let listen_kv =
        format!("host=127.0.0.1 port={port} user=postgres application_name='l i s t e n'");
    let listen_url =
        format!("postgresql://postgres@127.0.0.1:{port}?application_name=l%20i%20s%20t%20e%20n");
    assert!(listen_url.len() > listen_kv.len());
    let mut server = RedisServer::builder()
        .pg(&kv, &schema, "2000")
        .module_arg("listen-url", &listen_kv)
        .start();
    let grant = |server: &RedisServer, user: &str| {
        let m = query_map(
            &mut server.client(),
            &["QUOTA.GRANT", "t", "p", user, "*", "REQUESTS_PER_DAY", "3"],
        );
        assert_eq!(field_i64(&m, "requests_per_day"), 3);
    };
    grant(&server, "u1");
    let url = format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?application_name=quota%20node%201"
    );
    let modules = format!(
        "{:?}",
        query(&mut server.client(), &["MODULE", "LIST"]).unwrap()
    );
    assert!(modules.contains(&url), "{modules}");
    assert!(modules.contains(&format!("\"{listen_url}\"")), "{modules}");
    let mut con = server.client();
    let pg_url = |con: &mut redis::Connection| {
        to_array(query(con, &["CONFIG", "GET", "quota.pg-url"]).unwrap())
            .get(1)
            .and_then(value_to_string)
    };
    // The setting keeps the value as given; Redis's copy of the argument is the URL.
    assert_eq!(pg_url(&mut con), Some(kv.clone()));
    query(&mut con, &["CONFIG", "REWRITE"]).expect("CONFIG REWRITE");
    let conf = std::fs::read_to_string(server.dir().join("redis.conf")).expect("conf");
    let line = conf
        .lines()
        .find(|l| l.starts_with("loadmodule"))
        .unwrap_or_default();
    assert!(line.contains(&format!(" pg-url {url} ")), "{line}");
    assert!(
        line.ends_with(&format!(" listen-url {listen_url}")),
        "{line}"
    );
    server.restart();
    grant(&server, "u2");
    assert_eq!(pg_url(&mut server.client()), Some(url.clone()));
    server.wait_notify_state("listening", Duration::from_secs(20));
    let apps = psql(
        &pg,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'quota node 1'",
    );
    assert_ne!(apps, "0");
    // Rewritten again from what it loaded: the same line.
    let mut con = server.client();
    query(&mut con, &["CONFIG", "REWRITE"]).expect("CONFIG REWRITE");
    let again = std::fs::read_to_string(server.dir().join("redis.conf")).expect("conf");
    assert_eq!(
        again.lines().find(|l| l.starts_with("loadmodule")),
        Some(line),
        "{again}"
    );
    server.restart();
    grant(&server, "u3");
}

/// The same through `MODULE LOAD` at run time (the arguments are the command's own).
#[test]
fn module_load_rewrites_a_key_value_url_and_refuses_unknown_arguments() {
    let pg = PgServer::shared();
    let port = pg
        .rsplit(':')
        .next()
        .and_then(|s| s.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let server = RedisServer::builder().without_module().start();
    let mut con = server.client();
    let module = module_path().to_string_lossy().into_owned();
    let err = query(&mut con, &["MODULE", "LOAD", &module, "pool_size", "8"]).unwrap_err();
    assert!(
        error_text(&err).contains("Error loading the extension"),
        "{err}"
    );
    assert!(server.log().contains("unknown module argument 'pool_size'"));
    let schema = unique_schema();
    let listen = format!("host=127.0.0.1 port={port} user=postgres application_name='l i s t e n'");
    query(
        &mut con,
        &[
            "MODULE",
            "LOAD",
            &module,
            "pg-url",
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            "schema",
            &schema,
            "listen-url",
            &listen,
        ],
    )
    .expect("MODULE LOAD");
    let modules = format!("{:?}", query(&mut con, &["MODULE", "LIST"]).unwrap());
    assert!(
        modules.contains(&format!(
            "\"postgresql://postgres@127.0.0.1:{port}/postgres\""
        )),
        "{modules}"
    );
    assert!(
        modules.contains(&format!(
            "\"postgresql://postgres@127.0.0.1:{port}?application_name=l%20i%20s%20t%20e%20n\""
        )),
        "{modules}"
    );
    let m = query_map(
        &mut con,
        &["QUOTA.GRANT", "t", "p", "u", "*", "REQUESTS_PER_DAY", "3"],
    );
    assert_eq!(field_i64(&m, "requests_per_day"), 3);
    server.wait_notify_state("listening", Duration::from_secs(20));
}
