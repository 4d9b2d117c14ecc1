//! Hostile input: thousands of malformed `QUOTA.*` commands against a live server (every one
//! refused with a well-formed one-line error, nothing changed, the server alive), identities
//! whose ids contain separators, quotes and unicode, the documented size limits, and the
//! PostgreSQL password never leaking.
//!
//! The fuzz is seeded: it prints `seed=<n>`; `QUOTA_FUZZ_SEED=<n>` replays a run.
mod common;

use std::collections::BTreeMap;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

// ---------------------------------------------------------------------------
// A seeded PRNG and the grammar of invalid commands
// ---------------------------------------------------------------------------

const COMMANDS: [&str; 13] = [
    "QUOTA.GRANT",
    "QUOTA.GET",
    "QUOTA.REVOKE",
    "QUOTA.LIST",
    "QUOTA.CLEANUP",
    "QUOTA.INVALIDATE",
    "QUOTA.ADMIT",
    "QUOTA.COMMIT",
    "QUOTA.RELEASE",
    "QUOTA.USAGE",
    "QUOTA.RESET",
    "QUOTA.SETSTATE",
    "QUOTA.APPLY",
];

const LIMITS: [&str; 10] = [
    "REQUESTS_PER_DAY",
    "REQUESTS_PER_MONTH",
    "TOTAL_REQUESTS",
    "TOKENS_PER_HOUR",
    "TOKENS_PER_DAY",
    "TOKENS_PER_MONTH",
    "MAX_CONCURRENT",
    "REQUESTS_PER_SECOND",
    "REQUESTS_PER_MINUTE",
    "TOKENS_PER_MINUTE",
];
/// The limits stored in `INT` columns (GRANT refuses more than 2147483647).
const INT_LIMITS: [&str; 6] = [
    "REQUESTS_PER_DAY",
    "REQUESTS_PER_MONTH",
    "TOTAL_REQUESTS",
    "MAX_CONCURRENT",
    "REQUESTS_PER_SECOND",
    "REQUESTS_PER_MINUTE",
];
const GRANT_ONLY: [&str; 6] = [
    "EXPIRES_AT",
    "EXPIRES_IN",
    "PURCHASE",
    "AMOUNT",
    "NOTES",
    "ADD",
];
const ADMIT_ONLY: [&str; 5] = ["LEASE", "LEASE_TTL", "RESERVE", "PEEK", "VERBOSE"];

/// Never valid amounts (0 ..= 2^63-1 in plain decimal digits).
const BAD_NUMBERS: [&[u8]; 24] = [
    b"-1",
    b"-0",
    b"+1",
    b"",
    b" ",
    b"1 ",
    b" 1",
    b"1.0",
    b"1e3",
    b"0x1f",
    b"18446744073709551616",
    b"18446744073709551615",
    b"9223372036854775808",
    b"99999999999999999999999999",
    b"-9223372036854775808",
    b"1\0",
    "\u{661}\u{662}".as_bytes(),
    b"NaN",
    b"inf",
    b"abc",
    b"1_000",
    b"\xff\xfe",
    b"--1",
    b"12345678901234567890",
];

/// Never valid `AMOUNT`s (0 ..= 99999999.99, at most two decimals).
const BAD_AMOUNTS: [&[u8]; 14] = [
    b"1.234",
    b"-1",
    b"-0.01",
    b"100000000.00",
    b"1e2",
    b"",
    b"abc",
    b"1.",
    b".5",
    b"0x10",
    b"1,5",
    b"NaN",
    b"99999999.999",
    b"1.2.3",
];

/// Never a valid amount (0 ..= 2^63-1 in plain decimal digits).
fn bad_number(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => vec![b'9'; 65536],
        1 => {
            let mut v = vec![b'1'; 20 + rng.below(40)];
            v[0] = b'1';
            v
        }
        _ => rng.pick(&BAD_NUMBERS).to_vec(),
    }
}

/// Never a valid `AMOUNT` (0 ..= 99999999.99, at most two decimals).
fn bad_amount(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(10) {
        return vec![b'7'; 65536];
    }
    rng.pick(&BAD_AMOUNTS).to_vec()
}

/// Never a valid text value of at most `max` bytes (NOTES, PURCHASE, LEASE).
fn bad_text(rng: &mut Rng, max: usize) -> Vec<u8> {
    match rng.below(6) {
        0 => Vec::new(),
        1 => vec![b'n'; max + 1 + rng.below(3)],
        2 => vec![b'x'; 65536],
        3 => b"a\0b".to_vec(),
        4 => vec![0xc3, 0x28],
        _ => vec![b'o', 0xed, 0xa0, 0x80],
    }
}

/// Never a valid id in position `pos` (0 tenant, 1 project, 2 user, 3 bundle).
fn bad_id(rng: &mut Rng, pos: usize) -> Vec<u8> {
    let n = if pos == 2 { 9 } else { 7 };
    match rng.below(n) {
        0 => Vec::new(),
        1 => vec![b'i'; 256],
        2 => vec![b'i'; 256 + rng.below(65536 - 256)],
        3 => b"a\0b".to_vec(),
        4 => b"\0".to_vec(),
        5 => vec![0xff, 0xfe, b'x'],
        6 => "日本".as_bytes()[..5].to_vec(),
        7 => b"a}b".to_vec(),
        _ => b"}".to_vec(),
    }
}

/// The ids of the accounts that exist before the fuzz (so a command wrongly accepted would
/// hit them and show in the snapshot).
const ACCOUNTS: [[&str; 4]; 4] = [
    ["acme", "chat", "alice", "pro"],
    ["acme", "chat", "bob", "*"],
    ["t:x", "p", "{tag}carol", "b"],
    ["日本", "プロジェクト", "ユーザー", "束"],
];

