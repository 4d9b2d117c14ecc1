//! Smooth rates (`REQUESTS_PER_SECOND`, `REQUESTS_PER_MINUTE`, `TOKENS_PER_MINUTE`): a token
//! bucket in integers, equivalent to GCRA.
//!
//! A rate of `n` per period of `P` ms keeps a level in units where one request (or token)
//! weighs `P`: an admission adds `cost × P`, the level drains by `n` every ms, and it may hold
//! at most `n × P`. A full bucket therefore admits a burst of `n`, and refills continuously:
//! half a period after a burst, half of `n` is back (there are no window edges). Changing `n`
//! (a credit) changes only how fast the level drains and how much it may hold, never the
//! level, so credits add to a rate exactly as they add to a window. No floats: every wait is
//! rounded up to a whole ms. Pure: time is passed in.

use super::policy::RATES;
use super::varint::{take_u64, unzigzag, write_u64, zigzag, VarintError};
use super::window::LAST_MS;
use super::Millis;

/// One rate's state: its level at `at`, and the rate it last drained at (`per`, per period;
/// 0 marks a rate without state). A replica or a restart never needs a clock to read it: the
/// level at any later instant follows from these three numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RateState {
    /// Requests (or tokens) × the period in ms, as of `at`.
    pub level: u64,
    /// When the level was last set (ms since the epoch).
    pub at: Millis,
    /// The rate (per period) of the admission that last set it: what commits and releases,
    /// which know no policy, drain at, and what retention reckons with.
    pub per: u64,
}

/// The state of the three rates of an account, in `LimitField::RATES` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rates(pub [RateState; RATES]);

/// Why a rate denies, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// It admits now.
    None,
    /// It admits in this many ms (at least 1).
    Ms(i64),
    /// It never admits this cost (a rate of 0, or a cost above the burst).
    Never,
}

/// The most a bucket of `n` per `period` ms holds (saturating: such a rate never binds).
#[inline]
pub(crate) fn capacity(n: u64, period: i64) -> u64 {
    let cap = u128::from(n) * period.unsigned_abs() as u128;
    u64::try_from(cap).unwrap_or(u64::MAX)
}

/// `amount × period`, saturating.
#[inline]
pub(crate) fn weight(amount: u64, period: i64) -> u64 {
    capacity(amount, period)
}

impl RateState {
    /// Whether this rate has state.
    #[inline]
    pub(crate) fn is_set(&self) -> bool {
        self.per != 0
    }

    /// The level at `now` when it drains at `n` per period (a clock set back drains nothing).
    #[inline]
    pub(crate) fn level_at(&self, n: u64, now: Millis) -> u64 {
        let elapsed = now.saturating_sub(self.at).max(0) as u64;
        let drained = u128::from(elapsed) * u128::from(n);
        u64::try_from(u128::from(self.level).saturating_sub(drained)).unwrap_or(0)
    }

    /// Adds `amount` at `now` to a rate of `n` per `period` ms, draining first.
    pub(crate) fn charge(&mut self, n: u64, period: i64, now: Millis, amount: u64) {
        let level = self.level_at(n, now);
        self.level = level.saturating_add(weight(amount, period));
        self.at = self.at.max(now);
        self.per = n;
    }

    /// Takes `amount` back at `now` (a release, or a commit below its reservation), draining
    /// at the stored rate first; nothing without state.
    pub(crate) fn refund(&mut self, period: i64, now: Millis, amount: u64) {
        if !self.is_set() {
            return;
        }
        let level = self.level_at(self.per, now);
        self.level = level.saturating_sub(weight(amount, period));
        self.at = self.at.max(now);
    }

    /// Adds `amount` at `now` at the stored rate (a commit beyond its reservation); nothing
    /// without state.
    pub(crate) fn add(&mut self, period: i64, now: Millis, amount: u64) {
        if self.is_set() {
            let per = self.per;
            self.charge(per, period, now, amount);
        }
    }

    /// When the level is back to zero at the stored rate (0 without state).
    pub(crate) fn drained_by(&self) -> Millis {
        if !self.is_set() {
            return 0;
        }
        let ms = self.level.div_ceil(self.per);
        self.at
            .saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
            .min(LAST_MS)
    }
}

/// Whether a rate of `n` per `period` ms at level `level` admits `cost` now, else how long
/// until it does.
#[inline]
pub(crate) fn wait(level: u64, n: u64, period: i64, cost: u64) -> Wait {
    let cap = u128::from(capacity(n, period));
    let need = u128::from(weight(cost, period));
    if n == 0 || need > cap {
        return Wait::Never;
    }
    let after = u128::from(level) + need;
    if after <= cap {
        return Wait::None;
    }
    let ms = (after - cap).div_ceil(u128::from(n));
    Wait::Ms(i64::try_from(ms).unwrap_or(i64::MAX).max(1))
}

