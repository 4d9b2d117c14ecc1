//! Named policies (`QUOTA.POLICY`) and `QUOTA.ADMIT ... POLICY <name> [COMPACT]` against real
//! servers on the shared PostgreSQL (a private one for the outage), one schema per test:
//!
//! * CRUD with its audit rows, and admission against a policy with inline overrides applied
//!   once (the inline field replaces the policy's, a credit adds on top);
//! * a policy changed by SQL reaches a warm account on another node through NOTIFY;
//! * replicas and a cluster see policies;
//! * PostgreSQL down: a cached policy still decides, a never-cached one is a clear error;
//! * the compact reply read by index from Lua under RESP2 and RESP3;
//! * exactness: 20 clients, a cold policy and a cold credit, exactly the limit admitted;
//! * `QUOTA.POLICY HELP` answers as `CONFIG HELP` does, keyless, on every cluster node.
mod common;

use std::time::{Duration, Instant};

use common::*;

const T: &str = "acme";
const P: &str = "chat";

/// `QUOTA.POLICY SET T P <name> <limits...>` -> the stored policy.
fn set_policy(con: &mut impl redis::ConnectionLike, name: &str, limits: &str) -> Map {
    con.policy_set([T, P], name, limits)
}

/// `QUOTA.ADMIT T P <user> b POLICY <name> <opts...>`.
fn admit_policy<'a>(user: &'a str, name: &'a str, opts: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["QUOTA.ADMIT", T, P, user, "b", "POLICY", name];
    args.extend_from_slice(opts);
    args
}

/// `QUOTA.ADMIT T P <user> b POLICY <name> <opts...>`, typed.
fn admit_under(con: &mut impl redis::ConnectionLike, user: &str, name: &str, opts: &str) -> Admit {
    con.admit([T, P, user, "b"], Opts::new().policy(name).and(opts))
}

/// How many of `n` admits of `user` under policy `name` (and `opts`) are allowed.
fn allowed_of(con: &mut impl redis::ConnectionLike, user: &str, name: &str, n: usize) -> usize {
    allowed_with(con, user, name, "", n)
}

fn allowed_with(
    con: &mut impl redis::ConnectionLike,
    user: &str,
    name: &str,
    opts: &str,
    n: usize,
) -> usize {
    (0..n)
        .filter(|_| admit_under(con, user, name, opts).allowed)
        .count()
}

/// The `VERBOSE` limits of an admit under policy `name` (PEEK: nothing counts).
fn effective_limits(con: &mut redis::Connection, user: &str, name: &str, inline: &str) -> Map {
    let m = admit_under(con, user, name, &format!("{inline} PEEK VERBOSE"));
    m.limits.expect("VERBOSE has limits")
}

fn pg_rows(url: &str, schema: &str, sql_after_from: &str) -> String {
    psql(
        url,
        &format!("SELECT count(*) FROM \"{schema}\".{sql_after_from}"),
    )
    .trim()
    .to_string()
}

