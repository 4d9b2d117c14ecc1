//! Usage follows its value through the keyspace. Redis tells the module (see
//! `ffi::key_events`) when an account value leaves the keyspace (`on_unlinked`, before it is
//! freed or put under another name) and what became of it (`on_key_event`): an owed batch's
//! answer goes to the value wherever `RENAME` or `MOVE` took it (and `SWAPDB` its database); a
//! renamed value is marked, on every node, so its sequence starts anew under its new name; a
//! value evicted or overwritten leaves an orphan batch; `DEL`, `UNLINK`, `MIGRATE`'s deletion,
//! `FLUSHDB` and `FLUSHALL` drop the usage not sent yet and complete the batches already sent.

use super::keys::KeyId;
use super::orphans::Orphan;
use super::state::{track, FlushState, Owed, Owner, Unlinked, STATE};
use crate::core::account::pending::fresh_seq;
use crate::core::account::Account;
use crate::core::ledger::HourDelta;
use crate::core::Millis;
use crate::ffi::account_type::AccountKey;
use crate::ffi::ctx::Ctx;
use crate::ffi::key_events::KeyEvent;

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
    let now = crate::runtime::clock::now_ms();
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
        self.orphans.push(&Orphan {
            name: key.name(),
            seq,
            rev: now.max(0) as u64,
            hours,
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
                h.debits = h.debits.zip_with(s.debits, i64::saturating_sub);
            }
            None => out.push(HourDelta {
                hour: s.hour,
                requests: s.requests.saturating_neg(),
                tokens: s.tokens.saturating_neg(),
                debits: s.debits.map(i64::saturating_neg),
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
