//! The agent's state dir: its credentials (mode 0600) and what it last knew
//! (for `drover-agent status` without the server). Every write is atomic:
//! temp file, fsync, rename, fsync of the directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const CREDENTIALS: &str = "credentials.json";
const STATE: &str = "state.json";
const ASSIGNMENT_KEY: &str = "assignment-key.json";
/// Locked (flock) by the process that runs or enrolls the agent.
const LOCK: &str = "agent.lock";

/// Errors reading or writing the state dir.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "another drover-agent{} is using the state dir {}: two agents with one identity trip the \
         server's refresh-token reuse detection and both lose it; stop the other one, or give \
         this one a state dir of its own (--state-dir)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
}

/// The state dir, held by this process alone until dropped.
#[derive(Debug)]
pub struct StateLock {
    _lock: crate::lock::Lock,
}

/// The agent's identity and current credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredCredentials {
    pub server: String,
    pub agent_id: String,
    pub access_token: String,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_token: String,
    pub enrolled_at: DateTime<Utc>,
}

/// What the agent last knew, kept across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalState {
    pub agent_id: Option<String>,
    pub server: Option<String>,
    pub last_contact_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub heartbeat_interval_secs: Option<u64>,
    /// Set when the server refused the credentials for good (revoked,
    /// session ended): the agent will not use them again.
    pub credentials_rejected: Option<String>,
}

/// The server's public key that signs assignments, as the agent trusts it:
/// learned at enrollment, or from the first heartbeat answer that carried
/// it (an agent enrolled before the server signed), and never replaced but
/// by enrolling again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentKey {
    /// Ed25519 public key, 64 hex digits.
    pub public_key: String,
    pub learned_at: DateTime<Utc>,
    /// `enrollment` or `heartbeat`.
    pub learned_from: String,
}

/// A state directory on disk.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it (mode 0700) when missing.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(root).map_err(|source| StateError::Io {
            path: root.to_owned(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700));
        }
        Ok(StateDir {
            root: root.to_owned(),
        })
    }

    /// Lets other users pass through the directory (0711) without listing
    /// it: the working dirs of sandboxes run as another user are below it.
    /// Everything the agent keeps here is readable by itself only.
    pub fn allow_traversal(&self) -> Result<(), StateError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711)).map_err(
                |source| StateError::Io {
                    path: self.root.clone(),
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Takes the state dir for this process alone (an advisory lock on
    /// `agent.lock`), for as long as the guard lives: an agent runs or
    /// enrolls with it, so that a second one on the same identity is
    /// refused instead of making the server revoke it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        use crate::lock::{Lock, LockError, Mode};
        match Lock::try_take(&self.root.join(LOCK), Mode::Exclusive) {
            Ok(lock) => Ok(StateLock { _lock: lock }),
            Err(LockError::Held { pid, .. }) => Err(StateError::InUse {
                dir: self.root.clone(),
                pid,
            }),
            Err(LockError::Io { path, source }) => Err(StateError::Io { path, source }),
        }
    }

    /// Opens the directory only if it exists (for `status`).
    pub fn existing(root: &Path) -> Option<StateDir> {
        root.is_dir().then(|| StateDir {
            root: root.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn credentials(&self) -> Result<Option<StoredCredentials>, StateError> {
        read_json(&self.root.join(CREDENTIALS))
    }

    pub fn save_credentials(&self, c: &StoredCredentials) -> Result<(), StateError> {
        write_json(&self.root.join(CREDENTIALS), c)
    }

    pub fn local_state(&self) -> Result<LocalState, StateError> {
        Ok(read_json(&self.root.join(STATE))?.unwrap_or_default())
    }

    pub fn save_local_state(&self, s: &LocalState) -> Result<(), StateError> {
        write_json(&self.root.join(STATE), s)
    }

    pub fn assignment_key(&self) -> Result<Option<AssignmentKey>, StateError> {
        read_json(&self.root.join(ASSIGNMENT_KEY))
    }

    /// Keeps the key, or forgets it (`None`: enrolled with a server that
    /// does not sign).
    pub fn save_assignment_key(&self, key: Option<&AssignmentKey>) -> Result<(), StateError> {
        let path = self.root.join(ASSIGNMENT_KEY);
        match key {
            Some(k) => write_json(&path, k),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StateError::Io { path, source: e })
                }
                _ => Ok(()),
            },
        }
    }
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Writes `value` to `path` atomically, readable by the owner only.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
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
        f.write_all(&bytes)?;
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
    fn credentials_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(&dir.path().join("state")).unwrap();
        assert!(s.credentials().unwrap().is_none());
        let c = StoredCredentials {
            server: "http://127.0.0.1:1".into(),
            agent_id: "a".into(),
            access_token: "t".into(),
            access_expires_at: Utc::now(),
            refresh_token: "r".into(),
            enrolled_at: Utc::now(),
        };
        s.save_credentials(&c).unwrap();
        s.save_credentials(&c).unwrap();
        assert_eq!(s.credentials().unwrap().unwrap().agent_id, "a");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(s.path().join(CREDENTIALS))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(s.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CREDENTIALS)]);
    }

    #[test]
    fn a_locked_state_dir_is_refused_naming_the_dir_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let held = s.lock().unwrap();
        let err = s.lock().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "another drover-agent (pid {}) is using the state dir {}: ",
                std::process::id(),
                dir.path().display()
            )),
            "{err}"
        );
        drop(held);
        assert!(s.lock().is_ok());
    }

    #[test]
    fn corrupt_state_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(STATE), "{nope").unwrap();
        let err = s.local_state().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
    }
}
