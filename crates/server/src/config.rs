//! Server configuration: `drover.toml`, `DROVER_*` variables and flags.
//! A flag beats its variable, which beats the file, which beats the default.
//! This is the only module that reads the environment (through clap).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The default address of `drover server` and `drover up` (and of the CLI).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Flags (each also a `DROVER_*` variable) of `drover server` and `drover up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// Configuration file (TOML). Missing is fine unless given explicitly.
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "DROVER_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the SQLite database, the signing key and local state
    /// [default: the platform data dir, e.g. ~/.local/share/drover].
    #[arg(long, env = "DROVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL, sqlite://FILE or postgres://... [default: SQLite in the data dir].
    #[arg(
        long,
        env = "DROVER_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Log format: human or json.
    #[arg(long, env = "DROVER_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or drover_server=debug.
    #[arg(long, env = "DROVER_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How often agents heartbeat [default: 10s].
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,
    /// Silence after which an agent is stale [default: 3 heartbeat intervals].
    #[arg(long, env = "DROVER_STALE_AFTER", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub stale_after: Option<Duration>,
    /// Silence after which an agent is offline [default: 9 heartbeat intervals].
    #[arg(long, env = "DROVER_OFFLINE_AFTER", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub offline_after: Option<Duration>,
    /// Lifetime of an agent's access JWT [default: 15m].
    #[arg(long, env = "DROVER_AGENT_ACCESS_TTL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub agent_access_ttl: Option<Duration>,
    /// Lifetime of an agent's refresh token; renewed at each rotation [default: 30d].
    #[arg(long, env = "DROVER_AGENT_REFRESH_TTL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub agent_refresh_ttl: Option<Duration>,
    /// How long after a rotation an agent may present its previous refresh
    /// token again, when the answer was lost and the successor never used,
    /// and get the same successor; 0s turns it off [default: 5m].
    #[arg(long, env = "DROVER_AGENT_REFRESH_GRACE", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub agent_refresh_grace: Option<Duration>,
    /// Longest the schedules engine sleeps between looks at the schedules
    /// (it wakes sooner for a due slot); a slot later than this plus 2s
    /// counts as missed [default: 2s].
    #[arg(long, env = "DROVER_SCHEDULE_TICK", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub schedule_tick: Option<Duration>,
    /// Lifetime of a `drover login` session [default: 12h].
    #[arg(long, env = "DROVER_SESSION_TTL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub session_ttl: Option<Duration>,
    /// How long an approval request stays open before it expires and its
    /// job or run is cancelled [default: 24h].
    #[arg(long, env = "DROVER_APPROVAL_TTL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub approval_ttl: Option<Duration>,
    /// Largest request body accepted, in bytes [default: 1048576].
    #[arg(long, env = "DROVER_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// File holding the JWT signing key; created (mode 0600) when missing
    /// [default: DATA_DIR/signing.key]. Replicas must share it.
    #[arg(long, env = "DROVER_SIGNING_KEY_FILE", value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// File of the vault's master keys, one per line (64 hex characters):
    /// the current key first, then previous ones while rotating; created
    /// (mode 0600) with a new key when missing [default: DATA_DIR/master.key].
    /// `DROVER_MASTER_KEY` (keys separated by commas) takes its place.
    #[arg(long, env = "DROVER_MASTER_KEY_FILE", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Lease of a dispatched attempt; the agent renews it every third of it,
    /// and an attempt whose lease runs out is lost [default: 30s].
    #[arg(long, env = "DROVER_ATTEMPT_LEASE", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub attempt_lease: Option<Duration>,
    /// Output kept per attempt and stream, in bytes [default: 1048576].
    #[arg(long, env = "DROVER_LOG_CAP_BYTES", value_name = "BYTES")]
    pub log_cap_bytes: Option<u64>,
    /// Long-polls held at once; beyond it agents get 503 and Retry-After [default: 20000].
    #[arg(long, env = "DROVER_MAX_LONG_POLLS", value_name = "N")]
    pub max_long_polls: Option<usize>,
    /// Most workflow runs not yet ended; a submission past it is refused
    /// (503) until some end [default: 5000].
    #[arg(long, env = "DROVER_MAX_ACTIVE_RUNS", value_name = "N")]
    pub max_active_runs: Option<u64>,
    /// Timeout of a run whose definition sets none [default: 24h].
    #[arg(long, env = "DROVER_DEFAULT_RUN_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub default_run_timeout: Option<Duration>,
    /// Where artifacts are kept: a directory, file:///DIR, or s3://BUCKET[/PREFIX]
    /// (S3 settings from the AWS_* variables, e.g. AWS_ENDPOINT for an
    /// S3-compatible server) [default: DATA_DIR/artifacts].
    #[arg(long, env = "DROVER_ARTIFACT_STORE", value_name = "URL")]
    pub artifact_store: Option<String>,
    /// Largest artifact file accepted, in bytes [default: 1073741824].
    #[arg(long, env = "DROVER_MAX_ARTIFACT_BYTES", value_name = "BYTES")]
    pub max_artifact_bytes: Option<u64>,
    /// Attempts per webhook delivery before giving up [default: 8].
    #[arg(long, env = "DROVER_WEBHOOK_MAX_ATTEMPTS", value_name = "N")]
    pub webhook_max_attempts: Option<u32>,
    /// Wait before the first webhook retry; doubles each time [default: 1s].
    #[arg(long, env = "DROVER_WEBHOOK_BACKOFF", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub webhook_backoff: Option<Duration>,
    /// Longest wait between webhook retries [default: 5m].
    #[arg(long, env = "DROVER_WEBHOOK_MAX_BACKOFF", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub webhook_max_backoff: Option<Duration>,
    /// Timeout of one webhook POST [default: 10s].
    #[arg(long, env = "DROVER_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub webhook_timeout: Option<Duration>,
    /// Password checks run at once; up to four times as many wait, and
    /// beyond that a login gets 503 at once [default: the CPU cores].
    #[arg(long, env = "DROVER_LOGIN_CONCURRENCY", value_name = "N")]
    pub login_concurrency: Option<usize>,
    /// Failed logins of one account within the lockout period that lock
    /// it out for that period [default: 10].
    #[arg(long, env = "DROVER_LOGIN_MAX_FAILURES", value_name = "N")]
    pub login_max_failures: Option<u32>,
    /// Failed logins from one client address (IPv6: its /64) within the
    /// lockout period that lock it out for that period [default: 50].
    #[arg(long, env = "DROVER_LOGIN_MAX_FAILURES_PER_ADDRESS", value_name = "N")]
    pub login_max_failures_per_address: Option<u32>,
    /// How long failed logins are counted and a lockout lasts [default: 15m].
    #[arg(long, env = "DROVER_LOGIN_LOCKOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub login_lockout: Option<Duration>,
    /// HTTP connections served at once, lowered to fit the open-file limit;
    /// a few more are kept for health checks [default: 30000].
    #[arg(long, env = "DROVER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers once it started
    /// [default: 30s].
    #[arg(long, env = "DROVER_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Option<Duration>,
    /// A connection with no request in progress is closed after this
    /// [default: 120s].
    #[arg(long, env = "DROVER_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,
    /// Longest wait for the next part of a request body [default: 60s].
    #[arg(long, env = "DROVER_BODY_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub body_timeout: Option<Duration>,
    /// An internal address or network webhooks may reach, e.g. 10.0.0.0/8;
    /// repeatable [default: none: public addresses only].
    #[arg(
        long = "webhook-allow",
        env = "DROVER_WEBHOOK_ALLOW",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub webhook_allow: Option<Vec<String>>,
    /// Serve HTTPS with this certificate chain (PEM, the server's first);
    /// needs --tls-key.
    #[arg(long, env = "DROVER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DROVER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address other than loopback (behind a proxy
    /// that terminates TLS); refused without it.
    #[arg(long, env = "DROVER_ALLOW_PLAIN_HTTP", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_plain_http: Option<bool>,
    /// Requests per second one user may make, sustained, over all its
    /// tokens; beyond it and its burst a request gets 429 with Retry-After;
    /// 0 turns the limit off [default: 2000]. Agents are not limited.
    #[arg(long, env = "DROVER_USER_RATE_LIMIT", value_name = "N")]
    pub user_rate_limit: Option<u32>,
    /// Requests one user may make at once above its rate [default: 4000].
    #[arg(long, env = "DROVER_USER_RATE_BURST", value_name = "N")]
    pub user_rate_burst: Option<u32>,
    /// Requests per second one API or session token may make, sustained;
    /// 0 turns the limit off [default: 1000].
    #[arg(long, env = "DROVER_TOKEN_RATE_LIMIT", value_name = "N")]
    pub token_rate_limit: Option<u32>,
    /// Requests one token may make at once above its rate [default: 2000].
    #[arg(long, env = "DROVER_TOKEN_RATE_BURST", value_name = "N")]
    pub token_rate_burst: Option<u32>,
    /// Password of the admin user created at the first start; generated and
    /// printed once when unset. Only read from the environment.
    #[arg(skip)]
    pub admin_password: Option<String>,
    /// The vault's master keys (see `master_key_file`). Only read from the
    /// environment, never a flag (argv is readable by other users).
    #[arg(skip)]
    pub master_key: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The same options as a `drover.toml` file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stale_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    offline_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    agent_access_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    agent_refresh_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    agent_refresh_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    schedule_tick: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    session_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    approval_ttl: Option<Duration>,
    max_body_bytes: Option<usize>,
    signing_key_file: Option<PathBuf>,
    master_key_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    attempt_lease: Option<Duration>,
    log_cap_bytes: Option<u64>,
    max_long_polls: Option<usize>,
    max_active_runs: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    default_run_timeout: Option<Duration>,
    artifact_store: Option<String>,
    max_artifact_bytes: Option<u64>,
    webhook_max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    webhook_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    webhook_max_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    webhook_timeout: Option<Duration>,
    login_concurrency: Option<usize>,
    login_max_failures: Option<u32>,
    login_max_failures_per_address: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    login_lockout: Option<Duration>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_timeout: Option<Duration>,
    webhook_allow: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    allow_plain_http: Option<bool>,
    user_rate_limit: Option<u32>,
    user_rate_burst: Option<u32>,
    token_rate_limit: Option<u32>,
    token_rate_burst: Option<u32>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub heartbeat_interval: Duration,
    pub stale_after: Duration,
    pub offline_after: Duration,
    pub agent_access_ttl: Duration,
    pub agent_refresh_ttl: Duration,
    /// See `ServerArgs::agent_refresh_grace`.
    pub agent_refresh_grace: Duration,
    /// See `ServerArgs::schedule_tick`.
    pub schedule_tick: Duration,
    pub session_ttl: Duration,
    /// See `ServerArgs::approval_ttl`.
    pub approval_ttl: Duration,
    pub max_body_bytes: usize,
    pub signing_key_file: PathBuf,
    /// Where the vault's master keys come from.
    pub master_key: crate::vault::MasterKeySource,
    pub attempt_lease: Duration,
    pub log_cap_bytes: u64,
    pub max_long_polls: usize,
    pub max_active_runs: u64,
    pub default_run_timeout: Duration,
    /// A directory, file:///DIR or s3://BUCKET[/PREFIX].
    pub artifact_store: String,
    pub max_artifact_bytes: u64,
    pub webhook_max_attempts: u32,
    pub webhook_backoff: Duration,
    pub webhook_max_backoff: Duration,
    pub webhook_timeout: Duration,
    /// See `ServerArgs::login_concurrency` and the following options.
    pub login: crate::throttle::LoginLimits,
    /// See `ServerArgs::max_connections` and the timeouts after it.
    pub connections: crate::connections::ConnectionLimits,
    /// Internal networks webhooks may reach (public ones always).
    pub webhook_allow: Vec<ipnet::IpNet>,
    /// Certificate and key of HTTPS; `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
    /// See `ServerArgs::allow_plain_http`.
    pub allow_plain_http: bool,
    /// See `ServerArgs::user_rate_limit` and the three after it.
    pub rate_limits: crate::ratelimit::RateLimits,
    pub admin_password: Option<String>,
}

