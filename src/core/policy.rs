//! Limits: the base policy a caller passes to `QUOTA.ADMIT`, the credits a replenishment adds,
//! and the effective policy that results (base + additional, field by field).

use super::window::Window;

/// The ten limits a policy can set (windows, lifetime, concurrency, smooth rates), in one fixed
/// order used everywhere (options, columns, reply fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitField {
    RequestsPerDay = 0,
    RequestsPerMonth = 1,
    TotalRequests = 2,
    TokensPerHour = 3,
    TokensPerDay = 4,
    TokensPerMonth = 5,
    MaxConcurrent = 6,
    RequestsPerSecond = 7,
    RequestsPerMinute = 8,
    TokensPerMinute = 9,
}

/// How many limit fields there are.
pub(crate) const LIMIT_FIELDS: usize = 10;

/// The smooth rates (`RequestsPerSecond`, `RequestsPerMinute`, `TokensPerMinute`), in the
/// order of `LimitField::RATES` and of an account's rate states.
pub(crate) const RATES: usize = 3;

impl LimitField {
    /// All fields in their fixed order.
    pub(crate) const ALL: [LimitField; LIMIT_FIELDS] = [
        LimitField::RequestsPerDay,
        LimitField::RequestsPerMonth,
        LimitField::TotalRequests,
        LimitField::TokensPerHour,
        LimitField::TokensPerDay,
        LimitField::TokensPerMonth,
        LimitField::MaxConcurrent,
        LimitField::RequestsPerSecond,
        LimitField::RequestsPerMinute,
        LimitField::TokensPerMinute,
    ];

    /// The smooth rates, in the order of an account's rate states (`Rate`).
    pub(crate) const RATES: [LimitField; RATES] = [
        LimitField::RequestsPerSecond,
        LimitField::RequestsPerMinute,
        LimitField::TokensPerMinute,
    ];

    /// The command option keyword (`REQUESTS_PER_DAY`, ...).
    pub(crate) fn keyword(self) -> &'static str {
        match self {
            LimitField::RequestsPerDay => "REQUESTS_PER_DAY",
            LimitField::RequestsPerMonth => "REQUESTS_PER_MONTH",
            LimitField::TotalRequests => "TOTAL_REQUESTS",
            LimitField::TokensPerHour => "TOKENS_PER_HOUR",
            LimitField::TokensPerDay => "TOKENS_PER_DAY",
            LimitField::TokensPerMonth => "TOKENS_PER_MONTH",
            LimitField::MaxConcurrent => "MAX_CONCURRENT",
            LimitField::RequestsPerSecond => "REQUESTS_PER_SECOND",
            LimitField::RequestsPerMinute => "REQUESTS_PER_MINUTE",
            LimitField::TokensPerMinute => "TOKENS_PER_MINUTE",
        }
    }

    /// The lower-case name used in replies and denial reasons.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            LimitField::RequestsPerDay => "requests_per_day",
            LimitField::RequestsPerMonth => "requests_per_month",
            LimitField::TotalRequests => "total_requests",
            LimitField::TokensPerHour => "tokens_per_hour",
            LimitField::TokensPerDay => "tokens_per_day",
            LimitField::TokensPerMonth => "tokens_per_month",
            LimitField::MaxConcurrent => "max_concurrent",
            LimitField::RequestsPerSecond => "requests_per_second",
            LimitField::RequestsPerMinute => "requests_per_minute",
            LimitField::TokensPerMinute => "tokens_per_minute",
        }
    }

    /// The PostgreSQL column holding the additional amount.
    pub(crate) const fn column(self) -> &'static str {
        match self {
            LimitField::RequestsPerDay => "additional_requests_per_day",
            LimitField::RequestsPerMonth => "additional_requests_per_month",
            LimitField::TotalRequests => "additional_total_requests",
            LimitField::TokensPerHour => "additional_tokens_per_hour",
            LimitField::TokensPerDay => "additional_tokens_per_day",
            LimitField::TokensPerMonth => "additional_tokens_per_month",
            LimitField::MaxConcurrent => "additional_max_concurrent",
            LimitField::RequestsPerSecond => "additional_requests_per_second",
            LimitField::RequestsPerMinute => "additional_requests_per_minute",
            LimitField::TokensPerMinute => "additional_tokens_per_minute",
        }
    }

    /// The largest additional amount the column stores (`INT` or `BIGINT`).
    pub(crate) fn column_max(self) -> i64 {
        match self {
            LimitField::TokensPerHour
            | LimitField::TokensPerDay
            | LimitField::TokensPerMonth
            | LimitField::TokensPerMinute => i64::MAX,
            _ => i64::from(i32::MAX),
        }
    }

    /// The calendar window this field counts in (`None` for lifetime, concurrency and the
    /// smooth rates).
    pub(crate) fn window(self) -> Option<Window> {
        match self {
            LimitField::RequestsPerDay | LimitField::TokensPerDay => Some(Window::Day),
            LimitField::RequestsPerMonth | LimitField::TokensPerMonth => Some(Window::Month),
            LimitField::TokensPerHour => Some(Window::Hour),
            LimitField::TotalRequests
            | LimitField::MaxConcurrent
            | LimitField::RequestsPerSecond
            | LimitField::RequestsPerMinute
            | LimitField::TokensPerMinute => None,
        }
    }

    /// Whether this field counts requests in a window or in total (`RequestsPerDay`,
    /// `RequestsPerMonth`, `TotalRequests`): what an admission's cost counts against, besides
    /// the request rates.
    pub(crate) const fn is_request_window(self) -> bool {
        matches!(
            self,
            LimitField::RequestsPerDay | LimitField::RequestsPerMonth | LimitField::TotalRequests
        )
    }

    /// The period of a smooth rate in ms (`None` for the other fields).
    pub(crate) const fn rate_period_ms(self) -> Option<i64> {
        match self {
            LimitField::RequestsPerSecond => Some(1_000),
            LimitField::RequestsPerMinute | LimitField::TokensPerMinute => Some(60_000),
            _ => None,
        }
    }

    /// Matches an option keyword, case-insensitively.
    pub(crate) fn from_keyword(word: &[u8]) -> Option<LimitField> {
        LimitField::ALL.into_iter().find(|f| {
            let k = f.keyword().as_bytes();
            k.len() == word.len() && k.eq_ignore_ascii_case(word)
        })
    }
}

