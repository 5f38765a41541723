//! Where an attempt's files are: its working dir (its own under
//! `<work_root>`, or its workspace's), its drover dir beside it (the
//! outputs file, a private HOME), and how they are created and removed.

use std::path::{Path, PathBuf};

use drover_proto::jobs::Assignment;
use drover_proto::sandbox::valid_workspace_id;

use super::{is_builtin, Error, ExecOptions};

/// The outputs file's name in an attempt's drover dir.
pub(crate) const OUTPUTS_FILE: &str = "outputs.json";

impl ExecOptions {
    /// Creates the work and workspace roots. Both are traversable but not
    /// listable by other users (0711): a sandbox's unprivileged user must
    /// reach its own directory below them, and guess no one else's. The
    /// attempts' records are the agent's alone (0700).
    pub fn prepare(&self) -> Result<(), Error> {
        for dir in [&self.work_root, &self.workspaces_root] {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.clone(),
                source,
            })?;
            set_mode(dir, 0o711).map_err(|source| Error::SetMode {
                path: dir.clone(),
                source,
            })?;
        }
        // The agent's own: nobody else passes.
        private_dir(&self.attempts_root, None)
    }
}

/// The working dir of an attempt: the workspace's directory when it runs
/// in one, else its own `<work_root>/<attempt_id>`.
pub fn work_dir(opts: &ExecOptions, a: &Assignment) -> PathBuf {
    match &a.workspace {
        Some(ws) if !is_builtin(a) && valid_workspace_id(&ws.id) => {
            crate::workspace::dir(opts, &ws.id)
        }
        _ => opts.work_root.join(&a.attempt_id),
    }
}

/// The agent's files for an attempt (its outputs file, a private HOME):
/// beside the working dir, so they are never collected as artifacts.
pub(crate) fn drover_dir(opts: &ExecOptions, a: &Assignment) -> PathBuf {
    drover_dir_of(opts, &a.attempt_id)
}

/// `drover_dir` of an attempt known by its id only.
pub(crate) fn drover_dir_of(opts: &ExecOptions, attempt_id: &str) -> PathBuf {
    opts.work_root.join(format!("{attempt_id}.drover"))
}

/// Removes an attempt's working dir (never a workspace's) and its drover
/// dir.
pub fn remove_work_dir(opts: &ExecOptions, a: &Assignment) {
    let mut dirs = vec![drover_dir(opts, a)];
    if a.workspace.is_none() || is_builtin(a) {
        dirs.push(opts.work_root.join(&a.attempt_id));
    }
    for dir in dirs {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a working dir")
            }
        }
    }
}

/// Sets the permission bits of `path`.
pub(crate) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates a directory only its owner can use (and `owner`, when given,
/// becomes that owner). An existing one is reused.
pub(crate) fn private_dir(path: &Path, owner: Option<(u32, Option<u32>)>) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
        path: path.to_owned(),
        source,
    })?;
    set_mode(path, 0o700).map_err(|source| Error::SetMode {
        path: path.to_owned(),
        source,
    })?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), gid).map_err(|source| Error::Chown {
            path: path.to_owned(),
            uid,
            source,
        })?;
    }
    Ok(())
}