fn good_ids(rng: &mut Rng) -> Vec<Vec<u8>> {
    let a = rng.pick(&ACCOUNTS);
    a.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Ids where one position (at least) is invalid.
fn ids_with_bad(rng: &mut Rng, count: usize) -> Vec<Vec<u8>> {
    let mut ids = good_ids(rng);
    ids.truncate(count);
    let pos = rng.below(count);
    ids[pos] = bad_id(rng, pos);
    ids
}

/// A valid option (keyword plus value) for GRANT or ADMIT.
fn valid_option(rng: &mut Rng, grant: bool, kind: usize) -> Vec<Vec<u8>> {
    let n = rng.below(1000).to_string().into_bytes();
    if kind < LIMITS.len() {
        return vec![rng.case(LIMITS[kind]), n];
    }
    let words = if grant {
        &GRANT_ONLY[..]
    } else {
        &ADMIT_ONLY[..]
    };
    let word = words[kind - LIMITS.len()];
    let value: Option<Vec<u8>> = match word {
        "EXPIRES_AT" => Some((unix_now() + 86_400).to_string().into_bytes()),
        "EXPIRES_IN" => Some(b"3600".to_vec()),
        "PURCHASE" => Some(format!("fz-{}", rng.next()).into_bytes()),
        "AMOUNT" => Some(b"1.50".to_vec()),
        "NOTES" => Some("nöte".as_bytes().to_vec()),
        "LEASE" => Some(format!("fz-{}", rng.next()).into_bytes()),
        "LEASE_TTL" => Some(b"60".to_vec()),
        "RESERVE" => Some(n),
        _ => None, // ADD, PEEK, VERBOSE
    };
    let mut out = vec![rng.case(word)];
    out.extend(value);
    out
}

fn option_kinds(grant: bool) -> usize {
    LIMITS.len()
        + if grant {
            GRANT_ONLY.len()
        } else {
            ADMIT_ONLY.len()
        }
}

/// Distinct valid options (EXPIRES_AT and EXPIRES_IN never together).
fn valid_options(rng: &mut Rng, grant: bool, count: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut used = Vec::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let kind = rng.below(option_kinds(grant));
        let expiry = |k: usize| grant && (k == LIMITS.len() || k == LIMITS.len() + 1);
        if used.contains(&kind) || (expiry(kind) && used.iter().any(|&k| expiry(k))) {
            continue;
        }
        used.push(kind);
        out.extend(valid_option(rng, grant, kind));
    }
    (out, used)
}

/// A word that is no option of GRANT (or of ADMIT).
fn unknown_word(rng: &mut Rng, grant: bool) -> Vec<u8> {
    let foreign: &[&str] = if grant { &ADMIT_ONLY } else { &GRANT_ONLY };
    match rng.below(10) {
        0 => Vec::new(),
        1 => vec![b'w'; 65536],
        2 => {
            // One of the command's own keywords with a NUL after it.
            let own: &[&str] = if grant { &GRANT_ONLY } else { &ADMIT_ONLY };
            let k = *rng.pick(own);
            let mut w = rng.case(k);
            w.push(0);
            w
        }
        3 => b" PEEK".to_vec(),
        4 => rng.case("REQUESTS_PER_DAYS"),
        5 => "ЗАПРОС".as_bytes().to_vec(),
        6 => vec![0xfe, 0xff],
        7 => rng.case("ALL"),
        8 => {
            let w = *rng.pick(foreign);
            rng.case(w)
        }
        _ => {
            // Random letters: only a word no keyword matches.
            let mut w = b"X".to_vec();
            w.extend(rng.random_bytes(12).iter().map(|b| b'a' + b % 26));
            w
        }
    }
}