#[test]
fn policies_are_stored_listed_deleted_and_audited() {
    let (schema, _server, mut con) = test_server_con();

    let stored = set_policy(&mut con, "pro", "REQUESTS_PER_DAY 100 tokens_per_day 5000");
    assert_eq!(field_str(&stored, "policy").as_deref(), Some("pro"));
    assert_eq!(field_i64(&stored, "requests_per_day"), 100);
    assert_eq!(field_i64(&stored, "tokens_per_day"), 5000);
    assert!(field_is_nil(&stored, "max_concurrent"), "{stored:?}");
    set_policy(&mut con, "free", "REQUESTS_PER_DAY 10");

    let got = query_map(&mut con, &["QUOTA.POLICY", "GET", T, P, "pro"]);
    assert_eq!(field_i64(&got, "requests_per_day"), 100);
    let listed = query_map(&mut con, &["QUOTA.POLICY", "LIST", T, P]);
    let mut names: Vec<&String> = listed.keys().collect();
    names.sort();
    assert_eq!(names, ["free", "pro"]);
    assert_eq!(
        field_i64(&to_map(listed["free"].clone()), "requests_per_day"),
        10
    );

    // Replacing sets absent limits back to unlimited.
    let replaced = set_policy(&mut con, "pro", "MAX_CONCURRENT 3");
    assert!(field_is_nil(&replaced, "requests_per_day"));
    assert_eq!(field_i64(&replaced, "max_concurrent"), 3);
    let got = query_map(&mut con, &["QUOTA.POLICY", "GET", T, P, "pro"]);
    assert!(
        field_is_nil(&got, "requests_per_day"),
        "stale cache: {got:?}"
    );

    assert_eq!(
        query(&mut con, &["QUOTA.POLICY", "DEL", T, P, "pro"]).ok(),
        Some(Value::Int(1))
    );
    assert_eq!(
        query(&mut con, &["QUOTA.POLICY", "DEL", T, P, "pro"]).ok(),
        Some(Value::Int(0))
    );
    assert_eq!(
        query(&mut con, &["QUOTA.POLICY", "GET", T, P, "pro"]).ok(),
        Some(Value::Nil)
    );
    assert_eq!(
        query_err(&mut con, &admit_policy("u", "pro", &[])),
        "ERR unknown policy 'pro'"
    );

    // Every change left an audit row; the table holds what is left.
    let url = PgServer::shared();
    let events = "user_quota_replenishment_event WHERE event_type = 'policy_set'";
    assert_eq!(pg_rows(&url, &schema, events), "3");
    let deletes = "user_quota_replenishment_event WHERE event_type = 'policy_delete' \
                   AND payload->>'policy' = 'pro'";
    assert_eq!(pg_rows(&url, &schema, deletes), "1");
    assert_eq!(pg_rows(&url, &schema, "quota_policy"), "1");

    // Bad input changes nothing and names the argument.
    assert_eq!(
        query_err(
            &mut con,
            &["QUOTA.POLICY", "SET", T, P, "x", "REQUESTS_PER_DAY", "-1"]
        ),
        "ERR REQUESTS_PER_DAY must be a non-negative integer"
    );
    assert_eq!(
        query_err(&mut con, &["QUOTA.POLICY", "SET", T, P, "x", "LEASE", "1"]),
        "ERR unknown option 'LEASE'"
    );
    assert_eq!(pg_rows(&url, &schema, "quota_policy"), "1");
}

#[test]
fn an_admit_with_a_policy_takes_inline_limits_over_it_and_credits_on_top() {
    let (schema, _server, mut con) = test_server_con();
    set_policy(
        &mut con,
        "pro",
        "REQUESTS_PER_DAY 2 TOKENS_PER_DAY 100 MAX_CONCURRENT 50",
    );

    let limits = effective_limits(&mut con, "alice", "pro", "");
    assert_eq!(field_i64(&limits, "requests_per_day"), 2);
    assert_eq!(field_i64(&limits, "tokens_per_day"), 100);
    assert_eq!(field_i64(&limits, "max_concurrent"), 50);
    assert_eq!(field_i64(&limits, "requests_per_month"), -1);

    // The inline field replaces the policy's (3, not 2 + 3); the others stay the policy's.
    let limits = effective_limits(
        &mut con,
        "alice",
        "pro",
        "REQUESTS_PER_DAY 3 TOKENS_PER_HOUR 7",
    );
    assert_eq!(field_i64(&limits, "requests_per_day"), 3);
    assert_eq!(field_i64(&limits, "tokens_per_hour"), 7);
    assert_eq!(field_i64(&limits, "tokens_per_day"), 100);
    assert_eq!(field_i64(&limits, "max_concurrent"), 50);

    assert_eq!(allowed_of(&mut con, "bob", "pro", 6), 2);
    assert_eq!(
        allowed_with(&mut con, "carol", "pro", "REQUESTS_PER_DAY 3", 6),
        3
    );

    // A credit adds to the policy's limit.
    query(
        &mut con,
        &["QUOTA.GRANT", T, P, "dave", "*", "REQUESTS_PER_DAY", "4"],
    )
    .expect("GRANT");
    assert_eq!(allowed_of(&mut con, "dave", "pro", 10), 6);

    // Inside MULTI a policy that is not cached cannot be waited for.
    psql(
        &PgServer::shared(),
        &format!(
            "INSERT INTO \"{schema}\".quota_policy (tenant, project, policy_name, \
             requests_per_day) VALUES ('{T}', '{P}', 'sqlonly', 1)"
        ),
    );
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("QUOTA.ADMIT")
        .arg(&admit_policy("erin", "sqlonly", &[])[1..]);
    let err = pipe
        .query::<Value>(&mut con)
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|e| error_text(&e));
    assert!(err.contains("TRYAGAIN"), "{err}");
    // ... and outside it the command waits for the load.
    assert_eq!(allowed_of(&mut con, "erin", "sqlonly", 3), 1);
}

