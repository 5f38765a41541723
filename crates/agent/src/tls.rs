//! Whom the agent (and the CLI, which uses this module too) trusts to be
//! its server over HTTPS: a pinned CA (`ca_file`) or a pinned certificate
//! fingerprint (`ca_fingerprint`, or attached to the bootstrap token as
//! `TOKEN#sha256:HEX`). Without a pin, the public web roots apply.
//!
//! The pin chosen at enrollment is kept in the state dir (`trust.json`),
//! so every later run checks the same; a pin given in the configuration
//! beats it. A certificate that does not match fails the connection with
//! an error that says so, names what was expected and what was seen
//! (`untrusted`), and nothing weaker is tried: no other roots, and never
//! plain HTTP while a pin is kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{read_json, write_json, StateDir, StateError};

/// The pin's file in the state dir.
const TRUST: &str = "trust.json";

/// What separates a bootstrap token from the fingerprint attached to it.
pub const ATTACHED: char = '#';

/// A pin that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable PEM certificate{detail}")]
    NoCa { path: String, detail: String },
    #[error(
        "'{0}' is not a certificate fingerprint: expected sha256: and 64 hex digits \
         (as `drover token create` prints)"
    )]
    BadFingerprint(String),
    #[error("give ca_file or ca_fingerprint, not both")]
    Both,
    #[error("the fingerprint attached to the token ({attached}) differs from --ca-fingerprint/ca_file ({configured})")]
    Conflict {
        attached: String,
        configured: String,
    },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// The SHA-256 of a certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Reads `sha256:HEX` (the prefix optional, any case, colons between
    /// bytes allowed, as `openssl x509 -fingerprint -sha256` prints).
    pub fn parse(text: &str) -> Result<Fingerprint, TrustError> {
        let bad = || TrustError::BadFingerprint(text.to_owned());
        let t = text.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
            .unwrap_or(t);
        let digits: Vec<u32> = t
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_digit(16).ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
            *byte = u8::try_from(pair[0] * 16 + pair[1]).map_err(|_| bad())?;
        }
        Ok(Fingerprint(bytes))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let text = String::deserialize(d)?;
        Fingerprint::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What the server's certificate must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pin {
    /// Signed by one of these CA certificates (PEM) and valid for the
    /// server's name; `origin` says where they came from.
    Ca { pem: String, origin: String },
    /// Exactly the certificate with this fingerprint.
    Fingerprint(Fingerprint),
}

impl Pin {
    /// The CA certificates of a PEM file.
    pub fn ca_file(path: &Path) -> Result<Pin, TrustError> {
        let pem = std::fs::read_to_string(path).map_err(|source| TrustError::ReadCa {
            path: path.to_owned(),
            source,
        })?;
        let pin = Pin::Ca {
            pem,
            origin: path.display().to_string(),
        };
        pin.roots()?;
        Ok(pin)
    }

    /// The pin of `ca_file` or `ca_fingerprint` (at most one of them).
    pub fn configured(
        ca_file: Option<&Path>,
        ca_fingerprint: Option<&str>,
    ) -> Result<Option<Pin>, TrustError> {
        match (ca_file, ca_fingerprint) {
            (Some(_), Some(_)) => Err(TrustError::Both),
            (Some(path), None) => Pin::ca_file(path).map(Some),
            (None, Some(fp)) => Ok(Some(Pin::Fingerprint(Fingerprint::parse(fp)?))),
            (None, None) => Ok(None),
        }
    }

