//! The pure core of redis-quota: identities, credits, policies, UTC windows, account state,
//! the admission decision and the credits cache as a data structure.
//!
//! Nothing in here knows Redis or PostgreSQL, and nothing reads the clock: every function that
//! depends on time takes `now` as an argument. The shells (`commands`, `store`, `worker`) call in.

pub(crate) mod account;
pub(crate) mod cache;
pub(crate) mod credit;
pub(crate) mod credit_memo;
pub(crate) mod decide;
pub(crate) mod effect;
pub(crate) mod ids;
pub(crate) mod ledger;
pub(crate) mod policy;
pub(crate) mod rate;
pub(crate) mod varint;
pub(crate) mod window;

/// Milliseconds since the Unix epoch, the one time unit the core works in.
pub(crate) type Millis = i64;

/// A seeded xorshift generator for randomized tests: `next(n)` is below `n`.
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = seed;
    move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    }
}
