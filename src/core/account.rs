//! One account's usage (a user in one bundle) and the admission decision over it.
//!
//! `Account` holds the request and token counters of the current UTC windows, the live leases
//! (concurrency slots with their token reservations) and recently settled lease ids (so a
//! repeated commit counts once). `admit`, `commit` and `release` are the only ways it changes;
//! each takes `now`, so the same inputs always give the same result. It knows nothing of Redis:
//! the shell stores it in a key and replicates its encoded state.

use std::collections::VecDeque;

use super::policy::{EffectivePolicy, LimitField, Limits};
use super::window::{seconds_until, Window};
use super::Millis;

/// Most live leases one account may hold; more is refused (bounds memory per account).
pub const MAX_LEASES: usize = 4096;
/// Most settled lease ids remembered per account for commit idempotency.
pub const MAX_SETTLED: usize = 64;
/// How long a settled lease id is remembered at least.
pub const SETTLED_MIN_MS: Millis = 60_000;

/// A counter that belongs to one window; it reads as zero once that window is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub window: i64,
    pub value: u64,
}

impl Counter {
    fn get(&self, index: i64) -> u64 {
        if self.window == index {
            self.value
        } else {
            0
        }
    }

    fn add(&mut self, index: i64, n: u64) {
        if self.window != index {
            *self = Counter {
                window: index,
                value: 0,
            };
        }
        self.value = self.value.saturating_add(n);
    }

    fn refund(&mut self, index: i64) {
        if self.window == index {
            self.value = self.value.saturating_sub(1);
        }
    }
}

/// A lease id: the 16-hex-digit ids the module generates are kept inline as a number, any
/// other id a caller chose is kept as text. Both compare and print as the text the caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseId {
    Short(u64),
    Named(Box<str>),
}

impl LeaseId {
    /// The id for `text` (exactly 16 lower-case hex digits become `Short`).
    pub fn parse(text: &str) -> LeaseId {
        let is_short =
            text.len() == 16 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match (is_short, u64::from_str_radix(text, 16)) {
            (true, Ok(n)) => LeaseId::Short(n),
            _ => LeaseId::Named(text.into()),
        }
    }

    /// Writes the text form into `buf` and returns it (no allocation for generated ids).
    pub fn as_text<'b>(&'b self, buf: &'b mut [u8; 16]) -> &'b str {
        match self {
            LeaseId::Short(n) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                for (i, out) in buf.iter_mut().enumerate() {
                    *out = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
                }
                std::str::from_utf8(buf).unwrap_or("")
            }
            LeaseId::Named(s) => s,
        }
    }

    fn heap_size(&self) -> usize {
        match self {
            LeaseId::Short(_) => 0,
            LeaseId::Named(s) => s.len(),
        }
    }
}

/// A concurrency slot held by one in-flight request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub expires_at: Millis,
    /// Tokens reserved until commit, release or expiry.
    pub reserved: u64,
    /// The day and month the request was counted in (a release refunds only those); window
    /// indexes since 1970 fit 32 bits for millions of years, and a lease is 40 bytes, not 48.
    pub day: i32,
    pub month: i32,
}

/// The usage state of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    pub req_day: Counter,
    pub req_month: Counter,
    pub req_total: u64,
    pub tok_hour: Counter,
    pub tok_day: Counter,
    pub tok_month: Counter,
    /// Live leases, ordered by expiry (earliest first), so expired ones come off the front.
    pub leases: VecDeque<Lease>,
    /// Lease ids already committed, with when they may be forgotten.
    pub settled: Vec<(LeaseId, Millis)>,
    /// A lifetime limit (`TOTAL_REQUESTS`) has applied: the state must never expire.
    pub lifetime: bool,
    /// Tokens reserved by the leases held, expired ones included until they are pruned (kept
    /// up to date with `leases`, so deciding never walks the leases).
    reserved_sum: u64,
    /// When the first lease expires (the front of `leases`), kept so that deciding whether to
    /// prune does not touch the leases.
    /// 0 when there is none (a `Millis` rather than an `Option` keeps the account small).
    first_expiry: Millis,
}

/// How long expired leases may stay before an admission prunes them when they cannot change
/// its decision (see `prune_due`).
const PRUNE_DELAY_MS: Millis = 250;

/// What `QUOTA.ADMIT` asks, besides the account and its effective policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmitRequest<'a> {
    pub lease: Option<&'a str>,
    pub lease_ttl_ms: Millis,
    pub reserve: Option<u64>,
    pub peek: bool,
}

/// The outcome of an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitDecision {
    pub allowed: bool,
    /// Violated limits, as a bit set over `LimitField` (`MaxConcurrent` = concurrency).
    pub violations: u8,
    pub retry_after: i64,
    pub lease: Option<LeaseId>,
    pub reserved: u64,
    pub used_replenishment: bool,
    pub remaining_requests: i64,
    pub remaining_tokens: i64,
    /// Whether the account state changed (and must be stored and replicated).
    pub changed: bool,
}

