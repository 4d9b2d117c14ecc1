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
//! This file holds the types, the invariants (`check`), the usage snapshot and retention;
//! `admit` the decision, `lease` adding, pruning and settling leases, `codec` the bytes.

mod admit;
mod codec;
mod lease;
pub(crate) mod pending;

use std::collections::{HashSet, VecDeque};

use super::ledger::{BalanceChange, BalanceTerms, Ledger, MAX_DECODED_HOURS, MAX_HOLDS};
use super::policy::LimitField;
use super::window::{Window, LAST_MS};
use super::Millis;

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

/// A lease id: the 16-hex-digit ids the module generates are kept inline as a number, any
/// other id a caller chose is kept as text. Both compare and print as the text the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LeaseId {
    Short(u64),
    Named(Box<str>),
}

impl LeaseId {
    /// The id for `text` (exactly 16 lower-case hex digits become `Short`).
    pub(crate) fn parse(text: &str) -> LeaseId {
        match LeaseId::short_form(text) {
            Some(n) => LeaseId::Short(n),
            None => LeaseId::Named(text.into()),
        }
    }

    /// The number a 16-lower-case-hex-digit id stands for; none for any other text.
    pub(crate) fn short_form(text: &str) -> Option<u64> {
        let is_short =
            text.len() == 16 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        is_short
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten()
    }

    /// Writes the text form into `buf` and returns it (no allocation for generated ids).
    pub(crate) fn as_text<'b>(&'b self, buf: &'b mut [u8; 16]) -> &'b str {
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
pub(crate) struct Lease {
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

/// The part of an account most accounts do not have: live leases, settled lease ids and the
/// sums kept over them. It exists only while it holds something (`Account::tidy` drops it when
/// it is empty), so two equal states are equal values and a plain account pays one pointer.
/// Further state that only some accounts carry belongs here too (add it to `is_empty`).
///
/// 64 bytes, one cache line: an admission reads and updates the kept sums and expiries here
/// and only appends to the leases' buffer, without reading it.
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
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.settled.is_none() && self.ledger.is_none()
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
    /// What the balance of the applicable credit row has left, when it has one.
    pub balance: Option<BalanceOffer>,
}

/// What a credit row's balance has left for an admission, per kind (requests, tokens): the
/// granted amount minus every debit, flushed or not, and minus the tokens held for other
/// leases. `None` for a kind the row has no balance of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BalanceOffer {
    pub left: [Option<i64>; 2],
}

/// The violation bit of a spent balance (above the `LimitField` bits).
pub(crate) const BALANCE_SPENT: u8 = 1 << 7;

/// The outcome of an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdmitDecision {
    pub allowed: bool,
    /// Violated limits, as a bit set over `LimitField` (`MaxConcurrent` = concurrency).
    pub violations: u8,
    pub retry_after: i64,
    pub lease: Option<LeaseId>,
    /// When the lease expires (0 without a lease).
    pub lease_expires_at: Millis,
    pub reserved: u64,
    pub used_replenishment: bool,
    pub remaining_requests: i64,
    pub remaining_tokens: i64,
    /// Whether the account state changed (and must be stored and replicated).
    pub changed: bool,
    /// Whether expired leases or settled ids were dropped before deciding.
    pub pruned: bool,
    /// Whether the request was counted (and its lease, if any, taken).
    pub counted: bool,
    /// The balance paid: a window would have denied.
    pub paid_by_balance: bool,
    /// The balance pays this request (one request debited).
    pub debit_request: bool,
    /// Tokens held on the token balance for the lease (part of `reserved`).
    pub held_tokens: u64,
}

impl AdmitDecision {
    /// The denial reason: violated limits joined with `|`, `""` when allowed.
    pub(crate) fn reason(&self) -> std::borrow::Cow<'static, str> {
        let name = |field: LimitField| match field {
            LimitField::MaxConcurrent => "concurrency",
            other => other.name(),
        };
        let mut violated = LimitField::ALL
            .into_iter()
            .filter(|f| self.violations & (1 << *f as u8) != 0);
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

