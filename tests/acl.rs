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
/// A credit for alice that no restricted user may write.
const GRANT_ALICE: [&str; 7] = [
    "QUOTA.GRANT",
    T,
    P,
    "alice",
    "*",
    "REQUESTS_PER_DAY",
    "1000",
];

/// Every command the module registers.
const ALL_COMMANDS: [&str; 17] = [
    "quota.admit",
    "quota.apply",
    "quota.cleanup",
    "quota.commit",
    "quota.find",
    "quota.get",
    "quota.grant",
    "quota.history",
    "quota.invalidate",
    "quota.list",
    "quota.release",
    "quota.replyrun",
    "quota.reset",
    "quota.revoke",
    "quota.setstate",
    "quota.top",
    "quota.usage",
];

/// The internal command that neither reads nor writes data (it writes the module's fixed
/// reply runs while the module loads, and is refused at any other time).
const NO_DATA: &str = "quota.replyrun";

/// The subcommands of the `quota.policy` container, each in the category on its own.
const POLICY_SUBCOMMANDS: [&str; 6] = [
    "quota.policy|del",
    "quota.policy|get",
    "quota.policy|help",
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

/// Asserts `args` is refused with NOPERM for its keys.
fn assert_noperm_key(con: &mut redis::Connection, args: &[&str]) {
    let err = query_err(con, args);
    assert!(
        err.starts_with("NOPERM") && err.to_lowercase().contains("key"),
        "{args:?} should be refused with NOPERM for its key: {err}"
    );
}

/// A server with its own schema, and a connection to it.
fn fresh_server() -> (RedisServer, redis::Connection) {
    let server = test_server(&unique_schema());
    let con = server.client();
    (server, con)
}

/// A server (own schema) where alice holds a '*' credit of 3 requests a day, and an admin
/// connection to it.
fn server_with_alice_credit() -> (String, RedisServer, redis::Connection) {
    let schema = unique_schema();
    let server = test_server(&schema);
    let mut admin = server.client();
    admin.grant([T, P, "alice", "*"], "REQUESTS_PER_DAY 3");
    (schema, server, admin)
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
    let (schema, server, mut admin) = server_with_alice_credit();

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
    let alice = [T, P, "alice", "b"];
    let g = app.get(alice).expect("alice's '*' credit");
    assert_eq!(field_i64(&g, "requests_per_day"), 3);
    let opts =
        |lease: &str| format!("REQUESTS_PER_DAY 1 TOKENS_PER_DAY 100 LEASE {lease} RESERVE 10");
    let a = app.admit(alice, opts("l1"));
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.lease.as_deref(), Some("l1"));
    assert_eq!(app.commit(alice, 5, Some("l1")).tokens, 5);
    let a = app.admit(alice, opts("l2"));
    assert!(a.allowed, "{a:?}");
    assert_eq!(app.release(alice, "l2"), 1);
    let u = app.usage(alice);
    assert_eq!(
        (u.requests_per_day, u.tokens_per_day, u.in_flight),
        (1, 5, 0),
        "{u:?}"
    );
    // A user the server has not cached: the admit waits for PostgreSQL under the ACL user too.
    let a = app.admit([T, P, "cold-user", "b"], "REQUESTS_PER_DAY 1");
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.credit, "none");

    // Refused: credit management, maintenance and the internal commands.
    let usage_before = admin.usage(alice);
    for args in [
        GRANT_ALICE.to_vec(),
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
        vec!["QUOTA.APPLY", "q:{alice}:4:acme4:chat5:alice1:b", "x"],
        vec!["SET", "k", "v"],
    ] {
        assert_noperm(&mut app, &args);
    }
    // ... and changed nothing.
    let g = admin.get(alice).expect("alice's '*' credit");
    assert_eq!(field_i64(&g, "requests_per_day"), 3);
    assert_eq!(admin.get([T, P, "mallory", "b"]), None);
    assert_eq!(admin.usage(alice), usage_before);
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
    assert_eq!(app3.usage(alice).requests_per_day, 1);
    assert_noperm(
        &mut app3,
        &["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "1"],
    );
}

