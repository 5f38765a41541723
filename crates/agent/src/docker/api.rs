//! The calls of the Docker Engine API the agent makes, through `bollard`,
//! and the few fields of each answer it reads.
//!
//! Key design decision: the rest of the agent sees small types of its own
//! (`ContainerConfig`, `ContainerInfo`, `Output`, …) and one error type
//! that says whether the engine was unreachable (retryable) or refused;
//! bollard's models stay inside this module. The API version is
//! negotiated down to the engine's (20.10 speaks 1.41). bollard's request
//! timeout bounds only the wait for an answer's head, so followed logs,
//! waits, pulls and attached execs stream for as long as they last.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ExecConfig as EngineExecConfig, HostConfig as EngineHostConfig,
    HostConfigLogConfig, Mount as EngineMount, MountType, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, StartContainerOptions,
    WaitContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use drover_proto::jobs::Stream;
use futures_util::{Stream as FutureStream, StreamExt};

use super::Error;

/// Longest wait for the head of an answer (streams then last as long as
/// they do).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the version negotiation when connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Initial buffer of an attached exec's output reader.
const EXEC_OUTPUT_BUFFER: usize = 64 * 1024;

/// Where the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Unix(PathBuf),
    /// `host:port`, plain HTTP.
    Tcp(String),
}

/// A client of one engine, at the API version both speak. bollard opens a
/// connection per request (no idle pool on the unix socket), so a
/// restarted engine is simply reached again.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    docker: Docker,
    /// How errors name the engine, e.g. `unix:///var/run/docker.sock`.
    host: String,
}

/// `GET /version`, the part the agent reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Version {
    pub version: Option<String>,
    pub api_version: Option<String>,
}

/// `GET /info`: what the agent reports and checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Info {
    /// The runtimes the engine registers, by its own names.
    pub runtimes: Vec<String>,
    pub default_runtime: Option<String>,
    pub cgroup_version: Option<String>,
    pub memory_limit: Option<bool>,
    pub swap_limit: Option<bool>,
    pub cpu_cfs_quota: Option<bool>,
    pub pids_limit: Option<bool>,
}

/// `GET /containers/{id}/json`, the part the agent reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct ContainerInfo {
    pub id: String,
    pub state: ContainerState,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ContainerState {
    pub running: bool,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub pid: Option<i64>,
}

/// One entry of `GET /containers/json`.
#[derive(Debug, Clone)]
pub(crate) struct ContainerSummary {
    pub id: String,
    pub names: Vec<String>,
}

/// `GET /exec/{id}/json`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExecInfo {
    pub running: bool,
    pub exit_code: Option<i64>,
    pub pid: Option<i64>,
}

/// What a container is created with.
#[derive(Debug, Clone)]
pub(crate) struct ContainerConfig {
    pub image: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: Option<String>,
    pub labels: HashMap<String, String>,
    pub host_config: HostConfig,
}

/// The limits and mounts of a container.
#[derive(Debug, Clone)]
pub(crate) struct HostConfig {
    pub memory: Option<i64>,
    pub memory_swap: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub network_mode: String,
    pub readonly_rootfs: bool,
    pub tmpfs: HashMap<String, String>,
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    pub security_opt: Vec<String>,
    pub runtime: Option<String>,
    pub init: bool,
    pub mounts: Vec<Mount>,
    pub log_config: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub target: String,
    pub source: String,
    /// `bind` or `volume`.
    pub kind: &'static str,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct LogConfig {
    pub kind: String,
    pub config: HashMap<String, String>,
}

/// What an exec is created with.
#[derive(Debug, Clone)]
pub(crate) struct ExecConfig {
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub working_dir: String,
}

/// What a volume is created with.
#[derive(Debug, Clone)]
pub(crate) struct VolumeConfig {
    pub name: String,
    pub driver: String,
    pub driver_opts: HashMap<String, String>,
    pub labels: HashMap<String, String>,
}

