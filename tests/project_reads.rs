//! `QUOTA.FIND` and `QUOTA.TOP`, the reads over a whole project, against a real
//! `redis-server` with the module on the shared PostgreSQL, one schema per test:
//!
//! * FIND pages every live credit of a project exactly once while credits are granted,
//!   revoked and expire between the pages, in byte order of (user, bundle), or soonest expiry
//!   first with `EXPIRES_WITHIN` (to the microsecond, ties by user and bundle);
//! * its cursor belongs to one listing: another project's, a damaged one, or one of the other
//!   kind of listing is refused with the documented error;
//! * TOP ranks users by the ledger over `[FROM, TO)`, most first, ties by user id, every bundle
//!   added up, other projects and hours left out, and sees what the module flushed;
//! * both declare the tenant as a read-only key: key permissions bind them to it, and a
//!   cluster client sends them to the tenant's node without a single `MOVED`.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use redis::cluster_routing::{get_slot, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

const T: &str = "acme";
const P: &str = "chat";

/// One page of `QUOTA.FIND`: the next cursor and the records.
struct Page {
    cursor: String,
    rows: Vec<HashMap<String, Value>>,
}

fn find(con: &mut impl redis::ConnectionLike, tenant: &str, opts: &[&str]) -> Page {
    let mut args = vec!["QUOTA.FIND", tenant, P];
    args.extend_from_slice(opts);
    let reply = query(con, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut parts = to_array(reply).into_iter();
    let cursor = parts
        .next()
        .and_then(|c| value_to_string(&c))
        .expect("a cursor");
    let rows = parts.next().map(to_array).expect("the records");
    Page {
        cursor,
        rows: rows.into_iter().map(to_map).collect(),
    }
}

/// (user, bundle) of a record.
fn id_of(row: &HashMap<String, Value>) -> (String, String) {
    (
        field_str(row, "user_id").expect("user_id"),
        field_str(row, "bundle_id").expect("bundle_id"),
    )
}

/// Pages through `QUOTA.FIND` with `opts`, calling `between(page number)` before each page
/// after the first; every record in the order received.
fn find_all(
    con: &mut redis::Connection,
    opts: &[&str],
    mut between: impl FnMut(&mut redis::Connection, usize),
) -> Vec<HashMap<String, Value>> {
    let mut cursor = "0".to_string();
    let mut out = Vec::new();
    for page in 0..10_000 {
        if page > 0 {
            between(con, page);
        }
        let mut args = opts.to_vec();
        args.extend(["CURSOR", cursor.as_str()]);
        let got = find(con, T, &args);
        let count: usize = opts
            .iter()
            .position(|o| *o == "COUNT")
            .map_or(100, |i| opts[i + 1].parse().unwrap());
        assert!(got.rows.len() <= count, "a page of {} rows", got.rows.len());
        if got.cursor != "0" {
            assert_eq!(got.rows.len(), count, "a page before the last is full");
        }
        out.extend(got.rows);
        if got.cursor == "0" {
            return out;
        }
        cursor = got.cursor;
    }
    panic!("QUOTA.FIND never replied cursor 0");
}

/// SQL on this test's schema: `{t}` = the credits table, `{h}` = the hourly ledger.
fn sql(schema: &str, q: &str) -> String {
    let q = q
        .replace("{t}", &format!("{schema}.user_quota_replenishment"))
        .replace("{h}", &format!("{schema}.quota_usage_hourly"));
    psql(&PgServer::shared(), &q)
}

/// A server on its own schema, deployed (FIND deploys before it reads), and a connection.
fn deployed() -> (String, RedisServer, redis::Connection) {
    let (schema, server, mut con) = test_server_con();
    find(&mut con, T, &[]);
    (schema, server, con)
}

fn grant(con: &mut redis::Connection, user: &str, bundle: &str, opts: &str) {
    con.grant([T, P, user, bundle], opts);
}

/// Every row that stays live while a client pages is read exactly once, in byte order of
/// (user, bundle), while rows are granted (before and after the cursor), revoked and expire
/// between the pages; a row is never read after it was revoked or expired.
#[test]
fn find_pages_every_live_credit_once_while_credits_change() {
    let (schema, _server, mut con) = deployed();
    let mut stable: BTreeSet<(String, String)> = BTreeSet::new();
    for i in 0..40 {
        for bundle in ["*", "web"] {
            let user = format!("u{i:02}");
            let expiry = if i % 3 == 0 { "EXPIRES_IN 3600" } else { "" };
            grant(
                &mut con,
                &user,
                bundle,
                &format!("REQUESTS_PER_DAY 5 {expiry}"),
            );
            stable.insert((user, bundle.to_string()));
        }
    }
    // Ids whose byte order is not their alphabetical order, and not the database's collation.
    for user in ["Zed", "a b", "ä", "u1", "u_", "U05"] {
        grant(&mut con, user, "*", "TOKENS_PER_DAY 9");
        stable.insert((user.to_string(), "*".to_string()));
    }
    for i in 0..10 {
        grant(&mut con, &format!("r{i}"), "*", "REQUESTS_PER_DAY 1");
        grant(
            &mut con,
            &format!("e{i}"),
            "*",
            "REQUESTS_PER_DAY 1 EXPIRES_IN 3600",
        );
    }
    // A row other projects and tenants hold is never listed.
    con.grant(["globex", P, "u00", "*"], "REQUESTS_PER_DAY 1");
    con.grant([T, "mail", "u00", "*"], "REQUESTS_PER_DAY 1");
    // A row revoked and one expired (not cleaned up yet) before the listing starts.
    grant(&mut con, "gone", "*", "REQUESTS_PER_DAY 1");
    con.revoke([T, P, "gone", "*"]);
    grant(&mut con, "old", "*", "REQUESTS_PER_DAY 1 EXPIRES_IN 3600");
    sql(
        &schema,
        "UPDATE {t} SET expires_at = now() - interval '1 second' WHERE user_id = 'old'",
    );

    let mut dead: BTreeSet<(String, String)> = BTreeSet::new();
    dead.insert(("gone".into(), "*".into()));
    dead.insert(("old".into(), "*".into()));
    let mut dead_before_page: Vec<BTreeSet<(String, String)>> = vec![dead.clone()];
    let mut added = 0;
    let rows = find_all(&mut con, &["COUNT", "7"], |con, page| {
        let i = page - 1;
        if i < 10 {
            con.revoke([T, P, &format!("r{i}"), "*"]);
            dead.insert((format!("r{i}"), "*".into()));
            sql(
                &schema,
                &format!(
                    "UPDATE {{t}} SET expires_at = now() - interval '1 second' \
                     WHERE user_id = 'e{i}'"
                ),
            );
            dead.insert((format!("e{i}"), "*".into()));
        }
        // New credits behind and ahead of wherever the cursor is.
        for user in [format!("a-new{i}"), format!("z-new{i}")] {
            con.grant([T, P, &user, "*"], "REQUESTS_PER_DAY 1");
            added += 1;
        }
        dead_before_page.push(dead.clone());
    });
    assert!(added >= 20, "the listing took {} pages", added / 2);

    let ids: Vec<(String, String)> = rows.iter().map(id_of).collect();
    let mut seen = BTreeSet::new();
    for id in &ids {
        assert!(seen.insert(id.clone()), "{id:?} was read twice");
    }
    for id in &stable {
        assert!(
            seen.contains(id),
            "{id:?} was live throughout and never read"
        );
    }
    // Byte order of (user, bundle), across every page.
    for pair in ids.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            (a.0.as_bytes(), a.1.as_bytes()) < (b.0.as_bytes(), b.1.as_bytes()),
            "{a:?} before {b:?}"
        );
    }
    // No row after it was revoked or expired; every row live, of this project, complete.
    for (i, (id, row)) in ids.iter().zip(&rows).enumerate() {
        let page = i / 7;
        assert!(
            !dead_before_page[page].contains(id),
            "{id:?} was read after it stopped being live"
        );
        assert_eq!(field_i64(row, "active"), 1, "{id:?}");
        assert_eq!(field_str(row, "tenant").as_deref(), Some(T));
        assert_eq!(field_str(row, "project").as_deref(), Some(P));
        assert!(row.contains_key("requests_per_day"), "{row:?}");
        assert!(row.contains_key("tokens_balance_debited"), "{row:?}");
    }
    // The same record QUOTA.GET replies (its balance-left fields aside).
    let from_get = con.get([T, P, "u07", "web"]).expect("a record");
    let from_find = rows
        .iter()
        .find(|r| id_of(r) == ("u07".to_string(), "web".to_string()))
        .expect("u07/web listed");
    for (field, value) in from_find {
        assert_eq!(from_get.get(field), Some(value), "{field}");
    }
    assert_eq!(from_get.len(), from_find.len() + 2);
}

