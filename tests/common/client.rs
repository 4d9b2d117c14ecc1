//! Account commands (QUOTA.ADMIT / USAGE / COMMIT).

use super::*;

/// A map reply.
pub type Map = HashMap<String, Value>;

/// The account key name, as README documents it (length-prefixed parts, user hash tag).
pub fn account_key(acc: [&str; 4]) -> String {
    let [t, p, u, b] = acc;
    format!(
        "q:{{{u}}}:{}:{t}{}:{p}{}:{u}{}:{b}",
        t.len(),
        p.len(),
        u.len(),
        b.len()
    )
}

/// `name t p u b opts...`.
pub fn with_account<'a>(name: &'a str, acc: [&'a str; 4], opts: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![name];
    args.extend_from_slice(&acc);
    args.extend_from_slice(opts);
    args
}

/// `QUOTA.ADMIT` as a map.
pub fn admit(con: &mut redis::Connection, acc: [&str; 4], opts: &[&str]) -> Map {
    query_map(con, &with_account("QUOTA.ADMIT", acc, opts))
}

/// `QUOTA.USAGE` as a map.
pub fn usage(con: &mut redis::Connection, acc: [&str; 4]) -> Map {
    query_map(con, &with_account("QUOTA.USAGE", acc, &[]))
}

/// `QUOTA.COMMIT` as a map.
pub fn commit(
    con: &mut redis::Connection,
    acc: [&str; 4],
    tokens: &str,
    lease: Option<&str>,
) -> Map {
    let mut opts = vec![tokens];
    if let Some(l) = lease {
        opts.extend_from_slice(&["LEASE", l]);
    }
    query_map(con, &with_account("QUOTA.COMMIT", acc, &opts))
}

/// `QUOTA.GRANT t p u b opts...` as a map (the stored record).
pub fn grant(con: &mut redis::Connection, ids: [&str; 4], opts: &[&str]) -> Map {
    query_map(con, &with_account("QUOTA.GRANT", ids, opts))
}

/// `QUOTA.GET` as a record, `None` for nil.
pub fn get(con: &mut redis::Connection, ids: [&str; 4]) -> Option<Map> {
    let args = with_account("QUOTA.GET", ids, &[]);
    match query(con, &args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
        Value::Nil => None,
        v => Some(to_map(v)),
    }
}
