//! Agent configuration: `agent.yaml`, `DROVER_*` variables and flags.
//! A flag beats its variable, which beats the file, which beats the default.
//!
//! Besides the server and the allow-list of actions, the agent's own say
//! over sandboxes lives here: which kinds it runs (`allow_sandboxes`) and
//! which Docker engine it uses (`docker_host`, or `off`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_proto::limits::MAX_CAPACITY;
use serde::Deserialize;

/// Default place of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/drover/agent.yaml";

/// Attempts run at once unless configured otherwise.
pub const DEFAULT_CAPACITY: u32 = 4;

/// The Docker engine used unless configured otherwise.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

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
    /// The Docker engine for docker sandboxes: unix:///PATH, tcp://HOST:PORT,
    /// http://HOST:PORT, or off [default: unix:///var/run/docker.sock].
    #[arg(
        long,
        env = "DROVER_AGENT_DOCKER_HOST",
        value_name = "URL",
        global = true
    )]
    pub docker_host: Option<String>,
    /// A sandbox kind this agent runs: process or docker; repeatable.
    /// Replaces allow_sandboxes of agent.yaml [default: process, docker].
    #[arg(
        long = "allow-sandbox",
        env = "DROVER_AGENT_ALLOW_SANDBOXES",
        value_delimiter = ',',
        value_name = "KIND",
        global = true
    )]
    pub allow_sandboxes: Option<Vec<String>>,
    /// A directory under which a workspace's git.repo may be a local path
    /// (absolute); repeatable. Replaces workspace_local_roots of
    /// agent.yaml [default: none, remote URLs only].
    #[arg(
        long = "workspace-local-root",
        env = "DROVER_AGENT_WORKSPACE_LOCAL_ROOTS",
        value_delimiter = ',',
        value_name = "DIR",
        global = true
    )]
    pub workspace_local_roots: Option<Vec<PathBuf>>,
    /// Trust only servers whose certificate this CA (PEM) signed; kept in
    /// the state dir at enrollment [default: the pin kept there].
    #[arg(long, env = "DROVER_AGENT_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Trust only the server certificate with this fingerprint
    /// (sha256:HEX, from `drover token create`); kept in the state dir at
    /// enrollment [default: the pin kept there].
    #[arg(
        long,
        env = "DROVER_AGENT_CA_FINGERPRINT",
        value_name = "SHA256",
        global = true
    )]
    pub ca_fingerprint: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The filter of `log_level`: comma-separated directives, each a level
/// (`info`), a target (`hyper`, all its levels) or both
/// (`drover_agent=debug`); the most specific target wins. A filter that
/// does not parse logs at `info`; an empty one logs nothing.
///
/// A `Targets` filter rather than an `EnvFilter`: the latter compiles
/// regexes to parse even `info`, which kept ~0.3 MiB of code resident in
/// an idle agent (docs/BENCHMARKS.md). Its span and field filters
/// (`[span]=debug`, `target[{field=value}]=debug`) are the syntax given
/// up: such a filter logs at `info`, like any other it does not parse.
pub fn log_filter(text: &str) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let fallback = || Targets::new().with_default(LevelFilter::INFO);
    // Empty directives (`info,`) are skipped, as EnvFilter did: parsed, one
    // would be the empty target, which enables everything.
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Targets::new();
    }
    // `Targets` would take `[span]` for the name of a target.
    if directives.iter().any(|d| d.contains('[')) {
        return fallback();
    }
    directives.join(",").parse().unwrap_or_else(|_| fallback())
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
    docker_host: Option<String>,
    allow_sandboxes: Option<Vec<String>>,
    workspace_local_roots: Option<Vec<PathBuf>>,
    ca_file: Option<PathBuf>,
    ca_fingerprint: Option<String>,
}

/// Where the Docker engine is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// Docker is not used: docker sandboxes are refused.
    Off,
    /// A unix socket, e.g. /var/run/docker.sock.
    Unix(PathBuf),
    /// Plain HTTP to `host:port` (what `tcp://` means to Docker).
    Http(String),
}

impl DockerHost {
    /// Reads `unix:///PATH`, `tcp://HOST:PORT`, `http://HOST:PORT` or `off`.
    pub fn parse(text: &str) -> Result<DockerHost, ConfigError> {
        let text = text.trim();
        let bad = || {
            ConfigError::Invalid(format!(
                "docker_host '{text}' is not unix:///PATH, tcp://HOST:PORT, http://HOST:PORT or off"
            ))
        };
        if text == "off" {
            return Ok(DockerHost::Off);
        }
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(DockerHost::Unix(PathBuf::from(path)));
        }
        let addr = text
            .strip_prefix("tcp://")
            .or_else(|| text.strip_prefix("http://"))
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("http://{addr}")).map_err(|_| bad())?;
        if url.host().is_none() || url.path() != "/" || addr.is_empty() {
            return Err(bad());
        }
        Ok(DockerHost::Http(addr.to_owned()))
    }
}

