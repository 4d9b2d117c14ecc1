//! The account's usage not flushed to the ledger yet: the current hour's requests and tokens
//! inline in the account (an admission adds to them without leaving the account's own cache
//! lines), anything else (older hours, amounts that do not fit, balance debits) in the ledger
//! part. `unflushed_hours` is the sum of both, which is what a flush sends and what an
//! acknowledgement takes off again.

use super::{Account, HOUR};
use crate::core::credit::PerKind;
use crate::core::ledger::{Acknowledgement, HourDelta};
use crate::core::window::Window;
use crate::core::Millis;

/// The sequence bits below the creation time (see `Account::next_seq`).
const SEQ_SHIFT: u32 = 20;

/// A sequence above every sequence an account created up to `now` may have used (each starts
/// from its creation time shifted by `SEQ_SHIFT` and grows by one a batch, far less than
/// 2^20 a millisecond): the start of a renamed account's sequence under its new name, which may
/// have had batches of its own.
pub(crate) fn fresh_seq(now: Millis) -> u64 {
    (now.max(0) as u64).saturating_add(1) << SEQ_SHIFT
}

impl Account {
    /// Gives the account its first batch sequence, from the clock, at its first change.
    pub(super) fn mark_unflushed(&mut self, at: Millis) {
        if self.next_seq == 0 {
            self.next_seq = (at.max(1) as u64) << SEQ_SHIFT;
        }
    }

    /// Adds `requests` (signed) and `tokens` to the unflushed usage of the hour with index
    /// `hour` (the hour of `at`): inline when the hour is the account's current one and the sums
    /// fit, in the ledger part otherwise. A clock before 1970 records nothing.
    pub(super) fn record_usage(&mut self, at: Millis, hour: i64, requests: i64, tokens: u64) {
        if requests == 0 && tokens == 0 {
            return;
        }
        let Ok(index) = u32::try_from(hour) else {
            return;
        };
        self.mark_unflushed(at);
        // A change for an earlier hour (a clock set back) goes into the ledger part as it is.
        if index > self.windows[HOUR] {
            self.enter(Window::Hour, index);
        }
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.add_pending(hour, requests, tokens, PerKind::default());
    }

    /// Adds to the unflushed usage of `hour`: requests and tokens inline when `hour` is the
    /// current hour and the sums fit, otherwise (with the inline amounts) into the ledger part;
    /// debits always into the ledger part.
    fn add_pending(&mut self, hour: i64, requests: i64, tokens: i64, debits: PerKind<i64>) {
        if hour == i64::from(self.windows[HOUR]) {
            let r = i64::from(self.pending_requests).saturating_add(requests);
            let t = i64::from(self.pending_tokens).saturating_add(tokens);
            if let (Ok(r), Ok(t)) = (i32::try_from(r), u32::try_from(t)) {
                self.pending_requests = r;
                self.pending_tokens = t;
                if debits != PerKind::default() {
                    self.ledger_part().record_hour(hour, 0, 0, debits);
                    self.drop_idle_ledger();
                }
                return;
            }
            self.pending_requests = 0;
            self.pending_tokens = 0;
            self.ledger_part().record_hour(hour, r, t, debits);
        } else {
            self.ledger_part()
                .record_hour(hour, requests, tokens, debits);
        }
        self.drop_idle_ledger();
    }

    /// Moves the current hour's inline usage into the ledger part (the hour is ending).
    pub(super) fn spill_pending(&mut self) {
        if self.pending_requests == 0 && self.pending_tokens == 0 {
            return;
        }
        let (r, t) = (self.pending_requests, self.pending_tokens);
        self.pending_requests = 0;
        self.pending_tokens = 0;
        let hour = i64::from(self.windows[HOUR]);
        self.ledger_part()
            .record_hour(hour, i64::from(r), i64::from(t), PerKind::default());
        self.drop_idle_ledger();
    }

    /// Whether the account has usage PostgreSQL does not have yet.
    pub(crate) fn has_unflushed(&self) -> bool {
        self.pending_requests != 0
            || self.pending_tokens != 0
            || self.ledger().is_some_and(|l| !l.hours.is_empty())
    }

