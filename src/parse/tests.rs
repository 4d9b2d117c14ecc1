//! Unit tests of the argument parsers.

use super::*;
use proptest::prelude::*;

const NOW: Millis = 1_790_000_000_000;

fn words(s: &str) -> Vec<&[u8]> {
    s.split(' ').map(str::as_bytes).collect()
}

#[test]
fn grant_reads_every_option_in_any_order_and_case() {
    let a = words("QUOTA.GRANT t p u * add notes hi REQUESTS_PER_DAY 5 tokens_per_day 7 EXPIRES_IN 60 PURCHASE pi_1 AMOUNT 9.5");
    let g = grant(&a, NOW).unwrap();
    assert!(g.request.add);
    assert_eq!(
        g.request.amounts[LimitField::RequestsPerDay as usize],
        Some(5)
    );
    assert_eq!(
        g.request.amounts[LimitField::TokensPerDay as usize],
        Some(7)
    );
    assert_eq!(g.request.expiry, Some(NOW / 1000 + 60));
    assert_eq!(g.request.purchase_id.as_deref(), Some("pi_1"));
    assert_eq!(g.request.amount, Some(Cents(950)));
    assert_eq!(g.request.notes.as_deref(), Some("hi"));
}

#[test]
fn grant_errors_name_the_argument() {
    let cases = [
        (
            "QUOTA.GRANT t p u * REQUESTS_PER_DAY -1",
            "ERR REQUESTS_PER_DAY must be a non-negative integer",
        ),
        (
            "QUOTA.GRANT t p u * REQUESTS_PER_DAY 2147483648",
            "ERR REQUESTS_PER_DAY must be between 0 and 2147483647",
        ),
        (
            "QUOTA.GRANT t p u * ADD ADD",
            "ERR ADD must be given at most once",
        ),
        (
            "QUOTA.GRANT t p u * EXPIRES_IN 5 EXPIRES_AT 99999999999",
            "ERR EXPIRES_AT must not be given with EXPIRES_IN",
        ),
        (
            "QUOTA.GRANT t p u * EXPIRES_AT 5",
            "ERR EXPIRES_AT must be in the future",
        ),
        (
            "QUOTA.GRANT t p u * AMOUNT 1.234",
            "ERR AMOUNT must be a decimal from 0 to 99999999.99",
        ),
        ("QUOTA.GRANT t p u * BOGUS", "ERR unknown option 'BOGUS'"),
        (
            "QUOTA.GRANT t p u * TOKENS_PER_DAY",
            "ERR TOKENS_PER_DAY must be followed by a value",
        ),
        ("QUOTA.GRANT t p u", "ERR wrong number of arguments"),
    ];
    for (cmd, err) in cases {
        assert_eq!(
            grant(&words(cmd), NOW).unwrap_err().to_string(),
            err,
            "{cmd}"
        );
    }
    let mut big = words("QUOTA.GRANT t p u * TOKENS_PER_DAY");
    big.push(b"9223372036854775808");
    assert!(grant(&big, NOW).is_err());
    let mut ok = words("QUOTA.GRANT t p u * TOKENS_PER_DAY");
    ok.push(b"9223372036854775807");
    assert!(grant(&ok, NOW).is_ok());
}

/// The error text of an `ADMIT` that must not parse.
fn admit_err(line: &str, max_lease_ttl: i64) -> String {
    admit(&words(line), max_lease_ttl).unwrap_err().to_string()
}

#[test]
fn admit_reads_limits_and_flags() {
    let a = admit(&words("QUOTA.ADMIT t p u b requests_per_day 10 MAX_CONCURRENT 2 LEASE l1 LEASE_TTL 30 RESERVE 100 PEEK VERBOSE"), 86_400).unwrap();
    assert_eq!(a.base.get(LimitField::RequestsPerDay), Some(10));
    assert_eq!(a.base.get(LimitField::MaxConcurrent), Some(2));
    assert_eq!(a.base.get(LimitField::TokensPerDay), None);
    assert_eq!(
        (a.lease, a.lease_ttl, a.reserve, a.peek, a.verbose),
        (Some("l1"), Some(30), Some(100), true, true)
    );
    assert_eq!(
        admit_err("QUOTA.ADMIT t p u b LEASE_TTL 0", 86_400),
        "ERR LEASE_TTL must be between 1 and 86400"
    );
    assert!(admit(&words("QUOTA.ADMIT t p u b PEEK peek"), 86_400).is_err());
}

