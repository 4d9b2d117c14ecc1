//! The usage ledger's flush: which accounts have unflushed usage, the main-thread snapshot of
//! their batches, the write on a pool thread, and the acknowledgement back into the accounts.
//!
//! Every account key with unflushed usage is on a list (`track`, called when a change gives it
//! some; rebuilt by a scan of the keyspace when the node starts or becomes a master). A timer
//! (`tick`, every 100 ms on the main thread) flushes at least every `quota.flush-interval`
//! seconds: the snapshot copies each listed account's unflushed hours and batch sequence (a
//! read of the key, nothing changes), a pool thread writes them in one transaction per 1,000
//! accounts, and a later tick takes what PostgreSQL has off each account as an effect
//! (`QUOTA.APPLY ... ack`), replicated like every change, so a replica that takes over goes on
//! from the same ledger. A batch whose write failed (or whose answer was lost) is sent again
//! exactly as it was, with the same sequence, until PostgreSQL answers: a batch it had
//! applied is then skipped and acknowledged, never counted twice. Main thread only, except
//! `written`, which the pool thread calls.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use super::config;
use super::jobs::Job;
use super::stats;
use super::worker;
use crate::core::effect::Effect;
use crate::core::ids::account_ids_of_key;
use crate::core::ledger::{Acknowledgement, HourDelta};
use crate::core::Millis;
use crate::ffi::account_type::{scan_accounts, AccountKey};
use crate::ffi::ctx::Ctx;
use crate::ffi::propagation;
use crate::store::{AccountBatch, BatchOutcome, StoreError};

/// An account key: its database and name.
type KeyId = (i32, Box<[u8]>);

/// A batch sent and not acknowledged yet: sent again as it is until PostgreSQL answers.
struct Frozen {
    seq: u64,
    hours: Vec<HourDelta>,
}

#[derive(Default)]
struct FlushState {
    /// Account keys that may have unflushed usage.
    tracked: HashSet<KeyId>,
    /// Batches sent whose outcome is not known yet, by key.
    frozen: HashMap<KeyId, Frozen>,
    /// A flush is being written (its keys, in the order of its batches).
    in_flight: Option<Vec<KeyId>>,
    /// When the last flush was started (ms).
    last_flush: Millis,
    /// This node was a master at the last tick (the list was rebuilt for it).
    master: bool,
}

thread_local! {
    static STATE: RefCell<FlushState> = RefCell::new(FlushState::default());
}

/// What the pool thread wrote, waiting for the next tick.
static WRITTEN: Mutex<Option<Vec<Result<BatchOutcome, StoreError>>>> = Mutex::new(None);

/// Puts an account key on the list of accounts to flush.
pub(crate) fn track(db: i32, key: &[u8]) {
    STATE.with(|s| s.borrow_mut().tracked.insert((db, key.into())));
}

/// Accounts on the list.
pub(crate) fn tracked() -> usize {
    STATE.with(|s| s.borrow().tracked.len())
}

/// Called by the pool thread with what became of each batch of the flush in flight.
fn written(outcomes: Vec<Result<BatchOutcome, StoreError>>) {
    if let Ok(mut slot) = WRITTEN.lock() {
        *slot = Some(outcomes);
    }
}

/// The timer's work: on a master, acknowledge a finished flush and start the next one when
/// `quota.flush-interval` has passed (or at once with `force`). On a replica nothing is sent.
pub(crate) fn tick(ctx: Ctx, now: Millis, force: bool) {
    if !ctx.is_master() {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.master = false;
            s.frozen.clear();
        });
        return;
    }
    let became_master = STATE.with(|s| !std::mem::replace(&mut s.borrow_mut().master, true));
    if became_master {
        rescan(ctx);
    }
    let done = WRITTEN.lock().ok().and_then(|mut w| w.take());
    if let Some(outcomes) = done {
        acknowledge(ctx, outcomes);
    }
    let due = STATE.with(|s| {
        let s = s.borrow();
        let interval = config::int(&config::FLUSH_INTERVAL).max(1) * 1000;
        s.in_flight.is_none() && (force || became_master || now - s.last_flush >= interval)
    });
    if due {
        start(ctx, now);
    }
}

/// Flushes what is unflushed now and waits for PostgreSQL (at most its timeout per 1,000
/// accounts): for shutdown, where no later tick will come.
pub(crate) fn flush_and_wait(ctx: Ctx) {
    if !ctx.is_master() {
        return;
    }
    if let Some(outcomes) = WRITTEN.lock().ok().and_then(|mut w| w.take()) {
        acknowledge(ctx, outcomes);
    }
    // A flush still being written is acknowledged by the next start, if any; its batches are
    // sent again (same sequences) by this one, which PostgreSQL skips if it has them.
    STATE.with(|s| s.borrow_mut().in_flight = None);
    let (keys, batches) = snapshot(ctx);
    if batches.is_empty() {
        return;
    }
    let outcomes = worker::flush(&batches);
    STATE.with(|s| s.borrow_mut().in_flight = Some(keys));
    acknowledge(ctx, outcomes);
}

