//! Unit tests of effects: encoding, decoding and applying.

use super::codec::*;
use super::*;
use crate::core::account::{AdmitRequest, MAX_COST, MAX_LEASES};
use crate::core::credit::PerKind;
use crate::core::ledger::Hold;
use crate::core::policy::{EffectivePolicy, LimitField};
use crate::core::varint::write_u64;
use proptest::prelude::*;

const T0: Millis = 1_795_000_000_000;

fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
    EffectivePolicy::of(fields)
}

/// The master's side of one command, as the shell runs it: decide, describe, encode; then
/// the replica's: decode, apply.
struct Pair {
    master: Account,
    replica: Account,
    bytes: usize,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            master: Account::default(),
            replica: Account::default(),
            bytes: 0,
        }
    }

    fn ship(&mut self, encoded: Option<EncodedEffect>) {
        if let Some(bytes) = encoded {
            self.bytes = bytes.len();
            let effect = Effect::decode(&bytes).expect("decodes");
            assert_eq!(effect.encode(), bytes, "one encoding per effect");
            effect.apply(&mut self.replica).expect("applies");
        }
    }

    fn admit(&mut self, p: &EffectivePolicy, req: &AdmitRequest<'_>, now: Millis, id: u64) {
        let Ok(d) = self.master.admit(p, req, now, || id) else {
            return;
        };
        let encoded = Effect::admitted(now, &d, &self.master).map(|e| e.encode());
        assert_eq!(encoded.is_some(), d.changed(), "{d:?}");
        self.ship(encoded);
    }

    fn commit(&mut self, tokens: u64, lease: Option<&str>, now: Millis) {
        let pruned = self.master.prune(now);
        let before = self.master.rates().copied();
        let encoded = match self.master.commit(tokens, lease, now) {
            Ok(out) => {
                let rates = rates_change(before, &self.master);
                Effect::committed(now, pruned, tokens, lease, &out, rates)
            }
            Err(_) => Effect::pruned(now, pruned),
        }
        .map(|e| e.encode());
        self.ship(encoded);
    }

    fn release(&mut self, lease: &str, now: Millis) {
        let pruned = self.master.prune(now);
        let before = self.master.rates().copied();
        let released = self.master.release(lease, now);
        let rates = rates_change(before, &self.master);
        let encoded = Effect::released(now, pruned, lease, released, rates).map(|e| e.encode());
        self.ship(encoded);
    }
}

/// After any sequence of admissions, commits and releases under any policies, the replica
/// that applied the effects holds exactly the master's state (leases, reservations,
/// settled ids, counters, expiry), and every effect stays small.
#[test]
fn a_replica_applying_the_effects_ends_with_the_masters_state() {
    // A 64-bit LCG (Knuth's MMIX constants): the high bits are random enough here.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n.max(1)
    };
    let fields = LimitField::ALL;
    for case in 0..300 {
        let mut limits = Vec::new();
        for f in fields {
            if next(3) == 0 {
                limits.push((f, next(12)));
            }
        }
        let p = policy(&limits);
        let mut pair = Pair::new();
        let mut now = T0 + next(40 * 86_400_000) as Millis;
        let mut ids: Vec<String> = vec!["named-a".into(), "é".into(), "x".repeat(128)];
        for step in 0..150u64 {
            // Mostly within a window, now and then an hour or more later.
            let jump = if next(50) == 0 { 3_600 } else { 1 };
            now += next(2000) as Millis * jump;
            let pick = next(ids.len() as u64 + 2) as usize;
            let named = ids.get(pick).map(String::as_str);
            let what = next(5);
            if what >= 3 {
                match named {
                    Some(id) if what == 4 => pair.release(id, now),
                    _ => pair.commit(next(7), named, now),
                }
            } else {
                let (with_id, ttl, reserve, peek) = (next(2), next(3000), next(18), next(10));
                let req = AdmitRequest {
                    lease: named.filter(|_| with_id == 0),
                    lease_ttl_ms: 1 + ttl as Millis,
                    reserve: (reserve < 9).then_some(reserve),
                    peek: peek == 0,
                    // Mostly 1; now and then a free probe or a larger cost.
                    cost: [1, 1, 1, 0, 3, 1_000][next(6) as usize],
                    balance: None,
                };
                let id = (case << 20) + step + 1;
                pair.admit(&p, &req, now, id);
                ids.push(format!("{id:016x}"));
            }
            assert_eq!(pair.replica, pair.master, "case {case} step {step}");
            assert_eq!(pair.replica.encode(), pair.master.encode());
            assert_eq!(pair.replica.retention(), pair.master.retention());
            assert!(pair.bytes < 200, "{} bytes", pair.bytes);
        }
    }
}

