//! The fixed strings of the hot replies (`QUOTA.ADMIT`, `QUOTA.GET`, `QUOTA.USAGE`): each a
//! `Word`, encoded once when the module loads and copied in one piece into every reply (see
//! `ffi::words::Word`). A name the core gives (a limit's, a balance's) is taken from it.
//! And the runs of fixed values of an admitted reply, `COMPACT` and in full (`ffi::runs::Run`), with
//! `QUOTA.REPLYRUN`, the internal command that writes them for their encoding at load.

use super::error::CommandError;
use crate::core::credit::{BalanceKind, CreditSource};
use crate::core::policy::{LimitField, LIMIT_FIELDS};
use crate::ffi::ctx::Ctx;
use crate::ffi::runs::{self, run, Part, Run};
use crate::ffi::words::Word;

/// Declares each word and `DECLARED`, their list (see `all`).
macro_rules! words {
    ($($name:ident = $text:expr;)*) => {
        $(pub(crate) static $name: Word = Word::new($text);)*
        /// The words declared here (`all` adds the limits').
        static DECLARED: &[&Word] = &[$(&$name),*];
    };
}

words! {
    // A credit record (QUOTA.GET; the limits' fields are in `LIMIT_WORDS`).
    TENANT = "tenant";
    PROJECT = "project";
    USER_ID = "user_id";
    BUNDLE_ID = "bundle_id";
    EXPIRES_AT = "expires_at";
    PURCHASE_ID = "purchase_id";
    PURCHASE_AMOUNT_USD = "purchase_amount_usd";
    PURCHASE_NOTES = "purchase_notes";
    ACTIVE = "active";
    CREATED_AT = "created_at";
    UPDATED_AT = "updated_at";
    REQUESTS_BALANCE = BalanceKind::Requests.column();
    TOKENS_BALANCE = BalanceKind::Tokens.column();
    REQUESTS_BALANCE_DEBITED = "requests_balance_debited";
    TOKENS_BALANCE_DEBITED = "tokens_balance_debited";
    REQUESTS_BALANCE_LEFT = "requests_balance_left";
    TOKENS_BALANCE_LEFT = "tokens_balance_left";
    // A decision (QUOTA.ADMIT), its fixed values, and its `limits` (the limits' names are
    // in `LIMIT_WORDS`).
    ALLOWED = "allowed";
    REASON = "reason";
    RETRY_AFTER = "retry_after";
    RETRY_AFTER_MS = "retry_after_ms";
    LEASE = "lease";
    RESERVED = "reserved";
    USED_CREDIT = "used_credit";
    CREDIT = "credit";
    REMAINING_REQUESTS = "remaining_requests";
    REMAINING_TOKENS = "remaining_tokens";
    PAID_BY = "paid_by";
    EMPTY = "";
    WINDOWS = "windows";
    BALANCE = "balance";
    BUNDLE = "bundle";
    GLOBAL = "global";
    NONE = "none";
    PENDING = "pending";
    UNAVAILABLE = "unavailable";
    LIMITS = "limits";
    // A usage snapshot (QUOTA.USAGE, and a decision's `usage`).
    USAGE = "usage";
    RESETS = "resets";
    IN_FLIGHT = "in_flight";
    HOUR_RESET = "hour_reset";
    DAY_RESET = "day_reset";
    MONTH_RESET = "month_reset";
}

/// Per limit (by `LimitField as usize`): its name (`LimitField::name`), the one word for it
/// in every reply: a credit record's amount, a decision's `limits`, a usage snapshot's count.
static LIMIT_WORDS: [Word; LIMIT_FIELDS] = {
    let mut out = [const { Word::new("") }; LIMIT_FIELDS];
    let mut i = 0;
    while i < LIMIT_FIELDS {
        let field = LimitField::ALL[i];
        out[field as usize] = Word::new(field.name());
        i += 1;
    }
    out
};

/// A limit's word (see `LIMIT_WORDS`).
pub(crate) fn limit(field: LimitField) -> &'static Word {
    &LIMIT_WORDS[field as usize]
}

/// Every word, for `words::prepare` at load and `words::release` at unload.
pub(crate) fn all() -> impl Iterator<Item = &'static Word> {
    DECLARED.iter().copied().chain(LIMIT_WORDS.iter())
}

/// The record fields of one kind of balance.
pub(crate) struct BalanceWords {
    /// What was granted (`BalanceKind::column`).
    pub granted: &'static Word,
    /// The debits flushed against it.
    pub debited: &'static Word,
    /// What is left.
    pub left: &'static Word,
}

/// The record fields of a balance of kind `kind`.
pub(crate) fn balance(kind: BalanceKind) -> BalanceWords {
    match kind {
        BalanceKind::Requests => BalanceWords {
            granted: &REQUESTS_BALANCE,
            debited: &REQUESTS_BALANCE_DEBITED,
            left: &REQUESTS_BALANCE_LEFT,
        },
        BalanceKind::Tokens => BalanceWords {
            granted: &TOKENS_BALANCE,
            debited: &TOKENS_BALANCE_DEBITED,
            left: &TOKENS_BALANCE_LEFT,
        },
    }
}

