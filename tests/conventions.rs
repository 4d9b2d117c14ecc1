//! The module behaves like a native Redis command set, as the README documents it:
//!
//! * `COMMAND DOCS` gives every command a summary, `since`, complexity and its arguments;
//! * the README's table of errors is what the server replies (each row provoked);
//! * keyspace events (module class) on the account key for ADMIT, COMMIT, RELEASE, RESET and,
//!   on a replica, SETSTATE;
//! * MULTI and scripts: commands that wait on PostgreSQL are refused, a cold GET says TRYAGAIN;
//! * a `'*'` credit applies to each bundle's own counters.
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "acme";
const P: &str = "chat";

const ACCOUNT: [&str; 4] = ["tenant", "project", "user", "bundle"];
const LIMITS: [&str; 10] = [
    "requests_per_day",
    "requests_per_month",
    "total_requests",
    "tokens_per_hour",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent",
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
];

/// The expected `COMMAND DOCS` of every command: summary start, argument names in order (in
/// groups).
const DOCS: &[(&str, &str, &[&[&str]])] = &[
    (
        "quota.admit",
        "Admits",
        &[
            &ACCOUNT,
            &LIMITS,
            &[
                "lease",
                "lease_ttl",
                "reserve",
                "peek",
                "verbose",
                "policy",
                "compact",
                "cost",
            ],
        ],
    ),
    (
        "quota.grant",
        "Grants",
        &[
            &ACCOUNT,
            &LIMITS,
            &[
                "expiry",
                "purchase_id",
                "amount_usd",
                "notes",
                "add",
                "requests_balance",
                "tokens_balance",
            ],
        ],
    ),
    ("quota.get", "Returns", &[&ACCOUNT]),
    ("quota.revoke", "Revokes", &[&ACCOUNT]),
    (
        "quota.list",
        "Lists",
        &[&["tenant", "project", "user", "all"]],
    ),
    ("quota.history", "Lists", &[&ACCOUNT, &["from", "to"]]),
    (
        "quota.find",
        "Pages",
        &[&["tenant", "project", "expires_within", "count", "cursor"]],
    ),
    (
        "quota.top",
        "Ranks",
        &[&["tenant", "project", "ranking", "from", "to", "count"]],
    ),
    ("quota.cleanup", "Deactivates", &[]),
    (
        "quota.invalidate",
        "Drops",
        &[&["tenant", "project", "user"]],
    ),
    ("quota.commit", "Records", &[&ACCOUNT, &["tokens", "lease"]]),
    ("quota.release", "Undoes", &[&ACCOUNT, &["lease"]]),
    ("quota.usage", "Returns", &[&ACCOUNT]),
    ("quota.reset", "Clears", &[&ACCOUNT]),
    ("quota.setstate", "Internal", &[&["key", "state"]]),
    ("quota.apply", "Internal", &[&["key", "effect"]]),
    ("quota.replyrun", "Internal", &[&["index"]]),
];

