//! Argument parsing for every `QUOTA.*` command, over plain byte slices (no Redis types), so it
//! can be unit- and property-tested. Options are case-insensitive keywords, in any order, each
//! at most once; every error names the bad argument and is the exact wire text. The commands'
//! shells (`crate::commands`) call it first; it decides nothing.

use std::fmt;

use crate::core::account::MAX_COST;
use crate::core::credit::{BalanceKind, Cents, GrantRequest};
use crate::core::ids::{check_id, AccountId, IdError, OwnedAccount, PolicyId, UserId};
use crate::core::ledger::MAX_TOKENS;
use crate::core::policy::{LimitField, Limits};
use crate::core::Millis;
use crate::runtime::jobs::{FindQuery, TopBy, TopQuery};

use cursor::CursorError;

/// Longest `PURCHASE` id, in bytes (the column is `VARCHAR(255)`).
pub(crate) const MAX_PURCHASE_LEN: usize = 255;
/// Longest `NOTES`, in bytes.
pub(crate) const MAX_NOTES_LEN: usize = 4096;
/// Longest `LEASE` id, in bytes.
pub(crate) const MAX_LEASE_LEN: usize = crate::core::account::MAX_LEASE_ID_LEN;
/// Latest accepted `EXPIRES_AT`: 9999-12-31T23:59:59Z.
pub(crate) const MAX_EXPIRES_AT: i64 = 253_402_300_799;