#[test]
fn admit_reads_a_policy_and_the_compact_form() {
    let a = admit(
        &words("QUOTA.ADMIT t p u b policy pro REQUESTS_PER_DAY 3 compact"),
        86_400,
    )
    .unwrap();
    assert_eq!(a.policy, Some("pro"));
    assert!(a.compact);
    assert_eq!(a.base.get(LimitField::RequestsPerDay), Some(3));
    assert_eq!(
        admit_err("QUOTA.ADMIT t p u b COMPACT VERBOSE", 10),
        "ERR COMPACT must not be given with VERBOSE"
    );
    assert_eq!(
        admit_err("QUOTA.ADMIT t p u b POLICY", 10),
        "ERR POLICY must be followed by a value"
    );
    assert!(admit(&words("QUOTA.ADMIT t p u b POLICY a POLICY b"), 10).is_err());
}

#[test]
fn admit_reads_a_cost_checked_like_the_other_amounts() {
    let a = admit(&words("QUOTA.ADMIT t p u b REQUESTS_PER_DAY 3"), 10).unwrap();
    assert_eq!(a.cost, 1, "the default");
    for (given, cost) in [("0", 0), ("7", 7), ("1000000000", 1_000_000_000)] {
        let line = format!("QUOTA.ADMIT t p u b cost {given} PEEK");
        assert_eq!(admit(&words(&line), 10).unwrap().cost, cost);
    }
    for (given, error) in [
        ("-1", "ERR COST must be a non-negative integer"),
        ("1.5", "ERR COST must be a non-negative integer"),
        ("x", "ERR COST must be a non-negative integer"),
        ("1000000001", "ERR COST must be between 0 and 1000000000"),
        (
            "9223372036854775807",
            "ERR COST must be between 0 and 1000000000",
        ),
    ] {
        let line = format!("QUOTA.ADMIT t p u b COST {given}");
        assert_eq!(admit_err(&line, 10), error, "{given}");
    }
    assert_eq!(
        admit_err("QUOTA.ADMIT t p u b COST", 10),
        "ERR COST must be followed by a value"
    );
    assert_eq!(
        admit_err("QUOTA.ADMIT t p u b COST 1 COST 2", 10),
        "ERR COST must be given at most once"
    );
}

#[test]
fn policy_subcommands() {
    match policy(&words(
        "QUOTA.POLICY set t p pro REQUESTS_PER_DAY 5 max_concurrent 2",
    )) {
        Ok(PolicyArgs::Set(id, limits)) => {
            assert_eq!((id.tenant, id.project, id.name), ("t", "p", "pro"));
            assert_eq!(limits.get(LimitField::RequestsPerDay), Some(5));
            assert_eq!(limits.get(LimitField::MaxConcurrent), Some(2));
            assert_eq!(limits.get(LimitField::TokensPerDay), None);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        policy(&words("QUOTA.POLICY GET t p pro")),
        Ok(PolicyArgs::Get(_))
    ));
    assert!(matches!(
        policy(&words("QUOTA.POLICY del t p pro")),
        Ok(PolicyArgs::Del(_))
    ));
    assert!(matches!(
        policy(&words("QUOTA.POLICY LIST t p")),
        Ok(PolicyArgs::List("t", "p"))
    ));
    for (cmd, err) in [
        ("QUOTA.POLICY GET t p", "ERR wrong number of arguments"),
        ("QUOTA.POLICY GET t p a b", "ERR wrong number of arguments"),
        ("QUOTA.POLICY LIST t", "ERR wrong number of arguments"),
        (
            "QUOTA.POLICY SET t p x LEASE 1",
            "ERR unknown option 'LEASE'",
        ),
        (
            "QUOTA.POLICY SET t p x TOKENS_PER_DAY 1 TOKENS_PER_DAY 2",
            "ERR TOKENS_PER_DAY must be given at most once",
        ),
        ("QUOTA.POLICY NOPE t p x", "ERR unknown option 'NOPE'"),
    ] {
        assert_eq!(policy(&words(cmd)).unwrap_err().to_string(), err, "{cmd}");
    }
}

