//! Unit tests of the connection-string grammar: URLs and keyword strings read as libpq reads
//! them, ambiguous or bad URLs refused without quoting them, passwords masked and cut in every
//! form, canonical URLs that survive an unquoted rewrite; and properties: a password of any
//! shape is found, masked and cut, and no text panics the parser.

use super::*;
use proptest::prelude::*;

fn settings(text: &str) -> Vec<(String, String)> {
    ConnInfo::parse(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn masked(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for span in password_spans(text.as_bytes()).expect("parses") {
        for b in &mut bytes[span] {
            *b = b'*';
        }
    }
    String::from_utf8(bytes).unwrap()
}

fn shown(text: &str) -> String {
    String::from_utf8(without_password(text.as_bytes()).expect("parses")).unwrap()
}

#[test]
fn urls_read_as_libpq_reads_them() {
    assert_eq!(
        settings("postgresql://u:p%40ss@db.example:5433/quota?sslmode=verify-full&application_name=a%20b"),
        kv(&[
            ("user", "u"),
            ("password", "p@ss"),
            ("host", "db.example"),
            ("port", "5433"),
            ("dbname", "quota"),
            ("sslmode", "verify-full"),
            ("application_name", "a b"),
        ])
    );
    assert_eq!(
        settings("postgres://[::1]:5432,h2,[fe80::1%25eth0]:6/db"),
        kv(&[
            ("host", "::1,h2,fe80::1%eth0"),
            ("port", "5432,,6"),
            ("dbname", "db")
        ])
    );
    assert_eq!(
        settings("postgresql://%2Fvar%2Frun%2Fpostgresql/db?user=a@b"),
        kv(&[
            ("host", "/var/run/postgresql"),
            ("dbname", "db"),
            ("user", "a@b")
        ])
    );
    assert_eq!(settings("postgresql://"), kv(&[]));
    assert_eq!(
        settings("postgresql://h/db?ssl=true"),
        kv(&[("host", "h"), ("dbname", "db"), ("sslmode", "require")])
    );
    // The last value wins, as in libpq.
    assert_eq!(
        settings("postgresql://u@h/db?user=v"),
        kv(&[("user", "v"), ("host", "h"), ("dbname", "db")])
    );
    // A '?' before the '@' belongs to the credentials (libpq looks for '@' or '/').
    assert_eq!(
        settings("postgresql://u:a?b@h/db"),
        kv(&[
            ("user", "u"),
            ("password", "a?b"),
            ("host", "h"),
            ("dbname", "db")
        ])
    );
}

#[test]
fn raw_specials_in_a_password_are_read_when_only_one_reading_works() {
    // libpq would take "quota2" for the host and "Zx" for the port: not a number.
    assert_eq!(
        settings("postgresql://quota2:Zx/9kQ+Lm=@host/db"),
        kv(&[
            ("user", "quota2"),
            ("password", "Zx/9kQ+Lm="),
            ("host", "host"),
            ("dbname", "db")
        ])
    );
    assert_eq!(
        settings("postgresql://u:p@ss@h/db"),
        kv(&[
            ("user", "u"),
            ("password", "p@ss"),
            ("host", "h"),
            ("dbname", "db")
        ])
    );
    assert_eq!(
        settings("postgresql://u:a/b?c@h?x=1"),
        kv(&[
            ("user", "u"),
            ("password", "a/b?c"),
            ("host", "h"),
            ("x", "1")
        ])
    );
    // No credentials at all: an '@' in a parameter after a path.
    assert_eq!(
        settings("postgresql://h/db?application_name=a@b"),
        kv(&[("host", "h"), ("dbname", "db"), ("application_name", "a@b")])
    );
    // Both readings valid: refused, with advice and without the text.
    for text in [
        "postgresql://quota:12/ab+c=@db/quota",
        "postgresql://h:5432/db?application_name=a@b",
    ] {
        let e = ConnInfo::parse(text).unwrap_err();
        assert!(e.0.contains("reads two ways"), "{e}");
        assert!(!e.0.contains("ab+c") && !e.0.contains("5432"), "{e}");
    }
}

#[test]
fn bad_urls_are_refused_without_quoting_them() {
    for text in [
        "postgresql://u:s3cr3t@[::1",
        "postgresql://u:s3cr3t@h:port/db",
        "postgresql://u:s3cr3t@h/db?novalue",
        "postgresql://u:s3%00cr3t@h/db",
        "postgresql://u:s3cr3t@a@b:c/d",
    ] {
        let e = ConnInfo::parse(text).unwrap_err();
        assert!(!e.0.contains("s3cr3t"), "{e}");
    }
}

#[test]
fn keyword_strings_read_as_libpq_reads_them() {
    assert_eq!(
        settings(r"host=h  port = 5432 password='a \'b\\' user=u\ v dbname=''"),
        kv(&[
            ("host", "h"),
            ("port", "5432"),
            ("password", r"a 'b\"),
            ("user", "u v"),
            ("dbname", "")
        ])
    );
    // libpq's quirk: after '=' blanks are skipped, so the next word is the value.
    assert_eq!(settings("password= host=h"), kv(&[("password", "host=h")]));
    assert_eq!(settings("a='x'b=y"), kv(&[("a", "x"), ("b", "y")]));
    assert!(ConnInfo::parse("host=h secret").is_err());
    assert!(ConnInfo::parse("password='open").is_err());
    assert_eq!(settings("  "), kv(&[]));
}

#[test]
fn passwords_are_masked_and_cut_in_every_form() {
    for (text, mask, cut) in [
        (
            "postgresql://u:S3cret@h:5/db",
            "postgresql://u:******@h:5/db",
            "postgresql://u@h:5/db",
        ),
        (
            "postgres://u@h/db",
            "postgres://u@h/db",
            "postgres://u@h/db",
        ),
        (
            "postgres://h/db?password=abc&x=1",
            "postgres://h/db?password=***&x=1",
            "postgres://h/db?x=1",
        ),
        (
            "postgres://h/db?x=1&pass%77ord=abc",
            "postgres://h/db?x=1&pass%77ord=***",
            "postgres://h/db?x=1",
        ),
        (
            "postgres://h/db?password=abc",
            "postgres://h/db?password=***",
            "postgres://h/db",
        ),
        (
            "postgres://h/db?a=1&password=abc&b=2",
            "postgres://h/db?a=1&password=***&b=2",
            "postgres://h/db?a=1&b=2",
        ),
        (
            "postgresql://quota2:Zx/9kQ+Lm=@host/db",
            "postgresql://quota2:**********@host/db",
            "postgresql://quota2@host/db",
        ),
        (
            "postgresql://u:p@ss@h/db",
            "postgresql://u:****@h/db",
            "postgresql://u@h/db",
        ),
        (
            "postgresql://:pw@h",
            "postgresql://:**@h",
            "postgresql://@h",
        ),
        (
            "host=h password=abc user=u",
            "host=h password=*** user=u",
            "host=h  user=u",
        ),
        (
            "host=h password = abc user=u",
            "host=h password = *** user=u",
            "host=h  user=u",
        ),
        (
            r"host=h password='a\' b\\' user=u",
            r"host=h password=********* user=u",
            "host=h  user=u",
        ),
        (r"password=a\ b user=u", r"password=**** user=u", " user=u"),
        (
            "host=h password=x://y@z",
            "host=h password=*******",
            "host=h ",
        ),
    ] {
        assert_eq!(masked(text), mask, "{text}");
        assert_eq!(shown(text), cut, "{text}");
    }
    assert_eq!(password_spans(b"host=h secret"), None);
    assert_eq!(password_spans(b"\xff"), None);
}

#[test]
fn canonical_urls_survive_an_unquoted_rewrite() {
    for text in [
        "host=127.0.0.1 port=5432 user=quota dbname=quota",
        "host='/var/run/postgresql' user='a b' dbname='x\"y' sslrootcert='/etc/a b/ca.pem'",
        "host=::1,h2 port=5432,5433 user=u@x password='p w' application_name=a&b",
        "host=h1,h2 port=5432 sslmode=verify-full",
    ] {
        let info = ConnInfo::parse(text).unwrap();
        let url = info.to_url(true);
        assert!(
            !url.bytes()
                .any(|b| is_space(b) || b == b'"' || b == b'\'' || b == b'\\'),
            "{url}"
        );
        assert_eq!(sorted(settings(&url)), sorted(settings(text)), "{url}");
    }
    let info = ConnInfo::parse("host=h user=u password=pw").unwrap();
    assert_eq!(info.to_url(false), "postgresql://u@h");
}

// ---- fuzzing: passwords and shapes ---------------------------------------------------

/// A password with at least one upper-case letter (the rest of the generated text has
/// none, so finding it there means it leaked).
fn password() -> impl Strategy<Value = String> {
    (
        "[A-Z]",
        proptest::collection::vec(
            prop_oneof![
                Just('/'),
                Just('?'),
                Just('@'),
                Just(':'),
                Just('+'),
                Just('='),
                Just('&'),
                Just('%'),
                Just('#'),
                Just(' '),
                Just('\''),
                Just('\\'),
                Just('"'),
                Just(','),
                Just('['),
                Just(']'),
                Just('é'),
                Just('€'),
                proptest::char::range('a', 'z'),
                proptest::char::range('A', 'Z'),
                proptest::char::range('0', '9'),
            ],
            5..24,
        ),
    )
        .prop_map(|(first, rest)| format!("{first}{}", rest.into_iter().collect::<String>()))
}

/// Percent-encodes every byte outside `[a-zA-Z0-9-._~]`, or only those that must be
/// (`%` and the given ones), as people write URLs.
fn url_encode(s: &str, all: bool, must: &[u8]) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        let mut buf = [0u8; 4];
        let bytes = ch.encode_utf8(&mut buf).as_bytes();
        let plain = ch.is_ascii_alphanumeric() || "-._~".contains(ch);
        if plain || (!all && bytes.len() == 1 && !must.contains(&bytes[0]) && bytes[0] != b'%') {
            out.push(ch);
        } else {
            for b in bytes {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn quote_kv(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Hosts: names, IPv4, IPv6 in brackets, one or several, with or without ports.
fn hosts() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            prop_oneof![
                "[a-z][a-z0-9-]{0,8}(\\.[a-z]{2,5})?",
                Just("127.0.0.1".to_owned()),
                Just("[::1]".to_owned()),
                Just("[fe80::1]".to_owned()),
            ],
            proptest::option::of(1u16..65535),
        ),
        1..3,
    )
    .prop_map(|hs| {
        hs.into_iter()
            .map(|(h, p)| p.map_or(h.clone(), |p| format!("{h}:{p}")))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// A connection string holding `password` in one of the shapes libpq accepts.
fn shaped(password: String) -> impl Strategy<Value = (String, String)> {
    (
        0..6u8,
        hosts(),
        "[a-z][a-z0-9_]{0,8}",
        "[a-z][a-z0-9_]{0,8}",
        proptest::option::of("(sslmode=(require|verify-full)|application_name=[a-z]{1,6}|connect_timeout=[0-9]{1,2})"),
        any::<bool>(),
        0..3u8,
    )
        .prop_map(move |(shape, hosts, user, db, extra, all, spaces)| {
            let extra = extra.unwrap_or_default();
            let text = match shape {
                // user:password@ with the password encoded only where it must be.
                0 => {
                    let q = if extra.is_empty() { String::new() } else { format!("?{extra}") };
                    format!("postgresql://{user}:{}@{hosts}/{db}{q}", url_encode(&password, all, b"@"))
                }
                // Fully percent-encoded.
                1 => format!("postgres://{user}:{}@{hosts}/{db}", url_encode(&password, true, b"")),
                // The `password` query parameter, first, in the middle or last.
                2 => {
                    let p = format!("password={}", url_encode(&password, all, b"&=#"));
                    let params = match (extra.is_empty(), spaces) {
                        (true, _) => p,
                        (false, 0) => format!("{p}&{extra}"),
                        (false, 1) => format!("{extra}&{p}"),
                        (false, _) => format!("{extra}&{p}&application_name=z"),
                    };
                    format!("postgresql://{user}@{hosts}/{db}?{params}")
                }
                // key=value, quoted, with spaces around '='.
                3 => {
                    let sp = " ".repeat(spaces as usize);
                    format!("host=h {sp}password{sp}={sp}{} user={user} dbname={db} {extra}", quote_kv(&password))
                }
                // key=value, unquoted with backslash escapes.
                4 => {
                    let mut v = String::new();
                    for ch in password.chars() {
                        if ch == ' ' || ch == '\\' || ch == '\'' || ch == '\t' {
                            v.push('\\');
                        }
                        v.push(ch);
                    }
                    // An unquoted value must not start with a quote.
                    format!("user={user} {extra} password={v} dbname={db}")
                }
                // Two hosts given as key=value, password quoted, first.
                _ => format!("password={} host={} dbname={db}", quote_kv(&password), "a,b"),
            };
            (text, password.clone())
        })
}

fn without(info: &ConnInfo, key: &str) -> Vec<(String, Vec<u8>)> {
    info.settings()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, v)| (k.to_owned(), v.to_vec()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Any password, in any shape: read exactly, masked completely, and cut out leaving
    /// the same settings.
    #[test]
    fn passwords_are_found_masked_and_cut((text, password) in password().prop_flat_map(shaped)) {
        let info = match ConnInfo::parse(&text) {
            Ok(info) => info,
            // A shape read two ways is refused, and then hidden whole.
            Err(e) => {
                prop_assert!(e.0.contains("reads two ways"), "{}: {}", text, e);
                prop_assert_eq!(password_spans(text.as_bytes()), None);
                return Ok(());
            }
        };
        prop_assert_eq!(info.password(), Some(password.as_bytes()), "{}", text);
        let mut bytes = text.clone().into_bytes();
        for span in info.password_spans() {
            for b in &mut bytes[span] {
                *b = b'*';
            }
        }
        let masked = String::from_utf8_lossy(&bytes).into_owned();
        prop_assert!(!masked.contains(&password), "{}", masked);
        prop_assert!(!masked.chars().any(|c| c.is_ascii_uppercase()), "{}", masked);
        let cut = info.without_password(&text);
        prop_assert!(!cut.chars().any(|c| c.is_ascii_uppercase()), "{}", cut);
        let again = ConnInfo::parse(&cut).map_err(|e| TestCaseError::fail(format!("{cut}: {e}")))?;
        prop_assert_eq!(again.password(), None);
        prop_assert_eq!(without(&again, "password"), without(&info, "password"));
        // The canonical URL reads the same, password included.
        let url = info.to_url(true);
        let canonical = ConnInfo::parse(&url).map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        prop_assert_eq!(sorted(canonical.settings()), sorted(info.settings()));
    }

    /// Nothing panics, whatever the text.
    #[test]
    fn any_text_parses_or_is_refused(text in "(postgres(ql)?://)?[ -~é]{0,60}") {
        if let Ok(info) = ConnInfo::parse(&text) {
            let cut = info.without_password(&text);
            prop_assert!(ConnInfo::parse(&cut).is_ok(), "{}", cut);
        }
    }
}