/// A RESP2 `COMMAND DOCS` entry (flat field/value array) as a map.
fn doc_map(v: Value) -> BTreeMap<String, Value> {
    let items = to_array(v);
    items
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((value_to_string(k)?, v.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn command_docs_match_the_expected_table() {
    let (_schema, _server, mut con) = test_server_con();
    for (name, summary_start, args) in DOCS {
        let reply = to_array(query(&mut con, &["COMMAND", "DOCS", name]).expect("COMMAND DOCS"));
        assert_eq!(reply.len(), 2, "COMMAND DOCS {name}: {reply:?}");
        let doc = doc_map(reply[1].clone());
        let text = |field: &str| doc.get(field).and_then(value_to_string).unwrap_or_default();
        assert!(
            text("summary").starts_with(summary_start),
            "{name} summary: {:?}",
            text("summary")
        );
        assert_eq!(text("since"), env!("CARGO_PKG_VERSION"), "{name} since");
        assert!(text("complexity").starts_with("O("), "{name} complexity");
        assert_eq!(text("module"), "quota", "{name} module");
        let names: Vec<String> = doc
            .get("arguments")
            .cloned()
            .map(to_array)
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                doc_map(a)
                    .get("name")
                    .and_then(value_to_string)
                    .unwrap_or_default()
            })
            .collect();
        let expected: Vec<&str> = args.iter().copied().flatten().copied().collect();
        assert_eq!(names, expected, "{name} arguments");
    }
    // The user is the key argument; options carry their keyword.
    let reply = to_array(query(&mut con, &["COMMAND", "DOCS", "quota.admit"]).unwrap());
    let args = to_array(doc_map(reply[1].clone())["arguments"].clone());
    let user = doc_map(args[2].clone());
    assert_eq!(value_to_string(&user["type"]).as_deref(), Some("key"));
    let peek = doc_map(args[17].clone());
    assert_eq!(value_to_string(&peek["token"]).as_deref(), Some("PEEK"));
    assert_eq!(
        value_to_string(&peek["type"]).as_deref(),
        Some("pure-token")
    );
    // QUOTA.POLICY is a container: each subcommand has its own docs.
    let reply = to_array(query(&mut con, &["COMMAND", "DOCS", "quota.policy"]).unwrap());
    let subcommands = doc_map(doc_map(reply[1].clone())["subcommands"].clone());
    for (sub, summary_start) in [
        ("quota.policy|set", "Creates"),
        ("quota.policy|get", "Returns"),
        ("quota.policy|del", "Deletes"),
        ("quota.policy|list", "Lists"),
        ("quota.policy|invalidate", "Drops"),
    ] {
        let doc = doc_map(subcommands[sub].clone());
        let summary = doc.get("summary").and_then(value_to_string);
        assert!(
            summary.as_deref().unwrap_or("").starts_with(summary_start),
            "{sub}: {summary:?}"
        );
    }
}

/// One version: Cargo.toml's, `MODULE LIST`'s `ver` (major * 10000 + minor * 100 + patch, as
/// Redis's own modules encode theirs) and every command's `COMMAND DOCS` `since` agree.
#[test]
fn one_version_in_cargo_module_list_and_command_docs() {
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("a version line in Cargo.toml");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let parts: Vec<i64> = version
        .split('.')
        .map(|p| p.parse().expect("a numeric version part"))
        .collect();
    assert_eq!(parts.len(), 3, "{version}");
    let encoded = parts[0] * 10000 + parts[1] * 100 + parts[2];

    let (_schema, _server, mut con) = test_server_con();
    let modules = to_array(query(&mut con, &["MODULE", "LIST"]).expect("MODULE LIST"));
    let quota = modules
        .into_iter()
        .map(to_map)
        .find(|m| field_str(m, "name").as_deref() == Some("quota"))
        .expect("the quota module in MODULE LIST");
    assert_eq!(field_i64(&quota, "ver"), encoded, "MODULE LIST ver");

    // Every command and subcommand COMMAND DOCS knows of the module.
    let docs = doc_map(query(&mut con, &["COMMAND", "DOCS"]).expect("COMMAND DOCS"));
    let mut seen = 0;
    for (name, doc) in docs {
        let doc = doc_map(doc);
        if doc.get("module").and_then(value_to_string).as_deref() != Some("quota") {
            continue;
        }
        let mut entries = vec![(name.clone(), doc.clone())];
        if let Some(subs) = doc.get("subcommands") {
            entries.extend(
                doc_map(subs.clone())
                    .into_iter()
                    .map(|(n, d)| (n, doc_map(d))),
            );
        }
        for (name, doc) in entries {
            if !name.contains('|') && doc.contains_key("subcommands") {
                continue; // a container has no docs of its own
            }
            let since = doc.get("since").and_then(value_to_string);
            assert_eq!(since.as_deref(), Some(version.as_str()), "{name} since");
            seen += 1;
        }
    }
    assert!(
        seen >= DOCS.len() + 5,
        "only {seen} QUOTA.* commands in COMMAND DOCS"
    );
}

/// Splits a README example command: words separated by spaces, `""` is an empty argument.
fn words(command: &str) -> Vec<String> {
    command
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w == "\"\"" {
                String::new()
            } else {
                w.to_string()
            }
        })
        .collect()
}

