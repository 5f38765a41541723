//! Workspaces: a directory that the tasks of one workflow run share on one
//! agent, optionally checked out from git, and, for a docker workspace, a
//! volume over it and a long-lived container the tasks run in as execs.
//!
//! On the host everything is under `<state_dir>/workspaces/`: the
//! workspace `<id>/` and its meta dir `<id>.drover/` (the `ready` marker,
//! and the outputs files of tasks run in the container, mounted there at
//! `/drover`). The agent's start-up wipe of `<state_dir>/work` never
//! touches them: a workspace outlives agent restarts until its run
//! removes it.
//!
//! Key design decision: creating is idempotent and all or nothing. The
//! `ready` marker is written last, so a create retried after a crash
//! either finds a complete workspace (and the container running) and
//! succeeds, or wipes what is there and starts again; a create that fails
//! removes what it made.

use std::path::{Path, PathBuf};

use drover_proto::jobs::{Assignment, AttemptResult};
use drover_proto::sandbox::{valid_workspace_id, GitSource, Sandbox, WorkspaceSpec};
use tokio::process::Command;

use crate::executor::{self, Error, ExecOptions, Failure, Refusal, Supervisor};
use crate::process::{self, Limits, ProcessRun};

/// The marker of a complete workspace, in its meta dir.
const READY: &str = "ready";

/// A workspace's directory.
pub fn dir(opts: &ExecOptions, id: &str) -> PathBuf {
    opts.workspaces_root.join(id)
}

/// A workspace's meta dir: the agent's files about it.
pub fn meta_dir(opts: &ExecOptions, id: &str) -> PathBuf {
    opts.workspaces_root.join(format!("{id}.drover"))
}

fn spec<'a>(a: &'a Assignment, opts: &ExecOptions) -> Result<&'a WorkspaceSpec, Failure> {
    let ws = a
        .workspace
        .as_ref()
        .ok_or_else(|| Refusal::NoWorkspaceSpec {
            builtin: a.argv[0].clone(),
        })?;
    if !valid_workspace_id(&ws.id) {
        return Err(Refusal::InvalidWorkspaceId { id: ws.id.clone() }.into());
    }
    executor::admit(&ws.sandbox, opts)?;
    if let Sandbox::Process(p) = &ws.sandbox {
        process::check_sandbox(p, opts.can_switch_users)?;
    }
    Ok(ws)
}

/// `builtin:workspace-create`.
pub(crate) async fn create(
    a: &Assignment,
    opts: &ExecOptions,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    let ws = match spec(a, opts) {
        Ok(ws) => ws,
        Err(f) => return sup.fail(f),
    };
    let mut building = false;
    match try_create(a, opts, ws, sup, &mut building).await {
        Ok(()) => sup.succeed(),
        Err(f) => {
            // A create that failed while building leaves nothing behind; a
            // retry starts afresh. One that failed before (the engine did
            // not answer whether the workspace runs) touches nothing.
            if building {
                let problems = wipe(opts, ws).await;
                if !problems.is_empty() {
                    tracing::warn!(workspace = %ws.id, ?problems, "could not clean up after a failed create");
                }
            }
            sup.fail(f)
        }
    }
}