/// `EXPIRES_WITHIN s`: only credits that expire within s seconds, soonest first, ties by user
/// and bundle, to the microsecond (expiries that share a second page apart correctly),
/// without the credits that never expire; and exactly once while credits change.
#[test]
fn find_expires_within_pages_soonest_first() {
    let (schema, _server, mut con) = deployed();
    let now = sql(&schema, "SELECT floor(extract(epoch FROM now()))::bigint")
        .parse::<i64>()
        .unwrap();
    let mut stable: Vec<(i64, String, String)> = Vec::new();
    for i in 0..12 {
        let user = format!("x{:02}", 11 - i);
        grant(&mut con, &user, "*", "REQUESTS_PER_DAY 1 EXPIRES_IN 3600");
        grant(&mut con, &user, "web", "REQUESTS_PER_DAY 1 EXPIRES_IN 3600");
        // Groups of rows in the same second: some with the same instant, some microseconds
        // apart; the microseconds decide before the user does.
        let micros = [0, 250_000, 250_000, 999_999][i % 4];
        let at_us = (now + 600 + 100 * (i as i64 / 4)) * 1_000_000 + micros;
        sql(
            &schema,
            &format!(
                "UPDATE {{t}} SET expires_at = to_timestamp(0) + {at_us} * interval '1 microsecond' \
                 WHERE user_id = '{user}'"
            ),
        );
        stable.push((at_us, user.clone(), "*".into()));
        stable.push((at_us, user, "web".into()));
    }
    stable.sort();
    grant(&mut con, "never", "*", "REQUESTS_PER_DAY 1");
    grant(
        &mut con,
        "later",
        "*",
        "REQUESTS_PER_DAY 1 EXPIRES_IN 90000",
    );

    let expected: Vec<(String, String)> = stable
        .iter()
        .map(|(_, u, b)| (u.clone(), b.clone()))
        .collect();
    for count in ["1", "5", "100"] {
        let rows = find_all(
            &mut con,
            &["EXPIRES_WITHIN", "3600", "COUNT", count],
            |_, _| {},
        );
        let ids: Vec<(String, String)> = rows.iter().map(id_of).collect();
        assert_eq!(ids, expected, "COUNT {count}");
        let seconds: Vec<i64> = rows.iter().map(|r| field_i64(r, "expires_at")).collect();
        assert!(seconds.windows(2).all(|w| w[0] <= w[1]), "{seconds:?}");
    }

    // Changes between pages: new credits sooner than the cursor (not read: behind it) and
    // later (read), revokes and expiries of rows not read yet (not read).
    let mut late = BTreeSet::new();
    let mut gone = BTreeSet::new();
    let rows = find_all(
        &mut con,
        &["EXPIRES_WITHIN", "3600", "COUNT", "3"],
        |con, page| {
            if page > 4 {
                return;
            }
            con.grant(
                [T, P, &format!("soon{page}"), "*"],
                "REQUESTS_PER_DAY 1 EXPIRES_IN 60",
            );
            con.grant(
                [T, P, &format!("late{page}"), "*"],
                "REQUESTS_PER_DAY 1 EXPIRES_IN 3000",
            );
            late.insert((format!("late{page}"), "*".to_string()));
            // The last stable rows: not read yet when they go.
            let (_, user, bundle) = &stable[stable.len() - page];
            con.revoke([T, P, user, bundle]);
            gone.insert((user.clone(), bundle.clone()));
        },
    );
    let ids: Vec<(String, String)> = rows.iter().map(id_of).collect();
    let read: BTreeSet<(String, String)> = ids.iter().cloned().collect();
    assert_eq!(read.len(), ids.len(), "a row was read twice: {ids:?}");
    for id in &expected {
        assert_eq!(read.contains(id), !gone.contains(id), "{id:?}");
    }
    assert!(late.is_subset(&read), "{late:?} not read");
    assert!(ids.iter().all(|(u, _)| !u.starts_with("soon")), "{ids:?}");

    // A cursor belongs to its kind of listing.
    let by_expiry = find(&mut con, T, &["EXPIRES_WITHIN", "3600", "COUNT", "1"]).cursor;
    let by_user = find(&mut con, T, &["COUNT", "1"]).cursor;
    assert_eq!(
        query_err(&mut con, &["QUOTA.FIND", T, P, "CURSOR", &by_expiry]),
        "ERR CURSOR must be given with EXPIRES_WITHIN, as in the call that replied it"
    );
    assert_eq!(
        query_err(
            &mut con,
            &[
                "QUOTA.FIND",
                T,
                P,
                "EXPIRES_WITHIN",
                "60",
                "CURSOR",
                &by_user
            ]
        ),
        "ERR CURSOR must be given without EXPIRES_WITHIN, as in the call that replied it"
    );
    // A shorter horizon leaves the later ones out.
    let near = find(&mut con, T, &["EXPIRES_WITHIN", "700"]);
    assert_eq!(near.cursor, "0");
    assert!(near
        .rows
        .iter()
        .all(|r| field_i64(r, "expires_at") <= now + 701));
    assert!(!near.rows.is_empty());
}

