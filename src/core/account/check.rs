//! The invariants every stored account state satisfies (`Account::check`): `decode` accepts
//! only states that pass, since the bytes come from RDB files, `RESTORE` payloads and the AOF.

use std::collections::HashSet;

use super::{
    Account, BadState, Counter, LeaseId, MAX_COST, MAX_LEASES, MAX_LEASE_ID_LEN, MAX_SETTLED,
};
use crate::core::ledger::{Ledger, MAX_DECODED_HOURS, MAX_HOLDS};
use crate::core::window::{Window, LAST_MS};

impl Account {
    /// Checks every invariant the account's code relies on: counter windows and lease times
    /// within the range windows are kept for (so no window or date computation can overflow),
    /// each lease's day before its expiry (its month follows from the day), leases in expiry
    /// order, costs within `MAX_COST`, no lease id held or settled twice, ids of a valid length, at most `MAX_LEASES`
    /// leases and `MAX_SETTLED` settled ids, and the kept sums (reservations, first expiry)
    /// equal to what the leases say; rates with a rate above 0 and times in range.
    pub(crate) fn check(&self) -> Result<(), BadState> {
        if Counter::ALL
            .iter()
            .any(|c| self.counter(*c).0 > c.window().last_index())
        {
            return Err(BadState("counter window out of range"));
        }
        if let Some(extra) = &self.extra {
            if extra.is_empty() {
                return Err(BadState("an empty lease part is kept"));
            }
            if extra.settled.as_ref().is_some_and(|s| s.is_empty()) {
                return Err(BadState("an empty settled list is kept"));
            }
            if extra.last_expiry != extra.leases.back().map_or(0, |l| l.expires_at) {
                return Err(BadState("last expiry differs from the last lease's"));
            }
        }
        if self.leases().len() > MAX_LEASES {
            return Err(BadState("more leases than an account may hold"));
        }
        if self.settled().len() > MAX_SETTLED {
            return Err(BadState("more settled lease ids than an account keeps"));
        }
        let mut previous = 0;
        let mut held = HashSet::with_capacity(self.leases().len());
        for lease in self.leases() {
            if !(1..=LAST_MS).contains(&lease.expires_at) {
                return Err(BadState("lease expiry out of range"));
            }
            if lease.expires_at < previous {
                return Err(BadState("leases out of expiry order"));
            }
            previous = lease.expires_at;
            let day = i64::from(lease.day);
            if !(0..=Window::Day.last_index()).contains(&day) {
                return Err(BadState("lease day out of range"));
            }
            let day_start = Window::Day.start_of(day);
            if day_start >= lease.expires_at {
                return Err(BadState("lease expires before the day it was counted in"));
            }
            if lease.cost > MAX_COST {
                return Err(BadState("lease cost out of range"));
            }
            valid_id(&lease.id)?;
            if !held.insert(&lease.id) {
                return Err(BadState("lease id held twice"));
            }
        }
        let mut settled = HashSet::with_capacity(self.settled().len());
        for (id, until) in self.settled() {
            if !(1..=LAST_MS).contains(until) {
                return Err(BadState("settled lease time out of range"));
            }
            valid_id(id)?;
            if !settled.insert(id) {
                return Err(BadState("lease id settled twice"));
            }
        }
        let sum = self
            .leases()
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.reserved));
        if self.reserved() != sum {
            return Err(BadState(
                "reserved tokens differ from the leases' reservations",
            ));
        }
        if self.first_expiry() != self.leases().front().map_or(0, |l| l.expires_at) {
            return Err(BadState("first expiry differs from the first lease's"));
        }
        if let Some(ledger) = self.ledger() {
            check_ledger(ledger)?;
        }
        if let Some(rates) = self.rates() {
            if rates.is_empty() {
                return Err(BadState("an empty rates part is kept"));
            }
            for r in &rates.0 {
                let unset = !r.is_set() && (r.level != 0 || r.at != 0);
                if unset || !(0..=LAST_MS).contains(&r.at) {
                    return Err(BadState("a rate's state out of range"));
                }
            }
        }
        Ok(())
    }
}

/// The ledger part's invariants: hours in range, strictly ascending and within the bound;
/// holds within the bound, in range and with distinct tags.
fn check_ledger(ledger: &Ledger) -> Result<(), BadState> {
    if ledger.hours.len() > MAX_DECODED_HOURS {
        return Err(BadState("more unflushed hours than an account keeps"));
    }
    let mut previous = -1;
    for h in &ledger.hours {
        if !(0..=Window::Hour.last_index()).contains(&h.hour) {
            return Err(BadState("ledger hour out of range"));
        }
        if h.hour <= previous {
            return Err(BadState("ledger hours out of order"));
        }
        previous = h.hour;
    }
    if ledger.holds.len() > MAX_HOLDS {
        return Err(BadState("more balance holds than an account keeps"));
    }
    let mut tags = HashSet::with_capacity(ledger.holds.len());
    for hold in &ledger.holds {
        if !(1..=LAST_MS).contains(&hold.expires_at) {
            return Err(BadState("balance hold expiry out of range"));
        }
        if hold.paid_requests > MAX_COST {
            return Err(BadState("balance hold cost out of range"));
        }
        if !tags.insert(hold.tag) {
            return Err(BadState("balance hold held twice"));
        }
    }
    Ok(())
}

/// A lease id as a caller may give it: 1..=`MAX_LEASE_ID_LEN` bytes.
fn valid_id(id: &LeaseId) -> Result<(), BadState> {
    match id {
        LeaseId::Short(_) => Ok(()),
        LeaseId::Named(s) if (1..=MAX_LEASE_ID_LEN).contains(&s.len()) => Ok(()),
        LeaseId::Named(_) => Err(BadState("lease id length out of range")),
    }
}