/// A refused command; `Display` is the wire error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseError {
    Arity,
    Id(IdError),
    NotANumber(&'static str),
    OutOfRange(&'static str, i64, i64),
    Unknown(String),
    Duplicate(&'static str),
    /// A text argument's length is outside 1..=max bytes.
    Length(&'static str, usize),
    /// The argument and what it must be (`"must ..."`).
    Invalid(&'static str, &'static str),
    Conflict(&'static str, &'static str),
}

impl From<IdError> for ParseError {
    fn from(e: IdError) -> Self {
        ParseError::Id(e)
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Arity => f.write_str("ERR wrong number of arguments"),
            ParseError::Id(e) => write!(f, "{e}"),
            ParseError::NotANumber(what) => {
                write!(f, "ERR {what} must be a non-negative integer")
            }
            ParseError::OutOfRange(what, lo, hi) => {
                write!(f, "ERR {what} must be between {lo} and {hi}")
            }
            ParseError::Unknown(word) => write!(f, "ERR unknown option '{word}'"),
            ParseError::Duplicate(what) => write!(f, "ERR {what} must be given at most once"),
            ParseError::Length(what, max) => write!(f, "ERR {what} must be 1 to {max} bytes"),
            ParseError::Invalid(what, why) => write!(f, "ERR {what} {why}"),
            ParseError::Conflict(a, b) => write!(f, "ERR {a} must not be given with {b}"),
        }
    }
}

/// Shows an unknown word safely: printable ASCII only, at most 32 characters.
pub(crate) fn shown(word: &[u8]) -> String {
    let mut out: String = word
        .iter()
        .take(32)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) && b != b'\'' {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if word.len() > 32 {
        out.push_str("...");
    }
    out
}

/// Parses a non-negative 64-bit integer (0 ..= i64::MAX) in plain decimal.
pub(crate) fn parse_amount(what: &'static str, raw: &[u8]) -> Result<u64, ParseError> {
    if raw.is_empty() || raw.len() > 19 {
        return Err(ParseError::NotANumber(what));
    }
    // At most 19 digits: below 10^19, so the sum cannot overflow a u64.
    let mut v = 0u64;
    for &b in raw {
        if !b.is_ascii_digit() {
            return Err(ParseError::NotANumber(what));
        }
        v = v * 10 + u64::from(b - b'0');
    }
    if v > i64::MAX as u64 {
        return Err(ParseError::NotANumber(what));
    }
    Ok(v)
}

/// Parses a token amount a command commits or reserves: 0 ..= `MAX_TOKENS`, so no amount the
/// ledger sums can come near its columns' limit.
fn parse_tokens(what: &'static str, raw: &[u8]) -> Result<u64, ParseError> {
    let v = parse_amount(what, raw)?;
    if v > MAX_TOKENS {
        return Err(ParseError::OutOfRange(what, 0, MAX_TOKENS as i64));
    }
    Ok(v)
}

/// Parses an admission's `COST`: 0 ..= `MAX_COST` requests, so no sum of costs the windows or
/// the ledger keep can come near their limits.
fn parse_cost(raw: &[u8]) -> Result<u32, ParseError> {
    let v = parse_amount("COST", raw)?;
    u32::try_from(v)
        .ok()
        .filter(|c| *c <= MAX_COST)
        .ok_or(ParseError::OutOfRange("COST", 0, i64::from(MAX_COST)))
}

fn parse_in_range(what: &'static str, raw: &[u8], lo: i64, hi: i64) -> Result<i64, ParseError> {
    let v = parse_amount(what, raw).map_err(|_| ParseError::OutOfRange(what, lo, hi))? as i64;
    if v < lo || v > hi {
        return Err(ParseError::OutOfRange(what, lo, hi));
    }
    Ok(v)
}

fn text_arg<'a>(what: &'static str, raw: &'a [u8], max: usize) -> Result<&'a str, ParseError> {
    if raw.is_empty() || raw.len() > max {
        return Err(ParseError::Length(what, max));
    }
    if raw.contains(&0) {
        return Err(ParseError::Invalid(what, "must not contain a NUL byte"));
    }
    std::str::from_utf8(raw).map_err(|_| ParseError::Invalid(what, "must be valid UTF-8"))
}

/// Walks `KEYWORD [value]` options, refusing repeats.
struct Options<'a, 'b> {
    rest: std::slice::Iter<'b, &'a [u8]>,
    seen: u64,
}

impl<'a, 'b> Options<'a, 'b> {
    fn new(rest: &'b [&'a [u8]]) -> Self {
        Options {
            rest: rest.iter(),
            seen: 0,
        }
    }

    fn next_word(&mut self) -> Option<&'a [u8]> {
        self.rest.next().copied()
    }

    fn value(&mut self, keyword: &'static str) -> Result<&'a [u8], ParseError> {
        self.rest
            .next()
            .copied()
            .ok_or(ParseError::Invalid(keyword, "must be followed by a value"))
    }

    fn once(&mut self, bit: u32, keyword: &'static str) -> Result<(), ParseError> {
        if self.seen & (1 << bit) != 0 {
            return Err(ParseError::Duplicate(keyword));
        }
        self.seen |= 1 << bit;
        Ok(())
    }

    /// The value of an option that may be given once.
    fn once_value(&mut self, bit: u32, keyword: &'static str) -> Result<&'a [u8], ParseError> {
        self.once(bit, keyword)?;
        self.value(keyword)
    }

    /// The text value (see `text_arg`) of an option that may be given once.
    fn once_text(
        &mut self,
        bit: u32,
        keyword: &'static str,
        max: usize,
    ) -> Result<&'a str, ParseError> {
        text_arg(keyword, self.once_value(bit, keyword)?, max)
    }
}

/// Upper-cases a short option word for matching, without allocating (longer words never match).
fn upper(word: &[u8]) -> [u8; 16] {
    // Keywords are zero-padded: a word with a NUL byte (or too long) must match none of them.
    // The NUL check without an early exit: many bytes at a time (see `check_id`).
    if word.len() > 16 || word.iter().fold(false, |nul, &b| nul | (b == 0)) {
        return [0xff; 16];
    }
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(word) {
        *o = b.to_ascii_uppercase();
    }
    out
}

/// The 16-byte form of a keyword, as `upper` makes it.
const fn kw(word: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let bytes = word.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

const EXPIRES_AT: [u8; 16] = kw("EXPIRES_AT");
const EXPIRES_IN: [u8; 16] = kw("EXPIRES_IN");
const PURCHASE: [u8; 16] = kw("PURCHASE");
const AMOUNT: [u8; 16] = kw("AMOUNT");
const NOTES: [u8; 16] = kw("NOTES");
const ADD: [u8; 16] = kw("ADD");
const REQUESTS_BALANCE: [u8; 16] = kw("REQUESTS_BALANCE");
const FROM: [u8; 16] = kw("FROM");
const TO: [u8; 16] = kw("TO");
const TOKENS_BALANCE: [u8; 16] = kw("TOKENS_BALANCE");
const LEASE: [u8; 16] = kw("LEASE");
const LEASE_TTL: [u8; 16] = kw("LEASE_TTL");
const RESERVE: [u8; 16] = kw("RESERVE");
const PEEK: [u8; 16] = kw("PEEK");
const COST: [u8; 16] = kw("COST");
const VERBOSE: [u8; 16] = kw("VERBOSE");
const POLICY: [u8; 16] = kw("POLICY");
const SET: [u8; 16] = kw("SET");
const GET: [u8; 16] = kw("GET");
const DEL: [u8; 16] = kw("DEL");
const LIST: [u8; 16] = kw("LIST");
const INVALIDATE: [u8; 16] = kw("INVALIDATE");
const COMPACT: [u8; 16] = kw("COMPACT");
const EXPIRES_WITHIN: [u8; 16] = kw("EXPIRES_WITHIN");
const COUNT: [u8; 16] = kw("COUNT");
const CURSOR: [u8; 16] = kw("CURSOR");
const REQUESTS: [u8; 16] = kw("REQUESTS");
const TOKENS: [u8; 16] = kw("TOKENS");

/// `QUOTA.FIND`'s default and largest `COUNT`.
pub(crate) const FIND_COUNT: (u32, u32) = (100, 1000);
/// `QUOTA.TOP`'s default and largest `COUNT`.
pub(crate) const TOP_COUNT: (u32, u32) = (10, 1000);

fn limit_value(field: LimitField, raw: &[u8]) -> Result<u64, ParseError> {
    parse_amount(field.keyword(), raw)
}

/// `QUOTA.GRANT <t> <p> <u> <b> [options]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrantArgs<'a> {
    pub account: AccountId<'a>,
    pub request: GrantRequest,
}

/// Parses `QUOTA.GRANT`; `now` resolves `EXPIRES_IN`.
pub(crate) fn grant<'a>(args: &[&'a [u8]], now: Millis) -> Result<GrantArgs<'a>, ParseError> {
    let (account, rest) = account_and_rest(args)?;
    let mut req = GrantRequest::default();
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        if let Some(field) = LimitField::from_keyword(word) {
            let v = limit_value(field, opts.once_value(field as u32, field.keyword())?)?;
            if v as i64 > field.column_max() {
                return Err(ParseError::OutOfRange(
                    field.keyword(),
                    0,
                    field.column_max(),
                ));
            }
            req.amounts[field as usize] = Some(v as i64);
            continue;
        }
        match upper(word) {
            EXPIRES_AT => {
                opts.once(10, "EXPIRES_AT")?;
                if req.expiry_given {
                    return Err(ParseError::Conflict("EXPIRES_AT", "EXPIRES_IN"));
                }
                let at =
                    parse_in_range("EXPIRES_AT", opts.value("EXPIRES_AT")?, 1, MAX_EXPIRES_AT)?;
                if at.saturating_mul(1000) <= now {
                    return Err(ParseError::Invalid("EXPIRES_AT", "must be in the future"));
                }
                req.expiry = Some(at);
                req.expiry_given = true;
            }
            EXPIRES_IN => {
                opts.once(11, "EXPIRES_IN")?;
                if req.expiry_given {
                    return Err(ParseError::Conflict("EXPIRES_AT", "EXPIRES_IN"));
                }
                let max = MAX_EXPIRES_AT - now / 1000;
                let secs = parse_in_range("EXPIRES_IN", opts.value("EXPIRES_IN")?, 1, max)?;
                req.expiry = Some(now / 1000 + secs);
                req.expiry_given = true;
            }
            PURCHASE => {
                let id = opts.once_text(12, "PURCHASE", MAX_PURCHASE_LEN)?;
                req.purchase_id = Some(id.to_owned());
            }
            AMOUNT => {
                let raw = opts.once_value(13, "AMOUNT")?;
                let cents = std::str::from_utf8(raw).ok().and_then(Cents::parse).ok_or(
                    ParseError::Invalid("AMOUNT", "must be a decimal from 0 to 99999999.99"),
                )?;
                req.amount = Some(cents);
            }
            NOTES => {
                let notes = opts.once_text(14, "NOTES", MAX_NOTES_LEN)?;
                req.notes = Some(notes.to_owned());
            }
            ADD => {
                opts.once(15, "ADD")?;
                req.add = true;
            }
            REQUESTS_BALANCE | TOKENS_BALANCE => {
                let kind = if upper(word) == REQUESTS_BALANCE {
                    BalanceKind::Requests
                } else {
                    BalanceKind::Tokens
                };
                let raw = opts.once_value(16 + kind as u32, kind.keyword())?;
                let v = parse_amount(kind.keyword(), raw)?;
                let v = i64::try_from(v)
                    .map_err(|_| ParseError::OutOfRange(kind.keyword(), 0, i64::MAX))?;
                *req.balances.get_mut(kind) = Some(v);
            }
            _ => return Err(ParseError::Unknown(shown(word))),
        }
    }
    Ok(GrantArgs {
        account,
        request: req,
    })
}