/// The poison that makes a GRANT or ADMIT invalid, placed where a keyword is expected.
/// The second value is true when nothing may follow (a keyword missing its value).
fn poison(rng: &mut Rng, grant: bool, used: &[usize]) -> (Vec<Vec<u8>>, bool) {
    let p = match rng.below(5) {
        0 => vec![unknown_word(rng, grant)],
        1 => {
            // The same option twice (it may already be in the prefix).
            let kind = match used.first() {
                Some(&k) if rng.chance(50) => k,
                _ => rng.below(option_kinds(grant)),
            };
            let mut out = valid_option(rng, grant, kind);
            if !used.contains(&kind) {
                out.extend(valid_option(rng, grant, kind));
            }
            out
        }
        2 => {
            // A keyword that takes a value, at the very end.
            let mut words: Vec<&str> = LIMITS.to_vec();
            if grant {
                words.extend(["EXPIRES_AT", "EXPIRES_IN", "PURCHASE", "AMOUNT", "NOTES"]);
            } else {
                words.extend(["LEASE", "LEASE_TTL", "RESERVE"]);
            }
            let w = *rng.pick(&words);
            return (vec![rng.case(w)], true);
        }
        _ if grant => grant_bad_value(rng),
        _ => admit_bad_value(rng),
    };
    (p, false)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `keyword` (in a random case) and a value it refuses: one of `out_of_range` or a malformed
/// number, each as likely.
fn keyword_and_bad_value(rng: &mut Rng, keyword: &str, out_of_range: &[&[u8]]) -> Vec<Vec<u8>> {
    let value = match out_of_range.get(rng.below(out_of_range.len() + 1)) {
        Some(v) => v.to_vec(),
        None => bad_number(rng),
    };
    vec![rng.case(keyword), value]
}

fn grant_bad_value(rng: &mut Rng) -> Vec<Vec<u8>> {
    match rng.below(9) {
        0 | 1 => {
            let w = *rng.pick(&LIMITS);
            vec![rng.case(w), bad_number(rng)]
        }
        2 => {
            let w = *rng.pick(&INT_LIMITS);
            let v = 2_147_483_648u64 + rng.next() % (i64::MAX as u64 - 2_147_483_648);
            vec![rng.case(w), v.to_string().into_bytes()]
        }
        3 => {
            let past = unix_now().saturating_sub(10).to_string();
            let out = [&b"0"[..], b"1000000000", b"253402300800", past.as_bytes()];
            keyword_and_bad_value(rng, "EXPIRES_AT", &out)
        }
        4 => keyword_and_bad_value(rng, "EXPIRES_IN", &[b"0", b"253402300799"]),
        5 => {
            let at = (unix_now() + 3600).to_string().into_bytes();
            let mut both = vec![
                rng.case("EXPIRES_AT"),
                at,
                rng.case("EXPIRES_IN"),
                b"60".to_vec(),
            ];
            if rng.chance(50) {
                both.rotate_left(2);
            }
            both
        }
        6 => vec![rng.case("AMOUNT"), bad_amount(rng)],
        7 => vec![rng.case("NOTES"), bad_text(rng, 4096)],
        _ => vec![rng.case("PURCHASE"), bad_text(rng, 255)],
    }
}

fn admit_bad_value(rng: &mut Rng) -> Vec<Vec<u8>> {
    match rng.below(5) {
        0 | 1 => {
            let w = *rng.pick(&LIMITS);
            vec![rng.case(w), bad_number(rng)]
        }
        2 => vec![rng.case("LEASE"), bad_text(rng, 128)],
        3 => keyword_and_bad_value(rng, "LEASE_TTL", &[b"0", b"86401"]),
        _ => vec![rng.case("RESERVE"), bad_number(rng)],
    }
}

/// Arbitrary arguments (valid-looking ids, numbers, keywords, garbage).
fn random_args(rng: &mut Rng, max: usize) -> Vec<Vec<u8>> {
    let n = rng.below(max + 1);
    (0..n)
        .map(|_| match rng.below(6) {
            0 => good_ids(rng).swap_remove(rng.below(4)),
            1 => rng.random_bytes(40),
            2 => bad_number(rng),
            3 => {
                let w = *rng.pick(&LIMITS);
                rng.case(w)
            }
            4 => rng.next().to_string().into_bytes(),
            _ => vec![b'z'; 65536],
        })
        .collect()
}

/// One command that must be refused.
/// `a` followed by `more`.
fn then(mut a: Vec<Vec<u8>>, more: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
    a.extend(more);
    a
}

/// Valid ids cut to fewer than `n` (so too few for a command taking `n - 1` or more).
fn few_ids(rng: &mut Rng, n: usize) -> Vec<Vec<u8>> {
    let mut ids = good_ids(rng);
    ids.truncate(rng.below(n));
    ids
}

/// Valid tenant, project and user (no bundle).
fn user_ids(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut ids = good_ids(rng);
    ids.truncate(3);
    ids
}

fn invalid_command(rng: &mut Rng) -> Vec<Vec<u8>> {
    let name = *rng.pick(&COMMANDS);
    let cmd = vec![rng.case(name)];
    let rest: Vec<Vec<u8>> = match name {
        "QUOTA.GRANT" | "QUOTA.ADMIT" => {
            let grant = name == "QUOTA.GRANT";
            match rng.below(6) {
                // Fewer than four ids.
                0 => few_ids(rng, 4),
                // An invalid id; whatever follows.
                1 => then(ids_with_bad(rng, 4), random_args(rng, 4)),
                // Valid ids, valid options, then a poison, then anything.
                _ => {
                    let mut a = good_ids(rng);
                    let count = rng.below(4);
                    let (prefix, used) = valid_options(rng, grant, count);
                    let (p, last) = poison(rng, grant, &used);
                    a.extend(prefix);
                    a.extend(p);
                    if !last && rng.chance(30) {
                        a.extend(random_args(rng, 3));
                    }
                    a
                }
            }
        }
        "QUOTA.GET" | "QUOTA.REVOKE" | "QUOTA.USAGE" | "QUOTA.RESET" => match rng.below(3) {
            0 => few_ids(rng, 4),
            1 => ids_with_bad(rng, 4),
            _ => {
                let a = then(good_ids(rng), [rng.random_bytes(10)]);
                then(a, random_args(rng, 3))
            }
        },
        "QUOTA.LIST" => match rng.below(4) {
            0 => few_ids(rng, 3),
            1 => {
                let a = ids_with_bad(rng, 3);
                let all = rng.chance(50).then(|| rng.case("ALL"));
                then(a, all)
            }
            2 => {
                let a = user_ids(rng);
                let word: Vec<u8> = match rng.below(5) {
                    0 => rng.case("ALLX"),
                    1 => rng.case("AL"),
                    2 => Vec::new(),
                    3 => b"ALL\0".to_vec(),
                    _ => rng.random_bytes(8).iter().map(|b| b'b' + b % 20).collect(),
                };
                then(a, [word])
            }
            _ => {
                let a = then(user_ids(rng), [rng.case("ALL")]);
                then(a, [rng.random_bytes(6)])
            }
        },
        "QUOTA.INVALIDATE" => match rng.below(3) {
            0 => few_ids(rng, 3),
            1 => ids_with_bad(rng, 3),
            _ => then(user_ids(rng), [rng.random_bytes(6)]),
        },
        "QUOTA.COMMIT" => match rng.below(5) {
            0 => few_ids(rng, 5),
            1 => then(ids_with_bad(rng, 4), [b"10".to_vec()]),
            2 => {
                let a = then(good_ids(rng), [bad_number(rng)]);
                then(a, random_args(rng, 2))
            }
            _ => {
                let mut a = then(good_ids(rng), [rng.below(100).to_string().into_bytes()]);
                let lease = format!("fz-{}", rng.next()).into_bytes();
                match rng.below(4) {
                    0 => a.push(unknown_word(rng, true)),
                    1 => a.extend([rng.case("LEASE"), bad_text(rng, 128)]),
                    2 => a.extend([rng.case("LEASE"), lease.clone(), rng.case("LEASE"), lease]),
                    _ => a.push(rng.case("LEASE")),
                }
                a
            }
        },
        "QUOTA.RELEASE" => match rng.below(4) {
            0 => few_ids(rng, 5),
            1 => then(ids_with_bad(rng, 4), [b"lease".to_vec()]),
            2 => then(good_ids(rng), [bad_text(rng, 128)]),
            _ => {
                let a = then(good_ids(rng), [b"lease".to_vec()]);
                then(a, random_args(rng, 3).into_iter().chain([b"x".to_vec()]))
            }
        },
        "QUOTA.CLEANUP" => {
            let mut a = random_args(rng, 3);
            if a.is_empty() {
                a.push(rng.random_bytes(5));
            }
            a
        }
        // QUOTA.SETSTATE, QUOTA.APPLY: never accepted from a client, whatever the arguments.
        _ => {
            let mut a = random_args(rng, 4);
            if rng.chance(50) {
                a.insert(0, b"q:{alice}:4:acme4:chat5:alice3:pro".to_vec());
            }
            a
        }
    };
    then(cmd, rest)
}

/// A command that must succeed and change nothing: a read, or an `ADMIT ... PEEK VERBOSE`.
/// The second value is true for the `PEEK` (a decision that counts in `INFO quota`).
fn valid_read(rng: &mut Rng) -> (Vec<Vec<u8>>, bool) {
    let a = rng.pick(&ACCOUNTS);
    let ids = || a.iter().map(|s| s.as_bytes().to_vec());
    match rng.below(4) {
        0 => (
            std::iter::once(rng.case("QUOTA.USAGE"))
                .chain(ids())
                .collect(),
            false,
        ),
        1 => (
            std::iter::once(rng.case("QUOTA.GET"))
                .chain(ids())
                .collect(),
            false,
        ),
        2 => {
            let mut c = vec![rng.case("QUOTA.LIST")];
            c.extend(ids().take(3));
            if rng.chance(50) {
                c.push(rng.case("all"));
            }
            (c, false)
        }
        _ => {
            let mut c = vec![rng.case("QUOTA.ADMIT")];
            c.extend(ids());
            let count = rng.below(6);
            let (options, _) = valid_options(rng, false, count);
            // Only limits: no lease (PEEK never takes one anyway).
            let mut it = options.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let upper = k.to_ascii_uppercase();
                if LIMITS.iter().any(|l| l.as_bytes() == upper.as_slice()) {
                    c.push(k);
                    c.push(v);
                }
            }
            c.push(rng.case("PEEK"));
            c.push(rng.case("VERBOSE"));
            (c, true)
        }
    }
}