/// The certificate chain and key files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A configuration that cannot be used, with the file, line or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The platform's data directory for Drover (e.g. ~/.local/share/drover).
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("drover"))
        .unwrap_or_else(|| PathBuf::from("drover-data"))
}

fn read_file(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(FileConfig::default())
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: describe_toml_error(&text, &e),
    })
}

/// Renders a TOML error as "line N, column M: what", which names the line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end_matches('\n').to_owned();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
            let col = before.len() - line_start + 1;
            // Name the key of the offending line when the message does not.
            let line_text = text[line_start..].lines().next().unwrap_or("");
            match line_text.split_once('=') {
                Some((key, _)) if !what.contains(key.trim()) => {
                    format!("line {line}, column {col}: {}: {what}", key.trim())
                }
                _ => format!("line {line}, column {col}: {what}"),
            }
        }
        None => what,
    }
}

impl ServerConfig {
    /// Resolves flags and variables over the file over the defaults.
    pub fn load(args: &ServerArgs) -> Result<ServerConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path, true)?,
            None => read_file(Path::new("drover.toml"), false)?,
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let database_url = args
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("drover.db").display()));
        let heartbeat_interval = args
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(Duration::from_secs(10));
        let stale_after = args
            .stale_after
            .or(file.stale_after)
            .unwrap_or(heartbeat_interval * 3);
        let offline_after = args
            .offline_after
            .or(file.offline_after)
            .unwrap_or(heartbeat_interval * 9);
        let listen = match args.listen.or(file.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("default listen address: {e}")))?,
        };
        let artifact_store = args
            .artifact_store
            .clone()
            .or(file.artifact_store)
            .unwrap_or_else(|| data_dir.join("artifacts").display().to_string());
        let config = ServerConfig {
            listen,
            signing_key_file: args
                .signing_key_file
                .clone()
                .or(file.signing_key_file)
                .unwrap_or_else(|| data_dir.join("signing.key")),
            master_key: match args.master_key.clone().or_else(|| {
                std::env::var("DROVER_MASTER_KEY")
                    .ok()
                    .filter(|k| !k.trim().is_empty())
            }) {
                Some(keys) => crate::vault::MasterKeySource::Variable(keys),
                None => crate::vault::MasterKeySource::File(
                    args.master_key_file
                        .clone()
                        .or(file.master_key_file)
                        .unwrap_or_else(|| data_dir.join("master.key")),
                ),
            },
            data_dir,
            database_url,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level: args
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            heartbeat_interval,
            stale_after,
            offline_after,
            agent_access_ttl: args
                .agent_access_ttl
                .or(file.agent_access_ttl)
                .unwrap_or(Duration::from_secs(15 * 60)),
            agent_refresh_ttl: args
                .agent_refresh_ttl
                .or(file.agent_refresh_ttl)
                .unwrap_or(Duration::from_secs(30 * 24 * 3600)),
            agent_refresh_grace: args
                .agent_refresh_grace
                .or(file.agent_refresh_grace)
                .unwrap_or(Duration::from_secs(5 * 60)),
            schedule_tick: args
                .schedule_tick
                .or(file.schedule_tick)
                .unwrap_or(Duration::from_secs(2)),
            session_ttl: args
                .session_ttl
                .or(file.session_ttl)
                .unwrap_or(Duration::from_secs(12 * 3600)),
            approval_ttl: args
                .approval_ttl
                .or(file.approval_ttl)
                .unwrap_or(Duration::from_secs(24 * 3600)),
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(1024 * 1024),
            attempt_lease: args
                .attempt_lease
                .or(file.attempt_lease)
                .unwrap_or(drover_proto::limits::DEFAULT_LEASE),
            log_cap_bytes: args
                .log_cap_bytes
                .or(file.log_cap_bytes)
                .unwrap_or(1024 * 1024),
            max_active_runs: args
                .max_active_runs
                .or(file.max_active_runs)
                .unwrap_or(5000),
            default_run_timeout: args
                .default_run_timeout
                .or(file.default_run_timeout)
                .unwrap_or(Duration::from_secs(24 * 3600)),
            max_long_polls: args
                .max_long_polls
                .or(file.max_long_polls)
                .unwrap_or(20_000),
            artifact_store,
            max_artifact_bytes: args
                .max_artifact_bytes
                .or(file.max_artifact_bytes)
                .unwrap_or(1024 * 1024 * 1024),
            webhook_max_attempts: args
                .webhook_max_attempts
                .or(file.webhook_max_attempts)
                .unwrap_or(8),
            webhook_backoff: args
                .webhook_backoff
                .or(file.webhook_backoff)
                .unwrap_or(Duration::from_secs(1)),
            webhook_max_backoff: args
                .webhook_max_backoff
                .or(file.webhook_max_backoff)
                .unwrap_or(Duration::from_secs(300)),
            webhook_timeout: args
                .webhook_timeout
                .or(file.webhook_timeout)
                .unwrap_or(Duration::from_secs(10)),
            login: crate::throttle::LoginLimits {
                concurrency: args
                    .login_concurrency
                    .or(file.login_concurrency)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                max_failures: args
                    .login_max_failures
                    .or(file.login_max_failures)
                    .unwrap_or(10),
                max_failures_per_address: args
                    .login_max_failures_per_address
                    .or(file.login_max_failures_per_address)
                    .unwrap_or(50),
                lockout: args
                    .login_lockout
                    .or(file.login_lockout)
                    .unwrap_or(Duration::from_secs(15 * 60)),
            },
            connections: crate::connections::ConnectionLimits {
                max_connections: args
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(30_000),
                header_read_timeout: args
                    .header_read_timeout
                    .or(file.header_read_timeout)
                    .unwrap_or(Duration::from_secs(30)),
                idle_timeout: args
                    .idle_timeout
                    .or(file.idle_timeout)
                    .unwrap_or(Duration::from_secs(120)),
                body_timeout: args
                    .body_timeout
                    .or(file.body_timeout)
                    .unwrap_or(Duration::from_secs(60)),
            },
            webhook_allow: crate::egress::EgressPolicy::parse_allow(
                &args
                    .webhook_allow
                    .clone()
                    .or(file.webhook_allow.clone())
                    .unwrap_or_default(),
            )
            .map_err(ConfigError::Invalid)?,
            tls: match (
                args.tls_cert.clone().or(file.tls_cert),
                args.tls_key.clone().or(file.tls_key),
            ) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "tls_cert and tls_key go together: give both or neither".to_owned(),
                    ))
                }
            },
            allow_plain_http: args
                .allow_plain_http
                .or(file.allow_plain_http)
                .unwrap_or(false),
            rate_limits: crate::ratelimit::RateLimits {
                per_user: crate::ratelimit::RateLimits::rate(
                    args.user_rate_limit
                        .or(file.user_rate_limit)
                        .unwrap_or(2000),
                    args.user_rate_burst
                        .or(file.user_rate_burst)
                        .unwrap_or(4000),
                ),
                per_token: crate::ratelimit::RateLimits::rate(
                    args.token_rate_limit
                        .or(file.token_rate_limit)
                        .unwrap_or(1000),
                    args.token_rate_burst
                        .or(file.token_rate_burst)
                        .unwrap_or(2000),
                ),
            },
            admin_password: args.admin_password.clone().or_else(|| {
                std::env::var("DROVER_ADMIN_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty())
            }),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.webhook_max_attempts == 0 || self.webhook_max_attempts > 100 {
            return bad("webhook_max_attempts must be between 1 and 100");
        }
        if self.webhook_backoff.is_zero() || self.webhook_timeout.is_zero() {
            return bad("webhook_backoff and webhook_timeout must be longer than 0s");
        }
        if self.heartbeat_interval < Duration::from_secs(1) {
            return bad("heartbeat_interval must be at least 1s");
        }
        if self.stale_after < self.heartbeat_interval {
            return bad("stale_after must be at least heartbeat_interval");
        }
        if self.offline_after < self.stale_after {
            return bad("offline_after must be at least stale_after");
        }
        if self.agent_access_ttl < Duration::from_secs(1) {
            return bad("agent_access_ttl must be at least 1s");
        }
        if self.agent_refresh_ttl < self.agent_access_ttl {
            return bad("agent_refresh_ttl must be at least agent_access_ttl");
        }
        if self.schedule_tick < Duration::from_millis(50)
            || self.schedule_tick > Duration::from_secs(60)
        {
            return bad("schedule_tick must be between 50ms and 60s");
        }
        if self.agent_refresh_grace > Duration::from_secs(3600) {
            return bad("agent_refresh_grace must be at most 1h");
        }
        if self.attempt_lease < drover_proto::limits::MIN_LEASE {
            return bad("attempt_lease must be at least 1s");
        }
        if self.log_cap_bytes < 1024 {
            return bad("log_cap_bytes must be at least 1024");
        }
        if self.max_active_runs == 0 {
            return bad("max_active_runs must be at least 1");
        }
        if self.default_run_timeout.is_zero() {
            return bad("default_run_timeout must be longer than 0s");
        }
        if self.max_long_polls == 0 {
            return bad("max_long_polls must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes must be at least 1024");
        }
        if self.login.concurrency == 0 || self.login.concurrency > 1024 {
            return bad("login_concurrency must be between 1 and 1024");
        }
        if self.login.max_failures == 0 || self.login.max_failures_per_address == 0 {
            return bad("login_max_failures and login_max_failures_per_address must be at least 1");
        }
        if self.login.lockout < Duration::from_secs(1) {
            return bad("login_lockout must be at least 1s");
        }
        let c = &self.connections;
        if c.max_connections == 0 {
            return bad("max_connections must be at least 1");
        }
        if [c.header_read_timeout, c.idle_timeout, c.body_timeout]
            .iter()
            .any(|t| *t < Duration::from_millis(100))
        {
            return bad(
                "header_read_timeout, idle_timeout and body_timeout must be at least 100ms",
            );
        }
        Ok(())
    }

    /// Plain HTTP is served on loopback only: elsewhere tokens and
    /// passwords would cross the network in clear. `allow_plain_http`
    /// opens it (a proxy in front terminates TLS), with a warning.
    pub fn check_listen(&self) -> Result<(), ConfigError> {
        self.refuse_listen()?;
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %self.listen,
                "serving plain HTTP on a network address: tokens and passwords cross the \
                 network in clear unless a proxy in front terminates TLS"
            );
        }
        Ok(())
    }

    /// `check_listen` without its warning: whether the address may be
    /// listened on at all, asked before it is bound.
    pub fn refuse_listen(&self) -> Result<(), ConfigError> {
        if self.tls.is_some() || self.listen.ip().is_loopback() || self.allow_plain_http {
            return Ok(());
        }
        Err(ConfigError::Invalid(format!(
            "listen {} is not a loopback address and no TLS is configured: give tls_cert and \
             tls_key (--tls-cert, --tls-key), or set allow_plain_http (--allow-plain-http) \
             when a proxy in front terminates TLS",
            self.listen
        )))
    }

    /// The thresholds that turn "last seen" into a health status.
    pub fn health(&self) -> drover_proto::api::HealthThresholds {
        drover_proto::api::HealthThresholds {
            stale_after_ms: self.stale_after.as_millis() as u64,
            offline_after_ms: self.offline_after.as_millis() as u64,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load_text(text: &str, args: ServerArgs) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&ServerArgs {
            config: Some(path),
            ..args
        })
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let c = load_text(
            "listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"5s\"\ndata_dir = \"/srv/d\"\n",
            ServerArgs {
                listen: Some("127.0.0.1:9100".parse().unwrap()),
                ..ServerArgs::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.stale_after, Duration::from_secs(15));
        assert_eq!(c.database_url, "sqlite:///srv/d/drover.db");
        assert_eq!(c.signing_key_file, PathBuf::from("/srv/d/signing.key"));
    }

    #[test]
    fn unknown_field_names_the_field_and_line() {
        let err = load_text(
            "listen = \"127.0.0.1:9000\"\nlisen = 3\n",
            ServerArgs::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("drover.toml: line 2, column 1"), "{err}");
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let err = load_text("heartbeat_interval = \"often\"\n", ServerArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = load_text(
            "heartbeat_interval = \"1s\"\nstale_after = \"500ms\"\n",
            ServerArgs::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stale_after must be at least heartbeat_interval"),
            "{err}"
        );
    }

    #[test]
    fn plain_http_stays_on_loopback_unless_allowed() {
        let on = |listen: &str, extra: &str| {
            load_text(
                &format!("listen = \"{listen}\"\n{extra}"),
                ServerArgs::default(),
            )
            .and_then(|c| c.check_listen())
        };
        assert!(on("127.0.0.1:7070", "").is_ok());
        assert!(on("[::1]:7070", "").is_ok());
        let err = on("0.0.0.0:7070", "").unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:7070 is not a loopback address") && err.contains("tls_cert"),
            "{err}"
        );
        assert!(on("0.0.0.0:7070", "allow_plain_http = true\n").is_ok());
        assert!(on("0.0.0.0:7070", "tls_cert = \"c\"\ntls_key = \"k\"\n").is_ok());
        let err = on("127.0.0.1:7070", "tls_cert = \"c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_cert and tls_key go together"), "{err}");
    }

    #[test]
    fn rate_limits_come_from_the_file_and_flags() {
        use crate::ratelimit::RateLimits;
        let c = load_text("", ServerArgs::default()).unwrap();
        assert_eq!(c.rate_limits.per_user, RateLimits::rate(2000, 4000));
        assert_eq!(c.rate_limits.per_token, RateLimits::rate(1000, 2000));
        let c = load_text(
            "token_rate_limit = 5\ntoken_rate_burst = 10\nuser_rate_limit = 0\n",
            ServerArgs {
                token_rate_burst: Some(7),
                ..ServerArgs::default()
            },
        )
        .unwrap();
        assert_eq!(c.rate_limits.per_token, RateLimits::rate(5, 7));
        assert_eq!(c.rate_limits.per_user, None);
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let err = ServerConfig::load(&ServerArgs {
            config: Some("/nonexistent/drover.toml".into()),
            ..ServerArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/drover.toml"));
    }
}
