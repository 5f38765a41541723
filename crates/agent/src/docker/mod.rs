//! Docker sandboxes, over the Docker Engine API (`api`, a small client of
//! our own): a container per attempt, the long-lived container of a docker
//! workspace and the execs run in it (`exec`), what the engine offers (for
//! the inventory), and the clean-up of containers a killed agent left
//! behind.
//!
//! An attempt's container is `drover-<attempt_id>`: its argv as entrypoint
//! and command (never a shell), the assignment's environment plus
//! `DROVER_OUTPUT` (never the agent's), its working dir bound at `/work`
//! and its drover dir at `/drover`, every limit of the profile (memory
//! without swap, CPUs, pids), no network unless the profile names one, a
//! read-only root with a tmpfs `/tmp`, every capability dropped but those
//! the profile gives back, no new privileges, a bounded json-file log, and
//! the engine's small init (`docker-init`) as PID 1 so that SIGTERM reaches
//! the program. Once created it is removed whatever happens: exit, error,
//! timeout, cancel, or the agent stopping.
//!
//! Every container and volume the agent makes carries the labels
//! `io.drover.managed=true`, `io.drover.agent=<agent id>` and
//! `io.drover.kind` (`attempt` or `workspace`), so an agent finds and
//! removes only its own, even on an engine that several agents share.
//!
//! Key design decision: the agent refuses rather than weakens. A runtime
//! the engine does not register, or a limit the engine says it cannot
//! enforce, rejects the attempt; it never runs in a weaker sandbox.

pub(crate) mod api;
mod exec;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_proto::jobs::{Assignment, AttemptResult};
use drover_proto::sandbox::{
    generic_runtimes, runtime_aliases, DockerSandbox, DockerStatus, LimitExceeded, PullPolicy,
    WorkspaceSpec, DROVER_MOUNT, WORKSPACE_MOUNT, WORK_MOUNT,
};
use drover_proto::workflows::OUTPUT_FILE_ENV;

use crate::config::DockerHost;
use crate::executor::{
    self, private_dir, Ended, Event, ExecOptions, Exit, Failure, Signal, Supervisor, Workload,
    OUTPUTS_FILE,
};
use api::{Client, ContainerConfig, Endpoint, HostConfig, LogConfig, Mount, Output};

pub(crate) use exec::run_exec;

/// Label on everything the agent creates in the engine.
pub const LABEL_MANAGED: &str = "io.drover.managed";
/// The id of the agent that created it.
pub const LABEL_AGENT: &str = "io.drover.agent";
/// `attempt` or `workspace`.
pub const LABEL_KIND: &str = "io.drover.kind";
pub const LABEL_ATTEMPT: &str = "io.drover.attempt";
pub const LABEL_JOB: &str = "io.drover.job";
pub const LABEL_WORKSPACE: &str = "io.drover.workspace";

/// Longest wait for the engine's answer to a probe (inventory, facts).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How old the engine's runtimes and limits may be when an attempt is
/// checked against them.
const FACTS_MAX_AGE: Duration = Duration::from_secs(30);
/// Longest wait for one call that is not a stream (kill, remove, inspect):
/// a hung engine must not hold an attempt forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The command of a workspace container: it only has to stay up for the
/// execs (so the image needs `sleep`).
const WORKSPACE_COMMAND: [&str; 2] = ["sleep", "2147483647"];

/// Why a Docker call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine did not answer: the attempt may well work elsewhere or
    /// later, so it fails (retryable) rather than being rejected.
    #[error("the Docker engine at {host} is unreachable: {message}")]
    Unreachable { host: String, message: String },
    /// The engine answered with an error (`status` 0: inside a stream).
    #[error("{message}")]
    Engine { status: u16, message: String },
}

impl Error {
    fn status(&self) -> Option<u16> {
        match self {
            Error::Engine { status, .. } => Some(*status),
            Error::Unreachable { .. } => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// What the engine offers, cached for the checks of each attempt.
#[derive(Debug, Clone)]
struct Facts {
    at: Instant,
    /// The engine's own runtime names.
    runtimes: Vec<String>,
    /// Limits it cannot enforce: memory, swap, cpu, pids.
    unenforced: Vec<String>,
}

/// The Docker engine of an agent: connected on first use, then reused.
pub struct Engine {
    host: DockerHost,
    agent_id: String,
    client: tokio::sync::Mutex<Option<Client>>,
    facts: Mutex<Option<Facts>>,
    status: Mutex<Option<(Instant, DockerStatus)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("host", &self.host.to_string())
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// The engine at `host`, for the agent `agent_id` (its containers are
    /// labelled with it). Nothing is connected yet.
    pub fn new(host: DockerHost, agent_id: &str) -> Engine {
        Engine {
            host,
            agent_id: agent_id.to_owned(),
            client: tokio::sync::Mutex::new(None),
            facts: Mutex::new(None),
            status: Mutex::new(None),
        }
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    fn unreachable(&self, message: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            host: self.host.to_string(),
            message: message.to_string(),
        }
    }

    /// The connected client, its API version agreed with the engine (an
    /// older engine refuses newer clients).
    pub(crate) async fn client(&self) -> Result<Client, Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let endpoint = match &self.host {
            DockerHost::Unix(path) => Endpoint::Unix(path.clone()),
            DockerHost::Http(addr) => Endpoint::Tcp(addr.clone()),
            DockerHost::Off => return Err(self.unreachable("Docker is off (docker_host: off)")),
        };
        let client = tokio::time::timeout(
            PROBE_TIMEOUT,
            Client::connect(endpoint, self.host.to_string()),
        )
        .await
        .map_err(|_| self.unreachable("no answer to /version"))??;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Asks the engine what it is and offers, within a few seconds. Never
    /// fails: an unreachable engine is reported as such.
    pub async fn status(&self) -> DockerStatus {
        let status = match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => unavailable(e.to_string()),
            Err(_) => unavailable(
                self.unreachable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs()))
                    .to_string(),
            ),
        };
        *lock(&self.status) = Some((Instant::now(), status.clone()));
        status
    }