impl AdmitDecision {
    /// The denial reason: violated limits joined with `|`, `""` when allowed.
    pub fn reason(&self) -> std::borrow::Cow<'static, str> {
        let name = |field: LimitField| match field {
            LimitField::MaxConcurrent => "concurrency",
            other => other.name(),
        };
        let mut violated = LimitField::ALL
            .into_iter()
            .filter(|f| self.violations & (1 << *f as u8) != 0);
        match (violated.next(), violated.next()) {
            (None, _) => "".into(),
            (Some(only), None) => name(only).into(),
            (Some(first), Some(second)) => {
                let mut out = format!("{}|{}", name(first), name(second));
                for field in violated {
                    out.push('|');
                    out.push_str(name(field));
                }
                out.into()
            }
        }
    }
}

/// A snapshot of an account's usage for `QUOTA.USAGE` and `VERBOSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub req_day: u64,
    pub req_month: u64,
    pub req_total: u64,
    pub tok_hour: u64,
    pub tok_day: u64,
    pub tok_month: u64,
    pub in_flight: u64,
    pub reserved: u64,
    /// Unix seconds at which the hour, day and month windows end.
    pub hour_reset: i64,
    pub day_reset: i64,
    pub month_reset: i64,
}

/// How long an account's state must be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// A lifetime limit applied: never expire.
    Forever,
    /// Until this instant (ms since the epoch).
    Until(Millis),
    /// Nothing is left to keep.
    Nothing,
}

/// What `QUOTA.COMMIT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    pub duplicate: bool,
    pub lease_held: bool,
}

/// Why an admission could not even be decided; `Display` is the wire error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountError {
    TooManyLeases,
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::TooManyLeases => write!(
                f,
                "ERR this account already holds {MAX_LEASES} live leases: commit or release some"
            ),
        }
    }
}

/// The windows' indexes at one instant.
#[derive(Debug, Clone, Copy)]
struct Now {
    ms: Millis,
    hour: i64,
    day: i64,
    month: i64,
}

impl Now {
    fn at(ms: Millis) -> Now {
        Now {
            ms,
            hour: Window::Hour.index(ms),
            day: Window::Day.index(ms),
            month: Window::Month.index(ms),
        }
    }
}

impl Account {
    /// Drops leases and settled ids that have expired; true if anything was dropped.
    fn prune(&mut self, now: Millis) -> bool {
        let mut pruned = false;
        while self.leases.front().is_some_and(|l| l.expires_at <= now) {
            if let Some(gone) = self.leases.pop_front() {
                self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
            }
            pruned = true;
        }
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        // A burst of leases must not pin its memory once it is over.
        if pruned && self.leases.capacity() > 16 && self.leases.len() * 4 < self.leases.capacity() {
            self.leases.shrink_to(self.leases.len() * 2);
        }
        if !self.settled.is_empty() {
            let before = self.settled.len();
            self.settled.retain(|(_, until)| *until > now);
            pruned |= before != self.settled.len();
        }
        pruned
    }

    /// Whether an admission must prune before deciding: some lease has expired and either it
    /// could change the decision (a lease id to find, reservations counted against the token
    /// windows, the concurrency limit or the lease cap within reach) or it expired more than
    /// `PRUNE_DELAY_MS` ago. Otherwise an expired lease is harmless for a moment, and pruning
    /// in batches touches the leases' memory once rather than on every admission.
    fn prune_due(&self, policy: &EffectivePolicy, req: &AdmitRequest<'_>, now: Millis) -> bool {
        let first = self.first_expiry;
        if first == 0 || first > now {
            return false;
        }
        let held = self.leases.len();
        // The base limit is the lower one: it decides `used_replenishment`.
        let max_concurrent = policy.base.get(LimitField::MaxConcurrent);
        req.lease.is_some()
            || self.reserved_sum > 0
            || now >= first.saturating_add(PRUNE_DELAY_MS)
            || held >= MAX_LEASES
            || max_concurrent.is_some_and(|max| held as u64 >= max)
    }

    /// Adds a lease, keeping the expiry order (new leases usually go last).
    fn push_lease(&mut self, lease: Lease) {
        let at = self
            .leases
            .iter()
            .rposition(|l| l.expires_at <= lease.expires_at)
            .map_or(0, |i| i + 1);
        self.reserved_sum = self.reserved_sum.saturating_add(lease.reserved);
        if at == 0 {
            self.first_expiry = lease.expires_at;
        }
        self.leases.insert(at, lease);
    }

