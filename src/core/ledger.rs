//! The usage ledger and the prepaid balances, as an account holds them until they are flushed.
//!
//! Every change an account counts (a request admitted or released, tokens committed, a debit of
//! a balance) is also added to its unflushed usage, per UTC hour, until a flush has written it
//! to PostgreSQL and acknowledged it (`Account::acknowledge`), which takes exactly what was
//! written off again. The current hour's requests and tokens are kept inline in the account
//! (`account::pending`); older hours, balance debits, the holds and the terms live in the
//! `Ledger`, an optional, boxed part that most accounts do not have.
//!
//! An account is also the holder of the balance of the credit row with its own identity: the
//! debits of that balance go into its ledger, and its tokens held by `RESERVE` (`Hold`) keep
//! concurrent admissions from spending the same tokens. A `'*'` row's balance is held by the
//! user's `'*'` account, shared by every bundle without a row of its own.
//!
//! Batches carry a per-account sequence (`next_seq`) that PostgreSQL keeps per account, so a
//! batch sent again (a retry, a replay, a master that took over) is applied once. The sequence
//! starts from the master's clock at the account's first change (shifted left by 20 bits) and
//! only grows, so an account key created again later never reuses a sequence an earlier one
//! used.
//! Pure: no Redis, no PostgreSQL, time passed in.

use smallvec::SmallVec;

use super::credit::{BalanceKind, PerKind, RowBalance};
use super::window::Window;
use super::Millis;

/// Most hours an account's unflushed usage spans, and so most hours one batch sends (a week).
/// While PostgreSQL is down, an account active for longer merges its two oldest hours into the
/// later one: the totals stay exact, only the split between those hours is lost, so a node
/// keeps every bill whatever the length of the outage. 40 bytes an hour: at most 6.7 KB per
/// account.
pub(crate) const MAX_PENDING_HOURS: usize = 168;

/// Most hours the ledger part keeps: one less than `MAX_PENDING_HOURS`, so the current hour,
/// which the account keeps inline, always has room (ledger part and inline hour together never
/// span more than `MAX_PENDING_HOURS`).
pub(crate) const MAX_LEDGER_HOURS: usize = MAX_PENDING_HOURS - 1;

/// Most hours a decoder accepts (a state, an acknowledgement, the last batch PostgreSQL kept):
/// what an older build may have written (up to 169 hours), with room to spare. A decoded state
/// is merged down to the bound at once.
pub(crate) const MAX_DECODED_HOURS: usize = 4 * MAX_PENDING_HOURS;

/// Most tokens one command may commit or reserve: a billion times the largest context window
/// of today's models is still far below it, and amounts this size keep every sum the ledger
/// makes far from the 64-bit limit of its columns (the sums also saturate, in the account and
/// in PostgreSQL, so no amount can make a flush fail).
pub(crate) const MAX_TOKENS: u64 = 1_000_000_000_000;

/// Most balance holds an account keeps (one per live lease that reserved from the balance or
/// whose request the balance paid): the lease bound of the accounts that draw on it.
pub(crate) const MAX_HOLDS: usize = 4096;

/// One hour of changes not flushed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct HourDelta {
    /// Hours since the epoch (`Window::Hour` index).
    pub hour: i64,
    /// Requests admitted minus requests released.
    pub requests: i64,
    pub tokens: i64,
    /// Debits of this holder's balance, per kind (a refund is negative).
    pub debits: PerKind<i64>,
}

impl HourDelta {
    /// Its five numbers in the order every encoding writes them: the hour, requests, tokens,
    /// then the debits per kind.
    pub(crate) fn fields(&self) -> [i64; 5] {
        [
            self.hour,
            self.requests,
            self.tokens,
            self.debits.requests,
            self.debits.tokens,
        ]
    }

    /// Whether the hour changes nothing.
    pub(crate) fn is_zero(&self) -> bool {
        self.requests == 0 && self.tokens == 0 && self.debits == PerKind::default()
    }
}

/// Tokens of a holder's balance held for one lease until it is committed, released or expires,
/// and the requests the balance paid for that lease's admission (its cost, refunded by a
/// release; 0 when the windows paid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hold {
    /// `hold_tag` of the account key and lease id.
    pub tag: u64,
    pub expires_at: Millis,
    pub tokens: u64,
    /// At most `account::MAX_COST`.
    pub paid_requests: u32,
}

