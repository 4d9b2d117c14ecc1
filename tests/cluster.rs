//! Redis Cluster: the module on every node of a 3-master cluster on loopback, all on the
//! shared PostgreSQL with one schema, driven through the `redis` crate's cluster client.
//!
//! * the user id (argument 3) is the declared key of every per-user command, so Redis routes
//!   by user (and answers `MOVED` from a node that does not own the user);
//! * 1,000 users spread over the whole slot space get their exact admitted counts, and every
//!   account key lives on the node owning the user's slot;
//! * a grant made on one node directly is read through the cluster client;
//! * hash-tagged ids share a slot; ids that cannot be routed are refused with a clear error;
//! * `QUOTA.CLEANUP` run on every master at once deactivates each expired row exactly once.
//!
//! Note on the client: the `redis` crate's cluster client does not know module commands and
//! routes them by their first argument (here the tenant); Redis answers `MOVED` to the owner
//! of the user's slot and a plain `query` follows it. Its cluster pipelines (0.27) do not
//! follow `MOVED`, so instead of pipelining, the bulk phases route each command to the user's
//! slot explicitly (`route_command`), as an application using this client would; plain `query`
//! through the redirections is checked too.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use redis::cluster::ClusterConnection;
use redis::cluster_routing::{
    get_slot, AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo,
    SingleNodeRoutingInfo, SlotAddr,
};

const TENANT: &str = "acme";
const PROJECT: &str = "chat";
const BUNDLE: &str = "b";

/// A 3-master cluster with the module on every node, all on the shared PostgreSQL, one schema.
fn start_cluster(schema: &str) -> RedisCluster {
    start_cluster_with(schema, &[])
}

fn start_cluster_with(schema: &str, extra: &[(&str, &str)]) -> RedisCluster {
    let url = PgServer::shared();
    let builder = RedisServer::builder()
        .pg(&url, schema, "2000")
        .module_args(extra);
    RedisCluster::start(3, builder)
}

/// The hash slot of a key (the same CRC16 rule Redis uses).
fn slot(key: &str) -> u16 {
    get_slot(key.as_bytes())
}

/// Routing to the master that owns `user`'s slot.
fn to_user(user: &str) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        slot(user),
        SlotAddr::Master,
    )))
}

/// Runs `args` on the master owning `user`'s slot through the cluster client.
fn routed(con: &mut ClusterConnection, user: &str, args: &[&str]) -> redis::RedisResult<Value> {
    con.route_command(&cmd(args), to_user(user))
}

