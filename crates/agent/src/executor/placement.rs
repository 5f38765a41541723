//! Where an attempt runs — a process, a container of its own, or an exec
//! in a docker workspace's container — decided before anything is
//! created, or why this agent refuses it.

use std::sync::Arc;

use drover_proto::jobs::Assignment;
use drover_proto::sandbox::{
    valid_workspace_id, DockerSandbox, ProcessSandbox, Sandbox, WorkspaceSpec,
};

use super::{ExecOptions, Refusal};
use crate::config::SandboxKind;
use crate::docker::Engine;

/// Where an attempt runs, decided before anything is created.
#[derive(Debug)]
pub(crate) enum Placement<'a> {
    /// A process on the host, in the workspace's directory if it has one.
    Process {
        sandbox: Option<&'a ProcessSandbox>,
        workspace: Option<&'a WorkspaceSpec>,
    },
    /// A container of its own (with the workspace's directory mounted, if
    /// it runs in a process workspace).
    Container {
        engine: &'a Arc<Engine>,
        sandbox: &'a DockerSandbox,
        workspace: Option<&'a WorkspaceSpec>,
    },
    /// An exec in the container of a docker workspace, under its limits.
    Exec {
        engine: &'a Arc<Engine>,
        sandbox: &'a DockerSandbox,
        workspace: &'a WorkspaceSpec,
    },
}

/// Decides where `a` runs, or why this agent refuses it: a sandbox kind
/// it does not run, Docker off, an invalid profile or workspace id, a user
/// switch it cannot make.
pub(crate) fn place<'a>(
    a: &'a Assignment,
    opts: &'a ExecOptions,
) -> Result<Placement<'a>, Refusal> {
    if let Some(ws) = &a.workspace {
        if !valid_workspace_id(&ws.id) {
            return Err(Refusal::InvalidWorkspaceId { id: ws.id.clone() });
        }
        if let Sandbox::Docker(sandbox) = &ws.sandbox {
            admit(&ws.sandbox, opts)?;
            let engine = engine_for(&ws.sandbox, opts)?;
            return Ok(Placement::Exec {
                engine,
                sandbox,
                workspace: ws,
            });
        }
    }
    let workspace = a.workspace.as_ref();
    match &a.sandbox {
        None => {
            admit(&Sandbox::default_process(), opts)?;
            Ok(Placement::Process {
                sandbox: None,
                workspace,
            })
        }
        Some(s @ Sandbox::Process(p)) => {
            admit(s, opts)?;
            crate::process::check_sandbox(p, opts.can_switch_users)?;
            Ok(Placement::Process {
                sandbox: Some(p),
                workspace,
            })
        }
        Some(s @ Sandbox::Docker(sandbox)) => {
            admit(s, opts)?;
            let engine = engine_for(s, opts)?;
            Ok(Placement::Container {
                engine,
                sandbox,
                workspace,
            })
        }
    }
}

/// Checks that this agent runs sandboxes of `s`'s kind, that the profile
/// is valid (the server checked it too, but the agent enforces only what
/// it understands) and, for a docker profile, that Docker is on.
pub(crate) fn admit(s: &Sandbox, opts: &ExecOptions) -> Result<(), Refusal> {
    let kind = match s {
        Sandbox::Process(_) => SandboxKind::Process,
        Sandbox::Docker(_) => SandboxKind::Docker,
    };
    if !opts.allow_sandboxes.contains(&kind) {
        return Err(Refusal::KindNotAllowed {
            sandbox: s.name().to_owned(),
            kind,
            allowed: opts.allow_sandboxes.clone(),
        });
    }
    s.validate().map_err(Refusal::InvalidProfile)?;
    if kind == SandboxKind::Docker {
        engine_for(s, opts)?;
    }
    Ok(())
}