/// What an account's commits and releases owe a balance, as its last admission found it: whose
/// balance (its own row's or the `'*'` row's) and the effective token limits beyond which
/// committed tokens are debited (`u64::MAX` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BalanceTerms {
    pub global: bool,
    pub token_limits: [u64; 3],
}

/// The optional ledger part of an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    /// Unflushed changes by hour, oldest first, one entry an hour. The first is kept inline:
    /// a balance holder's admissions debit the current hour, and one part touches fewer cache
    /// lines than a part and a buffer.
    pub hours: SmallVec<[HourDelta; 1]>,
    /// The balance used totals PostgreSQL reported at the last flush of this holder's debits:
    /// a cached row that is older counts at least these.
    pub floor: PerKind<u64>,
    /// Holds on this holder's token balance, in no particular order.
    pub holds: Vec<Hold>,
    /// How this account's commits debit a balance (none: they debit nothing).
    pub terms: Option<BalanceTerms>,
}

/// A change to a balance holder, made by an admission, commit or release of an account that
/// draws on it (the holder itself or another bundle of the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct BalanceChange {
    pub debits: PerKind<i64>,
    pub hold: Option<Hold>,
    /// Drop the hold with this tag (commit, release).
    pub settle: Option<u64>,
}

impl BalanceChange {
    /// Whether it changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.debits == PerKind::default() && self.hold.is_none() && self.settle.is_none()
    }
}

/// What one flushed batch of an account was, to take off its ledger once PostgreSQL has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Acknowledgement {
    /// The hours written (or found already written), exactly as sent.
    pub hours: Vec<HourDelta>,
    /// The sequence the next batch uses.
    pub next_seq: u64,
    /// The holder's used totals after the batch, when PostgreSQL has a credit row for it.
    pub floor: Option<PerKind<u64>>,
}

/// What balance `b` has left per kind at `now`, given the ledger of its
/// holder: granted, minus the debits flushed (at least the holder's floor), minus those not
/// flushed yet, and for tokens minus the live holds. `twice` is what the row's used totals
/// already count of the debits the holder still counts unflushed (see
/// `decide::counted_twice`). `None` for a kind `b` has no balance of.
pub(crate) fn balance_left(
    b: &RowBalance,
    holder: Option<&Ledger>,
    twice: PerKind<i64>,
    now: Millis,
) -> PerKind<Option<i64>> {
    let floor = holder.map_or(PerKind::default(), |l| l.floor);
    let unflushed = |kind: BalanceKind| holder.map_or(0, |l| l.unflushed(kind));
    let held = holder.map_or(0, |l| l.held(now));
    let requests = b.left(
        BalanceKind::Requests,
        floor.requests,
        unflushed(BalanceKind::Requests),
        twice.requests,
    );
    let tokens = b
        .left(
            BalanceKind::Tokens,
            floor.tokens,
            unflushed(BalanceKind::Tokens),
            twice.tokens,
        )
        .map(|left| left.saturating_sub(i64::try_from(held).unwrap_or(i64::MAX)));
    PerKind { requests, tokens }
}

/// A batch of a balance holder's usage that the flush sent to PostgreSQL and has not
/// acknowledged yet: its sequence and the debits it carries. Between PostgreSQL's commit and
/// the acknowledgement, a credit row read from PostgreSQL counts these debits in its used
/// totals while the holder's ledger still counts them unflushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Unacknowledged {
    pub seq: u64,
    pub debits: PerKind<i64>,
}

impl Unacknowledged {
    /// The batch of `hours` sent with sequence `seq`.
    pub(crate) fn of(seq: u64, hours: &[HourDelta]) -> Unacknowledged {
        let debits = hours.iter().fold(PerKind::<i64>::default(), |sum, h| {
            sum.zip_with(h.debits, i64::saturating_add)
        });
        Unacknowledged { seq, debits }
    }
}

