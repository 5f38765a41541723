//! The Drover node agent: enrolls with a one-time bootstrap token, then
//! heartbeats its inventory to the server, riding out outages with jittered
//! backoff and keeping everything it knows in its state dir.
//!
//! Key design decision: the agent only ever opens outbound connections and
//! keeps its own state on disk (atomic writes), so it works behind NAT and
//! survives restarts of itself and of the server without losing its identity.
//! It depends on `drover-proto` for the wire model, never on the server.

pub mod client;
pub mod config;
pub mod inventory;
mod runner;
pub mod state;

use std::path::PathBuf;

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
}

/// How to enroll.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub server: String,
    pub token: String,
    /// Replace an existing identity in the state dir.
    pub force: bool,
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
    let client = Client::new(&opts.server)?;
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
    let creds = StoredCredentials {
        server: client.server().to_owned(),
        agent_id: resp.agent_id,
        access_token: resp.credentials.access_token,
        access_expires_at: resp.credentials.access_expires_at,
        refresh_token: resp.credentials.refresh_token,
        enrolled_at: Utc::now(),
    };
    dir.save_credentials(&creds)?;
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

/// Runs the agent until `shutdown` is cancelled, or until the server
/// refuses its credentials for good (revoked, session ended).
pub async fn run(config: &AgentConfig, shutdown: CancellationToken) -> Result<(), Error> {
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
    runner::Runner::new(config, dir, creds, local)?
        .run(shutdown)
        .await
}
