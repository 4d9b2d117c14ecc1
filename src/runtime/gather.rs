//! The gather step of every command that reads the caches: everything its decision needs
//! (a named policy, a user's credit rows) from the caches, or one wait on one load job that
//! fetches what is missing together.
//!
//! The sequence "look up; fresh, stale, unavailable or missing; may the client wait; block it;
//! add the waiter; release the locks; submit the load" exists here and nowhere else. A client
//! that waits on both a policy and credits waits once: its `Waiter` sits in both caches'
//! flights and the client is answered when the last of them lands (or at once when one cannot
//! be loaded), with what each brought.
//!
//! When both locks are held, the policy cache's is taken first; nothing takes the policy
//! cache's lock while holding the credits cache's.

use std::sync::Arc;

use super::cache;
use super::config;
use super::jobs::{CreditLoad, Done, LoadJob, Waiter};
use super::policy_memo::{remember_policy, remembered_policy};
use super::worker;
use crate::core::cache::{Lookup, UserCredits};
use crate::core::ids::{OwnedPolicy, OwnedUser, PolicyId, UserId};
use crate::core::policy::{CachedPolicy, Limits};
use crate::core::Millis;
use crate::ffi::blocked::{Blocked, Resumable};
use crate::ffi::ctx::Ctx;

/// Whether a gather may block its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitMode {
    /// A fresh command: on a miss, block the client until what is missing is loaded. Where it
    /// cannot wait (MULTI, scripts) the miss is reported and the load runs for the next call.
    Block,
    /// The client waited once already: only what is cached; a miss loads for the next call.
    Never,
}

/// What a command needs from the caches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Needs<'a> {
    pub policy: Option<PolicyId<'a>>,
    /// A user's credits, with the user's cache key.
    pub credits: Option<(&'a [u8], UserId<'a>)>,
}

/// What the gather found of a named policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyFound {
    /// None was asked for.
    NotAsked,
    Limits(Limits),
    NoSuchPolicy,
    /// Not cached, and PostgreSQL is unavailable.
    Unavailable,
    /// Not cached; it is loading (for the next call when the client did not wait).
    Missing,
}

impl PolicyFound {
    fn of(found: CachedPolicy) -> PolicyFound {
        found.map_or(PolicyFound::NoSuchPolicy, PolicyFound::Limits)
    }
}

/// What the gather found of a user's credits.
#[derive(Debug, Clone)]
pub(crate) enum CreditsFound {
    /// None were asked for (or the gather stopped at the policy).
    NotAsked,
    /// Rows from a fresh entry: fresh until `fresh_until`, read at cache epoch `epoch`.
    Fresh {
        rows: UserCredits,
        epoch: u64,
        fresh_until: Millis,
    },
    /// Rows past their freshness (a refresh is on its way).
    Stale(UserCredits),
    /// Not cached, and PostgreSQL is unavailable.
    Unavailable,
    /// Not cached; it is loading (for the next call when the client did not wait).
    Missing,
}

/// What a gather ended in.
pub(crate) enum Gathered {
    /// Everything asked for, as far as the caches know it.
    Ready(PolicyFound, CreditsFound),
    /// The client waits for the load: its request's `resume` replies.
    Waiting,
    /// The client had to wait and Redis refused to block it.
    CannotBlock,
}

/// Gathers `needs`: the named policy first (a policy that is not there ends the gather), then
/// the credits. With `WaitMode::Block`, a miss blocks the client with the request `request`
/// builds (given the policy's limits when they were found before the wait) on one load job.
pub(crate) fn gather<R: Resumable<Outcome = Done>>(
    ctx: Ctx,
    needs: Needs<'_>,
    mode: WaitMode,
    now: Millis,
    request: impl FnOnce(Option<Limits>) -> R,
) -> Gathered {
    let may_wait = mode == WaitMode::Block && ctx.can_block();
    let mut job = LoadJob::default();
    // The policy: the main thread's memo, else the policy cache.
    let mut policies = None;
    let mut policy = PolicyFound::NotAsked;
    if let Some(id) = needs.policy {
        policy = match remembered_policy(&id, now) {
            Some(found) => PolicyFound::of(found),
            None => {
                let key = id.key();
                let guard = policies.insert(cache::policies());
                let epoch = guard.epoch();
                match guard.find(&key, now) {
                    Lookup::Fresh(found, fresh_until) => {
                        remember_policy(&id, *found, epoch, fresh_until, now);
                        PolicyFound::of(*found)
                    }
                    Lookup::Stale { rows, refresh } => {
                        job.policy = refresh.map(|flight| (OwnedPolicy::from_id(&id), flight));
                        PolicyFound::of(*rows)
                    }
                    Lookup::Unavailable => PolicyFound::Unavailable,
                    Lookup::Miss { load } => {
                        job.policy = load.map(|flight| (OwnedPolicy::from_id(&id), flight));
                        PolicyFound::Missing
                    }
                }
            }
        };
    }
    let policy_missing = policy == PolicyFound::Missing;
    let go_on = match policy {
        PolicyFound::NotAsked | PolicyFound::Limits(_) => true,
        PolicyFound::Missing => may_wait,
        _ => false,
    };
    if !policy_missing {
        policies = None; // released before the credits' lock (or when nothing waits on it)
    }
    // The credits.
    let mut credits_lock = None;
    let mut credits = CreditsFound::NotAsked;
    if let (true, Some((user_key, user))) = (go_on, needs.credits) {
        let guard = credits_lock.insert(cache::cache());
        let epoch = guard.epoch();
        let load = |flight| CreditLoad {
            key: user_key.into(),
            user: OwnedUser::from_id(&user),
            flight,
        };
        credits = match guard.find(user_key, now) {
            Lookup::Fresh(rows, fresh_until) => CreditsFound::Fresh {
                rows: Arc::clone(rows),
                epoch,
                fresh_until,
            },
            Lookup::Stale { rows, refresh } => {
                job.credits = refresh.map(load);
                CreditsFound::Stale(Arc::clone(rows))
            }
            Lookup::Unavailable => CreditsFound::Unavailable,
            Lookup::Miss { load: flight } => {
                job.credits = flight.map(load);
                CreditsFound::Missing
            }
        };
        if !matches!(credits, CreditsFound::Missing) {
            credits_lock = None;
        }
    }
    let credits_missing = matches!(credits, CreditsFound::Missing);
    let outcome = if may_wait && (policy_missing || credits_missing) {
        let known = match policy {
            PolicyFound::Limits(limits) => Some(limits),
            _ => None,
        };
        match Blocked::block(ctx, config::block_timeout_ms(), request(known)) {
            Some(client) => {
                let waiter = Waiter::new(client, policy_missing, credits_missing);
                if let (Some(guard), Some(id)) = (policies.as_mut(), needs.policy) {
                    if let Err(w) = guard.add_waiter(&id.key(), waiter.clone()) {
                        w.abort(Done::Dropped);
                    }
                }
                if let (Some(guard), Some((user_key, _))) = (credits_lock.as_mut(), needs.credits) {
                    if let Err(w) = guard.add_waiter(user_key, waiter) {
                        w.abort(Done::Dropped);
                    }
                }
                Gathered::Waiting
            }
            None => Gathered::CannotBlock,
        }
    } else {
        Gathered::Ready(policy, credits)
    };
    drop(credits_lock);
    drop(policies);
    if job.policy.is_some() || job.credits.is_some() {
        worker::submit_load(job);
    }
    outcome
}