/// A 64-bit tag for (account key, lease id): holds of several bundles share a holder, and their
/// lease ids may be the same text.
pub(crate) fn hold_tag(account_key: &[u8], lease: &str) -> u64 {
    // FNV-1a over key, a separator no key ends with, and the lease id; then a final mix.
    let bytes = account_key.iter().chain(b"\xff").chain(lease.as_bytes());
    let h = bytes.fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl Ledger {
    /// Whether the part holds nothing worth keeping.
    pub(crate) fn is_idle(&self) -> bool {
        self.hours.is_empty()
            && self.holds.is_empty()
            && self.floor == PerKind::default()
            && self.terms.is_none()
    }

    /// Adds changes to the hour of `at`.
    pub(crate) fn record(&mut self, at: Millis, requests: i64, tokens: i64, debits: PerKind<i64>) {
        self.record_hour(Window::Hour.index(at), requests, tokens, debits);
    }

    /// Adds changes to the hour with index `hour`.
    pub(crate) fn record_hour(
        &mut self,
        hour: i64,
        requests: i64,
        tokens: i64,
        debits: PerKind<i64>,
    ) {
        let entry = match self.hours.iter().rposition(|h| h.hour <= hour) {
            Some(i) if self.hours.get(i).is_some_and(|h| h.hour == hour) => self.hours.get_mut(i),
            found => {
                let at = found.map_or(0, |i| i + 1);
                self.hours.insert(
                    at,
                    HourDelta {
                        hour,
                        ..HourDelta::default()
                    },
                );
                self.hours.get_mut(at)
            }
        };
        if let Some(h) = entry {
            h.requests = h.requests.saturating_add(requests);
            h.tokens = h.tokens.saturating_add(tokens);
            h.debits = h.debits.zip_with(debits, i64::saturating_add);
        }
        // A change undone within the hour (an admission released) leaves nothing to flush.
        if self.hours.iter().any(HourDelta::is_zero) {
            self.hours.retain(|h| !h.is_zero());
        }
        self.bound_hours();
    }

    /// Merges the oldest hours into the next one while there are more than `MAX_LEDGER_HOURS`.
    pub(crate) fn bound_hours(&mut self) {
        while self.hours.len() > MAX_LEDGER_HOURS {
            let oldest = self.hours.remove(0);
            if let Some(next) = self.hours.first_mut() {
                next.requests = next.requests.saturating_add(oldest.requests);
                next.tokens = next.tokens.saturating_add(oldest.tokens);
                next.debits = next.debits.zip_with(oldest.debits, i64::saturating_add);
            }
        }
    }

    /// Debits of kind `kind` not flushed yet.
    pub(crate) fn unflushed(&self, kind: BalanceKind) -> i64 {
        self.hours
            .iter()
            .fold(0i64, |sum, h| sum.saturating_add(h.debits.get(kind)))
    }

    /// Tokens held by holds that are live at `now`.
    pub(crate) fn held(&self, now: Millis) -> u64 {
        self.holds
            .iter()
            .filter(|h| h.expires_at > now)
            .fold(0u64, |sum, h| sum.saturating_add(h.tokens))
    }

    /// The hold with `tag`, if live at `now`.
    pub(crate) fn hold(&self, tag: u64, now: Millis) -> Option<&Hold> {
        self.holds
            .iter()
            .find(|h| h.tag == tag && h.expires_at > now)
    }

    /// Applies a change made at `at`: expired holds are dropped first, then the debits are
    /// recorded in the hour of `at`, the settled hold dropped and the new one added.
    pub(crate) fn apply(&mut self, at: Millis, change: &BalanceChange) {
        if !self.holds.is_empty() {
            self.holds.retain(|h| h.expires_at > at);
        }
        if change.debits != PerKind::default() {
            self.record(at, 0, 0, change.debits);
        }
        if let Some(tag) = change.settle {
            self.holds.retain(|h| h.tag != tag);
        }
        if let Some(hold) = change.hold {
            self.holds.retain(|h| h.tag != hold.tag);
            if self.holds.len() >= MAX_HOLDS {
                // Cannot happen from admissions (leases are bounded); keep the bound anyway.
                if let Some(first) = (0..self.holds.len()).min_by_key(|i| self.holds[*i].expires_at)
                {
                    self.holds.swap_remove(first);
                }
            }
            self.holds.push(hold);
        }
    }

    /// Bytes of heap the part owns beyond its box.
    pub(crate) fn heap_size(&self) -> usize {
        usize::from(self.hours.spilled()) * self.hours.capacity() * std::mem::size_of::<HourDelta>()
            + self.holds.capacity() * std::mem::size_of::<Hold>()
    }
}

/// What PostgreSQL keeps of the last batch it applied for an account: its sequence, its
/// revision and exactly what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastBatch {
    pub seq: u64,
    pub rev: u64,
    pub hours: Vec<HourDelta>,
}