/// A `VERBOSE` admission reply: 14 fields, 10 effective limits, an 11-field usage, 3 resets.
fn verbose_shape_ok(reply: &Reply) -> bool {
    let Some(m) = reply.as_map() else {
        return false;
    };
    let len = |f: &str| m.get(f).and_then(Reply::as_map).map(|x| x.len());
    m.len() == 14
        && len("limits") == Some(10)
        && len("usage") == Some(11)
        && len("resets") == Some(3)
}

// ---------------------------------------------------------------------------
// Snapshots: what must not change
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Snapshot {
    dbsize: i64,
    keys: Vec<Vec<u8>>,
    usage: Vec<BTreeMap<String, Reply>>,
    rows: String,
    events: String,
    info: BTreeMap<String, String>,
    /// Admission decisions made (allowed + denied).
    admits: i64,
    hour: u64,
}

fn snapshot(raw: &mut Raw, server: &RedisServer, pg_url: &str, schema: &str) -> Snapshot {
    let dbsize = match raw.call(&bytes(&["DBSIZE"])) {
        Reply::Int(n) => n,
        other => panic!("DBSIZE: {other:?}"),
    };
    let mut keys: Vec<Vec<u8>> = match raw.call(&bytes(&["KEYS", "q:*"])) {
        Reply::Array(items) | Reply::Set(items) => items
            .into_iter()
            .map(|k| match k {
                Reply::Bulk(b) => b,
                other => panic!("KEYS item {other:?}"),
            })
            .collect(),
        other => panic!("KEYS: {other:?}"),
    };
    keys.sort();
    let usage = ACCOUNTS
        .iter()
        .map(|a| {
            let mut c = bytes(&["QUOTA.USAGE"]);
            c.extend(a.iter().map(|s| s.as_bytes().to_vec()));
            let mut m = raw
                .call(&c)
                .as_map()
                .unwrap_or_else(|| panic!("USAGE {a:?} is not a map"));
            for reset in ["hour_reset", "day_reset", "month_reset"] {
                m.remove(reset);
            }
            m
        })
        .collect();
    let rows = psql(
        pg_url,
        &format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(r::text, '|' ORDER BY \
             tenant, project, user_id, bundle_id)), '') \
             FROM {schema}.user_quota_replenishment r"
        ),
    );
    let events = psql(
        pg_url,
        &format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(e::text, '|' ORDER BY id)), '') \
             FROM {schema}.user_quota_replenishment_event e"
        ),
    );
    let all = server.info("quota");
    let info = [
        "cache_entries",
        "cache_misses",
        "admits_pending",
        "admits_unavailable",
        "grants",
        "revokes",
        "cleanups",
    ]
    .iter()
    .map(|f| {
        let k = format!("quota_{f}");
        let v = all.get(&k).cloned().unwrap_or_else(|| panic!("no {k}"));
        (k, v)
    })
    .collect();
    let count = |k: &str| -> i64 {
        all.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}"))
    };
    Snapshot {
        dbsize,
        keys,
        usage,
        rows,
        events,
        info,
        admits: count("quota_admits_allowed") + count("quota_admits_denied"),
        hour: unix_now() / 3600,
    }
}

/// Creates the accounts of `ACCOUNTS`: a credit each, admissions, commits and an open lease.
fn populate(raw: &mut Raw) {
    for (i, a) in ACCOUNTS.iter().enumerate() {
        let purchase = format!("seed-{i}");
        let mut grant = bytes(&["QUOTA.GRANT", a[0], a[1], a[2], "*"]);
        grant.extend(bytes(&[
            "REQUESTS_PER_DAY",
            "50",
            "TOKENS_PER_DAY",
            "5000",
            "PURCHASE",
            &purchase,
            "AMOUNT",
            "9.99",
            "NOTES",
            "seed",
        ]));
        let r = raw.call(&grant);
        assert!(r.as_map().is_some(), "seed GRANT: {r:?}");
        let mut admit = bytes(&["QUOTA.ADMIT"]);
        admit.extend(a.iter().map(|s| s.as_bytes().to_vec()));
        admit.extend(bytes(&[
            "REQUESTS_PER_DAY",
            "10",
            "RESERVE",
            "20",
            "LEASE_TTL",
            "3600",
        ]));
        for round in 0..3 {
            let m = raw.call(&admit).as_map().expect("seed ADMIT map");
            let lease = m.get("lease").map(Reply::text).expect("lease");
            if round < 2 {
                let mut commit = bytes(&["QUOTA.COMMIT"]);
                commit.extend(a.iter().map(|s| s.as_bytes().to_vec()));
                commit.extend(bytes(&["17", "LEASE", &lease]));
                assert!(raw.call(&commit).as_map().is_some());
            }
        }
    }
}

fn fuzz_seed() -> u64 {
    std::env::var("QUOTA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(random_u64)
}

/// What the fuzz sent.
#[derive(Default)]
struct FuzzCounts {
    /// Invalid commands by command name.
    per_command: BTreeMap<String, usize>,
    /// Valid reads, and the `ADMIT ... PEEK VERBOSE` among them.
    reads: usize,
    peeks: usize,
}

/// One batch of the fuzz: each command with whether it is valid (about a third are valid
/// reads, the rest invalid commands).
fn fuzz_batch(rng: &mut Rng, batch: usize, counts: &mut FuzzCounts) -> Vec<(Vec<Vec<u8>>, bool)> {
    (0..batch)
        .map(|_| {
            if rng.chance(3) {
                let (c, peek) = valid_read(rng);
                counts.peeks += usize::from(peek);
                (c, true)
            } else {
                let c = invalid_command(rng);
                *counts
                    .per_command
                    .entry(String::from_utf8_lossy(&c[0]).to_ascii_uppercase())
                    .or_default() += 1;
                (c, false)
            }
        })
        .collect()
}

/// What is wrong with the reply to one fuzzed command, if anything: a valid read must answer
/// a map (an ADMIT its VERBOSE shape), an invalid command a one-line `ERR`.
fn fuzz_problem(cmd: &[Vec<u8>], valid: bool, reply: &Reply) -> Option<String> {
    if valid {
        let is_admit = cmd[0].eq_ignore_ascii_case(b"QUOTA.ADMIT");
        let ok =
            !reply.is_error() && reply.as_map().is_some() && (!is_admit || verbose_shape_ok(reply));
        return (!ok).then(|| format!("valid read {} failed: {reply:?}", show_args(cmd)));
    }
    match reply {
        Reply::Error(t) => {
            let text = String::from_utf8_lossy(t);
            (!text.starts_with("ERR ") || text.len() > 1024).then(|| {
                format!(
                    "not a clear one-line error for {}: {text:?}",
                    show_args(cmd)
                )
            })
        }
        other => Some(format!(
            "invalid command accepted: {} -> {}",
            show_args(cmd),
            format!("{other:?}").chars().take(200).collect::<String>()
        )),
    }
}

/// Asserts that the fuzz changed nothing but the admission count of its `peeks` PEEKs (and
/// the hour window, when an hour boundary passed meanwhile).
fn assert_unchanged(before: &Snapshot, mut after: Snapshot, peeks: usize, seed: u64) {
    assert_eq!(
        after.admits - before.admits,
        peeks as i64,
        "INFO quota counted other decisions than the {peeks} PEEKs (seed {seed})"
    );
    after.admits = before.admits;
    if after.hour == before.hour {
        assert_eq!(&after, before, "the fuzz changed something (seed {seed})");
        return;
    }
    // An hour boundary passed: the hour window rolled, everything else must be equal.
    let strip = |s: &Snapshot| -> Vec<BTreeMap<String, Reply>> {
        s.usage
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.remove("tokens_per_hour");
                m
            })
            .collect()
    };
    assert_eq!(strip(&after), strip(before), "usage changed (seed {seed})");
    assert_eq!(
        (
            after.dbsize,
            &after.keys,
            &after.rows,
            &after.events,
            &after.info
        ),
        (
            before.dbsize,
            &before.keys,
            &before.rows,
            &before.events,
            &before.info
        ),
        "the fuzz changed something (seed {seed})"
    );
}

