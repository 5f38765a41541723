//! The Drover node agent: enrolls with a one-time bootstrap token, then
//! heartbeats its inventory to the server and pulls, runs and reports the
//! jobs it is allowed to run — as processes (rlimits, an unprivileged
//! user), in Docker containers, or in workspaces shared by a workflow
//! run's tasks — riding out outages with jittered backoff and keeping
//! everything it knows in its state dir.
//!
//! Key design decision: the agent only ever opens outbound connections and
//! keeps its own state on disk (atomic writes, results in an outbox until
//! acknowledged), so it works behind NAT and survives restarts of itself
//! and of the server without losing its identity or a result. It depends on
//! `drover-proto` for the wire model, never on the server.
//!
//! The tasks of `run`: the heartbeat loop (`runner`, which also probes the
//! Docker engine), and the poller, lease renewer, attempt tasks and
//! reporter (`jobs`, which names what each does on stop), plus the
//! optional metrics endpoint (`metrics`). They share one
//! `session::Session` for credentials. Before polling, `run` removes the
//! attempt containers a killed agent left behind (`docker`), and stops
//! every attempt it left recorded and reports it failed (`survivors`).
//!
//! Where an attempt runs: `executor` (the supervision loop shared by all
//! kinds of work), `process` (process sandboxes), `docker` (containers and
//! execs over the Docker Engine API), `workspace` (the workspace
//! built-ins); what it leaves for upload is read by `artifacts` (beneath
//! the working dir, no symlink followed, as the attempt's user).

pub mod allow;
mod artifacts;
pub mod client;
pub mod config;
pub mod docker;
#[cfg(test)]
mod docker_tests;
pub mod executor;
pub mod help;
pub mod inventory;
mod jobs;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod outbox;
mod process;
#[cfg(test)]
mod run_tests;
mod runner;
mod session;
pub mod signals;
pub mod state;
pub mod survivors;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod workspace;
#[cfg(test)]
mod workspace_tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use drover_proto::agent::EnrollRequest;
use tokio_util::sync::CancellationToken;

use client::{Client, ClientError};
pub use config::{AgentArgs, AgentConfig};
use state::{StateDir, StoredCredentials};

/// The version of this agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why an agent command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Trust(#[from] tls::TrustError),
    #[error("not enrolled (state dir {0}): run drover-agent enroll --server URL --token TOKEN")]
    NotEnrolled(PathBuf),
    #[error(
        "already enrolled as agent {agent_id} (state dir {dir}); pass --force to enroll again"
    )]
    AlreadyEnrolled { agent_id: String, dir: PathBuf },
    #[error("enrollment refused: {0}")]
    EnrollRefused(String),
    #[error("no server given: pass --server URL or set server in agent.yaml")]
    NoServer,
    #[error("the server refused this agent's credentials for good: {0}")]
    CredentialsRejected(String),
    /// The roots of attempts' and workspaces' dirs cannot be made.
    #[error(transparent)]
    WorkDirs(executor::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How long the last outbox drain may take when the agent stops.
const FINAL_DRAIN: Duration = Duration::from_secs(5);
/// How long the start-up clean-up of leftover containers may take.
const CLEANUP_BOUND: Duration = Duration::from_secs(20);

/// How to enroll.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub server: String,
    pub token: String,
    /// Replace an existing identity in the state dir.
    pub force: bool,
    /// The server's CA or certificate (`tls::enrollment_pin`); `None`
    /// keeps the pin already in the state dir, if any.
    pub pin: Option<tls::Pin>,
}

