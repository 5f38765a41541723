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
//!
//! Its parts: `engine` (the connection, what the engine offers, the
//! inventory's status, the leftover clean-up), `container` (the create
//! options of a container, from a profile), `attempt` (an attempt's own
//! container), `workspace` (a docker workspace's volume and container) and
//! `exec` (the workspace's tasks); `api` wraps bollard. Here: the calls
//! and the following of output that several of them share.

pub(crate) mod api;
mod attempt;
pub(crate) mod container;
mod engine;
mod exec;
mod workspace;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use drover_proto::sandbox::{DockerSandbox, PullPolicy};

use crate::executor::{self, Event, Exit, Failure, Supervisor};
use api::{Client, ContainerConfig, Output};

pub(crate) use attempt::{attempt_container_name, run_attempt};
pub use engine::Engine;
pub(crate) use exec::run_exec;
pub(crate) use workspace::{create_workspace, remove_workspace, workspace_name, workspace_running};

/// Label on everything the agent creates in the engine.
pub const LABEL_MANAGED: &str = "io.drover.managed";
/// The id of the agent that created it.
pub const LABEL_AGENT: &str = "io.drover.agent";
/// `attempt` or `workspace`.
pub const LABEL_KIND: &str = "io.drover.kind";
pub const LABEL_ATTEMPT: &str = "io.drover.attempt";
pub const LABEL_JOB: &str = "io.drover.job";
pub const LABEL_WORKSPACE: &str = "io.drover.workspace";

/// Longest wait for one call that is not a stream (kill, remove, inspect):
/// a hung engine must not hold an attempt forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The engine took the call but did not answer in time.
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

impl Error {
    fn status(&self) -> Option<u16> {
        match self {
            Error::Engine { status, .. } => Some(*status),
            Error::Unreachable { .. } | Error::Timeout(_) => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
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
        .map_err(|source| executor::Error::InspectImage {
            image: image.to_owned(),
            source,
        })?;
    let pull = match sandbox.pull {
        PullPolicy::Always => true,
        PullPolicy::Missing => !present,
        PullPolicy::Never if present => false,
        PullPolicy::Never => {
            return Err(executor::Error::ImageMissing {
                image: image.to_owned(),
            }
            .into())
        }
    };
    if !pull {
        return Ok(());
    }
    sup.note(&format!("pulling image {image}"));
    let (name, tag) = pull_ref(image);
    sup.bounded(client.pull(name, tag))
        .await?
        .map_err(|source| {
            executor::Error::Pull {
                image: image.to_owned(),
                source,
                present,
            }
            .into()
        })
}

/// Removes a container and its anonymous volumes, whatever its state; a
/// missing one is fine.
async fn remove_container(client: &Client, name: &str) -> Result<(), Error> {
    match tokio::time::timeout(CALL_TIMEOUT, client.remove_container(name)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_not_found() => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Timeout(CALL_TIMEOUT)),
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
            remove_container(client, name).await?;
            client.create_container(name, config).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
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

async fn wait_exit(
    exit: &mut Option<BoxFuture<Result<Exit, executor::Error>>>,
) -> Result<Exit, executor::Error> {
    match exit {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