    /// What the pin expects, for messages.
    pub fn describe(&self) -> String {
        match self {
            Pin::Ca { origin, .. } => format!("a certificate signed by the CA in {origin}"),
            Pin::Fingerprint(f) => format!("the certificate with fingerprint {f}"),
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TrustError> {
        let Pin::Ca { pem, origin } = self else {
            return Ok(rustls::RootCertStore::empty());
        };
        let no_ca = |detail: String| TrustError::NoCa {
            path: origin.clone(),
            detail,
        };
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| no_ca(format!(": {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(no_ca(String::new()));
        }
        Ok(roots)
    }
}

/// Splits `TOKEN#sha256:HEX` into the token and its attached fingerprint.
pub fn split_token(text: &str) -> Result<(String, Option<Fingerprint>), TrustError> {
    match text.trim().split_once(ATTACHED) {
        Some((token, fp)) => Ok((token.to_owned(), Some(Fingerprint::parse(fp)?))),
        None => Ok((text.trim().to_owned(), None)),
    }
}

/// The pin of an enrollment: the configured one, or the one attached to
/// the token; both must agree.
pub fn enrollment_pin(
    configured: Option<Pin>,
    attached: Option<Fingerprint>,
) -> Result<Option<Pin>, TrustError> {
    match (configured, attached) {
        (Some(c), Some(a)) if c != Pin::Fingerprint(a) => Err(TrustError::Conflict {
            attached: a.to_string(),
            configured: c.describe(),
        }),
        (c, a) => Ok(c.or(a.map(Pin::Fingerprint))),
    }
}

/// The pin kept in the state dir, if any.
pub fn stored(dir: &StateDir) -> Result<Option<Pin>, StateError> {
    read_json(&dir.path().join(TRUST))
}

/// Keeps the pin in the state dir (0600, atomically).
pub fn store(dir: &StateDir, pin: &Pin) -> Result<(), StateError> {
    write_json(&dir.path().join(TRUST), pin)
}

/// Drops the kept pin (`drover up` without TLS, whose local agent is
/// in-process and talks to loopback).
pub fn forget(dir: &StateDir) -> Result<(), StateError> {
    let path = dir.path().join(TRUST);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StateError::Io { path, source: e })
        }
        _ => Ok(()),
    }
}

/// The server's certificate did not match the pin.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{reason}: expected {expected}, the server presented the certificate with fingerprint {seen}"
)]
pub struct Rejected {
    pub reason: String,
    pub expected: String,
    pub seen: Fingerprint,
}

/// Checks the server's certificate against a pin; signatures of the
/// handshake are checked as usual, so the server must hold the key.
#[derive(Debug)]
struct PinVerifier {
    pin: Pin,
    ca: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    fn reject(&self, reason: String, seen: Fingerprint) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            Rejected {
                reason,
                expected: self.pin.describe(),
                seen,
            },
        ))))
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        match (&self.pin, &self.ca) {
            (Pin::Fingerprint(want), _) if *want == seen => Ok(ServerCertVerified::assertion()),
            (Pin::Fingerprint(_), _) => Err(self.reject("fingerprint mismatch".to_owned(), seen)),
            (Pin::Ca { .. }, Some(ca)) => ca
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    let reason = match &e {
                        rustls::Error::InvalidCertificate(
                            CertificateError::UnknownIssuer | CertificateError::BadSignature,
                        ) => "it is not signed by the pinned CA".to_owned(),
                        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                        | rustls::Error::InvalidCertificate(
                            CertificateError::NotValidForNameContext { .. },
                        ) => format!("it is not valid for the name {}", server_name.to_str()),
                        other => other.to_string(),
                    };
                    self.reject(reason, seen)
                }),
            (Pin::Ca { .. }, None) => Err(self.reject("no CA loaded".to_owned(), seen)),
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client configuration that trusts exactly what `pin` says.
pub fn client_config(pin: &Pin) -> Result<rustls::ClientConfig, TrustError> {
    let config_err = |e: &dyn std::fmt::Display| TrustError::Config(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = match pin {
        Pin::Ca { .. } => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(pin.roots()?), provider.clone())
                .build()
                .map_err(|e| config_err(&e))?,
        ),
        Pin::Fingerprint(_) => None,
    };
    let verifier = PinVerifier {
        pin: pin.clone(),
        ca,
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Applies the pin to a reqwest client for `url`: HTTPS trusts only what
/// the pin says; plain HTTP is refused while a pin is kept.
pub fn apply(
    builder: reqwest::ClientBuilder,
    url: &str,
    pin: Option<&Pin>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(pin) = pin else {
        return Ok(builder);
    };
    if !url
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("https://")
    {
        return Err(format!(
            "refusing plain HTTP to {url}: the server's certificate is pinned ({}); use https://",
            pin.describe()
        ));
    }
    let config = client_config(pin).map_err(|e| e.to_string())?;
    Ok(builder.use_preconfigured_tls(config))
}

/// When a request failed because the server's certificate is not trusted:
/// why, in words (with what was expected and seen, for a pin).
pub fn untrusted(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(why) = certificate_error(error) {
        return Some(why);
    }
    // io::Error::source() skips the error it wraps (itself perhaps an
    // io::Error): look inside.
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(why) = untrusted(inner) {
            return Some(why);
        }
    }
    error.source().and_then(untrusted)
}

fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    match e.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<Rejected>() {
                Some(r) => Some(format!("the server's certificate is not trusted: {r}")),
                None => Some(format!("the server's certificate is not trusted: {other}")),
            }
        }
        rustls::Error::InvalidCertificate(c) => Some(format!(
            "the server's certificate is not trusted: {c:?} (no CA or fingerprint is pinned, so \
             the public web roots apply: pin one with --ca-file or --ca-fingerprint)"
        )),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_in_their_usual_spellings() {
        let hex = "ab".repeat(32);
        let want = Fingerprint([0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        for text in [
            format!("sha256:{hex}"),
            hex.clone(),
            format!("SHA256:{}", hex.to_uppercase()),
            format!("sha256 Fingerprint={colons}"),
            colons.clone(),
        ] {
            assert_eq!(Fingerprint::parse(&text).unwrap(), want, "{text}");
        }
        assert_eq!(want.to_string(), format!("sha256:{hex}"));
        for bad in ["sha256:abcd", "sha256:zz", "", &format!("sha1:{hex}")] {
            let err = Fingerprint::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("is not a certificate fingerprint"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_token_may_carry_its_fingerprint() {
        let hex = "01".repeat(32);
        let (token, fp) = split_token(&format!("drb_abc#sha256:{hex}")).unwrap();
        assert_eq!(token, "drb_abc");
        assert_eq!(fp.unwrap().to_string(), format!("sha256:{hex}"));
        assert_eq!(split_token(" drb_abc\n").unwrap(), ("drb_abc".into(), None));
        assert!(split_token("drb_abc#nope").is_err());
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        assert_eq!(
            enrollment_pin(None, Some(a)).unwrap(),
            Some(Pin::Fingerprint(a))
        );
        assert!(enrollment_pin(Some(Pin::Fingerprint(a)), Some(a)).is_ok());
        let err = enrollment_pin(Some(Pin::Fingerprint(b)), Some(a))
            .unwrap_err()
            .to_string();
        assert!(err.contains("differs"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = Pin::ca_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem holds no usable PEM certificate"),
            "{err}"
        );
        let err = Pin::ca_file(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the CA file"), "{err}");
        assert!(matches!(
            Pin::configured(Some(&path), Some("x")),
            Err(TrustError::Both)
        ));
    }

    #[test]
    fn a_pin_refuses_plain_http_and_is_kept() {
        let pin = Pin::Fingerprint(Fingerprint([7; 32]));
        let err = apply(
            reqwest::Client::builder(),
            "http://10.0.0.1:7070",
            Some(&pin),
        )
        .err()
        .unwrap();
        assert!(err.contains("refusing plain HTTP"), "{err}");
        assert!(apply(
            reqwest::Client::builder(),
            "https://10.0.0.1:7070",
            Some(&pin)
        )
        .is_ok());
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(stored(&state).unwrap(), None);
        store(&state, &pin).unwrap();
        assert_eq!(stored(&state).unwrap(), Some(pin));
    }
}
