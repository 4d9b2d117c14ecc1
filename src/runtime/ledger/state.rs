//! The flush's state on the main thread: the lists of keys to flush, the batches owed (sent
//! and not answered yet) with their indexes by key and by name, the orphans waiting to be sent,
//! the slices being written, and what the keyspace events of the command being run left. Only
//! the bookkeeping that keeps those indexes true lives here; `ledger` runs the flush and
//! `moves` follows the keyspace.

use std::cell::RefCell;
use std::collections::HashMap;

use super::keys::{KeyId, KeyList};
use super::orphans::OrphanQueue;
use crate::core::ledger::HourDelta;
use crate::core::Millis;
use crate::runtime::jobs::KeyBatch;
use crate::store::backoff::Rng;

/// One batch as written: the account key name it is written under (its identity), its
/// sequence, revision and hours.
#[derive(Debug, Clone)]
pub(super) struct Batch {
    pub(super) name: Box<[u8]>,
    pub(super) seq: u64,
    pub(super) rev: u64,
    pub(super) hours: Vec<HourDelta>,
}

impl Batch {
    pub(super) fn job(&self) -> KeyBatch {
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
pub(super) enum Owner {
    /// The value now at this key: the acknowledgement takes the batch off it.
    Key(KeyId),
    /// No value any more (it left the keyspace): written until PostgreSQL answers, then
    /// forgotten.
    Orphan,
}

/// A batch PostgreSQL has not answered yet.
#[derive(Debug, Clone)]
pub(super) struct Owed {
    pub(super) owner: Owner,
    pub(super) batch: Batch,
    /// Being written (in a slice) now.
    pub(super) flying: bool,
    /// PostgreSQL refused it on its own (not for being unreachable): it is sent in a slice of
    /// its own, so it never holds back the others.
    pub(super) solo: bool,
    /// Written under another name than its value's (an orphan's, or one owed under a renamed
    /// value's old name): sent by `send_foreign`, one at a time per name, lowest sequence
    /// first, and no key of that name is snapshotted until they are answered.
    pub(super) foreign: bool,
    /// A foreign batch whose write failed: sent again at the next round, not at every tick.
    pub(super) failed: bool,
}

/// Whether a batch owned by `owner` is foreign (see `Owed::foreign`).
pub(super) fn is_foreign(owner: &Owner, batch: &Batch) -> bool {
    match owner {
        Owner::Orphan => true,
        Owner::Key(k) => *k.name() != *batch.name,
    }
}

/// A slice being written: the owed batches in it, in the order of the job's batches.
pub(super) struct Slice {
    pub(super) entries: Vec<u64>,
    /// When it was handed to the pool (ms).
    pub(super) since: Millis,
}

/// A value that left the keyspace with unflushed usage during the command being run; the
/// keyspace event that follows says whether it lives on elsewhere (renamed, moved) or is gone.
pub(super) struct Unlinked {
    pub(super) key: KeyId,
    pub(super) seq: u64,
    pub(super) renamed: bool,
    pub(super) hours: Vec<HourDelta>,
}

/// The flush's state on the main thread (see the module header).
#[derive(Default)]
pub(super) struct FlushState {
    /// Account keys that may have unflushed usage and are not in the round under way.
    pub(super) tracked: KeyList,
    /// The round under way: keys not snapshotted yet.
    pub(super) round: KeyList,
    /// Owed batches by number.
    pub(super) owed: HashMap<u64, Owed>,
    /// The owed batch of each key that has one (a key has at most one: it is not snapshotted
    /// again until its batch is answered).
    pub(super) by_key: HashMap<KeyId, u64>,
    /// The foreign owed batches, by name (see `Owed::foreign`).
    pub(super) foreign: HashMap<Box<[u8]>, Vec<u64>>,
    pub(super) next_owed: u64,
    /// Slices being written, by number.
    pub(super) in_flight: HashMap<u64, Slice>,
    pub(super) next_slice: u64,
    /// Orphans not sent yet (see `orphans`).
    pub(super) orphans: OrphanQueue,
    /// Values unlinked by the command being run (see `Unlinked`).
    pub(super) unlinked: Vec<Unlinked>,
    /// The source of the `RENAME` or `MOVE` being run (its `..._from` event came first).
    pub(super) moving: Option<KeyId>,
    /// When the last round was started (ms).
    pub(super) last_flush: Millis,
    /// How much sooner than `quota.flush-interval` the next round starts (ms, drawn at each
    /// round: see `round_cut`), and the generator it is drawn from.
    pub(super) cut: Millis,
    pub(super) rng: Rng,
    /// This node was a master at the last tick (the list was rebuilt for it).
    pub(super) master: bool,
    /// The round under way: main-thread µs of its snapshots so far, its longest tick, and the
    /// accounts snapshotted.
    pub(super) round_us: u64,
    pub(super) round_longest_us: u64,
    pub(super) round_accounts: u64,
}

thread_local! {
    pub(super) static STATE: RefCell<FlushState> = RefCell::new(FlushState::default());
}

impl FlushState {
    pub(super) fn insert(&mut self, n: u64, owed: Owed) {
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

    pub(super) fn add(&mut self, owed: Owed) -> u64 {
        self.next_owed += 1;
        let n = self.next_owed;
        self.insert(n, owed);
        n
    }

    pub(super) fn remove(&mut self, n: u64) -> Option<Owed> {
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
    pub(super) fn reown(&mut self, n: u64, owner: Owner) {
        if let Some(mut owed) = self.remove(n) {
            owed.foreign = is_foreign(&owner, &owed.batch);
            owed.owner = owner;
            self.insert(n, owed);
        }
    }

    /// Whether `key` may be snapshotted now: it has no owed batch of its own and no batch of
    /// its name is owed elsewhere.
    pub(super) fn snapshottable(&self, key: &KeyId, name: &[u8]) -> bool {
        !self.by_key.contains_key(key)
            && (self.foreign.is_empty() || !self.foreign.contains_key(name))
            && !self.orphans.has_name(name)
    }

    /// The foreign batch of each name to send now: none for a name with one being written,
    /// else the lowest sequence (PostgreSQL skips a lower one that comes after a higher).
    pub(super) fn next_foreign(&self) -> Vec<u64> {
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
                first.filter(|(_, o)| !o.failed).map(|(n, _)| n)
            })
            .collect()
    }

    /// Takes the slice `number` off the slices being written.
    pub(super) fn land(&mut self, number: u64) -> Option<Slice> {
        let slice = self.in_flight.remove(&number)?;
        for n in &slice.entries {
            if let Some(owed) = self.owed.get_mut(n) {
                owed.flying = false;
            }
        }
        Some(slice)
    }
}

/// Puts an account key on the list of accounts to flush.
pub(crate) fn track(db: i32, key: &[u8]) {
    STATE.with(|s| s.borrow_mut().tracked.push(&KeyId::new(db, key)));
}