/// `QUOTA.HISTORY <t> <p> <u> <b> [FROM unix-s] [TO unix-s]`: the account and the hours
/// `FROM <= hour < TO` (defaults: 0 and the end of time).
pub(crate) fn history<'a>(args: &[&'a [u8]]) -> Result<(AccountId<'a>, i64, i64), ParseError> {
    let (account, rest) = account_and_rest(args)?;
    let (mut from, mut to) = (0, MAX_EXPIRES_AT + 1);
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        match upper(word) {
            FROM => {
                from = parse_in_range("FROM", opts.once_value(0, "FROM")?, 0, MAX_EXPIRES_AT)?;
            }
            TO => {
                to = parse_in_range("TO", opts.once_value(1, "TO")?, 0, MAX_EXPIRES_AT + 1)?;
            }
            _ => return Err(ParseError::Unknown(shown(word))),
        }
    }
    Ok((account, from, to))
}

/// `COUNT n`: 1 ..= max.
fn count(opts: &mut Options<'_, '_>, bit: u32, max: u32) -> Result<u32, ParseError> {
    let n = parse_in_range("COUNT", opts.once_value(bit, "COUNT")?, 1, i64::from(max))?;
    u32::try_from(n).map_err(|_| ParseError::OutOfRange("COUNT", 1, i64::from(max)))
}