#[test]
fn thousands_of_malformed_commands_are_refused_and_change_nothing() {
    let seed = fuzz_seed();
    eprintln!("fuzz seed={seed} (replay with QUOTA_FUZZ_SEED={seed})");
    let mut rng = Rng(seed);
    let pg = PgServer::shared();
    let schema = unique_schema();
    let server = test_server_with(&schema, &[("cache-ttl-ms", "3600000")]);
    // The NOTIFY listener drops the whole cache when it (re)connects: let it connect before
    // the accounts are made, or the snapshots would see it happen in between.
    server.wait_notify_state("listening", Duration::from_secs(30));
    let mut r2 = Raw::connect(server.port(), false);
    let mut r3 = Raw::connect(server.port(), true);
    populate(&mut r2);
    let before = snapshot(&mut r2, &server, &pg, &schema);

    // Batches of 50 pipelined, alternately over RESP2 and RESP3.
    let total = 10_000;
    let batch = 50;
    let started = Instant::now();
    let mut counts = FuzzCounts::default();
    let mut problems: Vec<String> = Vec::new();
    for sent in (0..total).step_by(batch) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the fuzz ran over 5 minutes (seed {seed})"
        );
        let (cmds, valid): (Vec<_>, Vec<_>) =
            fuzz_batch(&mut rng, batch, &mut counts).into_iter().unzip();
        let con = if (sent / batch) % 2 == 0 {
            &mut r2
        } else {
            &mut r3
        };
        let replies = con.pipeline(&cmds);
        for ((cmd, valid), reply) in cmds.iter().zip(valid).zip(replies) {
            let reply = reply.unwrap_or_else(|e| {
                panic!(
                    "no well-formed reply to {} (seed {seed}): {e}",
                    show_args(cmd)
                )
            });
            counts.reads += usize::from(valid);
            problems.extend(fuzz_problem(cmd, valid, &reply));
        }
    }
    let FuzzCounts {
        per_command,
        reads,
        peeks,
    } = counts;
    let took = started.elapsed();
    eprintln!(
        "fuzz: {total} commands ({reads} valid reads, {peeks} of them ADMIT PEEK VERBOSE) in {took:?}; per command: {per_command:?}"
    );
    assert!(
        problems.is_empty(),
        "{} of {total} commands misbehaved (seed {seed}); the first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(15)].join("\n")
    );

    let pong = Raw::connect(server.port(), false).call(&bytes(&["PING"]));
    assert_eq!(
        pong,
        Reply::Simple(b"PONG".to_vec()),
        "server gone after the fuzz"
    );
    let after = snapshot(&mut r2, &server, &pg, &schema);
    assert_unchanged(&before, after, peeks, seed);
    let log = server.log();
    assert!(
        !log.contains("panic"),
        "the server log mentions a panic (seed {seed}):\n{log}"
    );
    assert_eq!(
        per_command.len(),
        COMMANDS.len(),
        "not every command name was fuzzed: {per_command:?}"
    );
}

/// A module server on a fresh schema of the shared PostgreSQL (its URL and the schema come
/// along), and a RESP2 connection to it.
fn start() -> (String, String, RedisServer, Raw) {
    let pg = PgServer::shared();
    let schema = unique_schema();
    let server = test_server(&schema);
    let raw = Raw::connect(server.port(), false);
    (pg, schema, server, raw)
}

#[test]
fn option_keywords_match_exactly() {
    let (pg, schema, _server, mut raw) = start();
    let acc = ["t", "p", "exact", "b"];
    // A keyword with anything after it (a NUL, a space, a letter) is not that keyword.
    let cases: [(&str, &[&[u8]]); 8] = [
        ("QUOTA.GRANT", &[b"REQUESTS_PER_DAY", b"1", b"ADD\0"]),
        ("QUOTA.GRANT", &[b"NOTES\0", b"x"]),
        ("QUOTA.GRANT", &[b"EXPIRES_IN\0\0", b"60"]),
        ("QUOTA.ADMIT", &[b"PEEK\0"]),
        ("QUOTA.ADMIT", &[b"VERBOSE\0"]),
        ("QUOTA.ADMIT", &[b"LEASE\0", b"l1"]),
        ("QUOTA.ADMIT", &[b"REQUESTS_PER_DAY\0", b"5"]),
        ("QUOTA.ADMIT", &[b"PEEK "]),
    ];
    let mut accepted = Vec::new();
    for (name, rest) in cases {
        let mut c = cmd_on(name, &acc, &[]);
        c.extend(rest.iter().map(|a| a.to_vec()));
        let r = raw.call(&c);
        if !(r.is_error() && r.text().contains("unknown option")) {
            accepted.push(format!(
                "{} -> {}",
                show_args(&c),
                format!("{r:?}").chars().take(60).collect::<String>()
            ));
        }
    }
    assert!(
        accepted.is_empty(),
        "malformed keywords were taken for options:\n{}",
        accepted.join("\n")
    );
    assert_eq!(raw.call(&bytes(&["DBSIZE"])), Reply::Int(0));
    assert_eq!(
        psql(
            &pg,
            &format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}'"
            )
        )
        .parse::<i64>()
        .map(|n| n == 0
            || psql(
                &pg,
                &format!("SELECT count(*) FROM {schema}.user_quota_replenishment")
            ) == "0"),
        Ok(true),
        "a refused GRANT wrote a row"
    );
}

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// Hex of the bytes of a string, as `encode(convert_to(x, 'UTF8'), 'hex')` prints it.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The identity columns of every row, decoded from hex (so newlines and quotes survive psql).
fn pg_identities(pg: &str, schema: &str) -> Vec<[String; 4]> {
    let out = psql(
        pg,
        &format!(
            "SELECT encode(convert_to(tenant, 'UTF8'), 'hex') || ',' || \
             encode(convert_to(project, 'UTF8'), 'hex') || ',' || \
             encode(convert_to(user_id, 'UTF8'), 'hex') || ',' || \
             encode(convert_to(bundle_id, 'UTF8'), 'hex') \
             FROM {schema}.user_quota_replenishment ORDER BY 1"
        ),
    );
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let parts: Vec<String> = l.split(',').map(unhex).collect();
            [
                parts[0].clone(),
                parts[1].clone(),
                parts[2].clone(),
                parts[3].clone(),
            ]
        })
        .collect()
}

