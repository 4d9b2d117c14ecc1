//! The admission decision: which limits a request would break at `now`, when it could be
//! allowed again, what remains, and recording the request and its lease when admitted.

use super::{
    Account, AccountError, AdmitDecision, AdmitRequest, BalanceOffer, Counter, Did, Lease, LeaseId,
    Now, Verdict, BALANCE_SPENT, MAX_LEASES, PRUNE_DELAY_MS,
};
use crate::core::credit::BalanceKind;
use crate::core::policy::{EffectivePolicy, LimitField, Limits};
use crate::core::rate::Wait;
use crate::core::window::seconds_until;
use crate::core::Millis;

impl Account {
    /// Whether an admission must prune before deciding: some lease has expired and either it
    /// could change the decision (a lease id to find, reservations counted against the token
    /// windows, the concurrency limit or the lease cap within reach) or it expired more than
    /// `PRUNE_DELAY_MS` ago. Otherwise an expired lease is harmless for a moment, and pruning
    /// in batches touches the leases' memory once rather than on every admission.
    fn prune_due(&self, policy: &EffectivePolicy, req: &AdmitRequest<'_>, now: Millis) -> bool {
        let first = self.first_expiry();
        if first == 0 || first > now {
            return false;
        }
        let held = self.leases().len();
        // The base limit is the lower one: it decides `used_replenishment`.
        let max_concurrent = policy.base.get(LimitField::MaxConcurrent);
        req.lease.is_some()
            || self.reserved() > 0
            || now >= first.saturating_add(PRUNE_DELAY_MS)
            || held >= MAX_LEASES
            || max_concurrent.is_some_and(|max| held as u64 >= max)
    }

    /// How much of a limited field is used at `now` (tokens: committed plus reserved).
    fn used(&self, field: LimitField, now: &Now, reserved: u64) -> u64 {
        match field {
            LimitField::RequestsPerDay => self.count(Counter::ReqDay, now.day),
            LimitField::RequestsPerMonth => self.count(Counter::ReqMonth, now.month),
            LimitField::TotalRequests => self.req_total,
            LimitField::TokensPerHour => self
                .count(Counter::TokHour, now.hour)
                .saturating_add(reserved),
            LimitField::TokensPerDay => self
                .count(Counter::TokDay, now.day)
                .saturating_add(reserved),
            LimitField::TokensPerMonth => self
                .count(Counter::TokMonth, now.month)
                .saturating_add(reserved),
            LimitField::MaxConcurrent => self.leases().len() as u64,
            // The rates are not counts (see `left`).
            LimitField::RequestsPerSecond
            | LimitField::RequestsPerMinute
            | LimitField::TokensPerMinute => 0,
        }
    }

    /// How much of a field limited to `limit` is left at `now`.
    #[inline]
    fn left(&self, field: LimitField, limit: u64, now: &Now, reserved: u64) -> u64 {
        match field.rate_period_ms() {
            Some(_) => self.rate_left(field, limit, now.ms),
            None => limit.saturating_sub(self.used(field, now, reserved)),
        }
    }

    /// The violated quota windows (not concurrency) under `limits` for a request of `cost`:
    /// a request window denies when `cost` more would go past its limit (a cost of 0 never
    /// does), a token window when committed plus reserved tokens are at its limit.
    fn window_violations(&self, limits: &Limits, now: &Now, reserved: u64, cost: u64) -> u16 {
        let mut bits = 0u16;
        for field in &LimitField::ALL[..6] {
            if let Some(limit) = limits.get(*field) {
                let used = self.used(*field, now, reserved);
                let denied = match field.is_request_window() {
                    true => cost > 0 && used.saturating_add(cost) > limit,
                    false => used >= limit,
                };
                if denied {
                    bits |= 1 << *field as u16;
                }
            }
        }
        bits
    }

