//! `drover server` and `drover up`: start the server (and, for `up`, one
//! local agent) and stop cleanly on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use drover_agent::lock::{Lock, LockError, Mode};
use drover_agent::state::StateDir;
use drover_agent::{AgentConfig, EnrollOptions};
use drover_proto::api::{CreateTokenRequest, TokenKind};
use drover_server::config::LogFormat;
use drover_server::{AdminInit, Server, ServerArgs, ServerConfig, ADMIN_USER};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ops::Target;
use crate::profile::{self, Profile, ProfileFile};

/// The lock file in the data dir: shared by the servers on it, taken
/// alone by `drover admin`.
pub const DATA_DIR_LOCK: &str = "server.lock";

/// How long in-flight work may take to finish after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn init_logging(config: &ServerConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.with_writer(std::io::stderr).json().init(),
        LogFormat::Human => {
            // Colours only on a terminal and without NO_COLOR; every
            // control character a client slipped into a logged value is
            // escaped (one event, one line).
            let ansi = drover_agent::config::log_colours();
            builder
                .with_ansi(ansi)
                .with_writer(crate::logtext::Escaping { ansi })
                .init()
        }
    }
}

/// Cancels `shutdown` at the first SIGINT/SIGTERM; exits at the second.
fn watch_signals(shutdown: CancellationToken) {
    tokio::spawn(drover_agent::signals::stop_on_signals(shutdown));
}

/// Prints the first admin's password, once, outside the logs.
fn announce_admin(init: &AdminInit) {
    match init {
        AdminInit::CreatedWithGeneratedPassword(password) => {
            eprintln!();
            eprintln!("  Created user '{ADMIN_USER}' with password: {password}");
            eprintln!("  It is shown only this once. (Set DROVER_ADMIN_PASSWORD before the first start to choose it.)");
            eprintln!();
        }
        AdminInit::CreatedWithGivenPassword => {
            eprintln!(
                "  Created user '{ADMIN_USER}' with the password from DROVER_ADMIN_PASSWORD."
            );
        }
        AdminInit::Existing => {}
    }
}

/// Binds the server's address. Done before anything is created or
/// changed: a server that cannot listen leaves the data dir as it was.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}: the address is already in use (is another server running? \
             choose another address with --listen)"
        ),
        _ => anyhow::anyhow!("cannot listen on {addr}: {e}"),
    })
}

/// Creates the data dir and takes its lock, shared with the other servers
/// on it, for as long as the server runs: `drover admin reset-password`
/// refuses to change the store while any server holds it.
fn hold_data_dir(data_dir: &Path) -> anyhow::Result<Lock> {
    drover_server::private::dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join(DATA_DIR_LOCK);
    match Lock::try_take(&path, Mode::Shared) {
        Ok(lock) => Ok(lock),
        Err(LockError::Held { pid, .. }) => Err(anyhow::anyhow!(
            "the data dir {} is held by `drover admin`{}: start the server when it has finished",
            data_dir.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        )),
        Err(e) => Err(e.into()),
    }
}

/// The URL a local client uses to reach a listener.
fn local_url(addr: SocketAddr, tls: bool) -> String {
    let host = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => "127.0.0.1".to_owned(),
            SocketAddr::V6(_) => "[::1]".to_owned(),
        }
    } else {
        match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{host}:{}", addr.port())
}

/// Flags of `drover up`: the server's, and `--tls`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Serve HTTPS with a self-signed certificate kept in the data dir
    /// (made at the first start, reused after); prints its fingerprint.
    /// --tls-cert and --tls-key use a certificate of your own instead.
    #[arg(long)]
    pub tls: bool,
}

/// The names the self-signed certificate of `drover up --tls` is valid
/// for: loopback, this host's name and the address listened on.
fn self_signed_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let host = drover_agent::inventory::hostname();
    if !host.is_empty() && !names.contains(&host) {
        names.push(host);
    }
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
    }
    names
}

