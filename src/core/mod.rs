//! The pure core of redis-quota: identities, credits, policies, UTC windows, account state,
//! the admission decision and the credits cache as a data structure.
//!
//! Nothing in here knows Redis or PostgreSQL, and nothing reads the clock: every function that
//! depends on time takes `now` as an argument. The shells (`commands`, `store`, `worker`) call in.

pub mod account;
pub mod cache;
pub mod credit;
pub mod effect;
pub mod ids;
pub mod policy;
pub mod window;

/// Milliseconds since the Unix epoch, the one time unit the core works in.
pub type Millis = i64;