    /// The last status if it is younger than `max_age`, else a new one.
    pub async fn status_at_most(&self, max_age: Duration) -> DockerStatus {
        if let Some((at, status)) = &*lock(&self.status) {
            if at.elapsed() < max_age {
                return status.clone();
            }
        }
        self.status().await
    }

    async fn probe(&self) -> Result<DockerStatus, Error> {
        let client = self.client().await?;
        let info = client.info().await?;
        let version = client.version().await?;
        let mut runtimes: Vec<String> = info.runtimes.clone();
        runtimes.sort();
        let unenforced = unenforced_limits(&info);
        *lock(&self.facts) = Some(Facts {
            at: Instant::now(),
            runtimes: runtimes.clone(),
            unenforced: unenforced.clone(),
        });
        Ok(DockerStatus {
            available: true,
            version: version.version,
            api_version: version.api_version,
            runtimes: generic_runtimes(runtimes.iter().map(String::as_str)),
            engine_runtimes: runtimes,
            default_runtime: info.default_runtime,
            cgroup_version: info.cgroup_version.filter(|v| !v.is_empty()),
            unenforced,
            error: None,
        })
    }

    /// The engine's runtimes and unenforced limits, at most
    /// `FACTS_MAX_AGE` old.
    async fn facts(&self) -> Result<Facts, Error> {
        if let Some(f) = &*lock(&self.facts) {
            if f.at.elapsed() < FACTS_MAX_AGE {
                return Ok(f.clone());
            }
        }
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
            Ok(Ok(_)) => lock(&self.facts)
                .clone()
                .ok_or_else(|| self.unreachable("no answer to /info")),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                Err(self.unreachable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())))
            }
        }
    }

    /// Removes the attempt containers this agent left behind (it was
    /// killed, or the host rebooted): every state, this agent's only.
    /// Workspace containers stay: their runs remove them.
    pub async fn remove_leftover_attempts(&self) -> Result<usize, Error> {
        let client = self.client().await?;
        let list = client
            .list_containers(&[
                format!("{LABEL_AGENT}={}", self.agent_id),
                format!("{LABEL_KIND}=attempt"),
            ])
            .await?;
        let mut removed = 0;
        for c in list {
            match remove_container(&client, &c.id).await {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(container = %c.id, names = ?c.names, "removed a leftover attempt container");
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %e, "could not remove a leftover attempt container")
                }
            }
        }
        Ok(removed)
    }

    fn labels(&self, kind: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_AGENT.to_owned(), self.agent_id.clone()),
            (LABEL_KIND.to_owned(), kind.to_owned()),
        ]);
        for (k, v) in extra {
            labels.insert((*k).to_owned(), (*v).to_owned());
        }
        labels
    }

    /// The checks of a profile against what the engine offers: the
    /// engine's name for its runtime, or why it cannot run here.
    async fn admit(&self, sandbox: &DockerSandbox) -> Result<Option<String>, Failure> {
        let facts = self
            .facts()
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?;
        check_enforced(sandbox, &facts.unenforced).map_err(Failure::Rejected)?;
        engine_runtime(sandbox.runtime.as_deref(), &facts.runtimes).map_err(Failure::Rejected)
    }
}

fn unavailable(error: String) -> DockerStatus {
    DockerStatus {
        available: false,
        error: Some(error),
        ..DockerStatus::default()
    }
}

/// The limits an engine's `/info` says it cannot enforce.
pub(crate) fn unenforced_limits(info: &api::Info) -> Vec<String> {
    [
        ("memory", info.memory_limit),
        ("swap", info.swap_limit),
        ("cpu", info.cpu_cfs_quota),
        ("pids", info.pids_limit),
    ]
    .into_iter()
    .filter(|(_, enforced)| *enforced == Some(false))
    .map(|(name, _)| name.to_owned())
    .collect()
}