    /// Takes one back from `counter` if it still counts in the window with this index.
    fn refund(&mut self, counter: Counter, index: i64) {
        if self.counter(counter).0 == index {
            let i = counter as usize;
            self.counts[i] = self.counts[i].saturating_sub(1);
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
        let floor = self.ledger().is_some_and(|l| l.floor != [0, 0]);
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

    /// Checks every invariant the account's code relies on: counter windows and lease times
    /// within the range windows are kept for (so no window or date computation can overflow),
    /// each lease's month the month of its day and its day before its expiry, leases in expiry
    /// order, no lease id held or settled twice, ids of a valid length, at most `MAX_LEASES`
    /// leases and `MAX_SETTLED` settled ids, and the kept sums (reservations, first expiry)
    /// equal to what the leases say.
    pub(crate) fn check(&self) -> Result<(), BadState> {
        if Counter::ALL
            .iter()
            .any(|c| self.counter(*c).0 > c.window().last_index())
        {
            return Err(BadState("counter window out of range"));
        }
        if let Some(extra) = &self.extra {
            if extra.is_empty() {
                return Err(BadState("an empty lease part is kept"));
            }
            if extra.settled.as_ref().is_some_and(|s| s.is_empty()) {
                return Err(BadState("an empty settled list is kept"));
            }
            if extra.last_expiry != extra.leases.back().map_or(0, |l| l.expires_at) {
                return Err(BadState("last expiry differs from the last lease's"));
            }
        }
        if self.leases().len() > MAX_LEASES {
            return Err(BadState("more leases than an account may hold"));
        }
        if self.settled().len() > MAX_SETTLED {
            return Err(BadState("more settled lease ids than an account keeps"));
        }
        let mut previous = 0;
        let mut held = HashSet::with_capacity(self.leases().len());
        for lease in self.leases() {
            if !(1..=LAST_MS).contains(&lease.expires_at) {
                return Err(BadState("lease expiry out of range"));
            }
            if lease.expires_at < previous {
                return Err(BadState("leases out of expiry order"));
            }
            previous = lease.expires_at;
            let day = i64::from(lease.day);
            if !(0..=Window::Day.last_index()).contains(&day) {
                return Err(BadState("lease day out of range"));
            }
            let day_start = Window::Day.start_of(day);
            if Window::Month.index(day_start) != i64::from(lease.month) {
                return Err(BadState("lease month is not the month of its day"));
            }
            if day_start >= lease.expires_at {
                return Err(BadState("lease expires before the day it was counted in"));
            }
            valid_id(&lease.id)?;
            if !held.insert(&lease.id) {
                return Err(BadState("lease id held twice"));
            }
        }
        let mut settled = HashSet::with_capacity(self.settled().len());
        for (id, until) in self.settled() {
            if !(1..=LAST_MS).contains(until) {
                return Err(BadState("settled lease time out of range"));
            }
            valid_id(id)?;
            if !settled.insert(id) {
                return Err(BadState("lease id settled twice"));
            }
        }
        let sum = self
            .leases()
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.reserved));
        if self.reserved() != sum {
            return Err(BadState(
                "reserved tokens differ from the leases' reservations",
            ));
        }
        if self.first_expiry() != self.leases().front().map_or(0, |l| l.expires_at) {
            return Err(BadState("first expiry differs from the first lease's"));
        }
        if let Some(ledger) = self.ledger() {
            check_ledger(ledger)?;
        }
        Ok(())
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
        if change.debits != [0, 0] {
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
    }
}

/// The ledger part's invariants: hours in range, strictly ascending and within the bound;
/// holds within the bound, in range and with distinct tags.
fn check_ledger(ledger: &Ledger) -> Result<(), BadState> {
    if ledger.hours.len() > MAX_DECODED_HOURS {
        return Err(BadState("more unflushed hours than an account keeps"));
    }
    let mut previous = -1;
    for h in &ledger.hours {
        if !(0..=Window::Hour.last_index()).contains(&h.hour) {
            return Err(BadState("ledger hour out of range"));
        }
        if h.hour <= previous {
            return Err(BadState("ledger hours out of order"));
        }
        previous = h.hour;
    }
    if ledger.holds.len() > MAX_HOLDS {
        return Err(BadState("more balance holds than an account keeps"));
    }
    let mut tags = HashSet::with_capacity(ledger.holds.len());
    for hold in &ledger.holds {
        if !(1..=LAST_MS).contains(&hold.expires_at) {
            return Err(BadState("balance hold expiry out of range"));
        }
        if !tags.insert(hold.tag) {
            return Err(BadState("balance hold held twice"));
        }
    }
    Ok(())
}

/// A lease id as a caller may give it: 1..=`MAX_LEASE_ID_LEN` bytes.
fn valid_id(id: &LeaseId) -> Result<(), BadState> {
    match id {
        LeaseId::Short(_) => Ok(()),
        LeaseId::Named(s) if (1..=MAX_LEASE_ID_LEN).contains(&s.len()) => Ok(()),
        LeaseId::Named(_) => Err(BadState("lease id length out of range")),
    }
}

#[cfg(test)]
mod tests {
    use super::codec::ENCODING_VERSION;
    use super::*;
    use crate::core::policy::{Additional, EffectivePolicy, Limits};
    use crate::core::window::{days_from_civil, seconds_until};
    use proptest::prelude::*;

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
            balance: None,
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
        // No slot at all: waiting never helps.
        let none = admit(
            &mut Account::default(),
            &policy(&[(LimitField::MaxConcurrent, 0)]),
            &plain(),
            T0,
        );
        assert_eq!(
            (none.reason().as_ref(), none.retry_after),
            ("concurrency", -1)
        );
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
        assert_eq!(acc.usage(T0).requests_per_day, 1);
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
        let out = acc.commit(200, Some(&lease), T0).unwrap();
        assert!(out.lease_held && !out.duplicate);
        assert_eq!(acc.usage(T0).tokens_per_day, 200);
        assert_eq!(acc.usage(T0).reserved, 100);
        assert!(acc.commit(200, Some(&lease), T0).unwrap().duplicate);
        assert_eq!(acc.usage(T0).tokens_per_day, 200);
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
        assert_eq!(acc.usage(T0).requests_per_day, 1);
        assert!(acc.release("x", T0));
        assert!(!acc.release("x", T0));
        assert_eq!(acc.usage(T0).requests_per_day, 0);
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
        assert_eq!(acc.usage(next_day).requests_per_day, 1);
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
        assert_eq!(acc.leases().len(), 2, "the 10 expired leases are pruned");
    }

