//! Connection strings, read the way libpq reads them: a `postgresql://` (or `postgres://`) URL
//! or a `keyword=value` string, each setting with where it sits in the text.
//!
//! Owns the grammar, so that one reading decides both what the module connects with and what
//! is masked or cut when Redis shows the text (a password is found exactly where it is read).
//! Must not open connections nor build a `postgres::Config` (`pool` does, from [`ConnInfo`]),
//! and never quotes the text in an error: it may hold a password.
//!
//! Where libpq and rust-postgres read a URL differently, the URL is refused as ambiguous rather
//! than guessed at: libpq ends the credentials at the first `@` before any `/`, rust-postgres at
//! the first `@` anywhere, so a raw `/` in a password (`quota:Zx/9k+L=@db/quota`, a base64
//! shape) or an `@` in a parameter value is read two ways. A URL is read as libpq reads it;
//! failing that (a host with an `@`, a port that is not a number), with the credentials up to
//! the last `@` before the host; if both readings are valid URLs that differ, it is refused
//! with advice to percent-encode.

use std::ops::Range;

/// One `keyword = value` setting, decoded as libpq stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Param {
    /// The keyword (`host`, `password`, `sslmode`, ...).
    pub key: String,
    /// The value, decoded (quotes, escapes and percent-encoding undone).
    pub value: Vec<u8>,
    /// Where the value is written in the text.
    value_span: Range<usize>,
    /// What to remove from the text to drop this setting (with one separator).
    cut: Range<usize>,
}

/// The two shapes libpq accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    Url,
    Keywords,
}

/// A parsed connection string: its settings in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnInfo {
    pub form: Form,
    params: Vec<Param>,
}

/// Why a connection string was refused; never quotes the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(text: &str) -> Result<T, ParseError> {
    Err(ParseError(text.to_owned()))
}

const SCHEMES: [&str; 2] = ["postgresql://", "postgres://"];

/// What C's `isspace` accepts in libpq's parser.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

impl ConnInfo {
    /// Reads a URL or a keyword=value string.
    pub(crate) fn parse(text: &str) -> Result<ConnInfo, ParseError> {
        match SCHEMES.iter().find(|s| text.starts_with(*s)) {
            Some(scheme) => Ok(ConnInfo {
                form: Form::Url,
                params: parse_url(text, scheme.len())?,
            }),
            None => Ok(ConnInfo {
                form: Form::Keywords,
                params: parse_keywords(text)?,
            }),
        }
    }

    /// Each keyword once with its last value (as libpq keeps them), in the order keywords first
    /// appear.
    pub(crate) fn settings(&self) -> Vec<(&str, &[u8])> {
        let mut out: Vec<(&str, &[u8])> = Vec::new();
        for p in &self.params {
            match out.iter_mut().find(|(k, _)| *k == p.key) {
                Some(slot) => slot.1 = &p.value,
                None => out.push((&p.key, &p.value)),
            }
        }
        out
    }

