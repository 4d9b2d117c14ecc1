//! `QUOTA.FIND`'s cursor: where the next page starts (the last row of the page before, with its
//! exact expiry when the listing is by expiry), as opaque text the module checks when it comes
//! back. Pure: no Redis, no PostgreSQL.
//!
//! The text is lowercase hex of: a kind byte (1 = by user and bundle, 2 = by expiry), for kind
//! 2 the expiry (microseconds since the epoch, 8 bytes big-endian), the user and the bundle
//! (each a 2-byte big-endian length and its UTF-8 bytes), then a 4-byte check (FNV-1a of the
//! tenant, the project and everything before it). The check ties a cursor to its tenant,
//! project and kind, so a cursor of another listing, a truncated one or a mistyped one is
//! refused with a clear error instead of starting somewhere else. It is not a secret: anyone
//! who may run `QUOTA.FIND` on the project may read its rows anyway.

use crate::runtime::jobs::FindAfter;

/// The cursor of the first page, and of no next page.
pub(crate) const START: &str = "0";

/// Longest cursor accepted, in characters (ids of 255 four-byte characters each fit).
const MAX_LEN: usize = 2 * (1 + 8 + 2 * (2 + 1020) + 4);

const BY_USER: u8 = 1;
const BY_EXPIRY: u8 = 2;

/// Why a cursor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CursorError {
    /// Not a cursor `QUOTA.FIND` made for this tenant and project.
    Foreign,
    /// A cursor of a listing by expiry given without `EXPIRES_WITHIN`.
    NeedsWithin,
    /// A cursor of a listing by user given with `EXPIRES_WITHIN`.
    NoWithin,
}

/// FNV-1a (32 bits) of the tenant, the project and the cursor's body. `0xff` never occurs in
/// UTF-8, so it separates the ids unambiguously.
fn check(tenant: &str, project: &str, body: &[u8]) -> [u8; 4] {
    let bytes = tenant
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(project.as_bytes())
        .chain(&[0xff])
        .chain(body);
    let hash = bytes.fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash.to_be_bytes()
}

fn push_text(out: &mut Vec<u8>, text: &str) {
    // Ids are at most 255 characters (VARCHAR(255)): at most 1020 bytes.
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes().get(..usize::from(len)).unwrap_or_default());
}