/// Parses `QUOTA.FIND <t> <p> [EXPIRES_WITHIN s] [COUNT n] [CURSOR c]` into the page to read;
/// the cursor must be one that `QUOTA.FIND` replied for the same tenant, project and kind of
/// listing (with or without `EXPIRES_WITHIN`).
pub(crate) fn find(args: &[&[u8]]) -> Result<FindQuery, ParseError> {
    let [_, t, p, rest @ ..] = args else {
        return Err(ParseError::Arity);
    };
    let (tenant, project) = (check_id("tenant", t)?, check_id("project", p)?);
    let (mut within, mut count, mut cursor) = (None, FIND_COUNT.0, None);
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        match upper(word) {
            EXPIRES_WITHIN => {
                let raw = opts.once_value(0, "EXPIRES_WITHIN")?;
                within = Some(parse_in_range("EXPIRES_WITHIN", raw, 1, MAX_EXPIRES_AT)?);
            }
            COUNT => count = self::count(&mut opts, 1, FIND_COUNT.1)?,
            CURSOR => cursor = Some(opts.once_value(2, "CURSOR")?),
            _ => return Err(ParseError::Unknown(shown(word))),
        }
    }
    let after = match cursor {
        None => None,
        Some(text) => cursor::decode(tenant, project, within.is_some(), text).map_err(|e| {
            ParseError::Invalid(
                "CURSOR",
                match e {
                    CursorError::Foreign => {
                        "must be 0 or a cursor QUOTA.FIND replied for this tenant and project"
                    }
                    CursorError::NeedsWithin => {
                        "must be given with EXPIRES_WITHIN, as in the call that replied it"
                    }
                    CursorError::NoWithin => {
                        "must be given without EXPIRES_WITHIN, as in the call that replied it"
                    }
                },
            )
        })?,
    };
    Ok(FindQuery {
        tenant: tenant.to_owned(),
        project: project.to_owned(),
        within_s: within,
        after,
        count,
    })
}