/// With the most leases an account may hold, one command's effect is as small as with one.
#[test]
fn an_effect_does_not_grow_with_the_leases_held() {
    let p = policy(&[(LimitField::MaxConcurrent, MAX_LEASES as u64 + 1)]);
    let mut pair = Pair::new();
    let mut ids = Vec::new();
    for i in 0..MAX_LEASES {
        let id = format!("{i:0>128}");
        let req = AdmitRequest {
            lease: Some(&id),
            lease_ttl_ms: 600_000,
            reserve: Some(1),
            peek: false,
            cost: 1,
            balance: None,
        };
        pair.admit(&p, &req, T0, 0);
        ids.push(id);
    }
    assert_eq!(pair.master.leases().len(), MAX_LEASES);
    assert!(pair.bytes < 170, "admit: {} bytes", pair.bytes);
    pair.commit(1, Some(&ids[7]), T0 + 1);
    assert!(pair.bytes < 170, "commit: {} bytes", pair.bytes);
    pair.release(&ids[8], T0 + 2);
    assert!(pair.bytes < 170, "release: {} bytes", pair.bytes);
    // Every lease expires: one prune of 4,094 leases is a dozen bytes.
    pair.commit(0, None, T0 + 700_000);
    assert!(pair.bytes < 20, "prune: {} bytes", pair.bytes);
    assert!(pair.master.leases().is_empty());
    assert_eq!(pair.replica, pair.master);
}