async fn try_create(
    a: &Assignment,
    opts: &ExecOptions,
    ws: &WorkspaceSpec,
    sup: &mut Supervisor<'_>,
    building: &mut bool,
) -> Result<(), Failure> {
    let dir = dir(opts, &ws.id);
    let meta = meta_dir(opts, &ws.id);
    let source = match &ws.git {
        Some(git) => {
            git.validate().map_err(Refusal::InvalidGitSource)?;
            Some(clone_source(&git.repo, &opts.workspace_local_roots)?)
        }
        None => None,
    };
    if meta.join(READY).is_file() {
        let complete = match (&ws.sandbox, &opts.docker) {
            (Sandbox::Docker(_), Some(engine)) => {
                sup.bounded(crate::docker::workspace_running(engine, &ws.id))
                    .await??
            }
            (Sandbox::Docker(_), None) => false,
            (Sandbox::Process(_), _) => dir.is_dir(),
        };
        if complete {
            sup.note(&format!("workspace {} exists already", ws.id));
            return Ok(());
        }
    }
    let leftovers = wipe(opts, ws).await;
    if !leftovers.is_empty() {
        return Err(Error::ClearWorkspace {
            id: ws.id.clone(),
            leftovers,
        }
        .into());
    }
    *building = true;
    sup.note(&format!("creating workspace {}", ws.id));
    opts.prepare()?;
    executor::private_dir(&meta, None)?;
    std::fs::create_dir(&dir).map_err(|source| Error::CreateDir {
        path: dir.clone(),
        source,
    })?;
    if let (Some(git), Some(source)) = (&ws.git, &source) {
        checkout(a, opts, git, source, &dir, sup).await?;
    }
    if let Some((uid, gid)) = owner(&ws.sandbox).await? {
        for path in [&dir, &meta] {
            // A checkout may be large: off the agent's only thread.
            let tree = path.clone();
            tokio::task::spawn_blocking(move || process::chown_tree(&tree, uid, gid))
                .await
                .map_err(|source| Error::Blocking {
                    what: "handing over the workspace",
                    source,
                })?
                .map_err(|source| Error::Chown {
                    path: path.clone(),
                    uid,
                    source,
                })?;
        }
    } else {
        // Root, or a user the image knows only by name: the tree stays the
        // agent's, readable by all. Such a user can still write its
        // outputs file: the meta dir is then shared like /tmp.
        let named = matches!(&ws.sandbox, Sandbox::Docker(d) if d.user.is_some());
        for (path, mode) in [(&dir, 0o755), (&meta, if named { 0o1777 } else { 0o700 })] {
            executor::set_mode(path, mode).map_err(|source| Error::SetMode {
                path: path.clone(),
                source,
            })?;
        }
    }
    if let (Sandbox::Docker(sandbox), Some(engine)) = (&ws.sandbox, &opts.docker) {
        sup.note(&format!(
            "starting workspace container {}",
            crate::docker::workspace_name(&ws.id)
        ));
        crate::docker::create_workspace(engine, ws, sandbox, &dir, &meta, sup).await?;
    }
    let marker = serde_json::json!({
        "attempt_id": a.attempt_id,
        "created_at": chrono::Utc::now(),
    });
    let ready = meta.join(READY);
    std::fs::write(&ready, marker.to_string()).map_err(|source| Error::Write {
        path: ready,
        source,
    })?;
    Ok(())
}

/// Who gets the workspace tree: a numeric docker user, or the resolvable
/// user of a process sandbox.
async fn owner(sandbox: &Sandbox) -> Result<Option<(u32, Option<u32>)>, Failure> {
    match sandbox {
        Sandbox::Docker(d) => {
            let Some(user) = d.user.as_deref() else {
                return Ok(None);
            };
            let (u, g) = match user.split_once(':') {
                Some((u, g)) => (u, g.parse().ok()),
                None => (user, None),
            };
            Ok(u.parse().ok().map(|uid| (uid, g)))
        }
        Sandbox::Process(p) => {
            let Some(user) = p.user.clone() else {
                return Ok(None);
            };
            let ids = tokio::task::spawn_blocking(move || process::resolve_user(&user))
                .await
                .map_err(|source| Error::Blocking {
                    what: "looking up the user",
                    source,
                })?
                .map_err(Refusal::User)?;
            Ok(Some((ids.uid, Some(ids.gid))))
        }
    }
}

/// What git clones a workspace from, once this agent allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloneSource {
    /// A URL git fetches over the network: `https://`, `http://`,
    /// `ssh://`, `git://`, or ssh's `host:path`.
    Remote(String),
    /// A local repository, by its canonical path, under one of the
    /// agent's `workspace_local_roots`.
    Local(PathBuf),
}

impl CloneSource {
    /// The repository argument of `git clone`.
    fn arg(&self) -> String {
        match self {
            CloneSource::Remote(url) => url.clone(),
            CloneSource::Local(path) => path.to_string_lossy().into_owned(),
        }
    }

    /// `GIT_ALLOW_PROTOCOL`: git itself then refuses a local clone of a
    /// remote source (and the reverse), whatever it makes of the text.
    fn allowed_protocols(&self) -> &'static str {
        match self {
            CloneSource::Remote(_) => "git:http:https:ssh",
            CloneSource::Local(_) => "file",
        }
    }
}