#[test]
fn a_policy_changed_by_sql_reaches_a_warm_account_on_another_node_through_notify() {
    let schema = unique_schema();
    // Long TTLs: only NOTIFY can make the change visible in time.
    let long = [("cache-ttl-ms", "600000"), ("negative-ttl-ms", "600000")];
    let a = test_server_with(&schema, &long);
    let b = test_server_with(&schema, &long);
    for s in [&a, &b] {
        s.wait_notify_state("listening", Duration::from_secs(15));
    }
    let mut on_a = a.client();
    let mut on_b = b.client();
    set_policy(&mut on_a, "pro", "REQUESTS_PER_DAY 1");

    // Warm on B: the policy and the account are cached, the limit is reached.
    assert_eq!(allowed_of(&mut on_b, "alice", "pro", 3), 1);

    psql(
        &PgServer::shared(),
        &format!(
            "UPDATE \"{schema}\".quota_policy SET requests_per_day = 3 \
             WHERE tenant = '{T}' AND project = '{P}' AND policy_name = 'pro'"
        ),
    );
    let started = Instant::now();
    let seen = wait_until(Duration::from_secs(5), || {
        allowed_of(&mut on_b, "alice", "pro", 1) == 1
    });
    assert!(seen, "the SQL change did not reach B within 5 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Exactly the new limit: 1 before, 1 just now, 1 more.
    assert_eq!(allowed_of(&mut on_b, "alice", "pro", 3), 1);
}

#[test]
fn replicas_see_policies_and_their_changes() {
    let schema = unique_schema();
    // No NOTIFY on the replica: the replicated invalidation alone must do it.
    let (master, replica) =
        test_master_and_replica(&schema, &[("notify", "no"), ("cache-ttl-ms", "600000")]);
    let mut m = master.client();
    let mut r = replica.client();

    set_policy(&mut m, "pro", "REQUESTS_PER_DAY 5");
    let got = query_map(&mut r, &["QUOTA.POLICY", "GET", T, P, "pro"]);
    assert_eq!(field_i64(&got, "requests_per_day"), 5);

    set_policy(&mut m, "pro", "REQUESTS_PER_DAY 6");
    let acked = value_i64(&query(&mut m, &["WAIT", "1", "1000"]).expect("WAIT"));
    assert_eq!(acked, Some(1));
    let got = query_map(&mut r, &["QUOTA.POLICY", "GET", T, P, "pro"]);
    assert_eq!(
        field_i64(&got, "requests_per_day"),
        6,
        "replica kept a stale policy"
    );
    let listed = query_map(&mut r, &["QUOTA.POLICY", "LIST", T, P]);
    assert_eq!(listed.len(), 1);

    let err = query_err(&mut r, &["QUOTA.POLICY", "SET", T, P, "x"]);
    assert!(err.starts_with("READONLY"), "{err}");
}

/// The status lines of a `QUOTA.POLICY HELP` reply (panics on anything else).
fn help_lines(reply: Value) -> Vec<String> {
    to_array(reply)
        .into_iter()
        .map(|line| match line {
            Value::SimpleString(s) => s,
            other => panic!("a HELP line that is not a status string: {other:?}"),
        })
        .collect()
}

#[test]
fn policy_help_answers_as_redis_container_commands_do() {
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[("schema", schema.as_str())])
        .start();
    let mut resp2 = server.client();
    let mut resp3 = server.client_resp3();
    let lines = help_lines(query(&mut resp2, &["QUOTA.POLICY", "HELP"]).expect("HELP"));
    assert_eq!(
        lines[0],
        "QUOTA.POLICY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    );
    assert_eq!(lines[lines.len() - 2..], ["HELP", "    Print this help."]);
    // Every subcommand: a line with its syntax, then lines that describe it, indented.
    let docs = to_array(query(&mut resp2, &["COMMAND", "DOCS", "quota.policy"]).unwrap());
    let doc = to_map(docs[1].clone());
    let subcommands: Vec<String> = to_map(doc["subcommands"].clone())
        .into_keys()
        .map(|name| name.trim_start_matches("quota.policy|").to_uppercase())
        .collect();
    assert_eq!(subcommands.len(), 6, "{subcommands:?}");
    for sub in &subcommands {
        let at = lines
            .iter()
            .position(|l| l == sub || l.starts_with(&format!("{sub} ")))
            .unwrap_or_else(|| panic!("no {sub} in HELP: {lines:#?}"));
        assert!(lines[at + 1].starts_with("    "), "{sub}: {lines:#?}");
    }
    let syntax = lines.iter().skip(1).filter(|l| !l.starts_with(' ')).count();
    assert_eq!(syntax, subcommands.len(), "{lines:#?}");
    // RESP3: the same array of status strings; any case.
    let lines3 = help_lines(query(&mut resp3, &["quota.policy", "help"]).expect("HELP"));
    assert_eq!(lines3, lines);
    // An unknown subcommand points at HELP; HELP takes no argument and no key.
    assert_eq!(
        query_err(&mut resp2, &["QUOTA.POLICY", "BOGUS"]),
        "ERR unknown subcommand 'BOGUS'. Try QUOTA.POLICY HELP."
    );
    assert!(query_err(&mut resp2, &["QUOTA.POLICY", "HELP", "x"])
        .starts_with("ERR wrong number of arguments"));
    assert_eq!(
        query_err(&mut resp2, &["COMMAND", "GETKEYS", "QUOTA.POLICY", "HELP"]),
        "ERR The command has no key arguments"
    );
    // Inside MULTI and from a script too.
    let script = "return redis.call('QUOTA.POLICY', 'HELP')";
    let from_lua = help_lines(query(&mut resp2, &["EVAL", script, "0"]).expect("EVAL"));
    assert_eq!(from_lua, lines);
}

#[test]
fn every_cluster_node_decides_with_a_policy_set_on_one_of_them() {
    let schema = unique_schema();
    let url = PgServer::shared();
    let builder = RedisServer::builder().pg(&url, &schema, "2000");
    let cluster = RedisCluster::start(3, builder);
    cluster.wait_ok(Duration::from_secs(30));
    // The tenant is the policy's declared key: its node takes the change (another answers
    // MOVED, which a cluster client follows), and the others hear of it by NOTIFY.
    let owner = cluster.node_for_key(T);
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.port() != owner.port())
        .unwrap();
    let moved = query_err(
        &mut other.client(),
        &["QUOTA.POLICY", "SET", T, P, "pro", "REQUESTS_PER_DAY", "2"],
    );
    assert!(moved.starts_with("MOVED"), "{moved}");
    set_policy(&mut owner.client(), "pro", "REQUESTS_PER_DAY 2");

    // HELP has no key: every node answers it, none with MOVED.
    for node in &cluster.nodes {
        let lines = help_lines(query(&mut node.client(), &["QUOTA.POLICY", "HELP"]).unwrap());
        assert_eq!(
            lines.last().map(String::as_str),
            Some("    Print this help.")
        );
    }

    let mut con = cluster.cluster_client();
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    for user in &users {
        assert_eq!(allowed_of(&mut con, user, "pro", 4), 2, "{user}");
    }
    let nodes_used: std::collections::BTreeSet<u16> = users
        .iter()
        .map(|u| cluster.node_for_key(&format!("{{{u}}}")).port())
        .collect();
    assert_eq!(nodes_used.len(), 3, "the users should span every node");

    // A change reaches every node (write-through on the tenant's, NOTIFY on the others).
    set_policy(&mut owner.client(), "pro", "REQUESTS_PER_DAY 3");
    for user in &users {
        let seen = wait_until(Duration::from_secs(5), || {
            allowed_of(&mut con, user, "pro", 1) == 1
        });
        assert!(seen, "{user} still decided with the old policy");
    }
}

