//! The account's byte encoding (RDB, AOF, replication): a version byte and varints, decoded
//! only into states that pass `Account::check`.

use std::collections::VecDeque;

use super::{
    window_slot, Account, BadState, Counter, Extra, Lease, LeaseId, MAX_COST, MAX_LEASES,
    MAX_LEASE_ID_LEN, MAX_SETTLED,
};
use crate::core::credit::PerKind;
use crate::core::ledger::{BalanceTerms, Hold, HourDelta, Ledger, MAX_DECODED_HOURS, MAX_HOLDS};
use crate::core::rate::Rates;
use crate::core::varint::{take_u64, unzigzag, write_u64, zigzag, VarintError};
use crate::core::window::Window;

impl Account {
    /// Encodes the state for RDB, AOF and replication.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_with(Counter::ALL.map(|c| self.counter(c)))
    }

    /// The encoding with these (window index, count) pairs as the counters, by `Counter`.
    pub(super) fn encode_with(&self, counters: [(i64, u64); 5]) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.leases().len() * 40);
        // Without a ledger part, the first version's bytes exactly (an older build reads them);
        // the renamed mark only where it is set.
        let with_ledger = self.ledger().is_some() || self.next_seq != 0;
        let rates = self.rates();
        let costs = self.has_costs();
        w.push(if costs {
            ENCODING_VERSION_COSTS
        } else if rates.is_some() {
            ENCODING_VERSION_RATES
        } else if self.renamed {
            ENCODING_VERSION_RENAMED
        } else if with_ledger {
            ENCODING_VERSION_LEDGER
        } else {
            ENCODING_VERSION
        });
        w.push(u8::from(self.lifetime));
        for (window, count) in counters {
            put_i64(&mut w, window);
            put_u64(&mut w, count);
        }
        put_u64(&mut w, self.req_total);
        put_u64(&mut w, self.leases().len() as u64);
        for l in self.leases() {
            put_id(&mut w, &l.id);
            put_i64(&mut w, l.expires_at);
            put_u64(&mut w, l.reserved);
            put_i64(&mut w, i64::from(l.day));
            put_i64(&mut w, l.month());
            if costs {
                put_u64(&mut w, u64::from(l.cost));
            }
        }
        put_u64(&mut w, self.settled().len() as u64);
        for (id, until) in self.settled() {
            put_id(&mut w, id);
            put_i64(&mut w, *until);
        }
        if with_ledger || self.renamed || rates.is_some() || costs {
            put_ledger(&mut w, self, costs);
        }
        if costs {
            w.push(u8::from(self.renamed));
            rates.copied().unwrap_or_default().encode(|b| w.push(b));
        } else if let Some(rates) = rates {
            w.push(u8::from(self.renamed));
            rates.encode(|b| w.push(b));
        } else if self.renamed {
            w.push(1);
        }
        w
    }

    /// Whether some lease counted a cost other than 1, or some balance hold paid for more than
    /// one request: what only the costs' encoding can say.
    fn has_costs(&self) -> bool {
        self.leases().iter().any(|l| l.cost != 1)
            || self
                .ledger()
                .is_some_and(|l| l.holds.iter().any(|h| h.paid_requests > 1))
    }

    /// Decodes what `encode` wrote. Anything else, including a well-formed state that breaks
    /// an invariant (`check`), is refused with the reason.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Account, BadState> {
        let mut r = Reader { buf: bytes };
        let version = r.byte()?;
        if !(ENCODING_VERSION..=ENCODING_VERSION_COSTS).contains(&version) {
            return Err(BadState("unknown state version"));
        }
        let costs = version == ENCODING_VERSION_COSTS;
        let lifetime = r.flag("lifetime flag is neither 0 nor 1")?;
        let (mut windows, mut counts) = ([0u32; 3], [0u64; 5]);
        for counter in Counter::ALL {
            // Any window past the last one is refused by `check`.
            let window =
                u32::try_from(r.i64()?).map_err(|_| BadState("counter window out of range"))?;
            let count = r.u64()?;
            // Counters of one kind of window share it: a state whose two counters of a kind
            // count in different windows (an older build's) keeps the later one; the count of
            // the earlier window reads as zero in it anyway.
            let slot = window_slot(counter.window());
            let (kept, other) = (windows[slot], counter as usize);
            if window > kept {
                windows[slot] = window;
                for c in Counter::ALL
                    .into_iter()
                    .filter(|c| c.window() == counter.window())
                {
                    counts[c as usize] = 0;
                }
            }
            if window >= kept {
                counts[other] = count;
            }
        }
        let req_total = r.u64()?;
        let leases = r.list(MAX_LEASES, "more leases than an account may hold", |r| {
            let (id, expires_at, reserved) = (r.id()?, r.i64()?, r.u64()?);
            let day = r.i64()?;
            if !(0..=Window::Day.last_index()).contains(&day) {
                return Err(BadState("lease day out of range"));
            }
            let month = r.i64()?;
            if Window::Month.index(Window::Day.start_of(day)) != month {
                return Err(BadState("lease month is not the month of its day"));
            }
            Ok(Lease {
                id,
                expires_at,
                reserved,
                day: i32::try_from(day).map_err(|_| BadState("lease day out of range"))?,
                cost: match costs {
                    true => r.cost("lease cost out of range")?,
                    false => 1,
                },
            })
        })?;
        let leases = VecDeque::from(leases);
        let settled = r.list(
            MAX_SETTLED,
            "more settled lease ids than an account keeps",
            |r| Ok((r.id()?, r.i64()?)),
        )?;
        let (next_seq, ledger) = if version >= ENCODING_VERSION_LEDGER {
            let (next_seq, ledger) = r.ledger(costs)?;
            (next_seq, (!ledger.is_idle()).then(|| Box::new(ledger)))
        } else {
            (0, None)
        };
        let renamed = match version {
            ENCODING_VERSION_RENAMED => match r.byte()? {
                1 => true,
                _ => return Err(BadState("a renamed mark without a sequence")),
            },
            ENCODING_VERSION_RATES | ENCODING_VERSION_COSTS => {
                r.flag("renamed mark is neither 0 nor 1")?
            }
            _ => false,
        };
        if renamed && next_seq == 0 {
            return Err(BadState("a renamed mark without a sequence"));
        }
        let rates = match version {
            ENCODING_VERSION_RATES => {
                let rates = Rates::decode(&mut r.buf).map_err(BadState)?;
                if rates.is_empty() {
                    return Err(BadState("a rates part without a rate"));
                }
                Some(Box::new(rates))
            }
            // The rates part of the costs' encoding may be empty (mask 0).
            ENCODING_VERSION_COSTS => {
                let rates = Rates::decode(&mut r.buf).map_err(BadState)?;
                (!rates.is_empty()).then(|| Box::new(rates))
            }
            _ => None,
        };
        if !r.buf.is_empty() {
            return Err(BadState("bytes left after the state"));
        }
        let reserved_sum = leases
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.reserved));
        let extra = Extra {
            reserved_sum,
            first_expiry: leases.front().map_or(0, |l| l.expires_at),
            last_expiry: leases.back().map_or(0, |l| l.expires_at),
            leases,
            settled: (!settled.is_empty()).then(|| Box::new(settled)),
            ledger,
            rates,
        };
        let mut account = Account {
            windows,
            lifetime,
            counts,
            req_total,
            extra: (!extra.is_empty()).then(|| Box::new(extra)),
            next_seq,
            renamed,
            ..Account::default()
        };
        account.check()?;
        account.inline_current_hour();
        // An older build could leave one hour more than the bound (and a week-long outage
        // reach it): the oldest merge, the totals stay.
        account.bound_ledger_hours();
        Ok(account)
    }
}