/// The engine a docker profile runs on, or why there is none.
fn engine_for<'a>(s: &Sandbox, opts: &'a ExecOptions) -> Result<&'a Arc<Engine>, Refusal> {
    opts.docker.as_ref().ok_or_else(|| Refusal::DockerOff {
        sandbox: s.name().to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::assignment;

    /// Where an assignment runs, or why this agent refuses it.
    #[test]
    fn placement_table() {
        let tmp = tempfile::tempdir().unwrap();
        let process_only = ExecOptions {
            can_switch_users: true,
            ..ExecOptions::new(tmp.path())
        };
        let engine = Arc::new(Engine::new(
            crate::config::DockerHost::Unix("/nonexistent.sock".into()),
            "agent",
        ));
        let docker_only = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Docker],
            docker: Some(engine),
            ..process_only.clone()
        };
        let docker_off = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Process, SandboxKind::Docker],
            ..process_only.clone()
        };
        let non_root = ExecOptions {
            can_switch_users: false,
            ..process_only.clone()
        };
        let sandbox = |v: serde_json::Value| serde_json::from_value::<Sandbox>(v).unwrap();
        let docker =
            sandbox(serde_json::json!({"type": "docker", "name": "box", "image": "busybox"}));
        let as_nobody =
            sandbox(serde_json::json!({"type": "process", "name": "low", "user": "nobody"}));
        let host_net = sandbox(
            serde_json::json!({"type": "docker", "name": "bad", "image": "busybox", "network": "host"}),
        );
        let ws = |id: &str, s: &Sandbox| WorkspaceSpec {
            id: id.to_owned(),
            sandbox: s.clone(),
            git: None,
        };
        let plain = Sandbox::default_process();
        // (options, sandbox, workspace, where it runs or the refusal)
        type Case<'a> = (
            &'a ExecOptions,
            Option<&'a Sandbox>,
            Option<WorkspaceSpec>,
            Result<&'a str, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (&process_only, None, None, Ok("process")),
            (&process_only, Some(&as_nobody), None, Ok("process")),
            (&process_only, None, Some(ws("w1", &plain)), Ok("process")),
            (&docker_only, Some(&docker), None, Ok("container")),
            (&docker_only, Some(&docker), Some(ws("w1", &plain)), Ok("container")),
            // The workspace's container wins over the task's own sandbox.
            (&docker_only, None, Some(ws("w1", &docker)), Ok("exec")),
            (
                &process_only,
                Some(&docker),
                None,
                Err("sandbox 'box' is a docker sandbox, which this agent does not run (allow_sandboxes: process)"),
            ),
            (
                &docker_only,
                None,
                None,
                Err("sandbox 'process' is a process sandbox, which this agent does not run (allow_sandboxes: docker)"),
            ),
            (
                &docker_off,
                Some(&docker),
                None,
                Err("sandbox 'box' needs Docker, which is off on this agent (docker_host: off)"),
            ),
            (
                &docker_off,
                None,
                Some(ws("w1", &docker)),
                Err("sandbox 'box' needs Docker, which is off on this agent (docker_host: off)"),
            ),
            (
                &non_root,
                Some(&as_nobody),
                None,
                Err("sandbox 'low' runs as user 'nobody', but this agent cannot switch users: the agent is not running as root"),
            ),
            (&docker_only, Some(&host_net), None, Err("sandbox 'bad': network: 'host'")),
            (&process_only, None, Some(ws("../up", &plain)), Err("workspace id '../up' is not valid")),
        ];
        for (opts, sandbox, workspace, want) in cases {
            let mut a = assignment(&["true"]);
            a.sandbox = sandbox.cloned();
            a.workspace = workspace;
            let got = place(&a, opts).map(|p| match p {
                Placement::Process { .. } => "process",
                Placement::Container { .. } => "container",
                Placement::Exec { .. } => "exec",
            });
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{a:?}"),
                (Err(got), Err(want)) => {
                    let got = got.to_string();
                    assert!(got.starts_with(want), "{got}");
                }
                (got, want) => panic!(
                    "{:?} {:?}: got {got:?}, want {want:?}",
                    a.sandbox, a.workspace
                ),
            }
        }
    }
}
