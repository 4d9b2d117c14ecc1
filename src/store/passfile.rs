//! The PostgreSQL password when the URL carries none: `quota.pg-password`, else a password file
//! in libpq's pgpass format (`quota.pg-passfile`, else `$PGPASSFILE`, else `~/.pgpass`).
//!
//! Owns reading and matching the password file, with libpq's rules: lines
//! `hostname:port:database:username:password`, `*` matches anything, `\:` and `\\` escape, `#`
//! starts a comment, the first matching line wins, and a file that group or others can read is
//! ignored. Must never put a password, or a line of the file, into a message.

use std::fmt;
use std::path::PathBuf;

/// Where the password comes from when the URL has none.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// `quota.pg-password`: used as is when not empty.
    pub password: String,
    /// `quota.pg-passfile`: a pgpass file; empty = `$PGPASSFILE`, else `~/.pgpass`.
    pub passfile: String,
}

/// What `Debug` shows of a secret: nothing when empty, else `<redacted>`.
pub(crate) fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("password", &redacted(&self.password))
            .field("passfile", &self.passfile)
            .finish()
    }
}

/// What a connection is for, as the password file matches it.
pub(crate) struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

impl Credentials {
    /// The password for `target`: `quota.pg-password`, else the first matching line of the
    /// password file. `Err` says why the file could not be used (never its contents).
    pub(crate) fn password_for(&self, target: &Target<'_>) -> Result<Option<String>, String> {
        if !self.password.is_empty() {
            return Ok(Some(self.password.clone()));
        }
        let Some(path) = self.passfile_path() else {
            return Ok(None);
        };
        let explicit = !self.passfile.is_empty() || std::env::var_os("PGPASSFILE").is_some();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            // libpq ignores a missing default file silently; a configured one is an error.
            Err(_) if !explicit => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot read the password file {}: {e}",
                    path.display()
                ))
            }
        };
        if !meta.is_file() {
            return Err(format!(
                "the password file {} is not a regular file",
                path.display()
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(format!(
                    "the password file {} has group or world access; it must be 0600 or less",
                    path.display()
                ));
            }
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
        Ok(lookup(&text, target))
    }

    fn passfile_path(&self) -> Option<PathBuf> {
        if !self.passfile.is_empty() {
            return Some(PathBuf::from(&self.passfile));
        }
        if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".pgpass"))
    }
}

/// The password of the first line of a pgpass file that matches `target`.
pub(crate) fn lookup(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, port.as_str(), target.database, target.user];
    text.lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_fields(line)?;
            let matches = fields
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want);
            matches.then(|| fields[4].clone())
        })
}

/// The five fields of a line, unescaped; `None` when there are fewer than five.
fn split_fields(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut()?.push(next);
                }
            }
            // Everything after the fourth colon is the password, colons included.
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(host: &'a str, port: u16, db: &'a str, user: &'a str) -> Target<'a> {
        Target {
            host,
            port,
            database: db,
            user,
        }
    }

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        let file = "# comment\n\
                    db.example:5432:quota:app:first\n\
                    *:5433:*:app:pa\\:ss\\\\word\n\
                    *:*:*:app:fallback:with:colons\r\n";
        assert_eq!(
            lookup(file, &target("db.example", 5432, "quota", "app")).as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(file, &target("other", 5433, "x", "app")).as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(
            lookup(file, &target("other", 1, "x", "app")).as_deref(),
            Some("fallback:with:colons")
        );
        assert_eq!(lookup(file, &target("other", 1, "x", "someone")), None);
        assert_eq!(lookup("h:1:d\n", &target("h", 1, "d", "u")), None);
    }

    #[test]
    fn configured_password_wins_and_files_must_be_private() {
        let given = Credentials {
            password: "direct".into(),
            passfile: "/nonexistent".into(),
        };
        let t = target("h", 5432, "d", "u");
        assert_eq!(given.password_for(&t), Ok(Some("direct".into())));

        let dir = std::env::temp_dir().join(format!("quota-passfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgpass");
        std::fs::write(&path, "h:5432:d:u:from-file\n").unwrap();
        let creds = Credentials {
            password: String::new(),
            passfile: path.to_string_lossy().into_owned(),
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(creds.password_for(&t), Ok(Some("from-file".into())));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = creds.password_for(&t).unwrap_err();
        assert!(err.contains("0600") && !err.contains("from-file"), "{err}");
        let missing = Credentials {
            password: String::new(),
            passfile: dir.join("none").to_string_lossy().into_owned(),
        };
        assert!(missing.password_for(&t).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!format!("{given:?}").contains("direct"));
    }
}