/// Whole requests (or tokens) a rate of `n` per `period` ms at level `level` admits now.
#[inline]
pub(crate) fn available(level: u64, n: u64, period: i64) -> u64 {
    capacity(n, period).saturating_sub(level) / period.unsigned_abs().max(1)
}

/// Whole requests (or tokens) a level counts, rounded up (what usage shows).
pub(crate) fn used(level: u64, period: i64) -> u64 {
    level.div_ceil(period.unsigned_abs().max(1))
}

impl Rates {
    /// Whether no rate has state.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|r| !r.is_set())
    }

    /// When every level is back to zero (0 when none has state).
    pub(crate) fn drained_by(&self) -> Millis {
        self.0.iter().map(RateState::drained_by).max().unwrap_or(0)
    }
}

/// The mask bits a rates encoding may set (one per rate).
const RATE_MASK: u8 = (1 << RATES) - 1;

impl Rates {
    /// Appends the encoding (state and effects alike): a mask of the rates with state, then
    /// each one's level, `at` (zigzag) and rate as varints. An empty `Rates` is the mask 0.
    pub(crate) fn encode(&self, mut push: impl FnMut(u8)) {
        let mask = self
            .0
            .iter()
            .enumerate()
            .fold(0u8, |m, (i, r)| m | (u8::from(r.is_set()) << i));
        push(mask);
        for r in self.0.iter().filter(|r| r.is_set()) {
            write_u64(r.level, &mut push);
            write_u64(zigzag(r.at), &mut push);
            write_u64(r.per, &mut push);
        }
    }

