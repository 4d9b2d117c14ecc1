//! The clock and the lease-id generator: the only places the module reads the time.

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::stats::MainCounter;
use crate::core::Millis;
use crate::ffi::ctx::Ctx;

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time of the command `ctx` runs, taken when it starts: Redis's own time for the command
/// where Redis gives one (7.2 and later: no system call, see `Ctx::command_time_ms`), else
/// the wall clock. Only at the start of a command.
pub(crate) fn command_now_ms(ctx: Ctx) -> Millis {
    ctx.command_time_ms().unwrap_or_else(now_ms)
}

static LEASE_SEED: LazyLock<u64> = LazyLock::new(|| {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
});
/// Only moved with Redis's lock held (commands and the command filter), never by two threads
/// at once: a `MainCounter`, without a locked add.
static LEASE_COUNTER: MainCounter = MainCounter::new();

/// A new lease id, unique across this process and (by its seed) across restarts.
pub(crate) fn new_lease_id() -> u64 {
    let n = LEASE_COUNTER.take_next();
    // SplitMix64 over seed + counter: distinct counters give distinct ids.
    let mut z = LEASE_SEED.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
