//! A typed client for the `QUOTA.*` commands: [`Quota`] gives every connection (plain,
//! RESP3, cluster) one method a command, and the replies come back as structs ([`Admit`],
//! [`Usage`], [`Commit`]) read the same from RESP2 flat arrays and RESP3 maps, so a test is
//! its scenario and its assertions.
//!
//! Options are given as the wire words: `"REQUESTS_PER_DAY 10 RESERVE 50"` (split on
//! whitespace), a slice of words, or an [`Opts`] builder for values computed in the test.
//! Every method panics on an error reply (the `try_` ones return it); parsing is strict: a
//! field the command documents that is missing or of the wrong kind fails the test.

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

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// Command options as words: a `&str` is split on whitespace, slices and vectors are taken
/// word for word (for values with spaces), an [`Opts`] is its words.
pub trait ToArgs {
    fn to_args(&self) -> Vec<String>;
}

impl ToArgs for str {
    fn to_args(&self) -> Vec<String> {
        self.split_whitespace().map(String::from).collect()
    }
}

impl ToArgs for String {
    fn to_args(&self) -> Vec<String> {
        self.as_str().to_args()
    }
}

impl ToArgs for [&str] {
    fn to_args(&self) -> Vec<String> {
        self.iter().map(|s| s.to_string()).collect()
    }
}

impl<const N: usize> ToArgs for [&str; N] {
    fn to_args(&self) -> Vec<String> {
        self[..].to_args()
    }
}

impl ToArgs for Vec<&str> {
    fn to_args(&self) -> Vec<String> {
        self[..].to_args()
    }
}

impl ToArgs for [String] {
    fn to_args(&self) -> Vec<String> {
        self.to_vec()
    }
}

impl ToArgs for Vec<String> {
    fn to_args(&self) -> Vec<String> {
        self.clone()
    }
}

impl<T: ToArgs + ?Sized> ToArgs for &T {
    fn to_args(&self) -> Vec<String> {
        (**self).to_args()
    }
}

/// Options built from values: `Opts::new().limit("REQUESTS_PER_DAY", n).lease(&id).peek()`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Opts(pub Vec<String>);

impl Opts {
    /// No options; [`Opts::words`] starts from words.
    pub fn new() -> Opts {
        Opts::default()
    }

    /// Starts from `words` (anything [`ToArgs`]).
    pub fn words(words: impl ToArgs) -> Opts {
        Opts(words.to_args())
    }

    /// `NAME value` (a limit such as `REQUESTS_PER_DAY`, or `EXPIRES_IN`, `NOTES`, ...).
    pub fn limit(self, name: &str, value: impl ToString) -> Opts {
        self.arg(name).arg(&value.to_string())
    }

    /// More words (anything [`ToArgs`]: `"PEEK VERBOSE"` is two).
    pub fn and(mut self, words: impl ToArgs) -> Opts {
        self.0.extend(words.to_args());
        self
    }

    /// One word as it is (may hold spaces).
    pub fn arg(mut self, word: &str) -> Opts {
        self.0.push(word.to_string());
        self
    }

    /// `POLICY name`.
    pub fn policy(self, name: &str) -> Opts {
        self.limit("POLICY", name)
    }

    /// `LEASE id`.
    pub fn lease(self, id: &str) -> Opts {
        self.limit("LEASE", id)
    }

    /// `RESERVE tokens`.
    pub fn reserve(self, tokens: i64) -> Opts {
        self.limit("RESERVE", tokens)
    }

    /// `PEEK`.
    pub fn peek(self) -> Opts {
        self.arg("PEEK")
    }

    /// `VERBOSE`.
    pub fn verbose(self) -> Opts {
        self.arg("VERBOSE")
    }

    /// `COMPACT`.
    pub fn compact(self) -> Opts {
        self.arg("COMPACT")
    }
}

impl ToArgs for Opts {
    fn to_args(&self) -> Vec<String> {
        self.0.clone()
    }
}

/// `[name, sub..., t, p, u, b, opts...]` as owned words.
fn command(name: &[&str], ids: &[&str], opts: impl ToArgs) -> Vec<String> {
    let mut args: Vec<String> = name.iter().chain(ids).map(|s| s.to_string()).collect();
    args.extend(opts.to_args());
    args
}

fn run(con: &mut impl redis::ConnectionLike, args: &[String]) -> redis::RedisResult<Value> {
    let mut c = redis::cmd(&args[0]);
    for a in &args[1..] {
        c.arg(a.as_str());
    }
    c.query(con)
}

