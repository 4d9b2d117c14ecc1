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
//! hours and batch sequence (a read of the key); a pool thread writes a slice in one
//! transaction (refused batches are isolated, see `worker::flush`); a later tick takes what
//! PostgreSQL has off each account as an effect (`QUOTA.APPLY ... ack`), replicated like every
//! change, so a replica that takes over goes on from the same ledger.
//!
//! A batch not answered yet (its write failed, or its answer was lost) is an `Owed` batch: it
//! is sent again exactly as it was, with the same sequence and revision, until PostgreSQL
//! answers, and the account is not snapshotted again until then. A batch PostgreSQL had
//! applied is skipped and acknowledged, never counted twice. A replica that took over sends
//! the lost master's unacknowledged sequence again with a later revision (its snapshot time),
//! and PostgreSQL adds only what it holds beyond what was applied (`core::ledger::claim`).
//!
//! Usage follows its value through the keyspace (`on_key_event`): an owed batch's answer goes
//! to the value wherever `RENAME` or `MOVE` took it (and `SWAPDB` its database). A renamed
//! value's sequence belongs to its old name, so it is started anew under the new name
//! (`Account::rebase`, replicated) before its next batch. A value that leaves the keyspace
//! with usage not flushed (evicted by `maxmemory`, or overwritten by `RENAME`, `RESTORE` or
//! `COPY ... REPLACE`) leaves an orphan batch that is written like any other. `DEL`, `UNLINK`,
//! `FLUSHDB` and `FLUSHALL` drop the usage not sent yet (so must `MIGRATE`'s deletion: the
//! target node bills it); batches already sent are completed. Batches of one name are
//! written in the order of their sequences, so none is skipped as stale.
//!
//! Main thread only, except `written`, which the pool thread calls.

mod keys;
pub(crate) mod moves;
mod orphans;
mod state;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::alerts::{self, conditions};
use super::config;
use super::jobs::{FlushOutcome, Job, KeyBatch};
use super::stats;
use super::worker;
use crate::core::account::pending::fresh_seq;
use crate::core::effect::Effect;
use crate::core::ledger::{Acknowledgement, Unacknowledged};
use crate::core::Millis;
use crate::ffi::account_type::{scan_accounts, AccountKey};
use crate::ffi::ctx::Ctx;
use crate::ffi::propagation;
use keys::KeyId;
use orphans::name_hash;
use state::{Batch, FlushState, Owed, Owner, Slice, STATE};

pub(crate) use state::track;

/// Most accounts one slice snapshots (and one transaction writes).
const SLICE: usize = 1000;
/// Most slices written at once (each holds a pool thread).
const MAX_IN_FLIGHT: usize = 2;
/// Main-thread time a tick may spend snapshotting before it leaves the rest to the next tick.
const TICK_BUDGET: Duration = Duration::from_millis(5);

/// What the pool threads wrote, by slice, waiting for the next tick.
static WRITTEN: Mutex<Vec<(u64, Vec<FlushOutcome>)>> = Mutex::new(Vec::new());

