//! One account's usage (a user in one bundle) and the admission decision over it.
//!
//! `Account` holds the request and token counters of the current UTC windows, the live leases
//! (concurrency slots with their token reservations) and recently settled lease ids (so a
//! repeated commit counts once). `decode` accepts only states that satisfy every invariant the
//! rest relies on (`check`): stored bytes come from RDB files, `RESTORE` payloads and the AOF.
//! `admit`, `commit` and `release` are the only ways it changes; each takes `now`, so the same
//! inputs always give the same result. It knows nothing of Redis: the shell stores it in a key
//! and replicates its encoded state.
//!
//! This file holds the types, the usage snapshot and retention; `admit` the decision, `lease`
//! adding, pruning and settling leases, `lease_id` the ids, `check` the invariants, `codec` the
//! bytes and `tests` (`cost_tests` for `COST`) the unit tests.

mod admit;
mod check;
mod codec;
mod lease;
mod lease_id;
pub(crate) mod pending;
mod rates;

use std::collections::VecDeque;

use super::credit::PerKind;
use super::ledger::{BalanceChange, BalanceTerms, Ledger};
use super::policy::{LimitField, RATES};
use super::rate::Rates;
use super::window::Window;
use super::Millis;
pub(crate) use lease_id::LeaseId;

/// Most live leases one account may hold; more is refused (bounds memory per account).
pub(crate) const MAX_LEASES: usize = 4096;
/// Most settled lease ids remembered per account for commit idempotency. An id is never
/// forgotten before its time (`SETTLED_MIN_MS`, or the lease's own expiry if later): a commit
/// that would need a 4097th id is refused instead (`AccountError::TooManySettled`). At most
/// 24 bytes an id, plus its text when it is not a generated one (up to `MAX_LEASE_ID_LEN`).
pub(crate) const MAX_SETTLED: usize = 4096;
/// How long a settled lease id is remembered at least.
pub(crate) const SETTLED_MIN_MS: Millis = 60_000;
/// Longest lease id, in bytes.
pub(crate) const MAX_LEASE_ID_LEN: usize = 128;
/// Most requests one admission may count (`COST`): far below what a window's counter or the
/// ledger's sums can hold, so no sum of costs comes near their limits, and a lease keeps its
/// cost in 32 bits.
pub(crate) const MAX_COST: u32 = 1_000_000_000;

/// The window counters an account keeps; each counts in the window its name says and reads
/// as zero once that window is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    ReqDay,
    ReqMonth,
    TokHour,
    TokDay,
    TokMonth,
}

impl Counter {
    /// Every counter, in the order of `Account::windows` and `Account::counts` (and of the
    /// encoding).
    pub(crate) const ALL: [Counter; COUNTERS] = [
        Counter::ReqDay,
        Counter::ReqMonth,
        Counter::TokHour,
        Counter::TokDay,
        Counter::TokMonth,
    ];

    /// The window the counter counts in.
    pub(crate) fn window(self) -> Window {
        match self {
            Counter::ReqDay | Counter::TokDay => Window::Day,
            Counter::ReqMonth | Counter::TokMonth => Window::Month,
            Counter::TokHour => Window::Hour,
        }
    }
}

const COUNTERS: usize = 5;

/// A concurrency slot held by one in-flight request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub id: LeaseId,
    pub expires_at: Millis,
    /// Tokens reserved until commit, release or expiry.
    pub reserved: u64,
    /// The day the request was counted in (a release refunds only that day and its month,
    /// which follows from it); day indexes since 1970 fit 32 bits for millions of years.
    pub day: i32,
    /// The requests the admission counted (`COST`, at most `MAX_COST`): what a release gives
    /// back. In the place the month had (it follows from the day): a lease is 40 bytes, not 48.
    pub cost: u32,
}

impl Lease {
    /// The month the request was counted in: the month of its day.
    pub(crate) fn month(&self) -> i64 {
        Window::Month.index(Window::Day.start_of(i64::from(self.day)))
    }
}

