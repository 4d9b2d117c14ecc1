//! Loading untrusted account values: `RESTORE` payloads (valid CRC64, mutated module value) and
//! RDB files with a bad value, against a real redis-server with the module.
//!
//! A bad value must fail its load ("Bad data format", nothing changed) or stop the start with a
//! log line naming the key and the reason, never take the server down with a signal.
//! `QUOTA_FUZZ_COUNT` sets how many payloads the fuzz tries (default 20,000, about a second;
//! `make fuzz` runs far more).
mod common;

use std::os::unix::process::ExitStatusExt;

use common::*;

/// A xorshift generator, seeded per run (printed so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutates `bytes` once: a byte set or flipped, a byte inserted or removed, a varint-sized run
/// replaced by a large number, or the tail cut.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let at = rng.below(bytes.len() + 1);
    let value = rng.next() as u8;
    match rng.below(6) {
        0 if at < bytes.len() => bytes[at] = value,
        1 if at < bytes.len() => bytes[at] ^= 1 << (value % 8),
        2 => bytes.insert(at, value),
        3 if at < bytes.len() => {
            bytes.remove(at);
        }
        4 if at < bytes.len() => {
            let big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
            let n = 1 + rng.below(big.len());
            bytes.splice(at..at, big[..n].iter().copied());
        }
        _ => bytes.truncate(at),
    }
}

/// One fuzzed payload made from a real one.
fn fuzzed(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let payload = &corpus[rng.below(corpus.len())];
    let dump = Dump::split(payload);
    match rng.below(4) {
        // The account bytes mutated, framed with their true length: reaches the decoder.
        0 | 1 => {
            let mut state = dump.state.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(rng, &mut state);
            }
            dump.frame(&state, state.len())
        }
        // The account intact, its length wrong: a short read or bytes left in the stream.
        2 => {
            let len = match rng.below(3) {
                0 => dump.state.len() + 1 + rng.below(8),
                1 => dump.state.len().saturating_sub(1 + rng.below(8)),
                _ => rng.below(1 << 20),
            };
            dump.frame(&dump.state, len)
        }
        // Anything in the payload but its version and CRC.
        _ => {
            let mut body = payload[..payload.len() - 10].to_vec();
            mutate(rng, &mut body);
            body.extend_from_slice(&dump.version);
            body.extend_from_slice(&[0; 8]);
            fix_crc(&mut body);
            body
        }
    }
}

/// The identities of the accounts `populate` creates.
fn identities() -> Vec<[String; 4]> {
    (0..6)
        .map(|i| ["acme", "chat", &format!("user{i}"), "pro"].map(String::from))
        .collect()
}

fn ids(who: &[String; 4]) -> [&str; 4] {
    [&who[0], &who[1], &who[2], &who[3]]
}

/// Accounts with counters, generated and named leases with reservations, settled ids, a
/// lifetime count, (three of them) smooth rates and (two) leases of a cost; plus a plain
/// string key.
fn populate(con: &mut redis::Connection) {
    for (i, who) in identities().iter().enumerate() {
        let acc = ids(who);
        for n in 0..=i {
            let lease = format!("lease-{n}-é");
            con.admit(
                acc,
                [
                    "MAX_CONCURRENT",
                    "50",
                    "LEASE",
                    &lease,
                    "RESERVE",
                    "7",
                    "LEASE_TTL",
                    "3000",
                ],
            );
            con.admit(acc, "TOKENS_PER_DAY 1000 RESERVE 3 TOTAL_REQUESTS 100");
            // The last three also have smooth rates' state (encoding 4).
            if i >= 3 {
                con.admit(
                    acc,
                    "REQUESTS_PER_SECOND 100 TOKENS_PER_MINUTE 90000 RESERVE 2",
                );
            }
            // Two hold leases of a cost other than 1 (encoding 5), one with rates.
            if i == 2 || i == 5 {
                let lease = format!("costly-{n}");
                let cost = (n + 2).to_string();
                con.admit(
                    acc,
                    ["MAX_CONCURRENT", "50", "LEASE", &lease, "COST", &cost],
                );
            }
        }
        if i % 2 == 0 {
            con.commit(acc, 11, Some("lease-0-é"));
            con.commit(acc, 5, Some("0123456789abcdef"));
        }
    }
    query(con, &["SET", "plain", "value"]).expect("SET");
    // The rates' levels drain within 80 ms: after that, what `QUOTA.USAGE` shows of them (0)
    // no longer changes with the time a snapshot is taken.
    std::thread::sleep(std::time::Duration::from_millis(300));
}

