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

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use drover_proto::jobs::{Assignment, AttemptResult, LogUpload, Outcome, Stream, BUILTIN_NOOP};
use drover_proto::limits::MAX_LOG_CHUNK;
use drover_proto::sandbox::{
    valid_workspace_id, DockerSandbox, LimitExceeded, ProcessSandbox, Sandbox, WorkspaceSpec,
    BUILTIN_WORKSPACE_CREATE, BUILTIN_WORKSPACE_REMOVE,
};
use drover_proto::workflows::{
    parse_set_output, valid_output_name, MAX_OUTPUTS, MAX_OUTPUT_VALUE, OUTPUT_FILE_ENV,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SandboxKind;
use crate::docker::Engine;

/// Partial output is sent at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(150);
/// Output waiting for the uploader, per stream, beyond which it is dropped.
const PENDING_LIMIT: usize = 4 * MAX_LOG_CHUNK;
/// Where output was dropped because the uploader fell behind.
const DROPPED_MARKER: &[u8] = b"\n[drover: output dropped: log upload fell behind]\n";
/// After the main process exits, how long its output is still read (a
/// background child may hold the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// Bytes of stdout a step may keep for the agent itself (a commit id).
const CAPTURE_LIMIT: usize = 4096;
/// PATH when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The outputs file's name in an attempt's drover dir.
pub(crate) const OUTPUTS_FILE: &str = "outputs.json";

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
        }
    }

    /// Creates the work and workspace roots. Both are traversable but not
    /// listable by other users (0711): a sandbox's unprivileged user must
    /// reach its own directory below them, and guess no one else's.
    pub fn prepare(&self) -> std::io::Result<()> {
        for dir in [&self.work_root, &self.workspaces_root] {
            std::fs::create_dir_all(dir)?;
            set_mode(dir, 0o711)?;
        }
        Ok(())
    }
}

/// How an attempt is to be stopped: `cancel` asks gracefully (SIGTERM,
/// then SIGKILL after the kill grace), `kill` at once (a forced stop).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    cancel: CancellationToken,
    kill: CancellationToken,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// A stop that is also cancelled (gracefully) when `parent` is.
    pub fn child_of(parent: &CancellationToken) -> Stop {
        Stop {
            cancel: parent.child_token(),
            kill: CancellationToken::new(),
        }
    }

    /// Stops the attempt gracefully.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stops the attempt at once, even while a graceful stop waits out
    /// its grace.
    pub fn kill(&self) {
        self.kill.cancel();
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// Resolves once the attempt is to stop, gracefully or not.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Resolves once the attempt is to be killed at once.
    pub async fn killed(&self) {
        self.kill.cancelled().await
    }
}

/// A result for an attempt that was not run.
pub fn rejected(a: &Assignment, error: String) -> AttemptResult {
    let now = Utc::now();
    AttemptResult {
        attempt_id: a.attempt_id.clone(),
        outcome: Outcome::Rejected,
        exit_code: None,
        signal: None,
        started_at: None,
        finished_at: now,
        duration_ms: 0,
        error: Some(error),
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: BTreeMap::new(),
        limit_exceeded: None,
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
    opts.work_root.join(format!("{}.drover", a.attempt_id))
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
        return sup.fail(Failure::Failed("the action has an empty argv".to_owned()));
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
        Err(why) => return rejected(a, why),
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
    // Artifacts are collected from the working dir by the caller, which
    // removes it after.
    if a.artifacts.is_empty() {
        remove_work_dir(opts, a);
    } else {
        let _ = std::fs::remove_dir_all(drover_dir(opts, a));
    }
    result
}

/// Where an attempt runs, decided before anything is created.
#[derive(Debug)]
pub(crate) enum Placement<'a> {
    /// A process on the host, in the workspace's directory if it has one.
    Process {
        sandbox: Option<&'a ProcessSandbox>,
        workspace: Option<&'a WorkspaceSpec>,
    },
    /// A container of its own (with the workspace's directory mounted, if
    /// it runs in a process workspace).
    Container {
        engine: &'a Arc<Engine>,
        sandbox: &'a DockerSandbox,
        workspace: Option<&'a WorkspaceSpec>,
    },
    /// An exec in the container of a docker workspace, under its limits.
    Exec {
        engine: &'a Arc<Engine>,
        sandbox: &'a DockerSandbox,
        workspace: &'a WorkspaceSpec,
    },
}

