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

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::alerts::conditions;
use super::config;
use super::flush_list::{KeyId, KeyList};
use super::jobs::{FlushOutcome, Job, KeyBatch};
use super::stats;
use super::worker;
use crate::core::account::pending::fresh_seq;
use crate::core::account::Account;
use crate::core::effect::Effect;
use crate::core::ledger::{Acknowledgement, HourDelta};
use crate::core::Millis;
use crate::ffi::account_type::{scan_accounts, AccountKey};
use crate::ffi::ctx::Ctx;
use crate::ffi::key_events::KeyEvent;
use crate::ffi::propagation;

/// Most accounts one slice snapshots (and one transaction writes).
const SLICE: usize = 1000;
/// Most slices written at once (each holds a pool thread).
const MAX_IN_FLIGHT: usize = 2;
/// Main-thread time a tick may spend snapshotting before it leaves the rest to the next tick.
const TICK_BUDGET: Duration = Duration::from_millis(5);

/// One batch as written: the account key name it is written under (its identity), its
/// sequence, revision and hours.
#[derive(Debug, Clone)]
struct Batch {
    name: Box<[u8]>,
    seq: u64,
    rev: u64,
    hours: Vec<HourDelta>,
}

impl Batch {
    fn job(&self) -> KeyBatch {
        KeyBatch {
            key: self.name.clone(),
            seq: self.seq,
            rev: self.rev,
            hours: self.hours.clone(),
        }
    }
}

/// Who gets a batch's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// The value now at this key: the acknowledgement takes the batch off it.
    Key(KeyId),
    /// No value any more (it left the keyspace): written until PostgreSQL answers, then
    /// forgotten.
    Orphan,
}

/// A batch PostgreSQL has not answered yet.
#[derive(Debug, Clone)]
struct Owed {
    owner: Owner,
    batch: Batch,
    /// Being written (in a slice) now.
    flying: bool,
    /// PostgreSQL refused it on its own (not for being unreachable): it is sent in a slice of
    /// its own, so it never holds back the others.
    solo: bool,
    /// Written under another name than its value's (an orphan's, or one owed under a renamed
    /// value's old name): sent by `send_foreign`, one at a time per name, lowest sequence
    /// first, and no key of that name is snapshotted until they are answered.
    foreign: bool,
}

/// Whether a batch owned by `owner` is foreign (see `Owed::foreign`).
fn is_foreign(owner: &Owner, batch: &Batch) -> bool {
    match owner {
        Owner::Orphan => true,
        Owner::Key(k) => *k.name() != *batch.name,
    }
}

/// A slice being written: the owed batches in it, in the order of the job's batches.
struct Slice {
    entries: Vec<u64>,
    /// When it was handed to the pool (ms).
    since: Millis,
}

/// A value that left the keyspace with unflushed usage during the command being run; the
/// keyspace event that follows says whether it lives on elsewhere (renamed, moved) or is gone.
struct Unlinked {
    key: KeyId,
    seq: u64,
    renamed: bool,
    hours: Vec<HourDelta>,
}

#[derive(Default)]
struct FlushState {
    /// Account keys that may have unflushed usage and are not in the round under way.
    tracked: KeyList,
    /// The round under way: keys not snapshotted yet.
    round: KeyList,
    /// Owed batches by number.
    owed: HashMap<u64, Owed>,
    /// The owed batch of each key that has one (a key has at most one: it is not snapshotted
    /// again until its batch is answered).
    by_key: HashMap<KeyId, u64>,
    /// The foreign owed batches, by name (see `Owed::foreign`).
    foreign: HashMap<Box<[u8]>, Vec<u64>>,
    next_owed: u64,
    /// Slices being written, by number.
    in_flight: HashMap<u64, Slice>,
    next_slice: u64,
    /// Values unlinked by the command being run (see `Unlinked`).
    unlinked: Vec<Unlinked>,
    /// The source of the `RENAME` or `MOVE` being run (its `..._from` event came first).
    moving: Option<KeyId>,
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
    fn insert(&mut self, n: u64, owed: Owed) {
        if let Owner::Key(k) = &owed.owner {
            self.by_key.insert(k.clone(), n);
        }
        if owed.foreign {
            self.foreign
                .entry(owed.batch.name.clone())
                .or_default()
                .push(n);
        }
        self.owed.insert(n, owed);
    }