/// What a flush does with one account's batch, given the last batch applied for the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Add these hours (the batch, or what it holds beyond the last batch it revises).
    Apply(Vec<HourDelta>),
    /// Already applied (or superseded): add nothing.
    Skip,
}

/// Decides a batch `(seq, rev, hours)` against the last one applied.
///
/// A later sequence is a new batch: all of it is added. The same sequence is the same batch
/// sent again: by the same master exactly as before (the same revision: skipped), or by a
/// replica that took over, from the replicated state, which holds what the lost master sent
/// plus what was counted since (a later revision, the snapshot time: only the difference is
/// added, so nothing is counted twice and nothing replicated is lost). An earlier sequence or
/// revision is stale and skipped.
pub(crate) fn claim(last: Option<&LastBatch>, seq: u64, rev: u64, hours: &[HourDelta]) -> Claim {
    match last {
        Some(last) if seq < last.seq || (seq == last.seq && rev <= last.rev) => Claim::Skip,
        Some(last) if seq == last.seq => Claim::Apply(difference(hours, &last.hours)),
        _ => Claim::Apply(hours.iter().filter(|h| !h.is_zero()).copied().collect()),
    }
}

/// `new` minus `old`, hour by hour (hours in either), without the hours that come to zero.
fn difference(new: &[HourDelta], old: &[HourDelta]) -> Vec<HourDelta> {
    let mut out: Vec<HourDelta> = new.to_vec();
    for o in old {
        let entry = match out.iter().position(|h| h.hour == o.hour) {
            Some(i) => out.get_mut(i),
            None => {
                out.push(HourDelta {
                    hour: o.hour,
                    ..HourDelta::default()
                });
                out.last_mut()
            }
        };
        if let Some(h) = entry {
            h.requests = h.requests.saturating_sub(o.requests);
            h.tokens = h.tokens.saturating_sub(o.tokens);
            h.debits = h.debits.zip_with(o.debits, i64::saturating_sub);
        }
    }
    out.retain(|h| !h.is_zero());
    out.sort_by_key(|h| h.hour);
    out
}

/// A batch's hours as PostgreSQL keeps them (`quota_ledger_batch.last_hours`): five integers
/// an hour, comma-separated.
pub(crate) fn hours_text(hours: &[HourDelta]) -> String {
    let mut out = String::new();
    for h in hours {
        for v in h.fields() {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&v.to_string());
        }
    }
    out
}