#[test]
fn with_postgres_down_a_cached_policy_decides_and_an_uncached_one_is_an_error() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let url = pg.url();
    let server = RedisServer::builder()
        .pg(&url, &schema, "1000")
        .module_args(&[("cache-ttl-ms", "600000"), ("negative-ttl-ms", "600000")])
        .start();
    server.wait_notify_state("listening", Duration::from_secs(15));
    let mut con = server.client();
    set_policy(&mut con, "pro", "REQUESTS_PER_DAY 2");
    set_policy(&mut con, "later", "REQUESTS_PER_DAY 2");
    // alice's (absent) credits are cached too; bob's are not.
    query(&mut con, &admit_policy("alice", "pro", &["PEEK"])).expect("PEEK");
    // Only "pro" is cached: drop "later" from this node's cache.
    query(&mut con, &["QUOTA.POLICY", "INVALIDATE", T, P, "later"]).expect("INVALIDATE");

    pg.stop();

    // Cached: still decides, with the policy's limit, at once.
    let started = Instant::now();
    assert_eq!(allowed_of(&mut con, "alice", "pro", 4), 2);
    assert!(started.elapsed() < Duration::from_millis(500));
    let m = admit_under(&mut con, "bob", "pro", "");
    assert!(m.allowed);
    assert_eq!(m.credit, "unavailable");

    // Never cached here: an explicit error, never a decision without limits.
    for _ in 0..2 {
        let started = Instant::now();
        let err = query_err(&mut con, &admit_policy("carol", "later", &[]));
        assert_eq!(
            err,
            "ERR policy 'later' is not cached and PostgreSQL is unavailable: retry shortly"
        );
        assert!(started.elapsed() < Duration::from_millis(2500));
    }
    let usage = con.usage([T, P, "carol", "b"]);
    assert_eq!(usage.requests_per_day, 0, "a refused admit counted");

    pg.start();
    let back = wait_until(Duration::from_secs(15), || {
        query(&mut con, &admit_policy("carol", "later", &[])).is_ok()
    });
    assert!(back, "the policy did not load once PostgreSQL was back");
}