    /// The unflushed usage by hour, oldest first: the ledger part's hours with the current
    /// hour's inline usage added.
    pub(crate) fn unflushed_hours(&self) -> Vec<HourDelta> {
        let mut hours = self.ledger().map_or_else(Vec::new, |l| l.hours.to_vec());
        if self.pending_requests == 0 && self.pending_tokens == 0 {
            return hours;
        }
        let hour = i64::from(self.windows[HOUR]);
        let (r, t) = (
            i64::from(self.pending_requests),
            i64::from(self.pending_tokens),
        );
        match hours.binary_search_by_key(&hour, |h| h.hour) {
            Ok(i) => {
                if let Some(h) = hours.get_mut(i) {
                    h.requests = h.requests.saturating_add(r);
                    h.tokens = h.tokens.saturating_add(t);
                }
            }
            Err(i) => hours.insert(
                i,
                HourDelta {
                    hour,
                    requests: r,
                    tokens: t,
                    debits: PerKind::default(),
                },
            ),
        }
        hours.retain(|h| !h.is_zero());
        hours
    }

    /// The sequence the account's next batch carries.
    pub(crate) fn batch_seq(&self) -> u64 {
        self.next_seq
    }

    /// The key was renamed (to another name than it had): the sequence it holds is the old
    /// name's, so its next batch under the new name must start a sequence of its own (see
    /// `rebase`); until then its batches must not be sent. An account that never had a
    /// sequence needs nothing. Done on every node that runs the rename (a master, its
    /// replicas, an AOF load), so it needs no propagation.
    pub(crate) fn mark_renamed(&mut self) {
        if self.next_seq != 0 {
            self.renamed = true;
        }
    }

    /// Whether the account's sequence is another name's (see `mark_renamed`).
    pub(crate) fn is_renamed(&self) -> bool {
        self.renamed
    }

    /// Starts the account's sequence anew under its present name, from `seq` (see
    /// `fresh_seq`): the sequence only grows.
    pub(crate) fn rebase(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
        self.renamed = false;
    }

    /// Takes a flushed batch off: each hour's amounts as sent are subtracted (what was counted
    /// since stays, and a release counted since may leave an hour below zero, which the next
    /// batch sends), the sequence moves on and the floor becomes PostgreSQL's totals.
    pub(crate) fn acknowledge(&mut self, ack: &Acknowledgement) {
        for sent in &ack.hours {
            self.add_pending(
                sent.hour,
                sent.requests.saturating_neg(),
                sent.tokens.saturating_neg(),
                sent.debits.map(i64::saturating_neg),
            );
        }
        self.next_seq = self.next_seq.max(ack.next_seq);
        // PostgreSQL's totals right after this batch: exact (a refund may have lowered them).
        if let Some(floor) = ack.floor {
            if floor != PerKind::default() || self.ledger().is_some() {
                self.ledger_part().floor = floor;
            }
        }
        self.drop_idle_ledger();
    }

    /// The account as `COPY` gives it to another key: everything but what the ledger is owed,
    /// which stays the source's (its unflushed hours and debits, its batch sequence).
    pub(crate) fn copied(&self) -> Account {
        let mut copy = self.clone();
        copy.pending_requests = 0;
        copy.pending_tokens = 0;
        copy.next_seq = 0;
        copy.tracked = false;
        copy.renamed = false;
        if let Some(ledger) = copy.extra.as_mut().and_then(|e| e.ledger.as_mut()) {
            ledger.hours.clear();
        }
        copy.drop_idle_ledger();
        copy
    }