/// Decides where `a` runs, or why this agent refuses it: a sandbox kind
/// it does not run, Docker off, an invalid profile or workspace id, a user
/// switch it cannot make.
pub(crate) fn place<'a>(a: &'a Assignment, opts: &'a ExecOptions) -> Result<Placement<'a>, String> {
    if let Some(ws) = &a.workspace {
        if !valid_workspace_id(&ws.id) {
            return Err(format!("workspace id '{}' is not valid", ws.id));
        }
        if let Sandbox::Docker(sandbox) = &ws.sandbox {
            admit(&ws.sandbox, opts)?;
            let engine = engine_for(&ws.sandbox, opts)?;
            return Ok(Placement::Exec {
                engine,
                sandbox,
                workspace: ws,
            });
        }
    }
    let workspace = a.workspace.as_ref();
    match &a.sandbox {
        None => {
            admit(&Sandbox::default_process(), opts)?;
            Ok(Placement::Process {
                sandbox: None,
                workspace,
            })
        }
        Some(s @ Sandbox::Process(p)) => {
            admit(s, opts)?;
            crate::process::check_sandbox(p, opts.can_switch_users)?;
            Ok(Placement::Process {
                sandbox: Some(p),
                workspace,
            })
        }
        Some(s @ Sandbox::Docker(sandbox)) => {
            admit(s, opts)?;
            let engine = engine_for(s, opts)?;
            Ok(Placement::Container {
                engine,
                sandbox,
                workspace,
            })
        }
    }
}

/// Checks that this agent runs sandboxes of `s`'s kind, that the profile
/// is valid (the server checked it too, but the agent enforces only what
/// it understands) and, for a docker profile, that Docker is on.
pub(crate) fn admit(s: &Sandbox, opts: &ExecOptions) -> Result<(), String> {
    let kind = match s {
        Sandbox::Process(_) => SandboxKind::Process,
        Sandbox::Docker(_) => SandboxKind::Docker,
    };
    if !opts.allow_sandboxes.contains(&kind) {
        let allowed: Vec<&str> = opts.allow_sandboxes.iter().map(|k| k.as_str()).collect();
        return Err(format!(
            "sandbox '{}' is a {} sandbox, which this agent does not run (allow_sandboxes: {})",
            s.name(),
            kind.as_str(),
            allowed.join(", ")
        ));
    }
    s.validate()?;
    if kind == SandboxKind::Docker {
        engine_for(s, opts)?;
    }
    Ok(())
}

/// The engine a docker profile runs on, or why there is none.
fn engine_for<'a>(s: &Sandbox, opts: &'a ExecOptions) -> Result<&'a Arc<Engine>, String> {
    opts.docker.as_ref().ok_or_else(|| {
        format!(
            "sandbox '{}' needs Docker, which is off on this agent (docker_host: off)",
            s.name()
        )
    })
}

/// Why an attempt did not get to run to its end.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It could not run here (a refused profile, a missing runtime):
    /// reported `rejected`, nothing was started.
    Rejected(String),
    /// A step failed (the engine is unreachable, a pull failed, …).
    Failed(String),
    /// The attempt timed out or was cancelled during a step: the
    /// supervisor knows which.
    Stopped,
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure::Failed(why)
    }
}

/// A signal the agent sends to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Term,
    Kill,
}

impl Signal {
    pub(crate) fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// How a workload's main process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The engine killed it for going beyond its memory limit.
    pub oom_killed: bool,
}

impl Exit {
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }

    /// An exit status of a container or an exec: `128 + n` stands for
    /// signal `n` when the agent or the engine killed it (a program may
    /// also exit with such a status on its own, so it is read as a signal
    /// only then).
    pub(crate) fn from_status(status: Option<i64>, signalled: bool, oom_killed: bool) -> Exit {
        let code = status.and_then(|s| i32::try_from(s).ok());
        match code {
            Some(c) if (signalled || oom_killed) && (129..=128 + 64).contains(&c) => Exit {
                code: None,
                signal: Some(c - 128),
                oom_killed,
            },
            _ => Exit {
                code,
                signal: None,
                oom_killed,
            },
        }
    }
}

/// What a workload reports to the supervision loop.
#[derive(Debug)]
pub(crate) enum Event {
    Output(Stream, Bytes),
    /// An output stream ended (the loop then checks whether all is done).
    OutputClosed,
    Exited(Exit),
}

/// A process, a container or an exec under supervision.
pub(crate) trait Workload {
    /// The next output, the end of an output stream, or the end of the
    /// main process (each reported once).
    /// Must be cancel-safe: the loop drops it to handle timers. An error
    /// means the workload cannot be followed any more.
    async fn next(&mut self) -> Result<Event, String>;
    /// Whether output may still come.
    fn output_open(&self) -> bool;
    /// Sends `sig` to everything the workload runs. An error means it
    /// cannot be stopped from here, which ends the supervision.
    async fn signal(&mut self, sig: Signal) -> Result<(), String>;
    /// After the loop: whatever the main process left behind is killed.
    async fn finish(&mut self);
}

/// How a supervised step ended.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    pub exit: Option<Exit>,
    /// The agent sent SIGKILL (after the grace, or at once).
    pub killed: bool,
}

/// Supervises the workloads of one attempt: one or several steps (a git
/// checkout runs a few processes) share its logs, its deadline and its
/// stop, and the outcome is decided from all of them.
pub(crate) struct Supervisor<'a> {
    attempt: &'a Assignment,
    stop: &'a Stop,
    logs: &'a mpsc::Sender<LogUpload>,
    out: StreamLog,
    err: StreamLog,
    scan: OutputScanner,
    /// Stdout kept for the agent, when a step asks for it.
    capture: Option<Vec<u8>>,
    started_at: DateTime<Utc>,
    clock: Instant,
    timeout: Duration,
    grace: Duration,
    deadline: tokio::time::Instant,
    /// Set once the agent decided to end the attempt.
    stopped_by: Option<Outcome>,
    /// The stop was a forced one.
    forced: bool,
}

