//! Identities (tenant, project, user, bundle) and the names they are stored under.
//!
//! Every id is 1..=255 bytes of UTF-8 without NUL (what a `VARCHAR(255)` column takes). Names are
//! built by length-prefixing each part, so ids that contain separators never collide, and they
//! carry the user's Redis Cluster hash tag so all of one user's state lives in one slot.
//!
//! Each identity is borrowed (`UserId`, `AccountId`, `PolicyId`: what a command parses) or
//! owned (`OwnedUser`, `OwnedAccount`, `OwnedPolicy`: what crosses to a worker thread).

use std::fmt;

/// A key name, on the stack unless the ids are unusually long.
pub(crate) type KeyBuf = smallvec::SmallVec<[u8; 112]>;

/// Longest id, in bytes.
pub(crate) const MAX_ID_LEN: usize = 255;
/// The bundle id whose credits apply to every bundle.
pub(crate) const ANY_BUNDLE: &str = "*";

/// Why an id was refused; `Display` is the wire error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdError {
    Length(&'static str),
    Encoding(&'static str),
    Unroutable,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Length(what) => {
                write!(f, "ERR {what} must be 1 to {MAX_ID_LEN} bytes")
            }
            IdError::Encoding(what) => {
                write!(f, "ERR {what} must be UTF-8 without NUL bytes")
            }
            IdError::Unroutable => f.write_str(
                "ERR user must not contain a '}' outside a hash tag (no key in the user's slot could be named)",
            ),
        }
    }
}

/// Checks one id and returns it as text.
pub(crate) fn check_id<'a>(what: &'static str, raw: &'a [u8]) -> Result<&'a str, IdError> {
    if raw.is_empty() || raw.len() > MAX_ID_LEN {
        return Err(IdError::Length(what));
    }
    let text = std::str::from_utf8(raw).map_err(|_| IdError::Encoding(what))?;
    // Without an early exit, so the compiler checks many bytes at a time (`contains` went
    // byte by byte on ids this short).
    if raw.iter().fold(false, |nul, &b| nul | (b == 0)) {
        return Err(IdError::Encoding(what));
    }
    Ok(text)
}

/// The part of a user id that Redis Cluster hashes: the first non-empty `{...}` section, else the
/// whole id (the same rule Redis applies to key names).
pub(crate) fn hash_tag(user: &str) -> &str {
    // Byte searches: ids are short, and `{`, `}` are ASCII (never inside a UTF-8 sequence).
    let bytes = user.as_bytes();
    if let Some(open) = bytes.iter().position(|&b| b == b'{') {
        let rest = bytes.get(open + 1..).unwrap_or_default();
        if let Some(len) = rest.iter().position(|&b| b == b'}') {
            if len > 0 {
                return user.get(open + 1..open + 1 + len).unwrap_or(user);
            }
        }
    }
    user
}

/// A user: (tenant, project, user). One credits-cache entry each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct UserId<'a> {
    pub tenant: &'a str,
    pub project: &'a str,
    pub user: &'a str,
}

/// An account: a user's usage in one bundle. One Redis key each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AccountId<'a> {
    pub user: UserId<'a>,
    pub bundle: &'a str,
}

/// A named policy: (tenant, project, name). One policy-cache entry each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyId<'a> {
    pub tenant: &'a str,
    pub project: &'a str,
    pub name: &'a str,
}

/// A user's ids, owned so they can cross to a worker thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedUser {
    pub tenant: String,
    pub project: String,
    pub user: String,
}

impl OwnedUser {
    /// Copies the ids.
    pub(crate) fn from_id(id: &UserId<'_>) -> OwnedUser {
        OwnedUser {
            tenant: id.tenant.into(),
            project: id.project.into(),
            user: id.user.into(),
        }
    }

    /// Borrows them back.
    pub(crate) fn id(&self) -> UserId<'_> {
        UserId {
            tenant: &self.tenant,
            project: &self.project,
            user: &self.user,
        }
    }
}

/// An account's ids, owned (a blocked command's request, a flush batch's account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedAccount {
    pub user: OwnedUser,
    pub bundle: String,
}

impl OwnedAccount {
    /// Copies the ids.
    pub(crate) fn from_id(id: &AccountId<'_>) -> OwnedAccount {
        OwnedAccount {
            user: OwnedUser::from_id(&id.user),
            bundle: id.bundle.into(),
        }
    }

    /// Borrows them back.
    pub(crate) fn id(&self) -> AccountId<'_> {
        AccountId {
            user: self.user.id(),
            bundle: &self.bundle,
        }
    }
}