    /// What `QUOTA.RESET` leaves of the account: the counters, leases, reservations and settled
    /// ids are forgotten; the usage not flushed yet, the batch sequence and the ledger part
    /// (older unflushed hours, a balance's holds, floor and terms) stay, since that usage
    /// happened and is still owed to the ledger. True if anything was forgotten.
    pub(crate) fn reset(&mut self) -> bool {
        let forgot = self.counts != [0; super::COUNTERS]
            || self.req_total != 0
            || self.lifetime
            || !self.leases().is_empty()
            || !self.settled().is_empty()
            || self.rates().is_some();
        if !forgot {
            // Nothing to forget: the state stays exactly as it is (nothing to propagate).
            return false;
        }
        let ledger = self.extra.take().and_then(|e| e.ledger);
        *self = Account {
            windows: [self.windows[HOUR], 0, 0],
            pending_requests: self.pending_requests,
            pending_tokens: self.pending_tokens,
            next_seq: self.next_seq,
            tracked: self.tracked,
            extra: ledger.map(|l| {
                Box::new(super::Extra {
                    ledger: Some(l),
                    ..super::Extra::default()
                })
            }),
            ..Account::default()
        };
        forgot
    }

    /// Merges the ledger part's oldest hours down to its bound (`MAX_LEDGER_HOURS`): a decoded
    /// state may hold more.
    pub(super) fn bound_ledger_hours(&mut self) {
        if let Some(ledger) = self.extra.as_mut().and_then(|e| e.ledger.as_mut()) {
            ledger.bound_hours();
        }
        self.drop_idle_ledger();
    }

    /// Puts the ledger part's entry for the current hour inline as far as it fits (a decoded
    /// state keeps every unflushed hour in the ledger part).
    pub(super) fn inline_current_hour(&mut self) {
        let hour = i64::from(self.windows[HOUR]);
        let Some(entry) = self
            .ledger()
            .and_then(|l| l.hours.iter().find(|h| h.hour == hour))
            .copied()
        else {
            return;
        };
        let (Ok(r), Ok(t)) = (i32::try_from(entry.requests), u32::try_from(entry.tokens)) else {
            return;
        };
        self.ledger_part()
            .record_hour(hour, -i64::from(r), -i64::from(t), PerKind::default());
        self.pending_requests = r;
        self.pending_tokens = t;
        self.drop_idle_ledger();
    }
}

#[cfg(test)]
mod tests {
    use crate::core::account::{Account, Counter};
    use crate::core::credit::PerKind;
    use crate::core::ledger::{Acknowledgement, BalanceChange, HourDelta};
    use crate::core::window::Window;
    use crate::core::Millis;

    const T0: Millis = 1_795_000_000_000;
    const HOUR: Millis = 3_600_000;

    fn hour(at: Millis) -> i64 {
        Window::Hour.index(at)
    }

    fn admitted(acc: &mut Account, at: Millis) {
        acc.count_request(
            at,
            hour(at),
            Window::Day.index(at),
            Window::Month.index(at),
            1,
        );
    }

    fn per(requests: i64, tokens: i64) -> PerKind<i64> {
        PerKind { requests, tokens }
    }

    fn delta(at: Millis, requests: i64, tokens: i64, debits: PerKind<i64>) -> HourDelta {
        HourDelta {
            hour: hour(at),
            requests,
            tokens,
            debits,
        }
    }

    /// Acknowledges `sent` as a flush of it would.
    fn ack(acc: &mut Account, sent: Vec<HourDelta>) {
        let next_seq = acc.batch_seq() + 1;
        acc.acknowledge(&Acknowledgement {
            hours: sent,
            next_seq,
            floor: None,
        });
    }

    #[test]
    fn the_current_hour_is_counted_inline_without_a_ledger_part() {
        let mut acc = Account::default();
        for _ in 0..3 {
            admitted(&mut acc, T0);
        }
        acc.count_tokens(
            70,
            T0,
            hour(T0),
            Window::Day.index(T0),
            Window::Month.index(T0),
        );
        assert!(acc.extra.is_none(), "no allocation for the current hour");
        assert!(acc.has_unflushed());
        assert_eq!(acc.unflushed_hours(), vec![delta(T0, 3, 70, per(0, 0))]);
        assert_eq!(acc.batch_seq(), (T0 as u64) << 20);
    }

