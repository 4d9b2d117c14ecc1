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
mod tests;