/// A decision's `credit`: where its credit came from.
pub(crate) fn source(source: CreditSource) -> &'static Word {
    match source {
        CreditSource::Bundle => &BUNDLE,
        CreditSource::Global => &GLOBAL,
        CreditSource::None => &NONE,
        CreditSource::Pending => &PENDING,
        CreditSource::Unavailable => &UNAVAILABLE,
    }
}

/// `retry_after` and `retry_after_ms` of a decision with no wait (the runs hold it).
pub(crate) const NO_WAIT: i64 = -1;

/// How an admitted `COMPACT` reply starts: `allowed` 1, `retry_after` `NO_WAIT`.
pub(crate) static ADMITTED_HEAD: Run = run![Part::Int(1), Part::Int(NO_WAIT)];

/// Declares the tails of an admitted `COMPACT` reply that start with `$lead`, by credit source
/// (`source_slot`) and payer (windows, balance): `reason` "", `reserved` 0, `credit`,
/// `paid_by`, `retry_after_ms` `NO_WAIT`.
macro_rules! tails {
    ($($lead:expr),*) => {
        tails!(@sources [$($lead),*] BUNDLE GLOBAL NONE PENDING UNAVAILABLE)
    };
    (@sources $lead:tt $($source:ident)*) => {
        [$([tails!(@one $lead $source WINDOWS), tails!(@one $lead $source BALANCE)]),*]
    };
    (@one [$($lead:expr),*] $source:ident $paid:ident) => {
        run![
            $($lead,)*
            Part::Word(&EMPTY),
            Part::Int(0),
            Part::Word(&$source),
            Part::Word(&$paid),
            Part::Int(NO_WAIT),
        ]
    };
}

/// How an admitted reply in full (a map) starts: `allowed` 1, `reason` "", `retry_after` and
/// `retry_after_ms` `NO_WAIT`, and the name `lease` (its value follows).
pub(crate) static ADMITTED_MAP_HEAD: Run = run![
    Part::Word(&ALLOWED),
    Part::Int(1),
    Part::Word(&REASON),
    Part::Word(&EMPTY),
    Part::Word(&RETRY_AFTER),
    Part::Int(NO_WAIT),
    Part::Word(&RETRY_AFTER_MS),
    Part::Int(NO_WAIT),
    Part::Word(&LEASE),
];

/// Declares the middles of an admitted map, by credit source (`source_slot`) and `used_credit`
/// (0, 1): `reserved` 0, `used_credit`, `credit`, and the name `remaining_requests`.
macro_rules! middles {
    ($($source:ident)*) => {
        [$([middles!(@one $source 0), middles!(@one $source 1)]),*]
    };
    (@one $source:ident $used:expr) => {
        run![
            Part::Word(&RESERVED),
            Part::Int(0),
            Part::Word(&USED_CREDIT),
            Part::Int($used),
            Part::Word(&CREDIT),
            Part::Word(&$source),
            Part::Word(&REMAINING_REQUESTS),
        ]
    };
}

/// The middles of an admitted map.
static ADMITTED_MAP_MIDDLES: [[Run; 2]; SOURCES] = middles!(BUNDLE GLOBAL NONE PENDING UNAVAILABLE);

/// `paid_by` and who paid an admitted request: the windows, the balance.
static PAID_BY_RUNS: [Run; 2] = [
    run![Part::Word(&PAID_BY), Part::Word(&WINDOWS)],
    run![Part::Word(&PAID_BY), Part::Word(&BALANCE)],
];

/// The middle of an admitted map with no reason, nothing reserved and no wait.
pub(crate) fn admitted_map_middle(source: CreditSource, used_credit: bool) -> &'static Run {
    &ADMITTED_MAP_MIDDLES[source_slot(source)][usize::from(used_credit)]
}

/// `paid_by` of an admitted request (`by_balance`: the balance paid).
pub(crate) fn paid_by_run(by_balance: bool) -> &'static Run {
    &PAID_BY_RUNS[usize::from(by_balance)]
}

/// The tails after a lease id.
static TAILS_AFTER_LEASE: [[Run; 2]; SOURCES] = tails!();
/// The tails of an admission without a lease (`lease` "" first).
static TAILS_WITHOUT_LEASE: [[Run; 2]; SOURCES] = tails!(Part::Word(&EMPTY));

/// How many credit sources there are (`source_slot`).
const SOURCES: usize = 5;

/// A credit source's slot in the tails (the order of `tails!`).
fn source_slot(source: CreditSource) -> usize {
    match source {
        CreditSource::Bundle => 0,
        CreditSource::Global => 1,
        CreditSource::None => 2,
        CreditSource::Pending => 3,
        CreditSource::Unavailable => 4,
    }
}