fn unhex(h: &str) -> String {
    let bytes: Vec<u8> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
        .collect();
    String::from_utf8(bytes).expect("utf8 from PostgreSQL")
}

fn cmd_on(name: &str, ids: &[&str], rest: &[&str]) -> Vec<Vec<u8>> {
    let mut c = bytes(&[name]);
    c.extend(bytes(ids));
    c.extend(bytes(rest));
    c
}

fn map_of(reply: Reply, what: &str) -> BTreeMap<String, Reply> {
    reply
        .as_map()
        .unwrap_or_else(|| panic!("{what}: not a map: {reply:?}"))
}

/// `QUOTA.ADMIT acc REQUESTS_PER_DAY 0` (only a credit can admit): (allowed, credit)
/// and the whole reply.
fn admit_on_credits_only(
    raw: &mut Raw,
    acc: &[&str],
    what: &str,
) -> ((i64, String), BTreeMap<String, Reply>) {
    let m = map_of(
        raw.call(&cmd_on("QUOTA.ADMIT", acc, &["REQUESTS_PER_DAY", "0"])),
        what,
    );
    ((int_of(&m, "allowed"), text_of(&m, "credit")), m)
}

fn int_of(m: &BTreeMap<String, Reply>, f: &str) -> i64 {
    match m.get(f) {
        Some(Reply::Int(i)) => *i,
        other => panic!("field {f}: {other:?} in {m:?}"),
    }
}

fn text_of(m: &BTreeMap<String, Reply>, f: &str) -> String {
    m.get(f)
        .map(Reply::text)
        .unwrap_or_else(|| panic!("no field {f} in {m:?}"))
}

#[test]
fn ids_with_separators_never_collide() {
    let (pg, schema, _server, mut raw) = start();
    // (A, B): A gets a credit on its bundle, B must never see it, nor share usage with A.
    let pairs: [([&str; 4], [&str; 4]); 9] = [
        (["a:b", "c", "u", "x"], ["a", "b:c", "u", "x"]),
        (["t1", "p", "1:c", "x"], ["t1", "p", "1", "c:x"]),
        (["t2", "p:1", "u", "x"], ["t2", "p", "1:u", "x"]),
        (["t3", "p", "{a", "x"], ["t3", "p", "{a}", "x"]),
        (["t4", "p", "{org}1", "x"], ["t4", "p", "{org}2", "x"]),
        (["t5", "p", "a b", "c"], ["t5", "p", "a", "b c"]),
        (["t6\"", "p", "u", "x"], ["t6", "\"p", "u", "x"]),
        (["t7\n", "p", "u", "x"], ["t7", "\np", "u", "x"]),
        (["1:t8", "p", "u", "x"], ["1", "t8:p", "u", "x"]),
    ];
    for (a, b) in &pairs {
        let g = map_of(
            raw.call(&cmd_on("QUOTA.GRANT", a, &["REQUESTS_PER_DAY", "7"])),
            "GRANT",
        );
        for (field, want) in ["tenant", "project", "user_id", "bundle_id"].iter().zip(a) {
            assert_eq!(&text_of(&g, field), want, "GRANT {a:?} replied {g:?}");
        }
        let got = raw.call(&cmd_on("QUOTA.GET", b, &[]));
        assert_eq!(got, Reply::Null, "{b:?} sees the credit of {a:?}: {got:?}");
        let (decided, ma) = admit_on_credits_only(&mut raw, a, "ADMIT A");
        assert_eq!(decided, (1, "bundle".to_string()), "{a:?}: {ma:?}");
        let (decided, mb) = admit_on_credits_only(&mut raw, b, "ADMIT B");
        assert_eq!(
            decided,
            (0, "none".to_string()),
            "{b:?} was admitted on the credit of {a:?}: {mb:?}"
        );
        for _ in 0..2 {
            let m = map_of(
                raw.call(&cmd_on("QUOTA.ADMIT", b, &["REQUESTS_PER_DAY", "5"])),
                "ADMIT B",
            );
            assert_eq!(int_of(&m, "allowed"), 1);
        }
        raw.call(&cmd_on("QUOTA.COMMIT", a, &["11"]));
        raw.call(&cmd_on("QUOTA.COMMIT", b, &["22"]));
        for (acc, other, want) in [(a, b, (1, 11)), (b, a, (2, 22))] {
            let u = map_of(raw.call(&cmd_on("QUOTA.USAGE", acc, &[])), "USAGE");
            assert_eq!(
                (int_of(&u, "requests_per_day"), int_of(&u, "tokens_per_day")),
                want,
                "usage of {acc:?} mixed with {other:?}"
            );
        }
    }
    // One key per account, rows exactly as granted.
    let keys = match raw.call(&bytes(&["KEYS", "q:*"])) {
        Reply::Array(k) => k.len(),
        other => panic!("KEYS: {other:?}"),
    };
    assert_eq!(keys, 2 * pairs.len(), "accounts share keys");
    let mut want: Vec<[String; 4]> = pairs.iter().map(|(a, _)| a.map(str::to_string)).collect();
    want.sort_by_key(|ids| ids.iter().map(|s| hex(s)).collect::<Vec<_>>().join(","));
    assert_eq!(pg_identities(&pg, &schema), want);
    // From PostgreSQL again (cache dropped): still apart.
    for (a, b) in &pairs {
        raw.call(&cmd_on("QUOTA.INVALIDATE", &a[..3], &[]));
        raw.call(&cmd_on("QUOTA.INVALIDATE", &b[..3], &[]));
        let got = map_of(raw.call(&cmd_on("QUOTA.GET", a, &[])), "GET A");
        assert_eq!(int_of(&got, "requests_per_day"), 7);
        assert_eq!(raw.call(&cmd_on("QUOTA.GET", b, &[])), Reply::Null, "{b:?}");
    }
}

