//! Jitter for everything that retries against PostgreSQL: the listener's reconnects, the
//! pool's connection attempts, the schema deploy's retries and the ledger's rounds.
//!
//! A fleet of nodes loses PostgreSQL together (a failover, a restart) and would otherwise try
//! again on the same schedule, hitting the server that just came back in waves. Every wait
//! here is drawn at random within bounds, from a generator seeded differently in every process
//! and every user of it. Pure: no clock, no sleeping; the callers wait.

use std::time::Duration;

/// A small random-number generator (xorshift64): plenty for spreading waits, not for secrets.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from the time, the process id and a random hash key: differs between processes
    /// and between generators of one process.
    pub(crate) fn seeded() -> Rng {
        Rng::with_seed(seed())
    }

    pub(crate) fn with_seed(seed: u64) -> Rng {
        // xorshift must not start at zero.
        Rng(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Default for Rng {
    fn default() -> Rng {
        Rng::seeded()
    }
}

/// A seed that differs between processes and between calls (time, process id, a random key).
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A wait in `[step / 2, step]`, placed by `random` (any 64-bit value): "equal jitter", which
/// keeps a floor under the wait (no retry storm) and spreads the rest.
pub(crate) fn jittered(step: Duration, random: u64) -> Duration {
    let half = step / 2;
    half + up_to(step - half, random)
}

/// A wait in `[0, cap]`, placed by `random` (µs resolution).
pub(crate) fn up_to(cap: Duration, random: u64) -> Duration {
    let spread = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(random % spread.saturating_add(1)).min(cap)
}

/// Capped exponential backoff with equal jitter: the step starts at `min` and doubles up to
/// `max`; each wait is drawn from the upper half of the current step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: Rng,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff::with_rng(min, max, Rng::seeded())
    }

    pub(crate) fn with_rng(min: Duration, max: Duration, rng: Rng) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            step: min,
            rng,
        }
    }

    /// The next wait, in `[step / 2, step]`; the step then doubles (up to the cap).
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = jittered(self.step, self.rng.next_u64());
        self.step = (self.step * 2).min(self.max);
        wait
    }

    /// Back to the first step (after a success).
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Every wait within `[lo, hi]`, every tenth of that range hit and none by more than a
/// fifth of the fleet, and (over a wide range) nearly no two nodes alike: no lockstep.
#[cfg(test)]
pub(crate) fn assert_spread(waits: &[u64], lo: u64, hi: u64) {
    let (min, max) = (
        waits.iter().copied().min().unwrap_or(0),
        waits.iter().copied().max().unwrap_or(0),
    );
    assert!(min >= lo && max <= hi, "{min} {max}");
    let mut buckets = [0usize; 10];
    for w in waits {
        buckets[(((w - lo) * 10 / (hi - lo + 1)) as usize).min(9)] += 1;
    }
    let n = waits.len();
    assert!(
        buckets.iter().all(|&b| b > n / 30 && b < n / 5),
        "{buckets:?}"
    );
    // Over a range a thousand times wider than the fleet, two nodes alike are rare.
    if (hi - lo) / 1000 >= n as u64 {
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > n * 99 / 100, "{}", distinct.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_the_upper_half_of_each_step() {
        let step = Duration::from_millis(400);
        assert_eq!(jittered(step, 0), Duration::from_millis(200));
        assert_eq!(jittered(step, 200_000), step);
        assert_eq!(jittered(step, 200_001), Duration::from_millis(200));
        assert_eq!(jittered(Duration::ZERO, u64::MAX), Duration::ZERO);
        assert!(jittered(Duration::from_micros(1), u64::MAX) <= Duration::from_micros(1));
        let max = Duration::from_secs(5);
        for r in [1, 7, u64::MAX, 123_456_789] {
            let w = jittered(max, r);
            assert!(w >= max / 2 && w <= max, "{w:?}");
        }
    }

    #[test]
    fn up_to_stays_within_its_cap() {
        let cap = Duration::from_millis(250);
        assert_eq!(up_to(cap, 0), Duration::ZERO);
        assert_eq!(up_to(cap, 250_000), cap);
        assert_eq!(up_to(Duration::ZERO, u64::MAX), Duration::ZERO);
        let mut rng = Rng::with_seed(7);
        for _ in 0..10_000 {
            assert!(up_to(cap, rng.next_u64()) <= cap);
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_spread() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::with_rng(min, max, Rng::with_seed(42));
        let steps = [100u128, 200, 400, 800, 1600, 3200, 5000, 5000];
        for step in steps {
            let ms = b.next_wait().as_millis();
            assert!(
                ms >= step / 2 && ms <= step,
                "{ms} not in [{}, {step}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_wait() <= min);
        // A fleet: 1000 nodes seeded differently, all at the capped step.
        let waits: Vec<u64> = (0..1000u64)
            .map(|i| {
                let rng = Rng::with_seed(seed() ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut b = Backoff::with_rng(min, max, rng);
                for _ in 0..6 {
                    b.next_wait();
                }
                b.next_wait().as_micros() as u64
            })
            .collect();
        assert_spread(&waits, 2_500_000, 5_000_000);
    }

    #[test]
    fn generators_differ_between_uses() {
        let a: Vec<u64> = (0..4).map(|_| Rng::seeded().next_u64()).collect();
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 4, "{a:?}");
    }
}
