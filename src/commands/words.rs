//! The fixed strings of the hot replies (`QUOTA.ADMIT`, `QUOTA.GET`, `QUOTA.USAGE`): each a
//! `Word`, encoded once when the module loads and copied in one piece into every reply (see
//! `ffi::reply::Word`). The texts are the ones the core names; the tests hold them equal.

use crate::core::credit::{BalanceKind, CreditSource};
use crate::core::policy::LimitField;
use crate::ffi::reply::Word;

/// Declares each word and `ALL`, the list `reply::prepare` encodes at load.
macro_rules! words {
    ($($name:ident = $text:literal;)*) => {
        $(pub(crate) static $name: Word = Word::new($text);)*
        /// Every word of this module.
        pub(crate) static ALL: &[&Word] = &[$(&$name),*];
    };
}

words! {
    // A credit record (QUOTA.GET).
    TENANT = "tenant";
    PROJECT = "project";
    USER_ID = "user_id";
    BUNDLE_ID = "bundle_id";
    ADD_REQUESTS_PER_DAY = "additional_requests_per_day";
    ADD_REQUESTS_PER_MONTH = "additional_requests_per_month";
    ADD_TOTAL_REQUESTS = "additional_total_requests";
    ADD_TOKENS_PER_HOUR = "additional_tokens_per_hour";
    ADD_TOKENS_PER_DAY = "additional_tokens_per_day";
    ADD_TOKENS_PER_MONTH = "additional_tokens_per_month";
    ADD_MAX_CONCURRENT = "additional_max_concurrent";
    EXPIRES_AT = "expires_at";
    PURCHASE_ID = "purchase_id";
    PURCHASE_AMOUNT_USD = "purchase_amount_usd";
    PURCHASE_NOTES = "purchase_notes";
    ACTIVE = "active";
    CREATED_AT = "created_at";
    UPDATED_AT = "updated_at";
    REQUESTS_BALANCE = "requests_balance";
    TOKENS_BALANCE = "tokens_balance";
    REQUESTS_BALANCE_DEBITED = "requests_balance_debited";
    TOKENS_BALANCE_DEBITED = "tokens_balance_debited";
    REQUESTS_BALANCE_LEFT = "requests_balance_left";
    TOKENS_BALANCE_LEFT = "tokens_balance_left";
    // A decision (QUOTA.ADMIT), its fixed values, and its `limits`.
    ALLOWED = "allowed";
    REASON = "reason";
    RETRY_AFTER = "retry_after";
    LEASE = "lease";
    RESERVED = "reserved";
    USED_REPLENISHMENT = "used_replenishment";
    REPLENISHMENT = "replenishment";
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
    REQUESTS_PER_DAY = "requests_per_day";
    REQUESTS_PER_MONTH = "requests_per_month";
    TOTAL_REQUESTS = "total_requests";
    TOKENS_PER_HOUR = "tokens_per_hour";
    TOKENS_PER_DAY = "tokens_per_day";
    TOKENS_PER_MONTH = "tokens_per_month";
    MAX_CONCURRENT = "max_concurrent";
    // A usage snapshot (QUOTA.USAGE, and a decision's `usage`).
    USAGE = "usage";
    RESETS = "resets";
    REQ_DAY = "req_day";
    REQ_MONTH = "req_month";
    REQ_TOTAL = "req_total";
    TOK_HOUR = "tok_hour";
    TOK_DAY = "tok_day";
    TOK_MONTH = "tok_month";
    IN_FLIGHT = "in_flight";
    HOUR_RESET = "hour_reset";
    DAY_RESET = "day_reset";
    MONTH_RESET = "month_reset";
}

/// A limit's words: its record field (the additional amount, `LimitField::column`) and its
/// name in a decision's `limits` (`LimitField::name`).
pub(crate) fn limit(field: LimitField) -> [&'static Word; 2] {
    match field {
        LimitField::RequestsPerDay => [&ADD_REQUESTS_PER_DAY, &REQUESTS_PER_DAY],
        LimitField::RequestsPerMonth => [&ADD_REQUESTS_PER_MONTH, &REQUESTS_PER_MONTH],
        LimitField::TotalRequests => [&ADD_TOTAL_REQUESTS, &TOTAL_REQUESTS],
        LimitField::TokensPerHour => [&ADD_TOKENS_PER_HOUR, &TOKENS_PER_HOUR],
        LimitField::TokensPerDay => [&ADD_TOKENS_PER_DAY, &TOKENS_PER_DAY],
        LimitField::TokensPerMonth => [&ADD_TOKENS_PER_MONTH, &TOKENS_PER_MONTH],
        LimitField::MaxConcurrent => [&ADD_MAX_CONCURRENT, &MAX_CONCURRENT],
    }
}

/// The record fields of a balance: granted, flushed debits, left (`BalanceKind::column`).
pub(crate) fn balance(kind: BalanceKind) -> [&'static Word; 3] {
    match kind {
        BalanceKind::Requests => [
            &REQUESTS_BALANCE,
            &REQUESTS_BALANCE_DEBITED,
            &REQUESTS_BALANCE_LEFT,
        ],
        BalanceKind::Tokens => [
            &TOKENS_BALANCE,
            &TOKENS_BALANCE_DEBITED,
            &TOKENS_BALANCE_LEFT,
        ],
    }
}

/// A decision's `replenishment`: where its credits came from.
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
            let [column, name] = limit(field).map(Word::text);
            assert_eq!(column, field.column());
            assert_eq!(name, field.name());
        }
        for kind in BalanceKind::ALL {
            let [granted, debited, left] = balance(kind).map(Word::text);
            assert_eq!(granted, kind.column());
            assert_eq!(debited, format!("{}_debited", kind.column()));
            assert_eq!(left, format!("{}_left", kind.column()));
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
        let mut texts: Vec<&str> = ALL.iter().map(|w| w.text()).collect();
        let n = texts.len();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), n, "a word is declared twice");
    }
}
