//! The credits cache as a data structure: one entry per user with all of the user's active
//! rows ("no credits" is an entry too), fresh and stale ages, one load in flight per user with
//! the callers waiting on it, and a size bound enforced by sampled least-recently-used eviction
//! (the way Redis approximates LRU).
//!
//! It never reads the clock and never talks to Postgres: the caller passes `now`, starts the
//! loads this structure asks for and reports their outcome with `complete`. Waiters (`W`) are
//! opaque; every waiter put in comes back out of exactly one of `complete`, `abort_flight`.

use std::sync::Arc;

use ahash::RandomState;
use indexmap::IndexMap;

use super::credit::Replenishment;
use super::policy::CachedPolicy;
use super::Millis;

/// A user key, stored inline in the map for the usual sizes (one memory access less per lookup).
type CacheKey = smallvec::SmallVec<[u8; 56]>;

/// The rows of one user, shared between the cache and readers.
pub(crate) type UserCredits = Arc<[Replenishment]>;

/// What the cache can hold: a value that says whether it is a negative answer ("no credits",
/// "no such policy"), which stays fresh for the negative TTL instead of the positive one, and
/// how many bytes of heap it holds (for the cache's byte bound).
pub(crate) trait CacheValue {
    /// Whether this is a negative answer.
    fn is_negative(&self) -> bool;
    /// Bytes of heap the value holds beyond its own size (an estimate: the allocations' sizes
    /// as requested).
    fn heap_bytes(&self) -> usize;
}

impl CacheValue for UserCredits {
    fn is_negative(&self) -> bool {
        self.is_empty()
    }

    fn heap_bytes(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        // The shared allocation (two counts and the rows), and each row's own heap.
        let text = |t: &Option<Box<str>>| t.as_ref().map_or(0, |t| t.len());
        2 * std::mem::size_of::<usize>()
            + self
                .iter()
                .map(|r| {
                    std::mem::size_of::<Replenishment>()
                        + r.bundle_id.len()
                        + text(&r.purchase_id)
                        + text(&r.purchase_amount_usd)
                        + text(&r.purchase_notes)
                        + r.balance
                            .as_ref()
                            .map_or(0, |_| std::mem::size_of::<super::credit::RowBalance>())
                })
                .sum::<usize>()
    }
}

/// A named policy's entry: `None` is "no such policy".
impl CacheValue for CachedPolicy {
    fn is_negative(&self) -> bool {
        self.is_none()
    }

    fn heap_bytes(&self) -> usize {
        0
    }
}

/// Tunables, from the module configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheConfig {
    /// How long a user with rows stays fresh.
    pub ttl_ms: Millis,
    /// How long a user without rows stays fresh.
    pub negative_ttl_ms: Millis,
    /// Most entries kept.
    pub max_entries: usize,
    /// Most bytes the entries may take (their estimate, see `Cache::bytes`).
    pub max_bytes: usize,
    /// After a failed load: how long to wait before trying Postgres again for that user.
    pub retry_ms: Millis,
}