/// Waits for the server task to finish, at most the grace period.
async fn finish(
    task: tokio::task::JoinHandle<Result<(), drover_server::Error>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
        Ok(Ok(result)) => result.context("server"),
        Ok(Err(e)) => Err(anyhow::anyhow!("server task failed: {e}")),
        Err(_) => {
            tracing::warn!("in-flight requests did not finish in time; exiting");
            Ok(())
        }
    }
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args)?;
    init_logging(&config);
    config.refuse_listen()?;
    let listener = bind(config.listen).await?;
    let _data_dir = hold_data_dir(&config.data_dir)?;
    let server = Server::open(config).await?;
    announce_admin(&server.ensure_admin().await?);
    if let Some(fingerprint) = server.tls_fingerprint() {
        eprintln!("  Serving HTTPS; certificate fingerprint {fingerprint}");
    }
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    shutdown.cancelled().await;
    finish(task).await
}

pub async fn up(args: UpArgs, target: &Target) -> anyhow::Result<()> {
    let mut config = ServerConfig::load(&args.server)?;
    init_logging(&config);
    config.refuse_listen()?;
    let listener = bind(config.listen).await?;
    let data_dir = config.data_dir.clone();
    let _data_dir = hold_data_dir(&data_dir)?;
    if args.tls && config.tls.is_none() {
        let (cert, key) =
            drover_server::tls::self_signed(&data_dir, &self_signed_names(config.listen))?;
        config.tls = Some(drover_server::config::TlsFiles { cert, key });
    }
    let server = Server::open(config).await?;
    let admin = server.ensure_admin().await?;
    let fingerprint = server.tls_fingerprint().map(str::to_owned);
    let url = local_url(listener.local_addr()?, fingerprint.is_some());
    // The local agent and the CLI profile trust exactly this certificate.
    let pin = fingerprint
        .as_deref()
        .map(drover_agent::tls::Fingerprint::parse)
        .transpose()?
        .map(drover_agent::tls::Pin::Fingerprint);
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    let handle = server.clone();
    let server_task = tokio::spawn(server.serve(listener, shutdown.clone()));

    // The local agent keeps its identity in the data dir, so a second start
    // reuses it instead of enrolling another agent.
    let agent_dir = data_dir.join("agent");
    let dir = StateDir::open(&agent_dir)?;
    // Held until `up` stops: no other agent may use this identity.
    let _agent_dir = dir.lock()?;
    // Tasks run as another user (a sandbox profile's `user`) reach their
    // working dirs below the agent's state dir, so the data dir lets
    // others pass (0711) without listing it; its files stay 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("setting the mode of {}", data_dir.display()))?;
    }
    if pin.is_none() {
        // An earlier `up --tls` pinned its certificate; this start serves
        // plain HTTP on the same machine, to the same process.
        drover_agent::tls::forget(&dir)?;
    }
    let agent_id = match dir.credentials()? {
        Some(c) => c.agent_id,
        None => {
            let token = handle
                .create_token(
                    ADMIN_USER,
                    &CreateTokenRequest {
                        kind: TokenKind::Bootstrap,
                        ttl_secs: Some(300),
                        labels: [("local".to_owned(), "true".to_owned())].into(),
                        group: Some("local".to_owned()),
                        name: Some("drover up".to_owned()),
                        ..CreateTokenRequest::default()
                    },
                )
                .await?;
            let creds = drover_agent::enroll(
                &dir,
                &EnrollOptions {
                    server: url.clone(),
                    token: token.token,
                    force: false,
                    pin: pin.clone(),
                },
            )
            .await
            .context("enrolling the local agent")?;
            creds.agent_id
        }
    };
    let agent_config = AgentConfig {
        // The server may listen elsewhere than at the last start.
        server: Some(url.clone()),
        state_dir: agent_dir,
        log_format: drover_agent::config::LogFormat::Human,
        log_level: String::new(),
        max_backoff: Duration::from_secs(5),
        // The local agent of `drover up` is the operator's own machine.
        allow_actions: vec!["*".into()],
        capacity: drover_agent::config::DEFAULT_CAPACITY,
        metrics_listen: None,
        // Docker sandboxes when the machine's engine answers; the agent
        // reports whether it does.
        docker_host: drover_agent::config::DockerHost::Unix(
            drover_agent::config::DEFAULT_DOCKER_HOST
                .trim_start_matches("unix://")
                .into(),
        ),
        allow_sandboxes: drover_agent::config::SandboxKind::ALL.to_vec(),
        // Run as root, the local agent runs sandboxes as other users, and
        // clones as root: remote repositories only, as any agent whose
        // agent.yaml lists no roots. Run as the operator, it cannot switch
        // users, so every task runs as the operator, who may read any
        // repository this agent can: local paths too.
        workspace_local_roots: if drover_agent::config::running_as_root() {
            Vec::new()
        } else {
            vec!["/".into()]
        },
        pin,
    };
    let agent_shutdown = shutdown.clone();
    let agent_task =
        tokio::spawn(async move { drover_agent::run(&agent_config, agent_shutdown).await });

    let profile_path = write_profile(&handle, target, &url, fingerprint.as_deref()).await?;
    eprintln!();
    eprintln!("  Drover is running at {url}");
    if let Some(fingerprint) = &fingerprint {
        eprintln!("  TLS certificate fingerprint: {fingerprint}");
        eprintln!(
            "  Agents elsewhere pin it: drover-agent enroll --server URL --ca-fingerprint {fingerprint} --token TOKEN"
        );
    }
    match &admin {
        AdminInit::CreatedWithGeneratedPassword(_) | AdminInit::CreatedWithGivenPassword => {
            announce_admin(&admin)
        }
        AdminInit::Existing => {
            eprintln!(
                "  Log in as '{ADMIN_USER}' with the password shown at the first start (data in {}).",
                data_dir.display()
            );
            eprintln!(
                "  Lost it? Stop Drover and run: drover admin reset-password --data-dir {}",
                data_dir.display()
            );
        }
    }
    eprintln!("  Local agent: {agent_id}");
    eprintln!(
        "  CLI profile '{}' saved in {}: try `drover agents list` in another terminal.",
        target.profile,
        profile_path.display()
    );
    eprintln!("  Press Ctrl-C to stop.");
    eprintln!();

    shutdown.cancelled().await;
    match tokio::time::timeout(SHUTDOWN_GRACE, agent_task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "local agent stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "local agent task failed"),
        _ => {}
    }
    finish(server_task).await
}

