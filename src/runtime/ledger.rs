//! The usage ledger's flush: which accounts have unflushed usage, the main-thread snapshot of
//! their batches, the write on a pool thread, and the acknowledgement back into the accounts.
//!
//! Every account key with unflushed usage is on a list (`track`, called when a change gives it
//! some; rebuilt by a scan of the keyspace when the node starts or becomes a master). A timer
//! (`tick`, every 100 ms on the main thread) starts a flush round at least every
//! `quota.flush-interval` seconds: the round takes the list, and each tick then snapshots the
//! next slices of it (`SLICE` accounts each, for at most `TICK_BUDGET` of main-thread time per
//! tick and with at most `MAX_IN_FLIGHT` slices being written), so no tick holds the main
//! thread for long whatever the number of accounts. A snapshot copies an account's unflushed
//! hours and batch sequence (a read of the key, nothing changes); a pool thread writes a slice
//! in one transaction; a later tick takes what PostgreSQL has off each account as an effect
//! (`QUOTA.APPLY ... ack`), replicated like every change, so a replica that takes over goes on
//! from the same ledger. A batch whose write failed (or whose answer was lost) is sent again
//! exactly as it was, with the same sequence and revision, until PostgreSQL answers: a batch it
//! had applied is then skipped and acknowledged, never counted twice. A replica that took over
//! sends the lost master's unacknowledged sequence again with a later revision (its snapshot
//! time), and PostgreSQL adds only what it holds beyond what was applied
//! (`core::ledger::claim`). Main thread only, except `written`, which the pool thread calls.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config;
use super::flush_list::{KeyId, KeyList};
use super::jobs::{FlushOutcome, Job, KeyBatch};
use super::stats;
use super::worker;
use crate::core::effect::Effect;
use crate::core::ledger::{Acknowledgement, HourDelta};
use crate::core::Millis;
use crate::ffi::account_type::{scan_accounts, AccountKey};
use crate::ffi::ctx::Ctx;
use crate::ffi::propagation;

/// Most accounts one slice snapshots (and one transaction writes).
const SLICE: usize = 1000;
/// Most slices written at once (each holds a pool thread).
const MAX_IN_FLIGHT: usize = 2;
/// Main-thread time a tick may spend snapshotting before it leaves the rest to the next tick.
const TICK_BUDGET: Duration = Duration::from_millis(5);

/// A batch whose write failed or whose outcome is unknown: sent again as it is.
struct Frozen {
    seq: u64,
    rev: u64,
    hours: Vec<HourDelta>,
}

/// A slice being written: its keys, in the order of its batches, and what was sent.
struct Slice {
    keys: Vec<KeyId>,
    sent: Vec<Frozen>,
    /// When it was handed to the pool (ms).
    since: Millis,
}

#[derive(Default)]
struct FlushState {
    /// Account keys that may have unflushed usage and are not in the round under way.
    tracked: KeyList,
    /// The round under way: keys not snapshotted yet.
    round: KeyList,
    /// The keys snapshotted and not acknowledged yet (the slices being written): a key listed
    /// twice (a name placed again by `RENAME`) gives one batch until its answer is in.
    flying: HashSet<KeyId>,
    /// Batches to send again as they were, by key.
    frozen: HashMap<KeyId, Frozen>,
    /// Slices being written, by number.
    in_flight: HashMap<u64, Slice>,
    next_slice: u64,
    /// When the last round was started (ms).
    last_flush: Millis,
    /// This node was a master at the last tick (the list was rebuilt for it).
    master: bool,
    /// The round under way: main-thread µs of its snapshots so far, its longest tick, and the
    /// accounts snapshotted.
    round_us: u64,
    round_longest_us: u64,
    round_accounts: u64,
}

impl FlushState {
    /// Takes the slice `number` off the slices being written.
    fn land(&mut self, number: u64) -> Option<Slice> {
        let slice = self.in_flight.remove(&number)?;
        for key in &slice.keys {
            self.flying.remove(key);
        }
        Some(slice)
    }
}

thread_local! {
    static STATE: RefCell<FlushState> = RefCell::new(FlushState::default());
}

/// What the pool threads wrote, by slice, waiting for the next tick.
static WRITTEN: Mutex<Vec<(u64, Vec<FlushOutcome>)>> = Mutex::new(Vec::new());

/// Puts an account key on the list of accounts to flush.
pub(crate) fn track(db: i32, key: &[u8]) {
    STATE.with(|s| s.borrow_mut().tracked.push(&KeyId::new(db, key)));
}

/// Accounts with unflushed usage known to the flush (listed, in the round, or being written).
pub(crate) fn tracked() -> usize {
    STATE.with(|s| {
        let s = s.borrow();
        s.tracked.len() + s.round.len() + s.in_flight.values().map(|f| f.keys.len()).sum::<usize>()
    })
}

