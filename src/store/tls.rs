//! TLS to PostgreSQL with rustls (the `ring` provider): the `ssl*` settings of a connection
//! string read as libpq reads them, the certificate checks each `sslmode` asks for and client
//! certificates, as one rustls configuration per connection attempt.
//!
//! Owns what TLS means for a connection. Must not parse connection strings (`connstr`), speak
//! to rust-postgres (`tls_connect`) or connect (`pool`), and never installs a process-wide
//! crypto provider: each configuration names its own, so nothing here touches the state of an
//! OpenSSL that the Redis server may have linked.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) use super::tls_connect::MakeRustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// libpq's `sslmode`: whether to encrypt and what to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain only.
    Disable,
    /// Plain first; TLS (unchecked) if the server refuses a plain connection.
    Allow,
    /// TLS if the server offers it (unchecked unless a root certificate file exists), else
    /// plain; a failed handshake is retried plain.
    Prefer,
    /// TLS or nothing; the certificate is checked against a root certificate file if there is
    /// one (then as `verify-ca`).
    Require,
    /// TLS, the server's certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// `verify-ca` plus the host name checked against the certificate.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// A PEM file (`sslrootcert=<path>`, or libpq's default `~/.postgresql/root.crt`).
    File { path: PathBuf, given: bool },
    /// The system's trust store (`sslrootcert=system`).
    System,
    /// None (no HOME to look in).
    Absent,
}

/// A file setting: the path, and whether the connection string named it (a default path that
/// does not exist is skipped, as libpq does; a named one is an error).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileSetting {
    path: PathBuf,
    given: bool,
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub mode: SslMode,
    roots: Roots,
    cert: Option<FileSetting>,
    key: Option<FileSetting>,
    crl: Option<FileSetting>,
    sni: bool,
    send_client_cert: bool,
    tls13_only: bool,
    tls12_only: bool,
}

/// The connection-string keywords this file reads; the others go to rust-postgres.
pub(crate) const KEYWORDS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslpassword",
    "sslcompression",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
];

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            roots: Roots::Absent,
            cert: None,
            key: None,
            crl: None,
            sni: true,
            send_client_cert: true,
            tls13_only: false,
            tls12_only: false,
        }
    }
}