    /// The last value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.as_slice())
    }

    /// The password it logs in with (the last one given), if any.
    pub(crate) fn password(&self) -> Option<&[u8]> {
        self.get("password")
    }

    /// Where every password is written (each one, not only the one used).
    pub(crate) fn password_spans(&self) -> Vec<Range<usize>> {
        self.passwords().map(|p| p.value_span.clone()).collect()
    }

    fn passwords(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.key == "password")
    }

    /// `text` (what was parsed) without any password: a URL loses `:password` and its
    /// `password` parameters, a keyword string its `password` settings. Reads the same
    /// otherwise.
    pub(crate) fn without_password(&self, text: &str) -> String {
        let cuts: Vec<Range<usize>> = self.passwords().map(|p| p.cut.clone()).collect();
        text.char_indices()
            .filter(|(i, _)| !cuts.iter().any(|c| c.contains(i)))
            .map(|(_, c)| c)
            .collect()
    }

    /// The same settings as a URL with every special character percent-encoded: no space,
    /// quote or backslash, so it survives being written unquoted (Redis's `CONFIG REWRITE`
    /// writes module arguments that way), and no reading of it is ambiguous.
    pub(crate) fn to_url(&self, with_password: bool) -> String {
        let settings = self.settings();
        let get = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let mut url = String::from("postgresql://");
        // Empty values go to the query (an empty user name or database would not be read back).
        let user = get("user").filter(|u| !u.is_empty());
        let password = get("password").filter(|p| with_password && !p.is_empty());
        let dbname = get("dbname").filter(|d| !d.is_empty());
        if user.is_some() || password.is_some() {
            url.push_str(&encode(user.unwrap_or_default(), b""));
            if let Some(password) = password {
                url.push(':');
                url.push_str(&encode(password, b""));
            }
            url.push('@');
        }
        let hosts: Vec<&[u8]> =
            get("host").map_or(Vec::new(), |h| h.split(|&b| b == b',').collect());
        let ports: Vec<&[u8]> =
            get("port").map_or(Vec::new(), |p| p.split(|&b| b == b',').collect());
        // The authority holds hosts with their ports when they pair up; else both go to the
        // query, which libpq reads the same way.
        let in_authority = ports.is_empty() || ports.len() == hosts.len();
        let mut query: Vec<(&str, &[u8])> = Vec::new();
        if in_authority {
            for (i, host) in hosts.iter().enumerate() {
                if i > 0 {
                    url.push(',');
                }
                if host.contains(&b':') && !host.starts_with(b"/") {
                    url.push('[');
                    url.push_str(&encode(host, b":"));
                    url.push(']');
                } else {
                    url.push_str(&encode(host, b""));
                }
                if let Some(port) = ports.get(i).filter(|p| !p.is_empty()) {
                    url.push(':');
                    url.push_str(&encode(port, b""));
                }
            }
        }
        if let Some(db) = dbname {
            url.push('/');
            url.push_str(&encode(db, b""));
        }
        for (key, value) in &settings {
            let kept = match *key {
                "user" => user.is_none(),
                "password" => with_password && password.is_none(),
                "dbname" => dbname.is_none(),
                "host" | "port" => !in_authority,
                _ => true,
            };
            if kept {
                query.push((key, value));
            }
        }
        for (i, (key, value)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode(key.as_bytes(), b""));
            url.push('=');
            url.push_str(&encode(value, b"/:,"));
        }
        url
    }
}

