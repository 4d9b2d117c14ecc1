//! Whether PostgreSQL is worth waiting for. Without `quota.pg-url` there is nothing to wait for.
//! After a load fails for PostgreSQL being unreachable, or a client's wait on it runs out, it is
//! taken as down for a second: a cache miss is then answered at once without it
//! (`Lookup::Unavailable`: an admission decides on its base policy), and after that second one
//! load probes it while the other misses still answer at once, until one succeeds.
//!
//! So a cold miss never blocks its client on a PostgreSQL known to be down: a pipeline of cold
//! misses is answered at Redis speed (a blocked client costs Redis a copy of its unread input),
//! and a stalled PostgreSQL costs one wait, not one per command. Any thread.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::core::Millis;

/// How long PostgreSQL is taken as down after a failure before a load probes it again.
pub(crate) const DOWN_FOR_MS: Millis = 1000;

/// A store is configured (`quota.pg-url` set and valid).
static CONFIGURED: AtomicBool = AtomicBool::new(false);
/// Until when PostgreSQL is taken as down (ms); 0 when it is not.
static DOWN_UNTIL: AtomicI64 = AtomicI64::new(0);
/// A load is probing a PostgreSQL taken as down.
static PROBING: AtomicBool = AtomicBool::new(false);

/// Whether a store is configured (set when the store is built).
pub(crate) fn set_configured(configured: bool) {
    CONFIGURED.store(configured, Ordering::Release);
    answered();
}

/// Whether a load may start (or be waited on) now. While PostgreSQL is taken as down, no; once
/// the second is over, yes for one caller (the probe), no for the others until it answers.
pub(crate) fn may_load(now: Millis) -> bool {
    if !CONFIGURED.load(Ordering::Acquire) {
        return false;
    }
    let until = DOWN_UNTIL.load(Ordering::Acquire);
    if until == 0 {
        return true;
    }
    if now < until {
        return false;
    }
    PROBING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// PostgreSQL could not be reached, or did not answer in time.
pub(crate) fn failed(now: Millis) {
    DOWN_UNTIL.store(now.saturating_add(DOWN_FOR_MS).max(1), Ordering::Release);
    PROBING.store(false, Ordering::Release);
}

/// PostgreSQL answered.
pub(crate) fn answered() {
    if DOWN_UNTIL.load(Ordering::Acquire) != 0 {
        DOWN_UNTIL.store(0, Ordering::Release);
    }
    PROBING.store(false, Ordering::Release);
}

/// The load that may have been the probe was never run (the queue was full): the next miss
/// probes instead, so that PostgreSQL is never taken as down for good.
pub(crate) fn not_probed() {
    PROBING.store(false, Ordering::Release);
}

/// Whether PostgreSQL is taken as down at `now`.
pub(crate) fn is_down(now: Millis) -> bool {
    let until = DOWN_UNTIL.load(Ordering::Acquire);
    until != 0 && now < until
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for the whole state machine: the statics are shared by the process.
    #[test]
    fn down_for_a_second_then_one_probe() {
        set_configured(false);
        assert!(!may_load(0), "nothing to wait for without a store");
        set_configured(true);
        assert!(may_load(0) && may_load(0));
        failed(1_000);
        assert!(is_down(1_500) && !may_load(1_500));
        assert!(may_load(2_000), "the probe");
        assert!(!may_load(2_001), "the others while it probes");
        failed(2_500);
        assert!(!may_load(3_000));
        assert!(may_load(3_500));
        answered();
        assert!(!is_down(3_600) && may_load(3_600) && may_load(3_600));
        failed(4_000);
        assert!(may_load(5_000), "the probe");
        not_probed();
        assert!(may_load(5_001), "a probe that never ran is taken again");
        assert!(!may_load(5_002), "the others while it probes");
        answered();
    }
}