/// Rebuilds the list from the keyspace (a node that starts, or a replica promoted).
fn rescan(ctx: Ctx) {
    let original = ctx.db();
    let mut found: Vec<KeyId> = Vec::new();
    let mut db = 0;
    while db < 1024 && ctx.select_db(db) {
        scan_accounts(ctx, |name, account| {
            let pending = account.has_unflushed();
            if pending {
                found.push((db, name.into()));
            }
            pending
        });
        db += 1;
    }
    ctx.select_db(original);
    STATE.with(|s| s.borrow_mut().tracked.extend(found));
}

/// Takes the snapshot and hands it to a pool thread.
fn start(ctx: Ctx, now: Millis) {
    let (keys, batches) = snapshot(ctx);
    STATE.with(|s| s.borrow_mut().last_flush = now);
    if batches.is_empty() {
        return;
    }
    STATE.with(|s| s.borrow_mut().in_flight = Some(keys));
    let job = Job::Flush {
        batches,
        done: Box::new(written),
    };
    if worker::submit(job).is_err() {
        // Queue full: the batches stay frozen and go with the next flush.
        STATE.with(|s| s.borrow_mut().in_flight = None);
        stats::LEDGER_FLUSH_ERRORS.incr();
    }
}

/// The snapshot: each listed account's batch (its frozen one if a previous send is still
/// unanswered). Keys that no longer hold unflushed usage leave the list. Main-thread time is
/// reported in `INFO quota` (`ledger_last_snapshot_us`).
fn snapshot(ctx: Ctx) -> (Vec<KeyId>, Vec<AccountBatch>) {
    let started = Instant::now();
    let original = ctx.db();
    let mut keys = Vec::new();
    let mut batches = Vec::new();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let FlushState {
            tracked, frozen, ..
        } = &mut *s;
        let mut selected = original;
        tracked.retain(|id| {
            if id.0 != selected {
                if !ctx.select_db(id.0) {
                    return false;
                }
                selected = id.0;
            }
            let Some(ids) = account_ids_of_key(&id.1) else {
                return false;
            };
            let batch = match frozen.get(id) {
                Some(f) => Some((f.seq, f.hours.clone())),
                None => {
                    let Ok(mut key) = AccountKey::open_read(ctx, &id.1) else {
                        return false;
                    };
                    let pending = key.get().and_then(|a| {
                        a.has_unflushed()
                            .then(|| (a.batch_seq(), a.unflushed_hours()))
                    });
                    if pending.is_none() {
                        key.set_tracking(false);
                    }
                    pending
                }
            };
            let Some((seq, hours)) = batch else {
                return false;
            };
            frozen.entry(id.clone()).or_insert_with(|| Frozen {
                seq,
                hours: hours.clone(),
            });
            keys.push(id.clone());
            batches.push(AccountBatch { ids, seq, hours });
            true
        });
        if selected != original {
            ctx.select_db(original);
        }
    });
    stats::LEDGER_SNAPSHOT_US.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats::LEDGER_SNAPSHOT_ACCOUNTS.store(batches.len() as u64, Ordering::Relaxed);
    (keys, batches)
}

/// Takes what PostgreSQL has off each account of the flush in flight, as a replicated effect;
/// batches whose write failed stay frozen for the next flush.
fn acknowledge(ctx: Ctx, outcomes: Vec<Result<BatchOutcome, StoreError>>) {
    let Some(keys) = STATE.with(|s| s.borrow_mut().in_flight.take()) else {
        return;
    };
    let original = ctx.db();
    let mut failed = false;
    for (id, outcome) in keys.into_iter().zip(outcomes) {
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                failed = true;
                continue;
            }
        };
        let Some(sent) = STATE.with(|s| s.borrow_mut().frozen.remove(&id)) else {
            continue;
        };
        if outcome.applied {
            stats::LEDGER_BATCHES.incr();
        } else {
            stats::LEDGER_BATCHES_SKIPPED.incr();
        }
        if !ctx.select_db(id.0) {
            continue;
        }
        let Ok(mut key) = AccountKey::open(ctx, &id.1) else {
            continue;
        };
        let now = super::clock::now_ms();
        let ack = Acknowledgement {
            hours: sent.hours,
            next_seq: outcome.next_seq,
            floor: outcome.floor,
        };
        let Some(account) = key.get() else {
            continue;
        };
        account.acknowledge(&ack);
        let pending = account.has_unflushed();
        let effect = Effect {
            ack: Some(ack),
            ..Effect::empty(now)
        };
        key.touch();
        propagation::effect(ctx, &key, &effect.encode());
        if !pending {
            key.set_tracking(false);
            STATE.with(|s| s.borrow_mut().tracked.remove(&id));
        }
    }
    ctx.select_db(original);
    if failed {
        stats::LEDGER_FLUSH_ERRORS.incr();
    } else {
        stats::LEDGER_FLUSHES.incr();
    }
}