/// Percent-encodes everything but letters, digits, `-._~` and the bytes in `keep`.
fn encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` decoded. A `%` not followed by two hex digits is kept as it is (rust-postgres, which
/// read these URLs before, does so; libpq refuses them); `%00` is refused (a NUL cannot be sent).
fn decode(raw: &[u8]) -> Result<Vec<u8>, ParseError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        let escaped = (b == b'%')
            .then(|| Some((hex(*raw.get(i + 1)?)?, hex(*raw.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((0, 0)) => return err("a URL must not hold %00"),
            Some((high, low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// libpq's `conninfo_parse`: `keyword = value` pairs separated by white space; a value is
/// either quoted with `'` or runs to the next white space, and `\` escapes the next character
/// in both.
fn parse_keywords(text: &str) -> Result<Vec<Param>, ParseError> {
    let b = text.as_bytes();
    let skip_spaces = |mut i: usize| {
        while b.get(i).is_some_and(|c| is_space(*c)) {
            i += 1;
        }
        i
    };
    let mut params = Vec::new();
    let mut i = skip_spaces(0);
    while i < b.len() {
        let key_start = i;
        while b.get(i).is_some_and(|c| *c != b'=' && !is_space(*c)) {
            i += 1;
        }
        let key = &text[key_start..i];
        i = skip_spaces(i);
        if b.get(i) != Some(&b'=') {
            return err("a keyword=value connection string has a word without '=' (values with spaces must be quoted: key='a b')");
        }
        i = skip_spaces(i + 1);
        let value_start = i;
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        return err(
                            "a quoted value of the keyword=value connection string is not closed",
                        )
                    }
                    Some(b'\\') => {
                        if let Some(&c) = b.get(i + 1) {
                            value.push(c);
                        }
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&c) = b.get(i) {
                if is_space(c) {
                    break;
                }
                if c == b'\\' {
                    if let Some(&next) = b.get(i + 1) {
                        value.push(next);
                    }
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let end = i.min(b.len());
        params.push(Param {
            key: key.to_owned(),
            value,
            value_span: value_start..end,
            cut: key_start..end,
        });
        i = skip_spaces(end);
    }
    Ok(params)
}

/// libpq's URL reading (see the file header for the credentials).
fn parse_url(text: &str, scheme_len: usize) -> Result<Vec<Param>, ParseError> {
    let rest = &text.as_bytes()[scheme_len..];
    // libpq: credentials end at the first '@', if one comes before any '/'.
    let libpq = rest
        .iter()
        .position(|&c| c == b'@' || c == b'/')
        .filter(|&i| rest[i] == b'@');
    // Otherwise: the last '@' before the '/' or '?' that ends the host part.
    let last_before_host = rest.iter().position(|&c| c == b'@').map(|first| {
        let host_end = rest[first..]
            .iter()
            .position(|&c| c == b'/' || c == b'?')
            .map_or(rest.len(), |i| first + i);
        rest[..host_end]
            .iter()
            .rposition(|&c| c == b'@')
            .unwrap_or(first)
    });
    let as_libpq = url_with_credentials(text, scheme_len, libpq);
    if last_before_host == libpq {
        return as_libpq;
    }
    match (
        as_libpq,
        url_with_credentials(text, scheme_len, last_before_host),
    ) {
        (Ok(_), Ok(_)) => err(
            "the URL reads two ways (an '@' after a '/' could end a user:password): \
             percent-encode '@', '/' and '?' in the user name, the password and parameter \
             values (%40, %2F, %3F)",
        ),
        (Ok(params), Err(_)) | (Err(_), Ok(params)) => Ok(params),
        (Err(e), Err(_)) => Err(e),
    }
}

/// The URL read with the credentials ending at `rest[creds_end]` (an `@`), or without any.
fn url_with_credentials(
    text: &str,
    scheme_len: usize,
    creds_end: Option<usize>,
) -> Result<Vec<Param>, ParseError> {
    let b = text.as_bytes();
    let find = |from: usize, stops: &[u8]| {
        b[from..]
            .iter()
            .position(|c| stops.contains(c))
            .map_or(b.len(), |i| from + i)
    };
    let mut params = Vec::new();
    let mut push = |key: &str, value: Vec<u8>, value_span: Range<usize>, cut: Range<usize>| {
        params.push(Param {
            key: key.to_owned(),
            value,
            value_span,
            cut,
        })
    };
    let mut pos = scheme_len;
    if let Some(end) = creds_end {
        let at = scheme_len + end;
        let colon = b[scheme_len..at]
            .iter()
            .position(|&c| c == b':')
            .map(|i| scheme_len + i);
        let user_end = colon.unwrap_or(at);
        if b[scheme_len..user_end].contains(&b'/') {
            return err("the user name in the URL holds a '/': percent-encode it (%2F)");
        }
        let user = decode(&b[scheme_len..user_end])?;
        if !user.is_empty() {
            push("user", user, scheme_len..user_end, scheme_len..user_end);
        }
        if let Some(colon) = colon {
            let password = decode(&b[colon + 1..at])?;
            if !password.is_empty() {
                push("password", password, colon + 1..at, colon..at);
            }
        }
        pos = at + 1;
    }

    let hosts_start = pos;
    let (mut hosts, mut ports): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
    loop {
        let host = if b.get(pos) == Some(&b'[') {
            let Some(close) = b[pos..].iter().position(|&c| c == b']') else {
                return err("an IPv6 host in the URL lacks its closing ']'");
            };
            let host = decode(&b[pos + 1..pos + close])?;
            pos += close + 1;
            if !matches!(b.get(pos), None | Some(b':' | b'/' | b'?' | b',')) {
                return err("an IPv6 host in the URL is followed by something else than ':', '/', '?' or ','");
            }
            host
        } else {
            let end = find(pos, b":/?,");
            if b[pos..end].contains(&b'@') {
                return err("a host in the URL holds an '@': percent-encode an '@' of the user name or password (%40)");
            }
            let host = decode(&b[pos..end])?;
            pos = end;
            host
        };
        if host.contains(&b',') {
            return err("a host in the URL holds a ','");
        }
        let port = if b.get(pos) == Some(&b':') {
            let end = find(pos + 1, b"/?,");
            let port = &b[pos + 1..end];
            let number = std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok());
            if !port.is_empty() && (number.is_none() || !port.iter().all(u8::is_ascii_digit)) {
                return err("a port in the URL is not a number from 0 to 65535");
            }
            pos = end;
            port.to_vec()
        } else {
            Vec::new()
        };
        hosts.push(host);
        ports.push(port);
        if b.get(pos) == Some(&b',') {
            pos += 1;
            continue;
        }
        break;
    }
    let hosts_span = hosts_start..pos;
    if hosts.iter().any(|h| !h.is_empty()) {
        push(
            "host",
            hosts.join(&b','),
            hosts_span.clone(),
            hosts_span.clone(),
        );
    }
    if ports.iter().any(|p| !p.is_empty()) {
        push("port", ports.join(&b','), hosts_span.clone(), hosts_span);
    }

    if b.get(pos) == Some(&b'/') {
        let end = find(pos + 1, b"?");
        let db = decode(&b[pos + 1..end])?;
        if !db.is_empty() {
            push("dbname", db, pos + 1..end, pos..end);
        }
        pos = end;
    }
    if b.get(pos) == Some(&b'?') {
        let mut from = pos + 1;
        while from < b.len() {
            let to = find(from, b"&");
            let piece = &b[from..to];
            let Some(eq) = piece.iter().position(|&c| c == b'=') else {
                return err("a URL query parameter has no '='");
            };
            let key = String::from_utf8(decode(&piece[..eq])?)
                .map_err(|_| ParseError("a URL query parameter name is not UTF-8".into()))?;
            let mut value = decode(&piece[eq + 1..])?;
            let value_span = from + eq + 1..to;
            // With the '&' after it, or (the last one) with the '&' or '?' before it.
            let cut = if to < b.len() {
                from..to + 1
            } else {
                from - 1..to
            };
            // libpq reads the JDBC spelling `ssl=true` as `sslmode=require`.
            if key == "ssl" && value == b"true" {
                value = b"require".to_vec();
                push("sslmode", value, value_span, cut);
            } else {
                push(&key, value, value_span, cut);
            }
            from = to + 1;
        }
    }
    Ok(params)
}

/// Where the passwords of a connection string are written, or `None` when it is not one this
/// module accepts (then all of it must be hidden).
pub(crate) fn password_spans(text: &[u8]) -> Option<Vec<Range<usize>>> {
    let text = std::str::from_utf8(text).ok()?;
    ConnInfo::parse(text).ok().map(|c| c.password_spans())
}

/// The connection string without its passwords, or `None` when it is not one this module
/// accepts.
#[cfg(test)]
pub(crate) fn without_password(text: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    let info = ConnInfo::parse(text).ok()?;
    Some(info.without_password(text).into_bytes())
}

#[cfg(test)]
mod tests {
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
            if plain || (!all && bytes.len() == 1 && !must.contains(&bytes[0]) && bytes[0] != b'%')
            {
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
}
