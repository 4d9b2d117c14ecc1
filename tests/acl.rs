//! ACLs and command metadata, on every Redis version under test:
//!
//! * a user allowed only QUOTA.ADMIT, COMMIT, RELEASE, GET and USAGE can run those and gets
//!   `NOPERM` for the credit-management and maintenance commands, which change nothing;
//! * on Redis >= 7.2 every QUOTA.* command is in the ACL category `quota`: `+@quota` allows
//!   them all, `-@quota` none;
//! * `COMMAND INFO` flags say which commands write and which only read.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

/// Every command the module registers.
const ALL_COMMANDS: [&str; 12] = [
    "quota.admit",
    "quota.cleanup",
    "quota.commit",
    "quota.get",
    "quota.grant",
    "quota.invalidate",
    "quota.list",
    "quota.release",
    "quota.reset",
    "quota.revoke",
    "quota.setstate",
    "quota.usage",
];

/// The subcommands of the `quota.policy` container, each in the category on its own.
const POLICY_SUBCOMMANDS: [&str; 5] = [
    "quota.policy|del",
    "quota.policy|get",
    "quota.policy|invalidate",
    "quota.policy|list",
    "quota.policy|set",
];

/// A RESP2 connection authenticated as `user`.
fn connect_as(server: &RedisServer, user: &str, password: &str) -> redis::Connection {
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", server.port());
    let client = redis::Client::open(url).expect("redis url");
    let con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"));
    con.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set_read_timeout");
    con
}

