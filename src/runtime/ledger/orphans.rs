//! Orphan batches waiting to be sent: the usage not flushed yet of account values that left the
//! keyspace with it (evicted by `maxmemory`, overwritten by `RENAME`, `RESTORE` or `COPY`).
//!
//! They are packed, about 60 bytes each with no allocation of their own: an eviction frees
//! memory only if what it leaves behind is much smaller than the key it frees (about 300
//! bytes), so a node under memory pressure does not evict itself into refusing writes. An index
//! of their names' hashes lets a key of the same name wait for them (a collision only makes a
//! key wait one round more).

use std::collections::HashMap;

use super::keys::{KeyId, Packed};
use crate::core::credit::PerKind;
use crate::core::ledger::HourDelta;
use crate::core::varint::{take_u64, unzigzag, write_u64, zigzag};

/// An orphan's batch: the name it is written under and its sequence, revision and hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Orphan {
    pub name: Box<[u8]>,
    pub seq: u64,
    pub rev: u64,
    pub hours: Vec<HourDelta>,
}

/// Orphans, first in first out.
#[derive(Default)]
pub(super) struct OrphanQueue {
    records: Packed,
    names: HashMap<u64, u32>,
}

/// A 64-bit hash of a key name (FNV-1a, then mixed).
pub(super) fn name_hash(name: &[u8]) -> u64 {
    let h = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl OrphanQueue {
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether an orphan of this name waits here.
    pub(super) fn has_name(&self, name: &[u8]) -> bool {
        !self.names.is_empty() && self.names.contains_key(&name_hash(name))
    }

    pub(super) fn push(&mut self, orphan: &Orphan) {
        let key = KeyId::new(0, &orphan.name);
        let mut record = Vec::with_capacity(key.bytes().len() + 24 + 12 * orphan.hours.len());
        put(&mut record, key.bytes().len() as u64);
        record.extend_from_slice(key.bytes());
        put(&mut record, orphan.seq);
        put(&mut record, orphan.rev);
        put(&mut record, orphan.hours.len() as u64);
        for h in &orphan.hours {
            for v in h.fields() {
                put(&mut record, zigzag(v));
            }
        }
        self.records.push(&record);
        *self.names.entry(name_hash(&orphan.name)).or_default() += 1;
    }

    pub(super) fn pop(&mut self) -> Option<Orphan> {
        let record = self.records.pop()?;
        let orphan = decode(&record)?;
        let hash = name_hash(&orphan.name);
        if let Some(count) = self.names.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                self.names.remove(&hash);
            }
        }
        Some(orphan)
    }
}

fn put(out: &mut Vec<u8>, v: u64) {
    write_u64(v, |b| out.push(b));
}

/// What `push` wrote (it wrote nothing else).
fn decode(record: &[u8]) -> Option<Orphan> {
    let mut rest = record;
    let mut next = || take_u64(&mut rest).ok().map(|(v, _)| v);
    let len = usize::try_from(next()?).ok()?;
    let key = KeyId::from_bytes(rest.get(..len)?);
    rest = rest.get(len..)?;
    let mut next = || take_u64(&mut rest).ok().map(|(v, _)| v);
    let (seq, rev, n) = (next()?, next()?, next()?);
    let mut hours = Vec::with_capacity(usize::try_from(n).ok()?.min(1024));
    for _ in 0..n {
        let mut v = || next().map(unzigzag);
        hours.push(HourDelta {
            hour: v()?,
            requests: v()?,
            tokens: v()?,
            debits: PerKind {
                requests: v()?,
                tokens: v()?,
            },
        });
    }
    Some(Orphan {
        name: key.name(),
        seq,
        rev,
        hours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::AccountId;

    fn orphan(user: &[u8], seq: u64, hours: usize) -> Orphan {
        let id = AccountId::parse([b"acme", b"chat", user, b"web"]).unwrap();
        Orphan {
            name: id.key().0.as_slice().into(),
            seq,
            rev: seq + 7,
            hours: (0..hours as i64)
                .map(|i| HourDelta {
                    hour: 490_000 + i,
                    requests: i - 1,
                    tokens: 1_000_000_000_000,
                    debits: PerKind {
                        requests: -3,
                        tokens: 4,
                    },
                })
                .collect(),
        }
    }

    /// Orphans come back as they went in, in order, and their names are known while they wait.
    #[test]
    fn orphans_come_back_whole_and_in_order() {
        let mut q = OrphanQueue::default();
        let all: Vec<Orphan> = (0..500)
            .map(|i| orphan(format!("user{}", i % 50).as_bytes(), i, (i % 4) as usize))
            .collect();
        for o in &all {
            q.push(o);
        }
        let odd = Orphan {
            name: b"not:an:account:key".as_slice().into(),
            ..orphan(b"x", 1, 1)
        };
        q.push(&odd);
        assert_eq!(q.len(), 501);
        assert!(q.has_name(&all[7].name));
        for o in &all {
            assert_eq!(q.pop().as_ref(), Some(o));
        }
        assert!(q.has_name(&odd.name) && !q.has_name(&all[7].name));
        assert_eq!(q.pop(), Some(odd));
        assert!(q.is_empty() && q.pop().is_none());
    }

    /// An orphan with one hour takes about 60 bytes: far less than the account key it leaves.
    #[test]
    fn an_orphan_is_small() {
        let mut q = OrphanQueue::default();
        let o = orphan(b"u000000000042", 1_795_000_000_000 << 20, 1);
        q.push(&o);
        let record = q.records.pop().unwrap();
        assert!(record.len() <= 64, "{} bytes", record.len());
    }
}