/// `<command> TENANT PROJECT <user> <rest...>` on the master owning `user`'s slot; panics on
/// an error reply.
fn on_user(con: &mut ClusterConnection, command: &str, user: &str, rest: &[&str]) -> Value {
    let mut args = vec![command, TENANT, PROJECT, user];
    args.extend_from_slice(rest);
    routed(con, user, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// `CLUSTER KEYSLOT <key>` asked of a node.
fn server_keyslot(node: &RedisServer, key: &str) -> i64 {
    let mut c = node.client();
    let v = query(&mut c, &["CLUSTER", "KEYSLOT", key]).expect("CLUSTER KEYSLOT");
    value_i64(&v).expect("CLUSTER KEYSLOT integer")
}

/// Slot -> port of its master, from `CLUSTER SLOTS` of one node.
/// A fresh schema, a cluster on it, its slot -> owner port map and a cluster client.
fn cluster_with_owners() -> (String, RedisCluster, Vec<u16>, ClusterConnection) {
    let schema = unique_schema();
    let cluster = start_cluster(&schema);
    let owners = slot_owners(&cluster.nodes[0]);
    let con = cluster.cluster_client();
    (schema, cluster, owners, con)
}

/// How many of `times` admissions of `user` with `REQUESTS_PER_DAY 1` are allowed.
fn admitted_of(con: &mut impl redis::ConnectionLike, user: &str, times: usize) -> usize {
    (0..times)
        .filter(|_| {
            con.admit([TENANT, PROJECT, user, BUNDLE], "REQUESTS_PER_DAY 1")
                .allowed
        })
        .count()
}

fn slot_owners(node: &RedisServer) -> Vec<u16> {
    let mut c = node.client();
    let ranges = to_array(query(&mut c, &["CLUSTER", "SLOTS"]).expect("CLUSTER SLOTS"));
    let mut owners = vec![0u16; 16384];
    for r in ranges {
        let r = to_array(r);
        let first = value_i64(&r[0]).expect("first slot") as usize;
        let last = value_i64(&r[1]).expect("last slot") as usize;
        let master = to_array(r[2].clone());
        let port = value_i64(&master[1]).expect("master port") as u16;
        for o in &mut owners[first..=last] {
            *o = port;
        }
    }
    assert!(
        owners.iter().all(|&p| p != 0),
        "CLUSTER SLOTS does not cover every slot"
    );
    owners
}

/// Every key matching `q:*` on one node (SCAN, bounded).
fn quota_keys(node: &RedisServer) -> Vec<String> {
    let mut c = node.client();
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    for _ in 0..100_000 {
        let reply = to_array(
            query(&mut c, &["SCAN", &cursor, "MATCH", "q:*", "COUNT", "1000"]).expect("SCAN"),
        );
        cursor = value_to_string(&reply[0]).expect("SCAN cursor");
        for k in to_array(reply[1].clone()) {
            keys.push(value_to_string(&k).expect("key"));
        }
        if cursor == "0" {
            return keys;
        }
    }
    panic!("SCAN did not finish");
}

/// Decodes an account key `q:{tag}:<len>:<t><len>:<p><len>:<u><len>:<b>` into (t, p, u, b).
fn decode_account_key(key: &str) -> (String, String, String, String) {
    let bytes = key.as_bytes();
    let rest = bytes
        .strip_prefix(b"q:{")
        .unwrap_or_else(|| panic!("key {key:?}"));
    let close = rest
        .iter()
        .position(|&b| b == b'}')
        .unwrap_or_else(|| panic!("key {key:?}"));
    let mut rest = rest[close + 1..]
        .strip_prefix(b":")
        .unwrap_or_else(|| panic!("key {key:?}"));
    let mut parts = Vec::new();
    for _ in 0..4 {
        let colon = rest
            .iter()
            .position(|&b| b == b':')
            .unwrap_or_else(|| panic!("key {key:?}"));
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("key {key:?}"));
        parts.push(String::from_utf8(rest[colon + 1..colon + 1 + len].to_vec()).expect("utf8"));
        rest = &rest[colon + 1 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes in key {key:?}");
    let b = parts.pop().unwrap();
    let u = parts.pop().unwrap();
    let p = parts.pop().unwrap();
    let t = parts.pop().unwrap();
    (t, p, u, b)
}

/// 1,000 user ids, user `i` in slot range `[i*16384/1000, (i+1)*16384/1000)`: the whole slot
/// space is covered evenly.
fn spread_users(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let lo = (i * 16384 / count) as u16;
            let hi = ((i + 1) * 16384 / count) as u16;
            (0..200_000)
                .map(|n| format!("u{i}-{n}"))
                .find(|u| (lo..hi).contains(&slot(u)))
                .unwrap_or_else(|| panic!("no id found for slot range {lo}..{hi}"))
        })
        .collect()
}

fn psql_count(schema: &str, condition: &str) -> i64 {
    let sql =
        format!("SELECT count(*) FROM \"{schema}\".user_quota_replenishment WHERE {condition}");
    psql(&PgServer::shared(), &sql)
        .trim()
        .parse()
        .expect("count")
}

/// The module declares the user id (argument 3) as the key of every per-user command and
/// argument 1 as the key of QUOTA.SETSTATE.
#[test]
fn commands_declare_the_user_as_their_key() {
    let (_schema, _server, mut con) = test_server_con();

    for (name, first) in [
        ("quota.admit", 3),
        ("quota.commit", 3),
        ("quota.release", 3),
        ("quota.get", 3),
        ("quota.usage", 3),
        ("quota.grant", 3),
        ("quota.revoke", 3),
        ("quota.reset", 3),
        ("quota.list", 3),
        ("quota.invalidate", 3),
        ("quota.setstate", 1),
        ("quota.apply", 1),
    ] {
        let info = to_array(query(&mut con, &["COMMAND", "INFO", name]).expect("COMMAND INFO"));
        assert_eq!(info.len(), 1, "COMMAND INFO {name}: {info:?}");
        let entry = to_array(info[0].clone());
        assert_eq!(
            value_to_string(&entry[0])
                .map(|s| s.to_lowercase())
                .as_deref(),
            Some(name),
            "COMMAND INFO {name}: {entry:?}"
        );
        let keys: Vec<i64> = entry[3..6]
            .iter()
            .map(|v| value_i64(v).expect("key position"))
            .collect();
        assert_eq!(
            keys,
            vec![first, first, 1],
            "COMMAND INFO {name}: first key, last key, step"
        );
    }

    // COMMAND GETKEYS names the user (or the state key) as the one key.
    let key = "q:{u}:1:t1:p1:u1:b";
    let getkeys: [(&str, &[&str], &str); 4] = [
        ("QUOTA.ADMIT", &["t", "p", "u", "b"], "u"),
        (
            "QUOTA.ADMIT",
            &[
                "t",
                "p",
                "{org1}alice",
                "b",
                "REQUESTS_PER_DAY",
                "2",
                "LEASE",
                "l1",
            ],
            "{org1}alice",
        ),
        ("QUOTA.SETSTATE", &[key, "x"], key),
        (
            "QUOTA.GRANT",
            &["t", "p", "bob", "*", "REQUESTS_PER_DAY", "3"],
            "bob",
        ),
    ];
    for (command, rest, want) in getkeys {
        let mut args = vec!["COMMAND", "GETKEYS", command];
        args.extend_from_slice(rest);
        let reply = query(&mut con, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let keys: Vec<String> = to_array(reply).iter().filter_map(value_to_string).collect();
        assert_eq!(keys, vec![want.to_string()], "{args:?}");
    }
}

/// 1,000 users over the whole slot space: grants, gets and admits through the cluster client
/// give the exact admitted counts, and each account key sits on the node owning its user.
#[test]
fn thousand_users_over_all_slots() {
    let started = Instant::now();
    let schema = unique_schema();
    let cluster = start_cluster(&schema);
    let mut con = cluster.cluster_client();
    let users = spread_users(1000);
    let with_credit = |i: usize| i.is_multiple_of(2);

    // The server agrees with the client's slot computation.
    for u in users.iter().step_by(97) {
        assert_eq!(
            server_keyslot(&cluster.nodes[0], u),
            i64::from(slot(u)),
            "CLUSTER KEYSLOT {u}"
        );
    }
    let owners = slot_owners(&cluster.nodes[0]);
    let mut per_node: HashMap<u16, usize> = HashMap::new();
    for u in &users {
        *per_node.entry(owners[slot(u) as usize]).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "users on every master: {per_node:?}");

    // Grants for the even users, a '*' credit of 3 requests per day, routed to the user's slot.
    for u in users.iter().step_by(2) {
        let m = to_map(on_user(
            &mut con,
            "QUOTA.GRANT",
            u,
            &["*", "REQUESTS_PER_DAY", "3"],
        ));
        assert_eq!(field_i64(&m, "requests_per_day"), 3);
        assert_eq!(field_str(&m, "user_id").as_deref(), Some(u.as_str()));
        assert_eq!(field_i64(&m, "duplicate"), 0);
    }
    assert_eq!(psql_count(&schema, "active"), 500, "rows in PostgreSQL");

    // Gets: every user's own record or nil.
    for (i, u) in users.iter().enumerate() {
        let v = on_user(&mut con, "QUOTA.GET", u, &[BUNDLE]);
        if with_credit(i) {
            let m = to_map(v);
            assert_eq!(field_str(&m, "user_id").as_deref(), Some(u.as_str()));
            assert_eq!(field_str(&m, "bundle_id").as_deref(), Some("*"));
            assert_eq!(field_i64(&m, "requests_per_day"), 3, "GET {u}");
        } else {
            assert_eq!(v, Value::Nil, "GET {u} (no credit)");
        }
    }

    // Six admits per user with a base policy of 2 per day: 5 admitted with the credit, 2 without.
    let mut admitted = vec![0i64; users.len()];
    for round in 0..6 {
        for (i, u) in users.iter().enumerate() {
            let admit = [BUNDLE, "REQUESTS_PER_DAY", "2"];
            let m = Admit::parse(on_user(&mut con, "QUOTA.ADMIT", u, &admit));
            let expected_repl = if with_credit(i) { "global" } else { "none" };
            assert_eq!(
                m.credit, expected_repl,
                "QUOTA.ADMIT round {round} user {u}: {m:?}"
            );
            admitted[i] += i64::from(m.allowed);
        }
    }
    for (i, u) in users.iter().enumerate() {
        let expected = if with_credit(i) { 5 } else { 2 };
        assert_eq!(admitted[i], expected, "admitted requests of user {i} ({u})");
    }

    // USAGE agrees.
    for (i, u) in users.iter().enumerate().step_by(7) {
        let usage = Usage::from_map(to_map(on_user(&mut con, "QUOTA.USAGE", u, &[BUNDLE])));
        let expected = if with_credit(i) { 5 } else { 2 };
        assert_eq!(usage.requests_per_day, expected, "USAGE of {u}");
    }

    // A plain query through the cluster client (routed by redirection) sees the same state.
    for i in [1usize, 2, 499, 998] {
        let u = &users[i];
        let m = con.admit([TENANT, PROJECT, u, BUNDLE], "REQUESTS_PER_DAY 2 PEEK");
        assert!(!m.allowed, "PEEK {u} after its 6 admits");
    }
    assert_keys_on_their_owners(&cluster, &owners, &users);

    eprintln!(
        "thousand_users_over_all_slots: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Every account key lives on the node owning its user's slot (as the nodes count them); one
/// key per user, and every one of `users` has one.
fn assert_keys_on_their_owners(cluster: &RedisCluster, owners: &[u16], users: &[String]) {
    let mut seen: BTreeMap<String, u16> = BTreeMap::new();
    for node in &cluster.nodes {
        let keys = quota_keys(node);
        assert!(!keys.is_empty(), "no account keys on node {}", node.port());
        for key in &keys {
            let (t, p, u, b) = decode_account_key(key);
            assert_eq!(
                (t.as_str(), p.as_str(), b.as_str()),
                (TENANT, PROJECT, BUNDLE)
            );
            assert_eq!(
                slot(key),
                slot(&u),
                "account key {key:?} is not in its user's slot"
            );
            assert_eq!(
                owners[slot(key) as usize],
                node.port(),
                "account key {key:?} of user {u} stored on node {} which does not own slot {}",
                node.port(),
                slot(key)
            );
            assert!(
                seen.insert(u.clone(), node.port()).is_none(),
                "two account keys for user {u}"
            );
        }
        // The server's own view: the sample keys are counted in their slot on this node.
        for key in keys.iter().take(5) {
            let s = server_keyslot(node, key);
            assert_eq!(s, i64::from(slot(key)));
            let mut c = node.client();
            let n = value_i64(
                &query(&mut c, &["CLUSTER", "COUNTKEYSINSLOT", &s.to_string()])
                    .expect("COUNTKEYSINSLOT"),
            )
            .unwrap();
            assert!(
                n >= 1,
                "CLUSTER COUNTKEYSINSLOT {s} on {} = {n}",
                node.port()
            );
        }
    }
    let expected: BTreeSet<String> = users.iter().cloned().collect();
    let found: BTreeSet<String> = seen.keys().cloned().collect();
    assert_eq!(found, expected, "users with an account key");
}

/// A grant made on the owning node directly is read through the cluster client; a node that
/// does not own the user answers MOVED and writes nothing.
#[test]
fn grant_on_one_node_is_read_through_the_cluster_client() {
    let (schema, cluster, owners, mut con) = cluster_with_owners();

    let user = "direct-carol";
    let owner = cluster
        .nodes
        .iter()
        .find(|n| n.port() == owners[slot(user) as usize])
        .expect("owner node");
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.port() != owner.port())
        .expect("another node");

    // The cluster client caches the user as having no credit first.
    let v = query(&mut con, &["QUOTA.GET", TENANT, PROJECT, user, BUNDLE]).expect("GET");
    assert_eq!(v, Value::Nil);

    let grant = |n| {
        [
            "QUOTA.GRANT",
            TENANT,
            PROJECT,
            user,
            "*",
            "REQUESTS_PER_DAY",
            n,
        ]
    };
    // A node that does not own the user's slot refuses with MOVED to the owner.
    let mut c = other.client();
    let err = query_err(&mut c, &grant("9"));
    assert!(
        err.starts_with("MOVED") && err.contains(&format!(":{}", owner.port())),
        "GRANT on a non-owner node: {err}"
    );
    assert_eq!(psql_count(&schema, &format!("user_id = '{user}'")), 0);

    // The owner takes it.
    let mut c = owner.client();
    let m = query_map(&mut c, &grant("4"));
    assert_eq!(field_i64(&m, "requests_per_day"), 4);

    // Read through the cluster client (plain query, follows the redirection).
    let m = to_map(query(&mut con, &["QUOTA.GET", TENANT, PROJECT, user, BUNDLE]).expect("GET"));
    assert_eq!(field_i64(&m, "requests_per_day"), 4);
    assert_eq!(field_str(&m, "bundle_id").as_deref(), Some("*"));
    // And routed explicitly.
    let m = to_map(
        routed(
            &mut con,
            user,
            &["QUOTA.GET", TENANT, PROJECT, user, BUNDLE],
        )
        .unwrap(),
    );
    assert_eq!(field_i64(&m, "requests_per_day"), 4);

    // Admissions through the cluster client use it: base 1 + credit 4 = 5.
    assert_eq!(admitted_of(&mut con, user, 7), 5);

    // A revoke on the owner is seen through the cluster client as well.
    let v = query(&mut c, &["QUOTA.REVOKE", TENANT, PROJECT, user, "*"]).expect("REVOKE");
    assert_eq!(value_i64(&v), Some(1));
    let v = query(&mut con, &["QUOTA.GET", TENANT, PROJECT, user, BUNDLE]).expect("GET");
    assert_eq!(v, Value::Nil, "GET after REVOKE on the owner node");
}

/// Hash-tagged ids share a slot and work through the cluster client; other ids containing
/// braces route by Redis's rule; ids whose slot would differ from their keys' are refused.
#[test]
fn hash_tags_route_and_unroutable_ids_are_refused() {
    let (schema, cluster, owners, mut con) = cluster_with_owners();

    let alice = "{org1}alice";
    let bob = "{org1}bob";
    let node = &cluster.nodes[1];
    assert_eq!(server_keyslot(node, alice), server_keyslot(node, bob));
    assert_eq!(server_keyslot(node, alice), server_keyslot(node, "org1"));

    // Routable ids: hash tags, and ids with unbalanced or late braces.
    let routable = [alice, bob, "a{b", "x}y{z}", "{org1}{x}"];
    for (k, u) in routable.iter().enumerate() {
        let credit = (k + 1).to_string();
        let m = con.grant([TENANT, PROJECT, u, "*"], ["REQUESTS_PER_DAY", &credit]);
        assert_eq!(field_str(&m, "user_id").as_deref(), Some(*u));
        assert_eq!(
            admitted_of(&mut con, u, k + 3),
            k + 2,
            "admitted for {u}: base 1 + credit {credit}"
        );
        let usage = con.usage([TENANT, PROJECT, u, BUNDLE]);
        assert_eq!(usage.requests_per_day as usize, k + 2, "USAGE {u}");
    }

    // Their account keys are in the user's slot, on the node that owns it.
    let mut found = BTreeSet::new();
    for (n, key, u) in account_keys(&cluster) {
        assert_eq!(
            server_keyslot(n, &key),
            server_keyslot(n, &u),
            "account key {key:?} not in the slot of {u:?}"
        );
        assert_eq!(
            owners[slot(&key) as usize],
            n.port(),
            "{key:?} on the wrong node"
        );
        found.insert(u);
    }
    let expected: BTreeSet<String> = routable.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
    // The two {org1} users are on the same node.
    let on_owner = quota_keys(owner_of(&cluster, &owners, "org1"));
    for u in [alice, bob] {
        assert!(
            on_owner.iter().any(|k| decode_account_key(k).2 == u),
            "no account of {u} on the owner of slot org1: {on_owner:?}"
        );
    }

    // Ids whose '}' is outside a hash tag: the user's slot and the key's would differ. Refused
    // through the cluster client and on the node owning the user's slot alike.
    for u in ["a}b", "}ab", "a{}b}", "ab}"] {
        let mut direct = owner_of(&cluster, &owners, u).client();
        for args in [
            format!("QUOTA.GRANT {TENANT} {PROJECT} {u} * REQUESTS_PER_DAY 3"),
            format!("QUOTA.GET {TENANT} {PROJECT} {u} {BUNDLE}"),
            format!("QUOTA.ADMIT {TENANT} {PROJECT} {u} {BUNDLE} REQUESTS_PER_DAY 3"),
            format!("QUOTA.USAGE {TENANT} {PROJECT} {u} {BUNDLE}"),
        ] {
            let args: Vec<&str> = args.split(' ').collect();
            for reply in [query(&mut con, &args), query(&mut direct, &args)] {
                let err = must_fail(&format!("{args:?}"), reply);
                assert!(
                    err.starts_with("ERR user must not contain a '}' outside a hash tag"),
                    "{args:?}: {err}"
                );
            }
        }
        assert_eq!(
            psql_count(&schema, &format!("user_id = '{u}'")),
            0,
            "row written for unroutable {u}"
        );
    }
    for (_, key, u) in account_keys(&cluster) {
        assert!(expected.contains(&u), "unexpected account key {key:?}");
    }
}

/// The node that owns the slot of `key`, by `owners` (the slot map).
fn owner_of<'a>(cluster: &'a RedisCluster, owners: &[u16], key: &str) -> &'a RedisServer {
    let port = owners[slot(key) as usize];
    (cluster.nodes.iter())
        .find(|n| n.port() == port)
        .unwrap_or_else(|| panic!("no node on port {port}"))
}

/// Every account key of the cluster, with the node holding it and its user.
fn account_keys(cluster: &RedisCluster) -> Vec<(&RedisServer, String, String)> {
    let mut out = Vec::new();
    for n in &cluster.nodes {
        for key in quota_keys(n) {
            let user = decode_account_key(&key).2;
            out.push((n, key, user));
        }
    }
    out
}

/// QUOTA.CLEANUP on every master at once deactivates each expired row exactly once in total;
/// through the cluster client on all masters it does the same.
#[test]
fn cleanup_on_every_master_deactivates_each_row_once() {
    let schema = unique_schema();
    let cluster = start_cluster(&schema);
    let mut con = cluster.cluster_client();
    let pg = PgServer::shared();

    let grant_batch = |con: &mut ClusterConnection, prefix: &str, n: usize, expiring: bool| {
        for i in 0..n {
            let u = format!("{prefix}-{i}");
            let account = [TENANT, PROJECT, &u, "*"];
            let mut args = with_account("QUOTA.GRANT", account, &["REQUESTS_PER_DAY", "3"]);
            if expiring {
                args.extend(["EXPIRES_IN", "1"]);
            }
            routed(con, &u, &args).unwrap_or_else(|e| panic!("GRANT {u}: {e}"));
        }
    };
    let wait_expired = |n: i64| {
        let ok = wait_until(Duration::from_secs(10), || {
            psql_count(&schema, "active AND expires_at <= now()") == n
        });
        assert!(ok, "{n} rows did not expire");
    };

    grant_batch(&mut con, "exp", 60, true);
    grant_batch(&mut con, "keep", 5, false);
    assert_eq!(psql_count(&schema, "active"), 65);
    wait_expired(60);

    // All three masters at once.
    let barrier = Arc::new(Barrier::new(cluster.nodes.len()));
    let results: Vec<i64> = std::thread::scope(|s| {
        let handles: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| {
                let barrier = barrier.clone();
                let mut c = n.client();
                s.spawn(move || {
                    barrier.wait();
                    let v = query(&mut c, &["QUOTA.CLEANUP"]).expect("QUOTA.CLEANUP");
                    value_i64(&v).expect("CLEANUP integer")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().sum::<i64>(),
        60,
        "sum of QUOTA.CLEANUP replies over the masters: {results:?}"
    );
    assert_eq!(psql_count(&schema, "active AND expires_at <= now()"), 0);
    assert_eq!(psql_count(&schema, "active"), 5, "non-expiring rows stay");
    let events: i64 = psql(
        &pg,
        &format!(
            "SELECT count(*) FROM \"{schema}\".user_quota_replenishment_event WHERE event_type = 'expire'"
        ),
    )
    .parse()
    .unwrap();
    assert_eq!(events, 60, "one expire event per row");

    // Nothing left: every master replies 0.
    for n in &cluster.nodes {
        let mut c = n.client();
        let v = query(&mut c, &["QUOTA.CLEANUP"]).unwrap();
        assert_eq!(value_i64(&v), Some(0), "second cleanup on {}", n.port());
    }

    // Through the cluster client on all masters, summed.
    grant_batch(&mut con, "exp2", 20, true);
    wait_expired(20);
    let v = con
        .route_command(
            &cmd(&["QUOTA.CLEANUP"]),
            RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::Aggregate(AggregateOp::Sum)),
            )),
        )
        .expect("QUOTA.CLEANUP on all masters");
    assert_eq!(value_i64(&v), Some(20));
    assert_eq!(psql_count(&schema, "active"), 5);
    // An expired credit no longer applies.
    let v = routed(
        &mut con,
        "exp2-0",
        &["QUOTA.GET", TENANT, PROJECT, "exp2-0", BUNDLE],
    )
    .unwrap();
    assert_eq!(v, Value::Nil);
}

/// The periodic cleanup, running every second on every master, deactivates each expired row
/// once: one `expire` event per row.
#[test]
fn periodic_cleanup_on_every_master_does_no_double_work() {
    let schema = unique_schema();
    let cluster = start_cluster_with(&schema, &[("cleanup-interval", "1")]);
    let mut con = cluster.cluster_client();
    for i in 0..40 {
        let u = format!("p-{i}");
        routed(
            &mut con,
            &u,
            &with_account(
                "QUOTA.GRANT",
                [TENANT, PROJECT, &u, "*"],
                &["REQUESTS_PER_DAY", "3", "EXPIRES_IN", "1"],
            ),
        )
        .unwrap_or_else(|e| panic!("GRANT {u}: {e}"));
    }
    routed(
        &mut con,
        "keeper",
        &[
            "QUOTA.GRANT",
            TENANT,
            PROJECT,
            "keeper",
            "*",
            "REQUESTS_PER_DAY",
            "3",
        ],
    )
    .expect("GRANT keeper");
    let ok = wait_until(Duration::from_secs(20), || {
        psql_count(&schema, "NOT active") == 40
    });
    assert!(
        ok,
        "the periodic cleanup did not deactivate the 40 expired rows"
    );
    // Let a few more runs happen on every master, then count the events.
    let runs: i64 = cluster
        .nodes
        .iter()
        .map(|n| n.info("quota")["quota_cleanups"].parse::<i64>().unwrap())
        .sum();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now: i64 = cluster
                .nodes
                .iter()
                .map(|n| n.info("quota")["quota_cleanups"].parse::<i64>().unwrap())
                .sum();
            now >= runs + 3
        }),
        "the periodic cleanup does not keep running"
    );
    let events: i64 = psql(
        &PgServer::shared(),
        &format!(
            "SELECT count(*) FROM \"{schema}\".user_quota_replenishment_event WHERE event_type = 'expire'"
        ),
    )
    .parse()
    .unwrap();
    assert_eq!(events, 40, "one expire event per expired row");
    assert_eq!(
        psql_count(&schema, "active"),
        1,
        "the row without expiry stays"
    );
}