pub(super) const ENCODING_VERSION: u8 = 1;
/// The first version followed by the ledger part.
pub(super) const ENCODING_VERSION_LEDGER: u8 = 2;
/// The second version followed by the renamed mark (see `Account::mark_renamed`).
pub(super) const ENCODING_VERSION_RENAMED: u8 = 3;
/// The ledger part always, then the renamed mark as 0 or 1, then the smooth rates' state
/// (`Rates::encode`, at least one rate): written only by an account with rates, so the
/// others keep their older bytes.
pub(super) const ENCODING_VERSION_RATES: u8 = 4;
/// The fourth version's layout with the costs (`COST`): each lease's cost follows its month,
/// each balance hold says how many requests it paid as a number rather than a 0/1 flag, and
/// the rates part may be empty (mask 0). Written only by an account holding a lease whose
/// cost is not 1 or a hold that paid more than one request, so the others keep their older
/// bytes (and a lease of an older state costs 1).
pub(super) const ENCODING_VERSION_COSTS: u8 = 5;

/// The ledger fields: the batch sequence, the floor, the unflushed hours (inline and in the
/// ledger part, as one list), the holds (each one's paid requests as a number with `costs`,
/// else as a flag) and the terms.
fn put_ledger(w: &mut Vec<u8>, account: &Account, costs: bool) {
    let empty = Ledger::default();
    let l = account.ledger().unwrap_or(&empty);
    put_u64(w, account.next_seq);
    put_u64(w, l.floor.requests);
    put_u64(w, l.floor.tokens);
    let hours = account.unflushed_hours();
    put_u64(w, hours.len() as u64);
    for h in &hours {
        for v in h.fields() {
            put_i64(w, v);
        }
    }
    put_u64(w, l.holds.len() as u64);
    for h in &l.holds {
        put_u64(w, h.tag);
        put_i64(w, h.expires_at);
        put_u64(w, h.tokens);
        match costs {
            true => put_u64(w, u64::from(h.paid_requests)),
            false => w.push(u8::from(h.paid_requests != 0)),
        }
    }
    match &l.terms {
        None => w.push(0),
        Some(t) => {
            w.push(1 + u8::from(t.global));
            for limit in t.token_limits {
                put_u64(w, limit);
            }
        }
    }
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    write_u64(v, |b| w.push(b));
}

