//! An attempt in a container of its own, `drover-<attempt_id>`: admitted
//! against what the engine offers, its image ensured, created, started,
//! supervised, and removed whatever happens.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use drover_proto::jobs::{Assignment, AttemptResult};
use drover_proto::sandbox::{
    DockerSandbox, LimitExceeded, WorkspaceSpec, DROVER_MOUNT, WORKSPACE_MOUNT, WORK_MOUNT,
};

use super::api::{Client, ContainerConfig, Mount};
use super::container::{
    bind, container_config, env_list, log_max_bytes, numeric_owner, ContainerSpec,
};
use super::{
    create_container, ensure_image, remove_container, wait_exit, BoxFuture, Engine, OutputState,
    CALL_TIMEOUT, LABEL_ATTEMPT, LABEL_JOB,
};
use crate::executor::{
    self, private_dir, Ended, Error, Event, ExecOptions, Exit, Failure, Signal, Supervisor,
    Workload, OUTPUTS_FILE,
};

/// Removes a container when dropped, unless disarmed: the attempt's future
/// may be dropped half-way (the runtime stops), and the container must not
/// outlive it. Best effort; the clean-up at the next start catches the
/// rest.
struct RemoveOnDrop {
    client: Option<Client>,
    name: String,
}

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.client = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let name = std::mem::take(&mut self.name);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = remove_container(&client, &name).await {
                    tracing::warn!(container = %name, error = %e, "could not remove a container");
                }
            });
        }
    }
}

/// Runs an attempt in a container of its own.
pub(crate) async fn run_attempt(
    a: &Assignment,
    opts: &ExecOptions,
    engine: &Engine,
    sandbox: &DockerSandbox,
    workspace: Option<&WorkspaceSpec>,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    let runtime = match sup.bounded(engine.admit(sandbox)).await {
        Ok(Ok(runtime)) => runtime,
        Ok(Err(f)) | Err(f) => return sup.fail(f),
    };
    let client = match engine.client().await {
        Ok(c) => c,
        Err(e) => return sup.fail(e.into()),
    };
    if let Err(f) = ensure_image(&client, sandbox, sup).await {
        return sup.fail(f);
    }
    let mounts = match attempt_mounts(a, opts, sandbox, workspace) {
        Ok(m) => m,
        Err(f) => return sup.fail(f),
    };
    let working_dir = if workspace.is_some() {
        WORKSPACE_MOUNT
    } else {
        WORK_MOUNT
    };
    let config = container_config(ContainerSpec {
        sandbox,
        runtime,
        entrypoint: vec![a.argv[0].clone()],
        cmd: a.argv[1..].to_vec(),
        env: env_list(a, &format!("{DROVER_MOUNT}/{OUTPUTS_FILE}")),
        working_dir,
        mounts,
        labels: engine.labels(
            "attempt",
            &[(LABEL_ATTEMPT, &a.attempt_id), (LABEL_JOB, &a.job_id)],
        ),
        log_max_bytes: log_max_bytes(a),
    });
    let name = attempt_container_name(&a.attempt_id);
    let outputs = executor::drover_dir(opts, a).join(OUTPUTS_FILE);
    // Recorded before it exists, so that a restart after a kill of the
    // agent removes it and reports the attempt (`survivors`).
    let record =
        crate::survivors::Record::new(a, crate::survivors::Work::Container { name: name.clone() });
    if let Err(e) = crate::survivors::record(opts, &record) {
        return sup.fail(Error::Record(e).into());
    }
    // From here on the container may exist: it is removed whatever happens.
    let guard = RemoveOnDrop {
        client: Some(client.clone()),
        name: name.clone(),
    };
    let result = match run_container(&client, &name, &config, sandbox, &outputs, sup).await {
        Ok(r) => r,
        Err(f) => sup.fail(f),
    };
    if let Err(e) = remove_container(&client, &name).await {
        tracing::warn!(container = %name, error = %e, "could not remove the attempt's container");
    }
    guard.disarm();
    result
}

/// The name of an attempt's own container.
pub(crate) fn attempt_container_name(attempt_id: &str) -> String {
    format!("drover-{attempt_id}")
}

/// The directories an attempt's container gets: its working dir (or the
/// process workspace's) and its drover dir.
fn attempt_mounts(
    a: &Assignment,
    opts: &ExecOptions,
    sandbox: &DockerSandbox,
    workspace: Option<&WorkspaceSpec>,
) -> Result<Vec<Mount>, Failure> {
    let owner = numeric_owner(sandbox.user.as_deref());
    let work = executor::work_dir(opts, a);
    let work_mount = match workspace {
        Some(ws) => {
            if !work.is_dir() {
                return Err(Error::NoWorkspace { id: ws.id.clone() }.into());
            }
            bind(&work, WORKSPACE_MOUNT)
        }
        None => {
            private_dir(&work, owner)?;
            if owner.is_none() && sandbox.user.is_some() {
                // A user known only by name inside the image: it can at
                // least read its working dir.
                let _ = executor::set_mode(&work, 0o755);
            }
            bind(&work, WORK_MOUNT)
        }
    };
    let drover = executor::drover_dir(opts, a);
    private_dir(&drover, owner)?;
    Ok(vec![work_mount, bind(&drover, DROVER_MOUNT)])
}