impl<'a> Supervisor<'a> {
    pub(crate) fn new(
        attempt: &'a Assignment,
        stop: &'a Stop,
        logs: &'a mpsc::Sender<LogUpload>,
    ) -> Supervisor<'a> {
        let timeout = Duration::from_millis(attempt.timeout_ms);
        Supervisor {
            attempt,
            stop,
            logs,
            out: StreamLog::new(Stream::Stdout, attempt.log_cap_bytes),
            err: StreamLog::new(Stream::Stderr, attempt.log_cap_bytes),
            scan: OutputScanner::default(),
            capture: None,
            started_at: Utc::now(),
            clock: Instant::now(),
            timeout,
            grace: Duration::from_millis(attempt.kill_grace_ms),
            deadline: tokio::time::Instant::now() + timeout,
            stopped_by: None,
            forced: false,
        }
    }

    /// Whether the attempt was stopped (timed out or cancelled).
    pub(crate) fn stopped(&self) -> bool {
        self.stopped_by.is_some()
    }

    /// A line of the agent's own on the attempt's stderr, e.g. which image
    /// it pulls.
    pub(crate) fn note(&mut self, text: &str) {
        self.err.push(format!("[drover] {text}\n").as_bytes());
        self.err.send_full(self.logs);
    }

    /// Keeps the stdout of the next steps (up to a small bound) for the
    /// agent, besides logging it.
    pub(crate) fn capture_stdout(&mut self) {
        self.capture = Some(Vec::new());
    }

    /// What was kept since `capture_stdout`, which it ends.
    pub(crate) fn take_capture(&mut self) -> Vec<u8> {
        self.capture.take().unwrap_or_default()
    }

    /// Runs a step that is not supervised (a pull, a create) unless the
    /// attempt times out or is stopped first, in which case the step is
    /// dropped and `Failure::Stopped` returned.
    pub(crate) async fn bounded<F: Future>(&mut self, step: F) -> Result<F::Output, Failure> {
        if self.stopped_by.is_some() {
            return Err(Failure::Stopped);
        }
        let stop = self.stop;
        tokio::select! {
            v = step => Ok(v),
            _ = tokio::time::sleep_until(self.deadline) => {
                self.stopped_by = Some(Outcome::TimedOut);
                Err(Failure::Stopped)
            }
            _ = stop.cancelled() => {
                self.stopped_by = Some(Outcome::Cancelled);
                self.forced = stop.is_killed();
                Err(Failure::Stopped)
            }
        }
    }

    fn take_output(&mut self, stream: Stream, bytes: &[u8]) {
        match stream {
            Stream::Stdout => {
                self.scan.push(bytes);
                if let Some(c) = &mut self.capture {
                    let room = CAPTURE_LIMIT.saturating_sub(c.len());
                    c.extend_from_slice(&bytes[..room.min(bytes.len())]);
                }
                self.out.push(bytes);
                self.out.send_full(self.logs);
            }
            Stream::Stderr => {
                self.err.push(bytes);
                self.err.send_full(self.logs);
            }
        }
    }

    /// Ends a workload gracefully (SIGTERM, SIGKILL after the grace) or,
    /// on a forced stop, at once.
    async fn terminate<W: Workload>(
        &mut self,
        w: &mut W,
        ended: &mut Ended,
        kill_at: &mut Option<tokio::time::Instant>,
    ) -> Result<(), String> {
        if self.stop.is_killed() {
            self.forced = true;
            ended.killed = true;
            *kill_at = None;
            return w.signal(Signal::Kill).await;
        }
        *kill_at = Some(tokio::time::Instant::now() + self.grace);
        w.signal(Signal::Term).await
    }

    /// Follows `w` until it has exited and its output is drained (or the
    /// drain time is over), applying the timeout and stops on the way.
    /// An error means the workload could not be followed or stopped.
    pub(crate) async fn supervise<W: Workload>(&mut self, w: &mut W) -> Result<Ended, String> {
        let id = &self.attempt.attempt_id;
        let stop = self.stop;
        let mut ended = Ended::default();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A stop decided during an earlier step applies at once.
        if self.stopped_by.is_some() {
            if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                w.finish().await;
                return Err(why);
            }
        }
        let failure = loop {
            if ended.exit.is_some() && !w.output_open() {
                break None;
            }
            let running = ended.exit.is_none();
            tokio::select! {
                ev = w.next() => match ev {
                    Ok(Event::Output(stream, bytes)) => self.take_output(stream, &bytes),
                    Ok(Event::OutputClosed) => {}
                    Ok(Event::Exited(exit)) => {
                        ended.exit = Some(exit);
                        kill_at = None;
                        drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                    }
                    Err(why) => break Some(why),
                },
                _ = tokio::time::sleep_until(self.deadline), if running && self.stopped_by.is_none() => {
                    tracing::info!(attempt = %id, "timed out; terminating");
                    self.stopped_by = Some(Outcome::TimedOut);
                    if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                        break Some(why);
                    }
                }
                _ = stop.cancelled(), if running && self.stopped_by.is_none() => {
                    tracing::info!(attempt = %id, "cancelled; terminating");
                    self.stopped_by = Some(Outcome::Cancelled);
                    if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                        break Some(why);
                    }
                }
                _ = stop.killed(), if running && !ended.killed => {
                    tracing::info!(attempt = %id, "killed at once (forced stop)");
                    self.stopped_by.get_or_insert(Outcome::Cancelled);
                    self.forced = true;
                    ended.killed = true;
                    kill_at = None;
                    if let Err(why) = w.signal(Signal::Kill).await {
                        break Some(why);
                    }
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if running && kill_at.is_some() => {
                    tracing::warn!(attempt = %id, "still running after the grace period; killing");
                    ended.killed = true;
                    kill_at = None;
                    if let Err(why) = w.signal(Signal::Kill).await {
                        break Some(why);
                    }
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break None,
                _ = tick.tick() => {
                    self.out.send_pending(self.logs, false);
                    self.err.send_pending(self.logs, false);
                }
            }
        };
        w.finish().await;
        match failure {
            Some(why) => {
                tracing::warn!(attempt = %id, error = %why, "lost track of the workload");
                Err(why)
            }
            None => Ok(ended),
        }
    }

    /// The result of an attempt whose workload ran: the agent's stop wins,
    /// then a `limit` the caller found exceeded, then the exit status and
    /// the outputs (`::set-output` lines and the outputs file).
    pub(crate) fn finish(
        &mut self,
        ended: &Ended,
        outputs_file: Option<&Path>,
        limit: Option<(LimitExceeded, String)>,
    ) -> AttemptResult {
        let exit = ended.exit.unwrap_or_default();
        self.scan.end_line();
        let mut outputs = std::mem::take(&mut self.scan.outputs);
        let outputs_error = outputs_file.and_then(|p| read_outputs_file(p, &mut outputs).err());
        let (outcome, error, limit) = match (self.stop_outcome(), limit) {
            (Some((outcome, why)), _) => (outcome, Some(why), None),
            (None, Some((limit, why))) => (Outcome::Failed, Some(why), Some(limit)),
            (None, None) if exit.success() => match outputs_error {
                None => (Outcome::Succeeded, None, None),
                Some(e) => (Outcome::Failed, Some(e), None),
            },
            (None, None) => (
                Outcome::Failed,
                exit.signal.map(|s| format!("killed by signal {s}")),
                None,
            ),
        };
        let mut result = self.result(outcome, error);
        result.exit_code = exit.code;
        result.signal = exit.signal;
        result.outputs = outputs;
        result.limit_exceeded = limit;
        result
    }

    /// The result of a built-in that did its work.
    pub(crate) fn succeed(&mut self) -> AttemptResult {
        match self.stop_outcome() {
            Some((outcome, why)) => self.result(outcome, Some(why)),
            None => self.result(Outcome::Succeeded, None),
        }
    }

    /// The result of an attempt that did not get to run to its end.
    pub(crate) fn fail(&mut self, failure: Failure) -> AttemptResult {
        let (outcome, why) = match (failure, self.stop_outcome()) {
            (Failure::Rejected(why), _) => {
                let mut r = self.result(Outcome::Rejected, Some(why));
                r.started_at = None;
                return r;
            }
            (_, Some(stopped)) => stopped,
            (Failure::Failed(why), None) => (Outcome::Failed, why),
            (Failure::Stopped, None) => (Outcome::Failed, "stopped".to_owned()),
        };
        self.result(outcome, Some(why))
    }

    fn stop_outcome(&self) -> Option<(Outcome, String)> {
        match self.stopped_by? {
            Outcome::TimedOut => Some((
                Outcome::TimedOut,
                format!(
                    "timed out after {}",
                    humantime::format_duration(self.timeout)
                ),
            )),
            o if self.forced => Some((o, "cancelled: killed at once (forced stop)".to_owned())),
            o => Some((o, "cancelled".to_owned())),
        }
    }

    fn result(&mut self, outcome: Outcome, error: Option<String>) -> AttemptResult {
        self.out.finish(self.logs);
        self.err.finish(self.logs);
        AttemptResult {
            attempt_id: self.attempt.attempt_id.clone(),
            outcome,
            exit_code: None,
            signal: None,
            started_at: Some(self.started_at),
            finished_at: Utc::now(),
            duration_ms: self.clock.elapsed().as_millis() as u64,
            error,
            stdout_truncated: self.out.truncated,
            stderr_truncated: self.err.truncated,
            outputs: BTreeMap::new(),
            limit_exceeded: None,
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
pub(crate) fn private_dir(path: &Path, owner: Option<(u32, Option<u32>)>) -> Result<(), String> {
    let what = |e: std::io::Error| format!("cannot create {}: {e}", path.display());
    std::fs::create_dir_all(path).map_err(what)?;
    set_mode(path, 0o700).map_err(what)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), gid)
            .map_err(|e| format!("cannot hand {} to uid {uid}: {e}", path.display()))?;
    }
    Ok(())
}