/// Refuses a profile asking for a limit the engine cannot enforce (the
/// engine would only warn and run the container without it).
pub(crate) fn check_enforced(sandbox: &DockerSandbox, unenforced: &[String]) -> Result<(), String> {
    let asked = [
        ("memory", sandbox.memory.is_some()),
        // Memory comes with an equal memory + swap limit (no swap).
        ("swap", sandbox.memory.is_some()),
        ("cpu", sandbox.cpus.is_some()),
        ("pids", sandbox.pids.is_some()),
    ];
    let missing: Vec<&str> = asked
        .into_iter()
        .filter(|(name, asked)| *asked && unenforced.iter().any(|u| u == name))
        .map(|(name, _)| name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "sandbox '{}' sets limits the Docker engine on this agent cannot enforce: {} (see `docker info` warnings)",
        sandbox.name,
        missing.join(", ")
    ))
}

/// The engine's name for the runtime a profile asks for (`None`: the
/// engine's default), or why none fits.
pub(crate) fn engine_runtime(
    wanted: Option<&str>,
    engine: &[String],
) -> Result<Option<String>, String> {
    let Some(wanted) = wanted else {
        return Ok(None);
    };
    let aliases = runtime_aliases(wanted);
    let candidates: Vec<&str> = if aliases.is_empty() {
        vec![wanted]
    } else {
        aliases.to_vec()
    };
    candidates
        .into_iter()
        .find(|c| engine.iter().any(|e| e == c))
        .map(|c| Some(c.to_owned()))
        .ok_or_else(|| {
            format!(
                "runtime '{wanted}' is not available on this agent (the engine offers: {})",
                if engine.is_empty() {
                    "none".to_owned()
                } else {
                    engine.join(", ")
                }
            )
        })
}

/// Splits an image reference into the name and the tag (or digest) to
/// pull: without one, `latest` (an empty tag would pull every tag).
pub(crate) fn pull_ref(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    }
}

/// What a container is made of, besides its profile.
#[derive(Debug)]
pub(crate) struct ContainerSpec<'a> {
    pub sandbox: &'a DockerSandbox,
    /// The engine's name of the runtime, `None` for its default.
    pub runtime: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: &'a str,
    pub mounts: Vec<Mount>,
    pub labels: HashMap<String, String>,
    /// The json-file log's size bound.
    pub log_max_bytes: u64,
}

/// The create request for a container: the profile's limits, least
/// privilege for everything else.
pub(crate) fn container_config(spec: ContainerSpec<'_>) -> ContainerConfig {
    let s = spec.sandbox;
    let memory = s.memory.map(|m| i64::try_from(m.0).unwrap_or(i64::MAX));
    ContainerConfig {
        image: s.image.clone(),
        entrypoint: spec.entrypoint,
        cmd: spec.cmd,
        env: spec.env,
        working_dir: spec.working_dir.to_owned(),
        user: s.user.clone(),
        labels: spec.labels,
        host_config: HostConfig {
            memory,
            // The same as memory: no swap on top of it.
            memory_swap: memory,
            nano_cpus: s.cpus.map(|c| (c * 1e9).round() as i64),
            pids_limit: s.pids.map(i64::from),
            network_mode: s.network.clone(),
            readonly_rootfs: s.read_only,
            tmpfs: HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,nosuid,nodev,size={}", s.scratch.0),
            )]),
            cap_drop: vec!["ALL".to_owned()],
            cap_add: s.capabilities.clone(),
            security_opt: vec!["no-new-privileges".to_owned()],
            runtime: spec.runtime,
            // A small init as PID 1 passes SIGTERM on to the program (PID 1
            // ignores signals it has no handler for) and reaps orphans.
            init: true,
            mounts: spec.mounts,
            log_config: LogConfig {
                kind: "json-file".to_owned(),
                config: HashMap::from([
                    ("max-size".to_owned(), spec.log_max_bytes.to_string()),
                    ("max-file".to_owned(), "2".to_owned()),
                ]),
            },
        },
    }
}

/// The json-file bound for an attempt: room for what the agent keeps of
/// both streams and then some, never less than 16 MiB nor more than 1 GiB.
fn log_max_bytes(a: &Assignment) -> u64 {
    a.log_cap_bytes
        .saturating_mul(2)
        .saturating_add(8 << 20)
        .clamp(16 << 20, 1 << 30)
}

fn bind(source: &Path, target: &str) -> Mount {
    Mount {
        target: target.to_owned(),
        source: source.to_string_lossy().into_owned(),
        kind: "bind",
        read_only: false,
    }
}

fn volume(name: &str, target: &str) -> Mount {
    Mount {
        target: target.to_owned(),
        source: name.to_owned(),
        kind: "volume",
        read_only: false,
    }
}