/// A local path if git would read `repo` from this machine: `file://`
/// URLs and paths; `None` for a network URL. As git decides: text with
/// `://` is a URL by its scheme; else a colon with no slash before it is
/// ssh's `host:path`; anything else is a path. (`git clone` also takes
/// `host:path` for a path when such a file exists in its working dir; it
/// runs in the agent's workspaces root, which holds only workspace ids,
/// and `GIT_ALLOW_PROTOCOL` refuses a local clone of a remote source.)
pub(crate) fn local_path(repo: &str) -> Option<PathBuf> {
    if let Some((scheme, rest)) = repo.split_once("://") {
        return (scheme == "file").then(|| PathBuf::from(rest));
    }
    match (repo.find(':'), repo.find('/')) {
        (Some(colon), Some(slash)) if slash < colon => Some(PathBuf::from(repo)),
        (Some(_), _) => None,
        (None, _) => Some(PathBuf::from(repo)),
    }
}

/// Whether this agent clones `repo`: any network URL; a local repository
/// only when its canonical path (symlinks and `..` resolved) is under one
/// of `roots`. A path that cannot be resolved is refused like one outside
/// the roots, so a refusal says nothing about what exists on the agent.
pub(crate) fn clone_source(repo: &str, roots: &[PathBuf]) -> Result<CloneSource, Refusal> {
    let Some(path) = local_path(repo) else {
        return Ok(CloneSource::Remote(repo.to_owned()));
    };
    let refused = || Refusal::LocalRepository {
        repo: repo.to_owned(),
        roots: roots.to_vec(),
    };
    if !path.is_absolute() || roots.is_empty() {
        return Err(refused());
    }
    let real = std::fs::canonicalize(&path).map_err(|_| refused())?;
    let inside = roots
        .iter()
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .any(|root| real.starts_with(root));
    if inside {
        Ok(CloneSource::Local(real))
    } else {
        Err(refused())
    }
}

/// Checks `git` out into `dir` with the host's git, step by step through
/// the supervisor (its output is the attempt's log; timeout and cancel
/// apply). Never a shell, `--` before the repository, and an environment
/// that reads no config and allows only the transports of `source` (no
/// `ext::`; `file` only for an allowed local repository).
async fn checkout(
    a: &Assignment,
    opts: &ExecOptions,
    git: &GitSource,
    source: &CloneSource,
    dir: &Path,
    sup: &mut Supervisor<'_>,
) -> Result<(), Failure> {
    let home = executor::drover_dir(opts, a).join("home");
    executor::private_dir(&home, None)?;
    let at = git
        .reference
        .as_deref()
        .map(|r| format!(" at {r}"))
        .unwrap_or_default();
    let failed = |e: Error| {
        Failure::Failed(Error::Checkout {
            repo: git.repo.clone(),
            at: at.clone(),
            source: Box::new(e),
        })
    };
    let dir_arg = dir.to_string_lossy().into_owned();
    let repo_arg = source.arg();
    let git_cmd = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.args(args)
            .env_clear()
            .env("PATH", &opts.path)
            .env("HOME", &home)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ALLOW_PROTOCOL", source.allowed_protocols())
            .current_dir(&opts.workspaces_root);
        cmd
    };
    sup.note(&format!("cloning {}{at}", git.repo));
    let Some(reference) = git.reference.as_deref() else {
        let ok = step(
            sup,
            git_cmd(&["clone", "--quiet", "--", &repo_arg, &dir_arg]),
        )
        .await
        .map_err(|f| map_failed(f, &failed))?;
        if !ok {
            return Err(failed(Error::Clone));
        }
        sup.note(&format!("checked out the default branch of {}", git.repo));
        return Ok(());
    };
    let ok = step(
        sup,
        git_cmd(&[
            "clone",
            "--no-checkout",
            "--quiet",
            "--",
            &repo_arg,
            &dir_arg,
        ]),
    )
    .await
    .map_err(|f| map_failed(f, &failed))?;
    if !ok {
        return Err(failed(Error::Clone));
    }
    let mut commit = None;
    for candidate in [format!("origin/{reference}"), reference.to_owned()] {
        sup.capture_stdout();
        let spec = format!("{candidate}^{{commit}}");
        let ok = step(
            sup,
            git_cmd(&["-C", &dir_arg, "rev-parse", "--verify", "--quiet", &spec]),
        )
        .await
        .map_err(|f| map_failed(f, &failed))?;
        let out = sup.take_capture();
        let sha = String::from_utf8_lossy(&out).trim().to_owned();
        if ok && (sha.len() == 40 || sha.len() == 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())
        {
            commit = Some(sha);
            break;
        }
    }
    let Some(sha) = commit else {
        return Err(failed(Error::NoSuchRef {
            reference: reference.to_owned(),
        }));
    };
    let ok = step(
        sup,
        git_cmd(&["-C", &dir_arg, "checkout", "--quiet", "--detach", &sha]),
    )
    .await
    .map_err(|f| map_failed(f, &failed))?;
    if !ok {
        return Err(failed(Error::Detach { sha }));
    }
    sup.note(&format!("checked out {reference} of {} ({sha})", git.repo));
    Ok(())
}