    /// All violations of a request of `cost`: quota windows and rates first; concurrency only
    /// when none of them is violated and the admission takes a lease (`leased`).
    fn violations(&self, limits: &Limits, now: &Now, reserved: u64, req: Ask) -> u16 {
        let mut bits = self.window_violations(limits, now, reserved, req.cost);
        if limits.has_rates() {
            bits |= self.rate_violations(limits, now.ms, req.cost);
        }
        if bits != 0 {
            return bits;
        }
        self.concurrency_violation(limits, req.leased)
    }

    /// The concurrency violation bit, when an admission that takes a lease (`leased`) finds
    /// every slot held.
    fn concurrency_violation(&self, limits: &Limits, leased: bool) -> u16 {
        match limits.get(LimitField::MaxConcurrent) {
            Some(max) if leased && self.leases().len() as u64 >= max => {
                1 << LimitField::MaxConcurrent as u16
            }
            _ => 0,
        }
    }

    /// Whole seconds (rounded up) and ms until every violated limit could allow again; -1
    /// (both) when one never does (a lifetime total, `MAX_CONCURRENT 0` where no slot can
    /// ever free, a rate of 0 or below the cost, a request window below the cost).
    fn retry_after(&self, violations: u16, limits: &Limits, now: &Now, cost: u64) -> (i64, i64) {
        let (mut secs, mut ms) = (0i64, 0i64);
        for field in LimitField::ALL {
            if violations & (1 << field as u16) == 0 {
                continue;
            }
            let (s, m) = match (field.window(), field) {
                // However long one waits, the window never holds this many.
                (Some(_), _)
                    if field.is_request_window() && limits.get(field).is_some_and(|l| l < cost) =>
                {
                    return (-1, -1);
                }
                (Some(window), _) => {
                    let end = window.end(now.ms);
                    (
                        seconds_until(now.ms, end),
                        end.saturating_sub(now.ms).max(0),
                    )
                }
                (None, LimitField::MaxConcurrent) => {
                    if limits.get(LimitField::MaxConcurrent) == Some(0) {
                        return (-1, -1);
                    }
                    let first = self.leases().iter().map(|l| l.expires_at).min();
                    let at = first.unwrap_or(now.ms);
                    (
                        seconds_until(now.ms, at).max(1),
                        at.saturating_sub(now.ms).max(1),
                    )
                }
                (None, LimitField::TotalRequests) => return (-1, -1),
                (None, rate) => {
                    let cost = if rate == LimitField::TokensPerMinute {
                        1
                    } else {
                        cost
                    };
                    let n = limits.get(rate).unwrap_or(0);
                    match self.rate_wait(rate, n, now.ms, cost) {
                        Wait::Never => return (-1, -1),
                        Wait::None => (0, 0),
                        Wait::Ms(wait) => (seconds_until(0, wait), wait),
                    }
                }
            };
            secs = secs.max(s);
            ms = ms.max(m);
        }
        if violations == 0 {
            (-1, -1)
        } else {
            (secs, ms)
        }
    }

    /// Smallest amount left across the limited request windows, -1 when none is limited.
    fn remaining(&self, limits: &Limits, now: &Now, reserved: u64, fields: &[LimitField]) -> i64 {
        fields
            .iter()
            .filter_map(|f| limits.get(*f).map(|l| self.left(*f, l, now, reserved)))
            .min()
            .map_or(-1, |left| i64::try_from(left).unwrap_or(i64::MAX))
    }