/// How long the oldest slice being written has waited for PostgreSQL (ms), 0 when none: a
/// stalled PostgreSQL shows here while the flush waits for its answer.
pub(crate) fn waiting_ms(now: Millis) -> u64 {
    STATE.with(|s| {
        s.borrow()
            .in_flight
            .values()
            .map(|f| (now - f.since).max(0) as u64)
            .max()
            .unwrap_or(0)
    })
}

/// Takes what the pool threads wrote so far.
fn take_written() -> Vec<(u64, Vec<FlushOutcome>)> {
    WRITTEN
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default()
}

/// The timer's work: on a master, acknowledge the slices written, start a round when
/// `quota.flush-interval` has passed (or at once with `force`), and snapshot and send the next
/// slices of the round. On a replica nothing is sent.
pub(crate) fn tick(ctx: Ctx, now: Millis, force: bool) {
    if !ctx.is_master() {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.master = false;
            s.frozen.clear();
            s.round.clear();
            s.in_flight.clear();
            s.flying.clear();
        });
        take_written();
        return;
    }
    let became_master = STATE.with(|s| !std::mem::replace(&mut s.borrow_mut().master, true));
    if became_master {
        rescan(ctx);
    }
    for (slice, outcomes) in take_written() {
        acknowledge(ctx, slice, outcomes);
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let interval = config::int(&config::FLUSH_INTERVAL).max(1) * 1000;
        let idle = s.round.is_empty() && s.in_flight.is_empty();
        if idle && (force || became_master || now - s.last_flush >= interval) {
            let FlushState { tracked, round, .. } = &mut *s;
            round.append(tracked);
            s.last_flush = now;
            s.round_us = 0;
            s.round_longest_us = 0;
            s.round_accounts = 0;
        }
    });
    send_slices(ctx, now);
}

/// Snapshots and sends slices of the round while the tick's budget and the slice limit allow.
fn send_slices(ctx: Ctx, now: Millis) {
    let started = Instant::now();
    loop {
        let more = STATE.with(|s| {
            let s = s.borrow();
            !s.round.is_empty() && s.in_flight.len() < MAX_IN_FLIGHT
        });
        if !more || started.elapsed() >= TICK_BUDGET {
            break;
        }
        let keys = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.round.take(SLICE)
        });
        let (keys, batches) = snapshot(ctx, keys, now, Some(started + TICK_BUDGET));
        if batches.is_empty() {
            continue;
        }
        let number = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.next_slice += 1;
            let sent = sent_of(&batches);
            let number = s.next_slice;
            s.in_flight.insert(
                number,
                Slice {
                    keys,
                    sent,
                    since: now,
                },
            );
            number
        });
        let job = Job::Flush {
            batches,
            done: Box::new(move |outcomes| written(number, outcomes)),
        };
        if worker::submit(job).is_err() {
            // Queue full: the slice goes back to the round for a later tick.
            STATE.with(|s| {
                let mut s = s.borrow_mut();
                if let Some(slice) = s.land(number) {
                    let FlushState { round, frozen, .. } = &mut *s;
                    for (key, sent) in slice.keys.into_iter().zip(slice.sent) {
                        round.push(&key);
                        frozen.insert(key, sent);
                    }
                }
            });
            stats::LEDGER_FLUSH_ERRORS.incr();
            break;
        }
    }
    let spent = started.elapsed().as_micros() as u64;
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.round_us += spent;
        s.round_longest_us = s.round_longest_us.max(spent);
        if s.round.is_empty() {
            stats::LEDGER_SNAPSHOT_US.store(s.round_us, Ordering::Relaxed);
            stats::LEDGER_SNAPSHOT_LONGEST_US.store(s.round_longest_us, Ordering::Relaxed);
            stats::LEDGER_SNAPSHOT_ACCOUNTS.store(s.round_accounts, Ordering::Relaxed);
        }
    });
}

/// What a slice sends, kept to be sent again as it was if its write fails.
fn sent_of(batches: &[KeyBatch]) -> Vec<Frozen> {
    batches
        .iter()
        .map(|b| Frozen {
            seq: b.seq,
            rev: b.rev,
            hours: b.hours.clone(),
        })
        .collect()
}

/// Called by the pool thread with what became of each batch of a slice.
fn written(slice: u64, outcomes: Vec<FlushOutcome>) {
    if let Ok(mut w) = WRITTEN.lock() {
        w.push((slice, outcomes));
    }
}