    /// Removes the lease at `pos`.
    fn remove_lease(&mut self, pos: usize) -> Option<Lease> {
        let gone = self.leases.remove(pos)?;
        self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        Some(gone)
    }

    /// Tokens reserved by live leases (exact after a prune: see `prune_due`).
    pub fn reserved(&self) -> u64 {
        self.reserved_sum
    }

    /// How much of a limited field is used at `now` (tokens: committed plus reserved).
    fn used(&self, field: LimitField, now: &Now, reserved: u64) -> u64 {
        match field {
            LimitField::RequestsPerDay => self.req_day.get(now.day),
            LimitField::RequestsPerMonth => self.req_month.get(now.month),
            LimitField::TotalRequests => self.req_total,
            LimitField::TokensPerHour => self.tok_hour.get(now.hour).saturating_add(reserved),
            LimitField::TokensPerDay => self.tok_day.get(now.day).saturating_add(reserved),
            LimitField::TokensPerMonth => self.tok_month.get(now.month).saturating_add(reserved),
            LimitField::MaxConcurrent => self.leases.len() as u64,
        }
    }

    /// The violated quota windows (not concurrency) under `limits`.
    fn window_violations(&self, limits: &Limits, now: &Now, reserved: u64) -> u8 {
        let mut bits = 0u8;
        for field in &LimitField::ALL[..6] {
            if let Some(limit) = limits.get(*field) {
                if self.used(*field, now, reserved) >= limit {
                    bits |= 1 << *field as u8;
                }
            }
        }
        bits
    }

    /// All violations: quota windows first; concurrency only when no window is violated.
    fn violations(&self, limits: &Limits, now: &Now, reserved: u64) -> u8 {
        let bits = self.window_violations(limits, now, reserved);
        if bits != 0 {
            return bits;
        }
        match limits.get(LimitField::MaxConcurrent) {
            Some(max) if self.leases.len() as u64 >= max => 1 << LimitField::MaxConcurrent as u8,
            _ => 0,
        }
    }

    /// Seconds until every violated limit could allow again; -1 when one never resets.
    fn retry_after(&self, violations: u8, now: &Now) -> i64 {
        let mut wait = 0i64;
        for field in LimitField::ALL {
            if violations & (1 << field as u8) == 0 {
                continue;
            }
            let secs = match (field.window(), field) {
                (Some(window), _) => seconds_until(now.ms, window.end(now.ms)),
                (None, LimitField::MaxConcurrent) => {
                    let first = self.leases.iter().map(|l| l.expires_at).min();
                    seconds_until(now.ms, first.unwrap_or(now.ms)).max(1)
                }
                (None, _) => return -1,
            };
            wait = wait.max(secs);
        }
        if violations == 0 {
            -1
        } else {
            wait
        }
    }

    /// Smallest amount left across the limited request windows, -1 when none is limited.
    fn remaining(&self, limits: &Limits, now: &Now, reserved: u64, fields: &[LimitField]) -> i64 {
        fields
            .iter()
            .filter_map(|f| {
                limits
                    .get(*f)
                    .map(|l| l.saturating_sub(self.used(*f, now, reserved)))
            })
            .min()
            .map_or(-1, |left| i64::try_from(left).unwrap_or(i64::MAX))
    }