fn map_failed(f: Failure, failed: &impl Fn(Error) -> Failure) -> Failure {
    match f {
        Failure::Failed(e) => failed(e),
        other => other,
    }
}

/// Runs one helper process under the supervisor; true when it exited 0.
async fn step(sup: &mut Supervisor<'_>, cmd: Command) -> Result<bool, Failure> {
    if sup.stopped() {
        return Err(Failure::Stopped);
    }
    let mut run = ProcessRun::spawn(cmd, Limits::none()).map_err(|source| Error::Spawn {
        program: "git".to_owned(),
        source,
    })?;
    let ended = sup.supervise(&mut run).await?;
    if sup.stopped() {
        return Err(Failure::Stopped);
    }
    Ok(ended.exit.is_some_and(|e| e.success()))
}

/// `builtin:workspace-remove`: the container, the volume, the directory
/// and the meta dir; what is missing is fine.
pub(crate) async fn remove(
    a: &Assignment,
    opts: &ExecOptions,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    let Some(ws) = &a.workspace else {
        return sup.fail(
            Refusal::NoWorkspaceSpec {
                builtin: a.argv[0].clone(),
            }
            .into(),
        );
    };
    if !valid_workspace_id(&ws.id) {
        return sup.fail(Refusal::InvalidWorkspaceId { id: ws.id.clone() }.into());
    }
    let leftovers = match sup.bounded(wipe(opts, ws)).await {
        Ok(p) => p,
        Err(f) => return sup.fail(f),
    };
    if leftovers.is_empty() {
        sup.succeed()
    } else {
        sup.fail(
            Error::RemoveWorkspace {
                id: ws.id.clone(),
                leftovers,
            }
            .into(),
        )
    }
}

/// Removes every piece of a workspace; says what could not be removed.
async fn wipe(opts: &ExecOptions, ws: &WorkspaceSpec) -> Vec<String> {
    let mut problems = Vec::new();
    if let Sandbox::Docker(_) = &ws.sandbox {
        match &opts.docker {
            Some(engine) => problems.extend(crate::docker::remove_workspace(engine, &ws.id).await),
            None => {
                let name = crate::docker::workspace_name(&ws.id);
                problems.push(format!(
                    "container and volume {name} (Docker is off on this agent)"
                ));
            }
        }
    }
    for path in [dir(opts, &ws.id), meta_dir(opts, &ws.id)] {
        // A workspace may be large: off the agent's only thread.
        let target = path.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&target)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(Err(e)) => problems.push(format!("{} ({e})", path.display())),
            Err(e) => problems.push(format!("{} ({e})", path.display())),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_table() {
        // (git.repo, the local path git would read, if any)
        let cases = [
            ("https://git.example/app.git", None),
            ("http://git.example/app.git", None),
            ("ssh://git@git.example/app.git", None),
            ("git://git.example/app.git", None),
            ("git@git.example:team/app.git", None),
            ("git.example:/srv/app.git", None),
            ("[::1]:app.git", None),
            ("/root/repo", Some("/root/repo")),
            ("file:///root/repo", Some("/root/repo")),
            ("file://localhost/root/repo", Some("localhost/root/repo")),
            ("./a:b", Some("./a:b")),
            ("/srv/a:b", Some("/srv/a:b")),
            ("repo", Some("repo")),
        ];
        for (repo, want) in cases {
            assert_eq!(local_path(repo), want.map(PathBuf::from), "{repo}");
        }
    }

    #[test]
    fn remote_urls_need_no_roots() {
        let url = "https://git.example/app.git";
        assert_eq!(
            clone_source(url, &[]).ok(),
            Some(CloneSource::Remote(url.to_owned()))
        );
        let source = CloneSource::Remote(url.to_owned());
        assert_eq!(source.allowed_protocols(), "git:http:https:ssh");
        let local = CloneSource::Local(PathBuf::from("/srv/repos/app"));
        assert_eq!(local.allowed_protocols(), "file");
        assert_eq!(local.arg(), "/srv/repos/app");
    }
}