/// Parses `QUOTA.TOP <t> <p> REQUESTS|TOKENS FROM unix-s TO unix-s [COUNT n]`: the hours
/// `FROM <= hour < TO` (both required, `TO` after `FROM`).
pub(crate) fn top(args: &[&[u8]]) -> Result<TopQuery, ParseError> {
    let [_, t, p, by, rest @ ..] = args else {
        return Err(ParseError::Arity);
    };
    let (tenant, project) = (check_id("tenant", t)?, check_id("project", p)?);
    let by = match upper(by) {
        REQUESTS => TopBy::Requests,
        TOKENS => TopBy::Tokens,
        _ => return Err(ParseError::Invalid("ranking", "must be REQUESTS or TOKENS")),
    };
    let (mut from, mut to, mut count) = (None, None, TOP_COUNT.0);
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        match upper(word) {
            FROM => {
                let raw = opts.once_value(0, "FROM")?;
                from = Some(parse_in_range("FROM", raw, 0, MAX_EXPIRES_AT)?);
            }
            TO => {
                let raw = opts.once_value(1, "TO")?;
                to = Some(parse_in_range("TO", raw, 0, MAX_EXPIRES_AT + 1)?);
            }
            COUNT => count = self::count(&mut opts, 2, TOP_COUNT.1)?,
            _ => return Err(ParseError::Unknown(shown(word))),
        }
    }
    let from = from.ok_or(ParseError::Invalid("FROM", "must be given"))?;
    let to = to.ok_or(ParseError::Invalid("TO", "must be given"))?;
    if to <= from {
        return Err(ParseError::Invalid("TO", "must be later than FROM"));
    }
    Ok(TopQuery {
        tenant: tenant.to_owned(),
        project: project.to_owned(),
        by,
        from,
        to,
        count,
    })
}

/// `QUOTA.ADMIT <t> <p> <u> <b> [options]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdmitArgs<'a> {
    pub account: AccountId<'a>,
    pub base: Limits,
    pub lease: Option<&'a str>,
    /// Seconds; `None` = `quota.lease-ttl`.
    pub lease_ttl: Option<i64>,
    pub reserve: Option<u64>,
    pub peek: bool,
    /// `COST n`: the requests it counts (default 1, 0 ..= `MAX_COST`).
    pub cost: u32,
    pub verbose: bool,
    /// `POLICY <name>`: the named base policy; the inline limits (`base`) override its fields.
    pub policy: Option<&'a str>,
    /// `COMPACT`: reply the short array instead of the map.
    pub compact: bool,
}

/// `AdmitArgs`, owned: the request of an admission that waits on PostgreSQL.
pub(crate) struct OwnedAdmit {
    account: OwnedAccount,
    lease: Option<String>,
    policy: Option<String>,
    /// The other fields (its borrowed ones are empty: they are the owned ones above).
    plain: AdmitArgs<'static>,
}

impl AdmitArgs<'_> {
    /// The request, owned, to keep while the client waits.
    pub(crate) fn kept(&self) -> OwnedAdmit {
        let none = UserId {
            tenant: "",
            project: "",
            user: "",
        };
        OwnedAdmit {
            account: OwnedAccount::from_id(&self.account),
            lease: self.lease.map(str::to_owned),
            policy: self.policy.map(str::to_owned),
            plain: AdmitArgs {
                account: AccountId {
                    user: none,
                    bundle: "",
                },
                lease: None,
                policy: None,
                ..*self
            },
        }
    }
}