    /// Decides one request against `policy` at `now` and, when admitted (and not a peek),
    /// counts it: one request in the day, month and total; a lease when concurrency is limited
    /// or a lease or reservation is asked for. Re-admitting a held lease changes nothing.
    pub fn admit(
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
            allowed: true,
            violations: 0,
            retry_after: -1,
            lease: None,
            reserved: 0,
            used_replenishment: false,
            remaining_requests: -1,
            remaining_tokens: -1,
            changed: pruned,
        };
        let wanted = req.lease.map(LeaseId::parse);
        if let Some(id) = &wanted {
            if let Some(held) = self.leases.iter().find(|l| &l.id == id) {
                decision.lease = Some(held.id.clone());
                decision.reserved = held.reserved;
                self.fill_remaining(&mut decision, limits, &now, self.reserved());
                return Ok(decision);
            }
        }
        let reserved = self.reserved();
        let violations = self.violations(limits, &now, reserved);
        if violations != 0 {
            decision.allowed = false;
            decision.violations = violations;
            decision.retry_after = self.retry_after(violations, &now);
            self.fill_remaining(&mut decision, limits, &now, reserved);
            return Ok(decision);
        }
        decision.used_replenishment = self.violations(&policy.base, &now, reserved) != 0;
        let wants_lease = req.lease.is_some()
            || req.reserve.is_some()
            || limits.get(LimitField::MaxConcurrent).is_some();
        if wants_lease && self.leases.len() >= MAX_LEASES {
            return Err(AccountError::TooManyLeases);
        }
        if req.peek {
            self.fill_remaining(&mut decision, limits, &now, reserved);
            return Ok(decision);
        }
        if limits.get(LimitField::TotalRequests).is_some() {
            self.lifetime = true;
        }
        self.req_day.add(now.day, 1);
        self.req_month.add(now.month, 1);
        self.req_total = self.req_total.saturating_add(1);
        if wants_lease {
            let want = req.reserve.unwrap_or(0);
            let grant = [
                LimitField::TokensPerHour,
                LimitField::TokensPerDay,
                LimitField::TokensPerMonth,
            ]
            .iter()
            .filter_map(|f| {
                limits
                    .get(*f)
                    .map(|l| l.saturating_sub(self.used(*f, &now, reserved)))
            })
            .fold(want, u64::min);
            let id = wanted.unwrap_or_else(|| LeaseId::Short(new_lease_id()));
            self.push_lease(Lease {
                id: id.clone(),
                expires_at: now_ms.saturating_add(req.lease_ttl_ms.max(1)),
                reserved: grant,
                day: i32::try_from(now.day).unwrap_or(i32::MAX),
                month: i32::try_from(now.month).unwrap_or(i32::MAX),
            });
            decision.lease = Some(id);
            decision.reserved = grant;
        }
        decision.changed = true;
        let reserved_after = reserved.saturating_add(decision.reserved);
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
        decision.remaining_requests = self.remaining(
            limits,
            now,
            reserved,
            &[
                LimitField::RequestsPerDay,
                LimitField::RequestsPerMonth,
                LimitField::TotalRequests,
            ],
        );
        decision.remaining_tokens = self.remaining(
            limits,
            now,
            reserved,
            &[
                LimitField::TokensPerHour,
                LimitField::TokensPerDay,
                LimitField::TokensPerMonth,
            ],
        );
    }

    /// Records `tokens` used in the hour, day and month windows and settles the lease (its
    /// reservation is dropped). A lease already committed records nothing.
    pub fn commit(&mut self, tokens: u64, lease: Option<&str>, now_ms: Millis) -> CommitOutcome {
        self.prune(now_ms);
        let now = Now::at(now_ms);
        let mut lease_held = false;
        if let Some(id) = lease.map(LeaseId::parse) {
            if self.settled.iter().any(|(s, _)| *s == id) {
                return CommitOutcome {
                    duplicate: true,
                    lease_held: false,
                };
            }
            let mut until = now_ms.saturating_add(SETTLED_MIN_MS);
            if let Some(pos) = self.leases.iter().position(|l| l.id == id) {
                if let Some(held) = self.remove_lease(pos) {
                    until = until.max(held.expires_at);
                    lease_held = true;
                }
            }
            if self.settled.len() >= MAX_SETTLED {
                if let Some(oldest) = (0..self.settled.len()).min_by_key(|i| self.settled[*i].1) {
                    self.settled.swap_remove(oldest);
                }
            }
            self.settled.push((id, until));
        }
        self.tok_hour.add(now.hour, tokens);
        self.tok_day.add(now.day, tokens);
        self.tok_month.add(now.month, tokens);
        CommitOutcome {
            duplicate: false,
            lease_held,
        }
    }

    /// Undoes an admission: frees the lease, drops its reservation and refunds the request in
    /// the windows it was counted in. False if the lease was not held.
    pub fn release(&mut self, lease: &str, now_ms: Millis) -> bool {
        self.prune(now_ms);
        let lease = LeaseId::parse(lease);
        let Some(pos) = self.leases.iter().position(|l| l.id == lease) else {
            return false;
        };
        let Some(held) = self.remove_lease(pos) else {
            return false;
        };
        self.req_day.refund(i64::from(held.day));
        self.req_month.refund(i64::from(held.month));
        self.req_total = self.req_total.saturating_sub(1);
        true
    }

    /// The usage snapshot at `now`.
    pub fn usage(&self, now_ms: Millis) -> Usage {
        let now = Now::at(now_ms);
        let live = self.leases.iter().filter(|l| l.expires_at > now_ms);
        let (in_flight, reserved) = live.fold((0u64, 0u64), |(n, r), l| {
            (n + 1, r.saturating_add(l.reserved))
        });
        Usage {
            req_day: self.req_day.get(now.day),
            req_month: self.req_month.get(now.month),
            req_total: self.req_total,
            tok_hour: self.tok_hour.get(now.hour),
            tok_day: self.tok_day.get(now.day),
            tok_month: self.tok_month.get(now.month),
            in_flight,
            reserved,
            hour_reset: Window::Hour.end(now_ms) / 1000,
            day_reset: Window::Day.end(now_ms) / 1000,
            month_reset: Window::Month.end(now_ms) / 1000,
        }
    }

    /// How long the state must be kept: until the end of the last window holding a count, or
    /// the last lease or settled id; for good once a lifetime limit applied; not at all when
    /// nothing is left (the caller deletes the key).
    pub fn retention(&self) -> Retention {
        if self.lifetime {
            return Retention::Forever;
        }
        let windows = [
            (&self.req_day, Window::Day),
            (&self.req_month, Window::Month),
            (&self.tok_hour, Window::Hour),
            (&self.tok_day, Window::Day),
            (&self.tok_month, Window::Month),
        ];
        let counted = windows
            .iter()
            .filter(|(c, _)| c.value > 0)
            .map(|(c, w)| w.start_of(c.window + 1));
        // Leases are kept in expiry order: the last one expires last.
        let leases = self.leases.back().map(|l| l.expires_at);
        let settled = self.settled.iter().map(|(_, t)| *t);
        match counted.chain(leases).chain(settled).max() {
            Some(at) => Retention::Until(at),
            // Only a lifetime count is left and no lifetime limit uses it: keep it for the
            // month it was last counted in.
            None if self.req_total > 0 => {
                Retention::Until(Window::Month.start_of(self.req_month.window + 1))
            }
            None => Retention::Nothing,
        }
    }

    /// Encodes the state for RDB, AOF and replication.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.leases.len() * 40);
        w.push(ENCODING_VERSION);
        w.push(u8::from(self.lifetime));
        for c in [
            &self.req_day,
            &self.req_month,
            &self.tok_hour,
            &self.tok_day,
            &self.tok_month,
        ] {
            put_i64(&mut w, c.window);
            put_u64(&mut w, c.value);
        }
        put_u64(&mut w, self.req_total);
        put_u64(&mut w, self.leases.len() as u64);
        for l in &self.leases {
            put_id(&mut w, &l.id);
            put_i64(&mut w, l.expires_at);
            put_u64(&mut w, l.reserved);
            put_i64(&mut w, i64::from(l.day));
            put_i64(&mut w, i64::from(l.month));
        }
        put_u64(&mut w, self.settled.len() as u64);
        for (id, until) in &self.settled {
            put_id(&mut w, id);
            put_i64(&mut w, *until);
        }
        w
    }

    /// Decodes what `encode` wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Account> {
        let mut r = Reader { buf: bytes };
        if r.byte()? != ENCODING_VERSION {
            return None;
        }
        let lifetime = match r.byte()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let mut counters = [Counter::default(); 5];
        for c in counters.iter_mut() {
            *c = Counter {
                window: r.i64()?,
                value: r.u64()?,
            };
        }
        let req_total = r.u64()?;
        let n = usize::try_from(r.u64()?)
            .ok()
            .filter(|n| *n <= MAX_LEASES)?;
        let mut leases = VecDeque::with_capacity(n);
        for _ in 0..n {
            leases.push_back(Lease {
                id: LeaseId::parse(&r.str()?),
                expires_at: r.i64()?,
                reserved: r.u64()?,
                day: i32::try_from(r.i64()?).ok()?,
                month: i32::try_from(r.i64()?).ok()?,
            });
        }
        let n = usize::try_from(r.u64()?)
            .ok()
            .filter(|n| *n <= MAX_SETTLED)?;
        let mut settled = Vec::with_capacity(n);
        for _ in 0..n {
            settled.push((LeaseId::parse(&r.str()?), r.i64()?));
        }
        if !r.buf.is_empty() {
            return None;
        }
        leases.make_contiguous().sort_by_key(|l| l.expires_at);
        let [req_day, req_month, tok_hour, tok_day, tok_month] = counters;
        let reserved_sum = leases
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.reserved));
        Some(Account {
            reserved_sum,
            first_expiry: leases.front().map_or(0, |l| l.expires_at),
            req_day,
            req_month,
            req_total,
            tok_hour,
            tok_day,
            tok_month,
            leases,
            settled,
            lifetime,
        })
    }

    /// Bytes of heap this state owns beyond the struct itself (for `MEMORY USAGE`).
    pub fn heap_size(&self) -> usize {
        self.leases.capacity() * std::mem::size_of::<Lease>()
            + self.leases.iter().map(|l| l.id.heap_size()).sum::<usize>()
            + self.settled.capacity() * std::mem::size_of::<(LeaseId, Millis)>()
            + self
                .settled
                .iter()
                .map(|(id, _)| id.heap_size())
                .sum::<usize>()
    }
}

