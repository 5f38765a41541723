//! A docker workspace in the engine: a volume over the workspace's
//! directory and a long-lived container the tasks run in as execs
//! (`exec`), created under the workspace's profile and removed with the
//! workspace.

use std::collections::HashMap;
use std::path::Path;

use drover_proto::sandbox::{DockerSandbox, WorkspaceSpec, DROVER_MOUNT, WORKSPACE_MOUNT};

use super::api;
use super::container::{bind, container_config, volume, ContainerSpec};
use super::{
    create_container, ensure_image, remove_container, Engine, CALL_TIMEOUT, LABEL_WORKSPACE,
};
use crate::executor::{Error, Failure, Supervisor};

/// The command of a workspace container: it only has to stay up for the
/// execs (so the image needs `sleep`).
const WORKSPACE_COMMAND: [&str; 2] = ["sleep", "2147483647"];

/// The name of a workspace's container and volume.
pub(crate) fn workspace_name(id: &str) -> String {
    format!("drover-ws-{id}")
}

/// Whether the workspace's container exists and runs.
pub(crate) async fn workspace_running(engine: &Engine, id: &str) -> Result<bool, Failure> {
    let client = engine.client().await?;
    match client.inspect_container(&workspace_name(id)).await {
        Ok(info) => Ok(info.state.running),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates and starts a docker workspace's volume (bound to `dir`) and
/// long-lived container (`meta` mounted at `/drover`).
pub(crate) async fn create_workspace(
    engine: &Engine,
    ws: &WorkspaceSpec,
    sandbox: &DockerSandbox,
    dir: &Path,
    meta: &Path,
    sup: &mut Supervisor<'_>,
) -> Result<(), Failure> {
    let runtime = sup.bounded(engine.admit(sandbox)).await??;
    let client = engine.client().await?;
    ensure_image(&client, sandbox, sup)
        .await
        .map_err(|f| match f {
            Failure::Failed(e) => Failure::Failed(Error::WorkspaceImage(Box::new(e))),
            other => other,
        })?;
    let name = workspace_name(&ws.id);
    let labels = engine.labels("workspace", &[(LABEL_WORKSPACE, &ws.id)]);
    let volume_config = api::VolumeConfig {
        name: name.clone(),
        driver: "local".to_owned(),
        driver_opts: HashMap::from([
            ("type".to_owned(), "none".to_owned()),
            ("o".to_owned(), "bind".to_owned()),
            ("device".to_owned(), dir.to_string_lossy().into_owned()),
        ]),
        labels: labels.clone(),
    };
    sup.bounded(client.create_volume(&volume_config))
        .await?
        .map_err(Error::WorkspaceVolume)?;
    let config = container_config(ContainerSpec {
        sandbox,
        runtime,
        entrypoint: WORKSPACE_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
        cmd: Vec::new(),
        env: Vec::new(),
        working_dir: WORKSPACE_MOUNT,
        mounts: vec![volume(&name, WORKSPACE_MOUNT), bind(meta, DROVER_MOUNT)],
        labels,
        log_max_bytes: 16 << 20,
    });
    sup.bounded(create_container(&client, &name, &config))
        .await?
        .map_err(Error::WorkspaceContainer)?;
    sup.bounded(client.start_container(&name))
        .await?
        .map_err(Error::StartWorkspaceContainer)?;
    if !workspace_running(engine, &ws.id).await? {
        return Err(Error::WorkspaceContainerExited { name }.into());
    }
    Ok(())
}

/// Removes a docker workspace's container and volume; what is missing is
/// fine. Says what could not be removed.
pub(crate) async fn remove_workspace(engine: &Engine, id: &str) -> Vec<String> {
    let name = workspace_name(id);
    let client = match engine.client().await {
        Ok(c) => c,
        Err(e) => {
            return vec![
                format!("container {name} ({e})"),
                format!("volume {name} ({e})"),
            ]
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = remove_container(&client, &name).await {
        problems.push(format!("container {name} ({e})"));
    }
    match tokio::time::timeout(CALL_TIMEOUT, client.remove_volume(&name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_not_found() => {}
        Ok(Err(e)) => problems.push(format!("volume {name} ({e})")),
        Err(_) => problems.push(format!(
            "volume {name} (no answer within {}s)",
            CALL_TIMEOUT.as_secs()
        )),
    }
    problems
}