    fn add(&mut self, owed: Owed) -> u64 {
        self.next_owed += 1;
        let n = self.next_owed;
        self.insert(n, owed);
        n
    }

    fn remove(&mut self, n: u64) -> Option<Owed> {
        let owed = self.owed.remove(&n)?;
        if let Owner::Key(k) = &owed.owner {
            if self.by_key.get(k) == Some(&n) {
                self.by_key.remove(k);
            }
        }
        if owed.foreign {
            if let Some(list) = self.foreign.get_mut(&owed.batch.name) {
                list.retain(|m| *m != n);
                if list.is_empty() {
                    self.foreign.remove(&owed.batch.name);
                }
            }
        }
        Some(owed)
    }

    /// Gives owed batch `n` a new owner (it keeps its number: a slice may refer to it).
    fn reown(&mut self, n: u64, owner: Owner) {
        if let Some(mut owed) = self.remove(n) {
            owed.foreign = is_foreign(&owner, &owed.batch);
            owed.owner = owner;
            self.insert(n, owed);
        }
    }

    /// Whether `key` may be snapshotted now: it has no owed batch of its own and no batch of
    /// its name is owed elsewhere.
    fn snapshottable(&self, key: &KeyId, name: &[u8]) -> bool {
        !self.by_key.contains_key(key)
            && (self.foreign.is_empty() || !self.foreign.contains_key(name))
    }

    /// The foreign batch of each name to send now: none for a name with one being written,
    /// else the lowest sequence (PostgreSQL skips a lower one that comes after a higher).
    fn next_foreign(&self) -> Vec<u64> {
        self.foreign
            .values()
            .filter_map(|list| {
                let batches = list
                    .iter()
                    .filter_map(|n| self.owed.get(n).map(|o| (*n, o)));
                let mut first: Option<(u64, &Owed)> = None;
                for (n, o) in batches {
                    if o.flying {
                        return None;
                    }
                    if first.is_none_or(|(m, f)| (o.batch.seq, n) < (f.batch.seq, m)) {
                        first = Some((n, o));
                    }
                }
                first.map(|(n, _)| n)
            })
            .collect()
    }