/// Accounts with unflushed usage known to the flush (listed, in the round, or owed).
pub(crate) fn tracked() -> usize {
    STATE.with(|s| {
        let s = s.borrow();
        // A key whose batch waits to be sent again is on the list; the others are not.
        let apart = s.owed.values().filter(|o| o.flying || o.foreign).count();
        s.tracked.len() + s.round.len() + apart + s.orphans.len()
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

/// The batch of account key `name` (in database `db`) that the flush sent to PostgreSQL under
/// that name and has not acknowledged yet: a credit row read meanwhile may count its debits
/// already (see `core::decide::counted_twice`).
pub(crate) fn unacknowledged(db: i32, name: &[u8]) -> Option<Unacknowledged> {
    STATE.with(|s| {
        let s = s.borrow();
        if s.by_key.is_empty() {
            return None;
        }
        let n = s.by_key.get(&KeyId::new(db, name))?;
        let owed = s.owed.get(n).filter(|o| !o.foreign)?;
        Some(Unacknowledged::of(owed.batch.seq, &owed.batch.hours))
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
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        // Values unlinked with no event saying what became of them: deleted in a way that
        // drops the usage not sent (overwritten by a type's own command, say).
        s.unlinked.clear();
        s.moving = None;
    });
    if !ctx.is_master() {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let tracked = std::mem::take(&mut s.tracked);
            *s = FlushState {
                tracked,
                ..FlushState::default()
            };
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
        let due = now - s.last_flush >= interval - s.cut.min(interval / 10);
        if idle && (force || became_master || due) {
            let FlushState { tracked, round, .. } = &mut *s;
            round.append(tracked);
            s.last_flush = now;
            let random = s.rng.next_u64();
            s.cut = round_cut(interval, random);
            s.round_us = 0;
            s.round_longest_us = 0;
            s.round_accounts = 0;
            // The foreign batches that failed are tried again with the round.
            for owed in s.owed.values_mut() {
                owed.failed = false;
            }
        }
    });
    // Orphans hold memory of their own (often under `maxmemory` pressure, having been
    // evicted): they go at every tick, not only with the rounds.
    send_foreign(now);
    send_slices(ctx, now);
}

/// How much sooner than `interval` (ms) the round after this one starts: up to a tenth of it,
/// drawn at random. Nodes started together (a fleet rolled out at once, or restarted with
/// PostgreSQL) would otherwise flush in the same 100 ms tick forever after, and send the
/// batches an outage left owed together when it ends; drawn anew at every round, their rounds
/// drift apart within a few. A round never comes later than `quota.flush-interval`, the most
/// billing a crash can lose.
fn round_cut(interval: Millis, random: u64) -> Millis {
    let cap = u64::try_from(interval / 10).unwrap_or(0);
    Millis::try_from(random % cap.saturating_add(1)).unwrap_or(0)
}

/// Hands a slice of owed batches to the pool; false (nothing sent, the batches stay owed) when
/// the queue is full.
fn send(entries: Vec<u64>, batches: Vec<KeyBatch>, now: Millis) -> bool {
    let number = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.next_slice += 1;
        let number = s.next_slice;
        for n in &entries {
            if let Some(owed) = s.owed.get_mut(n) {
                owed.flying = true;
            }
        }
        s.in_flight.insert(
            number,
            Slice {
                entries,
                since: now,
            },
        );
        number
    });
    let job = Job::Flush {
        batches,
        done: Box::new(move |outcomes| written(number, outcomes)),
    };
    if worker::submit(job).is_ok() {
        return true;
    }
    STATE.with(|s| s.borrow_mut().land(number));
    // `worker::submit` logged it (`QUEUE_FULL`).
    stats::LEDGER_FLUSH_ERRORS.incr();
    false
}

/// Sends the foreign batches that may go now (see `FlushState::next_foreign`) and the orphans
/// waiting in the queue (each name's one at a time), refused ones alone, while fewer than
/// `MAX_IN_FLIGHT` slices are being written.
fn send_foreign(now: Millis) {
    let slices: Vec<Picked> = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if (s.foreign.is_empty() && s.orphans.is_empty()) || s.in_flight.len() >= MAX_IN_FLIGHT {
            return Vec::new();
        }
        let mut slices: Vec<Picked> = vec![(Vec::new(), Vec::new())];
        let mut names = HashSet::new();
        for n in s.next_foreign() {
            let Some(o) = s.owed.get(&n) else {
                continue;
            };
            names.insert(name_hash(&o.batch.name));
            if o.solo {
                slices.push((vec![n], vec![o.batch.job()]));
                continue;
            }
            push_batch(&mut slices, n, o.batch.job());
        }
        // Then the queue, as far as the slices being written allow: an orphan whose name has
        // a batch owed (or one in these slices) waits for it at the back of the queue.
        let room = (MAX_IN_FLIGHT - s.in_flight.len()) * SLICE;
        let (mut taken, mut later) = (0, Vec::new());
        while taken < room {
            let Some(orphan) = s.orphans.pop() else {
                break;
            };
            let hash = name_hash(&orphan.name);
            if s.foreign.contains_key(&orphan.name) || !names.insert(hash) {
                later.push(orphan);
                continue;
            }
            let batch = Batch {
                name: orphan.name,
                seq: orphan.seq,
                rev: orphan.rev,
                hours: orphan.hours,
            };
            let job = batch.job();
            let n = s.add(Owed {
                owner: Owner::Orphan,
                batch,
                flying: false,
                solo: false,
                foreign: true,
                failed: false,
            });
            push_batch(&mut slices, n, job);
            taken += 1;
        }
        for orphan in &later {
            s.orphans.push(orphan);
        }
        slices.retain(|l| !l.0.is_empty());
        slices
    });
    for (entries, batches) in slices.into_iter().take(MAX_IN_FLIGHT) {
        if !send(entries, batches, now) {
            break;
        }
    }
}

