//! Advisory locks on a file (`flock`), held as long as their guard lives
//! and released by the kernel when the process ends, however it ends: the
//! agent's state dir (one agent per identity) and the server's data dir
//! (servers share it; offline maintenance wants it alone).
//!
//! The holder writes its pid into the file, so that the one refused can
//! say who holds it. The pid is information only: the lock is the flock.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// With other shared holders, never with an exclusive one.
    Shared,
    /// Alone.
    Exclusive,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds it (in a mode that excludes ours).
    #[error("{path} is locked by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, pid: Option<u32> },
}

/// A lock held on a file until dropped.
#[derive(Debug)]
pub struct Lock {
    // Closing the file releases the lock.
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock on `path` (created 0600 when missing) without
    /// waiting: a lock held elsewhere is `LockError::Held`.
    pub fn try_take(path: &Path, mode: Mode) -> Result<Lock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        // Never truncated on open: that would erase the holder's pid.
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        let operation = match mode {
            Mode::Shared => FlockOperation::NonBlockingLockShared,
            Mode::Exclusive => FlockOperation::NonBlockingLockExclusive,
        };
        match rustix::fs::flock(&file, operation) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(LockError::Held {
                    path: path.to_owned(),
                    pid: holder(&mut file),
                })
            }
            Err(e) => return Err(io(e.into())),
        }
        // Information only: a full disk must not stop an agent whose lock
        // is taken.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(Lock {
            _file: file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid a holder wrote, if it did and it reads as one.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_everyone_and_shared_only_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        // (held, asked, granted)
        let cases = [
            (Mode::Exclusive, Mode::Exclusive, false),
            (Mode::Exclusive, Mode::Shared, false),
            (Mode::Shared, Mode::Exclusive, false),
            (Mode::Shared, Mode::Shared, true),
        ];
        for (held, asked, granted) in cases {
            let first = Lock::try_take(&path, held).unwrap();
            // Another open file description: flock treats it as another
            // holder, as it would another process.
            match Lock::try_take(&path, asked) {
                Ok(_) => assert!(granted, "{held:?} then {asked:?}"),
                Err(LockError::Held { pid, .. }) => {
                    assert!(!granted, "{held:?} then {asked:?}");
                    assert_eq!(pid, Some(std::process::id()));
                }
                Err(e) => panic!("{e}"),
            }
            drop(first);
        }
        // Released on drop.
        let _again = Lock::try_take(&path, Mode::Exclusive).unwrap();
    }
}
