//! The ledger's lists in few bytes per item: keys to flush (`KeyList`) and any other records
//! (`Packed`, which the orphan queue uses). Every account with unflushed usage is on the key
//! list, so its size per key adds to the memory of every active account.
//!
//! A key is kept as its database and, for a canonical account key (`AccountId::key`), its
//! compact form (`ids::compact_account_key`: the four ids with one-byte lengths, about half the
//! name); any other name as it is. The lists pack records one after another into large
//! chunks: no allocation, pointer or hash-table slot per item. The key list does not look for
//! duplicates: the account's `tracked` flag keeps a key from being listed twice, and the flush
//! skips a key it is already writing (see `ledger::snapshot`).

use std::collections::VecDeque;

use crate::core::ids;

/// An account key: its database and name, encoded. The database is one byte below 255 (else
/// 255 and four bytes), then a mark: 1 and the compact form of a canonical account key, or 0
/// and the name as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct KeyId(Box<[u8]>);

impl KeyId {
    pub(super) fn new(db: i32, name: &[u8]) -> KeyId {
        let mut out = Vec::with_capacity(name.len() / 2 + 8);
        match u8::try_from(db) {
            Ok(small) if small < u8::MAX => out.push(small),
            _ => {
                out.push(u8::MAX);
                out.extend_from_slice(&db.to_le_bytes());
            }
        }
        let mark = out.len();
        out.push(1);
        if !ids::compact_account_key(name, &mut out) {
            out.truncate(mark);
            out.push(0);
            out.extend_from_slice(name);
        }
        KeyId(out.into_boxed_slice())
    }

    /// The database, and where the name's mark is.
    fn split(&self) -> (i32, usize) {
        match self.0.first() {
            Some(&u8::MAX) => {
                let db = self.0.get(1..5).and_then(|b| b.try_into().ok());
                (db.map_or(-1, i32::from_le_bytes), 5)
            }
            Some(db) => (i32::from(*db), 1),
            None => (-1, 0),
        }
    }

    pub(super) fn db(&self) -> i32 {
        self.split().0
    }

    /// The encoded bytes (database, mark, name), to keep in a packed record.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key of bytes `bytes` gave.
    pub(super) fn from_bytes(bytes: &[u8]) -> KeyId {
        KeyId(bytes.into())
    }

    /// The same key in database `db`.
    pub(super) fn in_db(&self, db: i32) -> KeyId {
        let (_, at) = self.split();
        let mut out = KeyId::new(db, b"").0.into_vec();
        out.truncate(out.len() - 1); // the empty name's mark
        out.extend_from_slice(self.0.get(at..).unwrap_or_default());
        KeyId(out.into_boxed_slice())
    }

    pub(super) fn name(&self) -> Box<[u8]> {
        let (_, at) = self.split();
        match self.0.get(at..).and_then(|r| r.split_first()) {
            Some((1, compact)) => ids::account_key_of_compact(compact)
                .map(|k| k.as_slice().into())
                .unwrap_or_default(),
            Some((_, name)) => name.into(),
            None => Box::default(),
        }
    }
}

/// Bytes of one chunk of a list (a record longer than this gets a chunk of its own).
const CHUNK: usize = 64 * 1024;

/// Byte records, first in first out, packed into chunks: each a varint length and the bytes.
#[derive(Default)]
pub(super) struct Packed {
    chunks: VecDeque<Vec<u8>>,
    /// Where the next record to take starts in the first chunk.
    read: usize,
    len: usize,
}

impl Packed {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn push(&mut self, record: &[u8]) {
        let n = record.len();
        let need = n + 5;
        let room = self
            .chunks
            .back()
            .is_some_and(|c| c.capacity() - c.len() >= need);
        if !room {
            self.chunks.push_back(Vec::with_capacity(need.max(CHUNK)));
        }
        if let Some(chunk) = self.chunks.back_mut() {
            let mut v = n;
            while v >= 0x80 {
                chunk.push((v as u8) | 0x80);
                v >>= 7;
            }
            chunk.push(v as u8);
            chunk.extend_from_slice(record);
            self.len += 1;
        }
    }

    /// Takes the first record.
    pub(super) fn pop(&mut self) -> Option<Box<[u8]>> {
        loop {
            let chunk = self.chunks.front()?;
            let mut rest = chunk.get(self.read..).unwrap_or_default();
            if rest.is_empty() {
                self.chunks.pop_front();
                self.read = 0;
                continue;
            }
            let before = rest.len();
            let n = crate::core::varint::take_u64(&mut rest).map_or(0, |(v, _)| v as usize);
            let record = rest.get(..n).map(Box::<[u8]>::from).unwrap_or_default();
            self.read += before - rest.len() + n;
            self.len = self.len.saturating_sub(1);
            return Some(record);
        }
    }

    /// Moves every record of `other` to the end of this list.
    pub(super) fn append(&mut self, other: &mut Packed) {
        if self.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        while let Some(record) = other.pop() {
            self.push(&record);
        }
    }
}