fn must(con: &mut impl redis::ConnectionLike, args: &[String]) -> Value {
    run(con, args).unwrap_or_else(|e| panic!("{args:?}: {}", error_text(&e)))
}

/// An integer reply, strictly (not a string holding one).
fn must_int(con: &mut impl redis::ConnectionLike, args: &[String]) -> i64 {
    match must(con, args) {
        Value::Int(i) => i,
        other => panic!("{args:?} replied {other:?}, not an integer"),
    }
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// A 0/1 field as a bool (anything else fails the test).
pub fn field_bool(m: &Map, field: &str) -> bool {
    match field_i64(m, field) {
        0 => false,
        1 => true,
        other => panic!("field {field:?} is {other}, not 0 or 1: {m:?}"),
    }
}

/// A nested map field (`limits`, `usage`, `resets` of a `VERBOSE` admission).
pub fn field_map(m: &Map, field: &str) -> Map {
    let v = m
        .get(field)
        .unwrap_or_else(|| panic!("no field {field:?} in {m:?}"));
    to_map(v.clone())
}

/// A `QUOTA.ADMIT` reply (map, `VERBOSE` map, or `COMPACT` array).
#[derive(Debug, Clone, PartialEq)]
pub struct Admit {
    pub allowed: bool,
    /// `""` when allowed; several reasons are joined with `|`.
    pub reason: String,
    pub retry_after: i64,
    /// The same wait in ms (-1 never).
    pub retry_after_ms: i64,
    /// `None` when nil (or `""` in a compact reply).
    pub lease: Option<String>,
    pub reserved: i64,
    /// `None` in a compact reply (it has no such element).
    pub used_credit: Option<bool>,
    pub credit: String,
    pub remaining_requests: i64,
    pub remaining_tokens: i64,
    /// `windows`, `balance`, or `""` when denied.
    pub paid_by: String,
    /// `VERBOSE`: the effective limits (-1 = unlimited).
    pub limits: Option<Map>,
    /// `VERBOSE`: the counters after this call.
    pub usage: Option<Usage>,
    /// `VERBOSE`: `hour_reset`, `day_reset`, `month_reset`.
    pub resets: Option<Map>,
    /// The reply as a map (field names; compact replies by their documented names).
    pub map: Map,
}

/// The documented element order of a `COMPACT` reply.
pub const COMPACT_FIELDS: [&str; 10] = [
    "allowed",
    "retry_after",
    "remaining_requests",
    "remaining_tokens",
    "lease",
    "reason",
    "reserved",
    "credit",
    "paid_by",
    "retry_after_ms",
];

impl Admit {
    /// Reads a map reply, or a `COMPACT` array (eight elements, the first an integer).
    pub fn parse(v: Value) -> Admit {
        match v {
            Value::Array(items) if matches!(items.first(), Some(Value::Int(_))) => {
                Admit::parse_compact(items)
            }
            v => Admit::from_map(to_map(v)),
        }
    }

    /// A `COMPACT` reply: ten elements, none nil, `lease`/`reason` `""` when none.
    pub fn parse_compact(items: Vec<Value>) -> Admit {
        assert_eq!(items.len(), 10, "COMPACT has 10 elements: {items:?}");
        assert!(
            !items.iter().any(|v| matches!(v, Value::Nil)),
            "no COMPACT element is nil: {items:?}"
        );
        let map: Map = COMPACT_FIELDS
            .iter()
            .map(|f| f.to_string())
            .zip(items)
            .collect();
        let text = |f: &str| field_str(&map, f).unwrap_or_default();
        Admit {
            allowed: field_bool(&map, "allowed"),
            reason: text("reason"),
            retry_after: field_i64(&map, "retry_after"),
            retry_after_ms: field_i64(&map, "retry_after_ms"),
            lease: Some(text("lease")).filter(|l| !l.is_empty()),
            reserved: field_i64(&map, "reserved"),
            used_credit: None,
            credit: field_str(&map, "credit").unwrap_or_default(),
            remaining_requests: field_i64(&map, "remaining_requests"),
            remaining_tokens: field_i64(&map, "remaining_tokens"),
            paid_by: text("paid_by"),
            limits: None,
            usage: None,
            resets: None,
            map,
        }
    }

    /// A map reply (RESP2 or RESP3), with the `VERBOSE` parts when present.
    pub fn from_map(map: Map) -> Admit {
        let nested = |f: &str| map.contains_key(f).then(|| field_map(&map, f));
        Admit {
            allowed: field_bool(&map, "allowed"),
            reason: field_str(&map, "reason").unwrap_or_else(|| panic!("reason is nil: {map:?}")),
            retry_after: field_i64(&map, "retry_after"),
            retry_after_ms: field_i64(&map, "retry_after_ms"),
            lease: field_str(&map, "lease"),
            reserved: field_i64(&map, "reserved"),
            used_credit: Some(field_bool(&map, "used_credit")),
            credit: field_str(&map, "credit").unwrap_or_else(|| panic!("credit is nil: {map:?}")),
            remaining_requests: field_i64(&map, "remaining_requests"),
            remaining_tokens: field_i64(&map, "remaining_tokens"),
            paid_by: field_str(&map, "paid_by")
                .unwrap_or_else(|| panic!("paid_by is nil: {map:?}")),
            limits: nested("limits"),
            usage: nested("usage").map(Usage::from_map),
            resets: nested("resets"),
            map,
        }
    }

    /// The lease id; panics when the admission took none.
    pub fn lease(&self) -> String {
        self.lease
            .clone()
            .unwrap_or_else(|| panic!("no lease in {self:?}"))
    }

    /// True when admitted only thanks to the credits (panics on a compact reply).
    pub fn used_credit(&self) -> bool {
        self.used_credit
            .unwrap_or_else(|| panic!("a COMPACT reply has no used_credit: {self:?}"))
    }
}

/// A `QUOTA.USAGE` reply (also the `usage` of a `VERBOSE` admission, whose resets are 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub requests_per_day: i64,
    pub requests_per_month: i64,
    pub total_requests: i64,
    pub tokens_per_hour: i64,
    pub tokens_per_day: i64,
    pub tokens_per_month: i64,
    pub in_flight: i64,
    pub reserved: i64,
    /// `requests_per_second`, `requests_per_minute`, `tokens_per_minute`: what each smooth
    /// rate counts now.
    pub rates: [i64; 3],
    pub hour_reset: i64,
    pub day_reset: i64,
    pub month_reset: i64,
}