impl OwnedAdmit {
    /// Borrows the request back.
    pub(crate) fn args(&self) -> AdmitArgs<'_> {
        AdmitArgs {
            account: self.account.id(),
            lease: self.lease.as_deref(),
            policy: self.policy.as_deref(),
            ..self.plain
        }
    }
}

/// Parses `QUOTA.ADMIT`.
pub(crate) fn admit<'a>(
    args: &[&'a [u8]],
    max_lease_ttl: i64,
) -> Result<AdmitArgs<'a>, ParseError> {
    let (account, rest) = account_and_rest(args)?;
    let mut out = AdmitArgs {
        account,
        base: Limits::default(),
        lease: None,
        lease_ttl: None,
        reserve: None,
        peek: false,
        cost: 1,
        verbose: false,
        policy: None,
        compact: false,
    };
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        // The options first (an admission by a named policy gives only those), then the limits.
        match upper(word) {
            LEASE => {
                out.lease = Some(opts.once_text(10, "LEASE", MAX_LEASE_LEN)?);
            }
            LEASE_TTL => {
                let raw = opts.once_value(11, "LEASE_TTL")?;
                out.lease_ttl = Some(parse_in_range("LEASE_TTL", raw, 1, max_lease_ttl)?);
            }
            RESERVE => {
                out.reserve = Some(parse_tokens("RESERVE", opts.once_value(12, "RESERVE")?)?);
            }
            PEEK => {
                opts.once(13, "PEEK")?;
                out.peek = true;
            }
            VERBOSE => {
                opts.once(14, "VERBOSE")?;
                out.verbose = true;
            }
            POLICY => {
                out.policy = Some(check_id("policy", opts.once_value(15, "POLICY")?)?);
            }
            COMPACT => {
                opts.once(16, "COMPACT")?;
                out.compact = true;
            }
            COST => out.cost = parse_cost(opts.once_value(17, "COST")?)?,
            _ => {
                let Some(field) = LimitField::from_keyword(word) else {
                    return Err(ParseError::Unknown(shown(word)));
                };
                let raw = opts.once_value(field as u32, field.keyword())?;
                out.base.set(field, Some(limit_value(field, raw)?));
            }
        }
    }
    if out.compact && out.verbose {
        return Err(ParseError::Conflict("COMPACT", "VERBOSE"));
    }
    Ok(out)
}

/// `QUOTA.POLICY <subcommand> ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyArgs<'a> {
    /// `SET <t> <p> <name> [limits]`: absent limits are unlimited.
    Set(PolicyId<'a>, Limits),
    Get(PolicyId<'a>),
    Del(PolicyId<'a>),
    /// `LIST <t> <p>`.
    List(&'a str, &'a str),
    /// `INVALIDATE <t> <p> <name>`: drops this node's cached copy (replicated).
    Invalidate(PolicyId<'a>),
}

/// Parses `QUOTA.POLICY SET|GET|DEL|LIST|INVALIDATE`.
pub(crate) fn policy<'a>(args: &[&'a [u8]]) -> Result<PolicyArgs<'a>, ParseError> {
    let [_, sub, rest @ ..] = args else {
        return Err(ParseError::Arity);
    };
    let id = |rest: &[&'a [u8]]| match rest {
        [t, p, n, ..] => Ok(PolicyId::parse([t, p, n])?),
        _ => Err(ParseError::Arity),
    };
    let exactly = |n: usize| {
        if rest.len() == n {
            Ok(())
        } else {
            Err(ParseError::Arity)
        }
    };
    match upper(sub) {
        SET => {
            let policy = id(rest)?;
            let mut limits = Limits::default();
            let mut opts = Options::new(rest.get(3..).unwrap_or(&[]));
            while let Some(word) = opts.next_word() {
                let Some(field) = LimitField::from_keyword(word) else {
                    return Err(ParseError::Unknown(shown(word)));
                };
                let raw = opts.once_value(field as u32, field.keyword())?;
                limits.set(field, Some(limit_value(field, raw)?));
            }
            Ok(PolicyArgs::Set(policy, limits))
        }
        GET => exactly(3).and_then(|()| Ok(PolicyArgs::Get(id(rest)?))),
        DEL => exactly(3).and_then(|()| Ok(PolicyArgs::Del(id(rest)?))),
        INVALIDATE => exactly(3).and_then(|()| Ok(PolicyArgs::Invalidate(id(rest)?))),
        LIST => match rest {
            [t, p] => Ok(PolicyArgs::List(
                check_id("tenant", t)?,
                check_id("project", p)?,
            )),
            _ => Err(ParseError::Arity),
        },
        _ => Err(ParseError::Unknown(shown(sub))),
    }
}