/// Every key's `DUMP` and every account's `QUOTA.USAGE`.
fn snapshot(con: &mut redis::Connection) -> Snapshot {
    let mut keys: Vec<String> = to_array(query(con, &["KEYS", "*"]).expect("KEYS"))
        .iter()
        .filter_map(value_to_string)
        .collect();
    keys.sort();
    let dumps = keys
        .into_iter()
        .map(|k| {
            let dump = query(con, &["DUMP", &k]).expect("DUMP");
            (k, dump)
        })
        .collect();
    let usages = identities().iter().map(|w| con.usage(ids(w))).collect();
    (dumps, usages)
}

type Snapshot = (Vec<(String, Value)>, Vec<Usage>);

/// A server whose `DUMP` payloads and RDB strings are uncompressed, with these redis.conf
/// lines too, populated; with a connection and its snapshot.
fn populated_server_with(conf: &[&str]) -> (RedisServer, redis::Connection, Snapshot) {
    let server = conf
        .iter()
        .fold(
            RedisServer::builder().conf("rdbcompression no"),
            |b, line| b.conf(line),
        )
        .start();
    let mut con = server.client();
    populate(&mut con);
    let before = snapshot(&mut con);
    (server, con, before)
}

fn populated_server() -> (RedisServer, redis::Connection, Snapshot) {
    populated_server_with(&[])
}

/// The key of the populated account with two leases held (`lease-0-é`, `lease-1-é`), and its
/// uncompressed `DUMP`.
fn two_lease_account(con: &mut redis::Connection) -> (String, Vec<u8>) {
    let key = account_key(ids(&identities()[1]));
    let dump = bytes_of(&query(con, &["DUMP", &key]).expect("DUMP"));
    (key, dump)
}

fn bytes_of(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => panic!("not a bulk string: {other:?}"),
    }
}