    /// Reads what `encode` wrote from the front of `buf`: `Err` names the problem. Numbers must
    /// be in their shortest form, a rate with state has a rate above 0 and an `at` within
    /// the range windows are kept for, so that every state has one encoding.
    pub(crate) fn decode(buf: &mut &[u8]) -> Result<Rates, &'static str> {
        let (mask, rest) = buf.split_first().ok_or("truncated")?;
        *buf = rest;
        if mask & !RATE_MASK != 0 {
            return Err("unknown rate in the rates' mask");
        }
        let mut next = || match take_u64(buf) {
            Ok((v, true)) => Ok(v),
            Ok((_, false)) => Err("a number not in its shortest form"),
            Err(VarintError::Truncated) => Err("truncated"),
            Err(_) => Err("number too large"),
        };
        let mut out = Rates::default();
        for (i, state) in out.0.iter_mut().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            *state = RateState {
                level: next()?,
                at: unzigzag(next()?),
                per: next()?,
            };
            if state.per == 0 {
                return Err("a rate's state without a rate");
            }
            if !(0..=LAST_MS).contains(&state.at) {
                return Err("a rate's time out of range");
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000;

    /// Admits `cost` at `now` if the rate allows it.
    fn try_admit(s: &mut RateState, n: u64, now: Millis, cost: u64) -> Wait {
        let w = wait(s.level_at(n, now), n, SECOND, cost);
        if w == Wait::None {
            s.charge(n, SECOND, now, cost);
        }
        w
    }

    fn burst(s: &mut RateState, n: u64, now: Millis) -> u64 {
        let mut admitted = 0;
        while try_admit(s, n, now, 1) == Wait::None {
            admitted += 1;
            assert!(admitted <= n, "admitted more than the burst");
        }
        admitted
    }

    #[test]
    fn a_full_bucket_admits_the_burst_and_half_a_period_later_half_is_back() {
        let mut s = RateState::default();
        assert_eq!(burst(&mut s, 10, 5_000), 10);
        assert_eq!(burst(&mut s, 10, 5_000 + 500), 5);
        assert_eq!(burst(&mut s, 10, 5_000 + 500 + 1_000), 10);
        // A rate of 3 per second: one every 333.3 ms.
        let mut s = RateState::default();
        assert_eq!(burst(&mut s, 3, 0), 3);
        assert_eq!(burst(&mut s, 3, 333), 0);
        assert_eq!(burst(&mut s, 3, 334), 1);
    }

    #[test]
    fn the_wait_is_exact_to_the_ms_and_honoured() {
        let mut s = RateState::default();
        burst(&mut s, 4, 1_000);
        let Wait::Ms(ms) = try_admit(&mut s, 4, 1_000, 1) else {
            panic!("not a wait");
        };
        assert_eq!(ms, 250);
        assert!(matches!(
            try_admit(&mut s, 4, 1_000 + ms - 1, 1),
            Wait::Ms(1)
        ));
        assert_eq!(try_admit(&mut s, 4, 1_000 + ms, 1), Wait::None);
        // A cost of 3 waits for three to drain.
        let mut s = RateState::default();
        burst(&mut s, 4, 0);
        assert_eq!(try_admit(&mut s, 4, 0, 3), Wait::Ms(750));
    }

    #[test]
    fn a_rate_of_zero_or_a_cost_above_the_burst_never_admits_and_a_free_probe_always_does() {
        let s = RateState::default();
        assert_eq!(wait(0, 0, SECOND, 1), Wait::Never);
        assert_eq!(wait(0, 0, SECOND, 0), Wait::Never);
        assert_eq!(wait(0, 5, SECOND, 6), Wait::Never);
        assert_eq!(wait(s.level, 5, SECOND, 5), Wait::None);
        assert_eq!(wait(capacity(5, SECOND), 5, SECOND, 0), Wait::None);
    }

    #[test]
    fn a_credit_raises_the_rate_without_touching_the_level() {
        let mut s = RateState::default();
        assert_eq!(burst(&mut s, 2, 0), 2);
        // A credit of 8 more per second: 8 more right away, and it refills at 10.
        assert_eq!(burst(&mut s, 10, 0), 8);
        assert_eq!(burst(&mut s, 10, 100), 1);
    }

    #[test]
    fn refunds_commits_and_retention_use_the_stored_rate() {
        let mut s = RateState::default();
        s.refund(SECOND, 0, 1);
        assert_eq!(s, RateState::default(), "no state, nothing refunded");
        s.charge(100, 60_000, 0, 50);
        assert_eq!(used(s.level_at(100, 0), 60_000), 50);
        s.add(60_000, 0, 25);
        assert_eq!(used(s.level, 60_000), 75);
        s.refund(60_000, 0, 100);
        assert_eq!(s.level, 0);
        s.add(60_000, 1_000, 10);
        // 10 tokens at 100 per minute drain in 6 s.
        assert_eq!(s.drained_by(), 7_000);
        assert_eq!(available(s.level_at(100, 1_000), 100, 60_000), 90);
        // A clock set back drains nothing and never moves `at` back.
        assert_eq!(s.level_at(100, 0), s.level);
        s.charge(100, 60_000, 500, 0);
        assert_eq!(s.at, 1_000);
    }

    #[test]
    fn huge_rates_and_amounts_saturate_instead_of_overflowing() {
        let mut s = RateState::default();
        s.charge(u64::MAX, 60_000, LAST_MS, u64::MAX);
        assert_eq!(s.level, u64::MAX);
        assert_eq!(wait(0, u64::MAX, 60_000, 1), Wait::None);
        assert_eq!(s.level_at(u64::MAX, LAST_MS + 1), 0);
        assert_eq!(available(0, u64::MAX, 60_000), u64::MAX / 60_000);
        assert_eq!(s.drained_by(), LAST_MS);
        assert_eq!(wait(u64::MAX, 1, SECOND, 1), Wait::Ms(i64::MAX));
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_what_it_never_writes() {
        let mut rates = Rates::default();
        let mut bytes = Vec::new();
        rates.encode(|b| bytes.push(b));
        assert_eq!(bytes, [0]);
        rates.0[2].charge(7, 60_000, 1_700_000_000_000, 3);
        rates.0[0].charge(u64::MAX, 1_000, LAST_MS, u64::MAX);
        let mut bytes = Vec::new();
        rates.encode(|b| bytes.push(b));
        assert_eq!(Rates::decode(&mut &bytes[..]), Ok(rates));
        for bad in [&[8u8][..], &[1, 0, 0, 0], &[1, 1], &[1, 0x80, 0, 0, 1], &[]] {
            assert!(Rates::decode(&mut &bad[..]).is_err(), "{bad:?}");
        }
        // An `at` past the range windows are kept for.
        let mut bytes = vec![1, 1];
        write_u64(zigzag(LAST_MS + 1), |b| bytes.push(b));
        bytes.push(1);
        assert!(Rates::decode(&mut &bytes[..]).is_err());
    }

    #[test]
    fn random_admissions_never_exceed_n_plus_rate_times_elapsed() {
        let mut rng = crate::core::test_rng(22);
        for _ in 0..200 {
            let n = 1 + rng(50);
            let mut s = RateState::default();
            let (mut now, mut admitted) = (0i64, 0u64);
            for _ in 0..500 {
                now += rng(200) as i64;
                if try_admit(&mut s, n, now, 1) == Wait::None {
                    admitted += 1;
                }
                // Never more than a burst plus what refilled since the start.
                assert!(admitted <= n + (now as u64 * n) / 1000);
            }
        }
    }
}