/// Counters for `INFO quota`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub hits: u64,
    pub stale_hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Lookup<'a, V = UserCredits> {
    /// Fresh rows, and until when they stay fresh.
    Fresh(&'a V, Millis),
    /// Rows past their TTL; `refresh` is `Some(flight)` when the caller must start the one
    /// background refresh (and later `complete` it).
    Stale { rows: &'a V, refresh: Option<u64> },
    /// Nothing known yet: `load` is `Some(flight)` when the caller must start the load. Either
    /// way the caller may wait on the flight with `add_waiter`.
    Miss { load: Option<u64> },
    /// The last load failed moments ago and nothing is known: decide without credits.
    Unavailable,
}

#[derive(Debug)]
struct Flight<W> {
    id: u64,
    waiters: Vec<W>,
    /// The entry was written or invalidated while this load ran: its result may be older.
    dirty: bool,
    /// The entry was invalidated (a change made elsewhere) while this load ran: its result
    /// may predate that change, so it is not cached (its waiters still get it).
    invalidated: bool,
}

#[derive(Debug)]
struct Entry<W, V> {
    credits: Option<V>,
    fresh_until: Millis,
    /// No new load before this (after a failure).
    retry_at: Millis,
    last_used: Millis,
    /// Boxed: most entries have no load in flight, and every entry pays for this field.
    flight: Option<Box<Flight<W>>>,
}

/// The cache.
#[derive(Debug)]
pub(crate) struct Cache<W, V = UserCredits> {
    map: IndexMap<CacheKey, Entry<W, V>, RandomState>,
    config: CacheConfig,
    next_flight: u64,
    /// Flights started and not yet completed or aborted.
    in_flight: usize,
    rng: u64,
    stats: CacheStats,
    /// What the entries take: each entry's slot in the map and its key and rows' heap.
    bytes: usize,
    /// Moved on by every change that makes rows read from a fresh entry wrong before that
    /// entry's freshness ends: a write-through (`put`), an invalidation, `mark_stale`, `clear`.
    /// Rows read from a fresh entry at one epoch are what the cache holds for that user, or
    /// held until it was evicted, as long as the epoch is the same and the entry is fresh.
    /// Loads, refreshes and evictions leave it alone: a refresh only replaces rows whose
    /// freshness ended, and an evicted entry's rows stay as good as they were until then
    /// (so a cache that loads and evicts all the time does not retire every `CreditMemo`).
    epoch: u64,
}

const EVICTION_SAMPLES: usize = 5;

impl<W, V: CacheValue> Cache<W, V> {
    /// An empty cache.
    pub(crate) fn new(config: CacheConfig) -> Self {
        Cache {
            map: IndexMap::with_hasher(RandomState::new()),
            config,
            next_flight: 1,
            in_flight: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            stats: CacheStats::default(),
            bytes: 0,
            epoch: 0,
        }
    }

    /// Changes the tunables; shrinks the cache if the bound went down.
    pub(crate) fn set_config(&mut self, config: CacheConfig) {
        self.epoch += 1;
        self.config = config;
        while self.over(0) && self.evict_one() {}
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes the entries take, as estimated: each entry's slot in the map (its key inline up
    /// to 56 bytes, its times) plus the heap of a longer key and of its rows.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the cache is over one of its bounds with `more` bytes added (and an entry when
    /// `more` is not 0).
    fn over(&self, more: usize) -> bool {
        let entries = self.map.len() + usize::from(more > 0);
        entries > self.config.max_entries.max(1)
            || self.bytes.saturating_add(more) > self.config.max_bytes
    }

    /// What one entry takes (see `bytes`).
    fn cost(key: &CacheKey, entry: &Entry<W, V>) -> usize {
        // A map slot and its index, and the key when it does not fit inline.
        std::mem::size_of::<(CacheKey, Entry<W, V>)>()
            + 2 * std::mem::size_of::<usize>()
            + if key.spilled() { key.len() } else { 0 }
            + entry.credits.as_ref().map_or(0, CacheValue::heap_bytes)
    }

    /// Runs `change` on entry `index` and keeps `bytes` right.
    fn change_entry<T>(
        &mut self,
        index: usize,
        change: impl FnOnce(&mut Entry<W, V>) -> T,
    ) -> Option<T> {
        let (key, entry) = self.map.get_index_mut(index)?;
        let before = Self::cost(key, entry);
        let out = change(entry);
        let after = Self::cost(key, entry);
        self.bytes = self.bytes.saturating_sub(before).saturating_add(after);
        Some(out)
    }

    /// Removes entry `index` and its bytes.
    fn remove_index(&mut self, index: usize) -> Option<Entry<W, V>> {
        let (key, entry) = self.map.swap_remove_index(index)?;
        self.bytes = self.bytes.saturating_sub(Self::cost(&key, &entry));
        Some(entry)
    }

    /// Evicts until the cache is within its bounds again (after an entry grew).
    fn shrink(&mut self) {
        while self.over(0) && self.evict_one() {}
    }

    /// Hit, miss and eviction counters.
    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Loads in flight.
    pub(crate) fn flights(&self) -> usize {
        self.in_flight
    }

    /// The current epoch (see the field).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn new_flight(&mut self) -> Box<Flight<W>> {
        let id = self.next_flight;
        self.next_flight += 1;
        self.in_flight += 1;
        Box::new(Flight {
            id,
            waiters: Vec::new(),
            dirty: false,
            invalidated: false,
        })
    }

    /// Looks a user up, starting a load or a background refresh when one is due.
    #[cfg(test)]
    pub(crate) fn lookup(&mut self, key: &[u8], now: Millis) -> Lookup<'_, V> {
        self.lookup_gated(key, now, || true)
    }

    /// `lookup`, where a load may start or be waited for only if `may_load` says so (asked at
    /// most once, and only then): otherwise a user not known is `Unavailable` (and no entry
    /// is made for it), and stale rows are served without a refresh.
    pub(crate) fn lookup_gated(
        &mut self,
        key: &[u8],
        now: Millis,
        may_load: impl FnOnce() -> bool,
    ) -> Lookup<'_, V> {
        let Some(index) = self.map.get_index_of(key) else {
            self.stats.misses += 1;
            if !may_load() {
                return Lookup::Unavailable;
            }
            let flight = self.new_flight();
            let id = flight.id;
            let entry = Entry {
                credits: None,
                fresh_until: 0,
                retry_at: 0,
                last_used: now,
                flight: Some(flight),
            };
            self.insert(key, entry);
            return Lookup::Miss { load: Some(id) };
        };
        let (fresh, known, due, loading) = match self.map.get_index(index) {
            Some((_, e)) => (
                now < e.fresh_until,
                e.credits.is_some(),
                e.flight.is_none() && now >= e.retry_at,
                e.flight.is_some(),
            ),
            None => return Lookup::Unavailable,
        };
        // Asked only when a load would start, or an unknown user's load would be waited on.
        let wants = (due && !(fresh && known)) || (!known && loading);
        let allowed = !wants || may_load();
        if !known && !allowed {
            self.stats.misses += 1;
            return Lookup::Unavailable;
        }
        let flight = if due && !(fresh && known) && allowed {
            Some(self.new_flight())
        } else {
            None
        };
        let started = flight.as_ref().map(|f| f.id);
        match (known, fresh, started.is_some()) {
            (true, true, _) => self.stats.hits += 1,
            (true, false, _) => self.stats.stale_hits += 1,
            (false, _, _) => self.stats.misses += 1,
        }
        let Some((_, entry)) = self.map.get_index_mut(index) else {
            return Lookup::Unavailable;
        };
        entry.last_used = now;
        if flight.is_some() {
            entry.flight = flight;
        }
        let fresh_until = entry.fresh_until;
        match &entry.credits {
            Some(rows) if fresh => Lookup::Fresh(rows, fresh_until),
            Some(rows) => Lookup::Stale {
                rows,
                refresh: started,
            },
            None if started.is_some() || entry.flight.is_some() => Lookup::Miss { load: started },
            None => Lookup::Unavailable,
        }
    }

    /// Waits `waiter` on the user's load in flight; gives it back when there is none.
    pub(crate) fn add_waiter(&mut self, key: &[u8], waiter: W) -> Result<(), W> {
        match self.map.get_mut(key).and_then(|e| e.flight.as_mut()) {
            Some(flight) => {
                flight.waiters.push(waiter);
                Ok(())
            }
            None => Err(waiter),
        }
    }

    /// The load could not be started (queue full): forgets the flight and returns its waiters.
    pub(crate) fn abort_flight(&mut self, key: &[u8], flight: u64) -> Vec<W> {
        let Some(entry) = self.map.get_mut(key) else {
            return Vec::new();
        };
        if entry.flight.as_ref().is_none_or(|f| f.id != flight) {
            return Vec::new();
        }
        let waiters = entry.flight.take().map(|f| f.waiters).unwrap_or_default();
        self.in_flight = self.in_flight.saturating_sub(1);
        if entry.credits.is_none() {
            if let Some(index) = self.map.get_index_of(key) {
                self.remove_index(index);
            }
        }
        waiters
    }

    /// Reports a load's outcome and returns the waiters to answer. A load that raced with a
    /// write-through keeps the newer rows; one that raced with an invalidation is stored stale.
    /// A failed load keeps any rows already known and holds off retries for `retry_ms`.
    pub(crate) fn complete(
        &mut self,
        key: &[u8],
        flight: u64,
        outcome: Result<V, ()>,
        now: Millis,
    ) -> Vec<W> {
        let config = self.config;
        let Some(index) = self.map.get_index_of(key) else {
            return Vec::new();
        };
        let Some((_, entry)) = self.map.get_index_mut(index) else {
            return Vec::new();
        };
        let Some(mine) = entry.flight.take_if(|f| f.id == flight) else {
            return Vec::new();
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let forget = mine.invalidated && entry.credits.is_none() && outcome.is_ok();
        if forget {
            // Nothing newer was written meanwhile: the next lookup loads again rather than
            // serve rows that may predate the invalidation.
            self.remove_index(index);
            return mine.waiters;
        }
        let dirty = mine.dirty;
        self.change_entry(index, |entry| match outcome {
            Ok(rows) => {
                if !(dirty && entry.credits.is_some()) {
                    let ttl = if rows.is_negative() {
                        config.negative_ttl_ms
                    } else {
                        config.ttl_ms
                    };
                    entry.fresh_until = if dirty { now } else { now.saturating_add(ttl) };
                    entry.credits = Some(rows);
                }
                entry.retry_at = 0;
            }
            Err(()) => entry.retry_at = now.saturating_add(config.retry_ms),
        });
        self.shrink();
        mine.waiters
    }

    /// Write-through: the user's rows as just committed.
    pub(crate) fn put(&mut self, key: &[u8], rows: V, now: Millis) {
        self.epoch += 1;
        let ttl = if rows.is_negative() {
            self.config.negative_ttl_ms
        } else {
            self.config.ttl_ms
        };
        let credits = Some(rows);
        if let Some(index) = self.map.get_index_of(key) {
            self.change_entry(index, |entry| {
                entry.credits = credits;
                entry.fresh_until = now.saturating_add(ttl);
                entry.retry_at = 0;
                entry.last_used = now;
                if let Some(f) = entry.flight.as_mut() {
                    f.dirty = true;
                }
            });
            self.shrink();
            return;
        }
        let entry = Entry {
            credits,
            fresh_until: now.saturating_add(ttl),
            retry_at: 0,
            last_used: now,
            flight: None,
        };
        self.insert(key, entry);
    }

    /// Drops a user's entry (a load in flight is kept, marked so its result is not cached).
    pub(crate) fn invalidate(&mut self, key: &[u8]) -> bool {
        self.epoch += 1;
        let Some(index) = self.map.get_index_of(key) else {
            return false;
        };
        let loading = self
            .map
            .get_index(index)
            .is_some_and(|(_, e)| e.flight.is_some());
        if !loading {
            return self.remove_index(index).is_some();
        }
        self.change_entry(index, |entry| {
            entry.credits = None;
            if let Some(f) = entry.flight.as_mut() {
                f.dirty = true;
                f.invalidated = true;
            }
        });
        true
    }

    /// Marks a user's rows stale: still served, refreshed by the next lookup.
    pub(crate) fn mark_stale(&mut self, key: &[u8]) {
        self.epoch += 1;
        if let Some(entry) = self.map.get_mut(key) {
            entry.fresh_until = 0;
            entry.retry_at = 0;
            if let Some(f) = entry.flight.as_mut() {
                f.dirty = true;
            }
        }
    }

    /// Ends every load in flight and returns all their waiters (shutdown).
    pub(crate) fn take_all_waiters(&mut self) -> Vec<W> {
        self.epoch += 1;
        let mut out = Vec::new();
        for entry in self.map.values_mut() {
            if let Some(f) = entry.flight.take() {
                out.extend(f.waiters);
            }
        }
        self.in_flight = 0;
        self.map.retain(|_, e| e.credits.is_some());
        self.recount();
        out
    }

    /// Counts `bytes` again from the entries (after a change to many of them).
    fn recount(&mut self) {
        self.bytes = self.map.iter().map(|(k, e)| Self::cost(k, e)).sum();
    }

    /// Drops everything (loads in flight are kept, marked untrusted).
    pub(crate) fn clear(&mut self) {
        self.epoch += 1;
        self.map.retain(|_, entry| match entry.flight.as_mut() {
            Some(f) => {
                f.dirty = true;
                entry.credits = None;
                true
            }
            None => false,
        });
        self.recount();
    }

    fn insert(&mut self, key: &[u8], entry: Entry<W, V>) {
        let key = CacheKey::from_slice(key);
        let cost = Self::cost(&key, &entry);
        while self.over(cost) && self.evict_one() {}
        self.bytes = self.bytes.saturating_add(cost);
        self.map.insert(key, entry);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: enough to sample eviction candidates.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Evicts the least recently used of a few sampled entries that have no load in flight.
    fn evict_one(&mut self) -> bool {
        let len = self.map.len();
        if len == 0 {
            return false;
        }
        let mut victim: Option<(usize, Millis)> = None;
        for _ in 0..EVICTION_SAMPLES {
            let i = (self.next_random() % len as u64) as usize;
            if let Some((_, e)) = self.map.get_index(i) {
                if e.flight.is_none() && victim.is_none_or(|(_, t)| e.last_used < t) {
                    victim = Some((i, e.last_used));
                }
            }
        }
        let victim = victim.or_else(|| {
            self.map
                .values()
                .position(|e| e.flight.is_none())
                .map(|i| (i, 0))
        });
        match victim {
            Some((i, _)) => {
                self.remove_index(i);
                self.stats.evictions += 1;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