/// `QUOTA.COMMIT <t> <p> <u> <b> <tokens> [LEASE id]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitArgs<'a> {
    pub account: AccountId<'a>,
    pub tokens: u64,
    pub lease: Option<&'a str>,
}

/// Parses `QUOTA.COMMIT`.
pub(crate) fn commit<'a>(args: &[&'a [u8]]) -> Result<CommitArgs<'a>, ParseError> {
    let (account, rest) = account_and_rest(args)?;
    let (tokens, rest) = rest.split_first().ok_or(ParseError::Arity)?;
    let tokens = parse_tokens("tokens", tokens)?;
    let mut lease = None;
    let mut opts = Options::new(rest);
    while let Some(word) = opts.next_word() {
        if word.eq_ignore_ascii_case(b"LEASE") {
            lease = Some(opts.once_text(0, "LEASE", MAX_LEASE_LEN)?);
        } else {
            return Err(ParseError::Unknown(shown(word)));
        }
    }
    Ok(CommitArgs {
        account,
        tokens,
        lease,
    })
}

/// `QUOTA.RELEASE <t> <p> <u> <b> <lease>`.
pub(crate) fn release<'a>(args: &[&'a [u8]]) -> Result<(AccountId<'a>, &'a str), ParseError> {
    let (account, rest) = account_and_rest(args)?;
    match rest {
        [lease] => Ok((account, text_arg("lease", lease, MAX_LEASE_LEN)?)),
        _ => Err(ParseError::Arity),
    }
}

/// Commands that take exactly `<t> <p> <u> <b>`.
pub(crate) fn account_only<'a>(args: &[&'a [u8]]) -> Result<AccountId<'a>, ParseError> {
    match account_and_rest(args)? {
        (account, []) => Ok(account),
        _ => Err(ParseError::Arity),
    }
}

/// `QUOTA.LIST <t> <p> <u> [ALL]`.
pub(crate) fn list<'a>(args: &[&'a [u8]]) -> Result<(UserId<'a>, bool), ParseError> {
    match args {
        [_, t, p, u] => Ok((UserId::parse([t, p, u])?, false)),
        [_, t, p, u, all] if all.eq_ignore_ascii_case(b"ALL") => {
            Ok((UserId::parse([t, p, u])?, true))
        }
        [_, _, _, _, word] => Err(ParseError::Unknown(shown(word))),
        _ => Err(ParseError::Arity),
    }
}

/// `QUOTA.INVALIDATE <t> <p> <u>`.
pub(crate) fn user_only<'a>(args: &[&'a [u8]]) -> Result<UserId<'a>, ParseError> {
    match args {
        [_, t, p, u] => Ok(UserId::parse([t, p, u])?),
        _ => Err(ParseError::Arity),
    }
}

fn account_and_rest<'a, 'b>(
    args: &'b [&'a [u8]],
) -> Result<(AccountId<'a>, &'b [&'a [u8]]), ParseError> {
    match args {
        [_, t, p, u, b, rest @ ..] => Ok((AccountId::parse([t, p, u, b])?, rest)),
        _ => Err(ParseError::Arity),
    }
}

pub(crate) mod cursor;

#[cfg(test)]
mod tests;