/// Hourly ledger rows for `TOP`: (tenant, project, user, bundle, hour index, requests, tokens).
fn ledger_rows(schema: &str, rows: &[(&str, &str, &str, &str, i64, i64, i64)]) {
    let values: Vec<String> = rows
        .iter()
        .map(|(t, p, u, b, h, r, k)| {
            format!("('{t}', '{p}', '{u}', '{b}', to_timestamp({h} * 3600), {r}, {k})")
        })
        .collect();
    sql(
        schema,
        &format!(
            "INSERT INTO {{h}} (tenant, project, user_id, bundle_id, hour, requests, tokens) \
             VALUES {}",
            values.join(", ")
        ),
    );
}

fn top(
    con: &mut impl redis::ConnectionLike,
    tenant: &str,
    opts: &[&str],
) -> Vec<(String, i64, i64)> {
    let mut args = vec!["QUOTA.TOP", tenant, P];
    args.extend_from_slice(opts);
    let reply = query(con, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    to_array(reply)
        .into_iter()
        .map(|m| {
            let m = to_map(m);
            assert_eq!(m.len(), 3, "{m:?}");
            (
                field_str(&m, "user_id").unwrap(),
                field_i64(&m, "requests"),
                field_i64(&m, "tokens"),
            )
        })
        .collect()
}

/// TOP ranks by the hours `FROM <= hour < TO` of the project, most first, ties by user id in
/// byte order, every bundle of a user added up; COUNT bounds it (10 by default).
#[test]
fn top_ranks_users_over_the_hours_asked() {
    let (schema, _server, mut con) = deployed();
    let h = 490_000_i64;
    let mut rows = vec![
        (T, P, "alice", "web", h, 5, 100),
        (T, P, "alice", "*", h + 1, 5, 100),
        (T, P, "bob", "web", h + 2, 10, 50),
        (T, P, "Bob", "web", h, 10, 50),
        (T, P, "carol", "web", h + 1, 3, 900),
        // Out of the hours asked, and other projects and tenants: never counted.
        (T, P, "dave", "web", h - 1, 1000, 1000),
        (T, P, "dave", "web", h + 3, 1000, 1000),
        (T, "mail", "erin", "web", h, 1000, 1000),
        ("globex", P, "frank", "web", h, 1000, 1000),
    ];
    for i in 0..12 {
        rows.push((T, P, "many", "web", h - 50 - i, 1, 1));
    }
    let filler: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    for (i, user) in filler.iter().enumerate() {
        rows.push((T, P, user, "web", h + 100, i as i64, 1));
    }
    ledger_rows(&schema, &rows);
    let (from, to) = ((h * 3600).to_string(), ((h + 3) * 3600).to_string());

    let by_requests = top(&mut con, T, &["REQUESTS", "FROM", &from, "TO", &to]);
    let want = vec![
        ("Bob".to_string(), 10, 50),
        ("alice".to_string(), 10, 200),
        ("bob".to_string(), 10, 50),
        ("carol".to_string(), 3, 900),
    ];
    assert_eq!(by_requests, want);
    let by_tokens = top(
        &mut con,
        T,
        &["tokens", "to", &to, "from", &from, "count", "2"],
    );
    assert_eq!(
        by_tokens,
        vec![
            ("carol".to_string(), 3, 900),
            ("alice".to_string(), 10, 200)
        ]
    );
    // One hour: FROM is in, TO is out.
    let one = top(
        &mut con,
        T,
        &[
            "REQUESTS",
            "FROM",
            &from,
            "TO",
            &((h + 1) * 3600).to_string(),
        ],
    );
    assert_eq!(
        one,
        vec![("Bob".to_string(), 10, 50), ("alice".to_string(), 5, 100)]
    );
    // COUNT defaults to 10; ties by user id in byte order ("user10" before "user2").
    let hour = ((h + 100) * 3600).to_string();
    let next = ((h + 101) * 3600).to_string();
    let ten = top(&mut con, T, &["REQUESTS", "FROM", &hour, "TO", &next]);
    let names: Vec<&str> = ten.iter().map(|(u, _, _)| u.as_str()).collect();
    assert_eq!(
        names,
        [
            "user11", "user10", "user9", "user8", "user7", "user6", "user5", "user4", "user3",
            "user2"
        ]
    );
    let ties = top(
        &mut con,
        T,
        &["TOKENS", "FROM", &hour, "TO", &next, "COUNT", "3"],
    );
    let names: Vec<&str> = ties.iter().map(|(u, _, _)| u.as_str()).collect();
    assert_eq!(names, ["user0", "user1", "user10"]);
    // Nothing in the hours asked: an empty array.
    assert!(top(&mut con, T, &["REQUESTS", "FROM", "0", "TO", "3600"]).is_empty());
    // RESP3: maps.
    let mut con3 = _server.client_resp3();
    assert_eq!(
        top(&mut con3, T, &["REQUESTS", "FROM", &from, "TO", &to]),
        want
    );
}

/// What the module flushes is what TOP ranks: up to one `quota.flush-interval` behind.
#[test]
fn top_sees_what_the_ledger_flushed() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    for _ in 0..3 {
        assert!(con.admit([T, P, "heavy", "web"], "").allowed);
    }
    assert!(con.admit([T, P, "heavy", "mobile"], "").allowed);
    assert!(con.admit([T, P, "light", "web"], "").allowed);
    con.commit([T, P, "light", "web"], 700, None);
    env.flushed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (from, to) = ((now - 7200).to_string(), (now + 3600).to_string());
    assert_eq!(
        top(&mut con, T, &["REQUESTS", "FROM", &from, "TO", &to]),
        vec![("heavy".to_string(), 4, 0), ("light".to_string(), 1, 700)]
    );
    assert_eq!(
        top(
            &mut con,
            T,
            &["TOKENS", "FROM", &from, "TO", &to, "COUNT", "1"]
        ),
        vec![("light".to_string(), 1, 700)]
    );
    drop(env);
}