/// The owner a directory mounted into a container gets: a numeric
/// `uid[:gid]` user of the profile (a name means nothing on the host).
pub(crate) fn numeric_owner(user: Option<&str>) -> Option<(u32, Option<u32>)> {
    let user = user?;
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse().ok()?;
    match g {
        Some(g) => Some((uid, Some(g.parse().ok()?))),
        None => Some((uid, None)),
    }
}

fn env_list(a: &Assignment, outputs: &str) -> Vec<String> {
    let mut env: Vec<String> = a.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{OUTPUT_FILE_ENV}={outputs}"));
    env
}

/// Makes sure the engine has the profile's image, per its pull policy.
pub(crate) async fn ensure_image(
    client: &Client,
    sandbox: &DockerSandbox,
    sup: &mut Supervisor<'_>,
) -> Result<(), Failure> {
    let image = sandbox.image.as_str();
    let present = sup
        .bounded(client.image_exists(image))
        .await?
        .map_err(|e| Failure::Failed(format!("cannot inspect image '{image}': {e}")))?;
    let pull = match sandbox.pull {
        PullPolicy::Always => true,
        PullPolicy::Missing => !present,
        PullPolicy::Never if present => false,
        PullPolicy::Never => {
            return Err(Failure::Failed(format!(
                "image '{image}' is not on this agent's Docker engine, and the sandbox's pull policy is never"
            )))
        }
    };
    if !pull {
        return Ok(());
    }
    sup.note(&format!("pulling image {image}"));
    let (name, tag) = pull_ref(image);
    sup.bounded(client.pull(name, tag))
        .await?
        .map_err(|e| Failure::Failed(format!("pulling image '{image}' failed: {e}")))
}

/// Removes a container and its anonymous volumes, whatever its state; a
/// missing one is fine.
async fn remove_container(client: &Client, name: &str) -> Result<(), String> {
    match tokio::time::timeout(CALL_TIMEOUT, client.remove_container(name)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_not_found() => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// Removes a container when dropped, unless disarmed: the attempt's future
/// may be dropped half-way (the runtime stops), and the container must not
/// outlive it. Best effort; the clean-up at the next start catches the
/// rest.
struct RemoveOnDrop {
    client: Option<Client>,
    name: String,
}

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.client = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let name = std::mem::take(&mut self.name);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = remove_container(&client, &name).await {
                    tracing::warn!(container = %name, error = %e, "could not remove a container");
                }
            });
        }
    }
}