#[test]
fn quotes_and_unicode_go_through_postgres_unchanged() {
    let (pg, schema, _server, mut raw) = start();
    let accounts: [[&str; 4]; 3] = [
        ["O'Brien", "\"quoted\"", "日本語🙂", "emoji-🚀"],
        ["Robert'); DROP TABLE students;--", "p\\q", "ünïcödé", "*"],
        ["tab\there", "%_like", "$1", "'"],
    ];
    let notes = "It's \"fine\" — 日本語 🎉 \\ back; DROP TABLE x; -- $$ \u{0}";
    // NUL is refused in text: use the rest of it.
    let notes = notes.trim_end_matches('\u{0}').trim_end();
    let purchase = "pi_'\"日本🙂";
    for (i, a) in accounts.iter().enumerate() {
        let purchase = format!("{purchase}{i}");
        let g = map_of(
            raw.call(&cmd_on(
                "QUOTA.GRANT",
                a,
                &[
                    "REQUESTS_PER_DAY",
                    "3",
                    "NOTES",
                    notes,
                    "PURCHASE",
                    &purchase,
                    "AMOUNT",
                    "12.34",
                ],
            )),
            "GRANT",
        );
        let check = |m: &BTreeMap<String, Reply>, how: &str| {
            for (field, want) in ["tenant", "project", "user_id", "bundle_id"].iter().zip(a) {
                assert_eq!(&text_of(m, field), want, "{how} {a:?}: {m:?}");
            }
            assert_eq!(text_of(m, "purchase_notes"), notes, "{how}");
            assert_eq!(text_of(m, "purchase_id"), purchase, "{how}");
            assert_eq!(text_of(m, "purchase_amount_usd"), "12.34", "{how}");
        };
        check(&g, "GRANT reply");
        // Bytes as PostgreSQL stores them.
        let stored = psql(
            &pg,
            &format!(
                "SELECT encode(convert_to(purchase_notes, 'UTF8'), 'hex') || ',' || \
                 encode(convert_to(purchase_id, 'UTF8'), 'hex') \
                 FROM {schema}.user_quota_replenishment \
                 WHERE tenant = convert_from(decode('{}', 'hex'), 'UTF8') \
                 AND user_id = convert_from(decode('{}', 'hex'), 'UTF8')",
                hex(a[0]),
                hex(a[2])
            ),
        );
        assert_eq!(stored, format!("{},{}", hex(notes), hex(&purchase)));
        // Read back from PostgreSQL (cache dropped), by GET and LIST.
        raw.call(&cmd_on("QUOTA.INVALIDATE", &a[..3], &[]));
        check(
            &map_of(raw.call(&cmd_on("QUOTA.GET", a, &[])), "GET"),
            "GET from PostgreSQL",
        );
        let list = map_of(raw.call(&cmd_on("QUOTA.LIST", &a[..3], &[])), "LIST");
        let rec = list
            .get(a[3])
            .unwrap_or_else(|| panic!("LIST {a:?}: {list:?}"));
        check(&rec.as_map().expect("LIST record"), "LIST");
        // A change made in SQL reaches the cache through NOTIFY with these ids.
        psql(
            &pg,
            &format!(
                "UPDATE {schema}.user_quota_replenishment SET additional_requests_per_day = 42 \
                 WHERE tenant = convert_from(decode('{}', 'hex'), 'UTF8') \
                 AND project = convert_from(decode('{}', 'hex'), 'UTF8') \
                 AND user_id = convert_from(decode('{}', 'hex'), 'UTF8')",
                hex(a[0]),
                hex(a[1]),
                hex(a[2])
            ),
        );
        let seen = wait_until(Duration::from_secs(10), || {
            let m = map_of(raw.call(&cmd_on("QUOTA.GET", a, &[])), "GET");
            int_of(&m, "requests_per_day") == 42
        });
        assert!(seen, "a SQL update of {a:?} never reached the cache");
    }
    let mut want: Vec<[String; 4]> = accounts.iter().map(|a| a.map(str::to_string)).collect();
    want.sort_by_key(|ids| ids.iter().map(|s| hex(s)).collect::<Vec<_>>().join(","));
    assert_eq!(pg_identities(&pg, &schema), want);
}