async fn run_container(
    client: &Client,
    name: &str,
    config: &ContainerConfig,
    sandbox: &DockerSandbox,
    outputs: &Path,
    sup: &mut Supervisor<'_>,
) -> Result<AttemptResult, Failure> {
    sup.bounded(create_container(client, name, config))
        .await?
        .map_err(Error::CreateContainer)?;
    sup.bounded(client.start_container(name))
        .await?
        .map_err(Error::StartContainer)?;
    let mut run = ContainerRun::new(client.clone(), name);
    let ended = sup.supervise(&mut run).await?;
    let limit = memory_exceeded(sandbox, &ended);
    Ok(sup.finish(&ended, Some(outputs), limit))
}

/// Whether the engine killed the workload for its memory.
fn memory_exceeded(sandbox: &DockerSandbox, ended: &Ended) -> Option<(LimitExceeded, String)> {
    let exit = ended.exit?;
    let memory = sandbox.memory?;
    exit.oom_killed.then(|| {
        (
            LimitExceeded::Memory,
            format!("killed: exceeded its memory limit of {memory}"),
        )
    })
}

/// An attempt's container under supervision: its log stream and its wait.
struct ContainerRun {
    client: Client,
    name: String,
    output: OutputState,
    exit: Option<BoxFuture<Result<Exit, Error>>>,
    signalled: Arc<AtomicBool>,
}

impl ContainerRun {
    fn new(client: Client, name: &str) -> ContainerRun {
        let signalled = Arc::new(AtomicBool::new(false));
        let output = OutputState::Asking(Box::pin({
            let client = client.clone();
            let name = name.to_owned();
            async move { client.logs(&name).await }
        }));
        let exit: BoxFuture<Result<Exit, Error>> = Box::pin({
            let client = client.clone();
            let name = name.to_owned();
            let signalled = signalled.clone();
            async move {
                client
                    .wait_container(&name)
                    .await
                    .map_err(Error::WaitContainer)?;
                let info = client
                    .inspect_container(&name)
                    .await
                    .map_err(Error::InspectContainer)?;
                Ok(Exit::from_status(
                    info.state.exit_code,
                    signalled.load(Ordering::Relaxed),
                    info.state.oom_killed,
                ))
            }
        });
        ContainerRun {
            client,
            name: name.to_owned(),
            output,
            exit: Some(exit),
            signalled,
        }
    }
}

impl Workload for ContainerRun {
    async fn next(&mut self) -> Result<Event, Error> {
        let reading = self.output.is_open();
        let waiting = self.exit.is_some();
        tokio::select! {
            ev = self.output.next(), if reading => Ok(ev),
            exit = wait_exit(&mut self.exit), if waiting => {
                self.exit = None;
                exit.map(Event::Exited)
            }
            // Not reached: the loop asks only while one is left.
            else => Err(Error::NothingToFollow("container")),
        }
    }

    fn output_open(&self) -> bool {
        self.output.is_open()
    }

    async fn signal(&mut self, sig: Signal) -> Result<(), Error> {
        self.signalled.store(true, Ordering::Relaxed);
        let name = match sig {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.client.kill_container(&self.name, name)).await
        {
            Ok(Ok(())) => {}
            // Not running (any more), or gone: nothing to signal.
            Ok(Err(e)) if matches!(e.status(), Some(404 | 409)) => {}
            Ok(Err(e)) => {
                tracing::warn!(container = %self.name, signal = name, error = %e, "signalling the container failed")
            }
            Err(_) => {
                tracing::warn!(container = %self.name, signal = name, "the engine did not answer a kill")
            }
        }
        Ok(())
    }

    async fn finish(&mut self) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use drover_proto::sandbox::ByteSize;

    use super::*;
    use crate::test_support::docker_profile as profile;

    #[test]
    fn memory_limit_is_reported_only_for_an_oom_kill() {
        let d = profile(serde_json::json!({"memory": "64m"}));
        let ended = |oom| Ended {
            exit: Some(Exit {
                code: None,
                signal: Some(9),
                oom_killed: oom,
            }),
            killed: false,
        };
        assert_eq!(
            memory_exceeded(&d, &ended(true)),
            Some((
                LimitExceeded::Memory,
                "killed: exceeded its memory limit of 64m".to_owned()
            ))
        );
        assert_eq!(memory_exceeded(&d, &ended(false)), None);
        assert_eq!(ByteSize(64 << 20).to_string(), "64m");
    }
}