    #[test]
    fn a_new_hour_moves_the_last_one_into_the_ledger_part_and_an_ack_takes_off_what_was_sent() {
        let mut acc = Account::default();
        admitted(&mut acc, T0);
        acc.count_tokens(
            5,
            T0,
            hour(T0),
            Window::Day.index(T0),
            Window::Month.index(T0),
        );
        admitted(&mut acc, T0 + HOUR);
        let sent = acc.unflushed_hours();
        assert_eq!(
            sent,
            vec![
                delta(T0, 1, 5, per(0, 0)),
                delta(T0 + HOUR, 1, 0, per(0, 0))
            ]
        );
        // The token hour counter moved with the hour; the day counter did not.
        assert_eq!(acc.counter(Counter::TokHour), (hour(T0 + HOUR), 0));
        // Counted while the batch is on its way: one more admission and a release.
        admitted(&mut acc, T0 + HOUR);
        assert!(acc.extra.is_some());
        let seq = acc.batch_seq();
        ack(&mut acc, sent);
        assert_eq!(
            acc.unflushed_hours(),
            vec![delta(T0 + HOUR, 1, 0, per(0, 0))]
        );
        assert!(acc.extra.is_none(), "the emptied ledger part is given back");
        assert_eq!(acc.batch_seq(), seq + 1);
        // A release of a request already flushed goes below zero: the next batch sends -1.
        let all = acc.unflushed_hours();
        ack(&mut acc, all);
        acc.record_usage(T0 + HOUR, hour(T0 + HOUR), -1, 0);
        assert_eq!(
            acc.unflushed_hours(),
            vec![delta(T0 + HOUR, -1, 0, per(0, 0))]
        );
        assert_eq!(acc.batch_seq(), seq + 2, "the sequence only grows");
    }

    #[test]
    fn amounts_that_do_not_fit_inline_go_to_the_ledger_part_and_add_up_exactly() {
        let mut acc = Account::default();
        let (d, m) = (Window::Day.index(T0), Window::Month.index(T0));
        acc.count_tokens(u64::from(u32::MAX) - 1, T0, hour(T0), d, m);
        acc.count_tokens(10, T0, hour(T0), d, m);
        admitted(&mut acc, T0);
        acc.count_tokens(1, T0, hour(T0), d, m);
        let total = i64::from(u32::MAX) + 10;
        assert_eq!(acc.unflushed_hours(), vec![delta(T0, 1, total, per(0, 0))]);
        let all = acc.unflushed_hours();
        ack(&mut acc, all);
        assert!(!acc.has_unflushed());
        assert!(acc.extra.is_none());
    }

    #[test]
    fn balance_debits_join_the_hour_and_the_state_survives_its_encoding() {
        let mut acc = Account::default();
        admitted(&mut acc, T0 - HOUR);
        admitted(&mut acc, T0);
        admitted(&mut acc, T0);
        acc.apply_balance(
            T0,
            &BalanceChange {
                debits: PerKind {
                    requests: 1,
                    tokens: 40,
                },
                ..BalanceChange::default()
            },
        );
        let hours = acc.unflushed_hours();
        assert_eq!(
            hours,
            vec![
                delta(T0 - HOUR, 1, 0, per(0, 0)),
                delta(T0, 2, 0, per(1, 40))
            ]
        );
        let back = Account::decode(&acc.encode()).unwrap();
        assert_eq!(back, acc, "the same split comes back");
        assert_eq!(back.unflushed_hours(), hours);
        // An acknowledgement of everything leaves nothing but the sequence.
        let mut flushed = back.clone();
        ack(&mut flushed, hours);
        assert!(!flushed.has_unflushed() && flushed.ledger().is_none());
        assert_eq!(Account::decode(&flushed.encode()).unwrap(), flushed);
    }