fn acl_setuser(admin: &mut redis::Connection, rules: &[&str]) {
    let mut args = vec!["ACL", "SETUSER"];
    args.extend_from_slice(rules);
    let v = query(admin, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert_eq!(value_to_string(&v).as_deref(), Some("OK"));
}

fn strings(v: Value) -> BTreeSet<String> {
    to_array(v)
        .iter()
        .map(|x| value_to_string(x).expect("string").to_lowercase())
        .collect()
}

/// Asserts `args` is refused with NOPERM naming the command.
fn assert_noperm(con: &mut redis::Connection, args: &[&str]) {
    let err = query_err(con, args);
    assert!(
        err.starts_with("NOPERM") && err.to_lowercase().contains(&args[0].to_lowercase()),
        "{args:?} should be refused with NOPERM: {err}"
    );
}

/// One call of each command, arguments valid for user `alice` (bundle `b`) where that
/// matters. Each is answered by the module when allowed.
fn sample_calls() -> Vec<Vec<&'static str>> {
    vec![
        vec!["QUOTA.ADMIT", T, P, "alice", "b", "REQUESTS_PER_DAY", "1"],
        vec!["QUOTA.COMMIT", T, P, "alice", "b", "5"],
        vec!["QUOTA.RELEASE", T, P, "alice", "b", "no-such-lease"],
        vec!["QUOTA.GET", T, P, "alice", "b"],
        vec!["QUOTA.USAGE", T, P, "alice", "b"],
        vec!["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "9"],
        vec!["QUOTA.REVOKE", T, P, "alice", "*"],
        vec!["QUOTA.RESET", T, P, "alice", "b"],
        vec!["QUOTA.CLEANUP"],
        vec!["QUOTA.LIST", T, P, "alice"],
        vec!["QUOTA.INVALIDATE", T, P, "alice"],
    ]
}

/// A user allowed only the admission and read commands can use them and gets NOPERM for the
/// others, which then change nothing.
#[test]
fn app_user_runs_admissions_but_not_credit_management() {
    let schema = unique_schema();
    let server = test_server(&schema);
    let mut admin = server.client();
    query_map(
        &mut admin,
        &["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "3"],
    );

    acl_setuser(
        &mut admin,
        &[
            "app",
            "on",
            ">app-secret",
            "~*",
            "resetchannels",
            "-@all",
            "+ping",
            "+quota.admit",
            "+quota.commit",
            "+quota.release",
            "+quota.get",
            "+quota.usage",
        ],
    );
    let mut app = connect_as(&server, "app", "app-secret");
    let pong = query(&mut app, &["PING"]).expect("PING as app");
    assert_eq!(value_to_string(&pong).as_deref(), Some("PONG"));

    // Allowed: get, admit (with a lease and a reservation), commit, admit + release, usage.
    let g = query_map(&mut app, &["QUOTA.GET", T, P, "alice", "b"]);
    assert_eq!(field_i64(&g, "additional_requests_per_day"), 3);
    let admit = |con: &mut redis::Connection, lease: &str| {
        query_map(
            con,
            &[
                "QUOTA.ADMIT",
                T,
                P,
                "alice",
                "b",
                "REQUESTS_PER_DAY",
                "1",
                "TOKENS_PER_DAY",
                "100",
                "LEASE",
                lease,
                "RESERVE",
                "10",
            ],
        )
    };
    let a = admit(&mut app, "l1");
    assert_eq!(field_i64(&a, "allowed"), 1, "{a:?}");
    assert_eq!(field_str(&a, "lease").as_deref(), Some("l1"));
    let c = query_map(
        &mut app,
        &["QUOTA.COMMIT", T, P, "alice", "b", "5", "LEASE", "l1"],
    );
    assert_eq!(field_i64(&c, "recorded"), 5);
    let a = admit(&mut app, "l2");
    assert_eq!(field_i64(&a, "allowed"), 1, "{a:?}");
    let v = query(&mut app, &["QUOTA.RELEASE", T, P, "alice", "b", "l2"]).expect("RELEASE");
    assert_eq!(value_i64(&v), Some(1));
    let u = query_map(&mut app, &["QUOTA.USAGE", T, P, "alice", "b"]);
    assert_eq!(field_i64(&u, "req_day"), 1);
    assert_eq!(field_i64(&u, "tok_day"), 5);
    assert_eq!(field_i64(&u, "in_flight"), 0);
    // A user the server has not cached: the admit waits for PostgreSQL under the ACL user too.
    let a = query_map(
        &mut app,
        &[
            "QUOTA.ADMIT",
            T,
            P,
            "cold-user",
            "b",
            "REQUESTS_PER_DAY",
            "1",
        ],
    );
    assert_eq!(field_i64(&a, "allowed"), 1, "{a:?}");
    assert_eq!(field_str(&a, "replenishment").as_deref(), Some("none"));

    // Refused: credit management, maintenance and the internal commands.
    let usage_before = query_map(&mut admin, &["QUOTA.USAGE", T, P, "alice", "b"]);
    for args in [
        vec![
            "QUOTA.GRANT",
            T,
            P,
            "alice",
            "*",
            "REQUESTS_PER_DAY",
            "1000",
        ],
        vec![
            "QUOTA.GRANT",
            T,
            P,
            "mallory",
            "*",
            "REQUESTS_PER_DAY",
            "1000",
        ],
        vec!["QUOTA.REVOKE", T, P, "alice", "*"],
        vec!["QUOTA.RESET", T, P, "alice", "b"],
        vec!["QUOTA.CLEANUP"],
        vec!["QUOTA.LIST", T, P, "alice"],
        vec!["QUOTA.INVALIDATE", T, P, "alice"],
        vec!["QUOTA.SETSTATE", "q:{alice}:4:acme4:chat5:alice1:b", "x"],
        vec!["SET", "k", "v"],
    ] {
        assert_noperm(&mut app, &args);
    }
    // ... and changed nothing.
    let g = query_map(&mut admin, &["QUOTA.GET", T, P, "alice", "b"]);
    assert_eq!(field_i64(&g, "additional_requests_per_day"), 3);
    assert_eq!(
        query(&mut admin, &["QUOTA.GET", T, P, "mallory", "b"]).unwrap(),
        Value::Nil
    );
    assert_eq!(
        query_map(&mut admin, &["QUOTA.USAGE", T, P, "alice", "b"]),
        usage_before
    );
    let rows = psql(
        &PgServer::shared(),
        &format!("SELECT count(*) FROM \"{schema}\".user_quota_replenishment"),
    );
    assert_eq!(rows, "1");

    // The same user over RESP3 (HELLO needs to be allowed for that).
    acl_setuser(&mut admin, &["app", "+hello"]);
    let url = format!(
        "redis://app:app-secret@127.0.0.1:{}/?protocol=resp3",
        server.port()
    );
    let mut app3 = redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("RESP3 connection as app");
    let u = query_map(&mut app3, &["QUOTA.USAGE", T, P, "alice", "b"]);
    assert_eq!(field_i64(&u, "req_day"), 1);
    assert_noperm(
        &mut app3,
        &["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "1"],
    );
}

/// Redis >= 7.2: the `quota` ACL category holds every QUOTA.* command; `+@quota` allows them
/// all and `-@quota` none.
#[test]
fn quota_acl_category() {
    let schema = unique_schema();
    let server = test_server(&schema);
    let mut admin = server.client();
    if server.version() < (7, 2, 0) {
        eprintln!(
            "Redis {:?} has no module ACL categories: category checks skipped",
            server.version()
        );
        return;
    }

    let cats = strings(query(&mut admin, &["ACL", "CAT"]).expect("ACL CAT"));
    assert!(cats.contains("quota"), "ACL CAT: {cats:?}");
    let in_cat = strings(query(&mut admin, &["ACL", "CAT", "quota"]).expect("ACL CAT quota"));
    let mut expected: BTreeSet<String> = ALL_COMMANDS
        .iter()
        .chain(&POLICY_SUBCOMMANDS)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(in_cat, expected, "ACL CAT quota");
    // The container is listed too (it has no category of its own: its subcommands do).
    expected.insert("quota.policy".to_string());
    let registered = strings(
        query(
            &mut admin,
            &["COMMAND", "LIST", "FILTERBY", "MODULE", "quota"],
        )
        .expect("COMMAND LIST FILTERBY MODULE"),
    );
    assert_eq!(registered, expected, "the module's commands");
    // COMMAND INFO shows the category.
    for name in ALL_COMMANDS.iter().chain(&POLICY_SUBCOMMANDS) {
        let info = to_array(query(&mut admin, &["COMMAND", "INFO", name]).unwrap());
        let entry = to_array(info[0].clone());
        let categories = strings(entry[6].clone());
        assert!(
            categories.contains("@quota"),
            "COMMAND INFO {name} categories: {categories:?}"
        );
    }

    query_map(
        &mut admin,
        &["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "3"],
    );

    // +@quota: every quota command runs (SETSTATE passes the ACL and is refused by the module).
    acl_setuser(
        &mut admin,
        &["ops", "on", ">ops-secret", "~*", "-@all", "+@quota"],
    );
    let mut ops = connect_as(&server, "ops", "ops-secret");
    for args in sample_calls() {
        if let Err(e) = query(&mut ops, &args) {
            panic!("{args:?} as a +@quota user: {}", error_text(&e));
        }
    }
    let err = query_err(
        &mut ops,
        &["QUOTA.SETSTATE", "q:{alice}:4:acme4:chat5:alice1:b", "x"],
    );
    assert!(
        !err.starts_with("NOPERM") && err.contains("internal"),
        "SETSTATE as a +@quota user: {err}"
    );
    assert_noperm(&mut ops, &["SET", "k", "v"]);
    // The grant by ops took effect (and the revoke after it).
    assert_eq!(
        query(&mut admin, &["QUOTA.GET", T, P, "alice", "b"]).unwrap(),
        Value::Nil,
        "the +@quota user's REVOKE"
    );

    // -@quota: none of them runs, everything else does.
    acl_setuser(
        &mut admin,
        &["other", "on", ">other-secret", "~*", "+@all", "-@quota"],
    );
    let mut other = connect_as(&server, "other", "other-secret");
    for args in sample_calls() {
        assert_noperm(&mut other, &args);
    }
    assert_noperm(
        &mut other,
        &["QUOTA.SETSTATE", "q:{alice}:4:acme4:chat5:alice1:b", "x"],
    );
    let v = query(&mut other, &["SET", "k", "v"]).expect("SET as a -@quota user");
    assert_eq!(value_to_string(&v).as_deref(), Some("OK"));

    // A category plus single commands: +@quota -quota.grant.
    acl_setuser(
        &mut admin,
        &[
            "mixed",
            "on",
            ">mixed-secret",
            "~*",
            "-@all",
            "+@quota",
            "-quota.grant",
        ],
    );
    let mut mixed = connect_as(&server, "mixed", "mixed-secret");
    assert_noperm(
        &mut mixed,
        &["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "1"],
    );
    query_map(&mut mixed, &["QUOTA.USAGE", T, P, "alice", "b"]);
}

/// COMMAND INFO: the admission and management commands are writes, the lookups read-only.
#[test]
fn command_flags_are_sensible() {
    let schema = unique_schema();
    let server = test_server(&schema);
    let mut con = server.client();

    let mut flags: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for name in ALL_COMMANDS {
        let info = to_array(query(&mut con, &["COMMAND", "INFO", name]).expect("COMMAND INFO"));
        assert_eq!(info.len(), 1);
        let entry = to_array(info[0].clone());
        assert!(entry.len() >= 6, "COMMAND INFO {name}: {entry:?}");
        flags.insert(name, strings(entry[2].clone()));
    }
    let has = |name: &str, flag: &str| flags[name].contains(flag);

    for name in [
        "quota.admit",
        "quota.commit",
        "quota.release",
        "quota.reset",
        "quota.grant",
        "quota.revoke",
        "quota.cleanup",
        "quota.invalidate",
        "quota.setstate",
    ] {
        assert!(has(name, "write"), "{name} flags {:?}", flags[name]);
        assert!(!has(name, "readonly"), "{name} flags {:?}", flags[name]);
    }
    for name in ["quota.get", "quota.usage", "quota.list"] {
        assert!(has(name, "readonly"), "{name} flags {:?}", flags[name]);
        assert!(!has(name, "write"), "{name} flags {:?}", flags[name]);
    }
    // Commands that may grow memory are refused under OOM; the hot path is fast.
    for name in ["quota.admit", "quota.commit", "quota.grant"] {
        assert!(has(name, "denyoom"), "{name} flags {:?}", flags[name]);
    }
    for name in [
        "quota.admit",
        "quota.commit",
        "quota.release",
        "quota.get",
        "quota.usage",
    ] {
        assert!(has(name, "fast"), "{name} flags {:?}", flags[name]);
    }
}