/// Admits under a policy from Lua and returns fields 1..=5 of the compact reply by index.
const LUA_COMPACT: &str = "\
    if ARGV[2] == '3' then redis.setresp(3) end \
    local r = redis.call('QUOTA.ADMIT', 'acme', 'chat', KEYS[1], 'b', 'POLICY', ARGV[1], 'COMPACT') \
    return {r[1], r[2], r[3], r[4], r[5], #r}";

fn eval_compact(con: &mut redis::Connection, user: &str, resp: &str) -> Vec<Value> {
    let v = redis::cmd("EVAL")
        .arg(LUA_COMPACT)
        .arg(1)
        .arg(user)
        .arg("pro")
        .arg(resp)
        .query(con)
        .expect("EVAL");
    to_array(v)
}

#[test]
fn the_compact_reply_is_read_by_index_from_lua_in_resp2_and_resp3() {
    let schema = unique_schema();
    let server = test_server(&schema);
    let mut setup = server.client();
    set_policy(
        &mut setup,
        "pro",
        "REQUESTS_PER_DAY 2 TOKENS_PER_DAY 50 MAX_CONCURRENT 9",
    );
    // Cache the policy first: a script cannot wait for a load.
    query(&mut setup, &["QUOTA.POLICY", "GET", T, P, "pro"]).expect("GET");

    for (con_kind, mut con) in [("resp2", server.client()), ("resp3", server.client_resp3())] {
        for script_resp in ["2", "3"] {
            let user = format!("{con_kind}-{script_resp}");
            let first = eval_compact(&mut con, &user, script_resp);
            let ints: Vec<Option<i64>> = first.iter().map(value_i64).collect();
            assert_eq!(
                ints[..4],
                [Some(1), Some(-1), Some(1), Some(50)],
                "{user}: {first:?}"
            );
            let lease = value_to_string(&first[4]).unwrap_or_default();
            assert!(!lease.is_empty(), "{user}: a lease is taken: {first:?}");
            assert_eq!(value_i64(&first[5]), Some(10), "{user}: ten fields");
            eval_compact(&mut con, &user, script_resp);
            let denied = eval_compact(&mut con, &user, script_resp);
            assert_eq!(value_i64(&denied[0]), Some(0), "{user}: {denied:?}");
            assert!(
                value_i64(&denied[1]).unwrap_or(0) > 0,
                "{user}: retry_after"
            );
            assert_eq!(value_i64(&denied[2]), Some(0));
        }
    }

    // Outside Lua: the same ten fields, in both protocols (`retry_after_ms` last).
    for mut con in [server.client(), server.client_resp3()] {
        let v = to_array(query(&mut con, &admit_policy("direct", "pro", &["COMPACT"])).unwrap());
        assert_eq!(v.len(), 10);
        assert_eq!(value_i64(&v[9]), Some(-1));
        assert_eq!(value_to_string(&v[5]).as_deref(), Some(""));
        assert_eq!(value_to_string(&v[7]).as_deref(), Some("none"));
        assert_eq!(value_to_string(&v[8]).as_deref(), Some("windows"));
    }
}