/// A policy's ids, owned so they can cross to a worker thread.
#[derive(Debug, Clone)]
pub(crate) struct OwnedPolicy {
    pub tenant: String,
    pub project: String,
    pub name: String,
}

impl OwnedPolicy {
    /// Copies the ids.
    pub(crate) fn from_id(id: &PolicyId<'_>) -> OwnedPolicy {
        OwnedPolicy {
            tenant: id.tenant.into(),
            project: id.project.into(),
            name: id.name.into(),
        }
    }

    /// Borrows them back.
    pub(crate) fn id(&self) -> PolicyId<'_> {
        PolicyId {
            tenant: &self.tenant,
            project: &self.project,
            name: &self.name,
        }
    }
}

/// Validates a tenant, a project and a third id named `what` (argument names appear in errors).
fn check_three<'a>(ids: [&'a [u8]; 3], what: &'static str) -> Result<[&'a str; 3], IdError> {
    let [tenant, project, third] = ids;
    Ok([
        check_id("tenant", tenant)?,
        check_id("project", project)?,
        check_id(what, third)?,
    ])
}

impl<'a> PolicyId<'a> {
    /// Validates (tenant, project, name).
    pub(crate) fn parse(ids: [&'a [u8]; 3]) -> Result<Self, IdError> {
        let [tenant, project, name] = check_three(ids, "policy")?;
        Ok(PolicyId {
            tenant,
            project,
            name,
        })
    }

    /// The policy-cache key (see `policy_key`).
    pub(crate) fn key(&self) -> KeyBuf {
        policy_key(self.tenant, self.project, self.name)
    }
}

impl<'a> UserId<'a> {
    /// Validates (tenant, project, user); a user id whose hash tag would not route is refused.
    pub(crate) fn parse(ids: [&'a [u8]; 3]) -> Result<Self, IdError> {
        let [tenant, project, user] = check_three(ids, "user")?;
        let id = UserId {
            tenant,
            project,
            user,
        };
        // Only an id with a `}` can have one in its tag: the common id is checked in one pass
        // without an early exit (many bytes at a time).
        let closes = user.bytes().fold(false, |close, b| close | (b == b'}'));
        if closes && hash_tag(id.user).contains('}') {
            return Err(IdError::Unroutable);
        }
        Ok(id)
    }

    /// The cache key of this user: `q:{tag}:` followed by the length-prefixed ids. It is also the
    /// prefix of every account key of the user.
    pub(crate) fn key(&self) -> KeyBuf {
        user_key(self.tenant, self.project, self.user)
    }
}

/// The cache key of the user (tenant, project, user): `q:{tag}:` followed by the
/// length-prefixed ids (see `UserId::key`).
pub(crate) fn user_key(tenant: &str, project: &str, user: &str) -> KeyBuf {
    let mut out = KeyBuf::new();
    out.extend_from_slice(b"q:{");
    out.extend_from_slice(hash_tag(user).as_bytes());
    out.extend_from_slice(b"}:");
    for part in [tenant, project, user] {
        push_part(&mut out, part);
    }
    out
}

/// The policy-cache key of (tenant, project, name): `p:` followed by the length-prefixed ids.
pub(crate) fn policy_key(tenant: &str, project: &str, name: &str) -> KeyBuf {
    let mut out = KeyBuf::new();
    out.extend_from_slice(b"p:");
    for part in [tenant, project, name] {
        push_part(&mut out, part);
    }
    out
}

impl<'a> AccountId<'a> {
    /// Validates the four ids.
    pub(crate) fn parse(args: [&'a [u8]; 4]) -> Result<Self, IdError> {
        let [tenant, project, user, bundle] = args;
        Ok(AccountId {
            user: UserId::parse([tenant, project, user])?,
            bundle: check_id("bundle", bundle)?,
        })
    }

    /// The four ids in key order: tenant, project, user, bundle.
    fn parts(&self) -> impl Iterator<Item = &'a str> {
        [
            self.user.tenant,
            self.user.project,
            self.user.user,
            self.bundle,
        ]
        .into_iter()
    }