/// Adds a batch to the last slice, or to a new one when it is full.
fn push_batch(slices: &mut Vec<Picked>, n: u64, batch: KeyBatch) {
    if slices.last().is_none_or(|l| l.0.len() >= SLICE) {
        slices.push((Vec::new(), Vec::new()));
    }
    if let Some((entries, batches)) = slices.last_mut() {
        entries.push(n);
        batches.push(batch);
    }
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
        let keys = STATE.with(|s| s.borrow_mut().round.take(SLICE));
        let picked = snapshot(ctx, keys, now, Some(started + TICK_BUDGET));
        let mut sent = true;
        for (entries, batches) in picked {
            if !entries.is_empty() && !send(entries, batches, now) {
                sent = false;
            }
        }
        if !sent {
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
    let now = super::clock::now_ms();
    // Slices still being written are sent again as they were (PostgreSQL skips what it has).
    let keys = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let numbers: Vec<u64> = s.in_flight.keys().copied().collect();
        for number in numbers {
            s.land(number);
        }
        let FlushState { tracked, round, .. } = &mut *s;
        round.append(tracked);
        let len = round.len();
        round.take(len)
    });
    send_foreign_now(ctx, now);
    let picked = snapshot(ctx, keys, now, None);
    for (entries, batches) in picked {
        if entries.is_empty() {
            continue;
        }
        let outcomes = worker::flush(&batches);
        let number = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.next_slice += 1;
            let number = s.next_slice;
            s.in_flight.insert(
                number,
                Slice {
                    entries,
                    since: now,
                },
            );
            number
        });
        acknowledge(ctx, number, outcomes);
    }
}

/// Writes the foreign batches and the orphans on this thread (shutdown), one batch of each
/// name at a time and in order.
fn send_foreign_now(ctx: Ctx, now: Millis) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        while let Some(orphan) = s.orphans.pop() {
            s.add(Owed {
                owner: Owner::Orphan,
                batch: Batch {
                    name: orphan.name,
                    seq: orphan.seq,
                    rev: orphan.rev,
                    hours: orphan.hours,
                },
                flying: false,
                solo: false,
                foreign: true,
                failed: false,
            });
        }
    });
    loop {
        let next: Vec<(u64, KeyBatch)> = STATE.with(|s| {
            let s = s.borrow();
            s.next_foreign()
                .into_iter()
                .filter_map(|n| s.owed.get(&n).map(|o| (n, o.batch.job())))
                .collect()
        });
        if next.is_empty() {
            return;
        }
        let (entries, batches): (Vec<u64>, Vec<KeyBatch>) = next.into_iter().unzip();
        let outcomes = worker::flush(&batches);
        let failed = outcomes.iter().any(|o| matches!(o, Some(Err(_))));
        let number = STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.next_slice += 1;
            let number = s.next_slice;
            s.in_flight.insert(
                number,
                Slice {
                    entries,
                    since: now,
                },
            );
            number
        });
        acknowledge(ctx, number, outcomes);
        if failed {
            return;
        }
    }
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

/// One slice to send: the owed batches' numbers and their batches, in the same order.
type Picked = (Vec<u64>, Vec<KeyBatch>);

