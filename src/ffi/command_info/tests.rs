//! Unit tests of the commands' registration table: key specs and arity agree with the
//! arguments, the version, and read-only commands declare read-only keys.

use super::*;

/// Every spec.
fn all() -> [&'static CommandSpec; 15] {
    [
        &GRANT,
        &GET,
        &REVOKE,
        &LIST,
        &CLEANUP,
        &INVALIDATE,
        &ADMIT,
        &COMMIT,
        &RELEASE,
        &USAGE,
        &RESET,
        &SETSTATE,
        &APPLY,
        &FIND,
        &TOP,
    ]
}

/// The subcommands of `QUOTA.POLICY`.
fn subcommands() -> [&'static CommandSpec; 6] {
    [
        &POLICY_SET,
        &POLICY_GET,
        &POLICY_DEL,
        &POLICY_LIST,
        &POLICY_INVALIDATE,
        &POLICY_HELP,
    ]
}

/// Every key argument sits where the key spec says, and the arity admits every argument
/// (a subcommand's positions and arity count the container's name too).
#[test]
fn key_argument_matches_the_key_spec() {
    let commands = all().into_iter().map(|s| (s, 1));
    for (spec, names) in commands.chain(subcommands().into_iter().map(|s| (s, 2))) {
        let args: Vec<&Arg> = spec.args.iter().copied().flatten().collect();
        let key_at = args
            .iter()
            .position(|a| matches!(a.kind, ArgType::Key))
            .map(|i| i as c_int + names);
        assert_eq!(key_at, spec.key.map(|(pos, _)| pos), "{:?}", spec.name);
        // A required `TOKEN value` is two words.
        let words = |a: &&Arg| match (a.token, a.kind) {
            (Some(_), ArgType::Token) | (None, _) => 1,
            (Some(_), _) => 2,
        };
        let required = args
            .iter()
            .filter(|a| !a.optional)
            .map(words)
            .sum::<c_int>()
            + names;
        assert_eq!(spec.arity.abs(), required, "{:?}", spec.name);
        assert_eq!(
            spec.arity < 0,
            args.iter().any(|a| a.optional),
            "{:?}",
            spec.name
        );
    }
}

#[test]
fn version_is_encoded_as_redis_modules_encode_theirs() {
    assert_eq!(encode_version("1.0.0"), 10000);
    assert_eq!(encode_version("2.10.3"), 21003);
    assert_eq!(encode_version("0.1.0"), 100);
    assert_eq!(MODULE_VERSION, encode_version(env!("CARGO_PKG_VERSION")));
    assert_eq!(SINCE.to_str(), Ok(env!("CARGO_PKG_VERSION")));
}

#[test]
fn reads_declare_read_only_keys() {
    for spec in all().into_iter().chain(subcommands()) {
        let readonly = spec.flags.to_string_lossy().contains("readonly");
        let ro_key = matches!(spec.key, Some((_, KeyAccess::Read)));
        assert_eq!(readonly, ro_key, "{:?}", spec.name);
        assert_eq!(
            readonly,
            spec.acl.to_string_lossy().contains("read"),
            "{:?}",
            spec.name
        );
    }
}