    /// A week-long PostgreSQL outage: usage in more hours than the bound, and usage in the
    /// current hour on top. What a flush sends spans at most `MAX_PENDING_HOURS`, with every
    /// request and token in it, and the state survives its encoding.
    #[test]
    fn an_outage_longer_than_the_bound_keeps_every_hour_summed_within_it() {
        use crate::core::ledger::{MAX_LEDGER_HOURS, MAX_PENDING_HOURS};
        let mut acc = Account::default();
        let (d, m) = (Window::Day.index(T0), Window::Month.index(T0));
        let hours = MAX_PENDING_HOURS as i64 + 40;
        for i in 0..hours {
            admitted(&mut acc, T0 + i * HOUR);
            acc.count_tokens(3, T0 + i * HOUR, hour(T0 + i * HOUR), d, m);
        }
        assert_eq!(acc.unflushed_hours().len(), MAX_PENDING_HOURS);
        // A debit in the current hour puts that hour in the ledger part too.
        acc.apply_balance(
            T0 + (hours - 1) * HOUR,
            &BalanceChange {
                debits: PerKind {
                    requests: 1,
                    tokens: 2,
                },
                ..BalanceChange::default()
            },
        );
        let sent = acc.unflushed_hours();
        assert!(sent.len() <= MAX_PENDING_HOURS);
        assert!(acc.ledger().unwrap().hours.len() <= MAX_LEDGER_HOURS);
        let sum = |hs: &[HourDelta]| {
            hs.iter().fold((0, 0, per(0, 0)), |(r, t, d), h| {
                (
                    r + h.requests,
                    t + h.tokens,
                    d.zip_with(h.debits, |a, b| a + b),
                )
            })
        };
        assert_eq!(sum(&sent), (hours, 3 * hours, per(1, 2)));
        assert_eq!(sent.last().unwrap().hour, hour(T0 + (hours - 1) * HOUR));
        let back = Account::decode(&acc.encode()).unwrap();
        assert_eq!(back, acc);
        // One more admission in the same hour, and one in a new hour: still within the bound.
        let mut later = back.clone();
        admitted(&mut later, T0 + (hours - 1) * HOUR + 10);
        admitted(&mut later, T0 + hours * HOUR);
        assert!(later.unflushed_hours().len() <= MAX_PENDING_HOURS);
        assert_eq!(sum(&later.unflushed_hours()).0, hours + 2);
    }

    /// An older build kept `MAX_PENDING_HOURS` hours in the ledger part plus the current hour
    /// inline, and encoded one hour more than the bound: such a state still loads (the oldest
    /// hours merge, every total stays), so a node restarts and a replica syncs.
    #[test]
    fn an_older_builds_state_with_one_hour_too_many_still_loads() {
        use crate::core::ledger::{MAX_DECODED_HOURS, MAX_PENDING_HOURS};
        for extra in [1, 50, MAX_DECODED_HOURS - MAX_PENDING_HOURS] {
            let n = MAX_PENDING_HOURS + extra;
            let mut acc = Account::default();
            admitted(&mut acc, T0 + (n as i64 - 1) * HOUR);
            let ledger = acc.ledger_part();
            for i in 0..n as i64 - 1 {
                ledger.hours.push(delta(T0 + i * HOUR, 2, 5, per(0, 1)));
            }
            let bytes = acc.encode();
            let back = Account::decode(&bytes).unwrap();
            let hours = back.unflushed_hours();
            assert_eq!(hours.len(), MAX_PENDING_HOURS, "{n} hours");
            let requests: i64 = hours.iter().map(|h| h.requests).sum();
            let debits: i64 = hours.iter().map(|h| h.debits.tokens).sum();
            assert_eq!((requests, debits), (2 * (n as i64 - 1) + 1, n as i64 - 1));
            // Re-encoded, it is stable.
            assert_eq!(Account::decode(&back.encode()).unwrap(), back);
        }
    }

    #[test]
    fn a_reset_forgets_the_usage_counters_but_not_what_the_ledger_is_owed() {
        let mut acc = Account::default();
        admitted(&mut acc, T0 - HOUR);
        admitted(&mut acc, T0);
        let owed = acc.unflushed_hours();
        assert!(acc.reset());
        assert!(!acc.reset(), "nothing left to forget");
        assert_eq!(acc.usage(T0).requests_per_day, 0);
        assert_eq!(acc.req_total, 0);
        assert_eq!(acc.unflushed_hours(), owed);
        assert_eq!(acc.retention(), crate::core::account::Retention::Forever);
        ack(&mut acc, owed);
        assert_eq!(acc.retention(), crate::core::account::Retention::Nothing);
    }