impl std::fmt::Display for DockerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DockerHost::Off => f.write_str("off"),
            DockerHost::Unix(p) => write!(f, "unix://{}", p.display()),
            DockerHost::Http(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A kind of sandbox an agent may run (`Sandbox::kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxKind {
    Process,
    Docker,
}

impl SandboxKind {
    pub const ALL: [SandboxKind; 2] = [SandboxKind::Process, SandboxKind::Docker];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Process => "process",
            SandboxKind::Docker => "docker",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxKind> {
        SandboxKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
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
    /// The Docker engine for docker sandboxes and workspaces.
    pub docker_host: DockerHost,
    /// Sandbox kinds this agent runs; an assignment of another kind is
    /// rejected. A plain process (no sandbox) counts as `process`.
    pub allow_sandboxes: Vec<SandboxKind>,
    /// Directories under which a workspace's `git.repo` may be a local
    /// path. Empty (the default): remote URLs only. The agent clones as
    /// itself (root, usually), so a local path anywhere else would let a
    /// task read a repository its own user could not.
    pub workspace_local_roots: Vec<PathBuf>,
    /// The server's CA or certificate, from `ca_file`/`ca_fingerprint`;
    /// beats the pin kept in the state dir (`tls`).
    pub pin: Option<crate::tls::Pin>,
}

/// A configuration that cannot be used, naming the file, line or option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `FILE: line L, column C: message`.
    #[error(transparent)]
    Parse(drover_proto::yaml::YamlError),
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

/// Whether human-readable logs on stderr may use ANSI colours: only on a
/// terminal, and not when `NO_COLOR` is set to anything but empty
/// (<https://no-color.org>). A log redirected to a file or a journal
/// stays plain text.
pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// True when the effective user is root (`/proc/self` belongs to it).
pub fn running_as_root() -> bool {
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
    drover_proto::yaml::from_str(&text, &path.display().to_string()).map_err(ConfigError::Parse)
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
            docker_host: DockerHost::parse(
                args.docker_host
                    .as_deref()
                    .or(file.docker_host.as_deref())
                    .unwrap_or(DEFAULT_DOCKER_HOST),
            )?,
            allow_sandboxes: parse_sandbox_kinds(
                args.allow_sandboxes
                    .clone()
                    .or(file.allow_sandboxes)
                    .unwrap_or_else(|| {
                        SandboxKind::ALL
                            .iter()
                            .map(|k| k.as_str().to_owned())
                            .collect()
                    }),
            )?,
            workspace_local_roots: args
                .workspace_local_roots
                .clone()
                .or(file.workspace_local_roots)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
            pin: crate::tls::Pin::configured(
                args.ca_file.as_deref().or(file.ca_file.as_deref()),
                args.ca_fingerprint
                    .as_deref()
                    .or(file.ca_fingerprint.as_deref()),
            )
            .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        };
        if let Some(root) = config
            .workspace_local_roots
            .iter()
            .find(|p| !p.is_absolute())
        {
            return Err(ConfigError::Invalid(format!(
                "workspace_local_roots: '{}' is not an absolute path",
                root.display()
            )));
        }
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

/// Reads the sandbox kinds of `allow_sandboxes`, without repeats.
fn parse_sandbox_kinds(names: Vec<String>) -> Result<Vec<SandboxKind>, ConfigError> {
    let mut kinds = Vec::new();
    for name in names {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let kind = SandboxKind::parse(name).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "allow_sandboxes: unknown sandbox kind '{name}' (use process or docker)"
            ))
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return Err(ConfigError::Invalid(
            "allow_sandboxes must name at least one of process, docker".to_owned(),
        ));
    }
    Ok(kinds)
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
    fn workspace_local_roots_are_absolute_and_none_by_default() {
        let c = load_text("server: http://h:1\n").unwrap();
        assert!(c.workspace_local_roots.is_empty(), "remote URLs only");
        let c = load_text("workspace_local_roots: [/srv/repos, /opt/git]\n").unwrap();
        assert_eq!(
            c.workspace_local_roots,
            vec![PathBuf::from("/srv/repos"), PathBuf::from("/opt/git")]
        );
        let err = load_text("workspace_local_roots: [repos]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: workspace_local_roots: 'repos' is not an absolute path"
        );
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
    fn docker_hosts_table() {
        let cases: [(&str, Result<DockerHost, &str>); 10] = [
            ("off", Ok(DockerHost::Off)),
            (
                "unix:///var/run/docker.sock",
                Ok(DockerHost::Unix("/var/run/docker.sock".into())),
            ),
            (
                "tcp://10.0.0.5:2375",
                Ok(DockerHost::Http("10.0.0.5:2375".into())),
            ),
            (
                "http://docker.lan:2375/",
                Ok(DockerHost::Http("docker.lan:2375".into())),
            ),
            ("unix://relative.sock", Err("unix://relative.sock")),
            ("https://docker.lan:2376", Err("https://docker.lan:2376")),
            ("ssh://me@host", Err("ssh://me@host")),
            ("tcp://", Err("tcp://")),
            ("tcp://host:2375/path", Err("tcp://host:2375/path")),
            ("/var/run/docker.sock", Err("/var/run/docker.sock")),
        ];
        for (text, want) in cases {
            match (DockerHost::parse(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{text}"),
                (Err(e), Err(named)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(named) && e.contains("docker_host"),
                        "{text}: {e}"
                    );
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            DockerHost::Unix("/run/d.sock".into()).to_string(),
            "unix:///run/d.sock"
        );
    }

    #[test]
    fn sandbox_options_default_and_parse() {
        let c = load_text("server: http://h:1\n").unwrap();
        assert_eq!(
            c.docker_host,
            DockerHost::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            c.allow_sandboxes,
            vec![SandboxKind::Process, SandboxKind::Docker]
        );
        let cases: [(&str, Result<Vec<SandboxKind>, &str>); 6] = [
            (
                "allow_sandboxes: [process]\n",
                Ok(vec![SandboxKind::Process]),
            ),
            (
                "allow_sandboxes: [docker, process, docker]\n",
                Ok(vec![SandboxKind::Docker, SandboxKind::Process]),
            ),
            ("allow_sandboxes: [vm]\n", Err("'vm'")),
            ("allow_sandboxes: []\n", Err("at least one")),
            ("allow_sandboxes: docker\n", Err("agent.yaml")),
            ("docker_host: tcp:/x\n", Err("tcp:/x")),
        ];
        for (text, want) in cases {
            match (load_text(text), want) {
                (Ok(c), Ok(kinds)) => assert_eq!(c.allow_sandboxes, kinds, "{text}"),
                (Err(e), Err(named)) => {
                    let e = e.to_string();
                    assert!(e.contains(named), "{text}: {e}");
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
        let c = load_text("docker_host: \"off\"\n").unwrap();
        assert_eq!(c.docker_host, DockerHost::Off);
    }

    #[test]
    fn sandbox_flags_override_the_file() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: AgentArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "allow_sandboxes: [process]\ndocker_host: off\n").unwrap();
        let file = path.to_str().unwrap();
        let parse = |argv: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(argv).unwrap();
            AgentConfig::load(&cli.args).unwrap()
        };
        let c = parse(&["x", "--config", file]);
        assert_eq!(c.allow_sandboxes, vec![SandboxKind::Process]);
        assert_eq!(c.docker_host, DockerHost::Off);
        let c = parse(&[
            "x",
            "--config",
            file,
            "--allow-sandbox",
            "docker",
            "--allow-sandbox",
            "process",
            "--docker-host",
            "tcp://127.0.0.1:2375",
        ]);
        assert_eq!(
            c.allow_sandboxes,
            vec![SandboxKind::Docker, SandboxKind::Process]
        );
        assert_eq!(c.docker_host, DockerHost::Http("127.0.0.1:2375".into()));
        // The variable's form: one comma-separated value.
        let c = parse(&["x", "--config", file, "--allow-sandbox", "docker,process"]);
        assert_eq!(
            c.allow_sandboxes,
            vec![SandboxKind::Docker, SandboxKind::Process]
        );
    }

    #[test]
    fn log_filters() {
        use tracing::Level;
        // (filter, target, level, enabled)
        let cases = [
            ("info", "drover_agent", Level::INFO, true),
            ("info", "hyper", Level::DEBUG, false),
            ("INFO", "hyper", Level::INFO, true),
            (
                "warn,drover_agent=debug",
                "drover_agent::jobs",
                Level::DEBUG,
                true,
            ),
            ("warn,drover_agent=debug", "hyper", Level::INFO, false),
            (
                "warn, drover_agent=debug",
                "drover_agent",
                Level::DEBUG,
                true,
            ),
            ("info,", "hyper", Level::DEBUG, false),
            ("hyper", "hyper", Level::TRACE, true),
            ("", "drover_agent", Level::ERROR, false),
            ("[span]=debug", "drover_agent", Level::INFO, true),
            ("[span]=debug", "drover_agent", Level::DEBUG, false),
            ("h[{f=1}]=debug", "drover_agent", Level::INFO, true),
            ("bogus=loud", "drover_agent", Level::INFO, true),
        ];
        for (filter, target, level, enabled) in cases {
            assert_eq!(
                log_filter(filter).would_enable(target, &level),
                enabled,
                "{filter:?}: {target} at {level}"
            );
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