impl Client {
    /// Connects to the engine and agrees on an API version.
    pub(crate) async fn connect(endpoint: Endpoint, host: String) -> Result<Client, Error> {
        let unreachable = |message: String| Error::Unreachable {
            host: host.clone(),
            message,
        };
        let timeout = ANSWER_TIMEOUT.as_secs();
        let docker = match &endpoint {
            Endpoint::Unix(socket) => Docker::connect_with_unix(
                &socket.to_string_lossy(),
                timeout,
                bollard::API_DEFAULT_VERSION,
            ),
            Endpoint::Tcp(addr) => Docker::connect_with_http(
                &format!("http://{addr}"),
                timeout,
                bollard::API_DEFAULT_VERSION,
            ),
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer within 5s".to_owned()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Client { docker, host })
    }

    /// The agent's error for one of bollard's.
    fn error(&self, e: EngineError) -> Error {
        engine_error(&self.host, e)
    }

    pub(crate) async fn version(&self) -> Result<Version, Error> {
        let v = self.docker.version().await.map_err(|e| self.error(e))?;
        Ok(Version {
            version: v.version,
            api_version: v.api_version,
        })
    }

    pub(crate) async fn info(&self) -> Result<Info, Error> {
        let i = self.docker.info().await.map_err(|e| self.error(e))?;
        let mut runtimes: Vec<String> = i.runtimes.unwrap_or_default().into_keys().collect();
        runtimes.sort();
        Ok(Info {
            runtimes,
            default_runtime: i.default_runtime,
            cgroup_version: i.cgroup_version.map(|v| v.to_string()),
            memory_limit: i.memory_limit,
            swap_limit: i.swap_limit,
            cpu_cfs_quota: i.cpu_cfs_quota,
            pids_limit: i.pids_limit,
        })
    }

    /// Whether the engine has `image`.
    pub(crate) async fn image_exists(&self, image: &str) -> Result<bool, Error> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match self.error(e) {
                e if e.is_not_found() => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Pulls `name:tag`, reading the progress to its end; an error in it
    /// (the engine reports failures there) is the call's error.
    pub(crate) async fn pull(&self, name: &str, tag: &str) -> Result<(), Error> {
        let options = CreateImageOptionsBuilder::default()
            .from_image(name)
            .tag(tag)
            .build();
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Creates a container; its id.
    pub(crate) async fn create_container(
        &self,
        name: &str,
        config: &ContainerConfig,
    ) -> Result<String, Error> {
        let body = container_body(config);
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.error(e))?;
        Ok(created.id)
    }

    pub(crate) async fn start_container(&self, name: &str) -> Result<(), Error> {
        self.docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(|e| self.error(e))
    }

    /// The container's output, followed until it stops.
    pub(crate) async fn logs(&self, name: &str) -> Result<Output, Error> {
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        Ok(Output::new(
            self.docker.logs(name, Some(options)).boxed(),
            &self.host,
        ))
    }

    /// Waits until the container stops; its exit status.
    pub(crate) async fn wait_container(&self, name: &str) -> Result<i64, Error> {
        let mut waits = self
            .docker
            .wait_container(name, None::<WaitContainerOptions>);
        match waits.next().await {
            Some(Ok(w)) => Ok(w.status_code),
            // bollard reports a non-zero exit status as an error.
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(self.error(e)),
            None => Err(Error::Engine {
                status: 0,
                message: format!("the engine ended the wait for {name} without a status"),
            }),
        }
    }

    pub(crate) async fn inspect_container(&self, name: &str) -> Result<ContainerInfo, Error> {
        let c = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.error(e))?;
        let state = c.state.unwrap_or_default();
        Ok(ContainerInfo {
            id: c.id.unwrap_or_default(),
            state: ContainerState {
                running: state.running.unwrap_or(false),
                exit_code: state.exit_code,
                oom_killed: state.oom_killed.unwrap_or(false),
                pid: state.pid,
            },
        })
    }

    /// Sends `signal` (e.g. `SIGTERM`) to the container's init.
    pub(crate) async fn kill_container(&self, name: &str, signal: &str) -> Result<(), Error> {
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        self.docker
            .kill_container(name, Some(options))
            .await
            .map_err(|e| self.error(e))
    }

    /// Removes a container whatever its state, with its anonymous volumes.
    pub(crate) async fn remove_container(&self, name: &str) -> Result<(), Error> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        self.docker
            .remove_container(name, Some(options))
            .await
            .map_err(|e| self.error(e))
    }

