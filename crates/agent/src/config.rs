//! Agent configuration: `agent.yaml`, `DROVER_*` variables and flags.
//! A flag beats its variable, which beats the file, which beats the default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default place of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/drover/agent.yaml";

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
        };
        if config.max_backoff < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "max_backoff must be at least 1s".to_owned(),
            ));
        }
        if let Some(server) = &config.server {
            check_server_url(server)?;
        }
        Ok(config)
    }
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
    fn bad_values_are_named() {
        let err = load_text("max_backoff: soon\n").unwrap_err().to_string();
        assert!(err.contains("agent.yaml"), "{err}");
        let err = load_text("server: ftp://h\n").unwrap_err().to_string();
        assert!(err.contains("ftp://h"), "{err}");
        let err = load_text("server: [unclosed\n").unwrap_err().to_string();
        assert!(err.contains("agent.yaml"), "{err}");
    }
}