const ENCODING_VERSION: u8 = 1;

fn put_u64(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push((v as u8) | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

fn put_i64(w: &mut Vec<u8>, v: i64) {
    put_u64(w, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_id(w: &mut Vec<u8>, id: &LeaseId) {
    let mut buf = [0u8; 16];
    put_str(w, id.as_text(&mut buf));
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(*first)
    }

    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn i64(&mut self) -> Option<i64> {
        let u = self.u64()?;
        Some(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    fn str(&mut self) -> Option<Box<str>> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.buf.len() {
            return None;
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        std::str::from_utf8(s).ok().map(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Additional;
    use crate::core::window::days_from_civil;

    const T0: Millis = 1_795_000_000_000; // 2026-11-18T...

    fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
        let mut base = Limits::default();
        for (f, v) in fields {
            base.set(*f, Some(*v));
        }
        EffectivePolicy::merge(base, None)
    }

    fn plain() -> AdmitRequest<'static> {
        AdmitRequest {
            lease: None,
            lease_ttl_ms: 300_000,
            reserve: None,
            peek: false,
        }
    }

    fn admit(
        acc: &mut Account,
        p: &EffectivePolicy,
        req: &AdmitRequest<'_>,
        now: Millis,
    ) -> AdmitDecision {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        acc.admit(p, req, now, || {
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
        })
        .unwrap()
    }

    #[test]
    fn requests_per_day_admits_exactly_the_limit_then_resets_at_midnight() {
        let p = policy(&[(LimitField::RequestsPerDay, 3)]);
        let mut acc = Account::default();
        for i in 0..3 {
            let d = admit(&mut acc, &p, &plain(), T0);
            assert!(d.allowed);
            assert_eq!(d.remaining_requests, 2 - i);
        }
        let d = admit(&mut acc, &p, &plain(), T0);
        assert!(!d.allowed);
        assert_eq!(d.reason(), "requests_per_day");
        assert_eq!(d.retry_after, seconds_until(T0, Window::Day.end(T0)));
        assert!(!d.changed);
        let tomorrow = Window::Day.end(T0);
        assert!(admit(&mut acc, &p, &plain(), tomorrow).allowed);
    }

    #[test]
    fn several_violations_join_and_total_never_resets() {
        let p = policy(&[
            (LimitField::RequestsPerDay, 1),
            (LimitField::TotalRequests, 1),
        ]);
        let mut acc = Account::default();
        assert!(admit(&mut acc, &p, &plain(), T0).allowed);
        let d = admit(&mut acc, &p, &plain(), T0);
        assert_eq!(d.reason(), "requests_per_day|total_requests");
        assert_eq!(d.retry_after, -1);
        assert!(acc.lifetime);
        assert_eq!(acc.retention(), Retention::Forever);
    }

    #[test]
    fn credits_raise_the_limit_and_mark_used_replenishment() {
        let mut base = Limits::default();
        base.set(LimitField::RequestsPerDay, Some(1));
        let mut add = Additional::default();
        add.set(LimitField::RequestsPerDay, Some(1));
        let p = EffectivePolicy::merge(base, Some(&add));
        let mut acc = Account::default();
        let first = admit(&mut acc, &p, &plain(), T0);
        assert!(first.allowed && !first.used_replenishment);
        let second = admit(&mut acc, &p, &plain(), T0);
        assert!(second.allowed && second.used_replenishment);
        assert!(!admit(&mut acc, &p, &plain(), T0).allowed);
    }

    #[test]
    fn concurrency_counts_live_leases_and_checks_only_without_window_violations() {
        let p = policy(&[(LimitField::MaxConcurrent, 2)]);
        let mut acc = Account::default();
        let a = admit(&mut acc, &p, &plain(), T0);
        let b = admit(&mut acc, &p, &plain(), T0);
        assert!(a.allowed && b.allowed && a.lease.is_some() && a.lease != b.lease);
        let c = admit(&mut acc, &p, &plain(), T0);
        assert_eq!(c.reason(), "concurrency");
        assert_eq!(c.retry_after, 300);
        // A lease expires: the slot frees.
        assert!(admit(&mut acc, &p, &plain(), T0 + 300_000).allowed);
        let p2 = policy(&[
            (LimitField::MaxConcurrent, 0),
            (LimitField::RequestsPerDay, 0),
        ]);
        assert_eq!(
            admit(&mut acc, &p2, &plain(), T0).reason(),
            "requests_per_day"
        );
    }

    #[test]
    fn readmitting_a_held_lease_counts_nothing() {
        let p = policy(&[
            (LimitField::MaxConcurrent, 1),
            (LimitField::RequestsPerDay, 10),
        ]);
        let mut acc = Account::default();
        let req = AdmitRequest {
            lease: Some("L1"),
            ..plain()
        };
        let a = admit(&mut acc, &p, &req, T0);
        let b = admit(&mut acc, &p, &req, T0);
        assert!(a.allowed && b.allowed);
        assert_eq!(b.lease, Some(LeaseId::parse("L1")));
        assert!(!b.changed);
        assert_eq!(acc.usage(T0).req_day, 1);
        assert_eq!(acc.usage(T0).in_flight, 1);
    }

    #[test]
    fn reservations_cap_at_what_is_left_and_settle_on_commit() {
        let p = policy(&[
            (LimitField::TokensPerDay, 1000),
            (LimitField::TokensPerHour, 600),
        ]);
        let mut acc = Account::default();
        let r = AdmitRequest {
            reserve: Some(500),
            ..plain()
        };
        let a = admit(&mut acc, &p, &r, T0);
        assert_eq!(a.reserved, 500);
        assert_eq!(a.remaining_tokens, 100);
        let b = admit(&mut acc, &p, &r, T0);
        assert_eq!(b.reserved, 100);
        let c = admit(&mut acc, &p, &r, T0);
        assert_eq!(c.reason(), "tokens_per_hour");
        let lease = a.lease.unwrap();
        let mut buf = [0u8; 16];
        let lease = lease.as_text(&mut buf).to_owned();
        assert_eq!(lease.len(), 16);
        let out = acc.commit(200, Some(&lease), T0);
        assert!(out.lease_held && !out.duplicate);
        assert_eq!(acc.usage(T0).tok_day, 200);
        assert_eq!(acc.usage(T0).reserved, 100);
        assert!(acc.commit(200, Some(&lease), T0).duplicate);
        assert_eq!(acc.usage(T0).tok_day, 200);
    }

    #[test]
    fn release_refunds_the_request_only_in_its_own_windows() {
        let p = policy(&[(LimitField::RequestsPerDay, 5)]);
        let mut acc = Account::default();
        let r = AdmitRequest {
            lease: Some("x"),
            ..plain()
        };
        admit(&mut acc, &p, &r, T0);
        assert_eq!(acc.usage(T0).req_day, 1);
        assert!(acc.release("x", T0));
        assert!(!acc.release("x", T0));
        assert_eq!(acc.usage(T0).req_day, 0);
        assert_eq!(acc.req_total, 0);
        admit(
            &mut acc,
            &p,
            &AdmitRequest {
                lease_ttl_ms: 3 * 86_400_000,
                ..r
            },
            T0,
        );
        let next_day = Window::Day.end(T0) + 10;
        admit(&mut acc, &p, &plain(), next_day);
        assert!(acc.release("x", next_day));
        assert_eq!(acc.usage(next_day).req_day, 1);
    }

    #[test]
    fn expired_leases_never_count_even_before_they_are_pruned() {
        let mut acc = Account::default();
        let short = AdmitRequest {
            lease_ttl_ms: 1000,
            ..plain()
        };
        // Concurrency: two slots taken, both expired 1 ms ago (within PRUNE_DELAY_MS).
        let p = policy(&[(LimitField::MaxConcurrent, 2)]);
        assert!(admit(&mut acc, &p, &short, T0).allowed);
        assert!(admit(&mut acc, &p, &short, T0).allowed);
        assert!(!admit(&mut acc, &p, &short, T0 + 999).allowed);
        assert!(admit(&mut acc, &p, &short, T0 + 1001).allowed);
        // Reservations: an expired one no longer holds tokens.
        let mut acc = Account::default();
        let p = policy(&[(LimitField::TokensPerDay, 100)]);
        let reserve = AdmitRequest {
            reserve: Some(100),
            ..short
        };
        assert_eq!(admit(&mut acc, &p, &reserve, T0).reserved, 100);
        assert!(!admit(&mut acc, &p, &reserve, T0 + 999).allowed);
        let d = admit(&mut acc, &p, &reserve, T0 + 1001);
        assert!(d.allowed);
        assert_eq!(d.reserved, 100);
        // Without any of that at stake, expired leases go within PRUNE_DELAY_MS.
        let mut acc = Account::default();
        let p = policy(&[(LimitField::MaxConcurrent, 1000)]);
        for _ in 0..10 {
            admit(&mut acc, &p, &short, T0);
        }
        admit(&mut acc, &p, &short, T0 + 1000);
        assert_eq!(acc.usage(T0 + 1000).in_flight, 1);
        admit(&mut acc, &p, &short, T0 + 1000 + PRUNE_DELAY_MS);
        assert_eq!(acc.leases.len(), 2, "the 10 expired leases are pruned");
    }

    /// Deciding with expired leases pruned late gives exactly the decisions that pruning them
    /// at once gives, whatever the sequence of admissions, commits and releases.
    #[test]
    fn late_pruning_decides_exactly_as_eager_pruning() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for case in 0..300 {
            let mut base = Limits::default();
            let mut add = Additional::default();
            for field in LimitField::ALL {
                if next(3) == 0 {
                    base.set(field, Some(next(8)));
                    if next(2) == 0 {
                        add.set(field, Some(next(4) as i64));
                    }
                }
            }
            let p = EffectivePolicy::merge(base, Some(&add));
            let mut lazy = Account::default();
            let mut eager = Account::default();
            let mut now = T0 + next(86_400_000) as Millis;
            let mut ids: Vec<String> = Vec::new();
            for step in 0..200 {
                now += next(700) as Millis;
                let named = ids.get(next(ids.len() as u64 + 3) as usize).cloned();
                match next(6) {
                    0..=2 => {
                        let req = AdmitRequest {
                            lease: named.as_deref().filter(|_| next(2) == 0),
                            lease_ttl_ms: 1 + next(1500) as Millis,
                            reserve: (next(2) == 0).then(|| next(6)),
                            peek: next(8) == 0,
                        };
                        eager.prune(now);
                        let mut id_a = 1000 * (case + 1) + step;
                        let mut id_b = id_a;
                        let a = lazy.admit(&p, &req, now, || {
                            id_a += 1;
                            id_a
                        });
                        let b = eager.admit(&p, &req, now, || {
                            id_b += 1;
                            id_b
                        });
                        let (mut a, mut b) = (a.unwrap(), b.unwrap());
                        (a.changed, b.changed) = (false, false);
                        assert_eq!(a, b, "case {case} step {step}");
                        if let Some(LeaseId::Short(n)) = &a.lease {
                            ids.push(format!("{n:016x}"));
                        }
                    }
                    3 => {
                        let tokens = next(5);
                        assert_eq!(
                            lazy.commit(tokens, named.as_deref(), now),
                            eager.commit(tokens, named.as_deref(), now),
                            "case {case} step {step}"
                        );
                    }
                    4 => {
                        if let Some(id) = &named {
                            assert_eq!(lazy.release(id, now), eager.release(id, now));
                        }
                    }
                    _ => {
                        assert_eq!(lazy.usage(now), eager.usage(now), "case {case} step {step}");
                        for acc in [&lazy, &eager] {
                            let sum = acc.leases.iter().map(|l| l.reserved).sum::<u64>();
                            assert_eq!(acc.reserved_sum, sum);
                            let front = acc.leases.front().map_or(0, |l| l.expires_at);
                            assert_eq!(acc.first_expiry, front);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lease_memory_is_given_back_after_a_burst() {
        let p = policy(&[(LimitField::MaxConcurrent, 1000)]);
        let mut acc = Account::default();
        let short = AdmitRequest {
            lease_ttl_ms: 1000,
            ..plain()
        };
        for _ in 0..500 {
            admit(&mut acc, &p, &short, T0);
        }
        assert!(acc.leases.capacity() >= 500);
        admit(&mut acc, &p, &short, T0 + 2000);
        assert_eq!(acc.leases.len(), 1);
        assert!(acc.leases.capacity() <= 16, "{}", acc.leases.capacity());
    }

    #[test]
    fn peek_changes_nothing() {
        let p = policy(&[
            (LimitField::RequestsPerDay, 1),
            (LimitField::MaxConcurrent, 1),
        ]);
        let mut acc = Account::default();
        let d = admit(
            &mut acc,
            &p,
            &AdmitRequest {
                peek: true,
                ..plain()
            },
            T0,
        );
        assert!(d.allowed && d.lease.is_none());
        assert_eq!(acc, Account::default());
    }

    #[test]
    fn expiry_follows_the_longest_live_window() {
        let p = policy(&[(LimitField::RequestsPerDay, 5)]);
        let mut acc = Account::default();
        assert_eq!(acc.retention(), Retention::Nothing);
        admit(&mut acc, &p, &plain(), T0);
        assert_eq!(acc.retention(), Retention::Until(Window::Month.end(T0)));
        let mut tokens = Account::default();
        tokens.commit(5, None, T0);
        assert_eq!(tokens.retention(), Retention::Until(Window::Month.end(T0)));
        // A released admission leaves nothing to keep.
        let mut released = Account::default();
        let r = AdmitRequest {
            lease: Some("x"),
            ..plain()
        };
        admit(&mut released, &p, &r, T0);
        assert!(released.release("x", T0));
        assert_eq!(released.retention(), Retention::Nothing);
        assert!(Window::Month.end(T0) > days_from_civil(2026, 11, 1) * 86_400_000);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let p = policy(&[
            (LimitField::MaxConcurrent, 5),
            (LimitField::TokensPerDay, 100),
        ]);
        let mut acc = Account::default();
        admit(
            &mut acc,
            &p,
            &AdmitRequest {
                reserve: Some(7),
                lease: Some("é-lease"),
                ..plain()
            },
            T0,
        );
        admit(&mut acc, &p, &plain(), T0);
        acc.commit(3, Some("other"), T0);
        let bytes = acc.encode();
        assert_eq!(Account::decode(&bytes), Some(acc.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(Account::decode(&bytes[..cut]), None);
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Account::decode(&extra), None);
        assert_eq!(Account::decode(&[9, 9, 9]), None);
    }
}
