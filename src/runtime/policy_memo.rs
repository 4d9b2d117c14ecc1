//! A speed trick: the main thread remembers the last few named policies it read from fresh
//! policy-cache entries, so that an admission under a named policy (`ADMIT ... POLICY name`)
//! skips building the policy's key, the policy cache's lock and its lookup.
//!
//! What it buys (`make bench` shapes, each build against the same build without it, rounds
//! interleaved; slower-without ratios, 2026-12-06): the one-rate `ADMIT POLICY` 0.99, 0.97 and
//! 1.08-1.10 in three sessions, the 4-limit `ADMIT POLICY` 1.15, 1.02 and 1.06-1.14 (the last
//! session measured the command's own time with one pipelining client, which this shared
//! machine disturbs least). It costs four slots of memory and the rule that a memo is used only
//! while the policy cache's epoch has not moved (any change to that cache retires them all)
//! and for at most a second. Removing it is deleting this file and its two calls in
//! `runtime::gather`.

use crate::core::ids::PolicyId;
use crate::core::policy::CachedPolicy;
use crate::core::Millis;

/// Longest a remembered policy is used without asking the cache (keeps its LRU order honest).
const POLICY_MEMO_MAX_MS: Millis = 1000;
/// Policies remembered at once (a deployment has a few tiers).
const POLICY_MEMO_SLOTS: usize = 4;

/// A policy read from a fresh cache entry, remembered by the main thread so that an admission
/// under a named policy skips the key, the lock and the lookup.
struct PolicyMemo {
    /// `tenant \0 project \0 name` (ids never contain NUL).
    ids: Box<[u8]>,
    found: CachedPolicy,
    epoch: u64,
    until: Millis,
}

impl PolicyMemo {
    fn is(&self, id: &PolicyId<'_>) -> bool {
        let (t, p, n) = (id.tenant.len(), id.project.len(), id.name.len());
        self.ids.len() == t + p + n + 2
            && self.ids.get(..t) == Some(id.tenant.as_bytes())
            && self.ids.get(t + 1..t + 1 + p) == Some(id.project.as_bytes())
            && self.ids.get(t + p + 2..) == Some(id.name.as_bytes())
    }
}

thread_local! {
    static POLICY_MEMOS: std::cell::RefCell<(usize, [Option<PolicyMemo>; POLICY_MEMO_SLOTS])> =
        const { std::cell::RefCell::new((0, [None, None, None, None])) };
}

/// The policy remembered for `id`, if the policy cache has not changed since and its entry is
/// still fresh (what a lookup would answer, without the lookup).
pub(crate) fn remembered_policy(id: &PolicyId<'_>, now: Millis) -> Option<CachedPolicy> {
    let epoch = super::cache::policy_epoch();
    POLICY_MEMOS.with(|memos| {
        let memos = memos.try_borrow().ok()?;
        memos
            .1
            .iter()
            .flatten()
            .find(|m| m.epoch == epoch && now < m.until && m.is(id))
            .map(|m| m.found)
    })
}

/// Remembers what a fresh policy-cache entry held at `epoch` (see `remembered_policy`).
pub(crate) fn remember_policy(
    id: &PolicyId<'_>,
    found: CachedPolicy,
    epoch: u64,
    fresh_until: Millis,
    now: Millis,
) {
    let mut ids = Vec::with_capacity(id.tenant.len() + id.project.len() + id.name.len() + 2);
    ids.extend_from_slice(id.tenant.as_bytes());
    ids.push(0);
    ids.extend_from_slice(id.project.as_bytes());
    ids.push(0);
    ids.extend_from_slice(id.name.as_bytes());
    let memo = PolicyMemo {
        ids: ids.into(),
        found,
        epoch,
        until: fresh_until.min(now.saturating_add(POLICY_MEMO_MAX_MS)),
    };
    POLICY_MEMOS.with(|memos| {
        if let Ok(mut memos) = memos.try_borrow_mut() {
            let (next, slots) = &mut *memos;
            let at = slots
                .iter()
                .position(|m| m.as_ref().is_some_and(|m| m.is(id)))
                .unwrap_or(*next % POLICY_MEMO_SLOTS);
            if let Some(slot) = slots.get_mut(at) {
                *slot = Some(memo);
            }
            *next = next.wrapping_add(1);
        }
    });
}