    /// Decides one request against `policy` at `now` and, when admitted (and not a peek),
    /// counts it: its cost in the day, month, total and request rates; a lease when a lease
    /// or reservation is asked for, or concurrency is limited and the cost is not 0.
    /// Re-admitting a held lease changes nothing; a free probe (cost 0) without a lease
    /// changes nothing either.
    pub(crate) fn admit(
        &mut self,
        policy: &EffectivePolicy,
        req: &AdmitRequest<'_>,
        now_ms: Millis,
        new_lease_id: impl FnOnce() -> u64,
    ) -> Result<AdmitDecision, AccountError> {
        let now = Now::at(now_ms);
        let limits = &policy.limits;
        let pruned = self.prune_due(policy, req, now_ms) && self.prune(now_ms);
        let mut decision = AdmitDecision {
            verdict: Verdict::Windows,
            violations: 0,
            retry_after: -1,
            retry_after_ms: -1,
            lease: None,
            lease_expires_at: 0,
            reserved: 0,
            used_replenishment: false,
            remaining_requests: -1,
            remaining_tokens: -1,
            did: Did::default(),
            cost: req.cost,
            held_tokens: 0,
        };
        decision.did.set(Did::CHANGE, pruned);
        decision.did.set(Did::PRUNE, pruned);
        let wanted = req.lease.map(LeaseId::parse);
        if let Some(id) = &wanted {
            if let Some(held) = self.leases().iter().find(|l| &l.id == id) {
                decision.lease = Some(held.id.clone());
                decision.lease_expires_at = held.expires_at;
                decision.reserved = held.reserved;
                self.fill_remaining(&mut decision, limits, &now, self.reserved());
                return Ok(decision);
            }
        }
        let reserved = self.reserved();
        let cost = u64::from(req.cost);
        // A lease is taken when one is asked for, or when concurrency is limited and the
        // request counts something (a free probe takes no slot unless it asks for a lease).
        let wants_lease = req.lease.is_some()
            || req.reserve.is_some()
            || (cost > 0 && limits.get(LimitField::MaxConcurrent).is_some());
        let ask = Ask {
            cost,
            leased: wants_lease,
        };
        let mut violations = self.violations(limits, &now, reserved, ask);
        if violations != 0 {
            match balance_pays(violations, req.balance, cost) {
                Payment::Paid { request } => {
                    decision.verdict = Verdict::Balance;
                    decision.did.set(Did::DEBIT, request);
                    // The balance pays windows, never a concurrency slot.
                    violations = self.concurrency_violation(limits, wants_lease);
                }
                Payment::Spent => violations |= BALANCE_SPENT,
                Payment::None => {}
            }
        }
        if violations != 0 {
            decision.verdict = Verdict::Denied;
            decision.did.set(Did::DEBIT, false);
            decision.violations = violations;
            (decision.retry_after, decision.retry_after_ms) =
                self.retry_after(violations, limits, &now, cost);
            self.fill_remaining(&mut decision, limits, &now, reserved);
            return Ok(decision);
        }
        decision.used_replenishment =
            decision.paid_by_balance() || self.violations(&policy.base, &now, reserved, ask) != 0;
        if wants_lease && self.leases().len() >= MAX_LEASES {
            return Err(AccountError::TooManyLeases);
        }
        // A peek, or a free probe without a lease: nothing to count.
        if req.peek || (cost == 0 && !wants_lease) {
            self.fill_remaining(&mut decision, limits, &now, reserved);
            return Ok(decision);
        }
        if limits.get(LimitField::TotalRequests).is_some() {
            self.lifetime = true;
        }
        self.count_request(now_ms, now.hour, now.day, now.month, cost);
        let mut rate_tokens = 0;
        if wants_lease {
            let want = req.reserve.unwrap_or(0);
            let grant = TOKEN_LIMITS
                .iter()
                .filter_map(|f| limits.get(*f).map(|l| self.left(*f, l, &now, reserved)))
                .fold(want, u64::min);
            rate_tokens = grant;
            // What the windows cannot reserve, the token balance holds (as far as it goes).
            let tokens_left = req.balance.and_then(|b| b.left.tokens).unwrap_or(0);
            decision.held_tokens = want
                .saturating_sub(grant)
                .min(u64::try_from(tokens_left).unwrap_or(0));
            let id = wanted.unwrap_or_else(|| LeaseId::Short(new_lease_id()));
            let expires_at = now_ms.saturating_add(req.lease_ttl_ms.max(1));
            self.push_lease(Lease {
                id: id.clone(),
                expires_at,
                reserved: grant,
                day: i32::try_from(now.day).unwrap_or(i32::MAX),
                cost: req.cost,
            });
            decision.lease = Some(id);
            decision.lease_expires_at = expires_at;
            decision.reserved = grant.saturating_add(decision.held_tokens);
        }
        if limits.has_rates() {
            self.charge_rates(limits, &now, cost, rate_tokens);
            decision.did.set(Did::RATES, true);
        }
        decision.did.set(Did::CHANGE, true);
        decision.did.set(Did::COUNT, true);
        let reserved_after = reserved.saturating_add(decision.reserved - decision.held_tokens);
        self.fill_remaining(&mut decision, limits, &now, reserved_after);
        Ok(decision)
    }