fn put_i64(w: &mut Vec<u8>, v: i64) {
    put_u64(w, zigzag(v));
}

fn put_id(w: &mut Vec<u8>, id: &LeaseId) {
    let mut buf = [0u8; 16];
    put_str(w, id.as_text(&mut buf));
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

const TRUNCATED: BadState = BadState("truncated");

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, BadState> {
        let (first, rest) = self.buf.split_first().ok_or(TRUNCATED)?;
        self.buf = rest;
        Ok(*first)
    }

    /// A varint, in its shortest form or not (every build has written the shortest).
    fn u64(&mut self) -> Result<u64, BadState> {
        match take_u64(&mut self.buf) {
            Ok((v, _)) => Ok(v),
            Err(VarintError::Truncated) => Err(TRUNCATED),
            Err(VarintError::TooLarge) => Err(BadState("number too large")),
            Err(VarintError::TooLong) => Err(BadState("number too long")),
        }
    }

    fn i64(&mut self) -> Result<i64, BadState> {
        self.u64().map(unzigzag)
    }

    /// A byte that must be 0 (false) or 1 (true).
    fn flag(&mut self, neither: &'static str) -> Result<bool, BadState> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BadState(neither)),
        }
    }

    /// A count of items that may be at most `max`.
    fn count(&mut self, max: usize, too_many: &'static str) -> Result<usize, BadState> {
        usize::try_from(self.u64()?)
            .ok()
            .filter(|n| *n <= max)
            .ok_or(BadState(too_many))
    }

    /// A count of at most `max` items, then each item as `item` reads it.
    fn list<T>(
        &mut self,
        max: usize,
        too_many: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<T, BadState>,
    ) -> Result<Vec<T>, BadState> {
        let n = self.count(max, too_many)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    /// A cost (of a lease, or the requests a hold paid): at most `MAX_COST`.
    fn cost(&mut self, out_of_range: &'static str) -> Result<u32, BadState> {
        u32::try_from(self.u64()?)
            .ok()
            .filter(|c| *c <= MAX_COST)
            .ok_or(BadState(out_of_range))
    }

    /// The ledger fields: the batch sequence and the ledger part (`costs`: the holds' paid
    /// requests are numbers, else flags).
    fn ledger(&mut self, costs: bool) -> Result<(u64, Ledger), BadState> {
        let next_seq = self.u64()?;
        let floor = PerKind {
            requests: self.u64()?,
            tokens: self.u64()?,
        };
        let hours = self.list(
            MAX_DECODED_HOURS,
            "more unflushed hours than an account keeps",
            |r| {
                Ok(HourDelta {
                    hour: r.i64()?,
                    requests: r.i64()?,
                    tokens: r.i64()?,
                    debits: PerKind {
                        requests: r.i64()?,
                        tokens: r.i64()?,
                    },
                })
            },
        )?;
        let holds = self.list(MAX_HOLDS, "more balance holds than an account keeps", |r| {
            Ok(Hold {
                tag: r.u64()?,
                expires_at: r.i64()?,
                tokens: r.u64()?,
                paid_requests: match costs {
                    true => r.cost("balance hold cost out of range")?,
                    false => u32::from(r.flag("hold flag is neither 0 nor 1")?),
                },
            })
        })?;
        let terms = match self.byte()? {
            0 => None,
            t @ (1 | 2) => Some(BalanceTerms {
                global: t == 2,
                token_limits: [self.u64()?, self.u64()?, self.u64()?],
            }),
            _ => return Err(BadState("unknown balance terms")),
        };
        Ok((
            next_seq,
            Ledger {
                hours: smallvec::SmallVec::from_vec(hours),
                floor,
                holds,
                terms,
            },
        ))
    }

    fn id(&mut self) -> Result<LeaseId, BadState> {
        let len = self.count(MAX_LEASE_ID_LEN, "lease id length out of range")?;
        if len > self.buf.len() {
            return Err(TRUNCATED);
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        let text = std::str::from_utf8(s).map_err(|_| BadState("lease id is not UTF-8"))?;
        Ok(LeaseId::parse(text))
    }
}
