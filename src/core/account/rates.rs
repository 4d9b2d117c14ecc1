//! The account's smooth rates: what they deny at an admission, how long until they allow, what
//! is left, and charging and refunding them (the math is `core::rate`'s).
//!
//! Only the deciding side changes rates here (`admit`, `commit`, `release`); an effect carries
//! the resulting state to replicas and the AOF (`set_rates`), so they never read a clock.

use super::{Account, Now};
use crate::core::policy::{LimitField, Limits, RATES};
use crate::core::rate::{self, RateState, Rates, Wait};
use crate::core::Millis;

/// A rate's slot in `Rates` and its period in ms.
#[inline]
fn slot(field: LimitField) -> (usize, i64) {
    match field {
        LimitField::RequestsPerSecond => (0, 1_000),
        LimitField::RequestsPerMinute => (1, 60_000),
        _ => (2, 60_000),
    }
}

/// The request rates (a cost counts against them); the token rate is the last.
const REQUEST_RATES: [LimitField; 2] =
    [LimitField::RequestsPerSecond, LimitField::RequestsPerMinute];

impl Account {
    /// The smooth rates' state, when some rate has one.
    pub(crate) fn rates(&self) -> Option<&Rates> {
        self.extra.as_ref().and_then(|e| e.rates.as_deref())
    }

    /// Sets the rates' state (an effect's, made by the master): none clears it.
    pub(crate) fn set_rates(&mut self, rates: Option<Rates>) {
        match rates.filter(|r| !r.is_empty()) {
            Some(r) => self.extra_mut().rates = Some(Box::new(r)),
            None => {
                if let Some(extra) = self.extra.as_mut() {
                    extra.rates = None;
                }
                self.tidy();
            }
        }
    }

    /// One rate's state (all zero without one).
    #[inline]
    fn rate(&self, field: LimitField) -> RateState {
        let (i, _) = slot(field);
        self.rates()
            .and_then(|r| r.0.get(i).copied())
            .unwrap_or_default()
    }

    /// The rates' state, created when missing (dropped again by `drop_idle_rates`).
    fn rates_mut(&mut self) -> &mut Rates {
        self.extra_mut().rates.get_or_insert_with(Box::default)
    }

    /// How long `field` (a rate limited to `n`) makes an admission of `cost` wait at `now`.
    #[inline]
    pub(super) fn rate_wait(&self, field: LimitField, n: u64, now: Millis, cost: u64) -> Wait {
        let (_, period) = slot(field);
        let state = self.rate(field);
        rate::wait(state.level_at(n, now), n, period, cost)
    }

    /// The violated rates under `limits` at `now` for `cost` requests (the token rate denies
    /// once less than one token is left; a cost of 0 counts nothing in the request rates, so
    /// they never deny it), as `LimitField` bits.
    pub(super) fn rate_violations(&self, limits: &Limits, now: Millis, cost: u64) -> u16 {
        let mut bits = 0u16;
        for field in LimitField::RATES {
            let Some(n) = limits.get(field) else {
                continue;
            };
            let cost = match field {
                LimitField::TokensPerMinute => 1,
                _ if cost == 0 => continue,
                _ => cost,
            };
            if self.rate_wait(field, n, now, cost) != Wait::None {
                bits |= 1 << field as u16;
            }
        }
        bits
    }

    /// Whole requests (or tokens) `field`, a rate limited to `n`, admits at `now`.
    pub(super) fn rate_left(&self, field: LimitField, n: u64, now: Millis) -> u64 {
        let (_, period) = slot(field);
        rate::available(self.rate(field).level_at(n, now), n, period)
    }

    /// Counts an admission in the limited rates: `cost` in the request rates, `tokens` (its
    /// reservation) in the token rate. The token rate's state is made even for no tokens, so
    /// that the admission's commit counts there.
    pub(super) fn charge_rates(&mut self, limits: &Limits, now: &Now, cost: u64, tokens: u64) {
        let rates = self.rates_mut();
        for field in LimitField::RATES {
            let Some(n) = limits.get(field).filter(|n| *n != 0) else {
                continue;
            };
            let (i, period) = slot(field);
            let amount = if field == LimitField::TokensPerMinute {
                tokens
            } else {
                cost
            };
            if let Some(state) = rates.0.get_mut(i) {
                state.charge(n, period, now.ms, amount);
            }
        }
        self.drop_idle_rates();
    }

    /// Settles a commit of `tokens` in the token rate, whose reservation (`reserved`, counted
    /// there at admission) it replaces: the rate counts the difference.
    pub(super) fn settle_rate_tokens(&mut self, now: Millis, reserved: u64, tokens: u64) {
        if !self.rate(LimitField::TokensPerMinute).is_set() {
            return;
        }
        let (i, period) = slot(LimitField::TokensPerMinute);
        if let Some(state) = self.rates_mut().0.get_mut(i) {
            if tokens >= reserved {
                state.add(period, now, tokens - reserved);
            } else {
                state.refund(period, now, reserved - tokens);
            }
        }
    }