/// A set of limits, one per field; `None` means unlimited.
///
/// Kept as plain numbers with `UNLIMITED` for `None` (80 bytes instead of 160): an admission
/// moves several of these around.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits([u64; LIMIT_FIELDS]);

/// A field without limit (no limit can reach it: they are at most 2 x `i64::MAX`).
const UNLIMITED: u64 = u64::MAX;

impl Default for Limits {
    fn default() -> Self {
        Limits([UNLIMITED; LIMIT_FIELDS])
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(LimitField::ALL.map(|field| self.get(field)))
            .finish()
    }
}

impl Limits {
    /// The same limit for every field.
    #[cfg(test)]
    pub(crate) fn all(value: Option<u64>) -> Limits {
        let mut out = Limits::default();
        for field in LimitField::ALL {
            out.set(field, value);
        }
        out
    }

    /// The limit for one field.
    #[inline]
    pub(crate) fn get(&self, field: LimitField) -> Option<u64> {
        Some(self.0[field as usize]).filter(|v| *v != UNLIMITED)
    }

    /// Sets the limit for one field.
    #[inline]
    pub(crate) fn set(&mut self, field: LimitField, value: Option<u64>) {
        self.0[field as usize] = value.map_or(UNLIMITED, |v| v.min(UNLIMITED - 1));
    }

    /// Whether any smooth rate is limited (an admission without one skips the rates).
    #[inline]
    pub(crate) fn has_rates(&self) -> bool {
        (self.0[LimitField::RequestsPerSecond as usize]
            & self.0[LimitField::RequestsPerMinute as usize]
            & self.0[LimitField::TokensPerMinute as usize])
            != UNLIMITED
    }

    /// These limits with the given (`Some`) fields of `inline` put over them one by one: what
    /// `QUOTA.ADMIT ... POLICY <name> [limits]` decides against.
    pub(crate) fn overlaid_with(mut self, inline: &Limits) -> Limits {
        for (mine, theirs) in self.0.iter_mut().zip(inline.0) {
            if theirs != UNLIMITED {
                *mine = theirs;
            }
        }
        self
    }
}

/// A named policy as the cache holds it: its limits, or `None` when no policy has that name
/// (a negative answer, cached for the negative TTL).
pub(crate) type CachedPolicy = Option<Limits>;

/// A named policy as stored in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyRecord {
    pub name: String,
    pub limits: Limits,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// Additional amounts granted by one replenishment, per field (`None` = adds nothing).
///
/// Held as plain integers with `i64::MIN` for an absent amount: 80 bytes instead of 160, in
/// every cached credit row. An amount of exactly `i64::MIN` (only SQL can write one) reads as
/// absent, which adds the same as any negative amount: nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Additional([i64; LIMIT_FIELDS]);

const ABSENT: i64 = i64::MIN;

impl Default for Additional {
    fn default() -> Self {
        Additional([ABSENT; LIMIT_FIELDS])
    }
}

