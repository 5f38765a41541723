//! Agent configuration: `agent.yaml`, `DROVER_*` variables and flags.
//! A flag beats its variable, which beats the file, which beats the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default place of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/drover/agent.yaml";

/// Attempts run at once unless configured otherwise.
pub const DEFAULT_CAPACITY: u32 = 4;

/// Largest accepted `capacity`: each attempt holds processes, pipes and a
/// log buffer, so a typo such as 10000 should not be taken at its word.
const MAX_CAPACITY: u32 = 256;

/// Options shared by `drover-agent run`, `enroll` and `status`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// Configuration file (YAML) [default: /etc/drover/agent.yaml when present].
    #[arg(long, env = "DROVER_AGENT_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Directory for credentials and local state
    /// [default: /var/lib/drover-agent as root, else ~/.local/state/drover-agent].
    #[arg(
        long,
        env = "DROVER_AGENT_STATE_DIR",
        value_name = "DIR",
        global = true
    )]
    pub state_dir: Option<PathBuf>,
    /// Server URL, e.g. http://127.0.0.1:7070 (from enrollment when omitted).
    #[arg(long, env = "DROVER_AGENT_SERVER", value_name = "URL", global = true)]
    pub server: Option<String>,
    /// Log format: human or json.
    #[arg(
        long,
        env = "DROVER_AGENT_LOG_FORMAT",
        value_name = "FORMAT",
        global = true
    )]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or drover_agent=debug.
    #[arg(
        long,
        env = "DROVER_AGENT_LOG_LEVEL",
        value_name = "FILTER",
        global = true
    )]
    pub log_level: Option<String>,
    /// Longest wait between retries while the server is unreachable [default: 60s].
    #[arg(long, env = "DROVER_AGENT_MAX_BACKOFF", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    pub max_backoff: Option<Duration>,
    /// An action this agent may run: a name or a glob with '*', e.g. deploy-*;
    /// repeatable. Replaces allow_actions of agent.yaml [default: none].
    #[arg(
        long = "allow-action",
        env = "DROVER_AGENT_ALLOW_ACTIONS",
        value_delimiter = ',',
        value_name = "PATTERN",
        global = true
    )]
    pub allow_actions: Option<Vec<String>>,
    /// Most attempts run at once [default: 4].
    #[arg(long, env = "DROVER_AGENT_CAPACITY", value_name = "N", global = true)]
    pub capacity: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (loopback only) [default: off].
    #[arg(
        long,
        env = "DROVER_AGENT_METRICS_LISTEN",
        value_name = "ADDR",
        global = true
    )]
    pub metrics_listen: Option<SocketAddr>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The same options as an `agent.yaml` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    state_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    #[serde(default, with = "humantime_serde")]
    max_backoff: Option<Duration>,
    allow_actions: Option<Vec<String>>,
    capacity: Option<u32>,
    metrics_listen: Option<SocketAddr>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Overrides the server URL recorded at enrollment.
    pub server: Option<String>,
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_backoff: Duration,
    /// Names or globs ('*' matches any run of characters) of the actions
    /// this agent runs. Empty (the default) refuses every action: running
    /// work on a machine is opted into on that machine, not by the server.
    pub allow_actions: Vec<String>,
    /// Most attempts run at once.
    pub capacity: u32,
    /// Where to serve Prometheus metrics; `None` (the default) serves none.
    pub metrics_listen: Option<SocketAddr>,
}

/// A configuration that cannot be used, naming the file, line or option.
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

/// The default state dir: system-wide for root, per-user otherwise.
pub fn default_state_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/drover-agent");
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs_home().map(|h| h.join(".local/state")))
        .map(|d| d.join("drover-agent"))
        .unwrap_or_else(|| PathBuf::from("drover-agent-state"))
}

/// True when the effective user is root (`/proc/self` belongs to it).
fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