/// The snapshot of `keys`: each account's owed batch if it has one not being written, else a
/// new batch of its unflushed usage (revised at `now`), each owed from then on. A renamed
/// account's sequence is started anew first. Keys that no longer hold unflushed usage leave
/// the list; keys that must wait (a batch of their name owed elsewhere) go back on it; keys
/// not reached by `deadline` go back to the round. A slice never holds two batches of one name
/// (PostgreSQL writes one per account), and a batch refused on its own goes in a slice alone.
fn snapshot(ctx: Ctx, keys: Vec<KeyId>, now: Millis, deadline: Option<Instant>) -> Vec<Picked> {
    let original = ctx.db();
    let mut picked: Vec<Picked> = vec![(Vec::new(), Vec::new())];
    let mut names: HashSet<Box<[u8]>> = HashSet::new();
    let mut selected = original;
    let mut keys = keys.into_iter();
    let mut seen = 0usize;
    let mut snapshotted = 0u64;
    while let Some(id) = keys.next() {
        seen += 1;
        // Checked every 64 accounts: a clock read costs about what a snapshot's step does.
        if seen.is_multiple_of(64) && deadline.is_some_and(|d| Instant::now() >= d) {
            STATE.with(|s| {
                let mut s = s.borrow_mut();
                s.round.push(&id);
                s.round.extend(keys.by_ref());
            });
            break;
        }
        let name = id.name();
        if names.contains(&name) {
            STATE.with(|s| s.borrow_mut().tracked.push(&id));
            continue;
        }
        // An owed batch of its own: sent again as it was (unless it is being written).
        let owed = STATE.with(|s| {
            let s = s.borrow();
            s.by_key.get(&id).and_then(|n| {
                s.owed
                    .get(n)
                    .map(|o| (*n, o.flying || o.foreign, o.solo, o.batch.job()))
            })
        });
        // A foreign one goes with `send_foreign`; the key is listed again once it is answered.
        if let Some((n, busy, solo, batch)) = owed {
            if !busy {
                names.insert(batch.key.clone());
                if solo {
                    picked.push((vec![n], vec![batch]));
                } else {
                    let (entries, batches) = &mut picked[0];
                    entries.push(n);
                    batches.push(batch);
                }
            }
            continue;
        }
        if !STATE.with(|s| s.borrow().snapshottable(&id, &name)) {
            // A batch of its name is owed elsewhere: it goes first.
            STATE.with(|s| s.borrow_mut().tracked.push(&id));
            continue;
        }
        let db = id.db();
        if db != selected {
            if !ctx.select_db(db) {
                continue;
            }
            selected = db;
        }
        let Some(batch) = fresh_batch(ctx, &name, now) else {
            continue;
        };
        names.insert(name);
        let n = STATE.with(|s| {
            s.borrow_mut().add(Owed {
                owner: Owner::Key(id),
                batch: batch.clone(),
                flying: false,
                solo: false,
                foreign: false,
                failed: false,
            })
        });
        let (entries, batches) = &mut picked[0];
        entries.push(n);
        batches.push(batch.job());
        snapshotted += 1;
    }
    if selected != original {
        ctx.select_db(original);
    }
    STATE.with(|s| s.borrow_mut().round_accounts += snapshotted);
    picked
}

/// The batch of the account at `name` (database selected) as of `now`, if it has unflushed
/// usage; a key without any is taken off the list. A renamed account's sequence is started
/// anew under this name first, as a replicated effect.
fn fresh_batch(ctx: Ctx, name: &[u8], now: Millis) -> Option<Batch> {
    let Ok(mut key) = AccountKey::open_read(ctx, name) else {
        return None;
    };
    let renamed = key
        .get()
        .is_some_and(|a| a.has_unflushed() && a.is_renamed());
    if renamed {
        drop(key);
        let Ok(mut key) = AccountKey::open(ctx, name) else {
            return None;
        };
        let seq = fresh_seq(now);
        if let Some(account) = key.get() {
            account.rebase(seq);
            propagation::effect(ctx, &key, &Effect::rebased(now, seq).encode());
        }
        return batch_of(&mut key, name, now);
    }
    batch_of(&mut key, name, now)
}

fn batch_of(key: &mut AccountKey, name: &[u8], now: Millis) -> Option<Batch> {
    let batch = key.get().and_then(|a| {
        a.has_unflushed().then(|| Batch {
            name: name.into(),
            seq: a.batch_seq(),
            rev: now.max(0) as u64,
            hours: a.unflushed_hours(),
        })
    });
    if batch.is_none() {
        key.set_tracking(false);
    }
    batch
}

