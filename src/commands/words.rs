//! The fixed strings of the hot replies (`QUOTA.ADMIT`, `QUOTA.GET`, `QUOTA.USAGE`): each a
//! `Word`, encoded once when the module loads and copied in one piece into every reply (see
//! `ffi::words::Word`). A name the core gives (a limit's, a balance's) is taken from it.

use crate::core::credit::{BalanceKind, CreditSource};
use crate::core::policy::{LimitField, LIMIT_FIELDS};
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
        }
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