#[test]
fn commit_release_list_shapes() {
    let c = commit(&words("QUOTA.COMMIT t p u b 42 lease L")).unwrap();
    assert_eq!((c.tokens, c.lease), (42, Some("L")));
    // No amount that could bring a ledger sum near a column's limit gets in.
    let top = commit(&words("QUOTA.COMMIT t p u b 1000000000000")).unwrap();
    assert_eq!(top.tokens, MAX_TOKENS);
    for (cmd, err) in [
        (
            "QUOTA.COMMIT t p u b 1000000000001",
            "ERR tokens must be between 0 and 1000000000000",
        ),
        (
            "QUOTA.COMMIT t p u b 9223372036854775807",
            "ERR tokens must be between 0 and 1000000000000",
        ),
        (
            "QUOTA.COMMIT t p u b -1",
            "ERR tokens must be a non-negative integer",
        ),
    ] {
        assert_eq!(commit(&words(cmd)).unwrap_err().to_string(), err, "{cmd}");
    }
    let reserve = admit(&words("QUOTA.ADMIT t p u b RESERVE 1000000000001"), 60);
    assert_eq!(
        reserve.unwrap_err().to_string(),
        "ERR RESERVE must be between 0 and 1000000000000"
    );
    assert!(commit(&words("QUOTA.COMMIT t p u b")).is_err());
    assert!(release(&words("QUOTA.RELEASE t p u b")).is_err());
    assert_eq!(release(&words("QUOTA.RELEASE t p u b x")).unwrap().1, "x");
    assert!(list(&words("QUOTA.LIST t p u all")).unwrap().1);
    assert!(list(&words("QUOTA.LIST t p u some")).is_err());
    assert!(user_only(&words("QUOTA.INVALIDATE t p u")).is_ok());
    assert!(account_only(&words("QUOTA.GET t p u b extra")).is_err());
}

#[test]
fn find_reads_its_options_and_checks_the_cursor() {
    let q = find(&words("QUOTA.FIND t p")).unwrap();
    assert_eq!((q.within_s, q.after, q.count), (None, None, 100));
    let q = find(&words("QUOTA.FIND t p count 5 expires_within 60 CURSOR 0")).unwrap();
    assert_eq!((q.within_s, q.after, q.count), (Some(60), None, 5));
    let at = crate::runtime::jobs::FindAfter {
        expires_us: None,
        user: "u".into(),
        bundle: "*".into(),
    };
    let c = cursor::encode("t", "p", &at);
    let q = find(&words(&format!("QUOTA.FIND t p CURSOR {c}"))).unwrap();
    assert_eq!(q.after, Some(at));
    for (cmd, err) in [
        ("QUOTA.FIND t", "ERR wrong number of arguments"),
        (
            "QUOTA.FIND t p COUNT 0",
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            "QUOTA.FIND t p COUNT 1001",
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            "QUOTA.FIND t p EXPIRES_WITHIN 0",
            "ERR EXPIRES_WITHIN must be between 1 and 253402300799",
        ),
        (
            "QUOTA.FIND t p CURSOR",
            "ERR CURSOR must be followed by a value",
        ),
        (
            "QUOTA.FIND t p COUNT 1 COUNT 2",
            "ERR COUNT must be given at most once",
        ),
        (
            "QUOTA.FIND t p CURSOR abc",
            "ERR CURSOR must be 0 or a cursor QUOTA.FIND replied for this tenant and project",
        ),
        (
            &format!("QUOTA.FIND t p2 CURSOR {c}"),
            "ERR CURSOR must be 0 or a cursor QUOTA.FIND replied for this tenant and project",
        ),
        (
            &format!("QUOTA.FIND t p EXPIRES_WITHIN 5 CURSOR {c}"),
            "ERR CURSOR must be given without EXPIRES_WITHIN, as in the call that replied it",
        ),
        ("QUOTA.FIND t p ALL", "ERR unknown option 'ALL'"),
    ] {
        assert_eq!(find(&words(cmd)).unwrap_err().to_string(), err, "{cmd}");
    }
}