/// The smooth rates of a usage reply, in README's order.
pub const RATES: [&str; 3] = [
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
];

/// The counters of a usage reply, in README's order.
pub const COUNTERS: [&str; 8] = [
    "requests_per_day",
    "requests_per_month",
    "total_requests",
    "tokens_per_hour",
    "tokens_per_day",
    "tokens_per_month",
    "in_flight",
    "reserved",
];

impl Usage {
    /// Every counter must be there; the resets are read when present.
    pub fn from_map(m: Map) -> Usage {
        let reset = |f: &str| {
            if m.contains_key(f) {
                field_i64(&m, f)
            } else {
                0
            }
        };
        Usage {
            requests_per_day: field_i64(&m, "requests_per_day"),
            requests_per_month: field_i64(&m, "requests_per_month"),
            total_requests: field_i64(&m, "total_requests"),
            tokens_per_hour: field_i64(&m, "tokens_per_hour"),
            tokens_per_day: field_i64(&m, "tokens_per_day"),
            tokens_per_month: field_i64(&m, "tokens_per_month"),
            in_flight: field_i64(&m, "in_flight"),
            reserved: field_i64(&m, "reserved"),
            rates: RATES.map(|f| field_i64(&m, f)),
            hour_reset: reset("hour_reset"),
            day_reset: reset("day_reset"),
            month_reset: reset("month_reset"),
        }
    }

    /// The eight counters, in [`COUNTERS`] order.
    pub fn counters(&self) -> [i64; 8] {
        [
            self.requests_per_day,
            self.requests_per_month,
            self.total_requests,
            self.tokens_per_hour,
            self.tokens_per_day,
            self.tokens_per_month,
            self.in_flight,
            self.reserved,
        ]
    }
}

/// A `QUOTA.COMMIT` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub tokens: i64,
    pub duplicate: bool,
    pub lease_held: bool,
}

