//! The floor that alone touches the raw Redis module API: the command context (`Ctx`: reply,
//! flags, block, replicate), the reply writer, blocked clients with the `Resumable` trait and
//! the entry-point macro, the account data type, propagation of account changes, command
//! registration metadata, cutting a password out of Redis's copy of the load arguments, and the
//! module's timers, load options and shutdown event. Every `unsafe` call into Redis lives here.
//! Nothing here names a command's handler: commands plug in through `Resumable` and `entry!`.

pub(crate) mod account_type;
pub(crate) mod blocked;
pub(crate) mod command_info;
pub(crate) mod ctx;
pub(crate) mod key_events;
pub(crate) mod lifecycle;
pub(crate) mod load_args;
pub(crate) mod prefetch;
pub(crate) mod propagation;
pub(crate) mod quiet;
pub(crate) mod reply;
pub(crate) mod runs;
pub(crate) mod secret_filter;
pub(crate) mod words;