/// The tail of an admitted `COMPACT` reply with no reason, nothing reserved and no wait:
/// after the lease id (`after_lease`) or with `lease` "" first.
pub(crate) fn admitted_tail(
    source: CreditSource,
    by_balance: bool,
    after_lease: bool,
) -> &'static Run {
    let tails = if after_lease {
        &TAILS_AFTER_LEASE
    } else {
        &TAILS_WITHOUT_LEASE
    };
    &tails[source_slot(source)][usize::from(by_balance)]
}

/// Every run, in the order `QUOTA.REPLYRUN <index>` numbers them.
pub(crate) fn runs() -> Vec<&'static Run> {
    [&ADMITTED_HEAD, &ADMITTED_MAP_HEAD]
        .into_iter()
        .chain(TAILS_AFTER_LEASE.iter().flatten())
        .chain(TAILS_WITHOUT_LEASE.iter().flatten())
        .chain(ADMITTED_MAP_MIDDLES.iter().flatten())
        .chain(PAID_BY_RUNS.iter())
        .collect()
}

/// The internal command's name, for `ffi::runs::prepare`.
pub(crate) const REPLY_RUN: &std::ffi::CStr = c"QUOTA.REPLYRUN";

/// `QUOTA.REPLYRUN <index>`: writes run `index` of `runs()` value by value, each at top level
/// (several replies to one command), for its encoding while the module loads
/// (`ffi::runs::prepare`). Refused at any other time: a client would get more than one reply.
pub(crate) fn reply_run(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    const REFUSED: &str = "ERR QUOTA.REPLYRUN is internal: the module calls it only while it loads";
    if !runs::encoding() {
        return Err(CommandError::Text(REFUSED));
    }
    let run = match args {
        [_, index] => std::str::from_utf8(index)
            .ok()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| runs().get(i).copied()),
        _ => None,
    };
    let Some(run) = run else {
        return Err(CommandError::Text(REFUSED));
    };
    ctx.reply().run_each(run);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_words_are_the_names_the_core_gives() {
        for field in LimitField::ALL {
            assert_eq!(limit(field).text(), field.name());
        }
        for kind in BalanceKind::ALL {
            let words = balance(kind);
            assert_eq!(words.granted.text(), kind.column());
            assert_eq!(words.debited.text(), format!("{}_debited", kind.column()));
            assert_eq!(words.left.text(), format!("{}_left", kind.column()));
        }
        let sources = [
            (CreditSource::Bundle, "bundle"),
            (CreditSource::Global, "global"),
            (CreditSource::None, "none"),
            (CreditSource::Pending, "pending"),
            (CreditSource::Unavailable, "unavailable"),
        ];
        for (s, text) in sources {
            assert_eq!(source(s).text(), text);
            // The tails name the same source.
            for by_balance in [false, true] {
                let paid = if by_balance { "balance" } else { "windows" };
                for after_lease in [false, true] {
                    let texts: Vec<String> = admitted_tail(s, by_balance, after_lease)
                        .parts
                        .iter()
                        .map(|p| match p {
                            Part::Int(v) => v.to_string(),
                            Part::Word(w) => format!("'{}'", w.text()),
                        })
                        .collect();
                    let mut want = vec![
                        "''".to_owned(),
                        "0".to_owned(),
                        format!("'{text}'"),
                        format!("'{paid}'"),
                        "-1".to_owned(),
                    ];
                    if !after_lease {
                        want.insert(0, "''".to_owned());
                    }
                    assert_eq!(texts, want, "{text} {paid} {after_lease}");
                }
            }
        }
        assert_eq!(runs().len(), 2 + 3 * 2 * SOURCES + 2);
        let texts = |run: &Run| -> Vec<String> {
            run.parts
                .iter()
                .map(|p| match p {
                    Part::Int(v) => v.to_string(),
                    Part::Word(w) => w.text().to_owned(),
                })
                .collect()
        };
        for (s, text) in sources {
            for used in [false, true] {
                let want = ["reserved", "0", "used_credit", if used { "1" } else { "0" }];
                let want = [&want[..], &["credit", text, "remaining_requests"]].concat();
                assert_eq!(texts(admitted_map_middle(s, used)), want);
            }
        }
        assert_eq!(texts(paid_by_run(false)), ["paid_by", "windows"]);
        assert_eq!(texts(paid_by_run(true)), ["paid_by", "balance"]);
        let head = [
            "allowed",
            "1",
            "reason",
            "",
            "retry_after",
            "-1",
            "retry_after_ms",
            "-1",
            "lease",
        ];
        assert_eq!(texts(&ADMITTED_MAP_HEAD), head);
        let head: Vec<i64> = ADMITTED_HEAD
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Int(v) => Some(*v),
                Part::Word(_) => None,
            })
            .collect();
        assert_eq!(head, [1, -1]);
    }

    #[test]
    fn every_word_is_listed_once() {
        let mut texts: Vec<&str> = all().map(Word::text).collect();
        let n = texts.len();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), n, "a word is declared twice");
    }
}
