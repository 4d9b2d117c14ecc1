//! Thin, safe wrappers over the parts of the Redis module API the crate's own wrappers do not
//! cover the way we need: fast replies, blocked clients with callbacks, the account data type,
//! and cutting a password out of Redis's copy of the load arguments.
//! Every `unsafe` block of the module lives here or in `lib.rs` registration.

pub mod account_type;
pub mod blocked;
pub mod command_info;
pub mod load_args;
pub mod propagation;
pub mod reply;
pub mod secret_filter;
