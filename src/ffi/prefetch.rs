//! A speed trick: asking the CPU for an account's memory before it is read, so that the cache
//! misses of a key's value, its optional part (leases, ledger) and the line its next lease
//! goes to overlap with the work done before the decision (the policy and credit lookups)
//! instead of stalling it.
//!
//! What it buys (`make bench` shapes, each build against the same build without it, rounds
//! interleaved; slower-without ratios, 2026-12-06): the one-rate `ADMIT POLICY` 1.01, 1.04 and
//! 1.05 in three sessions, the 4-limit `ADMIT POLICY` 1.42, 1.02 and 1.03-1.12 (the last session
//! measured the command's own time with one pipelining client, which this shared machine
//! disturbs least). The gain grows with the number of account keys (the bench's 10,000 fit
//! the CPU's caches far better than a production node's millions). It costs the 4-byte
//! `LeaseLine` hint in every account key and the addresses `core::account` hands out
//! (`extra_address`, `ledger_address`, `lease_tail_address`), never read through. Removing it
//! is deleting this file and its calls in `account_type`.

/// A cache line's address as a 64-byte line number.
const LINE_SHIFT: u32 = 6;

/// Asks the CPU to bring the line at `at` into its caches; does nothing else.
#[inline]
pub(super) fn prefetch(at: Option<*const u8>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(at) = at {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // A prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The cache line an account's next lease goes to (`Account::lease_tail_address`), in lines
/// from the line of the value that keeps it, as of the last change; 0 when unknown. Only ever
/// prefetched, never read: a stale line costs a useless prefetch, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LeaseLine(i32);

impl LeaseLine {
    /// Not known (a new or loaded value).
    pub(super) const UNKNOWN: LeaseLine = LeaseLine(0);

    /// The line of `tail` as seen from the value at `here`.
    pub(super) fn of(here: *const u8, tail: Option<*const u8>) -> LeaseLine {
        let here = here as usize >> LINE_SHIFT;
        LeaseLine(tail.map_or(0, |at| {
            let line = at as usize >> LINE_SHIFT;
            i32::try_from(line.wrapping_sub(here) as isize).unwrap_or(0)
        }))
    }

    /// The line's address, for the value at `here`.
    pub(super) fn address(self, here: *const u8) -> Option<*const u8> {
        if self.0 == 0 {
            return None;
        }
        let line = (here as usize >> LINE_SHIFT).wrapping_add_signed(self.0 as isize);
        Some((line << LINE_SHIFT) as *const u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_line_points_back_to_its_line_from_the_value() {
        let buf = [0u8; 1024];
        let here = buf.as_ptr();
        let tail = here.wrapping_add(300);
        let line = LeaseLine::of(here, Some(tail));
        let at = line.address(here).map(|a| a as usize);
        assert_eq!(at, Some((tail as usize >> LINE_SHIFT) << LINE_SHIFT));
        assert_eq!(LeaseLine::of(here, None), LeaseLine::UNKNOWN);
        assert_eq!(LeaseLine::UNKNOWN.address(here), None);
    }
}