    /// Deciding with expired leases pruned late gives exactly the decisions that pruning them
    /// at once gives, whatever the sequence of admissions, commits and releases.
    #[test]
    fn late_pruning_decides_exactly_as_eager_pruning() {
        let mut next = crate::core::test_rng(0x2545_F491_4F6C_DD1Du64);
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
                            balance: None,
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
                        (a.pruned, b.pruned) = (false, false);
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
                            let sum = acc.leases().iter().map(|l| l.reserved).sum::<u64>();
                            assert_eq!(acc.reserved(), sum);
                            let front = acc.leases().front().map_or(0, |l| l.expires_at);
                            assert_eq!(acc.first_expiry(), front);
                            assert_eq!(acc.check(), Ok(()));
                        }
                    }
                }
            }
        }
    }

    /// The optional part is one cache line plus the ledger pointer (which an admission does
    /// not touch: its hour's usage is inline): an admission with a lease touches it and
    /// appends. The account with its memo and expiry stays within 128 bytes (`ffi::account_type`).
    #[test]
    fn the_lease_part_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Extra>(), 72);
        assert_eq!(std::mem::size_of::<Account>(), 88);
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
        assert!(acc.leases().capacity() >= 500);
        admit(&mut acc, &p, &short, T0 + 2000);
        assert_eq!(acc.leases().len(), 1);
        assert!(acc.leases().capacity() <= 16, "{}", acc.leases().capacity());
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

    /// Acknowledges everything unflushed, as a flush does.
    fn flushed(acc: &mut Account) {
        let ack = crate::core::ledger::Acknowledgement {
            hours: acc.unflushed_hours(),
            next_seq: acc.batch_seq() + 1,
            floor: None,
        };
        acc.acknowledge(&ack);
    }

    #[test]
    fn expiry_follows_the_longest_live_window() {
        let p = policy(&[(LimitField::RequestsPerDay, 5)]);
        let mut acc = Account::default();
        assert_eq!(acc.retention(), Retention::Nothing);
        admit(&mut acc, &p, &plain(), T0);
        // Unflushed usage keeps the key until the ledger has it.
        assert_eq!(acc.retention(), Retention::Forever);
        flushed(&mut acc);
        assert_eq!(acc.retention(), Retention::Until(Window::Month.end(T0)));
        assert!(acc.ledger().is_none(), "an idle ledger part is given back");
        let mut tokens = Account::default();
        tokens.commit(5, None, T0).unwrap();
        flushed(&mut tokens);
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
        acc.commit(3, Some("other"), T0).unwrap();
        let bytes = acc.encode();
        assert_eq!(Account::decode(&bytes), Ok(acc.clone()));
        for cut in 0..bytes.len() {
            assert!(Account::decode(&bytes[..cut]).is_err());
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Account::decode(&extra).is_err());
        assert!(Account::decode(&[9, 9, 9]).is_err());
    }

    fn leased(id: &str, ttl_ms: Millis) -> AdmitRequest<'_> {
        AdmitRequest {
            lease: Some(id),
            lease_ttl_ms: ttl_ms,
            ..plain()
        }
    }

    /// A repeated commit counts once for as long as its id is kept, however many other leases
    /// were committed since (not only the last 64).
    #[test]
    fn a_repeated_commit_counts_once_whatever_was_committed_since() {
        let p = policy(&[(LimitField::MaxConcurrent, 100)]);
        let mut acc = Account::default();
        let ids: Vec<String> = (0..66).map(|i| format!("lease-{i}")).collect();
        for id in &ids {
            admit(&mut acc, &p, &leased(id, 300_000), T0);
        }
        for id in &ids {
            let out = acc.commit(10, Some(id), T0 + 1).unwrap();
            assert!(out.lease_held && !out.duplicate);
        }
        assert_eq!(acc.usage(T0 + 1).tokens_per_day, 660);
        // The first lease again, within its time: nothing recorded.
        let again = acc.commit(10, Some(&ids[0]), T0 + 2).unwrap();
        assert!(again.duplicate);
        assert_eq!(acc.usage(T0 + 2).tokens_per_day, 660);
        // A settled id is kept until its lease would have expired (300 s here)...
        assert!(
            acc.commit(10, Some(&ids[0]), T0 + 299_999)
                .unwrap()
                .duplicate
        );
        // ...and then forgotten: the same id is a new commit.
        assert!(
            !acc.commit(10, Some(&ids[0]), T0 + 300_000)
                .unwrap()
                .duplicate
        );
        // An id that was never held is kept SETTLED_MIN_MS.
        assert!(!acc.commit(1, Some("loose"), T0).unwrap().duplicate);
        assert!(
            acc.commit(1, Some("loose"), T0 + SETTLED_MIN_MS - 1)
                .unwrap()
                .duplicate
        );
        acc.check().unwrap();
    }

    /// At `MAX_SETTLED` ids still in their time, a commit of another lease is refused and
    /// changes nothing; repeats of kept ids are still recognised; once ids expire, commits go
    /// through again.
    #[test]
    fn at_the_settled_bound_a_new_commit_is_refused_never_counted_twice() {
        let mut acc = Account::default();
        for i in 0..MAX_SETTLED {
            let at = T0 + (i as Millis) * 10;
            let out = acc.commit(1, Some(&format!("c{i}")), at).unwrap();
            assert!(!out.duplicate);
        }
        let now = T0 + 50_000;
        let before = acc.clone();
        let refused = acc.commit(1, Some("one-more"), now);
        // The first id is forgotten at T0 + 60 s: 10 s from now.
        assert_eq!(
            refused,
            Err(AccountError::TooManySettled { retry_after: 10 })
        );
        assert_eq!(acc, before, "a refused commit records nothing");
        assert!(refused.unwrap_err().to_string().starts_with("ERR "));
        for i in [0, MAX_SETTLED / 2, MAX_SETTLED - 1] {
            assert!(
                acc.commit(1, Some(&format!("c{i}")), now)
                    .unwrap()
                    .duplicate
            );
        }
        // Commits without a lease need no id and always record.
        assert!(!acc.commit(5, None, now).unwrap().duplicate);
        let later = T0 + SETTLED_MIN_MS;
        assert!(!acc.commit(1, Some("one-more"), later).unwrap().duplicate);
        assert!(acc.commit(1, Some("one-more"), later).unwrap().duplicate);
        acc.check().unwrap();
        // The memory bound the README gives: 24 bytes an id, plus the text of a named one.
        assert_eq!(std::mem::size_of::<(LeaseId, Millis)>(), 24);
    }

    /// A state that was written by an older build (64 settled ids at most) still decodes.
    #[test]
    fn a_state_with_64_settled_ids_still_decodes() {
        let mut acc = Account::default();
        for i in 0..64 {
            acc.commit(1, Some(&format!("{i:016x}")), T0).unwrap();
        }
        assert_eq!(Account::decode(&acc.encode()), Ok(acc));
    }

    fn sample() -> Account {
        let p = policy(&[
            (LimitField::MaxConcurrent, 5),
            (LimitField::TokensPerDay, 100),
        ]);
        let mut acc = Account::default();
        admit(&mut acc, &p, &leased("aa", 1000), T0);
        admit(&mut acc, &p, &leased("ab", 2000), T0);
        acc.commit(3, Some("done"), T0).unwrap();
        acc
    }

    /// Each broken invariant, encoded as `encode` would write it, is refused with its reason.
    #[test]
    fn decode_refuses_states_that_break_an_invariant() {
        let refused = |edit: &dyn Fn(&mut Extra)| {
            let mut acc = sample();
            edit(acc.extra.as_deref_mut().unwrap());
            Account::decode(&acc.encode()).map(|_| ()).unwrap_err().0
        };
        // Counter windows are kept as `u32`: an encoding can still name any `i64`.
        let window_refused = |counter: Counter, window: i64| {
            let mut counters = Counter::ALL.map(|c| sample().counter(c));
            counters[counter as usize].0 = window;
            Account::decode(&sample().encode_with(counters))
                .map(|_| ())
                .unwrap_err()
                .0
        };
        assert_eq!(Account::decode(&sample().encode()), Ok(sample()));
        assert_eq!(
            refused(&|a| a.leases[1].id = LeaseId::parse("aa")),
            "lease id held twice"
        );
        assert_eq!(
            refused(&|a| a.leases.swap(0, 1)),
            "leases out of expiry order"
        );
        assert_eq!(
            window_refused(Counter::TokDay, i64::MAX),
            "counter window out of range"
        );
        assert_eq!(
            window_refused(Counter::ReqMonth, -1),
            "counter window out of range"
        );
        assert_eq!(
            refused(&|a| a.leases[0].month += 1),
            "lease month is not the month of its day"
        );
        assert_eq!(
            refused(&|a| a.leases[0].day = i32::MAX),
            "lease day out of range"
        );
        assert_eq!(
            refused(&|a| a.leases[1].expires_at = LAST_MS + 1),
            "lease expiry out of range"
        );
        assert_eq!(
            refused(&|a| a.leases[0].day += 2),
            "lease expires before the day it was counted in"
        );
        assert_eq!(
            refused(&|a| a.leases[0].id = LeaseId::Named("x".repeat(129).into())),
            "lease id length out of range"
        );
        assert_eq!(
            refused(&|a| {
                let settled = a.settled.as_deref_mut().unwrap();
                settled.push(settled[0].clone());
            }),
            "lease id settled twice"
        );
        assert_eq!(
            refused(&|a| a.settled.as_deref_mut().unwrap()[0].1 = 0),
            "settled lease time out of range"
        );
        assert_eq!(
            window_refused(Counter::TokHour, Window::Hour.last_index() + 1),
            "counter window out of range"
        );
        // The last window of each length still fits.
        let mut counters = Counter::ALL.map(|c| sample().counter(c));
        counters[Counter::TokHour as usize] = (Window::Hour.last_index(), 3);
        let last = Account::decode(&sample().encode_with(counters)).unwrap();
        assert_eq!(
            last.counter(Counter::TokHour),
            (Window::Hour.last_index(), 3)
        );
        // The kept sums are checked too (they are derived on decode, so only `check` sees them).
        let mut acc = sample();
        acc.extra.as_deref_mut().unwrap().reserved_sum += 1;
        assert!(acc.check().is_err());
        let mut acc = sample();
        acc.extra.as_deref_mut().unwrap().first_expiry = 0;
        assert!(acc.check().is_err());
        let mut acc = sample();
        acc.extra.as_deref_mut().unwrap().last_expiry += 1;
        assert!(acc.check().is_err());
        let mut acc = sample();
        acc.extra.as_deref_mut().unwrap().settled = Some(Box::default());
        assert!(acc.check().is_err());
        // An empty optional part is never kept (equal states are equal values).
        let acc = Account {
            extra: Some(Box::default()),
            ..Account::default()
        };
        assert_eq!(acc.check(), Err(BadState("an empty lease part is kept")));
    }

    /// Runs every operation on a decoded state: none may panic, and the state stays valid.
    fn exercise(mut acc: Account, now: Millis) -> Result<(), TestCaseError> {
        let p = policy(&[
            (LimitField::MaxConcurrent, 10),
            (LimitField::TokensPerDay, 1000),
            (LimitField::RequestsPerMonth, 50),
        ]);
        let _ = acc.retention();
        let _ = acc.usage(now);
        // Generated ids are random 64-bit numbers: these two are not in the state yet.
        let fresh = |n: u64| {
            (0..)
                .map(|k| n + k)
                .find(|id| acc.leases().iter().all(|l| l.id != LeaseId::Short(*id)))
        };
        let (first, second) = (fresh(1 << 40), fresh(1 << 41));
        let _ = acc.admit(&p, &leased("x", 5000), now, || first.unwrap_or(0));
        let _ = acc.admit(&p, &plain(), now, || second.unwrap_or(0));
        let _ = acc.commit(3, Some("x"), now);
        let _ = acc.release("0000010000000000", now);
        let _ = acc.retention();
        prop_assert_eq!(acc.check(), Ok(()));
        Ok(())
    }

    /// A valid state built by a random sequence of admissions, commits and releases.
    fn built(ops: &[(u8, u16, u16)]) -> Account {
        let p = policy(&[(LimitField::MaxConcurrent, 1000)]);
        let mut acc = Account::default();
        let mut now = T0;
        for (i, &(kind, a, b)) in ops.iter().enumerate() {
            now += Millis::from(a) * 10;
            let id = format!("id{}", b % 8);
            match kind % 4 {
                0 => {
                    let req = AdmitRequest {
                        reserve: Some(u64::from(b)),
                        ..leased(&id, 1 + Millis::from(b) * 100)
                    };
                    let _ = acc.admit(&p, &req, now, || i as u64);
                }
                1 => {
                    let _ = acc.admit(&p, &plain(), now, || i as u64);
                }
                2 => {
                    let _ = acc.commit(u64::from(a), Some(&id), now);
                }
                _ => {
                    acc.release(&id, now);
                }
            }
        }
        acc
    }

    /// Cases per decoder property: 2000, or `PROPTEST_CASES` (`make fuzz` runs many more).
    fn decode_cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(decode_cases()))]

        /// Any bytes decode to a valid account or to an error, never a panic; what decodes
        /// encodes back to itself and survives every operation.
        #[test]
        fn any_bytes_decode_to_a_valid_account_or_an_error(
            versioned in any::<bool>(),
            mut bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            if versioned {
                bytes.insert(0, ENCODING_VERSION);
            }
            if let Ok(acc) = Account::decode(&bytes) {
                prop_assert_eq!(acc.check(), Ok(()));
                prop_assert_eq!(Account::decode(&acc.encode()), Ok(acc.clone()));
                exercise(acc, T0)?;
            }
        }

        /// The same for mutations of valid encodings (bytes set, inserted, removed, bits
        /// flipped), which keep most of the structure and so reach the invariant checks.
        #[test]
        fn mutated_valid_states_decode_to_a_valid_account_or_an_error(
            ops in proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 0..40),
            edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
        ) {
            let acc = built(&ops);
            prop_assert_eq!(acc.check(), Ok(()));
            let mut bytes = acc.encode();
            prop_assert_eq!(Account::decode(&bytes), Ok(acc));
            for (kind, at, value) in edits {
                let at = at % (bytes.len() + 1);
                match kind % 4 {
                    0 if at < bytes.len() => bytes[at] = value,
                    1 => bytes.insert(at, value),
                    2 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ if at < bytes.len() => bytes[at] ^= 1 << (value % 8),
                    _ => {}
                }
            }
            if let Ok(acc) = Account::decode(&bytes) {
                prop_assert_eq!(acc.check(), Ok(()));
                prop_assert_eq!(Account::decode(&acc.encode()), Ok(acc.clone()));
                exercise(acc, T0 + 1000)?;
            }
        }
    }
}