/// Keys, first in first out (see the module header).
#[derive(Default)]
pub(super) struct KeyList(Packed);

impl KeyList {
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn push(&mut self, key: &KeyId) {
        self.0.push(&key.0);
    }

    /// Takes the first key.
    pub(super) fn pop(&mut self) -> Option<KeyId> {
        self.0.pop().map(KeyId)
    }

    /// Takes up to `n` keys.
    pub(super) fn take(&mut self, n: usize) -> Vec<KeyId> {
        let mut out = Vec::with_capacity(n.min(self.len()));
        while out.len() < n {
            match self.pop() {
                Some(key) => out.push(key),
                None => break,
            }
        }
        out
    }

    /// Moves every key of `other` to the end of this list.
    pub(super) fn append(&mut self, other: &mut KeyList) {
        self.0.append(&mut other.0);
    }

    pub(super) fn clear(&mut self) {
        *self = KeyList::default();
    }
}

impl Extend<KeyId> for KeyList {
    fn extend<I: IntoIterator<Item = KeyId>>(&mut self, keys: I) {
        for key in keys {
            self.push(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{KeyId, KeyList, CHUNK};
    use crate::core::ids::AccountId;

    /// Every listed key gives back its database and name, compact or not.
    #[test]
    fn listed_keys_give_back_their_database_and_name() {
        let id = AccountId::parse([b"acme", b"chat", b"u000000000042", b"*"]).unwrap();
        let account = id.key().0;
        for db in [0, 15, 254, 255, 4096, i32::MAX] {
            for name in [account.as_slice(), b"renamed:by-hand", b""] {
                let listed = KeyId::new(db, name);
                assert_eq!((listed.db(), &*listed.name()), (db, name), "{db} {name:?}");
            }
        }
        // The compact form: one byte of database, a mark and the ids with one-byte lengths.
        assert_eq!(KeyId::new(0, &account).0.len(), 2 + 4 + 4 + 13 + 1 + 4);
        assert_ne!(KeyId::new(0, &account), KeyId::new(1, &account));
    }

    /// Keys come out in the order they went in, across chunks, appends and keys longer than a
    /// chunk, and the list knows how many it holds.
    #[test]
    fn the_list_gives_keys_back_in_order() {
        let key = |i: usize| KeyId::new((i % 300) as i32, format!("k{i}").as_bytes());
        let mut list = KeyList::default();
        let mut other = KeyList::default();
        let long = KeyId::new(3, &vec![b'x'; CHUNK * 2]);
        for i in 0..20_000 {
            list.push(&key(i));
        }
        list.push(&long);
        other.extend((20_000..30_000).map(key));
        assert!(list.0.chunks.len() > 2);
        list.append(&mut other);
        assert!(other.is_empty());
        assert_eq!(list.len(), 30_001);
        let first = list.take(20_000);
        assert!(first.iter().enumerate().all(|(i, k)| *k == key(i)));
        assert_eq!(list.pop(), Some(long));
        let mut n = 20_000;
        while let Some(k) = list.pop() {
            assert_eq!(k, key(n));
            n += 1;
        }
        assert_eq!((n, list.len(), list.is_empty()), (30_000, 0, true));
        assert!(list.0.chunks.is_empty());
        let mut empty = KeyList::default();
        empty.append(&mut list);
        assert_eq!(empty.pop(), None);
    }

    /// Random pushes, takes and appends between two lists give what a plain queue gives.
    #[test]
    fn the_list_behaves_as_a_queue() {
        let mut rng = crate::core::test_rng(7);
        let mut lists = [KeyList::default(), KeyList::default()];
        let mut model: [std::collections::VecDeque<KeyId>; 2] = Default::default();
        for step in 0..200_000u32 {
            let which = rng(2) as usize;
            match rng(10) {
                0..=5 => {
                    let len = if rng(1000) == 0 {
                        CHUNK + 7
                    } else {
                        rng(60) as usize
                    };
                    let key = KeyId::new(rng(20) as i32, &vec![b'a' + (step % 26) as u8; len]);
                    lists[which].push(&key);
                    model[which].push_back(key);
                }
                6..=8 => {
                    let n = rng(50) as usize;
                    let got = lists[which].take(n);
                    let want: Vec<KeyId> =
                        (0..n).filter_map(|_| model[which].pop_front()).collect();
                    assert_eq!(got, want, "step {step}");
                }
                _ => {
                    let [a, b] = &mut lists;
                    let (to, from) = if which == 0 { (a, b) } else { (b, a) };
                    to.append(from);
                    let moved: Vec<KeyId> = model[1 - which].drain(..).collect();
                    model[which].extend(moved);
                }
            }
            assert_eq!(lists[0].len(), model[0].len(), "step {step}");
            assert_eq!(lists[1].len(), model[1].len(), "step {step}");
        }
    }
}