    /// The Redis key that holds this account's usage: the user's key plus the bundle.
    /// Returns it together with the length of the user-key prefix.
    pub(crate) fn key(&self) -> (KeyBuf, usize) {
        let mut out = self.user.key();
        let user_len = out.len();
        push_part(&mut out, self.bundle);
        (out, user_len)
    }
}

/// The account (owned) of an account key that `AccountId::key` built; none for any other
/// name.
pub(crate) fn account_of_key(key: &[u8]) -> Option<OwnedAccount> {
    let id = account_parts_of_key(key).and_then(account_of_parts)?;
    Some(OwnedAccount::from_id(&id))
}

/// The account whose ids are `parts` (tenant, project, user, bundle), when each is UTF-8;
/// otherwise unchecked.
fn account_of_parts([tenant, project, user, bundle]: [&[u8]; 4]) -> Option<AccountId<'_>> {
    let text = |part| std::str::from_utf8(part).ok();
    Some(AccountId {
        user: UserId {
            tenant: text(tenant)?,
            project: text(project)?,
            user: text(user)?,
        },
        bundle: text(bundle)?,
    })
}

/// The four length-prefixed parts after an account key's `q:{tag}:` prefix, unchecked.
fn account_parts_of_key(key: &[u8]) -> Option<[&[u8]; 4]> {
    let rest = key.strip_prefix(b"q:{")?;
    let close = rest.windows(2).position(|w| w == b"}:")?;
    let mut rest = rest.get(close + 2..)?;
    let mut out: [&[u8]; 4] = [&[]; 4];
    for slot in out.iter_mut() {
        let colon = rest.iter().take(4).position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(rest.get(..colon)?).ok()?.parse().ok()?;
        *slot = rest.get(colon + 1..colon + 1 + len)?;
        rest = rest.get(colon + 1 + len..)?;
    }
    rest.is_empty().then_some(out)
}

/// Appends the compact form of an account key that `AccountId::key` built to `out`: its four
/// ids, each after a one-byte length (about half the bytes of the name, which repeats the user
/// in its hash tag and spells lengths in decimal). False, with `out` unchanged, for any other
/// name: one that `account_key_of_compact` would not give back exactly.
pub(crate) fn compact_account_key(key: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(id) = account_parts_of_key(key).and_then(account_of_parts) else {
        return false;
    };
    if id.parts().any(|part| part.len() > MAX_ID_LEN) || id.key().0.as_slice() != key {
        return false;
    }
    for part in id.parts() {
        out.push(part.len() as u8);
        out.extend_from_slice(part.as_bytes());
    }
    true
}

/// The account key whose compact form (`compact_account_key`) is `compact`.
pub(crate) fn account_key_of_compact(compact: &[u8]) -> Option<KeyBuf> {
    let mut parts: [&[u8]; 4] = [&[]; 4];
    let mut rest = compact;
    for part in parts.iter_mut() {
        let (len, tail) = rest.split_first()?;
        let len = usize::from(*len);
        *part = tail.get(..len)?;
        rest = tail.get(len..)?;
    }
    let id = account_of_parts(parts)?;
    rest.is_empty().then(|| id.key().0)
}

fn push_part(out: &mut KeyBuf, part: &str) {
    // Decimal length, a colon, the bytes: unambiguous whatever the bytes are.
    let n = part.len();
    if n >= 100 {
        out.push(b'0' + (n / 100 % 10) as u8);
    }
    if n >= 10 {
        out.push(b'0' + (n / 10 % 10) as u8);
    }
    out.push(b'0' + (n % 10) as u8);
    out.push(b':');
    out.extend_from_slice(part.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a user key back into (tenant, project, user); `None` if it is not one.
    fn decode_user_key(key: &[u8]) -> Option<(String, String, String)> {
        let rest = key.strip_prefix(b"q:{")?;
        let close = rest.iter().position(|&b| b == b'}')?;
        let mut rest = rest.get(close + 1..)?.strip_prefix(b":")?;
        let mut parts = Vec::with_capacity(3);
        for _ in 0..3 {
            let colon = rest.iter().position(|&b| b == b':')?;
            let len: usize = std::str::from_utf8(rest.get(..colon)?).ok()?.parse().ok()?;
            let bytes = rest.get(colon + 1..colon + 1 + len)?;
            parts.push(String::from_utf8(bytes.to_vec()).ok()?);
            rest = rest.get(colon + 1 + len..)?;
        }
        if !rest.is_empty() {
            return None;
        }
        let user = parts.pop()?;
        let project = parts.pop()?;
        let tenant = parts.pop()?;
        Some((tenant, project, user))
    }

    fn account<'a>(t: &'a str, p: &'a str, u: &'a str, b: &'a str) -> AccountId<'a> {
        AccountId::parse([t.as_bytes(), p.as_bytes(), u.as_bytes(), b.as_bytes()]).unwrap()
    }

    #[test]
    fn separators_never_collide() {
        let a = account("a:b", "c", "u", "x").key().0;
        let b = account("a", "b:c", "u", "x").key().0;
        assert_ne!(a, b);
        let c = account("a", "b", "1:c", "x").key().0;
        let d = account("a", "b", "1", "c:x").key().0;
        assert_ne!(c, d);
    }

    #[test]
    fn user_key_is_the_account_key_prefix_and_decodes() {
        let acc = account("t", "p", "alice", "*");
        let (key, user_len) = acc.key();
        assert_eq!(&key[..user_len], acc.user.key().as_slice());
        let long = "x".repeat(255);
        let (key, _) = account(&long, "p", "u", "b").key();
        assert!(key.starts_with(b"q:{u}:255:xxx"));
        assert_eq!(
            decode_user_key(&acc.user.key()),
            Some(("t".into(), "p".into(), "alice".into()))
        );
        assert_eq!(decode_user_key(b"q:{x}:1:a"), None);
    }

    #[test]
    fn hash_tags_follow_redis_rules() {
        assert_eq!(hash_tag("alice"), "alice");
        assert_eq!(hash_tag("{org1}alice"), "org1");
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("a{b"), "a{b");
        assert!(UserId::parse([b"t", b"p", b"a{}b"]).is_err());
        assert!(UserId::parse([b"t", b"p", b"a}b"]).is_err());
        assert!(UserId::parse([b"t", b"p", b"a{b"]).is_ok());
        let key = account("t", "p", "{org1}alice", "b").key().0;
        assert!(key.starts_with(b"q:{org1}:"));
    }

    #[test]
    fn bad_ids_name_the_argument() {
        assert_eq!(
            check_id("tenant", b"").unwrap_err().to_string(),
            "ERR tenant must be 1 to 255 bytes"
        );
        assert!(check_id("user", &[b'a'; 256]).is_err());
        assert!(check_id("user", &[b'a'; 255]).is_ok());
        assert!(check_id("bundle", b"a\0b").is_err());
        assert!(check_id("bundle", &[0xff, 0xfe]).is_err());
        assert_eq!(check_id("user", "üñí".as_bytes()).unwrap(), "üñí");
    }

    #[test]
    fn account_keys_give_their_ids_back() {
        let id = AccountId::parse([b"acme", b"ch:at", b"{org}alice" as &[u8], b"*"]);
        if let Ok(id) = id {
            let (key, _) = id.key();
            let back = account_of_key(&key).unwrap();
            assert_eq!(back.id(), id);
        }
        let long = "u".repeat(255);
        let id = AccountId::parse([b"t" as &[u8], b"p", long.as_bytes(), b"b"]).unwrap();
        assert_eq!(account_of_key(&id.key().0).unwrap().user.user, long);
        assert!(account_of_key(b"q:{x}:1:t").is_none());
        assert!(account_of_key(b"other").is_none());
    }

    /// An account key's compact form gives the name back exactly; names `AccountId::key` did
    /// not build (another hash tag, a bad length, other text) have none.
    #[test]
    fn compact_account_keys_round_trip_and_refuse_other_names() {
        let long = "u".repeat(MAX_ID_LEN);
        let args: [[&[u8]; 4]; 4] = [
            [b"acme", b"chat", b"u000000000042", b"*"],
            [b"t", b"p", b"user{tag}x", b"b:1"],
            ["ténant".as_bytes(), b"p}:", b"{}", "é".as_bytes()],
            [b"t", b"p", long.as_bytes(), b"b"],
        ];
        for raw in args {
            let Ok(id) = AccountId::parse(raw) else {
                continue;
            };
            let key = id.key().0;
            let mut out = vec![9];
            assert!(compact_account_key(&key, &mut out), "{id:?}");
            assert!(out.len() < key.len(), "{} >= {}", out.len(), key.len());
            assert_eq!(
                account_key_of_compact(&out[1..]).unwrap().as_slice(),
                key.as_slice()
            );
        }
        for other in [
            &b"other"[..],
            b"q:{x}:1:t1:p1:u1:b",
            b"q:{u}:1:t1:p1:u1:bx",
            b"q:{u}:01:t1:p1:u1:b",
            b"q:{u}:1:t1:p1:u2:b",
        ] {
            let mut out = Vec::new();
            assert!(!compact_account_key(other, &mut out), "{other:?}");
            assert!(out.is_empty());
        }
        assert!(account_key_of_compact(&[3, b'a']).is_none());
    }
}