/// Flushes what is unflushed now and waits for PostgreSQL (at most its timeout per 1,000
/// accounts): for shutdown, where no later tick will come.
pub(crate) fn flush_and_wait(ctx: Ctx) {
    if !ctx.is_master() {
        return;
    }
    for (slice, outcomes) in take_written() {
        acknowledge(ctx, slice, outcomes);
    }
    // Slices still being written are sent again as they were (PostgreSQL skips what it has).
    let keys = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let FlushState {
            tracked,
            round,
            frozen,
            in_flight,
            flying,
            ..
        } = &mut *s;
        flying.clear();
        for (_, slice) in in_flight.drain() {
            for (key, sent) in slice.keys.into_iter().zip(slice.sent) {
                round.push(&key);
                frozen.insert(key, sent);
            }
        }
        round.append(tracked);
        let len = round.len();
        round.take(len)
    });
    let now = super::clock::now_ms();
    let (keys, batches) = snapshot(ctx, keys, now, None);
    if batches.is_empty() {
        return;
    }
    let sent = sent_of(&batches);
    let outcomes = worker::flush(&batches);
    STATE.with(|s| {
        s.borrow_mut().in_flight.insert(
            0,
            Slice {
                keys,
                sent,
                since: now,
            },
        )
    });
    acknowledge(ctx, 0, outcomes);
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
                found.push(KeyId::new(db, name));
            }
            pending
        });
        db += 1;
    }
    ctx.select_db(original);
    // The list is rebuilt: what it held is found again if it is still unflushed (and every
    // account's flag says whether it is listed).
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.tracked.clear();
        s.tracked.extend(found);
    });
}

/// The snapshot of `keys`: each account's batch (its frozen one if an earlier send is still
/// unanswered), revised at `now`. Keys that no longer hold unflushed usage leave the list.
/// Keys not reached by `deadline` go back to the round for a later tick.
fn snapshot(
    ctx: Ctx,
    keys: Vec<KeyId>,
    now: Millis,
    deadline: Option<Instant>,
) -> (Vec<KeyId>, Vec<KeyBatch>) {
    let original = ctx.db();
    let mut listed = Vec::with_capacity(keys.len());
    let mut batches = Vec::with_capacity(keys.len());
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let mut selected = original;
        let mut keys = keys.into_iter();
        let mut seen = 0usize;
        while let Some(id) = keys.next() {
            seen += 1;
            // Checked every 64 accounts: a clock read costs about what a snapshot's step does.
            if seen.is_multiple_of(64) && deadline.is_some_and(|d| Instant::now() >= d) {
                s.round.push(&id);
                s.round.extend(keys);
                break;
            }
            // Listed twice: its batch is being written, or this snapshot has it already.
            if s.flying.contains(&id) {
                continue;
            }
            let (db, name) = (id.db(), id.name());
            if db != selected {
                if !ctx.select_db(db) {
                    continue;
                }
                selected = db;
            }
            let frozen = (!s.frozen.is_empty())
                .then(|| s.frozen.remove(&id))
                .flatten();
            let batch = match frozen {
                Some(f) => Some((f.seq, f.rev, f.hours)),
                None => {
                    let Ok(mut key) = AccountKey::open_read(ctx, &name) else {
                        continue;
                    };
                    let pending = key.get().and_then(|a| {
                        a.has_unflushed()
                            .then(|| (a.batch_seq(), now.max(0) as u64, a.unflushed_hours()))
                    });
                    if pending.is_none() {
                        key.set_tracking(false);
                    }
                    pending
                }
            };
            let Some((seq, rev, hours)) = batch else {
                continue;
            };
            // Flying from here: the caller sends the batch or lands the slice again.
            s.flying.insert(id.clone());
            batches.push(KeyBatch {
                key: name,
                seq,
                rev,
                hours,
            });
            listed.push(id);
        }
        if selected != original {
            ctx.select_db(original);
        }
        s.round_accounts += batches.len() as u64;
    });
    (listed, batches)
}

/// Takes what PostgreSQL has off each account of a written slice, as a replicated effect;
/// batches whose write failed are frozen and listed again for the next round.
fn acknowledge(ctx: Ctx, slice: u64, outcomes: Vec<FlushOutcome>) {
    let Some(slice) = STATE.with(|s| s.borrow_mut().land(slice)) else {
        return;
    };
    let original = ctx.db();
    let mut failed = false;
    for ((id, sent), outcome) in slice.keys.into_iter().zip(slice.sent).zip(outcomes) {
        let outcome = match outcome {
            // Not an account key's name: nothing can be written for it.
            None => continue,
            Some(Err(_)) => {
                failed = true;
                STATE.with(|s| {
                    let mut s = s.borrow_mut();
                    s.tracked.push(&id);
                    s.frozen.insert(id, sent);
                });
                continue;
            }
            Some(Ok(o)) => o,
        };
        if outcome.revised {
            stats::LEDGER_BATCHES_REVISED.incr();
        }
        if outcome.applied {
            stats::LEDGER_BATCHES.incr();
        } else {
            stats::LEDGER_BATCHES_SKIPPED.incr();
        }
        if !ctx.select_db(id.db()) {
            continue;
        }
        let Ok(mut key) = AccountKey::open(ctx, &id.name()) else {
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
        if !pending {
            key.set_tracking(false);
        }
        key.touch();
        propagation::effect(ctx, &key, &effect.encode());
        if pending {
            STATE.with(|s| s.borrow_mut().tracked.push(&id));
        }
    }
    ctx.select_db(original);
    if failed {
        stats::LEDGER_FLUSH_ERRORS.incr();
    } else {
        stats::LEDGER_FLUSHES.incr();
    }
}
