//! The Drover control-plane server as a library: `Server::open` prepares
//! the store, keys and first admin; `Server::serve` answers HTTP until the
//! shutdown token is cancelled. The `drover` binary is a thin shell over it.
//!
//! Key design decision: the server keeps no state of its own between
//! requests beyond caches it can lose; the database is the only state shared
//! between replicas, so any number of servers can front one PostgreSQL.

pub mod access;
pub mod approvals;
pub mod artifacts;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod connections;
pub mod domain;
pub mod egress;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod offline;
pub mod private;
pub mod ratelimit;
pub mod routes;
pub mod sandboxes;
pub mod schedules;
pub mod sealing;
pub mod selector;
pub mod state;
pub mod tasks;
pub mod throttle;
pub mod tls;
pub mod ui;
pub mod vault;
pub mod webhooks;
pub mod workflow;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use chrono::Utc;
use drover_proto::api::{CreateTokenRequest, CreatedToken, Role};
use drover_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

pub use config::{ServerArgs, ServerConfig};

use crate::auth::SigningKey;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::tasks::TaskKind;

/// Name of the user created at the first start.
pub const ADMIN_USER: &str = "admin";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    #[error(transparent)]
    Secret(#[from] auth::SecretError),
    #[error(transparent)]
    AssignmentKey(#[from] sealing::KeyError),
    #[error("cannot create or secure {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Api(#[from] error::ApiError),
    #[error(transparent)]
    Artifacts(#[from] artifacts::ArtifactError),
    #[error(transparent)]
    Task(#[from] tasks::TaskFailure),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("secrets vault: {0}")]
    Vault(#[from] vault::Error),
    /// An offline change (`offline`) that cannot be made, and why.
    #[error("{0}")]
    Offline(String),
}

/// What happened to the admin user at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminInit {
    /// Users existed already; nothing changed.
    Existing,
    /// The admin was created with the password from the environment.
    CreatedWithGivenPassword,
    /// The admin was created with this generated password, shown only now.
    CreatedWithGeneratedPassword(String),
}

/// A prepared server: store open, migrations applied, signing key loaded.
#[derive(Debug, Clone)]
pub struct Server {
    state: AppState,
    tls: Option<tls::ServerTls>,
}

impl Server {
    /// Opens (creating when missing) the data dir, the database and the key.
    pub async fn open(config: ServerConfig) -> Result<Server, Error> {
        config.check_listen()?;
        let tls = match &config.tls {
            Some(files) => {
                let tls = tls::load(&files.cert, &files.key)?;
                tracing::info!(cert = %files.cert.display(), fingerprint = %tls.fingerprint, "serving HTTPS");
                Some(tls)
            }
            None => None,
        };
        private::dir(&config.data_dir).map_err(|source| Error::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let store = Store::open(&drover_store::Options {
            url: config.database_url.clone(),
            max_connections: 16,
        })
        .await?;
        // SQLite creates its files 0644 (and its WAL files like the
        // database): the database holds hashes and secrets.
        private::sqlite_files(&config.database_url).map_err(|source| Error::DataDir {
            path: drover_store::redact(&config.database_url),
            source,
        })?;
        let signing_key = SigningKey::load_or_create(&config.signing_key_file)?;
        private::file(&config.signing_key_file).map_err(|source| Error::DataDir {
            path: config.signing_key_file.display().to_string(),
            source,
        })?;
        let master = vault::MasterKeys::load(&config.master_key)?;
        if let vault::MasterKeySource::File(path) = &config.master_key {
            private::file(path).map_err(|source| Error::DataDir {
                path: path.display().to_string(),
                source,
            })?;
        }
        let vault = vault::Vault::open(&store, master).await?;
        let sealed = vault.backfill_webhook_secrets(&store).await?;
        if sealed > 0 {
            tracing::info!(count = sealed, "sealed webhook secrets stored in clear");
        }
        tracing::info!(master_key = %vault.master_key_id(), "secrets vault opened");
        let assignment_key_file = sealing::key_path(&config.signing_key_file);
        let assignment_signer = Arc::new(sealing::load_or_create(&assignment_key_file)?);
        private::file(&assignment_key_file).map_err(|source| Error::DataDir {
            path: assignment_key_file.display().to_string(),
            source,
        })?;
        // Every job's spec is signed as it is inserted, on any path.
        store.sign_jobs_with(assignment_signer.clone());
        let assignment_key: Arc<str> =
            drover_proto::signing::public_key_hex(&assignment_signer.public_key()).into();
        let max_long_polls = config.max_long_polls;
        let config_login = config.login.clone();
        let config_rate_limits = config.rate_limits;
        let artifacts = artifacts::ArtifactStore::open(&config.artifact_store)?;
        tracing::info!(store = %artifacts.describe, "artifact store opened");
        tracing::info!(
            backend = %store.backend(),
            database = %drover_store::redact(&config.database_url),
            "store opened"
        );
        let hub = Arc::new(hub::Hub::new(max_long_polls));
        // Every wake-up comes from what a commit changed.
        store.on_commit({
            let hub = hub.clone();
            Arc::new(move |changes| hub.apply(changes))
        });
        Ok(Server {
            state: AppState {
                store,
                config: Arc::new(config),
                signing_key,
                vault: Arc::new(vault),
                assignment_signer,
                assignment_key,
                metrics: Arc::new(Metrics::new()),
                hub,
                artifacts,
                logins: Arc::new(throttle::LoginGuard::new(&config_login)),
                limiter: Arc::new(ratelimit::Limiter::new(config_rate_limits)),
                shutdown: CancellationToken::new(),
                tls_fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
            },
            tls,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.state.config
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The fingerprint (`sha256:HEX`) of the certificate served, when the
    /// server serves HTTPS.
    pub fn tls_fingerprint(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.fingerprint.as_str())
    }

    /// Creates the admin user if no user exists yet.
    pub async fn ensure_admin(&self) -> Result<AdminInit, Error> {
        if self.state.store.count_users().await? > 0 {
            if self.state.config.admin_password.is_some() {
                tracing::warn!(
                    "DROVER_ADMIN_PASSWORD is set but was ignored: the admin user exists already, \
                     and the variable only sets its password at the first start; change a password \
                     with `drover users passwd NAME`, or with the server stopped: `{}`",
                    reset_password_command(&self.state.config)
                );
            }
            return Ok(AdminInit::Existing);
        }
        let (password, generated) = match &self.state.config.admin_password {
            Some(p) => (p.clone(), false),
            None => (auth::new_password()?, true),
        };
        let hash = {
            let password = password.clone();
            tokio::task::spawn_blocking(move || auth::hash_password(&password))
                .await
                .map_err(|e| auth::SecretError::Hash(e.to_string()))??
        };
        match self
            .state
            .store
            .create_user(
                ADMIN_USER,
                &hash,
                Role::Admin,
                &Default::default(),
                Utc::now(),
            )
            .await
        {
            Ok(_) => {}
            // Another replica created it at the same moment.
            Err(e) if e.is_unique_violation() => return Ok(AdminInit::Existing),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(user = ADMIN_USER, "created the admin user");
        Ok(if generated {
            AdminInit::CreatedWithGeneratedPassword(password)
        } else {
            AdminInit::CreatedWithGivenPassword
        })
    }

    /// Creates a token for the named user without going through HTTP
    /// (used by `drover up` for its local agent and CLI profile).
    pub async fn create_token(
        &self,
        username: &str,
        req: &CreateTokenRequest,
    ) -> Result<CreatedToken, Error> {
        let user = self
            .state
            .store
            .user_by_username(username)
            .await?
            .ok_or_else(|| error::ApiError::not_found(format!("user '{username}' not found")))?;
        let by = auth::UserAuth {
            limits: access::Limits::of(&user.scope, &Default::default()),
            user_id: user.id,
            username: user.username,
            role: user.role,
            token_id: String::new(),
            token_scope: Default::default(),
        };
        Ok(routes::tokens::create(&self.state, &by, req).await?)
    }

    /// The whole HTTP application.
    pub fn router(&self) -> Router {
        app(self.state.clone())
    }

    /// Serves HTTP on `listener` until `shutdown` is cancelled, then lets
    /// in-flight requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "listening");
        let app = self.router();
        // Long-polls and waits end as soon as shutdown starts.
        let state_shutdown = self.state.shutdown.clone();
        let forward = shutdown.clone();
        tokio::spawn(async move {
            forward.cancelled().await;
            state_shutdown.cancel();
        });
        let mut tasks = tasks::Supervisor::new(self.state.shutdown.clone());
        tasks.spawn(TaskKind::Reaper, reap_leases(self.state.clone()));
        tasks.spawn(
            TaskKind::Engine,
            workflow::engine::run(self.state.clone(), self.state.shutdown.clone()),
        );
        tasks.spawn(
            TaskKind::Webhooks,
            webhooks::run(self.state.clone(), self.state.shutdown.clone()),
        );
        tasks.spawn(TaskKind::Schedules, schedules::run(self.state.clone()));
        if let Some(listener) = self.state.store.listen().await? {
            tasks.spawn(TaskKind::Hub, hear_replicas(self.state.clone(), listener));
        }
        let limits = self.state.config.connections.clone();
        let acceptor = self.tls.as_ref().map(|t| t.acceptor.clone());
        let served = connections::serve(listener, app, &limits, acceptor, shutdown.clone());
        let outcome = tokio::select! {
            () = served => Ok(()),
            failure = tasks.watch() => {
                // Stop serving and tell the caller: a half-dead server
                // must not go on answering.
                shutdown.cancel();
                Err(Error::Task(failure))
            }
        };
        self.state.shutdown.cancel();
        tasks.join_all().await;
        self.state.store.close().await;
        tracing::info!("server stopped");
        outcome
    }
}

/// The `drover admin reset-password` command line for this server's store.
pub fn reset_password_command(config: &ServerConfig) -> String {
    let default_db = format!("sqlite://{}", config.data_dir.join("drover.db").display());
    let mut line = format!(
        "DROVER_ADMIN_PASSWORD=... drover admin reset-password --data-dir {}",
        config.data_dir.display()
    );
    if config.database_url != default_db {
        line.push_str(" --database-url ");
        line.push_str(&drover_store::redact(&config.database_url));
    }
    line
}

/// Background task (PostgreSQL): wakes this replica's waiters for what the
/// other replicas commit. A broken connection loses the notifications sent
/// meanwhile, so after one everything is looked at again.
async fn hear_replicas(state: AppState, mut listener: drover_store::notify::Listener) {
    loop {
        let heard = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            heard = listener.next() => heard,
        };
        match heard {
            Ok(changes) => state.store.announce(&changes),
            Err(e) => {
                tracing::warn!(error = %e, "listening for other replicas failed; reconnecting");
                state.store.announce(&drover_store::Changes {
                    everything: true,
                    ..Default::default()
                });
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Background task: attempts whose agent stopped renewing their lease become
/// lost (and are retried per policy); approval requests past their time
/// expire (their work is cancelled). Runs until shutdown; an error is logged
/// and the next round tries again.
async fn reap_leases(state: AppState) {
    let every = (state.config.attempt_lease / 4).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match state.store.expire_leases(fastrand::f64(), Utc::now()).await {
            Ok(expired) => {
                for e in expired {
                    tracing::warn!(attempt = %e.attempt_id, job = %e.job_id, agent = %e.agent_id, retried = e.retried, "attempt lost: lease expired");
                    state.metrics.result_recorded("lost");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiring leases failed"),
        }
        // Approval requests past their time end, and their work with them.
        match state.store.expire_approvals(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                requests = n,
                "approval requests expired: their work was cancelled"
            ),
            Err(e) => tracing::error!(error = %e, "expiring approval requests failed"),
        }
    }
}

/// Builds the router: the documented API, its OpenAPI document, the probes,
/// metrics and the body-size limit.
pub fn app(state: AppState) -> Router {
    let (api, openapi) = routes::api().split_for_parts();
    let openapi = Arc::new(routes::document(openapi));
    let api = api.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let doc = openapi.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    );
    let metrics = state.metrics.clone();
    let max_body = state.config.max_body_bytes;
    api.merge(routes::system::router())
        .merge(ui::router(state.clone()))
        .fallback(|| async { error::ApiError::not_found("no such endpoint") })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::audit::record,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
