//! Runs one attempt where its assignment says: a process (plain, or in a
//! process sandbox with rlimits and a user, see `process`), a container of
//! its own (`docker`), or an exec in a workspace's container; and the
//! built-ins that run inside the agent (`builtin:noop`, and the workspace
//! ones, see `workspace`). Its argv is never passed through a shell.
//!
//! Key design decision: one supervision loop (`Supervisor::supervise`)
//! drives every kind of workload through the small `Workload` trait (next
//! output or exit, signal, finish): output cut into capped log chunks,
//! `::set-output` lines, the timeout, cancel (SIGTERM, then SIGKILL after
//! the kill grace), the forced stop (SIGKILL at once) and the drain after
//! exit behave the same for a process, a container and an exec. The
//! executor knows nothing about the server: output goes to a bounded
//! channel of `LogUpload`s and the result is returned, so it is tested
//! without one. It never waits on that channel: when the uploader falls
//! behind, output is coalesced up to a bound and then dropped with a
//! marker, so a chatty workload is never slowed down.
//!
//! Its parts: `error` (why an attempt is refused, or a step of it failed),
//! `layout` (the working, drover and workspace dirs of an
//! attempt), `placement` (where an attempt runs, or why this agent refuses
//! it), `supervisor` (the supervision loop, the `Workload` trait and the
//! stop handle) and `output` (capped log chunks, `::set-output` lines and
//! the outputs file).

mod error;
mod layout;
mod output;
mod placement;
mod supervisor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use drover_proto::jobs::{Assignment, AttemptResult, LogUpload, Outcome, BUILTIN_NOOP};
use drover_proto::sandbox::{BUILTIN_WORKSPACE_CREATE, BUILTIN_WORKSPACE_REMOVE};
use tokio::sync::mpsc;

use crate::config::SandboxKind;
use crate::docker::Engine;

pub(crate) use error::Failure;
pub use error::{Error, Refusal};
pub(crate) use layout::{drover_dir, drover_dir_of, private_dir, set_mode, OUTPUTS_FILE};
pub use layout::{remove_work_dir, work_dir};
pub(crate) use placement::{admit, place, Placement};
pub use supervisor::Stop;
pub(crate) use supervisor::{Ended, Event, Exit, Signal, Supervisor, Workload};

/// PATH when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where and how attempts run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Each attempt runs in a fresh `<work_root>/<attempt_id>`, removed
    /// after; its outputs file is in `<work_root>/<attempt_id>.drover/`.
    pub work_root: PathBuf,
    /// Workspaces: `<workspaces_root>/<id>/` and their meta dirs
    /// `<id>.drover/`. Kept across restarts of the agent.
    pub workspaces_root: PathBuf,
    /// The PATH processes get; nothing else of the agent's environment is
    /// passed on.
    pub path: String,
    /// Sandbox kinds the agent runs; others are rejected.
    pub allow_sandboxes: Vec<SandboxKind>,
    /// The Docker engine; `None` when Docker is off.
    pub docker: Option<Arc<Engine>>,
    /// Whether the agent may run processes as another user (it is root).
    pub can_switch_users: bool,
    /// Records of running attempts (`survivors`): what a killed agent's
    /// next start must stop.
    pub attempts_root: PathBuf,
    /// Directories under which a workspace's `git.repo` may be a local
    /// path (`workspace_local_roots`); empty: remote URLs only. The agent
    /// clones as itself, so any other local path would let a task read a
    /// repository its own user could not.
    pub workspace_local_roots: Vec<PathBuf>,
}

impl ExecOptions {
    /// Options for an agent whose state dir is `root`: process sandboxes
    /// only, no Docker, the default PATH.
    pub fn new(root: &Path) -> ExecOptions {
        ExecOptions {
            work_root: root.join("work"),
            workspaces_root: root.join("workspaces"),
            path: DEFAULT_PATH.to_owned(),
            allow_sandboxes: vec![SandboxKind::Process],
            docker: None,
            can_switch_users: crate::config::running_as_root(),
            attempts_root: root.join("attempts"),
            workspace_local_roots: Vec::new(),
        }
    }
}

/// A result for an attempt that was not run, and why.
pub fn rejected(a: &Assignment, why: &Refusal) -> AttemptResult {
    let now = Utc::now();
    AttemptResult {
        attempt_id: a.attempt_id.clone(),
        outcome: Outcome::Rejected,
        exit_code: None,
        signal: None,
        started_at: None,
        finished_at: now,
        duration_ms: 0,
        error: Some(why.to_string()),
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: BTreeMap::new(),
        limit_exceeded: None,
    }
}

fn is_builtin(a: &Assignment) -> bool {
    a.argv.len() == 1
        && matches!(
            a.argv[0].as_str(),
            BUILTIN_NOOP | BUILTIN_WORKSPACE_CREATE | BUILTIN_WORKSPACE_REMOVE
        )
}