/// The rows of the README's `### Errors` table: (reply, command, needs a server without
/// `quota.pg-url`).
fn readme_errors() -> Vec<(String, Vec<String>, bool)> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n### Errors\n")
        .nth(1)
        .expect("README has a ### Errors section");
    let section = section.split("\n#").next().unwrap_or(section);
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let reply = cells[0].trim_start_matches("| `").trim_end_matches('`');
        let example = cells[1].trim_end_matches(" |");
        let command = example.split('`').nth(1).expect("a command in backquotes");
        rows.push((
            reply.to_string(),
            words(command),
            example.contains("without `quota.pg-url`"),
        ));
    }
    rows
}

#[test]
fn readme_error_table_matches_the_server() {
    let rows = readme_errors();
    assert!(rows.len() >= 10, "README error table: {rows:?}");
    let schema = unique_schema();
    let server = test_server(&schema);
    let no_url = RedisServer::builder()
        .module_args(&[("schema", schema.as_str())])
        .start();
    let mut con = server.client();
    let mut bare = no_url.client();
    for (reply, command, without_url) in &rows {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let target = if *without_url { &mut bare } else { &mut con };
        let err = query_err(target, &args);
        assert_eq!(&err, reply, "{args:?}");
    }
}

/// Collects keyspace events from `con` (already subscribed) for `wait`.
fn events(pubsub: &mut redis::PubSub<'_>, wait: Duration) -> Vec<(String, String)> {
    let until = Instant::now() + wait;
    let mut out = Vec::new();
    while Instant::now() < until {
        match pubsub.get_message() {
            Ok(msg) => {
                let payload: String = msg.get_payload().unwrap_or_default();
                out.push((msg.get_channel_name().to_string(), payload));
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => panic!("pubsub: {e}"),
        }
    }
    out
}

#[test]
fn keyspace_notifications_for_usage_changes() {
    let schema = unique_schema();
    let master = RedisServer::builder()
        .module_args(&[
            ("pg-url", PgServer::shared().as_str()),
            ("schema", schema.as_str()),
        ])
        .conf("repl-diskless-sync-delay 0")
        .start();
    let replica = RedisServer::builder()
        .module_args(&[
            ("pg-url", PgServer::shared().as_str()),
            ("schema", schema.as_str()),
        ])
        .replica_of(&master)
        .start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    let mut con = master.client();
    // `A` includes the module class; `d` alone (with `E`) is enough too.
    for (server, classes) in [(&master, "KEA"), (&replica, "Ed")] {
        let mut c = server.client();
        query(
            &mut c,
            &["CONFIG", "SET", "notify-keyspace-events", classes],
        )
        .expect("CONFIG SET");
    }
    let acc = [T, P, "alice", "web"];
    let key = account_key(acc);

    let mut sub = master.client();
    let mut pubsub = sub.as_pubsub();
    pubsub.psubscribe("__keyevent@0__:quota.*").unwrap();
    pubsub.subscribe(format!("__keyspace@0__:{key}")).unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut rsub = replica.client();
    let mut rpubsub = rsub.as_pubsub();
    rpubsub.psubscribe("__keyevent@0__:quota.*").unwrap();
    rpubsub
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    let a = con.admit(acc, "REQUESTS_PER_DAY 1 LEASE l1");
    assert!(a.allowed);
    con.admit(acc, "REQUESTS_PER_DAY 1 PEEK"); // changes nothing, but is a denial
    let denied = con.admit(acc, "REQUESTS_PER_DAY 1");
    assert!(!denied.allowed); // changes nothing, but says so: quota.denied
    con.commit(acc, 5, Some("l1"));
    con.commit(acc, 5, Some("l1")); // a repeat records nothing
    con.admit(acc, "LEASE l2");
    query(&mut con, &with_account("QUOTA.RELEASE", acc, &["l2"])).unwrap();
    query(&mut con, &with_account("QUOTA.RELEASE", acc, &["l2"])).unwrap(); // not held
    query(&mut con, &with_account("QUOTA.RESET", acc, &[])).unwrap();

    let got = events(&mut pubsub, Duration::from_secs(1));
    let keyevents: Vec<&str> = got
        .iter()
        .filter(|(ch, _)| ch.starts_with("__keyevent@0__:"))
        .map(|(ch, payload)| {
            assert_eq!(payload, &key, "{ch}");
            ch.trim_start_matches("__keyevent@0__:")
        })
        .collect();
    assert_eq!(
        keyevents,
        [
            "quota.admit",
            "quota.denied",
            "quota.denied",
            "quota.commit",
            "quota.admit",
            "quota.release",
            "quota.reset"
        ],
        "{got:?}"
    );
    let keyspace: Vec<&str> = got
        .iter()
        .filter(|(ch, _)| ch.starts_with("__keyspace@0__:"))
        .map(|(_, payload)| payload.as_str())
        .collect();
    assert_eq!(keyspace.first(), Some(&"quota.admit"), "{got:?}");
    assert_eq!(keyspace.get(1), Some(&"quota.denied"), "{got:?}");
    assert_eq!(keyspace.len(), 7, "{got:?}");

    // The replica applies the master's changes (`QUOTA.APPLY`, RESET as itself) and tells its
    // own listeners the same events, in the same order; a denial is the master's alone.
    let on_replica = events(&mut rpubsub, Duration::from_secs(1));
    let names: Vec<&str> = on_replica
        .iter()
        .map(|(ch, _)| ch.trim_start_matches("__keyevent@0__:"))
        .collect();
    let applied: Vec<&str> = keyevents
        .iter()
        .copied()
        .filter(|e| *e != "quota.denied")
        .collect();
    assert_eq!(names, applied, "{on_replica:?}");
}

#[test]
fn multi_and_scripts_refuse_what_must_wait() {
    let (_schema, server, mut con) = test_server_con();
    // Scripts: refused by Redis before the module runs.
    for args in [
        "'QUOTA.GRANT', 'acme', 'chat', 'alice', '*', 'REQUESTS_PER_DAY', '1'",
        "'QUOTA.REVOKE', 'acme', 'chat', 'alice', '*'",
        "'QUOTA.LIST', 'acme', 'chat', 'alice'",
        "'QUOTA.CLEANUP'",
    ] {
        let script = format!("return redis.call({args})");
        let err = query_err(&mut con, &["EVAL", &script, "0"]);
        assert!(err.contains("not allowed from script"), "{args}: {err}");
    }
    // A cold GET in a script: TRYAGAIN, and the load it started answers a later call.
    query_map(
        &mut con,
        &["QUOTA.GRANT", T, P, "cold", "*", "REQUESTS_PER_DAY", "4"],
    );
    query(&mut con, &["QUOTA.INVALIDATE", T, P, "cold"]).unwrap();
    let get = "return redis.call('QUOTA.GET', 'acme', 'chat', 'cold', 'web')";
    let err = query_err(&mut con, &["EVAL", get, "0"]);
    assert!(
        err.starts_with(
            "TRYAGAIN credits for this user are loading from PostgreSQL: retry outside MULTI/scripts or shortly"
        ),
        "{err}"
    );
    assert!(wait_until(Duration::from_secs(10), || query(
        &mut con,
        &["EVAL", get, "0"]
    )
    .is_ok()));

    // MULTI: queued, answered at EXEC by the module; the rest of the transaction runs.
    // (No load may still be in flight: one finishing after the INVALIDATE would cache the user
    // again before EXEC.)
    assert!(wait_until(Duration::from_secs(10), || {
        server
            .info("quota")
            .get("quota_loads_in_flight")
            .map(String::as_str)
            == Some("0")
    }));
    query(&mut con, &["QUOTA.INVALIDATE", T, P, "cold"]).unwrap();
    // (Over a raw socket: the client library turns an EXEC reply holding errors into an error.)
    let raw = raw_exchange(
        server.port(),
        &[
            vec!["MULTI"],
            vec!["QUOTA.GRANT", T, P, "alice", "*", "REQUESTS_PER_DAY", "1"],
            vec!["QUOTA.GET", T, P, "cold", "web"],
            vec!["QUOTA.USAGE", T, P, "alice", "web"],
            vec!["EXEC"],
        ],
    );
    let expected = "+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n\
         -ERR QUOTA.GRANT waits on PostgreSQL and cannot run inside MULTI, a script or a function\r\n\
         -TRYAGAIN credits for this user are loading from PostgreSQL: retry outside MULTI/scripts or shortly\r\n\
         *28\r\n$16\r\nrequests_per_day\r\n:0\r\n";
    assert!(raw.starts_with(expected), "{raw}");
}

/// Sends `commands` on a fresh RESP2 connection and returns everything read until the reply
/// stream goes quiet.
fn raw_exchange(port: u16, commands: &[Vec<&str>]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut out = Vec::new();
    for args in commands {
        encode(&bytes(args), &mut out);
    }
    stream.write_all(&out).expect("write");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A `'*'` credit is applied by each bundle to its own counters: +2 on '*' is +2 on every
/// bundle, not 2 shared.
#[test]
fn star_credit_applies_to_each_bundle() {
    let (_schema, _server, mut con) = test_server_con();
    con.grant([T, P, "alice", "*"], "REQUESTS_PER_DAY 2");
    for bundle in ["web", "mobile"] {
        let allowed: Vec<bool> = (0..4)
            .map(|_| {
                con.admit([T, P, "alice", bundle], "REQUESTS_PER_DAY 1")
                    .allowed
            })
            .collect();
        assert_eq!(
            allowed,
            [true, true, true, false],
            "{bundle}: base 1 + its own 2"
        );
    }
}

/// Field names and fixed values are written from encodings Redis made at load (`ECHO` through
/// `RedisModule_Call`, copied with `RedisModule_ReplyWithCallReply`), and so are the runs of
/// fixed values of an admitted `COMPACT` reply (`QUOTA.REPLYRUN`). With `ECHO` renamed away
/// they are written value by value, and the module says so in its log. Either way a client
/// gets the same bytes in RESP2 and the same values in RESP3: admitted and denied, with a
/// lease and without, paid by the windows and by a balance.
#[test]
fn replies_are_the_same_with_or_without_encoded_words() {
    let schema = unique_schema();
    let fast = test_server(&schema);
    let plain = RedisServer::builder()
        .pg(&PgServer::shared(), &schema, "2000")
        .conf("rename-command ECHO \"\"")
        .start();
    assert!(
        plain.log().contains("written the slow way"),
        "{}",
        plain.log()
    );
    assert!(!fast.log().contains("written the slow way"));
    fast.client()
        .grant([T, P, "wanda", "*"], "REQUESTS_PER_DAY 5 AMOUNT 3");
    fast.client()
        .grant([T, P, "walt", "*"], "REQUESTS_BALANCE 10");
    let both = [&fast, &plain];
    for server in both {
        // Warm each node's cache (the first GET waits on the load).
        assert!(server.client().get([T, P, "wanda", "*"]).is_some());
        assert!(server.client().get([T, P, "walt", "*"]).is_some());
    }
    let admit = |opts: &[&'static str]| {
        let mut args = vec!["QUOTA.ADMIT", T, P, "wanda", "main"];
        args.extend_from_slice(opts);
        args
    };
    let commands: Vec<Vec<&str>> = vec![
        vec!["QUOTA.GET", T, P, "wanda", "main"],
        vec!["QUOTA.GET", T, P, "nobody", "main"],
        admit(&["REQUESTS_PER_DAY", "2"]),
        admit(&["REQUESTS_PER_DAY", "2", "COMPACT"]),
        admit(&["TOTAL_REQUESTS", "0"]),
        admit(&["TOTAL_REQUESTS", "0", "COMPACT"]),
        admit(&["MAX_CONCURRENT", "5", "LEASE", "job-1", "COMPACT"]),
        admit(&["MAX_CONCURRENT", "5", "LEASE", "job-2"]),
        admit(&["REQUESTS_PER_SECOND", "9", "COMPACT"]),
        admit(&["REQUESTS_PER_SECOND", "9"]),
        vec!["QUOTA.ADMIT", T, P, "walt", "main", "REQUESTS_PER_DAY", "0"],
        vec![
            "QUOTA.ADMIT",
            T,
            P,
            "walt",
            "main",
            "REQUESTS_PER_DAY",
            "0",
            "COMPACT",
        ],
        vec!["QUOTA.ADMIT", T, P, "nobody", "main", "COMPACT"],
        admit(&["REQUESTS_PER_DAY", "9", "VERBOSE"]),
        vec!["QUOTA.USAGE", T, P, "wanda", "main"],
    ];
    // The window resets in VERBOSE and USAGE are the same unless an hour turns between the
    // two exchanges: then the next try matches.
    let mut tries = 0;
    loop {
        let [a, b] = both.map(|s| raw_exchange(s.port(), &commands));
        if a == b || tries == 1 {
            assert_eq!(a, b, "RESP2 bytes differ with and without encoded words");
            assert!(a.contains("$7\r\nallowed\r\n:1\r\n") && a.contains("$7\r\nwindows\r\n"));
            assert!(a.contains(
                "$5\r\njob-1\r\n$0\r\n\r\n:0\r\n$6\r\nglobal\r\n$7\r\nwindows\r\n:-1\r\n"
            ));
            assert!(
                a.contains("$7\r\nbalance\r\n:-1\r\n"),
                "paid by the balance"
            );
            // An admitted COMPACT reply: allowed 1, retry_after -1, the remaining counts (a day
            // limit of 2 plus the credit's 5, two used), no lease, no reason, nothing reserved.
            assert!(
                a.contains("*10\r\n:1\r\n:-1\r\n:5\r\n:-1\r\n$0\r\n\r\n$0\r\n\r\n:0\r\n"),
                "{a}"
            );
            // The same admission in full (the first one: 6 left), and in full with a lease and
            // paid by a balance.
            let head = "*22\r\n$7\r\nallowed\r\n:1\r\n$6\r\nreason\r\n$0\r\n\r\n$11\r\nretry_after\r\n:-1\r\n$14\r\nretry_after_ms\r\n:-1\r\n$5\r\nlease\r\n";
            let middle = |used: u8, paid: &str| {
                format!("$8\r\nreserved\r\n:0\r\n$11\r\nused_credit\r\n:{used}\r\n$6\r\ncredit\r\n$6\r\nglobal\r\n$18\r\nremaining_requests\r\n{paid}")
            };
            let full = format!(
                "{head}$-1\r\n{}",
                middle(
                    0,
                    ":6\r\n$16\r\nremaining_tokens\r\n:-1\r\n$7\r\npaid_by\r\n$7\r\nwindows\r\n"
                )
            );
            assert!(a.contains(&full), "{a}");
            assert!(
                a.contains(&format!("{head}$5\r\njob-2\r\n{}", middle(0, ""))),
                "{a}"
            );
            assert!(a.contains(&middle(1, "")), "{a}");
            assert!(a.contains("$7\r\npaid_by\r\n$7\r\nbalance\r\n"), "{a}");
            break;
        }
        tries += 1;
    }
    let [mut a3, mut b3] = both.map(|s| s.client_resp3());
    let resp3 = commands
        .iter()
        .filter(|args| args[0] != "QUOTA.USAGE" && !args.contains(&"VERBOSE"));
    // A denial's wait is read from each node's clock at its own moment: left out.
    let without_wait = |v: Value| match v {
        Value::Map(pairs) => Value::Map(
            pairs
                .into_iter()
                .filter(|(k, _)| {
                    let k = value_to_string(k);
                    k.as_deref() != Some("retry_after_ms") && k.as_deref() != Some("retry_after")
                })
                .collect(),
        ),
        Value::Array(mut items) if items.len() == 10 => {
            items.truncate(9);
            items.remove(1);
            Value::Array(items)
        }
        other => other,
    };
    for args in resp3 {
        let (a, b) = (query(&mut a3, args), query(&mut b3, args));
        let (a, b) = (a.map(without_wait), b.map(without_wait));
        assert_eq!(a, b, "RESP3 replies to {args:?} differ");
        if args[3] == "wanda" && args.last() != Some(&"COMPACT") {
            assert!(matches!(a, Ok(Value::Map(_))), "{a:?}");
        }
    }
}