impl TlsSettings {
    /// Reads the TLS keywords (each once, its last value) with libpq's defaults: `sslmode`
    /// prefer, and `root.crt`, `postgresql.crt`, `postgresql.key` and `root.crl` in
    /// `<home>/.postgresql/` when not named. Errors never quote a value except a file path.
    pub(crate) fn from_params(
        params: &[(&str, &[u8])],
        home: Option<&Path>,
    ) -> Result<TlsSettings, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            params
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| {
                    String::from_utf8(v.to_vec()).map_err(|_| format!("{key} is not UTF-8"))
                })
                .transpose()
        };
        let default_file = |name: &str| home.map(|h| h.join(".postgresql").join(name));
        let file = |key: &str, default: &str| -> Result<Option<FileSetting>, String> {
            Ok(match text(key)? {
                Some(path) if !path.is_empty() => Some(FileSetting {
                    path: PathBuf::from(path),
                    given: true,
                }),
                _ => default_file(default).map(|path| FileSetting { path, given: false }),
            })
        };
        let mut s = TlsSettings::default();
        let mode = text("sslmode")?;
        if let Some(mode) = &mode {
            s.mode = SslMode::parse(mode).ok_or(
                "sslmode must be disable, allow, prefer, require, verify-ca or verify-full",
            )?;
        }
        s.roots = match text("sslrootcert")?.as_deref() {
            Some("system") => Roots::System,
            Some(path) if !path.is_empty() => Roots::File {
                path: PathBuf::from(path),
                given: true,
            },
            _ => default_file("root.crt")
                .map_or(Roots::Absent, |path| Roots::File { path, given: false }),
        };
        if s.roots == Roots::System {
            // libpq: the system's roots are only worth something with the host name checked.
            match mode {
                None => s.mode = SslMode::VerifyFull,
                Some(_) if s.mode != SslMode::VerifyFull => {
                    return Err(
                        "sslrootcert=system needs sslmode=verify-full (a weaker sslmode may not be used with the system's roots)"
                            .into(),
                    )
                }
                Some(_) => {}
            }
        }
        s.cert = file("sslcert", "postgresql.crt")?;
        s.key = file("sslkey", "postgresql.key")?;
        s.crl = file("sslcrl", "root.crl")?;
        if text("sslcrldir")?.is_some_and(|d| !d.is_empty()) {
            return Err(
                "sslcrldir is not supported: give the revocation lists in one PEM file with sslcrl"
                    .into(),
            );
        }
        if text("sslpassword")?.is_some_and(|p| !p.is_empty()) {
            return Err("sslpassword is not supported: encrypted client keys cannot be read; decrypt the key (openssl pkey -in key -out plain.key) and protect it with its file mode".into());
        }
        s.sni = match text("sslsni")?.as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(_) => return Err("sslsni must be 0 or 1".into()),
        };
        if !matches!(text("sslcompression")?.as_deref(), None | Some("0" | "1")) {
            return Err("sslcompression must be 0 or 1 (it has no effect)".into());
        }
        s.send_client_cert = match text("sslcertmode")?.as_deref() {
            None | Some("allow") => true,
            Some("disable") => false,
            Some("require") => {
                return Err("sslcertmode=require is not supported (allow and disable are)".into())
            }
            Some(_) => return Err("sslcertmode must be disable or allow".into()),
        };
        let version = |key: &str| -> Result<Option<u8>, String> {
            match text(key)?.as_deref() {
                None | Some("") => Ok(None),
                Some("TLSv1") => Ok(Some(10)),
                Some("TLSv1.1") => Ok(Some(11)),
                Some("TLSv1.2") => Ok(Some(12)),
                Some("TLSv1.3") => Ok(Some(13)),
                Some(_) => Err(format!("{key} must be TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3")),
            }
        };
        // rustls speaks TLS 1.2 and 1.3: a lower minimum changes nothing.
        s.tls13_only = version("ssl_min_protocol_version")? == Some(13);
        match version("ssl_max_protocol_version")? {
            Some(10 | 11) => {
                return Err(
                    "ssl_max_protocol_version below TLSv1.2 is not supported (TLS 1.2 and 1.3 are)"
                        .into(),
                )
            }
            Some(12) => s.tls12_only = true,
            _ => {}
        }
        if s.tls12_only && s.tls13_only {
            return Err("ssl_min_protocol_version is above ssl_max_protocol_version".into());
        }
        if matches!(text("gssencmode")?.as_deref(), Some("require")) {
            return Err("gssencmode=require is not supported (no GSSAPI): use TLS".into());
        }
        Ok(s)
    }

    /// The rustls configuration for one connection attempt: files are read now, so renewed
    /// certificates apply to the next connection. `Err` says which file and why.
    pub(crate) fn connector(&self) -> Result<MakeRustls, String> {
        // ring, deliberately (see the README: no OpenSSL symbols, nothing to build but C and
        // assembly from the crate). Its provider has no post-quantum key exchange, which
        // rustls 0.23.48 marks as deprecated; PostgreSQL servers offer X25519 and P-256.
        #[allow(deprecated)]
        let provider = Arc::new(provider::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let roots = self.root_store()?;
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            Some(roots) => {
                let mut builder =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                if let Some(crls) = self.crls()? {
                    builder = builder.with_crls(crls);
                }
                let webpki = builder
                    .build()
                    .map_err(|e| format!("cannot use the root certificates: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            None => Arc::new(Unchecked(provider.clone())),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.client_identity()? {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate (sslcert) and key (sslkey) cannot be used together: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = self.sni;
        // PostgreSQL 17 checks the protocol name when given; older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustls::new(config))
    }

    /// The trusted roots, or `None` when the chain is not to be checked.
    fn root_store(&self) -> Result<Option<RootCertStore>, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "sslrootcert=system: no certificate found in the system's trust store"
                            .into(),
                    );
                }
            }
            Roots::File { path, given } => {
                let data = match std::fs::read(path) {
                    Ok(data) => data,
                    Err(e) if !given && e.kind() == io::ErrorKind::NotFound => {
                        if self.mode.verifies() {
                            return Err(format!(
                                "sslmode={} needs root certificates: {} does not exist (give sslrootcert=<file>, or sslrootcert=system)",
                                if self.mode == SslMode::VerifyFull { "verify-full" } else { "verify-ca" },
                                path.display()
                            ));
                        }
                        return Ok(None);
                    }
                    Err(e) => {
                        return Err(format!(
                            "cannot read the root certificates (sslrootcert) {}: {e}",
                            path.display()
                        ))
                    }
                };
                let mut count = 0;
                for cert in CertificateDer::pem_slice_iter(&data) {
                    let cert = cert.map_err(|e| {
                        format!(
                            "the root certificates (sslrootcert) {} are not PEM: {e}",
                            path.display()
                        )
                    })?;
                    store.add(cert).map_err(|e| {
                        format!(
                            "a root certificate in {} cannot be used: {e}",
                            path.display()
                        )
                    })?;
                    count += 1;
                }
                if count == 0 {
                    return Err(format!(
                        "no certificate in the root certificates file (sslrootcert) {}",
                        path.display()
                    ));
                }
            }
            Roots::Absent => {
                if self.mode.verifies() {
                    return Err("sslmode=verify-ca and verify-full need root certificates: give sslrootcert=<file> (or sslrootcert=system)".into());
                }
                return Ok(None);
            }
        }
        Ok(Some(store))
    }

    fn crls(&self) -> Result<Option<Vec<CertificateRevocationListDer<'static>>>, String> {
        let Some(crl) = &self.crl else {
            return Ok(None);
        };
        let data = match std::fs::read(&crl.path) {
            Ok(data) => data,
            Err(e) if !crl.given && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot read the revocation list (sslcrl) {}: {e}",
                    crl.path.display()
                ))
            }
        };
        CertificateRevocationListDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|e| {
                format!(
                    "the revocation list (sslcrl) {} is not PEM: {e}",
                    crl.path.display()
                )
            })
    }

    /// The client certificate chain and key, read and checked as libpq does (a key readable by
    /// others is refused).
    #[allow(clippy::type_complexity)]
    fn client_identity(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
        let Some(cert) = self.cert.as_ref().filter(|_| self.send_client_cert) else {
            return Ok(None);
        };
        let data = match std::fs::read(&cert.path) {
            Ok(data) => data,
            Err(e) if !cert.given && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot read the client certificate (sslcert) {}: {e}",
                    cert.path.display()
                ))
            }
        };
        let chain = CertificateDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!(
                    "the client certificate (sslcert) {} is not PEM: {e}",
                    cert.path.display()
                )
            })?;
        if chain.is_empty() {
            return Err(format!(
                "no certificate in the client certificate file (sslcert) {}",
                cert.path.display()
            ));
        }
        let Some(key) = &self.key else {
            return Err("a client certificate (sslcert) needs its key (sslkey)".into());
        };
        check_key_mode(&key.path)?;
        let data = std::fs::read(&key.path).map_err(|e| {
            format!(
                "cannot read the client key (sslkey) {}: {e}",
                key.path.display()
            )
        })?;
        if data.windows(9).any(|w| w == b"ENCRYPTED") {
            return Err(format!("the client key (sslkey) {} is encrypted: decrypt it (sslpassword is not supported)", key.path.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&data).map_err(|e| {
            format!(
                "the client key (sslkey) {} holds no PEM private key: {e}",
                key.path.display()
            )
        })?;
        Ok(Some((chain, key)))
    }
}