/// Runs `a` to its end (exit, timeout or stop) and says how it ended.
/// Output chunks go to `logs`; a closed channel just discards them.
pub async fn execute(
    a: &Assignment,
    opts: &ExecOptions,
    stop: &Stop,
    logs: &mpsc::Sender<LogUpload>,
) -> AttemptResult {
    let mut sup = Supervisor::new(a, stop, logs);
    if a.argv.is_empty() {
        return sup.fail(Error::EmptyArgv.into());
    }
    if is_builtin(a) {
        let result = match a.argv[0].as_str() {
            BUILTIN_WORKSPACE_CREATE => crate::workspace::create(a, opts, &mut sup).await,
            BUILTIN_WORKSPACE_REMOVE => crate::workspace::remove(a, opts, &mut sup).await,
            _ => return sup.succeed(),
        };
        remove_work_dir(opts, a);
        return result;
    }
    let placement = match place(a, opts) {
        Ok(p) => p,
        Err(why) => return rejected(a, &why),
    };
    let result = match placement {
        Placement::Process { sandbox, workspace } => {
            crate::process::run_attempt(a, opts, sandbox, workspace, &mut sup).await
        }
        Placement::Container {
            engine,
            sandbox,
            workspace,
        } => crate::docker::run_attempt(a, opts, engine, sandbox, workspace, &mut sup).await,
        Placement::Exec {
            engine,
            sandbox,
            workspace,
        } => crate::docker::run_exec(a, opts, engine, sandbox, workspace, &mut sup).await,
    };
    // Its work has ended: nothing of it is left to stop after a restart.
    crate::survivors::forget(opts, &a.attempt_id);
    // Artifacts are collected from the working dir by the caller, which
    // removes it after.
    if a.artifacts.is_empty() {
        remove_work_dir(opts, a);
    } else {
        let _ = std::fs::remove_dir_all(drover_dir(opts, a));
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::{assignment, rt, run, run_with};

    #[test]
    fn refusals_are_reported_rejected_without_running() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        let mut a = assignment(&["touch", "ran"]);
        a.sandbox = Some(
            serde_json::from_value(
                serde_json::json!({"type": "docker", "name": "box", "image": "busybox"}),
            )
            .unwrap(),
        );
        let r = rt().block_on(run_with(&opts, &a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Rejected);
        assert_eq!(r.result.started_at, None);
        assert!(r.chunks.is_empty());
        assert!(!opts.work_root.join(&a.attempt_id).exists());
    }

    #[test]
    fn argv_is_passed_literally() {
        let nasty = ["hi; rm -rf /", "$(id)", "`id`", "a\nb", "*", "'\"", ""];
        for arg in nasty {
            let a = assignment(&["/usr/bin/printf", "[%s]", arg]);
            let r = rt().block_on(run(&a, &Stop::new()));
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
            assert_eq!(r.stdout, format!("[{arg}]"));
        }
    }

    #[test]
    fn environment_is_clean_and_exit_codes_are_reported() {
        let mut a = assignment(&["sh", "-c", "env | sort; echo oops >&2; exit 3"]);
        a.env.insert("GREETING".into(), "hello world".into());
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
        assert_eq!(r.result.exit_code, Some(3));
        assert_eq!(r.result.signal, None);
        assert!(r.result.started_at.is_some());
        assert_eq!(r.stderr, "oops\n");
        let vars: Vec<&str> = r
            .stdout
            .lines()
            .map(|l| l.split('=').next().unwrap_or(""))
            .collect();
        // sh adds PWD (and sometimes SHLVL, _) itself; nothing comes from us.
        for v in &vars {
            assert!(
                [
                    "GREETING",
                    "PATH",
                    "DROVER_OUTPUT",
                    "PWD",
                    "SHLVL",
                    "_",
                    "OLDPWD"
                ]
                .contains(v),
                "unexpected variable {v} in {}",
                r.stdout
            );
        }
        assert!(r.stdout.contains("GREETING=hello world\n"));
        assert!(r.stdout.contains(&format!("PATH={DEFAULT_PATH}\n")));
        assert!(r.stdout.contains(&format!("/work/{}\n", a.attempt_id)));
    }

    #[test]
    fn noop_and_spawn_failures() {
        let r = rt().block_on(run(&assignment(&[BUILTIN_NOOP]), &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded);
        assert!(r.chunks.is_empty());

        let r = rt().block_on(run(&assignment(&["/nonexistent/prog", "x"]), &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
        let err = r.result.error.unwrap_or_default();
        assert!(err.contains("'/nonexistent/prog'"), "{err}");
        assert!(err.contains("No such file"), "{err}");

        let r = rt().block_on(run(&assignment(&[]), &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
    }
}