/// Takes what PostgreSQL has off each account of a written slice, as a replicated effect;
/// batches whose write failed stay owed and are sent again.
fn acknowledge(ctx: Ctx, slice: u64, outcomes: Vec<FlushOutcome>) {
    let Some(slice) = STATE.with(|s| s.borrow_mut().land(slice)) else {
        return;
    };
    let original = ctx.db();
    let (mut failed, mut refused) = (0usize, 0usize);
    let mut last_error = None;
    for (n, outcome) in slice.entries.into_iter().zip(outcomes) {
        let outcome = match outcome {
            // Not an account key's name: nothing can be written for it.
            None => {
                STATE.with(|s| s.borrow_mut().remove(n));
                continue;
            }
            Some(Err(e)) => {
                failed += 1;
                let alone = !e.is_unavailable();
                refused += usize::from(alone);
                STATE.with(|s| {
                    let mut s = s.borrow_mut();
                    let requeue = match s.owed.get_mut(&n) {
                        Some(owed) => {
                            // Refused in a transaction of its own (see `worker::flush`).
                            owed.solo |= alone;
                            owed.failed = owed.foreign;
                            match &owed.owner {
                                Owner::Key(k) => Some(k.clone()),
                                Owner::Orphan => None,
                            }
                        }
                        None => None,
                    };
                    if let Some(k) = requeue {
                        s.tracked.push(&k);
                    }
                });
                last_error = Some(e);
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
        let Some(owed) = STATE.with(|s| s.borrow_mut().remove(n)) else {
            continue;
        };
        let Owner::Key(id) = &owed.owner else {
            continue;
        };
        let foreign = owed.foreign;
        if !ctx.select_db(id.db()) {
            continue;
        }
        let Ok(mut key) = AccountKey::open(ctx, &id.name()) else {
            continue;
        };
        let now = super::clock::now_ms();
        let ack = Acknowledgement {
            hours: owed.batch.hours,
            next_seq: outcome.next_seq,
            // PostgreSQL's totals are those of the name written under: only its own.
            floor: if foreign { None } else { outcome.floor },
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
            STATE.with(|s| s.borrow_mut().tracked.push(id));
        }
    }
    ctx.select_db(original);
    let backlog = || {
        STATE.with(|s| {
            let s = s.borrow();
            format!(
                "{} accounts wait to be flushed, {} batches owed",
                s.tracked.len() + s.round.len(),
                s.owed.len()
            )
        })
    };
    if failed > 0 {
        stats::LEDGER_FLUSH_ERRORS.incr();
        if failed > refused {
            let e = last_error.map(|e| alerts::reason(&e)).unwrap_or_default();
            conditions::LEDGER_FLUSH.failed(|| format!("{e}; {}", backlog()));
        }
    } else {
        stats::LEDGER_FLUSHES.incr();
        conditions::LEDGER_FLUSH.recovered(|| format!("flushes succeed again; {}", backlog()));
        if refused == 0 && !STATE.with(|s| s.borrow().owed.values().any(|o| o.solo)) {
            conditions::LEDGER_BATCH.recovered(|| "every refused batch is written".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backoff::Rng;

    #[test]
    fn rounds_come_up_to_a_tenth_sooner_never_later_and_spread_over_a_fleet() {
        assert_eq!(round_cut(10_000, 0), 0);
        assert_eq!(round_cut(10_000, 1_000), 1_000);
        assert_eq!(round_cut(10_000, 1_001), 0);
        assert_eq!(round_cut(1_000, u64::MAX), (u64::MAX % 101) as Millis);
        assert_eq!(round_cut(5, u64::MAX), 0);
        // 1000 nodes flushing every 10 s: each next round is due 9 to 10 s after the last,
        // spread over that second (not all in one 100 ms tick).
        let cuts: Vec<u64> = (0..1000)
            .map(|_| round_cut(10_000, Rng::seeded().next_u64()) as u64)
            .collect();
        crate::store::backoff::assert_spread(&cuts, 0, 1_000);
    }
}