/// The usage state of one account.
///
/// Laid out for the common account (counters only), 88 bytes: the window each kind of counter
/// counts in (hour, day, month since 1970 as `u32`: far below 2^32 up to `LAST_MS`; the two day
/// counters move to a new day together, and so do the two month counters), a `u64` count per
/// counter, the lifetime total, the usage of the current hour not flushed to the ledger yet
/// (`pending`), the next ledger batch's sequence, and one pointer to the optional part
/// (`Extra`) that only accounts holding leases, settled ids or older unflushed hours have. An
/// admission therefore counts its request for the ledger without leaving the account's own
/// cache lines.
#[derive(Debug, Clone, Default)]
pub(crate) struct Account {
    /// The window each kind of counter counts in, by `Counter::window` (`window_slot`). The
    /// hour is also the hour of `pending_requests` and `pending_tokens`.
    windows: [u32; 3],
    /// Requests admitted minus requests released in the hour `windows[HOUR]` and not flushed
    /// yet (what does not fit is in the ledger part, whose entry for the hour adds to it).
    pending_requests: i32,
    /// Each counter's count in its window, by `Counter`.
    counts: [u64; COUNTERS],
    pub req_total: u64,
    /// Leases, settled ids and the ledger part; `None` when the account holds none of them.
    extra: Option<Box<Extra>>,
    /// The sequence of the account's next ledger batch: set from the clock at the account's
    /// first change for the ledger (shifted left by `SEQ_SHIFT` bits), then only grows.
    next_seq: u64,
    /// Tokens committed in the hour `windows[HOUR]` and not flushed yet.
    pending_tokens: u32,
    /// A lifetime limit (`TOTAL_REQUESTS`) has applied: the state must never expire.
    pub lifetime: bool,
    /// The key was renamed after `next_seq` was given: the sequence belongs to the old name's
    /// batches, and the account's next batch under its new name needs one of that name's
    /// (`rebase`). Part of the state: set on every node by the rename itself.
    renamed: bool,
    /// In memory only (never encoded, not part of the state's value): the key is on the
    /// node's list of accounts to flush (`runtime::ledger`).
    tracked: bool,
}

impl PartialEq for Account {
    fn eq(&self, other: &Self) -> bool {
        self.windows == other.windows
            && self.pending_requests == other.pending_requests
            && self.counts == other.counts
            && self.req_total == other.req_total
            && self.extra == other.extra
            && self.next_seq == other.next_seq
            && self.pending_tokens == other.pending_tokens
            && self.lifetime == other.lifetime
            && self.renamed == other.renamed
    }
}

impl Eq for Account {}

/// `Account::windows`' slot of a window.
const fn window_slot(window: Window) -> usize {
    match window {
        Window::Hour => 0,
        Window::Day => 1,
        Window::Month => 2,
    }
}

/// The slot of the hour (the hour of the pending usage).
const HOUR: usize = window_slot(Window::Hour);

/// The part of an account most accounts do not have: live leases, settled lease ids, the
/// sums kept over them, the ledger part and the smooth rates' state. It exists only while it holds something (`Account::tidy` drops it when
/// it is empty), so two equal states are equal values and a plain account pays one pointer.
/// Further state that only some accounts carry belongs here too (add it to `is_empty`).
///
/// 80 bytes: an admission reads and updates the kept sums and expiries here and only appends
/// to the leases' buffer, without reading it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extra {
    /// Live leases, ordered by expiry (earliest first), so expired ones come off the front.
    leases: VecDeque<Lease>,
    /// Tokens reserved by the leases held, expired ones included until they are pruned (kept
    /// up to date with `leases`, so deciding never walks the leases).
    reserved_sum: u64,
    /// When the first lease expires (the front of `leases`), kept so that deciding whether to
    /// prune does not touch the leases; 0 when there is none.
    first_expiry: Millis,
    /// When the last lease expires (the back of `leases`), so that a new lease that expires
    /// last is appended without reading the leases; 0 when there is none.
    last_expiry: Millis,
    /// Lease ids already committed, with when they may be forgotten; `None` when there are
    /// none (only accounts committing by lease id have them).
    // Boxed: 8 bytes instead of a Vec's 24 keep this part within one cache line.
    #[allow(clippy::box_collection)]
    settled: Option<Box<Vec<(LeaseId, Millis)>>>,
    /// Unflushed usage, balance holds and terms (see `core::ledger`); `None` while there is
    /// nothing to keep, so an account without unflushed usage or a balance pays nothing more.
    ledger: Option<Box<Ledger>>,
    /// The smooth rates' state (`core::rate`); `None` while no rate has any, so an account
    /// whose policy has no rate pays nothing for them.
    rates: Option<Box<Rates>>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.leases.is_empty()
            && self.settled.is_none()
            && self.ledger.is_none()
            && self.rates.is_none()
    }

    /// The settled ids.
    fn settled(&self) -> &[(LeaseId, Millis)] {
        self.settled.as_deref().map_or(&[], |s| s.as_slice())
    }
}