/// Bad arguments: one line naming the argument, whatever else the command says.
#[test]
fn bad_arguments_are_refused_with_the_documented_errors() {
    let (_schema, server, mut con) = deployed();
    grant(&mut con, "alice", "*", "REQUESTS_PER_DAY 1");
    grant(&mut con, "bob", "*", "REQUESTS_PER_DAY 1");
    let cursor = find(&mut con, T, &["COUNT", "1"]).cursor;
    assert_ne!(cursor, "0");
    let mut damaged = cursor.clone();
    damaged.replace_range(..2, if cursor.starts_with("00") { "01" } else { "00" });
    let foreign = "ERR CURSOR must be 0 or a cursor QUOTA.FIND replied for this tenant and project";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["QUOTA.FIND", T],
            "ERR wrong number of arguments for 'quota.find' command",
        ),
        (
            vec!["QUOTA.FIND", "", P],
            "ERR tenant must be 1 to 255 bytes",
        ),
        (
            vec!["QUOTA.FIND", T, P, "COUNT", "0"],
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            vec!["QUOTA.FIND", T, P, "COUNT", "1001"],
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            vec!["QUOTA.FIND", T, P, "COUNT", "x"],
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            vec!["QUOTA.FIND", T, P, "EXPIRES_WITHIN", "0"],
            "ERR EXPIRES_WITHIN must be between 1 and 253402300799",
        ),
        (
            vec!["QUOTA.FIND", T, P, "CURSOR"],
            "ERR CURSOR must be followed by a value",
        ),
        (vec!["QUOTA.FIND", T, P, "CURSOR", "abc"], foreign),
        (vec!["QUOTA.FIND", T, P, "CURSOR", ""], foreign),
        (vec!["QUOTA.FIND", T, P, "CURSOR", &damaged], foreign),
        (vec!["QUOTA.FIND", T, "mail", "CURSOR", &cursor], foreign),
        (vec!["QUOTA.FIND", "globex", P, "CURSOR", &cursor], foreign),
        (
            vec!["QUOTA.FIND", T, P, "CURSOR", "0", "CURSOR", "0"],
            "ERR CURSOR must be given at most once",
        ),
        (vec!["QUOTA.FIND", T, P, "ALL"], "ERR unknown option 'ALL'"),
        (
            vec!["QUOTA.TOP", T, P, "REQUESTS", "FROM", "0"],
            "ERR wrong number of arguments for 'quota.top' command",
        ),
        (
            vec!["QUOTA.TOP", T, P, "BYTES", "FROM", "0", "TO", "1"],
            "ERR ranking must be REQUESTS or TOKENS",
        ),
        (
            vec!["QUOTA.TOP", T, P, "TOKENS", "FROM", "0", "COUNT", "1"],
            "ERR TO must be given",
        ),
        (
            vec!["QUOTA.TOP", T, P, "TOKENS", "TO", "1", "COUNT", "1"],
            "ERR FROM must be given",
        ),
        (
            vec!["QUOTA.TOP", T, P, "TOKENS", "FROM", "7200", "TO", "3600"],
            "ERR TO must be later than FROM",
        ),
        (
            vec!["QUOTA.TOP", T, P, "TOKENS", "FROM", "-1", "TO", "3600"],
            "ERR FROM must be between 0 and 253402300799",
        ),
        (
            vec![
                "QUOTA.TOP",
                T,
                P,
                "TOKENS",
                "FROM",
                "0",
                "TO",
                "1",
                "COUNT",
                "1001",
            ],
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            vec!["QUOTA.TOP", T, P, "TOKENS", "FROM", "0", "TO", "1", "BOGUS"],
            "ERR unknown option 'BOGUS'",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(query_err(&mut con, &args), want, "{args:?}");
    }
    // The cursor still works after all that (nothing is kept on the server).
    let rest = find(&mut con, T, &["CURSOR", &cursor]);
    assert_eq!((rest.cursor.as_str(), rest.rows.len()), ("0", 1));

    // They wait on PostgreSQL: refused in a script by Redis, and at EXEC inside MULTI.
    let err = query_err(
        &mut con,
        &[
            "EVAL",
            "return redis.call('QUOTA.FIND', 'acme', 'chat')",
            "0",
        ],
    );
    assert!(err.contains("not allowed from script"), "{err}");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("QUOTA.TOP")
        .arg(T)
        .arg(P)
        .arg("TOKENS")
        .arg("FROM")
        .arg(0)
        .arg("TO")
        .arg(1);
    let err = match pipe.query::<Value>(&mut con) {
        Ok(v) => format!("{v:?}"),
        Err(e) => error_text(&e),
    };
    assert!(
        err.contains("QUOTA.TOP waits on PostgreSQL and cannot run inside MULTI"),
        "{err}"
    );
    drop(server);
}