#[test]
fn top_reads_its_options() {
    let q = top(&words("QUOTA.TOP t p tokens from 3600 TO 7200")).unwrap();
    assert_eq!(
        (q.by, q.from, q.to, q.count),
        (TopBy::Tokens, 3600, 7200, 10)
    );
    let q = top(&words("QUOTA.TOP t p REQUESTS COUNT 3 TO 1 FROM 0")).unwrap();
    assert_eq!((q.by, q.from, q.to, q.count), (TopBy::Requests, 0, 1, 3));
    for (cmd, err) in [
        ("QUOTA.TOP t p", "ERR wrong number of arguments"),
        (
            "QUOTA.TOP t p BYTES FROM 0 TO 1",
            "ERR ranking must be REQUESTS or TOKENS",
        ),
        ("QUOTA.TOP t p TOKENS TO 1", "ERR FROM must be given"),
        ("QUOTA.TOP t p TOKENS FROM 1", "ERR TO must be given"),
        (
            "QUOTA.TOP t p TOKENS FROM 7200 TO 3600",
            "ERR TO must be later than FROM",
        ),
        (
            "QUOTA.TOP t p TOKENS FROM 0 TO 1 COUNT 0",
            "ERR COUNT must be between 1 and 1000",
        ),
        (
            "QUOTA.TOP t p TOKENS FROM -1 TO 1",
            "ERR FROM must be between 0 and 253402300799",
        ),
    ] {
        assert_eq!(top(&words(cmd)).unwrap_err().to_string(), err, "{cmd}");
    }
}

#[test]
fn keywords_match_exactly() {
    for word in [&b"ADD\0"[..], b"ADD\0\0", b"PEEK\0", b"ADDX", b"AD", b""] {
        let mut args = words("QUOTA.GRANT t p u *");
        args.push(word);
        assert!(grant(&args, NOW).is_err(), "{word:?}");
    }
    let mut peek = words("QUOTA.ADMIT t p u b");
    peek.push(b"PEEK\0");
    assert!(admit(&peek, 10).is_err());
}

#[test]
fn unknown_words_are_shown_safely() {
    let bad: Vec<&[u8]> = vec![b"QUOTA.ADMIT", b"t", b"p", b"u", b"b", b"\r\n\0'x"];
    assert_eq!(
        admit(&bad, 10).unwrap_err().to_string(),
        "ERR unknown option '????x'"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn parsers_never_panic_and_errors_are_one_line(args in proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(b"REQUESTS_PER_DAY".to_vec()), Just(b"LEASE".to_vec()), Just(b"ADD".to_vec()),
            Just(b"EXPIRES_IN".to_vec()), Just(b"AMOUNT".to_vec()), Just(b"RESERVE".to_vec()),
            Just(b"COST".to_vec()),
            Just(b"18446744073709551616".to_vec()), Just(b"-1".to_vec()), Just(b"*".to_vec()),
        ], 0..14)) {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        for result in [
            grant(&refs, NOW).err().map(|e| e.to_string()),
            admit(&refs, 86_400).err().map(|e| e.to_string()),
            policy(&refs).err().map(|e| e.to_string()),
            commit(&refs).err().map(|e| e.to_string()),
            release(&refs).err().map(|e| e.to_string()),
            list(&refs).err().map(|e| e.to_string()),
            find(&refs).err().map(|e| e.to_string()),
            top(&refs).err().map(|e| e.to_string()),
            account_only(&refs).err().map(|e| e.to_string()),
        ].into_iter().flatten() {
            prop_assert!(result.starts_with("ERR ") || result.starts_with("WRONGTYPE"));
            prop_assert!(!result.contains('\n') && !result.contains('\r') && !result.contains('\0'));
        }
    }
}