/// Trades a bootstrap token for an identity and stores it in the state dir.
pub async fn enroll(dir: &StateDir, opts: &EnrollOptions) -> Result<StoredCredentials, Error> {
    config::check_server_url(&opts.server)?;
    if let Some(existing) = dir.credentials()? {
        if !opts.force {
            return Err(Error::AlreadyEnrolled {
                agent_id: existing.agent_id,
                dir: dir.path().to_owned(),
            });
        }
    }
    // A pin given now replaces the one kept; none given keeps it (a
    // re-enrollment never trusts less than the last one did).
    let pin = match &opts.pin {
        Some(pin) => Some(pin.clone()),
        None => tls::stored(dir)?,
    };
    let client = Client::new(&opts.server, pin.as_ref())?;
    let resp = client
        .enroll(&EnrollRequest {
            token: opts.token.trim().to_owned(),
            hostname: inventory::hostname(),
            agent_version: VERSION.to_owned(),
        })
        .await
        .map_err(|e| match e {
            ClientError::Refused { message, .. } => Error::EnrollRefused(message),
            other => Error::Client(other),
        })?;
    // The pin first: credentials are never kept without it.
    if let Some(pin) = &pin {
        tls::store(dir, pin)?;
    }
    let creds = StoredCredentials {
        server: client.server().to_owned(),
        agent_id: resp.agent_id,
        access_token: resp.credentials.access_token,
        access_expires_at: resp.credentials.access_expires_at,
        refresh_token: resp.credentials.refresh_token,
        enrolled_at: Utc::now(),
    };
    // The key is checked before anything is written: a server that sends
    // a bad one is not enrolled with.
    let key = match &resp.assignment_key {
        Some(k) => {
            drover_proto::signing::parse_public_key(k)
                .map_err(|e| Error::EnrollRefused(format!("the server's assignment key: {e}")))?;
            Some(state::AssignmentKey {
                public_key: k.clone(),
                learned_at: Utc::now(),
                learned_from: "enrollment".to_owned(),
            })
        }
        None => None,
    };
    dir.save_credentials(&creds)?;
    dir.save_assignment_key(key.as_ref())?;
    dir.save_local_state(&state::LocalState {
        agent_id: Some(creds.agent_id.clone()),
        server: Some(creds.server.clone()),
        last_contact_at: Some(Utc::now()),
        heartbeat_interval_secs: Some(resp.heartbeat_interval_secs),
        ..Default::default()
    })?;
    tracing::info!(agent = %creds.agent_id, server = %creds.server, "enrolled");
    Ok(creds)
}

/// How `run_with` treats the process it runs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Once started, drop the process's mappings of its start-up code
    /// (`memory`). For the agent's own process, not for one it shares with
    /// other work (`drover up`).
    pub release_startup_code: bool,
}

/// Runs the agent until `shutdown` is cancelled, or until the server
/// refuses its credentials for good (revoked, session ended).
///
/// On shutdown it stops polling, cancels running attempts (SIGTERM, then
/// SIGKILL after their grace), writes their results to the outbox, tries
/// one last drain for a few seconds, and returns; what is undelivered stays
/// in the outbox for the next start.
pub async fn run(config: &AgentConfig, shutdown: CancellationToken) -> Result<(), Error> {
    run_with(config, shutdown, RunOptions::default()).await
}