    /// Containers in every state carrying all of `labels` (`key=value`).
    pub(crate) async fn list_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<ContainerSummary>, Error> {
        let filters = HashMap::from([("label".to_owned(), labels.to_vec())]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.error(e))?;
        Ok(list
            .into_iter()
            .map(|c| ContainerSummary {
                id: c.id.unwrap_or_default(),
                names: c.names.unwrap_or_default(),
            })
            .collect())
    }

    /// Creates an exec in a running container; its id.
    pub(crate) async fn create_exec(
        &self,
        container: &str,
        config: &ExecConfig,
    ) -> Result<String, Error> {
        let body = EngineExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(config.env.clone()),
            cmd: Some(config.cmd.clone()),
            user: config.user.clone(),
            working_dir: Some(config.working_dir.clone()),
            privileged: Some(false),
            ..EngineExecConfig::default()
        };
        let created = self
            .docker
            .create_exec(container, body)
            .await
            .map_err(|e| self.error(e))?;
        Ok(created.id)
    }

    /// Starts an exec attached: the engine then sends its output until it
    /// ends. Its stdin is closed.
    pub(crate) async fn start_exec(&self, id: &str) -> Result<Output, Error> {
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(EXEC_OUTPUT_BUFFER),
        };
        match self
            .docker
            .start_exec(id, Some(options))
            .await
            .map_err(|e| self.error(e))?
        {
            StartExecResults::Attached { output, input } => {
                drop(input);
                Ok(Output::new(output, &self.host))
            }
            StartExecResults::Detached => Err(Error::Engine {
                status: 0,
                message: format!("exec {id} started detached"),
            }),
        }
    }

    pub(crate) async fn inspect_exec(&self, id: &str) -> Result<ExecInfo, Error> {
        let e = self
            .docker
            .inspect_exec(id)
            .await
            .map_err(|e| self.error(e))?;
        Ok(ExecInfo {
            running: e.running.unwrap_or(false),
            exit_code: e.exit_code,
            pid: e.pid,
        })
    }

    pub(crate) async fn create_volume(&self, config: &VolumeConfig) -> Result<(), Error> {
        let body = VolumeCreateRequest {
            name: Some(config.name.clone()),
            driver: Some(config.driver.clone()),
            driver_opts: Some(config.driver_opts.clone()),
            labels: Some(config.labels.clone()),
            ..VolumeCreateRequest::default()
        };
        self.docker
            .create_volume(body)
            .await
            .map(drop)
            .map_err(|e| self.error(e))
    }

    pub(crate) async fn remove_volume(&self, name: &str) -> Result<(), Error> {
        let options = RemoveVolumeOptionsBuilder::default().force(true).build();
        self.docker
            .remove_volume(name, Some(options))
            .await
            .map_err(|e| self.error(e))
    }

    /// Names of the volumes carrying all of `labels` (for the tests'
    /// checks).
    #[cfg(test)]
    pub(crate) async fn list_volumes(&self, labels: &[String]) -> Result<Vec<String>, Error> {
        let filters = HashMap::from([("label".to_owned(), labels.to_vec())]);
        let options = bollard::query_parameters::ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|e| self.error(e))?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    /// The (gateway, subnet) of a network's first address pool (for the
    /// tests).
    #[cfg(test)]
    pub(crate) async fn network_ipam(
        &self,
        name: &str,
    ) -> Result<(Option<String>, Option<String>), Error> {
        let n = self
            .docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .map_err(|e| self.error(e))?;
        let pool = n
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .next();
        Ok(pool.map_or((None, None), |c| (c.gateway, c.subnet)))
    }
}

