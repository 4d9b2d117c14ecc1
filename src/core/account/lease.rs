//! Leases over an account: adding and dropping them, pruning the expired ones, and settling
//! them by commit (tokens counted) or release (the admission undone).

use super::{
    Account, AccountError, CommitOutcome, Lease, LeaseId, Now, MAX_SETTLED, SETTLED_MIN_MS,
};
use crate::core::window::seconds_until;
use crate::core::Millis;

impl Account {
    /// Drops leases and settled ids that have expired; true if anything was dropped.
    pub(crate) fn prune(&mut self, now: Millis) -> bool {
        let mut pruned = false;
        while self.leases.front().is_some_and(|l| l.expires_at <= now) {
            if let Some(gone) = self.leases.pop_front() {
                self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
            }
            pruned = true;
        }
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        // A burst of leases must not pin its memory once it is over.
        if pruned && self.leases.capacity() > 16 && self.leases.len() * 4 < self.leases.capacity() {
            self.leases.shrink_to(self.leases.len() * 2);
        }
        if !self.settled.is_empty() {
            let before = self.settled.len();
            self.settled.retain(|(_, until)| *until > now);
            pruned |= before != self.settled.len();
        }
        pruned
    }

    /// Adds a lease, keeping the expiry order (new leases usually go last).
    pub(crate) fn push_lease(&mut self, lease: Lease) {
        let at = self
            .leases
            .iter()
            .rposition(|l| l.expires_at <= lease.expires_at)
            .map_or(0, |i| i + 1);
        self.reserved_sum = self.reserved_sum.saturating_add(lease.reserved);
        if at == 0 {
            self.first_expiry = lease.expires_at;
        }
        self.leases.insert(at, lease);
    }

    /// Removes the lease at `pos`.
    fn remove_lease(&mut self, pos: usize) -> Option<Lease> {
        let gone = self.leases.remove(pos)?;
        self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        Some(gone)
    }

    /// Tokens reserved by live leases (exact after a prune: see `prune_due`).
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved_sum
    }

    /// Records `tokens` used in the hour, day and month windows and settles the lease (its
    /// reservation is dropped). A lease already committed records nothing: its id is remembered
    /// for `SETTLED_MIN_MS`, or until the lease would have expired if that is later. When
    /// `MAX_SETTLED` ids are remembered, a commit of another lease is refused (nothing changes
    /// but the pruning of expired state) rather than forget an id still in its time.
    pub(crate) fn commit(
        &mut self,
        tokens: u64,
        lease: Option<&str>,
        now_ms: Millis,
    ) -> Result<CommitOutcome, AccountError> {
        self.prune(now_ms);
        let now = Now::at(now_ms);
        let mut outcome = CommitOutcome {
            duplicate: false,
            lease_held: false,
            settled_until: None,
            balance_debit: 0,
        };
        if let Some(id) = lease.map(LeaseId::parse) {
            if self.settled.iter().any(|(s, _)| *s == id) {
                outcome.duplicate = true;
                return Ok(outcome);
            }
            if self.settled.len() >= MAX_SETTLED {
                let first_free = self.settled.iter().map(|(_, until)| *until).min();
                let wait = seconds_until(now_ms, first_free.unwrap_or(now_ms));
                return Err(AccountError::TooManySettled {
                    retry_after: wait.max(1),
                });
            }
            let held = self.leases.iter().find(|l| l.id == id);
            let until = now_ms
                .saturating_add(SETTLED_MIN_MS)
                .max(held.map_or(Millis::MIN, |l| l.expires_at));
            outcome.lease_held = self.settle(id, until);
            outcome.settled_until = Some(until);
        }
        outcome.balance_debit = self.token_debit(tokens, &now);
        self.count_tokens(tokens, now_ms, now.hour, now.day, now.month);
        Ok(outcome)
    }

    /// Counts one admitted request in the day and month windows with these indexes and in the
    /// lifetime total.
    pub(crate) fn count_request(&mut self, at: Millis, day: i64, month: i64) {
        self.ledger_mut(at).record(at, 1, 0, [0, 0]);
        self.req_day.add(day, 1);
        self.req_month.add(month, 1);
        self.req_total = self.req_total.saturating_add(1);
    }

    /// Records `tokens` used in the hour, day and month windows with these indexes.
    pub(crate) fn count_tokens(
        &mut self,
        tokens: u64,
        at: Millis,
        hour: i64,
        day: i64,
        month: i64,
    ) {
        let logged = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.ledger_mut(at).record_hour(hour, 0, logged, [0, 0]);
        self.tok_hour.add(hour, tokens);
        self.tok_day.add(day, tokens);
        self.tok_month.add(month, tokens);
    }

    /// Settles lease `id`: drops it if held (with its reservation) and remembers the id until
    /// `until`, so a repeated commit records nothing. True if the lease was held. `commit`
    /// refuses a new id at `MAX_SETTLED`; an effect applied on a replica that somehow finds the
    /// bound reached drops the id that expires first, so the state stays within the bound.
    pub(crate) fn settle(&mut self, id: LeaseId, until: Millis) -> bool {
        let pos = self.leases.iter().position(|l| l.id == id);
        let held = pos.and_then(|pos| self.remove_lease(pos)).is_some();
        if self.settled.len() >= MAX_SETTLED {
            if let Some(oldest) = (0..self.settled.len()).min_by_key(|i| self.settled[*i].1) {
                self.settled.swap_remove(oldest);
            }
        }
        self.settled.push((id, until));
        held
    }

    /// Undoes an admission: frees the lease, drops its reservation and refunds the request in
    /// the windows it was counted in. False if the lease was not held.
    pub(crate) fn release(&mut self, lease: &str, now_ms: Millis) -> bool {
        self.prune(now_ms);
        self.unadmit(&LeaseId::parse(lease), now_ms)
    }

    /// Drops the held lease `id` and refunds its request in the windows it was counted in.
    /// False if the lease is not held.
    pub(crate) fn unadmit(&mut self, id: &LeaseId, at: Millis) -> bool {
        let Some(pos) = self.leases.iter().position(|l| l.id == *id) else {
            return false;
        };
        let Some(held) = self.remove_lease(pos) else {
            return false;
        };
        self.req_day.refund(i64::from(held.day));
        self.req_month.refund(i64::from(held.month));
        self.req_total = self.req_total.saturating_sub(1);
        self.ledger_mut(at).record(at, -1, 0, [0, 0]);
        self.drop_idle_ledger();
        true
    }

    /// The tokens of a commit of `tokens` at `now` that its balance pays: how much further
    /// beyond its limit the most exceeded token window goes (limits as the account's last
    /// admission with a balance found them). Zero without balance terms.
    fn token_debit(&self, tokens: u64, now: &Now) -> u64 {
        let Some(terms) = self.ledger.as_ref().and_then(|l| l.terms) else {
            return 0;
        };
        let counted = [
            self.tok_hour.get(now.hour),
            self.tok_day.get(now.day),
            self.tok_month.get(now.month),
        ];
        counted
            .iter()
            .zip(terms.token_limits)
            .filter(|(_, limit)| *limit != u64::MAX)
            .map(|(c, limit)| {
                let before = c.saturating_sub(limit);
                let after = c.saturating_add(tokens).saturating_sub(limit);
                after - before
            })
            .max()
            .unwrap_or(0)
    }
}
