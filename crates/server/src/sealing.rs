//! The key that signs assignments (`drover_proto::signing`): an Ed25519
//! secret kept in `assignment.key` beside the JWT signing key, created
//! (mode 0600) on first start. Replicas must share it, as they share
//! `signing.key`: a job created on one replica is handed out by another,
//! and agents trust one public key.
//!
//! The store signs each job's spec when it inserts the job (the server
//! hands it the signer at start); the poll route seals each assignment
//! once it is fully built.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_proto::signing::{self, Signer};

/// How long a handed-out assignment may take to reach its agent and be
/// checked. It bounds the replay of a captured answer; the agent's clock
/// must agree with the server's within it.
pub const ASSIGNMENT_TTL: Duration = Duration::from_secs(300);

/// File name of the key, in the directory of the JWT signing key.
pub const KEY_FILE: &str = "assignment.key";

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("assignment key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("assignment key file {path} is corrupt: expected 64 hex characters")]
    Corrupt { path: String },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// Where the key lives: beside `signing_key_file`.
pub fn key_path(signing_key_file: &Path) -> PathBuf {
    signing_key_file.with_file_name(KEY_FILE)
}

/// Reads the key, or creates it with a new random seed. Two replicas
/// starting at once on a shared directory agree: the loser of the
/// exclusive create reads the winner's key.
pub fn load_or_create(path: &Path) -> Result<Signer, KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            match crate::private::create_file(path, signing::to_hex(&seed).as_bytes()) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "created a new assignment signing key");
                    Ok(Signer::from_seed(&seed))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).map_err(io)?;
                    parse(path, &text)
                }
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

fn parse(path: &Path, text: &str) -> Result<Signer, KeyError> {
    signing::from_hex::<32>(text.trim())
        .map(|seed| Signer::from_seed(&seed))
        .ok_or_else(|| KeyError::Corrupt {
            path: path.display().to_string(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir.path().join("sub/signing.key"));
        assert_eq!(path, dir.path().join("sub/assignment.key"));
        let first = load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        std::fs::write(&path, "not hex").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
    }
}
