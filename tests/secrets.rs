//! The PostgreSQL password: given in a password file (the recommended way) or inside the URL
//! given as a module argument, it logs in to a PostgreSQL that checks passwords
//! (scram-sha-256), still logs in after `CONFIG REWRITE` and a restart, and never shows in
//! `MODULE LIST`, `INFO`, `SLOWLOG`, `MONITOR`, `CLIENT LIST`, error replies or the server log.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

const ROLE: &str = "quota_app";
const SECRET: &str = "Pw-7f3a9c-s3cret";

/// Everything Redis shows about itself and its clients, plus the server log.
fn visible_text(server: &RedisServer) -> String {
    let mut con = server.client();
    let mut text = String::new();
    for args in [
        vec!["MODULE", "LIST"],
        vec!["INFO", "everything"],
        vec!["CLIENT", "LIST"],
        vec!["SLOWLOG", "GET", "1000"],
    ] {
        let reply = query(&mut con, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        text.push_str(&format!("{args:?}: {reply:?}\n"));
    }
    text.push_str(&server.log());
    text
}

fn assert_hidden(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "the password shows in {what}:\n{text}"
    );
}

/// A grant that needs a working login.
fn grant_works(server: &RedisServer, user: &str) {
    let mut con = server.client();
    let m = query_map(
        &mut con,
        &["QUOTA.GRANT", "t", "p", user, "*", "REQUESTS_PER_DAY", "5"],
    );
    assert_eq!(field_i64(&m, "requests_per_day"), 5);
}

/// Slow log on for every command, the PostgreSQL settings set again at run time (as an
/// operator would), a MONITOR client watching: the password shows nowhere.
fn set_again_and_look(server: &RedisServer, settings: &[(&str, &str)]) {
    let mut con = server.client();
    query(&mut con, &["CONFIG", "SET", "slowlog-log-slower-than", "0"]).expect("slowlog");
    let monitor = capture_monitor(server, || {
        for (name, value) in settings {
            query(&mut con, &["CONFIG", "SET", name, value])
                .unwrap_or_else(|e| panic!("CONFIG SET {name}: {e}"));
        }
    });
    assert_hidden("MONITOR", &monitor);
    query(
        &mut con,
        &["CONFIG", "SET", "slowlog-log-slower-than", "10000"],
    )
    .expect("slowlog");
    assert_hidden("what Redis shows", &visible_text(server));
}

/// A PostgreSQL that cannot be reached: the error reply does not quote the password.
fn bad_host_error_is_clean(server: &RedisServer, url: &str) {
    let mut con = server.client();
    query(&mut con, &["CONFIG", "SET", "quota.pg-url", url]).expect("CONFIG SET");
    let err = query_err(
        &mut con,
        &["QUOTA.GRANT", "t", "p", "x", "*", "REQUESTS_PER_DAY", "1"],
    );
    assert!(err.contains("PostgreSQL"), "{err}");
    assert_hidden("an error reply", &err);
}

fn rewrite_and_restart(server: &mut RedisServer) -> String {
    let mut con = server.client();
    query(&mut con, &["CONFIG", "REWRITE"]).expect("CONFIG REWRITE");
    let conf = std::fs::read_to_string(server.dir().join("redis.conf")).expect("redis.conf");
    server.restart();
    conf
}

