//! Results not yet acknowledged by the server, one file per attempt in
//! `<state_dir>/outbox/<attempt_id>.json`.
//!
//! A result is written here (atomically, like the rest of the state dir)
//! while it is first reported, and deleted only once the server answered
//! 2xx and the write is done, so it is always durable in one place at
//! least: neither a server outage nor a killed agent loses it. Memory use does not
//! depend on how many files wait: they are listed a batch at a time.

use std::path::{Path, PathBuf};

use drover_proto::jobs::AttemptResult;

use crate::state::{read_json, write_json, StateDir, StateError};

/// Directory under the state dir.
const OUTBOX: &str = "outbox";
/// Where results the server can never accept are moved, for a human to see.
const UNDELIVERABLE: &str = "undeliverable";
const SUFFIX: &str = ".json";

/// The outbox directory of one state dir.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// Opens (creating) the outbox and removes temp files a crash left.
    pub fn open(state: &StateDir) -> Result<Outbox, StateError> {
        let dir = state.path().join(OUTBOX);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        // The state dir may let others pass (sandbox users); the outbox is
        // the agent's alone.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Outbox { dir })
    }

    /// The outbox of a state dir, if it has one (for `status`).
    pub fn existing(state: &StateDir) -> Option<Outbox> {
        let dir = state.path().join(OUTBOX);
        dir.is_dir().then_some(Outbox { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, attempt_id: &str) -> PathBuf {
        self.dir.join(format!("{attempt_id}{SUFFIX}"))
    }

    /// Writes a result durably. `attempt_id` must be a valid file name
    /// (see `jobs::valid_attempt_id`).
    pub fn put(&self, result: &AttemptResult) -> Result<(), StateError> {
        write_json(&self.file(&result.attempt_id), result)
    }

    /// Writes and removes a scratch file the way a result is written: Ok
    /// when results can be kept again.
    pub fn probe(&self) -> Result<(), StateError> {
        let path = self.dir.join(".probe");
        write_json(&path, &"probe")?;
        std::fs::remove_file(&path).map_err(|source| StateError::Io { path, source })
    }

    pub fn contains(&self, attempt_id: &str) -> bool {
        self.file(attempt_id).is_file()
    }

    /// Reads one result; `Corrupt` when the file cannot be parsed.
    pub fn get(&self, attempt_id: &str) -> Result<Option<AttemptResult>, StateError> {
        read_json(&self.file(attempt_id))
    }

    /// Deletes an acknowledged result (a missing file is fine).
    pub fn remove(&self, attempt_id: &str) -> Result<(), StateError> {
        let path = self.file(attempt_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Moves a result the server will never accept out of the way.
    pub fn set_aside(&self, attempt_id: &str) -> Result<PathBuf, StateError> {
        let aside = self.dir.join(UNDELIVERABLE);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(&aside).map_err(io(&aside))?;
        let to = aside.join(format!("{attempt_id}{SUFFIX}"));
        std::fs::rename(self.file(attempt_id), &to).map_err(io(&to))?;
        Ok(to)
    }

    /// Up to `limit` attempt ids waiting, skipping those `skip` names.
    pub fn list(
        &self,
        limit: usize,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, StateError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut ids = Vec::new();
        for e in entries.flatten() {
            if ids.len() >= limit {
                break;
            }
            if let Some(id) = attempt_id_of(&e.file_name().to_string_lossy()) {
                if !skip(id) {
                    ids.push(id.to_owned());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// How many results wait (0 when the directory cannot be read).
    pub fn len(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| attempt_id_of(&e.file_name().to_string_lossy()).is_some())
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The attempt id of an outbox file name; `None` for temp files and the
/// like.
fn attempt_id_of(name: &str) -> Option<&str> {
    if name.starts_with('.') {
        return None;
    }
    name.strip_suffix(SUFFIX).filter(|id| !id.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::Utc;
    use drover_proto::jobs::Outcome;

    fn result(id: &str) -> AttemptResult {
        AttemptResult {
            attempt_id: id.to_owned(),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_at: Some(Utc::now()),
            finished_at: Utc::now(),
            duration_ms: 3,
            error: None,
            stdout_truncated: false,
            stderr_truncated: false,
            outputs: Default::default(),
            limit_exceeded: None,
        }
    }

    #[test]
    fn write_read_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let outbox = Outbox::open(&state).unwrap();
        assert!(outbox.is_empty());
        let a = result("a");
        outbox.put(&result("b")).unwrap();
        outbox.put(&a).unwrap();
        // A crash between write and rename leaves a temp file: not a result.
        std::fs::write(outbox.path().join(".c.json.tmp-1"), "{").unwrap();
        assert_eq!(outbox.len(), 2);
        assert!(outbox.contains("a"));
        assert_eq!(outbox.list(10, |_| false).unwrap(), vec!["a", "b"]);
        assert_eq!(outbox.list(10, |id| id == "a").unwrap(), vec!["b"]);
        assert_eq!(outbox.list(1, |_| false).unwrap().len(), 1);
        assert_eq!(outbox.get("a").unwrap().unwrap(), a);
        outbox.remove("a").unwrap();
        outbox.remove("a").unwrap();
        assert_eq!(outbox.get("a").unwrap(), None);
        let aside = outbox.set_aside("b").unwrap();
        assert!(aside.is_file());
        assert!(outbox.is_empty());
        // Reopening clears the temp file.
        let outbox = Outbox::open(&state).unwrap();
        assert!(!outbox.path().join(".c.json.tmp-1").exists());
    }

    #[test]
    fn corrupt_file_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let outbox = Outbox::open(&state).unwrap();
        std::fs::write(outbox.path().join("x.json"), "{nope").unwrap();
        assert!(matches!(outbox.get("x"), Err(StateError::Corrupt { .. })));
    }
}