fn connect_as(server: &RedisServer, user: &str, password: &str) -> redis::Connection {
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", server.port());
    redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"))
}

fn acl_setuser(admin: &mut redis::Connection, rules: &[&str]) {
    let mut args = vec!["ACL", "SETUSER"];
    args.extend_from_slice(rules);
    query(admin, &args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// The tenant is a read-only key: a client limited to one tenant's keys reads that tenant only,
/// `%R~` is enough, write-only keys are not.
#[test]
fn key_permissions_bind_find_and_top_to_the_tenant() {
    let (_schema, server, mut admin) = deployed();
    grant(&mut admin, "alice", "*", "REQUESTS_PER_DAY 1");
    admin.grant(["victim", P, "alice", "*"], "REQUESTS_PER_DAY 1");
    let find_args = |tenant: &'static str| vec!["QUOTA.FIND", tenant, P];
    let top_args =
        |tenant: &'static str| vec!["QUOTA.TOP", tenant, P, "TOKENS", "FROM", "0", "TO", "3600"];
    acl_setuser(
        &mut admin,
        &[
            "acme-ops",
            "on",
            ">a",
            "~acme",
            "-@all",
            "+quota.find",
            "+quota.top",
        ],
    );
    acl_setuser(
        &mut admin,
        &[
            "reader",
            "on",
            ">r",
            "%R~*",
            "-@all",
            "+quota.find",
            "+quota.top",
        ],
    );
    acl_setuser(
        &mut admin,
        &[
            "writer",
            "on",
            ">w",
            "%W~*",
            "-@all",
            "+quota.find",
            "+quota.top",
        ],
    );
    let mut ops = connect_as(&server, "acme-ops", "a");
    assert_eq!(find(&mut ops, T, &[]).rows.len(), 1);
    top(&mut ops, T, &["TOKENS", "FROM", "0", "TO", "3600"]);
    let mut reader = connect_as(&server, "reader", "r");
    assert_eq!(find(&mut reader, "victim", &[]).rows.len(), 1);
    top(
        &mut reader,
        "victim",
        &["TOKENS", "FROM", "0", "TO", "3600"],
    );
    let mut writer = connect_as(&server, "writer", "w");
    for (who, args) in [
        ("ops", find_args("victim")),
        ("ops", top_args("victim")),
        ("writer", find_args(T)),
        ("writer", top_args(T)),
    ] {
        let con = if who == "ops" { &mut ops } else { &mut writer };
        let err = query_err(con, &args);
        assert!(
            err.starts_with("NOPERM") && err.to_lowercase().contains("key"),
            "{who} {args:?}: {err}"
        );
    }
    // Redis 7.2+: in @read (and @slow), so `+@read` runs them; 7.0 has no module categories.
    if server.version() >= (7, 2, 0) {
        acl_setuser(
            &mut admin,
            &["cat-reader", "on", ">c", "~*", "-@all", "+@read"],
        );
        let mut cat = connect_as(&server, "cat-reader", "c");
        assert_eq!(find(&mut cat, T, &[]).rows.len(), 1);
        top(&mut cat, T, &["TOKENS", "FROM", "0", "TO", "3600"]);
    }
}

/// MOVED replies the nodes have sent since their last `CONFIG RESETSTAT`.
fn moved_sent(cluster: &RedisCluster) -> i64 {
    cluster
        .nodes
        .iter()
        .map(|n| {
            n.info("errorstats")
                .get("errorstat_MOVED")
                .and_then(|v| v.strip_prefix("count="))
                .map_or(0, |c| c.parse().unwrap())
        })
        .sum()
}

/// Calls of `command` a node ran (`INFO commandstats`).
fn calls_of(node: &RedisServer, command: &str) -> i64 {
    node.info("commandstats")
        .get(&format!("cmdstat_{command}"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .map_or(0, |c| c.parse().unwrap())
}

/// In a cluster the tenant routes both commands: `COMMAND GETKEYS` names it, a node that does
/// not own its slot answers `MOVED`, and a cluster client (the `redis` crate's, which routes a
/// command it does not know by its first argument) sends every page and ranking straight to
/// the tenant's node, where the rows granted through every node are read: no `MOVED` at all.
#[test]
fn a_cluster_client_routes_find_and_top_by_the_tenant_without_moved() {
    let schema = unique_schema();
    let builder = RedisServer::builder().pg(&PgServer::shared(), &schema, "2000");
    let cluster = RedisCluster::start(3, builder);
    let mut con = cluster.cluster_client();
    let tenants = ["acme", "globex", "initech", "umbrella", "hooli", "stark"];
    let owners: BTreeSet<u16> = tenants
        .iter()
        .map(|t| cluster.node_for_key(t).port())
        .collect();
    assert_eq!(owners.len(), 3, "the tenants should span every node");
    let users: Vec<String> = (0..9).map(|i| format!("user{i}")).collect();
    let mut on_node: BTreeMap<u16, i64> = BTreeMap::new();
    for tenant in tenants {
        for user in &users {
            // Granted on the user's node (which PostgreSQL's NOTIFY tells the others about).
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                get_slot(user.as_bytes()),
                SlotAddr::Master,
            )));
            con.route_command(
                &cmd(&["QUOTA.GRANT", tenant, P, user, "*", "REQUESTS_PER_DAY", "1"]),
                route,
            )
            .unwrap_or_else(|e| panic!("grant {tenant}/{user}: {e}"));
        }
    }
    for node in &cluster.nodes {
        let mut c = node.client();
        query(&mut c, &["CONFIG", "RESETSTAT"]).unwrap();
        let keys = to_array(query(&mut c, &["COMMAND", "GETKEYS", "QUOTA.FIND", T, P]).unwrap());
        assert_eq!(
            keys.iter().filter_map(value_to_string).collect::<Vec<_>>(),
            [T]
        );
        let keys = to_array(
            query(
                &mut c,
                &[
                    "COMMAND",
                    "GETKEYS",
                    "QUOTA.TOP",
                    T,
                    P,
                    "TOKENS",
                    "FROM",
                    "0",
                    "TO",
                    "1",
                ],
            )
            .unwrap(),
        );
        assert_eq!(
            keys.iter().filter_map(value_to_string).collect::<Vec<_>>(),
            [T]
        );
    }
    for tenant in tenants {
        let mut cursor = "0".to_string();
        let mut read = Vec::new();
        loop {
            let page = find(&mut con, tenant, &["COUNT", "4", "CURSOR", &cursor]);
            *on_node
                .entry(cluster.node_for_key(tenant).port())
                .or_default() += 1;
            read.extend(page.rows.iter().map(|r| id_of(r).0));
            if page.cursor == "0" {
                break;
            }
            cursor = page.cursor;
        }
        assert_eq!(read, users, "{tenant}");
        assert!(top(&mut con, tenant, &["TOKENS", "FROM", "0", "TO", "3600"]).is_empty());
    }
    assert_eq!(moved_sent(&cluster), 0, "the nodes sent MOVED");
    for node in &cluster.nodes {
        let want = on_node.get(&node.port()).copied().unwrap_or(0);
        assert_eq!(
            calls_of(node, "quota.find"),
            want,
            "QUOTA.FIND on {}",
            node.port()
        );
        let tops = tenants
            .iter()
            .filter(|t| cluster.node_for_key(t).port() == node.port())
            .count();
        assert_eq!(
            calls_of(node, "quota.top"),
            tops as i64,
            "QUOTA.TOP on {}",
            node.port()
        );
    }
    // A node that does not own the tenant's slot redirects to the one that does.
    let owner = cluster.node_for_key(T);
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.port() != owner.port())
        .unwrap();
    let err = query_err(&mut other.client(), &["QUOTA.FIND", T, P]);
    assert!(
        err.starts_with("MOVED") && err.ends_with(&format!(":{}", owner.port())),
        "{err}"
    );
}