/// Reads what `hours_text` wrote; `None` for anything else.
pub(crate) fn parse_hours_text(text: &str) -> Option<Vec<HourDelta>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    let values: Vec<i64> = text
        .split(',')
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    if !values.len().is_multiple_of(5) || values.len() / 5 > MAX_DECODED_HOURS {
        return None;
    }
    Some(
        values
            .chunks_exact(5)
            .map(|c| HourDelta {
                hour: c[0],
                requests: c[1],
                tokens: c[2],
                debits: PerKind {
                    requests: c[3],
                    tokens: c[4],
                },
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_795_000_000_000;
    const HOUR: Millis = 3_600_000;

    fn per(requests: i64, tokens: i64) -> PerKind<i64> {
        PerKind { requests, tokens }
    }

    #[test]
    fn changes_add_up_per_hour_and_an_hour_undone_leaves_nothing() {
        let mut l = Ledger::default();
        l.record(T0, 1, 0, per(1, 0));
        l.record(T0 + 10, 1, 50, per(0, 20));
        l.record(T0 + HOUR, 1, 0, per(0, 0));
        // A late change for an earlier hour goes into that hour.
        l.record(T0 + 5, 0, 7, per(0, 0));
        assert_eq!(l.hours.len(), 2);
        assert_eq!(l.hours[0].tokens, 57);
        assert_eq!(l.unflushed(BalanceKind::Requests), 1);
        assert_eq!(l.unflushed(BalanceKind::Tokens), 20);
        l.record(T0 + HOUR, -1, 0, per(0, 0));
        assert_eq!(
            l.hours.len(),
            1,
            "an hour whose changes cancel out is dropped"
        );
    }

    #[test]
    fn at_the_bound_the_oldest_hours_merge_and_totals_stay() {
        let mut l = Ledger::default();
        for i in 0..(MAX_PENDING_HOURS as i64 + 10) {
            l.record(T0 + i * HOUR, 1, 2, per(1, 1));
        }
        assert_eq!(l.hours.len(), MAX_LEDGER_HOURS);
        let total: i64 = l.hours.iter().map(|h| h.requests).sum();
        assert_eq!(total, MAX_PENDING_HOURS as i64 + 10);
        assert_eq!(
            l.unflushed(BalanceKind::Tokens),
            MAX_PENDING_HOURS as i64 + 10
        );
        assert_eq!(l.hours[0].requests, 12);
    }

    #[test]
    fn holds_expire_settle_and_count_once() {
        let mut l = Ledger::default();
        let hold = |tag, tokens| Hold {
            tag,
            expires_at: T0 + 1000,
            tokens,
            paid_requests: 1,
        };
        l.apply(
            T0,
            &BalanceChange {
                debits: PerKind {
                    requests: 1,
                    tokens: 0,
                },
                hold: Some(hold(1, 30)),
                settle: None,
            },
        );
        l.apply(
            T0,
            &BalanceChange {
                hold: Some(hold(2, 12)),
                ..Default::default()
            },
        );
        assert_eq!(l.held(T0), 42);
        assert_eq!(l.held(T0 + 1000), 0, "expired holds hold nothing");
        assert!(l.hold(1, T0).is_some_and(|h| h.paid_requests == 1));
        l.apply(
            T0 + 1,
            &BalanceChange {
                debits: PerKind {
                    requests: 0,
                    tokens: 25,
                },
                settle: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(l.held(T0 + 1), 12);
        assert_eq!(
            (
                l.unflushed(BalanceKind::Requests),
                l.unflushed(BalanceKind::Tokens)
            ),
            (1, 25)
        );
        l.apply(T0 + 2000, &BalanceChange::default());
        assert!(l.holds.is_empty());
    }

    #[test]
    fn hold_tags_tell_accounts_and_leases_apart() {
        assert_ne!(
            hold_tag(b"q:{a}:1:t1:p1:a1:x", "l"),
            hold_tag(b"q:{a}:1:t1:p1:a1:y", "l")
        );
        assert_ne!(hold_tag(b"k", "l1"), hold_tag(b"k", "l2"));
        assert_eq!(hold_tag(b"k", "l1"), hold_tag(b"k", "l1"));
    }

    #[test]
    fn a_batch_sent_again_counts_once_and_a_revision_adds_only_what_is_new() {
        let h = |hour, requests| HourDelta {
            hour,
            requests,
            ..HourDelta::default()
        };
        let first = vec![h(10, 3)];
        assert_eq!(claim(None, 5, 100, &first), Claim::Apply(first.clone()));
        let last = LastBatch {
            seq: 5,
            rev: 100,
            hours: first.clone(),
        };
        // The same master sends it again: nothing.
        assert_eq!(claim(Some(&last), 5, 100, &first), Claim::Skip);
        // A replica that took over sends the same sequence with what it counted since.
        let revised = vec![h(10, 7), h(11, 2)];
        assert_eq!(
            claim(Some(&last), 5, 200, &revised),
            Claim::Apply(vec![h(10, 4), h(11, 2)])
        );
        // A revision holding less (a release since) takes it back; an older one is stale.
        assert_eq!(
            claim(Some(&last), 5, 200, &[h(10, 2)]),
            Claim::Apply(vec![h(10, -1)])
        );
        assert_eq!(claim(Some(&last), 5, 99, &revised), Claim::Skip);
        assert_eq!(claim(Some(&last), 4, 300, &revised), Claim::Skip);
        assert_eq!(
            claim(Some(&last), 6, 1, &revised),
            Claim::Apply(revised.clone())
        );
        let text = hours_text(&revised);
        assert_eq!(parse_hours_text(&text), Some(revised));
        assert_eq!(parse_hours_text(""), Some(vec![]));
        for bad in ["1,2", "x,1,2,3,4", "1,,2,3,4"] {
            assert_eq!(parse_hours_text(bad), None, "{bad}");
        }
    }
}