/// The cursor text for the page after `after`, in the listing of (tenant, project).
pub(crate) fn encode(tenant: &str, project: &str, after: &FindAfter) -> String {
    let mut body = Vec::with_capacity(15 + after.user.len() + after.bundle.len());
    match after.expires_us {
        Some(at) => {
            body.push(BY_EXPIRY);
            body.extend_from_slice(&at.to_be_bytes());
        }
        None => body.push(BY_USER),
    }
    push_text(&mut body, &after.user);
    push_text(&mut body, &after.bundle);
    let check = check(tenant, project, &body);
    body.extend_from_slice(&check);
    let mut out = String::with_capacity(body.len() * 2);
    for b in body {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Reads bytes off the front of a decoded cursor.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn text(&mut self) -> Option<String> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([*len.first()?, *len.get(1)?]));
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

/// Reads `CURSOR <text>` for the listing of (tenant, project), with (`within`) or without
/// `EXPIRES_WITHIN`: `None` for `0` (the first page), else where the page starts.
pub(crate) fn decode(
    tenant: &str,
    project: &str,
    within: bool,
    text: &[u8],
) -> Result<Option<FindAfter>, CursorError> {
    if text == START.as_bytes() {
        return Ok(None);
    }
    if text.len() > MAX_LEN || !text.len().is_multiple_of(2) {
        return Err(CursorError::Foreign);
    }
    let bytes = text
        .chunks_exact(2)
        .map(|pair| Some(nibble(*pair.first()?)? << 4 | nibble(*pair.get(1)?)?))
        .collect::<Option<Vec<u8>>>()
        .ok_or(CursorError::Foreign)?;
    let split = bytes.len().checked_sub(4).ok_or(CursorError::Foreign)?;
    let (body, sum) = bytes.split_at(split);
    if sum != check(tenant, project, body) {
        return Err(CursorError::Foreign);
    }
    let mut r = Reader(body);
    let kind = r.take(1).and_then(<[u8]>::first).copied();
    let expires_us = match kind {
        Some(BY_USER) if within => return Err(CursorError::NoWithin),
        Some(BY_EXPIRY) if !within => return Err(CursorError::NeedsWithin),
        Some(BY_USER) => None,
        Some(BY_EXPIRY) => {
            let at = r.take(8).ok_or(CursorError::Foreign)?;
            let at: [u8; 8] = at.try_into().map_err(|_| CursorError::Foreign)?;
            Some(i64::from_be_bytes(at))
        }
        _ => return Err(CursorError::Foreign),
    };
    let user = r.text().ok_or(CursorError::Foreign)?;
    let bundle = r.text().ok_or(CursorError::Foreign)?;
    if !r.0.is_empty() {
        return Err(CursorError::Foreign);
    }
    Ok(Some(FindAfter {
        expires_us,
        user,
        bundle,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn after(expires_us: Option<i64>, user: &str, bundle: &str) -> FindAfter {
        FindAfter {
            expires_us,
            user: user.into(),
            bundle: bundle.into(),
        }
    }

    #[test]
    fn round_trips_and_is_tied_to_its_listing() {
        for a in [
            after(None, "alice", "*"),
            after(Some(1_790_000_000_123_456), "bob", "web"),
            after(Some(-1), "ü\"'}{", "b"),
        ] {
            let within = a.expires_us.is_some();
            let text = encode("acme", "chat", &a);
            assert_ne!(text, START);
            assert!(text.bytes().all(|b| HEX.contains(&b)), "{text}");
            assert_eq!(decode("acme", "chat", within, text.as_bytes()), Ok(Some(a)));
            assert_eq!(
                decode("acme", "chat", within, text.to_uppercase().as_bytes()).map(|a| a.is_some()),
                Ok(true)
            );
            for (t, p) in [("acme", "chat2"), ("acm", "echat"), ("other", "chat")] {
                assert_eq!(
                    decode(t, p, within, text.as_bytes()),
                    Err(CursorError::Foreign)
                );
            }
            let wrong_kind = if within {
                CursorError::NeedsWithin
            } else {
                CursorError::NoWithin
            };
            assert_eq!(
                decode("acme", "chat", !within, text.as_bytes()),
                Err(wrong_kind)
            );
        }
        assert_eq!(decode("acme", "chat", false, b"0"), Ok(None));
        assert_eq!(decode("acme", "chat", true, b"0"), Ok(None));
    }

    #[test]
    fn damaged_cursors_are_refused() {
        let text = encode("acme", "chat", &after(None, "alice", "*"));
        let mut cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"00".to_vec(),
            b"1".to_vec(),
            b"zz".to_vec(),
            text.as_bytes()[..text.len() - 2].to_vec(),
            format!("{text}00").into_bytes(),
            vec![b'a'; MAX_LEN + 2],
        ];
        for i in 0..text.len() {
            let mut flipped = text.clone().into_bytes();
            flipped[i] = if flipped[i] == b'0' { b'1' } else { b'0' };
            cases.push(flipped);
        }
        for case in cases {
            assert_eq!(
                decode("acme", "chat", false, &case),
                Err(CursorError::Foreign),
                "{case:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode("t", "p", false, &bytes);
            let _ = decode("t", "p", true, &bytes);
        }

        #[test]
        fn any_position_round_trips(user in "\\PC{1,40}", bundle in "\\PC{1,40}", at in any::<Option<i64>>()) {
            let a = after(at, &user, &bundle);
            let text = encode("t", "p", &a);
            prop_assert_eq!(decode("t", "p", at.is_some(), text.as_bytes()), Ok(Some(a)));
        }
    }
}