/// Collects `::set-output name=value` lines from stdout, within bounds.
#[derive(Debug, Default)]
struct OutputScanner {
    line: Vec<u8>,
    /// The current line is too long to be an output line.
    overlong: bool,
    outputs: BTreeMap<String, String>,
}

impl OutputScanner {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line();
            } else if !self.overlong {
                self.line.push(b);
                if self.line.len() > MAX_OUTPUT_VALUE + 128 {
                    self.overlong = true;
                    self.line.clear();
                }
            }
        }
    }

    fn end_line(&mut self) {
        if !self.overlong {
            let text = String::from_utf8_lossy(&self.line);
            let text = text.strip_suffix('\r').unwrap_or(&text);
            if let Some((name, value)) = parse_set_output(text) {
                set_output(&mut self.outputs, name, value.to_owned());
            }
        }
        self.line.clear();
        self.overlong = false;
    }
}

fn set_output(outputs: &mut BTreeMap<String, String>, name: &str, value: String) {
    if value.len() > MAX_OUTPUT_VALUE {
        tracing::warn!(
            output = name,
            bytes = value.len(),
            "output value too long; ignored"
        );
        return;
    }
    if outputs.len() >= MAX_OUTPUTS && !outputs.contains_key(name) {
        tracing::warn!(output = name, "too many outputs; ignored");
        return;
    }
    outputs.insert(name.to_owned(), value);
}

