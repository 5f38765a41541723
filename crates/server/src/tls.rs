//! HTTPS: the certificate and key of `--tls-cert`/`--tls-key` made into the
//! acceptor the accept loop (`connections`) wraps every connection in, the
//! certificate's fingerprint (which agents may pin), and the self-signed
//! pair `drover up --tls` keeps in its data dir.
//!
//! rustls with the `ring` provider, TLS 1.2 and 1.3 only, HTTP/1.1 offered
//! by ALPN (the only protocol the server speaks).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// File names of the pair `drover up --tls` makes in its data dir.
pub const SELF_SIGNED_CERT: &str = "tls.crt";
pub const SELF_SIGNED_KEY: &str = "tls.key";

/// A certificate or key that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the key in {key} cannot serve the certificate in {cert}: {message}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
}

/// The server's TLS: what accepts connections, and what identifies it.
#[derive(Clone)]
pub struct ServerTls {
    pub acceptor: TlsAcceptor,
    /// `sha256:` and the hex SHA-256 of the certificate (DER) it presents.
    pub fingerprint: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// `sha256:HEX` of a DER certificate: what `drover-agent --ca-fingerprint`
/// takes.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Reads the certificate chain (leaf first) and its key, and checks that
/// they belong together.
pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let cert_text = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    };
    let fingerprint = fingerprint(leaf);
    let key_text = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        message: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })?;
    let unusable = |e: rustls::Error| TlsError::Unusable {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(unusable)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        fingerprint,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The self-signed pair of `drover up --tls` in `dir`: made on the first
/// start (the key 0600, valid for `names`), reused as it is afterwards so
/// the fingerprint agents and profiles pinned stays the same. Returns the
/// certificate and key paths.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(SELF_SIGNED_CERT);
    let key = dir.join(SELF_SIGNED_KEY);
    if cert.exists() && key.exists() {
        crate::private::file(&key).map_err(|source| TlsError::Write {
            path: key.clone(),
            source,
        })?;
        return Ok((cert, key));
    }
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "drover up (self-signed)");
    // Valid from last year (clocks differ) for twenty years: the pin is
    // its fingerprint, which a renewal would change.
    let year = chrono::Datelike::year(&chrono::Utc::now());
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 20, 1, 1);
    let key_pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let certificate = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // The key first: a certificate without its key is never left behind.
    write_private(&key, key_pair.serialize_pem().as_bytes())?;
    write_private(&cert, certificate.pem().as_bytes())?;
    Ok((cert, key))
}

/// Writes a file atomically, mode 0600, synced.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("tls"),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_made_once_private_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert, key) = self_signed(dir.path(), &names).unwrap();
        let first = load(&cert, &key).unwrap().fingerprint;
        assert!(
            first.starts_with("sha256:") && first.len() == 7 + 64,
            "{first}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Reused as it is: the same fingerprint.
        let (cert, key) = self_signed(dir.path(), &names).unwrap();
        assert_eq!(load(&cert, &key).unwrap().fingerprint, first);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), &["localhost".to_owned()]).unwrap();
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = self_signed(other.path(), &["localhost".to_owned()]).unwrap();
        let err = load(&cert, &other_key).unwrap_err().to_string();
        assert!(err.contains("cannot serve the certificate"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = load(&empty, &key).unwrap_err().to_string();
        assert!(err.contains("empty.pem holds no PEM certificate"), "{err}");
        let err = load(&cert, &empty).unwrap_err().to_string();
        assert!(err.contains("empty.pem: no usable private key"), "{err}");
        let err = load(&dir.path().join("missing.pem"), &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read") && err.contains("missing.pem"),
            "{err}"
        );
    }
}