    #[test]
    fn an_older_states_counters_of_one_window_kind_share_the_later_window() {
        let mut acc = Account::default();
        admitted(&mut acc, T0);
        let day = Window::Day.index(T0);
        let mut counters = Counter::ALL.map(|c| acc.counter(c));
        // An older build kept the token day counter in the day before.
        counters[Counter::TokDay as usize] = (day - 1, 500);
        let back = Account::decode(&acc.encode_with(counters)).unwrap();
        assert_eq!(back.counter(Counter::TokDay), (day, 0));
        assert_eq!(back.counter(Counter::ReqDay), (day, 1));
    }
}

#[cfg(test)]
mod interleaving {
    use crate::core::account::{Account, AdmitRequest};
    use crate::core::ledger::Acknowledgement;
    use crate::core::policy::{EffectivePolicy, LimitField, Limits};

    /// Whatever the interleaving of admissions, releases, commits, snapshots and their
    /// acknowledgements, what the acknowledged batches add up to plus what is still unflushed
    /// equals the requests and tokens the account counted.
    #[test]
    fn acknowledged_plus_unflushed_is_what_was_counted() {
        let mut next = crate::core::test_rng(0x9E37_79B9_7F4A_7C15u64);
        let mut base = Limits::default();
        base.set(LimitField::RequestsPerDay, Some(10));
        base.set(LimitField::MaxConcurrent, Some(3));
        let p = EffectivePolicy::merge(base, None);
        for case in 0..200 {
            let mut acc = Account::default();
            let now = 1_795_000_000_000 + case * 7;
            let (mut flushed_r, mut flushed_t) = (0i64, 0i64);
            let (mut net, mut tokens) = (0i64, 0i64);
            let mut held: Vec<String> = Vec::new();
            let mut in_flight: Vec<Acknowledgement> = Vec::new();
            let mut id = case as u64 * 1000;
            for _ in 0..300 {
                match next(6) {
                    0 | 1 => {
                        let d = acc
                            .admit(
                                &p,
                                &AdmitRequest {
                                    lease: None,
                                    lease_ttl_ms: 600_000,
                                    reserve: Some(1),
                                    peek: false,
                                    cost: 1,
                                    balance: None,
                                },
                                now,
                                || {
                                    id += 1;
                                    id
                                },
                            )
                            .unwrap();
                        if d.allowed() {
                            net += 1;
                            let mut buf = [0u8; 16];
                            held.push(d.lease.unwrap().as_text(&mut buf).to_owned());
                        }
                    }
                    2 if !held.is_empty() => {
                        let l = held.remove(next(held.len() as u64) as usize);
                        if next(2) == 0 {
                            assert!(acc.release(&l, now));
                            net -= 1;
                        } else {
                            let t = next(100);
                            acc.commit(t, Some(&l), now).unwrap();
                            tokens += t as i64;
                        }
                    }
                    3 if in_flight.is_empty() && acc.has_unflushed() => {
                        in_flight.push(Acknowledgement {
                            hours: acc.unflushed_hours(),
                            next_seq: acc.batch_seq() + 1,
                            floor: None,
                        });
                    }
                    4 => {
                        if let Some(ack) = in_flight.pop() {
                            for h in &ack.hours {
                                flushed_r += h.requests;
                                flushed_t += h.tokens;
                            }
                            acc.acknowledge(&ack);
                        }
                    }
                    _ => {}
                }
                let rest = acc.unflushed_hours();
                let in_r: i64 = rest.iter().map(|h| h.requests).sum();
                let in_t: i64 = rest.iter().map(|h| h.tokens).sum();
                assert_eq!(
                    (flushed_r + in_r, flushed_t + in_t),
                    (net, tokens),
                    "case {case}"
                );
                assert_eq!(acc.usage(now).requests_per_day as i64, net);
            }
        }
    }
}