/// Saves a CLI profile for this server with an API token of the admin
/// (unless the profile already holds a token this server accepts) and the
/// fingerprint of its certificate when it serves HTTPS.
async fn write_profile(
    server: &Server,
    target: &Target,
    url: &str,
    fingerprint: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let path = profile::path();
    let mut file = ProfileFile::load(&path)?;
    if let Some(p) = file.profiles.get(&target.profile) {
        if p.server.trim_end_matches('/') == url
            && p.ca_fingerprint.as_deref() == fingerprint
            && p.ca_file.is_none()
        {
            if let Some(token) = &p.token {
                let hash = drover_server::auth::hash_token(token);
                let usable =
                    server
                        .store()
                        .user_token_by_hash(&hash)
                        .await?
                        .is_some_and(|(t, _)| {
                            t.revoked_at.is_none()
                                && t.expires_at.is_none_or(|e| e > chrono::Utc::now())
                        });
                if usable {
                    return Ok(path);
                }
            }
        }
    }
    let token = server
        .create_token(
            ADMIN_USER,
            &CreateTokenRequest {
                kind: TokenKind::Api,
                name: Some("drover up CLI profile".to_owned()),
                ..CreateTokenRequest::default()
            },
        )
        .await?;
    file.profiles.insert(
        target.profile.clone(),
        Profile {
            server: url.to_owned(),
            token: Some(token.token),
            ca_file: None,
            ca_fingerprint: fingerprint.map(str::to_owned),
        },
    );
    file.save(&path)?;
    Ok(path)
}
