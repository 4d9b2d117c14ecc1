//! redis-quota: a Redis module that keeps per-user quota credits next to the data they guard.
//! This file only wires the pieces together: the core, the Postgres store.
pub mod core;
