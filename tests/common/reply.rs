//! Commands and replies: build commands, read maps (RESP2 or RESP3).

use super::*;

/// Builds a command from string arguments: `cmd(&["QUOTA.GET", "a", "b", "c", "*"])`.
pub fn cmd(args: &[&str]) -> redis::Cmd {
    assert!(!args.is_empty());
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// Runs a command and returns its raw reply (errors as `Err`).
pub fn query(con: &mut impl redis::ConnectionLike, args: &[&str]) -> redis::RedisResult<Value> {
    cmd(args).query(con)
}

/// Runs a command whose reply is a map; panics on an error reply or a non-map reply.
pub fn query_map(con: &mut impl redis::ConnectionLike, args: &[&str]) -> HashMap<String, Value> {
    let v = query(con, args).unwrap_or_else(|e| panic!("{args:?} failed: {e}"));
    to_map(v)
}

/// Runs a command that must fail; returns the error text (e.g. "ERR bad amount").
pub fn query_err(con: &mut impl redis::ConnectionLike, args: &[&str]) -> String {
    must_fail(&format!("{args:?}"), query(con, args))
}

/// The error text of a reply that must be an error; panics naming `what` on a success.
pub fn must_fail(what: &str, r: redis::RedisResult<Value>) -> String {
    match r {
        Ok(v) => panic!("{what} should have failed, got {v:?}"),
        Err(e) => error_text(&e),
    }
}

/// The full text of an error reply: code plus detail ("TRYAGAIN ...", "ERR ...").
pub fn error_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

/// A string view of a scalar reply (bulk/simple/verbatim strings, integers, doubles, booleans).
pub fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        Value::Boolean(b) => Some(if *b { "1" } else { "0" }.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::BigNumber(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A map reply (RESP3 map, or RESP2 flat field/value array) as field -> value.
pub fn try_to_map(v: Value) -> Option<HashMap<String, Value>> {
    match v {
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| value_to_string(&k).map(|k| (k, v)))
            .collect(),
        Value::Array(items) if items.len() % 2 == 0 => {
            let mut out = HashMap::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.insert(value_to_string(&k)?, v);
            }
            Some(out)
        }
        Value::Attribute { data, .. } => try_to_map(*data),
        _ => None,
    }
}

/// Like [`try_to_map`], panicking on anything that is not a map.
pub fn to_map(v: Value) -> HashMap<String, Value> {
    let shown = format!("{v:?}");
    try_to_map(v).unwrap_or_else(|| panic!("not a map reply: {shown}"))
}

/// An integer field (an Int, or a string holding an integer); panics when absent or not one.
pub fn field_i64(m: &HashMap<String, Value>, field: &str) -> i64 {
    let v = m
        .get(field)
        .unwrap_or_else(|| panic!("no field {field:?} in {m:?}"));
    value_i64(v).unwrap_or_else(|| panic!("field {field:?} is not an integer: {v:?}"))
}

/// An integer from an Int, Boolean, integral Double or integer string.
pub fn value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Boolean(b) => Some(i64::from(*b)),
        Value::Double(d) if d.fract() == 0.0 => Some(*d as i64),
        other => value_to_string(other)?.trim().parse().ok(),
    }
}

/// A string field; `None` when the field is nil. Panics when the field is absent.
pub fn field_str(m: &HashMap<String, Value>, field: &str) -> Option<String> {
    let v = m
        .get(field)
        .unwrap_or_else(|| panic!("no field {field:?} in {m:?}"));
    match v {
        Value::Nil => None,
        other => Some(
            value_to_string(other)
                .unwrap_or_else(|| panic!("field {field:?} is not a string: {other:?}")),
        ),
    }
}

/// True when the field is present and nil.
pub fn field_is_nil(m: &HashMap<String, Value>, field: &str) -> bool {
    matches!(m.get(field), Some(Value::Nil))
}

/// The elements of an array/set reply (panics otherwise).
pub fn to_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Nil => Vec::new(),
        other => panic!("not an array reply: {other:?}"),
    }
}

/// Runs a command whose reply is an integer (or a string holding one); panics otherwise.
pub fn query_i64(con: &mut impl redis::ConnectionLike, args: &[&str]) -> i64 {
    let v = query(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    value_i64(&v).unwrap_or_else(|| panic!("{args:?} replied {v:?}"))
}

/// Runs a command whose reply is a string; panics otherwise.
pub fn query_string(con: &mut impl redis::ConnectionLike, args: &[&str]) -> String {
    let v = query(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    value_to_string(&v).unwrap_or_else(|| panic!("{args:?} replied {v:?}"))
}