/// What `Account::leases` lends when the account holds none.
static NO_LEASES: VecDeque<Lease> = VecDeque::new();

/// How long expired leases may stay before an admission prunes them when they cannot change
/// its decision (see `prune_due`).
const PRUNE_DELAY_MS: Millis = 250;

/// What `QUOTA.ADMIT` asks, besides the account and its effective policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdmitRequest<'a> {
    pub lease: Option<&'a str>,
    pub lease_ttl_ms: Millis,
    pub reserve: Option<u64>,
    pub peek: bool,
    /// The requests it counts (`COST`, default 1, at most `MAX_COST`): n in every request
    /// window and request rate, n debited when a requests balance pays. 0 counts nothing
    /// there (a free probe).
    pub cost: u32,
    /// What the balance of the applicable credit row has left, when it has one.
    pub balance: Option<BalanceOffer>,
}

/// What a credit row's balance has left for an admission, per kind (requests, tokens): the
/// granted amount minus every debit, flushed or not, and minus the tokens held for other
/// leases. `None` for a kind the row has no balance of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BalanceOffer {
    pub left: PerKind<Option<i64>>,
}

/// The violation bit of a spent balance (above the `LimitField` bits).
pub(crate) const BALANCE_SPENT: u16 = 1 << 15;

/// Whether an admission is allowed, and what lets it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Allowed by the policy and its credits (windows, rates, concurrency).
    Windows,
    /// Allowed because the balance pays: a window would have denied.
    Balance,
    /// Denied (`AdmitDecision::violations` says by what).
    Denied,
}

/// What an admission did, as a small set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Did(u8);

impl Did {
    /// The account state changed (it must be stored and replicated).
    pub(crate) const CHANGE: Did = Did(1);
    /// Expired leases or settled ids were dropped before deciding.
    pub(crate) const PRUNE: Did = Did(1 << 1);
    /// The request was counted (and its lease, if any, taken).
    pub(crate) const COUNT: Did = Did(1 << 2);
    /// The balance pays the request's cost (debited once it is counted).
    pub(crate) const DEBIT: Did = Did(1 << 3);
    /// The smooth rates' state changed (the effect carries it).
    pub(crate) const RATES: Did = Did(1 << 4);

    /// Whether `what` was done.
    pub(crate) fn has(self, what: Did) -> bool {
        self.0 & what.0 == what.0
    }

    /// Adds `what`, or takes it off.
    pub(crate) fn set(&mut self, what: Did, done: bool) {
        if done {
            self.0 |= what.0;
        } else {
            self.0 &= !what.0;
        }
    }
}

/// The outcome of an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdmitDecision {
    pub verdict: Verdict,
    /// Violated limits, as a bit set over `LimitField` (`MaxConcurrent` = concurrency).
    pub violations: u16,
    /// Whole seconds until the violated limits could allow again, rounded up; -1 never.
    pub retry_after: i64,
    /// The same wait in ms (-1 never).
    pub retry_after_ms: i64,
    pub lease: Option<LeaseId>,
    /// When the lease expires (0 without a lease).
    pub lease_expires_at: Millis,
    pub reserved: u64,
    /// A credit was needed: the base policy alone would have denied (or the balance paid).
    pub used_replenishment: bool,
    pub remaining_requests: i64,
    pub remaining_tokens: i64,
    pub did: Did,
    /// The requests the admission counts (its `COST`).
    pub cost: u32,
    /// Tokens held on the token balance for the lease (part of `reserved`).
    pub held_tokens: u64,
}

impl AdmitDecision {
    /// Whether the request is allowed.
    pub(crate) fn allowed(&self) -> bool {
        self.verdict != Verdict::Denied
    }

    /// Whether the balance lets it through (a window would have denied).
    pub(crate) fn paid_by_balance(&self) -> bool {
        self.verdict == Verdict::Balance
    }

    /// Whether the account state changed (store it, replicate it).
    pub(crate) fn changed(&self) -> bool {
        self.did.has(Did::CHANGE)
    }

    /// Whether expired leases or settled ids were dropped before deciding.
    pub(crate) fn pruned(&self) -> bool {
        self.did.has(Did::PRUNE)
    }