impl Additional {
    /// From one optional amount per field, in `LimitField::ALL` order.
    pub(crate) fn from_options(amounts: [Option<i64>; LIMIT_FIELDS]) -> Additional {
        Additional(amounts.map(|v| v.unwrap_or(ABSENT)))
    }

    /// One optional amount per field, in `LimitField::ALL` order.
    pub(crate) fn to_options(self) -> [Option<i64>; LIMIT_FIELDS] {
        self.0.map(|v| (v != ABSENT).then_some(v))
    }

    /// The additional amount for one field.
    pub(crate) fn get(&self, field: LimitField) -> Option<i64> {
        self.0.get(field as usize).copied().filter(|v| *v != ABSENT)
    }

    /// Sets the additional amount for one field.
    pub(crate) fn set(&mut self, field: LimitField, value: Option<i64>) {
        if let Some(slot) = self.0.get_mut(field as usize) {
            *slot = value.unwrap_or(ABSENT);
        }
    }
}

/// The policy an admission is decided against: base plus the applicable credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EffectivePolicy {
    pub base: Limits,
    pub limits: Limits,
}

impl EffectivePolicy {
    /// A policy of these limits alone, without credits (for tests).
    #[cfg(test)]
    pub(crate) fn of(fields: &[(LimitField, u64)]) -> EffectivePolicy {
        let mut base = Limits::default();
        for (f, v) in fields {
            base.set(*f, Some(*v));
        }
        EffectivePolicy::merge(base, None)
    }

    /// Merges field by field: an unlimited base stays unlimited, a missing additional amount
    /// leaves the base as it is, and a negative one (written by hand in SQL) adds nothing.
    pub(crate) fn merge(base: Limits, additional: Option<&Additional>) -> EffectivePolicy {
        let mut limits = base;
        if let Some(add) = additional {
            for field in LimitField::ALL {
                if let (Some(b), Some(a)) = (base.get(field), add.get(field)) {
                    limits.set(field, Some(b.saturating_add(a.max(0) as u64)));
                }
            }
        }
        EffectivePolicy { base, limits }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LimitField::*;

    fn limits(set: &[(LimitField, u64)]) -> Limits {
        let mut out = Limits::default();
        for &(field, v) in set {
            out.set(field, Some(v));
        }
        out
    }

    fn additional(set: &[(LimitField, i64)]) -> Additional {
        let mut out = Additional::default();
        for &(field, v) in set {
            out.set(field, Some(v));
        }
        out
    }

    #[test]
    fn merge_adds_only_to_limited_fields() {
        let base = limits(&[(RequestsPerDay, 10), (TokensPerDay, 1000)]);
        let add = additional(&[
            (RequestsPerDay, 50),
            (RequestsPerMonth, 500),
            (TokensPerDay, -5),
        ]);
        let eff = EffectivePolicy::merge(base, Some(&add));
        assert_eq!(eff.limits.get(LimitField::RequestsPerDay), Some(60));
        assert_eq!(eff.limits.get(LimitField::RequestsPerMonth), None);
        assert_eq!(eff.limits.get(LimitField::TokensPerDay), Some(1000));
        assert_eq!(EffectivePolicy::merge(base, None).limits, base);
    }

    #[test]
    fn merge_saturates() {
        let base = limits(&[(TokensPerHour, u64::MAX - 1)]);
        let add = additional(&[(TokensPerHour, i64::MAX)]);
        let eff = EffectivePolicy::merge(base, Some(&add));
        // The highest limit there is (u64::MAX itself marks a field without limit).
        assert_eq!(
            eff.limits.get(LimitField::TokensPerHour),
            Some(u64::MAX - 1)
        );
    }

    #[test]
    fn inline_limits_override_the_policy_field_by_field() {
        let policy = limits(&[(RequestsPerDay, 10), (TokensPerDay, 1000)]);
        let inline = limits(&[(RequestsPerDay, 3), (MaxConcurrent, 2)]);
        let merged = policy.overlaid_with(&inline);
        assert_eq!(merged.get(LimitField::RequestsPerDay), Some(3));
        assert_eq!(merged.get(LimitField::TokensPerDay), Some(1000));
        assert_eq!(merged.get(LimitField::MaxConcurrent), Some(2));
        assert_eq!(merged.get(LimitField::TokensPerHour), None);
        assert_eq!(policy.overlaid_with(&Limits::default()), policy);
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(
            LimitField::from_keyword(b"tokens_per_day"),
            Some(LimitField::TokensPerDay)
        );
        assert_eq!(
            LimitField::from_keyword(b"MAX_CONCURRENT"),
            Some(LimitField::MaxConcurrent)
        );
        assert_eq!(LimitField::from_keyword(b"LEASE"), None);
    }
}