/// `run`, with options about the process.
pub async fn run_with(
    config: &AgentConfig,
    shutdown: CancellationToken,
    options: RunOptions,
) -> Result<(), Error> {
    let dir = StateDir::open(&config.state_dir)?;
    let creds = dir
        .credentials()?
        .ok_or_else(|| Error::NotEnrolled(config.state_dir.clone()))?;
    let local = dir.local_state()?;
    if let Some(why) = &local.credentials_rejected {
        return Err(Error::CredentialsRejected(format!(
            "{why} (recorded earlier; enroll again with --force and a new bootstrap token)"
        )));
    }
    let outbox = outbox::Outbox::open(&dir)?;
    let assignment_key = match dir.assignment_key()? {
        Some(k) => Some(
            drover_proto::signing::parse_public_key(&k.public_key).map_err(|e| {
                Error::State(state::StateError::Corrupt {
                    path: dir.path().join("assignment-key.json"),
                    message: e.to_string(),
                })
            })?,
        ),
        None => None,
    };
    // A server given in the config overrides the one of enrollment, so a
    // moved server needs no re-enrollment.
    let server = config
        .server
        .clone()
        .unwrap_or_else(|| creds.server.clone());
    // The configured pin beats the one kept at enrollment.
    let pin = match &config.pin {
        Some(pin) => Some(pin.clone()),
        None => tls::stored(&dir)?,
    };
    if pin.is_none() && server.starts_with("http://") && !is_loopback_url(&server) {
        tracing::warn!(
            %server,
            "talking to the server over plain HTTP across the network: its tokens can be read \
             on the way; serve HTTPS and pin its CA or fingerprint"
        );
    }
    let session = Arc::new(session::Session::new(
        Client::new(&server, pin.as_ref())?,
        dir.clone(),
        creds,
    ));
    let metrics = Arc::new(metrics::Metrics::new());
    let stop = CancellationToken::new();
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .map_err(|source| Error::MetricsListen { addr, source })?;
            tracing::info!(%addr, "serving metrics at /metrics");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                stop.clone(),
            )))
        }
        None => None,
    };
    let can_switch_users = config::running_as_root();
    let docker = match &config.docker_host {
        config::DockerHost::Off => None,
        host => Some(Arc::new(docker::Engine::new(
            host.clone(),
            session.agent_id(),
        ))),
    };
    let exec = executor::ExecOptions {
        path: config::process_path(),
        allow_sandboxes: config.allow_sandboxes.clone(),
        docker: docker.clone(),
        can_switch_users,
        workspace_local_roots: config.workspace_local_roots.clone(),
        ..executor::ExecOptions::new(dir.path())
    };
    // Leftovers of attempts a killed agent could not clean up; workspaces
    // stay until their runs remove them.
    let _ = std::fs::remove_dir_all(&exec.work_root);
    if can_switch_users {
        // A sandbox's unprivileged user must reach its working dir below
        // the state dir: others may pass through, list nothing, and read
        // nothing of the agent's (its files are 0600, the outbox 0700).
        dir.allow_traversal()?;
    }
    exec.prepare().map_err(Error::WorkDirs)?;
    if let Some(engine) = &docker {
        tokio::select! {
            _ = prepare_docker(engine) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    // What a killed agent left running is stopped and reported failed
    // before any work is taken (`survivors`).
    match survivors::stop_left_over(&exec, &outbox).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            attempts = n,
            "reported failed the attempts an earlier run of the agent left running"
        ),
        Err(e) => tracing::error!(error = %e, "cannot read the records of running attempts"),
    }
    let jobs = Arc::new(jobs::Jobs::new(
        session.clone(),
        jobs::JobsConfig {
            capacity: config.capacity,
            allow_actions: config.allow_actions.clone(),
            exec,
            max_backoff: config.max_backoff,
            assignment_key,
        },
        outbox,
        metrics.clone(),
        stop.clone(),
    ));
    tracing::info!(
        agent = %session.agent_id(),
        server = %session.client().server(),
        state_dir = %dir.path().display(),
        capacity = config.capacity,
        allow_actions = ?config.allow_actions,
        allow_sandboxes = ?config.allow_sandboxes.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        docker_host = %config.docker_host,
        "agent running"
    );
    if config.allow_actions.is_empty() {
        tracing::warn!("allow_actions is empty: every job sent to this agent will be rejected");
    }
    if options.release_startup_code {
        // Start-up is over: what runs from here on is mapped again on use.
        let released = memory::release_startup_code();
        tracing::debug!(bytes = released, "released the mappings of start-up code");
    }
    let poller = tokio::spawn(jobs.clone().poll_loop());
    let leases = tokio::spawn(jobs.clone().lease_loop());
    let reporter = tokio::spawn(jobs.clone().report_loop());

    // The heartbeat loop runs here; it returns on shutdown or rejection.
    let reported = runner::Reported {
        capacity: config.capacity,
        // What the agent accepts: docker only with an engine configured.
        sandboxes: config
            .allow_sandboxes
            .iter()
            .filter(|k| **k != config::SandboxKind::Docker || docker.is_some())
            .map(|k| k.as_str().to_owned())
            .collect(),
        jobs: jobs.clone(),
        docker,
    };
    let outcome = runner::Runner::new(config, session.clone(), dir, local, reported)?
        .run(shutdown)
        .await;

    stop.cancel();
    for task in [poller, leases, reporter] {
        let _ = task.await;
    }
    jobs.stop_attempts().await;
    if outcome.is_ok() {
        jobs.final_drain(FINAL_DRAIN).await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    session.settle().await;
    tracing::info!("agent stopped");
    outcome
}

/// True when `url`'s host is a loopback address or `localhost`.
fn is_loopback_url(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Probes the Docker engine once and removes the attempt containers this
/// agent left behind, within a bound: an engine that is away is logged,
/// never fatal (process attempts still run, docker ones fail until it is
/// back).
async fn prepare_docker(engine: &docker::Engine) {
    let status = engine.status().await;
    if !status.available {
        tracing::warn!(
            error = status.error.as_deref().unwrap_or(""),
            "the Docker engine is unreachable; docker sandboxes fail until it answers"
        );
        return;
    }
    tracing::info!(
        version = status.version.as_deref().unwrap_or(""),
        runtimes = ?status.runtimes,
        unenforced = ?status.unenforced,
        "Docker engine found"
    );
    match tokio::time::timeout(CLEANUP_BOUND, engine.remove_leftover_attempts()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(
            containers = n,
            "removed attempt containers left by an earlier run"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove leftover attempt containers"),
        Err(_) => tracing::warn!("removing leftover attempt containers took too long; going on"),
    }
}