    /// Whether the request was counted (and its lease, if any, taken).
    pub(crate) fn counted(&self) -> bool {
        self.did.has(Did::COUNT)
    }

    /// Whether the balance pays the request's cost.
    pub(crate) fn debits_request(&self) -> bool {
        self.did.has(Did::DEBIT)
    }

    /// Whether the smooth rates' state changed.
    pub(crate) fn rates_changed(&self) -> bool {
        self.did.has(Did::RATES)
    }

    /// The denial reason: violated limits joined with `|`, `""` when allowed.
    pub(crate) fn reason(&self) -> std::borrow::Cow<'static, str> {
        let name = |field: LimitField| match field {
            LimitField::MaxConcurrent => "concurrency",
            other => other.name(),
        };
        let mut violated = LimitField::ALL
            .into_iter()
            .filter(|f| self.violations & (1 << *f as u16) != 0);
        let spent = self.violations & BALANCE_SPENT != 0;
        match (violated.next(), violated.next()) {
            (None, _) if spent => "balance".into(),
            (None, _) => "".into(),
            (Some(only), None) if !spent => name(only).into(),
            (Some(first), second) => {
                let mut out = name(first).to_owned();
                for field in second.into_iter().chain(violated) {
                    out.push('|');
                    out.push_str(name(field));
                }
                if spent {
                    out.push_str("|balance");
                }
                out.into()
            }
        }
    }
}

/// A snapshot of an account's usage for `QUOTA.USAGE` and `VERBOSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub requests_per_day: u64,
    pub requests_per_month: u64,
    pub total_requests: u64,
    pub tokens_per_hour: u64,
    pub tokens_per_day: u64,
    pub tokens_per_month: u64,
    pub in_flight: u64,
    pub reserved: u64,
    /// What each smooth rate counts now, in `LimitField::RATES` order: requests (or tokens)
    /// not drained yet, rounded up (0 without state).
    pub rates: [u64; RATES],
    /// Unix seconds at which the hour, day and month windows end.
    pub hour_reset: i64,
    pub day_reset: i64,
    pub month_reset: i64,
}

/// How long an account's state must be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retention {
    /// A lifetime limit applied: never expire.
    Forever,
    /// Until this instant (ms since the epoch).
    Until(Millis),
    /// Nothing is left to keep.
    Nothing,
}

/// What `QUOTA.COMMIT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitOutcome {
    pub duplicate: bool,
    pub lease_held: bool,
    /// Until when the committed lease id is remembered (none without a lease or when duplicate).
    pub settled_until: Option<Millis>,
    /// Tokens beyond the token windows, owed to the balance of the account's terms.
    pub balance_debit: u64,
}

/// Why an admission could not even be decided; `Display` is the wire error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccountError {
    TooManyLeases,
    /// A commit would need more than `MAX_SETTLED` remembered lease ids; one is forgotten in
    /// `retry_after` seconds.
    TooManySettled {
        retry_after: i64,
    },
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::TooManyLeases => write!(
                f,
                "ERR this account already holds {MAX_LEASES} live leases: commit or release some"
            ),
            AccountError::TooManySettled { retry_after } => write!(
                f,
                "ERR this account remembers {MAX_SETTLED} recently committed leases (so that a \
                 repeated COMMIT counts once): nothing recorded, retry in {retry_after} s"
            ),
        }
    }
}

/// Why bytes are not a valid account state; `Display` names the first problem found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadState(pub &'static str);