/// Redis >= 7.2: the `quota` ACL category holds every QUOTA.* command; `+@quota` allows them
/// all and `-@quota` none.
#[test]
fn quota_acl_category() {
    let (server, mut admin) = fresh_server();
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

    admin.grant([T, P, "alice", "*"], "REQUESTS_PER_DAY 3");

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
    let err = query_err(&mut ops, &["QUOTA.REPLYRUN", "0"]);
    assert!(
        !err.starts_with("NOPERM") && err.contains("internal"),
        "REPLYRUN as a +@quota user: {err}"
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
    let (_server, mut con) = fresh_server();

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
        "quota.apply",
    ] {
        assert!(has(name, "write"), "{name} flags {:?}", flags[name]);
        assert!(!has(name, "readonly"), "{name} flags {:?}", flags[name]);
    }
    for name in [
        "quota.get",
        "quota.usage",
        "quota.list",
        "quota.find",
        "quota.top",
    ] {
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

/// The standard categories: on Redis >= 7.2 `+@all -@write -@dangerous` cannot change quota
/// state and `+@read` can read it. On 7.0 (no module categories) the same rules let every
/// QUOTA.* command through, as the README says, and naming the commands is what works.
#[test]
fn standard_acl_categories() {
    let (_, server, mut admin) = server_with_alice_credit();
    query_map(
        &mut admin,
        &["QUOTA.ADMIT", T, P, "alice", "b", "REQUESTS_PER_DAY", "1"],
    );
    let reads = [
        vec!["QUOTA.GET", T, P, "alice", "b"],
        vec!["QUOTA.USAGE", T, P, "alice", "b"],
        vec!["QUOTA.LIST", T, P, "alice"],
    ];
    acl_setuser(
        &mut admin,
        &[
            "nowrite",
            "on",
            ">s1",
            "~*",
            "+@all",
            "-@write",
            "-@dangerous",
        ],
    );
    acl_setuser(
        &mut admin,
        &["reader", "on", ">s2", "~*", "-@all", "+@read"],
    );
    let mut nowrite = connect_as(&server, "nowrite", "s1");
    let mut reader = connect_as(&server, "reader", "s2");

    if server.version() < (7, 2, 0) {
        // Documented degradation: the module's commands are in no category.
        let v = query(&mut nowrite, &["QUOTA.RESET", T, P, "alice", "b"]).expect("RESET");
        assert_eq!(
            value_i64(&v),
            Some(1),
            "Redis 7.0: -@write does not cover QUOTA.RESET"
        );
        assert_noperm(&mut reader, &reads[0]);
        // Naming the commands works on every version.
        acl_setuser(
            &mut admin,
            &[
                "nowrite",
                "-quota.reset",
                "-quota.grant",
                "-quota.revoke",
                "-quota.cleanup",
            ],
        );
        assert_noperm(&mut nowrite, &["QUOTA.RESET", T, P, "alice", "b"]);
        return;
    }

    const READS: [&str; 6] = [
        "quota.get",
        "quota.usage",
        "quota.list",
        "quota.history",
        "quota.find",
        "quota.top",
    ];
    for name in READS {
        let read = strings(query(&mut admin, &["ACL", "CAT", "read"]).unwrap());
        assert!(read.contains(name), "@read lacks {name}");
    }
    let write = strings(query(&mut admin, &["ACL", "CAT", "write"]).unwrap());
    let fast = strings(query(&mut admin, &["ACL", "CAT", "fast"]).unwrap());
    let dangerous = strings(query(&mut admin, &["ACL", "CAT", "dangerous"]).unwrap());
    let read = strings(query(&mut admin, &["ACL", "CAT", "read"]).unwrap());
    for name in ALL_COMMANDS {
        if name == NO_DATA {
            assert!(!write.contains(name) && !read.contains(name), "{name}");
            continue;
        }
        let is_read = READS.contains(&name);
        assert_eq!(write.contains(name), !is_read, "{name} in @write");
    }
    let members: [(&str, &BTreeSet<String>, &[&str]); 2] = [
        (
            "@fast",
            &fast,
            &[
                "quota.admit",
                "quota.commit",
                "quota.release",
                "quota.get",
                "quota.usage",
            ],
        ),
        (
            "@dangerous",
            &dangerous,
            &[
                "quota.reset",
                "quota.cleanup",
                "quota.setstate",
                "quota.apply",
                "quota.replyrun",
            ],
        ),
    ];
    for (category, got, names) in members {
        for name in names {
            assert!(got.contains(*name), "{name} not in {category}");
        }
    }

    // +@all -@write -@dangerous: no credit or usage change, reads fine.
    for args in [
        vec!["QUOTA.RESET", T, P, "alice", "b"],
        GRANT_ALICE.to_vec(),
        vec!["QUOTA.ADMIT", T, P, "alice", "b", "REQUESTS_PER_DAY", "1"],
        vec!["QUOTA.CLEANUP"],
    ] {
        assert_noperm(&mut nowrite, &args);
    }
    let u = nowrite.usage([T, P, "alice", "b"]);
    assert_eq!(u.requests_per_day, 1, "RESET was refused");
    // +@read: GET, USAGE and LIST; nothing that writes.
    for args in &reads {
        query(&mut reader, args).unwrap_or_else(|e| panic!("{args:?} as +@read: {e}"));
    }
    assert_noperm(&mut reader, &["QUOTA.ADMIT", T, P, "alice", "b"]);
    assert_noperm(&mut reader, &["QUOTA.COMMIT", T, P, "alice", "b", "1"]);
}

/// Reads declare their key read-only: a user with `%R~*` (read-only keys) runs GET, USAGE and
/// LIST, and is refused ADMIT, COMMIT and RESET, which write.
#[test]
fn read_only_key_permission() {
    let (_, server, mut admin) = server_with_alice_credit();
    acl_setuser(
        &mut admin,
        &[
            "ro",
            "on",
            ">ro-secret",
            "%R~*",
            "-@all",
            "+quota.get",
            "+quota.usage",
            "+quota.list",
        ],
    );
    acl_setuser(
        &mut admin,
        &["ro", "+quota.admit", "+quota.commit", "+quota.reset"],
    );
    let mut ro = connect_as(&server, "ro", "ro-secret");
    assert_eq!(ro.usage([T, P, "alice", "b"]).requests_per_day, 0);
    let g = query_map(&mut ro, &["QUOTA.GET", T, P, "alice", "b"]);
    assert_eq!(field_i64(&g, "requests_per_day"), 3);
    query(&mut ro, &["QUOTA.LIST", T, P, "alice"]).expect("LIST with %R~*");
    for args in [
        vec!["QUOTA.ADMIT", T, P, "alice", "b"],
        vec!["QUOTA.COMMIT", T, P, "alice", "b", "1"],
        vec!["QUOTA.RESET", T, P, "alice", "b"],
    ] {
        let err = query_err(&mut ro, &args);
        assert!(err.starts_with("NOPERM"), "{args:?} with %R~*: {err}");
    }
}

/// The declared key is the user id: `~alice` lets a client act on user alice of any tenant
/// and project (a key pattern cannot confine it to one tenant), and not on bob.
#[test]
fn key_pattern_matches_the_user_id_not_the_tenant() {
    let (server, mut admin) = fresh_server();
    acl_setuser(
        &mut admin,
        &[
            "alice-app",
            "on",
            ">a-secret",
            "~alice",
            "-@all",
            "+quota.admit",
            "+quota.usage",
        ],
    );
    let mut app = connect_as(&server, "alice-app", "a-secret");
    for tenant in ["acme", "globex"] {
        let a = app.admit([tenant, P, "alice", "b"], "");
        assert!(a.allowed, "{tenant}: {a:?}");
    }
    let err = query_err(&mut app, &["QUOTA.ADMIT", T, P, "bob", "b"]);
    assert!(err.starts_with("NOPERM"), "{err}");
    // The account key itself is not what ACL checks.
    let err = query_err(&mut app, &["QUOTA.USAGE", T, P, "q:{alice}", "b"]);
    assert!(err.starts_with("NOPERM"), "{err}");
}

/// COMMAND INFO: key specs (RO/access for reads, RW for writes), and no routing tips.
#[test]
fn key_specs_and_tips() {
    let (_server, mut con) = fresh_server();
    let info = |con: &mut redis::Connection, name: &str| {
        let v = to_array(query(con, &["COMMAND", "INFO", name]).expect("COMMAND INFO"));
        to_array(v[0].clone())
    };
    // [name, arity, flags, first, last, step, categories, tips, key specs, subcommands]
    let key_flags = |entry: &[Value]| -> BTreeSet<String> {
        let specs = to_array(entry[8].clone());
        let spec = to_map(specs[0].clone());
        strings(spec["flags"].clone())
    };
    for (name, expected) in [
        ("quota.get", &["ro", "access"][..]),
        ("quota.usage", &["ro", "access"]),
        ("quota.list", &["ro", "access"]),
        ("quota.history", &["ro", "access"]),
        ("quota.find", &["ro", "access"]),
        ("quota.top", &["ro", "access"]),
        ("quota.admit", &["rw", "access", "update"]),
        ("quota.commit", &["rw", "update"]),
        ("quota.release", &["rw", "update"]),
        ("quota.grant", &["rw", "update"]),
        ("quota.revoke", &["rw", "delete"]),
        ("quota.reset", &["rw", "delete"]),
        ("quota.invalidate", &["rw", "delete"]),
        ("quota.setstate", &["ow", "update"]),
        ("quota.apply", &["rw", "update"]),
    ] {
        let entry = info(&mut con, name);
        let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(key_flags(&entry), want, "{name} key spec");
    }
    // CLEANUP does its whole job from any one node: no routing tips, no key.
    let cleanup = info(&mut con, "quota.cleanup");
    assert!(
        to_array(cleanup[7].clone()).is_empty(),
        "QUOTA.CLEANUP tips"
    );
    assert!(
        to_array(cleanup[8].clone()).is_empty(),
        "QUOTA.CLEANUP key specs"
    );
    // The policy subcommands declare the tenant (argument 2) as their key.
    let policy = info(&mut con, "quota.policy");
    for sub in to_array(policy[9].clone()) {
        let sub = to_array(sub);
        let name = value_to_string(&sub[0]).unwrap().to_lowercase();
        let specs = to_array(sub[8].clone());
        let want: &[&str] = match name.as_str() {
            "quota.policy|get" | "quota.policy|list" => &["ro", "access"],
            "quota.policy|set" => &["rw", "update"],
            "quota.policy|del" => &["rw", "delete"],
            "quota.policy|invalidate" => {
                assert!(specs.is_empty(), "{name}: a node's own cache, no key");
                continue;
            }
            "quota.policy|help" => {
                assert!(specs.is_empty(), "{name}: any node answers it, no key");
                continue;
            }
            other => panic!("unknown subcommand {other}"),
        };
        let spec = to_map(specs[0].clone());
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(strings(spec["flags"].clone()), want, "{name} key spec");
        assert_eq!(value_i64(&sub[3]), Some(2), "{name} first key");
    }
    // The project reads declare the tenant (argument 1) as their key.
    for name in ["quota.find", "quota.top"] {
        assert_eq!(
            value_i64(&info(&mut con, name)[3]),
            Some(1),
            "{name} first key"
        );
    }
    // Commands that always wait on PostgreSQL are refused in scripts by Redis itself.
    for name in [
        "quota.grant",
        "quota.revoke",
        "quota.list",
        "quota.cleanup",
        "quota.find",
        "quota.top",
    ] {
        let flags = strings(info(&mut con, name)[2].clone());
        assert!(flags.contains("noscript"), "{name} flags {flags:?}");
    }
}

/// Key permissions bound the policies to their tenant: a user limited to read-only keys, or to
/// another tenant's name, can read what its keys allow and change no policy; and on Redis 7.2+
/// CLEANUP sits with Redis's own dangerous maintenance commands.
#[test]
fn key_permissions_bound_policy_changes_to_the_tenant() {
    let (server, mut admin) = fresh_server();
    let set = |tenant: &'static str| {
        vec![
            "QUOTA.POLICY",
            "SET",
            tenant,
            P,
            "free",
            "REQUESTS_PER_DAY",
            "0",
        ]
    };
    query_map(&mut admin, &set("victim"));
    query_map(&mut admin, &set("acme"));
    // Read-only keys: reads yes, writes no.
    acl_setuser(&mut admin, &["reader", "on", ">r", "%R~*", "+@all"]);
    let mut reader = connect_as(&server, "reader", "r");
    query_map(&mut reader, &["QUOTA.POLICY", "GET", "victim", P, "free"]);
    query(&mut reader, &["QUOTA.POLICY", "LIST", "victim", P]).expect("LIST as a reader");
    for args in [
        set("victim"),
        vec!["QUOTA.POLICY", "DEL", "victim", P, "free"],
    ] {
        assert_noperm_key(&mut reader, &args);
    }
    // Keys of one tenant only (the commands named, as Redis 7.0 needs).
    acl_setuser(
        &mut admin,
        &["acme-admin", "on", ">a", "~acme", "-@all", "+quota.policy"],
    );
    let mut tenant = connect_as(&server, "acme-admin", "a");
    query_map(&mut tenant, &set("acme"));
    for args in [
        set("victim"),
        vec!["QUOTA.POLICY", "DEL", "victim", P, "free"],
        vec!["QUOTA.POLICY", "GET", "victim", P, "free"],
    ] {
        assert_noperm_key(&mut tenant, &args);
    }
    // Nothing changed for the other tenant.
    let victim = query_map(&mut admin, &["QUOTA.POLICY", "GET", "victim", P, "free"]);
    assert_eq!(value_i64(&victim["requests_per_day"]), Some(0));
    if server.version() >= (7, 2, 0) {
        let dangerous = strings(query(&mut admin, &["ACL", "CAT", "dangerous"]).unwrap());
        assert!(dangerous.contains("quota.cleanup"), "{dangerous:?}");
        let keyspace = strings(query(&mut admin, &["ACL", "CAT", "keyspace"]).unwrap());
        assert!(keyspace.contains("quota.cleanup"), "{keyspace:?}");
        acl_setuser(
            &mut admin,
            &["careful", "on", ">c", "~*", "+@all", "-@dangerous"],
        );
        let mut careful = connect_as(&server, "careful", "c");
        assert_noperm(&mut careful, &["QUOTA.CLEANUP"]);
    }
}
