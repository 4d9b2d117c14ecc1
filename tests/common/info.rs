//! INFO fields and the wall clock.

use super::*;

/// One `INFO <section>` field as text; panics when absent.
pub fn info_str_in(server: &RedisServer, section: &str, field: &str) -> String {
    let info = server.info(section);
    info.get(field)
        .cloned()
        .unwrap_or_else(|| panic!("INFO {section} has no {field}: {info:?}"))
}

/// One `INFO <section>` field as an integer; panics when absent or not an integer.
pub fn info_i64_in(server: &RedisServer, section: &str, field: &str) -> i64 {
    let v = info_str_in(server, section, field);
    v.parse()
        .unwrap_or_else(|e| panic!("{field} in INFO {section}: {v:?}: {e}"))
}

/// One `INFO quota` field (full name, e.g. `quota_queue_depth`) as text.
pub fn info_str(server: &RedisServer, field: &str) -> String {
    info_str_in(server, "quota", field)
}

/// One `INFO quota` field (full name, e.g. `quota_queue_depth`) as an integer.
pub fn info_i64(server: &RedisServer, field: &str) -> i64 {
    info_i64_in(server, "quota", field)
}

/// Unix time in seconds.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}