/// Creates a container named `name`; one of that name left by an earlier
/// try of the same attempt is removed first.
async fn create_container(
    client: &Client,
    name: &str,
    config: &ContainerConfig,
) -> Result<(), Error> {
    match client.create_container(name, config).await {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(409) => {
            remove_container(client, name)
                .await
                .map_err(|message| Error::Engine {
                    status: 409,
                    message,
                })?;
            client.create_container(name, config).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Runs an attempt in a container of its own.
pub(crate) async fn run_attempt(
    a: &Assignment,
    opts: &ExecOptions,
    engine: &Engine,
    sandbox: &DockerSandbox,
    workspace: Option<&WorkspaceSpec>,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    let runtime = match sup.bounded(engine.admit(sandbox)).await {
        Ok(Ok(runtime)) => runtime,
        Ok(Err(f)) | Err(f) => return sup.fail(f),
    };
    let client = match engine.client().await {
        Ok(c) => c,
        Err(e) => return sup.fail(Failure::Failed(e.to_string())),
    };
    if let Err(f) = ensure_image(&client, sandbox, sup).await {
        return sup.fail(f);
    }
    let mounts = match attempt_mounts(a, opts, sandbox, workspace) {
        Ok(m) => m,
        Err(f) => return sup.fail(f),
    };
    let working_dir = if workspace.is_some() {
        WORKSPACE_MOUNT
    } else {
        WORK_MOUNT
    };
    let config = container_config(ContainerSpec {
        sandbox,
        runtime,
        entrypoint: vec![a.argv[0].clone()],
        cmd: a.argv[1..].to_vec(),
        env: env_list(a, &format!("{DROVER_MOUNT}/{OUTPUTS_FILE}")),
        working_dir,
        mounts,
        labels: engine.labels(
            "attempt",
            &[(LABEL_ATTEMPT, &a.attempt_id), (LABEL_JOB, &a.job_id)],
        ),
        log_max_bytes: log_max_bytes(a),
    });
    let name = format!("drover-{}", a.attempt_id);
    let outputs = executor::drover_dir(opts, a).join(OUTPUTS_FILE);
    // From here on the container may exist: it is removed whatever happens.
    let guard = RemoveOnDrop {
        client: Some(client.clone()),
        name: name.clone(),
    };
    let result = match run_container(&client, &name, &config, sandbox, &outputs, sup).await {
        Ok(r) => r,
        Err(f) => sup.fail(f),
    };
    if let Err(e) = remove_container(&client, &name).await {
        tracing::warn!(container = %name, error = %e, "could not remove the attempt's container");
    }
    guard.disarm();
    result
}

/// The directories an attempt's container gets: its working dir (or the
/// process workspace's) and its drover dir.
fn attempt_mounts(
    a: &Assignment,
    opts: &ExecOptions,
    sandbox: &DockerSandbox,
    workspace: Option<&WorkspaceSpec>,
) -> Result<Vec<Mount>, Failure> {
    let owner = numeric_owner(sandbox.user.as_deref());
    let work = executor::work_dir(opts, a);
    let work_mount = match workspace {
        Some(ws) => {
            if !work.is_dir() {
                return Err(Failure::Failed(format!(
                    "workspace '{}' does not exist on this agent (it is created by builtin:workspace-create)",
                    ws.id
                )));
            }
            bind(&work, WORKSPACE_MOUNT)
        }
        None => {
            private_dir(&work, owner)?;
            if owner.is_none() && sandbox.user.is_some() {
                // A user known only by name inside the image: it can at
                // least read its working dir.
                let _ = executor::set_mode(&work, 0o755);
            }
            bind(&work, WORK_MOUNT)
        }
    };
    let drover = executor::drover_dir(opts, a);
    private_dir(&drover, owner)?;
    Ok(vec![work_mount, bind(&drover, DROVER_MOUNT)])
}

async fn run_container(
    client: &Client,
    name: &str,
    config: &ContainerConfig,
    sandbox: &DockerSandbox,
    outputs: &Path,
    sup: &mut Supervisor<'_>,
) -> Result<AttemptResult, Failure> {
    sup.bounded(create_container(client, name, config))
        .await?
        .map_err(|e| Failure::Failed(format!("cannot create the container: {e}")))?;
    sup.bounded(client.start_container(name))
        .await?
        .map_err(|e| Failure::Failed(format!("cannot start the container: {e}")))?;
    let mut run = ContainerRun::new(client.clone(), name);
    let ended = sup.supervise(&mut run).await?;
    let limit = memory_exceeded(sandbox, &ended);
    Ok(sup.finish(&ended, Some(outputs), limit))
}

/// Whether the engine killed the workload for its memory.
fn memory_exceeded(sandbox: &DockerSandbox, ended: &Ended) -> Option<(LimitExceeded, String)> {
    let exit = ended.exit?;
    let memory = sandbox.memory?;
    exit.oom_killed.then(|| {
        (
            LimitExceeded::Memory,
            format!("killed: exceeded its memory limit of {memory}"),
        )
    })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A container's or an exec's output: asked for, then read, then over.
enum OutputState {
    Asking(BoxFuture<Result<Output, Error>>),
    Reading(Output),
    Ended,
}

impl OutputState {
    fn is_open(&self) -> bool {
        !matches!(self, OutputState::Ended)
    }

    /// The next event of the output; cancel-safe (the request and the
    /// stream keep their state between calls).
    async fn next(&mut self) -> Event {
        loop {
            match self {
                OutputState::Asking(request) => match request.await {
                    Ok(output) => *self = OutputState::Reading(output),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the output");
                        *self = OutputState::Ended;
                        return Event::OutputClosed;
                    }
                },
                OutputState::Reading(output) => match output.next().await {
                    Some(Ok((stream, bytes))) => return Event::Output(stream, bytes),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading the output failed");
                        *self = OutputState::Ended;
                        return Event::OutputClosed;
                    }
                    None => {
                        *self = OutputState::Ended;
                        return Event::OutputClosed;
                    }
                },
                OutputState::Ended => return std::future::pending().await,
            }
        }
    }
}

async fn wait_exit(exit: &mut Option<BoxFuture<Result<Exit, String>>>) -> Result<Exit, String> {
    match exit {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// An attempt's container under supervision: its log stream and its wait.
struct ContainerRun {
    client: Client,
    name: String,
    output: OutputState,
    exit: Option<BoxFuture<Result<Exit, String>>>,
    signalled: Arc<AtomicBool>,
}

impl ContainerRun {
    fn new(client: Client, name: &str) -> ContainerRun {
        let signalled = Arc::new(AtomicBool::new(false));
        let output = OutputState::Asking(Box::pin({
            let client = client.clone();
            let name = name.to_owned();
            async move { client.logs(&name).await }
        }));
        let exit: BoxFuture<Result<Exit, String>> = Box::pin({
            let client = client.clone();
            let name = name.to_owned();
            let signalled = signalled.clone();
            async move {
                client
                    .wait_container(&name)
                    .await
                    .map_err(|e| format!("waiting for the container failed: {e}"))?;
                let info = client
                    .inspect_container(&name)
                    .await
                    .map_err(|e| format!("inspecting the container failed: {e}"))?;
                Ok(Exit::from_status(
                    info.state.exit_code,
                    signalled.load(Ordering::Relaxed),
                    info.state.oom_killed,
                ))
            }
        });
        ContainerRun {
            client,
            name: name.to_owned(),
            output,
            exit: Some(exit),
            signalled,
        }
    }
}

impl Workload for ContainerRun {
    async fn next(&mut self) -> Result<Event, String> {
        let reading = self.output.is_open();
        let waiting = self.exit.is_some();
        tokio::select! {
            ev = self.output.next(), if reading => Ok(ev),
            exit = wait_exit(&mut self.exit), if waiting => {
                self.exit = None;
                exit.map(Event::Exited)
            }
            // Not reached: the loop asks only while one is left.
            else => Err("the container's output and wait both ended".to_owned()),
        }
    }

    fn output_open(&self) -> bool {
        self.output.is_open()
    }

    async fn signal(&mut self, sig: Signal) -> Result<(), String> {
        self.signalled.store(true, Ordering::Relaxed);
        let name = match sig {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.client.kill_container(&self.name, name)).await
        {
            Ok(Ok(())) => {}
            // Not running (any more), or gone: nothing to signal.
            Ok(Err(e)) if matches!(e.status(), Some(404 | 409)) => {}
            Ok(Err(e)) => {
                tracing::warn!(container = %self.name, signal = name, error = %e, "signalling the container failed")
            }
            Err(_) => {
                tracing::warn!(container = %self.name, signal = name, "the engine did not answer a kill")
            }
        }
        Ok(())
    }

    async fn finish(&mut self) {}
}

// ---- workspaces ----

/// The name of a workspace's container and volume.
pub(crate) fn workspace_name(id: &str) -> String {
    format!("drover-ws-{id}")
}

/// Whether the workspace's container exists and runs.
pub(crate) async fn workspace_running(engine: &Engine, id: &str) -> Result<bool, Failure> {
    let client = engine
        .client()
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    match client.inspect_container(&workspace_name(id)).await {
        Ok(info) => Ok(info.state.running),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(Failure::Failed(e.to_string())),
    }
}

/// Creates and starts a docker workspace's volume (bound to `dir`) and
/// long-lived container (`meta` mounted at `/drover`).
pub(crate) async fn create_workspace(
    engine: &Engine,
    ws: &WorkspaceSpec,
    sandbox: &DockerSandbox,
    dir: &Path,
    meta: &Path,
    sup: &mut Supervisor<'_>,
) -> Result<(), Failure> {
    let runtime = sup.bounded(engine.admit(sandbox)).await??;
    let client = engine
        .client()
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    ensure_image(&client, sandbox, sup)
        .await
        .map_err(|f| step_failure("workspace image", f))?;
    let name = workspace_name(&ws.id);
    let labels = engine.labels("workspace", &[(LABEL_WORKSPACE, &ws.id)]);
    let volume_config = api::VolumeConfig {
        name: name.clone(),
        driver: "local".to_owned(),
        driver_opts: HashMap::from([
            ("type".to_owned(), "none".to_owned()),
            ("o".to_owned(), "bind".to_owned()),
            ("device".to_owned(), dir.to_string_lossy().into_owned()),
        ]),
        labels: labels.clone(),
    };
    sup.bounded(client.create_volume(&volume_config))
        .await?
        .map_err(|e| Failure::Failed(format!("workspace volume: {e}")))?;
    let config = container_config(ContainerSpec {
        sandbox,
        runtime,
        entrypoint: WORKSPACE_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
        cmd: Vec::new(),
        env: Vec::new(),
        working_dir: WORKSPACE_MOUNT,
        mounts: vec![volume(&name, WORKSPACE_MOUNT), bind(meta, DROVER_MOUNT)],
        labels,
        log_max_bytes: 16 << 20,
    });
    sup.bounded(create_container(&client, &name, &config))
        .await?
        .map_err(|e| Failure::Failed(format!("workspace container: {e}")))?;
    sup.bounded(client.start_container(&name))
        .await?
        .map_err(|e| {
            Failure::Failed(format!(
                "workspace container: cannot start it (the image needs `sleep`): {e}"
            ))
        })?;
    if !workspace_running(engine, &ws.id).await? {
        return Err(Failure::Failed(format!(
            "workspace container: {name} stopped right after it started (the image needs `sleep`)"
        )));
    }
    Ok(())
}

fn step_failure(step: &str, f: Failure) -> Failure {
    match f {
        Failure::Failed(why) => Failure::Failed(format!("{step}: {why}")),
        other => other,
    }
}

/// Removes a docker workspace's container and volume; what is missing is
/// fine. Says what could not be removed.
pub(crate) async fn remove_workspace(engine: &Engine, id: &str) -> Vec<String> {
    let name = workspace_name(id);
    let client = match engine.client().await {
        Ok(c) => c,
        Err(e) => {
            return vec![
                format!("container {name} ({e})"),
                format!("volume {name} ({e})"),
            ]
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = remove_container(&client, &name).await {
        problems.push(format!("container {name} ({e})"));
    }
    match tokio::time::timeout(CALL_TIMEOUT, client.remove_volume(&name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_not_found() => {}
        Ok(Err(e)) => problems.push(format!("volume {name} ({e})")),
        Err(_) => problems.push(format!(
            "volume {name} (no answer within {}s)",
            CALL_TIMEOUT.as_secs()
        )),
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use drover_proto::sandbox::{ByteSize, Sandbox};

    use super::*;

    fn profile(extra: serde_json::Value) -> DockerSandbox {
        let mut v = serde_json::json!({"type": "docker", "name": "d", "image": "busybox:1"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        match serde_json::from_value::<Sandbox>(v).unwrap() {
            Sandbox::Docker(d) => d,
            Sandbox::Process(_) => unreachable!(),
        }
    }

    #[test]
    fn unenforced_limits_table() {
        let info = |memory, swap, cpu, pids| api::Info {
            memory_limit: memory,
            swap_limit: swap,
            cpu_cfs_quota: cpu,
            pids_limit: pids,
            ..api::Info::default()
        };
        let cases = [
            (info(Some(true), Some(true), Some(true), Some(true)), vec![]),
            (
                info(Some(false), Some(false), Some(true), Some(false)),
                vec!["memory", "swap", "pids"],
            ),
            (
                info(Some(true), Some(false), Some(false), None),
                vec!["swap", "cpu"],
            ),
            // An engine that does not say is taken at its word.
            (info(None, None, None, None), vec![]),
        ];
        for (info, want) in cases {
            assert_eq!(unenforced_limits(&info), want);
        }
    }

    #[test]
    fn unenforced_limits_reject_profiles_that_ask_for_them() {
        let cases = [
            (
                serde_json::json!({}),
                vec!["memory", "swap", "cpu", "pids"],
                None,
            ),
            (
                serde_json::json!({"memory": "64m"}),
                vec!["swap"],
                Some("cannot enforce: swap"),
            ),
            (
                serde_json::json!({"memory": "64m", "cpus": 1, "pids": 5}),
                vec!["memory", "cpu", "pids"],
                Some("cannot enforce: memory, cpu, pids"),
            ),
            (serde_json::json!({"pids": 5}), vec!["memory", "swap"], None),
        ];
        for (extra, unenforced, want) in cases {
            let unenforced: Vec<String> = unenforced.into_iter().map(String::from).collect();
            let got = check_enforced(&profile(extra.clone()), &unenforced);
            match want {
                None => assert!(got.is_ok(), "{extra}: {got:?}"),
                Some(text) => {
                    let err = got.unwrap_err();
                    assert!(
                        err.contains(text) && err.contains("sandbox 'd'"),
                        "{extra}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn runtimes_are_mapped_to_the_engines_names() {
        let engine: Vec<String> = ["io.containerd.runc.v2", "runsc-kvm", "crun"]
            .into_iter()
            .map(String::from)
            .collect();
        let cases = [
            (None, Ok(None)),
            (Some("runc"), Ok(Some("io.containerd.runc.v2"))),
            (Some("runsc"), Ok(Some("runsc-kvm"))),
            (Some("gvisor"), Ok(Some("runsc-kvm"))),
            (Some("crun"), Ok(Some("crun"))),
            (
                Some("kata"),
                Err("runtime 'kata' is not available on this agent (the engine offers: io.containerd.runc.v2, runsc-kvm, crun)"),
            ),
            (
                Some("youki"),
                Err("runtime 'youki' is not available on this agent (the engine offers: io.containerd.runc.v2, runsc-kvm, crun)"),
            ),
        ];
        for (wanted, want) in cases {
            let got = engine_runtime(wanted, &engine);
            assert_eq!(
                got,
                want.map(|o| o.map(String::from)).map_err(String::from),
                "{wanted:?}"
            );
        }
        assert_eq!(
            engine_runtime(Some("runsc"), &[]),
            Err("runtime 'runsc' is not available on this agent (the engine offers: none)".into())
        );
    }

    #[test]
    fn pull_refs_table() {
        let cases = [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            (
                "registry:5000/team/app",
                ("registry:5000/team/app", "latest"),
            ),
            (
                "registry:5000/team/app:v2",
                ("registry:5000/team/app", "v2"),
            ),
            ("app@sha256:abc", ("app", "sha256:abc")),
        ];
        for (image, want) in cases {
            assert_eq!(pull_ref(image), want, "{image}");
        }
    }

    #[test]
    fn container_body_has_the_limits_and_least_privilege() {
        let d = profile(serde_json::json!({
            "memory": "64m", "cpus": 0.5, "pids": 32, "capabilities": ["CHOWN"],
            "user": "1000:1000", "scratch": "16m",
        }));
        let body = container_config(ContainerSpec {
            sandbox: &d,
            runtime: Some("runc".into()),
            entrypoint: vec!["echo".into()],
            cmd: vec!["hi; rm -rf /".into()],
            env: vec!["A=1".into()],
            working_dir: WORK_MOUNT,
            mounts: vec![bind(Path::new("/w"), WORK_MOUNT)],
            labels: HashMap::from([("k".to_owned(), "v".to_owned())]),
            log_max_bytes: 16 << 20,
        });
        let json = serde_json::to_value(api::container_body(&body)).unwrap();
        let want = serde_json::json!({
            "Image": "busybox:1",
            "Entrypoint": ["echo"],
            "Cmd": ["hi; rm -rf /"],
            "Env": ["A=1"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "Labels": {"k": "v"},
            "AttachStdin": false, "AttachStdout": false, "AttachStderr": false,
            "OpenStdin": false, "Tty": false,
            "HostConfig": {
                "Memory": 64 << 20,
                "MemorySwap": 64 << 20,
                "NanoCpus": 500_000_000,
                "PidsLimit": 32,
                "NetworkMode": "none",
                "ReadonlyRootfs": true,
                "Tmpfs": {"/tmp": format!("rw,nosuid,nodev,size={}", 16 << 20)},
                "CapDrop": ["ALL"],
                "CapAdd": ["CHOWN"],
                "SecurityOpt": ["no-new-privileges"],
                "Runtime": "runc",
                "Init": true,
                "Privileged": false,
                "Mounts": [{"Target": "/work", "Source": "/w", "Type": "bind", "ReadOnly": false}],
                "LogConfig": {"Type": "json-file", "Config": {"max-size": (16u64 << 20).to_string(), "max-file": "2"}},
            },
        });
        assert_eq!(
            json,
            want,
            "{}",
            serde_json::to_string_pretty(&json).unwrap()
        );
        // Defaults: no limits asked, none set; the engine's runtime.
        let body = container_config(ContainerSpec {
            sandbox: &profile(serde_json::json!({"read_only": false})),
            runtime: None,
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: WORK_MOUNT,
            mounts: vec![],
            labels: HashMap::new(),
            log_max_bytes: 1,
        });
        let json = serde_json::to_value(api::container_body(&body)).unwrap();
        let hc = &json["HostConfig"];
        for absent in [
            "Memory",
            "MemorySwap",
            "NanoCpus",
            "PidsLimit",
            "Runtime",
            "CapAdd",
        ] {
            assert!(hc.get(absent).is_none(), "{absent} in {hc}");
        }
        assert!(json.get("User").is_none(), "{json}");
        assert_eq!(hc["ReadonlyRootfs"], false);
        assert_eq!(
            hc["Tmpfs"]["/tmp"],
            format!("rw,nosuid,nodev,size={}", 64u64 << 20)
        );
    }

    #[test]
    fn log_bound_follows_the_cap() {
        let mut a = crate::test_support::assignment(&["x"]);
        for (cap, want) in [
            (1 << 20, 16 << 20),
            (100 << 20, (200 << 20) + (8 << 20)),
            (u64::MAX, 1 << 30),
        ] {
            a.log_cap_bytes = cap;
            assert_eq!(log_max_bytes(&a), want, "{cap}");
        }
    }

    #[test]
    fn numeric_owners_table() {
        let cases = [
            (None, None),
            (Some("nobody"), None),
            (Some("1000"), Some((1000, None))),
            (Some("1000:50"), Some((1000, Some(50)))),
            (Some("1000:staff"), None),
        ];
        for (user, want) in cases {
            assert_eq!(numeric_owner(user), want, "{user:?}");
        }
    }

    #[test]
    fn exit_statuses_table() {
        let exit = |code, signal, oom| Exit {
            code,
            signal,
            oom_killed: oom,
        };
        let cases = [
            ((Some(0), false, false), exit(Some(0), None, false)),
            // A program may exit 137 on its own: a signal only when the
            // agent or the engine sent one.
            ((Some(137), false, false), exit(Some(137), None, false)),
            ((Some(137), true, false), exit(None, Some(9), false)),
            ((Some(143), true, false), exit(None, Some(15), false)),
            ((Some(137), false, true), exit(None, Some(9), true)),
            ((Some(1), true, false), exit(Some(1), None, false)),
            ((None, true, false), exit(None, None, false)),
        ];
        for ((status, signalled, oom), want) in cases {
            assert_eq!(
                Exit::from_status(status.map(i64::from), signalled, oom),
                want,
                "{status:?} {signalled} {oom}"
            );
        }
    }

    #[test]
    fn memory_limit_is_reported_only_for_an_oom_kill() {
        let d = profile(serde_json::json!({"memory": "64m"}));
        let ended = |oom| Ended {
            exit: Some(Exit {
                code: None,
                signal: Some(9),
                oom_killed: oom,
            }),
            killed: false,
        };
        assert_eq!(
            memory_exceeded(&d, &ended(true)),
            Some((
                LimitExceeded::Memory,
                "killed: exceeded its memory limit of 64m".to_owned()
            ))
        );
        assert_eq!(memory_exceeded(&d, &ended(false)), None);
        assert_eq!(ByteSize(64 << 20).to_string(), "64m");
    }
}