    /// Takes the slice `number` off the slices being written.
    fn land(&mut self, number: u64) -> Option<Slice> {
        let slice = self.in_flight.remove(&number)?;
        for n in &slice.entries {
            if let Some(owed) = self.owed.get_mut(n) {
                owed.flying = false;
            }
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

/// Accounts with unflushed usage known to the flush (listed, in the round, or owed).
pub(crate) fn tracked() -> usize {
    STATE.with(|s| {
        let s = s.borrow();
        // A key whose batch waits to be sent again is on the list; the others are not.
        let apart = s.owed.values().filter(|o| o.flying || o.foreign).count();
        s.tracked.len() + s.round.len() + apart
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
    let started = STATE.with(|s| {
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
            true
        } else {
            false
        }
    });
    if started {
        send_foreign(now);
    }
    send_slices(ctx, now);
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
    stats::LEDGER_FLUSH_ERRORS.incr();
    conditions::QUEUE_FULL.failed(|| "a ledger flush waits for the next round".into());
    false
}

/// Sends the foreign batches that may go now (see `FlushState::next_foreign`), refused ones
/// alone.
fn send_foreign(now: Millis) {
    let slices: Vec<Picked> = STATE.with(|s| {
        let s = s.borrow();
        let mut slices: Vec<Picked> = vec![(Vec::new(), Vec::new())];
        for n in s.next_foreign() {
            let Some(o) = s.owed.get(&n) else {
                continue;
            };
            if o.solo {
                slices.push((vec![n], vec![o.batch.job()]));
                continue;
            }
            if slices.last().is_some_and(|l| l.0.len() >= SLICE) {
                slices.push((Vec::new(), Vec::new()));
            }
            if let Some((entries, batches)) = slices.last_mut() {
                entries.push(n);
                batches.push(o.batch.job());
            }
        }
        slices.retain(|l| !l.0.is_empty());
        slices
    });
    for (entries, batches) in slices {
        if !send(entries, batches, now) {
            break;
        }
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

/// Writes the foreign batches on this thread (shutdown), one at a time and in order.
fn send_foreign_now(ctx: Ctx, now: Millis) {
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
            let e = last_error.map(|e| e.to_string()).unwrap_or_default();
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

/// Keeps a value leaving the keyspace with unflushed usage until the keyspace event that
/// follows says what became of it (`on_key_event`). Masters only: a replica flushes nothing.
pub(crate) fn on_unlinked(db: i32, name: &[u8], account: &Account) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if !s.master {
            return;
        }
        s.unlinked.push(Unlinked {
            key: KeyId::new(db, name),
            seq: account.batch_seq(),
            renamed: account.is_renamed(),
            hours: account.unflushed_hours(),
        });
    });
}

/// Follows usage through the keyspace events on key `name` of the context's database (see the
/// module header).
pub(crate) fn on_key_event(ctx: Ctx, event: KeyEvent, name: &[u8]) {
    let key = KeyId::new(ctx.db(), name);
    // Every node: the rename's mark is part of the account's state.
    // (Redis emits nothing for a RENAME onto the same name.)
    if event == KeyEvent::RenamedTo {
        if let Ok(mut value) = AccountKey::open_read(ctx, name) {
            if let Some(account) = value.get() {
                account.mark_renamed();
            }
        }
    }
    let now = super::clock::now_ms();
    let placed = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if !s.master {
            s.moving = None;
            return false;
        }
        match event {
            KeyEvent::RenamedFrom | KeyEvent::MovedFrom => {
                // The value lives on under the name of the event that follows.
                s.unlinked.retain(|u| u.key != key);
                s.moving = Some(key);
                false
            }
            KeyEvent::RenamedTo | KeyEvent::MovedTo => {
                // A value overwritten here (RENAME onto an existing key) is gone.
                s.orphan_unlinked(&key, now);
                if let Some(from) = s.moving.take() {
                    if let Some(n) = s.by_key.get(&from).copied() {
                        s.reown(n, Owner::Key(key));
                    }
                }
                true
            }
            KeyEvent::Restored | KeyEvent::CopiedTo => {
                s.orphan_unlinked(&key, now);
                event == KeyEvent::Restored
            }
            KeyEvent::Evicted => {
                s.orphan_unlinked(&key, now);
                false
            }
            KeyEvent::Deleted => {
                // Deleted (or moved to another node by MIGRATE, which bills it there): the
                // usage not sent is dropped; a batch already sent is completed.
                s.unlinked.retain(|u| u.key != key);
                if let Some(n) = s.by_key.get(&key).copied() {
                    s.reown(n, Owner::Orphan);
                }
                false
            }
        }
    });
    if placed {
        list_placed(ctx, name);
    }
}

impl FlushState {
    /// The value unlinked at `key` during this command is gone: its usage not written yet
    /// becomes an orphan batch (its owed batch, if any, stays owed as an orphan).
    fn orphan_unlinked(&mut self, key: &KeyId, now: Millis) {
        let Some(i) = self.unlinked.iter().position(|u| u.key == *key) else {
            return;
        };
        let gone = self.unlinked.swap_remove(i);
        let mut hours = gone.hours;
        let mut renamed = gone.renamed;
        if let Some(n) = self.by_key.get(key).copied() {
            let foreign = self.owed.get(&n).is_some_and(|o| o.foreign);
            if foreign {
                // Owed under the value's old name: what it holds is not the new name's.
                if let Some(owed) = self.owed.get(&n) {
                    hours = subtract(&hours, &owed.batch.hours);
                }
                renamed = true;
            }
            self.reown(n, Owner::Orphan);
        }
        if hours.is_empty() {
            return;
        }
        let seq = if renamed { fresh_seq(now) } else { gone.seq };
        self.add(Owed {
            owner: Owner::Orphan,
            batch: Batch {
                name: key.name(),
                seq,
                rev: now.max(0) as u64,
                hours,
            },
            flying: false,
            solo: false,
            foreign: true,
        });
    }
}

/// `hours` minus `sent`, hour by hour, without the hours that come to zero.
fn subtract(hours: &[HourDelta], sent: &[HourDelta]) -> Vec<HourDelta> {
    let mut out: Vec<HourDelta> = hours.to_vec();
    for s in sent {
        match out.iter_mut().find(|h| h.hour == s.hour) {
            Some(h) => {
                h.requests = h.requests.saturating_sub(s.requests);
                h.tokens = h.tokens.saturating_sub(s.tokens);
                h.debits[0] = h.debits[0].saturating_sub(s.debits[0]);
                h.debits[1] = h.debits[1].saturating_sub(s.debits[1]);
            }
            None => out.push(HourDelta {
                hour: s.hour,
                requests: s.requests.saturating_neg(),
                tokens: s.tokens.saturating_neg(),
                debits: [s.debits[0].saturating_neg(), s.debits[1].saturating_neg()],
            }),
        }
    }
    out.retain(|h| !h.is_zero());
    out.sort_by_key(|h| h.hour);
    out
}

/// A key put under a name by `RENAME`, `MOVE` or `RESTORE`: an account with usage not flushed
/// yet is listed for the ledger under that name (on a master).
fn list_placed(ctx: Ctx, name: &[u8]) {
    let Ok(mut key) = AccountKey::open_read(ctx, name) else {
        return;
    };
    if key.get().is_some_and(|a| a.has_unflushed()) {
        track(ctx.db(), name);
        key.set_tracked();
    }
}

/// `SWAPDB a b`: the keys of the two databases traded places, and so do their entries here.
pub(crate) fn on_swapdb(_ctx: Ctx, a: i32, b: i32) {
    let swap = |k: &KeyId| match k.db() {
        db if db == a => Some(k.in_db(b)),
        db if db == b => Some(k.in_db(a)),
        _ => None,
    };
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let FlushState { tracked, round, .. } = &mut *s;
        for list in [tracked, round] {
            let keys = list.take(list.len());
            list.extend(keys.into_iter().map(|k| swap(&k).unwrap_or(k)));
        }
        let moved: Vec<(u64, KeyId)> = s
            .owed
            .iter()
            .filter_map(|(n, o)| match &o.owner {
                Owner::Key(k) => swap(k).map(|k| (*n, k)),
                Owner::Orphan => None,
            })
            .collect();
        // All out first: a key of one database may take the place of one of the other.
        let taken: Vec<(u64, Owed, KeyId)> = moved
            .into_iter()
            .filter_map(|(n, k)| s.remove(n).map(|o| (n, o, k)))
            .collect();
        for (n, mut owed, k) in taken {
            owed.owner = Owner::Key(k);
            s.insert(n, owed);
        }
    });
}

/// `FLUSHDB` (of `db`) or `FLUSHALL` (`db` -1) is about to drop the keys: their usage not sent
/// yet goes with them; batches already sent are completed.
pub(crate) fn on_flushdb(_ctx: Ctx, db: i32) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let gone: Vec<u64> = s
            .owed
            .iter()
            .filter(|(_, o)| matches!(&o.owner, Owner::Key(k) if db == -1 || k.db() == db))
            .map(|(n, _)| *n)
            .collect();
        for n in gone {
            s.reown(n, Owner::Orphan);
        }
    });
}