#[test]
fn input_sizes_are_bounded_as_documented() {
    let (pg, schema, _server, mut raw) = start();
    let names = ["tenant", "project", "user", "bundle"];
    let max_ascii = "a".repeat(255);
    let max_multibyte = "日".repeat(85); // 255 bytes
    for pos in 0..4 {
        for long_ok in [max_ascii.as_str(), max_multibyte.as_str()] {
            let mut ids = ["t", "p", "u", "b"];
            ids[pos] = long_ok;
            let g = raw.call(&cmd_on("QUOTA.GRANT", &ids, &["REQUESTS_PER_DAY", "1"]));
            assert!(
                !g.is_error(),
                "a 255-byte {} was refused: {g:?}",
                names[pos]
            );
            let m = map_of(
                raw.call(&cmd_on("QUOTA.ADMIT", &ids, &["REQUESTS_PER_DAY", "0"])),
                "ADMIT",
            );
            assert_eq!(int_of(&m, "allowed"), 1, "{m:?}");
        }
        for too_long in ["a".repeat(256), "日".repeat(86)] {
            let mut ids = ["t", "p", "u", "b"];
            ids[pos] = too_long.as_str();
            for (name, rest) in [
                ("QUOTA.GRANT", &["REQUESTS_PER_DAY", "1"][..]),
                ("QUOTA.ADMIT", &[][..]),
                ("QUOTA.USAGE", &[][..]),
            ] {
                let r = raw.call(&cmd_on(name, &ids, rest));
                assert!(
                    r.is_error() && r.text().contains(names[pos]),
                    "{name} with a {}-byte {}: {r:?}",
                    too_long.len(),
                    names[pos]
                );
            }
        }
    }
    // PostgreSQL holds the 255-byte ids whole.
    let lengths = psql(
        &pg,
        &format!(
            "SELECT max(octet_length(tenant)), max(octet_length(project)), \
             max(octet_length(user_id)), max(octet_length(bundle_id)), count(*) \
             FROM {schema}.user_quota_replenishment"
        ),
    );
    assert_eq!(lengths, "255|255|255|255|8");

    let ids = ["t", "p", "limits", "*"];
    let g = map_of(
        raw.call(&cmd_on(
            "QUOTA.GRANT",
            &ids,
            &["NOTES", &"n".repeat(4096), "PURCHASE", &"q".repeat(255)],
        )),
        "GRANT",
    );
    assert_eq!(text_of(&g, "purchase_notes").len(), 4096);
    assert_eq!(text_of(&g, "purchase_id").len(), 255);
    assert_eq!(
        psql(
            &pg,
            &format!(
                "SELECT octet_length(purchase_notes) || ',' || octet_length(purchase_id) \
                 FROM {schema}.user_quota_replenishment WHERE user_id = 'limits'"
            )
        ),
        "4096,255"
    );
    for (opt, value, what) in [
        ("NOTES", "n".repeat(4097), "NOTES"),
        ("PURCHASE", "p".repeat(256), "PURCHASE"),
    ] {
        let r = raw.call(&cmd_on("QUOTA.GRANT", &ids, &[opt, &value]));
        assert!(
            r.is_error() && r.text().contains(what),
            "{opt} of {} bytes: {r:?}",
            value.len()
        );
    }

    // Leases: 128 bytes everywhere a lease id goes, 129 refused.
    let lease = "l".repeat(128);
    let acc = ["t", "p", "leases", "b"];
    let m = map_of(
        raw.call(&cmd_on("QUOTA.ADMIT", &acc, &["LEASE", &lease])),
        "ADMIT",
    );
    assert_eq!(text_of(&m, "lease"), lease);
    let c = map_of(
        raw.call(&cmd_on("QUOTA.COMMIT", &acc, &["5", "LEASE", &lease])),
        "COMMIT",
    );
    assert_eq!(int_of(&c, "lease_held"), 1);
    let m = map_of(
        raw.call(&cmd_on("QUOTA.ADMIT", &acc, &["LEASE", &lease])),
        "ADMIT",
    );
    assert_eq!(text_of(&m, "lease"), lease);
    assert_eq!(
        raw.call(&cmd_on("QUOTA.RELEASE", &acc, &[&lease])),
        Reply::Int(1)
    );
    let long = "l".repeat(129);
    for c in [
        cmd_on("QUOTA.ADMIT", &acc, &["LEASE", &long]),
        cmd_on("QUOTA.COMMIT", &acc, &["5", "LEASE", &long]),
        cmd_on("QUOTA.RELEASE", &acc, &[&long]),
    ] {
        let r = raw.call(&c);
        assert!(
            r.is_error() && r.text().to_lowercase().contains("lease"),
            "{}: {r:?}",
            show_args(&c[..1])
        );
    }
    let u = map_of(raw.call(&cmd_on("QUOTA.USAGE", &acc, &[])), "USAGE");
    assert_eq!(
        (
            int_of(&u, "requests_per_day"),
            int_of(&u, "tokens_per_day"),
            int_of(&u, "in_flight")
        ),
        (1, 5, 0),
        "refused lease commands changed the account"
    );
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

#[test]
fn the_postgres_password_never_leaks() {
    let shared = PgServer::shared();
    // The throwaway server trusts local connections, so any password connects.
    let secret = "Sup3rS3cretPw";
    let url = shared.replacen("postgres@", &format!("postgres:{secret}@"), 1);
    assert!(url.contains(secret), "cannot put a password in {shared}");
    let schema = unique_schema();
    let server = RedisServer::builder()
        .pg(&url, &schema, "1000")
        .conf("slowlog-log-slower-than 0")
        .start();
    let mut raw = Raw::connect(server.port(), false);
    let mut replies: Vec<String> = Vec::new();
    let mut run = |raw: &mut Raw, args: &[&str]| {
        let r = raw.call(&bytes(args));
        replies.push(format!("{r:?}"));
        r
    };
    let g = run(
        &mut raw,
        &["QUOTA.GRANT", "t", "p", "u", "*", "REQUESTS_PER_DAY", "1"],
    );
    assert!(!g.is_error(), "GRANT through a URL with a password: {g:?}");
    run(&mut raw, &["QUOTA.ADMIT", "t", "p", "u", "b"]);

    // A second password, on a server that is not there: the failures must not show it.
    let other = "An0therS3cret";
    let dead = format!(
        "postgresql://postgres:{other}@127.0.0.1:{}/postgres",
        free_port()
    );
    let set = run(&mut raw, &["CONFIG", "SET", "quota.pg-url", &dead]);
    assert!(!set.is_error(), "CONFIG SET quota.pg-url: {set:?}");
    let failed = run(
        &mut raw,
        &["QUOTA.GRANT", "t", "p", "u2", "*", "REQUESTS_PER_DAY", "1"],
    );
    assert!(failed.is_error(), "GRANT on a dead server: {failed:?}");
    run(&mut raw, &["QUOTA.GET", "t", "p", "u3", "b"]);
    run(&mut raw, &["QUOTA.LIST", "t", "p", "u"]);
    run(&mut raw, &["QUOTA.ADMIT", "t", "p", "u4", "b"]);
    // A URL that does not parse.
    let bad = format!("postgresql://postgres:{other}@[::1");
    run(&mut raw, &["CONFIG", "SET", "quota.pg-url", &bad]);
    run(&mut raw, &["QUOTA.GRANT", "t", "p", "u5", "*", "ADD"]);

    let info = run(&mut raw, &["INFO", "everything"]);
    let slowlog = run(&mut raw, &["SLOWLOG", "GET", "1000"]);
    let modules = run(&mut raw, &["MODULE", "LIST"]);
    let config = match run(&mut raw, &["CONFIG", "GET", "*"]) {
        Reply::Array(items) => items,
        other => panic!("CONFIG GET *: {other:?}"),
    };
    let mut config_text = String::new();
    for kv in config.chunks(2) {
        // The two settings that hold it return it, as `masterauth` does.
        if !["quota.pg-url", "quota.pg-password"].contains(&kv[0].text().as_str()) {
            config_text.push_str(&format!("{} {}\n", kv[0].text(), kv[1].text()));
        }
    }
    let log = server.log();
    for pw in [secret, other] {
        for (what, text) in [
            ("INFO everything", info.text()),
            ("SLOWLOG", format!("{slowlog:?}")),
            ("MODULE LIST", format!("{modules:?}")),
            (
                "CONFIG GET * (other than quota.pg-url and quota.pg-password)",
                config_text.clone(),
            ),
            ("a reply", replies.join("\n")),
            ("the Redis log", log.clone()),
        ] {
            assert!(
                !text.contains(pw),
                "the password {pw} appears in {what}:\n{text}"
            );
        }
    }
}