fn dirs_home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
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
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl AgentConfig {
    pub fn load(args: &AgentArgs) -> Result<AgentConfig, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p, true)?,
            None => read_file(Path::new(DEFAULT_CONFIG), false)?,
        };
        let config = AgentConfig {
            server: args.server.clone().or(file.server),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(default_state_dir),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level: args
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            max_backoff: args
                .max_backoff
                .or(file.max_backoff)
                .unwrap_or(Duration::from_secs(60)),
            allow_actions: args
                .allow_actions
                .clone()
                .or(file.allow_actions)
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            capacity: args.capacity.or(file.capacity).unwrap_or(DEFAULT_CAPACITY),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
        };
        if config.max_backoff < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "max_backoff must be at least 1s".to_owned(),
            ));
        }
        if config.capacity == 0 || config.capacity > MAX_CAPACITY {
            return Err(ConfigError::Invalid(format!(
                "capacity must be between 1 and {MAX_CAPACITY}, not {}",
                config.capacity
            )));
        }
        if let Some(addr) = config.metrics_listen {
            // The endpoint has no authentication: keep it on the machine.
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "metrics_listen {addr} is not a loopback address (use 127.0.0.1 or [::1])"
                )));
            }
        }
        if let Some(server) = &config.server {
            check_server_url(server)?;
        }
        Ok(config)
    }
}

/// The PATH given to job processes: the agent's own, or a safe default.
pub fn process_path() -> String {
    std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| crate::executor::DEFAULT_PATH.to_owned())
}

/// Refuses anything but an http(s) URL with a host.
pub fn check_server_url(url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ConfigError::Invalid(format!(
            "server '{url}' is not an http:// or https:// URL"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        AgentConfig::load(&AgentArgs {
            config: Some(path),
            state_dir: None,
            ..AgentArgs::default()
        })
    }

    #[test]
    fn reads_the_file() {
        let c = load_text("server: http://10.0.0.1:7070\nmax_backoff: 5s\nstate_dir: /tmp/s\n")
            .unwrap();
        assert_eq!(c.server.as_deref(), Some("http://10.0.0.1:7070"));
        assert_eq!(c.max_backoff, Duration::from_secs(5));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = load_text("server: http://h:1\npol_interval: 5s\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.yaml"), "{err}");
        assert!(err.contains("pol_interval"), "{err}");
        assert!(err.contains('2'), "line number missing: {err}");
    }

    #[test]
    fn job_options_default_and_parse() {
        let c = load_text("server: http://h:1\n").unwrap();
        assert!(c.allow_actions.is_empty(), "refuse everything by default");
        assert_eq!(c.capacity, DEFAULT_CAPACITY);
        assert_eq!(c.metrics_listen, None);
        let c = load_text(
            "allow_actions: [\"deploy-*\", uptime]\ncapacity: 2\nmetrics_listen: 127.0.0.1:9101\n",
        )
        .unwrap();
        assert_eq!(c.allow_actions, vec!["deploy-*", "uptime"]);
        assert_eq!(c.capacity, 2);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "allow_actions: [a]\ncapacity: 2\n").unwrap();
        let c = AgentConfig::load(&AgentArgs {
            config: Some(path),
            allow_actions: Some(vec!["b".into(), " c ".into(), "".into()]),
            capacity: Some(7),
            ..AgentArgs::default()
        })
        .unwrap();
        assert_eq!(c.allow_actions, vec!["b", "c"]);
        assert_eq!(c.capacity, 7);
    }

    #[test]
    fn bad_job_options_are_named() {
        let cases = [
            ("capacity: 0\n", "capacity"),
            ("capacity: 100000\n", "capacity"),
            ("capacity: -1\n", "agent.yaml"),
            ("metrics_listen: 0.0.0.0:9101\n", "loopback"),
            ("metrics_listen: nowhere\n", "agent.yaml"),
            ("allow_actions: deploy\n", "agent.yaml"),
        ];
        for (text, want) in cases {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let err = load_text("max_backoff: soon\n").unwrap_err().to_string();
        assert!(err.contains("agent.yaml"), "{err}");
        let err = load_text("server: ftp://h\n").unwrap_err().to_string();
        assert!(err.contains("ftp://h"), "{err}");
        let err = load_text("server: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("agent.yaml"), "{err}");
    }
}