fn fuzz_count() -> usize {
    std::env::var("QUOTA_FUZZ_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Thousands of mutated account payloads with valid CRC64 trailers, with and without
/// `sanitize-dump-payload`: each is restored or refused, the server stays up, the restored ones
/// work with every command and reload from RDB, and no key that was there before changes.
#[test]
fn restore_fuzz_never_takes_the_server_down_nor_touches_other_keys() {
    let (mut server, mut con, before) = populated_server();
    let corpus: Vec<Vec<u8>> = before
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("q:"))
        .map(|(_, v)| bytes_of(v))
        .collect();
    assert_eq!(corpus.len(), identities().len());
    let seed = std::env::var("QUOTA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(random_u64)
        | 1;
    let mut rng = Rng(seed);
    let count = fuzz_count();
    let scratch: Vec<String> = (0..8)
        .map(|i| account_key(["fz", "p", &format!("u{i}"), "b"]))
        .collect();
    let (mut restored, mut refused) = (0usize, 0usize);
    for i in 0..count {
        if i == count / 2 {
            query(&mut con, &["CONFIG", "SET", "sanitize-dump-payload", "yes"]).expect("CONFIG");
        }
        let payload = fuzzed(&mut rng, &corpus);
        let user = format!("u{}", i % scratch.len());
        let key = &scratch[i % scratch.len()];
        let reply = cmd(&["RESTORE", key, "0"])
            .arg(&payload)
            .arg("REPLACE")
            .query::<Value>(&mut con);
        match reply {
            Ok(_) => {
                restored += 1;
                // An account that loaded must work with every command (a mutated type byte
                // may also have made it another kind of value).
                let acc = ["fz", "p", &user, "b"];
                let kind = query(&mut con, &["TYPE", key]).expect("TYPE");
                if value_to_string(&kind).as_deref() == Some("quota-acc") {
                    con.usage(acc);
                }
                let _ = query(
                    &mut con,
                    &with_account(
                        "QUOTA.ADMIT",
                        acc,
                        &["MAX_CONCURRENT", "5", "LEASE", "x", "RESERVE", "2"],
                    ),
                );
                let _ = query(
                    &mut con,
                    &with_account("QUOTA.COMMIT", acc, &["1", "LEASE", "x"]),
                );
                let _ = query(&mut con, &with_account("QUOTA.RELEASE", acc, &["y"]));
                let _ = query(&mut con, &["DUMP", key]);
                let _ = query(&mut con, &["MEMORY", "USAGE", key]);
            }
            Err(e) => {
                refused += 1;
                let text = error_text(&e);
                assert!(
                    text.contains("Bad data format") || text.contains("payload"),
                    "seed {seed}, payload {i}: {text}"
                );
            }
        }
        assert!(
            server.is_alive(),
            "seed {seed}: the server died on payload {i}: {payload:02x?}"
        );
    }
    eprintln!("seed {seed}: {count} payloads, {restored} restored, {refused} refused");
    assert!(
        refused > count / 10 && restored > 0,
        "{restored} restored, {refused} refused"
    );
    // What was restored saves and loads again.
    query(&mut con, &["DEBUG", "RELOAD"]).expect("DEBUG RELOAD");
    let mut con = server.client();
    for key in &scratch {
        query(&mut con, &["DEL", key]).expect("DEL");
    }
    assert_eq!(
        snapshot(&mut con),
        before,
        "seed {seed}: a pre-existing key changed"
    );
    assert!(server.is_alive());
}

/// `RESTORE` of an account whose module string has one wrong length byte (the payload of the
/// original report): refused with "Bad data format", and nothing changes.
#[test]
fn a_restore_with_a_wrong_length_byte_is_refused_and_changes_nothing() {
    let (mut server, mut con, before) = populated_server();
    let (key, value) = before
        .0
        .iter()
        .find(|(k, _)| k.starts_with("q:"))
        .expect("an account key");
    let dump = Dump::split(&bytes_of(value));
    for len in [
        dump.state.len() + 1,
        dump.state.len() + 30,
        dump.state.len() - 1,
    ] {
        let bad = dump.frame(&dump.state, len);
        for target in [key, "fresh-key"] {
            let err = cmd(&["RESTORE", target, "0"])
                .arg(&bad)
                .arg("REPLACE")
                .query::<Value>(&mut con)
                .expect_err("a bad payload must be refused");
            assert!(error_text(&err).contains("Bad data format"), "{err}");
            assert!(server.is_alive());
        }
    }
    assert_eq!(snapshot(&mut con), before);
    assert!(server
        .log()
        .contains("refusing the quota-acc value of key 'fresh-key'"));
}

/// Saves the accounts of `populate` (uncompressed), applies `corrupt` to the RDB file, fixes
/// its CRC and starts again: the start must fail without a signal, with a log line naming the
/// account key and the reason. Returns the log.
fn start_with_corrupt_rdb(corrupt: impl Fn(&mut Vec<u8>, &[u8])) -> String {
    let (mut server, mut con, _) = populated_server_with(&["save 3600 1"]);
    let (key, value) = two_lease_account(&mut con);
    query(&mut con, &["SAVE"]).expect("SAVE");
    server.kill9();
    let path = server.dir().join("dump.rdb");
    let mut rdb = std::fs::read(&path).expect("dump.rdb");
    // The value as it sits in the file (after the type byte and the key name): the DUMP
    // payload without its type byte, version and CRC.
    corrupt(&mut rdb, &value[1..value.len() - 10]);
    fix_crc(&mut rdb);
    std::fs::write(&path, &rdb).expect("write dump.rdb");
    let status = server.restart_expecting_exit();
    let log = server.log();
    assert_eq!(
        status.signal(),
        None,
        "redis-server was killed by a signal ({status})\n{log}"
    );
    assert!(
        log.contains(&format!("refusing the quota-acc value of key '{key}'")),
        "no log line names the key:\n{log}"
    );
    log
}

fn position(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:02x?} not found"))
}

/// A value that reads well but breaks an invariant (a lease id held twice).
#[test]
fn an_rdb_value_breaking_an_invariant_stops_the_start_with_the_key_and_reason() {
    let log = start_with_corrupt_rdb(|rdb, value| {
        let at = position(rdb, value);
        let second = position(&rdb[at..], "lease-1-é".as_bytes());
        rdb[at + second + 6] = b'0';
    });
    assert!(log.contains("lease id held twice"), "{log}");
}

/// A value whose module string is longer than the rest of the file (a short read for the
/// module, the crash of the original report).
#[test]
fn an_rdb_value_with_a_wrong_length_stops_the_start_with_the_key_and_reason() {
    let log = start_with_corrupt_rdb(|rdb, value| {
        // module-id(9) opcode(1), then the string's length (1, 2 or 5 bytes).
        let at = position(rdb, value) + 10;
        let width = match rdb[at] >> 6 {
            0 => 1,
            1 => 2,
            _ => 5,
        };
        let mut len = Vec::new();
        rdb_len(&mut len, rdb.len() - at + 100);
        rdb.splice(at..at + width, len);
    });
    assert!(log.contains("short read"), "{log}");
}

/// A `DUMP` of an account written by the build before committed ids were kept by time (Redis
/// 7.0.15, 2026-11-30): 4 leases, one generated, 64 committed ids, 4 requests and 140 tokens.
const OLD_DUMP_HEX: &[&str] = &[
    "0781aaea2d6be69c70010543ef0100e6c40204d40a04aef33c8c01e6c4028c01d40a8c010404103737323861",
    "6463363931616463653933cabfd2d0c56800e6c402d40a076c656173652d308ae0e0a2c66805e6c402d40a07",
    "6c656173652d318ae0e0a2c66805e6c402d40a076c656173652d328ae0e0a2c66805e6c402d40a4007646f6e",
    "652d3633cc99b5d0c56807646f6e652d3634cc99b5d0c56807646f6e652d3635cc99b5d0c56807646f6e652d",
    "3636cc99b5d0c56807646f6e652d3637cc99b5d0c56807646f6e652d3638cc99b5d0c56806646f6e652d36ca",
    "99b5d0c56806646f6e652d37ca99b5d0c56806646f6e652d38ca99b5d0c56806646f6e652d39ca99b5d0c568",
    "07646f6e652d3130ca99b5d0c56807646f6e652d3131ca99b5d0c56807646f6e652d3132cc99b5d0c5680764",
    "6f6e652d3133cc99b5d0c56807646f6e652d3134cc99b5d0c56807646f6e652d3135cc99b5d0c56807646f6e",
    "652d3136cc99b5d0c56807646f6e652d3137cc99b5d0c56807646f6e652d3138cc99b5d0c56807646f6e652d",
    "3139cc99b5d0c56807646f6e652d3230cc99b5d0c56807646f6e652d3231cc99b5d0c56807646f6e652d3232",
    "cc99b5d0c56807646f6e652d3233cc99b5d0c56807646f6e652d3234cc99b5d0c56807646f6e652d3235cc99",
    "b5d0c56807646f6e652d3236cc99b5d0c56807646f6e652d3237cc99b5d0c56807646f6e652d3238cc99b5d0",
    "c56807646f6e652d3239cc99b5d0c56807646f6e652d3330cc99b5d0c56807646f6e652d3331cc99b5d0c568",
    "07646f6e652d3332cc99b5d0c56807646f6e652d3333cc99b5d0c56807646f6e652d3334cc99b5d0c5680764",
    "6f6e652d3335cc99b5d0c56807646f6e652d3336cc99b5d0c56807646f6e652d3337cc99b5d0c56807646f6e",
    "652d3338cc99b5d0c56807646f6e652d3339cc99b5d0c56807646f6e652d3430cc99b5d0c56807646f6e652d",
    "3431cc99b5d0c56807646f6e652d3432cc99b5d0c56807646f6e652d3433cc99b5d0c56807646f6e652d3434",
    "cc99b5d0c56807646f6e652d3435cc99b5d0c56807646f6e652d3436cc99b5d0c56807646f6e652d3437cc99",
    "b5d0c56807646f6e652d3438cc99b5d0c56807646f6e652d3439cc99b5d0c56807646f6e652d3530cc99b5d0",
    "c56807646f6e652d3531cc99b5d0c56807646f6e652d3532cc99b5d0c56807646f6e652d3533cc99b5d0c568",
    "07646f6e652d3534cc99b5d0c56807646f6e652d3535cc99b5d0c56807646f6e652d3536cc99b5d0c5680764",
    "6f6e652d3537cc99b5d0c56807646f6e652d3538cc99b5d0c56807646f6e652d3539cc99b5d0c56807646f6e",
    "652d3630cc99b5d0c56807646f6e652d3631cc99b5d0c56807646f6e652d3632cc99b5d0c56807646f6e652d",
    "3639cc99b5d0c568000a0094af203f8a5c39c4",
];

/// Values written before this build (same encoding version, at most 64 committed ids) still
/// load, and encode back to the same bytes.
#[test]
fn an_account_written_by_the_previous_build_still_restores() {
    let server = RedisServer::builder().conf("rdbcompression no").start();
    let mut con = server.client();
    let hex: String = OLD_DUMP_HEX.concat();
    let old: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let acc = ["t", "p", "alice", "b"];
    let key = account_key(acc);
    cmd(&["RESTORE", &key, "0"])
        .arg(&old)
        .query::<Value>(&mut con)
        .expect("an old payload restores");
    assert_eq!(con.usage(acc).total_requests, 4);
    let again = bytes_of(&query(&mut con, &["DUMP", &key]).expect("DUMP"));
    assert_eq!(Dump::split(&again).state, Dump::split(&old).state);
}

/// `QUOTA.SETSTATE <key> <state>` as the AOF holds it.
fn setstate_command(key: &str, state: &[u8]) -> Vec<u8> {
    let mut out = b"*3\r\n$14\r\nQUOTA.SETSTATE\r\n".to_vec();
    for arg in [key.as_bytes(), state] {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `QUOTA.SETSTATE` (what replicas and the AOF apply) decodes through the same checks: a state
/// that breaks an invariant stores nothing, a good one is stored.
#[test]
fn setstate_from_the_aof_refuses_a_state_breaking_an_invariant() {
    let (mut server, mut con, _) = populated_server_with(&["appendonly yes", "appendfsync always"]);
    let (key, value) = two_lease_account(&mut con);
    let state = Dump::split(&value).state;
    let mut twice = state.clone();
    let at = position(&twice, "lease-1-é".as_bytes());
    twice[at + 6] = b'0';
    server.kill9();
    let dir = server.dir().join("appendonlydir");
    let incr = std::fs::read_dir(&dir)
        .expect("appendonlydir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .expect("an incremental AOF file");
    let mut aof = std::fs::read(&incr).expect("read AOF");
    aof.extend(setstate_command("q:bad", &twice));
    aof.extend(setstate_command("q:good", &state));
    std::fs::write(&incr, aof).expect("write AOF");
    server.restart();
    let mut con = server.client();
    assert_eq!(
        value_i64(&query(&mut con, &["EXISTS", "q:bad"]).expect("EXISTS")),
        Some(0)
    );
    assert_eq!(
        value_i64(&query(&mut con, &["EXISTS", "q:good"]).expect("EXISTS")),
        Some(1)
    );
    assert_eq!(
        query(&mut con, &["DUMP", "q:good"]).expect("DUMP"),
        query(&mut con, &["DUMP", &key]).expect("DUMP")
    );
}