#[test]
fn concurrent_clients_under_a_cold_policy_admit_exactly_the_limit() {
    const LIMIT: usize = 37;
    const CREDIT: usize = 3;
    let schema = unique_schema();
    let server = test_server(&schema);
    let url = PgServer::shared();
    // Written with SQL: nothing is cached when the clients start.
    query(&mut server.client(), &["QUOTA.POLICY", "LIST", T, P]).expect("deploy");
    psql(
        &url,
        &format!(
            "INSERT INTO \"{schema}\".quota_policy (tenant, project, policy_name, \
             requests_per_day, max_concurrent) VALUES ('{T}', '{P}', 'pro', {LIMIT}, 1000); \
             INSERT INTO \"{schema}\".user_quota_replenishment \
             (tenant, project, user_id, bundle_id, additional_requests_per_day) \
             VALUES ('{T}', '{P}', 'shared', '*', {CREDIT})"
        ),
    );
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let mut con = server.client();
            std::thread::spawn(move || {
                (0..5)
                    .filter(|_| {
                        let v = query(&mut con, &admit_policy("shared", "pro", &["COMPACT"]))
                            .expect("ADMIT");
                        value_i64(&to_array(v)[0]) == Some(1)
                    })
                    .count()
            })
        })
        .collect();
    let allowed: usize = threads.into_iter().map(|t| t.join().expect("client")).sum();
    assert_eq!(allowed, LIMIT + CREDIT);
    let usage = server.client().usage([T, P, "shared", "b"]);
    assert_eq!(usage.requests_per_day, (LIMIT + CREDIT) as i64);
}

#[test]
fn an_admit_waiting_on_credits_decides_with_the_policy_it_started_with_though_it_was_dropped() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let url = pg.url();
    let server = RedisServer::builder().pg(&url, &schema, "20000").start();
    server.wait_notify_state("listening", Duration::from_secs(15));
    let mut con = server.client();
    set_policy(&mut con, "pro", "REQUESTS_PER_DAY 1");

    // erin's credits are not cached: her admission waits on their load, which hangs.
    pg.pause();
    let waiting = {
        let mut con = server.client();
        std::thread::spawn(move || {
            let started = Instant::now();
            let r = query(&mut con, &admit_policy("erin", "pro", &[]));
            (r, started.elapsed())
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            info_i64_in(&server, "clients", "blocked_clients") == 1
        }),
        "the admission did not wait on the load"
    );
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile the policy leaves this node's cache (a change heard through NOTIFY does this).
    let dropped =
        query(&mut con, &["QUOTA.POLICY", "INVALIDATE", T, P, "pro"]).expect("INVALIDATE");
    assert_eq!(dropped, Value::Int(1));
    pg.resume();

    let (r, took) = waiting.join().expect("the waiting client");
    let m = to_map(r.unwrap_or_else(|e| panic!("the waiting ADMIT failed: {}", error_text(&e))));
    assert!(
        took >= Duration::from_millis(200),
        "it did not wait ({took:?})"
    );
    assert_eq!(field_i64(&m, "allowed"), 1);
    assert_eq!(field_str(&m, "credit").as_deref(), Some("none"));
    // Decided under the policy's limit of 1: the next one is denied.
    assert_eq!(allowed_of(&mut con, "erin", "pro", 1), 0);
}