/// Reads the outputs file a workload may have written: a JSON object whose
/// string values are taken as is and other values as JSON text. The file
/// is written by the sandboxed side, so a symlink, a FIFO or anything but
/// a regular file of a bounded size is refused rather than followed.
pub(crate) fn read_outputs_file(
    path: &Path,
    outputs: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let limit = (MAX_OUTPUTS * MAX_OUTPUT_VALUE) as u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!(
                "${OUTPUT_FILE_ENV} must be a regular file, not a symlink"
            ))
        }
        Err(e) => return Err(format!("cannot read ${OUTPUT_FILE_ENV}: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read ${OUTPUT_FILE_ENV}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("${OUTPUT_FILE_ENV} must be a regular file"));
    }
    if meta.len() > limit {
        return Err(format!("${OUTPUT_FILE_ENV} is larger than {limit} bytes"));
    }
    let mut text = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read ${OUTPUT_FILE_ENV}: {e}"))?;
    if text.len() as u64 > limit {
        return Err(format!("${OUTPUT_FILE_ENV} is larger than {limit} bytes"));
    }
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format!("${OUTPUT_FILE_ENV} must hold a JSON object: {e}"))?;
    for (name, value) in map {
        if !valid_output_name(&name) {
            return Err(format!(
                "${OUTPUT_FILE_ENV}: '{name}' is not a valid output name"
            ));
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        set_output(outputs, &name, value);
    }
    Ok(())
}

/// One output stream on its way to log chunks: the cap, the marker, the
/// sequence numbers, and the bytes not yet sent.
struct StreamLog {
    stream: Stream,
    seq: u64,
    cap: u64,
    /// Output bytes read so far, kept or not.
    seen: u64,
    truncated: bool,
    pending: Vec<u8>,
    /// In a run of output dropped because the uploader fell behind.
    dropping: bool,
    /// The uploader is gone: discard everything.
    closed: bool,
}

impl StreamLog {
    fn new(stream: Stream, cap: u64) -> StreamLog {
        StreamLog {
            stream,
            seq: 0,
            cap,
            seen: 0,
            truncated: false,
            pending: Vec::new(),
            dropping: false,
            closed: false,
        }
    }

    /// Takes in output just read, keeping what the cap allows.
    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.seen);
        self.seen += bytes.len() as u64;
        if self.truncated || self.closed {
            return;
        }
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        self.append(&bytes[..keep]);
        if keep < bytes.len() {
            self.truncated = true;
            // The marker goes in whatever the backlog, once, beyond the
            // cap: the server keeps room for it (`LOG_MARKER_ROOM`).
            self.pending
                .extend_from_slice(truncation_marker(self.cap).as_bytes());
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.pending.len() + bytes.len() <= PENDING_LIMIT {
            self.pending.extend_from_slice(bytes);
            self.dropping = false;
        } else if !self.dropping {
            self.dropping = true;
            self.pending.extend_from_slice(DROPPED_MARKER);
            // Counted against the cap, however many runs are dropped: only
            // the truncation marker goes beyond it.
            self.seen = self.seen.saturating_add(DROPPED_MARKER.len() as u64);
        }
    }

    /// Sends the full chunks waiting.
    fn send_full(&mut self, logs: &mpsc::Sender<LogUpload>) {
        while self.pending.len() >= MAX_LOG_CHUNK {
            if !self.send_one(logs, false) {
                break;
            }
        }
    }

    /// Sends all that waits (but an incomplete character, unless `eof`),
    /// as long as the channel has room.
    fn send_pending(&mut self, logs: &mpsc::Sender<LogUpload>, eof: bool) {
        while !self.pending.is_empty() {
            if !self.send_one(logs, eof) {
                break;
            }
        }
    }

    /// At the end of the attempt: everything left.
    fn finish(&mut self, logs: &mpsc::Sender<LogUpload>) {
        self.send_pending(logs, true);
        if !self.pending.is_empty() && !self.closed {
            tracing::warn!(
                stream = self.stream.as_str(),
                bytes = self.pending.len(),
                "log upload fell behind; dropping the end of the output"
            );
        }
    }

    /// Sends one chunk; false when nothing could be sent.
    fn send_one(&mut self, logs: &mpsc::Sender<LogUpload>, eof: bool) -> bool {
        if self.closed {
            self.pending.clear();
            return false;
        }
        let permit = match logs.try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => return false,
            Err(mpsc::error::TrySendError::Closed(())) => {
                self.closed = true;
                self.pending.clear();
                return false;
            }
        };
        let data = take_chunk(&mut self.pending, MAX_LOG_CHUNK, eof);
        if data.is_empty() {
            return false;
        }
        permit.send(LogUpload {
            stream: self.stream,
            seq: self.seq,
            data,
        });
        self.seq += 1;
        true
    }
}