/// libpq refuses a private key others may read: 0600 or less when owned by this user, 0640 or
/// less when owned by root.
fn check_key_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "cannot read the client key (sslkey) {}: {e}",
            path.display()
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "the client key (sslkey) {} is not a regular file",
            path.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { geteuid() };
    let mode = meta.mode();
    let too_open = if meta.uid() == me {
        mode & 0o077 != 0
    } else if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        false
    };
    if too_open {
        return Err(format!(
            "the client key (sslkey) {} has group or world access: give it mode 0600 (or 0640 when owned by root)",
            path.display()
        ));
    }
    Ok(())
}

extern "C" {
    fn geteuid() -> u32;
}

/// Checks the chain and the handshake, not the host name (`verify-ca`, and `prefer`/`require`
/// with a root certificate file, as libpq).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The name is checked last: the chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Encrypts without checking who the server is (`prefer`, `require`, `allow` without root
/// certificates, as libpq), but still checks that the server holds its certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)], home: Option<&str>) -> Result<TlsSettings, String> {
        let params: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        TlsSettings::from_params(&params, home.map(Path::new))
    }

    #[test]
    fn modes_and_defaults_follow_libpq() {
        let s = settings(&[], Some("/home/redis")).unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert_eq!(
            s.roots,
            Roots::File {
                path: "/home/redis/.postgresql/root.crt".into(),
                given: false
            }
        );
        assert_eq!(s.cert.as_ref().map(|c| c.given), Some(false));
        assert_eq!(settings(&[], None).unwrap().roots, Roots::Absent);
        for (mode, want) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(settings(&[("sslmode", mode)], None).unwrap().mode, want);
        }
        assert!(settings(&[("sslmode", "verify")], None).is_err());
        // sslrootcert=system: verify-full by default, nothing weaker.
        assert_eq!(
            settings(&[("sslrootcert", "system")], None).unwrap().mode,
            SslMode::VerifyFull
        );
        let e = settings(&[("sslrootcert", "system"), ("sslmode", "require")], None).unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        assert!(settings(&[("sslpassword", "x")], None).is_err());
        assert!(settings(&[("sslpassword", "")], None).is_ok());
        assert!(settings(&[("sslcrldir", "/x")], None).is_err());
        assert!(settings(&[("gssencmode", "disable")], None).is_ok());
        assert!(settings(&[("gssencmode", "require")], None).is_err());
        assert!(settings(&[("ssl_max_protocol_version", "TLSv1.1")], None).is_err());
        assert!(settings(
            &[
                ("ssl_min_protocol_version", "TLSv1.3"),
                ("ssl_max_protocol_version", "TLSv1.2")
            ],
            None
        )
        .is_err());
        assert!(!settings(&[("sslsni", "0")], None).unwrap().sni);
    }

    #[test]
    fn verifying_modes_need_roots() {
        let dir = std::env::temp_dir().join(format!("quota-tls-{}", std::process::id()));
        let home = dir.to_string_lossy().into_owned();
        // No ~/.postgresql/root.crt: prefer and require encrypt without checking.
        assert!(settings(&[("sslmode", "require")], Some(&home))
            .unwrap()
            .connector()
            .is_ok());
        let e = settings(&[("sslmode", "verify-full")], Some(&home))
            .unwrap()
            .connector()
            .err()
            .unwrap();
        assert!(e.contains("root.crt does not exist"), "{e}");
        let e = settings(
            &[
                ("sslmode", "verify-ca"),
                ("sslrootcert", "/nonexistent/ca.pem"),
            ],
            None,
        )
        .unwrap()
        .connector()
        .err()
        .unwrap();
        assert!(
            e.contains("cannot read the root certificates (sslrootcert) /nonexistent/ca.pem"),
            "{e}"
        );
        let e = settings(&[("sslcert", "/nonexistent/c.pem")], None)
            .unwrap()
            .connector()
            .err()
            .unwrap();
        assert!(
            e.contains("cannot read the client certificate (sslcert)"),
            "{e}"
        );
    }

    #[test]
    fn system_roots_load_from_the_trust_store() {
        // Debian's ca-certificates; a machine without a trust store says so clearly.
        match settings(&[("sslrootcert", "system")], None)
            .unwrap()
            .connector()
        {
            Ok(_) => {}
            Err(e) => assert!(
                e.contains("no certificate found in the system's trust store"),
                "{e}"
            ),
        }
    }
}
