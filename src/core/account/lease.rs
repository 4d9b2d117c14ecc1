//! Leases over an account: adding and dropping them, pruning the expired ones, and settling
//! them by commit (tokens counted) or release (the admission undone).

use super::{
    Account, AccountError, CommitOutcome, Counter, Extra, Lease, LeaseId, Now, MAX_SETTLED,
    SETTLED_MIN_MS,
};
use crate::core::window::{seconds_until, Window};
use crate::core::Millis;

impl Extra {
    /// Drops leases and settled ids that have expired; true if anything was dropped.
    fn prune(&mut self, now: Millis) -> bool {
        let mut pruned = false;
        while self.leases.front().is_some_and(|l| l.expires_at <= now) {
            if let Some(gone) = self.leases.pop_front() {
                self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
            }
            pruned = true;
        }
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        if self.leases.is_empty() {
            self.last_expiry = 0;
        }
        // A burst of leases must not pin its memory once it is over.
        if pruned && self.leases.capacity() > 16 && self.leases.len() * 4 < self.leases.capacity() {
            self.leases.shrink_to(self.leases.len() * 2);
        }
        if let Some(settled) = self.settled.as_deref_mut() {
            let before = settled.len();
            settled.retain(|(_, until)| *until > now);
            pruned |= before != settled.len();
            if settled.is_empty() {
                self.settled = None;
            }
        }
        pruned
    }

    /// Adds a lease, keeping the expiry order (new leases usually go last).
    fn push_lease(&mut self, lease: Lease) {
        self.reserved_sum = self.reserved_sum.saturating_add(lease.reserved);
        if self.leases.is_empty() {
            self.first_expiry = lease.expires_at;
        }
        if self.leases.is_empty() || lease.expires_at >= self.last_expiry {
            // Expires last (the usual case): appended without reading the leases.
            self.last_expiry = lease.expires_at;
            self.leases.push_back(lease);
            return;
        }
        let at = self
            .leases
            .iter()
            .rposition(|l| l.expires_at <= lease.expires_at)
            .map_or(0, |i| i + 1);
        if at == 0 {
            self.first_expiry = lease.expires_at;
        }
        self.leases.insert(at, lease);
    }

    /// Removes the lease `id`, if held.
    fn remove_lease(&mut self, id: &LeaseId) -> Option<Lease> {
        let pos = self.leases.iter().position(|l| l.id == *id)?;
        let gone = self.leases.remove(pos)?;
        self.reserved_sum = self.reserved_sum.saturating_sub(gone.reserved);
        self.first_expiry = self.leases.front().map_or(0, |l| l.expires_at);
        self.last_expiry = self.leases.back().map_or(0, |l| l.expires_at);
        Some(gone)
    }
}

impl Account {
    /// Drops leases and settled ids that have expired; true if anything was dropped.
    pub(crate) fn prune(&mut self, now: Millis) -> bool {
        let Some(extra) = self.extra.as_deref_mut() else {
            return false;
        };
        let pruned = extra.prune(now);
        self.tidy();
        pruned
    }

    /// Adds a lease, keeping the expiry order (new leases usually go last).
    pub(crate) fn push_lease(&mut self, lease: Lease) {
        self.extra_mut().push_lease(lease);
    }