    /// Gives back a released admission's `cost` to the request rates and its reservation to
    /// the token rate.
    pub(super) fn refund_rates(&mut self, now: Millis, cost: u64, reserved: u64) {
        if self.rates().is_none() {
            return;
        }
        let rates = self.rates_mut();
        for field in REQUEST_RATES
            .into_iter()
            .chain([LimitField::TokensPerMinute])
        {
            let (i, period) = slot(field);
            let amount = if field == LimitField::TokensPerMinute {
                reserved
            } else {
                cost
            };
            if let Some(state) = rates.0.get_mut(i) {
                state.refund(period, now, amount);
            }
        }
    }

    /// What each rate counts at `now` (at the rate it last drained at), for usage.
    pub(super) fn rates_used(&self, now: Millis) -> [u64; RATES] {
        let Some(rates) = self.rates() else {
            return [0; RATES];
        };
        let mut out = [0; RATES];
        for (field, out) in LimitField::RATES.into_iter().zip(out.iter_mut()) {
            let (i, period) = slot(field);
            if let Some(state) = rates.0.get(i) {
                *out = rate::used(state.level_at(state.per, now), period);
            }
        }
        out
    }

    /// Drops the rates' state when no rate has any.
    fn drop_idle_rates(&mut self) {
        if self.rates().is_some_and(Rates::is_empty) {
            self.set_rates(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::AdmitRequest;
    use super::*;
    use crate::core::effect::{rates_change, Effect};
    use crate::core::policy::{Additional, EffectivePolicy};

    const T0: Millis = 1_795_000_000_000;

    fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
        EffectivePolicy::of(fields)
    }

    fn req(reserve: Option<u64>, lease: Option<&str>) -> AdmitRequest<'_> {
        AdmitRequest {
            lease,
            lease_ttl_ms: 30_000,
            reserve,
            peek: false,
            cost: 1,
            balance: None,
        }
    }

    /// Admits on the master and applies the effect to the replica, which must end equal.
    fn admit(
        master: &mut Account,
        replica: &mut Account,
        p: &EffectivePolicy,
        r: &AdmitRequest<'_>,
        now: Millis,
    ) -> super::super::AdmitDecision {
        let d = master.admit(p, r, now, || 7).unwrap();
        if let Some(e) = Effect::admitted(now, &d, master) {
            let bytes = e.encode();
            Effect::decode(&bytes).unwrap().apply(replica).unwrap();
        }
        assert_eq!(replica, master);
        assert_eq!(Account::decode(&master.encode()).as_ref(), Ok(&*master));
        d
    }

    #[test]
    fn requests_per_second_admits_a_burst_then_refills_smoothly() {
        let p = policy(&[(LimitField::RequestsPerSecond, 10)]);
        let (mut m, mut r) = (Account::default(), Account::default());
        for i in 0..10 {
            let d = admit(&mut m, &mut r, &p, &req(None, None), T0);
            assert!(d.allowed());
            assert_eq!(d.remaining_requests, 9 - i);
        }
        let d = admit(&mut m, &mut r, &p, &req(None, None), T0);
        assert!(!d.allowed());
        assert_eq!(d.reason(), "requests_per_second");
        assert_eq!((d.retry_after, d.retry_after_ms), (1, 100));
        assert!(!d.changed());
        // Half a second later, half is back.
        let mut admitted = 0;
        while admit(&mut m, &mut r, &p, &req(None, None), T0 + 500).allowed() {
            admitted += 1;
        }
        assert_eq!(admitted, 5);
        assert_eq!(m.usage(T0 + 500).rates, [10, 0, 0]);
        assert_eq!(m.usage(T0 + 1_000).rates, [5, 0, 0]);
        // A plain policy leaves the state alone, and never writes the rates' encoding.
        let mut plain = Account::default();
        plain
            .admit(&policy(&[]), &req(None, None), T0, || 1)
            .unwrap();
        assert!(plain.rates().is_none());
        assert_eq!(
            plain.encode()[0],
            super::super::codec::ENCODING_VERSION_LEDGER
        );
    }

    #[test]
    fn a_credit_adds_to_the_rate_and_the_base_rate_marks_it_used() {
        let mut base = Limits::default();
        base.set(LimitField::RequestsPerMinute, Some(2));
        let mut add = Additional::default();
        add.set(LimitField::RequestsPerMinute, Some(3));
        let p = EffectivePolicy::merge(base, Some(&add));
        let (mut m, mut r) = (Account::default(), Account::default());
        let used: Vec<bool> = (0..5)
            .map(|_| admit(&mut m, &mut r, &p, &req(None, None), T0))
            .map(|d| {
                assert!(d.allowed());
                d.used_replenishment
            })
            .collect();
        assert_eq!(used, [false, false, true, true, true]);
        let d = admit(&mut m, &mut r, &p, &req(None, None), T0);
        assert_eq!(d.reason(), "requests_per_minute");
        // 5 per minute: one is back every 12 s.
        assert_eq!((d.retry_after, d.retry_after_ms), (12, 12_000));
    }

    #[test]
    fn tokens_per_minute_counts_a_reservation_at_once_and_the_commit_settles_it() {
        let p = policy(&[(LimitField::TokensPerMinute, 1_000)]);
        let (mut m, mut r) = (Account::default(), Account::default());
        let d = admit(&mut m, &mut r, &p, &req(Some(600), Some("a")), T0);
        assert_eq!((d.reserved, d.remaining_tokens), (600, 400));
        // Only what is left is reserved.
        let d = admit(&mut m, &mut r, &p, &req(Some(600), Some("b")), T0);
        assert_eq!((d.reserved, d.remaining_tokens), (400, 0));
        let d = admit(&mut m, &mut r, &p, &req(None, None), T0);
        assert_eq!(d.reason(), "tokens_per_minute");
        assert_eq!(d.retry_after_ms, 60);
        // "a" used 100 of its 600: 500 come back; "b" used 700 of its 400: 300 more.
        let settle = |m: &mut Account, r: &mut Account, tokens, lease| {
            let before = m.rates().copied();
            let out = m.commit(tokens, Some(lease), T0).unwrap();
            let e = Effect::committed(
                T0,
                false,
                tokens,
                Some(lease),
                &out,
                rates_change(before, m),
            );
            Effect::decode(&e.unwrap().encode())
                .unwrap()
                .apply(r)
                .unwrap();
            assert_eq!(r, m);
        };
        settle(&mut m, &mut r, 100, "a");
        assert_eq!(m.usage(T0).rates, [0, 0, 500]);
        settle(&mut m, &mut r, 700, "b");
        assert_eq!(m.usage(T0).rates, [0, 0, 800]);
        // A commit without a lease counts all its tokens.
        let out = m.commit(50, None, T0).unwrap();
        assert_eq!(out.balance_debit, 0);
        assert_eq!(m.usage(T0).rates, [0, 0, 850]);
        assert_eq!(m.usage(T0 + 30_000).rates, [0, 0, 350]);
    }

    #[test]
    fn a_release_gives_the_rates_back() {
        let p = policy(&[
            (LimitField::RequestsPerSecond, 1),
            (LimitField::TokensPerMinute, 100),
        ]);
        let (mut m, mut r) = (Account::default(), Account::default());
        assert!(admit(&mut m, &mut r, &p, &req(Some(40), Some("x")), T0).allowed());
        assert!(!admit(&mut m, &mut r, &p, &req(None, None), T0).allowed());
        let before = m.rates().copied();
        assert!(m.release("x", T0));
        let rates = rates_change(before, &m);
        let e = Effect::released(T0, false, "x", true, rates).unwrap();
        Effect::decode(&e.encode()).unwrap().apply(&mut r).unwrap();
        assert_eq!(r, m);
        assert_eq!(m.usage(T0).rates, [0, 0, 0]);
        assert!(admit(&mut m, &mut r, &p, &req(None, None), T0).allowed());
    }

    #[test]
    fn a_rate_of_zero_never_admits_and_retry_after_says_never() {
        let p = policy(&[(LimitField::RequestsPerSecond, 0)]);
        let (mut m, mut r) = (Account::default(), Account::default());
        let d = admit(&mut m, &mut r, &p, &req(None, None), T0);
        assert_eq!(
            (d.allowed(), d.retry_after, d.retry_after_ms),
            (false, -1, -1)
        );
        assert!(m.rates().is_none());
    }

    #[test]
    fn the_state_is_checked_on_load_and_older_encodings_still_load() {
        let p = policy(&[(LimitField::RequestsPerSecond, 3)]);
        let (mut m, mut r) = (Account::default(), Account::default());
        admit(&mut m, &mut r, &p, &req(None, None), T0);
        let bytes = m.encode();
        assert_eq!(bytes[0], super::super::codec::ENCODING_VERSION_RATES);
        // The rate's `per` is the last byte: 0 is a state without a rate.
        let mut bad = bytes.clone();
        if let Some(last) = bad.last_mut() {
            *last = 0;
        }
        assert!(Account::decode(&bad).is_err());
        // Without its rates part (mask 0) the state is refused too: it would be an empty part.
        let mut section = Vec::new();
        m.rates().unwrap().encode(|b| section.push(b));
        let mut empty = bytes[..bytes.len() - section.len()].to_vec();
        empty.push(0);
        assert!(Account::decode(&empty).is_err());
        // The same state without rates, as an older build wrote it, loads as before.
        let mut old = m.clone();
        old.set_rates(None);
        assert_eq!(
            old.encode()[0],
            super::super::codec::ENCODING_VERSION_LEDGER
        );
        assert_eq!(Account::decode(&old.encode()), Ok(old));
    }
}