/// Where the output of a stream was cut at its cap.
fn truncation_marker(cap: u64) -> String {
    format!("\n[drover: output truncated after {cap} bytes]\n")
}

/// Decodes (lossily) and removes from the front of `buf` at most `max`
/// bytes of UTF-8 text. Without `eof`, an incomplete character at the very
/// end is left for the next read to complete.
fn take_chunk(buf: &mut Vec<u8>, max: usize, eof: bool) -> String {
    let mut out = String::new();
    let mut used = 0;
    for chunk in buf.utf8_chunks() {
        let valid = chunk.valid();
        let room = max - out.len();
        if valid.len() > room {
            let mut cut = room;
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&valid[..cut]);
            used += cut;
            break;
        }
        out.push_str(valid);
        used += valid.len();
        let invalid = chunk.invalid();
        if invalid.is_empty() {
            continue;
        }
        let at_end = used + invalid.len() == buf.len();
        let incomplete = std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
        if (at_end && incomplete && !eof) || out.len() + '\u{FFFD}'.len_utf8() > max {
            break;
        }
        out.push('\u{FFFD}');
        used += invalid.len();
    }
    buf.drain(..used);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::test_support::{assignment, rt, run_with, Run};

    async fn run(a: &Assignment, stop: &Stop) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        let r = run_with(&opts, a, stop).await;
        // The working dir and the drover dir are gone.
        assert!(!opts.work_root.join(&a.attempt_id).exists());
        assert!(!drover_dir(&opts, a).exists());
        r
    }

    /// Where an assignment runs, or why this agent refuses it.
    #[test]
    fn placement_table() {
        let tmp = tempfile::tempdir().unwrap();
        let process_only = ExecOptions {
            can_switch_users: true,
            ..ExecOptions::new(tmp.path())
        };
        let engine = Arc::new(Engine::new(
            crate::config::DockerHost::Unix("/nonexistent.sock".into()),
            "agent",
        ));
        let docker_only = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Docker],
            docker: Some(engine),
            ..process_only.clone()
        };
        let docker_off = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Process, SandboxKind::Docker],
            ..process_only.clone()
        };
        let non_root = ExecOptions {
            can_switch_users: false,
            ..process_only.clone()
        };
        let sandbox = |v: serde_json::Value| serde_json::from_value::<Sandbox>(v).unwrap();
        let docker =
            sandbox(serde_json::json!({"type": "docker", "name": "box", "image": "busybox"}));
        let as_nobody =
            sandbox(serde_json::json!({"type": "process", "name": "low", "user": "nobody"}));
        let host_net = sandbox(
            serde_json::json!({"type": "docker", "name": "bad", "image": "busybox", "network": "host"}),
        );
        let ws = |id: &str, s: &Sandbox| WorkspaceSpec {
            id: id.to_owned(),
            sandbox: s.clone(),
            git: None,
        };
        let plain = Sandbox::default_process();
        // (options, sandbox, workspace, where it runs or the refusal)
        type Case<'a> = (
            &'a ExecOptions,
            Option<&'a Sandbox>,
            Option<WorkspaceSpec>,
            Result<&'a str, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (&process_only, None, None, Ok("process")),
            (&process_only, Some(&as_nobody), None, Ok("process")),
            (&process_only, None, Some(ws("w1", &plain)), Ok("process")),
            (&docker_only, Some(&docker), None, Ok("container")),
            (&docker_only, Some(&docker), Some(ws("w1", &plain)), Ok("container")),
            // The workspace's container wins over the task's own sandbox.
            (&docker_only, None, Some(ws("w1", &docker)), Ok("exec")),
            (
                &process_only,
                Some(&docker),
                None,
                Err("sandbox 'box' is a docker sandbox, which this agent does not run (allow_sandboxes: process)"),
            ),
            (
                &docker_only,
                None,
                None,
                Err("sandbox 'process' is a process sandbox, which this agent does not run (allow_sandboxes: docker)"),
            ),
            (
                &docker_off,
                Some(&docker),
                None,
                Err("sandbox 'box' needs Docker, which is off on this agent (docker_host: off)"),
            ),
            (
                &docker_off,
                None,
                Some(ws("w1", &docker)),
                Err("sandbox 'box' needs Docker, which is off on this agent (docker_host: off)"),
            ),
            (
                &non_root,
                Some(&as_nobody),
                None,
                Err("sandbox 'low' runs as user 'nobody', but this agent cannot switch users: the agent is not running as root"),
            ),
            (&docker_only, Some(&host_net), None, Err("sandbox 'bad': network: 'host'")),
            (&process_only, None, Some(ws("../up", &plain)), Err("workspace id '../up' is not valid")),
        ];
        for (opts, sandbox, workspace, want) in cases {
            let mut a = assignment(&["true"]);
            a.sandbox = sandbox.cloned();
            a.workspace = workspace;
            let got = place(&a, opts).map(|p| match p {
                Placement::Process { .. } => "process",
                Placement::Container { .. } => "container",
                Placement::Exec { .. } => "exec",
            });
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{a:?}"),
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{got}"),
                (got, want) => panic!(
                    "{:?} {:?}: got {got:?}, want {want:?}",
                    a.sandbox, a.workspace
                ),
            }
        }
    }

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
    fn outputs_file_must_be_a_regular_file() {
        // The sandboxed side writes it; the agent must not follow it
        // elsewhere, nor block on a FIFO.
        let cases = [
            (
                "ln -s /etc/hostname \"$DROVER_OUTPUT\"",
                "must be a regular file, not a symlink",
            ),
            ("mkfifo \"$DROVER_OUTPUT\"", "must be a regular file"),
            (
                "head -c 2000000 /dev/zero > \"$DROVER_OUTPUT\"",
                "is larger than",
            ),
        ];
        for (script, want) in cases {
            let r = rt().block_on(run(&assignment(&["sh", "-c", script]), &Stop::new()));
            assert_eq!(
                r.result.outcome,
                Outcome::Failed,
                "{script}: {:?}",
                r.result
            );
            let err = r.result.error.unwrap_or_default();
            assert!(err.contains(want), "{script}: {err}");
        }
    }

    #[test]
    fn an_exit_is_reported_without_waiting_for_the_drain() {
        // The drain is for pipes a background child holds open; a process
        // that closed them is done at once.
        for _ in 0..3 {
            let r = rt().block_on(run(&assignment(&["true"]), &Stop::new()));
            assert_eq!(r.result.outcome, Outcome::Succeeded);
            assert!(r.elapsed < DRAIN_AFTER_EXIT, "{:?}", r.elapsed);
        }
        // One that left a child holding them is ended after the drain,
        // and the child with it.
        let r = rt().block_on(run(&assignment(&["sh", "-c", "sleep 30 &"]), &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded);
        assert!(r.elapsed >= DRAIN_AFTER_EXIT, "{:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
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
    fn outputs_come_from_stdout_lines_and_the_outputs_file() {
        let a = assignment(&[
            "sh",
            "-c",
            "echo '::set-output name=image=app:1.2'; printf '::set-output tag=v1\\r\\n'; \
             echo 'noise ::set-output name=x=1'; \
             printf '{\"digest\": \"sha256:abc\", \"count\": 3}' > \"$DROVER_OUTPUT\"; \
             printf '::set-output name=last=no newline'",
        ]);
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
        let want: BTreeMap<String, String> = [
            ("image", "app:1.2"),
            ("tag", "v1"),
            ("digest", "sha256:abc"),
            ("count", "3"),
            ("last", "no newline"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(r.result.outputs, want);

        let bad = assignment(&["sh", "-c", "echo '[1,2]' > \"$DROVER_OUTPUT\""]);
        let r = rt().block_on(run(&bad, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
        assert!(
            r.result
                .error
                .as_deref()
                .unwrap_or("")
                .contains("must hold a JSON object"),
            "{:?}",
            r.result
        );
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

    /// True while any process of group `pgid` exists.
    fn group_alive(pgid: i32) -> bool {
        #[allow(unsafe_code)]
        // SAFETY: signal 0 only checks that the group exists.
        let rc = unsafe { libc::kill(-pgid, 0) };
        rc == 0
    }

    fn wait_group_gone(pgid: i32) -> bool {
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if !group_alive(pgid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let mut a = assignment(&["sh", "-c", "echo $$; sleep 100 & sleep 100"]);
        a.timeout_ms = 300;
        a.kill_grace_ms = 5_000;
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{:?}", r.result);
        assert!(r.result.error.unwrap_or_default().contains("timed out"));
        // SIGTERM sufficed: no need to wait for the grace period.
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
        let pgid: i32 = r.stdout.trim().parse().unwrap();
        assert!(wait_group_gone(pgid), "group {pgid} survived");
    }

    #[test]
    fn sigterm_ignoring_process_gets_sigkill_after_grace() {
        let mut a = assignment(&["sh", "-c", "trap '' TERM; echo $$; sleep 100; sleep 100"]);
        a.timeout_ms = 200;
        a.kill_grace_ms = 700;
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{:?}", r.result);
        assert_eq!(r.result.signal, Some(libc::SIGKILL));
        assert!(r.elapsed >= Duration::from_millis(850), "{:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(4), "{:?}", r.elapsed);
        let pgid: i32 = r.stdout.trim().parse().unwrap();
        assert!(wait_group_gone(pgid), "group {pgid} survived");
    }

    #[test]
    fn cancel_terminates() {
        let a = assignment(&["sleep", "100"]);
        let stop = Stop::new();
        let r = rt().block_on(async {
            crate::test_support::stop_later(&stop, Duration::from_millis(200), false);
            run(&a, &stop).await
        });
        assert_eq!(r.result.outcome, Outcome::Cancelled);
        assert_eq!(r.result.signal, Some(libc::SIGTERM));
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    }

    #[test]
    fn output_is_capped_with_a_marker() {
        // 300 KiB on stdout, a little on stderr; the cap is 100 000 bytes.
        let mut a = assignment(&[
            "sh",
            "-c",
            "head -c 307200 /dev/zero | tr '\\0' x; echo small >&2",
        ]);
        a.log_cap_bytes = 100_000;
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
        assert!(r.result.stdout_truncated);
        assert!(!r.result.stderr_truncated);
        let marker = "\n[drover: output truncated after 100000 bytes]\n";
        assert_eq!(r.stdout, format!("{}{marker}", "x".repeat(100_000)));
        assert_eq!(r.stderr, "small\n");
        // Sequence numbers count per stream from 0; chunks respect the limit.
        for s in [Stream::Stdout, Stream::Stderr] {
            let seqs: Vec<u64> = r
                .chunks
                .iter()
                .filter(|c| c.stream == s)
                .map(|c| c.seq)
                .collect();
            assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        }
        assert!(r.chunks.iter().all(|c| c.data.len() <= MAX_LOG_CHUNK));
    }

    #[test]
    fn output_is_streamed_while_running() {
        let a = assignment(&["sh", "-c", "echo first; sleep 1; echo second"]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        rt().block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let stop = Stop::new();
            let exec = execute(&a, &opts, &stop, &tx);
            tokio::pin!(exec);
            let first = tokio::select! {
                _ = &mut exec => panic!("finished before streaming"),
                c = rx.recv() => c.unwrap(),
            };
            assert_eq!(first.data, "first\n");
            let r = exec.await;
            assert_eq!(r.outcome, Outcome::Succeeded);
            assert_eq!(rx.recv().await.unwrap().data, "second\n");
        });
    }

    #[test]
    fn chunks_split_on_character_boundaries() {
        // (input, max, eof) -> (chunk, left)
        type Case = (&'static [u8], usize, bool, &'static str, &'static [u8]);
        let cases: [Case; 7] = [
            (b"hello", 10, false, "hello", b""),
            (b"hello", 3, false, "hel", b"lo"),
            ("héllo".as_bytes(), 2, false, "h", "éllo".as_bytes()),
            (b"ab\xc3", 10, false, "ab", b"\xc3"),
            (b"ab\xc3", 10, true, "ab\u{FFFD}", b""),
            (b"a\xffb", 10, false, "a\u{FFFD}b", b""),
            (b"a\xffb", 3, false, "a", b"\xffb"),
        ];
        for (input, max, eof, chunk, left) in cases {
            let mut buf = input.to_vec();
            assert_eq!(take_chunk(&mut buf, max, eof), chunk, "{input:?}");
            assert_eq!(buf, left, "{input:?}");
        }
    }

    #[test]
    fn markers_stay_within_the_room_the_server_keeps_beyond_the_cap() {
        use drover_proto::limits::LOG_MARKER_ROOM;
        assert!(
            (truncation_marker(u64::MAX).len() + DROPPED_MARKER.len()) as u64 <= LOG_MARKER_ROOM
        );
        // An uploader that stays just behind a trickle of output: every
        // other byte starts a run of dropped output, with its marker.
        let cap = (PENDING_LIMIT + 10_000) as u64;
        let mut log = StreamLog::new(Stream::Stdout, cap);
        let mut shipped = 0;
        log.push(&vec![b'x'; PENDING_LIMIT]);
        for _ in 0..1000 {
            log.push(b"y");
            let n = (DROPPED_MARKER.len() + 1).min(log.pending.len());
            shipped += log.pending.drain(..n).len();
            log.push(b"z");
        }
        log.push(&[b'w'; 10_000]);
        assert!(log.truncated);
        shipped += log.pending.len();
        assert!(
            shipped as u64 <= cap + LOG_MARKER_ROOM,
            "{shipped} bytes stored for a cap of {cap}"
        );
    }

    #[test]
    fn a_slow_uploader_never_blocks_the_process() {
        // Room for one chunk only, never drained while the process runs.
        let mut a = assignment(&["sh", "-c", "head -c 2000000 /dev/zero"]);
        a.log_cap_bytes = 10_000_000;
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        let r = rt().block_on(async {
            let (tx, _rx) = mpsc::channel(1);
            execute(&a, &opts, &Stop::new(), &tx).await
        });
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert!(!r.stdout_truncated);
    }
}