#[test]
fn a_password_file_logs_in_after_config_rewrite_and_never_shows() {
    let pg = PgServer::start_private();
    let url = pg.password_role(ROLE, SECRET);
    let dir = unique_dir("passfile");
    let passfile = dir.join("pgpass");
    let write_passfile = |password: &str| {
        std::fs::write(
            &passfile,
            format!("# redis-quota\n*:*:postgres:{ROLE}:{password}\n"),
        )
        .expect("write pgpass");
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    let passfile_text = passfile.to_string_lossy().into_owned();

    // PostgreSQL does check the password: a wrong one in the file is refused.
    write_passfile("wrong");
    let schema = unique_schema();
    let mut server = RedisServer::builder()
        .pg(&url, &schema, "2000")
        .conf(&format!("quota.pg-passfile \"{passfile_text}\""))
        .start();
    let mut con = server.client();
    let err = query_err(
        &mut con,
        &["QUOTA.GRANT", "t", "p", "u", "*", "REQUESTS_PER_DAY", "1"],
    );
    assert!(err.contains("password authentication failed"), "{err}");

    // The right one applies to the next connection (after the second the module waits before
    // trying again a server that refused it), without any setting changed.
    write_passfile(SECRET);
    let grant = ["QUOTA.GRANT", "t", "p", "u1", "*", "REQUESTS_PER_DAY", "5"];
    assert!(
        wait_until(Duration::from_secs(10), || query(&mut con, &grant).is_ok()),
        "the rewritten password file was not used"
    );
    set_again_and_look(
        &server,
        &[
            ("quota.pg-url", &url),
            ("quota.pg-passfile", &passfile_text),
        ],
    );

    let conf = rewrite_and_restart(&mut server);
    assert_hidden("the rewritten redis.conf", &conf);
    grant_works(&server, "u2");
    assert_hidden("what Redis shows after the restart", &visible_text(&server));
    bad_host_error_is_clean(&server, "postgresql://quota_app@127.0.0.1:1/postgres");
    assert_hidden("the log", &server.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_password_in_the_url_module_argument_logs_in_after_config_rewrite_and_never_shows() {
    let pg = PgServer::start_private();
    let url = pg.password_role(ROLE, SECRET);
    let with_password = url.replace(&format!("{ROLE}@"), &format!("{ROLE}:{SECRET}@"));
    let schema = unique_schema();
    let mut server = RedisServer::builder()
        .pg(&with_password, &schema, "2000")
        .start();
    grant_works(&server, "u1");
    let mut con = server.client();
    let modules = format!(
        "{:?}",
        query(&mut con, &["MODULE", "LIST"]).expect("MODULE LIST")
    );
    assert_hidden("MODULE LIST", &modules);
    assert!(
        !modules.contains("*****"),
        "MODULE LIST shows a mask as long as the password: {modules}"
    );
    // Set again at run time, the URL with its password and the password alone.
    set_again_and_look(
        &server,
        &[
            ("quota.pg-url", &with_password),
            ("quota.pg-password", SECRET),
            ("quota.schema", &schema),
        ],
    );
    grant_works(&server, "u1b");

    let conf = rewrite_and_restart(&mut server);
    let loadmodule = conf
        .lines()
        .find(|l| l.starts_with("loadmodule"))
        .unwrap_or_default();
    assert_hidden("the rewritten loadmodule line", loadmodule);
    grant_works(&server, "u2");
    assert_hidden("what Redis shows after the restart", &visible_text(&server));
    // Restarted once more from what it rewrote itself: still logs in.
    let conf = rewrite_and_restart(&mut server);
    grant_works(&server, "u3");
    assert_eq!(conf.matches("loadmodule").count(), 1, "{conf}");
    bad_host_error_is_clean(&server, &with_password.replace(&pg.port().to_string(), "1"));
    assert_hidden("the log", &server.log());
}

#[test]
fn a_password_as_a_module_argument_of_its_own_is_refused_at_load() {
    let dir = unique_dir("pg-password-arg");
    let conf = dir.join("redis.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir \"{}\"\nsave \"\"\nloadmodule \"{}\" pg-password {SECRET}\n",
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
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "loaded: {text}");
    assert!(
        text.contains("pg-password cannot be a module argument"),
        "{text}"
    );
    assert_hidden("the log", &text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A password shaped like base64 and worse (`/`, `?`, `+`, `=`, a space), in every shape the
/// module reads, as `pg-url` and `listen-url` module arguments and through `CONFIG SET`: the
/// module logs in with it, and MODULE LIST, SLOWLOG and the log never hold it, nor the file
/// CONFIG REWRITE writes outside its `quota.pg-password` line (where it goes, as `masterauth`
/// does, so that the next start logs in), before and after a restart from that file.
#[test]
fn passwords_in_every_url_shape_log_in_and_never_show() {
    const PASSWORD: &str = "Zx/9kQ+Lm=?7 s";
    let pg = PgServer::start_private();
    pg.password_role(ROLE, PASSWORD);
    let port = pg.port();
    let encoded = "Zx%2F9kQ%2BLm%3D%3F7%20s";
    let shapes = [
        // user:password@ with the specials raw (read the one way that works).
        format!("postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/postgres"),
        // Percent-encoded, two hosts (the first refuses).
        format!("postgres://{ROLE}:{encoded}@127.0.0.1:1,127.0.0.1:{port}/postgres"),
        // The password query parameter.
        format!(
            "postgresql://{ROLE}@127.0.0.1:{port}/postgres?password={encoded}&application_name=x"
        ),
        // key=value, quoted, spaces around '='.
        format!("host=127.0.0.1 port={port} user={ROLE} password = '{PASSWORD}' dbname=postgres"),
    ];
    let hidden = |what: &str, text: &str| {
        assert!(
            !text.contains(PASSWORD) && !text.contains(encoded) && !text.contains("9kQ"),
            "the password shows in {what}:\n{text}"
        );
    };
    for (i, shape) in shapes.iter().enumerate() {
        let listen = &shapes[(i + 1) % shapes.len()];
        let schema = unique_schema();
        let mut server = RedisServer::builder()
            .pg(shape, &schema, "2000")
            .module_arg("listen-url", listen)
            .start();
        grant_works(&server, "u1");
        server.wait_notify_state("listening", Duration::from_secs(20));
        let modules = format!(
            "{:?}",
            query(&mut server.client(), &["MODULE", "LIST"]).unwrap()
        );
        hidden("MODULE LIST", &modules);
        set_again_and_look(
            &server,
            &[("quota.pg-url", shape), ("quota.listen-url", listen)],
        );
        grant_works(&server, "u2");
        let conf = rewrite_and_restart(&mut server);
        let (secret_lines, other): (Vec<&str>, Vec<&str>) = conf
            .lines()
            .partition(|l| l.starts_with("quota.pg-password "));
        hidden("the rewritten redis.conf", &other.join("\n"));
        assert_eq!(secret_lines.len(), 1, "{conf}");
        grant_works(&server, "u3");
        server.wait_notify_state("listening", Duration::from_secs(20));
        hidden("what Redis shows after the restart", &visible_text(&server));
        hidden("the log", &server.log());
    }
}