impl Commit {
    pub fn from_map(m: Map) -> Commit {
        Commit {
            tokens: field_i64(&m, "tokens"),
            duplicate: field_bool(&m, "duplicate"),
            lease_held: field_bool(&m, "lease_held"),
        }
    }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// The `QUOTA.*` commands on any connection: `con.admit(acc, "REQUESTS_PER_DAY 10")`.
pub trait Quota: redis::ConnectionLike + Sized {
    /// `QUOTA.ADMIT t p u b opts...`.
    fn admit(&mut self, acc: [&str; 4], opts: impl ToArgs) -> Admit {
        Admit::parse(must(self, &command(&["QUOTA.ADMIT"], &acc, opts)))
    }

    /// `QUOTA.ADMIT`, an error reply returned.
    fn try_admit(&mut self, acc: [&str; 4], opts: impl ToArgs) -> redis::RedisResult<Admit> {
        run(self, &command(&["QUOTA.ADMIT"], &acc, opts)).map(Admit::parse)
    }

    /// `QUOTA.COMMIT t p u b tokens [LEASE id]`.
    fn commit(&mut self, acc: [&str; 4], tokens: i64, lease: Option<&str>) -> Commit {
        let mut opts = Opts::new().arg(&tokens.to_string());
        if let Some(l) = lease {
            opts = opts.lease(l);
        }
        Commit::from_map(to_map(must(self, &command(&["QUOTA.COMMIT"], &acc, opts))))
    }

    /// `QUOTA.RELEASE t p u b lease`: 1 if the lease was held, else 0.
    fn release(&mut self, acc: [&str; 4], lease: &str) -> i64 {
        must_int(self, &command(&["QUOTA.RELEASE"], &acc, [lease]))
    }

    /// `QUOTA.USAGE t p u b`.
    fn usage(&mut self, acc: [&str; 4]) -> Usage {
        Usage::from_map(to_map(must(self, &command(&["QUOTA.USAGE"], &acc, ""))))
    }

    /// `QUOTA.RESET t p u b`: 1 if there was state, else 0.
    fn reset(&mut self, acc: [&str; 4]) -> i64 {
        must_int(self, &command(&["QUOTA.RESET"], &acc, ""))
    }

    /// `QUOTA.GRANT t p u b opts...`: the stored record (plus `duplicate`).
    fn grant(&mut self, ids: [&str; 4], opts: impl ToArgs) -> Map {
        to_map(must(self, &command(&["QUOTA.GRANT"], &ids, opts)))
    }

    /// `QUOTA.GET t p u b`: the record, `None` for nil.
    fn get(&mut self, ids: [&str; 4]) -> Option<Map> {
        match must(self, &command(&["QUOTA.GET"], &ids, "")) {
            Value::Nil => None,
            v => Some(to_map(v)),
        }
    }

    /// `QUOTA.REVOKE t p u b`: 1 if a live row was revoked, else 0.
    fn revoke(&mut self, ids: [&str; 4]) -> i64 {
        must_int(self, &command(&["QUOTA.REVOKE"], &ids, ""))
    }

    /// `QUOTA.LIST t p u [ALL]`: bundle -> record.
    fn list(&mut self, user: [&str; 3], all: bool) -> Map {
        let opts = if all { "ALL" } else { "" };
        to_map(must(self, &command(&["QUOTA.LIST"], &user, opts)))
    }

    /// `QUOTA.POLICY SET t p name limits...`: the stored policy.
    fn policy_set(&mut self, tp: [&str; 2], name: &str, limits: impl ToArgs) -> Map {
        let args = command(&["QUOTA.POLICY", "SET"], &[tp[0], tp[1], name], limits);
        to_map(must(self, &args))
    }

    /// `QUOTA.POLICY GET t p name`: the policy, `None` for nil.
    fn policy_get(&mut self, tp: [&str; 2], name: &str) -> Option<Map> {
        match must(
            self,
            &command(&["QUOTA.POLICY", "GET"], &[tp[0], tp[1], name], ""),
        ) {
            Value::Nil => None,
            v => Some(to_map(v)),
        }
    }

    /// `QUOTA.POLICY DEL t p name`: 1 if it existed, else 0.
    fn policy_del(&mut self, tp: [&str; 2], name: &str) -> i64 {
        must_int(
            self,
            &command(&["QUOTA.POLICY", "DEL"], &[tp[0], tp[1], name], ""),
        )
    }

    /// `QUOTA.INVALIDATE t p u`: drops the user's cached credits (the next admission loads).
    fn invalidate(&mut self, user: [&str; 3]) -> i64 {
        must_int(self, &command(&["QUOTA.INVALIDATE"], &user, ""))
    }
}

impl<C: redis::ConnectionLike> Quota for C {}