/// The agent's error for one of bollard's, from the engine at `host`: the
/// engine's own refusals keep their status; anything about the connection
/// is unreachable.
fn engine_error(host: &str, e: EngineError) -> Error {
    match e {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => Error::Engine {
            status: status_code,
            message,
        },
        EngineError::DockerStreamError { error } => Error::Engine {
            status: 0,
            message: error,
        },
        e @ (EngineError::JsonDataError { .. } | EngineError::JsonSerdeError { .. }) => {
            Error::Engine {
                status: 0,
                message: format!("the engine's answer is not understood: {e}"),
            }
        }
        EngineError::RequestTimeoutError => Error::Unreachable {
            host: host.to_owned(),
            message: format!("no answer within {}s", ANSWER_TIMEOUT.as_secs()),
        },
        other => Error::Unreachable {
            host: host.to_owned(),
            message: other.to_string(),
        },
    }
}

/// The engine's body of `POST /containers/create` for a config: nothing is
/// attached, no TTY, never privileged.
pub(crate) fn container_body(config: &ContainerConfig) -> ContainerCreateBody {
    let h = &config.host_config;
    ContainerCreateBody {
        image: Some(config.image.clone()),
        entrypoint: Some(config.entrypoint.clone()),
        cmd: Some(config.cmd.clone()),
        env: Some(config.env.clone()),
        working_dir: Some(config.working_dir.clone()),
        user: config.user.clone(),
        labels: Some(config.labels.clone()),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(EngineHostConfig {
            memory: h.memory,
            memory_swap: h.memory_swap,
            nano_cpus: h.nano_cpus,
            pids_limit: h.pids_limit,
            network_mode: Some(h.network_mode.clone()),
            readonly_rootfs: Some(h.readonly_rootfs),
            tmpfs: Some(h.tmpfs.clone()),
            cap_drop: Some(h.cap_drop.clone()),
            cap_add: (!h.cap_add.is_empty()).then(|| h.cap_add.clone()),
            security_opt: Some(h.security_opt.clone()),
            runtime: h.runtime.clone(),
            init: Some(h.init),
            privileged: Some(false),
            mounts: Some(h.mounts.iter().map(engine_mount).collect()),
            log_config: Some(HostConfigLogConfig {
                typ: Some(h.log_config.kind.clone()),
                config: Some(h.log_config.config.clone()),
            }),
            ..EngineHostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

fn engine_mount(m: &Mount) -> EngineMount {
    EngineMount {
        target: Some(m.target.clone()),
        source: Some(m.source.clone()),
        typ: Some(if m.kind == "volume" {
            MountType::VOLUME
        } else {
            MountType::BIND
        }),
        read_only: Some(m.read_only),
        ..EngineMount::default()
    }
}

type OutputStream = Pin<Box<dyn FutureStream<Item = Result<LogOutput, EngineError>> + Send>>;

/// A container's or an exec's output as bollard demultiplexes it.
pub(crate) struct Output {
    inner: OutputStream,
    /// The engine's, for errors.
    host: String,
}

impl Output {
    fn new(inner: OutputStream, host: &str) -> Output {
        Output {
            inner,
            host: host.to_owned(),
        }
    }

    /// The next piece of output; `None` at its end.
    pub(crate) async fn next(&mut self) -> Option<Result<(Stream, Bytes), Error>> {
        loop {
            return match self.inner.next().await? {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok((Stream::Stdout, message)))
                }
                Ok(LogOutput::StdErr { message }) => Some(Ok((Stream::Stderr, message))),
                // Nothing is written to the containers' stdin.
                Ok(LogOutput::StdIn { .. }) => continue,
                Err(e) => Some(Err(engine_error(&self.host, e))),
            };
        }
    }
}