    /// Tokens reserved by live leases (exact after a prune: see `prune_due`).
    pub(crate) fn reserved(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.reserved_sum)
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
        // The held lease's reservation, counted in the token rate at admission.
        let mut reserved = 0;
        if let Some(id) = lease.map(LeaseId::parse) {
            if self.settled().iter().any(|(s, _)| *s == id) {
                outcome.duplicate = true;
                return Ok(outcome);
            }
            if self.settled().len() >= MAX_SETTLED {
                let first_free = self.settled().iter().map(|(_, until)| *until).min();
                let wait = seconds_until(now_ms, first_free.unwrap_or(now_ms));
                return Err(AccountError::TooManySettled {
                    retry_after: wait.max(1),
                });
            }
            let held = self.leases().iter().find(|l| l.id == id);
            reserved = held.map_or(0, |l| l.reserved);
            let until = now_ms
                .saturating_add(SETTLED_MIN_MS)
                .max(held.map_or(Millis::MIN, |l| l.expires_at));
            outcome.lease_held = self.settle(id, until);
            outcome.settled_until = Some(until);
        }
        outcome.balance_debit = self.token_debit(tokens, &now);
        self.count_tokens(tokens, now_ms, now.hour, now.day, now.month);
        self.settle_rate_tokens(now_ms, reserved, tokens);
        Ok(outcome)
    }

    /// Counts an admitted request of `cost` in the day and month windows with these indexes,
    /// in the lifetime total and in the unflushed usage of the hour with index `hour`. A cost
    /// of 0 counts nothing.
    pub(crate) fn count_request(&mut self, at: Millis, hour: i64, day: i64, month: i64, cost: u64) {
        if cost == 0 {
            return;
        }
        self.record_usage(at, hour, i64::try_from(cost).unwrap_or(i64::MAX), 0);
        self.add(Counter::ReqDay, day, cost);
        self.add(Counter::ReqMonth, month, cost);
        self.req_total = self.req_total.saturating_add(cost);
    }

    /// Records `tokens` used in the hour, day and month windows with these indexes (and in the
    /// hour's unflushed usage).
    pub(crate) fn count_tokens(
        &mut self,
        tokens: u64,
        at: Millis,
        hour: i64,
        day: i64,
        month: i64,
    ) {
        self.record_usage(at, hour, 0, tokens);
        self.add(Counter::TokHour, hour, tokens);
        self.add(Counter::TokDay, day, tokens);
        self.add(Counter::TokMonth, month, tokens);
    }

    /// Settles lease `id`: drops it if held (with its reservation) and remembers the id until
    /// `until`, so a repeated commit records nothing. True if the lease was held. `commit`
    /// refuses a new id at `MAX_SETTLED`; an effect applied on a replica that somehow finds the
    /// bound reached drops the id that expires first, so the state stays within the bound.
    pub(crate) fn settle(&mut self, id: LeaseId, until: Millis) -> bool {
        let extra = self.extra_mut();
        let held = extra.remove_lease(&id).is_some();
        let settled = extra.settled.get_or_insert_with(Box::default);
        if settled.len() >= MAX_SETTLED {
            let oldest = settled.iter().enumerate().min_by_key(|(_, s)| s.1);
            if let Some(oldest) = oldest.map(|(i, _)| i) {
                settled.swap_remove(oldest);
            }
        }
        settled.push((id, until));
        held
    }

    /// Undoes an admission: frees the lease, drops its reservation and refunds the request's
    /// cost in the windows it was counted in. False if the lease was not held.
    /// The smooth rates get back what the admission counted there (its cost and reservation).
    pub(crate) fn release(&mut self, lease: &str, now_ms: Millis) -> bool {
        self.prune(now_ms);
        let id = LeaseId::parse(lease);
        match self.unadmit(&id, now_ms) {
            Some(held) => {
                self.refund_rates(now_ms, u64::from(held.cost), held.reserved);
                true
            }
            None => false,
        }
    }

    /// Drops the held lease `id` and refunds its request's cost in the windows it was counted
    /// in: the lease, or none if it is not held.
    pub(crate) fn unadmit(&mut self, id: &LeaseId, at: Millis) -> Option<Lease> {
        let held = self.extra.as_deref_mut().and_then(|e| e.remove_lease(id))?;
        self.tidy();
        let cost = u64::from(held.cost);
        if cost > 0 {
            self.refund(Counter::ReqDay, i64::from(held.day), cost);
            self.refund(Counter::ReqMonth, held.month(), cost);
            self.req_total = self.req_total.saturating_sub(cost);
            self.record_usage(at, Window::Hour.index(at), -i64::from(held.cost), 0);
        }
        Some(held)
    }

    /// The tokens of a commit of `tokens` at `now` that its balance pays: how much further
    /// beyond its limit the most exceeded token window goes (limits as the account's last
    /// admission with a balance found them). Zero without balance terms.
    fn token_debit(&self, tokens: u64, now: &Now) -> u64 {
        let Some(terms) = self.terms() else {
            return 0;
        };
        let counted = [
            self.count(Counter::TokHour, now.hour),
            self.count(Counter::TokDay, now.day),
            self.count(Counter::TokMonth, now.month),
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