impl std::fmt::Display for BadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
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
    /// The live leases (expired ones too until pruned), earliest expiry first.
    pub(crate) fn leases(&self) -> &VecDeque<Lease> {
        self.extra.as_ref().map_or(&NO_LEASES, |e| &e.leases)
    }

    /// The settled lease ids, with when each may be forgotten.
    pub(crate) fn settled(&self) -> &[(LeaseId, Millis)] {
        self.extra.as_ref().map_or(&[], |e| e.settled())
    }

    /// When the first lease expires; 0 when none is held.
    fn first_expiry(&self) -> Millis {
        self.extra.as_ref().map_or(0, |e| e.first_expiry)
    }

    /// Where the optional part lives (none for a plain account), so that a caller can ask for
    /// it to be brought into the cache while it does other work before deciding.
    pub(crate) fn extra_address(&self) -> Option<*const u8> {
        self.extra.as_deref().map(|e| std::ptr::from_ref(e).cast())
    }

    /// Where the next lease would be stored when it goes last (the usual case), for a
    /// prefetch hint kept next to the account: an admission writes there, and a store that
    /// misses the cache would hold up the rest of the decision. Only an address, never read
    /// (it may lie past the buffer).
    pub(crate) fn lease_tail_address(&self) -> Option<*const u8> {
        let extra = self.extra.as_deref()?;
        if extra.leases.capacity() == 0 {
            return None;
        }
        let (front, back) = extra.leases.as_slices();
        let end = match back.is_empty() {
            true => front.as_ptr_range().end,
            false => back.as_ptr_range().end,
        };
        Some(end.cast())
    }

    /// Where the ledger part is, for a prefetch: a balance holder's admission reads it.
    pub(crate) fn ledger_address(&self) -> Option<*const u8> {
        self.ledger().map(|l| std::ptr::from_ref(l).cast())
    }

    /// The optional part, created when missing (call `tidy` after removing from it).
    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Drops the optional part once it holds nothing.
    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    /// The window index `counter` counts in and its count there.
    pub(crate) fn counter(&self, counter: Counter) -> (i64, u64) {
        (
            i64::from(self.windows[window_slot(counter.window())]),
            self.counts[counter as usize],
        )
    }

    /// The count of `counter` in the window with this index (zero for any other window).
    fn count(&self, counter: Counter, index: i64) -> u64 {
        match self.counter(counter) {
            (window, count) if window == index => count,
            _ => 0,
        }
    }

    /// Adds `n` to `counter` in the window with this index (see `enter`). An index that is no
    /// window since 1970 (a clock before 1970) counts nothing.
    fn add(&mut self, counter: Counter, index: i64, n: u64) {
        let Ok(window) = u32::try_from(index) else {
            return;
        };
        self.enter(counter.window(), window);
        let i = counter as usize;
        self.counts[i] = self.counts[i].saturating_add(n);
    }

    /// Moves the counters of `window` to the window with this index, starting them at zero,
    /// when they count in another one. Moving the hour first puts the pending usage of the
    /// hour left into the ledger part.
    fn enter(&mut self, window: Window, index: u32) {
        let slot = window_slot(window);
        if self.windows[slot] == index {
            return;
        }
        if slot == HOUR {
            self.spill_pending();
        }
        for c in Counter::ALL.into_iter().filter(|c| c.window() == window) {
            self.counts[c as usize] = 0;
        }
        self.windows[slot] = index;
    }

    /// Takes `n` back from `counter` if it still counts in the window with this index.
    fn refund(&mut self, counter: Counter, index: i64, n: u64) {
        if self.counter(counter).0 == index {
            let i = counter as usize;
            self.counts[i] = self.counts[i].saturating_sub(n);
        }
    }

    /// The usage snapshot at `now`.
    pub(crate) fn usage(&self, now_ms: Millis) -> Usage {
        let now = Now::at(now_ms);
        let live = self.leases().iter().filter(|l| l.expires_at > now_ms);
        let (in_flight, reserved) = live.fold((0u64, 0u64), |(n, r), l| {
            (n + 1, r.saturating_add(l.reserved))
        });
        Usage {
            requests_per_day: self.count(Counter::ReqDay, now.day),
            requests_per_month: self.count(Counter::ReqMonth, now.month),
            total_requests: self.req_total,
            tokens_per_hour: self.count(Counter::TokHour, now.hour),
            tokens_per_day: self.count(Counter::TokDay, now.day),
            tokens_per_month: self.count(Counter::TokMonth, now.month),
            in_flight,
            reserved,
            rates: self.rates_used(now_ms),
            hour_reset: Window::Hour.end(now_ms) / 1000,
            day_reset: Window::Day.end(now_ms) / 1000,
            month_reset: Window::Month.end(now_ms) / 1000,
        }
    }

    /// How long the state must be kept: until the end of the last window holding a count, or
    /// the last lease or settled id; for good once a lifetime limit applied; not at all when
    /// nothing is left (the caller deletes the key).
    pub(crate) fn retention(&self) -> Retention {
        // Unflushed usage must reach PostgreSQL before the key may go, and a balance holder
        // keeps what PostgreSQL said it has used (its floor: a cached row may be older).
        let floor = self.ledger().is_some_and(|l| l.floor != PerKind::default());
        if self.lifetime || floor || self.has_unflushed() {
            return Retention::Forever;
        }
        let holds = self
            .ledger()
            .and_then(|l| l.holds.iter().map(|h| h.expires_at).max());
        let counted = Counter::ALL
            .into_iter()
            .map(|c| (c.window(), self.counter(c)))
            .filter(|(_, (_, count))| *count > 0)
            .map(|(w, (index, _))| w.start_of(index + 1));
        // Leases are kept in expiry order: the last one expires last.
        let leases = self
            .extra
            .as_ref()
            .map(|e| e.last_expiry)
            .filter(|at| *at != 0);
        let settled = self.settled().iter().map(|(_, t)| *t);
        // A rate's level matters until it has drained (at the rate it last drained at).
        let rates = self.rates().map(Rates::drained_by).filter(|at| *at != 0);
        // A key whose batch is being flushed stays at least to the end of its hour, so that
        // a release counted since (which may bring its unflushed usage back to zero) is still
        // there to be taken off when PostgreSQL acknowledges the batch.
        let flushing = self
            .tracked
            .then(|| Window::Hour.start_of(i64::from(self.windows[HOUR]) + 1));
        match counted
            .chain(leases)
            .chain(settled)
            .chain(holds)
            .chain(rates)
            .chain(flushing)
            .max()
        {
            Some(at) => Retention::Until(at),
            // Only a lifetime count is left and no lifetime limit uses it: keep it for the
            // month it was last counted in.
            None if self.req_total > 0 => {
                Retention::Until(Window::Month.start_of(self.counter(Counter::ReqMonth).0 + 1))
            }
            None => Retention::Nothing,
        }
    }

    /// Marks whether the key is on the node's list of accounts to flush (memory only).
    pub(crate) fn set_tracked(&mut self, tracked: bool) {
        self.tracked = tracked;
    }

    /// Whether the key is on the node's list of accounts to flush.
    pub(crate) fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// The ledger part, if the account has one.
    pub(crate) fn ledger(&self) -> Option<&Ledger> {
        self.extra.as_ref().and_then(|e| e.ledger.as_deref())
    }

    /// The ledger part, created when missing.
    fn ledger_part(&mut self) -> &mut Ledger {
        self.extra
            .get_or_insert_with(Box::default)
            .ledger
            .get_or_insert_with(Box::default)
    }

    /// Drops the ledger part when it holds nothing worth keeping.
    fn drop_idle_ledger(&mut self) {
        if let Some(extra) = self.extra.as_mut() {
            if extra.ledger.as_ref().is_some_and(|l| l.is_idle()) {
                extra.ledger = None;
            }
        }
        self.tidy();
    }

    /// Applies a change to this account as a balance holder, made at `at`.
    pub(crate) fn apply_balance(&mut self, at: Millis, change: &BalanceChange) {
        if change.is_empty() && self.ledger().is_none() {
            return;
        }
        if change.debits != PerKind::default() {
            self.mark_unflushed(at);
        }
        self.ledger_part().apply(at, change);
        self.drop_idle_ledger();
    }

    /// Sets how this account's commits debit a balance; true if that changed.
    pub(crate) fn set_terms(&mut self, terms: Option<BalanceTerms>) -> bool {
        if self.terms() == terms {
            return false;
        }
        self.ledger_part().terms = terms;
        self.drop_idle_ledger();
        true
    }

    /// The balance terms of this account's commits, if any.
    pub(crate) fn terms(&self) -> Option<BalanceTerms> {
        self.ledger().and_then(|l| l.terms)
    }

    /// Bytes of heap this state owns beyond the struct itself (for `MEMORY USAGE`).
    pub(crate) fn heap_size(&self) -> usize {
        let Some(extra) = &self.extra else {
            return 0;
        };
        std::mem::size_of::<Extra>()
            + extra.leases.capacity() * std::mem::size_of::<Lease>()
            + extra.leases.iter().map(|l| l.id.heap_size()).sum::<usize>()
            + extra.settled.as_ref().map_or(0, |s| {
                std::mem::size_of::<Vec<(LeaseId, Millis)>>()
                    + s.capacity() * std::mem::size_of::<(LeaseId, Millis)>()
                    + s.iter().map(|(id, _)| id.heap_size()).sum::<usize>()
            })
            + extra
                .ledger
                .as_ref()
                .map_or(0, |l| std::mem::size_of::<Ledger>() + l.heap_size())
            + extra
                .rates
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<Rates>())
    }
}

#[cfg(test)]
mod cost_tests;
#[cfg(test)]
mod tests;