#[test]
fn decoding_rejects_what_encode_never_writes() {
    let e = Effect {
        prune: true,
        change: Some(Change::Commit {
            tokens: 5,
            settled: Some((LeaseRef::Named("lease-1"), T0 + 60_000)),
        }),
        balance: Some(BalanceChange {
            debits: PerKind {
                requests: -1,
                tokens: 7,
            },
            hold: None,
            settle: Some(99),
        }),
        ..Effect::empty(T0)
    };
    let bytes = e.encode();
    assert_eq!(Effect::decode(&bytes), Ok(e));
    for cut in 0..bytes.len() {
        assert!(Effect::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut extra = bytes.to_vec();
    extra.push(0);
    assert_eq!(Effect::decode(&extra), Err(EffectError::Trailing));
    // Nothing to do, unknown flags, a lifetime mark on a release, a generated id as text.
    assert_eq!(Effect::decode(&[VERSION, 0, 0]), Err(EffectError::Empty));
    assert_eq!(
        Effect::decode(&[VERSION, ACK | (KIND_COUNT << KIND_SHIFT), 0]),
        Err(EffectError::Flags)
    );
    let bad = [
        VERSION,
        (KIND_RELEASE << KIND_SHIFT) | LIFETIME,
        0,
        ID_SHORT,
        1,
    ];
    assert_eq!(Effect::decode(&bad), Err(EffectError::Flags));
    let mut text = vec![VERSION, KIND_RELEASE << KIND_SHIFT, 0, ID_NAMED, 16];
    text.extend_from_slice(b"00000000000000ff");
    assert_eq!(Effect::decode(&text), Err(EffectError::LeaseId));
    // A number in a longer form than needed.
    assert_eq!(
        Effect::decode(&[VERSION, PRUNE, 0x80, 0x00]),
        Err(EffectError::Number)
    );
    assert_eq!(Effect::decode(&[6, PRUNE, 0]), Err(EffectError::Version));
    // The costs' versions only for what needs them.
    assert_eq!(
        Effect::decode(&[VERSION_COSTS, PRUNE, 0]),
        Err(EffectError::Version)
    );
    // The rates' version needs its rates.
    assert_eq!(
        Effect::decode(&[VERSION_RATES, PRUNE, 0]),
        Err(EffectError::Truncated)
    );
    assert_eq!(
        Effect::decode(&[VERSION_RATES, PRUNE, 0, 8]),
        Err(EffectError::Number)
    );
}

/// A rename's rebase travels alone, round-trips, and starts the sequence anew on a replica
/// as on the master (it only ever grows).
#[test]
fn a_rebase_starts_a_renamed_accounts_sequence_anew() {
    let e = Effect::rebased(T0, 42 << 20);
    let bytes = e.encode();
    assert_eq!(Effect::decode(&bytes), Ok(e.clone()));
    for cut in 0..bytes.len() {
        assert!(Effect::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut extra = bytes.to_vec();
    extra.push(0);
    assert_eq!(Effect::decode(&extra), Err(EffectError::Trailing));
    let mut master = Account::default();
    master.count_request(
        T0,
        Window::Hour.index(T0),
        Window::Day.index(T0),
        Window::Month.index(T0),
        1,
    );
    master.mark_renamed();
    assert!(master.is_renamed());
    let mut replica = Account::decode(&master.encode()).unwrap();
    assert!(replica.is_renamed(), "the mark is part of the state");
    let fresh = crate::core::account::pending::fresh_seq(T0);
    assert!(fresh > master.batch_seq());
    Effect::rebased(T0, fresh).apply(&mut replica).unwrap();
    master.rebase(fresh);
    assert_eq!(replica, master);
    assert!(!master.is_renamed());
    assert_eq!(master.batch_seq(), fresh);
    // A lower sequence never takes it back.
    master.rebase(1);
    assert_eq!(master.batch_seq(), fresh);
}

/// An admission's cost travels with its count (and a hold's paid requests with the hold) in
/// the costs' versions, only when it is not 1: an effect of cost 1 keeps its older bytes. A
/// replica counts the cost, and its lease gives back that cost when released.
#[test]
fn a_cost_travels_with_its_count_and_its_release_refunds_it_on_a_replica() {
    let p = policy(&[(LimitField::RequestsPerDay, 100)]);
    let req = |cost| AdmitRequest {
        lease: Some("L"),
        lease_ttl_ms: 60_000,
        reserve: None,
        peek: false,
        cost,
        balance: None,
    };
    let mut one = Account::default();
    let d = one.admit(&p, &req(1), T0, || 1).unwrap();
    let bytes = Effect::admitted(T0, &d, &one).unwrap().encode();
    assert_eq!(bytes[0], VERSION);
    let mut pair = Pair::new();
    pair.admit(&p, &req(7), T0, 1);
    let d = Account::default().admit(&p, &req(7), T0, || 1).unwrap();
    let bytes = Effect::admitted(T0, &d, &pair.master).unwrap().encode();
    assert_eq!(bytes[0], VERSION_COSTS);
    assert_eq!(pair.replica.usage(T0).requests_per_day, 7);
    assert_eq!(pair.replica.leases().front().map(|l| l.cost), Some(7));
    pair.release("L", T0 + 1);
    assert_eq!(pair.replica.usage(T0).requests_per_day, 0);
    assert_eq!(pair.replica, pair.master);
    // With the smooth rates' state too.
    let rated = policy(&[(LimitField::RequestsPerSecond, 10)]);
    let mut pair = Pair::new();
    pair.admit(&rated, &req(4), T0, 1);
    assert_eq!(pair.replica.usage(T0).rates, [4, 0, 0]);
    assert_eq!(pair.master.encode(), pair.replica.encode());
    // A hold that paid for 3 requests.
    let hold = |paid_requests| Effect {
        balance: Some(BalanceChange {
            debits: PerKind {
                requests: i64::from(paid_requests),
                tokens: 0,
            },
            hold: Some(Hold {
                tag: 9,
                expires_at: T0 + 1,
                tokens: 0,
                paid_requests,
            }),
            settle: None,
        }),
        ..Effect::empty(T0)
    };
    for (paid, version) in [(0, VERSION), (1, VERSION), (3, VERSION_COSTS)] {
        let bytes = hold(paid).encode();
        assert_eq!(bytes[0], version, "{paid}");
        assert_eq!(Effect::decode(&bytes), Ok(hold(paid)));
    }
    // A cost beyond the bound is refused.
    let mut big = hold(3).encode().to_vec();
    let last = big.len() - 1;
    big.truncate(last);
    write_u64(u64::from(MAX_COST) + 1, |b| big.push(b));
    assert_eq!(Effect::decode(&big), Err(EffectError::Number));
}

#[test]
fn every_flag_bit_has_a_meaning() {
    assert_eq!(KNOWN, u8::MAX);
}

#[test]
fn a_release_of_a_lease_not_held_changes_nothing() {
    let mut acc = Account::default();
    let e = Effect {
        prune: true,
        change: Some(Change::Release {
            lease: LeaseRef::Short(7),
        }),
        ..Effect::empty(T0)
    };
    assert_eq!(e.apply(&mut acc), Err(EffectError::NotHeld));
    assert_eq!(acc, Account::default());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Any bytes decode to an effect or an error, never a panic; an effect decoded has
    /// exactly those bytes as its encoding, and applying it to an account never panics.
    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(effect) = Effect::decode(&bytes) {
            prop_assert_eq!(effect.encode().to_vec(), bytes.clone());
            let mut acc = Account::default();
            let _ = effect.apply(&mut acc);
        }
    }

    /// Bytes that start like an effect (version and flags right) reach deeper checks.
    #[test]
    fn near_effects_decode_or_fail_cleanly(
        version in prop::sample::select(vec![
            VERSION,
            VERSION_RATES,
            VERSION_COSTS,
            VERSION_COSTS_RATES,
        ]),
        flags in any::<u8>(),
        rest in proptest::collection::vec(any::<u8>(), 0..48),
    ) {
        let mut bytes = vec![version, flags];
        bytes.extend_from_slice(&rest);
        if let Ok(effect) = Effect::decode(&bytes) {
            prop_assert_eq!(effect.encode().to_vec(), bytes.clone());
            let mut acc = Account::default();
            let _ = effect.apply(&mut acc);
        }
    }
}