    /// Fills the remaining amounts, given the tokens reserved by live leases (computed once by
    /// the caller: it is a scan of the leases).
    fn fill_remaining(
        &self,
        decision: &mut AdmitDecision,
        limits: &Limits,
        now: &Now,
        reserved: u64,
    ) {
        let (requests, tokens) = match limits.has_rates() {
            true => (&REQUEST_LIMITS[..], &TOKEN_LIMITS[..]),
            false => (&REQUEST_LIMITS[..3], &TOKEN_LIMITS[..3]),
        };
        decision.remaining_requests = self.remaining(limits, now, reserved, requests);
        decision.remaining_tokens = self.remaining(limits, now, reserved, tokens);
    }
}

/// The limits on requests: windows first, then rates.
const REQUEST_LIMITS: [LimitField; 5] = [
    LimitField::RequestsPerDay,
    LimitField::RequestsPerMonth,
    LimitField::TotalRequests,
    LimitField::RequestsPerSecond,
    LimitField::RequestsPerMinute,
];

/// The limits on tokens: windows first, then the rate.
const TOKEN_LIMITS: [LimitField; 4] = [
    LimitField::TokensPerHour,
    LimitField::TokensPerDay,
    LimitField::TokensPerMonth,
    LimitField::TokensPerMinute,
];

/// What an admission asks of the limits: the requests it counts and whether it takes a lease.
#[derive(Debug, Clone, Copy)]
struct Ask {
    cost: u64,
    leased: bool,
}

/// Whether a balance pays a request that the windows `violations` deny.
enum Payment {
    /// It pays (`request`: the request windows denied, the request's cost is debited).
    Paid { request: bool },
    /// A balance that would have to pay is spent.
    Spent,
    /// No balance can pay (none of the kind needed, or the concurrency limit denied).
    None,
}

/// Request windows (day, month, total) and token windows (hour, day, month), as violation bits.
const REQUEST_WINDOWS: u16 = 0b000_0111;
const TOKEN_WINDOWS: u16 = 0b011_1000;

/// A requests balance must cover the whole `cost` (a token balance only has to have something
/// left: what a commit debits is not known yet).
fn balance_pays(violations: u16, offer: Option<BalanceOffer>, cost: u64) -> Payment {
    let Some(offer) = offer else {
        return Payment::None;
    };
    if violations & !(REQUEST_WINDOWS | TOKEN_WINDOWS) != 0 {
        return Payment::None;
    }
    let mut spent = false;
    let windows = [
        (BalanceKind::Requests, REQUEST_WINDOWS),
        (BalanceKind::Tokens, TOKEN_WINDOWS),
    ];
    for (kind, bits) in windows {
        if violations & bits == 0 {
            continue;
        }
        let needed = match kind {
            BalanceKind::Requests => i64::try_from(cost).unwrap_or(i64::MAX).max(1),
            BalanceKind::Tokens => 1,
        };
        match offer.left.get(kind) {
            None => return Payment::None,
            Some(left) if left < needed => spent = true,
            Some(_) => {}
        }
    }
    if spent {
        return Payment::Spent;
    }
    Payment::Paid {
        request: violations & REQUEST_WINDOWS != 0,
    }
}
